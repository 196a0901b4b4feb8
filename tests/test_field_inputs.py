"""Inputs as they arrive from the field: item folders, fill values, duplicate bands, `&` / `|`.

Every raster is generated here with rasterio on a small grid; expected values come from an
independent computation (the single-file layout as the reference for item folders, numpy for
no-data masks, mosaics and stacks).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from torch.utils.data import DataLoader
from torchgeo.datasets import GeoDataset, RasterDataset
from torchgeo.samplers import GriddedPatchSampler

from torchgeo_dofa.api import ModelError, OutputSpec, SensorSpec, get_embedding
from torchgeo_dofa.api import get_embeddings_batch_from_inputs as embed_many
from torchgeo_dofa.bands import STAC_ASSET_BANDS, BandError, check_unique_bands
from torchgeo_dofa.datasets import (
    DOFAIntersectionDataset,
    DOFAUnionDataset,
    EarthEngineS2,
    Sentinel2SR,
    stack_dofa_samples,
)
from torchgeo_dofa.transforms import (
    AttachWavelengths,
    CheckReflectance,
    DOFAPreprocess,
    NormalizeReflectance,
    ReflectanceError,
)

CRS = "EPSG:32652"
X0, Y0 = 600000.0, 4000000.0
N = 32  # 10 m pixels per side; 20 m bands have N // 2
ITEM = "S2B_52SFA_20220126_0_L2A"
# Earth Search v1 asset keys, copied from its sentinel-2-l2a items (not imported).
ASSET = {"B2": "blue", "B3": "green", "B4": "red", "B8": "nir", "B11": "swir16", "B8A": "nir08"}
ESA = {"B2": "B02", "B3": "B03", "B4": "B04", "B8": "B08", "B11": "B11", "B8A": "B8A"}
TWENTY_M = {"B11", "B8A"}


def write(
    path: Path,
    data: np.ndarray,
    res: float = 10.0,
    nodata: float | None = None,
    names: Sequence[str] | None = None,
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = data if data.ndim == 3 else data[None]
    profile = {
        "driver": "GTiff",
        "width": data.shape[2],
        "height": data.shape[1],
        "count": data.shape[0],
        "dtype": data.dtype,
        "crs": CRS,
        "transform": from_origin(X0, Y0, res, res),
        "nodata": nodata,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if names is not None:
            dst.descriptions = tuple(names)
    return path


def band_data(band: str, seed: int) -> np.ndarray:
    """uint16 digital numbers with a no-data (0) corner, as in a swath edge."""
    side = N // 2 if band in TWENTY_M else N
    rng = np.random.default_rng(seed)
    data = rng.integers(900, 9000, size=(side, side)).astype(np.uint16)
    data[: side // 4, : side // 4] = 0
    return data


def whole(ds: GeoDataset, t: slice | None = None) -> dict[str, torch.Tensor]:
    xs, ys = slice(X0, X0 + N * 10.0), slice(Y0 - N * 10.0, Y0)
    return ds[xs, ys] if t is None else ds[xs, ys, t]


def expected_image(bands: Sequence[str], offset: float, seed0: int = 0) -> tuple[np.ndarray, ...]:
    """numpy reference: 20 m bands repeated 2x2 (nearest), 0 is no data, offset on valid."""
    layers = []
    for i, band in enumerate(bands):
        data: np.ndarray = band_data(band, seed0 + i).astype(np.float64)
        if band in TWENTY_M:
            data = np.kron(data, np.ones((2, 2)))
        layers.append(data)
    stack = np.stack(layers)
    valid = (stack != 0).all(axis=0)
    image = np.where(valid[None], stack + offset, 0.0)
    return image.astype(np.float32), valid


# ------------------------------------------------------------------------------ item folders

BANDS = ["B4", "B3", "B2", "B8", "B11"]


def _write_item(root: Path, layout: str, item: str = ITEM) -> None:
    for i, band in enumerate(BANDS):
        data = band_data(band, i)
        res = 20.0 if band in TWENTY_M else 10.0
        if layout == "single_file":
            write(root / f"{item}_{ESA[band]}.tif", data, res)
        elif layout == "folder_esa":
            write(root / item / f"{ESA[band]}.tif", data, res)
        else:
            write(root / item / f"{ASSET[band]}.tif", data, res)
    if layout != "single_file":
        # ancillary assets of an Earth Search item folder are skipped
        write(root / item / "scl.tif", np.full((N // 2, N // 2), 4, np.uint8), 20.0)
        write(root / item / "wvp.tif", np.full((N // 2, N // 2), 900, np.uint16), 20.0)
        write(root / item / "visual.tif", np.full((3, N, N), 128, np.uint8))


@pytest.mark.parametrize("layout", ["folder_assets", "folder_esa"])
def test_item_folder_equals_single_file_layout(tmp_path: Path, layout: str) -> None:
    _write_item(tmp_path / "ref", "single_file")
    _write_item(tmp_path / "item", layout)
    with pytest.warns(UserWarning, match="Earth Search items"):
        ref = Sentinel2SR(tmp_path / "ref", bands=BANDS)
    with pytest.warns(UserWarning, match="Earth Search items"):
        ds = Sentinel2SR(tmp_path / "item", bands=BANDS)
    assert len(ds) == len(ref) == 1
    # same time bounds: the item's day, not all of time
    assert ds.index.index[0] == ref.index.index[0]
    assert ds.index.index[0].left == pd.Timestamp("2022-01-26")
    # same offset rule (baseline 04.00 from the date)
    assert ds.index["offset"].iloc[0] == ref.index["offset"].iloc[0] == (-1000.0,) * 5
    assert ds.index["offset_source"].iloc[0] == ref.index["offset_source"].iloc[0]
    assert "2022-01-26" in ds.index["offset_source"].iloc[0]
    got, want = whole(ds), whole(ref)
    torch.testing.assert_close(got["image"], want["image"], rtol=0, atol=0)
    assert torch.equal(got["valid"], want["valid"])
    image, valid = expected_image(BANDS, -1000.0)
    np.testing.assert_array_equal(got["image"].numpy(), image)
    np.testing.assert_array_equal(got["valid"].numpy(), valid)
    # a date outside the item is not found (it used to return these pixels)
    later = slice(pd.Timestamp("2022-02-05"), pd.Timestamp("2022-02-05 23:59"))
    for dataset in (ds, ref):
        with pytest.raises(IndexError):
            whole(dataset, later)
    torch.testing.assert_close(
        whole(ds, slice(pd.Timestamp("2022-01-26"), pd.Timestamp("2022-01-27")))["image"],
        got["image"],
    )


def test_item_folder_before_baseline_04_has_no_offset(tmp_path: Path) -> None:
    item = "S2A_52SFA_20211015_0_L2A"
    _write_item(tmp_path / "ref", "single_file", item)
    _write_item(tmp_path / "item", "folder_assets", item)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no assumption to warn about before 2022-01-25
        ref = Sentinel2SR(tmp_path / "ref", bands=BANDS)
        ds = Sentinel2SR(tmp_path / "item", bands=BANDS)
    assert ds.index["offset"].iloc[0] == ref.index["offset"].iloc[0] == (0.0,) * 5
    assert ds.index.index[0] == ref.index.index[0]
    np.testing.assert_array_equal(whole(ds)["image"].numpy(), expected_image(BANDS, 0.0)[0])


def _item_json(folder: Path, item_id: str, **props: object) -> None:
    properties = {"datetime": "2022-01-26T02:17:43.251000Z", **props}
    assets = {
        key: {"href": f"https://example.invalid/{item_id}/{key}.tif"} for key in STAC_ASSET_BANDS
    }
    doc = {"type": "Feature", "id": item_id, "properties": properties, "assets": assets}
    (folder / f"{item_id}.json").write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("props", "offset"),
    [
        ({"earthsearch:boa_offset_applied": True, "s2:processing_baseline": "04.00"}, 0.0),
        ({"earthsearch:boa_offset_applied": False, "s2:processing_baseline": "04.00"}, -1000.0),
        ({"s2:processing_baseline": "03.01"}, 0.0),
        ({"processing:version": "05.09"}, -1000.0),
        ({}, -1000.0),  # no baseline: by the item's date (2022-01-26)
    ],
)
def test_stac_item_json_gives_time_and_offset(
    tmp_path: Path, props: dict[str, object], offset: float
) -> None:
    folder = tmp_path / "downloads" / "scene"  # folder name without a date
    _write_item(tmp_path / "downloads", "folder_assets", "scene")
    _item_json(folder, ITEM, **props)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the JSON decides: nothing is assumed
        ds = Sentinel2SR(tmp_path / "downloads", bands=BANDS)
    assert ds.index["offset"].iloc[0] == (offset,) * 5
    assert "STAC item" in ds.index["offset_source"].iloc[0]
    span = ds.index.index[0]
    assert span.left == pd.Timestamp("2022-01-26 02:17:43.251")
    assert span.right == pd.Timestamp("2022-01-26 02:17:44.250999")
    np.testing.assert_array_equal(whole(ds)["image"].numpy(), expected_image(BANDS, offset)[0])
    with pytest.raises(IndexError):
        whole(ds, slice(pd.Timestamp("2022-02-05"), pd.Timestamp("2022-02-06")))


def test_undated_folder_still_spans_all_time(tmp_path: Path) -> None:
    _write_item(tmp_path, "folder_assets", "my_scene")
    ds = Sentinel2SR(tmp_path, bands=BANDS)
    assert ds.index["offset"].iloc[0] == (0.0,) * 5
    assert ds.index.index[0].left == pd.Timestamp.min
    assert ds.index.index[0].right == pd.Timestamp.max


# ------------------------------------------------------------------------------ fill values


def reference_nodata(stack: np.ndarray, declared: float | None) -> np.ndarray:
    """numpy statement of the documented rule, on raw values of one file (offset 0)."""
    bad = np.isnan(stack) | (stack <= -1000) | (stack == 0)
    fills = [-9999, -32768, 65535] if declared is None else [declared]
    for value in fills:
        bad |= stack == value
    return ~bad.any(axis=0)


def test_undeclared_fill_values_are_no_data_in_the_dataset(tmp_path: Path) -> None:
    data = np.random.default_rng(3).integers(-900, 9000, size=(4, N, N)).astype(np.int16)
    data[:, :8, :8] = -9999  # undeclared fill of an int16 raster
    data[1, 20:24, 20:24] = -32768
    data[2, 5, 30] = -1000  # at the floor: no data
    data[3, 6, 30] = -999  # darkest real value after the offset: valid
    data[:, 30, 0] = -400  # a dark pixel, negative in every band: valid
    path = write(tmp_path / "int16.tif", data, names=["B4", "B3", "B2", "B8"])
    ds = Sentinel2SR(path, bands=["B4", "B3", "B2", "B8"])
    sample = whole(ds)
    valid = reference_nodata(data.astype(np.float64), None)
    assert valid[6, 30] and valid[30, 0] and not valid[5, 30] and not valid[0, 0]
    np.testing.assert_array_equal(sample["valid"].numpy(), valid)
    expected = np.where(valid[None], data, 0).astype(np.float32)
    np.testing.assert_array_equal(sample["image"].numpy(), expected)

    u16 = np.random.default_rng(4).integers(1, 9000, size=(2, N, N)).astype(np.uint16)
    u16[:, 10:12, :] = 65535
    undeclared = Sentinel2SR(write(tmp_path / "u16" / "a.tif", u16, names=["B4", "B3"]))
    np.testing.assert_array_equal(
        whole(undeclared)["valid"].numpy(), reference_nodata(u16.astype(float), None)
    )
    # a declared nodata replaces the conventional fills: 65535 is then a (saturated) value
    declared = Sentinel2SR(write(tmp_path / "u16d" / "a.tif", u16, nodata=1, names=["B4", "B3"]))
    np.testing.assert_array_equal(
        whole(declared)["valid"].numpy(), reference_nodata(u16.astype(float), 1)
    )
    assert bool(whole(declared)["valid"][10, 0])


def test_check_reflectance_follows_the_same_rule() -> None:
    rng = np.random.default_rng(5)
    x = rng.uniform(-900, 12000, size=(3, 24, 24)).astype(np.float32)
    x[:, 0, :4] = [[-9999], [-32768], [65535]]  # one conventional fill per band
    x[1, 3, 3] = -1000.5
    x[:, 7, 7] = 0.0  # fill value in every band: missing
    x[0, 8, 8] = 0.0  # a single 0 band is a (dark) value
    x[2, 9, 9] = np.nan
    out = CheckReflectance()({"image": torch.from_numpy(x.copy())})
    expected = reference_nodata(x.astype(np.float64), None) | (x == 0).any(axis=0)
    expected &= ~((x == 0).all(axis=0))
    expected[8, 8] = True
    np.testing.assert_array_equal(out["valid"].numpy(), expected)
    assert not out["valid"][0, :4].any() and out["valid"][8, 8]
    np.testing.assert_array_equal(out["image"].numpy(), np.where(expected[None], x, 0))

    # all-negative values: a chip of them is cloud shadow or dark water after the -1000
    # offset (valid, kept); a whole input of them (an offset applied twice, dB values) is an
    # error, not a silent embedding
    shadow = CheckReflectance()({"image": torch.full((3, 8, 8), -500.0)})
    assert bool(shadow["valid"].all()) and not bool(shadow["empty"])
    assert bool((shadow["image"] == -500.0).all())
    with pytest.raises(ReflectanceError, match=r"^every valid value is negative \(in \[-500, "):
        CheckReflectance(whole_input=True)({"image": torch.full((3, 64, 64), -500.0)})
    # ... of at least 64 x 64 valid pixels: a smaller whole input may be a patch of shadow
    small = CheckReflectance(whole_input=True)({"image": torch.full((3, 63, 64), -500.0)})
    assert bool(small["valid"].all())
    # all above twice the scale (x 1e30, scaled twice, radiance) is an error; values
    # beyond 10000 but not all of them beyond 20000 (bright cloud) are reflectance, clipped
    with pytest.raises(ReflectanceError, match=r"every valid value exceeds 20000 \(in \[2"):
        CheckReflectance()({"image": torch.from_numpy(np.abs(x) * 1e30 + 2e4 + 1)})
    bright = torch.full((3, 8, 8), 15000.0)
    bright[2] = 20000.0  # the top of the rule: not above it
    assert bool(CheckReflectance()({"image": bright})["valid"].all())
    # all below the floor / all fill: an empty chip, no error
    for value in (-5000.0, -9999.0, 0.0, 65535.0):
        out = CheckReflectance()({"image": torch.full((3, 8, 8), value)})
        assert bool(out["empty"]) and not out["valid"].any()


@pytest.fixture(scope="module")
def weights(base_checkpoint: Path) -> str:
    return str(base_checkpoint)


def test_tensor_path_empty_chips_are_nan_with_one_warning(weights: str) -> None:
    sensor = SensorSpec(bands=("B4", "B3", "B2", "B8"))
    good = np.random.default_rng(0).uniform(300, 3000, (4, 64, 64)).astype(np.float32)
    zeros = np.zeros((4, 64, 64), np.uint16)
    fills = np.full((4, 64, 64), -9999, np.int16)
    negative = np.full((4, 64, 64), -20000.0, np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        embs = embed_many(
            "dofa", input_chws=[good, zeros, fills, negative], sensor=sensor,
            weights=weights, device="cpu",
        )  # fmt: skip
    empties = [w for w in caught if "no valid pixel" in str(w.message)]
    assert len(empties) == 1 and "3 of 4" in str(empties[0].message)
    assert np.isfinite(embs[0].data).all() and not embs[0].meta["empty"]
    for emb in embs[1:]:
        assert emb.meta["empty"] and emb.meta["valid_fraction"] == 0.0
        assert np.isnan(emb.data).all()
    with pytest.warns(UserWarning, match="1 of 1 input"):
        grid = get_embedding(
            "dofa", input_chw=zeros, sensor=sensor, output=OutputSpec.grid(),
            weights=weights, device="cpu",
        )  # fmt: skip
    assert grid.data.shape == (768, 14, 14) and np.isnan(grid.data).all()
    # input_chw is a whole input: refused, told what to do with a crop of dark surface (not
    # to clip it at 0: a pixel 0 in every band is no data), and not told of offset=, which
    # get_embedding does not take
    with pytest.raises(ReflectanceError, match="every valid value is negative") as told:
        get_embedding("dofa", input_chw=-good / 10, sensor=sensor, weights=weights, device="cpu")
    assert (
        "If it is a crop of dark surface alone, embed it with the scene around it: a chip cut "
        "from a scene is not judged so." in str(told.value)
    )
    assert "already corrected, or are these dB" in str(told.value), str(told.value)
    # in a batch, the error names the input (it named none of the list's)
    with pytest.raises(ReflectanceError, match=r"^input_chws\[1\]: every valid value is neg"):
        embed_many(
            "dofa", input_chws=[good, -good / 10], sensor=sensor, weights=weights, device="cpu"
        )


def test_int16_fill_cells_are_nan_in_tensor_path_and_embed_job(
    tmp_path: Path, weights: str
) -> None:
    from torchgeo_dofa.cli import embed

    data = np.random.default_rng(1).integers(300, 6000, size=(4, 224, 224)).astype(np.int16)
    data[:, :32, :48] = -9999  # undeclared fill: 2 x 3 cells of the 14 x 14 grid
    expected = np.zeros((14, 14), bool)
    expected[:2, :3] = True
    emb = get_embedding(
        "dofa", input_chw=data, sensor=SensorSpec(bands=("B4", "B3", "B2", "B8")),
        output="grid", weights=weights, device="cpu",
    )  # fmt: skip
    np.testing.assert_array_equal(np.isnan(emb.data).all(axis=0), expected)
    assert np.isfinite(emb.data[:, ~expected]).all()
    assert emb.meta["valid_fraction"] == pytest.approx(1 - 32 * 48 / 224**2)
    # the embed job reads the same raster through Sentinel2SR: same cells are NaN
    path = write(tmp_path / "s.tif", data, names=["B4", "B3", "B2", "B8"])
    embed([path], tmp_path / "out", output="grid", weights=weights, batch_size=1,
          progress=False, device="cpu")  # fmt: skip
    with rasterio.open(tmp_path / "out" / "s_grid.tif") as src:
        grid = src.read()
    assert grid.shape == (768, 14, 14)
    np.testing.assert_array_equal(np.isnan(grid).all(axis=0), expected)
    np.testing.assert_allclose(grid, emb.data, rtol=1e-4, atol=1e-4, equal_nan=True)


# ------------------------------------------------------------------------------ duplicates


def test_duplicate_band_names_are_errors_everywhere(tmp_path: Path) -> None:
    data = np.random.default_rng(2).integers(300, 6000, size=(4, N, N)).astype(np.uint16)
    path = write(tmp_path / "dup.tif", data, names=["B04", "B04", "B02", "B08"])
    with pytest.raises(BandError, match=r"B04 at positions \[0, 1\]") as info:
        Sentinel2SR(path)
    assert "file_bands" in str(info.value)
    # the fix the message gives works, and keeps all four channels
    fixed = Sentinel2SR(path, file_bands=["B4", "B3", "B2", "B8"], bands=["B4", "B3", "B2", "B8"])
    np.testing.assert_array_equal(whole(fixed)["image"].numpy(), data.astype(np.float32))

    ok = write(tmp_path / "ok" / "ok.tif", data, names=["B4", "B3", "B2", "B8"])
    for bands in (["B4", "B4", "B3"], ["B4", "B04"], ["b8", "B08"]):
        with pytest.raises(BandError, match="same band more than once"):
            Sentinel2SR(ok, bands=bands)
    with pytest.raises(ModelError, match=r"B4 at positions \[0, 1\]"):
        SensorSpec(bands=("B4", "B4", "B3"))
    for make in (
        lambda: DOFAPreprocess(bands=["B4", "B04", "B3"]),
        lambda: AttachWavelengths(bands=["B4", "B4"]),
        lambda: NormalizeReflectance(bands=["B8", "B08"]),
    ):
        with pytest.raises(BandError, match="same band more than once"):
            make()


def test_multi_date_copies_are_not_duplicates(tmp_path: Path) -> None:
    check_unique_bands(["B4", "B4_1", "B04_2", "B3"])
    data = np.random.default_rng(6).integers(300, 6000, size=(4, N, N)).astype(np.uint16)
    path = write(tmp_path / "ee.tif", data, names=["B4", "B3", "B4_1", "B3_1"])
    ds = EarthEngineS2(path, bands=["B4", "B4_1"])
    np.testing.assert_array_equal(whole(ds)["image"].numpy(), data[[0, 2]].astype(np.float32))
    AttachWavelengths(bands=["B4", "B4_1"], wavelengths=[0.665, 0.665])


# ------------------------------------------------------------------------------ composition


def _pair(tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    a = rng.integers(300, 6000, size=(2, N, N)).astype(np.uint16)
    b = rng.integers(300, 6000, size=(2, N, N)).astype(np.uint16)
    a[:, :6, :] = 0  # no data in the top rows of the first dataset
    b[:, :, :5] = 0  # and the left columns of the second
    write(tmp_path / "a" / "a.tif", a, names=["B4", "B3"])
    write(tmp_path / "b" / "b.tif", b, names=["B2", "B8"])
    return a, b


def test_intersection_stacks_bands_and_ands_valid(tmp_path: Path) -> None:
    a, b = _pair(tmp_path)
    ds = Sentinel2SR(tmp_path / "a", bands=["B4", "B3"]) & Sentinel2SR(tmp_path / "b")
    assert isinstance(ds, DOFAIntersectionDataset)
    assert ds.bands == ("B4", "B3", "B2", "B8")
    sample = whole(ds)
    stack = np.concatenate([a, b]).astype(np.float64)
    valid = (stack != 0).all(axis=0)
    assert sample["valid"].shape == (N, N) and sample["bounds"].shape == (9,)
    np.testing.assert_array_equal(sample["valid"].numpy(), valid)
    np.testing.assert_array_equal(sample["image"].numpy(), stack.astype(np.float32))
    np.testing.assert_allclose(sample["wavelengths"].numpy(), [0.665, 0.56, 0.49, 0.842])
    # DOFAPreprocess takes the stacked sample and equals the same pixels given directly
    prep = DOFAPreprocess(bands=ds.bands)
    got = prep(dict(sample))
    direct = prep({"image": torch.from_numpy(stack.astype(np.float32)),
                   "valid": torch.from_numpy(valid)})  # fmt: skip
    torch.testing.assert_close(got["image"], direct["image"])
    assert torch.equal(got["valid"], direct["valid"])
    # through a TorchGeo sampler and DataLoader
    loader = DataLoader(
        ds, sampler=GriddedPatchSampler(ds, size=16), batch_size=2,
        collate_fn=stack_dofa_samples,
    )  # fmt: skip
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 4, 16, 16) and batch["valid"].shape == (2, 16, 16)


def test_intersection_with_labels_and_shared_bands(tmp_path: Path) -> None:
    _pair(tmp_path)
    labels = np.random.default_rng(8).integers(0, 3, size=(N, N)).astype(np.uint8)
    write(tmp_path / "labels" / "mask.tif", labels)

    class Labels(RasterDataset):
        is_image = False
        filename_glob = "mask.tif"

    ds = Sentinel2SR(tmp_path / "a", bands=["B4", "B3"]) & Labels(str(tmp_path / "labels"))
    sample = whole(ds)
    assert ds.bands == ("B4", "B3") and sample["image"].shape == (2, N, N)
    np.testing.assert_array_equal(sample["mask"].numpy().squeeze(), labels)
    with pytest.raises(BandError, match=r"B4 at positions \[1, 3\].*time_series=True"):
        Sentinel2SR(tmp_path / "a") & Sentinel2SR(tmp_path / "a")
    # time series and single dates do not stack
    series = Sentinel2SR(tmp_path / "b", time_series=True)
    with pytest.raises(ValueError, match="time_series"):
        Sentinel2SR(tmp_path / "a", bands=["B4", "B3"]) & series


def test_polygon_labels_of_a_vector_dataset_pair_with_the_image(tmp_path: Path) -> None:
    """helper-136: ``Sentinel2SR(...) & VectorDataset(...)`` (TorchGeo's polygon labels) was
    refused as an image "without band names and wavelengths": a VectorDataset has no
    ``is_image``. It is a label dataset: its rasterised polygons are the sample's mask."""
    import geopandas as gpd
    from shapely.geometry import box
    from torchgeo.datasets import VectorDataset

    _pair(tmp_path)
    shapes = gpd.GeoDataFrame(
        {"cls": [2, 1]},
        geometry=[  # on pixel edges: rows 10-19 x columns 5-14, rows 0-3 x columns 20-31
            box(X0 + 50, Y0 - 200, X0 + 150, Y0 - 100),
            box(X0 + 200, Y0 - 40, X0 + 320, Y0),
        ],
        crs=CRS,
    )
    (tmp_path / "vec").mkdir()
    shapes.to_file(tmp_path / "vec" / "fields.geojson")
    labels = VectorDataset(tmp_path / "vec", crs=shapes.crs, res=10.0, label_name="cls")
    ds = Sentinel2SR(tmp_path / "a", bands=["B4", "B3"]) & labels
    sample = whole(ds)
    expected = np.zeros((N, N), np.int64)
    expected[10:20, 5:15] = 2
    expected[0:4, 20:32] = 1
    assert sample["image"].shape == (2, N, N)
    np.testing.assert_array_equal(sample["mask"].numpy().squeeze(), expected)
    with pytest.raises(BandError, match="mosaics image datasets of the same bands"):
        Sentinel2SR(tmp_path / "a", bands=["B4", "B3"]) | labels


def test_float_labels_of_fractions_are_refused_and_of_whole_values_read(tmp_path: Path) -> None:
    """A float label raster of 0.7 and 1.5 trained as classes 0 and 1 without a word
    (TorchGeo reads a mask as integers, truncating). ``image & labels`` now refuses it,
    naming the file, a value and the fix; float labels of whole values read as before."""
    _pair(tmp_path)
    whole_ids = np.random.default_rng(8).integers(0, 3, size=(N, N)).astype(np.float32)
    whole_ids[0, 0] = 0  # the first value read: 0.7 below
    write(tmp_path / "whole" / "mask.tif", whole_ids)
    write(tmp_path / "fractions" / "mask.tif", whole_ids + np.float32(0.7))

    class Labels(RasterDataset):
        is_image = False
        filename_glob = "mask.tif"

    image = Sentinel2SR(tmp_path / "a", bands=["B4", "B3"])
    path = tmp_path / "fractions" / "mask.tif"
    with pytest.raises(ValueError) as refused:
        image & Labels(str(tmp_path / "fractions"))
    assert str(refused.value).startswith(
        f"label file {path} (Labels) holds values that are not whole class ids (0.7, ...): "
        "TorchGeo reads a mask as integers, truncating them (0.7 -> class 0); store the class "
        "ids as integers (gdal_translate -ot Byte"
    ), str(refused.value)
    mask = whole(image & Labels(str(tmp_path / "whole")))["mask"].numpy().squeeze()
    np.testing.assert_array_equal(mask, whole_ids.astype(np.int64))


def test_labels_beyond_which_the_image_reaches_warn_unless_nodata_is_declared(
    tmp_path: Path,
) -> None:
    """TorchGeo fills label pixels beyond a label file that declares no nodata with 0, so a
    chip at the labels' edge trained its unlabelled half as class 0, silently. The
    intersection now warns, naming the dataset and the fix; with the fix (``nodata = 255``
    on the class, or in the file) the pixels beyond read 255 and nothing is said."""
    _pair(tmp_path)
    labels = np.random.default_rng(8).integers(1, 3, size=(N, N // 2)).astype(np.uint8)
    write(tmp_path / "half" / "mask.tif", labels)  # the left half of the image, no nodata
    write(tmp_path / "declared" / "mask.tif", labels, nodata=255)
    write(tmp_path / "whole" / "mask.tif", np.ones((N, N), np.uint8))  # all of it

    class Labels(RasterDataset):
        is_image = False
        filename_glob = "*mask.tif"

    class Declared(Labels):
        nodata = 255

    image = Sentinel2SR(tmp_path / "a", bands=["B4", "B3"])
    with pytest.warns(UserWarning) as warned:
        ds = image & Labels(str(tmp_path / "half"))
    said = [str(w.message) for w in warned if "label file" in str(w.message)]
    assert said == [
        "1 of the 1 label file(s) of Labels that the images meet (first: "
        f"{tmp_path / 'half' / 'mask.tif'}) declare no nodata, and the images reach beyond the "
        "label files (about 512 label pixels, 50 % of the images' area): TorchGeo fills label "
        "pixels beyond a file with 0, so they read as class 0, and train as it where the image "
        "has data. Set `nodata = 255` (the unlabelled value) on Labels (TorchGeo's "
        "RasterDataset.nodata) or in the files, and give the task ignore_index=255"
    ], said
    mask = whole(ds)["mask"].numpy().squeeze()
    np.testing.assert_array_equal(mask[:, : N // 2], labels)
    assert (mask[:, N // 2 :] == 0).all()  # the fault the warning names
    with warnings.catch_warnings(record=True) as caught:  # the fixes, full labels: silent
        warnings.simplefilter("always")
        fixed = [
            Sentinel2SR(tmp_path / "a", bands=["B4", "B3"]) & Declared(str(tmp_path / "half")),
            Sentinel2SR(tmp_path / "a", bands=["B4", "B3"]) & Labels(str(tmp_path / "declared")),
        ]
        Sentinel2SR(tmp_path / "a", bands=["B4", "B3"]) & Labels(str(tmp_path / "whole"))
    assert not [w for w in caught if "label file" in str(w.message)]
    # a far tile without nodata is no matter (the images do not meet it): not opened, silent
    write(tmp_path / "mixed" / "mask.tif", labels, nodata=255)
    far = write(tmp_path / "mixed" / "far_mask.tif", labels)
    with rasterio.open(far, "r+") as dst:
        dst.transform = from_origin(X0 + 5000, Y0, 10, 10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Sentinel2SR(tmp_path / "a", bands=["B4", "B3"]) & Labels(str(tmp_path / "mixed"))
    assert not [w for w in caught if "label file" in str(w.message)]
    for ds in fixed:
        mask = whole(ds)["mask"].numpy().squeeze()
        np.testing.assert_array_equal(mask[:, : N // 2], labels)
        assert (mask[:, N // 2 :] == 255).all()


def test_label_fill_check_sees_a_column_but_not_a_reprojection_sliver(tmp_path: Path) -> None:
    """Labels one column short of the image fill that column with 0 (warned, counted); labels
    in EPSG:4326 covering the whole image are silent, though their index footprint (the
    polygon of the 4 reprojected corners) misses a sliver of it (10 pixels' area for this
    379 x 379 px image; it warned before the footprints were given half a pixel of slack)."""
    from rasterio.warp import calculate_default_transform, reproject

    side = 379
    image_data = np.full((2, side, side), 1000, np.uint16)
    write(tmp_path / "big" / "s2.tif", image_data, names=["B4", "B3"])
    write(tmp_path / "short" / "mask.tif", np.ones((side, side - 1), np.uint8))
    left, bottom, right, top = X0, Y0 - side * 10, X0 + side * 10, Y0
    transform, width, height = calculate_default_transform(
        CRS, "EPSG:4326", side, side, left, bottom, right, top
    )
    warped = np.zeros((1, height, width), np.uint8)
    reproject(np.ones((1, side, side), np.uint8), warped, src_transform=from_origin(X0, Y0, 10, 10),
              src_crs=CRS, dst_transform=transform, dst_crs="EPSG:4326")  # fmt: skip
    (tmp_path / "geographic").mkdir()
    profile = {"driver": "GTiff", "width": width, "height": height, "count": 1}
    with rasterio.open(tmp_path / "geographic" / "mask.tif", "w", dtype="uint8",
                       crs="EPSG:4326", transform=transform, **profile) as dst:  # fmt: skip
        dst.write(warped)

    class Labels(RasterDataset):
        is_image = False
        filename_glob = "mask.tif"

    image = Sentinel2SR(tmp_path / "big")
    with pytest.warns(UserWarning, match=r"about 379 label pixels, 0\.26 % of the images' area"):
        image & Labels(str(tmp_path / "short"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Sentinel2SR(tmp_path / "big") & Labels(str(tmp_path / "geographic"))
    assert not [w for w in caught if "label file" in str(w.message)], caught


def test_label_compositions_and_disjoint_labels_name_the_fix(tmp_path: Path) -> None:
    """A union of label datasets was refused as a dataset without bands (whose advice, `&`,
    stacks the masks); labels off the image were TorchGeo's "Datasets have no spatial
    intersection", naming neither dataset nor where they are."""
    _pair(tmp_path)
    write(tmp_path / "l1" / "mask.tif", np.ones((N, N), np.uint8), nodata=255)
    write(tmp_path / "l2" / "mask.tif", np.ones((N, N), np.uint8), nodata=255)

    class Labels(RasterDataset):
        is_image = False
        filename_glob = "mask.tif"

    image = Sentinel2SR(tmp_path / "a", bands=["B4", "B3"])
    union = Labels(str(tmp_path / "l1")) | Labels(str(tmp_path / "l2"))
    refused = r"label datasets combined with `\|` \(UnionDataset\) cannot .* Labels\(\['a/'"
    with pytest.raises(BandError, match=refused):
        image & union
    path = tmp_path / "far" / "mask.tif"
    write(path, np.ones((N, N), np.uint8), nodata=255)
    with rasterio.open(path, "r+") as dst:  # 5 km east of the image
        dst.transform = from_origin(X0 + 5000, Y0, 10, 10)
    with pytest.raises(RuntimeError) as err:
        Sentinel2SR(tmp_path / "a", bands=["B4", "B3"]) & Labels(str(tmp_path / "far"))
    assert str(err.value) == (
        "Sentinel2SR [600000, 3999680, 600320, 4000000] and Labels [605000, 3999680, 605320, "
        "4000000] do not overlap (bounds as xmin, ymin, xmax, ymax in EPSG:32652): "
        "check that both cover the same area, and that each file's CRS is the one its "
        "coordinates are in (a UTM zone off by one moves it ~600 km)"
    )


def test_union_checks_band_order_and_mosaics_first_valid(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    a = rng.integers(300, 6000, size=(3, N, N)).astype(np.uint16)
    b = rng.integers(300, 6000, size=(3, N, N)).astype(np.uint16)
    a[:, :10, :] = 0  # the first dataset misses the top rows
    b[:, 20:, :] = 0
    write(tmp_path / "a" / "a.tif", a, names=["B4", "B3", "B2"])
    write(tmp_path / "b" / "b.tif", b, names=["B4", "B3", "B2"])
    write(tmp_path / "c" / "c.tif", b[[2, 1, 0]], names=["B2", "B3", "B4"])
    order = ["B4", "B3", "B2"]
    first = Sentinel2SR(tmp_path / "a", bands=order)
    with pytest.raises(BandError, match=r"same bands in a different order.*bands=\['B4', 'B3'"):
        first | Sentinel2SR(tmp_path / "c", bands=["B2", "B3", "B4"])
    # the fix the message gives: the same bands= for both
    fixed = first | Sentinel2SR(tmp_path / "c", bands=order)
    ds = Sentinel2SR(tmp_path / "a", bands=order) | Sentinel2SR(tmp_path / "b", bands=order)
    assert isinstance(ds, DOFAUnionDataset) and ds.bands == ("B4", "B3", "B2")
    va, vb = (a != 0).all(axis=0), (b != 0).all(axis=0)
    expected = np.where(va[None], a, np.where(vb[None], b, 0)).astype(np.float32)
    for union in (ds, fixed):
        sample = whole(union)
        np.testing.assert_array_equal(sample["image"].numpy(), expected)
        np.testing.assert_array_equal(sample["valid"].numpy(), va | vb)
        np.testing.assert_allclose(sample["wavelengths"].numpy(), [0.665, 0.56, 0.49])
    # nested: a union stacked with further bands
    write(tmp_path / "d" / "d.tif", a[:1] + 1, names=["B8"])
    nested = ds & Sentinel2SR(tmp_path / "d")
    assert nested.bands == ("B4", "B3", "B2", "B8")
    assert whole(nested)["image"].shape == (4, N, N)
