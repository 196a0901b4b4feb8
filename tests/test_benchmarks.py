"""The benchmark's reading of the CLI's output, on the lines the CLI really prints."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.bench_utils import cli_job_seconds
from torchgeo_dofa.cli import EmbedSummary


@pytest.mark.parametrize(
    ("summary", "seconds"),
    [
        (EmbedSummary(chips=1, seconds=1.44, outputs=[Path("out/a.tif")]), 1.4),
        (EmbedSummary(chips=256, seconds=12.04, outputs=[Path("out/a.tif")]), 12.0),
        (EmbedSummary(chips=9, empty=3, skipped=2, seconds=3.0, outputs=[Path("in 9.9 s")]), 3.0),
    ],
)
def test_cli_job_seconds_reads_the_summary_line(summary: EmbedSummary, seconds: float) -> None:
    # the one-chip run is the marginal's baseline: "embedded 1 chip" once went unread, and
    # the benchmark printed -0.00 chips/s for the CLI's own job time
    output = f"torchgeo-dofa: device cpu, precision bf16\n{summary.line()}\n"
    assert cli_job_seconds(output) == seconds


def test_cli_job_seconds_without_a_summary_line_names_it() -> None:
    with pytest.raises(ValueError, match=r"(?s)no 'embedded N chips in X s' line.*Traceback"):
        cli_job_seconds("Traceback (most recent call last):\n...")
