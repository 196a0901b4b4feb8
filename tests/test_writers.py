"""Writers: placement, blending, nodata, atomicity and resume, read back with rasterio/geopandas."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import geopandas as gpd
import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from rasterio.crs import CRS
from rasterio.transform import Affine
from torch.utils.data import DataLoader, TensorDataset

from tests.trainers import cpu_trainer
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
    writer.flush()  # parts are written off the calling thread


@pytest.mark.parametrize(
    ("region_px", "window", "blocks"),
    [
        ((600, 400), 128, (32, 48)),  # 25 x 38 cells: blocks just covering the grid
        ((600, 400), 16, (16, 16)),  # the window given
        ((224, 224), 128, (16, 16)),  # one chip: 14 x 14 cells
        ((3200, 224), 128, (16, 128)),  # 14 x 200 cells: the window across, 16 down
    ],
)
def test_grid_blocks_fit_a_grid_smaller_than_the_window(
    tmp_path: Path, region_px: tuple[int, int], window: int, blocks: tuple[int, int]
) -> None:
    """A one-chip grid (14 x 14 cells) was written in one 128 x 128-cell block per band: 50
    MB of padding for DOFA base to compress and decode back (finalize 0.15 s, now 0.05)."""
    width, height = region_px
    geom = GridGeometry.for_region(
        UTM, (500_000, 4_000_000, 500_000 + width * RES, 4_000_000 + height * RES), RES
    )
    out = tmp_path / "emb.tif"
    writer = GridWriter(out, geom, window=window)
    chip = _chip(geom, 0, 0, value=2.0)
    _write(writer, [chip])
    writer.finalize()
    with rasterio.open(out) as src:
        assert src.block_shapes[0] == blocks
        assert (src.height, src.width) == (geom.height, geom.width)
        data = src.read()
    np.testing.assert_array_equal(data[:, :14, :14], chip[0].numpy())
    assert np.isnan(data[:, 14:, :]).all() and np.isnan(data[:, :, 14:]).all()


def test_a_writer_refuses_a_file_name_of_another_format(tmp_path: Path) -> None:
    """SegmentationWriter("map.png") wrote a GeoTIFF named map.png and
    ClassificationWriter("c.csv") Parquet named c.csv: nothing opened them as named."""
    from torchgeo_dofa.writers import ClassificationWriter, SegmentationWriter

    for writer, name, fixes in [
        (GridWriter, "map.png", ("map.tif", "map.tiff")),
        (SegmentationWriter, "classes.npy", ("classes.tif", "classes.tiff")),
        (SegmentationWriter, "classes", ("classes.tif", "classes.tiff")),
        (PooledWriter, "rows.csv", ("rows.parquet", "rows.geoparquet")),
        (ClassificationWriter, "rows.tif", ("rows.parquet", "rows.geoparquet")),
    ]:
        kind = "GeoTIFF" if issubclass(writer, GridWriter) else "GeoParquet"
        suffix = Path(name).suffix or "no suffix"
        with pytest.raises(ValueError) as refused:
            writer(tmp_path / "out" / name)
        fix = " or ".join(repr(str(tmp_path / "out" / f)) for f in fixes)  # in its folder
        assert str(refused.value) == (
            f"{writer.__name__} writes a {kind} file, but {str(tmp_path / 'out' / name)!r} "
            f"ends in {suffix}: name it {fix}"
        )
    with pytest.raises(ValueError, match=r"but '\.' ends in no suffix: name it 'output\.tif'"):
        GridWriter(".")  # the working folder: a file in it
    assert not any(tmp_path.iterdir())
    for ok in ("a.TIF", "b.tiff"):
        assert GridWriter(tmp_path / ok).path.name == ok
    assert PooledWriter(tmp_path / "c.GeoParquet").path.name == "c.GeoParquet"
    assert GridWriter("~/g.tif").path == Path.home() / "g.tif"  # as a shell would expand it


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


def test_grid_without_overlap_holds_each_chips_values_exactly(tmp_path: Path) -> None:
    """Chips side by side (stride = chip, the default) across window edges: each cell is the
    chip's float32 value bit for bit; a cell with one non-finite channel is NaN in all."""
    geom = _geometry()
    out = tmp_path / "emb.tif"
    writer = GridWriter(out, geom, window=16)  # windows cut through the 14-cell chips
    rng = np.random.default_rng(0)
    places = [(0, 0), (0, 14), (14, 0), (14, 28)]  # (14, 28) reaches past the right edge
    chips = []
    for r, c in places:
        _, gt = _chip(geom, r, c)
        grid = torch.from_numpy(rng.standard_normal((4, 14, 14)).astype(np.float32) * 1e3)
        chips.append((grid, gt))
    chips[1][0][2, 3, 4] = float("nan")
    chips[2][0][0, 5, 5] = float("inf")
    _write(writer, chips)
    writer.finalize()
    with rasterio.open(out) as src:
        data = src.read()
    expected = np.full((4, 25, 38), np.nan, np.float32)
    for (grid, _), (r, c) in zip(chips, places, strict=True):
        h, w = min(14, 25 - r), min(14, 38 - c)
        expected[:, r : r + h, c : c + w] = grid.numpy()[:, :h, :w]
    expected[:, 3, 14 + 4] = np.nan
    expected[:, 14 + 5, 5] = np.nan
    np.testing.assert_array_equal(data, expected)
    assert np.isnan(data[:, 3, 18]).all() and np.isfinite(data[:, 3, 17]).all()


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
    writer.flush()  # parts are written off the calling thread


