"""The benchmark's reading of the CLI's output (on the lines the CLI really prints), verdicts."""

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


@pytest.mark.parametrize(("one_chip_s", "verdict"), [(5.9, "NOT MET"), (4.2, "MET")])
def test_start_up_target_is_judged_on_the_fastest_one_chip_run(
    one_chip_s: float, verdict: str
) -> None:
    from benchmarks.bench_utils import Machine
    from benchmarks.run import Report, targets

    machine = Machine("cpu", {}, 2, 2, "torch", "torchgeo", True, (0.0, 0.0, 0.0))
    report = Report(machine, peaks={"bf16": (1000.0, "1024^2")})
    report.checks |= {
        "cli_one_chip_fp32_s": 7.5,
        "cli_one_chip_bf16_s": one_chip_s,
        "library_imports_s": 3.8,
    }
    (line,) = [t for t in targets(report) if "start-up" in t]
    assert line.startswith(f"{verdict}: start-up: a one-chip `torchgeo-dofa embed` within 5 s")
    assert f": {one_chip_s:.1f} s (best of the CLI runs)" in line
    assert line.endswith("rasterio alone (as the command does, collector paused) takes 3.8 s")


def test_gpu_benchmarks_loader_probe_reads_every_chip_and_writes_nothing(tmp_path: Path) -> None:
    """``benchmarks/gpu.py --loader`` times embed's own loader: every chip of the job once,
    with and without the transfer, the job stopped before any output is written."""
    import math

    from benchmarks.gpu import loader_only
    from tests.scenes import SCENE

    got = loader_only(SCENE, [(4, 0)], "cpu", tmp_path, math.inf)
    assert set(got) == {(4, 0, False), (4, 0, True)}
    for whole, after, chips in got.values():
        assert chips == 6  # the bundled scene's 3 x 2 chips of 224 px
        assert 0 < whole < math.inf and 0 < after < math.inf
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_read_rows_time_the_loader_workers_reads_by_compression(tmp_path: Path) -> None:
    """``benchmarks/run.py --sections read``: the per-chip rows, the loader worker's rows
    (read as a worker reads a batch) and one row per GeoTIFF compression against the
    uncompressed file, each over every chip inside the scene."""
    import dataclasses
    import math

    from benchmarks.bench_utils import machine
    from benchmarks.run import QUICK, Report, read_rows

    report = Report(machine())
    read_rows(dataclasses.replace(QUICK, read_px=448, old_cache_chips=1), report, tmp_path)
    rows = {row.what: row for row in report.rows}
    codecs = [f"GeoTIFF {c}, loader worker's raw read" for c in ("deflate", "zstd", "lzw")]
    assert set(codecs) <= set(rows)
    assert "GeoTIFF, loader worker's work: read + DOFAPreprocess" in rows
    uncompressed = {rows[w].ref for w in codecs}
    assert len(uncompressed) == 1  # one reference for the three
    for row in report.rows:
        assert row.unit == "ms/chip" and 0 < row.value < math.inf and 0 < row.ref < math.inf
    worker = rows["GeoTIFF, loader worker's work: read + DOFAPreprocess"]
    chips = int(worker.note.split(" chips")[0])
    assert chips > 0  # the chips wholly inside the scene, the same for every compression
    for what in codecs:
        assert rows[what].note.startswith(f"{chips} chips;")
    sizes = [float(rows[w].note.split("file ")[1].split("%")[0]) for w in codecs]
    assert all(0 < size < 100 for size in sizes)  # each compresses the demo's reflectance


def test_benchmark_scenes_of_other_codecs_hold_the_same_pixels(tmp_path: Path) -> None:
    """``write_scene(compress=...)`` (``gpu.py --compress``, the codec rows) changes only the
    GeoTIFF's compression: the same pixels, georeferencing and band names."""
    import numpy as np
    import rasterio

    from benchmarks.bench_utils import write_scene

    deflate = write_scene(tmp_path / "deflate.tif", (1, 2), (224, 224))
    for codec, tag in (("zstd", "ZSTD"), ("none", None)):
        other = write_scene(tmp_path / f"{codec}.tif", (1, 2), (224, 224), codec)
        with rasterio.open(deflate) as a, rasterio.open(other) as b:
            assert a.compression is not None and a.compression.value == "DEFLATE"
            assert (b.compression.value if b.compression else None) == tag
            assert np.array_equal(a.read(), b.read())
            assert (a.transform, a.crs, a.descriptions, a.nodata, a.block_shapes) == (
                b.transform, b.crs, b.descriptions, b.nodata, b.block_shapes,
            )  # fmt: skip
