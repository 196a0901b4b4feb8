"""Every numeric input dtype gives exactly its float32 cast's result, in every door.

The doors: the transform steps and :class:`DOFAPreprocess` (numpy or torch images),
:func:`preprocess_array`, :func:`get_embedding` (``resize`` and ``tile``),
:func:`get_embeddings_batch_from_inputs`, the encoder itself and the datasets' raster read path.

The pixel values are integers in [3, 127], exactly representable in every dtype tested
(int8 ... float64, float16 and bfloat16 included), so every dtype's float32 cast is the same
array and one reference serves all; a float64 array with non-integer values (numpy's default,
Earth Engine's exports) is checked against its own float32 cast. Preprocessed samples must be
bitwise equal; embeddings (a base forward costs seconds on a small CPU, so few are run) equal
to float32 rounding.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from torchgeo.samplers import GriddedPatchSampler

from torchgeo_dofa.api import SensorSpec, get_embedding, get_embeddings_batch_from_inputs
from torchgeo_dofa.bands import norm_stats
from torchgeo_dofa.datamodules import check_raw_reflectance
from torchgeo_dofa.datasets import InputError, Sentinel2SR
from torchgeo_dofa.model import build_encoder
from torchgeo_dofa.transforms import (
    AttachWavelengths,
    CheckReflectance,
    DOFAPreprocess,
    NormalizeReflectance,
    ReflectanceWarning,
    ResizeTo,
    TileTo,
    as_float32,
    preprocess_array,
)

BANDS = ("B4", "B3", "B2", "B8")
SENSOR = SensorSpec(bands=BANDS)
#: (C, H, W) integer reflectance in [3, 127]: exact in every dtype below.
BASE = np.random.default_rng(0).integers(3, 128, size=(4, 40, 56)).astype(np.float64)
REFERENCE = BASE.astype(np.float32)

NUMPY_DTYPES = [
    "uint8",
    "int8",
    "uint16",
    "int16",
    "uint32",
    "int32",
    "uint64",
    "int64",
    "float16",
    "float32",
    "float64",
    ">u2",  # big-endian, as some readers return
    ">f8",
]
TORCH_DTYPES = [
    torch.uint8,
    torch.int8,
    torch.uint16,
    torch.int16,
    torch.uint32,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
]
ALL_INPUTS = [pytest.param(np.dtype(d), id=f"numpy-{d}") for d in NUMPY_DTYPES] + [
    pytest.param(d, id=str(d)) for d in TORCH_DTYPES
]


def cast(dtype: np.dtype | torch.dtype, base: np.ndarray = BASE) -> np.ndarray | torch.Tensor:
    """``base`` in ``dtype``: a numpy array for a numpy dtype, a tensor for a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return torch.from_numpy(base).to(dtype)
    return base.astype(dtype)


def assert_same_sample(out: dict[str, Any], ref: dict[str, Any]) -> None:
    """Same keys, dtypes and values (a key a step does not own may stay a numpy array)."""
    assert out.keys() == ref.keys()
    assert isinstance(out["image"], torch.Tensor)
    for key, value in ref.items():
        got, want = torch.as_tensor(out[key]), torch.as_tensor(value)
        assert got.dtype == want.dtype, key
        assert torch.equal(got, want), key


# ----------------------------------------------------------------------------- cast point


@pytest.mark.parametrize("dtype", ALL_INPUTS)
def test_as_float32_equals_the_float32_cast(dtype: np.dtype | torch.dtype) -> None:
    out = as_float32(cast(dtype))
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.from_numpy(REFERENCE))


def test_as_float32_masked_array_is_missing_data() -> None:
    data = np.ma.masked_equal(BASE.astype(np.int16), int(BASE[0, 0, 0]))
    out = as_float32(data)
    expected = np.where(data.mask, np.nan, BASE).astype(np.float32)
    np.testing.assert_array_equal(out.numpy(), expected)
    assert bool(out.isnan().any())


