"""Tests for torchgeo_dofa.transforms against an independent numpy implementation."""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path

import kornia.augmentation as K
import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
from affine import Affine
from rasterio.transform import from_origin
from torch import nn
from torchgeo.datasets import RasterDataset
from torchgeo.datasets.utils import stack_samples

from torchgeo_dofa.bands import BandError
from torchgeo_dofa.transforms import (
    AttachWavelengths,
    AugmentWithValid,
    CheckReflectance,
    DOFAPreprocess,
    NormalizeReflectance,
    ReflectanceError,
    ResizeTo,
    TileTo,
    grid_affine,
    pad_to_square,
    preprocess_array,
    stitch_tiles,
)

# Facts copied from the reference (DOFA pre-training statistics, 0..255 scale; wavelengths um),
# deliberately not imported from the package under test.
STATS = {
    "B4": (114.1099739, 77.84352553),
    "B3": (114.81779093, 69.96844919),
    "B2": (126.63977424, 67.42465279),
    "B5": (84.33539309, 64.57022983),
    "B6": (97.84789168, 61.72545487),
    "B7": (103.94461911, 61.34187099),
    "B8": (101.435633, 60.29744676),
    "B11": (72.32804172, 47.88519516),
    "B12": (56.66528851, 42.55886798),
}
WAVELENGTHS = {
    "B2": 0.490,
    "B3": 0.560,
    "B4": 0.665,
    "B5": 0.705,
    "B6": 0.740,
    "B7": 0.783,
    "B8": 0.842,
    "B11": 1.610,
    "B12": 2.190,
}
S2_9 = ["B4", "B3", "B2", "B5", "B6", "B7", "B8", "B11", "B12"]
UTM = from_origin(500000.0, 4000000.0, 10.0, 10.0)  # 10 m pixels, north up


# ----------------------------------------------------------------------------- references


def ref_normalize(x: np.ndarray, bands: list[str]) -> np.ndarray:
    """Reference formula in float64: clip, /10000*255, (x - mean) / std."""
    mean = np.array([STATS[b][0] for b in bands])[:, None, None]
    std = np.array([STATS[b][1] for b in bands])[:, None, None]
    y = np.clip(x.astype(np.float64), 0, 10000) / 10000 * 255
    return (y - mean) / std


def ref_pad_square(x: np.ndarray) -> np.ndarray:
    """Centre pad to square with numpy.pad: reflect, or edge where pad >= short side."""
    h, w = x.shape[-2:]
    s = max(h, w)
    ph, pw = s - h, s - w
    mode = "reflect" if (ph < h and pw < w) else "edge"
    widths = [(0, 0)] * (x.ndim - 2) + [(ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)]
    out: np.ndarray = np.pad(x, widths, mode=mode)  # type: ignore[call-overload]
    return out


