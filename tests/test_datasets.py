"""Sentinel2SR / EarthEngineS2 on synthetic fixtures and (when present) real Sentinel-2 files.

Expected pixels are computed independently: each raster is read with plain rasterio at integer
windows (coarser bands upsampled by repeating pixels), no-data and out-of-raster pixels are
masked by hand, and overlapping scenes are mosaicked first-valid-wins.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import numpy as np
import pandas as pd
import pytest
import rasterio
import rasterio.warp
import torch
from pyproj import CRS
from rasterio.crs import CRS as RIO_CRS
from rasterio.enums import ColorInterp
from rasterio.transform import Affine, from_origin
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from torchgeo.datasets import stack_samples
from torchgeo.samplers import (
    GriddedPatchSampler,
    GridGeoSampler,
    RandomGeoSampler,
    RandomPatchSampler,
)

from torchgeo_dofa.bands import DOFA_S2_BANDS, SENTINEL2_BANDS, BandError
from torchgeo_dofa.datamodules import check_raw_reflectance
from torchgeo_dofa.datasets import (
    BandSetBatchSampler,
    DatasetCollection,
    EarthEngineS2,
    InputError,
    MixedBandSetError,
    NoRasterFoundError,
    NoSceneError,
    Sentinel2Base,
    Sentinel2SR,
    find_raster_inputs,
    read_product_metadata,
    stack_dofa_samples,
)
from torchgeo_dofa.spatial import crs_label, crs_name, exact_epsg, same_crs
from torchgeo_dofa.transforms import (
    CheckReflectance,
    DOFAPreprocess,
    ReflectanceError,
    ReflectanceWarning,
)

DATA = Path(__file__).resolve().parent / "data" / "sentinel2"
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sentinel2"


def _load_recipe() -> ModuleType:
    spec = importlib.util.spec_from_file_location("s2_fixture_recipe", DATA / "data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fx = _load_recipe()


# ----------------------------------------------------------------------------- helpers


def esa(band: str) -> str:
    """ESA spelling of a canonical band name (B4 -> B04)."""
    return band if band == "B8A" or len(band) == 3 else f"B0{band[1:]}"


@functools.lru_cache(maxsize=256)
def read_band(path: str, bidx: int) -> tuple[np.ndarray, Affine, frozenset[float]]:
    """A whole band read with plain rasterio, its transform and its no-data values."""
    with rasterio.open(path) as src:
        nodata = {0.0} | ({float(src.nodata)} if src.nodata is not None else set())
        return src.read(bidx).astype(np.float64), src.transform, frozenset(nodata)


def read_window(
    path: str | Path, bidx: int, x0: float, y1: float, res: tuple[float, float], h: int, w: int
) -> tuple[np.ndarray, frozenset[float]]:
    """Raw pixels of one band on a chip grid (NaN outside the raster) and its nodata values.

    Coarser rasters are upsampled by repeating pixels (nearest), so the chip grid must be
    aligned with the raster grid and its pixel size an integer fraction of the raster's.
    """
    data, t, nodata = read_band(str(path), bidx)
    kx, ky = t.a / res[0], -t.e / res[1]
    assert abs(kx - round(kx)) < 1e-6 and abs(ky - round(ky)) < 1e-6, "grids do not nest"
    kx, ky = round(kx), round(ky)
    col, row = (x0 - t.c) / res[0], (t.f - y1) / res[1]
    assert abs(col - round(col)) < 1e-6 and abs(row - round(row)) < 1e-6, "chip off grid"
    cols = (round(col) + np.arange(w)) // kx
    rows = (round(row) + np.arange(h)) // ky
    ci = np.flatnonzero((cols >= 0) & (cols < data.shape[1]))
    ri = np.flatnonzero((rows >= 0) & (rows < data.shape[0]))
    out = np.full((h, w), np.nan)
    out[np.ix_(ri, ci)] = data[np.ix_(rows[ri], cols[ci])]
    return out, nodata


@dataclass
class SceneSpec:
    """Where each channel of one scene lives, and its offset."""

    sources: Sequence[tuple[str | Path, int]]
    offset: float = 0.0


def expected_chip(
    scenes: Sequence[SceneSpec],
    bounds: Sequence[float],
    nodata: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Expected (image, valid) of a chip from its ``bounds`` sample entry."""
    x0, x1, xres, y0, y1, yres = (float(v) for v in bounds[:6])
    w, h = round((x1 - x0) / xres), round((y1 - y0) / yres)
    channels = len(scenes[0].sources)
    image = np.zeros((channels, h, w))
    valid = np.zeros((h, w), dtype=bool)
    for scene in scenes:
        data = np.empty((channels, h, w))
        for c, (path, bidx) in enumerate(scene.sources):
            layer, file_nodata = read_window(path, bidx, x0, y1, (xres, yres), h, w)
            for value in file_nodata if nodata is None else nodata:
                layer[layer == value] = np.nan
            data[c] = layer
        ok = ~np.isnan(data).any(axis=0)
        take = ok & ~valid
        image[:, take] = data[:, take] + scene.offset
        valid |= take
    return image, valid


def check_sample(
    image: torch.Tensor,
    valid: torch.Tensor,
    bounds: torch.Tensor,
    scenes: Sequence[SceneSpec],
    nodata: Sequence[float] | None = None,
) -> None:
    exp_image, exp_valid = expected_chip(scenes, bounds.tolist(), nodata)
    np.testing.assert_array_equal(valid.numpy(), exp_valid)
    np.testing.assert_array_equal(image.numpy(), exp_image.astype(np.float32))


@dataclass
class Layout:
    """A fixture layout: how to open it and where its expected pixels come from."""

    make: Callable[[], Sentinel2Base]
    bands: tuple[str, ...]
    scenes: list[SceneSpec]
    patch: int = 16


def _esa_scene(date: str, offset: float) -> SceneSpec:
    sources: list[tuple[str | Path, int]] = []
    for band in DOFA_S2_BANDS:
        res = "10m" if esa(band) in fx.ESA_10M else "20m"
        sources.append((DATA / "esa" / f"T31UFQ_{date}_{esa(band)}_{res}.tif", 1))
    return SceneSpec(sources, offset)


def _safe_scene() -> SceneSpec:
    img = DATA / "esa_safe" / fx.SAFE_PRODUCT / fx.SAFE_GRANULE
    bands = ("B2", "B3", "B4", "B5", "B8", "B11", "B12")
    sources: list[tuple[str | Path, int]] = []
    for band in bands:
        res = "10m" if esa(band) in fx.ESA_10M else "20m"
        sources.append((img / f"R{res}" / f"{fx.SAFE_SCENE}_{esa(band)}_{res}.jp2", 1))
    return SceneSpec(sources, -1000.0)


LAYOUTS: dict[str, Layout] = {
    "multiband": Layout(
        lambda: Sentinel2SR(DATA / "multiband"),
        DOFA_S2_BANDS,
        [
            SceneSpec(
                [
                    (
                        DATA / "multiband" / "S2_20220614_multiband.tif",
                        fx.MULTIBAND_DESCRIPTIONS.index(esa(b)) + 1,
                    )
                    for b in DOFA_S2_BANDS
                ]
            )
        ],
    ),
    "nodesc": Layout(
        lambda: Sentinel2SR(DATA / "nodesc", bands=list(fx.NODESC_BANDS)),
        ("B4", "B3", "B2", "B8"),
        [SceneSpec([(DATA / "nodesc" / "S2_20220614_nodesc.tif", i) for i in range(1, 5)])],
    ),
    "esa_per_band": Layout(
        lambda: Sentinel2SR(DATA / "esa"),
        DOFA_S2_BANDS,
        [_esa_scene(fx.ESA_DATES[0], 0.0), _esa_scene(fx.ESA_DATES[1], -1000.0)],
    ),
    "esa_safe_jp2": Layout(
        lambda: Sentinel2SR(DATA / "esa_safe"),
        ("B2", "B3", "B4", "B5", "B8", "B11", "B12"),
        [_safe_scene()],
    ),
    "ee_tiles": Layout(
        lambda: EarthEngineS2(DATA / "ee"),
        DOFA_S2_BANDS,
        [
            SceneSpec(
                [
                    (
                        DATA / "ee" / f"{fx.EE_PREFIX}-0000000000-{col:010d}.tif",
                        fx.EE_DESCRIPTIONS.index(b) + 1,
                    )
                    for b in DOFA_S2_BANDS
                ]
            )
            for col, _ in fx.EE_TILES
        ],
    ),
    "nodata_swath": Layout(
        lambda: Sentinel2SR(DATA / "nodata" / "swath_undeclared.tif"),
        ("B2", "B3", "B4", "B8", "B11", "B12"),
        [
            SceneSpec(
                [(DATA / "nodata" / "swath_undeclared.tif", i) for i in range(1, 7)],
            )
        ],
    ),
    "nodata_declared": Layout(
        lambda: Sentinel2SR(DATA / "nodata" / "declared_65535.tif"),
        ("B2", "B3", "B4", "B8"),
        [
            SceneSpec(
                [
                    (DATA / "nodata" / "declared_65535.tif", fx.NODESC_BANDS.index(b) + 1)
                    for b in ("B2", "B3", "B4", "B8")
                ]
            )
        ],
    ),
}


def make_sampler(kind: str, ds: Sentinel2Base, patch: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if kind == "random_patch":
            return RandomPatchSampler(ds, size=patch, length=6, generator=0)
        if kind == "gridded_patch":
            return GriddedPatchSampler(ds, size=patch, stride=patch - 4)
        if kind == "random_geo":
            return RandomGeoSampler(
                ds, size=patch, length=6, generator=torch.Generator().manual_seed(0)
            )
        return GridGeoSampler(ds, size=patch, stride=patch - 4)


def chip(ds: Sentinel2Base, col: int, row: int, w: int, h: int, t: slice | None = None):
    """Index ``ds`` with a chip given in pixels from the dataset's top-left corner."""
    x, y, _ = ds.bounds
    xres, yres = ds.res
    xs = slice(x.start + col * xres, x.start + (col + w) * xres)
    ys = slice(y.stop - (row + h) * yres, y.stop - row * yres)
    return ds[xs, ys] if t is None else ds[xs, ys, t]


# ----------------------------------------------------------------------------- fixtures


def test_recipe_reproduces_committed_fixtures(tmp_path: Path) -> None:
    """data.py is the recipe of the committed files: regenerating gives the same pixels."""
    fx.generate(tmp_path)
    committed = sorted(p.relative_to(DATA) for p in DATA.rglob("*") if p.suffix in {".tif", ".jp2"})
    regenerated = sorted(
        p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.suffix in {".tif", ".jp2"}
    )
    assert committed == regenerated
    for rel in committed:
        assert (DATA / rel).stat().st_size < 200_000
        with rasterio.open(DATA / rel) as a, rasterio.open(tmp_path / rel) as b:
            assert a.descriptions == b.descriptions and a.transform == b.transform
            np.testing.assert_array_equal(a.read(), b.read())
    total = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert total < 2_000_000


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    "sampler_kind", ["random_patch", "gridded_patch", "random_geo", "grid_geo"]
)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_loads_through_dataloader(name: str, sampler_kind: str) -> None:
    layout = LAYOUTS[name]
    ds = layout.make()
    assert ds.bands == layout.bands
    assert ds.crs.to_epsg() == (4326 if name == "ee_tiles" else 32631)
    sampler = make_sampler(sampler_kind, ds, layout.patch)
    loader = DataLoader(ds, sampler=sampler, batch_size=4, collate_fn=stack_samples)
    seen = 0
    for batch in loader:
        b = batch["image"].shape[0]
        assert batch["image"].shape[1:] == (len(layout.bands), layout.patch, layout.patch)
        assert batch["image"].dtype == torch.float32
        assert batch["valid"].shape == (b, layout.patch, layout.patch)
        assert batch["valid"].dtype == torch.bool
        assert batch["wavelengths"].shape == (b, len(layout.bands))
        assert batch["bounds"].shape == (b, 9) and batch["transform"].shape == (b, 9)
        for i in range(b):
            torch.testing.assert_close(batch["wavelengths"][i], ds.wavelengths)
            check_sample(batch["image"][i], batch["valid"][i], batch["bounds"][i], layout.scenes)
            t = batch["transform"][i]
            assert t[0] == ds.res[0] and t[4] == -ds.res[1]
            assert t[2] == batch["bounds"][i][0] and t[5] == batch["bounds"][i][4]
        seen += b
    assert seen == len(sampler) > 0


