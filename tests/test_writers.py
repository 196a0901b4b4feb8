"""Writers: placement, blending, nodata, atomicity and resume, read back with rasterio/geopandas."""

from __future__ import annotations

import threading
from pathlib import Path

import geopandas as gpd
import lightning.pytorch as pl
import numpy as np
import pytest
import rasterio
import torch
from rasterio.crs import CRS
from rasterio.transform import Affine
from torch.utils.data import DataLoader, TensorDataset

from torchgeo_dofa.writers import GridGeometry, GridWriter, PooledWriter, parts_dir

UTM = CRS.from_epsg(32631)
RES = 10.0
CELL = 160.0


def _geometry() -> GridGeometry:
    # region 600 x 400 px at 10 m -> 38 x 25 cells, anchored bottom-left at (500000, 4000000)
    return GridGeometry.for_region(UTM, (500_000, 4_000_000, 506_000, 4_004_000), RES)


def _chip(geom: GridGeometry, row: int, col: int, depth: int = 4, value: float = 0.0):
    top_left_x = geom.xmin + col * geom.cell
    top_left_y = geom.ymin + geom.height * geom.cell - row * geom.cell
    gt = torch.tensor(list(Affine(CELL, 0, top_left_x, 0, -CELL, top_left_y)), dtype=torch.float64)
    grid = torch.full((depth, 14, 14), value) + torch.arange(depth).view(-1, 1, 1)
    return grid, gt


def test_geometry_for_region() -> None:
    geom = _geometry()
    assert (geom.width, geom.height, geom.cell) == (38, 25, CELL)
    assert geom.transform == Affine(CELL, 0, 500_000, 0, -CELL, 4_000_000 + 25 * CELL)
    _, gt = _chip(geom, 3, 5)
    assert geom.place(gt.tolist()) == (3, 5)
    with pytest.raises(ValueError, match="multiple of 16 pixels"):
        geom.place([CELL, 0, geom.xmin + 35.0, 0, -CELL, geom.ymin])
    with pytest.raises(ValueError, match="same size in pixels"):
        geom.place([2 * CELL, 0, geom.xmin, 0, -2 * CELL, geom.ymin])


def _write(writer: GridWriter, chips: list[tuple[torch.Tensor, torch.Tensor]], empty=None) -> None:
    writer.parts.mkdir(parents=True, exist_ok=True)
    grids = torch.stack([g for g, _ in chips])
    gts = torch.stack([t for _, t in chips])
    pred = {"grid": grids, "grid_transform": gts}
    if empty is not None:
        pred["empty"] = torch.tensor(empty)
    writer.write_on_batch_end(None, None, pred, None, None, 0, 0)  # type: ignore[arg-type]


def test_grid_blending_nodata_and_georeferencing(tmp_path: Path) -> None:
    geom = _geometry()
    out = tmp_path / "emb.tif"
    writer = GridWriter(out, geom, metadata={"variant": "base", "bands": ["B4"]}, window=16)
    a = _chip(geom, 0, 0, value=1.0)
    b = _chip(geom, 7, 7, value=3.0)  # overlaps a on rows/cols 7..13
    c = _chip(geom, 20, 30, value=100.0)  # reaches past the bottom/right edge: cropped
    skipped = _chip(geom, 0, 20, value=50.0)
    g = a[0].clone()
    g[:, 0, 0] = float("nan")  # an all-nodata cell inside a chip
    _write(writer, [(g, a[1]), b, c, skipped], empty=[False, False, False, True])
    writer.finalize()
    assert not parts_dir(out).exists()
    with rasterio.open(out) as src:
        assert src.crs == UTM
        assert src.transform == geom.transform
        assert (src.count, src.height, src.width) == (4, 25, 38)
        assert src.descriptions[0] == "dofa_0000"
        assert src.tags()["variant"] == "base"
        assert src.profile["tiled"] and src.profile["compress"] == "zstd"
        data = src.read()
    # independent expectation
    expected = np.full((4, 25, 38), np.nan, np.float32)
    total = np.zeros((4, 25, 38))
    count = np.zeros((25, 38))
    for (grid, _), (r, cidx) in zip([(g, 0), b, c], [(0, 0), (7, 7), (20, 30)]):
        arr = grid.numpy()
        h, w = min(14, 25 - r), min(14, 38 - cidx)
        sub = arr[:, :h, :w]
        ok = np.isfinite(sub).all(0)
        total[:, r : r + h, cidx : cidx + w] += np.where(ok, sub, 0)
        count[r : r + h, cidx : cidx + w] += ok
    np.divide(total, count, out=expected, where=count > 0)
    np.testing.assert_allclose(data, expected, equal_nan=True)
    assert np.isnan(data[:, 0, 0]).all()
    assert data[0, 10, 10] == pytest.approx(2.0)  # average of 1 and 3
    assert np.isnan(data[:, 0, 25]).all()  # the empty chip left nodata