@pytest.mark.parametrize("dtype", ALL_INPUTS)
def test_as_float32_warns_for_8_bit_integers_only(dtype: np.dtype | torch.dtype) -> None:
    narrow = str(dtype).removeprefix("torch.") in {"uint8", "int8"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        as_float32(cast(dtype), "input_chw")
    messages = [str(w.message) for w in caught if issubclass(w.category, ReflectanceWarning)]
    # shown at the caller's line (this test), not at a line inside the package
    assert {w.filename for w in caught} <= {__file__}
    if narrow:
        assert len(messages) == 1
        assert messages[0].startswith(f"input_chw has dtype {str(dtype).removeprefix('torch.')}")
        assert "cannot hold raw surface reflectance (0..10000" in messages[0]
    else:
        assert messages == []


def test_a_transforms_warning_points_at_the_callers_line() -> None:
    """Called through nn.Module.__call__, the warning pointed into torch/nn/modules."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DOFAPreprocess(["B4", "B3", "B2"])({"image": torch.full((3, 8, 8), 90, dtype=torch.uint8)})
    said = [w for w in caught if issubclass(w.category, ReflectanceWarning)]
    assert len(said) == 1 and said[0].filename == __file__


@pytest.mark.parametrize(
    "value", [BASE > 50, BASE.astype(np.complex64), np.array([["a"]]), torch.ones(2, 2, 2).bool()]
)
def test_as_float32_rejects_non_numbers(value: Any) -> None:
    with pytest.raises(TypeError, match="real numbers.*got (numpy )?dtype"):
        as_float32(value, "image")


# ----------------------------------------------------------------------------- transforms


@pytest.fixture(scope="module")
def stacks() -> dict[str, DOFAPreprocess]:
    return {prep: DOFAPreprocess(BANDS, input_prep=prep) for prep in ("resize", "tile")}


@pytest.mark.parametrize("prep", ["resize", "tile"])
@pytest.mark.parametrize("dtype", ALL_INPUTS)
def test_preprocess_any_dtype_equals_float32_cast(
    stacks: dict[str, DOFAPreprocess], prep: str, dtype: np.dtype | torch.dtype
) -> None:
    stack = stacks[prep]
    ref = stack({"image": torch.from_numpy(REFERENCE)})
    assert_same_sample(stack({"image": cast(dtype)}), ref)
    # the batch form too
    batch_ref = stack({"image": torch.from_numpy(np.stack([REFERENCE, REFERENCE]))})
    assert_same_sample(stack({"image": cast(dtype, np.stack([BASE, BASE]))}), batch_ref)


@pytest.mark.parametrize("dtype", ALL_INPUTS)
def test_preprocess_array_any_dtype_equals_float32_cast(dtype: np.dtype | torch.dtype) -> None:
    transform = from_origin(500000.0, 4000000.0, 10.0, 10.0)
    ref = preprocess_array(REFERENCE, BANDS, transform=transform, nodata=17)
    out = preprocess_array(cast(dtype), BANDS, transform=transform, nodata=17)
    assert_same_sample(out, ref)
    assert not bool(out["valid"].all())  # nodata=17 compared after the cast, in every dtype


@pytest.mark.parametrize(
    "step",
    [
        AttachWavelengths(BANDS),
        CheckReflectance(),
        NormalizeReflectance(BANDS),
        ResizeTo(),
        TileTo(),
    ],
    ids=lambda s: type(s).__name__,
)
@pytest.mark.parametrize("dtype", ["float64", "uint16", "int16", "float16"])
def test_each_step_takes_numpy_of_any_dtype(step: torch.nn.Module, dtype: str) -> None:
    valid = np.ones(BASE.shape[1:], dtype=bool)
    valid[:3] = False
    transform = np.array(list(from_origin(0.0, 100.0, 1.0, 1.0)), dtype=np.float64)

    def sample(image: Any, as_numpy: bool) -> dict[str, Any]:
        if as_numpy:
            return {"image": image, "valid": valid.copy(), "transform": transform.copy()}
        return {
            "image": torch.from_numpy(REFERENCE),
            "valid": torch.from_numpy(valid.copy()),
            "transform": torch.from_numpy(transform.copy()),
        }

    ref = step(sample(None, as_numpy=False))
    out = step(sample(BASE.astype(dtype), as_numpy=True))
    assert_same_sample(out, ref)


def test_dofa_preprocess_takes_numpy_as_the_readme_shows() -> None:
    raw_chw = np.random.default_rng(1).uniform(300, 3000, (4, 100, 150))  # float64
    prep = DOFAPreprocess(bands=["B04", "B03", "B02", "B08"])
    sample = prep({"image": raw_chw})
    assert sample["image"].shape == (4, 224, 224) and sample["image"].dtype == torch.float32
    assert sample["valid"].shape == (224, 224) and sample["empty"].shape == ()
    ref = prep({"image": torch.from_numpy(raw_chw.astype(np.float32))})
    assert_same_sample(sample, ref)
    # numpy reference of the formula: a square 224 input is only normalised,
    # (clip(x, 0, 10000) / 10000 * 255 - mean) / std with DOFA's per-band statistics
    square = np.random.default_rng(2).uniform(300, 3000, (4, 224, 224))
    out = prep({"image": square})["image"].numpy()
    mean, std = (np.asarray(v)[:, None, None] for v in norm_stats(list(prep.bands)))
    x = square.astype(np.float32).astype(np.float64)
    expected = (np.clip(x, 0, 10000) / 10000 * 255 - mean) / std
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- encoder


def test_encoder_casts_input_to_its_weights_dtype() -> None:
    torch.manual_seed(0)
    encoder = build_encoder("base", interpolate_pos_embed=True).eval()
    x = torch.randn(1, 4, 32, 32, dtype=torch.float64)
    waves = [0.665, 0.56, 0.49, 0.842]
    with torch.inference_mode():
        ref = encoder(x.float(), waves)
        out = encoder(x, waves)
    assert out.pooled.dtype == torch.float32
    torch.testing.assert_close(out.pooled, ref.pooled, rtol=0, atol=0)
    torch.testing.assert_close(out.grid, ref.grid, rtol=0, atol=0)


# ----------------------------------------------------------------------------- API doors


def _embed(**kwargs: Any) -> np.ndarray:
    return np.asarray(get_embedding("dofa", sensor=SENSOR, weights=None, **kwargs).data)


def test_get_embedding_float64_equals_float32_cast_resize_and_tile() -> None:
    """The reported case: numpy float64 (uniform 300..3000) and a float64 tensor, both preps."""
    x = np.random.default_rng(3).uniform(300, 3000, (4, 48, 48))
    ref = _embed(input_chw=x.astype(np.float32))
    np.testing.assert_allclose(_embed(input_chw=x), ref, rtol=1e-5, atol=1e-5)
    ref_tile = _embed(input_chw=x.astype(np.float32), input_prep="tile")
    out_tile = _embed(input_chw=torch.from_numpy(x), input_prep="tile")
    np.testing.assert_allclose(out_tile, ref_tile, rtol=1e-5, atol=1e-5)


def test_batch_function_any_dtype_equals_float32_cast() -> None:
    dtypes: list[np.dtype | torch.dtype] = [
        np.dtype("float32"),
        np.dtype("float64"),
        np.dtype("float16"),
        np.dtype("uint16"),
        np.dtype("uint8"),
        torch.int16,
        torch.bfloat16,
        torch.float64,
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = get_embeddings_batch_from_inputs(
            "dofa", input_chws=[cast(d) for d in dtypes], sensor=SENSOR, weights=None
        )
    # the 8-bit input is named by its place in the list
    said = [w for w in caught if issubclass(w.category, ReflectanceWarning)]
    assert len(said) == 1 and str(said[0].message).startswith("input_chws[4] has dtype uint8, ")
    assert said[0].filename == __file__  # the caller's line (it was a line in the API)
    ref = np.asarray(out[0].data)
    for dtype, emb in zip(dtypes[1:], out[1:], strict=True):
        np.testing.assert_allclose(emb.data, ref, rtol=1e-5, atol=1e-5, err_msg=str(dtype))


def test_an_array_of_8_bit_or_percent_values_in_a_wider_type_is_warned_of() -> None:
    """The same pixels warned of in a file ("the valid values of every band stay at or below
    255") passed silently as an array (get_embedding(input_chw=...), preprocess_array,
    DOFAPreprocess(whole_input=True)) and embedded near-black (a stranger's finding). A chip
    cut from a scene is not judged so (dark water); an 8-bit array has its dtype's warning
    only."""
    raw = np.random.default_rng(1).integers(100, 6000, size=(4, 80, 80)).astype(np.float32)
    said = "the valid values of every band stay at or below 255 (at most "

    def warned(run: Any) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
        return [str(w.message) for w in caught if issubclass(w.category, ReflectanceWarning)]

    def doors(array: np.ndarray) -> list[Any]:  # the API, preprocess_array, the stack
        return [
            lambda: get_embedding("dofa", input_chw=array, sensor=SENSOR, weights=None),
            lambda: preprocess_array(array, BANDS),
            lambda: DOFAPreprocess(BANDS, whole_input=True)({"image": torch.from_numpy(array)}),
        ]

    for low in (raw / 100, np.clip(raw / 30, 0, 255).astype(np.uint16)):
        for run in doors(low):
            (message,) = warned(run)
            assert message.startswith(said) and "Are they 8-bit (0..255) or percent" in message
    assert warned(lambda: preprocess_array(raw, BANDS)) == []  # raw reflectance
    chip = torch.from_numpy(raw / 100)
    assert warned(lambda: DOFAPreprocess(BANDS)({"image": chip})) == []  # a chip: dark water
    small = raw[:, :60, :60] / 100  # 3600 valid pixels: too few to judge a whole input
    assert warned(lambda: preprocess_array(small, BANDS)) == []
    for run in doors(np.clip(raw / 30, 0, 255).astype(np.uint8)):
        (message,) = warned(run)
        assert "has dtype uint8" in message
    # Python's default: once per line of the caller's; the check's own filter cleared that
    # record, so the dtype's warning came on every call (helper-129)
    eight_bit = np.clip(raw / 30, 0, 255).astype(np.uint8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            get_embedding("dofa", input_chw=eight_bit, sensor=SENSOR, weights=None)
        for _ in range(3):
            DOFAPreprocess(BANDS, whole_input=True)({"image": torch.from_numpy(eight_bit)})
    assert len([w for w in caught if issubclass(w.category, ReflectanceWarning)]) == 2


# ----------------------------------------------------------------------------- datasets


RASTER_DTYPES = ["uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64"]


def _write_raster(path: Path, data: np.ndarray, descriptions: tuple[str, ...] = BANDS) -> Path:
    profile = {
        "driver": "GTiff",
        "width": data.shape[2],
        "height": data.shape[1],
        "count": data.shape[0],
        "dtype": data.dtype.name,
        "crs": "EPSG:32633",
        "transform": from_origin(500000.0, 4000000.0, 10.0, 10.0),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if descriptions:
            dst.descriptions = descriptions
    return path


@pytest.mark.parametrize("dtype", ["complex64", "complex128"])
def test_dataset_refuses_complex_rasters(tmp_path: Path, dtype: str) -> None:
    """A complex raster was embedded from its real part (numpy's warning, naming no file)."""
    path = _write_raster(tmp_path / "in" / "slc.tif", BASE.astype(dtype))
    with pytest.raises(InputError) as refused:
        Sentinel2SR(path, bands=["B4", "B3", "B2"])
    assert str(refused.value) == (
        f"{path} stores band {BANDS.index('B4') + 1} as {dtype} (complex values, e.g. SAR's "
        "single-look complex samples), which cannot be surface reflectance: give the bands as "
        "real numbers (reflectance x 10000; for SAR, amplitude or backscatter)"
    )


@pytest.mark.parametrize("dtype", RASTER_DTYPES)
def test_dataset_warns_once_for_8_bit_rasters(tmp_path: Path, dtype: str) -> None:
    path = _write_raster(tmp_path / "in" / f"tci_{dtype}.tif", BASE.astype(dtype))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Sentinel2SR(path.parent, offset=0)
    messages = [str(w.message) for w in caught if issubclass(w.category, ReflectanceWarning)]
    assert {w.filename for w in caught} <= {__file__}  # the caller's line
    if dtype in {"uint8", "int8"}:
        assert messages == [
            f"tci_{dtype}.tif has dtype {dtype}, which cannot hold raw surface reflectance "
            "(0..10000, e.g. Sentinel-2 L2A's uint16): an 8-bit raster is a display product "
            "(a true-colour TCI image, a stretched export), and its values embed as near-black "
            "reflectance. Give the reflectance bands, or rescale the data to reflectance x 10000"
        ]
    else:
        assert messages == []


def test_a_4_band_8_bit_file_reads_without_rasterio_warnings(tmp_path: Path) -> None:
    """GDAL takes a 4-band uint8 GeoTIFF with a nodata value for RGBA: rasterio's
    NodataShadowWarning came with every chip read (the masks follow the declared nodata, as
    the read wants)."""
    data = np.repeat(np.repeat(BASE.astype("uint8"), 8, axis=1), 8, axis=2)  # 320 x 448
    data[:, :, :100] = 0
    path = tmp_path / "s.tif"
    profile = {"driver": "GTiff", "width": 448, "height": 320, "count": 4, "dtype": "uint8"}
    tiles = {"tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate"}
    with rasterio.open(
        path, "w", **profile, **tiles, crs="EPSG:32633",
        transform=from_origin(5e5, 4e6, 10, 10), nodata=0,
    ) as dst:  # fmt: skip
        dst.write(data)
        dst.descriptions = BANDS
    with rasterio.open(path) as src:  # what GDAL makes of it
        assert src.colorinterp[3] == rasterio.enums.ColorInterp.alpha
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = Sentinel2SR(path, offset=0)
        chips = [ds.read_chip(c) for c in GriddedPatchSampler(ds, size=224)]
        check_raw_reflectance(ds)  # the data module's scale check reads every file
        valid = ds.read_chip(ds.bounds)["valid"]
    assert not [w for w in caught if issubclass(w.category, rasterio.errors.NodataShadowWarning)]
    assert len(chips) == 4 and not valid[:, :100].any() and valid[:, 100:].all()


def test_dataset_warns_only_for_the_8_bit_bands_it_reads(tmp_path: Path) -> None:
    """Per-band files: a uint8 band left out of ``bands`` is no reason to warn."""
    scene = tmp_path / "scene"
    for band, dtype in [("B04", "uint16"), ("B03", "uint8"), ("B02", "uint16"), ("B08", "uint8")]:
        data = BASE[:1].astype(dtype)
        _write_raster(scene / f"T33UUP_20230615T100559_{band}_10m.tif", data, ())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Sentinel2SR(scene, bands=["B4", "B2"], offset=0)
        assert not [w for w in caught if issubclass(w.category, ReflectanceWarning)]
        Sentinel2SR(scene, offset=0)
    messages = [str(w.message) for w in caught if issubclass(w.category, ReflectanceWarning)]
    assert len(messages) == 1
    assert messages[0].startswith(
        "2 files (T33UUP_20230615T100559_B03_10m.tif, T33UUP_20230615T100559_B08_10m.tif) "
        "have dtype uint8, which cannot hold raw surface reflectance"
    )


@pytest.mark.parametrize("dtype", RASTER_DTYPES)
def test_dataset_read_any_raster_dtype_equals_float32(tmp_path: Path, dtype: str) -> None:
    ref_ds = Sentinel2SR(_write_raster(tmp_path / "f32" / "scene.tif", REFERENCE), offset=0)
    ds = Sentinel2SR(_write_raster(tmp_path / dtype / "scene.tif", BASE.astype(dtype)), offset=0)
    index = ds.bounds
    ref, out = ref_ds.read_chip(index), ds.read_chip(index)
    assert out["image"].dtype == torch.float32
    assert torch.equal(out["image"], ref["image"])
    assert torch.equal(out["valid"], ref["valid"])
    order = [BANDS.index(band) for band in ds.bands]  # the dataset's channel order
    np.testing.assert_array_equal(out["image"].numpy(), REFERENCE[order])
