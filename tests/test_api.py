"""rs-embed style API: equal to the embed job's outputs, batching, local/gee backends, errors.

Every forward pass of base costs ~1.5 s on a small CPU, so reference embeddings are computed
once per module (fixtures) and reused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyproj
import pytest
import rasterio
import shapely.geometry
import torch
from rasterio.transform import Affine
from rasterio.windows import from_bounds

from tests.checkpoints import not_official, write_checkpoint
from tests.scenes import SCENE
from torchgeo_dofa import api, gee, stac
from torchgeo_dofa.api import (
    ExportModelRequest,
    ModelError,
    OutputSpec,
    SensorSpec,
    TemporalSpec,
    export_batch,
    get_embedding,
    get_embeddings_batch,
    get_embeddings_batch_from_inputs,
)
from torchgeo_dofa.bands import DOFA_S2_BANDS, BandError, infer_wavelengths, norm_stats
from torchgeo_dofa.cli import embed
from torchgeo_dofa.datasets import InputError, Sentinel2SR
from torchgeo_dofa.gee import GEEUnavailableError, build_gee_request, decode_pixels, utm_epsg
from torchgeo_dofa.spatial import (
    BBox,
    CRSTransformError,
    PointBuffer,
    region_to_crs,
    utm_region_grid,
)
from torchgeo_dofa.transforms import (
    ReflectanceError,
    ReflectanceWarning,
    check_reflectance_range,
    preprocess_array,
)
from torchgeo_dofa.writers import utc_us

CHIP_M = 2240.0  # 224 px at 10 m


# ------------------------------------------------------------------------------ helpers


def _scene_window(dx: float, dy: float, w: float = CHIP_M, h: float = CHIP_M):
    """Raw pixels, band names and profile of the window ``dx, dy`` metres from lower-left."""
    with rasterio.open(SCENE) as src:
        left, bottom = src.bounds.left, src.bounds.bottom
        bounds = (left + dx, bottom + dy, left + dx + w, bottom + dy + h)
        window = from_bounds(*bounds, src.transform)
        raw = src.read(window=window)
        profile = src.profile | {
            "width": raw.shape[2],
            "height": raw.shape[1],
            "transform": src.window_transform(window),
        }
        return raw, list(src.descriptions), profile, bounds


def _centre_point(bounds, buffer_m: float = CHIP_M / 2) -> PointBuffer:
    to_wgs84 = pyproj.Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    lon, lat = to_wgs84.transform((bounds[0] + bounds[2]) / 2, (bounds[1] + bounds[3]) / 2)
    return PointBuffer(lon=lon, lat=lat, buffer_m=buffer_m)


def _write(path: Path, raw: np.ndarray, profile: dict, names) -> Path:
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(raw)
        dst.descriptions = tuple(names)
    return path


def _close(a, b, tol: float = 1e-4) -> None:
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def weights(base_checkpoint) -> str:
    return str(base_checkpoint)


@pytest.fixture(scope="module")
def chip_a():
    """Second chip of the bottom row of the demo scene (as located in tests/test_cli.py)."""
    return _scene_window(CHIP_M, 0.0)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, chip_a, weights):
    """The embed job's outputs for chip A's pixels (a GeoTIFF holding exactly that chip)."""
    raw, names, profile, _ = chip_a
    root = tmp_path_factory.mktemp("pipeline")
    crop = _write(root / "chip_a.tif", raw, profile, names)
    embed([crop], root / "out", output="both", weights=weights, batch_size=1, progress=False)
    with rasterio.open(root / "out" / "chip_a_grid.tif") as src:
        grid, grid_transform = src.read(), src.transform
    pooled = gpd.read_parquet(root / "out" / "chip_a_pooled.parquet")
    return SimpleNamespace(grid=grid, transform=grid_transform, pooled=pooled)


@pytest.fixture(scope="module")
def tensor_a(chip_a, weights):
    """get_embedding(backend='tensor') of chip A: pooled and grid."""
    raw, names, _, _ = chip_a
    sensor = SensorSpec(bands=tuple(names))
    pooled = get_embedding(
        "dofa", input_chw=raw, sensor=sensor, backend="tensor", weights=weights, device="cpu"
    )
    grid = get_embedding(
        "dofa",
        input_chw=raw,
        sensor=sensor,
        output=OutputSpec.grid(),
        backend="tensor",
        weights=weights,
        device="cpu",
    )
    return SimpleNamespace(pooled=pooled, grid=grid)


# ------------------------------------------------------------------------------ tensor backend


def test_tensor_pooled_equals_pipeline_pooled(tensor_a, pipeline, weights) -> None:
    assert len(pipeline.pooled) == 1
    row = pipeline.pooled.iloc[0]
    assert tensor_a.pooled.data.shape == (768,)
    assert tensor_a.pooled.data.dtype == np.float32
    _close(tensor_a.pooled.data, np.asarray(row.embedding))
    assert tensor_a.pooled.meta["pooled_norm"] == row.pooled_norm == "trained"
    assert tensor_a.pooled.meta["weights"] == row.weights == not_official(Path(weights))


def test_tensor_grid_equals_pipeline_grid_cells(tensor_a, pipeline) -> None:
    assert tensor_a.grid.data.shape == (768, 14, 14)
    assert pipeline.grid.shape == (768, 14, 14)
    _close(tensor_a.grid.data, pipeline.grid)
    # the pooled vector is not the grid's plain mean (LayerNorm with the trained affine)
    assert not np.allclose(tensor_a.grid.data.mean(axis=(1, 2)), tensor_a.pooled.data)


def test_meta_records_provenance(tensor_a) -> None:
    meta = tensor_a.grid.meta
    assert meta["model"] == "dofa" and meta["backend"] == "tensor"
    assert meta["variant"] == "base" and meta["embed_dim"] == 768
    assert meta["bands"] == ["B4", "B3", "B2", "B8"]
    assert meta["wavelengths_um"] == [0.665, 0.56, 0.49, 0.842]
    assert meta["input_size_hw"] == [224, 224] and meta["model_input_hw"] == [224, 224]
    assert meta["input_prep"] == "resize" and meta["output"] == "grid"
    assert meta["preprocessing"]["size"]["padding_tblr"] == [0, 0, 0, 0]
    assert meta["grid_shape"] == [768, 14, 14]
    json.dumps(meta)  # plain, serialisable values


def test_local_meta_records_the_acquisition_span(tmp_path, tensor_a) -> None:
    """``meta`` had the requested ``temporal`` range only, not when the pixels were acquired.
    Now ``acquisition_start`` / ``acquisition_end`` (ISO 8601 UTC) are the span of the
    scenes the chip read, as the ``temporal`` selection dates them (a name's day, or its
    second); None for an undated file and the tensor backend."""
    from tests.scenes import dated_copies

    folder = tmp_path / "dated"
    dated_copies(
        folder,
        [
            ("T33UVP_20220614.tif", 0.0, 0),
            ("T33UVP_20211015T101559.tif", 0.0, 300),
            ("undated.tif", 0.0, 0),
        ],
    )
    with rasterio.open(folder / "undated.tif") as src:
        point = _centre_point(tuple(src.bounds))
    kwargs: dict[str, Any] = dict(spatial=point, weights=None, device="cpu")
    day = get_embedding("dofa", paths=folder / "T33UVP_20220614.tif", **kwargs)  # that day
    assert (day.meta["acquisition_start"], day.meta["acquisition_end"]) == (
        "2022-06-14T00:00:00Z",
        "2022-06-14T23:59:59.999999Z",
    )
    # two dated inputs, temporal picks one: the span of the scene read, to its second
    timed = get_embedding(
        "dofa", paths=[folder / "T33UVP_20211015T101559.tif", folder / "T33UVP_20220614.tif"],
        temporal=TemporalSpec.range("2021-10-01", "2021-11-01"), **kwargs,
    )  # fmt: skip
    assert timed.meta["source"] == [str(folder / "T33UVP_20211015T101559.tif")]
    assert (timed.meta["acquisition_start"], timed.meta["acquisition_end"]) == (
        "2021-10-15T10:15:59Z",
        "2021-10-15T10:15:59.999999Z",
    )
    undated = get_embedding("dofa", paths=folder / "undated.tif", **kwargs)
    assert undated.meta["acquisition_start"] is None and undated.meta["acquisition_end"] is None
    meta = tensor_a.pooled.meta
    assert meta["acquisition_start"] is None and meta["acquisition_end"] is None


def test_pooled_norm_conventions(chip_a, weights, tensor_a) -> None:
    """'trained' = checkpoint norm on the token mean (rs-embed); 'plain' = no affine."""
    import torch
    import torch.nn.functional as F

    raw, names, _, _ = chip_a
    tokens_mean = torch.from_numpy(tensor_a.grid.data).flatten(1).mean(dim=1)
    module = api._module("base", weights, "cpu")
    with torch.inference_mode():
        _close(tensor_a.pooled.data, module.encoder.norm(tokens_mean).numpy())
    plain = get_embedding(
        "dofa", input_chw=raw, sensor=SensorSpec(bands=tuple(names)), pooled_norm="plain",
        weights=weights, device="cpu",
    )  # fmt: skip
    assert plain.meta["pooled_norm"] == "plain"
    _close(plain.data, F.layer_norm(tokens_mean, (768,), eps=1e-6).numpy())
    assert not np.allclose(plain.data, tensor_a.pooled.data, atol=1e-3)


def test_another_sensors_bands_with_given_statistics(chip_a, weights) -> None:
    """SensorSpec(mean=, std=) normalises bands DOFA has no statistics for; the same
    statistics as DOFA's for B4/B3/B2/B8 under other names give the same embedding."""
    raw, names, _, _ = chip_a
    stats = [norm_stats([n]) for n in names]
    mean, std = tuple(m[0][0] for m in stats), tuple(m[1][0] for m in stats)
    other = SensorSpec(
        bands=("red", "green", "blue", "nir"),
        wavelengths=tuple(infer_wavelengths(names)),
        mean=mean,
        std=std,
    )
    emb = get_embedding("dofa", input_chw=raw, sensor=other, weights=weights, device="cpu")
    same = get_embedding(
        "dofa", input_chw=raw, sensor=SensorSpec(bands=tuple(names)), weights=weights, device="cpu"
    )
    np.testing.assert_array_equal(emb.data, same.data)
    assert emb.meta["preprocessing"]["normalization"]["mean"] == pytest.approx(list(mean))
    with pytest.raises(BandError, match="no DOFA normalisation statistics.*mean=\\[...\\]"):
        no_stats = SensorSpec(bands=other.bands, wavelengths=other.wavelengths)
        get_embedding("dofa", input_chw=raw, sensor=no_stats, weights=weights, device="cpu")


def test_encoders_are_cached(tensor_a, weights) -> None:
    first = api._module("base", weights, "cpu")
    assert api._module("base", weights, "cpu") is first
    wkey = api._weights_key(weights)
    assert [k for k in api._CACHE if k[0] == "base" and k[2] == "cpu" and k[1] == wkey] == [
        ("base", wkey, "cpu")
    ]
    common: dict[str, Any] = dict(
        weights=weights, pooled_norm="trained", input_prep="resize", output="pooled",
        device="cpu", model_config=None,
    )  # fmt: skip
    assert api._config("dofa", variant="b", **common).variant == "base"
    assert api._config("DOFA", variant="l", **common).variant == "large"


def test_nodata_and_padding_cells_are_nan(chip_a, weights, tensor_a) -> None:
    """NaN pixels are filled and masked by the stack; cells without valid pixels are NaN."""
    raw, names, _, _ = chip_a
    data = raw.astype(np.float32)
    data[:, :16, :16] = np.nan  # exactly grid cell (0, 0)
    emb = get_embedding(
        "dofa",
        input_chw=data,
        sensor=SensorSpec(bands=tuple(names)),
        output="grid",
        weights=weights,
        device="cpu",
    )
    assert np.isnan(emb.data[:, 0, 0]).all()
    assert np.isfinite(emb.data[:, 1:, :]).all() and np.isfinite(emb.data[:, 0, 1:]).all()
    assert emb.meta["valid_fraction"] == pytest.approx(1 - 256 / 224**2)
    # filled with 0, so the other cells differ from the unmasked input's
    assert not np.allclose(emb.data[:, 5, 5], tensor_a.grid.data[:, 5, 5], atol=1e-4)


# ------------------------------------------------------------------------------ batching


def test_batch_from_inputs_equals_one_by_one(chip_a, weights, tensor_a, monkeypatch) -> None:
    raw, names, _, _ = chip_a
    small = raw[:, 10:110, 30:180]  # 100 x 150: padded to a square, then resized
    sensor = SensorSpec(bands=tuple(names))
    single = get_embedding("dofa", input_chw=small, sensor=sensor, weights=weights, device="cpu")
    assert single.meta["preprocessing"]["size"]["padding_tblr"] == [25, 25, 0, 0]

    module = api._module("base", weights, "cpu")
    calls: list[int] = []
    hook = module.encoder.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    monkeypatch.setenv("TORCHGEO_DOFA_BATCH_SIZE", "8")
    try:
        batch = get_embeddings_batch_from_inputs(
            "dofa", input_chws=[raw, small], sensor=sensor, weights=weights, device="cpu"
        )
    finally:
        hook.remove()
    assert calls == [2]  # one forward pass for both inputs
    _close(batch[0].data, tensor_a.pooled.data)
    _close(batch[1].data, single.data)
    assert batch[1].meta["input_size_hw"] == [100, 150]