def test_grid_resume_equals_uninterrupted(tmp_path: Path) -> None:
    geom = _geometry()
    chips = [_chip(geom, r, c, value=r + c) for r, c in [(0, 0), (0, 7), (7, 0), (7, 7)]]
    full = GridWriter(tmp_path / "full.tif", geom)
    _write(full, chips)
    full.finalize()
    part = GridWriter(tmp_path / "resumed.tif", geom)
    _write(part, chips[:2])  # "crash" after two chips: no final file yet
    part.flush()  # (the parts it had written are on disk)
    assert not (tmp_path / "resumed.tif").exists()
    resumed = GridWriter(tmp_path / "resumed.tif", geom)
    assert resumed.done_keys() == {"r0_c0", "r0_c7"}
    _write(
        resumed, [c for c in chips if resumed.chip_key(c[1].tolist()) not in resumed.done_keys()]
    )
    resumed.finalize()
    with rasterio.open(tmp_path / "full.tif") as a, rasterio.open(tmp_path / "resumed.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())


def test_no_leftover_temp_files_on_failure(tmp_path: Path) -> None:
    writer = GridWriter(tmp_path / "x.tif", _geometry())
    writer.parts.mkdir(parents=True)
    with pytest.raises(RuntimeError, match="no chip was written"):
        writer.finalize()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.tif.parts"]


def _write_pooled(writer: PooledWriter, prediction: dict[str, torch.Tensor]) -> None:
    writer.write_on_batch_end(None, None, prediction, None, None, 0, 0)  # type: ignore[arg-type]


def test_pooled_geoparquet(tmp_path: Path) -> None:
    out = tmp_path / "pooled.parquet"
    writer = PooledWriter(out, UTM, metadata={"variant": "base", "weights": "random"}, source="s")
    writer.parts.mkdir(parents=True)
    # TorchGeo bounds: xmin, xmax, xres, ymin, ymax, yres, tmin, tmax, tres
    t0, t1 = 1_654_000_000.0, 1_655_000_000.0
    bounds = torch.tensor(
        [
            [500_000, 502_240, 10, 4_000_000, 4_002_240, 10, t0, t1, 1],
            [502_240, 504_480, 10, 4_002_240, 4_004_480, 10, t0, t1, 1],
        ],
        dtype=torch.float64,
    )
    pooled = torch.randn(2, 8)
    _write_pooled(writer, {"pooled": pooled, "bounds": bounds})
    # a duplicate (DDP padding) overwrites the same part
    _write_pooled(writer, {"pooled": pooled[:1], "bounds": bounds[:1]})
    writer.finalize()
    frame = gpd.read_parquet(out)
    assert len(frame) == 2
    assert frame.crs == UTM
    assert frame.geometry.iloc[0].bounds == (502_240, 4_002_240, 504_480, 4_004_480)  # north first
    np.testing.assert_allclose(np.stack(frame.embedding.to_numpy())[1], pooled[0].numpy())
    assert frame.variant.iloc[0] == "base" and frame.weights.iloc[0] == "random"
    assert frame.time_start.iloc[0].timestamp() == t0


class _ThreadRecordingGridWriter(GridWriter):
    """A GridWriter noting which thread wrote each part."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.threads: list[str] = []

    def write_chip(self, prediction, i) -> None:
        self.threads.append(threading.current_thread().name)
        super().write_chip(prediction, i)


class _Replay(pl.LightningModule):
    """Returns prepared predictions from predict_step (no model: the writers are tested)."""

    def __init__(self, predictions: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.predictions = predictions

    def predict_step(self, batch, batch_idx):
        return self.predictions[batch_idx]


def _predict(writer: GridWriter, predictions: list[dict[str, torch.Tensor]]) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        callbacks=[writer],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader: DataLoader[tuple[torch.Tensor, ...]] = DataLoader(
        TensorDataset(torch.arange(len(predictions)))
    )
    trainer.predict(_Replay(predictions), dataloaders=loader, return_predictions=False)


def _batches(geom: GridGeometry, cells: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
    out = []
    for r, c in cells:
        grid, gt = _chip(geom, r, c, value=r + 2 * c)
        out.append({"grid": grid[None], "grid_transform": gt[None]})
    return out


def test_parts_are_written_off_the_compute_thread(tmp_path: Path) -> None:
    geom = _geometry()
    cells = [(0, 0), (0, 14), (14, 0), (14, 14), (7, 21), (3, 3)]
    background = _ThreadRecordingGridWriter(tmp_path / "bg.tif", geom)
    background.max_pending_batches = 2  # exercises the bounded queue too
    _predict(background, _batches(geom, cells))
    assert len(background.threads) == len(cells)
    assert all(name.startswith("dofa-parts") for name in background.threads)
    assert threading.current_thread().name not in background.threads
    assert background._pool is None  # threads stopped at teardown
    # the same file as writing every part in the main thread, one by one
    reference = GridWriter(tmp_path / "ref.tif", geom)
    reference.parts.mkdir(parents=True)
    for batch in _batches(geom, cells):
        reference.write_chip(batch, 0)
    reference.finalize()
    with rasterio.open(tmp_path / "bg.tif") as a, rasterio.open(tmp_path / "ref.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())


def test_background_write_errors_reach_the_caller(tmp_path: Path) -> None:
    geom = _geometry()
    good = _batches(geom, [(0, 0)])
    bad_grid, _ = _chip(geom, 1, 1)
    misplaced = torch.tensor([CELL, 0, geom.xmin + 35.0, 0, -CELL, geom.ymin], dtype=torch.float64)
    bad = {"grid": bad_grid[None], "grid_transform": misplaced[None]}
    # directly: the error surfaces at flush (and so at finalize), not silently
    writer = GridWriter(tmp_path / "direct.tif", geom)
    writer.parts.mkdir(parents=True)
    writer.write_on_batch_end(None, None, bad, None, None, 0, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="whole output cells"):
        writer.finalize()
    assert not (tmp_path / "direct.tif").exists()
    # through Trainer.predict: the job fails with the write's error and writes no final file
    out = tmp_path / "job.tif"
    with pytest.raises(ValueError, match="whole output cells"):
        _predict(GridWriter(out, geom), [*good, bad, *good])
    assert not out.exists()
    assert sorted(p.name for p in parts_dir(out).iterdir()) == ["r0_c0.npy"]  # resumable