def test_pooled_geoparquet(tmp_path: Path) -> None:
    out = tmp_path / "pooled.parquet"
    writer = PooledWriter(out, UTM, metadata={"variant": "base", "weights": "random"}, source="s")
    writer.parts.mkdir(parents=True)
    # TorchGeo bounds: xmin, xmax, xres, ymin, ymax, yres, tmin, tmax, tres
    # a day as TorchGeo bounds it: its first and its last microsecond
    day_start, day_end = (
        pd.Timestamp("2022-06-11", tz="UTC"),
        pd.Timestamp("2022-06-11T23:59:59.999999", tz="UTC"),
    )
    t0, t1 = day_start.timestamp(), day_end.timestamp()
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
    assert frame.time_start.iloc[0] == day_start
    assert frame.time_end.iloc[0] == day_end  # was 23:59:59.999998976 (float rounding)


def test_pooled_parts_keep_every_float32_bit_and_older_list_parts_still_read(
    tmp_path: Path,
) -> None:
    """Embeddings go through the parts bit for bit (-0.0, subnormals, extremes); a part of
    the older form (``embedding`` as a list of numbers, from an interrupted earlier run) is
    read as well."""
    import json

    out = tmp_path / "pooled.parquet"
    writer = PooledWriter(out, UTM, source="s")
    writer.parts.mkdir(parents=True)
    bounds = torch.tensor(
        [
            [500_000, 502_240, 10, 4_000_000, 4_002_240, 10, 0, 0, 1],
            [502_240, 504_480, 10, 4_000_000, 4_002_240, 10, 0, 0, 1],
        ],
        dtype=torch.float64,
    )
    tiny = np.finfo(np.float32).smallest_subnormal
    special = [-0.0, float(tiny), float(np.finfo(np.float32).max), 1 / 3, -1e-30]
    pooled = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    pooled[0, :5] = torch.tensor(special)
    _write_pooled(writer, {"pooled": pooled[:1], "bounds": bounds[:1]})
    (part,) = writer.parts.glob("*.jsonl")  # one part for the batch, a JSON line a chip
    (line,) = part.read_text().splitlines()
    assert "embedding_f32" in json.loads(line)
    legacy = {
        "chip_id": "legacy",
        "bounds": [502_240.0, 4_000_000.0, 504_480.0, 4_002_240.0],
        "time": [0.0, 0.0],
        "embedding": pooled[1].tolist(),
    }
    (writer.parts / "legacy.json").write_text(json.dumps(legacy))
    writer.finalize()
    frame = gpd.read_parquet(out).sort_values("chip_id", key=lambda c: c == "legacy")
    got = np.stack(frame.embedding.to_numpy()).astype(np.float32)
    assert got.view(np.uint32).tolist() == pooled.numpy().view(np.uint32).tolist()


# --- verified final files: write failures, resume after them, stale temporaries ----------------

import contextlib  # noqa: E402
import errno  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402

from tests.tmpfs import tmpfs  # noqa: E402
from torchgeo_dofa.writers import OutputWriteError, atomic_write, stale_temps  # noqa: E402

BIG_DEPTH = 32


def _big_chips(geom: GridGeometry) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Chips of incompressible values: the GeoTIFF is about as large as its parts."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for r, c in [(0, 0), (0, 14), (11, 0), (11, 14), (11, 24)]:
        _, gt = _chip(geom, r, c, depth=BIG_DEPTH)
        out.append((torch.rand(BIG_DEPTH, 14, 14, generator=gen), gt))
    return out


def _reference_grid(tmp_path: Path) -> Path:
    """The same chips assembled without any fault."""
    ref = GridWriter(tmp_path / "ref" / "g.tif", _geometry(), metadata={"variant": "base"})
    _write(ref, _big_chips(_geometry()))
    ref.finalize()
    return ref.path


def _assert_same_grid(a: Path, b: Path) -> None:
    with rasterio.open(a) as x, rasterio.open(b) as y:
        np.testing.assert_array_equal(x.read(), y.read())
        assert x.tags() == y.tags() and np.isnan(x.nodata) and np.isnan(y.nodata)
        assert {**x.profile, "nodata": 0} == {**y.profile, "nodata": 0}
        assert x.descriptions == y.descriptions
    assert a.read_bytes() == b.read_bytes()


def test_disk_full_during_assembly_keeps_parts_and_rerun_finishes(tmp_path: Path, capfd) -> None:
    """A real full filesystem (tmpfs): no final file, parts kept, rerun = uninterrupted bytes."""
    with tmpfs(tmp_path / "disk", "2m") as disk:
        geom = _geometry()
        writer = GridWriter(disk / "g.tif", geom, metadata={"variant": "base"})
        _write(writer, _big_chips(geom))
        parts_before = sorted(p.name for p in writer.parts.iterdir())
        # fill the disk so that the parts fit but the assembled GeoTIFF does not
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        filler = disk / "filler"
        with open(filler, "wb") as f:
            f.write(b"\0" * (free - 64 * 1024))
        capfd.readouterr()
        with pytest.raises(OutputWriteError) as info:
            GridWriter(disk / "g.tif", geom, metadata={"variant": "base"}).finalize()
        assert "_tiffWriteProc" not in capfd.readouterr().err  # libtiff's lines held back
        message = str(info.value)
        assert "\n" not in message
        assert str(disk / "g.tif") in message and "No space left on device" in message
        assert "rerun the same command" in message
        assert not (disk / "g.tif").exists()
        assert sorted(p.name for p in writer.parts.iterdir()) == parts_before  # parts kept
        assert stale_temps(disk / "g.tif") == []  # the temporary was removed
        filler.unlink()  # free space, rerun: completes to the uninterrupted bytes
        GridWriter(disk / "g.tif", geom, metadata={"variant": "base"}).finalize()
        assert not writer.parts.exists()
        _assert_same_grid(_reference_grid(tmp_path), disk / "g.tif")