def test_tile_grid_stitches_tiles(chip_a, weights, tensor_a) -> None:
    """A 224 x 448 input tiles into the first chip (left) and chip A (right), stitched."""
    raw_a, names, _, _ = chip_a
    raw_ab, _, _, _ = _scene_window(0.0, 0.0, w=2 * CHIP_M)
    assert np.array_equal(raw_ab[:, :, 224:], raw_a)
    sensor = SensorSpec(bands=tuple(names))
    tiled = get_embedding(
        "dofa", input_chw=raw_ab, sensor=sensor, output=OutputSpec.grid(), input_prep="tile",
        weights=weights, device="cpu",
    )  # fmt: skip
    assert tiled.data.shape == (768, 14, 28)
    assert tiled.meta["n_tiles"] == 2
    _close(tiled.data[:, :, 14:], tensor_a.grid.data)
    # pooled over the stitched grid (the embed job's convention for tiles)
    module = api._module("base", weights, "cpu")
    import torch

    grid = torch.from_numpy(tiled.data)
    tokens = torch.cat([grid.new_zeros(1, 768), grid.flatten(1).T])[None]
    pooled = get_embedding(
        "dofa", input_chw=raw_ab, sensor=sensor, input_prep="tile", weights=weights,
        device="cpu",
    )  # fmt: skip
    with torch.inference_mode():
        _close(pooled.data, module.encoder.pool(tokens)[0].numpy())


def test_tiled_inputs_of_other_sizes_are_batched_apart(chip_a, weights) -> None:
    """Two inputs tiled alike (2 tiles) but of other sizes (224 x 448, 224 x 400) went into
    one batch, whose stitched grids torch.stack refused (a RuntimeError traceback, a
    stranger's finding). Each now gets its own grid, as embedded alone."""
    from torchgeo_dofa.datasets import stack_dofa_samples
    from torchgeo_dofa.embedder import DOFAEmbedder
    from torchgeo_dofa.transforms import DOFAPreprocess

    _, names, _, _ = chip_a
    raw_ab, _, _, _ = _scene_window(0.0, 0.0, w=2 * CHIP_M)
    inputs = [raw_ab, raw_ab[:, :, :400]]
    sensor = SensorSpec(bands=tuple(names))
    kwargs: dict[str, Any] = {"sensor": sensor, "input_prep": "tile", "weights": weights}
    grids = get_embeddings_batch_from_inputs(
        "dofa", input_chws=inputs, output=OutputSpec.grid(), device="cpu", **kwargs
    )
    assert [g.data.shape for g in grids] == [(768, 14, 28), (768, 14, 25)]
    for chw, batched in zip(inputs, grids, strict=True):
        alone = get_embedding("dofa", input_chw=chw, output=OutputSpec.grid(), **kwargs)
        np.testing.assert_array_equal(batched.data, alone.data)
    # a data module's batch of such tiles: a ValueError naming the sizes, not torch's
    prep = DOFAPreprocess(bands=names, input_prep="tile", whole_input=True)
    batch = stack_dofa_samples(
        prep({"image": torch.from_numpy(chw.astype(np.float32))}) for chw in inputs
    )
    module = DOFAEmbedder(weights=weights)
    with pytest.raises(ValueError, match=r"tiled inputs of different sizes \(224x448, 224x400"):
        module.predict_step(batch, 0)


# ------------------------------------------------------------------------------ local backend


def test_local_equals_tensor_on_same_window(chip_a, weights, tensor_a, pipeline) -> None:
    _, _, _, bounds = chip_a
    point = _centre_point(bounds)
    [emb] = get_embeddings_batch(
        "dofa", spatials=[point], paths=[SCENE], output=OutputSpec.grid(), weights=weights,
        device="cpu",
    )  # fmt: skip
    assert emb.meta["backend"] == "local" and emb.meta["crs"] == "EPSG:32633"
    assert emb.meta["bounds"] == pytest.approx(list(bounds))
    _close(emb.data, tensor_a.grid.data)
    # georeferenced like the embed job's GeoTIFF: 160 m cells from the chip's top-left corner
    assert emb.meta["grid_transform"] == pytest.approx(list(pipeline.transform)[:6])


def test_local_paths_in_other_crss_are_refused_not_warped(tmp_path, chip_a, weights) -> None:
    """paths=[a folder in UTM 34, one in UTM 35] was read as one dataset in the first's CRS:
    the second warped 7 degrees out of its zone, the first's bounds moved 4 m, no word;
    the parent folder of both was refused as mixed CRS (helper-128). Refused alike now,
    naming each CRS's inputs; the fix it names (one CRS chosen) works."""
    raw, names, profile, bounds = chip_a
    (tmp_path / "a").mkdir()
    a = _write(tmp_path / "a" / "zone33.tif", raw, profile, names)
    far = profile | {"crs": "EPSG:32634", "transform": Affine(10, 0, 400000, 0, -10, 5360000)}
    (tmp_path / "b").mkdir()
    b = _write(tmp_path / "b" / "zone34.tif", raw, far, names)
    point = _centre_point(bounds)
    kwargs: dict[str, Any] = {"spatial": point, "weights": weights, "device": "cpu"}
    with pytest.raises(ModelError) as info:
        get_embedding("dofa", paths=[tmp_path / "a", tmp_path / "b"], **kwargs)
    assert str(info.value).startswith(
        "local input: the paths lie in 2 CRSs (EPSG:32633: a; EPSG:32634: b), and are read as "
        "one dataset, in the first one's CRS (the others warped into it): call once per CRS"
    ), info.value
    assert "paths=Sentinel2SR([...], crs='EPSG:<code>')" in str(info.value)
    with pytest.raises(ModelError, match=r"mixed CRS .* go in separate calls \(one paths= each\)"):
        get_embedding("dofa", paths=tmp_path, **kwargs)  # the folder of both, as before
    # the fixes it names: a call per CRS, or a mosaic read in one CRS, whose chips lie on
    # the pixels of its files in that CRS (they lay on the mosaic's corner, here the warped
    # file's: a's pixels read shifted by 0.45 px, resampled)
    alone = get_embedding("dofa", paths=a, **kwargs)
    assert alone.meta["crs"] == "EPSG:32633" and alone.meta["bounds"] == pytest.approx(bounds)
    mosaic = get_embedding("dofa", paths=Sentinel2SR([a, b], crs="EPSG:32633"), **kwargs)
    assert mosaic.meta["crs"] == "EPSG:32633" and mosaic.meta["bounds"] == alone.meta["bounds"]
    np.testing.assert_array_equal(mosaic.data, alone.data)


def test_local_reads_through_a_subclass_read_chip(tmp_path, chip_a, weights, tensor_a) -> None:
    from torchgeo_dofa.datasets import Sentinel2SR

    class Mirrored(Sentinel2SR):
        """A user's own reading: the chip mirrored left to right."""

        def read_chip(self, index):
            sample = super().read_chip(index)
            sample["image"], sample["valid"] = sample["image"].flip(-1), sample["valid"].flip(-1)
            return sample

    raw, names, profile, bounds = chip_a
    path = _write(tmp_path / "chip.tif", raw, profile, names)
    emb = get_embedding(
        "dofa", spatial=_centre_point(bounds), paths=Mirrored(paths=path), weights=weights,
        device="cpu",
    )  # fmt: skip
    mirrored = get_embedding(
        "dofa", input_chw=raw[:, :, ::-1].copy(), sensor=SensorSpec(bands=tuple(names)),
        backend="tensor", weights=weights, device="cpu",
    )  # fmt: skip
    _close(emb.data, mirrored.data)
    assert not np.allclose(emb.data, tensor_a.pooled.data, atol=1e-3)  # the override was used
    assert emb.meta["source"] == [str(path)]


def test_local_mixed_crs_says_where_crs_goes(tmp_path) -> None:
    from rasterio.transform import from_origin

    data = np.full((4, 8, 8), 1500, dtype=np.uint16)
    for name, crs in (("a.tif", "EPSG:32631"), ("b.tif", "EPSG:32632")):
        with rasterio.open(
            tmp_path / name, "w", driver="GTiff", width=8, height=8, count=4, dtype="uint16",
            crs=crs, transform=from_origin(500000, 5600000, 10, 10),
        ) as dst:  # fmt: skip
            dst.write(data)
            dst.descriptions = ("B4", "B3", "B2", "B8")
    with pytest.raises(ModelError) as refused:
        get_embedding("dofa", spatial=PointBuffer(3.0, 50.5, 100), paths=tmp_path, weights=None)
    assert str(refused.value).startswith("local input: mixed CRS in region")
    assert str(refused.value).endswith(
        "(crs= goes to a dataset given as paths=Sentinel2SR(..., crs=...))"
    )


def test_local_file_without_crs_says_where_crs_goes(tmp_path) -> None:
    """A file without CRS raised a plain ValueError 'pass crs=', an argument get_embedding
    does not have."""
    from rasterio.transform import from_origin

    with rasterio.open(
        tmp_path / "a.tif", "w", driver="GTiff", width=8, height=8, count=4, dtype="uint16",
        transform=from_origin(500000, 5600000, 10, 10),
    ) as dst:  # fmt: skip
        dst.write(np.full((4, 8, 8), 1500, dtype=np.uint16))
        dst.descriptions = ("B4", "B3", "B2", "B8")
    with pytest.raises(InputError, match=r"a.tif has no CRS: pass crs= .*\(gdal_edit.py -a_srs "
                       r".*go to a dataset given as paths=Sentinel2SR\(\.\.\.\), and its "
                       r"bands= with them\)$"):  # fmt: skip
        get_embedding("dofa", spatial=PointBuffer(3.0, 50.5, 100), paths=tmp_path, weights=None)


def test_local_band_errors_say_where_the_datasets_arguments_go(tmp_path, chip_a) -> None:
    raw, _, profile, bounds = chip_a
    path = _write(tmp_path / "rgbn.tif", raw, profile, ("red", "green", "blue", "nir"))
    with pytest.raises(BandError, match=r"file_bands=\['B4', 'B3', 'B2', 'B8'\].*"
                       r"go to a dataset given as paths=Sentinel2SR\(\.\.\.\), and its bands= "
                       r"with them\)$"):  # fmt: skip
        get_embedding("dofa", spatial=_centre_point(bounds), paths=path, weights=None)


def test_a_weights_file_replaced_under_its_name_is_loaded_again(
    tmp_path, chip_a, base_state, monkeypatch
) -> None:
    """The encoder cache was keyed by the file's name: a checkpoint copied over it (a fit's
    last.ckpt, every epoch) was never read again, its old encoder served, and an export's
    identity recorded the new file beside the old file's rows."""
    raw, names, _, _ = chip_a
    path = write_checkpoint(tmp_path / "w.pth", base_state)
    kwargs: dict[str, Any] = dict(
        input_chw=raw, sensor=SensorSpec(bands=tuple(names)), backend="tensor", device="cpu"
    )
    first = get_embedding("dofa", weights=str(path), **kwargs).data
    other = dict(base_state)
    other["norm.bias"] = base_state["norm.bias"] + 1.0  # the pooled vector shifts by 1
    write_checkpoint(tmp_path / "new.pth", other).replace(path)
    second = get_embedding("dofa", weights=str(path), **kwargs).data
    np.testing.assert_allclose(second, first + 1.0, atol=1e-4)
    # unchanged since: served from the cache (the same encoder object)
    assert api._module("base", str(path), "cpu") is api._module("base", str(path), "cpu")
    # rewritten in place to the same size, its modification time put back (cp -p, an
    # archive): its change time tells
    old = path.stat()
    other["norm.bias"] = base_state["norm.bias"] + 2.0
    data = write_checkpoint(tmp_path / "3" / "new.pth", other).read_bytes()  # its archive name
    assert len(data) == old.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    third = get_embedding("dofa", weights=str(path), **kwargs).data
    np.testing.assert_allclose(third, first + 2.0, atol=1e-4)
    # "official" read from TORCHGEO_DOFA_WEIGHTS_DIR: the file there replaced
    folder = tmp_path / "official"
    official = write_checkpoint(folder / "DOFA_ViT_base_e100.pth", base_state)
    monkeypatch.setenv("TORCHGEO_DOFA_WEIGHTS_DIR", str(folder))
    np.testing.assert_allclose(get_embedding("dofa", weights="official", **kwargs).data, first)
    path.replace(official)
    np.testing.assert_allclose(
        get_embedding("dofa", weights="official", **kwargs).data, first + 2.0, atol=1e-4
    )