def test_dofa_collate_and_workers() -> None:
    ds = LAYOUTS["esa_per_band"].make()
    sampler = GriddedPatchSampler(ds, size=16)
    loader = DataLoader(
        ds, sampler=sampler, batch_size=8, collate_fn=stack_dofa_samples, num_workers=2
    )
    batches = list(loader)
    assert sum(b["image"].shape[0] for b in batches) == len(sampler) == 16
    for batch in batches:
        for i in range(batch["image"].shape[0]):
            check_sample(
                batch["image"][i],
                batch["valid"][i],
                batch["bounds"][i],
                LAYOUTS["esa_per_band"].scenes,
            )
    # file handles are dropped when pickling
    chip(ds, 0, 0, 4, 4)
    assert ds._handles
    clone = pickle.loads(pickle.dumps(ds))
    assert not clone._handles
    torch.testing.assert_close(chip(clone, 3, 5, 8, 8)["image"], chip(ds, 3, 5, 8, 8)["image"])


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_a_batch_read_equals_its_chips_read_one_by_one(name: str) -> None:
    """``__getitems__`` (what a DataLoader calls with a batch's chips) gives ``ds[chip]``'s
    samples, for chips inside the raster and reaching past it, with the transforms applied."""
    ds = LAYOUTS[name].make()
    ds.transforms = lambda sample: {**sample, "image": sample["image"] * 2}
    patch = LAYOUTS[name].patch
    chips = list(GridGeoSampler(ds, size=patch + 3, stride=max(1, patch // 2 + 1)))
    assert len(chips) > 1
    batch = ds.__getitems__(chips)
    assert not ds._held_caches  # checked again at the next read
    assert len(batch) == len(chips)
    for chip_slice, got in zip(chips, batch, strict=True):
        want = ds[chip_slice]
        assert set(got) == set(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(got["image"], 2 * ds.read_chip(chip_slice)["image"])


def test_a_batch_read_sees_an_index_changed_between_batches_and_fails_cleanly() -> None:
    ds = Sentinel2SR(DATA / "esa", bands=["B4", "B8"], offset=0)
    both = ds.index
    x, y, _ = ds.bounds
    window = (slice(x.start + 30.0, x.start + 190.0), slice(y.stop - 190.0, y.stop - 30.0))
    first = ds.__getitems__([window])[0]  # both dates: the 2021 scene wins
    ds.index = both.iloc[1:]  # only the 2022 scene is left
    later = ds.__getitems__([window])[0]
    torch.testing.assert_close(later["image"], ds[window]["image"])
    assert not torch.equal(first["image"], later["image"])
    outside = (slice(x.stop + 1000.0, x.stop + 1160.0), window[1])
    with pytest.raises(IndexError, match="not found in dataset"):
        ds.__getitems__([window, outside])
    assert not ds._held_caches
    ds.index = both  # after the failed batch, the next one sees the index as it is now
    torch.testing.assert_close(ds.__getitems__([window])[0]["image"], first["image"])


def test_a_subclass_overriding_getitem_keeps_its_samples_in_a_dataloader() -> None:
    """A DataLoader reads batches through ``__getitems__``: a subclass that overrides
    ``__getitem__`` (TorchGeo's way to add a label) must still get its own samples."""

    class Labelled(Sentinel2SR):
        def __getitem__(self, index: Any) -> dict[str, torch.Tensor]:
            sample = super().__getitem__(index)
            sample["label"] = sample["image"][0].mean().round().long()
            return sample

    ds = Labelled(DATA / "multiband")
    sampler = GriddedPatchSampler(ds, size=8)
    batch = next(iter(DataLoader(ds, sampler=sampler, batch_size=4, collate_fn=stack_dofa_samples)))
    want = [ds[c] for c in list(sampler)[:4]]
    torch.testing.assert_close(batch["label"], torch.stack([w["label"] for w in want]))
    torch.testing.assert_close(batch["image"], torch.stack([w["image"] for w in want]))


def test_batches_read_in_overlapping_threads_leave_the_index_checked() -> None:
    """Batch A starts, batch B starts in another thread, A ends, then B ends: afterwards no
    batch holds the index cache, and a new index is seen (found by review: one shared slot
    kept A's cache held for good)."""
    import threading

    ds = Sentinel2SR(DATA / "esa", bands=["B4", "B8"], offset=0)
    both = ds.index
    x, y, _ = ds.bounds
    window = (slice(x.start + 30.0, x.start + 190.0), slice(y.stop - 190.0, y.stop - 30.0))
    b_inside, a_done = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def transform(sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if threading.current_thread().name == "A" and not b_inside.is_set():
            threading.Thread(target=read, name="B").start()
            assert b_inside.wait(10)
        elif threading.current_thread().name == "B" and not b_inside.is_set():
            b_inside.set()
            assert a_done.wait(10)
        return sample

    def read() -> None:
        try:
            ds.__getitems__([window, window])
        except BaseException as err:  # reported below
            errors.append(err)

    ds.transforms = transform
    a = threading.Thread(target=read, name="A")
    a.start()
    a.join(10)
    a_done.set()
    b = next(t for t in threading.enumerate() if t.name == "B")
    b.join(10)
    assert not errors and not a.is_alive() and not b.is_alive()
    assert not ds._held_caches
    ds.transforms = None
    first = ds.__getitems__([window])[0]
    ds.index = both.iloc[1:]  # only the 2022 scene: the next batch must read it
    later = ds.__getitems__([window])[0]
    assert not torch.equal(first["image"], later["image"])


def _stack_saying_if_shared(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``stack_dofa_samples``, plus whether each stacked key is in shared memory (a module
    function: a worker started by spawn or forkserver must unpickle it)."""
    batch = stack_dofa_samples(samples)
    shared = [batch[k].is_shared() for k in sorted(batch)]
    return {**batch, "shared_in_worker": torch.tensor(shared)}


def test_a_worker_stacks_its_batch_into_shared_memory() -> None:
    """In a DataLoader worker, ``stack_dofa_samples`` stacks straight into shared memory, as
    PyTorch's ``default_collate`` does, so the batch is not copied again to be passed."""
    ds = LAYOUTS["multiband"].make()
    sampler = GriddedPatchSampler(ds, size=8)
    loader = DataLoader(
        ds, sampler=sampler, batch_size=3, collate_fn=_stack_saying_if_shared, num_workers=1
    )
    batches = list(loader)
    assert batches and all(bool(b["shared_in_worker"].all()) for b in batches)
    # in the main process: ordinary memory, the same values as TorchGeo's stack_samples
    samples = [ds[c] for c in list(sampler)[:3]]
    ours, theirs = stack_dofa_samples(samples), stack_samples(samples)
    assert not ours["image"].is_shared() and set(ours) == set(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, equal_nan=True)
    # mixed dtypes are promoted as torch.stack (and TorchGeo) promotes them, in a worker too
    mixed = [
        {"x": torch.ones(2, dtype=torch.float32)},
        {"x": torch.full((2,), 0.1, dtype=torch.float64)},
    ]
    stacked = list(
        DataLoader(cast(Any, mixed), batch_size=2, collate_fn=stack_dofa_samples, num_workers=1)
    )
    assert stacked[0]["x"].dtype == torch.float64
    torch.testing.assert_close(stacked[0]["x"], stack_samples(mixed)["x"])
    sparse = [{"x": torch.eye(2).to_sparse()}, {"x": torch.eye(2).to_sparse()}]
    torch.testing.assert_close(
        stack_dofa_samples(sparse)["x"].to_dense(), torch.eye(2).expand(2, 2, 2)
    )
    with pytest.raises(TypeError):  # values other than tensors are refused, as TorchGeo does
        stack_dofa_samples([{"image": samples[0]["image"], "name": "a"}])  # type: ignore[dict-item]


def test_sample_holds_only_tensors_and_wavelengths() -> None:
    ds = LAYOUTS["multiband"].make()
    sample = chip(ds, 0, 0, 10, 12)
    assert set(sample) == {"image", "wavelengths", "valid", "bounds", "transform"}
    assert all(isinstance(v, torch.Tensor) for v in sample.values())
    assert sample["image"].shape == (9, 12, 10)
    expected = [SENTINEL2_BANDS[b].wavelength for b in DOFA_S2_BANDS]
    torch.testing.assert_close(sample["wavelengths"], torch.tensor(expected))
    assert ds.res == (10.0, 10.0)
    assert ds.band_set == tuple(round(w, 6) for w in expected)


def test_transforms_are_applied() -> None:
    calls: list[tuple[str, ...]] = []

    def transform(sample):
        calls.append(tuple(sample))
        sample["image"] = sample["image"] * 2
        return sample

    plain = Sentinel2SR(DATA / "multiband")
    ds = Sentinel2SR(DATA / "multiband", transforms=transform)
    a, b = chip(plain, 5, 5, 8, 8), chip(ds, 5, 5, 8, 8)
    torch.testing.assert_close(b["image"], 2 * a["image"])
    assert calls and {"image", "wavelengths", "valid", "transform"} <= set(calls[0])


# ----------------------------------------------------------------------------- bands


def test_band_selection_reorders_and_accepts_both_spellings() -> None:
    ds = Sentinel2SR(DATA / "multiband", bands=["B08", "b2", "B4"])
    assert ds.bands == ("B8", "B2", "B4")
    torch.testing.assert_close(ds.wavelengths, torch.tensor([0.842, 0.490, 0.665]))
    path = DATA / "multiband" / "S2_20220614_multiband.tif"
    sources = [(path, fx.MULTIBAND_DESCRIPTIONS.index(b) + 1) for b in ("B08", "B02", "B04")]
    sample = chip(ds, 7, 3, 20, 16)
    check_sample(sample["image"], sample["valid"], sample["bounds"], [SceneSpec(sources)])


def test_default_bands_fall_back_to_present_s2_bands() -> None:
    ds = Sentinel2SR(DATA / "nodata" / "swath_undeclared.tif")
    assert ds.bands == ("B2", "B3", "B4", "B8", "B11", "B12")


def test_missing_band_is_an_error() -> None:
    with pytest.raises(BandError, match=r"B5.*not found"):
        Sentinel2SR(DATA / "nodata" / "swath_undeclared.tif", bands=["B4", "B5"])


def test_file_without_descriptions_needs_bands() -> None:
    with pytest.raises(BandError, match=r"no band descriptions.*bands=\[") as err:
        Sentinel2SR(DATA / "nodesc")
    assert "4 bands" in str(err.value)
    with pytest.raises(BandError, match="file_bands"):
        Sentinel2SR(DATA / "nodesc", bands=["B4", "B3"])


def test_file_bands_name_and_bands_select() -> None:
    path = DATA / "nodesc" / "S2_20220614_nodesc.tif"
    ds = Sentinel2SR(path, file_bands=list(fx.NODESC_BANDS), bands=["B8", "B4"])
    assert ds.bands == ("B8", "B4")
    sample = chip(ds, 2, 2, 12, 12)
    check_sample(
        sample["image"], sample["valid"], sample["bounds"], [SceneSpec([(path, 4), (path, 1)])]
    )
    # without bands=, the default picks the Sentinel-2 bands present, in S2 order
    assert Sentinel2SR(path, file_bands=list(fx.NODESC_BANDS)).bands == ("B2", "B3", "B4", "B8")


def test_earth_engine_skips_non_spectral_bands_by_default() -> None:
    ds = EarthEngineS2(DATA / "ee")
    assert not {"QA60", "VV", "temperature_2m", "B4_1"} & set(ds.bands)
    everything = EarthEngineS2(
        DATA / "ee", bands=[b for b in fx.EE_DESCRIPTIONS if b.startswith("B") and "_" not in b]
    )
    assert everything.bands == tuple(fx.EE_DESCRIPTIONS[:12])


def test_earth_engine_suffixed_and_non_spectral_bands_are_selectable() -> None:
    tile = DATA / "ee" / f"{fx.EE_PREFIX}-0000000000-0000000000.tif"
    ds = EarthEngineS2(DATA / "ee", bands=["B4_1", "B04"])
    assert ds.bands == ("B4_1", "B4")
    torch.testing.assert_close(ds.wavelengths, torch.tensor([0.665, 0.665]))
    sample = chip(ds, 10, 4, 16, 16)
    sources = [(tile, fx.EE_DESCRIPTIONS.index("B4_1") + 1), (tile, 4)]
    check_sample(sample["image"], sample["valid"], sample["bounds"], [SceneSpec(sources)])

    # a product is no spectral band: named so (it was told to give its wavelength), and
    # read where the wavelengths are given (a model of your own)
    with pytest.raises(BandError, match=r"^QA60 is a Sentinel-2 product .* leave it out of "):
        EarthEngineS2(DATA / "ee", bands=["QA60", "B4"])
    assert EarthEngineS2(DATA / "ee", bands=["QA60", "B4"], wavelengths=[1, 0.665]).bands == (
        "QA60",
        "B4",
    )
    # VV takes DOFA v1's Sentinel-1 placeholder wavelength, as the sentinel1 preset does
    sar = EarthEngineS2(DATA / "ee", bands=["VV", "B4"])
    torch.testing.assert_close(sar.wavelengths, torch.tensor([3.75, 0.665]))
    sample = chip(sar, 10, 4, 16, 16)
    vv = [(tile, fx.EE_DESCRIPTIONS.index("VV") + 1), (tile, 4)]
    check_sample(sample["image"], sample["valid"], sample["bounds"], [SceneSpec(vv)])
    assert sample["image"][0].max() < 0  # dB values pass through untouched


def test_earth_engine_tiles_form_one_mosaic() -> None:
    ds = EarthEngineS2(DATA / "ee", bands=["B2"])
    assert len(ds) == 2
    across = chip(ds, 240, 0, 32, 32)  # 16 columns from each tile
    assert bool(across["valid"].all())
    left, right = (
        rasterio.open(DATA / "ee" / f"{fx.EE_PREFIX}-0000000000-{c:010d}.tif") for c in (0, 256)
    )
    with left, right:
        expected = np.concatenate([left.read(2)[:32, 240:], right.read(2)[:32, :16]], axis=1)
    np.testing.assert_array_equal(across["image"][0].numpy(), expected.astype(np.float32))


# ----------------------------------------------------------------------------- per-band files


def test_per_band_files_are_read_onto_the_finest_grid() -> None:
    ds = Sentinel2SR(DATA / "esa", bands=["B4", "B5", "B11"])
    assert ds.res == (10.0, 10.0)
    sample = chip(ds, 0, 0, 64, 64, t=slice(pd.Timestamp("2021-10-15"), pd.Timestamp("2021-10-16")))
    assert sample["image"].shape == (3, 64, 64)
    with rasterio.open(DATA / "esa" / f"T31UFQ_{fx.ESA_DATES[0]}_B05_20m.tif") as src:
        b5 = src.read(1).astype(np.float32)
    np.testing.assert_array_equal(sample["image"][1].numpy(), b5.repeat(2, 0).repeat(2, 1))
    coarse = Sentinel2SR(DATA / "esa", bands=["B4", "B5"], res=20)
    assert chip(coarse, 0, 0, 32, 32)["image"].shape == (2, 32, 32)


def test_safe_tree_uses_finest_band_and_skips_ancillary_files() -> None:
    ds = Sentinel2SR(DATA / "esa_safe", bands=["B2"])
    source = ds.index["sources"].iloc[0][0][0]
    assert "R10m" in source and source.endswith("_B02_10m.jp2")
    all_bands = Sentinel2SR(DATA / "esa_safe")
    assert "SCL" not in all_bands.bands


def test_dates_select_scenes_by_time() -> None:
    ds = Sentinel2SR(DATA / "esa", bands=["B4", "B8"], offset=0)
    assert len(ds) == 2
    assert list(ds.index.index.left.date.astype(str)) == ["2021-10-15", "2022-06-14"]
    old = chip(ds, 3, 3, 16, 16, t=slice(pd.Timestamp("2021-01-01"), pd.Timestamp("2021-12-31")))
    new = chip(ds, 3, 3, 16, 16, t=slice(pd.Timestamp("2022-06-01"), pd.Timestamp("2022-06-30")))
    torch.testing.assert_close(new["image"], old["image"] + 1000)
    # without a time slice both dates overlap: the first scene (by path) wins the mosaic
    torch.testing.assert_close(chip(ds, 3, 3, 16, 16)["image"], old["image"])
    series = Sentinel2SR(DATA / "esa", bands=["B4", "B8"], offset=0, time_series=True)
    stacked = chip(series, 3, 3, 16, 16)
    assert stacked["image"].shape == (2, 2, 16, 16) and stacked["valid"].shape == (2, 16, 16)
    torch.testing.assert_close(stacked["image"][0], old["image"])
    torch.testing.assert_close(stacked["image"][1], new["image"])


def test_chip_sources_are_the_files_its_pixels_came_from() -> None:
    """Every band file of the scenes that gave pixels; not a scene the mosaic left unread."""
    ds = Sentinel2SR(DATA / "esa", bands=["B4", "B8"], offset=0)
    x, y, t = ds.bounds
    xs = slice(x.start + 30, x.start + 190)
    ys = slice(y.stop - 190, y.stop - 30)
    per_date = {
        date: sorted(str(DATA / "esa" / f"T31UFQ_{date}_{band}_10m.tif") for band in ("B04", "B08"))
        for date in fx.ESA_DATES
    }
    sample, files = ds.read_chip_with_sources((xs, ys, t))
    assert files == per_date[fx.ESA_DATES[0]]  # the 2021 scene filled every pixel
    torch.testing.assert_close(sample["image"], ds.read_chip((xs, ys, t))["image"])
    june = slice(pd.Timestamp("2022-06-01"), pd.Timestamp("2022-06-30"))
    assert ds.read_chip_with_sources((xs, ys, june))[1] == per_date[fx.ESA_DATES[1]]
    series = Sentinel2SR(DATA / "esa", bands=["B4", "B8"], offset=0, time_series=True)
    every = sorted(f for files in per_date.values() for f in files)
    assert series.read_chip_with_sources((xs, ys, t))[1] == every


def test_bounds_and_time_queries_follow_the_index() -> None:
    """Bounds and time-overlap rows are cached per index: a new index or res shows at once."""
    from torchgeo.datasets import GeoDataset

    def torchgeo_bounds(d: Sentinel2SR) -> Any:
        return vars(GeoDataset)["bounds"].fget(d)  # TorchGeo's own, uncached computation

    ds = Sentinel2SR(DATA / "esa", bands=["B4", "B8"], offset=0)
    assert ds.bounds == torchgeo_bounds(ds)
    first = chip(ds, 3, 3, 16, 16)  # both dates overlap: the first scene wins
    later = chip(ds, 3, 3, 16, 16, t=slice(pd.Timestamp("2022-06-01"), pd.Timestamp("2022-06-30")))
    ds.index = ds.index.iloc[1:]  # only the 2022 scene is left
    assert ds.bounds == torchgeo_bounds(ds)
    assert ds.bounds[2].start.date() == pd.Timestamp("2022-06-14").date()
    torch.testing.assert_close(chip(ds, 3, 3, 16, 16)["image"], later["image"])
    assert not torch.equal(first["image"], later["image"])
    ds.res = (20.0, 20.0)
    assert ds.bounds[0].step == 20.0 and ds.bounds == torchgeo_bounds(ds)
    assert chip(ds, 0, 0, 8, 8)["image"].shape == (2, 8, 8)


def test_caches_follow_a_crs_change_in_place() -> None:
    """``ds.crs = ...`` reprojects the index in place (as ``&`` / ``|`` do to the second
    dataset): bounds and footprints read afterwards are the new CRS's (found by review)."""
    from torchgeo.datasets import GeoDataset

    ds = Sentinel2SR(DATA / "esa", bands=["B4", "B8"], offset=0)
    before = chip(ds, 3, 3, 16, 16)  # fills the caches in the file's CRS
    ds.crs = CRS.from_epsg(3857)
    unused = Sentinel2SR(DATA / "esa", bands=["B4", "B8"], offset=0)
    unused.crs = CRS.from_epsg(3857)  # reprojected before anything was cached
    assert ds.bounds == vars(GeoDataset)["bounds"].fget(ds) == unused.bounds
    x, y, _ = unused.bounds
    window = (slice(x.start + 50.0, x.start + 210.0), slice(y.stop - 210.0, y.stop - 50.0))
    got, want = ds[window], unused[window]
    torch.testing.assert_close(got["image"], want["image"], equal_nan=True)
    assert torch.equal(got["valid"], want["valid"]) and got["valid"].any()
    assert before["image"].shape == (2, 16, 16)


# ----------------------------------------------------------------------------- offsets


def test_offset_inferred_from_esa_file_date() -> None:
    ds = Sentinel2SR(DATA / "esa")
    assert [o[0] for o in ds.index["offset"]] == [0.0, -1000.0]
    assert [s.split(" dated ")[-1] for s in ds.index["offset_source"]] == [
        "2021-10-15",
        "2022-06-14",
    ]
    # both dates hold the same reflectance once the offset is removed
    old = chip(ds, 0, 0, 32, 32, t=slice(pd.Timestamp("2021-10-15"), pd.Timestamp("2021-10-16")))
    new = chip(ds, 0, 0, 32, 32, t=slice(pd.Timestamp("2022-06-14"), pd.Timestamp("2022-06-15")))
    torch.testing.assert_close(new["image"], old["image"])


def test_offset_read_from_product_metadata() -> None:
    xml = DATA / "esa_safe" / fx.SAFE_PRODUCT / "MTD_MSIL2A.xml"
    meta = read_product_metadata(xml)
    assert meta.baseline == "05.00" and str(meta.sensing_date) == "2018-07-04"
    assert meta.offsets["B4"] == -1000 and meta.offsets["B8A"] == -1000
    ds = Sentinel2SR(DATA / "esa_safe")
    # a 2018 acquisition: the date rule would say 0, the reprocessed product's metadata -1000
    assert ds.index["offset"].iloc[0] == (-1000.0,) * len(ds.bands)
    assert ds.index["offset_source"].iloc[0] == f"metadata {xml}"
    raw = Sentinel2SR(DATA / "esa_safe", offset=0)
    a, b = chip(ds, 4, 4, 8, 8), chip(raw, 4, 4, 8, 8)
    torch.testing.assert_close(a["image"], b["image"] - 1000)
    assert float(a["image"].min()) > 0


def test_another_products_metadata_above_an_undated_file_is_not_used(tmp_path: Path) -> None:
    """An MTD_MSIL2A.xml of a tile in Ireland four folders above an undated GeoTIFF in
    another place shifted its values by -1000, silently (the date check needs a date). The
    product's footprint must meet the file; where it does not, a warning names both."""
    from rasterio.warp import transform_bounds

    source = DATA / "multiband" / "S2_20220614_multiband.tif"
    field = tmp_path / "mtd" / "a" / "b" / "c" / "my_field.tif"
    field.parent.mkdir(parents=True)
    shutil.copy(source, field)
    with rasterio.open(field) as src:
        w, s, e, n = transform_bounds(src.crs, "EPSG:4326", *src.bounds)

    def mtd(lon0: float, lat0: float, lon1: float, lat1: float) -> None:
        ring = [(lat0, lon0), (lat1, lon0), (lat1, lon1), (lat0, lon1), (lat0, lon0)]
        footprint = (
            "<Product_Footprint><Product_Footprint><Global_Footprint><EXT_POS_LIST>"
            + " ".join(f"{lat} {lon}" for lat, lon in ring)
            + "</EXT_POS_LIST></Global_Footprint></Product_Footprint></Product_Footprint>"
            + "<PRODUCT_URI>S2A_MSIL2A_20221005T115411_N0400_R023_T29UNU.SAFE</PRODUCT_URI>"
        )
        text = fx._mtd_xml("2022-10-05T11:54:11.024Z", "04.00", -1000)
        (tmp_path / "mtd" / "MTD_MSIL2A.xml").write_text(
            text.replace("</Product_Info>", "</Product_Info>" + footprint, 1)
        )

    mtd(-8.0, 52.0, -6.5, 53.2)  # T29UNU, Ireland: not the file's place
    with pytest.warns(UserWarning) as said:
        ds = Sentinel2SR(field)
    told = [str(w.message) for w in said if "metadata of another product" in str(w.message)]
    assert told == [
        f"Sentinel2SR: {tmp_path / 'mtd' / 'MTD_MSIL2A.xml'} is the metadata of another product "
        f"(S2A_MSIL2A_20221005T115411_N0400_R023_T29UNU.SAFE): its footprint does not meet "
        f"{field}, so its offsets are not used for it; give offset= (-1000 for Sentinel-2 "
        "processing baseline 04.00 or later, 0 for corrected data) if the file needs one"
    ]
    assert ds.index["offset"].iloc[0] == Sentinel2SR(source).index["offset"].iloc[0]
    assert ds.index["offset_source"].iloc[0].startswith("none (")
    mtd(w - 0.5, s - 0.5, e + 0.5, n + 0.5)  # the file's own product: used
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = Sentinel2SR(field)
    assert ds.index["offset"].iloc[0] == (-1000.0,) * len(ds.bands)
    assert ds.index["offset_source"].iloc[0] == f"metadata {tmp_path / 'mtd' / 'MTD_MSIL2A.xml'}"
    # a tile across the antimeridian (longitudes 179.4 ... -179.6): as a plain polygon it ran
    # the other way round the globe and missed its own files; its footprint is not used
    from torchgeo_dofa.datasets import _footprint

    across = "-16.0 179.4 -16.0 -179.6 -17.0 -179.6 -17.0 179.4 -16.0 179.4"
    assert _footprint(across) is None
    inside = _footprint("-16.0 178.4 -16.0 179.4 -17.0 179.4 -17.0 178.4 -16.0 178.4")
    assert inside is not None and inside.bounds == (178.4, -17.0, 179.4, -16.0)


def test_a_safe_with_its_bands_converted_to_geotiff_in_place_reads_the_same(
    tmp_path: Path,
) -> None:
    """README "GPU": JPEG2000 bands rewritten as tiled ZSTD GeoTIFFs of the same names inside
    the ``.SAFE`` give the same bands, the offset from the product's metadata and pixels."""
    import shutil

    safe = shutil.copytree(DATA / "esa_safe", tmp_path / "esa_safe")
    jp2s = sorted(safe.rglob("*.jp2"))
    assert jp2s
    for jp2 in jp2s:
        with rasterio.open(jp2) as src:
            profile, data = src.profile, src.read()
        profile.update(driver="GTiff", compress="zstd", tiled=True, blockxsize=256, blockysize=256)
        with rasterio.open(jp2.with_suffix(".tif"), "w", **profile) as dst:
            dst.write(data)
        jp2.unlink()
    before, after = Sentinel2SR(DATA / "esa_safe"), Sentinel2SR(safe)
    assert after.bands == before.bands and after.res == before.res
    assert (
        after.index["offset"].iloc[0]
        == before.index["offset"].iloc[0]
        == (-1000.0,) * len(before.bands)
    )
    assert (
        after.index["offset_source"].iloc[0]
        == f"metadata {safe / fx.SAFE_PRODUCT / 'MTD_MSIL2A.xml'}"
    )
    x, y, _ = before.bounds
    for col, row in ((0, 0), (3, 5)):
        window = (
            slice(x.start + col * 10.0, x.start + (col + 16) * 10.0),
            slice(y.stop - (row + 16) * 10.0, y.stop - row * 10.0),
        )
        a, b = before[window], after[window]
        torch.testing.assert_close(b["image"], a["image"], rtol=0, atol=0)
        assert torch.equal(b["valid"], a["valid"])


def test_explicit_offset_and_earth_engine_offsets() -> None:
    ds = Sentinel2SR(DATA / "esa", offset=-500)
    assert set(ds.index["offset_source"]) == {"explicit"}
    assert all(o == (-500.0,) * 9 for o in ds.index["offset"])
    assert set(EarthEngineS2(DATA / "ee").index["offset"].iloc[0]) == {0.0}
    legacy = EarthEngineS2(DATA / "ee", collection="COPERNICUS/S2_SR")
    assert set(legacy.index["offset"].iloc[0]) == {-1000.0}  # dated 2022-06-14 in the prefix
    with pytest.raises(ValueError, match="offset"):
        Sentinel2SR(DATA / "esa", offset="yes")  # type: ignore[arg-type]
    # the offsets a file could not declare were taken from the user: a slipped sign (+1000
    # against -1000), 1e9 (every pixel clipped to 10000), -20000 (every pixel no data)
    for bad in (1000, 1e9, -20000, -1000.5, float("nan")):
        with pytest.raises(ValueError) as refused:
            Sentinel2SR(DATA / "esa", offset=bad)
        assert str(refused.value) == (
            f"offset={bad:g} cannot be an offset of reflectance x 10000: a whole number from "
            "-10000 to 0 is added to the digital numbers (-1000 removes the +1000 of "
            "Sentinel-2's processing baseline 04.00; 0 reads the values as they are)"
        )


def test_offset_never_applies_to_nodata() -> None:
    ds = Sentinel2SR(DATA / "nodata" / "swath_undeclared.tif", offset=-1000)
    sample = chip(ds, 0, 0, 64, 64)
    assert not bool(sample["valid"].all())
    assert bool((sample["image"][:, ~sample["valid"]] == 0).all())
    path = DATA / "nodata" / "swath_undeclared.tif"
    scene = SceneSpec([(path, i) for i in range(1, 7)], -1000.0)
    check_sample(sample["image"], sample["valid"], sample["bounds"], [scene])


def test_offset_declared_by_the_file_itself(tmp_path: Path) -> None:
    """A file's own GDAL scale / offset (value x 0.0001 - 0.1) or ESA BOA_ADD_OFFSET item
    was ignored: a file not named like ESA's kept its +1000 (offset_source 'none')."""
    rng = np.random.default_rng(3)
    refl = rng.integers(1, 5000, (2, 16, 16)).astype(np.uint16)  # reflectance x 10000
    t = Affine(10, 0, 500000, 0, -10, 5600000)
    base = Sentinel2SR(_write_tif(tmp_path / "base.tif", refl, t, "EPSG:32631"))
    expected = chip(base, 0, 0, 16, 16)["image"]

    def written(name: str, scales: Any = None, offsets: Any = None, tags: Any = None) -> Path:
        path = _write_tif(tmp_path / f"{name}.tif", refl + 1000, t, "EPSG:32631")
        with rasterio.open(path, "r+") as dst:
            if scales is not None:
                dst.scales, dst.offsets = scales, offsets
            for bidx, items in (tags or {}).items():
                dst.update_tags(bidx, **items) if bidx else dst.update_tags(**items)
        return path

    cases = {
        "gdal": ((1e-4, 1e-4), (-0.1, -0.1), None, "GDAL scale 0.0001 / offset -0.1 of"),
        "gdal_dn": ((1.0, 1.0), (-1000.0, -1000.0), None, "GDAL scale 1 / offset -1000 of"),
        # -0.1 stored as float32 (-1000.000015 digital numbers), a scale a rounding from 1
        "gdal_f32": ((1e-4, 1e-4), (float(np.float32(-0.1)),) * 2, None, "GDAL scale 0.0001"),
        "near_1": ((1.0000001, 1.0000001), (-1000.0, -1000.0), None, "/ offset -1000 of"),
        "tagged": (None, None, {0: {"BOA_ADD_OFFSET": "-1000"}}, "BOA_ADD_OFFSET -1000 in the"),
        "band_tags": (None, None, {1: {"boa_add_offset": "-1000"}, 2: {"BOA_ADD_OFFSET": "-1000"}},
                      "BOA_ADD_OFFSET -1000 in"),
    }  # fmt: skip
    for name, (scales, offsets, tags, how) in cases.items():
        ds = Sentinel2SR(written(name, scales, offsets, tags))
        assert ds.index["offset"].iloc[0] == (-1000.0, -1000.0), name
        assert how in ds.index["offset_source"].iloc[0], name
        torch.testing.assert_close(chip(ds, 0, 0, 16, 16)["image"], expected)
    undeclared = Sentinel2SR(written("undeclared"))  # the product name / date rules, as before
    assert undeclared.index["offset"].iloc[0] == (0.0, 0.0)
    # offset 0 beside a scale is GDAL's default, not a declaration: an ESA name's rule holds
    esa = "S2A_MSIL2A_20230601T103631_N0509_R008_T31UFQ_20230601T150152"
    named = written(esa, (1e-4, 1e-4), (0.0, 0.0), {0: {"BOA_ADD_OFFSET": ""}})
    assert Sentinel2SR(named).index["offset"].iloc[0] == (-1000.0, -1000.0)
    assert "N0509" in Sentinel2SR(named).index["offset_source"].iloc[0]
    torch.testing.assert_close(chip(Sentinel2SR(named), 0, 0, 16, 16)["image"], expected)
    for name, scales, offsets, tags, message in [
        ("uneven", (1e-4, 1e-4), (-0.1, 0.0), None, r"some bands \(B4: -1000\) but not for B8"),
        ("nan", None, None, {0: {"BOA_ADD_OFFSET": "nan"}}, r"an offset of nan for band 1"),
        ("up", None, None, {0: {"BOA_ADD_OFFSET": "1000"}}, r"an offset of 1000 for band 1"),
        ("units", None, None, {1: {"BOA_ADD_OFFSET": "-0.1"}, 2: {"BOA_ADD_OFFSET": "-0.1"}},
         r"BOA_ADD_OFFSET -0.1 in the metadata of .* gives an offset of -0.1 for band 1, which "
         r"cannot be one of reflectance x 10000"),
        ("word", None, None, {0: {"BOA_ADD_OFFSET": "abc"}}, r"of band 1 is 'abc', not a number"),
        ("gdal_up", (1.0, 1.0), (1000.0, 1000.0), None, r"offset 1000 of .* an offset of 1000"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=message + r".*pass offset= .*every scene"):
            Sentinel2SR(written(name, scales, offsets, tags))
    # what an offset cannot mend, and what cannot be told, is refused naming the fix
    landsat = written("landsat", (2.75e-5, 2.75e-5), (-0.2, -0.2))
    with pytest.raises(ValueError, match=r"declares GDAL scale 2\.75e-05 and offset -0\.2 for "
                       r"band 1 .* convert the file to reflectance x 10000"):  # fmt: skip
        Sentinel2SR(landsat)
    assert Sentinel2SR(landsat, offset=0).index["offset_source"].iloc[0] == "explicit"
    half = written("half", None, None, {1: {"BOA_ADD_OFFSET": "-1000"}})
    with pytest.raises(ValueError, match=r"declare an offset for some bands \(B4: -1000\) but "
                       r"not for B8: fix the files' metadata, or pass offset="):  # fmt: skip
        Sentinel2SR(half)


# ----------------------------------------------------------------------------- nodata and edges


def test_chip_past_the_raster_edge_is_invalid() -> None:
    ds = Sentinel2SR(DATA / "multiband")
    x, y, _ = ds.bounds
    sample = ds[x.stop - 8 * 10 : x.stop + 8 * 10, y.stop - 16 * 10 : y.stop]
    assert sample["image"].shape == (9, 16, 16)
    assert bool(sample["valid"][:, :8].all()) and not bool(sample["valid"][:, 8:].any())
    assert bool((sample["image"][:, :, 8:] == 0).all())
    assert bool((sample["image"][:, :, :8] > 0).all())


def test_undeclared_zero_nodata_is_invalid() -> None:
    ds = LAYOUTS["nodata_swath"].make()
    sample = chip(ds, 0, 0, 64, 64)
    rows, cols = np.mgrid[0:64, 0:64]
    np.testing.assert_array_equal(sample["valid"].numpy(), ~(rows > cols + 20))


def test_declared_and_explicit_nodata() -> None:
    path = DATA / "nodata" / "declared_65535.tif"
    ds = Sentinel2SR(path)
    sample = chip(ds, 0, 0, 64, 64)
    expected = np.ones((64, 64), dtype=bool)
    expected[10:20, 10:30] = False  # declared 65535
    expected[40:50, 0:10] = False  # undeclared 0
    np.testing.assert_array_equal(sample["valid"].numpy(), expected)
    assert float(sample["image"].max()) < 10000
    # an explicit nodata replaces the declared one (0 stays no data)
    override = Sentinel2SR(path, nodata=1)
    sample = chip(override, 0, 0, 64, 64)
    expected[10:20, 10:30] = True
    np.testing.assert_array_equal(sample["valid"].numpy(), expected)
    assert float(sample["image"][:, 15, 15].min()) == 65535


def test_nan_is_invalid(tmp_path: Path) -> None:
    data = np.full((2, 8, 8), 1500.0, dtype=np.float32)
    data[:, 2, 3] = np.nan
    data[1, 5, 5] = np.nan
    path = tmp_path / "float_export.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=8,
        height=8,
        count=2,
        dtype="float32",
        crs="EPSG:32631",
        transform=from_origin(500000, 5600000, 10, 10),
    ) as dst:
        dst.write(data)
        dst.descriptions = ("B4", "B8")
    sample = chip(Sentinel2SR(path), 0, 0, 8, 8)
    expected = np.ones((8, 8), dtype=bool)
    expected[2, 3] = expected[5, 5] = False
    np.testing.assert_array_equal(sample["valid"].numpy(), expected)
    assert not torch.isnan(sample["image"]).any()


def test_default_bands_leave_out_bands_without_statistics(tmp_path: Path) -> None:
    """An Earth Search download with ``nir08`` (B8A) but not ``nir`` (B8): the default bands
    are the shared ones DOFA can normalise, so the default dataset embeds (B8A used to be
    chosen and then refused by the normalisation)."""
    path = tmp_path / "b8a.tif"
    with rasterio.open(
        path, "w", driver="GTiff", width=8, height=8, count=4, dtype="uint16",
        crs="EPSG:32631", transform=from_origin(500000, 5600000, 10, 10),
    ) as dst:  # fmt: skip
        dst.write(np.full((4, 8, 8), 1500, dtype=np.uint16))
        dst.descriptions = ("B02", "B03", "B04", "B8A")
    with pytest.warns(UserWarning, match=r"\['B8A'\] left out of the default bands"):
        ds = Sentinel2SR(path, transforms=DOFAPreprocess(bands=["B2", "B3", "B4"]))
    assert ds.bands == ("B2", "B3", "B4")
    assert chip(ds, 0, 0, 8, 8)["image"].shape == (3, 224, 224)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Sentinel2SR(path, bands=["B8A", "B4"]).bands == ("B8A", "B4")  # asked for
    only = tmp_path / "only_b8a.tif"
    with (
        rasterio.open(path) as src,
        rasterio.open(only, "w", **(src.profile | {"count": 1})) as dst,
    ):
        dst.write(src.read(4), 1)
        dst.descriptions = ("B8A",)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Sentinel2SR(only).bands == ("B8A",)  # nothing else to read: kept, no warning


def _write_tif(path: Path, data: np.ndarray, transform: Affine, crs: str | None) -> Path:
    with rasterio.open(
        path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1],
        count=data.shape[0], dtype=data.dtype, crs=crs, transform=transform,
    ) as dst:  # fmt: skip
        dst.write(data)
        dst.descriptions = ("B4", "B8")[: data.shape[0]]
    return path


def _described_tif(path: Path, descriptions: Sequence[str], x0: float = 500000) -> Path:
    data = np.full((len(descriptions), 16, 16), 1500, dtype=np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(
        path, "w", driver="GTiff", width=16, height=16, count=len(descriptions),
        dtype="uint16", crs="EPSG:32631", transform=Affine(10, 0, x0, 0, -10, 5600000),
    ) as dst:  # fmt: skip
        dst.write(data)
        dst.descriptions = tuple(descriptions)
    return path


def _alpha_tif(
    path: Path, descriptions: Sequence[str], nodata: float | None = None, opaque: int = 255
) -> Path:
    """A 64 x 64 uint16 file of 1500s whose last band is GDAL's alpha (``gdalwarp
    -dstalpha`` writes one after any number of bands, ``opaque`` 255, or 65535 for a uint16
    warp): its left 24 columns are transparent (alpha 0) over bright, non-zero values (a
    cloud the alpha masks, a resampled edge), so only the alpha band says they hold no data."""
    count = len(descriptions) + 1
    data = np.full((count, 64, 64), 1500, dtype=np.uint16)
    data[:-1, :, :24] = 3000
    data[-1] = opaque
    data[-1, :, :24] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(
        path, "w", driver="GTiff", width=64, height=64, count=count, dtype="uint16",
        crs="EPSG:32631", transform=Affine(10, 0, 500000, 0, -10, 5600000), nodata=nodata,
    ) as dst:  # fmt: skip
        dst.write(data)
        dst.descriptions = (*descriptions, "")
    with rasterio.open(path, "r+") as dst:  # GeoTIFF keeps an alpha set on an open file
        dst.colorinterp = (
            [ColorInterp.gray] + [ColorInterp.undefined] * (count - 2) + [ColorInterp.alpha]
        )
    return path


class _ZeroIsData(Sentinel2SR):
    zero_is_nodata = False


def _check_alpha_mask(ds: Sentinel2SR, cols: int = 64) -> None:
    """The sample of ``ds``'s whole extent is valid exactly where the file (EPSG:32631,
    origin 500000, 5600000, 10 m, 64 rows) is opaque, its values the opaque ones (1500).

    An independent account: each sample pixel's centre, taken back to the file's columns
    (the transparent ones are 0-23), away from the edges a warp or resampling may move."""
    sample = ds.read_chip(ds.bounds)
    image = sample["image"].numpy()
    height, width = image.shape[-2:]
    valid = sample["valid"].numpy().reshape(height, width)
    (xres, yres), (x, y, _) = ds.res, ds.bounds
    xs = float(x.start) + (np.arange(width) + 0.5) * xres
    ys = float(y.stop) - (np.arange(height) + 0.5) * yres
    grid_x, grid_y = np.meshgrid(xs, ys)
    fx, fy = rasterio.warp.transform(ds.crs.to_wkt(), "EPSG:32631", grid_x.ravel(), grid_y.ravel())
    col = ((np.asarray(fx) - 500000) / 10).reshape(valid.shape)
    row = ((5600000 - np.asarray(fy)) / 10).reshape(valid.shape)
    opaque = (col >= 24) & (col < cols) & (row >= 0) & (row < 64)
    # not the pixels a warp or a resampling may move across an edge
    clear = (np.abs(col - 24) > 1.5) & (np.abs(col - cols) > 1.5)
    clear &= (np.abs(row) > 1.5) & (np.abs(row - 64) > 1.5)
    assert opaque[clear].any() and (~opaque[clear]).any()
    assert (valid[clear] == opaque[clear]).all()
    assert (image[:, ~valid] == 0).all()  # the fill value
    assert (image[:, valid] == 1500).all()  # nothing of the transparent pixels, blended or not


@pytest.mark.parametrize(
    ("how", "kwargs"),
    [
        ("on the file's grid (one windowed read)", {}),
        ("at another resolution (rasterio.merge)", {"res": 20}),
        ("warped to another CRS (a WarpedVRT)", {"crs": "EPSG:32632"}),
        ("resampled bilinear (a WarpedVRT)", {"res": 15, "resampling": "bilinear"}),
    ],
)
@pytest.mark.parametrize("count", [5, 3])
def test_an_alpha_band_masks_the_pixels_it_makes_transparent(
    tmp_path: Path, how: str, kwargs: dict[str, Any], count: int
) -> None:
    """GDAL masks by an alpha band in 2- and 4-band files only: the transparent pixels of
    a file of 5 bands + alpha (``gdalwarp -dstalpha`` of a Sentinel-2 stack) were read as
    data (valid_fraction 1.0, the bright values embedded) on every read path, and warping
    such a file without a nodata value stopped with rasterio's "The VRT already has an
    alpha band". A 3 + alpha file is RGBA to GDAL: its mask came from GDAL already.
    helper-115: a declared nodata equal to the alpha's opaque value (65535 in a uint16
    warp) made every pixel no data, and a bilinear resampling blended the transparent
    values into the pixels beside them."""
    names = ["B2", "B3", "B4", "B8", "B11"][:count]
    files = [
        (_alpha_tif(tmp_path / "plain.tif", names), (Sentinel2SR, _ZeroIsData)),
        (_alpha_tif(tmp_path / "n0.tif", names, nodata=0), (Sentinel2SR, _ZeroIsData)),
        (_alpha_tif(tmp_path / "n65535.tif", names, 65535, opaque=65535), (Sentinel2SR,)),
    ]
    for path, classes in files:
        for cls in classes:
            if cls is _ZeroIsData and path.name == "plain.tif" and "resampling" in kwargs:
                continue  # 0 is data, and no nodata: GDAL's warp blends the edge with 0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # smaller than a chip
                ds = cls(path, offset=0, **kwargs)
            assert ds.bands == tuple(names), how
            try:
                _check_alpha_mask(ds)
            except AssertionError as err:
                raise AssertionError(f"{cls.__name__}, {path.name}, {how}") from err


@pytest.mark.parametrize("nodata", [None, 0, 255])
def test_an_alpha_mask_takes_the_pixels_its_bands_take_at_any_resolution(
    tmp_path: Path, nodata: float | None
) -> None:
    """helper-116: at another resolution the bands went through rasterio.merge and the
    alpha through a boundless read of the whole chip, which sample other source pixels in
    chips at the raster's edge: transparent values were embedded as data (64 of 128 valid
    pixels) and opaque ones masked. The alpha is read as the bands are; a nodata of 0 or
    of the opaque value (255) masks the alpha band too, and is told apart."""
    data = np.full((6, 64, 64), 1500, np.uint16)
    data[:5, :, 0::2] = 3000  # every other column transparent over bright values
    data[5] = 255
    data[5, :, 0::2] = 0
    for name in ("stripes.tif", "plain.tif"):
        with rasterio.open(
            tmp_path / name, "w", driver="GTiff", width=64, height=64, count=6,
            dtype="uint16", crs="EPSG:32631", transform=Affine(10, 0, 500000, 0, -10, 5600000),
            nodata=nodata,
        ) as dst:  # fmt: skip
            dst.write(data)
            dst.descriptions = ("B2", "B3", "B4", "B8", "B11", "")
    with rasterio.open(tmp_path / "stripes.tif", "r+") as dst:  # plain.tif: no alpha
        dst.colorinterp = [ColorInterp.gray] + [ColorInterp.undefined] * 4 + [ColorInterp.alpha]
    for res in (10, 20, 30):
        ds = Sentinel2SR(tmp_path / "stripes.tif", offset=0, res=res)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # plain.tif's untitled 6th band
            plain = Sentinel2SR(tmp_path / "plain.tif", offset=0, res=res)
        x, y, t = ds.bounds
        for shift in (0, 5, 10, 15, 20, 30):  # chips starting `shift` m left of the raster
            chip = (
                slice(x.start - shift, x.start - shift + 16 * res, res),
                slice(y.stop - 16 * res, y.stop, res),
                t,
            )
            sample = ds.read_chip(chip)
            image, valid = sample["image"].numpy(), sample["valid"].numpy().reshape(16, 16)
            # valid exactly where the pixel read is an opaque one (1500), as the same read
            # of the file without its alpha band shows (which source pixel each chip pixel
            # takes is rasterio's merge's choice)
            sampled = plain.read_chip(chip)["image"].numpy()[0]
            assert (valid == (sampled == 1500)).all(), (res, shift)
            assert (image[:, valid] == 1500).all(), (res, shift)
            assert valid.any() or res == 20, (
                res,
                shift,
            )  # at 20 m a chip can take transparent columns only


def test_band_files_with_an_alpha_band_are_band_files(tmp_path: Path) -> None:
    """helper-115: ``gdalwarp -dstalpha`` of a scene's ``*_B04_10m.tif`` writes two bands,
    the band and its alpha: such band files were refused as multi-band files without band
    descriptions. They are band files, their alpha a mask."""
    scene = tmp_path / "scene"
    for band in ("B02", "B03", "B04", "B08"):
        _alpha_tif(scene / f"T31UFQ_20220614T103629_{band}_10m.tif", [""])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ds = Sentinel2SR(scene, offset=0)
    assert set(ds.bands) == {"B2", "B3", "B4", "B8"}
    _check_alpha_mask(ds)


def test_an_undescribed_stack_with_an_alpha_band_is_named_without_it(tmp_path: Path) -> None:
    """helper-115: an undescribed 5-band + alpha file (``gdalwarp -dstalpha`` of a stack
    without band descriptions) took bands= of 6 names only, and the refusal never said
    the sixth was GDAL's alpha band. bands= of the other 5 names them; the alpha masks."""
    path = _alpha_tif(tmp_path / "stack.tif", [""] * 5)
    with pytest.raises(BandError) as refused:
        Sentinel2SR(path)
    assert str(refused.value) == (
        f"{path} has 6 bands and no band descriptions, so its band names are unknown: band 6 "
        "is GDAL's alpha band, read as a mask: name the other 5 in file order with "
        "bands=[...], or all 6 with file_bands=[B1, B2, B3, ...] giving the alpha its "
        "placeholder band6"
    )
    names = ["B2", "B3", "B4", "B8", "B11"]
    for kwargs in ({"bands": names}, {"file_bands": [*names, "band6"], "bands": names}):
        ds = Sentinel2SR(path, offset=0, **kwargs)  # type: ignore[arg-type]
        assert ds.bands == tuple(names)
        _check_alpha_mask(ds)


def test_pixels_that_are_not_square_are_warned_of(tmp_path: Path) -> None:
    """note34 (helper-112): a file of 10 x 20 m pixels was read on its own grid without a
    word: a 224 x 224-pixel chip covered 2240 x 4480 m, which DOFA (trained on square
    pixels) saw squashed 2x. Warned, naming res= for square pixels; res= given, or pixels
    square to 1 % (a warp's 9.99 x 10), say nothing."""
    data = np.random.default_rng(0).integers(500, 3000, (4, 64, 64)).astype(np.uint16)
    for name, xres, yres in (
        ("oblong.tif", 10, 20.0),
        ("warped.tif", 10, 10.05),
        ("mixed/a20.tif", 20, 20),  # a square file beside an oblong one: the oblong named
        ("mixed/b.tif", 10, 20),
    ):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        with rasterio.open(
            tmp_path / name, "w", driver="GTiff", width=64, height=64, count=4,
            dtype="uint16", crs="EPSG:32631", transform=Affine(xres, 0, 500000, 0, -yres, 5600000),
        ) as dst:  # fmt: skip
            dst.write(data)
            dst.descriptions = ("B4", "B3", "B2", "B8")
    with pytest.warns(UserWarning, match=r"^Sentinel2SR: the pixels are 10 x 20 \(x by y, CRS "
                      r"units; b.tif \.\.\.\), not square"):  # fmt: skip
        Sentinel2SR(tmp_path / "mixed", offset=0)
    with pytest.warns(UserWarning) as said:
        ds = Sentinel2SR(tmp_path / "oblong.tif", offset=0)
    assert ds.res == (10.0, 20.0)
    assert [str(w.message) for w in said if "square" in str(w.message)] == [
        "Sentinel2SR: the pixels are 10 x 20 (x by y, CRS units; oblong.tif ...), not square: "
        "a chip of N x N pixels covers a ground area stretched by 2x, and DOFA, trained on "
        "square pixels, sees the scene so; give res=10 to read square pixels"
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Sentinel2SR(tmp_path / "oblong.tif", offset=0, res=10).res == (10.0, 10.0)
        Sentinel2SR(tmp_path / "warped.tif", offset=0)


def test_inputs_naming_one_raster_twice_are_warned_of_and_alpha_band_files_are_one_scene(
    tmp_path: Path,
) -> None:
    """note34 (helper-112): ``embed scenes/ scenes/a.tif`` embedded a.tif twice, into two
    outputs, without a word. A raster in two inputs is warned of; the same folder given
    twice is one region. Band files with an alpha band (``gdalwarp -dstalpha`` of each
    ``*_B04_10m.tif``) given as files were a region each (one band): one scene's region."""
    scene = tmp_path / "scene"
    for band in ("B02", "B03", "B04", "B08"):
        _alpha_tif(scene / f"T31UFQ_20220614T103629_{band}_10m.tif", [""])
    files = sorted(scene.glob("*.tif"))
    (region,) = find_raster_inputs(files)
    assert sorted(region.paths) == [str(f) for f in files]
    with pytest.warns(UserWarning) as said:
        regions = find_raster_inputs([scene, files[0]])
    assert len(regions) == 2
    assert [str(w.message) for w in said] == [
        f"{files[0]} (also in {str(scene)!r}): a raster in two of the inputs is embedded in "
        "each (each input is a region with outputs of its own: a folder and a file inside it, "
        "or two paths to one file, embed it twice); give one of them"
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(find_raster_inputs([scene, f"{scene}/"])) == 1


def test_bands_left_out_of_the_default_choice_are_named(tmp_path: Path) -> None:
    """A band without description in a described file, or a band one tile of a mosaic
    lacks, was dropped for the whole dataset without a word; descriptions like 'B4 (Red)'
    were refused with advice (bands=) that could not work, never naming file_bands=."""
    one = _described_tif(tmp_path / "one" / "gap.tif", ["B4", "", "B2", "B8"])
    with pytest.warns(UserWarning, match=r"gap.tif: band\(s\) 'band2' left out, as their "
                      r"descriptions are empty or not band names: .* file_bands="):  # fmt: skip
        assert Sentinel2SR(one).bands == ("B2", "B4", "B8")
    words = _described_tif(tmp_path / "words" / "green.tif", ["B4", "B3 (Green)", "B2"])
    with pytest.warns(UserWarning, match=r"green.tif: band\(s\) 'B3 \(Green\)' left out"):
        assert Sentinel2SR(words).bands == ("B2", "B4")
    alpha = _described_tif(tmp_path / "alpha" / "warped.tif", ["B4", "B3", "B2", ""])
    with rasterio.open(alpha, "r+") as dst:  # gdalwarp -dstalpha: not a spectral band
        dst.colorinterp = [ColorInterp.gray] * 3 + [ColorInterp.alpha]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Sentinel2SR(alpha).bands == ("B2", "B3", "B4")
    stack = _described_tif(
        tmp_path / "ee" / "stack.tif", ["B4", "B2", "B4_1", "B2_1", "QA60", "B4_2", "B2_2"]
    )
    # Earth Engine's later dates are named (helper-135: a monthly stack embedded its first
    # month without a word), its QA band is not (no reflectance to embed)
    with pytest.warns(UserWarning) as caught:
        assert Sentinel2SR(stack).bands == ("B2", "B4")
    assert [str(w.message) for w in caught] == [
        "Sentinel2SR: stack.tif holds 2 later date(s) of its bands (B4_1 ... B2_2), which the "
        "default bands ['B2', 'B4'], the first date's, leave out: DOFA embeds one date at a "
        "time; select another by its band names, e.g. bands=[B4_1, B2_1]"
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a date selected: nothing left out unsaid
        assert Sentinel2SR(stack, bands=["B4_2", "B2_2"]).bands == ("B4_2", "B2_2")
    for i in range(3):  # several such files: one warning, not one each
        _described_tif(tmp_path / "many" / f"t{i}.tif", ["B4", "", "B2"], x0=500000 + 160 * i)
    with pytest.warns(UserWarning) as caught:
        Sentinel2SR(tmp_path / "many")
    assert [str(w.message).count("left out") for w in caught] == [1]
    assert re.search(r"t0.tif: band\(s\) 'band2'; .*t1.tif: band\(s\) 'band2'; .*t2.tif: "
                     r"band\(s\) 'band2' left out", str(caught[0].message))  # fmt: skip
    (tmp_path / "tiles").mkdir()
    _described_tif(tmp_path / "tiles" / "a.tif", ["B4", "B3", "B2", "B8", "B11", "B12"])
    _described_tif(tmp_path / "tiles" / "b.tif", ["B4", "B3", "B2"], x0=500160)
    with pytest.warns(UserWarning, match=r"band\(s\) \['B8', 'B11', 'B12'\] left out of the "
                      r"default bands, as not every scene has them \(.*b.tif lacks B8, B11, "
                      r"B12\)"):  # fmt: skip
        assert Sentinel2SR(tmp_path / "tiles").bands == ("B2", "B3", "B4")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for: no warning
        assert Sentinel2SR(tmp_path / "tiles", bands=["B4", "B3"]).bands == ("B4", "B3")
    # a tile describing B3 in words has B3: one warning (its description), not also "lacks B3"
    _described_tif(tmp_path / "worded" / "a.tif", ["B4", "B3", "B2"])
    _described_tif(tmp_path / "worded" / "b.tif", ["B4", "B3 (Green)", "B2"], x0=500160)
    with pytest.warns(UserWarning) as caught:
        assert Sentinel2SR(tmp_path / "worded").bands == ("B2", "B4")
    assert len(caught) == 1 and "b.tif: band(s) 'B3 (Green)' left out" in str(caught[0].message)
    odd = _described_tif(tmp_path / "odd.tif", ["B4 (Red)", "B3 (Green)"])
    with pytest.raises(BandError, match=r"name every band in file order with file_bands="):
        Sentinel2SR(odd)
    with pytest.raises(BandError, match=r"not found in .*odd.tif .* \(file_bands=\[\.\.\.\] "
                       r"renames a file's bands"):  # fmt: skip
        Sentinel2SR(odd, bands=["B4", "B3"])
    with pytest.warns(UserWarning, match=r"file_bands=\['B4', 'B3'\] replace the file's band"):
        assert Sentinel2SR(odd, file_bands=["B4", "B3"]).bands == ("B3", "B4")


def test_crs_names_and_comparisons() -> None:
    """CRS text that names no other CRS; CRSs compared as CRSs, local ones also by name."""
    tmerc = "+proj=tmerc +lon_0=15 +k=0.9996 +x_0=500000 +ellps=GRS80 +units=m"
    assert exact_epsg(tmerc) is None and CRS.from_user_input(tmerc).to_epsg() == 25833
    assert crs_label(tmerc) == "+proj=utm +zone=33 +ellps=GRS80 +units=m +no_defs"
    assert crs_name(CRS.from_epsg(32633).to_wkt("WKT1_ESRI")) == "EPSG:32633"
    assert crs_label("EPSG:32633+5773") == "EPSG:32633+5773"  # not UTM 33N's PROJ string
    site, other = (f'LOCAL_CS["{n}",UNIT["metre",1]]' for n in ("site", "other"))
    assert crs_label(site) == "Engineering CRS 'site'"
    assert same_crs(CRS.from_epsg(32633).to_wkt("WKT1_ESRI"), "EPSG:32633")
    assert same_crs("EPSG:4326", "OGC:CRS84") and same_crs(None, None)
    assert not same_crs(tmerc, "EPSG:25833") and not same_crs("EPSG:32633", None)
    assert not same_crs(site, other) and not same_crs(CRS(site), CRS(other))
    assert not same_crs("garbage", "garbage ") and same_crs(site, CRS(site))


def test_south_up_and_rotated_rasters_are_placed_on_the_map(tmp_path: Path) -> None:
    """Files whose geotransform is not north-up are read through GDAL's warper: a south-up
    copy gives the north-up file's pixels, a rotated one the pixels an inverse-affine lookup
    gives (they were all no-data, or read as if unrotated)."""
    rng = np.random.default_rng(0)
    data = rng.integers(1, 5000, (2, 40, 40)).astype(np.uint16)
    north = Affine(10, 0, 500000, 0, -10, 5600000)
    plain = Sentinel2SR(_write_tif(tmp_path / "north.tif", data, north, "EPSG:32631"))
    south = Affine(10, 0, 500000, 0, 10, 5600000 - 400)  # row 0 is the southern edge
    flipped = Sentinel2SR(_write_tif(tmp_path / "south.tif", data[:, ::-1], south, "EPSG:32631"))
    assert flipped.bounds[:2] == plain.bounds[:2]
    torch.testing.assert_close(chip(flipped, 0, 0, 40, 40), chip(plain, 0, 0, 40, 40))
    # mirrored east-west, and rotated by 180 degrees: GDAL's suggested grid kept the negative
    # pixel width, and every pixel was read as no-data (an all-NaN grid, exit 0)
    mirrored_t = Affine(-10, 0, 500000 + 400, 0, -10, 5600000)  # column 0 is the eastern edge
    turned_t = Affine(-10, 0, 500000 + 400, 0, 10, 5600000 - 400)  # column 0 east, row 0 south
    assert turned_t.almost_equals(Affine.translation(500000 + 400, 5600000 - 400) @ (
        Affine.rotation(180) @ Affine.scale(10, -10)))  # fmt: skip
    for name, t, pixels in [
        ("mirrored", mirrored_t, data[:, :, ::-1]),
        ("turned", turned_t, data[:, ::-1, ::-1]),
    ]:
        other = Sentinel2SR(_write_tif(tmp_path / f"{name}.tif", pixels.copy(), t, "EPSG:32631"))
        assert other.bounds[:2] == plain.bounds[:2], name
        assert other.res == plain.res, name
        torch.testing.assert_close(chip(other, 0, 0, 40, 40), chip(plain, 0, 0, 40, 40))

    rotated_t = north @ Affine.rotation(10)
    rotated = Sentinel2SR(_write_tif(tmp_path / "rotated.tif", data, rotated_t, "EPSG:32631"))
    assert rotated.res == pytest.approx((10, 10), rel=1e-6)  # the pixel size, not cos(10) x 10
    x, y, _ = rotated.bounds
    w, h = round((x.stop - x.start) / 10), round((y.stop - y.start) / 10)
    sample = chip(rotated, 0, 0, w, h)
    t = Affine(*sample["transform"][:6].tolist())
    rows, cols = np.mgrid[0:h, 0:w]
    px, py = t @ (cols + 0.5, rows + 0.5)
    src_col, src_row = ~rotated_t @ (px, py)
    src_col, src_row = np.floor(src_col).astype(int), np.floor(src_row).astype(int)
    inside = (src_col >= 0) & (src_col < 40) & (src_row >= 0) & (src_row < 40)
    expected = np.zeros((2, h, w), dtype=np.float32)
    expected[:, inside] = data[:, src_row[inside], src_col[inside]]
    image, valid = sample["image"].numpy(), sample["valid"].numpy()
    assert abs(int(valid.sum()) - int(inside.sum())) <= 0.02 * inside.sum()
    both = valid & inside
    agree = (image[:, both] == expected[:, both]).all(axis=0).mean()
    assert agree > 0.98, agree  # nearest neighbour: only pixels on a cell edge may differ


def test_files_without_georeferencing_are_refused(tmp_path: Path) -> None:
    data = np.full((2, 8, 8), 1500, dtype=np.uint16)
    path = _write_tif(tmp_path / "nogeo.tif", data, Affine.identity(), None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rasterio's NotGeoreferencedWarning is not shown
        with pytest.raises(ValueError, match="not georeferenced.*gdal_translate -a_srs"):
            Sentinel2SR(path, crs="EPSG:32631")
        with pytest.raises(InputError, match="nogeo.tif is not georeferenced"):
            find_raster_inputs([path])
    # a CRS without geotransform: GDAL's identity transform put it at the CRS's origin
    crs_only = _write_tif(tmp_path / "crs_only.tif", data, Affine.identity(), "EPSG:32631")
    for refuse in (lambda: Sentinel2SR(crs_only), lambda: find_raster_inputs([crs_only])):
        with pytest.raises((ValueError, InputError), match=r"crs_only.tif has a CRS but no geo"):
            refuse()
    # a geotransform without CRS is placed by crs=
    nocrs = _write_tif(tmp_path / "nocrs.tif", data, Affine(10, 0, 500000, 0, -10, 5600000), None)
    assert Sentinel2SR(nocrs, crs="EPSG:32631").bounds[0].start == 500000


def test_per_band_files_given_as_files_are_one_region_per_scene(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``embed scene/*_B0?.tif`` made one region per band file: four single-band embeddings
    of one scene, exit 0, while its folder (and the API, given the same files) read one
    scene of four bands. Band files of one scene, ESA's R10m / R20m folders and an SCL file
    among them included, are one region named for the scene; another scene's, a multi-band
    file and Earth Engine export tiles stay as they were."""
    profile = {
        "driver": "GTiff", "width": 32, "height": 32, "count": 1, "dtype": "uint16",
        "crs": "EPSG:32633", "transform": Affine(10, 0, 500000, 0, -10, 5600000),
    }  # fmt: skip

    def band_file(path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(np.full((1, 32, 32), 1500, dtype=np.uint16))
        return str(path)

    granule = tmp_path / "L2A_T33UXP" / "IMG_DATA"
    scene = [
        band_file(granule / "R10m" / f"T33UXP_20210601T100559_{b}_10m.tif")
        for b in ("B02", "B03", "B04", "B08")
    ]
    scene.append(band_file(granule / "R20m" / "T33UXP_20210601T100559_B11_20m.tif"))
    scene.append(band_file(granule / "R20m" / "T33UXP_20210601T100559_SCL_20m.tif"))
    other = [band_file(tmp_path / "other" / f"T33UXP_20210611T100559_{b}.tif") for b in ("B02",)]
    multi = _write_tif(tmp_path / "multi.tif", np.full((2, 8, 8), 1500, np.uint16),
                       Affine(10, 0, 500000, 0, -10, 5600000), "EPSG:32633")  # fmt: skip
    regions = find_raster_inputs([*scene, *other, multi])
    assert [(r.name, r.paths) for r in regions] == [
        ("T33UXP_20210601T100559", tuple(scene)),
        ("T33UXP_20210611T100559", tuple(other)),
        ("multi", (str(multi),)),
    ]
    # one scene however its files are spelt (relative, absolute, through a link): it was
    # split into scenes sharing no band
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link").symlink_to(granule / "R10m")
    spellings = [
        os.path.relpath(scene[0]),
        scene[1],
        str(tmp_path / "link" / os.path.basename(scene[2])),
    ]
    (spelt,) = find_raster_inputs(spellings)
    assert spelt.name == "T33UXP_20210601T100559"
    assert list(spelt.open().bands) == ["B2", "B3", "B4"]
    (folder,) = find_raster_inputs([granule])
    ds, given = folder.open(), regions[0].open()
    assert list(given.bands) == list(ds.bands) == ["B2", "B3", "B4", "B8", "B11"]  # SCL skipped
    assert given.index["sources"].tolist() == ds.index["sources"].tolist()
    # an Earth Search item folder's files (``item/red.tif``): the item folder names the scene
    item = [band_file(tmp_path / "S2B_33UXP_20210601_0_L2A" / f"{b}.tif") for b in ("red", "nir")]
    (region,) = find_raster_inputs(item)
    assert (region.name, region.paths) == ("S2B_33UXP_20210601_0_L2A", tuple(item))


def test_a_region_mixing_crss_is_read_in_the_crs_given(tmp_path: Path) -> None:
    data = np.full((2, 8, 8), 1500, dtype=np.uint16)
    folder = tmp_path / "mixed"
    folder.mkdir()
    _write_tif(folder / "a.tif", data, Affine(10, 0, 500000, 0, -10, 5600000), "EPSG:32631")
    _write_tif(folder / "b.tif", data, Affine(10, 0, 300000, 0, -10, 5600000), "EPSG:32632")
    for name in ("c.tif", "d.tif"):
        _write_tif(folder / name, data, Affine(10, 0, 500000, 0, -10, 5600000), "EPSG:32631")
    with pytest.raises(InputError) as refused:
        find_raster_inputs([folder])
    # grouped per CRS, a few names each (it listed every file: 24 for two BigEarthNet patches)
    assert str(refused.value).startswith(
        "mixed CRS in region 'mixed' (EPSG:32631: 3 files (a.tif, c.tif, ...); EPSG:32632: 1 "
        "file (b.tif)): read them in one CRS, crs=EPSG:<code>"
    )
    (region,) = find_raster_inputs([folder], crs="EPSG:32631")
    assert RIO_CRS.from_wkt(region.crs) == RIO_CRS.from_epsg(32631)
    assert region.bounds is not None
    assert region.bounds[0] == 500000 and region.bounds[2] > 500080  # b.tif lies east of a.tif
    ds = region.open(crs="EPSG:32631")
    assert ds.bounds[0].stop == pytest.approx(region.bounds[2], abs=20)
    # the pixel size is that of the files already in the CRS, so they are read as they are:
    # GDAL's grid for a warped file finer by rounding (9.99 m for this 10 m one in UTM 32
    # at 200 km east, read in UTM 31) set it, and their chips fell off their own pixels
    # (helper-135: cells of 159.85 m)
    lattice = tmp_path / "lattice"
    lattice.mkdir()
    _write_tif(lattice / "a.tif", data, Affine(10, 0, 500000, 0, -10, 5600000), "EPSG:32631")
    _write_tif(lattice / "b.tif", data, Affine(10, 0, 200000, 0, -10, 5600000), "EPSG:32632")
    assert tuple(Sentinel2SR(lattice, crs="EPSG:32631").res) == (10.0, 10.0)


# ----------------------------------------------------------------------------- batching


def test_mixed_wavelengths_in_a_batch_are_a_clear_error() -> None:
    a = chip(Sentinel2SR(DATA / "multiband"), 0, 0, 8, 8)
    b = chip(Sentinel2SR(DATA / "multiband", bands=["B4", "B3", "B2"]), 0, 0, 8, 8)
    with pytest.raises(MixedBandSetError, match="BandSetBatchSampler") as err:
        stack_dofa_samples([a, a, b])
    assert "sample 2" in str(err.value) and "one band set per dataset" in str(err.value)
    c = chip(Sentinel2SR(DATA / "multiband", bands=["B4", "B3", "B8"]), 0, 0, 8, 8)
    with pytest.raises(MixedBandSetError):
        stack_dofa_samples([b, c])  # same length, other wavelengths
    with pytest.raises(ValueError, match="differ in size"):
        stack_dofa_samples([a, chip(Sentinel2SR(DATA / "multiband"), 0, 0, 8, 4)])
    batch = stack_dofa_samples([a, a])
    assert batch["image"].shape == (2, 9, 8, 8) and batch["wavelengths"].shape == (2, 9)
    # helper-113: a sample without 'valid' gave a batch whose one 'valid' row masked both
    # chips (the embedder applied chip 0's no-data to chip 1); one without 'empty' an
    # IndexError in predict_step
    unmasked = {k: v for k, v in a.items() if k != "valid"}
    for first, second, said in (
        (a, unmasked, r"sample 1 lacks 'valid' \(sample 0 holds 'bounds', .*'valid'"),
        (unmasked, a, r"sample 1 also holds 'valid' \("),
        (a, dict(a, empty=torch.tensor(False)), r"sample 1 also holds 'empty' \("),
    ):
        with pytest.raises(ValueError, match=said):
            stack_dofa_samples([first, second])


def test_band_set_batch_sampler_over_geodatasets() -> None:
    datasets = [
        Sentinel2SR(DATA / "multiband"),  # DOFA 9
        Sentinel2SR(DATA / "nodesc", bands=list(fx.NODESC_BANDS)),  # 4 bands
        Sentinel2SR(DATA / "esa", offset=0),  # DOFA 9 again: shares batches with the first
    ]
    samplers = [GriddedPatchSampler(d, size=16, stride=16) for d in datasets]
    naive = DataLoader(
        DatasetCollection(datasets),
        batch_sampler=[[(0, next(iter(samplers[0]))), (1, next(iter(samplers[1])))]],
        collate_fn=stack_dofa_samples,
    )
    with pytest.raises(MixedBandSetError):
        next(iter(naive))
    for shuffle in (False, True):
        batch_sampler = BandSetBatchSampler(
            datasets, 5, samplers=samplers, shuffle=shuffle, generator=1
        )
        assert len(batch_sampler.groups) == 2
        indices = [i for batch in batch_sampler for i in batch]
        assert sorted(n for n, _ in indices) == sorted(
            n for n, s in enumerate(samplers) for _ in range(len(s))
        )
        for batch in batch_sampler:
            assert len({datasets[n].band_set for n, _ in batch}) == 1
        loader = DataLoader(
            DatasetCollection(datasets), batch_sampler=batch_sampler, collate_fn=stack_dofa_samples
        )
        total = 0
        for batch in loader:
            assert (batch["wavelengths"] == batch["wavelengths"][0]).all()
            total += batch["image"].shape[0]
        assert total == sum(len(s) for s in samplers)
        assert len(batch_sampler) == math.ceil(
            (len(samplers[0]) + len(samplers[2])) / 5
        ) + math.ceil(len(samplers[1]) / 5)
    with pytest.raises(TypeError, match="GeoSampler"):
        BandSetBatchSampler(datasets, 4)


class ChipList(Dataset):
    """A pre-chipped, int-indexed dataset with one band set."""

    def __init__(self, samples: list[dict[str, torch.Tensor]], wavelengths: torch.Tensor) -> None:
        self.samples = samples
        self.wavelengths = wavelengths

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.samples[index]


def test_band_set_batch_sampler_over_concat_dataset() -> None:
    parts = []
    for ds in (
        Sentinel2SR(DATA / "multiband"),
        Sentinel2SR(DATA / "multiband", bands=["B4", "B8"]),
    ):
        samples = [ds[idx] for idx in GriddedPatchSampler(ds, size=32, stride=32)]
        parts.append(ChipList(samples, ds.wavelengths))
    concat: ConcatDataset[dict[str, torch.Tensor]] = ConcatDataset(parts)
    sampler = BandSetBatchSampler(concat, 4, drop_last=True)
    loader = DataLoader(concat, batch_sampler=sampler, collate_fn=stack_dofa_samples)
    batches = list(loader)
    assert len(batches) == len(sampler) == 2 * (len(parts[0]) // 4)
    assert {b["image"].shape[1] for b in batches} == {9, 2}
    with pytest.raises(MixedBandSetError):
        list(DataLoader(concat, batch_size=len(concat), collate_fn=stack_dofa_samples))


# ----------------------------------------------------------------------------- real files


def real(*parts: str) -> Path:
    if not REAL.is_dir():
        pytest.skip(f"real Sentinel-2 files not present at {REAL}")
    return REAL.joinpath(*parts)


def check_real(ds: Sentinel2Base, scenes_by_path: Callable[[str], SceneSpec], patch: int) -> None:
    """Random and gridded loaders; each chip checked against rasterio reads of its scene."""
    for sampler in (
        RandomPatchSampler(ds, size=patch, length=3, generator=0),
        GriddedPatchSampler(ds, size=patch, stride=patch),
    ):
        loader = DataLoader(ds, sampler=sampler, batch_size=3, collate_fn=stack_samples)
        batch = next(iter(loader))
        assert batch["image"].shape[1:] == (len(ds.bands), patch, patch)
        for i in range(batch["image"].shape[0]):
            scenes = [scenes_by_path(p) for p in ds.index["filepath"]]
            check_sample(batch["image"][i], batch["valid"][i], batch["bounds"][i], scenes)


def test_real_bigearthnet_per_band_files() -> None:
    folder = real("bigearthnet", "S2B_MSIL2A_20170914T093029_32_39")
    ds = Sentinel2SR(folder)
    assert ds.bands == DOFA_S2_BANDS and ds.res == (10.0, 10.0) and ds.crs.to_epsg() == 32634
    assert ds.index["offset"].iloc[0] == (0.0,) * 9  # 2017: no offset
    stem = folder.name

    def scene(_: str) -> SceneSpec:
        return SceneSpec([(folder / f"{stem}_{esa(b)}.tif", 1) for b in DOFA_S2_BANDS])

    check_real(ds, scene, 32)
    both = Sentinel2SR(real("bigearthnet"))
    assert len(both) == 2 and both.crs.to_epsg() == 32634  # second patch warped from 32635
    x0, _, _, y1 = both.index.geometry.iloc[1].bounds
    warped = both[x0 : x0 + 320, y1 - 320 : y1]
    assert warped["valid"].float().mean() > 0.5 and warped["image"].max() > 100


def test_real_ftw_without_descriptions() -> None:
    path = real("ftw", "inference-img.tif")
    names = ["B4", "B3", "B2", "B8", "B4_1", "B3_1", "B2_1", "B8_1"]
    with pytest.raises(BandError, match="no band descriptions"):
        Sentinel2SR(path)
    ds = Sentinel2SR(path, bands=names)
    assert ds.bands == tuple(names)
    check_real(ds, lambda p: SceneSpec([(p, i) for i in range(1, 9)]), 64)
    second = Sentinel2SR(path, file_bands=names, bands=["B8_1", "B4_1"])
    sample = second[second.bounds[0], second.bounds[1]]
    check_sample(
        sample["image"], sample["valid"], sample["bounds"], [SceneSpec([(path, 8), (path, 5)])]
    )
    assert float(sample["image"].max()) > 10000  # clouds stay as they are


def test_real_ukis_n0400_offset_from_metadata() -> None:
    names = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]
    new = real("ukis-pysat", "S2B_MSIL1C_20220615T101559_N0400_R065_T32UPC_20220615T122549.tif")
    ds = Sentinel2SR(new, file_bands=names)
    assert ds.bands == DOFA_S2_BANDS
    assert ds.index["offset"].iloc[0] == (-1000.0,) * 9
    assert ds.index["offset_source"].iloc[0].endswith("_MTD.xml")
    idx = [names.index(b) + 1 for b in DOFA_S2_BANDS]
    check_real(ds, lambda p: SceneSpec([(p, i) for i in idx], -1000.0), 4)
    sample = ds[ds.bounds[0], ds.bounds[1]]
    assert float(sample["image"][:, sample["valid"]].min()) >= 9  # stored values >= 1009
    all13 = Sentinel2SR(new, bands=names)  # B10 (cirrus, L1C) has a wavelength, no DOFA stats
    assert all13.bands == tuple(names)
    assert float(all13.wavelengths[names.index("B10")]) == pytest.approx(1.375)
    old = real("ukis-pysat", "S2B_MSIL1C_20200406T101559_N0209_R065_T32UPC_20200406T130159.tif")
    ds_old = Sentinel2SR(old, file_bands=names)
    assert ds_old.index["offset"].iloc[0] == (0.0,) * 9
    assert "N0209" in ds_old.index["offset_source"].iloc[0]
    both = Sentinel2SR(real("ukis-pysat"), file_bands=names)
    assert both.res == (10.0, 10.0) and len(both) == 2


def test_real_stactools_jp2_with_boa_offset_and_undeclared_nodata() -> None:
    folder = real("stactools_l2a_N0400")
    ds = Sentinel2SR(folder)
    assert ds.bands == ("B2", "B4") and ds.res == (60.0, 60.0)
    assert ds.index["offset"].iloc[0] == (-1000.0, -1000.0)
    assert ds.index["offset_source"].iloc[0].endswith("MTD_MSIL2A.xml")

    def scene(_: str) -> SceneSpec:
        return SceneSpec(
            [(folder / f"T29UNU_20221005T115411_{b}_60m.jp2", 1) for b in ("B02", "B04")],
            -1000.0,
        )

    check_real(ds, scene, 48)
    whole = ds[ds.bounds[0], ds.bounds[1]]
    invalid = 1 - float(whole["valid"].float().mean())
    assert 0.3 < invalid < 0.5  # about 40 % no data, declared nowhere
    assert bool((whole["image"][:, ~whole["valid"]] == 0).all())


def test_real_cloud_shadow_chip_is_reflectance_not_an_error() -> None:
    """Ten by ten pixels of the real T29UNU tile (its scene classification: cloud shadow and
    dark area) are negative in both B02 and B04 after the -1000 offset. The all-negative rule
    refused such a chip ('every valid value is negative'; a --chip-size 16 job of the tile
    stopped at a chip of two such pixels at the swath's edge): a chip is kept and
    normalised as its values clipped to 0; a whole input that negative is still refused."""
    folder = real("stactools_l2a_N0400")
    ds = Sentinel2SR(folder)
    left, top = 530520.0, 5794740.0  # column 509, row 1755 of the 60 m grid
    sample = ds[left : left + 600, top - 600 : top]
    with rasterio.open(folder / "T29UNU_20221005T115411_B02_60m.jp2") as src:
        b02 = src.read(1, window=rasterio.windows.Window(509, 1755, 10, 10))
    assert sample["image"].shape == (2, 10, 10) and bool(sample["valid"].all())
    np.testing.assert_array_equal(sample["image"][0].numpy(), b02.astype(np.float64) - 1000)
    assert float(sample["image"].max()) < 0
    out = DOFAPreprocess(ds.bands)(dict(sample))
    assert not bool(out["empty"]) and float(out["valid_fraction"]) == 1.0
    # clipped to 0: -mean / std of DOFA's statistics (B2 126.640 / 67.425, B4 114.110 / 77.844)
    for band, (mean, std) in zip(
        out["image"], ((126.63977424, 67.42465279), (114.1099739, 77.84352553)), strict=True
    ):
        torch.testing.assert_close(band, torch.full_like(band, -mean / std))
    # as a whole input too: 100 pixels may be a patch of shadow alone (a real one is)
    kept = CheckReflectance(whole_input=True)({"image": sample["image"].clone()})
    assert bool(kept["valid"].all())


def _real_crop(folder: Path, out: Path, row: int, col: int, side: int) -> Path:
    """A ``side`` x ``side`` crop of the real T29UNU tile's B02 and B04, one GeoTIFF per band
    under ESA's names (their date gives the -1000 offset), as a folder."""
    out.mkdir()
    window = rasterio.windows.Window(col, row, side, side)
    for band in ("B02", "B04"):
        with rasterio.open(folder / f"T29UNU_20221005T115411_{band}_60m.jp2") as src:
            data = src.read(window=window)
            profile = {
                "driver": "GTiff", "width": side, "height": side, "count": 1,
                "dtype": data.dtype, "crs": src.crs, "transform": src.window_transform(window),
            }  # fmt: skip
        with rasterio.open(out / f"T29UNU_20221005T115411_{band}_60m.tif", "w", **profile) as dst:
            dst.write(data)
    return out


def test_real_file_check_judges_a_scene_of_band_files_together(tmp_path: Path) -> None:
    """The all-negative rule is a whole input's: one file per band (ESA's layout) was judged
    alone, so a real crop whose B02 is negative everywhere (B04 positive in most pixels)
    was refused; so were a real 10 x 10 patch of cloud shadow and a 20 x 20 patch at the
    swath's edge of three valid pixels (a patch-based dataset's). A scene's files are judged
    together, over at least 64 x 64 valid pixels: refused where every band's file is all
    negative, naming them; warned of where more than half of its pixels are negative in
    every band (each band's share alone overstated that)."""
    folder = real("stactools_l2a_N0400")
    blue = Sentinel2SR(_real_crop(folder, tmp_path / "blue", 113, 415, 32))
    assert blue.index["offset"].iloc[0] == (-1000.0, -1000.0)
    image = blue[blue.bounds[0], blue.bounds[1]]["image"]
    assert float(image[0].max()) < 0 < float(image[1].max())  # B02 negative everywhere
    shadow = Sentinel2SR(_real_crop(folder, tmp_path / "shadow", 1755, 509, 10))
    edge = Sentinel2SR(_real_crop(folder, tmp_path / "edge", 60, 1360, 20))
    assert int(edge[edge.bounds[0], edge.bounds[1]]["valid"].sum()) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for ds in (blue, shadow, edge):
            check_raw_reflectance(ds)
    # band files of stored values 1..999 (negative after the offset): as a scene, refused
    with rasterio.open(folder / "T29UNU_20221005T115411_B02_60m.jp2") as src:
        profile = {
            "driver": "GTiff", "width": 64, "height": 64, "count": 1, "dtype": "uint16",
            "crs": src.crs, "transform": src.transform,
        }  # fmt: skip
    rng = np.random.default_rng(0)
    for name in ("dark", "halves", "most"):
        scene = tmp_path / name
        scene.mkdir()
        for band, cut in (("B02", 38), ("B04", 26)):
            data = rng.integers(1, 1000, (1, 64, 64)).astype(np.uint16)
            if name == "halves":  # B02 negative left of column 38, B04 right of 26
                data[..., cut:] = data[..., cut:] + 2000 if band == "B02" else data[..., cut:]
                data[..., :cut] = data[..., :cut] + 2000 if band == "B04" else data[..., :cut]
            if name == "most":
                data[..., :16, :] += 2000  # a quarter of the rows bright
            path = scene / f"T29UNU_20221005T115411_{band}_60m.tif"
            with rasterio.open(path, "w", **profile) as dst:
                dst.write(data)
    with pytest.raises(
        ReflectanceError,
        match=r"^T29UNU_20221005T115411_B02_60m\.tif, T29UNU_20221005T115411_B04_60m\.tif: "
        r"every valid value is negative \(in \[-999, -[0-9]\]\): a whole input .* \(offset=0\)",
    ):
        check_raw_reflectance(Sentinel2SR(tmp_path / "dark"))
    with warnings.catch_warnings():  # 60 % of each band, 20 % of the pixels in both
        warnings.simplefilter("error")
        check_raw_reflectance(Sentinel2SR(tmp_path / "halves"))
    with pytest.warns(
        UserWarning,
        match=r"^T29UNU_20221005T115411_B02_60m\.tif, T29UNU_20221005T115411_B04_60m\.tif: "
        r"75% of the valid pixels are negative in every band read \(offset added; read "
        r"decimated\), .* \(offset=0\)\?$",
    ):
        check_raw_reflectance(Sentinel2SR(tmp_path / "most"))


def test_files_or_scenes_alike_are_one_warning_naming_the_first_three(tmp_path: Path) -> None:
    """A folder of scenes processed alike (an offset added twice to all, all scaled x 10)
    gave one warning per file or scene, each with the same advice: now one per kind, naming
    the first three and counting the rest; one file or scene keeps its own sentence."""
    profile = {
        "driver": "GTiff", "width": 64, "height": 64, "count": 1, "dtype": "uint16",
        "crs": "EPSG:32629", "transform": rasterio.Affine(60, 0, 499980, 0, -60, 5900040),
    }  # fmt: skip
    rng = np.random.default_rng(0)

    def scenes(folder: Path, days: range, low: int, high: int) -> Path:
        for day in days:
            for band in ("B02", "B04"):
                name = f"T29UNU_202210{day:02d}T115411_{band}_60m.tif"
                with rasterio.open(folder / name, "w", **profile) as dst:
                    data = rng.integers(low, high, (1, 64, 64)).astype(np.uint16)
                    data[..., :16, :] += 2000  # a quarter of the rows out of the range
                    dst.write(data)
        return folder

    for kind in ("bright", "dark"):
        (tmp_path / kind).mkdir()
    scenes(tmp_path / "bright", range(1, 4), 14000, 16000)  # 3 scenes, 6 files
    scenes(tmp_path / "dark", range(1, 6), 1, 1000)  # 5 scenes: 75 % negative, offset added
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_raw_reflectance(Sentinel2SR(tmp_path / "bright"))
        check_raw_reflectance(Sentinel2SR(tmp_path / "dark"))
    told = [str(w.message) for w in caught if w.category is ReflectanceWarning]
    assert len(told) == 2, told
    medians = re.findall(r"T29UNU_202210(\d\d)T115411_(B0[24])_60m\.tif: band 1 (\d+)", told[0])
    assert told[0].startswith(
        "6 files: more than half of the valid values of a band exceed 10000 in each (medians: "
        "T29UNU_20221001T115411_B02_60m.tif: band 1 "
    ), told[0]
    assert [(day, band) for day, band, _ in medians] == [
        ("01", "B02"),
        ("01", "B04"),
        ("02", "B02"),
    ]
    assert all(14000 <= int(m) <= 15000 for *_, m in medians), medians  # offset added
    assert " and 3 more; read decimated): DOFA clips reflectance at 10000" in told[0]
    assert told[0].endswith("Are the files scaled (x 10, or x 10000 twice) or radiance? (Scenes "
                            "of bright cloud or snow can do this.)")  # fmt: skip
    assert told[1] == (
        "5 scenes: most of the valid pixels of each are negative in every band read "
        "(T29UNU_20221001T115411_B02_60m.tif, T29UNU_20221001T115411_B04_60m.tif: 75%; "
        "T29UNU_20221002T115411_B02_60m.tif, T29UNU_20221002T115411_B04_60m.tif: 75%; "
        "T29UNU_20221003T115411_B02_60m.tif, T29UNU_20221003T115411_B04_60m.tif: 75% and 2 "
        "more; offset added; read decimated), more than patches of cloud shadow or dark water "
        "make (DOFA clips them to reflectance 0). Was the -1000 offset of processing baseline "
        "04.00 added to data already corrected (offset=0)?"
    ), told[1]


def test_file_check_reads_a_file_once_until_it_changes(tmp_path: Path, monkeypatch) -> None:
    """get_embedding's local backend checks its region's files for every region: a large
    file without overviews was read whole again for each point (4 s each). A file is read
    once while its size and modification time stay the same; rewritten, it is judged anew."""
    import torchgeo_dofa.datamodules as datamodules

    reads: list[str] = []
    real_read = datamodules.decimated_read

    def counted(path: str, max_side: int) -> Any:
        reads.append(path)
        return real_read(path, max_side)

    monkeypatch.setattr(datamodules, "decimated_read", counted)
    path = tmp_path / "scene.tif"
    _write_s2(path, np.full((4, 64, 64), 1500, np.uint16))
    for _ in range(3):
        check_raw_reflectance(Sentinel2SR(path))
    assert reads == [str(path)]
    _write_s2(path, np.full((4, 64, 64), 1, np.float32) / 10000)  # now scaled to [0, 1]
    os.utime(path, ns=(1, 1))  # a new modification time, whatever the clock's resolution
    with pytest.raises(ReflectanceError, match="^scene.tif: input looks already scaled"):
        check_raw_reflectance(Sentinel2SR(path))
    assert len(reads) == 2
    # replaced by a file of the same size and modification time (cp -p, rsync -a): anew
    other = tmp_path / "other.tif"
    _write_s2(other, np.full((4, 64, 64), 1500, np.float32))
    shutil.copyfile(other, path)
    os.utime(path, ns=(1, 1))
    check_raw_reflectance(Sentinel2SR(path))
    assert len(reads) == 3
    # a NaN nodata (a new NaN object each time the file is opened; NaN != NaN) still hits
    with rasterio.open(path, "r+") as dst:
        dst.nodata = math.nan
    for _ in range(2):
        check_raw_reflectance(Sentinel2SR(path))
    assert len(reads) == 4


def test_file_check_counts_the_files_pixels_and_a_scenes_at_every_resolution(
    tmp_path: Path,
) -> None:
    """The 64 x 64-pixel floor was counted in samples of the decimated read: a long strip
    (40 x 8000 px, 250 samples) of dB values was never judged. And a scene's band files at
    10 and 20 m are read at other sizes: its share of pixels negative in every band was not
    computed, so an offset applied twice to it went without a warning."""
    strip = tmp_path / "strip.tif"
    _write_s2(strip, -np.random.default_rng(0).integers(100, 800, (4, 40, 8000)).astype(np.int16))
    with pytest.raises(ReflectanceError, match=r"^strip\.tif: every valid value is negative"):
        check_raw_reflectance(Sentinel2SR(strip))
    scene = tmp_path / "scene"
    scene.mkdir()
    for band, side in (("B02", 128), ("B04", 64)):  # 10 m and 20 m over the same extent
        data = np.random.default_rng(1).integers(1, 1000, (1, side, side)).astype(np.uint16)
        data[:, : side // 4] += 2000  # a quarter of the rows bright
        with rasterio.open(
            scene / f"T32TQM_20230105T101329_{band}_{1280 // side}m.tif", "w", driver="GTiff",
            width=side, height=side, count=1, dtype="uint16", crs="EPSG:32632",
            transform=Affine(1280 / side, 0, 600000, 0, -1280 / side, 5000000),
        ) as dst:  # fmt: skip
            dst.write(data)
    ds = Sentinel2SR(scene)
    assert ds.index["offset"].iloc[0] == (-1000.0, -1000.0)
    with pytest.warns(UserWarning, match=r"^T32TQM_.*_B02_10m\.tif, T32TQM_.*_B04_20m\.tif: 75% "):
        check_raw_reflectance(ds)


def _write_s2(path: Path, data: np.ndarray) -> None:
    """A 4-band (B4, B3, B2, B8) 10 m GeoTIFF in EPSG:32632."""
    transform = Affine(10, 0, 600000, 0, -10, 5000000)
    with rasterio.open(
        path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=4,
        dtype=data.dtype, crs="EPSG:32632", transform=transform,
    ) as dst:  # fmt: skip
        dst.write(data)
        dst.descriptions = ("B4", "B3", "B2", "B8")


def test_file_check_warns_of_8_bit_or_percent_values_in_a_wider_type(tmp_path: Path) -> None:
    """A scene saved as percent (float32 0..75) or 8-bit values in uint16 (0..255) embedded
    as near-black, silently, where a uint8 file of the same values warned of its dtype. Every
    band's valid values within [0, 255]: warned, naming each band's maximum; one band above
    (a dark scene's blue at 400) or a uint8 file (its dtype's own warning): not."""
    rng = np.random.default_rng(0)
    reflectance = rng.integers(100, 7500, (4, 80, 80))
    files = {
        "percent.tif": (reflectance / 100).astype(np.float32),
        "bytes.tif": (reflectance * 255 // 7500).astype(np.uint16),
    }
    for name, data in files.items():
        _write_s2(tmp_path / name, data)
        with pytest.warns(ReflectanceWarning) as said:
            check_raw_reflectance(Sentinel2SR(tmp_path / name))
        maxima = ", ".join(f"{b} {float(d.max()):.4g}" for b, d in zip("B4 B3 B2 B8".split(), data))
        assert [str(w.message) for w in said] == [
            f"{name}: the valid values of every band stay at or below 255 (maxima: {maxima}; "
            "read decimated): reflectance x 10000 that low (below 2.55 %) is darker than almost "
            "any land, so they embed as near-black. Are they 8-bit (0..255) or percent (0..100) "
            "values? Rescale them to reflectance x 10000. (A scene of dark water alone can do "
            "this.)"
        ]
    dark = rng.integers(1, 250, (4, 80, 80)).astype(np.uint16)
    dark[2, 40, 40] = 400  # one blue pixel above 255
    _write_s2(tmp_path / "dark.tif", dark)
    _write_s2(tmp_path / "eight.tif", dark.clip(0, 255).astype(np.uint8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_raw_reflectance(Sentinel2SR(tmp_path / "dark.tif"))
        check_raw_reflectance(Sentinel2SR(tmp_path / "eight.tif"))
    assert not [w for w in caught if "stay at or below" in str(w.message)]


def test_file_check_names_a_band_without_a_valid_value(tmp_path: Path) -> None:
    """helper-112: one band of a file all 0 (a band exported empty) made every pixel no data
    (a pixel is no data where any band is): the job wrote an all-NaN grid with a warning
    that no chip held a valid pixel, never naming the band. The file check names it (and,
    for a scene stored one file per band, the file), before any chip is read."""
    rng = np.random.default_rng(0)
    data = rng.integers(300, 4000, (4, 64, 64)).astype(np.uint16)
    (tmp_path / "one").mkdir()
    data[3] = 0  # B8
    _write_s2(tmp_path / "one" / "a.tif", data)
    ds = Sentinel2SR(tmp_path / "one")
    with pytest.warns(ReflectanceWarning) as said:
        check_raw_reflectance(ds)
    assert [str(w.message) for w in said] == [
        "a.tif: band(s) B8 hold no valid value (each is no data everywhere: 0, the nodata "
        "value, NaN or at or below -1000; read decimated) where the file's other bands hold "
        "data: a pixel is no data where any band is, so the file's pixels are no data "
        "wherever the band has none (chips of this file alone embed as NaN); choose bands "
        "without it, or repair or remove the file"
    ]
    assert not ds.read_chip(ds.bounds)["valid"].any()  # what the warning says
    assert (
        Sentinel2SR(tmp_path / "one", bands=["B4", "B3", "B2"]).read_chip(ds.bounds)["valid"].all()
    )
    with warnings.catch_warnings():  # without that band, or a file of every band: quiet
        warnings.simplefilter("error")
        check_raw_reflectance(Sentinel2SR(tmp_path / "one", bands=["B4", "B3", "B2"]))
    # several files: one warning; a file of no valid value at all is not this warning's
    (tmp_path / "two").mkdir()
    data[3] = 1500
    for name, index in (("b.tif", 0), ("c.tif", 2)):
        dead = data.copy()
        dead[index] = 0
        _write_s2(tmp_path / "two" / name, dead)
    with pytest.warns(ReflectanceWarning, match=r"^2 files: a band of each holds no valid value "
                      r"where the file's other bands hold data \(b.tif: B4; c.tif: B2; read "
                      r"decimated\): a pixel is no data where any band is"):  # fmt: skip
        check_raw_reflectance(Sentinel2SR(tmp_path / "two"))
    # one file per band (ESA's layout): the band file without a valid value is named
    esa = tmp_path / "esa"
    esa.mkdir()
    for k, band in enumerate(("B04", "B03", "B02", "B08")):
        one = data[k : k + 1] * (band != "B08")
        with rasterio.open(
            esa / f"T32TQM_20230105T101329_{band}_10m.tif", "w", driver="GTiff", width=64,
            height=64, count=1, dtype="uint16", crs="EPSG:32632",
            transform=Affine(10, 0, 600000, 0, -10, 5000000),
        ) as dst:  # fmt: skip
            dst.write(one)
    with pytest.warns(ReflectanceWarning) as said:
        check_raw_reflectance(Sentinel2SR(esa, offset=0))
    assert [str(w.message) for w in said] == [
        "T32TQM_20230105T101329_B08_10m.tif: no valid value (each is no data everywhere: 0, "
        "the nodata value, NaN or at or below -1000; read decimated) where the other band "
        "files of its scene hold data: a pixel is no data where any band is, so the file's "
        "pixels are no data wherever the band has none (chips of this file alone embed as "
        "NaN); choose bands without it, or repair or remove the file"
    ]


def test_file_check_warns_of_an_offset_applied_twice_and_reads_the_stored_scale(
    tmp_path: Path,
) -> None:
    """An offset applied to data already corrected leaves bright pixels positive: such a
    file passed without a word (each chip is embedded, its dark pixels as 0). More than half
    of its pixels negative in every band is warned of. A file of [0, 1] reflectance whose
    name gives it the -1000 offset was told 'every valid value is negative' (dB values?):
    it is judged as stored, 'already scaled'."""
    name = "S2B_MSIL2A_20230105T101329_N0509_R022_T32TQM_20230105T121004.tif"
    data = np.random.default_rng(0).integers(30, 900, (4, 64, 64)).astype(np.uint16)
    data[:, :8] = 3000  # a bright row of fields: not all negative
    twice = tmp_path / "twice"
    twice.mkdir()
    _write_s2(twice / name, data)
    ds = Sentinel2SR(twice)
    assert ds.index["offset"].iloc[0] == (-1000.0,) * 4
    with pytest.warns(ReflectanceWarning, match=r"^S2B_.*\.tif: 8[0-9]% of the valid pixels are "):
        check_raw_reflectance(ds)
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    _write_s2(scaled / name, (data / 10000).astype(np.float32))
    ds = Sentinel2SR(scaled)
    with pytest.raises(ReflectanceError, match=r"^S2B_.*\.tif: input looks already scaled"):
        check_raw_reflectance(ds)


def test_real_earth_engine_export_in_epsg4326() -> None:
    path = real("gee_cropharvest", "98-togo_2019-02-06_2020-02-01.tif")
    ds = EarthEngineS2(path)
    assert ds.crs.to_epsg() == 4326 and ds.bands == DOFA_S2_BANDS
    assert ds.index["offset"].iloc[0] == (0.0,) * 9
    with rasterio.open(path) as src:
        descriptions = list(src.descriptions)
    idx = [descriptions.index(b) + 1 for b in DOFA_S2_BANDS]
    check_real(ds, lambda p: SceneSpec([(p, i) for i in idx]), 8)
    monthly = EarthEngineS2(path, bands=["B4_3", "B8_3"])
    sample = monthly[ds.bounds[0], ds.bounds[1]]
    sources = [(path, descriptions.index(b) + 1) for b in ("B4_3", "B8_3")]
    check_sample(sample["image"], sample["valid"], sample["bounds"], [SceneSpec(sources)])


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_direct_window_reads_equal_merge_reads(name: str, monkeypatch) -> None:
    """Chips on a file's grid are read with one windowed read: the same pixels as merge."""
    import torchgeo_dofa.datasets as datasets_module

    ds = LAYOUTS[name].make()
    calls = {"direct": 0}
    real = datasets_module._direct_read

    def counted(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["direct"] += out is not None
        return out

    monkeypatch.setattr(datasets_module, "_direct_read", counted)
    # odd size and stride: offsets vary and the last chips reach past the raster
    patch = LAYOUTS[name].patch
    chips = list(GridGeoSampler(ds, size=patch + 3, stride=max(1, patch // 2 + 1)))
    assert chips
    for chip in chips:
        ds.direct_reads = True
        fast = ds.read_chip(chip)
        ds.direct_reads = False
        slow = ds.read_chip(chip)
        torch.testing.assert_close(fast["image"], slow["image"], rtol=0, atol=0)
        torch.testing.assert_close(fast["valid"], slow["valid"], rtol=0, atol=0)
    if name != "ee_tiles":  # ee_tiles are in degrees: chips are not whole pixels there
        assert calls["direct"] > 0


@pytest.mark.parametrize(
    ("dtype", "nodata", "mask"),
    [
        ("float32", -9, False),  # a masked read (float nodata)
        ("uint16", 0, False),  # integer nodata: found on the plain read
        ("int16", -9, False),
        ("uint16", 7000, False),  # nodata inside the data's range
        ("uint16", None, True),  # an internal mask: a masked read
        ("uint16", 1.5, False),  # GDAL masks int(1.5) = 1: a masked read
        ("int64", 2**53 + 1, False),  # float64 cannot hold it: a masked read
    ],
)
def test_direct_reads_keep_nan_and_masked_pixels(
    tmp_path: Path, dtype: str, nodata: float | None, mask: bool
) -> None:
    path = tmp_path / f"{dtype}.tif"
    data = (np.arange(2 * 40 * 50).reshape(2, 40, 50) % 9000 + 100).astype(dtype)
    if dtype == "float32":
        data[0, 5, 7] = np.nan
    hole = np.zeros((40, 50), dtype=bool)
    hole[10:12, 20:22] = True
    hole[30, :] = True
    # the value GDAL masks: the nodata as a double (the GeoTIFF tag), cast to the band type
    masked = None if nodata is None else np.array(float(nodata)).astype(dtype)
    if nodata is not None:
        data[:, hole] = nodata
        data[1, 3, 4] = masked  # one band's no data makes the pixel invalid
    profile = dict(
        driver="GTiff", width=50, height=40, count=2, dtype=dtype, nodata=nodata,
        crs="EPSG:32631", transform=from_origin(500000, 4000400, 10, 10),
    )  # fmt: skip
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if mask:
            dst.write_mask(np.where(hole, 0, 255).astype("uint8"))
    expected = ~np.isnan(data.astype(np.float64)).any(axis=0)
    if mask:
        expected &= ~hole
    if masked is not None:
        expected &= (data != masked).all(axis=0)
    ds = Sentinel2SR(path, bands=["B4", "B8"])
    chips = list(GridGeoSampler(ds, size=17, stride=9))
    seen = 0
    for chip in chips:
        ds.direct_reads = True
        fast = ds.read_chip(chip)
        ds.direct_reads = False
        slow = ds.read_chip(chip)
        torch.testing.assert_close(fast["image"], slow["image"], rtol=0, atol=0)
        torch.testing.assert_close(fast["valid"], slow["valid"], rtol=0, atol=0)
        # the chip's pixels inside the raster: valid exactly where the file has data
        t = fast["transform"].numpy()
        col, row = round((t[2] - 500000) / 10), round((4000400 - t[5]) / 10)
        r0, c0 = max(0, -row), max(0, -col)
        r1, c1 = min(17, 40 - row), min(17, 50 - col)
        valid = fast["valid"].numpy()[r0:r1, c0:c1]
        np.testing.assert_array_equal(valid, expected[row + r0 : row + r1, col + c0 : col + c1])
        seen += int((~valid).sum())
    assert seen > 0


def test_a_folder_of_other_raster_formats_names_them(tmp_path: Path) -> None:
    """A VRT (or a zipped SAFE) was TorchGeo's "Dataset not found ... cannot be automatically
    downloaded" from the dataset and "holds no GeoTIFF or JPEG2000 file" from the CLI."""
    from torchgeo.datasets.errors import DatasetNotFoundError

    from torchgeo_dofa.datasets import InputError, NoRasterFoundError, find_raster_inputs

    vrt = tmp_path / "mosaic.vrt"
    vrt.write_text("<VRTDataset rasterXSize='1' rasterYSize='1'></VRTDataset>")
    with pytest.raises(NoRasterFoundError) as found:
        Sentinel2SR(vrt)
    assert isinstance(found.value, DatasetNotFoundError)  # what TorchGeo users catch
    assert str(found.value) == (
        f"Sentinel2SR found no raster in paths={vrt!r} (reads .tif, .tiff, .jp2; found "
        "mosaic.vrt: a GDAL VRT is not read: convert it (gdal_translate mosaic.vrt "
        "mosaic.tif) or give the files it lists)"
    )
    with pytest.raises(NoRasterFoundError) as missing:  # a path that does not exist
        Sentinel2SR(tmp_path / "none.vrt")
    assert str(missing.value).endswith("(reads .tif, .tiff, .jp2)")
    (tmp_path / "S2A_MSIL2A_20230601.zip").write_bytes(b"PK")
    with pytest.raises(InputError, match=r"holds no GeoTIFF or JPEG2000 file \(reads .tif, "
                       r".tiff, .jp2; found .* and 1 more: "):  # fmt: skip
        find_raster_inputs([tmp_path])


def test_scenes_sharing_no_band_name_are_each_named_with_their_bands(tmp_path) -> None:
    """Two scenes with no Sentinel-2 band name in common were refused as 'found []', naming
    neither file nor what each holds."""
    _described_tif(tmp_path / "a_20220601.tif", ["B4 (Red)", "B3 (Green)"])
    _described_tif(tmp_path / "b_20220601.tif", ["B4", "B3", ""])
    with pytest.raises(BandError) as refused:
        Sentinel2SR(tmp_path)
    assert (
        "no Sentinel-2 band is present in every scene (shared: []; a_20220601.tif has "
        "['B4 (Red)', 'B3 (Green)']; b_20220601.tif has ['B4', 'B3', 'band3']): pass bands="
    ) in str(refused.value)


def test_files_wholly_outside_their_crss_area_of_use_are_warned_of(tmp_path) -> None:
    """UTM coordinates labelled British National Grid (a file without CRS given the wrong
    crs=) read without a word, and the outputs were placed ~5000 km north of Britain."""
    utm = _write_tif(tmp_path / "utm.tif", np.full((2, 16, 16), 1500, np.uint16),
                     from_origin(360000, 5350000, 10, 10), "EPSG:32633")  # fmt: skip
    (tmp_path / "bare").mkdir()
    bare = _write_tif(tmp_path / "bare" / "x.tif", np.full((2, 16, 16), 1500, np.uint16),
                      from_origin(360000, 5350000, 10, 10), None)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Sentinel2SR(utm)  # inside UTM 33N's area (12..18 E): no warning
        Sentinel2SR(bare, crs="EPSG:32633")
    said = (
        r"the files' bounds \[360000, 5349840, 360160, 5350000\] lie wholly outside the area "
        r"where EPSG:27700 is used \(lon -9.01..2.01, lat 49.75..61.01\): the outputs will "
        r"carry these coordinates in it; if that is not where the scene lies, check crs= "
    )
    with pytest.warns(UserWarning, match=said):
        Sentinel2SR(bare, crs="EPSG:27700")
    with rasterio.open(utm, "r+") as dst:
        dst.crs = RIO_CRS.from_epsg(27700)
    with pytest.warns(UserWarning, match="check the files' georeferencing"):
        Sentinel2SR(utm)


def test_time_indexes_only_the_scenes_of_those_dates(tmp_path: Path) -> None:
    """``time=`` leaves the other dates out of the index: they decide neither the sources nor
    the default resolution (a 10 m date beside a 20 m one read the 20 m one at 10 m)."""
    from tests.scenes import dated_copies

    folder = tmp_path / "series"
    dated_copies(folder, [("T33UVP_20210101.tif", 0.0, 0), ("T33UVP_20230601.tif", 0.0, 300)])
    old = folder / "T33UVP_20210101.tif"
    with rasterio.open(old) as src:
        profile, names = src.profile, src.descriptions
        data = src.read(out_shape=(src.count, 128, 128))
    t = profile["transform"]
    profile |= {"width": 128, "height": 128, "transform": Affine(20.0, 0, t.c, 0, -20.0, t.f)}
    with rasterio.open(old, "w", **profile) as dst:
        dst.write(data)
        dst.descriptions = names
    assert Sentinel2SR(folder).res == (10.0, 10.0)  # every date: the finest
    for time in ("2021-01-01/2021-01-01", ("2020-12-31", "2021-01-01 12:00")):
        ds = Sentinel2SR(folder, time=time)
        assert ds.res == (20.0, 20.0) and list(ds.index["filepath"]) == [str(old)]
        assert ds.index.index[0].left == pd.Timestamp("2021-01-01")
    ds = Sentinel2SR(folder, time="2023-06-01/..")
    assert ds.res == (10.0, 10.0) and len(ds) == 1
    with pytest.raises(NoSceneError) as none:
        Sentinel2SR(folder, time=("2022-01-01", "2022-12-31 23:59:59.999999"))
    assert isinstance(none.value, ValueError) and isinstance(none.value, LookupError)
    assert str(none.value) == (
        "no scene of the inputs is acquired within 2022-01-01 .. 2022-12-31 (they are dated "
        "2021-01-01, 2023-06-01): choose dates that hold scenes"
    )
    with pytest.raises(ValueError, match="time range ends before it starts"):
        Sentinel2SR(folder, time=("2023-01-01", "2022-01-01"))
    # a scene without a date spans all time: no range leaves it out
    (folder / "T33UVP_20230601.tif").rename(folder / "undated.tif")
    ds = Sentinel2SR(folder, time="2022-01-01/2022-12-31")
    assert list(ds.index["filepath"]) == [str(folder / "undated.tif")]


def test_only_non_spectral_products_are_named_not_dataset_not_found(tmp_path: Path) -> None:
    """A folder holding only an SCL (or a TCI-named file) said TorchGeo's "Dataset not found
    ... cannot be automatically downloaded": the files were skipped by name, silently."""
    profile = {
        "driver": "GTiff",
        "dtype": "uint8",
        "width": 8,
        "height": 8,
        "crs": "EPSG:32633",
        "transform": from_origin(300000, 5000000, 20, 20),
    }
    for name, count in (("T33UVP_20230601_SCL_20m.tif", 1), ("tci.tif", 3)):
        with rasterio.open(tmp_path / name, "w", count=count, **profile) as dst:
            dst.write(np.ones((count, 8, 8), np.uint8))
    with pytest.raises(NoRasterFoundError) as found:
        Sentinel2SR(tmp_path / "tci.tif")
    assert str(found.value) == (
        f"Sentinel2SR found only products that are not spectral bands in "
        f"paths={tmp_path / 'tci.tif'!r}: tci.tif, skipped by name (ESA's SCL, AOT, WVP, TCI "
        "..., Earth Search's scl, visual ... assets): give the scene's band files (B02 ... "
        "B12, or Earth Search's blue, green ...); a file of reflectance named so is read once "
        "renamed"
    )
    with pytest.raises(NoRasterFoundError, match=r": T33UVP_20230601_SCL_20m.tif, tci.tif, skip"):
        Sentinel2SR(tmp_path)


def test_file_bands_for_per_band_files_is_refused(tmp_path: Path) -> None:
    """``file_bands=`` names a multi-band file's bands; for a folder of per-band files it was
    ignored without a word (the user's names never applied)."""
    profile = {
        "driver": "GTiff",
        "dtype": "uint16",
        "count": 1,
        "width": 8,
        "height": 8,
        "crs": "EPSG:32633",
        "transform": from_origin(300000, 5000000, 10, 10),
    }
    for band in ("B02", "B03", "B04"):
        with rasterio.open(tmp_path / f"scene_{band}.tif", "w", **profile) as dst:
            dst.write(np.full((1, 8, 8), 900, np.uint16))
    assert Sentinel2SR(tmp_path).bands == ("B2", "B3", "B4")
    with pytest.raises(BandError) as refused:
        Sentinel2SR(tmp_path, file_bands=["B4", "B3", "B2"], bands=["B4", "B3", "B2"])
    assert str(refused.value) == (
        "file_bands=['B4', 'B3', 'B2'] names the bands of multi-band files in file order, but "
        "the inputs hold only single-band files named by their band (scene_B02.tif ...), which "
        "name themselves: leave out file_bands= (bands= selects and orders the bands)"
    )


@pytest.mark.parametrize(
    ("crs", "kind"),
    [("EPSG:4978", "geocentric (x, y, z from the Earth's centre)"), ("EPSG:5703", "vertical")],
)
def test_a_crs_that_is_not_a_maps_is_refused(crs: str, kind: str) -> None:
    """EPSG:4978 (Earth-centred x, y, z) was accepted: a grid in it, every chip no data."""
    with pytest.raises(InputError) as refused:
        Sentinel2SR(DATA / "esa", crs=crs)
    assert str(refused.value) == (
        f"CRS {crs} is a {kind} CRS, not a map's: rasters are read and chipped in a projected "
        "CRS (e.g. EPSG:32633, UTM 33N), a geographic one (EPSG:4326) or a file's local one"
    )


@pytest.mark.parametrize("crs", ["EPSG:32633+5773", "EPSG:7415", "EPSG:9518"])
def test_a_map_crs_with_a_height_is_read_as_its_map(crs: str) -> None:
    """Compound CRSs (UTM 33N + EGM96 height, RD New + NAP, WGS 84 + EGM2008) are maps: the
    first refusal of vertical CRSs took them for vertical ones."""
    ds = Sentinel2SR(DATA / "esa", crs=crs)
    assert len(ds) == len(Sentinel2SR(DATA / "esa")) and ds.res[0] > 0


def test_a_label_raster_among_the_scenes_is_named_as_such(tmp_path: Path) -> None:
    """A label raster beside the scenes was asked for its band names (file_bands=[B1, ...])."""
    profile = {
        "driver": "GTiff",
        "dtype": "uint8",
        "count": 1,
        "width": 8,
        "height": 8,
        "crs": "EPSG:32633",
        "transform": from_origin(300000, 5000000, 10, 10),
    }
    with rasterio.open(tmp_path / "labels.tif", "w", **profile) as dst:
        dst.write(np.ones((1, 8, 8), np.uint8))
    with pytest.raises(BandError) as refused:
        Sentinel2SR(tmp_path)
    assert str(refused.value).endswith(
        "select the ones to embed with bands=[...]; if it is a label or mask raster (one uint8 "
        "band), keep it out of the inputs"
    )


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ({"bands": "B4B3B2B8"}, "bands='B4B3B2B8' is one string: give a list of band names, one "
         "per channel (bands=['B4', 'B3', 'B2', 'B8'])"),
        ({"file_bands": "B4, B3 B2 B8A"}, "file_bands='B4, B3 B2 B8A' is one string: give a "
         "list of band names, one per channel (file_bands=['B4', 'B3', 'B2', 'B8A'])"),
    ],
)  # fmt: skip
def test_band_names_given_as_one_string_are_refused_by_name(
    given: dict[str, str], shown: str
) -> None:
    """``bands="B4B3B2B8"`` was read as the list of its characters (``'B', '4', ...``): the
    error spoke of a repeated band B, or of '4' not being a band name."""
    from tests.scenes import SCENE

    with pytest.raises(BandError) as info:
        Sentinel2SR(SCENE, **given)  # type: ignore[arg-type]
    assert str(info.value) == shown


def test_band_names_in_any_sequence_are_read_as_a_list() -> None:
    """A numpy array of names failed with numpy's "truth value of an array ... is
    ambiguous", a generator was spent by the first look (bands=[]), bytes were read as
    integers ("[66, 52] name the same band more than once")."""
    from tests.scenes import SCENE
    from torchgeo_dofa.api import SensorSpec

    names = ["B4", "B3", "B2"]
    for given in (np.array(names), tuple(names), (b for b in names)):
        assert Sentinel2SR(SCENE, bands=given).bands == tuple(names)  # type: ignore[arg-type]
    assert SensorSpec(bands=np.array(names)).bands == tuple(names)  # type: ignore[arg-type]
    with pytest.raises(
        BandError, match=r"bands=b'B4B3' is one string: .* \(bands=\['B4', 'B3'\]\)"
    ):
        Sentinel2SR(SCENE, bands=b"B4B3")  # type: ignore[arg-type]


def test_a_folders_linked_folders_are_read_and_a_missing_linked_raster_is_named(
    tmp_path: Path,
) -> None:
    """helper-112: a tile in a folder linked into the input folder was left out of the job
    without a word (``Path.rglob`` does not enter linked folders), and so was a ``.tif`` link
    to a file git-annex had not fetched; the same link given alone is "does not exist"."""
    import shutil

    from torchgeo_dofa.datasets import InputError, find_raster_inputs

    source = DATA / "nodesc" / "S2_20220614_nodesc.tif"
    scenes, elsewhere = tmp_path / "scenes", tmp_path / "elsewhere"
    scenes.mkdir()
    elsewhere.mkdir()
    shutil.copy(source, scenes / "a.tif")
    shutil.copy(source, elsewhere / "b.tif")
    (scenes / "more").symlink_to(elsewhere)
    (scenes / "again").symlink_to(elsewhere)  # the same folder twice: read once
    (elsewhere / "loop").symlink_to(scenes)  # into the input folder itself
    (scenes / "up").symlink_to("..")  # helper-114: it read the parent's other folders
    shutil.copy(source, tmp_path / "outside.tif")
    (scenes / "._a.tif").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # macOS AppleDouble
    (region,) = find_raster_inputs([scenes])
    assert [os.path.basename(p) for p in region.paths] == ["a.tif", "b.tif"], region.paths
    (scenes / "c.tif").symlink_to("../.git/annex/objects/xx/c.tif")
    said = r"holds '.*c\.tif', a link to '\.\./\.git/annex/objects/xx/c\.tif', which is not there"
    with pytest.raises(InputError, match=said + r": fetch it \(git annex get"):
        find_raster_inputs([scenes])


def test_an_esa_file_name_of_a_day_that_does_not_exist_is_undated(tmp_path: Path) -> None:
    """helper-112: ``T33UWP_20230229T100000_B04_10m.tif`` was "error: day is out of range for
    month" (``predict --config``: a traceback), naming neither the file nor the cause; other
    names of such a day (``scene_20230229.tif``) were read as undated. Now so is this one."""
    import shutil

    for bad in ("20230229", "20231345"):
        folder = tmp_path / bad
        folder.mkdir()
        for band in ("B02", "B03", "B04"):
            shutil.copy(
                DATA / "esa" / f"T31UFQ_20211015T105031_{band}_10m.tif",
                folder / f"T31UFQ_{bad}T105031_{band}_10m.tif",
            )
        ds = Sentinel2SR(folder)
        assert sorted(ds.bands) == ["B2", "B3", "B4"]
        sample = ds[next(iter(GriddedPatchSampler(ds, size=16, stride=16)))]
        assert sample["image"].shape[0] == 3


def test_pixels_square_in_degrees_but_not_on_the_ground_are_warned_of(tmp_path: Path) -> None:
    """helper-135: an Earth Engine export in EPSG:4326 at 48 N (8.983e-5 degree pixels, 10 m
    north-south, 6.7 m east-west) was embedded in chips covering 1.5x more ground north-south
    than east-west, without a word; near the equator the same pixels are square enough."""
    deg = 8.983152841195214e-05  # Earth Engine's 10 m at the equator, in degrees
    # at 60 N, pixels twice as wide in degrees as high are square on the ground (as the
    # Copernicus DEM spaces them): neither warning (the one of pixels not square in CRS units
    # advised res= for square degrees, which the other then warned of; helper-137)
    for name, lat, lon, wide in [
        ("north", 48.3, 14.5, 1),
        ("equator", 3.0, 14.5, 1),
        ("sixty", 60.0, 14.5, 2),
    ]:
        path = tmp_path / name / "s2.tif"
        path.parent.mkdir()
        with rasterio.open(
            path, "w", driver="GTiff", width=32, height=32, count=3, dtype="uint16",
            crs="EPSG:4326", transform=Affine(wide * deg, 0, lon, 0, -deg, lat),
        ) as dst:  # fmt: skip
            dst.write(np.full((3, 32, 32), 1500, np.uint16))
            dst.descriptions = ("B4", "B3", "B2")
        if name != "north":
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                Sentinel2SR(path.parent)
            continue
        with pytest.warns(UserWarning) as caught:
            Sentinel2SR(path.parent)
        # an independent ground size: the geodesic length of one pixel's sides
        from pyproj import Geod

        geod = Geod(ellps="WGS84")
        x_m = geod.inv(lon, lat, lon + deg, lat)[2]
        y_m = geod.inv(lon, lat, lon, lat - deg)[2]
        (message,) = [str(w.message) for w in caught]
        found = re.fullmatch(
            r"Sentinel2SR: the pixels are 8\.98315e-05 x 8\.98315e-05 degrees \(x by y\), about "
            r"(\S+) x (\S+) m on the ground at latitude 48\.3: a chip of N x N pixels covers a "
            r"ground area stretched by (\S+)x, and DOFA, trained on square pixels, sees the "
            r"scene so; read it in a projected CRS, e\.g\. crs='EPSG:32633' \(its UTM zone\), at "
            r"the source's resolution in metres \(res=10 for Sentinel-2's 10 m bands\)",
            message,
        )
        assert found is not None, message
        got_x, got_y, stretch = (float(v) for v in found.groups())
        assert got_x == pytest.approx(x_m, rel=0.01) and got_y == pytest.approx(y_m, rel=0.01)
        assert stretch == pytest.approx(y_m / x_m, rel=0.01)