def ref_bilinear(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of (..., H, W), align_corners=False, no antialias (half-pixel centres)."""

    def axis(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = (np.arange(size) + 0.5) * (n_in / size) - 0.5
        src = np.maximum(src, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    h, w = x.shape[-2:]
    r0, r1, lr = axis(h)
    c0, c1, lc = axis(w)
    top = x[..., r0, :] * (1 - lr)[:, None] + x[..., r1, :] * lr[:, None]
    return top[..., c0] * (1 - lc) + top[..., c1] * lc


def compose(*affines: Affine) -> Affine:
    """Matrix product of affines via numpy (independent of the affine package's operators)."""
    m = np.eye(3)
    for a in affines:
        m = m @ np.array(list(a), dtype=np.float64).reshape(3, 3)
    return Affine(*m.ravel()[:6])


def apply(a: Affine, x: float, y: float) -> tuple[float, float]:
    m = np.array(list(a), dtype=np.float64).reshape(3, 3)
    u, v, _ = m @ np.array([x, y, 1.0])
    return float(u), float(v)


def ref_pipeline(x: np.ndarray, bands: list[str], size: int = 224) -> np.ndarray:
    return ref_bilinear(ref_pad_square(ref_normalize(x, bands)), size)


def raw(
    shape: tuple[int, ...], seed: int = 0, lo: float = -300.0, hi: float = 12000.0
) -> np.ndarray:
    """Raw reflectance-like values, including some outside [0, 10000] to exercise the clip."""
    return np.random.default_rng(seed).uniform(lo, hi, size=shape).astype(np.float32)


def assert_close(actual: torch.Tensor, expected: np.ndarray, atol: float = 2e-5) -> None:
    """Equal to float32 rounding; resized values need a looser atol because torch computes
    the bilinear source coordinates in float32 (error ~1e-5 px times neighbour differences)."""
    np.testing.assert_allclose(actual.detach().cpu().numpy(), expected, rtol=1e-5, atol=atol)


# ----------------------------------------------------------------------------- numerics


def test_normalisation_matches_reference_formula() -> None:
    x = raw((9, 224, 224))
    out = DOFAPreprocess(bands=S2_9)({"image": torch.from_numpy(x)})
    assert out["image"].shape == (9, 224, 224)
    assert out["image"].dtype == torch.float32
    assert_close(out["image"], ref_normalize(x, S2_9))
    # the clip is applied: values above 10000 all map to (255 - mean) / std
    assert float(out["image"][0].max()) == pytest.approx((255 - STATS["B4"][0]) / STATS["B4"][1])


def test_normalize_step_accepts_integer_images() -> None:
    x = raw((3, 20, 20), lo=0, hi=9000).astype(np.int16)
    out = NormalizeReflectance(["B4", "B3", "B2"])({"image": torch.from_numpy(x)})
    assert out["image"].dtype == torch.float32
    assert_close(out["image"], ref_normalize(x, ["B4", "B3", "B2"]))


def test_normalize_alone_refuses_what_check_reflectance_refuses() -> None:
    """NormalizeReflectance without CheckReflectance before it normalised a [0, 1] image to
    an almost constant -mean/std, which passed every later check: a task trained on it."""
    bands = ["B4", "B3", "B2"]
    x = torch.from_numpy(raw((2, 3, 20, 20), lo=0, hi=9000))
    with pytest.raises(
        ReflectanceError,
        match=r"^input looks already scaled: all valid values lie in \[0.000171, 0.8996\] "
        r"within \[0, 2\] \(batch item\(s\) \[0, 1\]\)\..* \(NormalizeReflectance checks this "
        r"itself "
        r"where no CheckReflectance ran before it: chain CheckReflectance\(nodata=\.\.\.\)",
    ):
        NormalizeReflectance(bands)({"image": x / 10000})
    # a chip negative in every band (cloud shadow after the -1000 offset) is not refused
    # by either: it normalises as its values clipped to 0
    shadow = -x[0] / 10 - 1  # above the -1000 floor
    out = NormalizeReflectance(bands)({"image": shadow.clone()})["image"]
    assert_close(out, ref_normalize(shadow.numpy(), bands))
    # a Sentinel2SR sample's 'valid' is no CheckReflectance: still judged, over its pixels
    scaled = x[0] / 10000
    scaled[:, :2] = 5000.0  # two rows of raw values, outside 'valid'
    valid = torch.ones(20, 20, dtype=torch.bool)
    valid[:2] = False
    with pytest.raises(ReflectanceError, match="already scaled"):
        NormalizeReflectance(bands)({"image": scaled, "valid": valid})
    # raw reflectance, a chip of fill (0) alone, and values after CheckReflectance: as before
    out = NormalizeReflectance(bands)({"image": x.clone()})["image"]
    assert_close(out, ref_normalize(x.numpy(), bands))
    zeros = NormalizeReflectance(bands)({"image": torch.zeros(3, 8, 8)})["image"]
    assert_close(zeros[:, 0, 0], np.array([-STATS[b][0] / STATS[b][1] for b in bands]))
    checked = CheckReflectance(nodata=1.0)({"image": torch.ones(3, 8, 8)})
    assert bool(checked["empty"])  # every pixel the declared fill: not judged
    NormalizeReflectance(bands)(checked)


@pytest.mark.parametrize(
    ("h", "w"), [(100, 300), (300, 100), (150, 200), (101, 300), (1000, 1000), (224, 224)]
)
def test_resize_matches_reference(h: int, w: int) -> None:
    bands = ["B4", "B3", "B2", "B8"]
    x = raw((4, h, w), seed=h + w)
    out = DOFAPreprocess(bands=bands)({"image": torch.from_numpy(x)})
    assert out["image"].shape == (4, 224, 224)
    # float32 bilinear source coordinates: error grows with the input side
    assert_close(out["image"], ref_pipeline(x, bands), atol=5e-5 + 1e-6 * max(h, w))


@pytest.mark.parametrize(("h", "w"), [(100, 300), (300, 100), (150, 200), (7, 5), (5, 5)])
def test_pad_to_square_matches_numpy_pad(h: int, w: int) -> None:
    x = raw((2, h, w), seed=3)
    np.testing.assert_array_equal(pad_to_square(torch.from_numpy(x)).numpy(), ref_pad_square(x))


def test_resize_is_not_a_stretch() -> None:
    # a pure left-right ramp stays a ramp along the columns only: rows of a stretched image
    # would be equal too, but the padded one keeps the column profile of the original square
    x = np.tile(np.linspace(1000, 9000, 300, dtype=np.float32), (1, 100, 1))
    out = ResizeTo()({"image": torch.from_numpy(x)})["image"][0].numpy()
    assert np.allclose(out, out[:1])  # edge padding along rows keeps every row identical
    y = np.transpose(x, (0, 2, 1)).copy()  # 300 x 100: columns padded by edge replication
    out_t = ResizeTo()({"image": torch.from_numpy(y)})["image"][0].numpy()
    assert np.allclose(out_t[:, :1], out_t)  # each row constant => no stretch of the ramp


@pytest.mark.parametrize(
    ("bands", "spelled"),
    [(["B8", "B2", "B12"], ["B08", "B02", "B12"]), (["B11", "B4"], ["b11", "B04"])],
)
def test_subset_reordered_bands_and_spellings(bands: list[str], spelled: list[str]) -> None:
    x = raw((len(bands), 60, 90), seed=7)
    a = DOFAPreprocess(bands=bands)({"image": torch.from_numpy(x)})
    b = DOFAPreprocess(bands=spelled)({"image": torch.from_numpy(x.copy())})
    torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
    assert_close(a["image"], ref_pipeline(x, bands), atol=2e-4)
    expected = torch.tensor([WAVELENGTHS[n] for n in bands], dtype=torch.float32)
    torch.testing.assert_close(a["wavelengths"], expected)
    torch.testing.assert_close(b["wavelengths"], expected)
    assert DOFAPreprocess(bands=spelled).bands == tuple(bands)


def test_batch_matches_single_samples() -> None:
    x = raw((3, 9, 100, 300), seed=11)
    stack = DOFAPreprocess(bands=S2_9)
    batch = stack({"image": torch.from_numpy(x.copy())})
    assert batch["image"].shape == (3, 9, 224, 224)
    assert batch["wavelengths"].shape == (3, 9)
    assert batch["valid"].shape == (3, 224, 224)
    assert batch["empty"].shape == (3,)
    for i in range(3):
        single = stack({"image": torch.from_numpy(x[i].copy())})
        torch.testing.assert_close(batch["image"][i], single["image"])
        assert_close(single["image"], ref_pipeline(x[i], S2_9), atol=2e-4)
        torch.testing.assert_close(batch["wavelengths"][i], single["wavelengths"])


def test_a_sample_whose_wavelengths_name_other_bands_is_refused() -> None:
    """A dataset's sample says which band each channel is: a transform configured for
    another order would name and normalise channel 0 (B2's data) as B4."""
    x = torch.from_numpy(raw((4, 32, 32), seed=3))
    dataset_order = torch.tensor([0.49, 0.56, 0.665, 0.842])  # B2, B3, B4, B8
    with pytest.raises(BandError) as refused:
        DOFAPreprocess(bands=["B04", "B03", "B02", "B08"])(
            {"image": x.clone(), "wavelengths": dataset_order.clone()}
        )
    assert str(refused.value) == (
        "the sample's channels have wavelengths [0.49, 0.56, 0.665, 0.842] um (from its "
        "dataset, in channel order), but this transform was configured for [0.665, 0.56, "
        "0.49, 0.842] (bands=['B4', 'B3', 'B2', 'B8']): the channels would be taken for "
        "other bands and normalised with their statistics. Give the dataset's own order, e.g. "
        "DOFAPreprocess(bands=dataset.bands), or select bands on the dataset (bands=[...])"
    )
    # a batch (B, C) too, and explicit wavelengths
    batch = {"image": x[None].repeat(2, 1, 1, 1), "wavelengths": dataset_order.repeat(2, 1)}
    with pytest.raises(BandError, match=r"configured for \[0.5, 0.6, 0.7, 0.8\] \(wavelengths\)"):
        AttachWavelengths(wavelengths=[0.5, 0.6, 0.7, 0.8])(dict(batch))
    # the same bands: accepted, within the spread of one band's centre between sources
    same = DOFAPreprocess(bands=["B2", "B3", "B4", "B8"])
    out = same({"image": x.clone(), "wavelengths": dataset_order + 0.015})
    torch.testing.assert_close(out["wavelengths"], dataset_order)
    torch.testing.assert_close(out["image"], same({"image": x.clone()})["image"])
    same(dict(batch))


def test_wavelengths_contradicting_sentinel2_names_are_refused() -> None:
    """Statistics are looked up by name, wavelengths used as given: a dataset's wavelengths
    copied beside names in the file's order normalised B2's channel as B4."""
    with pytest.raises(BandError) as refused:
        DOFAPreprocess(bands=["B4", "B3", "B2", "B8"], wavelengths=[0.49, 0.56, 0.665, 0.842])
    assert str(refused.value).startswith(
        "wavelengths contradict the band names DOFA's statistics are looked up by (B4 is "
        "0.665 um, not 0.49; B2 is 0.49 um, not 0.665): a channel would be normalised as one band"
    )
    from torchgeo_dofa.cli import cli_hints

    # the command's hint: it ended "or the bands' own --mean /std=" (mean=/std= half rewritten)
    assert cli_hints(str(refused.value)).endswith("or the bands' own --mean and --std")
    with pytest.raises(BandError, match="R is 0.665 um, not 0.49"):  # the rgb preset's names
        DOFAPreprocess(bands=["R", "G", "B"], wavelengths=[0.49, 0.56, 0.665])
    # nanometres keep their own hint
    with pytest.raises(BandError, match="look like nanometres"):
        DOFAPreprocess(bands=["B4", "B3", "B2"], wavelengths=[665, 560, 490])
    # within one band's spread between sources, other spellings, date copies, other sensors
    DOFAPreprocess(bands=["B12", "b02", "B4_1"], wavelengths=[2.2024, 0.4924, 0.665])
    DOFAPreprocess(bands=["R", "G", "B"], wavelengths=[0.655, 0.56, 0.48])
    # names are labels only where the statistics are given (HLS L30's B05 is NIR, 0.865 um)
    hls, at = ["B02", "B03", "B04", "B05"], [0.48, 0.56, 0.655, 0.865]
    DOFAPreprocess(hls, at, mean=[80.0, 80.0, 80.0, 80.0], std=[20.0, 20.0, 20.0, 20.0])
    AttachWavelengths(hls, at)  # no statistics involved


def test_explicit_wavelengths_win() -> None:
    out = AttachWavelengths(bands=["X", "Y"], wavelengths=[0.5, 0.6])(
        {"image": torch.zeros(2, 4, 4)}
    )
    torch.testing.assert_close(out["wavelengths"], torch.tensor([0.5, 0.6]))


# ----------------------------------------------------------------------------- missing data


def test_nan_and_nodata_are_filled_and_recorded() -> None:
    x = raw((3, 32, 48), seed=5, lo=100, hi=9000)
    x[1, 3, 4] = np.nan  # NaN in one band invalidates the whole pixel
    x[0, 10, 20] = -9999
    x[2, 31, 47] = -9999
    x[0, 0, 0] = np.inf
    step = CheckReflectance(nodata=-9999, fill_value=0.0)
    out = step({"image": torch.from_numpy(x.copy())})
    expected_valid = np.ones((32, 48), dtype=bool)
    for r, c in [(3, 4), (10, 20), (31, 47), (0, 0)]:
        expected_valid[r, c] = False
    np.testing.assert_array_equal(out["valid"].numpy(), expected_valid)
    assert out["valid"].dtype == torch.bool
    assert out["empty"].shape == () and not bool(out["empty"])
    filled = np.where(expected_valid[None], x, 0.0)
    np.testing.assert_array_equal(out["image"].numpy(), filled)
    assert torch.isfinite(out["image"]).all()

    # full stack: filled pixels are normalised like any other value (fill 0 -> -mean/std)
    full = DOFAPreprocess(bands=["B4", "B3", "B2"], nodata=-9999)(
        {"image": torch.from_numpy(x[:, :32, :32].copy())}
    )
    assert_close(full["image"], ref_pipeline(filled[:, :32, :32], ["B4", "B3", "B2"]))


def ref_nodata(x: np.ndarray, nodata: float | None, fill: float | None) -> np.ndarray:
    """The no-data rule in numpy, every rule evaluated on every pixel (no shortcut)."""
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(x) | (x <= -1000.0)
        for value in (-9999.0, -32768.0, 65535.0) if nodata is None else (nodata,):
            if not math.isnan(value):
                bad |= x == value
        invalid = bad.any(axis=-3)
        if fill is not None:
            invalid |= (x == fill).all(axis=-3)
    return invalid


@pytest.mark.parametrize(
    "case",
    [
        "clean",  # positive, finite: the value-range shortcut skips every per-value rule
        "floor",  # a value exactly at -1000 (no data) and one just above (valid)
        "fill_at_max",  # 65535 as the largest value
        "fill_at_min",  # -32768 as the smallest value
        "declared_inside",  # a declared nodata value inside the value range
        "nan",
        "inf",
        "neg_inf",
        "fill_pixel",  # all bands == fill_value in one pixel, 0 in one band elsewhere
        "batch_one_bad",  # a batch whose second chip has a -9999 pixel
    ],
)
def test_nodata_mask_equals_every_rule_evaluated(case: str) -> None:
    from torchgeo_dofa.transforms import nodata_mask

    x = raw((3, 12, 10), seed=3, lo=1, hi=9000)
    nodata: float | None = None
    if case == "floor":
        x[0, 1, 1], x[1, 2, 2] = -1000.0, -999.5
    elif case == "fill_at_max":
        x[2, 5, 5] = 65535.0
    elif case == "fill_at_min":
        x[0, 4, 4] = -32768.0
    elif case == "declared_inside":
        nodata = float(x[1, 6, 7])
    elif case == "nan":
        x[1, 0, 9] = np.nan
    elif case == "inf":
        x[0, 11, 0] = np.inf
    elif case == "neg_inf":
        x[2, 3, 8] = -np.inf
    elif case == "fill_pixel":
        x[:, 7, 3] = 0.0
        x[1, 8, 8] = 0.0
    elif case == "batch_one_bad":
        x = np.stack([x, raw((3, 12, 10), seed=4, lo=1, hi=9000)])
        x[1, 0, 2, 2] = -9999.0
    declared = [nodata] if case == "declared_inside" else [None, -9999.0, float("nan")]
    for nd in declared:
        for fill in (0.0, None, 500.0):
            got = nodata_mask(torch.from_numpy(x), nd, fill)
            want = ref_nodata(x, nd, fill)
            assert got.dtype == torch.bool and got.shape == want.shape
            np.testing.assert_array_equal(got.numpy(), want)
    if case != "clean":
        assert ref_nodata(x, nodata, 0.0).any()  # each case really holds a no-data pixel


@pytest.mark.parametrize("value", [1e20, 0.3, 16777217.0, 1e30])
def test_nodata_and_fill_values_compare_in_the_image_dtype(value: float) -> None:
    """A value float32 cannot hold is compared as ``image == value`` rounds it (found by review)."""
    from torchgeo_dofa.transforms import nodata_mask

    chip = np.full((3, 4, 4), value, dtype=np.float32)  # every pixel is the declared nodata
    chip[:, 0, 0] = 500.0
    np.testing.assert_array_equal(
        nodata_mask(torch.from_numpy(chip), value, None).numpy(), ref_nodata(chip, value, None)
    )
    assert bool(nodata_mask(torch.from_numpy(chip), value, None)[1:, 1:].all())
    # the same rounding for the fill value (all bands equal to it)
    np.testing.assert_array_equal(
        nodata_mask(torch.from_numpy(chip), None, value).numpy(), ref_nodata(chip, None, value)
    )
    out = CheckReflectance(nodata=value)({"image": torch.from_numpy(chip[:, 1:, 1:].copy())})
    assert bool(out["empty"])
    # bfloat16 rounds 65535 (a conventional fill) to 65536: still no data
    assert bool(nodata_mask(torch.full((3, 2, 2), 65535.0, dtype=torch.bfloat16)).all())


def test_nodata_mask_needs_channels_and_pixels() -> None:
    from torchgeo_dofa.transforms import nodata_mask

    with pytest.raises(
        ValueError, match=r"expects \(\.\.\., C, H, W\), got an image of shape \(5, 5\)"
    ):
        nodata_mask(torch.zeros(5, 5))


def test_resize_keeps_a_non_bool_mask_rule_at_model_size() -> None:
    """A float / int ``valid`` at 224 px is thresholded (> 0.5) as at any other size."""
    valid = torch.full((224, 224), 0.3)
    valid[0, 0] = 1.0
    out = ResizeTo()({"image": torch.zeros(2, 224, 224), "valid": valid})
    assert out["valid"].dtype == torch.bool
    assert int(out["valid"].sum()) == 1 and bool(out["valid"][0, 0])


def test_normalisation_is_bit_identical_to_the_written_formula() -> None:
    """The in-place normalisation gives exactly ``(clamp(x) / 10000 * 255 - mean) / std``."""
    bands = ["B4", "B3", "B2", "B8"]
    x = torch.from_numpy(raw((2, 4, 64, 64), seed=11))
    before = x.clone()
    out = NormalizeReflectance(bands)({"image": x})["image"]
    mean = torch.tensor([STATS[b][0] for b in bands], dtype=torch.float64).float()[:, None, None]
    std = torch.tensor([STATS[b][1] for b in bands], dtype=torch.float64).float()[:, None, None]
    assert torch.equal(out, (x.clamp(0.0, 10000.0) / 10000.0 * 255.0 - mean) / std)
    assert torch.equal(x, before)  # the caller's image is not changed


def test_existing_valid_key_is_anded() -> None:
    x = raw((2, 8, 8), seed=9, lo=100, hi=9000)
    x[0, 0, 0] = np.nan
    given = torch.ones(8, 8, dtype=torch.bool)
    given[5, 5] = False
    out = CheckReflectance(fill_value=7.0)({"image": torch.from_numpy(x), "valid": given})
    expected = np.ones((8, 8), dtype=bool)
    expected[0, 0] = expected[5, 5] = False
    np.testing.assert_array_equal(out["valid"].numpy(), expected)
    assert out["image"][:, 5, 5].tolist() == [7.0, 7.0]


def test_fully_nodata_chip_is_empty_not_an_error() -> None:
    x = np.full((3, 16, 16), -9999, dtype=np.float32)
    out = DOFAPreprocess(bands=["B4", "B3", "B2"], nodata=-9999)({"image": torch.from_numpy(x)})
    assert bool(out["empty"]) and out["empty"].dtype == torch.bool
    assert not out["valid"].any()
    nan_chip = CheckReflectance()({"image": torch.full((3, 16, 16), float("nan"))})
    assert bool(nan_chip["empty"])


def test_batch_empty_flag_is_per_sample() -> None:
    x = raw((2, 3, 16, 16), seed=2, lo=100, hi=9000)
    x[0] = -9999
    out = CheckReflectance(nodata=-9999)({"image": torch.from_numpy(x)})
    assert out["empty"].tolist() == [True, False]
    assert out["valid"].shape == (2, 16, 16)


# ----------------------------------------------------------------------------- errors


def test_scaled_input_is_rejected() -> None:
    x = torch.rand(3, 16, 16)
    with pytest.raises(ValueError, match=r"raw surface reflectance 0\.\.10000") as info:
        DOFAPreprocess(bands=["B4", "B3", "B2"])({"image": x})
    assert isinstance(info.value, ReflectanceError)
    assert "[0, 1]" in str(info.value)


def test_scale_check_ignores_invalid_pixels_and_is_per_sample() -> None:
    x = torch.rand(2, 3, 16, 16) * 5000 + 100
    x[1] = torch.rand(3, 16, 16)  # second item scaled to [0, 1] ...
    x[1, :, 0, 0] = -9999  # ... with a nodata pixel that must not hide it
    with pytest.raises(ReflectanceError, match=r"batch item\(s\) \[1\]"):
        CheckReflectance(nodata=-9999)({"image": x})
    # the fill value written into invalid pixels does not count either
    for fill in (100.0, -1.0):
        with pytest.raises(ReflectanceError, match=r"batch item\(s\) \[1\]"):
            CheckReflectance(nodata=-9999, fill_value=fill)({"image": x})
    ok = torch.rand(3, 16, 16) * 5000 + 100
    ok[:, 2, 2] = float("nan")  # raw reflectance with a NaN pixel is fine
    CheckReflectance()({"image": ok})


def test_wrong_wavelength_count() -> None:
    with pytest.raises(BandError, match="3 band names but 2 wavelengths"):
        DOFAPreprocess(bands=["B4", "B3", "B2"], wavelengths=[0.665, 0.56])
    with pytest.raises(BandError, match="4 channels but 3 wavelengths"):
        AttachWavelengths(bands=["B4", "B3", "B2"])({"image": torch.zeros(4, 8, 8)})
    with pytest.raises(BandError, match="4 channels but NormalizeReflectance was built for 3"):
        NormalizeReflectance(["B4", "B3", "B2"])({"image": torch.zeros(4, 8, 8)})


def test_unknown_band_without_wavelengths_says_how_to_pass_them() -> None:
    with pytest.raises(BandError, match=r"'VNIR9'.*wavelengths=\["):
        DOFAPreprocess(bands=["B4", "VNIR9"])


def test_band_without_stats() -> None:
    with pytest.raises(BandError, match=r"no DOFA normalisation statistics for band\(s\) \['B1'\]"):
        DOFAPreprocess(bands=["B1", "B2"])
    with pytest.raises(BandError, match="statistics"):
        DOFAPreprocess(bands=["B4", "X"], wavelengths=[0.665, 0.9])


def test_unknown_input_prep() -> None:
    with pytest.raises(ValueError, match=r"unknown input_prep 'crop'.*'resize', 'tile'"):
        DOFAPreprocess(bands=S2_9, input_prep="crop")
    with pytest.raises(ValueError, match="unknown input_prep"):
        grid_affine(UTM, 10, 10, input_prep="crop")


def test_presets() -> None:
    s2 = DOFAPreprocess.from_preset("sentinel2")
    assert s2.bands == tuple(S2_9)
    torch.testing.assert_close(
        s2.wavelengths, torch.tensor([WAVELENGTHS[b] for b in S2_9], dtype=torch.float32)
    )
    rgb = DOFAPreprocess.from_preset("rgb", input_prep="tile")
    assert rgb.input_prep == "tile"
    x = raw((3, 30, 30))
    rgb_out = rgb({"image": torch.from_numpy(x)})["image"]
    assert_close(
        rgb_out[0, :, :30, :30],
        ref_normalize(x, ["B4", "B3", "B2"]),
    )
    # the presets' band names work without the preset, any case
    by_name = DOFAPreprocess(bands=["r", "G", "B"], input_prep="tile")
    torch.testing.assert_close(by_name.wavelengths, torch.tensor([0.665, 0.56, 0.49]))
    torch.testing.assert_close(by_name({"image": torch.from_numpy(x)})["image"], rgb_out)
    sar = AttachWavelengths(["VV", "VH"])({"image": torch.zeros(2, 4, 4)})
    torch.testing.assert_close(sar["wavelengths"], torch.tensor([3.75, 3.75]))
    with pytest.raises(BandError, match=r"sentinel1.*no DOFA normalisation statistics"):
        DOFAPreprocess.from_preset("sentinel1")
    with pytest.raises(BandError, match="unknown preset"):
        DOFAPreprocess.from_preset("landsat")


def test_given_statistics_are_checked_against_dofas_scale() -> None:
    """Statistics for another sensor's bands are on DOFA's 0..255 scale; those of raw
    reflectance (0..10000) or of reflectance scaled to 0..1 are refused, naming the factor."""
    x = raw((2, 16, 16))
    out = NormalizeReflectance(["a", "b"], mean=[80, 90], std=[40, 50])(
        {"image": torch.from_numpy(x)}
    )
    expected = (np.clip(x, 0, 10000) / 10000 * 255 - np.array([80, 90])[:, None, None]) / np.array(
        [40, 50]
    )[:, None, None]
    assert_close(out["image"], expected)
    cases: list[tuple[list[float], list[float], str]] = [
        ([4000, 4500], [40, 50], "multiply them by 0.0255"),
        ([0.3, 0.35], [0.1, 0.2], "multiply them by 255"),
        ([-8, 90], [40, 50], "negative mean"),
        ([80, 90], [40, 0], "std > 0"),
        ([80, float("nan")], [40, 50], "finite"),
        ([80], [40], "1 means and 1 stds for 2 bands"),
    ]
    for mean, std, message in cases:
        with pytest.raises(BandError, match=message):
            NormalizeReflectance(["a", "b"], mean=mean, std=std)
    with pytest.raises(BandError, match="give both"):
        DOFAPreprocess(["a", "b"], wavelengths=[0.5, 0.6], mean=[80, 90])


def test_bad_image_rank() -> None:
    with pytest.raises(ValueError, match=r"\(C, H, W\) or \(B, C, H, W\)"):
        CheckReflectance()({"image": torch.zeros(8, 8)})


@pytest.mark.parametrize("shape", [(4, 0, 50), (2, 4, 50, 0)])
def test_an_image_without_pixels_is_named(shape: tuple[int, ...]) -> None:
    """Torch's 'amin(): Expected reduction dim ...' IndexError before (a stranger's find)."""
    preprocess = DOFAPreprocess(["B4", "B3", "B2", "B8"])
    with pytest.raises(ValueError, match=rf"has no pixels \(shape {re.escape(str(shape))}\)"):
        preprocess({"image": torch.zeros(shape)})


# ----------------------------------------------------------------------------- composition


def test_composes_with_sequential() -> None:
    x = raw((2, 3, 50, 70), seed=4)
    bands = ["B4", "B3", "B2"]
    seq = nn.Sequential(
        AttachWavelengths(bands), CheckReflectance(), NormalizeReflectance(bands), ResizeTo()
    )
    a = seq({"image": torch.from_numpy(x.copy()), "label": torch.tensor([1, 2])})
    b = DOFAPreprocess(bands)({"image": torch.from_numpy(x.copy())})
    torch.testing.assert_close(a["image"], b["image"])
    assert a["label"].tolist() == [1, 2]  # keys a step does not own are untouched


def test_composes_with_kornia_augmentation_sequential() -> None:
    bands = ["B4", "B3", "B2"]
    x = raw((2, 3, 40, 60), seed=8)
    aug = K.AugmentationSequential(K.RandomHorizontalFlip(p=1.0), data_keys=None)
    # augment the raw batch, then preprocess
    pipe = nn.Sequential(aug, DOFAPreprocess(bands))
    out = pipe({"image": torch.from_numpy(x.copy()), "transform": torch.tensor(list(UTM))})
    assert_close(out["image"][1], ref_pipeline(x[1, :, :, ::-1].copy(), bands), atol=2e-4)
    assert out["wavelengths"].shape == (2, 3)
    # preprocess, then augment: our extra keys pass through kornia untouched, `valid` too,
    # which then no longer describes the pixels (what AugmentWithValid is for)
    pre = DOFAPreprocess(bands)({"image": torch.from_numpy(x.copy())})
    keys = {k: v.clone() for k, v in pre.items()}
    post = aug(pre)
    torch.testing.assert_close(post["image"], keys["image"].flip(-1))
    for key in ("wavelengths", "valid", "empty"):
        torch.testing.assert_close(post[key], keys[key])


@pytest.mark.parametrize("keepdim", [True, False])
def test_augment_with_valid_moves_the_mask_with_the_pixels(keepdim: bool) -> None:
    x = raw((3, 64, 96), seed=9)
    x[:, :, :30] = 0  # no data on the left
    label = torch.arange(64 * 96).reshape(1, 64, 96).float()  # a segmentation target
    sample = CheckReflectance()({"image": torch.from_numpy(x.copy())})  # raw, with `valid`
    sample["mask"] = label.clone()
    flip = K.AugmentationSequential(K.RandomHorizontalFlip(p=1.0), data_keys=None, keepdim=keepdim)
    out = AugmentWithValid(flip)(dict(sample))
    lead = () if keepdim else (1,)  # kornia batches a single sample without keepdim
    assert out["valid"].dtype == torch.bool and out["valid"].shape == (*lead, 64, 96)
    expected = torch.ones(64, 96, dtype=torch.bool)
    expected[:, -30:] = False  # the no-data columns are now on the right
    torch.testing.assert_close(out["valid"].reshape(64, 96), expected)
    torch.testing.assert_close(out["image"].reshape(3, 64, 96), sample["image"].flip(-1))
    torch.testing.assert_close(out["mask"].reshape(1, 64, 96), label.flip(-1))
    assert "mask_valid" not in out and out["empty"].reshape(()).item() is False


@pytest.mark.parametrize("input_prep", ["resize", "tile"])
def test_every_key_the_stack_writes_passes_kornia_and_augment_with_valid(input_prep: str) -> None:
    """kornia's ``AugmentationSequential(data_keys=None)`` reads keys named ``input_*`` (and
    ``image_*``, ``mask_*``, ...) as data: the tiles' ``input_size`` made it fail ("Expected
    input of [torch.bfloat16, ...]. Got torch.int64"), plain or in ``AugmentWithValid``.
    Every key the stack writes, in both modes, now passes through unchanged; the tiles flip."""
    bands = ["B4", "B3", "B2"]
    x = raw((3, 100, 300), seed=11)
    x[:, :, :20] = 0  # no data on the left: `valid` is not all True
    t = torch.tensor(list(UTM), dtype=torch.float64)
    prep = DOFAPreprocess(bands, input_prep=input_prep)
    sample = prep({"image": torch.from_numpy(x.copy()), "transform": t.clone()})
    assert len(sample) >= 7, sorted(sample)  # image, wavelengths, valid, empty, ... (+ tiles')
    flip = K.AugmentationSequential(
        K.RandomHorizontalFlip(p=1.0), data_keys=None, keepdim=True
    )  # fmt: skip
    for augment in (flip, AugmentWithValid(flip)):
        before = {k: v.clone() for k, v in sample.items()}
        out = augment(dict(before))
        assert sorted(out) == sorted(sample), type(augment).__name__
        torch.testing.assert_close(out["image"], sample["image"].flip(-1))
        for key in set(sample) - {"image", "valid", "valid_fraction"}:
            torch.testing.assert_close(out[key], sample[key], msg=key)
        # the input's own share (before the resize's padding), one per input, also for
        # tiles (AugmentWithValid had made it one per tile): a flip keeps it
        torch.testing.assert_close(out["valid_fraction"], sample["valid_fraction"])
    # AugmentWithValid moved `valid` with the pixels, tile by tile
    torch.testing.assert_close(out["valid"], sample["valid"].flip(-1))
    assert sample["valid_fraction"].item() == pytest.approx(280 / 300)  # independent: 20 columns


def test_augment_with_valid_marks_padding_invalid_and_recomputes_empty() -> None:
    x = torch.from_numpy(raw((2, 3, 64, 64), seed=10))
    batch = CheckReflectance()({"image": x.clone()})
    batch["valid"][1] = False  # an empty chip stays empty
    batch["empty"] = ~batch["valid"].flatten(1).any(1)
    rotate = K.AugmentationSequential(K.RandomRotation(degrees=(45.0, 45.0), p=1.0), data_keys=None)
    out = AugmentWithValid(rotate)(batch)
    assert out["valid"].shape == (2, 64, 64)
    corners = out["valid"][0, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert not corners.any() and out["valid"][0, 28:36, 28:36].all()  # padding vs centre
    assert out["empty"].tolist() == [False, True]
    # the share of valid pixels, scaled by what the rotation kept: chip 0 was all valid
    assert out["valid_fraction"][0].item() == pytest.approx(out["valid"][0].float().mean().item())
    assert out["valid_fraction"][1].item() == 0.0
    # a sample without `valid`: every pixel was valid, the padding is not
    out = AugmentWithValid(rotate)({"image": x.clone()})
    assert out["valid"][:, 28:36, 28:36].all() and not out["valid"][:, 0, 0].any()


@pytest.mark.parametrize(
    "augmentation",
    [K.CenterCrop((64, 48)), K.Resize((128, 192)), K.RandomResizedCrop((64, 96), scale=(0.3, 0.3))],
    ids=["crop", "resize", "resized-crop"],
)
def test_augment_with_valid_fraction_is_the_share_after_crops_and_resizes(augmentation) -> None:
    """helper-120: the share of valid pixels was scaled by pixel counts, so a crop of valid
    pixels only gave 0.25 and a resize of a half-valid chip 1.0. For a chip not resized
    before (its valid_fraction is the share of its own pixels), the fraction after is the
    share of valid pixels of the output, whatever the augmentation does to the size."""
    x = raw((3, 64, 96), seed=12)
    x[:, :, :30] = 0  # no data on the left: 66 of 96 columns valid
    sample = CheckReflectance()({"image": torch.from_numpy(x.copy())})
    assert sample["valid_fraction"].item() == pytest.approx(66 / 96)
    torch.manual_seed(0)
    aug = K.AugmentationSequential(augmentation, data_keys=None, keepdim=True)
    out = AugmentWithValid(aug)(dict(sample))
    assert out["valid_fraction"].shape == ()
    assert out["valid_fraction"].item() == pytest.approx(out["valid"].float().mean().item())
    # a fraction of shape (1,) (one sample, as collated by hand) keeps its shape
    one = dict(sample, valid_fraction=sample["valid_fraction"].reshape(1))
    torch.manual_seed(0)
    assert AugmentWithValid(aug)(one)["valid_fraction"].shape == (1,)


def test_stack_samples_after_transform() -> None:
    bands = ["B4", "B3", "B2"]
    t = torch.tensor(list(UTM), dtype=torch.float64)
    for prep, img_shape in (("resize", (2, 3, 224, 224)), ("tile", (2, 2, 3, 224, 224))):
        stack = DOFAPreprocess(bands, input_prep=prep)
        samples = [
            stack({"image": torch.from_numpy(raw((3, 100, 300), seed=i)), "transform": t.clone()})
            for i in range(2)
        ]
        batch = stack_samples(samples)
        assert batch["image"].shape == img_shape
        assert batch["wavelengths"].shape == (2, 3)
        assert batch["empty"].shape == (2,)
        assert batch["grid_transform"].shape == (2, 9)
        assert all(isinstance(v, torch.Tensor) for v in batch.values())


def test_torchgeo_raster_dataset_transforms(tmp_path: Path) -> None:
    x = raw((3, 50, 80), seed=12, lo=100, hi=9000)
    profile = {
        "driver": "GTiff",
        "height": 50,
        "width": 80,
        "count": 3,
        "dtype": "float32",
        "crs": "EPSG:32633",
        "transform": UTM,
    }
    with rasterio.open(tmp_path / "chip.tif", "w", **profile) as dst:
        dst.write(x)
    ds = RasterDataset(paths=tmp_path, transforms=DOFAPreprocess(["B04", "B03", "B02"]))
    xs, ys, _ = ds.bounds
    sample = ds[xs, ys]
    assert_close(sample["image"], ref_pipeline(x, ["B4", "B3", "B2"]), atol=2e-4)
    expected = grid_affine(UTM, 50, 80)
    np.testing.assert_allclose(sample["grid_transform"].numpy()[:6], list(expected)[:6], rtol=1e-6)


# ----------------------------------------------------------------------------- tiling


def test_tiles_cover_the_padded_input() -> None:
    h, w = 500, 300
    x = raw((2, h, w), seed=13, lo=100, hi=9000)
    out = TileTo()(
        {"image": torch.from_numpy(x.copy()), "valid": torch.ones(h, w, dtype=torch.bool)}
    )
    rows, cols = math.ceil(h / 224), math.ceil(w / 224)
    assert out["image"].shape == (rows * cols, 2, 224, 224)
    assert out["tile_offsets"].dtype == torch.long
    expected_offsets = [[r * 224, c * 224] for r in range(rows) for c in range(cols)]
    assert out["tile_offsets"].tolist() == expected_offsets
    padded = np.pad(x, [(0, 0), (0, rows * 224 - h), (0, cols * 224 - w)], mode="reflect")
    for tile, (r, c) in zip(out["image"], expected_offsets):
        np.testing.assert_array_equal(tile.numpy(), padded[:, r : r + 224, c : c + 224])
    valid = out["valid"]
    assert valid.shape == (rows * cols, 224, 224)
    # last tile starts at (448, 224): rows >= 52 and cols >= 76 are padding
    assert valid[-1, :52, :76].all() and not valid[-1, 52:].any() and not valid[-1, :, 76:].any()


def test_tile_batch_shapes() -> None:
    x = torch.from_numpy(raw((2, 3, 100, 300), seed=1, lo=100, hi=9000))
    out = DOFAPreprocess(["B4", "B3", "B2"], input_prep="tile")({"image": x})
    assert out["image"].shape == (2, 2, 3, 224, 224)
    assert out["tile_offsets"].shape == (2, 2, 2)
    assert out["valid"].shape == (2, 2, 224, 224)
    assert out["empty"].shape == (2,)


@pytest.mark.parametrize(("h", "w"), [(500, 300), (224, 224), (100, 230), (1000, 1000)])
def test_stitch_tiles_places_cells(h: int, w: int) -> None:
    out = TileTo()({"image": torch.zeros(1, h, w)})
    offsets = out["tile_offsets"]
    # synthetic per-tile grid encoding each cell's global (row, col) cell index
    i, j = torch.meshgrid(torch.arange(14), torch.arange(14), indexing="ij")
    grids = torch.stack(
        [torch.stack([i + r // 16, j + c // 16]).float() for r, c in offsets.tolist()]
    )
    stitched = stitch_tiles(grids, offsets, h, w)
    gh, gw = math.ceil(h / 16), math.ceil(w / 16)
    assert stitched.shape == (2, gh, gw)
    assert torch.equal(stitched[0], torch.arange(gh).float()[:, None].expand(gh, gw))
    assert torch.equal(stitched[1], torch.arange(gw).float()[None, :].expand(gh, gw))


def test_stitch_tiles_of_a_patch_model_equals_the_whole_image() -> None:
    # a "model" that averages each 16 x 16 patch: tiling + stitching must reproduce running it
    # on the whole (right/bottom padded) image, cropped to ceil(H/16) x ceil(W/16)
    h, w = 260, 470
    x = torch.from_numpy(raw((3, h, w), seed=21))
    out = TileTo()({"image": x.clone()})
    stitched = stitch_tiles(F.avg_pool2d(out["image"], 16), out["tile_offsets"], h, w)
    padded = torch.from_numpy(
        np.pad(x.numpy(), [(0, 0), (0, 448 - h), (0, 672 - w)], mode="reflect")
    )
    expected = F.avg_pool2d(padded[None], 16)[0][:, : math.ceil(h / 16), : math.ceil(w / 16)]
    torch.testing.assert_close(stitched, expected)


def test_stitch_tiles_rejects_bad_offsets() -> None:
    with pytest.raises(ValueError, match="multiples of patch_size"):
        stitch_tiles(torch.zeros(1, 2, 14, 14), [[8, 0]], 224, 224)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        stitch_tiles(torch.zeros(2, 2, 14, 14), [[0, 0]], 224, 224)
    # the tiles of a 379 x 578 input given another size (H and W swapped, too small): a map
    # of that size came back, 37 x 24 cells or 1 x 1, with no word (helper-128)
    out = TileTo()({"image": torch.zeros(1, 379, 578)})
    grids = torch.zeros(len(out["tile_offsets"]), 2, 14, 14)
    assert out["tiled_size"].tolist() == [379, 578]
    assert stitch_tiles(grids, out["tile_offsets"], 379, 578).shape == (2, 24, 37)
    for h, w in ((578, 379), (10, 10), (379, 800)):
        with pytest.raises(ValueError, match=rf"6 tile\(s\) of 224 x 224 px starting at rows "
                           rf"0..224, columns 0..448 do not tile a {h} x {w} input"):  # fmt: skip
            stitch_tiles(grids, out["tile_offsets"], h, w)


# ----------------------------------------------------------------------------- georeferencing


def grid_of(sample_image: np.ndarray, prep: str, transform: Affine) -> list[float]:
    out = preprocess_array(sample_image, ["B4"], input_prep=prep, transform=transform)
    assert out["grid_transform"].dtype == torch.float64
    return out["grid_transform"].tolist()


def test_grid_transform_resize_non_square() -> None:
    # 100 rows x 300 cols: padded to 300 x 300 with 100 rows on top; one cell = 16*300/224 px
    cell_m = 10.0 * 16 * 300 / 224
    got = grid_of(raw((1, 100, 300), lo=100, hi=9000), "resize", UTM)
    np.testing.assert_allclose(got, [cell_m, 0, 500000.0, 0, -cell_m, 4001000.0, 0, 0, 1])
    # 300 rows x 100 cols: 100 columns padded on the left
    got = grid_of(raw((1, 300, 100), lo=100, hi=9000), "resize", UTM)
    np.testing.assert_allclose(got, [cell_m, 0, 499000.0, 0, -cell_m, 4000000.0, 0, 0, 1])
    # odd pad: 101 x 300 -> 199 rows of pad, 99 on top
    got = grid_of(raw((1, 101, 300), lo=100, hi=9000), "resize", UTM)
    np.testing.assert_allclose(got, [cell_m, 0, 500000.0, 0, -cell_m, 4000990.0, 0, 0, 1])
    # square 224: one cell is 16 pixels = 160 m, origin unchanged
    got = grid_of(raw((1, 224, 224), lo=100, hi=9000), "resize", UTM)
    np.testing.assert_allclose(got, [160, 0, 500000.0, 0, -160, 4000000.0, 0, 0, 1])


def test_grid_transform_resize_cell_centres_land_on_the_input() -> None:
    # the centre of grid cell (row 7, col 0) of a 100 x 300 input maps to input pixel
    # ((7.5 * 16 * 300 / 224) - 100, 0.5 * 16 * 300 / 224) in the unpadded input
    g = grid_affine(UTM, 100, 300)
    x, y = apply(g, 0.5, 7.5)
    col, row = apply(~UTM, x, y)
    assert row == pytest.approx(7.5 * 16 * 300 / 224 - 100)
    assert col == pytest.approx(0.5 * 16 * 300 / 224)


def test_grid_transform_tile() -> None:
    got = grid_of(raw((1, 500, 300), lo=100, hi=9000), "tile", UTM)
    np.testing.assert_allclose(got, [160, 0, 500000.0, 0, -160, 4000000.0, 0, 0, 1])
    assert grid_affine(UTM, 500, 300, "tile") == compose(UTM, Affine.scale(16))


def test_grid_transform_batch_and_dtype() -> None:
    t = torch.stack(
        [torch.tensor(list(UTM)), torch.tensor(list(compose(UTM, Affine.translation(5, 5))))]
    )
    out = ResizeTo()({"image": torch.zeros(2, 1, 100, 300), "transform": t})
    assert out["grid_transform"].shape == (2, 9)
    assert out["grid_transform"].dtype == torch.float32  # follows TorchGeo's float32 transform
    second = grid_affine(compose(UTM, Affine.translation(5, 5)), 100, 300)
    np.testing.assert_allclose(out["grid_transform"][1].numpy()[:6], list(second)[:6], rtol=1e-6)
    assert "grid_transform" not in ResizeTo()({"image": torch.zeros(1, 8, 8)})


def test_resized_valid_marks_padding() -> None:
    out = ResizeTo()({"image": torch.zeros(1, 100, 300), "valid": torch.ones(100, 300).bool()})
    src = np.floor((np.arange(224) + 0.5) * 300 / 224)  # nearest-exact source row
    expected_rows = (src >= 100) & (src < 200)
    np.testing.assert_array_equal(out["valid"][:, 0].numpy(), expected_rows)
    assert out["valid"].shape == (224, 224)


# ----------------------------------------------------------------------------- helpers / device


def test_preprocess_array_numpy_and_tensor() -> None:
    x = raw((3, 64, 96), seed=30)
    a = preprocess_array(x, ["B4", "B3", "B2"])
    b = preprocess_array(torch.from_numpy(x), ["B4", "B3", "B2"])
    torch.testing.assert_close(a["image"], b["image"])
    assert_close(a["image"], ref_pipeline(x, ["B4", "B3", "B2"]), atol=2e-4)
    assert set(a) == {"image", "wavelengths", "valid", "empty", "valid_fraction"}
    ints = preprocess_array(np.clip(x, 0, 10000).astype(np.uint16), ["B4", "B3", "B2"])
    assert ints["image"].dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_image_device() -> None:
    x = raw((2, 9, 100, 300), seed=40)
    t = torch.tensor(list(UTM)).expand(2, 9).contiguous()
    stack = DOFAPreprocess(S2_9)
    gpu = stack({"image": torch.from_numpy(x).cuda(), "transform": t.cuda()})
    assert all(v.device.type == "cuda" for v in gpu.values())
    cpu = stack({"image": torch.from_numpy(x), "transform": t})
    torch.testing.assert_close(gpu["image"].cpu(), cpu["image"], rtol=1e-5, atol=1e-4)
    tiled = DOFAPreprocess(S2_9, input_prep="tile")({"image": torch.from_numpy(x).cuda()})
    assert tiled["tile_offsets"].device.type == "cuda"


def test_stack_pickles_for_dataloader_workers() -> None:
    stack = DOFAPreprocess(["B4", "B3", "B2"], nodata=-9999, input_prep="tile")
    clone = pickle.loads(pickle.dumps(stack))
    x = torch.from_numpy(raw((3, 40, 50), seed=50))
    torch.testing.assert_close(clone({"image": x.clone()})["image"], stack({"image": x})["image"])
    assert clone.bands == stack.bands and clone.input_prep == "tile"
    assert "nodata=-9999.0" in repr(clone)


def test_statistics_that_would_exceed_the_models_input_range_are_refused() -> None:
    """A std of 1e-30 ran, and its batch was refused only after the model loaded, as "raw
    reflectance" (the wrong cause); the bound is the model's own input check."""
    from torchgeo_dofa.bands import NORMALISED_LIMIT, BandError, norm_stats
    from torchgeo_dofa.embedder import NORMALISED_LIMIT as model_limit

    assert model_limit == NORMALISED_LIMIT
    # 255 / std is the farthest a band reaches from mean 0: 0.255 is the smallest std taken
    assert norm_stats(["x", "y"], [1e-9, 10.0], [0.2551, 5.0]) is not None
    with pytest.raises(BandError) as refused:
        norm_stats(["x", "y"], [10.0, 10.0], [5.0, 0.2])
    assert str(refused.value) == (
        "std 0.2 for band y would scale reflectance 0..10000 to values up to 1.22e+03, beyond "
        "the +-1000 the model takes (normalised input spans about +-5): give the band's "
        "standard deviation on DOFA's 0..255 scale (DOFA's Sentinel-2 ones are 43-78)"
    )


@pytest.mark.parametrize("fill", [float("nan"), float("inf"), -float("inf")])
def test_a_fill_value_that_is_not_finite_is_refused(fill: float) -> None:
    """helper-113: ``DOFAPreprocess(fill_value=nan)`` wrote NaN into the missing pixels."""
    with pytest.raises(ValueError, match=r"fill_value=.* is not a finite number"):
        CheckReflectance(fill_value=fill)
    with pytest.raises(ValueError, match=r"fill_value=.* is not a finite number"):
        DOFAPreprocess(["B4", "B3", "B2"], fill_value=fill)


@pytest.mark.parametrize("bands", ["B4", "B4 B3 B2", b"B4"])
def test_band_names_given_as_one_string_are_refused(bands: str) -> None:
    """helper-113: ``DOFAPreprocess(bands="B4")`` read the bands 'B' (the rgb preset's blue)
    and '4'; ``"RGB"`` would have been three bands without a word."""
    for make in (DOFAPreprocess, NormalizeReflectance, AttachWavelengths):
        with pytest.raises(BandError, match=r"bands=.* is one string: give a list of band"):
            make(bands)