def test_regions_and_devices_that_cannot_be_embedded_are_one_line(tmp_path, chip_a) -> None:
    """helper-113: an empty polygon, a point or line geometry ("cannot convert float NaN
    to integer", numpy's), a (lon, lat) tuple among regions, and device="meta" ("Tensor.item()
    cannot be called on meta tensors", torch's) were other libraries' errors. Each is a
    ModelError naming it and the region types or devices to use."""
    raw, names, profile, bounds = chip_a
    crop = _write(tmp_path / "chip.tif", raw, profile, names)
    cpu: dict[str, Any] = {"weights": None, "device": "cpu", "paths": crop}
    point = _centre_point(bounds)
    d = 0.005
    for spatial, said in (
        (shapely.Polygon(), r"spatial is an empty geometry \(POLYGON EMPTY\): give a polygon "
         r"with an area, a BBox\(minlon, minlat, maxlon, maxlat\), or PointBuffer\(lon, lat, "
         r"buffer_m\) for a point"),
        (shapely.Point(point.lon, point.lat), r"spatial is a Point without area \(POINT \("),
        (shapely.box(point.lon, point.lat, point.lon, point.lat + 0.01),
         "spatial is a Polygon without area"),
        # helper-116: a NaN vertex (finite bounds), metres of a UTM zone, a bowtie
        (shapely.Polygon([(13.14, 48.29), (float("nan"), 48.295), (13.145, 48.29)]),
         "spatial is a geometry with coordinates that are not finite numbers"),
        (shapely.box(360000, 5349000, 361000, 5350000),
         r"spatial \(POLYGON \(\(361000 .*\) lies outside longitude -180..180 / latitude "
         r"-90..90: a region's coordinates are longitude and latitude \(EPSG:4326\)"),
        (shapely.Polygon([(point.lon - d, point.lat - d), (point.lon + d, point.lat + 2 * d),
                          (point.lon + d, point.lat - d), (point.lon - d, point.lat + d)]),
         r"spatial \(POLYGON .*\) is not a valid Polygon \(Self-intersection\[.*\]\): part "
         r"of it would be read, or none; repair it \(shapely.make_valid\)"),
    ):  # fmt: skip
        with pytest.raises(ModelError, match=f"^{said}"):
            get_embedding("dofa", spatial=spatial, **cpu)
    with pytest.raises(ModelError, match=r"^spatials\[1\]=\(4.3, 50.8\) is a tuple, not a "
                       r"region: give PointBuffer\(lon, lat, buffer_m\)"):  # fmt: skip
        get_embeddings_batch("dofa", spatials=[point, (4.3, 50.8)], **cpu)
    with pytest.raises(ModelError, match=r"^spatials\[0\] is a LineString without area"):
        export_batch(
            spatials=[shapely.LineString([(4.3, 50.8), (4.4, 50.9)])], models=["dofa"],
            out_path=tmp_path / "t.parquet", backend="local", paths=crop, weights=None,
            device="cpu",
        )  # fmt: skip
    assert not (tmp_path / "t.parquet").exists()
    with pytest.raises(ModelError, match=r"^device 'meta' is not one embeddings are computed "
                       r"on here: use 'auto', 'cpu' or 'cuda\[:N\]' \('meta' tensors hold no "
                       r"values\)$"):  # fmt: skip
        get_embedding("dofa", spatial=point, paths=crop, weights=None, device="meta")


