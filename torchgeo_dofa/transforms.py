"""DOFA input preprocessing as composable sample-dict transforms.

Every step is a :class:`torch.nn.Module` that takes a sample dict and returns it. A sample is
either single (``image`` of shape (C, H, W)) or a batch (``image`` of shape (B, C, H, W)); keys a
step does not own are left untouched, so the steps compose with :class:`torch.nn.Sequential`,
kornia's ``AugmentationSequential(data_keys=None)`` (it passes unknown keys through) and a
TorchGeo dataset's ``transforms=`` argument. Every value a step writes is a tensor, so
:func:`torchgeo.datasets.utils.stack_samples` can collate the result; band names live on the
transform, never in the sample. Steps run on whichever device the image is on.
``image`` may be a numpy array or a tensor of any real dtype (uint8 ... float64): every step
computes in float32 (:func:`as_float32`), so any dtype gives exactly its float32 cast's result;
``valid`` and ``transform`` may be numpy arrays too.

The standard stack (:class:`DOFAPreprocess`) follows DOFA's reference pipeline for raw surface
reflectance (0..10000):

1. :class:`AttachWavelengths` writes ``wavelengths`` (um, one per channel);
2. :class:`CheckReflectance` fills NaN / non-finite / nodata pixels with ``fill_value``, records
   them in ``valid`` and ``empty``, and rejects input already scaled to [0, 1] (or [0, 2]);
3. :class:`NormalizeReflectance` clips to [0, 10000], maps to 0..255 and standardises per band
   with DOFA's statistics (looked up by band name);
4. :class:`ResizeTo` (centre mirror-pad to a square, then bilinear resize to 224) or
   :class:`TileTo` (cut into 224 x 224 tiles; see :func:`stitch_tiles`).

Sample keys:

============== ============================ ===========================================
key            single / batch shape         written by
============== ============================ ===========================================
image          (C,H,W) / (B,C,H,W)          read by all; CheckReflectance (fill),
                                            NormalizeReflectance, ResizeTo, TileTo
wavelengths    (C,) / (B,C) float32         AttachWavelengths
valid          (H,W) / (B,H,W) bool         CheckReflectance (AND-ed with an existing
                                            one); ResizeTo and TileTo follow the image
empty          () / (B,) bool               CheckReflectance
transform      (9,) / (B,9)                 read (TorchGeo's pixel-grid affine)
grid_transform (9,) / (B,9)                 ResizeTo, TileTo (affine of the 16 x 16
                                            patch-grid cells)
tile_offsets   (N,2) / (B,N,2) long         TileTo ((row, col) pixel offsets)
============== ============================ ===========================================

Notes:
    - Labels (``mask``, ``label``, ...) and ``bounds`` are never touched: the size steps only
      reshape ``image`` and ``valid``. kornia's ``AugmentationSequential(data_keys=None)``
      passes ``wavelengths``, ``valid``, ``empty``, ``transform``, ``grid_transform`` and
      ``tile_offsets`` through unchanged (it adds a batch axis to a single (C,H,W) image
      unless ``keepdim=True``): wrap a geometric augmentation in :class:`AugmentWithValid`
      so that ``valid`` (and ``empty``) follow the pixels; ``transform`` and
      ``grid_transform`` keep describing the un-augmented geometry.
    - A non-square input is always padded, never stretched, whatever its aspect ratio (rs-embed
      falls back to a plain stretch from an aspect ratio of 2 on; this package follows DOFA's
      documented contract instead).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from affine import Affine
from torch import Tensor, nn

from torchgeo_dofa._warnings import warn
from torchgeo_dofa.bands import (
    PRESETS,
    WAVELENGTH_TOLERANCE,
    BandError,
    canonical_band,
    check_names_fit,
    check_unique_bands,
    norm_stats,
    refuse_one_string,
    resolve_wavelengths,
)

__all__ = [
    "CONVENTIONAL_FILLS",
    "INPUT_PREPS",
    "NARROW_DTYPES",
    "NODATA_FLOOR",
    "WAVELENGTH_TOLERANCE",
    "AttachWavelengths",
    "AugmentWithValid",
    "CheckReflectance",
    "DOFAPreprocess",
    "NormalizeReflectance",
    "ReflectanceError",
    "ReflectanceWarning",
    "ResizeTo",
    "TileTo",
    "as_fill_value",
    "as_float32",
    "grid_affine",
    "narrow_dtype_problem",
    "nodata_mask",
    "pad_to_square",
    "preprocess_array",
    "stitch_tiles",
]

#: Valid values of ``input_prep``.
INPUT_PREPS: tuple[str, ...] = ("resize", "tile")

#: Upper end of the raw surface-reflectance scale DOFA's pipeline expects.
REFLECTANCE_MAX = 10000.0

#: Input whose valid values all lie in [0, this] is taken to be already scaled (an error).
SCALED_MAX = 2.0

#: Input whose valid values all exceed this is not surface reflectance (an error): Level-2A
#: reflectance above 1 (10000) is rare even for clouds and snow, which are dark in some band
#: (snow and ice in the short-wave infrared, below 0.2), and DOFA's pipeline clips at
#: :data:`REFLECTANCE_MAX`, so every pixel of such a chip would embed alike. Twice the top of
#: the scale: the brightest real Sentinel-2 test scene, a cloudy Level-2A B02 at 60 m
#: (T29UNU, 2022-10-05), peaks at 18018 after its -1000 offset (median 2580).
SATURATED_MIN = 2 * REFLECTANCE_MAX

#: A whole input is judged for values negative in every band only with at least this many
#: valid pixels (a 64 x 64 px area): patches of cloud shadow and dark water are negative in
#: every band after baseline 04.00's -1000 offset, up to 2,014 connected pixels in the real
#: T29UNU tile of 2022-10-05 at 60 m (B02 and B04), so a smaller file, a patch of a
#: patch-based dataset or a piece of an export can be such a patch alone. Twice that.
WHOLE_INPUT_MIN_PIXELS = 4096

#: The question of an all-negative input's error (:func:`check_reflectance_range`); where
#: no offset was added, :func:`~torchgeo_dofa.datamodules.check_raw_reflectance` asks only
#: of dB / log values.
OFFSET_QUESTION = (
    "Was the -1000 offset of processing baseline 04.00 applied to data already corrected "
    "(offset=0), or are these dB / log values?"
)

#: Values at or below this (on the reflectance x 10000 scale) are no data. Surface reflectance
#: is not below -0.1: Sentinel-2 products from processing baseline 04.00 on store
#: ``reflectance x 10000 + 1000`` in digital numbers 1..65535 (0 is no data), so after the
#: offset the darkest real pixel is 1 - 1000 = -999, and legitimately dark pixels (water,
#: shadow) between -999 and 0 stay valid (the normalisation clips them to 0). -1000 is what a
#: no-data 0 becomes when the offset is applied blindly; -9999, -32768 and float32's lowest
#: value (common GeoTIFF fills) lie below it as well.
NODATA_FLOOR = -1000.0

#: Conventional fill values taken as no data when the input declares no nodata value:
#: -9999 (GDAL / HLS / many processing chains), -32768 (int16 minimum) and 65535 (uint16
#: maximum; also Sentinel-2's saturated-pixel value). Raw reflectance never takes them.
CONVENTIONAL_FILLS: tuple[float, ...] = (-9999.0, -32768.0, 65535.0)

Sample = dict[str, Any]


class ReflectanceError(ValueError):
    """Raised when the input is not raw surface reflectance on the 0..10000 scale."""


class ReflectanceWarning(UserWarning):
    """Warned when the input may not be raw surface reflectance (0..10000) but is embedded.

    A dtype that cannot hold it (8-bit), a file more than half of whose values in a band
    exceed 10000, a scene more than half of whose pixels are negative in every band
    (:func:`~torchgeo_dofa.datamodules.check_raw_reflectance`).
    """


#: A whole input (a file, an array of yours) whose valid values all lie in [0, LOW_MAX] in
#: every band (reflectance x 10000 of 2.55 % at most: darker than almost any land) holds
#: 8-bit (0..255) or percent (0..100) values stored in a wider type, which embed as
#: near-black: warned of (:func:`check_reflectance_range`,
#: :func:`~torchgeo_dofa.datamodules.check_raw_reflectance`).
LOW_MAX = 255.0
#: What the warning of such values says of them (a file's and an array's alike).
LOW_VALUES_ADVICE = (
    f"reflectance x 10000 that low (below {LOW_MAX / 100:.2f} %) is darker than almost any "
    "land, so they embed as near-black. Are they 8-bit (0..255) or percent (0..100) values? "
    "Rescale them to reflectance x 10000."
)

#: Integer dtypes too narrow for raw reflectance: an 8-bit band holds 0..255 (or -128..127),
#: i.e. reflectance below 0.0256 on DOFA's reflectance x 10000 scale, darker than almost any
#: land surface. Such rasters are display products (Sentinel-2's true-colour ``TCI`` image,
#: a stretched RGB export, a quantised quick-look), not the reflectance DOFA was trained on.
NARROW_DTYPES: frozenset[str] = frozenset({"uint8", "int8"})


def narrow_dtype_problem(dtype: Any, name: str = "image", plural: bool = False) -> str | None:
    """Describe why ``dtype`` cannot hold raw reflectance, or return None when it can.

    Args:
        dtype: a numpy or torch dtype, or a dtype name as rasterio gives it (``"uint8"``).
        name: what to call the input in the message.
        plural: ``name`` names several inputs (``"2 files (a.tif, b.tif)"``).

    Returns:
        The message of a :class:`ReflectanceWarning` for an 8-bit integer dtype
        (:data:`NARROW_DTYPES`), else None.
    """
    text = str(dtype).removeprefix("torch.")
    if text not in NARROW_DTYPES:
        return None
    what = (
        "8-bit rasters are display products (true-colour TCI images, stretched exports), and "
        "their values embed as near-black reflectance wherever chips are read from them"
        if plural
        else "an 8-bit raster is a display product (a true-colour TCI image, a stretched "
        "export), and its values embed as near-black reflectance"
    )
    return (
        f"{name} {'have' if plural else 'has'} dtype {text}, which cannot hold raw surface "
        f"reflectance (0..10000, e.g. Sentinel-2 L2A's uint16): {what}. Give the reflectance "
        "bands, or rescale the data to reflectance x 10000"
    )


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def as_float32(array: Any, name: str = "image") -> Tensor:
    """Return a numeric array or tensor as a float32 tensor, the dtype the whole stack uses.

    The single cast point of the package's inputs: every integer and floating dtype numpy,
    rasterio or torch produce (``uint8``/``16``/``32``/``64``, ``int8``/``16``/``32``/``64``,
    ``float16``/``bfloat16``/``float32``/``float64``, either byte order) becomes float32, so any
    of them gives exactly the result of its float32 cast. A numpy masked array (rasterio's
    ``read(masked=True)``) has its masked pixels set to NaN, i.e. missing data. A tensor keeps
    its device; a float32 tensor is returned as is (no copy).

    Args:
        array: numpy array (or anything :func:`numpy.asarray` accepts) or tensor.
        name: what to call the input in error messages.

    Returns:
        A float32 tensor of the same shape.

    Warns:
        ReflectanceWarning: for an 8-bit integer dtype (see :func:`narrow_dtype_problem`).

    Raises:
        TypeError: for boolean, complex or non-numeric data (the message names the dtype).
    """
    if isinstance(array, Tensor):
        if array.dtype == torch.bool or array.is_complex():
            raise TypeError(
                f"{name} must hold real numbers (raw reflectance), got dtype {array.dtype}; "
                "cast it to a numeric dtype first"
            )
        _warn_narrow(array.dtype, name)
        return array if array.dtype == torch.float32 else array.to(torch.float32)
    masked = array if isinstance(array, np.ma.MaskedArray) else None
    try:
        data = np.asarray(array)
    except Exception as err:
        raise TypeError(f"{name} must be a numpy array or a torch.Tensor: {err}") from err
    if data.dtype == np.bool_ or not (
        np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)
    ):
        raise TypeError(
            f"{name} must hold real numbers (raw reflectance), got numpy dtype {data.dtype}; "
            "cast it to a numeric dtype first"
        )
    _warn_narrow(data.dtype.newbyteorder("="), name)
    out = data.astype(np.float32, copy=False)  # also makes a big-endian array native
    if masked is not None and np.ma.getmask(masked) is not np.ma.nomask:
        out = np.where(np.ma.getmaskarray(masked), np.float32(np.nan), out)
    return torch.from_numpy(np.ascontiguousarray(out))


#: True while an input whose 8-bit dtype was warned of runs the stack (as a float copy):
#: :class:`CheckReflectance` does not warn of its values too (a context variable, not a
#: ``warnings.catch_warnings`` filter, which clears Python's once-per-place record of every
#: warning, so that the dtype's warning came again on every call).
_EIGHT_BIT_INPUT: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "torchgeo_dofa_eight_bit_input", default=False
)


@contextlib.contextmanager
def eight_bit_input(narrow: bool) -> Iterator[None]:
    """Within: the input running the stack was 8-bit (``narrow``), its dtype warned of.

    Args:
        narrow: whether the input's dtype was 8-bit (:data:`NARROW_DTYPES`).

    Yields:
        Nothing.
    """
    token = _EIGHT_BIT_INPUT.set(narrow or _EIGHT_BIT_INPUT.get())
    try:
        yield
    finally:
        _EIGHT_BIT_INPUT.reset(token)


def _dtype_name(array: Any) -> str:
    """A numpy array's or tensor's dtype as numpy names it (``uint8``), else ``""``."""
    return str(getattr(array, "dtype", "")).removeprefix("torch.")


def _warn_narrow(dtype: Any, name: str) -> None:
    problem = narrow_dtype_problem(dtype, name)
    if problem:
        warn(problem, ReflectanceWarning)


def _image(sample: Sample, step: str) -> Tensor:
    """Return ``sample["image"]`` as a float32 (C,H,W) or (B,C,H,W) tensor.

    A numpy array (or a tensor of another dtype) is converted with :func:`as_float32` and
    written back into the sample, so every step sees, and leaves, a float32 tensor.
    """
    if not isinstance(sample, dict) or "image" not in sample:
        raise KeyError(f"{step} expects a sample dict with an 'image' key")
    image = sample["image"]
    if not isinstance(image, (Tensor, np.ndarray)):
        raise TypeError(
            f"{step}: sample['image'] must be a torch.Tensor or numpy array, got {type(image)}"
        )
    if image.ndim not in (3, 4):
        raise ValueError(
            f"{step}: sample['image'] must be (C, H, W) or (B, C, H, W), got {tuple(image.shape)}"
        )
    if 0 in image.shape[-2:]:
        raise ValueError(
            f"{step}: sample['image'] has no pixels (shape {tuple(image.shape)}): a chip read "
            "outside the raster, or a window of zero height or width"
        )
    image = as_float32(image, f"{step}: sample['image']")
    sample["image"] = image
    return image


def _optional_tensor(sample: Sample, key: str) -> Tensor | None:
    """Return ``sample[key]`` as a tensor (numpy converted and written back), or None."""
    value = sample.get(key)
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
        sample[key] = value
    return value if isinstance(value, Tensor) else None


def nodata_mask(
    image: Tensor, nodata: float | None = None, fill_value: float | None = None
) -> Tensor:
    """Pixels that hold no measurement, by the package's one no-data rule.

    A pixel (all its channels) is no data when any channel is NaN or infinite, equals the
    declared ``nodata`` (or, when none is declared, one of :data:`CONVENTIONAL_FILLS`), or lies
    at or below :data:`NODATA_FLOOR`; and when every channel equals ``fill_value`` (the value
    missing pixels were filled with, 0 in DOFA's reference fetch).

    Args:
        image: (..., C, H, W) raw reflectance (reflectance x 10000, offset removed).
        nodata: the declared no-data value, or None.
        fill_value: the fill value of missing pixels, or None to skip that rule.

    Returns:
        A bool tensor (..., H, W), True where the pixel is no data.

    Note:
        The value range of ``image`` is looked at first (one fast reduction): a rule no value
        in that range can meet is skipped. Most chips are finite, above the floor and free
        of fill values, so they skip the per-value comparisons (torch's elementwise
        comparisons cost 5-20x a reduction on the CPU). The result is the same either way.
    """
    if image.ndim < 3:
        raise ValueError(
            f"nodata_mask expects (..., C, H, W), got an image of shape {tuple(image.shape)}"
        )
    fills = CONVENTIONAL_FILLS if nodata is None else (float(nodata),)
    fills = tuple(v for v in fills if not math.isnan(v))
    lo = hi = math.nan
    seen = fills
    if image.is_floating_point() and image.numel():
        lo_t, hi_t = torch.aminmax(image)  # NaN anywhere -> NaN: the full rules below
        lo, hi = float(lo_t), float(hi_t)
        # ``image == v`` compares with v rounded to the image's dtype (1e20 in float32 is
        # 100000002004087734272): the range test must use the same rounding
        seen = tuple(_in_dtype(v, image.dtype) for v in fills)
    if lo > NODATA_FLOOR and hi < math.inf and not any(lo <= v <= hi for v in seen):
        # finite, above the floor, no fill value: only the all-bands-equal-fill rule is left
        shape = image.shape[:-3] + image.shape[-2:]
        invalid = torch.zeros(shape, dtype=torch.bool, device=image.device)
    else:
        bad = ~torch.isfinite(image) | (image <= NODATA_FLOOR)
        for value in fills:
            bad |= image == value
        invalid = bad.any(dim=-3)
    if fill_value is not None and image.shape[-3] > 0:
        fill = _in_dtype(fill_value, image.dtype) if image.is_floating_point() else math.nan
        if not (lo > fill or hi < fill):  # only a range holding the fill (NaN: checked)
            invalid |= (image == fill_value).all(dim=-3)
    return invalid


def _in_dtype(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to a floating ``dtype``, as a comparison with a tensor rounds it."""
    return float(torch.tensor(value, dtype=torch.float64).to(dtype))


def _where(flags: Tensor) -> str:
    """`` (batch item(s) [i, ...])`` for a batched flag vector, empty for a single sample."""
    if flags.ndim == 0:
        return ""
    return f" (batch item(s) {torch.nonzero(flags).flatten().tolist()})"


def _square_padding(height: int, width: int) -> tuple[int, int, int, int]:
    """Centre padding (top, bottom, left, right) that makes an H x W image square.

    The smaller half goes on the top / left (``pad // 2``), the larger on the bottom / right.
    """
    side = max(height, width)
    pad_h, pad_w = side - height, side - width
    top, left = pad_h // 2, pad_w // 2
    return top, pad_h - top, left, pad_w - left


def _mirror_pad(x: Tensor, top: int, bottom: int, left: int, right: int) -> Tensor:
    """Mirror-pad the last two axes of a 4-D tensor.

    Each axis is reflected (edge pixel not repeated, numpy's ``reflect``) when its total pad is
    smaller than its length, and edge-replicated (numpy's ``edge``) otherwise, the rule of
    DOFA's reference pipeline.
    """
    height, width = x.shape[-2:]
    if top or bottom:
        mode = "reflect" if top + bottom < height else "replicate"
        x = F.pad(x, (0, 0, top, bottom), mode=mode)
    if left or right:
        mode = "reflect" if left + right < width else "replicate"
        x = F.pad(x, (left, right, 0, 0), mode=mode)
    return x


def pad_to_square(image: Tensor) -> Tensor:
    """Centre-pad an image to a square by mirroring its edges; never stretch.

    The short axis is padded to the long side, ``pad // 2`` before and the rest after, by
    reflection (numpy ``mode="reflect"``) or, where the pad is not smaller than the short side,
    by edge replication (numpy ``mode="edge"``).

    Args:
        image: (..., H, W) floating tensor (any number of leading axes).

    Returns:
        (..., S, S) tensor with ``S = max(H, W)``; the input itself when already square.
    """
    height, width = image.shape[-2:]
    if height == width:
        return image
    lead = image.shape[:-2]
    flat = image.reshape(-1, 1, height, width)
    out = _mirror_pad(flat, *_square_padding(height, width))
    return out.reshape(*lead, *out.shape[-2:])


def grid_affine(
    transform: Affine,
    height: int,
    width: int,
    input_prep: Literal["resize", "tile"] | str = "resize",
    size: int = 224,
    patch_size: int = 16,
) -> Affine:
    """Affine of the output patch grid, in map coordinates, for an input pixel-grid affine.

    ``resize``: the H x W input is centre-padded to an S x S square (``S = max(H, W)``) and
    resized to ``size``; grid cell (i, j) of the ``size / patch_size`` grid (14 x 14 for 224)
    covers ``patch_size * S / size`` input pixels per side, starting at the padded square's
    origin, so the grid covers the padded square (mirrored border included), not just the input.
    ``tile``: one cell is ``patch_size`` input pixels, origin at the input's origin; this is the
    affine of the map :func:`stitch_tiles` returns.

    Args:
        transform: affine of the input pixel grid (e.g. a rasterio dataset's ``transform``).
        height: input height in pixels.
        width: input width in pixels.
        input_prep: ``"resize"`` or ``"tile"``.
        size: model input side (224 for DOFA).
        patch_size: model patch size (16 for DOFA).

    Returns:
        The affine mapping (col, row) of grid cells to map (x, y).

    Raises:
        ValueError: for an unknown ``input_prep``.
    """
    if input_prep == "tile":
        top, left, cell = 0, 0, float(patch_size)
    elif input_prep == "resize":
        top, _, left, _ = _square_padding(height, width)
        cell = patch_size * max(height, width) / size
    else:
        raise ValueError(f"unknown input_prep {input_prep!r}; choose one of {list(INPUT_PREPS)}")
    # transform * translation(-left, -top) * scale(cell), spelled out (affine < 3 has no `@`)
    a, b, c, d, e, f = (float(v) for v in tuple(transform)[:6])
    return Affine(
        a * cell, b * cell, c - a * left - b * top, d * cell, e * cell, f - d * left - e * top
    )


def _grid_transform(
    transform: Tensor, height: int, width: int, input_prep: str, size: int, patch_size: int
) -> Tensor:
    """Apply :func:`grid_affine` to a (9,) or (B, 9) transform tensor, keeping dtype/device.

    The tensor is laid out as ``torch.tensor(affine.Affine)``: (a, b, c, d, e, f, 0, 0, 1).
    """
    if transform.shape[-1] != 9:
        raise ValueError(
            f"sample['transform'] must hold 9 affine elements per sample (as produced by "
            f"torch.tensor(affine.Affine)), got shape {tuple(transform.shape)}"
        )
    dtype = transform.dtype if transform.is_floating_point() else torch.float64
    rows = transform.detach().to("cpu", torch.float64).reshape(-1, 9).tolist()
    out = [
        list(grid_affine(Affine(*row[:6]), height, width, input_prep, size, patch_size))
        for row in rows
    ]
    result = torch.tensor(out, dtype=dtype, device=transform.device)
    return result.reshape(transform.shape)


def _check_size(size: int, patch_size: int) -> None:
    if size <= 0 or patch_size <= 0 or size % patch_size:
        raise ValueError(f"size ({size}) must be a positive multiple of patch_size ({patch_size})")


# ----------------------------------------------------------------------------------------------
# steps
# ----------------------------------------------------------------------------------------------


class AttachWavelengths(nn.Module):
    """Write the wavelength vector (um) DOFA's patch embedding needs into the sample.

    Reads ``image``; writes ``wavelengths``: float32 (C,) for a single sample, (B, C) for a
    batch, on the image's device.
    """

    def __init__(
        self,
        bands: Sequence[str] | None = None,
        wavelengths: Sequence[float] | Tensor | None = None,
    ) -> None:
        """Resolve the wavelengths once, at construction.

        Args:
            bands: band names in channel order (Sentinel-2 ``B4``/``B04`` spelling), used to
                infer wavelengths when ``wavelengths`` is None.
            wavelengths: explicit wavelengths in micrometres, one per channel.

        Raises:
            BandError: if the wavelengths cannot be inferred (the message says how to pass
                them) or are invalid, or if ``bands`` names one band twice.
        """
        super().__init__()
        if bands is not None:
            refuse_one_string(bands)
            check_unique_bands(list(bands), "bands")
        self.bands: tuple[str, ...] | None = (
            tuple(canonical_band(b) for b in bands) if bands is not None else None
        )
        self.wavelengths: Tensor = resolve_wavelengths(bands, wavelengths)

    def forward(self, sample: Sample) -> Sample:
        """Attach ``wavelengths`` to the sample.

        Args:
            sample: dict with ``image`` (C,H,W) or (B,C,H,W).

        Returns:
            The same dict with ``wavelengths`` set.

        Raises:
            BandError: if the channel count differs from the number of wavelengths, or if
                the sample already carries ``wavelengths`` (from a dataset, in its channel
                order) that differ from these by more than :data:`WAVELENGTH_TOLERANCE`:
                the channels would be named, and normalised, as other bands.
        """
        image = _image(sample, "AttachWavelengths")
        channels = image.shape[-3]
        count = self.wavelengths.numel()
        if channels != count:
            raise BandError(
                f"image has {channels} channels but {count} wavelengths/bands were configured "
                f"(bands={list(self.bands) if self.bands else None}, "
                f"wavelengths={self.wavelengths.tolist()}): give exactly one per channel"
            )
        wl = self.wavelengths.to(image.device)
        given = sample.get("wavelengths")
        if isinstance(given, Tensor) and given.shape[-1:] == (count,):
            self._check_same_order(given, wl)
        if image.ndim == 4:
            wl = wl.expand(image.shape[0], count).contiguous()
        sample["wavelengths"] = wl
        return sample

    def _check_same_order(self, given: Tensor, wavelengths: Tensor) -> None:
        """Refuse a sample whose own wavelengths name its channels otherwise."""
        given = given.detach().to(wavelengths.device, torch.float32)
        if bool(((given - wavelengths).abs() <= WAVELENGTH_TOLERANCE).all()):
            return
        row = [round(float(v), 4) for v in (given if given.ndim == 1 else given[0])]
        ours = [round(float(v), 4) for v in wavelengths]
        named = f"bands={list(self.bands)}" if self.bands else "wavelengths"
        raise BandError(
            f"the sample's channels have wavelengths {row} um (from its dataset, in channel "
            f"order), but this transform was configured for {ours} ({named}): the channels "
            "would be taken for other bands and normalised with their statistics. Give the "
            "dataset's own order, e.g. DOFAPreprocess(bands=dataset.bands), or select bands "
            "on the dataset (bands=[...])"
        )

    def extra_repr(self) -> str:  # noqa: D102
        return f"bands={self.bands}, wavelengths={[round(v, 4) for v in self.wavelengths.tolist()]}"


def as_fill_value(value: object) -> float:
    """A fill value (raw reflectance written into missing pixels) as a finite float.

    Args:
        value: a real number (Python's or numpy's; not a bool or a string).

    Returns:
        The value as a float.

    Raises:
        ValueError: ``fill_value=... is not a finite number``: NaN or infinity (written into
            the missing pixels, it would reach the model, and the resize spreads it), an int
            beyond float's range, a bool, a string or anything else.
    """
    number = isinstance(value, int | float | np.number) and not isinstance(value, bool | np.bool_)
    try:
        fill = float(value) if number else math.nan  # type: ignore[arg-type]
    except OverflowError:  # an int beyond float's range
        fill = math.nan
    if not math.isfinite(fill):
        raise ValueError(
            f"fill_value={value!r} is not a finite number: it is the raw reflectance written "
            "into missing pixels (0, DOFA's reference fill)"
        )
    return fill


class CheckReflectance(nn.Module):
    """Mask missing data and enforce the raw-reflectance (0..10000) input contract.

    A pixel is invalid (see :func:`nodata_mask`) when any of its bands is NaN or infinite,
    equals ``nodata`` (when None: one of the conventional fills -9999, -32768, 65535), or lies
    at or below :data:`NODATA_FLOOR` (-1000); when every band equals ``fill_value`` (0 by
    default: DOFA's reference fetch fills missing pixels with 0); or when an existing ``valid``
    key (bool (H,W) / (B,H,W), e.g. from a dataset) marks it invalid. Negative values above
    the floor are real (dark) reflectance and stay valid. Invalid pixels are set to
    ``fill_value`` in every band; their positions are kept in ``valid``.

    Then, over valid pixels only and per sample, input whose values all lie within [0, 2] is
    rejected (the stack expects raw surface reflectance, not values already scaled to [0, 1]),
    and so is input whose values all exceed :data:`SATURATED_MIN` (scaled twice, radiance).
    With ``whole_input=True`` (each sample is a whole input: a file read decimated, an array
    a user passes), input of at least :data:`WHOLE_INPUT_MIN_PIXELS` valid pixels whose
    valid values are all negative is rejected too (an offset applied twice, dB values). A
    chip cut from a scene is not judged so: cloud shadow and dark water are negative in
    every visible band after baseline 04.00's -1000 offset (the real Level-2A tile T29UNU of
    2022-10-05 at 60 m has 9,820 valid pixels negative in both B02 and B04, 80 % of them in
    its scene classification's cloud shadow, in patches of up to 2,014 pixels), and the
    normalisation clips them to 0 like any dark pixel. A chip without any valid pixel is not
    an error: its ``empty`` flag is set.

    Reads ``image``, ``valid`` (optional); writes ``image`` (float32, see :func:`as_float32`),
    ``valid`` (bool (H,W) / (B,H,W)), ``empty`` (bool () / (B,), always set so batches
    collate) and ``valid_fraction`` (float32 () / (B,): the share of the chip's pixels that
    are valid, before any resizing; the pooled table's ``valid_fraction`` column).
    """

    def __init__(
        self, nodata: float | None = None, fill_value: float = 0.0, whole_input: bool = False
    ) -> None:
        """Configure the missing-data handling.

        Args:
            nodata: the no-data value of the input, or None (then the conventional fills
                -9999, -32768 and 65535 are no data). NaN, values at or below -1000 and
                pixels equal to ``fill_value`` in every band are no data either way.
            fill_value: value (raw-reflectance scale) written into invalid pixels; 0 matches
                DOFA's reference fetch, which fills missing data with 0.
            whole_input: each sample is a whole input (a file, a user's array), not a chip
                cut from one: valid values all negative are refused as well.

        Raises:
            ValueError: for a ``fill_value`` that is not a finite number (NaN written into
                the missing pixels would reach the model, and the resize spreads it).
        """
        super().__init__()
        self.nodata = None if nodata is None else float(nodata)
        self.fill_value = as_fill_value(fill_value)
        self.whole_input = bool(whole_input)

    def forward(self, sample: Sample) -> Sample:
        """Fill invalid pixels, record ``valid`` / ``empty`` and check the value range.

        Args:
            sample: dict with ``image`` (C,H,W) or (B,C,H,W) and optionally ``valid``.

        Returns:
            The same dict with ``image`` filled and ``valid``, ``empty`` and
            ``valid_fraction`` set.

        Raises:
            ReflectanceError: if a sample's valid values all lie within [0, 2] or all exceed
                :data:`SATURATED_MIN`, or (``whole_input``) are all negative.
            ValueError: if an existing ``valid`` does not match the image's shape.
        """
        dtype = _dtype_name(sample.get("image"))
        image = _image(sample, "CheckReflectance")  # an 8-bit dtype is warned of there
        valid = ~nodata_mask(image, self.nodata, self.fill_value)
        if "valid" in sample and sample["valid"] is not None:
            given = torch.as_tensor(sample["valid"], device=image.device)
            if given.shape != valid.shape and (
                given.numel() == valid.numel() and given.shape[-2:] == valid.shape[-2:]
            ):
                given = given.reshape(valid.shape)  # e.g. (1, H, W) for (H, W)
            if given.shape != valid.shape:
                raise ValueError(
                    f"sample['valid'] has shape {tuple(given.shape)}, expected "
                    f"{tuple(valid.shape)} for an image of shape {tuple(image.shape)} (one "
                    "flag per pixel). Samples merged by TorchGeo's `&` / `|` need "
                    "torchgeo_dofa.datasets.concat_dofa_samples / merge_dofa_samples as "
                    "collate_fn (Sentinel2SR's own `&` and `|` use them)"
                )
            valid = valid & given.to(torch.bool)
        fraction = valid_fraction(valid)
        empty = fraction == 0  # no valid pixel
        image = check_reflectance_range(
            image,
            valid,
            empty,
            self.fill_value,
            whole_input=self.whole_input,
            warn_low=dtype not in NARROW_DTYPES and not _EIGHT_BIT_INPUT.get(),
        )
        sample["image"] = image
        sample["valid"] = valid
        sample["empty"] = empty
        sample["valid_fraction"] = fraction
        return sample

    def extra_repr(self) -> str:  # noqa: D102
        return f"nodata={self.nodata}, fill_value={self.fill_value}, whole_input={self.whole_input}"


def _span(vmin: Tensor, vmax: Tensor, flags: Tensor) -> tuple[float, float]:
    """The lowest minimum and highest maximum over the flagged chips (or the one chip)."""
    if flags.ndim:
        return float(vmin[flags].min()), float(vmax[flags].max())
    return float(vmin), float(vmax)


def check_reflectance_range(
    image: Tensor,
    valid: Tensor,
    empty: Tensor,
    fill_value: float,
    whole_input: bool = False,
    pixel_area: float = 1.0,
    warn_low: bool = False,
) -> Tensor:
    """Refuse chips whose valid values are not raw surface reflectance; fill invalid pixels.

    Per chip, over its valid pixels: values all within [0, :data:`SCALED_MAX`] (reflectance
    already scaled to [0, 1]) or all above :data:`SATURATED_MIN` are refused, and with
    ``whole_input`` values all negative over at least :data:`WHOLE_INPUT_MIN_PIXELS` valid
    pixels (see :class:`CheckReflectance` for why a chip is not judged so). Chips without a
    valid pixel (``empty``) are not judged. With ``whole_input`` and ``warn_low``, an input
    of at least :data:`WHOLE_INPUT_MIN_PIXELS` valid pixels whose valid values all lie in
    [0, :data:`LOW_MAX`] is warned of (8-bit or percent values in a wider type), as a file
    is by :func:`~torchgeo_dofa.datamodules.check_raw_reflectance`.

    Args:
        image: (C, H, W) or (B, C, H, W) float image.
        valid: (H, W) / (B, H, W) bool, True where the pixel holds data.
        empty: () / (B,) bool, True for a chip without a valid pixel.
        fill_value: value written into invalid pixels (raw-reflectance scale).
        whole_input: each sample is a whole input (a file, a user's array), not a chip.
        pixel_area: the input's pixels each valid value stands for (a decimated read's
            ``scale`` squared), in counting them against :data:`WHOLE_INPUT_MIN_PIXELS`.
        warn_low: warn of a whole input's values all in [0, :data:`LOW_MAX`] (False where
            its 8-bit dtype was warned of already).

    Returns:
        ``image``, its invalid pixels set to ``fill_value`` (a new tensor where any is).

    Raises:
        ReflectanceError: naming the range found and the fix.

    Warns:
        ReflectanceWarning: (``whole_input`` and ``warn_low``) for values all in
            [0, :data:`LOW_MAX`].
    """
    dims = (-3, -2, -1)
    if image.numel() and bool(valid.all()):  # the common case: nothing to fill or mask
        vmin, vmax = image.amin(dim=dims), image.amax(dim=dims)
    else:
        mask = valid.unsqueeze(-3)
        image = torch.where(mask, image, image.new_tensor(fill_value))
        vmin = torch.where(mask, image, image.new_tensor(math.inf)).amin(dim=dims)
        vmax = torch.where(mask, image, image.new_tensor(-math.inf)).amax(dim=dims)
    scaled = (vmin >= 0) & (vmax <= SCALED_MAX) & ~empty
    if bool(scaled.any()):
        lo, hi = _span(vmin, vmax, scaled)
        raise ReflectanceError(
            f"input looks already scaled: all valid values lie in [{lo:.4g}, {hi:.4g}] "
            f"within [0, {SCALED_MAX:g}]{_where(scaled)}. The DOFA stack expects raw "
            f"surface reflectance 0..{REFLECTANCE_MAX:.0f} (e.g. Sentinel-2 L2A digital "
            "numbers), not values already scaled to [0, 1]: multiply by 10000 (or pass the "
            "raw product). If these are fill pixels, pass nodata=<their value>."
        )
    bright = (vmin > SATURATED_MIN) & ~empty
    if bool(bright.any()):
        lo, hi = _span(vmin, vmax, bright)
        raise ReflectanceError(
            f"every valid value exceeds {SATURATED_MIN:.0f} (in [{lo:.4g}, {hi:.4g}])"
            f"{_where(bright)}: that is not surface reflectance 0..{REFLECTANCE_MAX:.0f}, where "
            "even clouds and snow are darker in some band, and DOFA clips at "
            f"{REFLECTANCE_MAX:.0f}, so every pixel would embed alike. Was a scale applied "
            "twice (x 10000 on values already x 10000), or are these radiances? If these are "
            "fill pixels, pass nodata=<their value>."
        )
    negative = (vmax < 0) & ~empty
    if whole_input:  # enough pixels for a whole scene, not a patch of shadow
        negative &= valid.flatten(-2).sum(dim=-1) * pixel_area >= WHOLE_INPUT_MIN_PIXELS
    if whole_input and bool(negative.any()):
        lo, hi = _span(vmin, vmax, negative)
        raise ReflectanceError(
            f"every valid value is negative (in [{lo:.4g}, {hi:.4g}]){_where(negative)}: "
            f"a whole input that is not surface reflectance 0..{REFLECTANCE_MAX:.0f} (a "
            "patch of cloud shadow or dark water can be negative in every band after the "
            f"-1000 offset, a whole scene is not). {OFFSET_QUESTION} If it is a crop of "
            "dark surface alone, embed it with the scene around it: a chip cut from a scene "
            f"is not judged so. Values at or below {NODATA_FLOOR:g} count as no data; pass "
            "nodata=<value> for another fill value."
        )
    if whole_input and warn_low:
        counted = valid.flatten(-2).sum(dim=-1) * pixel_area >= WHOLE_INPUT_MIN_PIXELS
        low = (vmin >= 0) & (vmax <= LOW_MAX) & ~empty & counted
        if bool(low.any()):
            _, hi = _span(vmin, vmax, low)
            warn(
                f"the valid values of every band stay at or below {LOW_MAX:.0f} (at most "
                f"{hi:.4g}){_where(low)}: {LOW_VALUES_ADVICE} (A scene of dark water alone "
                "can do this.)",
                ReflectanceWarning,
            )
    return image


def valid_fraction(valid: Tensor) -> Tensor:
    """The share of valid pixels per chip.

    Args:
        valid: bool (H, W) or (..., H, W).

    Returns:
        float32 () or (...,), in [0, 1].
    """
    return valid.flatten(-2).to(torch.float32).mean(dim=-1)


class NormalizeReflectance(nn.Module):
    """Normalise raw reflectance the DOFA way: clip, 0..255 scale, per-band standardisation.

    ``x -> (clip(x, 0, 10000) / 10000 * 255 - mean[band]) / std[band]`` with DOFA's
    pre-training statistics, looked up by band name (any subset of the 9 DOFA Sentinel-2 bands,
    in any order, ``B4`` or ``B04`` spelling), or the statistics given for another sensor's
    bands (``mean``, ``std``: DOFA's 0..255 scale). Pixels :class:`CheckReflectance` marked invalid
    hold ``fill_value`` and are normalised like any other pixel (with the default fill 0 they
    become ``-mean/std``, as in DOFA's reference pipeline); use ``valid`` to ignore them.

    Values that are not raw reflectance (already scaled to [0, 1], or all above
    :data:`SATURATED_MIN`) are refused here too where no :class:`CheckReflectance` ran
    before it (the sample has no ``valid_fraction``), judged over the pixels its default
    no-data rule and any ``valid`` of the sample keep.

    Reads ``image``, ``valid`` (optional), ``valid_fraction`` (optional); writes ``image``
    (float32, see :func:`as_float32`).
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        bands: Sequence[str],
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        """Look up (or check) the statistics once, at construction.

        Args:
            bands: band names in channel order.
            mean: per-band means on DOFA's 0..255 scale for bands without DOFA statistics
                (another sensor's), replacing the looked-up ones; given with ``std``.
            std: per-band standard deviations on the same scale.

        Raises:
            BandError: naming every band without DOFA statistics (when none are given), a
                band named twice, or what is wrong with the given statistics.
        """
        super().__init__()
        refuse_one_string(bands)
        check_unique_bands(list(bands), "bands")
        self.bands: tuple[str, ...] = tuple(canonical_band(b) for b in bands)
        means, stds = norm_stats(list(bands), mean, std)
        self.register_buffer("mean", torch.tensor(means, dtype=torch.float64), persistent=False)
        self.register_buffer("std", torch.tensor(stds, dtype=torch.float64), persistent=False)

    def forward(self, sample: Sample) -> Sample:
        """Normalise ``image`` in the sample.

        Args:
            sample: dict with ``image`` (C,H,W) or (B,C,H,W) of raw reflectance.

        Returns:
            The same dict with ``image`` normalised.

        Raises:
            BandError: if the channel count differs from the number of bands.
            ReflectanceError: where no :class:`CheckReflectance` ran before it (the sample
                has no ``valid_fraction``), for values that are not raw reflectance, as
                :class:`CheckReflectance` refuses chips (all within [0, 2], or all above
                :data:`SATURATED_MIN`).
        """
        image = _image(sample, "NormalizeReflectance")
        channels = image.shape[-3]
        if channels != len(self.bands):
            raise BandError(
                f"image has {channels} channels but NormalizeReflectance was built for "
                f"{len(self.bands)} bands {list(self.bands)}: give one band name per channel"
            )
        if "valid_fraction" not in sample:  # no CheckReflectance ran before it (it sets that)
            self._check_raw(image, _optional_tensor(sample, "valid"))
        mean = self.mean.to(image.device, image.dtype)[:, None, None]
        std = self.std.to(image.device, image.dtype)[:, None, None]
        # one new tensor, then in place: the same operations in the same order as
        # ``(clamp(x) / MAX * 255 - mean) / std``, so the same values, bit for bit
        out = image.clamp(0.0, REFLECTANCE_MAX)
        sample["image"] = out.div_(REFLECTANCE_MAX).mul_(255.0).sub_(mean).div_(std)
        return sample

    @staticmethod
    def _check_raw(image: Tensor, given: Tensor | None) -> None:
        """Refuse what :class:`CheckReflectance` refuses, with its default no-data rule.

        A [0, 1] image normalised alone becomes almost constant (``-mean/std``) and passes
        every later check of normalised values; the tasks then trained on it.
        """
        valid = ~nodata_mask(image, None, 0.0)
        if given is not None and given.numel() == valid.numel():
            valid &= given.reshape(valid.shape).to(device=valid.device, dtype=torch.bool)
        try:
            check_reflectance_range(image, valid, valid_fraction(valid) == 0, 0.0)
        except ReflectanceError as err:
            raise ReflectanceError(
                f"{err} (NormalizeReflectance checks this itself where no CheckReflectance ran "
                "before it: chain CheckReflectance(nodata=...) first to declare a fill value)"
            ) from None

    def extra_repr(self) -> str:  # noqa: D102
        return f"bands={self.bands}"


def _resize_valid(valid: Tensor, padding: tuple[int, int, int, int], size: int) -> Tensor:
    """Pad (with False) and nearest-resize a (H,W) / (B,H,W) mask."""
    height, width = valid.shape[-2:]
    if valid.dtype == torch.bool and height == width == size and not any(padding):
        return valid  # already the model's size
    lead = valid.shape[:-2]
    x = valid.reshape(-1, 1, height, width).to(torch.float32)
    top, bottom, left, right = padding
    x = F.pad(x, (left, right, top, bottom), value=0.0)
    x = F.interpolate(x, size=(size, size), mode="nearest-exact")
    return (x > 0.5).reshape(*lead, size, size)


class _SizeStep(nn.Module):
    """Shared configuration of :class:`ResizeTo` and :class:`TileTo`."""

    def __init__(self, size: int = 224, patch_size: int = 16) -> None:
        """Configure the model input side.

        Args:
            size: output / tile side in pixels (224 for DOFA).
            patch_size: model patch size, used for ``grid_transform`` (16 for DOFA).
        """
        super().__init__()
        _check_size(size, patch_size)
        self.size = size
        self.patch_size = patch_size

    def extra_repr(self) -> str:
        return f"size={self.size}, patch_size={self.patch_size}"


class ResizeTo(_SizeStep):
    """Make the image ``size`` x ``size``: centre mirror-pad to a square, then bilinear resize.

    A non-square input is centre-padded to a square by reflection (edge replication where the
    pad is not smaller than the short side; see :func:`pad_to_square`), never stretched, and
    resized with bilinear interpolation (``align_corners=False``, no antialiasing). The model's
    14 x 14 grid then covers the padded square, mirrored border included.

    Reads ``image``, ``valid`` and ``transform`` (all optional but ``image``); writes ``image``
    ((C,S,S) / (B,C,S,S)), ``valid`` (padded pixels are False; nearest resize) when present,
    and ``grid_transform`` (the affine of the patch-grid cells, see :func:`grid_affine`) when
    ``transform`` is present. Other keys (labels such as ``mask``, ``bounds``) are untouched.
    """

    def forward(self, sample: Sample) -> Sample:
        """Pad and resize the sample's image.

        Args:
            sample: dict with ``image`` (C,H,W) or (B,C,H,W).

        Returns:
            The same dict, resized.
        """
        image = _image(sample, "ResizeTo")
        height, width = image.shape[-2:]
        padding = _square_padding(height, width)
        x = image if image.ndim == 4 else image[None]
        if height != width:
            x = _mirror_pad(x, *padding)
        if x.shape[-1] != self.size:
            x = F.interpolate(
                x,
                size=(self.size, self.size),
                mode="bilinear",
                align_corners=False,
                antialias=False,
            )
        sample["image"] = x if image.ndim == 4 else x[0]
        valid = _optional_tensor(sample, "valid")
        if valid is not None:
            sample["valid"] = _resize_valid(valid, padding, self.size)
        transform = _optional_tensor(sample, "transform")
        if transform is not None:
            sample["grid_transform"] = _grid_transform(
                transform, height, width, "resize", self.size, self.patch_size
            )
        return sample


def _tile(x: Tensor, size: int) -> tuple[Tensor, int, int]:
    """Cut the last two axes of a (M, K, H, W) tensor into (M, N, K, size, size) tiles."""
    height, width = x.shape[-2:]
    rows, cols = math.ceil(height / size), math.ceil(width / size)
    x = _mirror_pad(x, 0, rows * size - height, 0, cols * size - width)
    m, k = x.shape[:2]
    tiles = x.reshape(m, k, rows, size, cols, size).permute(0, 2, 4, 1, 3, 5)
    return tiles.reshape(m, rows * cols, k, size, size), rows, cols


class TileTo(_SizeStep):
    """Cut the image into ``size`` x ``size`` tiles so large areas keep their detail.

    The right and bottom edges are padded (mirrored, as in :func:`pad_to_square`) up to a
    multiple of ``size``; tiles are ordered row-major from the top-left. A single sample's
    image becomes (N, C, S, S) (one model batch) and a batch's (B, N, C, S, S). Run the model on
    the tiles and reassemble its grid outputs with :func:`stitch_tiles`. Apply it last.

    Reads ``image``, ``valid`` and ``transform`` (optional but ``image``); writes ``image``,
    ``tile_offsets`` (long (N, 2) / (B, N, 2), the (row, col) pixel offset of each tile in the
    input), ``tiled_size`` (long (2,) / (B, 2), the input's (H, W) for :func:`stitch_tiles`;
    not ``input_size``: kornia's ``AugmentationSequential(data_keys=None)`` reads keys named
    ``input_*``, ``image_*``, ``mask_*``, ``bbox_*``, ``keypoints_*``, ``label_*`` or ``class_*``
    as data to augment, and failed on it),
    ``valid`` ((N,S,S) / (B,N,S,S), padding False) when present and ``grid_transform``
    (affine of the stitched 16-pixel grid, origin at the input origin) when ``transform`` is
    present. ``empty`` and ``valid_fraction`` stay those of the input (one per sample, not
    per tile): the tiles are one input's model batch, pooled and stitched back into one.
    """

    def forward(self, sample: Sample) -> Sample:
        """Tile the sample's image.

        Args:
            sample: dict with ``image`` (C,H,W) or (B,C,H,W).

        Returns:
            The same dict, tiled.
        """
        image = _image(sample, "TileTo")
        height, width = image.shape[-2:]
        single = image.ndim == 3
        tiles, rows, cols = _tile(image[None] if single else image, self.size)
        sample["image"] = tiles[0] if single else tiles
        r, c = torch.meshgrid(
            torch.arange(rows, device=image.device) * self.size,
            torch.arange(cols, device=image.device) * self.size,
            indexing="ij",
        )
        offsets = torch.stack([r.flatten(), c.flatten()], dim=-1).to(torch.long)
        if not single:
            offsets = offsets.expand(image.shape[0], *offsets.shape).contiguous()
        sample["tile_offsets"] = offsets
        size = torch.tensor([height, width], dtype=torch.long, device=image.device)
        sample["tiled_size"] = size if single else size.expand(image.shape[0], 2).contiguous()
        valid = _optional_tensor(sample, "valid")
        if valid is not None:
            v = valid.to(torch.bool)
            v = v[None, None] if v.ndim == 2 else v[:, None]
            # pad with False (not mirrored): padded pixels are not data
            v = F.pad(
                v.to(torch.float32), (0, cols * self.size - width, 0, rows * self.size - height)
            )
            vt, _, _ = _tile(v, self.size)
            vt = vt[:, :, 0] > 0.5
            sample["valid"] = vt[0] if single else vt
        transform = _optional_tensor(sample, "transform")
        if transform is not None:
            sample["grid_transform"] = _grid_transform(
                transform, height, width, "tile", self.size, self.patch_size
            )
        return sample


def stitch_tiles(
    grids: Tensor,
    offsets: Tensor | Sequence[Sequence[int]],
    height: int,
    width: int,
    patch_size: int = 16,
) -> Tensor:
    """Reassemble per-tile grid outputs into one map over the input extent.

    Args:
        grids: (N, D, h, w) per-tile model grids (14 x 14 for 224 tiles), in the order of
            ``offsets``.
        offsets: (N, 2) (row, col) pixel offsets of the tiles (``sample["tile_offsets"]``);
            multiples of ``patch_size``.
        height: input height in pixels (before tiling).
        width: input width in pixels (before tiling).
        patch_size: pixels per grid cell.

    Returns:
        (D, ceil(H / patch_size), ceil(W / patch_size)) map, cropped to the input extent; its
        georeferencing is ``grid_affine(transform, H, W, "tile")`` (``sample["grid_transform"]``).

    Raises:
        ValueError: on inconsistent shapes, offsets that are not multiples of
            ``patch_size``, or tiles that do not tile a ``height`` x ``width`` input (H and W
            swapped, another input's size: a map of the wrong shape came back).
    """
    offs = torch.as_tensor(offsets, dtype=torch.long).to("cpu")
    if grids.ndim != 4:
        raise ValueError(f"grids must be (N, D, h, w), got {tuple(grids.shape)}")
    if offs.ndim != 2 or offs.shape != (grids.shape[0], 2):
        raise ValueError(
            f"offsets must be (N, 2) with N={grids.shape[0]} tiles, got {tuple(offs.shape)}"
        )
    if bool((offs % patch_size != 0).any()) or bool((offs < 0).any()):
        raise ValueError(f"tile offsets must be non-negative multiples of patch_size={patch_size}")
    _, depth, gh, gw = grids.shape
    if offs.shape[0]:  # the tiles must cover the input, each starting inside it
        last_row, last_col = (int(v) for v in offs.max(dim=0).values)
        tile_h, tile_w = gh * patch_size, gw * patch_size
        if not (last_row < height <= last_row + tile_h and last_col < width <= last_col + tile_w):
            raise ValueError(
                f"{offs.shape[0]} tile(s) of {tile_h} x {tile_w} px starting at rows 0..{last_row}"
                f", columns 0..{last_col} do not tile a {height} x {width} input: give the "
                "height and width the tiles were cut from (sample['tiled_size'] is (H, W))"
            )
    out_h, out_w = math.ceil(height / patch_size), math.ceil(width / patch_size)
    cells = (offs // patch_size).tolist()
    canvas_h = max([out_h] + [r + gh for r, _ in cells])
    canvas_w = max([out_w] + [c + gw for _, c in cells])
    canvas = grids.new_zeros((depth, canvas_h, canvas_w))
    for grid, (r, c) in zip(grids, cells, strict=True):
        canvas[:, r : r + gh, c : c + gw] = grid
    return canvas[:, :out_h, :out_w]


# ----------------------------------------------------------------------------------------------
# the standard stack
# ----------------------------------------------------------------------------------------------


class DOFAPreprocess(nn.Sequential):
    """DOFA's standard preprocessing stack for raw surface reflectance (0..10000).

    ``AttachWavelengths -> CheckReflectance -> NormalizeReflectance -> ResizeTo | TileTo``.
    Use it as a TorchGeo dataset's ``transforms=``, in a DataLoader worker, or on a batch on
    the GPU. Sentinel-1 has no DOFA statistics and is not supported by this stack (normalise it
    yourself and use :class:`AttachWavelengths` with the 3.75 um placeholder).

    Attributes:
        bands: canonical band names, in channel order.
        wavelengths: float32 (C,) wavelengths in micrometres.
        input_prep: ``"resize"`` or ``"tile"``.
    """

    def __init__(
        self,
        bands: Sequence[str],
        wavelengths: Sequence[float] | Tensor | None = None,
        input_prep: Literal["resize", "tile"] | str = "resize",
        nodata: float | None = None,
        fill_value: float = 0.0,
        size: int = 224,
        patch_size: int = 16,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        whole_input: bool = False,
    ) -> None:
        """Build the stack; all configuration errors are raised here, not per sample.

        Args:
            bands: band names in channel order (``B4`` or ``B04`` spelling).
            wavelengths: explicit wavelengths (um), one per band; inferred for Sentinel-2
                names when None.
            input_prep: ``"resize"`` (pad to square + resize to ``size``) or ``"tile"``.
            nodata: the input's no-data value, if any (NaN is always treated as missing).
            fill_value: raw-reflectance value written into missing pixels.
            size: model input side (224 for DOFA).
            patch_size: model patch size (16 for DOFA).
            mean: per-band means (DOFA's 0..255 scale) for bands without DOFA statistics:
                see :class:`NormalizeReflectance`.
            std: per-band standard deviations on the same scale.
            whole_input: each sample is a whole input (a user's array), not a chip cut from
                a scene: :class:`CheckReflectance` refuses valid values all negative too.

        Raises:
            ValueError: for an unknown ``input_prep``.
            BandError: for unknown bands without wavelengths, a wavelength count that differs
                from the band count, bands without DOFA statistics and none given, given
                statistics that do not fit, or wavelengths contradicting the names the
                statistics are looked up by (:func:`~torchgeo_dofa.bands.check_names_fit`).
        """
        if input_prep not in INPUT_PREPS:
            raise ValueError(
                f"unknown input_prep {input_prep!r}; choose one of {list(INPUT_PREPS)}"
            )
        attach = AttachWavelengths(bands, wavelengths)
        check = CheckReflectance(nodata=nodata, fill_value=fill_value, whole_input=whole_input)
        normalize = NormalizeReflectance(bands, mean, std)
        if mean is None and wavelengths is not None:  # statistics by name: names must fit
            check_names_fit(bands, attach.wavelengths)
        size_step: nn.Module = (
            ResizeTo(size, patch_size) if input_prep == "resize" else TileTo(size, patch_size)
        )
        super().__init__(attach, check, normalize, size_step)
        self.bands: tuple[str, ...] = normalize.bands
        self.wavelengths: Tensor = attach.wavelengths
        self.input_prep: str = input_prep

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> DOFAPreprocess:
        """Build the stack for a named band preset (``sentinel2`` or ``rgb``).

        ``rgb`` uses Sentinel-2 B4/B3/B2 wavelengths and statistics, so its input must also be
        reflectance on the 0..10000 scale (not 0..255 pixel values).

        Args:
            name: preset name from :data:`torchgeo_dofa.bands.PRESETS`.
            **kwargs: further :class:`DOFAPreprocess` arguments (``input_prep``, ``nodata``...).

        Returns:
            The stack.

        Raises:
            BandError: for an unknown preset, or ``sentinel1``, which has no DOFA
                normalisation statistics.
        """
        if name not in PRESETS:
            raise BandError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        preset = PRESETS[name]
        if name == "sentinel1":
            raise BandError(
                "preset 'sentinel1' has no DOFA normalisation statistics and is not raw "
                "reflectance, so DOFAPreprocess cannot normalise it: scale VV/VH yourself and "
                "use AttachWavelengths(wavelengths=PRESETS['sentinel1'].wavelengths) (3.75 um "
                "placeholder) with ResizeTo/TileTo"
            )
        return cls(bands=preset.bands, wavelengths=preset.wavelengths, **kwargs)

    def forward(self, sample: Sample) -> Sample:
        """Run the steps on ``sample`` in turn (``nn.Sequential``'s forward).

        An 8-bit image is warned of once, for its dtype (by the first step): a whole input's
        values, then all in [0, :data:`LOW_MAX`], are not warned of again.

        Args:
            sample: the sample dict (see the steps).

        Returns:
            The sample, preprocessed.
        """
        image = sample.get("image") if isinstance(sample, dict) else None
        with eight_bit_input(_dtype_name(image) in NARROW_DTYPES):
            return cast(Sample, super().forward(sample))


class AugmentWithValid(nn.Module):
    """Run a kornia augmentation with the sample's ``valid`` mask carried as a mask.

    kornia's ``AugmentationSequential(data_keys=None)`` transforms the keys it knows
    (``image``, ``mask``, ...) and passes the others through unchanged, ``valid`` among them:
    after a flip, rotation or crop, ``valid`` would still mark the un-augmented pixels, so a
    segmentation loss would skip real pixels and train on filled ones. Here ``valid`` travels
    through the augmentation as an extra mask (``mask_valid``, kornia's nearest-neighbour mask
    resampling), pixels the augmentation brings in (the padding of a rotation or a shift) are
    invalid, and ``empty`` is recomputed from the result. ``valid_fraction`` (the share of the
    input's own pixels that are valid, :class:`CheckReflectance`'s, before any resize or
    padding) is scaled by the ratio of the shares of valid pixels after and before the
    augmentation: a flip or a resize keeps it, a rotation's padding lowers it, a crop of valid
    pixels only raises it (to 1 at most). Both stay one per input, also for one input's tiles
    (:class:`TileTo`: a single sample's (N, C, S, S), which kornia augments tile by tile).
    Other extra keys (``wavelengths``, ``transform``, ``tile_offsets``, ...) pass through as
    kornia passes them.

    Reads ``image``, ``valid`` (optional), and whatever the augmentation transforms; writes
    them back, ``valid`` as bool (H,W) / (B,H,W) (with a leading axis of 1 where kornia adds
    one to a single (C,H,W) image without ``keepdim=True``).
    """

    #: The key ``valid`` travels under (kornia treats ``mask_*`` keys as masks).
    carrier = "mask_valid"

    def __init__(self, augmentation: nn.Module) -> None:
        """Wrap an augmentation.

        Args:
            augmentation: a kornia ``AugmentationSequential(..., data_keys=None)`` (any module
                taking and returning a sample dict that resamples ``mask_*`` keys as masks).
        """
        super().__init__()
        self.augmentation = augmentation

    def forward(self, sample: Sample) -> Sample:
        """Augment the sample and its ``valid`` mask together.

        Args:
            sample: dict with ``image`` (C,H,W) or (B,C,H,W) and optionally ``valid``.

        Returns:
            The augmented dict.

        Raises:
            KeyError: if the sample already holds a ``mask_valid`` key.
        """
        if self.carrier in sample:
            raise KeyError(f"the sample already holds {self.carrier!r}, used to carry 'valid'")
        sample = dict(sample)
        image = sample["image"]  # its dtype is the augmentation's business: no cast here
        if not isinstance(image, Tensor):
            image = sample["image"] = torch.as_tensor(np.ascontiguousarray(image))
        valid = _optional_tensor(sample, "valid")
        if valid is None:
            valid = torch.ones(image.shape[:-3] + image.shape[-2:], dtype=torch.bool)
        sample.pop("valid", None)
        sample[self.carrier] = valid.to(image.device, torch.float32).unsqueeze(-3)
        out = self.augmentation(sample)
        carried = out.pop(self.carrier)
        out["valid"] = carried.squeeze(-3) > 0.5
        shares = _optional_tensor(out, "valid_fraction")
        reference = shares if shares is not None else _optional_tensor(out, "empty")
        if reference is not None:  # () for one input (its tiles too), (B,) for a batch
            # each input's share of valid pixels before and after (a crop or resize changes
            # the pixel count, not the share)
            had = valid.reshape(*reference.shape, -1).to(torch.float32).mean(-1)
            after = out["valid"].to(had.device).reshape(*reference.shape, -1)
            kept = after.to(torch.float32).mean(-1)
            if "empty" in out:
                out["empty"] = kept == 0
            if shares is not None:
                scale = torch.where(had > 0, kept / had.clamp(min=1e-12), torch.zeros_like(had))
                out["valid_fraction"] = (shares.to(scale) * scale).clamp(0.0, 1.0)
        return out

    def extra_repr(self) -> str:  # noqa: D102
        return f"carries 'valid' as {self.carrier!r}"


def preprocess_array(
    array_chw: np.ndarray | Tensor,
    bands: Sequence[str],
    wavelengths: Sequence[float] | Tensor | None = None,
    input_prep: Literal["resize", "tile"] | str = "resize",
    nodata: float | None = None,
    fill_value: float = 0.0,
    transform: Affine | None = None,
    size: int = 224,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    whole_input: bool = True,
) -> Sample:
    """Run the standard stack on one raw (C, H, W) array of surface reflectance.

    Args:
        array_chw: raw reflectance (0..10000), numpy array or tensor (kept on its device) of
            any real dtype; the stack computes in float32 (:func:`as_float32`).
        bands: band names in channel order.
        wavelengths: explicit wavelengths (um), or None to infer them from ``bands``.
        input_prep: ``"resize"`` or ``"tile"``.
        nodata: no-data value, if any.
        fill_value: value for missing pixels (raw scale).
        transform: affine of the array's pixel grid; when given, the result has
            ``grid_transform``.
        size: model input side.
        mean: per-band means (DOFA's 0..255 scale) for bands without DOFA statistics.
        std: per-band standard deviations on the same scale.
        whole_input: the array is a whole input (yours), not a chip cut from a scene:
            valid values all negative are refused too (see :class:`CheckReflectance`);
            False for a chip.

    Returns:
        The sample dict: ``image``, ``wavelengths``, ``valid``, ``empty``, ``valid_fraction``
        (+ ``tile_offsets`` for tiling, ``transform``/``grid_transform`` when ``transform``
        was given).

    Raises:
        TypeError: for boolean, complex or non-numeric data.
        ValueError: if the array is not (C, H, W).
        ReflectanceError: as :class:`CheckReflectance` (``whole_input``) refuses it.
    """
    image = as_float32(array_chw, "array_chw")  # an 8-bit dtype is warned of here
    if image.ndim != 3:
        raise ValueError(f"preprocess_array expects a (C, H, W) array, got {tuple(image.shape)}")
    sample: Sample = {"image": image}
    if transform is not None:
        sample["transform"] = torch.tensor(list(transform), dtype=torch.float64)
    stack = DOFAPreprocess(
        bands,
        wavelengths,
        input_prep=input_prep,
        nodata=nodata,
        fill_value=fill_value,
        size=size,
        mean=mean,
        std=std,
        whole_input=whole_input,
    )
    with eight_bit_input(_dtype_name(array_chw) in NARROW_DTYPES):  # warned of above
        out: Sample = stack(sample)
    return out
