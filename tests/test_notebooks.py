"""The notebooks run top to bottom (nbclient, a real kernel) and are stored without outputs.

Each notebook executes in ``notebooks/`` (as Jupyter runs it) in a kernel of this very
interpreter, with random weights (the weight environment variables are removed, the hub is
offline) and its temporary outputs under pytest's ``tmp_path`` (``TMPDIR``).
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["quickstart.ipynb", "finetune.ipynb"]

#: Variables that would make the notebooks use configured official weights.
WEIGHT_VARS = [
    f"{prefix}{suffix}"
    for prefix in ("TORCHGEO_DOFA_", "RS_EMBED_DOFA_")
    for suffix in ("WEIGHTS_DIR", "BASE_WEIGHTS", "LARGE_WEIGHTS")
]

#: A cell appended to the executed copy: which interpreter the kernel runs.
PROBE = "import json, sys\nprint(json.dumps({'prefix': sys.prefix}))"


def read(name: str) -> Any:
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def outputs_of(nb: Any, kind: str) -> list[Any]:
    return [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == kind
    ]


def text_of(cell: Any) -> str:
    return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream")


@pytest.mark.parametrize("name", NAMES)
def test_stored_without_outputs(name: str) -> None:
    nb = read(name)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, name
    for i, cell in enumerate(code):
        assert cell.outputs == [], f"{name}: code cell {i} has stored outputs"
        assert cell.execution_count is None, f"{name}: code cell {i} has an execution count"
    # markdown explains each step, and the random weights are said
    assert sum(cell.cell_type == "markdown" for cell in nb.cells) >= 4
    assert any("weights=None" in cell.source for cell in nb.cells if cell.cell_type == "markdown")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in WEIGHT_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' tempfile.mkdtemp outputs
    nb = read(name)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    # what the run wrote, listed before the notebook's last step removes it
    cleanup = next(i for i, c in enumerate(nb.cells) if c.get("id", "").endswith("-cleanup"))
    listing = "print('wrote:', sorted(p.name for p in OUT.iterdir()))"
    nb.cells.insert(cleanup, nbformat.v4.new_code_cell(listing))
    client = NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    before = sorted(p.name for p in NOTEBOOKS.iterdir())
    try:
        start = time.perf_counter()
        client.execute()  # raises CellExecutionError on the first failing cell
        print(f"{name}: executed in {time.perf_counter() - start:.1f} s")
        check_run(name, nb, tmp_path)
        assert not list(tmp_path.glob("dofa_*")), "the notebook's clean-up left its outputs"
    finally:
        # the notebooks' outputs (a ~450 MB checkpoint) need not outlive the test
        for out in tmp_path.glob("dofa_*"):
            shutil.rmtree(out, ignore_errors=True)
    # nothing was written beside the notebooks (outputs, logs and checkpoints go to TMPDIR)
    assert sorted(p.name for p in NOTEBOOKS.iterdir()) == before


def check_run(name: str, nb: Any, tmp_path: Path) -> None:
    assert not outputs_of(nb, "error")
    # the kernel is this interpreter (the project's virtual environment)
    probe = json.loads(text_of(nb.cells[-1]))
    assert Path(probe["prefix"]).resolve() == Path(sys.prefix).resolve()
    # every notebook draws figures, and says it runs with random weights
    images = [out for out in outputs_of(nb, "display_data") if "image/png" in out.data]
    assert len(images) >= 2, f"{name}: expected figures, got {len(images)}"
    printed = "".join(text_of(cell) for cell in nb.cells if cell.cell_type == "code")
    assert "weights: random (weights=None)" in printed
    if name == "quickstart.ipynb":
        assert "embedded 15 chips" in printed
        wrote = re.search(r"wrote: (\[.*\])", printed)
        assert wrote is not None, printed[-2000:]
        assert {Path(n).suffix for n in ast.literal_eval(wrote[1])} >= {".tif", ".parquet", ".png"}
    else:
        assert "reloaded == trained: True" in printed
        assert "'linear_probe.ckpt'" in printed