def test_an_export_stopped_the_instant_it_took_its_lock_leaves_nothing(
    tmp_path, monkeypatch
) -> None:
    """A Ctrl-C (or the command's SIGTERM) raised as the folder's lock was taken, before the
    block that gives it back began, left the export's new folder and its lock file (the CI
    failure of an ``embed``, test_jobs; an export took its lock the same way)."""
    from torchgeo_dofa.locks import OutputLock

    taken = OutputLock.acquire

    def taken_then_interrupted(self: OutputLock) -> None:
        taken(self)  # the real lock
        raise KeyboardInterrupt  # where a signal's handler raises, the caller's next step

    monkeypatch.setattr(OutputLock, "acquire", taken_then_interrupted)
    with rasterio.open(SCENE) as src:
        b = src.bounds
    centre = _scene_lonlat((b.left + b.right) / 2, (b.bottom + b.top) / 2)
    with pytest.raises(KeyboardInterrupt):
        export_batch(
            spatials=[PointBuffer(*centre, 500)], models=["dofa"], weights=None, paths=[SCENE],
            device="cpu", out_path=tmp_path / "new" / "e.parquet",
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []
    assert not OutputLock._held and not OutputLock._holders


def test_sensor_fetch_settings_a_backend_ignores_are_warned_of(tmp_path, chip_a, weights) -> None:
    """helper-113: ``SensorSpec(scale_m=20, composite="mosaic", ...)`` with the local or the
    tensor backend (Earth Engine's and the stac backend's fetch settings) changed nothing,
    without a word. Now a warning naming them and what the backend does instead; the
    embedding is the one without them; the defaults say nothing."""
    raw, names, profile, bounds = chip_a
    crop = _write(tmp_path / "chip.tif", raw, profile, names)
    point = _centre_point(bounds)
    cpu: dict[str, Any] = {"weights": weights, "device": "cpu"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default fetch settings: not a word
        plain = get_embedding(
            "dofa", spatial=point, paths=crop, sensor=SensorSpec(bands=names), **cpu
        )
    sensor = SensorSpec(bands=names, scale_m=20, composite="mosaic", collection="X/Y")
    with pytest.warns(UserWarning) as caught:
        local = get_embedding("dofa", spatial=point, paths=crop, sensor=sensor, **cpu)
    said = [str(w.message) for w in caught if "is not used here" in str(w.message)]
    assert said == [
        "SensorSpec(collection='X/Y', scale_m=20, composite='mosaic') is not used here: "
        "backend='local' reads the files as they are, at their own pixel size and without "
        "cloud filtering or compositing (another pixel size: paths=Sentinel2SR(FILES, "
        "res=...)); scale_m, cloudy_pct and composite are the gee and stac backends' fetch "
        "settings, collection Earth Engine's"
    ]
    assert torch.equal(torch.as_tensor(local.data), torch.as_tensor(plain.data))
    # helper-118: a sensor leaving the bands at SensorSpec's default (DOFA's nine, what gee
    # and stac fetch) asked the 4-band file for nine bands: "BandError band(s) ['B5', ...] not
    # found", SensorSpec() and a fill_value alone too; now the file's own bands, as without it
    assert len(names) == 4
    unset = get_embedding("dofa", spatial=point, paths=crop, **cpu)
    for default_bands in (SensorSpec(), SensorSpec(fill_value=0), SensorSpec(scale_m=20)):
        with warnings.catch_warnings(record=True) as recorded:
            warnings.simplefilter("always")
            got = get_embedding("dofa", spatial=point, paths=crop, sensor=default_bands, **cpu)
        assert len(got.meta["bands"]) == 4, default_bands  # the file's, not nine
        assert got.meta["bands"] == unset.meta["bands"]
        assert torch.equal(torch.as_tensor(got.data), torch.as_tensor(unset.data))
        said = [str(w.message) for w in recorded]
        assert [m for m in said if "is not used here" in m] == (
            [] if default_bands.scale_m == 10 else [said[0]]
        ), said
    # helper-120: ... but bands given, even the default's nine names, are read (they were
    # dropped: the 4-band file embedded without a word), as embed --bands reads them
    assert not SensorSpec(fill_value=1).bands_given
    assert not dataclasses.replace(SensorSpec(), fill_value=1).bands_given
    spelt = ("B04", "B03", "B02", "B05", "B06", "B07", "B08", "B11", "B12")
    for nine in (DOFA_S2_BANDS, tuple(list(DOFA_S2_BANDS)), spelt):
        with pytest.raises(
            BandError, match=r"band\(s\) \['B5', 'B6', 'B7', 'B11', 'B12'\] not found"
        ):
            get_embedding("dofa", spatial=point, paths=crop, sensor=SensorSpec(bands=nine), **cpu)
    with pytest.warns(UserWarning, match=r"^SensorSpec\(cloudy_pct=10\) is not used here: "
                      r"backend='tensor' embeds input_chw's pixels as given"):  # fmt: skip
        get_embedding("dofa", input_chw=raw, sensor=SensorSpec(bands=names, cloudy_pct=10), **cpu)


def test_a_sensor_choosing_bands_a_dataset_does_not_read_is_refused(tmp_path, chip_a) -> None:
    """``paths=Sentinel2SR(file_bands=[...two dates...])`` with
    ``sensor=SensorSpec(bands=(the second date's))`` (as the band errors' hint said: bands=
    to sensor=) embedded the first date's bands, meta["bands"] saying so, no word. The
    sensor's bands are the dataset's, or it is refused; the default sensor, a ``fill_value``
    alone and the dataset's own bands (another spelling) pass."""
    raw, names, profile, bounds = chip_a
    two = np.concatenate([raw, raw // 2 + 100])
    stack = _write(tmp_path / "two_dates.tif", two, profile | {"count": 8}, [""] * 8)
    second = ("B2_1", "B3_1", "B4_1", "B8_1")
    with pytest.warns(UserWarning, match="which the default bands"):  # the first date's
        ds = Sentinel2SR(stack, file_bands=[*names, *second])
    point = _centre_point(bounds)
    cpu: dict[str, Any] = {"weights": None, "device": "cpu"}
    with pytest.raises(ModelError) as refused:
        get_embedding("dofa", spatial=point, paths=ds, sensor=SensorSpec(bands=second), **cpu)
    assert str(refused.value) == (
        "sensor=SensorSpec(...) gives bands ['B2_1', 'B3_1', 'B4_1', 'B8_1'], but the dataset "
        "given as paths= reads the bands ['B2', 'B3', 'B4', 'B8'] (wavelengths [0.49, 0.56, "
        "0.665, 0.842] um), the ones it was built with: build it with bands=[...] (and "
        "wavelengths=[...]), e.g. Sentinel2SR(..., bands=['B2_1', 'B3_1', 'B4_1', 'B8_1']), or "
        "leave bands, wavelengths, mean and std out of sensor="
    )
    with pytest.raises(ModelError, match=r"^sensor=SensorSpec\(...\) gives wavelengths \[0.5"):
        get_embedding(
            "dofa", spatial=point, paths=ds, **cpu,
            sensor=SensorSpec(bands=ds.bands, wavelengths=(0.5,) * 4),
        )  # fmt: skip
    with pytest.raises(ModelError, match=r"^sensor=SensorSpec\(...\) gives bands \['B4', "):
        get_embedding("dofa", spatial=point, paths=ds, sensor=SensorSpec(mean=(1.0,) * 4), **cpu)
    with pytest.raises(ModelError, match=r"gives bands \['B4', 'B3', 'B2', 'B5'"):
        export_batch(
            spatials=[point], temporal=None, out_path=tmp_path / "e.parquet", paths=ds,
            models=[ExportModelRequest.configure("dofa", weights=None)],
            sensor=SensorSpec(bands=DOFA_S2_BANDS, wavelengths=(0.6,) * 9), device="cpu",
        )  # fmt: skip
    assert not (tmp_path / "e.parquet").exists()
    # a later request's sensor: refused before the first request is computed (it was
    # computed, its parts left, then the run stopped)
    with pytest.raises(ModelError, match=r"gives bands \['B02', 'B03', 'B04'\]"):
        export_batch(
            spatials=[point], temporal=None, out_path=tmp_path / "e.parquet", paths=ds,
            models=[ExportModelRequest.configure("dofa", weights=None),
                    ExportModelRequest("dofa", sensor=SensorSpec(bands=("B02", "B03", "B04")),
                                       model_config={"weights": None})],
            continue_on_error=True, device="cpu",
        )  # fmt: skip
    assert not list(tmp_path.glob("e.parquet*"))
    # the second date, chosen where bands are chosen: the dataset's bands=
    chosen = Sentinel2SR(stack, file_bands=[*names, *second], bands=list(second))
    spelt = SensorSpec(bands=("b02_1", "B03_1", "B04_1", "b08_1"), fill_value=0.0)
    for sensor in (None, SensorSpec(), SensorSpec(fill_value=0.0), spelt):
        emb = get_embedding("dofa", spatial=point, paths=chosen, sensor=sensor, **cpu)
        assert emb.meta["bands"] == list(second)


def test_local_temporal_selects_scene_by_date(tmp_path, chip_a, weights, tensor_a) -> None:
    raw, names, profile, bounds = chip_a
    folder = tmp_path / "dated"
    folder.mkdir()
    _write(folder / "S2_20220614.tif", raw, profile, names)
    other = (raw.astype(np.float64) * 0.5 + 300).astype(raw.dtype)
    _write(folder / "S2_20211015.tif", other, profile, names)
    point = _centre_point(bounds)
    emb = get_embedding(
        "dofa", spatial=point, temporal=TemporalSpec.range("2022-06-01", "2022-07-01"),
        paths=folder, weights=weights, device="cpu",
    )  # fmt: skip
    assert emb.meta["backend"] == "local"  # "auto" with paths
    assert emb.meta["temporal"] == ["2022-06-01", "2022-07-01"]
    assert emb.meta["source"] == [str(folder / "S2_20220614.tif")]  # not the 2021 file too
    _close(emb.data, tensor_a.pooled.data)
    with pytest.raises(LookupError) as none_then:
        get_embedding(
            "dofa", spatial=point, temporal=TemporalSpec.year(2020), paths=folder,
            weights=weights, device="cpu",
        )  # fmt: skip
    assert str(none_then.value) == (
        "no scene of the inputs is acquired within 2020-01-01 .. 2020-12-31 (they are dated "
        "2021-10-15, 2022-06-14): choose dates that hold scenes"
    )
    far = PointBuffer(lon=0.0, lat=0.0, buffer_m=500)
    with pytest.raises(LookupError, match="no scene"):
        get_embedding("dofa", spatial=far, paths=folder, weights=weights, device="cpu")
    # helper-118: the data's extent was said in the files' CRS alone (UTM metres), so a
    # point given as (lat, lon) showed nothing wrong; now in longitude / latitude too
    swapped = PointBuffer(lon=point.lat, lat=point.lon, buffer_m=500)
    with pytest.raises(LookupError) as off:
        get_embedding("dofa", spatial=swapped, paths=folder, weights=weights, device="cpu")
    from rasterio.warp import transform_bounds

    with rasterio.open(folder / "S2_20220614.tif") as src:
        w, s, e, n = transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=21)
    assert str(off.value).endswith(
        f"in EPSG:32633, lon {w:.4f} .. {e:.4f}, lat {s:.4f} .. {n:.4f})"
    ), str(off.value)
    # without temporal=, both dates meet the chip: refused (it was one image of both dates'
    # pixels, the first file's where valid)
    with pytest.raises(ModelError) as mixed:
        get_embedding("dofa", spatial=point, paths=folder, weights=weights, device="cpu")
    assert str(mixed.value) == (
        "local input: S2_20211015.tif (acquired 2021-10-15) and S2_20220614.tif (acquired "
        "2022-06-14) overlap: a chip would mix the two dates' pixels, and DOFA embeds one "
        "acquisition at a time (2 dates among the inputs). Choose the dates with "
        "temporal=TemporalSpec.range('2021-10-15', '2021-10-16'), or give the files as "
        "separate inputs (one output each)"
    )


# ------------------------------------------------------------------------------ size, coverage


def _scene_lonlat(x: float, y: float) -> tuple[float, float]:
    to_wgs84 = pyproj.Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    lon, lat = to_wgs84.transform(x, y)
    return float(lon), float(lat)


class _NeverRead(Sentinel2SR):
    """The demo scene, failing if a chip is ever read (a refusal must come before the read)."""

    def read_chip(self, index):
        raise AssertionError(f"read {index}")


def test_region_too_large_is_refused_before_reading(monkeypatch, tmp_path) -> None:
    """The reported case: a 50 km buffer on a 5.8 x 3.8 km raster read 10000 x 10000 px."""
    monkeypatch.delenv("TORCHGEO_DOFA_MAX_PIXELS", raising=False)
    monkeypatch.delenv("RS_EMBED_DOFA_MAX_PIXELS", raising=False)
    assert api.max_pixels() == api.DEFAULT_MAX_PIXELS == 4096 * 4096
    huge = PointBuffer(lon=13.1394, lat=48.2926, buffer_m=50000)
    with pytest.raises(ModelError) as refused:
        get_embedding("dofa", paths=_NeverRead(paths=SCENE), spatial=huge, weights=None)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{huge!r} covers 10000 x 10000 px (100 Mpx, about 1.5 GiB as ")
    for part in (
        "on the data's 10 m grid",
        "16.8 Mpx",
        "TORCHGEO_DOFA_MAX_PIXELS",
        "a smaller buffer_m (about 20480 m or less)",
        "torchgeo-dofa embed FILES --bbox",
    ):
        assert part in message
    # the buffer it names fits; boxes, batches, export and the limit's knob are refused alike
    monkeypatch.setenv("TORCHGEO_DOFA_MAX_PIXELS", str(224 * 224))
    with rasterio.open(SCENE) as src:
        b = src.bounds
    box = BBox(*_scene_lonlat(b.left + 100, b.bottom + 100), *_scene_lonlat(b.right, b.top))
    with pytest.raises(ModelError, match=r"^BBox\(.* covers \d+ x \d+ px .*a smaller BBox"):
        get_embedding("dofa", paths=_NeverRead(paths=SCENE), spatial=box, weights=None)
    centre = _scene_lonlat((b.left + b.right) / 2, (b.bottom + b.top) / 2)
    with pytest.raises(ModelError, match=r"covers 226 x 226 px .*\(about 1120 m or less\)"):
        get_embeddings_batch(
            "dofa", spatials=[PointBuffer(*centre, 1130)], paths=_NeverRead(paths=SCENE),
            weights=None,
        )  # fmt: skip
    with pytest.raises(ModelError, match="covers 226 x 226 px"):
        export_batch(
            spatials=[PointBuffer(*centre, 1130)], models=["dofa"], weights=None,
            paths=_NeverRead(paths=SCENE), out_path=tmp_path / "e.parquet",
        )  # fmt: skip
    # stac: refused before the search (the API below does not exist; it is never asked)
    url = "http://127.0.0.1:9/no-stac-api"
    with pytest.raises(
        ModelError,
        match=r"covers 226 x 226 px \(0\.0511 Mpx, about 2 MiB as float32 for 9 band\(s\)\) "
        r"on the 10 m grid of EPSG:32633, more than the 0\.0502 Mpx .*"
        r"torchgeo-dofa embed --stac URL --bbox",
    ):
        get_embedding(
            "dofa", spatial=PointBuffer(*centre, 1130), stac_url=url, weights=None,
            temporal=TemporalSpec.range("2022-06-01", "2022-07-01"),
        )  # fmt: skip
    monkeypatch.setenv("TORCHGEO_DOFA_MAX_PIXELS", "0")
    with pytest.raises(ModelError, match="TORCHGEO_DOFA_MAX_PIXELS .* positive integer"):
        api.max_pixels()


def test_low_valid_fraction_warns(tmp_path, chip_a, weights) -> None:
    """A region mostly outside the raster: one warning naming the fraction, per call."""
    with rasterio.open(SCENE) as src:
        b = src.bounds
    corner = PointBuffer(*_scene_lonlat(b.left, b.bottom), 1120)  # 1/4 of it on the raster
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emb = get_embedding("dofa", spatial=corner, paths=SCENE, weights=weights, device="cpu")
    assert emb.meta["valid_fraction"] == pytest.approx(0.25, abs=0.01)
    said = [w for w in caught if "valid pixels" in str(w.message)]
    assert len(said) == 1 and said[0].filename == __file__
    text = str(said[0].message)
    assert text.startswith(
        f"1 of 1 input(s) have less than 50% valid pixels ({corner!r}: valid_fraction 0.2"
    )
    assert "mostly describes fill" in text
    # arrays: the sparse one is named, the empty one gets its own warning, not this one
    raw, names, _, _ = chip_a
    sparse, empty = raw.astype(np.float32), np.zeros_like(raw)
    sparse[:, : raw.shape[1] * 3 // 4] = np.nan  # 25 % valid
    quarter_gone = raw.astype(np.float32)
    quarter_gone[:, : raw.shape[1] // 4] = np.nan  # 75 % valid: no warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        embs = get_embeddings_batch_from_inputs(
            "dofa", input_chws=[quarter_gone, sparse, empty], sensor=SensorSpec(bands=tuple(names)),
            weights=weights, device="cpu",
        )  # fmt: skip
    assert [e.meta["valid_fraction"] for e in embs] == [0.75, 0.25, 0.0]
    messages = [str(w.message) for w in caught if "valid pixels" in str(w.message)]
    assert messages == [
        "1 of 3 input(s) have less than 50% valid pixels (input_chws[1]: valid_fraction 0.25): "
        "the rest lies outside the rasters, is no data or masked, so the embedding mostly "
        "describes fill; move or shrink the region onto the data (meta['valid_fraction'] "
        "gives the fraction)"
    ]
    assert sum("no valid pixel" in str(w.message) for w in caught) == 1
    # export warns once, at the end
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_batch(
            spatials=[corner], models=["dofa"], weights=weights, paths=[SCENE], device="cpu",
            out_path=tmp_path / "e.parquet",
        )  # fmt: skip
    assert sum("less than 50% valid pixels" in str(w.message) for w in caught) == 1


def test_a_point_of_a_pixel_or_two_warns(tmp_path, weights) -> None:
    """get_embedding(spatial=PointBuffer(lon, lat, buffer_m=5)) read a 1 x 1 px chip, all
    valid, and stretched it over the model's input without a word: one warning per call."""
    with rasterio.open(SCENE) as src:
        b = src.bounds
    lonlats = [_scene_lonlat(b.left + 1505 + 100 * i, b.bottom + 1505) for i in (0, 1)]
    tiny = [PointBuffer(*lonlat, buffer_m=5) for lonlat in lonlats]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emb = get_embedding("dofa", spatial=tiny[0], paths=SCENE, weights=weights, device="cpu")
    assert emb.meta["input_size_hw"] == [1, 1] and emb.meta["valid_fraction"] == 1.0
    said = [w for w in caught if "DOFA patch" in str(w.message)]
    assert len(said) == 1 and said[0].filename == __file__
    assert str(said[0].message) == (
        f"1 of 1 input(s) are narrower than one 16-px DOFA patch ({tiny[0]!r}: 1 x 1 px; "
        "height x width): each fills the model's 224-px input with those few pixels "
        "(stretched, or repeated when tiled), so its embedding describes their values, not "
        "the place around them; give a larger region (a PointBuffer's buffer_m= of 8 pixels "
        "or more; meta['input_size_hw'] gives the size)"
    )
    whole = PointBuffer(*_scene_lonlat(b.left + 1505, b.bottom + 1505), 80)  # 16 px: quiet
    points = [*tiny, whole]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_embeddings_batch("dofa", spatials=points, paths=SCENE, weights=weights, device="cpu")
        export_batch(
            spatials=points, models=["dofa"], weights=weights, paths=[SCENE], device="cpu",
            out_path=tmp_path / "e.parquet",
        )  # fmt: skip
    told = [str(w.message) for w in caught if "DOFA patch" in str(w.message)]
    assert len(told) == 2 and all(t.startswith("2 of 3 input(s) are narrower") for t in told)


def test_a_files_warning_comes_once_per_call_not_once_per_region(tmp_path) -> None:
    """get_embeddings_batch and export_batch check a file once per region they read from it:
    the file's warning (a band's median above 10000) came once per region, whatever the
    warning filter, as the check's warnings were recorded and issued again, which reset
    Python's once-per-location memory. Now once per call, pointing at the caller's line,
    with the hints named as the API takes them; from threads as well."""
    with rasterio.open(SCENE) as src:
        profile, data, names, b = src.profile, src.read(), src.descriptions, src.bounds
    profile.update(dtype="float32", nodata=None)
    with rasterio.open(tmp_path / "x10.tif", "w", **profile) as dst:
        dst.write(data.astype(np.float32) * 10)  # NIR's median above 10000
        dst.descriptions = names
    points = [
        PointBuffer(*_scene_lonlat(b.left + 800 + 300 * i, b.bottom + 800), buffer_m=80)
        for i in range(3)
    ]
    cpu = dict[str, Any](weights=None, device="cpu", paths=str(tmp_path / "x10.tif"))

    def told(calls: Any) -> list[warnings.WarningMessage]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")  # Python's own: once per location
            calls()
        return [w for w in caught if "more than half of the valid values" in str(w.message)]

    batch = told(lambda: get_embeddings_batch("dofa", spatials=points, **cpu))
    exported = told(
        lambda: export_batch(
            spatials=points, models=["dofa"], out_path=tmp_path / "e.parquet", **cpu
        )
    )
    import pyarrow.parquet

    schema = pyarrow.parquet.read_schema(tmp_path / "e.parquet")  # not null-typed columns
    assert schema.field("time_start").type == schema.field("time_end").type
    assert schema.field("time_end").type == pyarrow.timestamp("us", tz="UTC")
    given = utc_us(["2021-06-01", None])
    assert given[0] == pd.Timestamp("2021-06-01", tz="UTC") and pd.isna(given[1])
    for said in (batch, exported):
        assert len(said) == 1, [str(w.message) for w in said]
        assert said[0].filename == __file__ and said[0].category is ReflectanceWarning
        assert str(said[0].message).startswith(
            "x10.tif: more than half of the valid values of 1 of its 4 bands exceed 10000"
        )
    # each call is told (once): a second batch call is another call
    assert len(told(lambda: get_embeddings_batch("dofa", spatials=points[:2], **cpu))) == 1
    # a call in each of two threads: each told once, neither's filters touched by the other
    from concurrent.futures import ThreadPoolExecutor

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda p: get_embedding("dofa", spatial=p, **cpu), points[:2]))
    assert sum("more than half" in str(w.message) for w in caught) == 2


def test_a_fill_value_hint_names_what_declares_it_for_each_backend(tmp_path, chip_a) -> None:
    """A local file of an undeclared fill value was told "pass nodata=<their value>", but
    get_embedding's nodata= is input_chw's: the local backend ignored it and refused the
    file again. The hint names what works for each backend, and what it names works."""
    raw, names, profile, bounds = chip_a
    ones = _write(tmp_path / "ones.tif", np.ones_like(raw), profile | {"nodata": None}, names)
    point, cpu = _centre_point(bounds, 300), dict[str, Any](weights=None, device="cpu")
    # nodata= with a backend that does not read it was ignored without a word: refused,
    # naming what declares the files' fill value
    with pytest.raises(ModelError) as ignored:
        get_embedding("dofa", spatial=point, paths=ones, nodata=1, **cpu)
    assert str(ignored.value) == (
        "nodata= is the no-data value of input_chw (backend='tensor'); local files declare "
        "theirs: give paths=Sentinel2SR(FILES, nodata=1) (or the dataset class of your "
        "files), or set the files' own (gdal_edit.py -a_nodata 1 FILE)"
    )
    for backend in ("gee", "stac"):
        with pytest.raises(ModelError, match=rf"^nodata= .* the {backend} backend .* nodata=$"):
            source = {"stac_url": tmp_path} if backend == "stac" else {}
            get_embedding("dofa", spatial=point, backend=backend, nodata=0, **source, **cpu)
    with pytest.raises(ReflectanceError) as refused:
        get_embedding("dofa", spatial=point, paths=ones, **cpu)
    assert str(refused.value).endswith(
        "(or pass the raw product). If these are fill pixels, give paths=Sentinel2SR(FILES, "
        "nodata=<their value>) or set the files' own nodata (gdal_edit.py -a_nodata <their "
        "value> FILE; get_embedding's nodata= is input_chw's only)."
    )
    with pytest.warns(UserWarning, match="hold no valid pixel"):
        told = get_embedding("dofa", spatial=point, paths=Sentinel2SR(ones, nodata=1), **cpu)
    with rasterio.open(ones, "r+") as dst:
        dst.nodata = 1  # as gdal_edit.py -a_nodata 1 does
    with pytest.warns(UserWarning, match="hold no valid pixel"):
        tagged = get_embedding("dofa", spatial=point, paths=ones, **cpu)
    assert told.meta["empty"] and tagged.meta["empty"]  # not refused: no pixel holds data
    # the tensor backend: get_embedding's own nodata= is the fix
    sensor = SensorSpec(bands=tuple(names))
    with pytest.raises(ReflectanceError, match=r"fill pixels, pass nodata=<their value>\.$"):
        get_embedding("dofa", input_chw=np.ones_like(raw), sensor=sensor, **cpu)
    with pytest.warns(UserWarning, match="hold no valid pixel"):
        chw = get_embedding("dofa", input_chw=np.ones_like(raw), sensor=sensor, nodata=1, **cpu)
    assert chw.meta["empty"]
    # Earth Engine and STAC leave out the pixels they mask: no fill value is the user's to set
    valid, judged = torch.ones(64, 64, dtype=torch.bool), torch.tensor(False)
    for image in (torch.full((4, 64, 64), 0.5), torch.full((4, 64, 64), -5.0)):
        with pytest.raises(ReflectanceError) as refused:
            check_reflectance_range(image, valid, judged, 0.0, whole_input=True)
        for backend in ("gee", "stac"):
            text = str(api._fill_value_hint(refused.value, backend))
            assert "nodata=" not in text and text.endswith("."), text
    assert str(api._fill_value_hint(refused.value, "gee")).endswith(
        "Values at or below -1000 count as no data."
    )


def test_a_whole_input_negative_in_every_band_is_refused_on_every_path(tmp_path, chip_a) -> None:
    """Chips are not judged for values negative in every band (cloud shadow is), so the
    paths that hold no file check embedded a whole file of dB values as black without a
    word: get_embedding's local backend (its region's files are judged whole) and
    preprocess_array (a user's array, whole unless told it is a chip)."""
    raw, names, profile, bounds = chip_a
    decibels = -np.random.default_rng(3).uniform(5, 25, raw.shape).astype(np.float32)
    with pytest.raises(ReflectanceError, match=r"^every valid value is negative \(in \[-25"):
        preprocess_array(decibels, list(names))
    chip = preprocess_array(decibels, list(names), whole_input=False)  # as 0, like shadow
    assert not bool(chip["empty"]) and float(chip["valid_fraction"]) == 1.0
    path = _write(
        tmp_path / "db.tif", decibels, profile | {"dtype": "float32", "nodata": None}, names
    )
    point, cpu = _centre_point(bounds, 300), dict[str, Any](weights=None, device="cpu")
    with pytest.raises(ReflectanceError) as refused:
        get_embedding("dofa", spatial=point, paths=path, **cpu)
    assert str(refused.value).startswith("db.tif: every valid value is negative (in [-25")
    assert "Are these dB / log values?" in str(refused.value) and "offset=0" not in str(
        refused.value
    )
    # an offset (from the file's ESA name) makes it negative: the hint names the dataset
    # argument as the API takes it (get_embedding has no offset=)
    esa = "S2B_MSIL2A_20230105T101329_N0509_R022_T33UWP_20230105T121004.tif"
    dark = np.random.default_rng(4).integers(1, 1000, raw.shape).astype(np.uint16)
    path = _write(tmp_path / esa, dark, profile | {"dtype": "uint16", "nodata": None}, names)
    with pytest.raises(ReflectanceError) as refused:
        get_embedding("dofa", spatial=point, paths=path, **cpu)
    assert "data already corrected (paths=Sentinel2SR(FILES, offset=0))" in str(refused.value)
    # the same region of real reflectance with a patch of shadow (negative): embedded
    shadow = raw.astype(np.float32)
    shadow[:, 100:130, 100:130] = -50.0
    path = _write(
        tmp_path / "shadow.tif", shadow, profile | {"dtype": "float32", "nodata": None}, names
    )
    assert np.isfinite(get_embedding("dofa", spatial=point, paths=path, **cpu).data).all()


def test_geometry_conversions_issue_no_deprecation_warning(monkeypatch) -> None:
    """shapely.ops.transform is deprecated in shapely 2.1: no region conversion may use it."""
    monkeypatch.setenv("TORCHGEO_DOFA_MAX_PIXELS", "1")  # refuse at once, after the conversion
    box = BBox(14.93, 48.30, 15.00, 48.33)
    point = PointBuffer(14.95, 48.31, 500)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert box.to_geometry("EPSG:32633").is_valid
        assert point.to_geometry().is_valid and point.extent("EPSG:4326")[2] > 0
        utm = region_to_crs(shapely.geometry.box(14.93, 48.30, 15.0, 48.33), "EPSG:32633")
        assert utm.bounds == pytest.approx(box.to_geometry("EPSG:32633").bounds)
        assert utm_region_grid(box, 10.0).footprint_4326.contains(
            shapely.geometry.Point(14.95, 48.31)
        )
        assert stac.stac_grid(point).width == 100
        assert build_gee_request(box, "2022-01-01", "2022-02-01", bands=["B4"]).width > 0
        with pytest.raises(ModelError, match="covers"):  # the local backend's BBox window
            get_embedding("dofa", spatial=box, paths=_NeverRead(paths=SCENE), weights=None)


# ------------------------------------------------------------------------------ gee backend


def test_gee_request_for_rs_embed_example() -> None:
    point = PointBuffer(lon=121.5, lat=31.2, buffer_m=2048)
    req = build_gee_request(point, "2022-06-01", "2022-09-01", bands=["B04", "B3", "B8"])
    assert req.collection == "COPERNICUS/S2_SR_HARMONIZED"
    assert req.crs == "EPSG:32651" == f"EPSG:{utm_epsg(121.5, 31.2)}"
    assert req.bands == ("B4", "B3", "B8")
    assert (req.cloud_property, req.cloudy_pct, req.composite) == (
        "CLOUDY_PIXEL_PERCENTAGE",
        30.0,
        "median",
    )
    assert (req.width, req.height) == (410, 410)  # round(4096 m / 10 m)
    a, b, c, d, e, f = req.transform
    assert (a, b, d, e) == (10.0, 0.0, 0.0, -10.0)
    assert c % 10 == 0 and f % 10 == 0  # on Sentinel-2's native 10 m UTM grid
    x, y = pyproj.Transformer.from_crs(4326, 32651, always_xy=True).transform(121.5, 31.2)
    assert abs((c + 2050) - x) <= 5 and abs((f - 2050) - y) <= 5  # centred within half a pixel
    region = shapely.geometry.shape(req.region)
    assert region.contains(shapely.geometry.Point(121.5, 31.2))
    _, minlat, _, maxlat = region.bounds
    assert maxlat - minlat == pytest.approx(4100 / 111_000, rel=0.02)
    plain = json.loads(json.dumps(req.as_dict()))
    assert plain["grid"] == {
        "dimensions": {"width": 410, "height": 410},
        "affineTransform": {
            "scaleX": 10.0, "shearX": 0.0, "translateX": c,
            "shearY": 0.0, "scaleY": -10.0, "translateY": f,
        },
        "crsCode": "EPSG:32651",
    }  # fmt: skip
    assert plain["start"] == "2022-06-01" and plain["end"] == "2022-09-01"


def test_gee_request_variants_and_limits() -> None:
    south = build_gee_request(
        BBox(-58.5, -34.7, -58.45, -34.65), "2022-01-01", "2023-01-01", bands=["B4"],
        scale_m=20, composite="mosaic", cloudy_pct=10,
    )  # fmt: skip
    assert south.crs == "EPSG:32721" and south.composite == "mosaic"
    assert south.cloudy_pct == 10.0 and south.scale_m == 20.0
    poly = shapely.geometry.shape(south.region)
    assert poly.buffer(1e-6).covers(shapely.geometry.box(-58.5, -34.7, -58.45, -34.65))
    other = build_gee_request(
        PointBuffer(10, 50, 100), "2022-01-01", "2022-02-01", bands=["VV"],
        collection="COPERNICUS/S1_GRD",
    )  # fmt: skip
    assert other.cloud_property is None and other.bands == ("VV",)
    with pytest.raises(ValueError, match="unknown composite"):
        build_gee_request(PointBuffer(10, 50, 100), "2022-01-01", "2022-02-01", bands=["B4"],
                          composite="mean")  # fmt: skip
    with pytest.raises(ValueError, match="computePixels"):
        build_gee_request(PointBuffer(10, 50, 30_000), "2022-01-01", "2022-02-01",
                          bands=list("123456789"))  # fmt: skip


def test_decode_pixels_structured_answer() -> None:
    dtype = [("B4", "<f4"), ("B3", "<f4"), (gee.VALID_BAND, "<f4")]
    answer = np.zeros((2, 3), dtype=dtype)
    answer["B4"] = [[1, 2, 3], [4, 5, 6]]
    answer["B3"] = [[7, 8, np.nan], [10, 11, 12]]
    answer[gee.VALID_BAND] = [[1, 0, 1], [1, 1, 1]]
    image, valid = decode_pixels(answer, ["B3", "B4"], fill_value=-1)
    assert image.shape == (2, 2, 3)
    assert valid.tolist() == [[True, False, False], [True, True, True]]
    assert image[:, 0, 1].tolist() == [-1, -1] and image[:, 0, 2].tolist() == [-1, -1]
    assert image[0, 1].tolist() == [10, 11, 12] and image[1, 1].tolist() == [4, 5, 6]
    with pytest.raises(ValueError, match="lacks band"):
        decode_pixels(answer, ["B8"])


def test_gee_without_client_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ee", None)  # import ee -> ImportError
    with pytest.raises(GEEUnavailableError) as err:
        get_embedding(
            "dofa", spatial=PointBuffer(lon=121.5, lat=31.2, buffer_m=2048),
            temporal=TemporalSpec.range("2022-06-01", "2022-09-01"), backend="gee",
            variant="large",
        )  # fmt: skip
    message = str(err.value)
    assert 'pip install "torchgeo-dofa[gee]"' in message
    assert "earthengine authenticate" in message


class _FakeEE:
    """A stand-in for the ``ee`` module that records the request and answers with pixels."""

    def __init__(self, pixels: np.ndarray, valid: np.ndarray, bands, fail_init: bool = False):
        self.calls: list[tuple[Any, ...]] = []
        self.pixels, self.valid, self.bands, self.fail_init = pixels, valid, bands, fail_init
        fake = self

        class Chain:
            def __init__(self, *op: Any) -> None:
                fake.calls.append(op)

            def __getattr__(self, name: str):
                return lambda *args: Chain(name, *args)

            def getInfo(self) -> int:
                return 3

        self.Geometry = lambda g: ("geometry", g)
        self.ImageCollection = lambda cid: Chain("ImageCollection", cid)
        self.Filter = SimpleNamespace(lt=lambda p, v: ("lt", p, v))
        self.Reducer = SimpleNamespace(min=lambda: "min")
        self.data = SimpleNamespace(computePixels=self._compute)

    def Initialize(self, **kwargs: Any) -> None:
        if self.fail_init:
            raise RuntimeError("Please authorize access to your Earth Engine account")
        self.calls.append(("Initialize", kwargs))

    def _compute(self, params: dict) -> np.ndarray:
        self.calls.append(("computePixels", params["fileFormat"], params["grid"]))
        grid = params["grid"]["dimensions"]
        assert (grid["height"], grid["width"]) == self.pixels.shape[1:]
        out = np.zeros(self.pixels.shape[1:], [(b, "<f4") for b in (*self.bands, gee.VALID_BAND)])
        for b, band in zip(self.bands, self.pixels, strict=True):
            out[b] = band
        out[gee.VALID_BAND] = self.valid
        return out


def test_gee_backend_end_to_end_with_recorded_request(monkeypatch, chip_a, weights) -> None:
    raw, names, _, bounds = chip_a
    bands = ("B4", "B3", "B2", "B8")
    valid = np.ones(raw.shape[1:], bool)
    valid[:16, :16] = False  # masked in the composite: EE fills it with fill_value
    pixels = raw.astype(np.float32).copy()
    pixels[:, ~valid] = 0.0
    fake = _FakeEE(pixels, valid, bands)
    monkeypatch.setitem(sys.modules, "ee", fake)
    monkeypatch.setattr(gee, "_initialized", set())
    monkeypatch.setenv("EE_PROJECT", "my-project")
    temporal = TemporalSpec.range("2022-06-01", "2022-09-01")
    sensor = SensorSpec(bands=bands, composite="mosaic", cloudy_pct=20)
    emb = get_embedding(
        "dofa", spatial=_centre_point(bounds), temporal=temporal, sensor=sensor,
        output="grid", backend="gee", weights=weights, device="cpu",
    )  # fmt: skip
    ops = [c[0] for c in fake.calls]
    assert fake.calls[0] == ("Initialize", {"project": "my-project"})
    assert fake.calls[1] == ("ImageCollection", "COPERNICUS/S2_SR_HARMONIZED")
    assert ("filterDate", "2022-06-01", "2022-09-01") in fake.calls
    assert ("filter", ("lt", "CLOUDY_PIXEL_PERCENTAGE", 20.0)) in fake.calls
    assert ("sort", "CLOUDY_PIXEL_PERCENTAGE", False) in fake.calls and "mosaic" in ops
    assert ("select", ["B4", "B3", "B2", "B8"]) in fake.calls
    assert ("unmask", 0.0, False) in fake.calls
    _, fmt, grid = fake.calls[-1]
    assert fmt == "NUMPY_NDARRAY" and grid["crsCode"] == "EPSG:32633"
    assert grid["affineTransform"]["translateX"] == pytest.approx(bounds[0])
    assert grid["affineTransform"]["translateY"] == pytest.approx(bounds[3])
    assert emb.meta["provider"]["n_images"] == 3
    assert emb.meta["provider"]["composite"] == "mosaic"
    # equals the tensor backend on the same pixels with the same pixels missing
    nan_input = raw.astype(np.float32)
    nan_input[:, ~valid] = np.nan
    ref = get_embedding(
        "dofa", input_chw=nan_input, sensor=SensorSpec(bands=tuple(names)), output="grid",
        weights=weights, device="cpu",
    )  # fmt: skip
    _close(emb.data, ref.data)
    assert np.isnan(emb.data[:, 0, 0]).all()
    assert emb.meta["grid_transform"][0] == pytest.approx(160.0)


def test_gee_init_failure_says_authenticate(monkeypatch) -> None:
    fake = _FakeEE(np.zeros((1, 2, 2)), np.ones((2, 2), bool), ("B4",), fail_init=True)
    monkeypatch.setitem(sys.modules, "ee", fake)
    monkeypatch.setattr(gee, "_initialized", set())
    request = build_gee_request(PointBuffer(10, 50, 10), "2022-01-01", "2022-02-01", bands=["B4"])
    with pytest.raises(GEEUnavailableError, match="earthengine authenticate"):
        gee.fetch_gee_pixels(request)


# ------------------------------------------------------------------------------ export


def test_export_is_resumable_and_atomic(tmp_path, chip_a, weights, tensor_a) -> None:
    _, _, _, bounds = chip_a
    p_a = _centre_point(bounds)
    p_b = _centre_point((bounds[0] - CHIP_M, *bounds[1:3], bounds[3]))  # the chip to the left
    bad = PointBuffer(lon=0.0, lat=0.0, buffer_m=1120)
    out = tmp_path / "emb.parquet"
    model = ExportModelRequest.configure("dofa", variant="b", weights=weights)
    kwargs: dict[str, Any] = dict(
        temporal=None, models=[model], out_path=out, paths=[SCENE], device="cpu", chunk_size=1
    )
    with pytest.raises(LookupError):  # crashes on the second point
        export_batch(spatials=[p_a, bad], names=["a", "bad"], **kwargs)
    assert not out.exists()  # the final file is never half-written
    first = export_batch(spatials=[p_a, p_b], names=["a", "b"], **kwargs)
    assert (first.computed, first.skipped, first.rows) == (1, 1, 2)  # "a" survived the crash
    again = export_batch(spatials=[p_a, p_b], names=["a", "b"], **kwargs)
    assert (again.computed, again.skipped, again.rows) == (0, 2, 2)
    with_fail = export_batch(
        spatials=[p_a, p_b, bad], names=["a", "b", "bad"], continue_on_error=True, **kwargs
    )
    assert with_fail.computed == 0 and list(with_fail.failed) == ["bad/dofa:base"]
    assert not out.with_name(out.name + ".parts").exists()

    frame = gpd.read_parquet(out)
    assert frame.crs.to_epsg() == 4326
    assert list(frame.item_id) == ["a", "b"]
    assert set(frame.model) == {"dofa"} and set(frame.variant) == {"base"}
    assert frame.geometry.iloc[0].equals(shapely.geometry.Point(p_a.lon, p_a.lat))
    assert json.loads(frame.bands.iloc[0]) == ["B2", "B3", "B4", "B8"]  # the dataset's order
    assert list(frame.embedding_shape.iloc[0]) == [768]
    _close(np.asarray(frame.embedding.iloc[0]), tensor_a.pooled.data)
    assert not np.allclose(frame.embedding.iloc[1], frame.embedding.iloc[0])


def test_an_export_rerun_naming_regions_by_ids_they_did_not_have_is_refused(
    tmp_path, chip_a, weights
) -> None:
    """The default ids go by position: a rerun with the same points in another order (or a
    new point first) added rows with the ids of the saved ones, p00000 twice at two places,
    exit normally. Refused before anything is computed; names= given, any order resumes."""
    _, _, _, bounds = chip_a
    a = _centre_point(bounds)
    b = _centre_point((bounds[0] - CHIP_M, *bounds[1:3], bounds[3]))
    out = tmp_path / "emb.parquet"
    model = ExportModelRequest.configure("dofa", variant="base", weights=weights)
    kwargs: dict[str, Any] = dict(
        temporal=None, models=[model], out_path=out, paths=[SCENE], device="cpu"
    )
    export_batch(spatials=[a, b], **kwargs)
    before = out.read_bytes()
    with pytest.raises(ModelError) as refused:
        export_batch(spatials=[b, a], **kwargs)
    assert str(refused.value) == (
        f"{out} holds a row for item_id 'p00000' of another region than {b!r}: the default "
        "ids go by position (p00000 is the first region), so the same regions in another "
        "order, or others, rename them: give names= (one id per region), or write to another "
        "out_path"
    )
    assert out.read_bytes() == before
    # the same points of other number types (numpy's floats, an int buffer): resumed
    same = PointBuffer(np.float64(a.lon), np.float64(a.lat), 1120)
    assert same == a and repr(same) == repr(a)
    resumed = export_batch(spatials=[same, b], **kwargs)
    assert (resumed.computed, resumed.skipped) == (0, 2)
    named = tmp_path / "named.parquet"
    export_batch(spatials=[a, b], names=["a", "b"], **(kwargs | {"out_path": named}))
    again = export_batch(spatials=[b, a], names=["b", "a"], **(kwargs | {"out_path": named}))
    assert (again.computed, again.skipped, again.rows) == (0, 2, 2)
    with pytest.raises(ModelError, match="item_id 'a' of another region than .*: give each"):
        export_batch(spatials=[b], names=["a"], **(kwargs | {"out_path": named}))


def test_export_rows_carry_the_share_of_pixels_holding_data(tmp_path, chip_a, weights) -> None:
    """``embed``'s pooled table has ``valid_fraction``; the export's rows had no such column,
    so rows mostly fill could not be told from the others. Chip A with its left quarter
    no-data: 0.75 (168 of 224 columns), the same as ``get_embedding``'s meta."""
    raw, names, profile, bounds = chip_a
    raw = raw.copy()
    raw[:, :, :56] = 0
    crop = _write(tmp_path / "chip_a.tif", raw, profile | {"nodata": 0}, names)
    point = _centre_point(bounds)
    model = ExportModelRequest.configure("dofa", variant="base", weights=weights)
    out = tmp_path / "emb.parquet"
    export_batch(
        spatials=[point], temporal=None, models=[model], out_path=out, paths=[crop], device="cpu"
    )
    frame = gpd.read_parquet(out)
    assert frame.valid_fraction.tolist() == [0.75]
    assert frame.valid_fraction.dtype == np.float64


def test_an_export_refuses_rows_of_other_inputs_or_weights_and_a_second_export(
    tmp_path, chip_a, base_state
) -> None:
    """A rerun into the same out_path with a file rewritten in place, or a checkpoint
    replaced under the same name, skipped the rows already written (computed 1, skipped 2)
    and mixed both jobs' rows in one table under one config_id; two exports into one file
    at once deleted each other's parts. Refused now, naming what changed; a second export
    into the folder is refused while the first runs."""
    import shutil
    import subprocess

    from torchgeo_dofa.locks import JobLockedError

    _, _, _, bounds = chip_a
    points = [_centre_point(bounds), _centre_point((bounds[0] - CHIP_M, *bounds[1:3], bounds[3]))]
    scene, ckpt = tmp_path / "scene.tif", tmp_path / "w.pth"
    shutil.copy(SCENE, scene)
    write_checkpoint(ckpt, base_state)
    out = tmp_path / "out" / "emb.parquet"
    kwargs: dict[str, Any] = dict(
        models=["dofa"], out_path=out, paths=[scene], weights=str(ckpt), device="cpu"
    )
    assert export_batch(spatials=points[:1], **kwargs).computed == 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["emb.parquet"]  # no lock file left
    other = {k: (v * 1.01 if v.is_floating_point() else v) for k, v in base_state.items()}
    write_checkpoint(ckpt, other)  # other weights, the same file name
    with pytest.raises(ModelError, match=r"holds rows of another export: the weights file w\.pth"):
        export_batch(spatials=points, **kwargs)
    write_checkpoint(ckpt, base_state)  # the weights back, the scene rewritten in place
    with rasterio.open(scene, "r+") as dst:
        dst.update_tags(note="edited")
    with pytest.raises(ModelError, match=r"the local inputs differ \(scene\.tif: added, remov"):
        export_batch(spatials=points, **kwargs)
    assert sorted(p.name for p in out.parent.iterdir()) == ["emb.parquet"]  # untouched
    assert len(gpd.read_parquet(out)) == 1
    holder = subprocess.Popen(  # another job holding the folder, as a running export does
        [sys.executable, "-c", "import sys, time; from torchgeo_dofa.locks import OutputLock; "
         f"OutputLock({str(out.parent)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(JobLockedError, match="is in use by another torchgeo-dofa job"):
            export_batch(spatials=points, **{**kwargs, "out_path": out.with_name("b.parquet")})
    finally:
        holder.kill()
        holder.wait()


def test_an_export_out_path_that_cannot_be_its_table_is_refused(tmp_path, chip_a) -> None:
    """``x.csv`` was written as GeoParquet under that name; a folder, /dev/null, or a GeoTIFF
    given as out_path were geopandas' / pyarrow's raw errors."""
    _, _, _, bounds = chip_a
    kwargs: dict[str, Any] = dict(
        spatials=[_centre_point(bounds)], models=["dofa"], paths=[SCENE], weights=None
    )
    (tmp_path / "folder.parquet").mkdir()
    cases = {
        tmp_path / "x.csv": "export_batch writes a GeoParquet table, not .csv files: name it "
        "x.parquet",
        tmp_path / "folder.parquet": "is a folder: give a .parquet file name",
        tmp_path / "scene.parquet": "exists but is not a GeoParquet table an export can add "
        "rows to (",
    }
    (tmp_path / "scene.parquet").write_bytes(SCENE.read_bytes())  # a GeoTIFF, misnamed
    gpd.GeoDataFrame({"chip_id": ["a"]}, geometry=[shapely.geometry.Point(0, 0)]).to_parquet(
        tmp_path / "embed_pooled.parquet"  # a table of another kind (KeyError: 'row_key')
    )
    cases[tmp_path / "embed_pooled.parquet"] = "is a GeoParquet table of another kind (no row_key"
    cases[tmp_path] = "is a folder: give a .parquet file name"  # a folder without a suffix
    before = sorted(p.name for p in tmp_path.iterdir())
    for out, said in cases.items():
        with pytest.raises(ModelError, match=re.escape(said)):
            export_batch(out_path=out, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written or removed


def test_a_damaged_export_part_is_computed_again(tmp_path, chip_a, weights) -> None:
    """A part truncated after a kill -9 failed every rerun with BadZipFile."""
    _, _, _, bounds = chip_a
    points = [_centre_point(bounds), _centre_point((bounds[0] - CHIP_M, *bounds[1:3], bounds[3]))]
    out = tmp_path / "emb.parquet"
    kwargs: dict[str, Any] = dict(
        models=["dofa"], out_path=out, paths=[SCENE], weights=weights, chunk_size=1
    )
    bad = PointBuffer(lon=0.0, lat=0.0, buffer_m=1120)
    with pytest.raises(LookupError):  # stops after the first two rows, parts kept
        export_batch(spatials=[*points, bad], **kwargs)
    parts = sorted(out.with_name("emb.parquet.parts").glob("*.npz"))
    assert len(parts) == 2
    parts[0].write_bytes(parts[0].read_bytes()[:100])  # cut short
    with pytest.warns(UserWarning, match=r"was unreadable \(.*\) and is removed: this run"):
        resumed = export_batch(spatials=points, **kwargs)
    assert (resumed.computed, resumed.skipped, resumed.rows) == (1, 1, 2)
    fresh = export_batch(spatials=points, **{**kwargs, "out_path": tmp_path / "fresh.parquet"})
    assert fresh.computed == 2
    np.testing.assert_allclose(
        np.stack(gpd.read_parquet(out).embedding),
        np.stack(gpd.read_parquet(tmp_path / "fresh.parquet").embedding),
        atol=1e-5,
    )


def test_export_of_dates_without_a_scene_fails_its_items(tmp_path, weights) -> None:
    """Dates holding no scene failed each item (continue_on_error) when the dataset was
    opened for every date; opened for the dates alone it raised once, for the whole call."""
    from tests.scenes import dated_copies

    dated_copies(tmp_path / "dated", [("T33UVP_20230601.tif", 0.0, 0)])
    with rasterio.open(tmp_path / "dated" / "T33UVP_20230601.tif") as src:
        point = _centre_point(tuple(src.bounds))
    model = ExportModelRequest.configure("dofa", variant="b", weights=weights)
    kwargs: dict[str, Any] = dict(
        spatials=[point, point], names=["a", "b"], temporal=TemporalSpec.year(2020),
        models=[model], out_path=tmp_path / "emb.parquet", paths=[tmp_path / "dated"],
        device="cpu",
    )  # fmt: skip
    failed = export_batch(continue_on_error=True, **kwargs).failed
    assert list(failed) == ["a/dofa:base", "b/dofa:base"]
    assert set(failed.values()) == {
        "no scene of the inputs is acquired within 2020-01-01 .. 2020-12-31 (they are dated "
        "2023-06-01): choose dates that hold scenes"
    }
    with pytest.raises(LookupError, match="no scene of the inputs is acquired within 2020"):
        export_batch(**kwargs)
    # two requests of one model and variant (another sensor): their failures overwrote
    rgb = SensorSpec(bands=("B4", "B3", "B2"))
    kwargs["models"] = [model, ExportModelRequest.configure("dofa", sensor=rgb, weights=weights)]
    failed = export_batch(continue_on_error=True, **kwargs).failed
    assert list(failed) == [f"{n}/dofa:base#{j}" for j in (1, 2) for n in ("a", "b")]
    # a request asking for bands the files lack failed the whole call, the others' rows kept
    # in .parts: its items fail, the other request's rows are written
    kwargs["temporal"] = None
    b9 = ExportModelRequest.configure("dofa", sensor=SensorSpec(bands=("B9",)), weights=weights)
    kwargs["models"] = [model, b9]
    summary = export_batch(continue_on_error=True, **kwargs)
    assert summary.computed == 2 and list(summary.failed) == ["a/dofa:base#2", "b/dofa:base#2"]
    assert all("B9" in reason for reason in summary.failed.values())


def test_random_weights_are_the_same_model_in_every_process(tmp_path, chip_a) -> None:
    """weights=None drew a new model in every process: an export_batch rerun resumed rows of
    another model (the same chip's embeddings differed by up to 4.8 within one file)."""
    from torchgeo_dofa.embedder import DOFAEmbedder

    raw, names, _, bounds = chip_a
    sensor = SensorSpec(bands=tuple(names))
    kwargs: dict[str, Any] = dict(input_chw=raw, sensor=sensor, backend="tensor", device="cpu")
    first = get_embedding("dofa", weights=None, **kwargs)
    api.clear_model_cache()  # as a new process starts: the model is built again
    torch.manual_seed(1234)  # whatever the global RNG holds
    second = get_embedding("dofa", weights=None, **kwargs)
    assert first.meta["weights"] == second.meta["weights"] == "random (seed 0)"
    np.testing.assert_array_equal(np.asarray(first.data), np.asarray(second.data))
    for spelling in ("none", "Random", "null"):  # the CLI's and a config's spellings
        api.clear_model_cache()
        spelt = get_embedding("dofa", weights=spelling, **kwargs)
        assert spelt.meta["weights"] == "random (seed 0)"
        np.testing.assert_array_equal(np.asarray(spelt.data), np.asarray(first.data))
    # the CLI's --weights none --seed 0 is that model
    cli_model = DOFAEmbedder(weights=None, seed=0).encoder.state_dict()
    api_model = api._module("base", None, "cpu").encoder.state_dict()
    assert all(torch.equal(cli_model[k], api_model[k].cpu()) for k in cli_model)
    # an export interrupted after its first row resumes with the same model
    out = tmp_path / "random.parquet"
    p_a = _centre_point(bounds)
    p_b = _centre_point((bounds[0] - CHIP_M, *bounds[1:3], bounds[3]))
    model = ExportModelRequest.configure("dofa", weights=None)
    common: dict[str, Any] = dict(models=[model], paths=[SCENE], device="cpu", chunk_size=1)
    export_batch(spatials=[p_a], names=["a"], out_path=out, **common)
    api.clear_model_cache()
    resumed = export_batch(spatials=[p_a, p_b], names=["a", "b"], out_path=out, **common)
    assert (resumed.computed, resumed.skipped) == (1, 1)
    api.clear_model_cache()
    whole = export_batch(
        spatials=[p_a, p_b], names=["a", "b"], out_path=tmp_path / "whole.parquet", **common
    )
    assert whole.computed == 2
    got, want = gpd.read_parquet(out), gpd.read_parquet(tmp_path / "whole.parquet")
    for i in range(2):
        np.testing.assert_array_equal(got.embedding.iloc[i], want.embedding.iloc[i])
    assert set(got.weights) == {"random (seed 0)"}


# ------------------------------------------------------------------------------ knobs, errors


def test_knobs(monkeypatch) -> None:
    for name in ("TORCHGEO_DOFA_BATCH_SIZE", "RS_EMBED_DOFA_BATCH_SIZE",
                 "TORCHGEO_DOFA_FETCH_WORKERS", "RS_EMBED_DOFA_FETCH_WORKERS"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    assert api.infer_batch_size("cpu") == 8 and api.infer_batch_size("cuda:0") == 64
    assert api.fetch_workers() == 8
    monkeypatch.setenv("RS_EMBED_DOFA_BATCH_SIZE", "3")
    monkeypatch.setenv("RS_EMBED_DOFA_FETCH_WORKERS", "2")
    assert api.infer_batch_size("cpu") == 3 and api.fetch_workers() == 2
    monkeypatch.setenv("TORCHGEO_DOFA_BATCH_SIZE", "5")
    assert api.infer_batch_size("cuda") == 5
    monkeypatch.setenv("TORCHGEO_DOFA_FETCH_WORKERS", "zero")
    with pytest.raises(ModelError, match="positive integer"):
        api.fetch_workers()


def test_specs() -> None:
    assert TemporalSpec.range("2022-06-01", "2022-09-01").time_slice().start.year == 2022
    assert TemporalSpec.year(2021) == TemporalSpec("year", "2021-01-01", "2022-01-01")
    with pytest.raises(ModelError, match="start < end"):
        TemporalSpec.range("2022-09-01", "2022-06-01")
    with pytest.raises(ModelError, match="ISO date"):
        TemporalSpec.range("June 2022", "2022-09-01")
    sensor = SensorSpec()
    assert sensor.collection == "COPERNICUS/S2_SR_HARMONIZED"
    assert sensor.bands == ("B4", "B3", "B2", "B5", "B6", "B7", "B8", "B11", "B12")
    assert (sensor.scale_m, sensor.cloudy_pct, sensor.composite, sensor.fill_value) == (
        10, 30, "median", 0.0,
    )  # fmt: skip
    assert sensor.wavelengths is None
    assert OutputSpec.pooled().mode == "pooled" and OutputSpec.grid().mode == "grid"
    req = ExportModelRequest.configure("dofa", variant="large")
    assert req.model_config == {"variant": "large"}
    with pytest.raises(ModelError, match="unknown DOFA setting"):
        ExportModelRequest.configure("dofa", colour="blue")


RAW = np.full((4, 32, 32), 1500.0, dtype=np.float32)
S4 = SensorSpec(bands=("B4", "B3", "B2", "B8"))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(model="prithvi"), ModelError, "unknown model 'prithvi'"),
        (dict(input_chw=RAW[0]), ModelError, r"\(C, H, W\) array, got rank 2"),
        (dict(input_chw=RAW[None]), ModelError, "got rank 4"),
        (dict(input_chw=RAW > 0), ModelError, "real numbers.*got numpy dtype bool"),
        (dict(input_chw=RAW[:3]), ModelError, "C=3 channels but sensor.bands names 4"),
        (dict(input_chw=RAW / 10000), ReflectanceError, r"\[0, 2\]"),
        (
            dict(sensor=SensorSpec(bands=("X1", "X2", "X3", "X4"))),
            BandError,
            "cannot infer wavelengths",
        ),
        (dict(variant="huge"), ModelError, "unknown DOFA variant 'huge'"),
        (dict(variant=""), ModelError, "unknown DOFA variant ''"),
        (dict(variant="  "), ModelError, "unknown DOFA variant '  '"),
        (dict(model_config={"variant": ""}), ModelError, "unknown DOFA variant ''"),
        (dict(output="cube"), ModelError, "unknown output mode 'cube'"),
        (dict(backend="s3"), ModelError, "unknown backend 's3'"),
        (dict(sensor=None), ModelError, "needs sensor=SensorSpec"),
        (dict(input_prep="crop"), ModelError, "unknown input_prep 'crop'"),
        (dict(model_config={"variant": "large"}, variant="base"), ModelError, "conflicts"),
        (dict(weights=""), ModelError, "weights='' is empty: give 'official', a checkpoint"),
        (dict(model_config={"weights": " "}), ModelError, "weights=' ' is empty"),
        (dict(device="cuda:99"), ModelError, r"device 'cuda:99': PyTorch sees .*CUDA GPU"),
        (dict(device="CUDA:99"), ModelError, r"device 'CUDA:99': PyTorch sees .*CUDA GPU"),
        (  # pixels and files: paths= was ignored without a word
            dict(backend="auto", paths="exports/", spatial=PointBuffer(1, 1, 10)),
            ModelError,
            r"paths= is read by backend='local' only, but pixels were given \(input_chw\)",
        ),
        (dict(paths="exports/"), ModelError, "paths= is read by backend='local' only"),
        (
            dict(input_chw=None, backend="local", paths=[], spatial=PointBuffer(1, 1, 10)),
            ModelError,
            "needs paths=.*got an empty list",
        ),
        (
            dict(input_chw=None, backend="local", paths="", spatial=PointBuffer(1, 1, 10)),
            ModelError,
            "needs paths=.*got '': name the files or folders",
        ),
        (
            dict(input_chw=None, backend="local", paths=[" "], spatial=PointBuffer(1, 1, 10)),
            ModelError,
            "got ' ': name the files or folders",
        ),
    ],
)
def test_errors(kwargs, error, message, weights) -> None:
    args: dict[str, Any] = dict(
        model="dofa", input_chw=RAW, sensor=S4, backend="tensor", weights=weights, device="cpu"
    )
    args.update(kwargs)
    model = args.pop("model")
    with pytest.raises(error, match=message):
        get_embedding(model, **args)


def test_provider_errors(weights) -> None:
    with pytest.raises(ModelError, match="unknown output mode"):
        OutputSpec("cube")  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="needs temporal=TemporalSpec"):
        get_embedding("dofa", spatial=PointBuffer(121.5, 31.2, 2048), backend="gee")
    with pytest.raises(ModelError, match="needs paths"):
        get_embeddings_batch("dofa", spatials=[PointBuffer(1, 1, 10)], backend="local")
    with pytest.raises(ModelError, match="needs spatial"):
        get_embedding("dofa", paths=[SCENE], weights=weights)
    with pytest.raises(ModelError, match="does not exist"):
        get_embedding("dofa", spatial=PointBuffer(1, 1, 10), paths="/no/such/dir")
    with pytest.raises(ModelError, match="list of"):
        get_embeddings_batch_from_inputs("dofa", input_chws=RAW, sensor=S4)  # type: ignore[arg-type]


@pytest.mark.parametrize("empty", ["", " "])
def test_empty_names_are_not_defaults(empty, tmp_path) -> None:
    """An empty variant or collection is an error, never silently the default."""
    with pytest.raises(ValueError, match=f"unknown DOFA variant '{empty}'"):
        get_embeddings_batch_from_inputs(
            "dofa", input_chws=[RAW], sensor=S4, variant=empty, weights=None
        )
    with pytest.raises(ValueError, match=f"unknown DOFA variant '{empty}'"):
        get_embeddings_batch(
            "dofa", spatials=[PointBuffer(1, 1, 10)], paths=[SCENE], variant=empty, weights=None
        )
    with pytest.raises(ValueError, match=f"unknown DOFA variant '{empty}'"):
        ExportModelRequest.configure("dofa", variant=empty)
    with pytest.raises(ModelError, match=f"collection='{empty}' is empty: name a STAC"):
        get_embedding(
            "dofa", spatial=PointBuffer(14.95, 48.31, 500), stac_url=tmp_path / "items.json",
            collection=empty, temporal=TemporalSpec.year(2022), weights=None,
        )  # fmt: skip


def test_local_file_in_a_local_crs_is_refused_in_the_apis_terms(tmp_path) -> None:
    """A file in a local (engineering) CRS gave the command line's fixes ("no bbox, points or
    crs="), which get_embedding has no use for: its region is always longitude / latitude."""
    from rasterio.transform import from_origin

    wkt = 'LOCAL_CS["site",UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]'
    with rasterio.open(
        tmp_path / "a.tif", "w", driver="GTiff", width=8, height=8, count=4, dtype="uint16",
        crs=wkt, transform=from_origin(500000, 5600000, 10, 10),
    ) as dst:  # fmt: skip
        dst.write(np.full((4, 8, 8), 1500, dtype=np.uint16))
        dst.descriptions = ("B4", "B3", "B2", "B8")
    with pytest.raises(CRSTransformError) as refused:
        get_embedding("dofa", spatial=PointBuffer(3.0, 50.5, 100), paths=tmp_path, weights=None)
    assert str(refused.value) == (
        "cannot place PointBuffer(lon=3.0, lat=50.5, buffer_m=100.0) (longitude / latitude) on "
        "files in Engineering CRS 'site' (a local CRS is not tied to the Earth): give the files "
        "their real CRS (gdal_edit.py -a_srs EPSG:<code>), or embed them whole in their own CRS "
        "with torchgeo-dofa embed FILES -o OUT/"
    )
    assert refused.value.reason == "a local CRS is not tied to the Earth"
    # export_batch refuses the same way and leaves no folder (it made out/deep/x.parquet.parts)
    out = tmp_path / "out" / "deep" / "x.parquet"
    with pytest.raises(CRSTransformError, match="cannot place PointBuffer"):
        export_batch(
            spatials=[PointBuffer(3.0, 50.5, 100)], backend="local", paths=tmp_path / "a.tif",
            out_path=out, models=[ExportModelRequest.configure("dofa", weights=None)],
        )  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_local_band_warnings_say_where_the_datasets_arguments_go(tmp_path, chip_a) -> None:
    """A band left out of the default choice was named with its fix, file_bands=[...], an
    argument get_embedding does not have; the errors said where it goes, the warnings not."""
    raw, names, profile, bounds = chip_a
    path = _write(tmp_path / "gap.tif", raw, profile, [*names[:-1], ""])
    with pytest.warns(UserWarning) as caught:
        emb = get_embedding("dofa", spatial=_centre_point(bounds), paths=path, weights=None)
    told = [str(w.message) for w in caught if "left out" in str(w.message)]
    assert len(told) == 1
    assert told[0].startswith(f"Sentinel2SR: {path}: band(s) 'band{len(names)}' left out")
    assert told[0].endswith(
        "file_bands=[...] to read them (the dataset's arguments, e.g. file_bands= or crs=, "
        "go to a dataset given as paths=Sentinel2SR(...), and its bands= with them)"
    )
    assert caught[0].filename == __file__  # the user's line, not the package's
    assert emb.meta["bands"] == ["B2", "B3", "B4"]  # B04 B03 B02 read; B8 (band4) not
    # warnings turned into errors: the hint was lost (the dataset's own warning escaped)
    with warnings.catch_warnings(), pytest.raises(UserWarning) as raised:
        warnings.simplefilter("error")
        get_embedding("dofa", spatial=_centre_point(bounds), paths=path, weights=None)
    assert str(raised.value) == told[0]
    # bands= is get_embedding's sensor=SensorSpec(bands=...), not the dataset's (it said so)
    folder = tmp_path / "lack"
    folder.mkdir()
    _write(folder / "a_20220601.tif", raw, profile, names)
    _write(folder / "b_20220601.tif", raw[:3], {**profile, "count": 3}, names[:3])
    with pytest.warns(UserWarning, match="left out of the default bands") as caught:
        get_embedding("dofa", spatial=_centre_point(bounds), paths=folder, weights=None)
    told = [str(w.message) for w in caught if "left out" in str(w.message)]
    assert told[0].endswith(
        "pass bands=[...] and the paths of the scenes that have them (bands= and wavelengths= "
        "go to sensor=SensorSpec(bands=[...], wavelengths=[...]))"
    )


def test_sensor_spec_numbers_are_checked_as_it_is_made() -> None:
    """helper-113: fill_value=NaN was taken and written into the missing pixels (the resize
    spread it: a NotNormalisedError advising a data module's preprocess=True); a single
    number or strings as wavelengths were Python's 'float object is not iterable' / 'could
    not convert string to float'."""
    for bad in (float("nan"), float("inf"), "zero", True):
        with pytest.raises(ModelError, match=r"SensorSpec\.fill_value=.* is not a finite number"):
            SensorSpec(bands=("B4", "B3"), fill_value=bad)  # type: ignore[arg-type]
    cases: list[tuple[str, object]] = [("wavelengths", 0.5), ("wavelengths", ("x", "y"))]
    for name, values in [*cases, ("mean", "100")]:
        with pytest.raises(
            ModelError, match=rf"SensorSpec\.{name}=.* is not a sequence of numbers: .*2 values"
        ):
            SensorSpec(bands=("B4", "B3"), **{name: values})  # type: ignore[arg-type]
    assert SensorSpec(bands=("B4",), fill_value=-1).fill_value == -1.0


def test_call_arguments_of_the_wrong_kind_are_one_line_before_any_work(tmp_path) -> None:
    """helper-113: each was Python's error from deep inside, or silently something else."""
    point = PointBuffer(13.1397, 48.2922, 500)  # in the demo scene
    kw: dict[str, Any] = {"paths": [SCENE], "weights": None}
    for temporal in ("2023-06-01/2023-06-02", ("2023-06-01", "2023-06-02")):
        with pytest.raises(ModelError, match=r"temporal=.* not a TemporalSpec: give temporal="):
            get_embedding("dofa", spatial=point, temporal=temporal, **kw)  # type: ignore[arg-type]
        with pytest.raises(ModelError, match=r"not a TemporalSpec"):
            get_embeddings_batch("dofa", spatials=[point], temporal=temporal, **kw)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match=r"spatials=PointBuffer\(.*\) is one region: give a list"):
        get_embeddings_batch("dofa", spatials=point, **kw)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match=r"spatials=5 is not a list of regions"):
        get_embeddings_batch("dofa", spatials=5, **kw)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match=r"model_config=\['variant'\] is a list, not a dict"):
        get_embedding("dofa", spatial=point, model_config=["variant"], **kw)  # type: ignore[arg-type]
    # a keyword given and model_config disagreeing: refused, as variant was; a keyword left
    # at its default is model_config's to set
    conflicts: list[tuple[dict[str, Any], dict[str, Any]]] = [
        ({"pooled_norm": "trained"}, {"pooled_norm": "plain"}),
        ({"input_prep": "resize"}, {"input_prep": "tile"}),
    ]
    for keyword, config in conflicts:
        with pytest.raises(ModelError, match=r"conflicts with model_config .*: give it once"):
            get_embedding("dofa", spatial=point, model_config=config, **kw, **keyword)
    plain = get_embedding("dofa", spatial=point, model_config={"pooled_norm": "plain"}, **kw)
    assert plain.meta["pooled_norm"] == "plain"
    same = {"pooled_norm": "plain"}
    assert get_embedding("dofa", spatial=point, model_config=same, pooled_norm="plain", **kw)
    # export_batch
    out = tmp_path / "e.parquet"
    with pytest.raises(ModelError, match="spatials is empty: there is nothing to export"):
        export_batch(spatials=[], models=["dofa"], out_path=out, **kw)
    for size in (0, -1, 1.5, True):
        with pytest.raises(ModelError, match=rf"chunk_size={size!r}: give a whole number"):
            export_batch(spatials=[point], models=["dofa"], out_path=out, chunk_size=size, **kw)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match=r"names must be unique: \['1'\] given more than once"):
        export_batch(spatials=[point] * 3, models=["dofa"], out_path=out, names=[1, 2, "1"], **kw)  # type: ignore[list-item]
    with pytest.raises(ModelError, match="models lists the same model twice"):
        export_batch(spatials=[point], models=["dofa", "dofa"], out_path=out, **kw)
    assert not out.exists()
    summary = export_batch(spatials=[point], models="dofa", out_path=out, **kw)
    assert (summary.rows, summary.computed) == (1, 1) and out.is_file()


