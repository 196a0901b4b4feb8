"""rs-embed's calling style for DOFA: ``get_embedding("dofa", spatial=..., temporal=..., ...)``.

A thin layer over this package's pieces: the regions of :mod:`torchgeo_dofa.spatial`, the
datasets of :mod:`torchgeo_dofa.datasets` (``backend="local"``), the Earth Engine request of
:mod:`torchgeo_dofa.gee` (``backend="gee"``), the preprocessing stack
:class:`~torchgeo_dofa.transforms.DOFAPreprocess` and the prediction step of
:class:`~torchgeo_dofa.embedder.DOFAEmbedder` (tile stitching, pooled vectors, no-data cells),
so an embedding from here equals the one the ``torchgeo-dofa embed`` job writes for the same
pixels.

Code written for rs-embed works unchanged except for the import::

    from torchgeo_dofa import PointBuffer, TemporalSpec, OutputSpec, get_embedding

    emb = get_embedding(
        "dofa",
        spatial=PointBuffer(lon=121.5, lat=31.2, buffer_m=2048),
        temporal=TemporalSpec.range("2022-06-01", "2022-09-01"),
        output=OutputSpec.pooled(),
        backend="gee",
        variant="large",
    )
    emb.data.shape  # (1024,)

Backends:

* ``"tensor"``: your raw (C, H, W) surface reflectance (0..10000) in ``input_chw``, band names
  in ``sensor.bands``; ``spatial`` and ``temporal`` are ignored.
* ``"local"``: GeoTIFF / JPEG2000 files (local Sentinel-2 or Earth Engine exports), given as
  ``paths=`` (files, folders, or a ready :class:`~torchgeo_dofa.datasets.Sentinel2Base`
  dataset). The ROI becomes a chip on the files' own pixel grid (never resampled);
  ``temporal`` selects scenes by acquisition date (None: every date; overlapping scenes are
  mosaicked, first by path wins). ``sensor=None`` reads the dataset's default bands (DOFA's 9
  when present, else every Sentinel-2 band the files share).
* ``"gee"``: Earth Engine (optional extra ``torchgeo-dofa[gee]``); ``temporal`` is required.
* ``"stac"``: Sentinel-2 L2A from a STAC API or catalog (``stac_url=``, ``collection=``;
  optional extra ``torchgeo-dofa[stac]``): the items of ``temporal`` with ``eo:cloud_cover <
  sensor.cloudy_pct`` are SCL-masked and composited onto the ROI's UTM grid by
  :mod:`torchgeo_dofa.stac`, saved as a local GeoTIFF (``TORCHGEO_DOFA_STAC_CACHE``), then read
  exactly as ``local`` reads files.
* ``"auto"`` (default): ``tensor`` if ``input_chw`` is given, ``local`` if ``paths`` is,
  ``stac`` if ``stac_url`` is, else ``gee``. ``"provider"`` is accepted as rs-embed's name for
  ``gee``.

Knobs (rs-embed's ``RS_EMBED_DOFA_*`` names work too): ``TORCHGEO_DOFA_BATCH_SIZE`` (images
per forward pass; default 8 on CPU, 64 on CUDA), ``TORCHGEO_DOFA_FETCH_WORKERS`` (parallel
Earth Engine fetches for many ROIs; default 8), ``TORCHGEO_DOFA_MAX_PIXELS`` (see below).
Local files are read one ROI after another.

Size and coverage: one region is read as one chip, so a region whose chip would exceed
:func:`max_pixels` pixels per band (default :data:`DEFAULT_MAX_PIXELS`, 4096 x 4096: a 41 km
square at 10 m, about 0.6 GB as float32 for 9 bands) is refused with a :class:`ModelError`
before anything is read or searched (``local`` and ``stac``; ``gee`` has Earth Engine's own,
smaller limit); embed larger areas with the ``torchgeo-dofa embed`` job, which tiles them
into 224 px chips. An embedding whose input has valid pixels but fewer than
:data:`LOW_VALID_FRACTION` (50 %) of them (``meta["valid_fraction"]``; the rest is outside the
rasters, no data or masked) gets one warning per call: it mostly describes fill. So does
an input narrower than one 16-px DOFA patch (:data:`~torchgeo_dofa.datamodules.MIN_CHIP_PX`;
a ``PointBuffer`` of ``buffer_m=5`` at 10 m is 1 x 1 px): its few pixels fill the model's
whole input, so it describes their values, not a place.

Outputs: ``Embedding.data`` is a numpy array, (D,) for pooled and (D, h, w) for grid output:
14 x 14 with ``input_prep="resize"``, ``ceil(H/16) x ceil(W/16)`` with ``"tile"``. Grid cells
whose 16 x 16 patch held no valid pixel (no data, or the mirrored padding of a non-square
input) are NaN, as in the embed job's GeoTIFFs. ``Embedding.meta`` records the model,
variant, weights, pooled convention, bands, wavelengths, preprocessing and input size, and for
georeferenced backends the CRS and the affine of the grid cells (``grid_transform``); the
local backend's ``meta["source"]`` lists the files the chip's pixels came from (see
:meth:`~torchgeo_dofa.datasets.Sentinel2Base.read_chip_with_sources`). A dataset subclass that
overrides ``read_chip`` is read through it; ``meta["source"]`` then lists every file of the
scenes the chip meets (:meth:`~torchgeo_dofa.datasets.Sentinel2Base.scene_files`).
``meta["acquisition_start"]`` / ``meta["acquisition_end"]``: the acquisition span (ISO 8601
UTC) of those scenes, as ``temporal`` dates them
(:func:`~torchgeo_dofa.datamodules.acquisition_span`); None where one has no date and for
the other backends.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import pandas as pd
import pyproj
import rasterio
import shapely
import torch
from affine import Affine
from pyproj import CRS
from torch import Tensor

from ._warnings import each_once_per_call, reworded, warn
from .bands import DOFA_S2_BANDS, BandError, check_unique_bands, same_band_names
from .datamodules import (
    MIN_CHIP_PX,
    RegionSampler,
    acquisition_span,
    check_raw_reflectance,
    refuse_mixed_acquisitions,
    refuse_undated_scenes,
    scenes_within,
)
from .datasets import (
    EarthEngineS2,
    InputError,
    NoSceneError,
    RasterInput,
    Sentinel2Base,
    Sentinel2SR,
    _first_few,
    _horizontal,
    band_words,
    find_raster_inputs,
    refuse_repeated_bands,
    stack_dofa_samples,
)
from .embedder import DOFAEmbedder
from .gee import DEFAULT_COLLECTION, GEEUnavailableError, build_gee_request, fetch_gee_pixels
from .model import PooledNorm, canonical_variant
from .runtime import TABLE_SUFFIXES, file_signature, resolve_accelerator
from .spatial import (
    BBox,
    CRSTransformError,
    PointBuffer,
    Region,
    crs_label,
    crs_name,
    lonlat_bounds,
    same_crs,
)
from .stac import StacUnavailableError
from .transforms import (
    INPUT_PREPS,
    NARROW_DTYPES,
    DOFAPreprocess,
    ReflectanceError,
    _dtype_name,
    as_fill_value,
    as_float32,
    eight_bit_input,
    nodata_mask,
)
from .weights import env_setting, local_weights_file, names_random_weights
from .writers import atomic_write, folders_removed_if_left_empty, utc_us

__all__ = [
    "BACKENDS",
    "BBox",
    "Embedding",
    "ExportModelRequest",
    "ExportSummary",
    "ModelError",
    "OutputSpec",
    "PointBuffer",
    "SensorSpec",
    "TemporalSpec",
    "clear_model_cache",
    "export_batch",
    "fetch_workers",
    "get_embedding",
    "get_embeddings_batch",
    "get_embeddings_batch_from_inputs",
    "infer_batch_size",
    "max_pixels",
    "open_local",
]

#: Backends accepted by :func:`get_embedding`.
BACKENDS: tuple[str, ...] = ("auto", "tensor", "local", "gee", "stac", "provider")

#: Model names accepted (this package serves DOFA only).
MODEL_NAMES: tuple[str, ...] = ("dofa",)

#: Default parallel fetches and batch sizes (rs-embed's).
DEFAULT_FETCH_WORKERS = 8
DEFAULT_BATCH_CPU = 8
DEFAULT_BATCH_CUDA = 64

#: Pixels per band one region may read (``TORCHGEO_DOFA_MAX_PIXELS`` overrides): 4096 x 4096,
#: a 41 km square at 10 m; its chip is about 0.6 GB as float32 for 9 bands.
DEFAULT_MAX_PIXELS = 4096 * 4096

#: An embedding whose input has fewer valid pixels than this fraction (but some) is warned
#: about: it mostly describes fill (outside the rasters, no data, masked).
LOW_VALID_FRACTION = 0.5

PathsLike = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Sentinel2Base


class ModelError(ValueError):
    """A request the API cannot serve (bad model name, input, backend, output mode ...)."""


# ----------------------------------------------------------------------------------------------
# specs
# ----------------------------------------------------------------------------------------------


def _iso(value: str | date) -> str:
    if isinstance(value, datetime):  # pandas' Timestamp too: a day, or a refusal naming it
        if value != value:  # pandas' NaT: no time at all
            raise ModelError(f"expected a date, got {value!r} (no date)")
        if (value.hour, value.minute, value.second, value.microsecond) == (0, 0, 0, 0):
            return value.date().isoformat()
        raise ModelError(
            f"TemporalSpec takes days (whole dates, the end exclusive, as Earth Engine's "
            f"filterDate), got the time {value.isoformat()}: pass its day, "
            f"{value.date().isoformat()!r} (value.date())"
        )
    if isinstance(value, date):
        return value.isoformat()
    try:
        return date.fromisoformat(str(value)).isoformat()
    except ValueError as err:
        raise ModelError(f"expected an ISO date 'YYYY-MM-DD', got {value!r}") from err


@dataclass(frozen=True)
class TemporalSpec:
    """A date range ``[start, end)`` (end exclusive, like Earth Engine's ``filterDate``).

    Build it with :meth:`range` or :meth:`year`, as in rs-embed.

    Attributes:
        mode: ``"range"`` or ``"year"``.
        start: first date, ISO ``YYYY-MM-DD``.
        end: end date (exclusive), ISO.
    """

    mode: Literal["range", "year"]
    start: str
    end: str

    def __post_init__(self) -> None:
        """Validate the dates.

        Raises:
            ModelError: for a bad mode, a non-ISO date or ``start >= end``.
        """
        if self.mode not in ("range", "year"):
            raise ModelError(f"unknown TemporalSpec mode {self.mode!r}: use 'range' or 'year'")
        start, end = _iso(self.start), _iso(self.end)
        if start >= end:
            raise ModelError(f"TemporalSpec needs start < end, got {start} .. {end}")
        first = date.fromisoformat(start)
        if self.mode == "year" and (
            (first.month, first.day) != (1, 1) or end != f"{first.year + 1:04d}-01-01"
        ):
            raise ModelError(
                f"TemporalSpec('year', {start!r}, {end!r}) is not one calendar year: use "
                f"TemporalSpec.year({first.year}) or TemporalSpec.range({start!r}, {end!r})"
            )
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "end", end)

    @staticmethod
    def range(start: str | date, end: str | date) -> TemporalSpec:
        """Dates from ``start`` (inclusive) to ``end`` (exclusive).

        Args:
            start: ISO date ``YYYY-MM-DD``.
            end: ISO date.

        Returns:
            The spec.
        """
        return TemporalSpec("range", _iso(start), _iso(end))

    @staticmethod
    def year(year: int) -> TemporalSpec:
        """One calendar year.

        Args:
            year: e.g. 2022 (or ``"2022"``).

        Returns:
            The spec (``year-01-01`` to ``year+1-01-01``).
        """
        whole = (isinstance(year, int | np.integer) and not isinstance(year, bool)) or (
            isinstance(year, str) and year.strip().isdigit()
        )
        y = int(year) if whole else 0
        if not whole or not 1 <= y <= 9998:
            raise ModelError(f"year must be a whole number in [1, 9998], got {year!r}")
        return TemporalSpec("year", f"{y:04d}-01-01", f"{y + 1:04d}-01-01")

    def time_slice(self) -> slice:
        """The range as a TorchGeo time slice ``[start, end - 1 us]``.

        Returns:
            A slice of pandas Timestamps.
        """
        return slice(
            pd.Timestamp(self.start), pd.Timestamp(self.end) - pd.Timedelta(microseconds=1)
        )


@dataclass(frozen=True)
class OutputSpec:
    """What to return: a pooled vector (D,) or the patch-token grid (D, h, w).

    Attributes:
        mode: ``"pooled"`` or ``"grid"``.
    """

    mode: Literal["pooled", "grid"]

    def __post_init__(self) -> None:
        """Validate the mode.

        Raises:
            ModelError: for an unknown mode.
        """
        if isinstance(self.mode, str):  # any letter case, as variant=
            object.__setattr__(self, "mode", self.mode.strip().lower())
        if self.mode not in ("pooled", "grid"):
            raise ModelError(f"unknown output mode {self.mode!r}: use 'pooled' or 'grid'")

    @staticmethod
    def pooled() -> OutputSpec:
        """Pooled output: mean of the patch tokens, then LayerNorm; shape (D,).

        Returns:
            The spec.
        """
        return OutputSpec("pooled")

    @staticmethod
    def grid() -> OutputSpec:
        """Grid output: patch tokens as (D, h, w), north-up, row-major from the top-left.

        Returns:
            The spec.
        """
        return OutputSpec("grid")


#: :class:`SensorSpec`'s default bands, DOFA's nine Sentinel-2 bands (rs-embed's default), as
#: an object of their own: a sensor whose bands are this very tuple was given none
#: (:attr:`SensorSpec.bands_given`), one given ``bands=DOFA_S2_BANDS`` or a list of the same
#: names chose them.
_DEFAULT_BANDS: tuple[str, ...] = tuple(list(DOFA_S2_BANDS))


@dataclass(frozen=True)
class SensorSpec:
    """Input bands and fetch settings (rs-embed's defaults for DOFA).

    Attributes:
        collection: Earth Engine collection (``backend="gee"``).
        bands: band names in channel order (``B4`` or ``B04``); for ``tensor`` they name the
            channels of ``input_chw``.
        scale_m: pixel size in metres (``gee``).
        cloudy_pct: maximum ``CLOUDY_PIXEL_PERCENTAGE`` of the images composited (``gee``).
        composite: ``"median"`` or ``"mosaic"`` (``gee``).
        fill_value: raw value written into missing pixels.
        wavelengths: one wavelength (um) per band; None infers them from Sentinel-2 names.
        mean: one normalisation mean per band on DOFA's 0..255 scale (reflectance / 10000 x
            255), for bands without DOFA statistics (another sensor's); given with ``std``.
            None uses DOFA's Sentinel-2 statistics.
        std: one standard deviation per band on the same scale.
    """

    collection: str = DEFAULT_COLLECTION
    bands: tuple[str, ...] = _DEFAULT_BANDS
    scale_m: float = 10
    cloudy_pct: float = 30
    composite: Literal["median", "mosaic"] = "median"
    fill_value: float = 0.0
    wavelengths: tuple[float, ...] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def bands_given(self) -> bool:
        """Whether ``bands`` was given (False: left at the default, DOFA's nine bands).

        Local files are read with their own bands unless a sensor gives bands (or
        wavelengths, mean or std); given, even as the default's names, they are read. A
        sensor that went through pickle counts as given.
        """
        return self.bands is not _DEFAULT_BANDS

    def __post_init__(self) -> None:
        """Store bands and wavelengths as tuples.

        Raises:
            ModelError: if bands is empty, a plain string, or names one band twice
                (``B4`` and ``B04`` are one band); if wavelengths, mean or std is not a
                sequence of numbers; if fill_value is not a finite number (NaN written into
                missing pixels would make every output of the chip NaN).
        """
        if isinstance(self.bands, str | bytes):
            raise ModelError(
                f"SensorSpec.bands={self.bands!r} is one string: give a list of band names, "
                f"one per channel (bands={band_words(self.bands) or ['B4', 'B3']!r})"
            )
        if self.bands is _DEFAULT_BANDS:  # kept as that object (dataclasses.replace too)
            bands = self.bands
        else:
            bands = tuple(str(b) for b in self.bands)  # a tuple, numpy array, generator ...
        if not bands:
            raise ModelError(f"SensorSpec.bands must be a non-empty list of names: {self.bands}")
        object.__setattr__(self, "bands", bands)
        try:
            check_unique_bands(self.bands, "SensorSpec.bands")
        except BandError as err:
            raise ModelError(str(err)) from err
        for name in ("wavelengths", "mean", "std"):
            values = getattr(self, name)
            if values is None:
                continue
            try:
                if isinstance(values, str | bytes) or any(
                    isinstance(v, str | bytes | bool) for v in values
                ):
                    raise TypeError(values)
                object.__setattr__(self, name, tuple(float(v) for v in values))
            except (TypeError, ValueError):
                raise ModelError(
                    f"SensorSpec.{name}={values!r} is not a sequence of numbers: give one "
                    f"number per band, in band order ({name}=[...], {len(bands)} values)"
                ) from None
        try:
            object.__setattr__(self, "fill_value", as_fill_value(self.fill_value))
        except ValueError as err:
            raise ModelError(f"SensorSpec.{err}") from None


@dataclass
class Embedding:
    """One embedding and what produced it.

    Attributes:
        data: (D,) pooled or (D, h, w) grid, float32.
        meta: provenance (model, variant, weights, pooled_norm, bands, wavelengths,
            preprocessing, input size, backend, and georeferencing where known).
    """

    data: np.ndarray
    meta: dict[str, Any]


@dataclass(frozen=True)
class ExportModelRequest:
    """One model of an :func:`export_batch` run (rs-embed's export request).

    Attributes:
        name: model name (``"dofa"``).
        sensor: bands and fetch settings for this model (None: the call's ``sensor``).
        model_config: model settings: ``variant``, ``weights``, ``pooled_norm``,
            ``input_prep``.
    """

    name: str
    sensor: SensorSpec | None = None
    model_config: dict[str, Any] | None = None

    @classmethod
    def configure(
        cls, name: str, *, sensor: SensorSpec | None = None, **model_kwargs: Any
    ) -> ExportModelRequest:
        """Build a request with model settings as keyword arguments.

        Args:
            name: model name (``"dofa"``).
            sensor: optional per-model sensor.
            **model_kwargs: ``variant``, ``weights``, ``pooled_norm``, ``input_prep``.

        Returns:
            The request.

        Raises:
            ModelError: for an unknown model name or setting.
        """
        _check_model(name)
        unknown = sorted(set(model_kwargs) - set(_MODEL_KEYS))
        if unknown:
            raise ModelError(
                f"unknown DOFA setting(s) {unknown}: choose among {sorted(_MODEL_KEYS)}"
            )
        if "variant" in model_kwargs:
            _variant(str(model_kwargs["variant"]))
        return cls(name=name, sensor=sensor, model_config=dict(model_kwargs) or None)


_MODEL_KEYS = ("variant", "weights", "pooled_norm", "input_prep")


class _Default(str):
    """A keyword's default value, told apart from the same value given by the caller.

    ``model_config`` settles a setting whose keyword was left at its default; the same
    setting given both ways with different values is refused (``pooled_norm="trained"``
    with ``model_config={"pooled_norm": "plain"}`` silently took ``plain``). It is the plain
    string everywhere else (``help()`` shows ``'official'``).
    """

    __slots__ = ()


_OFFICIAL = _Default("official")
_TRAINED = _Default("trained")
_RESIZE = _Default("resize")


# ----------------------------------------------------------------------------------------------
# knobs and the model cache
# ----------------------------------------------------------------------------------------------


def _positive_int_setting(suffix: str, default: int) -> int:
    value = env_setting(suffix)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ModelError(
            f"TORCHGEO_DOFA_{suffix} (or RS_EMBED_DOFA_{suffix}) must be a positive integer, "
            f"got {value!r}"
        )
    return number


def fetch_workers() -> int:
    """Parallel Earth Engine fetches for many ROIs (``TORCHGEO_DOFA_FETCH_WORKERS``, 8).

    Returns:
        The worker count.
    """
    return _positive_int_setting("FETCH_WORKERS", DEFAULT_FETCH_WORKERS)


def max_pixels() -> int:
    """Pixels per band one region may read (``TORCHGEO_DOFA_MAX_PIXELS``, 4096 x 4096).

    Returns:
        The limit, in pixels (width x height of the region's chip).

    Raises:
        ModelError: if the variable is set but not a positive integer.
    """
    return _positive_int_setting("MAX_PIXELS", DEFAULT_MAX_PIXELS)


def infer_batch_size(device: str | torch.device) -> int:
    """Images per forward pass (``TORCHGEO_DOFA_BATCH_SIZE``; 8 on CPU, 64 on CUDA).

    Args:
        device: the inference device.

    Returns:
        The batch size.
    """
    default = DEFAULT_BATCH_CUDA if torch.device(device).type == "cuda" else DEFAULT_BATCH_CPU
    return _positive_int_setting("BATCH_SIZE", default)


def _resolve_device(device: str | torch.device | None) -> str:
    if device is None or str(device).strip().lower() == "auto":
        return resolve_accelerator("auto")  # the CLI's --device auto: CUDA, MPS, else the CPU
    try:  # case-insensitive, as the CLI's --device
        resolved = torch.device(str(device).strip().lower())
    except RuntimeError as err:
        raise ModelError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda[:N]'") from err
    if resolved.type not in ("cpu", "cuda", "mps"):  # meta (no data), xpu, hpu ...
        raise ModelError(
            f"device {device!r} is not one embeddings are computed on here: use 'auto', 'cpu' "
            "or 'cuda[:N]'"
            + (" ('meta' tensors hold no values)" if resolved.type == "meta" else "")
        )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(
            f"device {device!r}: PyTorch has no usable MPS (Apple GPU) here: use "
            "device='auto' or 'cpu'"
        )
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (resolved.index is not None and resolved.index >= count):
            seen = "no CUDA GPU" if count == 0 else f"{count} CUDA GPU(s) (cuda:0..{count - 1})"
            raise ModelError(
                f"device {device!r}: PyTorch sees {seen} here: use device='auto' (the GPU "
                "PyTorch finds, else the CPU), 'cpu' or an existing GPU"
            )
    return str(resolved)


#: The cached embedders by (variant, weights, device), each with the signature of its
#: weights file when it was loaded (:func:`_file_signature`).
_CACHE: dict[tuple[str, str, str], tuple[tuple[int, ...] | None, DOFAEmbedder]] = {}
_CACHE_LOCK = threading.RLock()

#: Seed of the API's random model (``weights=None``): every process builds the same one, so
#: embeddings repeat and an interrupted :func:`export_batch` resumes with the model that wrote
#: its first rows (unseeded, each process drew another model and a rerun mixed them). The
#: CLI's ``--weights none --seed N`` gives the same model for the same N.
RANDOM_WEIGHTS_SEED = 0


def _weights_key(weights: str | os.PathLike[str] | None) -> str:
    if weights is None:
        return f"random|seed {RANDOM_WEIGHTS_SEED}"
    if str(weights) == "official":
        suffixes = ("BASE_WEIGHTS", "LARGE_WEIGHTS", "WEIGHTS_DIR", "HF_REPO_ID", "HF_REVISION")
        return "official|" + "|".join(str(env_setting(s)) for s in suffixes)
    return "file|" + str(Path(weights).expanduser().resolve())


def _file_signature(variant: str, weights: str | os.PathLike[str] | None) -> tuple[int, ...] | None:
    """The identity on disk of the weights file an encoder is loaded from.

    Device, inode, size, modification and change times (ns) of the local file
    (:func:`~torchgeo_dofa.weights.local_weights_file`: a path, the official file name in a
    folder, ``TORCHGEO_DOFA_*_WEIGHTS`` / ``WEIGHTS_DIR`` for ``official``); None for random
    weights and the Hugging Face cache's files (named by their content).
    """
    path = local_weights_file(variant, weights)
    if path is None:
        return None
    try:
        return file_signature(path)
    except OSError:
        return None  # loading it says what is wrong


def _module(variant: str, weights: str | os.PathLike[str] | None, device: str) -> DOFAEmbedder:
    """The cached embedder for (variant, weights, device); loaded on first use.

    A weights file replaced or rewritten under the same name since (Lightning's ``last.ckpt``
    is, every epoch) is loaded again, replacing the cached encoder: the file's device, inode,
    size, modification and change times are compared (:func:`_file_signature`; the encoder
    of the old file was served before, and an export credited its rows to the new file).
    """
    key = (variant, _weights_key(weights), device)
    signature = _file_signature(variant, weights)
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
        if cached is not None and cached[0] == signature:
            return cached[1]
        _CACHE.pop(key, None)  # the old file's encoder is freed before the new one loads
        weights_arg = None if weights is None else str(weights)
        seed = RANDOM_WEIGHTS_SEED if weights is None else None
        module = DOFAEmbedder(variant=variant, weights=weights_arg, output="both", seed=seed)
        module.to(device)
        module.eval()
        _CACHE[key] = (signature, module)
        return module


def clear_model_cache() -> None:
    """Forget every cached encoder (frees their memory on the next garbage collection)."""
    with _CACHE_LOCK:
        _CACHE.clear()


# ----------------------------------------------------------------------------------------------
# argument normalisation
# ----------------------------------------------------------------------------------------------


def _check_model(model: str) -> None:
    if str(model).strip().lower() not in MODEL_NAMES:
        raise ModelError(
            f"unknown model {model!r}: torchgeo-dofa serves only 'dofa' (for other models "
            "use rs-embed itself)"
        )


@dataclass(frozen=True)
class _Config:
    variant: str
    weights: str | os.PathLike[str] | None
    pooled_norm: PooledNorm
    input_prep: str
    output: OutputSpec
    device: str


def _variant(name: str) -> str:
    """:func:`~torchgeo_dofa.model.canonical_variant`, its error a :class:`ModelError`."""
    try:
        return canonical_variant(name)
    except ValueError as err:
        raise ModelError(str(err)) from None


def _region_list(spatials: Any, name: str = "spatials") -> list[Any]:
    """``spatials`` as a list of regions.

    Raises:
        ModelError: for one region (a :class:`PointBuffer`, :class:`BBox` or geometry)
            given where a list is asked, or a value that is not a sequence of them.
    """
    if isinstance(spatials, Mapping):
        raise ModelError(
            f"{name} is a dict: give a list of regions (and their ids as names=, for export_batch)"
        )
    if isinstance(spatials, PointBuffer | BBox | shapely.Geometry | str | bytes):
        raise ModelError(
            f"{name}={spatials!r} is one region: give a list of them ({name}=[...]), or "
            "call get_embedding(..., spatial=...) for one"
        )
    try:
        regions = list(spatials)
    except TypeError:
        raise ModelError(
            f"{name}={spatials!r} is not a list of regions: give [PointBuffer(...), BBox(...), ...]"
        ) from None
    for i, region in enumerate(regions):
        _check_region(region, f"{name}[{i}]")
    return regions


def _check_region(region: Any, name: str = "spatial") -> None:
    """Refuse what is not a region: another type, or a geometry without area.

    A shapely geometry is read by its area (a BBox of its bounds for the gee and stac
    backends), in longitude and latitude: an empty one, a point or a line, one with
    coordinates that are not finite, or beyond -180..180 / -90..90 (metres of a UTM zone)
    gave numpy's "cannot convert float NaN to integer", an ``OverflowError`` or a chip of no
    pixels, and an invalid one (a self-intersecting "bowtie") was read in part.

    Raises:
        ModelError: naming the value, what is wrong with it and the region types.
    """
    if isinstance(region, PointBuffer | BBox):
        return
    if not isinstance(region, shapely.Geometry):
        raise ModelError(
            f"{name}={region!r} is a {type(region).__name__}, not a region: give "
            "PointBuffer(lon, lat, buffer_m), BBox(minlon, minlat, maxlon, maxlat) or a "
            "shapely polygon"
        )

    def shown() -> str:  # for a message only: a large polygon's WKT is long to write
        wkt = str(region.wkt)
        return wkt if len(wkt) <= 80 else wkt[:77] + "..."

    coords = shapely.get_coordinates(region)
    finite = bool(np.isfinite(coords).all())
    if finite and not region.is_empty:
        x0, y0, x1, y1 = region.bounds
        if x0 < -180 or x1 > 180 or y0 < -90 or y1 > 90:
            raise ModelError(
                f"{name} ({shown()}) lies outside longitude -180..180 / latitude -90..90: a "
                "region's coordinates are longitude and latitude (EPSG:4326); transform a "
                "geometry in metres (a UTM zone) first (shapely.ops.transform with a pyproj "
                "Transformer to EPSG:4326, always_xy=True)"
            )
    what = (
        "an empty geometry"
        if region.is_empty
        else "a geometry with coordinates that are not finite numbers"
        if not finite
        else f"a {region.geom_type} without area"
        if region.area == 0
        else None
    )
    if what is not None:
        raise ModelError(
            f"{name} is {what} ({shown()}): give a polygon with an area, a "
            "BBox(minlon, minlat, maxlon, maxlat), or PointBuffer(lon, lat, buffer_m) for a "
            "point"
        )
    if not region.is_valid:
        raise ModelError(
            f"{name} ({shown()}) is not a valid {region.geom_type} "
            f"({shapely.is_valid_reason(region)}): part of it would be read, or none; "
            "repair it (shapely.make_valid) or give its parts as regions of their own"
        )


def _check_temporal(temporal: Any) -> None:
    """Refuse a ``temporal`` that is not a :class:`TemporalSpec` (None is every date).

    Raises:
        ModelError: naming the type given and the two ways to make one.
    """
    if temporal is not None and not isinstance(temporal, TemporalSpec):
        raise ModelError(
            f"temporal={temporal!r} is a {type(temporal).__name__}, not a TemporalSpec: give "
            "temporal=TemporalSpec.range('YYYY-MM-DD', 'YYYY-MM-DD') (end exclusive) or "
            "TemporalSpec.year(YYYY)"
        )


#: The SensorSpec fields only some backends use: Earth Engine's fetch settings, which the
#: stac backend shares but for ``collection`` (its own is ``collection=``).
_FETCH_FIELDS: dict[str, tuple[str, ...]] = {
    "gee": (),
    "stac": ("collection",),
    "local": ("collection", "scale_m", "cloudy_pct", "composite"),
    "tensor": ("collection", "scale_m", "cloudy_pct", "composite"),
}


def _warn_unused_sensor_fields(sensor: SensorSpec | None, backend: str) -> None:
    """Warn of SensorSpec fetch settings, changed from their defaults, that ``backend`` ignores.

    ``scale_m``, ``cloudy_pct`` and ``composite`` say how the gee and stac backends fetch and
    composite; ``collection`` is Earth Engine's. The local backend reads files as they are
    (at their own resolution, every scene mosaicked) and the tensor backend takes pixels: a
    setting of theirs changed nothing, without a word.
    """
    if sensor is None:
        return
    default = SensorSpec()
    unused = [
        f"{name}={getattr(sensor, name)!r}"
        for name in _FETCH_FIELDS.get(backend, ())
        if getattr(sensor, name) != getattr(default, name)
    ]
    if not unused:
        return
    fix = {
        "stac": "the stac backend searches collection= (get_embedding's own argument)",
        "local": (
            "backend='local' reads the files as they are, at their own pixel size and "
            "without cloud filtering or compositing (another pixel size: "
            "paths=Sentinel2SR(FILES, res=...))"
        ),
        "tensor": "backend='tensor' embeds input_chw's pixels as given",
    }[backend]
    warn(
        f"SensorSpec({', '.join(unused)}) is not used here: {fix}; scale_m, cloudy_pct and "
        "composite are the gee and stac backends' fetch settings, collection Earth Engine's",
        UserWarning,
    )


def _config(
    model: str,
    *,
    variant: str | None,
    weights: str | os.PathLike[str] | None,
    pooled_norm: str,
    input_prep: str,
    output: OutputSpec | str,
    device: str | torch.device | None,
    model_config: dict[str, Any] | None,
    config_wins: bool = False,
) -> _Config:
    """The model settings of a call: its keywords, and ``model_config`` over the defaults.

    ``model_config`` sets what the keywords left at their defaults (every keyword with
    ``config_wins``: an export request's own settings).

    Raises:
        ModelError: for an unknown model, setting or value; ``model_config`` not a dict;
            a setting given as a keyword and in ``model_config`` with different values.
    """
    _check_model(model)
    if model_config is not None and not isinstance(model_config, Mapping):
        raise ModelError(
            f"model_config={model_config!r} is a {type(model_config).__name__}, not a dict: "
            f"give model_config={{'variant': 'large'}} (keys among {list(_MODEL_KEYS)})"
        )
    settings = dict(model_config or {})
    unknown = sorted(set(settings) - set(_MODEL_KEYS))
    if unknown:
        raise ModelError(f"unknown model_config key(s) {unknown}: choose among {_MODEL_KEYS}")
    if variant is not None and "variant" in settings:
        if _variant(variant) != _variant(str(settings["variant"])):
            raise ModelError(
                f"variant={variant!r} conflicts with model_config variant "
                f"{settings['variant']!r}: give it once"
            )
    for value in (weights, settings.get("weights")):
        if value is not None and not str(value).strip():
            raise ModelError(
                f"weights={str(value)!r} is empty: give 'official', a checkpoint path, or None "
                "for random weights"
            )
    given = {"weights": weights, "pooled_norm": pooled_norm, "input_prep": input_prep}
    for key, value in given.items():
        if key in settings and not isinstance(value, _Default) and not config_wins:
            theirs = settings[key]
            random = all(v is None or names_random_weights(v) for v in (value, theirs))
            if not random and str(value) != str(theirs):
                raise ModelError(
                    f"{key}={value!r} conflicts with model_config {key} {theirs!r}: give it once"
                )
    variant_name = _variant(str(settings.get("variant", "base" if variant is None else variant)))
    norm = str(settings.get("pooled_norm", pooled_norm))
    if norm not in ("trained", "plain"):
        raise ModelError(
            f"unknown pooled_norm {norm!r}: 'trained' (rs-embed's, default) or 'plain'"
        )
    prep = str(settings.get("input_prep", input_prep))
    if prep not in INPUT_PREPS:
        raise ModelError(f"unknown input_prep {prep!r}: choose one of {list(INPUT_PREPS)}")
    if isinstance(output, str):  # any letter case (OutputSpec's check), as variant=
        output = OutputSpec(output)  # type: ignore[arg-type]
    elif not isinstance(output, OutputSpec):
        raise ModelError(f"output must be OutputSpec.pooled() or OutputSpec.grid(), got {output}")
    chosen = settings.get("weights", weights)
    if names_random_weights(chosen):
        chosen = None  # the CLI's / a config's spelling: the same seeded random model
    return _Config(
        variant=variant_name,
        weights=chosen,
        pooled_norm=norm,  # type: ignore[arg-type]
        input_prep=prep,
        output=output,
        device=_resolve_device(device),
    )


def _backend(backend: str, input_given: bool, paths_given: bool) -> str:
    name = str(backend).strip().lower()
    if name not in BACKENDS:
        raise ModelError(f"unknown backend {backend!r}: choose one of {list(BACKENDS)}")
    if name == "provider":  # rs-embed's name for Earth Engine: checked as "gee" below
        name = "gee"
    if name == "auto":
        name = "tensor" if input_given else "local" if paths_given else "gee"
    if name == "tensor" and paths_given:  # they were ignored without a word
        raise ModelError(
            "paths= is read by backend='local' only, but pixels were given (input_chw): "
            "embed either the pixels (leave out paths=) or a region of the files (leave out "
            "input_chw and give spatial=)"
        )
    if name in ("gee", "stac") and paths_given:  # dropped without a word
        raise ModelError(
            f"paths= is read by backend='local' only, but backend={name!r} fetches the "
            "pixels itself: leave out paths=, or read the files with backend='local' (the "
            "default where paths= is given)"
        )
    return name


# ----------------------------------------------------------------------------------------------
# inputs: raw pixels -> preprocessed sample + provenance
# ----------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    sample: dict[str, Tensor]
    meta: dict[str, Any]


def _normalisation_meta(
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "check": "input whose valid values all lie in [0, 2] is rejected (raw 0..10000 expected)",
        "clip": [0.0, 10000.0],
        "scale": "x / 10000 * 255",
        "standardise": "DOFA per-band mean/std (0..255 scale), looked up by band name",
    }
    if mean is not None and std is not None:
        meta["standardise"] = "per-band mean/std (0..255 scale)"
        meta["mean"] = [float(v) for v in mean]
        meta["std"] = [float(v) for v in std]
    return meta


def _size_meta(height: int, width: int, input_prep: str, size: int = 224) -> dict[str, Any]:
    if input_prep == "resize":
        side = max(height, width)
        pad_h, pad_w = side - height, side - width
        top, left = pad_h // 2, pad_w // 2
        return {
            "method": "centre mirror-pad to a square, then bilinear resize",
            "padding_tblr": [top, pad_h - top, left, pad_w - left],
            "square_side": side,
            "resize": {"to": [size, size], "align_corners": False, "antialias": False},
        }
    rows, cols = math.ceil(height / size), math.ceil(width / size)
    return {
        "method": "224 x 224 tiles (bottom/right mirror-padded), grids stitched",
        "tile_grid": [rows, cols],
        "tiles": rows * cols,
        "padding_bottom_right": [rows * size - height, cols * size - width],
    }


def _prepare(
    image: Tensor,
    bands: Sequence[str],
    wavelengths: Sequence[float] | Tensor | None,
    input_prep: str,
    *,
    nodata: float | None = None,
    fill_value: float = 0.0,
    valid: Tensor | None = None,
    transform: Tensor | None = None,
    sensor: SensorSpec | None = None,
    whole_input: bool = False,
) -> _Prepared:
    """Run the standard stack on one raw (C, H, W) image; record what was done.

    ``whole_input``: the image is the caller's whole input (``input_chw``), not a region cut
    from a scene, and is refused where its valid values are all negative
    (:class:`~torchgeo_dofa.transforms.CheckReflectance`).
    """
    height, width = int(image.shape[-2]), int(image.shape[-1])
    mean, std = (sensor.mean, sensor.std) if sensor is not None else (None, None)
    stack = DOFAPreprocess(
        bands,
        wavelengths,
        input_prep=input_prep,
        nodata=nodata,
        fill_value=fill_value,
        mean=mean,
        std=std,
        whole_input=whole_input,
    )
    sample: dict[str, Tensor] = {"image": image}
    if valid is not None:
        sample["valid"] = valid
    if transform is not None:
        sample["transform"] = transform
    ok = ~nodata_mask(image if image.is_floating_point() else image.float(), nodata, fill_value)
    if valid is not None:
        ok &= valid.to(torch.bool)
    fraction = float(ok.float().mean())
    out = stack(sample)
    meta: dict[str, Any] = {
        "bands": list(stack.bands),
        "wavelengths_um": [round(float(w), 6) for w in stack.wavelengths],
        "input_prep": input_prep,
        "input_size_hw": [height, width],
        "model_input_hw": [224, 224],
        "preprocessing": {
            "normalization": _normalisation_meta(mean, std),
            "size": _size_meta(height, width, input_prep),
            "fill_value": fill_value,
            "nodata": nodata,
            "no_data_rule": (
                "NaN/inf, the nodata value (if none: -9999, -32768, 65535), values <= -1000, "
                "or fill_value in every band"
            ),
        },
        "valid_fraction": round(fraction, 6),
        "empty": bool(out["empty"]),
        # when the pixels were acquired (ISO 8601 UTC): the local backend's dated scenes set it
        "acquisition_start": None,
        "acquisition_end": None,
    }
    if "grid_transform" in out:
        meta["grid_transform"] = [float(v) for v in out["grid_transform"][:6]]
    if input_prep == "tile":
        meta["n_tiles"] = int(out["image"].shape[0])
    return _Prepared(out, meta)


def _as_chw(array: Any, name: str = "input_chw") -> Tensor:
    """Check a (C, H, W) input and cast it to float32 (any real numpy / torch dtype)."""
    try:
        tensor = as_float32(array.detach() if isinstance(array, Tensor) else array, name)
    except TypeError as err:
        raise ModelError(str(err)) from err
    if tensor.ndim != 3:
        raise ModelError(
            f"{name} must be a (C, H, W) array, got rank {tensor.ndim} shape "
            f"{tuple(tensor.shape)}; for several images use "
            "get_embeddings_batch_from_inputs(input_chws=[...])"
        )
    if min(tensor.shape) < 1:
        raise ModelError(f"{name} is empty: shape {tuple(tensor.shape)}")
    return tensor


def _prepare_tensor(
    input_chw: Any,
    sensor: SensorSpec | None,
    input_prep: str,
    nodata: float | None,
    name: str = "input_chw",
) -> _Prepared:
    if sensor is None:
        raise ModelError(
            "backend='tensor' needs sensor=SensorSpec(bands=[...]) naming the channels of "
            "input_chw, so DOFA's normalisation and wavelengths can be applied"
        )
    image = _as_chw(input_chw, name)
    if image.shape[0] != len(sensor.bands):
        layout = (
            f" (its last axis has {len(sensor.bands)}: for an (H, W, C) array pass "
            "array.transpose(2, 0, 1))"
            if image.shape[-1] == len(sensor.bands)
            else ""
        )
        raise ModelError(
            f"{name} has C={image.shape[0]} channels but sensor.bands names "
            f"{len(sensor.bands)} bands {list(sensor.bands)}{layout}: give one band name per "
            "channel"
        )
    try:  # two dates of an Earth Engine stack, as a file's are (helper-137)
        refuse_repeated_bands(sensor.bands)
    except BandError as err:
        raise ModelError(f"SensorSpec: {err}") from err
    try:
        with eight_bit_input(_dtype_name(input_chw) in NARROW_DTYPES):  # _as_chw warned
            prepared = _prepare(
                image,
                sensor.bands,
                sensor.wavelengths,
                input_prep,
                nodata=nodata,
                fill_value=sensor.fill_value,
                sensor=sensor,
                whole_input=True,
            )
    except ReflectanceError as err:  # offset= is a dataset's argument, not get_embedding's
        told = str(err).replace(" (offset=0)", "")
        raise (err if told == str(err) else ReflectanceError(told)) from None
    prepared.meta["source"] = "input_chw"
    return prepared


def open_local(
    paths: PathsLike, sensor: SensorSpec | None = None, temporal: TemporalSpec | None = None
) -> Sentinel2Base:
    """Open local rasters as this package's dataset, as ``backend="local"`` does.

    Files and folders are found and grouped as the embed job does
    (:func:`~torchgeo_dofa.datasets.find_raster_inputs`); Earth Engine export tiles
    (``<prefix>-0000000000-0000000000.tif``) are read with
    :class:`~torchgeo_dofa.datasets.EarthEngineS2`, anything else with
    :class:`~torchgeo_dofa.datasets.Sentinel2SR`; pass a dataset yourself to choose.

    Args:
        paths: a file, a folder, a list of them, or a dataset (returned as is).
        sensor: bands / wavelengths to read; None, or a sensor leaving bands, wavelengths,
            mean and std at their defaults: the dataset's default bands.
        temporal: the dates: only the scenes acquired within them are opened (the others
            decide nothing, e.g. the default resolution), as ``embed --datetime`` does.
            None: every scene. Ignored for a dataset given as ``paths``.

    Returns:
        The dataset.

    Raises:
        ModelError: if a path does not exist or holds no raster; for paths in other CRSs
            (:func:`_refuse_inputs_in_other_crss`); for a dataset given as ``paths`` with a
            ``sensor`` choosing other bands (:func:`_refuse_sensor_unlike`).
        NoSceneError: (a ``LookupError``) if no scene is acquired within ``temporal``.
        BandError: if the files' bands cannot be named or selected (the message names the
            dataset's arguments that fix it).
    """
    if isinstance(paths, Sentinel2Base):
        if sensor is not None:
            _refuse_sensor_unlike(paths, sensor)
        return paths
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    try:
        regions = find_raster_inputs(items)
    except InputError as err:
        where = ""
        if "crs=EPSG" in str(err):  # the dataset's argument, not get_embedding's
            where = " (crs= goes to a dataset given as paths=Sentinel2SR(..., crs=...))"
        line = str(err).replace(  # the embed job's inputs: here, calls
            "go as separate inputs, one output each", "go in separate calls (one paths= each)"
        )
        raise ModelError(f"local input: {line}{where}") from None
    _refuse_inputs_in_other_crss(regions)
    kwargs: dict[str, Any] = {}
    if sensor is not None and _chooses_bands(sensor):
        kwargs["bands"] = list(sensor.bands)
        if sensor.wavelengths is not None:
            kwargs["wavelengths"] = list(sensor.wavelengths)
    if temporal is not None:
        ts = temporal.time_slice()
        kwargs["time"] = (ts.start, ts.stop)
    files = [p for r in regions for p in r.paths]
    cls = EarthEngineS2 if all(r.earth_engine for r in regions) else Sentinel2SR
    try:  # the band-choice warnings' hints name the dataset's arguments too
        with reworded(lambda message: _where_dataset_arguments_go(message, cls)):
            dataset = cls(paths=files, **kwargs)
    except (BandError, InputError) as err:
        told = _where_dataset_arguments_go(str(err), cls)
        if told == str(err):
            raise
        raise type(err)(told) from err
    refuse_repeated_bands(dataset.bands)
    return dataset


def _refuse_inputs_in_other_crss(regions: Sequence[RasterInput]) -> None:
    """Refuse local inputs lying in other CRSs (UTM zones): they are read as one dataset.

    The local backend reads every path given as one dataset, which reads its files in the
    first one's CRS (TorchGeo's ``RasterDataset``): ``paths=[zone_34_folder,
    zone_35_folder]`` warped the second zone's scene into the first's (7 degrees of
    longitude out of that zone: rotated ~6 degrees) and moved the first's reported bounds
    by 4 m (the grid's origin taken from the other's warped corner), with no word, where
    one folder holding both was refused as mixed CRS (helper-128). CRSs differing only in a
    vertical datum (EPSG:32633+5773 beside EPSG:32633) are one CRS here, as in a folder.

    Raises:
        ModelError: listing each CRS's inputs, with the fixes (a call per CRS, or one CRS
            chosen for a mosaic of neighbouring scenes).
    """
    groups: dict[str, list[str]] = {}
    for region in regions:
        if region.crs is None:
            continue
        plane = _horizontal(region.crs)
        key = next((k for k in groups if same_crs(k, plane)), plane)
        groups.setdefault(key, []).append(region.name)
    if len(groups) < 2:
        return
    listing = "; ".join(f"{crs_label(k)}: {_first_few(v)}" for k, v in groups.items())
    raise ModelError(
        f"local input: the paths lie in {len(groups)} CRSs ({listing}), and are read as one "
        "dataset, in the first one's CRS (the others warped into it): call once per CRS "
        "(paths= the inputs of one), or, for a mosaic of neighbouring scenes, read them in "
        "one CRS: paths=Sentinel2SR([...], crs='EPSG:<code>')"
    )


def _chooses_bands(sensor: SensorSpec) -> bool:
    """Whether ``sensor`` chooses the bands local files are read with.

    It does where it was given bands (:attr:`SensorSpec.bands_given`, even DOFA's nine, the
    default, what the ``gee`` and ``stac`` backends fetch), or ``wavelengths``, ``mean`` or
    ``std`` (one per band, in the order of its bands). Otherwise the files are
    read with their dataset's default bands, as without ``sensor=``: ``SensorSpec(scale_m=20)``
    or ``SensorSpec(fill_value=...)`` with a 4-band file had asked it for the nine bands.
    """
    given = any(getattr(sensor, k) is not None for k in ("wavelengths", "mean", "std"))
    return given or sensor.bands_given


def _refuse_sensor_unlike(dataset: Sentinel2Base, sensor: SensorSpec) -> None:
    """Refuse a ``sensor`` choosing bands that a dataset given as ``paths=`` does not read.

    A dataset reads the bands it was built with, and ``sensor``'s were ignored: a
    ``Sentinel2SR(file_bands=[B4, B3, B2, B8, B4_1, ...])`` with
    ``sensor=SensorSpec(bands=("B4_1", ...))`` embedded the first date's bands, with no word.
    A sensor chooses bands where it was given them, or ``wavelengths``, ``mean`` or ``std``
    (one per band, in the order of its bands; :func:`_chooses_bands`): then its
    bands must be the dataset's, in the dataset's order (``B04`` and ``B4`` are one band), and
    its wavelengths the dataset's (to 1e-4 um). Its other settings (``fill_value``) apply.

    Raises:
        ModelError: naming both band lists and the fix (the dataset's ``bands=``).
    """
    if not _chooses_bands(sensor):
        return
    theirs = [str(b) for b in dataset.bands]
    exact = [float(w) for w in dataset.wavelengths]
    same = same_band_names(sensor.bands, theirs)
    close = sensor.wavelengths is None or (
        len(sensor.wavelengths) == len(exact)
        and all(abs(a - b) <= 1e-4 for a, b in zip(sensor.wavelengths, exact, strict=True))
    )
    if same and close:
        return
    what = (
        f"bands {list(sensor.bands)}"
        if not same
        else f"wavelengths {list(sensor.wavelengths or ())} um"
    )
    raise ModelError(
        f"sensor=SensorSpec(...) gives {what}, but the dataset given as paths= reads the bands "
        f"{theirs} (wavelengths {[round(w, 4) for w in exact]} um), the ones it was built "
        "with: build it with "
        f"bands=[...] (and wavelengths=[...]), e.g. "
        f"{type(dataset).__name__}(..., bands={list(sensor.bands)}), or leave bands, "
        "wavelengths, mean and std out of sensor="
    )


def _where_dataset_arguments_go(message: str, cls: type[Sentinel2Base]) -> str:
    """A dataset's error or warning, saying where the arguments its hints name go.

    Its hints name the dataset's arguments (``file_bands=``, ``bands=``, ``crs=`` ...),
    which :func:`get_embedding` lacks: ``bands=`` and ``wavelengths=`` are its
    ``sensor=SensorSpec(...)``; the others go to a dataset given as ``paths=``.
    """
    where = []
    if re.search(r"\b(bands|wavelengths)=", message):  # not file_bands= (no word boundary)
        where.append(
            "bands= and wavelengths= go to sensor=SensorSpec(bands=[...], wavelengths=[...])"
        )
    if re.search(r"\b(file_bands|crs|nodata|mean|std)=", message):
        where.append(
            "the dataset's arguments, e.g. file_bands= or crs=, go to a dataset given as "
            f"paths={cls.__name__}(...), and its bands= with them"
        )
    return f"{message} ({'; '.join(where)})" if where else message


def _region_label(spatial: Region) -> str:
    """A short name for a region in messages (a long geometry's WKT is not shown)."""
    if isinstance(spatial, PointBuffer | BBox):
        return repr(spatial)
    return f"the {spatial.geom_type} region"


def _check_read_size(
    spatial: Region, width: int, height: int, bands: int, grid: str, cli: str
) -> None:
    """Refuse a region whose chip exceeds :func:`max_pixels` per band, before reading it.

    Args:
        spatial: the region (named in the message; a PointBuffer gets the buffer that fits).
        width: chip width, pixels.
        height: chip height, pixels.
        bands: bands to read (for the memory estimate).
        grid: the grid the pixels are counted on (``"the data's 10 m grid"``).
        cli: the ``torchgeo-dofa embed`` command that tiles the area instead.

    Raises:
        ModelError: naming the chip size, its memory, the limit and the fixes.
    """
    limit = max_pixels()
    pixels = width * height
    if pixels <= limit:
        return
    if isinstance(spatial, PointBuffer):
        fits = math.floor(spatial.buffer_m * math.sqrt(limit / pixels) + 1e-6)
        smaller = f"a smaller buffer_m (about {fits} m or less)"
    else:
        smaller = "a smaller BBox or geometry"
    size = pixels * bands * 4
    memory = (
        f"{size / 2**30:.1f} GiB"
        if size >= 2**30
        else f"{size / 2**20:.0f} MiB"
        if size >= 2**20
        else f"{size / 2**10:.0f} KiB"
    )
    raise ModelError(
        f"{_region_label(spatial)} covers {width} x {height} px ({pixels / 1e6:.3g} Mpx, about "
        f"{memory} as float32 for {bands} band(s)) on {grid}, more than the "
        f"{limit / 1e6:.3g} Mpx get_embedding reads for one region (TORCHGEO_DOFA_MAX_PIXELS, "
        f"default 4096 x 4096): use {smaller}, or embed the area with the CLI's embed job, "
        f"which tiles it into 224 px chips ({cli})"
    )


def _grid_name(crs: CRS, res: tuple[float, float]) -> str:
    axis = crs.axis_info[0] if crs.axis_info else None
    unit = "" if axis is None else " m" if axis.unit_name == "metre" else f" {axis.unit_name}"
    xres, yres = res
    size = f"{xres:g}{unit}" if xres == yres else f"{xres:g} x {yres:g}{unit}"
    return f"the data's {size} grid"


def _one_day_spec(day: str) -> str:
    """The ``temporal=`` that selects the scenes of one day."""
    after = (date.fromisoformat(day) + timedelta(days=1)).isoformat()
    return f"temporal=TemporalSpec.range('{day}', '{after}')"


def _acquisition_of(ds: Sentinel2Base, ts: slice, files: Sequence[str]) -> tuple[str, str] | None:
    """The acquisition span of the scenes within ``ts`` that gave a chip ``files``.

    Args:
        ds: the dataset read.
        ts: the chip's time slice.
        files: the files its pixels came from (``meta["source"]``).

    Returns:
        ``(start, end)`` ISO 8601 UTC (:func:`~torchgeo_dofa.datamodules.acquisition_span`),
        or None where one of those scenes has no date, or none is found.
    """
    wanted = {os.path.abspath(f) for f in files}
    scenes = scenes_within(ds, ts)
    read = [any(os.path.abspath(p) in wanted for p, _ in s) for s in scenes["sources"]]
    return acquisition_span(ds, scenes[read])


def _lonlat_extent(bounds: Sequence[float], crs: CRS) -> str:
    """Bounds in longitude / latitude for a message: ``", lon 13.1 .. 13.2, lat 48.3 .. 48.4"``.

    A region given as (lat, lon) shows at once. "" where the CRS cannot be placed (a local
    CRS) or already is longitude / latitude.
    """
    if crs.is_geographic:
        return ""
    try:
        west, south, east, north = lonlat_bounds(bounds, crs)
    except (CRSTransformError, pyproj.exceptions.ProjError):
        return ""
    if not all(math.isfinite(v) for v in (west, south, east, north)):
        return ""
    return f", lon {west:.4f} .. {east:.4f}, lat {south:.4f} .. {north:.4f}"


def _prepare_local(
    ds: Sentinel2Base,
    spatial: Region,
    temporal: TemporalSpec | None,
    input_prep: str,
    fill_value: float,
    sensor: SensorSpec | None = None,
) -> _Prepared:
    if spatial is None:
        raise ModelError("backend='local' needs spatial=PointBuffer(...) or BBox(...)")
    crs = CRS.from_user_input(ds.crs)
    bounds = ds.index.total_bounds
    # the chip the embed job's data module reads for this region (RegionSampler)
    try:
        xs, ys = RegionSampler(ds, [spatial], check_footprint=False).chips[0]
    except CRSTransformError as err:  # its fixes are the command line's (no bbox= ...)
        raise CRSTransformError(
            f"cannot place {_region_label(spatial)} (longitude / latitude) on files in "
            f"{crs_label(crs)} ({err.reason or err}): give the files their real CRS "
            "(gdal_edit.py -a_srs EPSG:<code>), or embed them whole in their own CRS with "
            "torchgeo-dofa embed FILES -o OUT/",
            reason=err.reason,
        ) from None
    xres, yres = ds.res
    _check_read_size(
        spatial,
        max(1, round((xs.stop - xs.start) / xres)),
        max(1, round((ys.stop - ys.start) / yres)),
        len(ds.bands),
        _grid_name(crs, (float(xres), float(yres))),
        "torchgeo-dofa embed FILES --bbox MINLON MINLAT MAXLON MAXLAT -o OUT/",
    )
    if temporal is None:
        ts = slice(ds.index.index.left.min(), ds.index.index.right.max())
    else:
        ts = temporal.time_slice()
    # scenes of two dates overlapping in the chip would be merged into one image, and one
    # without a date would be read whatever temporal= says
    try:
        if temporal is not None:
            asked = f"temporal=TemporalSpec.range('{temporal.start}', '{temporal.end}')"
            refuse_undated_scenes(
                ds, ts, box=shapely.box(xs.start, ys.start, xs.stop, ys.stop), asked=asked,
                option="temporal=",
            )  # fmt: skip
        refuse_mixed_acquisitions(
            ds, ts, box=shapely.box(xs.start, ys.start, xs.stop, ys.stop), fix=_one_day_spec
        )
    except InputError as err:
        raise ModelError(f"local input: {err}") from None
    try:
        if type(ds).read_chip is Sentinel2Base.read_chip:
            raw, files = ds.read_chip_with_sources((xs, ys, ts))
        else:  # a subclass's own reading (a cloud mask, say) is what the chip is
            raw, files = ds.read_chip((xs, ys, ts)), ds.scene_files((xs, ys, ts))
    except IndexError as err:
        when = f" between {temporal.start} and {temporal.end}" if temporal else ""
        raise LookupError(
            f"no scene of the local data overlaps {spatial}{when} (data bounds "
            f"{[round(float(b), 3) for b in bounds]} in {crs_label(crs)}"
            f"{_lonlat_extent(bounds, crs)})"
        ) from err
    with reworded(lambda message: _dataset_hints(message, type(ds))):  # hints as the API's
        check_raw_reflectance(ds, paths=files)  # the region's files, whole (not a chip)
    prepared = _prepare(
        raw["image"],
        ds.bands,
        ds.wavelengths,
        input_prep,
        fill_value=fill_value,
        valid=raw["valid"],
        transform=raw["transform"],
        sensor=sensor,
    )
    span = _acquisition_of(ds, ts, files)
    prepared.meta.update(
        {
            "source": files,  # the files the chip's pixels came from
            "acquisition_start": None if span is None else span[0],
            "acquisition_end": None if span is None else span[1],
            "dataset": type(ds).__name__,
            "crs": crs_name(crs),
            "transform": [float(v) for v in raw["transform"][:6]],
            "bounds": [float(xs.start), float(ys.start), float(xs.stop), float(ys.stop)],
            "temporal": None if temporal is None else [temporal.start, temporal.end],
        }
    )
    return prepared


def _prepare_gee(
    spatial: Region,
    temporal: TemporalSpec | None,
    sensor: SensorSpec,
    input_prep: str,
    project: str | None,
) -> _Prepared:
    if spatial is None:
        raise ModelError("backend='gee' needs spatial=PointBuffer(...) or BBox(...)")
    if temporal is None:
        raise ModelError(
            "backend='gee' needs temporal=TemporalSpec.range('YYYY-MM-DD', 'YYYY-MM-DD') (or "
            "TemporalSpec.year(YYYY)): the composite is built from the images in that range"
        )
    request = build_gee_request(
        spatial,
        temporal.start,
        temporal.end,
        collection=sensor.collection,
        bands=sensor.bands,
        scale_m=float(sensor.scale_m),
        cloudy_pct=sensor.cloudy_pct,
        composite=sensor.composite,
        fill_value=sensor.fill_value,
    )
    image, valid, fetch_meta = fetch_gee_pixels(request, project=project)
    transform = torch.tensor(list(Affine(*request.transform)), dtype=torch.float64)
    prepared = _prepare(
        torch.from_numpy(image),
        sensor.bands,
        sensor.wavelengths,
        input_prep,
        fill_value=sensor.fill_value,
        valid=torch.from_numpy(valid),
        transform=transform,
        sensor=sensor,
    )
    a, _, c, _, e, f = request.transform
    prepared.meta.update(
        {
            "source": request.collection,
            "crs": request.crs,
            "transform": list(request.transform),
            "bounds": [c, f + e * request.height, c + a * request.width, f],
            "temporal": [temporal.start, temporal.end],
            "provider": {
                "collection": request.collection,
                "scale_m": request.scale_m,
                "cloudy_pct": request.cloudy_pct,
                "composite": request.composite,
                "fill_value": request.fill_value,
                **fetch_meta,
            },
            "gee_request": {k: v for k, v in request.as_dict().items() if k != "region"},
        }
    )
    return prepared


@dataclass(frozen=True)
class _StacSource:
    """Where ``backend="stac"`` searches: API URL / item collection / catalog, collection."""

    url: str | os.PathLike[str]
    collection: str


def _stac_source(
    which: str, stac_url: str | os.PathLike[str] | None, collection: str | None
) -> _StacSource | None:
    if which != "stac":
        if collection is not None and stac_url is None and which == "gee":
            raise ModelError(
                "collection= names a STAC collection (backend='stac'): Earth Engine's is "
                "sensor=SensorSpec(collection=...)"
            )
        if stac_url is not None or collection is not None:  # they were ignored without a word
            given = "stac_url=" if stac_url is not None else "collection="
            why = {"local": " (paths= given)", "tensor": " (input_chw= given)"}.get(which, "")
            raise ModelError(
                f"{given} is read by backend='stac' only, but this call reads backend="
                f"{which!r}{why}: leave it out, or read the STAC source alone (stac_url= "
                "without paths= or input_chw=)"
            )
        return None
    if stac_url is None:
        raise ModelError(
            "backend='stac' needs stac_url=... (a STAC API such as "
            "https://earth-search.aws.element84.com/v1, an item collection JSON or a "
            "catalog.json)"
        )
    from .stac import DEFAULT_COLLECTION as STAC_COLLECTION

    if collection is not None and not str(collection).strip():
        raise ModelError(
            f"collection={collection!r} is empty: name a STAC collection id (e.g. "
            f"collection={STAC_COLLECTION!r}) or leave it out for that default"
        )
    return _StacSource(stac_url, STAC_COLLECTION if collection is None else str(collection))


def _prepare_stac(
    spatial: Region,
    temporal: TemporalSpec | None,
    sensor: SensorSpec | None,
    input_prep: str,
    source: _StacSource,
) -> _Prepared:
    """Composite the STAC items of the ROI into a local GeoTIFF, then read it as ``local``."""
    from . import stac

    if spatial is None:
        raise ModelError("backend='stac' needs spatial=PointBuffer(...) or BBox(...)")
    if temporal is None:
        raise ModelError(
            "backend='stac' needs temporal=TemporalSpec.range('YYYY-MM-DD', 'YYYY-MM-DD'): "
            "the composite is built from the items in that range"
        )
    eff = sensor or SensorSpec()
    last = date.fromisoformat(temporal.end) - timedelta(days=1)  # STAC ends are inclusive
    grid = stac.stac_grid(spatial, float(eff.scale_m))  # checked before the search
    _check_read_size(
        spatial,
        grid.width,
        grid.height,
        len(eff.bands),
        f"the {float(eff.scale_m):g} m grid of {grid.crs}",
        "torchgeo-dofa embed --stac URL --bbox MINLON MINLAT MAXLON MAXLAT --datetime A/B -o OUT/",
    )
    try:
        path = stac.materialise(
            spatial,
            (temporal.start, last.isoformat()),
            source.url,
            collection=source.collection,
            bands=eff.bands,
            max_cloud=eff.cloudy_pct,
            composite=eff.composite,
            resolution=float(eff.scale_m),
        )
    except stac.StacError as err:
        if "bands=" not in str(err):
            raise
        raise stac.StacError(  # the hint names materialise's argument: say where it goes here
            f"{err} (get_embedding takes them as sensor=SensorSpec(bands=[...]))"
        ) from err
    ds = open_local(path, SensorSpec(bands=eff.bands, wavelengths=eff.wavelengths))
    prepared = _prepare_local(ds, spatial, None, input_prep, eff.fill_value, eff)
    with rasterio.open(path) as src:
        tags = src.tags()
    prepared.meta.update(
        {
            "temporal": [temporal.start, temporal.end],
            "stac": {
                "source": tags.get("STAC_SOURCE"),
                "collection": tags.get("STAC_COLLECTION"),
                "datetime": tags.get("STAC_DATETIME"),
                "max_cloud": eff.cloudy_pct,
                "composite": tags.get("STAC_COMPOSITE"),
                "scl_mask": json.loads(tags.get("STAC_SCL_MASK", "[]")),
                "item_ids": json.loads(tags.get("STAC_ITEM_IDS", "[]")),
                "item_datetimes": json.loads(tags.get("STAC_ITEM_DATETIMES", "[]")),
                "item_offsets": json.loads(tags.get("STAC_ITEM_OFFSETS", "[]")),
                "file": str(path),
            },
        }
    )
    return prepared


# ----------------------------------------------------------------------------------------------
# inference
# ----------------------------------------------------------------------------------------------

_BATCH_KEYS = ("image", "wavelengths", "valid", "empty", "tile_offsets", "tiled_size")
_INFER_LOCK = threading.Lock()


def _embed(
    prepared: Sequence[_Prepared], cfg: _Config, backend: str, *, warn_coverage: bool = True
) -> list[Embedding]:
    """Batched inference through ``DOFAEmbedder.predict_step`` (the embed job's step).

    Inputs without any valid pixel get NaN embeddings (``meta["empty"]``); ``warn_coverage``
    issues one warning for all of them and one for those with a low valid fraction
    (:func:`_warn_coverage`; callers that embed in chunks warn once themselves).
    """
    module = _module(cfg.variant, cfg.weights, cfg.device)
    batch_size = infer_batch_size(cfg.device)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, item in enumerate(prepared):
        s = item.sample
        # tiles of inputs of one size only: the tile count alone gave one batch to inputs
        # of other sizes, whose stitched grids could not be stacked
        size = tuple(s["tiled_size"].tolist()) if "tiled_size" in s else None
        key = (tuple(s["image"].shape), tuple(s["wavelengths"].tolist()), size)
        groups.setdefault(key, []).append(i)
    results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(prepared)
    with _INFER_LOCK, torch.inference_mode():
        module.encoder.pooled_norm = cfg.pooled_norm
        for (shape, _, _), indices in groups.items():
            tiles = shape[0] if len(shape) == 4 else 1
            per_batch = max(1, batch_size // tiles)
            for start in range(0, len(indices), per_batch):
                chunk = indices[start : start + per_batch]
                batch = stack_dofa_samples(
                    {k: prepared[i].sample[k] for k in _BATCH_KEYS if k in prepared[i].sample}
                    for i in chunk
                )
                batch = {k: v.to(cfg.device) for k, v in batch.items()}
                out = module.predict_step(batch, 0)
                pooled, grid = out["pooled"].numpy(), out["grid"].numpy()
                for j, i in enumerate(chunk):
                    results[i] = (pooled[j], grid[j])
    embeddings = []
    for item, result in zip(prepared, results, strict=True):
        assert result is not None
        pooled, grid = result
        data = pooled if cfg.output.mode == "pooled" else grid
        meta = {
            "model": "dofa",
            "backend": backend,
            "variant": module.encoder.variant,
            "weights": module.encoder.weights_id,
            "pooled_norm": cfg.pooled_norm,
            "embed_dim": module.encoder.embed_dim,
            "device": cfg.device,
            "output": cfg.output.mode,
            **item.meta,
        }
        if cfg.output.mode == "grid":
            meta["grid_shape"] = list(grid.shape)
            meta["patch_size"] = module.encoder.config.patch_size
        else:
            meta.pop("grid_transform", None)
        array = np.ascontiguousarray(data, dtype=np.float32)
        if item.meta.get("empty"):
            array = np.full_like(array, np.nan)  # no valid pixel: nothing to describe
        embeddings.append(Embedding(array, meta))
    if warn_coverage:
        _warn_coverage(embeddings, len(embeddings))
    return embeddings


def _is_sparse(embedding: Embedding) -> bool:
    """Some valid pixels, but fewer than :data:`LOW_VALID_FRACTION` of the input."""
    fraction = float(embedding.meta.get("valid_fraction", 1.0))
    return not embedding.meta.get("empty") and fraction < LOW_VALID_FRACTION


def _is_narrow(embedding: Embedding) -> bool:
    """An input narrower than one DOFA patch (:data:`MIN_CHIP_PX`) on either side."""
    height, width = embedding.meta.get("input_size_hw", (MIN_CHIP_PX, MIN_CHIP_PX))
    return not embedding.meta.get("empty") and min(int(height), int(width)) < MIN_CHIP_PX


def _input_label(embedding: Embedding) -> str:
    meta = embedding.meta
    if "index" in meta:
        return f"input_chws[{meta['index']}]"
    spatial = meta.get("spatial")
    if spatial is not None and meta.get("backend") != "tensor":
        return spatial if len(spatial) <= 100 else spatial[:97] + "..."
    return str(meta.get("source"))


def _warn_coverage(embeddings: Sequence[Embedding], total: int) -> None:
    """The warnings of a call: inputs without a valid pixel, mostly of fill, or tiny."""
    _warn_empty([e for e in embeddings if e.meta.get("empty")], total)
    _warn_narrow([e for e in embeddings if _is_narrow(e)], total)
    sparse = [e for e in embeddings if _is_sparse(e)]
    if not sparse:
        return
    shown = _first_few(
        [f"{_input_label(e)}: valid_fraction {float(e.meta['valid_fraction']):.4g}" for e in sparse]
    )
    warn(
        f"{len(sparse)} of {total} input(s) have less than {LOW_VALID_FRACTION:.0%} valid "
        f"pixels ({shown}): the rest lies outside the rasters, is no data or masked, so the "
        "embedding mostly describes fill; move or shrink the region onto the data "
        "(meta['valid_fraction'] gives the fraction)",
        UserWarning,
    )


def _warn_narrow(narrow: Sequence[Embedding], total: int) -> None:
    """One warning for the inputs of a call narrower than one DOFA patch (a few pixels)."""
    if not narrow:
        return
    shown = _first_few(
        [
            f"{_input_label(e)}: {' x '.join(str(v) for v in e.meta['input_size_hw'])} px"
            for e in narrow
        ]
    )
    warn(
        f"{len(narrow)} of {total} input(s) are narrower than one {MIN_CHIP_PX}-px DOFA patch "
        f"({shown}; height x width): each fills the model's 224-px input with those few "
        "pixels (stretched, or repeated when tiled), so its embedding describes their "
        "values, not the place around them; give a larger region (a PointBuffer's buffer_m= "
        f"of {MIN_CHIP_PX // 2} pixels or more; meta['input_size_hw'] gives the size)",
        UserWarning,
    )


def _warn_empty(empty: Sequence[Embedding], total: int) -> None:
    """One warning for the embeddings of a call whose input held no valid pixel."""
    if not empty:
        return
    sources = sorted({str(e.meta.get("source")) for e in empty})
    shown = ", ".join(sources[:3]) + (f" and {len(sources) - 3} more" if len(sources) > 3 else "")
    warn(
        f"{len(empty)} of {total} input(s) hold no valid pixel (every pixel NaN, "
        "a nodata / fill value, or at or below -1000): their embeddings are NaN and "
        f"meta['empty'] is True (inputs: {shown})",
        UserWarning,
    )


def _parallel[T, R](fn: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        # each item in its own copy of the caller's context (a context runs in one thread at
        # a time): its warnings are said once per call, reworded as the caller's
        contexts = [contextvars.copy_context() for _ in items]
        return list(pool.map(lambda ctx, item: ctx.run(fn, item), contexts, items))


#: The fill-value hints of a :class:`~torchgeo_dofa.transforms.ReflectanceError`: the
#: ``nodata=`` they name is the transforms' and the data module's, and get_embedding's for
#: ``input_chw`` (the ``tensor`` backend) only.
_NODATA_HINT = re.compile(r"pass nodata=<(?P<value>[^>]*)>")
_FILL_SENTENCE = re.compile(r"If these are fill pixels, pass nodata=<[^>]*>\.")
_FILL_CLAUSE = re.compile(r"; pass nodata=<[^>]*> for another fill value\.")


#: Why get_embedding's ``nodata=`` (``input_chw``'s) is refused with another backend, and
#: where that backend's no-data value is declared.
_NODATA_ELSEWHERE: dict[str, str] = {
    "local": (
        "nodata= is the no-data value of input_chw (backend='tensor'); local files declare "
        "theirs: give paths=Sentinel2SR(FILES, nodata={nodata}) (or the dataset class of your "
        "files), or set the files' own (gdal_edit.py -a_nodata {nodata} FILE)"
    ),
    "gee": (
        "nodata= is the no-data value of input_chw (backend='tensor'); the gee backend masks "
        "the pixels Earth Engine marks missing itself: leave out nodata="
    ),
    "stac": (
        "nodata= is the no-data value of input_chw (backend='tensor'); the stac backend takes "
        "each asset's own no-data value and masks it itself: leave out nodata="
    ),
}


def _dataset_hints(message: str, dataset: type[Sentinel2Base]) -> str:
    """``message`` with its hints of a dataset's arguments named as the API takes them.

    ``(offset=0)`` and ``(nodata=<value>)`` are the dataset's arguments, which get_embedding
    does not take: they name ``paths=<dataset class>(FILES, ...)``.
    """
    name = dataset.__name__
    message = message.replace("(offset=0)", f"(paths={name}(FILES, offset=0))")
    return re.sub(r"\(nodata=<([^>]*)>\)", rf"(paths={name}(FILES, nodata=<\1>))", message)


def _fill_value_hint(
    err: ReflectanceError, backend: str, dataset: type[Sentinel2Base] = Sentinel2SR
) -> ReflectanceError:
    """``err`` with its fill-value hint naming what declares a fill value for ``backend``.

    get_embedding's ``nodata=`` is the no-data value of ``input_chw``: files read by the
    ``local`` backend take theirs from the dataset (``paths=Sentinel2SR(..., nodata=...)``)
    or from their own nodata tag, and the ``gee`` and ``stac`` backends leave out the pixels
    they mask themselves (their nodata is nobody's to set). The ``tensor`` backend's hint is
    right as it is.

    Args:
        err: the error of the DOFA stack
            (:func:`~torchgeo_dofa.transforms.check_reflectance_range`).
        backend: ``"tensor"``, ``"local"``, ``"gee"`` or ``"stac"``.
        dataset: the local backend's dataset class, named in the hint.

    Returns:
        A new error with the hint rewritten, or ``err`` itself where nothing changes.
    """
    message = str(err)
    if backend == "local":
        message = _dataset_hints(message, dataset)
        told = _NODATA_HINT.sub(
            lambda m: (
                f"give paths={dataset.__name__}(FILES, nodata=<{m['value']}>) or set the "
                f"files' own nodata (gdal_edit.py -a_nodata <{m['value']}> FILE; "
                "get_embedding's nodata= is input_chw's only)"
            ),
            message,
        )
    elif backend in ("gee", "stac"):
        told = _FILL_SENTENCE.sub(
            f"The {backend} backend leaves out the pixels it masks itself: these are "
            "pixels it served.",
            message,
        )
        told = _FILL_CLAUSE.sub(".", told)
    else:
        return err
    return err if told == message else ReflectanceError(told)


def _fetch_many(
    spatials: Sequence[Region],
    temporal: TemporalSpec | None,
    sensor: SensorSpec | None,
    cfg: _Config,
    backend: str,
    paths: PathsLike | None,
    project: str | None,
    dataset: Sentinel2Base | None = None,
    stac_source: _StacSource | None = None,
) -> list[_Prepared]:
    """Fetch and preprocess ROIs: Earth Engine in parallel, local files one after another."""
    if backend == "local":
        items = [paths] if isinstance(paths, str | os.PathLike) else paths
        if isinstance(items, list | tuple) and dataset is None:
            blank = [p for p in items if isinstance(p, str | os.PathLike) and not str(p).strip()]
            if blank or not items:
                got = "an empty list" if not items else f"{str(blank[0])!r}"
                raise ModelError(
                    "backend='local' needs paths=... (GeoTIFF/JP2 files, folders, or a "
                    f"dataset), got {got}: name the files or folders (an empty name is not "
                    "the current folder)"
                )
        if paths is None and dataset is None:
            raise ModelError(
                "backend='local' needs paths=... (GeoTIFF/JP2 files, folders, or a dataset)"
            )
        ds = dataset if dataset is not None else open_local(paths, sensor, temporal)  # type: ignore[arg-type]
        fill = sensor.fill_value if sensor is not None else 0.0
        try:
            return [_prepare_local(ds, s, temporal, cfg.input_prep, fill, sensor) for s in spatials]
        except ReflectanceError as err:
            raise _fill_value_hint(err, backend, type(ds)) from None
    if backend == "gee":
        eff = sensor or SensorSpec()
        for s in spatials:
            if s is None:
                raise ModelError("backend='gee' needs spatial=PointBuffer(...) or BBox(...)")
        try:
            return _parallel(
                lambda s: _prepare_gee(s, temporal, eff, cfg.input_prep, project),
                list(spatials),
                fetch_workers(),
            )
        except ReflectanceError as err:
            raise _fill_value_hint(err, backend) from None
    if backend == "stac":
        if stac_source is None:
            raise ModelError("backend='stac' needs stac_url=...")
        try:
            return [
                _prepare_stac(s, temporal, sensor, cfg.input_prep, stac_source) for s in spatials
            ]
        except ReflectanceError as err:
            raise _fill_value_hint(err, backend) from None
    raise ModelError(
        "backend='tensor' takes pixels, not regions: pass input_chw=... to get_embedding or "
        "input_chws=[...] to get_embeddings_batch_from_inputs"
    )


# ----------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------


@each_once_per_call  # a file's warning once per call, not once per region
def get_embedding(
    model: str,
    *,
    spatial: Region | None = None,
    temporal: TemporalSpec | None = None,
    sensor: SensorSpec | None = None,
    output: OutputSpec | str = OutputSpec.pooled(),  # noqa: B008 - frozen, immutable
    backend: str = "auto",
    device: str | torch.device | None = "auto",
    input_chw: np.ndarray | Tensor | None = None,
    variant: str | None = None,
    weights: str | os.PathLike[str] | None = _OFFICIAL,
    input_prep: str = _RESIZE,
    pooled_norm: str = _TRAINED,
    paths: PathsLike | None = None,
    nodata: float | None = None,
    model_config: dict[str, Any] | None = None,
    project: str | None = None,
    stac_url: str | os.PathLike[str] | None = None,
    collection: str | None = None,
) -> Embedding:
    """Embed one region (or one raw array) with DOFA.

    Args:
        model: ``"dofa"`` (any other name is an error).
        spatial: the region (``local``/``gee``): a :class:`PointBuffer`, a :class:`BBox` or a
            shapely geometry in EPSG:4326; recorded only for ``tensor``.
        temporal: date range; required for ``gee``, optional for ``local`` (None: every
            date, undated scenes included; a range is refused where a local scene without a
            date meets the region, as no range can select it), ignored for ``tensor``.
        sensor: bands (channel names for ``tensor``, bands to read for ``local``/``gee``),
            explicit wavelengths and fetch settings. Default for ``gee``: ``SensorSpec()``
            (DOFA's 9 bands from ``COPERNICUS/S2_SR_HARMONIZED``); for ``local``: the
            dataset's default bands; required for ``tensor``.
        output: ``OutputSpec.pooled()`` (default) or ``OutputSpec.grid()``.
        backend: ``"auto"``, ``"tensor"``, ``"local"``, ``"stac"`` (with ``stac_url=``) or
            ``"gee"`` (``"provider"`` is rs-embed's name for it; see the module docs).
        device: ``"auto"`` (CUDA, else Apple's MPS, else the CPU, as the CLI's
            ``--device auto``), ``"cpu"``, ``"cuda[:N]"``, ``"mps"``.
        input_chw: raw (C, H, W) surface reflectance 0..10000 (``tensor``); NaN and
            ``nodata`` pixels are missing data.
        variant: ``"base"`` (default) / ``"large"`` (or ``"b"`` / ``"l"``).
        weights: ``"official"`` (see :mod:`torchgeo_dofa.weights`), a checkpoint path, or None
            (random weights).
        input_prep: ``"resize"`` (pad to a square, resize to 224) or ``"tile"`` (224 tiles,
            grids stitched; grid output keeps the input's detail).
        pooled_norm: ``"trained"`` (rs-embed's convention, default) or ``"plain"``.
        paths: local rasters for ``backend="local"`` (files, folders or a dataset).
        nodata: no-data value of ``input_chw`` (``tensor`` only; refused with another
            backend: local files declare theirs, ``gee`` and ``stac`` mask their own).
        model_config: rs-embed style settings (``{"variant": "large"}``), merged with the
            keyword arguments.
        project: Earth Engine Cloud project (``gee``).
        stac_url: ``stac``: a STAC API URL, an item collection JSON or a static catalog.
        collection: ``stac``: the collection id (default ``sentinel-2-l2a``).

    Returns:
        The :class:`Embedding`. Warns (``UserWarning``) when its input held no valid pixel,
        valid pixels but fewer than :data:`LOW_VALID_FRACTION` of them, or is narrower than
        one DOFA patch (a ``PointBuffer`` of a pixel or two).

    Raises:
        ModelError: unknown model / variant (``""`` included) / output mode / backend, wrong
            ``input_chw`` rank, channel count different from ``sensor.bands``, missing inputs,
            a region whose chip exceeds :func:`max_pixels` (``local``, ``stac``; refused
            before reading), ``temporal`` over a ``local`` scene without a date, ``nodata``
            with a backend other than ``tensor``.
        BandError: wavelengths that cannot be inferred (or bands without DOFA statistics).
        ReflectanceError: input already scaled to [0, 1] (valid values all within [0, 2]),
            valid values all above :data:`~torchgeo_dofa.transforms.SATURATED_MIN`, or an
            ``input_chw`` whose valid values are all negative (a region's chip is not judged
            so: see :class:`~torchgeo_dofa.transforms.CheckReflectance`).
        LookupError: no data for the region and dates.
        CRSTransformError: ``local`` files whose CRS cannot be tied to longitude / latitude
            (a local / engineering CRS), naming the fixes.
        GEEUnavailableError: Earth Engine client missing, not authenticated or unreachable.
        StacUnavailableError: STAC extra missing, API or catalog unreachable (``stac``).
        StacError: an item lacks a band's asset or an asset cannot be read (``stac``).
    """
    cfg = _config(
        model,
        variant=variant,
        weights=weights,
        pooled_norm=pooled_norm,
        input_prep=input_prep,
        output=output,
        device=device,
        model_config=model_config,
    )
    if str(backend).strip().lower() == "auto" and stac_url is not None and input_chw is None:
        backend = "stac" if paths is None else backend
    which = _backend(backend, input_chw is not None, paths is not None)
    stac_source = _stac_source(which, stac_url, collection)
    _check_temporal(temporal)  # (ignored by the tensor backend, but not of any type)
    _warn_unused_sensor_fields(sensor, which)
    if which == "tensor":
        if input_chw is None:
            raise ModelError("backend='tensor' needs input_chw=<(C, H, W) array>")
        prepared = [_prepare_tensor(input_chw, sensor, cfg.input_prep, nodata)]
        if spatial is not None:  # labels for pixels fetched elsewhere, as rs-embed takes them
            prepared[0].meta["spatial"] = _spatial_key(spatial)
        if temporal is not None:
            prepared[0].meta["temporal"] = [temporal.start, temporal.end]
    else:
        if input_chw is not None:
            raise ModelError(
                f"input_chw is only used by backend='tensor' (got backend={backend!r})"
            )
        if spatial is None:
            raise ModelError(f"backend={which!r} needs spatial=PointBuffer(...) or BBox(...)")
        _check_region(spatial)
        if nodata is not None:  # it was ignored without a word
            raise ModelError(_NODATA_ELSEWHERE[which].format(nodata=nodata))
        prepared = _fetch_many(
            [spatial], temporal, sensor, cfg, which, paths, project, stac_source=stac_source
        )
        prepared[0].meta["spatial"] = _spatial_key(spatial)
    return _embed(prepared, cfg, which)[0]


@each_once_per_call  # a file's warning once per call, not once per region
def get_embeddings_batch_from_inputs(
    model: str,
    *,
    input_chws: Sequence[np.ndarray | Tensor],
    sensor: SensorSpec | None = None,
    output: OutputSpec | str = OutputSpec.pooled(),  # noqa: B008
    device: str | torch.device | None = "auto",
    variant: str | None = None,
    weights: str | os.PathLike[str] | None = _OFFICIAL,
    input_prep: str = _RESIZE,
    pooled_norm: str = _TRAINED,
    nodata: float | None = None,
    model_config: dict[str, Any] | None = None,
) -> list[Embedding]:
    """Embed many raw (C, H, W) arrays in batched forward passes.

    Inputs that share a preprocessed shape are stacked and run ``TORCHGEO_DOFA_BATCH_SIZE``
    images at a time (tiled inputs count their tiles); results equal one-by-one calls to
    float32's rounding (7e-7 measured: a batched matmul sums in another order).

    Args:
        model: ``"dofa"``.
        input_chws: raw reflectance arrays, channels named by ``sensor.bands``.
        sensor: band names (required) and optional wavelengths.
        output: pooled or grid.
        device: inference device.
        variant: ``base`` / ``large``.
        weights: ``"official"``, a path, or None.
        input_prep: ``"resize"`` or ``"tile"``.
        pooled_norm: ``"trained"`` or ``"plain"``.
        nodata: no-data value of the arrays.
        model_config: rs-embed style settings.

    Returns:
        One :class:`Embedding` per input, in order.
    """
    cfg = _config(
        model,
        variant=variant,
        weights=weights,
        pooled_norm=pooled_norm,
        input_prep=input_prep,
        output=output,
        device=device,
        model_config=model_config,
    )
    if isinstance(input_chws, np.ndarray | Tensor):
        raise ModelError(
            "input_chws must be a list of (C, H, W) arrays (for one array use get_embedding)"
        )
    _warn_unused_sensor_fields(sensor, "tensor")
    prepared = []
    for i, chw in enumerate(input_chws):
        name = f"input_chws[{i}]"  # in its warnings (an 8-bit dtype) and errors
        try:
            prepared.append(_prepare_tensor(chw, sensor, cfg.input_prep, nodata, name))
        except (ModelError, BandError, ReflectanceError) as err:
            text = str(err)
            raise type(err)(text if text.startswith(name) else f"{name}: {text}") from err
        prepared[-1].meta["index"] = i
    if not prepared:
        return []
    return _embed(prepared, cfg, "tensor")


@each_once_per_call  # a file's warning once per call, not once per region
def get_embeddings_batch(
    model: str,
    *,
    spatials: Sequence[Region],
    temporal: TemporalSpec | None = None,
    sensor: SensorSpec | None = None,
    output: OutputSpec | str = OutputSpec.pooled(),  # noqa: B008
    backend: str = "auto",
    device: str | torch.device | None = "auto",
    variant: str | None = None,
    weights: str | os.PathLike[str] | None = _OFFICIAL,
    input_prep: str = _RESIZE,
    pooled_norm: str = _TRAINED,
    paths: PathsLike | None = None,
    model_config: dict[str, Any] | None = None,
    project: str | None = None,
    stac_url: str | os.PathLike[str] | None = None,
    collection: str | None = None,
) -> list[Embedding]:
    """Embed many regions: fetched in parallel (Earth Engine), inferred in batches.

    Args:
        model: ``"dofa"``.
        spatials: the regions.
        temporal: date range (required for ``gee``; None = every date for ``local``).
        sensor: bands and fetch settings (see :func:`get_embedding`).
        output: pooled or grid.
        backend: ``"auto"`` (``local`` with ``paths``, ``stac`` with ``stac_url``, else
            ``gee``), ``"local"``, ``"stac"``, ``"gee"``.
        device: inference device.
        variant: ``base`` / ``large``.
        weights: ``"official"``, a path, or None.
        input_prep: ``"resize"`` or ``"tile"``.
        pooled_norm: ``"trained"`` or ``"plain"``.
        paths: local rasters (``local``).
        model_config: rs-embed style settings.
        project: Earth Engine Cloud project.
        stac_url: ``stac``: STAC API URL, item collection JSON or static catalog.
        collection: ``stac``: collection id (default ``sentinel-2-l2a``).

    Returns:
        One :class:`Embedding` per region, in order.
    """
    cfg = _config(
        model,
        variant=variant,
        weights=weights,
        pooled_norm=pooled_norm,
        input_prep=input_prep,
        output=output,
        device=device,
        model_config=model_config,
    )
    if str(backend).strip().lower() == "auto" and stac_url is not None and paths is None:
        backend = "stac"
    which = _backend(backend, False, paths is not None)
    stac_source = _stac_source(which, stac_url, collection)
    spatial_list = _region_list(spatials)
    _check_temporal(temporal)
    _warn_unused_sensor_fields(sensor, which)
    if not spatial_list:
        return []
    prepared = _fetch_many(
        spatial_list, temporal, sensor, cfg, which, paths, project, stac_source=stac_source
    )
    for spatial, item in zip(spatial_list, prepared, strict=True):
        item.meta["spatial"] = _spatial_key(spatial)
    return _embed(prepared, cfg, which)


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------


@dataclass
class ExportSummary:
    """What :func:`export_batch` did.

    Attributes:
        path: the GeoParquet file.
        rows: rows in the file.
        computed: (item, model) pairs embedded in this run.
        skipped: pairs already present (from an earlier, possibly interrupted, run).
        failed: ``{item_id/model:variant: error}`` for pairs that failed
            (``continue_on_error``); requests of one model and variant are numbered in
            ``models`` order (``a/dofa:base#2``).
    """

    path: Path
    rows: int = 0
    computed: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)


def _spatial_geometry(spatial: Region) -> Any:
    import shapely.geometry

    if isinstance(spatial, PointBuffer):
        return shapely.geometry.Point(spatial.lon, spatial.lat)
    if isinstance(spatial, BBox):
        return shapely.geometry.box(spatial.minlon, spatial.minlat, spatial.maxlon, spatial.maxlat)
    return spatial


def _spatial_key(spatial: Region) -> str:
    """A stable, complete text for a region (shapely's repr truncates long geometries)."""
    if isinstance(spatial, PointBuffer | BBox):
        return repr(spatial)
    return str(spatial.wkt)


def _digest(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _chunks[T](items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@each_once_per_call  # a file's warning once per call, not once per region
def export_batch(
    *,
    spatials: Sequence[Region],
    temporal: TemporalSpec | None = None,
    models: Sequence[ExportModelRequest | str] | ExportModelRequest | str,
    out_path: str | os.PathLike[str],
    backend: str = "auto",
    sensor: SensorSpec | None = None,
    output: OutputSpec | str = OutputSpec.pooled(),  # noqa: B008
    names: Sequence[str] | None = None,
    paths: PathsLike | None = None,
    device: str | torch.device | None = "auto",
    weights: str | os.PathLike[str] | None = _OFFICIAL,
    input_prep: str = _RESIZE,
    pooled_norm: str = _TRAINED,
    continue_on_error: bool = False,
    chunk_size: int = 256,
    project: str | None = None,
    stac_url: str | os.PathLike[str] | None = None,
    collection: str | None = None,
) -> ExportSummary:
    """Embed many regions with one or more DOFA configurations into one GeoParquet file.

    One row per (region, model request): ``item_id``, ``model``, ``variant``, ``weights``,
    ``pooled_norm``, ``input_prep``, ``backend``, ``output``, ``embedding`` (float32 list,
    a grid flattened in C order), ``embedding_shape``, ``bands``, ``wavelengths_um``,
    ``time_start`` / ``time_end`` (the requested ``temporal``'s dates at 00:00 UTC, its end
    exclusive as :class:`TemporalSpec`'s, as rs-embed's export records it: not the
    acquisition span that ``torchgeo-dofa embed``'s tables hold under these names; UTC
    timestamps of microseconds, NaT without ``temporal``, as ``embed``'s), ``buffer_m``,
    ``config_id``, and ``geometry`` in EPSG:4326
    (the point of a :class:`PointBuffer`, the box of a :class:`BBox`, or the geometry given);
    ``chip_bounds`` / ``chip_crs`` give the pixels actually read, ``valid_fraction`` the share
    of them holding data (``meta["valid_fraction"]``; NaN in rows an earlier version wrote),
    as ``embed``'s pooled table has it: filter the rows mostly fill on it.

    Resumable: the rows of each finished round (``chunk_size`` regions: a region that fails
    without ``continue_on_error`` stops its round before any of it is saved; ``chunk_size=1``
    saves every row as it is done) are saved under ``<out_path>.parts/`` and the final
    file is written atomically (temporary name, then rename), then the parts are removed. A
    rerun (same regions and settings) skips rows already in the parts or in an existing final
    file, and rewrites the file with old and new rows.

    Args:
        spatials: the regions.
        temporal: date range (required for ``gee``).
        models: ``ExportModelRequest.configure("dofa", variant=...)`` entries (or ``"dofa"``),
            or one of them.
        out_path: the ``.parquet`` file.
        backend: ``"auto"`` (``local`` with ``paths``, ``stac`` with ``stac_url``, else
            ``gee``), ``"local"``, ``"stac"``, ``"gee"``.
        sensor: default bands / fetch settings (a request's ``sensor`` wins).
        output: pooled (default) or grid.
        names: one id per region (default ``p00000``, ``p00001``...).
        paths: local rasters (``local``).
        device: inference device.
        weights: default weights (a request's ``weights`` wins).
        input_prep: default input preparation.
        pooled_norm: default pooled convention.
        continue_on_error: record a failing region in ``failed`` and go on (the rerun retries
            it) instead of raising; dates holding no scene, or a request's bands the local
            files lack, fail each of that request's regions.
        chunk_size: regions fetched and embedded per round (bounds memory).
        project: Earth Engine Cloud project.
        stac_url: ``stac``: STAC API URL, item collection JSON or static catalog.
        collection: ``stac``: collection id (default ``sentinel-2-l2a``).

    Returns:
        An :class:`ExportSummary`.

    Raises:
        ModelError: for bad arguments (before anything is fetched).
    """
    import geopandas as gpd
    import shapely

    spatial_list = _region_list(spatials)
    if not spatial_list:
        raise ModelError(f"spatials is empty: there is nothing to export to {str(out_path)!r}")
    _check_temporal(temporal)
    whole = isinstance(chunk_size, int | np.integer) and not isinstance(chunk_size, bool)
    if not whole or chunk_size < 1:
        raise ModelError(f"chunk_size={chunk_size!r}: give a whole number of regions >= 1")
    if names is None:
        ids = [f"p{i:05d}" for i in range(len(spatial_list))]
    else:
        ids = [str(n) for n in names]
        if len(ids) != len(spatial_list):
            raise ModelError(f"names has {len(ids)} entries for {len(spatial_list)} spatials")
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ModelError(
                f"names must be unique: {repeated} given more than once (names are compared "
                "as strings: 1 and '1' are one name)"
            )
    if isinstance(models, bytes):
        raise ModelError(f"models={models!r} is bytes: give 'dofa' or a list of models")
    if isinstance(models, str | ExportModelRequest):
        models = [models]  # one model (a plain string was read letter by letter)
    if not models:
        raise ModelError("models is empty: e.g. models=[ExportModelRequest.configure('dofa')]")
    requests = [m if isinstance(m, ExportModelRequest) else ExportModelRequest(m) for m in models]
    if str(backend).strip().lower() == "auto" and stac_url is not None and paths is None:
        backend = "stac"
    which = _backend(backend, False, paths is not None)
    stac_source = _stac_source(which, stac_url, collection)
    if which == "tensor":
        raise ModelError("export_batch reads regions: use backend='local', 'gee' or 'stac'")
    if which in ("gee", "stac") and temporal is None:
        raise ModelError(f"backend={which!r} needs temporal=TemporalSpec.range(...)")
    jobs: list[tuple[ExportModelRequest, _Config, SensorSpec | None, str]] = []
    for req in requests:
        conf = dict(req.model_config or {})
        cfg = _config(
            req.name,
            variant=None,
            weights=weights,
            pooled_norm=pooled_norm,
            input_prep=input_prep,
            output=output,
            device=device,
            model_config=conf,
            config_wins=True,  # a request's settings over the call's, as its sensor
        )
        eff_sensor = req.sensor or sensor
        config_id = _digest(
            cfg.variant,
            _weights_key(cfg.weights),
            cfg.pooled_norm,
            cfg.input_prep,
            cfg.output.mode,
            which,
            None if eff_sensor is None else eff_sensor.__dict__,
            None if temporal is None else [temporal.start, temporal.end],
            *([] if stac_source is None else [str(stac_source.url), stac_source.collection]),
        )
        if any(config_id == job[3] for job in jobs):
            raise ModelError(
                f"models lists the same model twice ({req.name!r} with the same settings and "
                "sensor): its rows would be computed once and the second counted as skipped; "
                "list it once"
            )
        jobs.append((req, cfg, eff_sensor, config_id))
        _warn_unused_sensor_fields(eff_sensor, which)

    if which == "local" and isinstance(paths, Sentinel2Base):  # every request, before any
        for _, _, eff_sensor, _ in jobs:  # is computed (a later one stopped the run midway)
            if eff_sensor is not None:
                _refuse_sensor_unlike(paths, eff_sensor)
    out = Path(out_path)
    _check_export_path(out)
    parts = out.with_name(out.name + ".parts")
    identity = _export_identity(which, paths, [(cfg, cid) for _, cfg, _, cid in jobs])
    with (
        folders_removed_if_left_empty(out.parent, parts),  # a refusal leaves nothing
        _export_lock(out),  # a second export into the folder is refused at once
    ):
        summary = ExportSummary(out)
        all_warned: list[Embedding] = []  # empty or mostly fill: one warning each at the end
        n_embedded = 0
        try:
            existing = gpd.read_parquet(out) if out.exists() else None
        except Exception as err:  # pyarrow's ArrowInvalid, geopandas' ValueError ...
            why = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise ModelError(
                f"out_path {out} exists but is not a GeoParquet table an export can add rows "
                f"to ({why}): give another out_path, or delete it"
            ) from None
        if existing is not None and "row_key" not in existing.columns:
            raise ModelError(
                f"out_path {out} is a GeoParquet table of another kind (no row_key column: "
                "an embed job's pooled table?): give another out_path"
            )
        _check_export_identity(out, existing, parts, identity)
        done: set[str] = set(existing["row_key"]) if existing is not None else set()
        parts.mkdir(parents=True, exist_ok=True)
        marker = parts / _EXPORT_IDENTITY  # written with the first part: a refusal leaves none
        readable = _readable_parts(parts)
        done |= {p.stem for p in readable}
        _refuse_renamed_regions(out, existing, readable, ids, spatial_list, jobs, names is None)
        dataset = None  # shared when no request overrides the sensor
        if which == "local" and paths is not None:
            with contextlib.suppress(NoSceneError):  # each job's items fail with it below
                dataset = open_local(paths, sensor, temporal)

        labels = [f"{req.name}:{cfg.variant}" for req, cfg, _, _ in jobs]
        for j, (req, cfg, eff_sensor, config_id) in enumerate(jobs):
            # two requests of one model and variant (other sensors, say) are told apart
            label = labels[j] if labels.count(labels[j]) == 1 else f"{labels[j]}#{j + 1}"
            keys = [
                _digest(item_id, _spatial_key(spatial), config_id)
                for item_id, spatial in zip(ids, spatial_list, strict=True)
            ]
            todo = [i for i, k in enumerate(keys) if k not in done]
            summary.skipped += len(keys) - len(todo)
            ds = dataset if req.sensor is None else None
            if which == "local" and ds is None:
                try:
                    ds = open_local(paths, eff_sensor, temporal)  # type: ignore[arg-type]
                except (NoSceneError, BandError) as err:  # no scene in the dates, or bands
                    # the files lack (this request's sensor): every item of the request fails
                    if not continue_on_error:
                        raise
                    for i in todo:
                        summary.failed[f"{ids[i]}/{label}"] = str(err)
                    continue
            workers = fetch_workers() if which == "gee" else 1
            for chunk in _chunks(todo, max(1, chunk_size)):

                def fetch(
                    i: int,
                    c: _Config = cfg,
                    sn: SensorSpec | None = eff_sensor,
                    d: Sentinel2Base | None = ds,
                ) -> Any:
                    try:
                        got = _fetch_many(
                            [spatial_list[i]],
                            temporal,
                            sn,
                            c,
                            which,
                            paths,
                            project,
                            d,
                            stac_source=stac_source,
                        )
                        return got[0]
                    except (GEEUnavailableError, StacUnavailableError):
                        raise
                    except (LookupError, RuntimeError, ValueError) as err:
                        if not continue_on_error:
                            raise
                        return err

                fetched = _parallel(fetch, list(chunk), workers)
                prepared: list[_Prepared] = []
                kept: list[int] = []
                for i, result in zip(chunk, fetched, strict=True):
                    if isinstance(result, _Prepared):
                        prepared.append(result)
                        kept.append(i)
                    else:
                        summary.failed[f"{ids[i]}/{label}"] = str(result)
                if not prepared:
                    continue
                embeddings = _embed(prepared, cfg, which, warn_coverage=False)
                all_warned += [
                    e for e in embeddings if e.meta.get("empty") or _is_sparse(e) or _is_narrow(e)
                ]
                n_embedded += len(embeddings)
                for i, emb in zip(kept, embeddings, strict=True):
                    spatial = spatial_list[i]
                    row = {
                        "row_key": keys[i],
                        "item_id": ids[i],
                        "model": req.name,
                        "variant": emb.meta["variant"],
                        "weights": emb.meta["weights"],
                        "pooled_norm": emb.meta["pooled_norm"],
                        "input_prep": emb.meta["input_prep"],
                        "backend": which,
                        "output": cfg.output.mode,
                        "config_id": config_id,
                        "bands": json.dumps(emb.meta["bands"]),
                        "wavelengths_um": json.dumps(emb.meta["wavelengths_um"]),
                        "time_start": None if temporal is None else temporal.start,
                        "time_end": None if temporal is None else temporal.end,
                        "buffer_m": spatial.buffer_m
                        if isinstance(spatial, PointBuffer)
                        else math.nan,
                        "chip_bounds": json.dumps(emb.meta.get("bounds")),
                        "chip_crs": emb.meta.get("crs", ""),
                        "valid_fraction": float(emb.meta["valid_fraction"]),
                        "geometry_wkb": shapely.to_wkb(_spatial_geometry(spatial)),
                    }
                    if not marker.exists():
                        atomic_write(marker, lambda p: p.write_text(json.dumps(identity)))
                    atomic_write(
                        parts / f"{keys[i]}.npz",
                        lambda p, e=emb, r=row: _save_part(p, e.data, r),  # type: ignore[misc]
                    )
                    done.add(keys[i])
                    summary.computed += 1

        rows = [_load_part(p) for p in sorted(parts.glob("*.npz"))]
        frames = []
        if existing is not None:
            existing = existing[~existing["row_key"].isin({r["row_key"] for r in rows})]
            frames.append(existing)
        if rows:
            frames.append(
                gpd.GeoDataFrame(
                    [{k: v for k, v in r.items() if k != "geometry_wkb"} for r in rows],
                    geometry=[shapely.from_wkb(r["geometry_wkb"]) for r in rows],
                    crs="EPSG:4326",
                )
            )
        if rows:
            frame = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs="EPSG:4326")
            for column in ("time_start", "time_end"):  # timestamps, temporal= given or not
                frame[column] = utc_us(frame[column])
            order = {k: n for n, k in enumerate(ids)}
            frame["_order"] = frame["item_id"].map(order).fillna(len(order))
            frame = frame.sort_values(["_order", "config_id"], kind="stable")
            frame = frame.drop(columns="_order").reset_index(drop=True)
            stored = {} if existing is None else _stored_identity(existing.attrs)
            merged = {**identity, "weights": {**stored.get("weights", {}), **identity["weights"]}}
            frame.attrs[_EXPORT_IDENTITY] = json.dumps(merged, sort_keys=True)
            atomic_write(out, frame.to_parquet)
            summary.rows = len(frame)
        elif existing is not None:
            summary.rows = len(existing)
        shutil.rmtree(parts, ignore_errors=True)
        _warn_coverage(all_warned, n_embedded)
        return summary


#: Where an export records what its rows depend on beyond their keys: in its parts folder
#: and in the final table's attributes (``gpd.read_parquet(out).attrs``).
_EXPORT_IDENTITY = "export_identity"


def _export_identity(
    backend: str,
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Sentinel2Base | None,
    configs: Sequence[tuple[_Config, str]],
) -> dict[str, Any]:
    """What an export's rows depend on beyond their keys (region, dates, settings).

    The local rasters as files (resolved path, size, modification time: a file rewritten in
    place is another input, as the embed job's manifest has it) and, per configuration
    (``config_id``), the weights file's (a checkpoint replaced under the same name is
    other weights); the row keys hold everything else.
    """
    from .jobs import InputFile

    def described(path: Path) -> list[Any]:
        return list(dataclasses.astuple(InputFile.of(path)))

    files: list[list[Any]] = []
    if backend == "local" and isinstance(paths, Sentinel2Base):  # a dataset: its files
        read = {src for sources in paths.index["sources"] for src, _ in sources}
        files = [described(Path(p)) for p in read if Path(p).exists()]
    elif backend == "local" and paths is not None:
        given = [paths] if isinstance(paths, str | os.PathLike) else list(cast(Any, paths))
        for item in map(Path, given):
            found = sorted(p for p in item.rglob("*") if p.is_file()) if item.is_dir() else [item]
            suffixes = Sentinel2Base.extensions
            files += [described(p) for p in found if p.suffix.lower() in suffixes and p.exists()]
    weights = {
        cid: described(Path(cfg.weights).expanduser())
        for cfg, cid in configs
        if cfg.weights is not None
        and str(cfg.weights) != "official"
        and Path(cfg.weights).expanduser().is_file()
    }
    return {"backend": backend, "inputs": sorted(files), "weights": weights}


def _stored_identity(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The identity a table recorded (empty for a table of an earlier version)."""
    try:
        stored = json.loads(attrs.get(_EXPORT_IDENTITY, "{}"))
    except (TypeError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def _check_export_identity(
    out: Path, existing: Any, parts: Path, identity: Mapping[str, Any]
) -> None:
    """Refuse to add rows to an export whose rows came from other inputs or weights.

    Raises:
        ModelError: naming what changed and the fix (another ``out_path``, or delete the
            file and its parts to start afresh).
    """
    recorded: list[tuple[str, dict[str, Any]]] = []
    if existing is not None:
        recorded.append((str(out), _stored_identity(existing.attrs)))
    marker = parts / _EXPORT_IDENTITY
    if marker.is_file() and any(parts.glob("*.npz")):
        try:
            recorded.append((str(parts), json.loads(marker.read_text())))
        except (OSError, ValueError):
            recorded.append((str(parts), {"inputs": "unreadable"}))
    for where, stored in recorded:
        change = None
        if "inputs" in stored and stored["inputs"] != identity["inputs"]:
            before = (
                {tuple(f) for f in stored["inputs"]}
                if isinstance(stored["inputs"], list)
                else set()
            )
            after = {tuple(f) for f in identity["inputs"]}
            differ = sorted({f[0] for f in before ^ after})
            shown = ", ".join(os.path.basename(str(f)) for f in differ[:3]) or "unreadable"
            change = f"the local inputs differ ({shown}: added, removed or changed since)"
        elif "backend" in stored and stored["backend"] != identity["backend"]:
            change = f"backend was {stored['backend']!r}, now {identity['backend']!r}"
        else:
            for cid, now in identity["weights"].items():
                was = stored.get("weights", {}).get(cid)
                if was is not None and was != now:
                    change = f"the weights file {os.path.basename(now[0])} changed since"
                    break
        if change is not None:
            raise ModelError(
                f"{where} holds rows of another export: {change}; rows of both would be "
                f"mixed in one table. Give another out_path, or delete {out.name} and "
                f"{parts.name} to start afresh"
            )


@contextlib.contextmanager
def _export_lock(out: Path) -> Iterator[None]:
    """Hold the output folder's lock (the embed job's) while an export writes there.

    Raises:
        JobLockedError: when another export or embed job holds it.
    """
    from .locks import OutputLock

    lock = OutputLock(out.parent, fix="use another out_path folder")
    try:  # (taken inside: a Ctrl-C the instant it is taken is given back here too)
        lock.acquire()
        yield
    finally:  # the lock file goes too (held while removed: a waiting job takes a new one)
        lock.release(remove=True)


def _save_part(path: Path, data: np.ndarray, row: dict[str, Any]) -> None:
    meta = {k: v for k, v in row.items() if k != "geometry_wkb"}
    with open(path, "wb") as f:
        np.savez(
            f,
            embedding=np.asarray(data, np.float32),
            geometry_wkb=np.frombuffer(row["geometry_wkb"], dtype=np.uint8),
            meta=np.array(json.dumps(meta)),
        )


def _check_export_path(out: Path) -> None:
    """Refuse an ``out_path`` that cannot be the export's table, before anything is read.

    Raises:
        ModelError: for a name without ``.parquet`` / ``.geoparquet`` (the file is GeoParquet
            whatever its name: ``x.csv`` was written as one), a folder or a device.
    """
    if out.is_dir():
        raise ModelError(f"out_path {out} is a folder: give a .parquet file name")
    if out.suffix.lower() not in TABLE_SUFFIXES:
        given = f"{out.suffix} files" if out.suffix else "a name without a suffix"
        raise ModelError(
            f"out_path {out}: export_batch writes a GeoParquet table, not {given}: name it "
            f"{out.stem or out.name}.parquet"
        )
    if out.exists() and not out.is_file():  # a folder was refused above
        raise ModelError(
            f"out_path {out} is not a file (a device or pipe): give a .parquet file name"
        )


def _refuse_renamed_regions(
    out: Path,
    existing: Any,
    parts: Mapping[Path, tuple[str, str]],
    ids: Sequence[str],
    spatials: Sequence[Any],
    jobs: Sequence[tuple[Any, _Config, Any, str]],
    by_position: bool,
) -> None:
    """Refuse an export whose ``item_id`` names another region than the rows already saved.

    Rows are keyed by (item_id, region, settings): a rerun naming a region by an id the
    table holds for another region (the default ids ``p00000`` ... go by position, so the
    same regions in another order do) added a second row under that id, with no word.

    Raises:
        ModelError: naming the id, both regions and the fix, before anything is computed.
    """
    stored: dict[tuple[str, str], str] = {}  # (item_id, config_id) -> row_key
    if existing is not None and {"item_id", "config_id"} <= set(existing.columns):
        for item, config, key in zip(
            existing["item_id"], existing["config_id"], existing["row_key"], strict=True
        ):
            stored[(str(item), str(config))] = str(key)
    for path, item_and_config in parts.items():  # as _readable_parts read them
        stored[item_and_config] = path.stem
    if not stored:
        return
    for *_, config_id in jobs:
        for item, spatial in zip(ids, spatials, strict=True):
            key = stored.get((item, config_id))
            if key is not None and key != _digest(item, _spatial_key(spatial), config_id):
                how = (
                    "the default ids go by position (p00000 is the first region), so the "
                    "same regions in another order, or others, rename them: give names= "
                    "(one id per region)"
                    if by_position
                    else "give each region its own id in names="
                )
                raise ModelError(
                    f"{out} holds a row for item_id {item!r} of another region than "
                    f"{_region_label(spatial)}: {how}, or write to another out_path"
                )


def _readable_parts(parts: Path) -> dict[Path, tuple[str, str]]:
    """The parts of an interrupted export that load, each with its (item_id, config_id).

    Each damaged one is removed, with a warning, so the rerun computes its row again (a
    truncated part blocked every rerun with ``BadZipFile``).
    """
    good: dict[Path, tuple[str, str]] = {}
    for path in sorted(parts.glob("*.npz")):
        try:
            row = _load_part(path)
        except Exception as err:  # numpy's, zipfile's and json's errors alike
            why = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            warn(
                f"part {path} was unreadable ({why}) and is removed: this run computes its "
                "row again",
                UserWarning,
            )
            path.unlink(missing_ok=True)
            continue
        good[path] = (str(row.get("item_id")), str(row.get("config_id")))
    return good


def _load_part(path: Path) -> dict[str, Any]:
    with np.load(path) as part:
        row: dict[str, Any] = json.loads(str(part["meta"]))
        data = part["embedding"]
        row["embedding"] = data.ravel().astype(np.float32)
        row["embedding_shape"] = list(data.shape)
        row["geometry_wkb"] = part["geometry_wkb"].tobytes()
    return row