@contextlib.contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    """Make the kernel refuse writes past ``limit`` bytes in any file (EFBIG), then restore.

    RLIMIT_FSIZE is a real failing write (no root needed); SIGXFSZ is ignored so that the
    write fails with an error instead of killing the process.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_file_size_limit_during_assembly_keeps_parts_and_rerun_finishes(tmp_path: Path) -> None:
    """A real failing write without root: RLIMIT_FSIZE makes the kernel refuse (EFBIG)."""
    geom = _geometry()
    out = tmp_path / "g.tif"
    writer = GridWriter(out, geom, metadata={"variant": "base"})
    _write(writer, _big_chips(geom))
    parts_before = sorted(p.name for p in writer.parts.iterdir())
    with _file_size_limit(64 * 1024), pytest.raises(OutputWriteError) as info:  # GeoTIFF ~300 KB
        GridWriter(out, geom, metadata={"variant": "base"}).finalize()
    message = str(info.value)
    assert message.startswith(f"could not write {out}: ")
    assert "\n" not in message and "rerun the same command" in message
    assert not out.exists() and stale_temps(out) == []
    assert sorted(p.name for p in writer.parts.iterdir()) == parts_before
    GridWriter(out, geom, metadata={"variant": "base"}).finalize()
    _assert_same_grid(_reference_grid(tmp_path), out)
    assert not writer.parts.exists()


def test_a_writer_slower_than_the_loop_says_how_long_it_held_it(tmp_path: Path) -> None:
    """``waited_s``: the seconds the loop's thread waited for the part-writing threads once
    they fell ``max_pending_batches`` behind (the benchmark's way to tell a writer-bound job);
    nothing while they keep up."""

    class SlowParts(PooledWriter):
        write_threads = 1
        max_pending_batches = 1

        def _write_chips(self, prediction: Any, chips: Any, empty: Any) -> None:
            time.sleep(0.05)
            super()._write_chips(prediction, chips, empty)

    def batch(k: int) -> dict[str, torch.Tensor]:
        x = 500_000 + 2240 * k
        bounds = torch.tensor([[x, x + 2240, 10, 4e6, 4_002_240, 10, 0, 1, 1]], dtype=torch.float64)
        return {"pooled": torch.rand(1, 8), "bounds": bounds}

    slow = SlowParts(tmp_path / "slow.parquet", UTM, metadata={"variant": "base"})
    slow.parts.mkdir(parents=True)
    start = time.perf_counter()
    for k in range(4):  # each part takes >= 0.05 s, the loop none: it waits for 3 of them
        slow.write_on_batch_end(None, None, batch(k), None, None, k, 0)  # type: ignore[arg-type]
    loop = time.perf_counter() - start
    assert 0.09 <= slow.waited_s <= loop, (slow.waited_s, loop)
    slow.flush()
    assert len(list(slow.parts.glob("*.jsonl"))) == 4  # a part per batch
    quick = PooledWriter(tmp_path / "quick.parquet", UTM, metadata={"variant": "base"})
    quick.parts.mkdir(parents=True)
    quick.write_on_batch_end(None, None, batch(0), None, None, 0, 0)  # type: ignore[arg-type]
    assert quick.waited_s == 0.0


def test_pooled_write_failure_keeps_parts(tmp_path: Path) -> None:
    out = tmp_path / "p.parquet"
    writer = PooledWriter(out, UTM, metadata={"variant": "base"})
    writer.parts.mkdir(parents=True)
    bounds = torch.tensor(
        [
            [500_000 + 2240 * i, 502_240 + 2240 * i, 10, 4e6, 4_002_240, 10, 0, 1, 1]
            for i in range(40)
        ],
        dtype=torch.float64,
    )
    _write_pooled(writer, {"pooled": torch.rand(40, 768), "bounds": bounds})
    (part,) = writer.parts.glob("*.jsonl")  # the batch's part: 40 rows
    before = part.read_bytes()
    assert before.count(b"\n") == 40
    with _file_size_limit(16 * 1024), pytest.raises(OutputWriteError) as info:  # table ~130 KB
        PooledWriter(out, UTM, metadata={"variant": "base"}).finalize()
    assert str(info.value).startswith(f"could not write {out}: ")
    assert not out.exists() and part.read_bytes() == before
    writer.finalize()
    assert len(gpd.read_parquet(out)) == 40 and not writer.parts.exists()


def test_atomic_write_enospc_partway(tmp_path: Path) -> None:
    """A write that fails with ENOSPC after writing some bytes: one line, no file, no temp."""
    out = tmp_path / "x.bin"

    def write(path: Path) -> None:
        with open(path, "wb") as f:
            f.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    with pytest.raises(OutputWriteError) as info:
        atomic_write(out, write, hint="; keep going")
    assert info.value.errno == errno.ENOSPC
    assert str(info.value).startswith(f"could not write {out}: No space left on device")
    assert str(info.value).endswith("; keep going") and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_verify_failure_leaves_previous_content(tmp_path: Path) -> None:
    out = tmp_path / "x.txt"
    out.write_text("old")

    def verify(path: Path) -> None:
        if path.read_text() != "expected":
            raise ValueError("read back other content than written")

    with pytest.raises(OutputWriteError, match="read back other content"):
        atomic_write(out, lambda p: p.write_text("new"), verify=verify)
    assert out.read_text() == "old" and sorted(tmp_path.iterdir()) == [out]
    atomic_write(out, lambda p: p.write_text("expected"), verify=verify)
    assert out.read_text() == "expected"


def test_stale_temps_only_this_outputs(tmp_path: Path) -> None:
    out = tmp_path / "a.tif"
    mine = tmp_path / f".a.tif.{uuid.uuid4().hex}.tmp"
    in_parts = tmp_path / "a.tif.parts" / f".r0_c0.npy.{uuid.uuid4().hex}.tmp"
    in_parts.parent.mkdir()
    others = [
        tmp_path / f".b.tif.{uuid.uuid4().hex}.tmp",  # another output's
        tmp_path / f".a.tif.{uuid.uuid4().hex}.tmp.keep",  # not a temporary
        tmp_path / ".a.tif.nothex.tmp",  # not one of atomic_write's names
    ]
    for p in [mine, in_parts, *others]:
        p.write_text("x")
    assert stale_temps(out) == sorted([mine, in_parts])


def test_empty_region_gives_all_nan_grid_with_warning(tmp_path: Path) -> None:
    geom = _geometry()
    writer = GridWriter(tmp_path / "e.tif", geom, metadata={"embed_dim": "4"})
    writer.parts.mkdir(parents=True)
    with pytest.warns(UserWarning, match="no chip of e.tif held a valid pixel") as caught:
        writer.finalize()
    assert [w.filename for w in caught] == [__file__]  # the caller's line, not the writer's
    with rasterio.open(tmp_path / "e.tif") as src:
        assert (src.count, src.height, src.width) == (4, geom.height, geom.width)
        assert np.isnan(src.read()).all()


def test_pooled_points_properties_order_and_empty_rows(tmp_path: Path) -> None:
    """Rows follow point_index with every property; a chip without data is flagged empty."""
    out = tmp_path / "pts.parquet"
    chips = [  # x slice, y slice per point; points 1 and 3 share a footprint
        (slice(502_240.0, 504_480.0), slice(4_000_000.0, 4_002_240.0)),
        (slice(500_000.0, 502_240.0), slice(4_002_240.0, 4_004_480.0)),
        (slice(-1_000.0, 1_240.5), slice(4_000_000.0, 4_002_240.0)),  # no valid pixel
        (slice(500_000.0, 502_240.0), slice(4_002_240.0, 4_004_480.0)),
    ]
    keys = [PooledWriter.key_for_chip(c) for c in chips]
    props = pd.DataFrame(
        {
            "point_index": [0, 1, 2, 3],
            "site": ["007", "b", "c", "d"],
            "embedding": [1, 2, 3, 4],  # clashes with the table's column
        }
    ).iloc[[2, 0, 3, 1]]  # any row order: rows are keyed to chip_keys by position
    keys = [keys[i] for i in [2, 0, 3, 1]]
    writer = PooledWriter(out, UTM, {"variant": "base"}, "s", chip_keys=keys, properties=props)
    writer.parts.mkdir(parents=True)
    vectors = torch.rand(4, 8)
    bounds = torch.tensor(
        [[c[0].start, c[0].stop, 10, c[1].start, c[1].stop, 10, 0, 1, 1] for c in chips],
        dtype=torch.float64,
    )
    empty = torch.tensor([False, False, True, False])
    # the batch sends points 0, 1, 2 (3 shares 1's part)
    batch = {"pooled": vectors[:3], "bounds": bounds[:3], "empty": empty[:3]}
    writer.write_on_batch_end(None, None, batch, None, None, 0, 0)  # type: ignore[arg-type]
    writer.finalize()
    frame = gpd.read_parquet(out)
    assert frame.point_index.tolist() == [0, 1, 2, 3]
    assert frame.site.tolist() == ["007", "b", "c", "d"]
    assert frame.input_embedding.tolist() == [1, 2, 3, 4]
    assert frame.no_data.tolist() == [False, False, True, False]
    emb = np.stack(frame.embedding.to_numpy())
    np.testing.assert_array_equal(emb[0], vectors[0].numpy())
    np.testing.assert_array_equal(emb[1], vectors[1].numpy())
    np.testing.assert_array_equal(emb[3], vectors[1].numpy())
    assert np.isnan(emb[2]).all() and emb.shape == (4, 8)
    assert frame.geometry.iloc[2].bounds == (-1_000.0, 4_000_000.0, 1_240.5, 4_002_240.0)
    assert frame.geometry.iloc[0].bounds == (502_240.0, 4_000_000.0, 504_480.0, 4_002_240.0)


def test_pooled_properties_validation(tmp_path: Path) -> None:
    props = pd.DataFrame({"point_index": [0, 0]})
    with pytest.raises(ValueError, match="needs chip_keys"):
        PooledWriter(tmp_path / "p.parquet", UTM, properties=props)
    with pytest.raises(ValueError, match="unique integer 'point_index'"):
        PooledWriter(tmp_path / "p.parquet", UTM, chip_keys=["a", "b"], properties=props)


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


def _predict(writer: GridWriter | PooledWriter, predictions: list[dict[str, torch.Tensor]]) -> None:
    trainer = cpu_trainer([writer])
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
    # resumable: the good chip's part, and the job's identity beside it
    assert sorted(p.name for p in parts_dir(out).iterdir()) == ["job-identity", "r0_c0.npy"]


def test_grid_read_back_catches_a_window_changed_after_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cell that decodes fine but differs from what was assembled fails the verification
    (windows are read back in parallel threads): no final file, the parts are kept."""
    from rasterio.windows import Window

    import torchgeo_dofa.writers as writers

    geom = _geometry()
    out = tmp_path / "emb.tif"
    writer = GridWriter(out, geom, window=16)  # 2 x 3 windows, checked by two threads
    _write(writer, [_chip(geom, r, c, value=1.0) for r, c in [(0, 0), (0, 14), (14, 28)]])
    real = writers.atomic_write

    def tampered(path: Path, write: Any, **kw: Any) -> None:
        def write_then_change(tmp: Path) -> None:
            write(tmp)
            with rasterio.open(tmp, "r+") as dst:  # a valid block with other values
                dst.write(np.full((4, 1, 1), 7.0, np.float32), window=Window(30, 20, 1, 1))

        real(path, write_then_change, **kw)

    monkeypatch.setattr(writers, "atomic_write", tampered)
    with pytest.raises(OutputWriteError, match=r"reads back other values than written"):
        writer.finalize()
    assert not out.exists() and len(list(parts_dir(out).glob("*.npy"))) == 3
    monkeypatch.setattr(writers, "atomic_write", real)
    writer.finalize()  # the parts finish the job
    with rasterio.open(out) as src:
        assert src.read(1, window=Window(30, 20, 1, 1))[0, 0] == 1.0


def test_module_digest_follows_the_weights_not_the_object() -> None:
    """Equal for equal weights (another instance, a loaded copy); any changed value differs."""
    from torchgeo_dofa.writers import module_digest

    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    norm = torch.nn.LayerNorm(3)
    b = torch.nn.Sequential(torch.nn.Linear(4, 3), norm)
    assert module_digest(a) != module_digest(b)  # another random draw
    b.load_state_dict(a.state_dict())
    assert module_digest(a) == module_digest(b)
    with torch.no_grad():
        norm.bias[2] = 1e-7  # one value, in the last parameter
    assert module_digest(a) != module_digest(b)
    assert module_digest(a.to(torch.bfloat16)) != module_digest(b.to(torch.bfloat16))
    assert module_digest(None) == "none" and len(module_digest(a)) == 8


def test_an_unreadable_part_is_named_removed_and_recomputed_by_the_rerun(tmp_path: Path) -> None:
    """A truncated grid part or a garbled pooled part (a disk error, a power cut): the error
    names it and the fix, the part is removed, and writing that chip again finishes the job
    with the values of an undisturbed run."""
    geom = _geometry()
    chips = [_chip(geom, r, c, value=r + c) for r, c in [(0, 0), (0, 7), (7, 0)]]
    ref = GridWriter(tmp_path / "ref.tif", geom)
    _write(ref, chips)
    ref.finalize()
    writer = GridWriter(tmp_path / "g.tif", geom)
    _write(writer, chips)
    part = writer.parts / "r0_c7.npy"
    part.write_bytes(part.read_bytes()[:200])  # truncated
    (writer.parts / "r7_c0.npy").write_bytes(b"")  # empty: both found by one run
    with pytest.raises(
        OutputWriteError, match=r"part .*r0_c7.npy and 1 more \(r7_c0.npy...\) was unreadable"
    ):
        writer.finalize()
    assert not part.exists() and not (tmp_path / "g.tif").exists()
    assert GridWriter(tmp_path / "g.tif", geom).done_keys() == {"r0_c0"}
    _write(writer, chips[1:])  # the rerun computes the missing chips
    writer.finalize()
    with rasterio.open(tmp_path / "g.tif") as a, rasterio.open(tmp_path / "ref.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())
    pooled = PooledWriter(tmp_path / "p.parquet", UTM, metadata={"variant": "base"}, source="s")
    pooled.parts.mkdir(parents=True)
    (pooled.parts / "garbled.json").write_text('{"chip_id": "x", "embedding_f32": "not base64!"}')
    with pytest.raises(OutputWriteError, match=r"part .*garbled.json was unreadable"):
        pooled.finalize()
    assert not (pooled.parts / "garbled.json").exists()


def test_damaged_parts_of_every_output_are_removed_when_the_job_resumes(tmp_path: Path) -> None:
    """Parts damaged while no job ran (a kill -9, then a disk error) are found when the job
    resumes, in every output, and their chips computed in that run: assembly found them one
    output at a time, so a grid and a table each took a failing rerun."""
    geom = _geometry()
    chips = [_chip(geom, r, c, value=r + c) for r, c in [(0, 0), (0, 7)]]
    reference = GridWriter(tmp_path / "ref.tif", geom)
    _write(reference, chips)
    reference.finalize()
    grid = GridWriter(tmp_path / "g.tif", geom)
    _write(grid, chips)  # an earlier run, killed before assembly
    part = grid.parts / "r0_c7.npy"
    part.write_bytes(part.read_bytes()[:100])
    bounds = torch.tensor([[500_000, 502_240, 10, 4_000_000, 4_002_240, 10, 0, 0, 1]])
    rows = {"pooled": torch.ones(1, 4), "bounds": bounds.double()}
    table = PooledWriter(tmp_path / "p.parquet", UTM)
    _write_pooled(table, rows)
    [row] = table.parts.glob("*.jsonl")
    row.write_text(row.read_text()[:20])
    resumed = GridWriter(tmp_path / "g.tif", geom)
    with pytest.warns(UserWarning, match=r"r0_c7.npy was unreadable .*: this run computes"):
        _predict(resumed, [{"grid": g[None], "grid_transform": t[None]} for g, t in chips])
    with rasterio.open(tmp_path / "g.tif") as a, rasterio.open(tmp_path / "ref.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())
    with pytest.warns(UserWarning, match=rf"{row.name} was unreadable .*: this run computes"):
        _predict(PooledWriter(tmp_path / "p.parquet", UTM), [rows])
    np.testing.assert_array_equal(
        np.stack(gpd.read_parquet(tmp_path / "p.parquet").embedding), np.ones((1, 4))
    )


def test_describe_change_keeps_the_first_difference_in_view() -> None:
    from torchgeo_dofa.writers import describe_change

    assert describe_change("stride", "224", "112") == "stride was '224', now '112'"
    assert describe_change("offsets", [0, 1], None) == "offsets was [0, 1], now null"
    long = "/data/" + "sentinel2/" * 20
    text = describe_change("sources", [long + "a.tif"], [long + "b.tif"], limit=60)
    assert text == f'sources was ...{long[-20:]}a.tif"], now ...{long[-20:]}b.tif"]'
    cut = describe_change("bands", "x" * 100 + "A", "x" * 100 + "B", limit=40)
    assert cut == f"bands was ...{'x' * 20}A', now ...{'x' * 20}B'"
    head = describe_change("bands", "A" + "x" * 99, "B" + "x" * 99, limit=40)
    assert head == f"bands was 'A{'x' * 35}..., now 'B{'x' * 35}..."


def _two_chips_one_empty(tmp_path: Path) -> tuple[Path, tuple[float, float]]:
    """The bundled scene's first two chips side by side, the right one all nodata (0):
    the GeoTIFF's path and its top-left corner."""
    scene = Path(__file__).resolve().parents[1] / "demo" / "data" / "ftw_s2_l2a_33N.tif"
    crop = tmp_path / "crop.tif"
    with rasterio.open(scene) as src:
        pixels = src.read(window=rasterio.windows.Window(0, 0, 448, 224))
        pixels[:, :, 224:] = 0
        profile = src.profile | {"width": 448, "height": 224}
        with rasterio.open(crop, "w", **profile) as dst:
            dst.write(pixels)
            dst.descriptions = src.descriptions
        return crop, (src.bounds.left, src.bounds.top)


def _damage_table_part(part: Path, damage: str) -> None:
    """Damage a table's batch part (a row, then a no_data line) as a disk or a hand might."""
    import json

    lines = part.read_text().splitlines()
    if damage == "emptied":
        part.write_text("")
    elif damage == "line lost":
        part.write_text(lines[0] + "\n")
    else:  # "field lost": valid JSON, a row without its time span
        row = json.loads(lines[0])
        del row["time"]
        part.write_text("\n".join([json.dumps(row), *lines[1:]]) + "\n")


class _BeforeAssembly(pl.Callback):
    """Runs ``action`` at the epoch's end, once the writers' parts are on disk, before the
    writers assemble (put first)."""

    def __init__(self, action: Any) -> None:
        self.action = action

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, PooledWriter | GridWriter):
                callback.flush()
        self.action()


@pytest.mark.parametrize("damage", ["emptied", "line lost", "field lost"])
def test_a_damaged_table_part_is_computed_again_on_resume_and_named_at_assembly(
    tmp_path: Path, damage: str
) -> None:
    """A table's batch part damaged between runs is removed with a warning when the job
    resumes (its identity checked first, which used to fail on it) and its chips computed
    again: the table equals an undisturbed run's. Damaged while the job runs, the assembly
    stops naming it, where a part that lost a line used to give a no_data row and exit 0."""
    from torchgeo_dofa.datamodules import DOFAPredictDataModule
    from torchgeo_dofa.embedder import DOFAEmbedder

    crop, _ = _two_chips_one_empty(tmp_path)
    module = DOFAEmbedder(weights=None, seed=0, output="pooled")

    def run(out: Path, before_assembly: Any = None) -> PooledWriter:
        writer = PooledWriter(out)
        first = [_BeforeAssembly(before_assembly)] if before_assembly else []
        trainer = pl.Trainer(
            accelerator="cpu", callbacks=[*first, writer], logger=False,
            enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        dm = DOFAPredictDataModule(crop, preprocess=True, batch_size=2)
        trainer.predict(module, datamodule=dm, return_predictions=False)
        return writer

    want = gpd.read_parquet(run(tmp_path / "ref.parquet").path)
    out = tmp_path / "p.parquet"

    def crash() -> None:
        raise RuntimeError("killed before assembly")

    with pytest.raises(RuntimeError, match="killed before assembly"):
        run(out, crash)
    (part,) = parts_dir(out).glob("*.jsonl")  # the one batch: a row and a no_data line
    assert (parts_dir(out) / "job-identity").is_file()
    _damage_table_part(part, damage)
    with pytest.warns(UserWarning, match=rf"{part.name} was unreadable .*: this run computes"):
        resumed = run(out)
    assert (resumed.written, resumed.empty) == (1, 1)  # both chips computed again
    got = gpd.read_parquet(out)
    assert got.chip_id.tolist() == want.chip_id.tolist() and got.no_data.tolist() == [False, True]
    np.testing.assert_array_equal(np.stack(got.embedding), np.stack(want.embedding))

    during = tmp_path / "during.parquet"

    def damage_it() -> None:
        resumed_parts = list(parts_dir(during).glob("*.jsonl"))
        assert len(resumed_parts) == 1
        _damage_table_part(resumed_parts[0], damage)

    with pytest.raises(OutputWriteError, match=r"\.jsonl was unreadable .*rerun the same command"):
        run(during, damage_it)
    assert not during.exists()


class _DeletePart(pl.Callback):
    """Stands for a user or a cleanup deleting a part file while the job runs: removes
    the part matching the pattern ``name`` from ``writer``'s parts folder just before the
    writers assemble."""

    def __init__(self, writer: GridWriter | PooledWriter, name: str) -> None:
        self.writer, self.name = writer, name

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.writer.flush()
        (part,) = self.writer.parts.glob(self.name)
        part.unlink()


def test_a_part_deleted_while_the_job_runs_fails_assembly_and_the_rerun_fills_it(
    tmp_path: Path,
) -> None:
    """A deleted part made a hole (NaN cells, a no_data row) in a file written with exit
    status 0, and the rerun found the job done. Now every chip of the sampler must have its
    part, or its empty part for a chip without any valid pixel, before anything is
    assembled; the rerun computes exactly the missing chips and writes the files of an
    undisturbed run."""
    from torchgeo_dofa.datamodules import DOFAPredictDataModule
    from torchgeo_dofa.embedder import DOFAEmbedder
    from torchgeo_dofa.writers import OutputWriteError

    crop, (left, top) = _two_chips_one_empty(tmp_path)
    module = DOFAEmbedder(weights=None, seed=0, output="both")

    def run(
        out: Path, deleting: tuple[str, str] | None = None, table: bool = True, **limits: Any
    ) -> GridWriter:
        grid, pooled = GridWriter(out / "g.tif"), PooledWriter(out / "p.parquet")
        callbacks: list[pl.Callback] = [pooled, grid] if table else [grid]  # table first
        if deleting is not None:
            which, name = deleting
            callbacks.insert(0, _DeletePart(grid if which == "grid" else pooled, name))
        trainer = pl.Trainer(
            accelerator="cpu", callbacks=callbacks, logger=False, enable_progress_bar=False,
            enable_model_summary=False, **limits,
        )  # fmt: skip
        dm = DOFAPredictDataModule(crop, preprocess=True, batch_size=2)
        trainer.predict(module, datamodule=dm, return_predictions=False)
        return grid

    reference = run(tmp_path / "ref")
    assert (reference.written, reference.empty) == (1, 1)
    out = tmp_path / "job"
    grid_parts, table_parts = parts_dir(out / "g.tif"), parts_dir(out / "p.parquet")
    # run 1: the table's part of the batch (the left chip's row, the right one's no-data mark)
    # goes missing: the table refuses, nothing assembled (also with a batch limit above the
    # job's one batch: Lightning runs them all)
    key = PooledWriter.chip_key([left, left + 2240.0, 0.0, top - 2240.0, top])
    with pytest.raises(OutputWriteError, match=rf"2 chip\(s\) of p.parquet have no part .*{key}"):
        run(out, ("pooled", "*.jsonl"), limit_predict_batches=100)
    assert not (out / "p.parquet").exists() and not (out / "g.tif").exists()
    assert sorted(p.name for p in table_parts.glob("*.json*")) == []
    assert sorted(p.name for p in grid_parts.iterdir() if p.name != "job-identity") == [
        "r0_c0.npy",
        "r0_c14.empty",
    ]
    # run 2 computes that chip again; now the grid's empty part of the nodata chip goes
    with pytest.raises(OutputWriteError, match=r"1 chip\(s\) of g.tif have no part .*r0_c14\)"):
        run(out, ("grid", "r0_c14.empty"))
    assert (out / "p.parquet").exists() and not (out / "g.tif").exists()
    # run 3 (the grid alone: the table is done): only the nodata chip again, then the grid
    grid = run(out, table=False)
    assert (grid.written, grid.empty) == (0, 1)
    with rasterio.open(out / "g.tif") as a, rasterio.open(tmp_path / "ref" / "g.tif") as b:
        values = a.read()
        np.testing.assert_array_equal(values, b.read())
        assert np.isnan(values[:, :, 14:]).all() and not np.isnan(values[:, :, :14]).any()
    got = gpd.read_parquet(out / "p.parquet")
    want = gpd.read_parquet(tmp_path / "ref" / "p.parquet")
    assert got.chip_id.tolist() == want.chip_id.tolist() and got.no_data.tolist() == [False, True]
    np.testing.assert_array_equal(np.stack(got.embedding), np.stack(want.embedding))
    assert not grid_parts.exists() and not table_parts.exists()


def test_a_full_disk_when_marking_an_empty_chip_is_a_write_error(tmp_path: Path) -> None:
    """The empty part of a chip without valid pixels fails on a full disk as a part does
    (OutputWriteError: exit status 1, 'could not write'), not as a bare OSError (exit
    status 2, the status of bad input)."""
    geom = _geometry()
    with tmpfs(tmp_path / "disk", "1m", inodes=4) as disk:  # root, the parts folder, 2 files
        writer = GridWriter(disk / "g.tif", geom)
        _write(writer, [_chip(geom, 0, 0)])  # one part (written through a temporary name)
        (writer.parts / "filler").touch()  # the last inode
        with pytest.raises(OutputWriteError, match=r"could not write .*r0_c7.empty: No space"):
            _write(writer, [_chip(geom, 0, 7)], empty=[True])
        # helper-119: a part's failure said nothing of the parts kept nor of the rerun (the
        # assembly's did); a chip's values part (.npy) alike
        for empty in ([True], [False]):
            with pytest.raises(OutputWriteError) as info:
                _write(writer, [_chip(geom, 0, 7)], empty=empty)
            assert str(info.value).endswith(
                f"; the chips already computed are kept in {writer.parts}: fix the cause (e.g. "
                "free disk space) and rerun the same command to finish"
            ), str(info.value)
            assert str(info.value).count("rerun") == 1


def test_bf16_parts_written_before_the_fp32_patch_embedding_are_another_job() -> None:
    """A bf16 job interrupted under the release whose patch embedding ran in bf16, resumed
    under this one, mixed both numerics in one output (pooled cosine to fp32 0.996-0.997 for
    the old chips, 0.99999 for the new; helper-91): a mixed-precision identity records how it
    computes the patch embedding, and one without that record (the old release's) differs.
    fp32 jobs' numbers did not change: their identities carry no such record."""
    from torchgeo_dofa.writers import identity_differences

    old = {"precision": "bf16-mixed", "variant": "base"}
    assert identity_differences(old, {**old, "patch_embedding": "fp32"}) == ["patch_embedding"]
    assert (
        identity_differences({**old, "patch_embedding": "fp32"}, {**old, "patch_embedding": "fp32"})
        == []
    )
    fp32 = {"precision": "32-true", "variant": "base"}
    assert identity_differences(fp32, dict(fp32)) == []


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_a_damaged_output_is_named_by_the_librarys_message_once(tmp_path: Path, damage) -> None:
    """helper-119 / helper-120: the reason a finished output cannot be read was rasterio's
    "Read failed. See previous exception for details." (naming nothing), then libtiff's
    message twice over (rasterio's error repeats the GDAL error it chains), cut at 200
    characters mid-word. Now each message of the chain once, innermost first."""
    from torchgeo_dofa.writers import finished_output_problem

    grid = _reference_grid(tmp_path)
    assert finished_output_problem(grid) is None
    data = grid.read_bytes()
    grid.write_bytes(data[:2000] if damage == "truncated" else b"\0" * 64 + data[64:])
    reason = finished_output_problem(grid)
    assert reason is not None and "see previous exception" not in reason.lower(), reason
    parts = [p.split(": ", 1)[-1] for p in reason.split("; ")]
    assert len(parts) == len(set(parts)), reason  # no message twice
    if damage == "truncated":
        assert "TIFFReadEncodedTile() failed" in reason, reason
    else:  # GDAL's message once (rasterio's error repeated it, cut at 200 characters)
        assert reason == (
            f"RasterioIOError: '{grid}' not recognized as being in a supported file format."
        ), reason


def test_a_read_only_parts_folder_is_the_write_error_not_the_clean_up(tmp_path: Path) -> None:
    """helper-120: a parts folder on a read-only file system gave "[Errno 30] Read-only file
    system: '.../.job-identity.<hex>.tmp'" (exit status 2): removing the temporary file,
    which was never made, failed too (EROFS before ENOENT) and replaced the write's error.
    Now the write's one line, naming the file, and the rerun hint; nothing else raised."""
    geom = _geometry()
    with tmpfs(tmp_path / "disk", "1m") as disk:
        writer = GridWriter(disk / "g.tif", geom)
        _write(writer, [_chip(geom, 0, 0)])
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        with pytest.raises(OutputWriteError) as info:
            _write(writer, [_chip(geom, 0, 7)])
        assert str(info.value).startswith(
            f"could not write {writer.parts / 'r0_c7.npy'}: Read-only file system; the chips "
            f"already computed are kept in {writer.parts}"
        ), str(info.value)
        with pytest.raises(OutputWriteError, match=r"could not write .*/x: Read-only file"):
            atomic_write(disk / "x", lambda tmp: tmp.write_text("x"))


def test_a_trainer_run_again_after_its_weights_changed_does_not_resume_the_first_run(
    tmp_path: Path,
) -> None:
    """The grid and the table share one CRC-32 of the weights per run (the first writer's,
    before the first batch), and a trainer's next run takes it again: weights changed in
    place between two runs of the same trainer and writers (a notebook training the module,
    even through ``.data``, which no version counter sees) do not resume the first run's
    parts; with the weights put back, the rerun resumes and finishes."""
    from torchgeo_dofa.datamodules import DOFAPredictDataModule
    from torchgeo_dofa.embedder import DOFAEmbedder
    from torchgeo_dofa.writers import PartsMismatchError

    crop, _ = _two_chips_one_empty(tmp_path)
    module = DOFAEmbedder(weights=None, seed=0, output="both")

    class FailAfterTheBatch(pl.Callback):
        armed = True

        def on_predict_batch_end(self, *args: Any) -> None:
            if self.armed:
                raise RuntimeError("the job died")

    fail = FailAfterTheBatch()
    grid, pooled = GridWriter(tmp_path / "g.tif"), PooledWriter(tmp_path / "p.parquet")
    trainer = cpu_trainer([pooled, grid, fail])

    def run() -> None:
        dm = DOFAPredictDataModule(crop, preprocess=True, batch_size=2)
        trainer.predict(module, datamodule=dm, return_predictions=False)

    with pytest.raises(RuntimeError, match="the job died"):
        run()
    assert (parts_dir(tmp_path / "g.tif") / "r0_c0.npy").exists()
    fail.armed = False
    weight = module.encoder.norm.weight
    version = weight._version
    weight.data.mul_(2.0)
    assert weight._version == version  # unseen by the version counter
    with pytest.raises(PartsMismatchError, match="weights_crc32"):
        run()
    weight.data.div_(2.0)
    run()  # resumed: the chip was done, the outputs assembled
    assert (tmp_path / "g.tif").exists() and (tmp_path / "p.parquet").exists()