def test_stac_arguments_beside_another_backend_and_year_specs_are_refused(tmp_path) -> None:
    """helper-113: ``stac_url=`` / ``collection=`` beside ``paths=`` were dropped without a
    word; ``TemporalSpec.year(True)`` was year 1, ``year(2022.7)`` 2022, and
    ``TemporalSpec("year", ...)`` took any range."""
    point = PointBuffer(13.1397, 48.2922, 500)
    for extra in ({"stac_url": tmp_path / "items.json"}, {"collection": "sentinel-2-l2a"}):
        with pytest.raises(ModelError, match=r"is read by backend='stac' only, but this call "
                           r"reads backend='local' \(paths= given\): leave it out"):  # fmt: skip
            get_embedding("dofa", spatial=point, paths=[SCENE], weights=None, **extra)
    for bad in (True, 2022.7, "2022.5"):
        with pytest.raises(ModelError, match=r"year must be a whole number in \[1, 9998\]"):
            TemporalSpec.year(bad)  # type: ignore[arg-type]
    assert TemporalSpec.year(np.int64(2022)) == TemporalSpec.year(2022)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match=r"is not one calendar year: use TemporalSpec\.year"):
        TemporalSpec("year", "2022-01-01", "2022-03-01")


def test_arguments_a_backend_does_not_read_are_refused_or_recorded(tmp_path) -> None:
    """helper-128: paths= beside backend='stac' / 'gee' was dropped without a word (read by
    the local backend only); a datetime, even at midnight, was refused as "expected an ISO
    date 'YYYY-MM-DD', got '2022-10-01T00:00:00'"; input_chw's temporal= went nowhere."""
    point = PointBuffer(13.1397, 48.2922, 500)
    june = TemporalSpec.range("2022-06-01", "2022-07-01")
    for backend, extra in (
        ("stac", {"stac_url": tmp_path / "items.json"}),
        ("gee", {}),
        ("provider", {}),  # rs-embed's name for gee (helper-129)
    ):
        with pytest.raises(ModelError, match=rf"^paths= is read by backend='local' only, but "
                           rf"backend='{backend.replace('provider', 'gee')}' fetches the "
                           r"pixels itself"):  # fmt: skip
            get_embedding("dofa", spatial=point, paths=[SCENE], backend=backend, weights=None,
                          temporal=june, **extra)  # fmt: skip
    with pytest.raises(ModelError, match=r"^paths= is read by backend='local' only"):
        get_embeddings_batch("dofa", spatials=[point], paths=SCENE, backend="gee", weights=None)
    from datetime import UTC, datetime

    midnight = TemporalSpec.range(datetime(2022, 10, 1), pd.Timestamp("2022-10-02", tz="UTC"))
    assert midnight == TemporalSpec.range("2022-10-01", "2022-10-02")
    with pytest.raises(ModelError, match=r"^TemporalSpec takes days .* got the time "
                       r"2022-10-05T11:00:00\+00:00: pass its day, '2022-10-05'"):  # fmt: skip
        TemporalSpec.range(datetime(2022, 10, 5, 11, tzinfo=UTC), "2022-10-06")
    # pixels fetched elsewhere (rs-embed's input_chw): spatial and temporal label them
    emb = get_embedding("dofa", input_chw=RAW, sensor=S4, spatial=point, temporal=midnight,
                        weights=None)  # fmt: skip
    assert emb.meta["temporal"] == ["2022-10-01", "2022-10-02"] and "spatial" in emb.meta


def test_careless_spellings_get_their_fix(tmp_path) -> None:
    """helper-128: an (H, W, C) array was "C=224 channels but sensor.bands names 4 bands",
    naming no layout; output="Grid" was refused where variant="BASE" is taken; a wildcard in
    paths= "does not exist", as if the files were missing."""
    hwc = np.moveaxis(RAW, 0, -1)
    fix = r"\(its last axis has 4: for an \(H, W, C\) array pass array\.transpose\(2, 0, 1\)\)"
    with pytest.raises(ModelError, match=fix):
        get_embedding("dofa", input_chw=hwc, sensor=S4, weights=None)
    grid = get_embedding("dofa", input_chw=RAW, sensor=S4, output="Grid ", weights=None)
    assert grid.meta["output"] == "grid" and grid.data.ndim == 3
    assert OutputSpec("Pooled") == OutputSpec.pooled()  # type: ignore[arg-type] # the spec itself too (helper-129)
    with pytest.raises(ModelError, match=r"^expected a date, got NaT"):
        TemporalSpec.range(pd.NaT, "2022-10-02")
    point = PointBuffer(13.1397, 48.2922, 500)
    with pytest.raises(ModelError, match=r"does not exist \(a wildcard pattern is not expanded"):
        get_embedding("dofa", spatial=point, paths=str(SCENE.parent / "*.tif"), weights=None)


def test_neighbouring_kinds_of_the_checked_arguments(tmp_path) -> None:
    """helper-114: the session's argument checks, attacked with their neighbours."""
    for bad in (10**400, np.True_, "0"):
        with pytest.raises(ModelError, match=r"fill_value=.* is not a finite number"):
            SensorSpec(bands=("B4", "B3"), fill_value=bad)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match=r"SensorSpec\.mean=.* is not a sequence of numbers"):
        SensorSpec(bands=("B4", "B3"), mean=("1", "2"), std=(1.0, 2.0))  # type: ignore[arg-type]
    from torchgeo_dofa.transforms import CheckReflectance

    with pytest.raises(ValueError, match=r"fill_value=True is not a finite number"):
        CheckReflectance(fill_value=True)
    with pytest.raises(ModelError, match=r"not a TemporalSpec"):  # the tensor backend too
        get_embedding("dofa", input_chw=RAW, sensor=S4, temporal="x", weights=None)  # type: ignore[arg-type]
    assert TemporalSpec.year("2022") == TemporalSpec.year(2022)  # type: ignore[arg-type]
    point = PointBuffer(13.1397, 48.2922, 500)
    with pytest.raises(ModelError, match=r"^collection= names a STAC collection .*SensorSpec"):
        get_embedding("dofa", spatial=point, backend="gee", collection="x", weights=None)
    out, kw = tmp_path / "e.parquet", {"paths": [SCENE], "weights": None}
    with pytest.raises(ModelError, match=r"spatials is a dict: give a list of regions"):
        export_batch(spatials={"a": point}, models="dofa", out_path=out, **kw)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match=r"models=b'dofa' is bytes"):
        export_batch(spatials=[point], models=b"dofa", out_path=out, **kw)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match=r"chunk_size=np\.int64\(0\): give a whole number"):
        export_batch(spatials=[point], models="dofa", out_path=out, chunk_size=np.int64(0), **kw)  # type: ignore[arg-type]


def test_regions_in_metres_or_nan_are_refused_as_built_with_the_transform_advice() -> None:
    """``BBox(359130, 5348550, ...)`` (a UTM zone's metres) said only "must be in [-180, 180]
    degrees", where a polygon in metres is told to transform to EPSG:4326 first."""
    advice = (
        " (longitude / latitude in degrees, EPSG:4326: transform projected coordinates, e.g. "
        "a UTM zone's metres, first)"
    )
    cases = [
        (lambda: BBox(359130, 5348550, 360000, 5349000), "minlon", "[-180, 180]", "359130.0"),
        (lambda: BBox(13.1, 5348550, 13.2, 5349000), "minlat", "[-90, 90]", "5348550.0"),
        (lambda: PointBuffer(359130, 5348550, 500), "lon", "[-180, 180]", "359130.0"),
    ]
    for build, name, bounds, value in cases:
        with pytest.raises(ValueError) as info:
            build()
        assert str(info.value) == f"{name} must be in {bounds} degrees, got {value}{advice}"
    # values no projected CRS suggests get no such advice (helper-132)
    others = [
        (lambda: BBox(math.nan, 48.2, 13.2, 48.3), "minlon", "[-180, 180]", "nan"),
        (lambda: PointBuffer(190, 48.2, 500), "lon", "[-180, 180]", "190.0"),
        (lambda: PointBuffer(13.1, -91, 500), "lat", "[-90, 90]", "-91.0"),
    ]
    for build, name, bounds, value in others:
        with pytest.raises(ValueError) as info:
            build()
        assert str(info.value) == f"{name} must be in {bounds} degrees, got {value}"


def test_an_array_of_bands_of_two_dates_is_refused_as_a_files_are() -> None:
    """helper-137: ``SensorSpec(bands=("B4", "B3", "B2", "B8_1"))`` (or ``B4`` beside
    ``B4_1``) embedded an array of two dates, where a file's bands so named are refused."""
    from torchgeo_dofa.api import ModelError, SensorSpec, get_embedding

    image = np.full((4, 32, 32), 1000, np.float32)
    for bands, kind in [
        (("B4", "B3", "B2", "B8_1"), "mix the dates"),
        (("B4", "B4_1", "B2", "B8"), "repeat the wavelength"),
    ]:
        with pytest.raises(ModelError) as refused:
            get_embedding("dofa", input_chw=image, sensor=SensorSpec(bands=bands), weights=None)
        assert str(refused.value).startswith(f"SensorSpec: bands={list(bands)} {kind}")
