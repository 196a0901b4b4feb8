"""Sentinel-2 surface reflectance as TorchGeo datasets, ready for DOFA.

Two :class:`~torchgeo.datasets.RasterDataset` subclasses read the files users actually have:

* :class:`Sentinel2SR`: GeoTIFFs / JPEG2000 made locally, either one multi-band file per scene
  (band names from the band descriptions, or given with ``bands=``) or one file per band in
  ESA's naming (``T31UFQ_20220614T103629_B04_10m.tif``, also inside a ``.SAFE`` tree and
  BigEarthNet's ``..._B04.tif``); coarser bands (20 m, 60 m) are read onto the finest grid.
* :class:`EarthEngineS2`: GeoTIFFs exported from Google Earth Engine
  (``COPERNICUS/S2_SR_HARMONIZED``): band names from the band descriptions, non-spectral bands
  (``VV``, ``temperature_2m``, ``elevation``, ``QA60``...) and ``_1``-suffixed copies of
  multi-date stacks skipped unless asked for, and the tiles of a large export
  (``<prefix>-0000000000-0000000000.tif``, ``<prefix>-0000000000-0000023296.tif``, ...) read as
  one mosaic.

Both use TorchGeo 0.10's slice indexing (``ds[xmin:xmax, ymin:ymax, tmin:tmax]``) and work with
its samplers (:class:`~torchgeo.samplers.RandomPatchSampler`,
:class:`~torchgeo.samplers.GriddedPatchSampler` and the older ``RandomGeoSampler`` /
``GridGeoSampler``). Every sample holds tensors only, so
:func:`~torchgeo.datasets.stack_samples` collates it:

=========== =================== =========================================================
key         shape / dtype        meaning
=========== =================== =========================================================
image       (C, H, W) float32    surface reflectance x 10000 (offset removed); fill value
                                 (0) where ``valid`` is False
wavelengths (C,) float32         centre wavelength of each channel, micrometres
valid       (H, W) bool          True where every channel holds a real measurement
bounds      (9,) float64         TorchGeo's ``[x.start, x.stop, x.step, y..., t...]``
transform   (9,) float64         affine of the chip's pixel grid (``Affine`` order)
=========== =================== =========================================================

With ``time_series=True`` the image is (T, C, H, W) and ``valid`` (T, H, W).

Radiometric offset (processing baseline 04.00, from 2022-01-25): ESA's L2A products store
``reflectance x 10000 + 1000`` and declare ``BOA_ADD_OFFSET = -1000`` in ``MTD_MSIL2A.xml``
(L1C: ``RADIO_ADD_OFFSET``). The datasets add the offset to the digital numbers, so the
model always sees reflectance x 10000. ``offset="auto"`` (the default) looks, in order, for
the product metadata (``MTD_MSIL2A.xml`` / ``MTD_MSIL1C.xml`` in the file's folder or up to
four folders above it, or ``<file stem>_MTD.xml`` beside it; of the scene's date, and with a
product footprint meeting the file: another product's is skipped with a warning), then the
file's own GDAL scale / offset or ``BOA_ADD_OFFSET`` metadata item, then a processing
baseline in an ESA product name (``_N0400_``), then the acquisition date of an ESA-named
file (on or after 2022-01-25: -1000); files named otherwise are taken as already corrected
(offset 0). Earth Engine's harmonized collections already removed the offset (0). A number
applies to every file. ``ds.index`` records each scene's ``offset`` and ``offset_source``.

No-data: a pixel is invalid (``valid`` False, image set to the fill value 0) where any channel
holds the file's declared nodata value or an explicit ``nodata=`` (when neither exists: the
conventional fills -9999, -32768 and 65535), 0 (Sentinel-2's no-data value; files often leave
it undeclared), NaN, or, after the offset, a value at or below -1000
(:data:`torchgeo_dofa.transforms.NODATA_FLOOR`: the darkest real pixel of baseline 04.00 is DN
1 -> -999, so dark pixels between -999 and 0 stay valid), and wherever the chip reaches past
the raster. Offsets apply only to valid pixels, so no-data never becomes a reflectance of -1000.

Item folders (Earth Search / STAC downloads such as ``S2B_52SFA_20220126_0_L2A/B04.tif`` or
``.../red.tif``, asset names from :data:`torchgeo_dofa.bands.STAC_ASSET_BANDS`) are scenes
named by their folder. A scene's time comes from a STAC item JSON beside its files
(``properties.datetime``), else the first date in its file name or item prefix, else its
folder's name. With ``offset="auto"`` such an item JSON is the first source of the offset:
``earthsearch:boa_offset_applied: true`` -> 0, else a processing baseline
(``s2:processing_baseline`` / ``processing:version``) >= 04.00 -> -1000, else its date; an
Earth Search item name without its JSON falls back to the date rule, with one warning.

Composition: ``ds1 & ds2`` gives a :class:`DOFAIntersectionDataset` (channels and wavelengths
stacked, ``valid`` the AND of the members'), ``ds1 | ds2`` a :class:`DOFAUnionDataset` (same
bands in the same order required; first member's valid pixel wins).

Where several scenes overlap a chip they are mosaicked, the first scene (sorted by path) that
has a valid pixel wins; index with a time slice to pick one date.

Mixed band sets: DOFA takes one wavelength vector per forward pass, so every sample of a batch
must share it. :func:`stack_dofa_samples` collates and says so clearly when they differ;
:class:`BandSetBatchSampler` (with :class:`DatasetCollection` or a ``ConcatDataset``) builds
batches from one band set at a time.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import pathlib
import random
import re
import threading
import warnings
import weakref
import xml.etree.ElementTree as ET
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence, Sized
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from datetime import time as time_of_day
from typing import Any, ClassVar, Literal, NamedTuple, cast

import numpy as np
import numpy.typing as npt
import pandas as pd
import rasterio
import rasterio.merge
import shapely
import torch
from geopandas import GeoDataFrame
from pyproj import CRS
from pyproj.exceptions import CRSError
from rasterio._err import CPLE_BaseError  # GDAL's errors (no public name in rasterio 1.4)
from rasterio.crs import CRS as RIO_CRS
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.io import DatasetReader
from rasterio.transform import Affine, array_bounds
from rasterio.vrt import WarpedVRT
from rasterio.warp import calculate_default_transform, transform_bounds
from rasterio.windows import Window
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset, Sampler, default_collate
from torchgeo.datasets import (
    GeoDataset,
    IntersectionDataset,
    NonGeoClassificationDataset,
    RasterDataset,
    UnionDataset,
    VectorDataset,
)
from torchgeo.datasets.errors import DatasetNotFoundError
from torchgeo.datasets.utils import GeoSlice, Path, Sample, disambiguate_timestamp

from torchgeo_dofa._warnings import warn
from torchgeo_dofa.bands import (
    DOFA_S2_BANDS,
    SENTINEL2_BANDS,
    STAC_ANCILLARY_ASSETS,
    STAC_ASSET_BANDS,
    WAVELENGTH_HINT,
    BandError,
    band_words,
    canonical_band,
    check_unique_bands,
    date_copy_base,
    is_known_band,
    offset_problem,
    refuse_one_string,
    resolve_wavelengths,
    same_band_names,
    split_date_copy,
    stac_asset_band,
)
from torchgeo_dofa.locks import missing_input_problem, refuse_undecodable_name
from torchgeo_dofa.runtime import gdal_env, open_file_limit
from torchgeo_dofa.spatial import (
    CRSTransformError,
    crs_label,
    crs_name,
    exact_epsg,
    outside_area_of_use,
    require_datum_grids,
    same_crs,
    transformer,
    utm_epsg,
)
from torchgeo_dofa.transforms import (
    CONVENTIONAL_FILLS,
    NODATA_FLOOR,
    DOFAPreprocess,
    ReflectanceError,
    ReflectanceWarning,
    narrow_dtype_problem,
)

__all__ = [
    "EE_TILE_PATTERN",
    "BandSetBatchSampler",
    "ChipFolder",
    "DOFAIntersectionDataset",
    "DOFAUnionDataset",
    "DatasetCollection",
    "EarthEngineS2",
    "InputError",
    "MixedBandSetError",
    "NoOverlapError",
    "NoRasterFoundError",
    "NoSceneError",
    "ProductMetadata",
    "RasterInput",
    "Sentinel2Base",
    "Sentinel2SR",
    "StacItemInfo",
    "UndatedScenesError",
    "UnusedFileBandsError",
    "band_set_key",
    "band_words",
    "cached_files_limit",
    "chip_loader",
    "concat_dofa_samples",
    "find_raster_inputs",
    "label_fill_problem",
    "merge_dofa_samples",
    "no_scene_within",
    "read_product_metadata",
    "read_stac_item",
    "refuse_repeated_bands",
    "stack_dofa_samples",
    "time_slice",
    "undated_scenes_problem",
    "unique_region_names",
]

#: Files a dataset keeps open at most, the least recently read closed first (TorchGeo's own
#: cache of warped files holds 128); an eighth of the open-file limit where that is lower
#: (:func:`cached_files_limit`): a folder of 150 files held 150 open and failed with "Too
#: many open files" under ``ulimit -n 127``, whatever the loader workers.
MAX_CACHED_FILES = 128


def cached_files_limit() -> int:
    """How many files a dataset keeps open now (see :data:`MAX_CACHED_FILES`).

    Returns:
        ``min(MAX_CACHED_FILES, ulimit -n // 8)``, at least 1 (a file and its warped view
        take two to three descriptors, and GDAL, PyTorch and the outputs need their own).
    """
    limit = open_file_limit()
    return MAX_CACHED_FILES if limit is None else max(1, min(MAX_CACHED_FILES, limit // 8))


#: First acquisition date processed with baseline 04.00 (reflectance stored with +1000).
OFFSET_START = date(2022, 1, 25)

#: The offset ESA declares for baseline 04.00 and later.
BASELINE_OFFSET = -1000.0

#: GDAL scale of reflectance stored as reflectance x 10000 (ESA's ``QUANTIFICATION_VALUE``).
REFLECTANCE_SCALE = 1e-4

_DATE_FORMATS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^\d{8}T\d{6}$"), "%Y%m%dT%H%M%S"),
    (re.compile(r"^\d{8}$"), "%Y%m%d"),
    (re.compile(r"^\d{4}-\d{2}-\d{2}$"), "%Y-%m-%d"),
)
#: A date in a name, as :attr:`Sentinel2Base.filename_regex` finds the first one.
_DATE_TOKEN = re.compile(r"(?<![0-9])(\d{8}T\d{6}|\d{8}|\d{4}-\d{2}-\d{2})(?![0-9])")
_ESA_NAME = re.compile(
    r"(?:^|_)(?:T\d{2}[A-Z]{3}_(?P<tdate>\d{8})T\d{6}|S2[A-D]_MSI(?:L1C|L2A)_(?P<pdate>\d{8})T\d{6})"
)
_BASELINE = re.compile(r"^S2[A-D]_MSI(?:L1C|L2A)_\d{8}T\d{6}_N(?P<baseline>\d{4})(?:_|\.|$)")
_RES_DIR = re.compile(r"^R\d{2,3}m$")
#: Earth Search item ids (``S2B_52SFA_20220126_0_L2A``): satellite, MGRS tile, date, sequence.
_EARTH_SEARCH_ID = re.compile(
    r"(?:^|_)(?P<id>S2[A-D]_\d{1,2}[A-Z]{3}_(?P<date>\d{8})_\d+_L(?:1C|2A))(?:_|$)"
)
#: A name for a band not to read, by its position (``band4``): what a band without a
#: description is called, and what ``file_bands=`` may call one.
_PLACEHOLDER = re.compile(r"band\d+", re.IGNORECASE)
_ASSET_ALTERNATIVES = "|".join(sorted(STAC_ASSET_BANDS, key=len, reverse=True))
_ANCILLARY_ALTERNATIVES = "|".join(sorted(STAC_ANCILLARY_ASSETS, key=len, reverse=True))

#: ESA's names of the Sentinel-2 L1C / L2A products that are no reflectance band (scene
#: classification, aerosol optical thickness, water vapour, the true-colour preview, cloud /
#: snow probabilities, the quality bands): the files :attr:`Sentinel2Base.ancillary_regex`
#: skips, and the band names :data:`S2_PRODUCT_NAMES` refuses, share them.
_S2_PRODUCTS = r"SCL|AOT|WVP|TCI|CLD|SNW|CLDPRB|SNWPRB|PVI|QA\d*"

#: The Sentinel-2 products that are no reflectance band, as whole band names (``SCL_20m``,
#: ``MSK_CLDPRB``, ``QA60``), as ESA, Earth Engine and Earth Search name them.
S2_PRODUCT_NAMES = re.compile(rf"(?:{_S2_PRODUCTS}|MSK_\w+)(?:_\d{{2,3}}m)?", re.IGNORECASE)


def _canonical_name(name: str) -> str:
    """Canonical spelling of a band name, keeping an ``_N`` suffix (``B04_1`` -> ``B4_1``)."""
    base, n = split_date_copy(name)
    return base if n is None else f"{base}_{n}"


def _scene_folder(path: str) -> str:
    """Folder of a scene's file, skipping ESA's ``R10m`` / ``R20m`` resolution folders."""
    folder = os.path.dirname(path)
    if _RES_DIR.match(os.path.basename(folder)):
        folder = os.path.dirname(folder)
    return folder


def _stac_offset(item: StacItemInfo) -> tuple[float, str] | None:
    """Offset rule of a STAC item: Earth Search's flag, else the baseline, else the date."""
    where = f"STAC item {item.path}"
    if item.offset_applied is True:
        return 0.0, f"{where}: earthsearch:boa_offset_applied is true (already removed)"
    if item.baseline is not None:
        try:
            baseline = float(item.baseline)
        except ValueError:
            baseline = None
        if baseline is not None:
            value = BASELINE_OFFSET if baseline >= 4.0 else 0.0
            return value, f"{where}: processing baseline {item.baseline}"
    if item.start is not None:
        value = BASELINE_OFFSET if item.start.date() >= OFFSET_START else 0.0
        return value, f"{where} dated {item.start.date().isoformat()}"
    return None


@dataclass(frozen=True)
class ProductMetadata:
    """What a Sentinel-2 product metadata file says about the radiometric offset.

    Attributes:
        path: the XML file.
        offsets: additive offset per band (canonical name), empty before baseline 04.00.
        baseline: processing baseline, e.g. ``"04.00"``, or None.
        sensing_date: acquisition date, or None.
        footprint: the product's footprint (``Global_Footprint``'s ``EXT_POS_LIST``) as a
            longitude / latitude polygon, or None where the file has none.
        product: the product's name (``PRODUCT_URI``), or None.
    """

    path: str
    offsets: dict[str, float]
    baseline: str | None
    sensing_date: date | None
    footprint: shapely.Polygon | None = None
    product: str | None = None

    def offset_for(self, band: str) -> float:
        """Offset of one band (0 where the product declares none).

        Args:
            band: band name (any spelling, ``_N`` suffix allowed).

        Returns:
            The additive offset.
        """
        if not self.offsets:
            return 0.0
        base = date_copy_base(band)
        if base in self.offsets:
            return self.offsets[base]
        values = list(self.offsets.values())
        return max(set(values), key=values.count)


def read_product_metadata(path: Path) -> ProductMetadata:
    """Read ``BOA_ADD_OFFSET`` / ``RADIO_ADD_OFFSET`` from a product metadata XML.

    Args:
        path: ``MTD_MSIL2A.xml``, ``MTD_MSIL1C.xml`` or an equivalent file.

    Returns:
        The offsets (by band name), processing baseline and sensing date.
    """
    root = ET.parse(path).getroot()
    band_ids: dict[str, str] = {}
    raw: dict[str, float] = {}
    baseline: str | None = None
    sensing: date | None = None
    footprint: shapely.Polygon | None = None
    product: str | None = None
    for element in root.iter():
        tag = element.tag.rsplit("}", 1)[-1]
        if tag == "Spectral_Information":
            band_id, physical = element.get("bandId"), element.get("physicalBand")
            if band_id is not None and physical:
                band_ids[band_id] = physical
        elif tag in ("BOA_ADD_OFFSET", "RADIO_ADD_OFFSET") and element.text:
            raw[element.get("band_id", str(len(raw)))] = float(element.text)
        elif tag == "PROCESSING_BASELINE" and element.text:
            baseline = element.text.strip()
        elif tag == "PRODUCT_URI" and element.text and product is None:
            product = element.text.strip()
        elif tag == "EXT_POS_LIST" and element.text and footprint is None:
            footprint = _footprint(element.text)
        elif tag in ("PRODUCT_START_TIME", "DATATAKE_SENSING_START") and element.text:
            if sensing is None:
                try:
                    sensing = datetime.fromisoformat(element.text.strip()[:10]).date()
                except ValueError:
                    pass
    offsets = {canonical_band(band_ids.get(k, f"B{int(k) + 1}")): v for k, v in raw.items()}
    return ProductMetadata(os.fspath(path), offsets, baseline, sensing, footprint, product)


def _footprint(text: str) -> shapely.Polygon | None:
    """ESA's ``EXT_POS_LIST`` (latitude longitude pairs) as a longitude / latitude polygon.

    None where it cannot be one: not numbers, fewer than 3 points, an invalid ring, or a
    footprint across the antimeridian (its longitudes wrap from 180 to -180: as a plain
    polygon it would run the other way round the globe and miss its own files).
    """
    try:
        values = [float(v) for v in text.split()]
    except ValueError:
        return None
    if len(values) < 6 or len(values) % 2:
        return None
    lons = values[1::2]
    if max(lons) - min(lons) > 180:  # across the antimeridian (179.4 ... -179.6): unknown
        return None
    polygon = shapely.Polygon(list(zip(lons, values[::2], strict=True)))
    return polygon if polygon.is_valid and not polygon.is_empty else None


@dataclass
class _FileInfo:
    """What the index needs from one raster file."""

    path: str
    count: int
    width: int
    height: int
    crs: RIO_CRS | None
    transform: Affine
    nodata: float | None
    descriptions: tuple[str | None, ...]
    dtypes: tuple[str, ...] = ()
    #: GDAL's per-band scale and offset (``value x scale + offset``; 1 and 0 when undeclared)
    scales: tuple[float, ...] = ()
    offsets: tuple[float, ...] = ()
    #: per band, a ``BOA_ADD_OFFSET`` / ``RADIO_ADD_OFFSET`` metadata item of the band or,
    #: failing that, of the file (ESA's names; GDAL's SENTINEL2 driver and sen2cor tools)
    offset_tags: tuple[str | None, ...] = ()
    #: per band, whether GDAL calls it an alpha band (``gdalwarp -dstalpha``): not spectral
    alpha: tuple[bool, ...] = ()

    @property
    def res(self) -> float:
        return abs(self.transform.a)

    def declared_offset(self, band: int) -> tuple[float, str] | None:
        """The offset (digital numbers) the file itself declares for a band, or None.

        GDAL's scale and offset say ``reflectance = value x scale + offset``; with
        Sentinel-2's scale 0.0001, offset -0.1 is -1000 in digital numbers (and a scale of 1
        gives the offset as it is). Failing those, an ESA ``BOA_ADD_OFFSET`` /
        ``RADIO_ADD_OFFSET`` metadata item.

        Args:
            band: 1-based band index.

        Returns:
            ``(offset, how the file says it)``, or None when the file declares nothing.

        Raises:
            ValueError: for a declared scale other than 0.0001 or 1 (the values are not
                reflectance x 10000, which an offset alone cannot mend), a metadata item that
                is not a number, or an offset that cannot be one of reflectance x 10000
                (:func:`_plausible_offset`). An offset of 0 beside a scale is GDAL's default
                and declares nothing.
        """
        scale = self.scales[band - 1] if self.scales else 1.0
        offset = self.offsets[band - 1] if self.offsets else 0.0
        unit = math.isclose(scale, REFLECTANCE_SCALE, rel_tol=1e-6)
        if not unit and not math.isclose(scale, 1.0, rel_tol=1e-6):
            raise ValueError(
                f"{self.path} declares GDAL scale {scale:.10g} and offset {offset:.10g} for band "
                f"{band} (value x scale + offset): reflectance x 10000 is scale "
                f"{REFLECTANCE_SCALE:g} (or 1), and this package removes an offset but does "
                "not rescale: convert the file to reflectance x 10000 (e.g. gdal_translate "
                f"-unscale -ot Float32, then multiply by 10000), or {_OFFSET_FIX}"
            )
        if offset != 0.0:  # 0 is GDAL's default beside a scale: it says nothing
            how = f"GDAL scale {scale:g} / offset {offset:g} of {self.path}"
            value = offset / scale  # in digital numbers
            return _plausible_offset(value, how, band), how
        tag = self.offset_tags[band - 1] if self.offset_tags else None
        if tag is not None and tag.strip():
            how = f"BOA_ADD_OFFSET {tag} in the metadata of {self.path}"
            try:
                value = float(tag)
            except ValueError:
                raise ValueError(
                    f"{self.path}: the metadata item BOA_ADD_OFFSET / RADIO_ADD_OFFSET of band "
                    f"{band} is {tag!r}, not a number: fix the item, or {_OFFSET_FIX}"
                ) from None
            return _plausible_offset(value, how, band), how
        return None


#: The way out of a file's unusable offset metadata (for messages).
_OFFSET_FIX = (
    "pass offset= to read the values as they are (it applies to every scene of the "
    "dataset: embed this scene apart if the others differ)"
)


def _plausible_offset(value: float, how: str, band: int) -> float:
    """``value`` if it can be an offset of reflectance x 10000 (whole, -10000 .. 0).

    ESA declares -1000 (processing baseline 04.00 on); anything else finite, whole (within
    0.001, for offsets stored as float32) and not positive is taken as declared. A fraction
    is an offset in reflectance units (-0.1), a positive or huge one a mistake, NaN or
    infinity would poison every pixel.

    Raises:
        ValueError: naming the declaration and the fix.
    """
    # a float32 offset of -0.1 with scale 0.0001 is -1000.000015 digital numbers
    if math.isfinite(value) and abs(value - round(value)) < 1e-3 and -10000 <= value <= 0:
        return round(value) + 0.0
    raise ValueError(
        f"{how} gives an offset of {value:.10g} for band {band}, which cannot be one of "
        "reflectance x 10000 (a whole number from -10000 to 0; ESA declares -1000 from "
        f"processing baseline 04.00 on): fix the metadata, or {_OFFSET_FIX}"
    )


@dataclass(frozen=True)
class StacItemInfo:
    """What a STAC item JSON beside a scene's files says about its time and offset.

    Attributes:
        path: the JSON file.
        id: the item id (e.g. ``S2B_52SFA_20220126_0_L2A``).
        start: acquisition time (``properties.datetime``, or ``start_datetime``), naive UTC.
        end: end of the acquisition (``end_datetime``), else ``start``.
        baseline: processing baseline (``s2:processing_baseline``, else
            ``processing:version``), e.g. ``"04.00"``, or None.
        offset_applied: ``earthsearch:boa_offset_applied`` (True: Earth Search already
            removed the +1000 of baseline 04.00 from the pixels), or None if absent.
        asset_files: base names of the files the item's asset hrefs point to.
    """

    path: str
    id: str
    start: datetime | None
    end: datetime | None
    baseline: str | None
    offset_applied: bool | None
    asset_files: frozenset[str]


def _naive_utc(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        stamp = pd.Timestamp(value.strip())
    except ValueError:
        return None
    return cast(datetime, _utc_stamp(stamp).to_pydatetime())


#: ``(start, stop)`` (naive UTC, inclusive) or STAC-style ``"2021-06-01/2021-06-30"``.
TimeRange = tuple[datetime | str, datetime | str] | str


def time_slice(time: TimeRange) -> slice:
    """A time range as a slice of naive UTC timestamps.

    Args:
        time: ``(start, stop)`` or a STAC-style ``"A/B"`` (ISO dates, ends inclusive: a date
            ends at its last microsecond; ``..`` an open end). Aware times are converted to
            UTC.

    Returns:
        ``slice(start, stop)`` of ``pandas.Timestamp`` (an open end, or one beyond pandas'
        years 1677-2262: ``Timestamp.min`` / ``Timestamp.max``).

    Raises:
        ValueError: for text that is no such range, or a range ending before it starts.
    """
    if isinstance(time, str):
        from torchgeo_dofa.stac import StacError, _interval

        try:
            first, last, _ = _interval(time)
        except StacError as err:
            raise ValueError(f"time {time!r}: {err}") from err
        return slice(_bounded_stamp(first), _bounded_stamp(last, end=True))
    start, stop = (_utc_stamp(pd.Timestamp(t)) for t in time)
    if stop < start:
        raise ValueError(f"time range ends before it starts: {time}")
    return slice(start, stop)


def _first_few(names: Sequence[str], limit: int = 3, separator: str = ", ") -> str:
    """``names`` for a message: the first ``limit`` joined by ``separator``, then ``and N more``."""
    more = len(names) - limit
    return separator.join(names[:limit]) + (f" and {more} more" if more > 0 else "")


def _bounded_stamp(moment: datetime | None, end: bool = False) -> pd.Timestamp:
    """A range's end as a naive UTC timestamp.

    Open, or beyond pandas' years 1677-2262: the earliest / latest timestamp
    (``0001-01-01/9999-12-31`` is every date).
    """
    if moment is None:
        return pd.Timestamp.max if end else pd.Timestamp.min
    if moment.year < pd.Timestamp.min.year + 1:
        return pd.Timestamp.min
    if moment.year > pd.Timestamp.max.year - 1:
        return pd.Timestamp.max
    return _utc_stamp(pd.Timestamp(moment))


def _utc_stamp(stamp: pd.Timestamp) -> pd.Timestamp:
    """A timestamp as the index keeps them: naive UTC (an aware one converted)."""
    return stamp if stamp.tzinfo is None else stamp.tz_convert("UTC").tz_localize(None)


class UnusedFileBandsError(BandError):
    """``file_bands=`` given for inputs of per-band files only, which name their bands.

    The embed command, whose ``--file-bands`` applies to every region of a job, reads such a
    region without it where another region's multi-band files take it.
    """


class NoSceneError(ValueError, LookupError):
    """No scene of the inputs is acquired within the time range asked for.

    A ``ValueError`` (a setting that selects nothing) and a ``LookupError`` (no data for the
    dates, as :func:`torchgeo_dofa.api.get_embedding` reports it).
    """


def no_scene_within(time: TimeRange | slice, starts: Iterable[datetime]) -> NoSceneError:
    """The error for a time range that holds none of the scenes (dated by ``starts``).

    Args:
        time: the range asked for (``"A/B"``, ``(start, stop)`` or a slice).
        starts: the scenes' acquisition starts.

    Returns:
        The error, one line: the range, up to five of the scenes' dates and the fix.
    """
    shown = _first_few(sorted({pd.Timestamp(t).date().isoformat() for t in starts}), 5)
    if isinstance(time, str):
        within = time
    else:
        first, last = (time.start, time.stop) if isinstance(time, slice) else time
        within = f"{_when(first)} .. {_when(last)}"
    return NoSceneError(
        f"no scene of the inputs is acquired within {within} (they are dated {shown}): "
        "choose dates that hold scenes"
    )


def _when(value: datetime | str) -> str:
    """A range's end as text: its date alone where it is a day's first or last instant."""
    stamp = pd.Timestamp(value)
    if stamp.time() in (time_of_day.min, time_of_day.max):
        return stamp.date().isoformat()
    return stamp.isoformat(sep=" ")


def read_stac_item(path: Path) -> StacItemInfo | None:
    """Read the time and offset facts of a STAC item JSON (as saved beside downloaded assets).

    Args:
        path: a ``.json`` file.

    Returns:
        The facts, or None when the file is not a STAC item (a GeoJSON ``Feature`` with
        ``properties``) or cannot be read.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("type") != "Feature":
        return None
    props = data.get("properties")
    if not isinstance(props, dict):
        return None
    start = _naive_utc(props.get("start_datetime")) or _naive_utc(props.get("datetime"))
    end = _naive_utc(props.get("end_datetime")) or start
    baseline = props.get("s2:processing_baseline") or props.get("processing:version")
    applied = props.get("earthsearch:boa_offset_applied")
    assets = data.get("assets")
    files: set[str] = set()
    if isinstance(assets, dict):
        for asset in assets.values():
            href = asset.get("href") if isinstance(asset, dict) else None
            if isinstance(href, str) and href:
                files.add(os.path.basename(href.split("?", 1)[0]))
    return StacItemInfo(
        path=os.fspath(path),
        id=str(data.get("id", "")),
        start=start,
        end=end,
        baseline=None if baseline is None else str(baseline),
        offset_applied=applied if isinstance(applied, bool) else None,
        asset_files=frozenset(files),
    )


@dataclass
class _Scene:
    """One scene: a multi-band file or a group of per-band files."""

    key: str
    layout: Literal["multiband", "per_band"]
    names: list[str]
    sources: list[tuple[str, int]]
    named_by_bands: bool = False
    named_by_file_bands: bool = False
    date_hint: str = ""
    item_names: tuple[str, ...] = ()
    offsets: list[float] = field(default_factory=list)
    offset_source: str = ""
    selected: list[tuple[str, int]] = field(default_factory=list)
    span: tuple[datetime, datetime] | None = None
    stac: StacItemInfo | None = None


class Sentinel2Base(RasterDataset):
    """Common machinery of :class:`Sentinel2SR` and :class:`EarthEngineS2`.

    Class attributes configure the file layout, as in TorchGeo; subclass to change them.
    """

    #: Glob of candidate files (filtered further by :attr:`extensions`). Embedding grids
    #: written by this package (band descriptions ``dofa_0000`` ...) are never read as
    #: scenes, so an output folder inside an input folder is safe.
    filename_glob = "*"

    #: Regular expression a file name must match; its ``date`` group (or ``start``) gives the
    #: acquisition time, parsed with :attr:`date_format` or, failing that, any of
    #: ``%Y%m%dT%H%M%S``, ``%Y%m%d``, ``%Y-%m-%d``. Files without a date span all time.
    filename_regex = r"^(?:.*?(?<![0-9])(?P<date>\d{8}T\d{6}|\d{8}|\d{4}-\d{2}-\d{2})(?![0-9]))?"

    #: Preferred format of the ``date`` group.
    date_format = "%Y%m%dT%H%M%S"

    #: File extensions read (lower case).
    extensions: ClassVar[tuple[str, ...]] = (".tif", ".tiff", ".jp2")

    #: Pattern (searched in the file stem) marking a one-band-per-file layout, with ``band``
    #: and optional ``resolution`` groups; None disables that layout. ``band`` is an ESA band
    #: name (``B04``, ``B4``, ``B8A``) or an Earth Search asset key (``red``, ``nir08``,
    #: ``swir16``..., see :data:`torchgeo_dofa.bands.STAC_ASSET_BANDS`).
    band_file_regex: ClassVar[str | None] = (
        r"(?:^|[_.-])(?P<band>B(?:0?[1-9]|1[0-2]|0?8A)|"
        + _ASSET_ALTERNATIVES
        + r")(?:-jp2)?(?:_(?P<resolution>\d{2,3})m)?$"
    )

    #: Per-band products that are not spectral bands (skipped): ESA's SCL, AOT, WVP, TCI...
    #: and Earth Search's ``scl``, ``aot``, ``wvp``, ``visual``, ``thumbnail``... assets.
    ancillary_regex: ClassVar[str] = (
        r"(?:^|[_.-])(?:"
        + _S2_PRODUCTS
        + r"|MSK\w*|"
        + _ANCILLARY_ALTERNATIVES
        + r")(?:-jp2)?(?:_\d{2,3}m)?$"
    )

    #: Default band order when every scene has all of these bands.
    default_bands: ClassVar[tuple[str, ...]] = DOFA_S2_BANDS

    #: Default of the ``offset`` argument.
    default_offset: ClassVar[float | Literal["auto"]] = "auto"

    #: Value written into invalid pixels.
    fill_value: ClassVar[float] = 0.0

    #: Treat 0 as no data (Sentinel-2's convention, often undeclared in the files).
    zero_is_nodata: ClassVar[bool] = True

    rgb_bands = ("B4", "B3", "B2")

    def __init__(
        self,
        paths: Path | Iterable[Path] = "data",
        crs: CRS | str | int | None = None,
        res: float | tuple[float, float] | None = None,
        bands: Sequence[str] | None = None,
        transforms: Callable[[Sample], Sample] | None = None,
        *,
        wavelengths: Sequence[float] | Tensor | None = None,
        file_bands: Sequence[str] | None = None,
        offset: float | Literal["auto"] | None = None,
        nodata: float | None = None,
        resampling: Resampling | str = "nearest",
        cache: bool = True,
        time_series: bool = False,
        time: TimeRange | None = None,
    ) -> None:
        """Index the files.

        Args:
            paths: one or more folders to search (recursively) or files to load.
            crs: CRS to warp to (defaults to the CRS of the first scene).
            res: resolution in CRS units (defaults to the finest resolution among the selected
                bands of all scenes: per-band 20 m files are read onto the 10 m grid).
            bands: bands to return, in this order (``B04`` or ``B4`` spelling; Earth Engine's
                ``B4_1`` multi-date copies and non-spectral bands by name). Defaults to DOFA's
                9 bands (B4, B3, B2, B5, B6, B7, B8, B11, B12) when every scene has them, else
                every Sentinel-2 band all scenes share that has DOFA normalisation statistics
                (B1, B8A, B9 and B10 have none: left out with a warning, unless no other band
                is shared). For multi-band files without band
                descriptions, a list as long as the file's band count names the file's bands
                in order (and selects all of them).
            transforms: a function/transform applied to each sample dict
                (e.g. :class:`torchgeo_dofa.transforms.DOFAPreprocess`).
            wavelengths: explicit centre wavelengths (um), one per selected band; required for
                bands that are not Sentinel-2 (``VV``, ``B10``...).
            file_bands: names of the bands stored in files without band descriptions, in file
                order; ``bands`` then selects among them. A name the package does not know
                (not a Sentinel-2 band, ``B4_1``, ``VV``, ``R`` ..., a product such as ``QA60``
                or a ``bandN`` placeholder of a band not to read) must be selected by
                ``bands``; a known one the default bands leave out is warned of.
            offset: additive radiometric offset (``"auto"``, see the module docs, or a
                number such as -1000 applied to every file); None uses the class default.
            nodata: no-data value overriding the files' declared one (0 and NaN are always
                no data for Sentinel-2 reflectance, see :attr:`zero_is_nodata`).
            resampling: resampling for bands read at another resolution or CRS (default
                nearest, which keeps raw values, as Earth Engine does).
            cache: keep file handles open between samples.
            time_series: stack overlapping scenes along a time dimension instead of
                mosaicking them.
            time: ``(start, stop)`` (inclusive) or a STAC-style ``"A/B"`` (``..`` an open
                end): index only the scenes whose acquisition span meets it (a scene without
                any date spans all time and stays), so the scenes left out decide nothing:
                not the default CRS, resolution or bands, nor the ``sources``. None (the
                default) indexes every scene; a sampler's ``time`` narrows the reads further.

        Raises:
            DatasetNotFoundError: if no readable raster is found
                (:class:`NoRasterFoundError` where no file has a raster extension, naming
                other formats found, e.g. a ``.vrt``, and how to convert them).
            BandError: if band names cannot be determined or selected, ``file_bands`` names a
                band the package does not know and ``bands`` does not select, or wavelengths
                cannot be inferred.
            ValueError: for a ``crs`` pyproj does not know, files without a CRS and no
                ``crs``, or a file that is not georeferenced (no geotransform and no CRS,
                or ground control points only); for a ``time`` that cannot be read or holds
                no scene (the message lists the scenes' dates).
        """
        self.paths = paths
        self.transforms = transforms
        self.cache = cache
        self.time_series = time_series
        self.nodata = nodata
        #: GDAL block cache (bytes) every ``ds[...]`` read runs under, in whatever process
        #: reads (see :func:`torchgeo_dofa.runtime.gdal_env`); None leaves the process's
        #: setting, GDAL's default being 5 % of the RAM. :class:`~torchgeo_dofa.datamodules.
        #: DOFAPredictDataModule` sets its sized cache here, so a job read in the main process
        #: (``num_workers: 0`` in a LightningCLI config) stays as bounded as one read by workers.
        #: GDAL's cache size is process-wide: reading from several threads at once leaves
        #: whichever size was set last; None (the default) keeps a cache you set around the reads.
        self.gdal_cache_bytes: int | None = None
        self.offset: float | Literal["auto"] = self.default_offset if offset is None else offset
        if self.offset != "auto" and not isinstance(self.offset, int | float):
            raise ValueError(f"offset must be a number or 'auto', got {self.offset!r}")
        problem = None if self.offset == "auto" else offset_problem(float(self.offset))
        if problem is not None:
            raise ValueError(f"offset={problem}")
        self._resampling = (
            Resampling[resampling] if isinstance(resampling, str) else Resampling(resampling)
        )
        self._handles: dict[tuple[str, str], tuple[DatasetReader, DatasetReader | WarpedVRT]] = {}
        self._handles_pid = os.getpid()
        self._metadata_cache: dict[str, ProductMetadata | None] = {}
        self._foreign_metadata: set[tuple[str, str]] = set()  # warned of (metadata, file)
        for what, value in (("bands", bands), ("file_bands", file_bands)):
            refuse_one_string(value, what)  # read as a list of its characters: 'B', '4'
        # a tuple, numpy array or generator of names: a list (numpy's arrays have no truth
        # value, and a generator would be spent by the first look)
        bands = None if bands is None else [str(b) for b in bands]
        file_bands = None if file_bands is None else [str(b) for b in file_bands]
        self._check_file_band_names(file_bands, bands)
        #: bands a warning of the default choice has named as left out (none twice)
        self._left_out_told: set[str] = set()

        infos = self._scan()
        if not infos:
            raise NoRasterFoundError(
                f"{type(self).__name__} found no raster in paths={self.paths!r}"
                f"{_other_formats_hint(self.paths, self.extensions)}"
            )
        #: files skipped by name as products that are not spectral bands (SCL, TCI ...)
        self._skipped_products: list[str] = []
        scenes = self._group(infos, bands, file_bands)
        self._infos = infos  # band choice and offset rules read the files' headers
        #: per file, its alpha bands read as masks (alpha 0: no data; :meth:`_transparent`):
        #: those a multi-band file's names do not make bands, every one of a band file's.
        #: GDAL masks by alpha itself only in 2- and 4-band files without a nodata value;
        #: ``gdalwarp -dstalpha`` writes an alpha band after any number of bands.
        self._alpha_masks: dict[str, tuple[int, ...]] = {}
        for scene in scenes:
            for path in dict.fromkeys(p for p, _ in scene.sources):
                flags = infos[path].alpha
                masks = tuple(
                    i + 1
                    for i, is_alpha in enumerate(flags)
                    if is_alpha
                    and (scene.layout == "per_band" or not is_known_band(scene.names[i]))
                )
                if masks:
                    self._alpha_masks[path] = masks
        if not scenes and self._skipped_products:
            shown = _first_few([os.path.basename(p) for p in self._skipped_products])
            raise NoRasterFoundError(
                f"{type(self).__name__} found only products that are not spectral bands in "
                f"paths={self.paths!r}: {shown}, skipped by name (ESA's SCL, AOT, WVP, TCI "
                "..., Earth Search's scl, visual ... assets): give the scene's band files "
                "(B02 ... B12, or Earth Search's blue, green ...); a file of reflectance named "
                "so is read once renamed"
            )
        if not scenes:
            raise DatasetNotFoundError(self)
        if file_bands is not None and all(scene.layout == "per_band" for scene in scenes):
            example = os.path.basename(scenes[0].sources[0][0])
            raise UnusedFileBandsError(
                f"file_bands={list(file_bands)} names the bands of multi-band files in file "
                f"order, but the inputs hold only single-band files named by their band "
                f"({example} ...), which name themselves: leave out file_bands= (bands= "
                "selects and orders the bands)"
            )
        if time is not None:
            scenes = self._scenes_within(scenes, time)
        self.bands: tuple[str, ...] = self._select(scenes, bands)
        self.all_bands = self.bands
        if file_bands is not None and bands is None:
            self._warn_unused_file_bands(file_bands, scenes)
        elif bands is None:
            self._warn_other_dates(scenes)
        base_names = [date_copy_base(b) for b in self.bands]
        try:
            self.wavelengths: Tensor = resolve_wavelengths(
                base_names if wavelengths is None else self.bands,
                wavelengths,
                num_channels=len(self.bands),
            )
        except BandError as err:
            products = self._products(self.bands)
            if wavelengths is None and products:  # no wavelength to give them: not spectral
                raise BandError(self._products_problem(products)) from err
            # the dataset's own hint replaces the transforms' one (a CLI user sees options)
            problem = str(err).removesuffix(f"; {WAVELENGTH_HINT}")
            raise BandError(
                f"{problem}; pass wavelengths=[...] (um, one per band of bands={list(self.bands)})"
            ) from err

        # CRS and grid
        first = infos[scenes[0].selected[0][0]]
        setting = "" if crs is None else "crs="  # the user's, or the files' own
        if crs is None:
            if first.crs is None:
                raise InputError(
                    f"{first.path} has no CRS: pass crs= (the CRS of its geotransform, e.g. "
                    "crs='EPSG:32633'), or give the file its CRS (gdal_edit.py -a_srs "
                    "EPSG:<code>)"
                )
            crs = first.crs.to_wkt()
        dst_crs = canonical_crs(crs)
        require_datum_grids(dst_crs, setting)  # before GDAL meets it (its PROJ errors)
        epsg = exact_epsg(dst_crs)
        self._dst_rio_crs = RIO_CRS.from_epsg(epsg) if epsg else RIO_CRS.from_wkt(dst_crs.to_wkt())
        grids = {
            path: self._grid(infos[path], self._dst_rio_crs)
            for scene in scenes
            for path in {p for p, _ in scene.selected}
        }
        if res is None:
            # the files already in the CRS set it where there are some: a warped file's grid
            # (GDAL's suggestion, 9.99 m for a 10 m file) put their pixels off their own
            # lattice, where they are read as they are (helper-135)
            own = {
                p: g
                for p, g in grids.items()
                if infos[p].crs is not None and infos[p].crs == self._dst_rio_crs
            } or grids
            finest = min((abs(t.a), abs(t.e)) for t, _, _ in own.values())  # min by x, then y
            res = finest
            # degrees: whether they are square on the ground is _warn_of_stretched_degrees's
            if not dst_crs.is_geographic and not math.isclose(finest[0], finest[1], rel_tol=0.01):
                square = min(finest)
                oblong = next(  # the file whose pixels set the grid
                    p for p, (t, _, _) in own.items() if (abs(t.a), abs(t.e)) == finest
                )
                warn(
                    f"{type(self).__name__}: the pixels are {finest[0]:g} x {finest[1]:g} (x by y, "
                    f"CRS units; {os.path.basename(oblong)} ...), not square: a chip of N x N "
                    "pixels covers a ground area stretched by "
                    f"{max(finest) / square:.3g}x, and DOFA, trained on square pixels, sees "
                    f"the scene so; give res={square:g} to read square pixels",
                    UserWarning,
                )
        if isinstance(res, int | float):
            res = (float(res), float(res))
        self._res = (float(res[0]), float(res[1]))
        if dst_crs.is_geographic:
            self._warn_of_stretched_degrees(list(grids.values()))

        rows: dict[str, list[Any]] = {
            "filepath": [],
            "sources": [],
            "offset": [],
            "offset_source": [],
        }
        geometries = []
        datetimes = []
        self._assumed_offsets: list[str] = []
        #: the index's ``filepath`` of scenes dated by the first of several dates in a name
        #: (``..._2019-02-06_2020-02-01.tif``, a composite of a range, or a product name's
        #: processing date): their span is that first day, which need not be when they were
        #: acquired, so no acquisition span is recorded for them
        self.first_of_several_dates: frozenset[str] = frozenset()
        first_of_several: set[str] = set()
        for scene in scenes:
            if scene.span is None:  # already dated where time= chose the scenes
                scene.span = self._scene_span(scene)
            if self._dated_by_first_of_several(scene):
                first_of_several.add(scene.selected[0][0])
            self._resolve_offset(scene, infos)
            boxes = [
                shapely.box(*self._grid_bounds(grids[p])) for p in {p for p, _ in scene.selected}
            ]
            footprint = shapely.intersection_all(boxes) if len(boxes) > 1 else boxes[0]
            if footprint.is_empty:
                footprint = shapely.union_all(boxes)
            geometries.append(shapely.box(*footprint.bounds))
            datetimes.append(scene.span)
            rows["filepath"].append(scene.selected[0][0])
            rows["sources"].append(tuple(scene.selected))
            rows["offset"].append(tuple(scene.offsets))
            rows["offset_source"].append(scene.offset_source)
        if self._assumed_offsets:
            shown = _first_few([os.path.basename(k) for k in self._assumed_offsets])
            warn(
                f"{len(self._assumed_offsets)} scene(s) named like Earth Search items dated on "
                f"or after {OFFSET_START.isoformat()} ({shown}) "
                "have no STAC item JSON beside their files: assuming their pixels still carry "
                "the +1000 of processing baseline 04.00 (offset -1000). Earth Search v1 removed "
                "it from many items (earthsearch:boa_offset_applied): keep the item JSON beside "
                "the files to decide per item, or pass offset=0 if it was removed",
                UserWarning,
            )
        self._warn_narrow_dtypes(scenes, infos)
        self.first_of_several_dates = frozenset(first_of_several)
        index = pd.IntervalIndex.from_tuples(datetimes, closed="both", name="datetime")
        self.index = GeoDataFrame(rows, index=index, geometry=geometries, crs=dst_crs)
        self._infos = infos
        self._warn_outside_area_of_use(dst_crs, setting)

    def _warn_outside_area_of_use(self, crs: CRS, setting: str) -> None:
        """Warn where the files lie wholly outside the area where their CRS is used."""
        x0, y0, x1, y1 = (float(v) for v in self.index.total_bounds)
        bounds = (x0, y0, x1, y1)
        area = outside_area_of_use(crs, bounds)
        if area is None:
            return
        west, south, east, north = area
        check = (
            "check crs= (it names the CRS of files without one, or the CRS they are read in)"
            if setting
            else "check the files' georeferencing (gdalinfo)"
        )
        warn(
            f"{self.__class__.__name__}: the files' bounds {[round(v) for v in bounds]} lie "
            f"wholly outside the area where {crs_label(crs)} is used (lon {west:g}..{east:g}, "
            f"lat {south:g}..{north:g}): the outputs will carry these coordinates in it; if "
            f"that is not where the scene lies, {check}",
            UserWarning,
        )

    def _warn_narrow_dtypes(self, scenes: list[_Scene], infos: dict[str, _FileInfo]) -> None:
        """Warn once for the selected bands stored in 8-bit integers (not reflectance).

        Raises:
            InputError: for a selected band of a complex data type (numpy took its real part,
                with a warning naming no file).
        """
        narrow: dict[str, str] = {}
        for scene in scenes:
            for path, band in scene.selected:
                dtypes = infos[path].dtypes
                dtype = dtypes[band - 1] if 0 < band <= len(dtypes) else ""
                if dtype.startswith("complex"):
                    raise InputError(
                        f"{path} stores band {band} as {dtype} (complex values, e.g. SAR's "
                        "single-look complex samples), which cannot be surface reflectance: "
                        "give the bands as real numbers (reflectance x 10000; for SAR, "
                        "amplitude or backscatter)"
                    )
                if narrow_dtype_problem(dtype):
                    narrow.setdefault(path, dtype)
        if not narrow:
            return
        names = [os.path.basename(p) for p in narrow]
        shown = _first_few(names)
        what = shown if len(names) == 1 else f"{len(names)} files ({shown})"
        problem = narrow_dtype_problem(next(iter(narrow.values())), what, len(names) > 1)
        warn(str(problem), ReflectanceWarning)

    # ------------------------------------------------------------------ properties

    @property
    def resampling(self) -> Resampling:
        """Resampling used for bands read at another resolution or CRS.

        Returns:
            The resampling method.
        """
        return self._resampling

    #: Arguments whose effect :meth:`reading_identity` records (or that do not change a
    #: pixel: ``paths`` is recorded file by file by its users, ``cache``, ``transforms``).
    reading_arguments: ClassVar[frozenset[str]] = frozenset(
        {"paths", "crs", "res", "bands", "file_bands", "wavelengths", "offset", "nodata"}
        | {"resampling", "cache", "transforms"}
    )

    def native_lattice(self) -> tuple[float, float] | None:
        """A pixel corner ``(x, y)`` of the files read in their own CRS, where others are warped.

        A mosaic of files in several CRSs read in one (``crs=``) places its chips from the
        corner of all the files' bounds, which a warped file can set anywhere: the files
        already in the dataset's CRS were then read shifted by a fraction of a pixel,
        resampled (0.45 px in a test). The samplers put their lattice on this corner's pixel
        grid instead (:class:`~torchgeo_dofa.datamodules.ChipGridSampler`,
        :class:`~torchgeo_dofa.datamodules.RegionSampler`).

        Returns:
            The top-left corner of the first such file (by path), where some files are
            warped and that file's pixels are the dataset's (its resolution, north-up);
            None otherwise (every file in one CRS: their corner is on their grid already).
        """
        infos = [self._infos[p] for p in sorted(self._infos)]
        native = [i for i in infos if i.crs is not None and same_crs(i.crs, self._dst_rio_crs)]
        if not native or len(native) == len(infos):
            return None
        t = native[0].transform
        if t.b or t.d or (abs(t.a), abs(t.e)) != tuple(float(r) for r in self.res):
            return None
        return float(t.c), float(t.f)

    def nodata_values(self) -> list[float]:
        """Every value read as no data in some file, besides NaN (sorted).

        The no-data value each file declares or ``nodata=`` gives, 0 where
        ``zero_is_nodata``, and the conventional fills (-32768, -9999, 65535) in files that
        declare none; values at or below -1000 are no data too
        (:class:`~torchgeo_dofa.transforms.CheckReflectance`).

        Returns:
            The values, as floats.
        """
        values: set[float] = set()
        for info in self._infos.values():
            primary = self._primary_nodata(info)
            values |= {v for v in (primary, *self._extra_nodata(info)) if v is not None}
        return sorted(v for v in values if not math.isnan(v))

    def reading_identity(self) -> dict[str, str]:
        """How the files' pixels are read, as text.

        Equal for two datasets reading the same pixels, however their arguments were spelled
        (``nodata=0`` for files that declare 0, ``crs`` naming the files' own CRS, bands as a
        tuple or a list, 3000 or 3000.0).

        The wavelengths are not in it (the model's input; see :attr:`wavelengths`).

        Returns:
            In this order: ``crs`` (the chips' CRS, e.g. ``EPSG:32633``), ``bands_read``
            (the band names, in order), ``res`` (x, y in CRS units), ``resampling``,
            ``nodata`` (the value(s) masked per file: the given one, else the declared one,
            else 0), ``nodata_masking`` (per file: whether it is read through a WarpedVRT
            and the further values masked after reading), ``band_indexes`` (the file band
            read for each band, per scene) and ``offsets`` (the reflectance offsets applied,
            per scene).
        """
        infos = [self._infos[p] for p in sorted(self._infos)]
        primaries = sorted({self._primary_nodata(i) for i in infos}, key=repr)
        masking = sorted(
            {(self._needs_vrt(i), tuple(sorted(self._extra_nodata(i)))) for i in infos}
        )
        return {
            "crs": crs_name(self._dst_rio_crs),  # as warped to: EPSG:32633 however given
            "bands_read": ", ".join(self.bands),
            "res": repr(tuple(self._res)),
            "resampling": self.resampling.name,
            "nodata": ", ".join(str(v) for v in primaries),
            "nodata_masking": repr(masking),
            "band_indexes": repr(
                sorted({tuple(i for _, i in sources) for sources in self.index["sources"]})
            ),
            "offsets": repr(list(self.index["offset"])),
        }

    @property
    def band_set(self) -> tuple[float, ...]:
        """The wavelength vector as a hashable key (used to group samples into batches).

        Returns:
            Wavelengths rounded to 1e-6 um.
        """
        return tuple(round(float(w), 6) for w in self.wavelengths)

    @property
    def crs(self) -> CRS:
        """CRS of the index and of the chips read.

        Returns:
            The CRS.
        """
        return cast(CRS, self.index.crs)

    @crs.setter
    def crs(self, new_crs: CRS) -> None:
        """Change the CRS of the index and of the pixels read from then on.

        TorchGeo's ``&`` / ``|`` set the second dataset's CRS to the first's.

        Args:
            new_crs: the new CRS.
        """
        new_crs = CRS.from_user_input(new_crs)
        if new_crs == self.crs:
            return
        self.index.to_crs(new_crs, inplace=True)
        self._per_index = None  # new footprints (to_crs's new geometry array says so as well)
        epsg = exact_epsg(new_crs)
        self._dst_rio_crs = RIO_CRS.from_epsg(epsg) if epsg else RIO_CRS.from_wkt(new_crs.to_wkt())
        self._close()

    # ------------------------------------------------------------------ composition

    def __and__(self, other: GeoDataset) -> DOFAIntersectionDataset:
        """Stack this dataset's bands with another's over their common area and time.

        Args:
            other: another GeoDataset (a :class:`Sentinel2Base`, a composite of them, or a
                label dataset such as a TorchGeo ``RasterDataset`` with ``is_image=False``).

        Returns:
            A :class:`DOFAIntersectionDataset`.
        """
        return DOFAIntersectionDataset(self, other)

    def __or__(self, other: GeoDataset) -> DOFAUnionDataset:
        """Mosaic this dataset with another of the same bands (first valid pixel wins).

        Args:
            other: another dataset with the same bands in the same order.

        Returns:
            A :class:`DOFAUnionDataset`.
        """
        return DOFAUnionDataset(self, other)

    # ------------------------------------------------------------------ indexing

    def _scan(self) -> dict[str, _FileInfo]:
        """Open every candidate file once and record what the index needs."""
        regex = re.compile(self.filename_regex, re.VERBOSE)
        infos: dict[str, _FileInfo] = {}
        for path in self.files:
            name = os.path.basename(path)
            if not os.path.isfile(path) or os.path.splitext(name)[1].lower() not in self.extensions:
                continue
            if re.match(regex, name) is None:
                continue
            refuse_undecodable_name(path, "input", InputError)  # its name goes in the outputs
            try:
                with _open_quietly(path) as src:
                    if _names_embedding_bands(src.descriptions):
                        continue  # this package's output, e.g. written inside the input folder
                    problem = georeference_problem(src)
                    if problem:
                        raise ValueError(problem)
                    infos[path] = _FileInfo(
                        path=path,
                        count=src.count,
                        width=src.width,
                        height=src.height,
                        crs=src.crs,
                        transform=src.transform,
                        nodata=src.nodata,
                        descriptions=tuple(src.descriptions),
                        dtypes=tuple(src.dtypes),
                        scales=tuple(src.scales),
                        offsets=tuple(src.offsets),
                        offset_tags=_offset_tags(src),
                        alpha=tuple(c == ColorInterp.alpha for c in src.colorinterp),
                    )
            except rasterio.errors.RasterioIOError:
                continue
            except CPLE_BaseError as err:  # GDAL's error left pending at open (rasterio's own)
                raise InputError(
                    f"cannot read the header of {path}: GDAL says "
                    f"{str(err).strip().splitlines()[0]}: where it names PROJ, the file's CRS "
                    "needs a datum grid or definition PROJ lacks: install the grid (projsync), "
                    "or give the file a CRS PROJ knows (gdal_edit.py -a_srs EPSG:<code>)"
                ) from None
        return infos

    def _group(
        self,
        infos: dict[str, _FileInfo],
        bands: Sequence[str] | None,
        file_bands: Sequence[str] | None,
    ) -> list[_Scene]:
        """Group files into scenes and name their bands."""
        band_re = re.compile(self.band_file_regex, re.IGNORECASE) if self.band_file_regex else None
        ancillary_re = re.compile(self.ancillary_regex, re.IGNORECASE)
        per_band: dict[tuple[str, str], dict[str, list[tuple[float, str]]]] = {}
        # a scene's folder as first spelt, by its real path: one scene whatever the spelling
        # (sc/x_B02.tif beside /abs/sc/x_B04.tif, a link): it was split, its bands shared none
        spelt: dict[tuple[str, str], str] = {}
        scenes: list[_Scene] = []
        for path, info in infos.items():
            stem = os.path.splitext(os.path.basename(path))[0]
            match = band_re.search(stem) if band_re else None
            # a band file: one band, and any alpha bands (gdalwarp -dstalpha of a B04.tif)
            if match is not None and info.count - sum(info.alpha) == 1:
                folder = _scene_folder(path)
                prefix = stem[: match.start()]
                token = match.group("band")
                band = stac_asset_band(token) or canonical_band(token)
                res_token = match.group("resolution")
                res = float(res_token) if res_token else info.res
                group = (_scene_folder(os.path.realpath(path)), prefix)
                spelt.setdefault(group, folder)
                per_band.setdefault(group, {}).setdefault(band, []).append((res, path))
                continue
            if band_re is not None and info.count <= 3 and ancillary_re.search(stem):
                self._skipped_products.append(path)
                continue  # SCL, AOT, visual / TCI (3-band true colour): not spectral bands
            scenes.append(self._multiband_scene(info, bands, file_bands))
        for group, by_band in per_band.items():
            folder, prefix = spelt[group], group[1]
            names = [b for b in _s2_order(by_band)]
            sources = [_band_file_source(infos[min(by_band[b])[1]]) for b in names]
            # an item folder (``S2B_52SFA_20220126_0_L2A/B04.tif``, ``.../red.tif``) is
            # named by its folder; ``<scene>_B04.tif`` files by their common prefix
            key = os.path.join(folder, prefix) if prefix.strip("_.-") else folder
            item = prefix.strip("_.-") or os.path.basename(folder)
            scenes.append(
                _Scene(
                    key=key,
                    layout="per_band",
                    names=names,
                    sources=sources,
                    date_hint=key,
                    item_names=(item,),
                )
            )
        scenes.sort(key=lambda s: s.sources[0][0])
        return scenes

    def _multiband_scene(
        self, info: _FileInfo, bands: Sequence[str] | None, file_bands: Sequence[str] | None
    ) -> _Scene:
        """Name the bands of one multi-band file."""
        described = [d for d in info.descriptions if d and d.strip()]
        named_by_bands = False
        from_descriptions = [
            _canonical_name(d) if d and d.strip() else f"band{i + 1}"
            for i, d in enumerate(info.descriptions)
        ]
        if file_bands is not None:  # the user's names win over the file's descriptions
            if len(file_bands) != info.count:
                raise BandError(
                    f"{info.path} has {info.count} bands but file_bands= names {len(file_bands)}: "
                    "give one name per band of the file, in file order"
                )
            check_unique_bands(list(file_bands), "file_bands=")
            names = [_canonical_name(b) for b in file_bands]
            if described and names != from_descriptions:
                warn(
                    f"{info.path}: file_bands={names} replace the file's band descriptions "
                    f"{from_descriptions}",
                    UserWarning,
                )
        elif described:
            names = from_descriptions
            raw = [
                d if d and d.strip() else f"band{i + 1}" for i, d in enumerate(info.descriptions)
            ]
            try:
                check_unique_bands(raw, f"the band descriptions of {info.path}")
            except BandError as err:
                raise BandError(
                    f"{err}. Reading them by name would silently drop a channel: fix the "
                    "descriptions, or name the file's bands yourself with file_bands=[...] "
                    f"(one name per band, {info.count} in file order)"
                ) from err
        elif bands is not None and len(bands) == info.count:
            check_unique_bands(list(bands), "bands=")
            names = [_canonical_name(b) for b in bands]
            named_by_bands = True
        elif bands is not None and any(info.alpha) and len(bands) == info.count - sum(info.alpha):
            # the bands other than GDAL's alpha band(s), in order (gdalwarp -dstalpha of an
            # undescribed stack); an alpha band keeps its placeholder and masks
            check_unique_bands(list(bands), "bands=")
            given_names = iter(_canonical_name(b) for b in bands)
            names = [f"band{i + 1}" if a else next(given_names) for i, a in enumerate(info.alpha)]
            named_by_bands = True
        else:
            example = ", ".join(f"B{i + 1}" for i in range(min(info.count, 3)))
            alphas = [i + 1 for i, a in enumerate(info.alpha) if a]
            given = (
                f" (bands= has {len(bands)} names, the file has {info.count} bands)"
                if bands is not None
                else ""
            )
            # a one-band 8-bit file among scenes is most often a label or mask raster
            mask = info.count == 1 and tuple(info.dtypes[:1]) in (("uint8",), ("int8",))
            how = (
                f"band {', '.join(map(str, alphas))} is GDAL's alpha band, read as a mask: "
                f"name the other {info.count - len(alphas)} in file order with bands=[...], "
                f"or all {info.count} with file_bands=[{example}, ...] giving the alpha its "
                f"placeholder band{alphas[0]}"
                + (
                    f" (all {info.count} named as bands read it as a band: GDAL takes any "
                    "4-band 8-bit file for RGBA, an RGB + near-infrared one too)"
                    if info.count == 4 and tuple(info.dtypes) == ("uint8",) * 4
                    else ""
                )
                if alphas
                else f"name all {info.count} bands in file order with file_bands=[{example}, "
                "...] (a second date of a band as B4_1, a third as B4_2, as Earth Engine does) "
                "and select the ones to embed with bands=[...]"
            )
            raise BandError(
                f"{info.path} has {info.count} bands and no band descriptions, so its band "
                f"names are unknown{given}: {how}"
                + (
                    f"; if it is a label or mask raster (one {info.dtypes[0]} band), keep it "
                    "out of the inputs"
                    if mask
                    else ""
                )
            )
        stem = os.path.splitext(os.path.basename(info.path))[0]
        return _Scene(
            key=info.path,
            layout="multiband",
            names=names,
            sources=[(info.path, i + 1) for i in range(info.count)],
            named_by_bands=named_by_bands,
            named_by_file_bands=file_bands is not None,
            date_hint=info.path,
            item_names=(stem, os.path.basename(_scene_folder(info.path))),
        )

    def _check_file_band_names(
        self, file_bands: Sequence[str] | None, bands: Sequence[str] | None
    ) -> None:
        """Refuse ``file_bands=`` names that no band choice would read.

        A name the package does not know is read only where ``bands=`` selects it (another
        sensor's band, with its ``wavelengths=``): anywhere else its channel was dropped
        without a word, a typo (``B88``, ``X``) as silently as a band left out on purpose.
        Known are the names of :func:`~torchgeo_dofa.bands.is_known_band` (Sentinel-2's
        bands, their later dates' copies ``B4_1``, ``VV``, ``VH``, ``R``, ``G``, ``B``), the
        non-spectral products of :attr:`ancillary_regex` (``QA60``, ``SCL`` ...) and the
        ``bandN`` placeholders of bands not to read.

        Args:
            file_bands: the names given for the bands of multi-band files, or None.
            bands: the bands asked for, or None (the default choice).

        Raises:
            BandError: naming the unknown names, the names known and the fixes.
        """
        if file_bands is None:
            return
        chosen = {_canonical_name(str(b)).casefold() for b in bands or ()}
        ancillary = re.compile(self.ancillary_regex, re.IGNORECASE)
        unknown = [
            (i, name)
            for i, name in enumerate(str(b).strip() for b in file_bands)
            if not is_known_band(name)
            and not _PLACEHOLDER.fullmatch(name)
            and ancillary.match(name) is None
            and _canonical_name(name).casefold() not in chosen
        ]
        if not unknown:
            return
        names = ", ".join(repr(name) for _, name in unknown)
        are = "is not a band name" if len(unknown) == 1 else "are not band names"
        meant = [
            f"for {name!r}, write {band}"
            for _, name in unknown
            if (band := stac_asset_band(name) or _leading_band(name)) is not None
        ]
        said = f" ({'; '.join(meant)})" if meant else ""
        raise BandError(
            f"file_bands={[str(b) for b in file_bands]} names {names}, which {are} this "
            f"package knows{said}, so that channel would be read as nothing. Known names: "
            "Sentinel-2's B1 ... B12 and B8A (B04 spelling too), a later date's B4_1, B4_2 "
            "..., VV, VH, R, G, B, and non-spectral products such as QA60 or SCL. Name every "
            "band of the file in file order with them (e.g. B8 for near infrared), a band "
            f"not to embed by its position (band{unknown[0][0] + 1}), or select another "
            "sensor's band with bands=[...] and give its wavelengths=[...]"
        )

    def _warn_unused_file_bands(self, file_bands: Sequence[str], scenes: list[_Scene]) -> None:
        """Warn of the bands ``file_bands=`` names that the default choice leaves out.

        Its other warnings name the bands some scenes lack and those without DOFA statistics;
        this one names the rest (another date's ``B4_1``, ``B1`` beside DOFA's 9 bands,
        ``QA60``), none twice. ``bandN`` placeholders are left out on purpose.
        """
        if not any(scene.named_by_file_bands for scene in scenes):
            return  # per-band files only: file_bands= named nothing read
        read = {b.casefold() for b in self.bands}
        unused = [
            name
            for name in (_canonical_name(str(b)) for b in file_bands)
            if name.casefold() not in read
            and not _PLACEHOLDER.fullmatch(name)
            and name not in self._left_out_told
        ]
        if not unused:
            return
        self._left_out_told.update(unused)
        warn(
            f"{self.__class__.__name__}: file_bands= names {', '.join(unused)}, which the "
            f"default bands {list(self.bands)} leave out (DOFA's 9 bands where present, else "
            "the Sentinel-2 bands every scene shares; another date's copies and other bands "
            "only when asked for): name them in bands=[...] to read them",
            UserWarning,
        )

    def _warn_other_dates(self, scenes: list[_Scene]) -> None:
        """Warn of the later dates of a described multi-date stack that the default leaves out.

        An Earth Engine stack described ``B4 ... B12, B4_1 ... B12_1, ...`` embedded its first
        date alone without a word (``file_bands=`` naming the same bands was warned of, by
        :meth:`_warn_unused_file_bands`). Once, naming the dates and how to select one.
        """
        later = list(
            dict.fromkeys(
                name
                for scene in scenes
                for name in scene.names
                if split_date_copy(name)[1] is not None and name not in self._left_out_told
            )
        )
        if not later:
            return
        self._left_out_told.update(later)
        holding = [s.key for s in scenes if any(n in later for n in s.names)]
        where = os.path.basename(holding[0]) + (
            f" and {len(holding) - 1} more file(s)" if len(holding) > 1 else ""
        )
        dates = sorted({cast(str, split_date_copy(n)[1]) for n in later}, key=int)
        example = [n for n in later if split_date_copy(n)[1] == dates[0]]  # the files' own
        warn(
            f"{self.__class__.__name__}: {where} hold{'s' if len(holding) == 1 else ''} "
            f"{len(dates)} later date(s) of "
            f"{'its' if len(holding) == 1 else 'their'} bands ({later[0]} ... {later[-1]}), "
            f"which the default bands {list(self.bands)}, "
            "the first date's, leave out: DOFA embeds one date at a time; select another by "
            f"its band names, e.g. bands=[{', '.join(example)}]",
            UserWarning,
        )

    def _warn_left_out_bands(self, scenes: list[_Scene], common: set[str]) -> None:
        """Warn, once each, of bands the default choice leaves out without the user seeing why.

        The default bands are those every scene has: a Sentinel-2 band missing from some
        scenes only (one tile of a mosaic without B8) is dropped for the whole dataset, and
        so is a band of a described file whose description is empty (read as ``band2``) or
        names a Sentinel-2 band in words the package does not read (``B3 (Green)``). GDAL
        alpha bands are not spectral and go without a word.
        """
        cls = self.__class__.__name__
        unread: dict[str, list[str]] = {}  # file -> its bands of unknown or unread names
        for scene in scenes:
            # the names file_bands= gives were checked (an unknown one is refused)
            if scene.layout != "multiband" or scene.named_by_bands or scene.named_by_file_bands:
                continue
            alpha = self._infos[scene.key].alpha
            for i, name in enumerate(scene.names):
                untitled = re.fullmatch(r"band\d+", name) is not None
                if (untitled and not (i < len(alpha) and alpha[i])) or (
                    name not in SENTINEL2_BANDS
                    and split_date_copy(name)[1] is None  # B4_1: another date, skipped
                    and _leading_band(name) is not None
                ):
                    unread.setdefault(scene.key, []).append(name)
        # a tile describing B3 as 'B3 (Green)' has it: the second warning says so
        worded = {key: {_leading_band(n) for n in names} for key, names in unread.items()}
        lacking: dict[str, list[str]] = {}  # scene -> the bands others have and it lacks
        for b in SENTINEL2_BANDS:
            if b not in common and any(b in s.names for s in scenes):
                for scene in scenes:
                    if b not in scene.names and b not in worded.get(scene.key, set()):
                        lacking.setdefault(scene.key, []).append(b)
        if lacking:
            keys = list(lacking)
            where = f"{keys[0]} lacks {', '.join(lacking[keys[0]])}" + (
                f", and {len(keys) - 1} more scene(s) lack some" if len(keys) > 1 else ""
            )
            left = sorted(
                {b for bs in lacking.values() for b in bs}, key=list(SENTINEL2_BANDS).index
            )
            self._left_out_told.update(left)
            warn(
                f"{cls}: band(s) {left} left out of the default bands, as not every scene has "
                f"them ({where}): the bands read are those all scenes share; embed the scenes "
                "apart, or pass bands=[...] and the paths of the scenes that have them",
                UserWarning,
            )
        if unread:
            keys = list(unread)
            shown = "; ".join(
                f"{key}: band(s) {', '.join(repr(n) for n in unread[key])}" for key in keys[:3]
            ) + (f"; and {len(keys) - 3} more file(s)" if len(keys) > 3 else "")
            warn(
                f"{cls}: {shown} left out, as their descriptions are empty or not band names: "
                "name every band of the file in file order with file_bands=[...] to read them",
                UserWarning,
            )

    #: Metres in a degree of latitude (WGS 84's meridian degree, 110.6 km at the equator to
    #: 111.7 km at the poles: a mean) and of longitude at the equator (WGS 84's equatorial
    #: radius x pi / 180); what a pixel of degrees measures on the ground, roughly.
    METRES_PER_DEGREE = (111_320.0, 111_132.0)

    def _warn_of_stretched_degrees(self, grids: list[tuple[Affine, int, int]]) -> None:
        """Warn where pixels square in degrees are far from square on the ground.

        An Earth Engine export in EPSG:4326 at 48 N has pixels of 8.983e-5 degrees a side:
        about 6.7 m east-west by 10 m north-south, so a chip of N x N pixels covered 1.5x more
        ground north-south, without a word (the warning of pixels not square in CRS units
        did not see it; helper-135). Beyond a 10 % stretch, at the chips' mean latitude.
        """
        tops = [t.f for t, _, _ in grids] + [t.f + t.e * h for t, _, h in grids]
        lefts = [t.c for t, _, _ in grids] + [t.c + t.a * w for t, w, _ in grids]
        lat, lon = sum(tops) / len(tops), sum(lefts) / len(lefts)
        per_lon, per_lat = self.METRES_PER_DEGREE
        x_m = self._res[0] * per_lon * math.cos(math.radians(lat))
        y_m = self._res[1] * per_lat
        stretch = max(x_m, y_m) / max(min(x_m, y_m), 1e-9)
        if stretch <= 1.1:
            return
        if lat >= 84:  # beyond UTM's zones
            projected = "3413' (polar stereographic north)"
        elif lat < -80:
            projected = "3031' (Antarctic polar stereographic)"
        else:
            projected = f"{utm_epsg(lon, lat)}' (its UTM zone)"
        warn(
            f"{type(self).__name__}: the pixels are {self._res[0]:g} x {self._res[1]:g} "
            f"degrees (x by y), about {x_m:.3g} x {y_m:.3g} m on the ground at latitude "
            f"{lat:.1f}: a chip of N x N pixels covers a ground area stretched by "
            f"{stretch:.3g}x, and DOFA, trained on square pixels, sees the scene so; read it "
            f"in a projected CRS, e.g. crs='EPSG:{projected}, at the source's resolution in "
            "metres (res=10 for Sentinel-2's 10 m bands)",
            UserWarning,
        )

    def _products(self, names: Iterable[str]) -> list[str]:
        """The names among ``names`` of Sentinel-2 products that are no reflectance band.

        Whole names only (:data:`S2_PRODUCT_NAMES`: ``SCL``, ``QA60``, ``AOT``, ``WVP``,
        ``TCI``, ``MSK_CLDPRB`` ...): a band of your own such as ``LST_QA`` is not one
        (helper-137), though :attr:`ancillary_regex` skips such files by name.
        """
        return [name for name in names if S2_PRODUCT_NAMES.fullmatch(name.strip())]

    def _products_problem(self, products: Sequence[str]) -> str:
        """Why the products asked for as bands are refused, and the fix.

        helper-135: ``SCL`` in ``bands=`` was told to give its wavelength, or not found, as
        if a spectral band.
        """
        one = len(products) == 1
        it, kind = ("it", "is a Sentinel-2 product") if one else ("them", "are Sentinel-2 products")
        return (
            f"{', '.join(products)} {kind} (scene classes, quality or cloud masks, aerosol or "
            "water vapour, a true-colour preview), not reflectance, which DOFA embeds (it has "
            f"no wavelength for {it}): "
            f"leave {it} out of bands=; to leave pixels out, give nodata= or a mask or alpha "
            "band in the files"
        )

    def _select(self, scenes: list[_Scene], bands: Sequence[str] | None) -> tuple[str, ...]:
        """Choose the output bands and each scene's (file, band index) per channel."""
        if bands is None:
            common = set(scenes[0].names)
            for scene in scenes[1:]:
                common &= set(scene.names)
            if all(b in common for b in self.default_bands):
                chosen = list(self.default_bands)
            else:
                chosen = [b for b in SENTINEL2_BANDS if b in common]
                if chosen:
                    self._warn_left_out_bands(scenes, common)
                unnormalisable = [b for b in chosen if SENTINEL2_BANDS[b].mean is None]
                if unnormalisable and len(unnormalisable) < len(chosen):
                    # DOFA has no statistics for them: the default must stay embeddable
                    chosen = [b for b in chosen if b not in unnormalisable]
                    self._left_out_told.update(unnormalisable)
                    warn(
                        f"{self.__class__.__name__}: band(s) {unnormalisable} left out of the "
                        f"default bands {chosen}: DOFA has no normalisation statistics for "
                        "them; name them in bands=[...] to read them anyway (and give their "
                        "statistics, mean=[...] and std=[...], to embed them)",
                        UserWarning,
                    )
            if not chosen:
                found = [n for n in scenes[0].names if n in common]  # in file order
                asset = [stac_asset_band(n) for n in found]
                if found and scenes[0].layout == "multiband" and all(asset):
                    hint = (
                        f"; if they are Sentinel-2's bands, named as Earth Search's assets, "
                        f"name them so: file_bands={asset} (in file order)"
                    )
                elif scenes[0].layout == "multiband":
                    hint = (
                        "; if they are Sentinel-2's bands named otherwise (descriptions such "
                        "as 'B4 (Red)' or 'B04_10m'), name every band in file order with "
                        "file_bands=[...] in Sentinel-2's names (B2 ... B12, B8A)"
                    )
                else:
                    hint = ""
                if len(scenes) > 1:  # say what each has: "found []" named no file
                    each = "; ".join(
                        f"{os.path.basename(scene.key)} has {list(scene.names)}"
                        for scene in scenes[:3]
                    )
                    found_in = f"shared: {found}; {each}{'; ...' if len(scenes) > 3 else ''}"
                else:
                    found_in = f"found {found}"
                raise BandError(
                    f"no Sentinel-2 band is present in every scene ({found_in}): pass "
                    f"bands=[...] (and wavelengths=[...] for non-Sentinel-2 bands){hint}"
                )
        else:
            if not bands:
                raise BandError("bands= is empty: name at least one band")
            check_unique_bands(list(bands), "bands=")
            chosen = [_canonical_name(b) for b in bands]
        for scene in scenes:
            if scene.named_by_bands and len(chosen) == len(scene.sources):
                scene.selected = list(scene.sources)
                continue
            lookup: dict[str, tuple[str, int]] = {}
            folded: dict[str, tuple[str, int]] = {}
            for name, source in zip(scene.names, scene.sources, strict=True):
                lookup.setdefault(name, source)
                folded.setdefault(name.casefold(), source)
            missing = [b for b in chosen if b not in lookup and b.casefold() not in folded]
            if missing:
                products = self._products(missing)
                raise BandError(
                    f"band(s) {missing} not found in {scene.key} (it has {scene.names}); "
                    + (
                        self._products_problem(products)
                        if products
                        else "choose bands= among those, or check the band descriptions"
                        + (
                            " (file_bands=[...] renames a file's bands, all of them in file order)"
                            if scene.layout == "multiband" and not scene.named_by_bands
                            else ""
                        )
                    )
                )
            scene.selected = [lookup.get(b) or folded[b.casefold()] for b in chosen]
        return tuple(chosen)

    def _grid(self, info: _FileInfo, dst_crs: RIO_CRS) -> tuple[Affine, int, int]:
        """Pixel grid of a file in the dataset CRS (its own grid when no warp is needed).

        A rotated, mirrored or south-up file gets the north-up grid GDAL suggests for warping
        it (as ``gdalwarp`` would choose), in its own CRS or the dataset's. GDAL keeps the
        sign of a negative pixel width (a file mirrored east-west, or rotated by 180 degrees)
        in its suggestion; that grid is turned east-up here over the same bounds.
        """
        if info.crs is not None and info.crs != dst_crs:
            _check_transformable(info.crs.to_wkt(), dst_crs.to_wkt())
        if not _north_up(info.transform):
            with (
                rasterio.open(info.path) as src,
                WarpedVRT(src, src_crs=info.crs or dst_crs, crs=dst_crs) as vrt,
            ):
                t, width, height = vrt.transform, vrt.width, vrt.height
            if t.b == 0 and t.d == 0 and not _north_up(t):
                west, _, _, north = _corner_bounds(t, width, height)
                t = Affine(abs(t.a), 0.0, west, 0.0, -abs(t.e), north)
            return t, width, height
        if info.crs is None or info.crs == dst_crs:
            return info.transform, info.width, info.height
        west, south, east, north = array_bounds(info.height, info.width, info.transform)
        transform, width, height = calculate_default_transform(
            info.crs,
            dst_crs,
            info.width,
            info.height,
            min(west, east),
            min(south, north),
            max(west, east),
            max(south, north),
        )
        assert width is not None and height is not None
        return transform, int(width), int(height)

    @staticmethod
    def _grid_bounds(grid: tuple[Affine, int, int]) -> tuple[float, float, float, float]:
        transform, width, height = grid
        west, south, east, north = array_bounds(height, width, transform)
        return min(west, east), min(south, north), max(west, east), max(south, north)

    def _filepath_to_timestamp(self, filepath: Path) -> tuple[datetime, datetime]:
        """Acquisition time span from a file name (the whole time axis if it has no date).

        Args:
            filepath: file (or scene) path.

        Returns:
            ``(mint, maxt)``.
        """
        name = os.path.basename(os.fspath(filepath))
        match = re.match(self.filename_regex, name, re.VERBOSE)
        groups = match.groupdict() if match else {}
        text = groups.get("date") or groups.get("start")
        if not text:
            return self.mint, self.maxt
        formats = [self.date_format] + [f for _, f in _DATE_FORMATS if f != self.date_format]
        for fmt in formats:
            try:
                mint, maxt = disambiguate_timestamp(text, fmt)
            except ValueError:
                continue
            if groups.get("stop"):
                with_stop = groups["stop"]
                for stop_fmt in formats:
                    try:
                        _, maxt = disambiguate_timestamp(with_stop, stop_fmt)
                        break
                    except ValueError:
                        continue
            return mint, maxt
        return self.mint, self.maxt

    # ------------------------------------------------------------------ offsets

    def _resolve_offset(self, scene: _Scene, infos: dict[str, _FileInfo]) -> None:
        """Set ``scene.offsets`` (one per selected channel) and ``scene.offset_source``."""
        n = len(scene.selected)
        if self.offset != "auto":
            scene.offsets = [float(self.offset)] * n
            scene.offset_source = "explicit"
            return
        value, source = self._auto_offset(scene)
        if isinstance(value, ProductMetadata):
            scene.offsets = [value.offset_for(b) for b in self.bands]
        elif isinstance(value, list):
            scene.offsets = value
        else:
            scene.offsets = [value] * n
        scene.offset_source = source

    def _declared_offsets(self, scene: _Scene) -> tuple[list[float], str] | None:
        """Offsets the scene's files declare themselves (GDAL scale / offset, ESA tags).

        Returns:
            One offset per selected channel and where it was read, or None when no file
            declares any.

        Raises:
            ValueError: when some of the scene's channels declare an offset and others do not
                (which rule holds for those is unknowable), or for a scale other than
                reflectance x 10000's (:meth:`_FileInfo.declared_offset`).
        """
        declared = [self._infos[path].declared_offset(band) for path, band in scene.selected]
        if all(d is None for d in declared):
            return None
        if any(d is None for d in declared):
            silent = [b for b, d in zip(self.bands, declared, strict=True) if d is None]
            said = [f"{b}: {d[0]:g}" for b, d in zip(self.bands, declared, strict=True) if d]
            raise ValueError(
                f"{scene.key}: the files declare an offset for some bands ({', '.join(said)}) "
                f"but not for {', '.join(silent)}: fix the files' metadata, or {_OFFSET_FIX} "
                "(-1000 for Sentinel-2 processing baseline 04.00 or later)"
            )
        offsets = [d[0] for d in declared if d is not None]
        how = sorted({d[1] for d in declared if d is not None})
        return offsets, how[0] if len(how) == 1 else f"{how[0]} (and {len(how) - 1} more)"

    def _auto_offset(self, scene: _Scene) -> tuple[float | list[float] | ProductMetadata, str]:
        """Offset of one scene from metadata, the files, product name or date (``"auto"``)."""
        if scene.stac is not None:
            from_item = _stac_offset(scene.stac)
            if from_item is not None:
                return from_item
        metadata = self._find_metadata(scene)
        if metadata is not None:
            return metadata, f"metadata {metadata.path}"
        declared = self._declared_offsets(scene)
        if declared is not None:
            return declared
        baseline = self._baseline_from_names(scene)
        if baseline is not None:
            value = BASELINE_OFFSET if baseline >= 400 else 0.0
            return value, f"baseline N{baseline:04d} in product name"
        acquired = self._esa_date(scene)
        if acquired is not None:
            value = BASELINE_OFFSET if acquired >= OFFSET_START else 0.0
            return value, f"ESA file name dated {acquired.isoformat()}"
        acquired = self._earth_search_date(scene)
        if acquired is not None:
            if acquired >= OFFSET_START:
                self._assumed_offsets.append(scene.key)
                return BASELINE_OFFSET, (
                    f"Earth Search item name dated {acquired.isoformat()} (no STAC item JSON; "
                    "offset assumed still in the pixels)"
                )
            return 0.0, f"Earth Search item name dated {acquired.isoformat()}"
        return 0.0, "none (not an ESA product name, no metadata found)"

    def _earth_search_date(self, scene: _Scene) -> date | None:
        """Date of an Earth Search item id in the scene's name, file name or folder name."""
        path = scene.sources[0][0]
        names = [
            os.path.basename(scene.key),
            os.path.splitext(os.path.basename(path))[0],
            os.path.basename(_scene_folder(path)),
        ]
        for name in names:
            match = _EARTH_SEARCH_ID.search(name)
            if match:
                try:
                    return datetime.strptime(match.group("date"), "%Y%m%d").date()
                except ValueError:
                    continue
        return None

    def _find_metadata(self, scene: _Scene) -> ProductMetadata | None:
        """Product metadata XML next to (or a few folders above) the scene's files."""
        first = scene.selected[0][0]
        folder = os.path.dirname(first)
        stem = os.path.basename(scene.key) if scene.layout == "per_band" else None
        if stem is None:
            stem = os.path.splitext(os.path.basename(first))[0]
        candidates = [
            os.path.join(folder, f"{stem.rstrip('_')}{suffix}")
            for suffix in ("_MTD.xml", ".xml", "_MTD_MSIL2A.xml", "_MTD_MSIL1C.xml")
        ]
        current = folder
        for _ in range(5):
            candidates += [os.path.join(current, n) for n in ("MTD_MSIL2A.xml", "MTD_MSIL1C.xml")]
            parent = os.path.dirname(current)
            if parent == current:
                break
            current = parent
        scene_date = self._scene_date(scene)
        for candidate in candidates:
            if not os.path.isfile(candidate):
                continue
            if candidate not in self._metadata_cache:
                try:
                    self._metadata_cache[candidate] = read_product_metadata(candidate)
                except (ET.ParseError, OSError, ValueError):
                    self._metadata_cache[candidate] = None
            metadata = self._metadata_cache[candidate]
            if metadata is None:
                continue
            if (
                scene_date is not None
                and metadata.sensing_date is not None
                and abs((metadata.sensing_date - scene_date).days) > 1
            ):
                continue  # metadata of another product in the same folder
            if not self._within_footprint(first, metadata):
                continue  # another product's (an undated file beside another tile's XML)
            return metadata
        return None

    def _within_footprint(self, path: str, metadata: ProductMetadata) -> bool:
        """Whether a file meets a product metadata's footprint (True where either is unknown).

        Undated files skip the date check: an ``MTD_MSIL2A.xml`` of a tile in Ireland a few
        folders above an Austrian field's GeoTIFF shifted its values by -1000, silently. The
        file's bounds (in longitude / latitude, 0.01 degree of margin) must meet the
        footprint; where they do not, the XML is not used, with a warning naming both.
        """
        info = self._infos.get(path)
        if metadata.footprint is None or info is None or info.crs is None:
            return True
        try:
            box = transform_bounds(
                info.crs, "EPSG:4326", *array_bounds(info.height, info.width, info.transform)
            )
        except (CPLE_BaseError, ValueError):  # bounds no longitude / latitude can hold
            return True
        if shapely.box(*box).buffer(0.01).intersects(metadata.footprint):
            return True
        key = (metadata.path, path)
        if key not in self._foreign_metadata:
            self._foreign_metadata.add(key)
            name = f" ({metadata.product})" if metadata.product else ""
            warn(
                f"{type(self).__name__}: {metadata.path} is the metadata of another product"
                f"{name}: its footprint does not meet {path}, so its offsets are not used for "
                "it; give offset= (-1000 for Sentinel-2 processing baseline 04.00 or later, "
                "0 for corrected data) if the file needs one",
                UserWarning,
            )
        return False

    def _scene_date(self, scene: _Scene) -> date | None:
        mint, _ = scene.span if scene.span is not None else self._scene_span(scene)
        if mint == self.mint:
            return None
        return pd.Timestamp(mint).date()

    def _scenes_within(self, scenes: list[_Scene], time: TimeRange) -> list[_Scene]:
        """The scenes whose acquisition span meets ``time`` (see ``__init__``).

        Raises:
            ValueError: if ``time`` cannot be read.
            NoSceneError: if no scene is acquired within it.
        """
        wanted = time_slice(time)
        for scene in scenes:
            scene.span = self._scene_span(scene)
        spans = pd.IntervalIndex.from_tuples(
            [cast(tuple[datetime, datetime], s.span) for s in scenes], closed="both"
        )
        meets = spans.overlaps(pd.Interval(wanted.start, wanted.stop, closed="both"))
        kept = [scene for scene, ok in zip(scenes, meets, strict=True) if ok]
        if not kept:
            raise no_scene_within(time, [span.left for span in spans])
        return kept

    def _scene_span(self, scene: _Scene) -> tuple[datetime, datetime]:
        """Acquisition time of a scene: STAC item JSON, else its name, else its folder's name.

        Sets ``scene.stac``. A STAC ``datetime`` spans its second (``start_datetime`` /
        ``end_datetime`` their range); a date in a name spans that day (or second); a scene
        with no date anywhere spans all time.
        """
        if scene.stac is None:
            scene.stac = self._find_stac_item(scene)
        if scene.stac is not None and scene.stac.start is not None:
            start = scene.stac.start
            end = scene.stac.end if scene.stac.end is not None else start
            # an instant spans its second, as TorchGeo dates ``%Y%m%dT%H%M%S`` names
            return start, max(end, start + timedelta(seconds=1) - timedelta(microseconds=1))
        everything = (self.mint, self.maxt)
        for name in (scene.date_hint, _scene_folder(scene.sources[0][0])):
            span = self._filepath_to_timestamp(name)
            if span != everything:
                return span
        return everything

    def _dated_by_first_of_several(self, scene: _Scene) -> bool:
        """Whether the name dating a scene holds dates besides the one that dates it.

        A scene dated by a STAC item, a name with one date, a name whose ``stop`` group
        (:attr:`filename_regex`) reads a range, or an ESA product name (sensing and
        processing times) is not.
        """
        if scene.stac is not None and scene.stac.start is not None:
            return False
        everything = (self.mint, self.maxt)
        for name in (scene.date_hint, _scene_folder(scene.sources[0][0])):
            if self._filepath_to_timestamp(name) == everything:
                continue
            base = os.path.basename(os.fspath(name))
            match = re.match(self.filename_regex, base, re.VERBOSE)
            if (match and match.groupdict().get("stop")) or _ESA_NAME.search(base):
                return False
            return len(_DATE_TOKEN.findall(base)) > 1
        return False

    def _find_stac_item(self, scene: _Scene) -> StacItemInfo | None:
        """The STAC item JSON in the scene's folder that describes it, if any.

        An item matches by id (the item folder's or file prefix's name), by an asset href
        naming one of the scene's files, or, for an item folder, by being its only item.
        """
        folder = _scene_folder(scene.sources[0][0])
        items = self._stac_items(folder)
        if not items:
            return None
        for item in items:
            if item.id and item.id in scene.item_names:
                return item
        files = {os.path.basename(p) for p, _ in scene.sources}
        for item in items:
            if item.asset_files & files:
                return item
        if len(items) == 1 and scene.key == folder:
            return items[0]
        return None

    def _stac_items(self, folder: str) -> list[StacItemInfo]:
        cache: dict[str, list[StacItemInfo]] = self.__dict__.setdefault("_stac_cache", {})
        if folder not in cache:
            found: list[StacItemInfo] = []
            try:
                names = sorted(os.listdir(folder))
            except OSError:
                names = []
            for name in names:
                if name.lower().endswith(".json"):
                    item = read_stac_item(os.path.join(folder, name))
                    if item is not None:
                        found.append(item)
            cache[folder] = found
        return cache[folder]

    def _baseline_from_names(self, scene: _Scene) -> int | None:
        """Processing baseline from an ESA product name (the file's or a parent folder's)."""
        path = scene.selected[0][0]
        names = [os.path.basename(scene.key), os.path.splitext(os.path.basename(path))[0]]
        current = os.path.dirname(path)
        for _ in range(5):
            names.append(os.path.basename(current))
            parent = os.path.dirname(current)
            if parent == current:
                break
            current = parent
        for name in names:
            match = _BASELINE.match(name)
            if match:
                return int(match.group("baseline"))
        return None

    def _esa_date(self, scene: _Scene) -> date | None:
        """Acquisition date of an ESA-named file (tile/date or product name), else None."""
        for name in (os.path.basename(scene.key), os.path.basename(scene.selected[0][0])):
            match = _ESA_NAME.search(name)
            if match:
                text = match.group("tdate") or match.group("pdate")
                try:
                    return datetime.strptime(text, "%Y%m%d").date()
                except ValueError:  # no such day (20230229): undated, as other names are
                    continue
        return None

    # ------------------------------------------------------------------ reading

    def __getitem__(self, index: GeoSlice) -> Sample:
        """Read the chip at ``[xmin:xmax:xres, ymin:ymax:yres, tmin:tmax:tres]``.

        Args:
            index: a TorchGeo GeoSlice (a time slice is optional).

        Returns:
            The sample dict (see the module docs), after ``transforms``.

        Raises:
            IndexError: if the chip does not intersect any scene.
        """
        with self._reading_env():
            return self._read_and_transform(index)

    def __getitems__(self, indices: Sequence[GeoSlice]) -> list[Sample]:
        """Read the chips of one batch: PyTorch's DataLoader calls this with a batch's indices.

        The same samples as ``[self[i] for i in indices]``, read with the per-index caches
        (see :meth:`_index_state`) checked once for the batch instead of three times a chip,
        and GDAL's cache (``gdal_cache_bytes``) set once for the batch: ~0.2-0.35 ms a chip
        less on the 2-core VM. The index must not be changed while a batch is read (by the
        ``transforms``, say): a change is seen at the next batch (the cache is held per
        thread: batches read in other threads check it as usual). A subclass that overrides
        ``__getitem__`` (to add a label, say) gets its own ``__getitem__`` for every chip.

        Args:
            indices: TorchGeo GeoSlices, one per chip.

        Returns:
            The sample dicts, in the order of ``indices``, after ``transforms``.

        Raises:
            IndexError: if a chip does not intersect any scene.
        """
        if type(self).__getitem__ is not Sentinel2Base.__getitem__:
            return [self[i] for i in indices]  # the subclass's own samples (as torch's Subset)
        held = self._held_caches
        thread = threading.get_ident()
        outer = held.get(thread)
        held[thread] = self._index_cache()
        try:
            with self._reading_env():
                return [self._read_and_transform(i) for i in indices]
        finally:
            if outer is None:
                del held[thread]
            else:  # a batch read inside another's (by a transform)
                held[thread] = outer

    def _reading_env(self) -> AbstractContextManager[Any]:
        """GDAL's env around a read: ``gdal_cache_bytes`` set (~40 us), or nothing if None."""
        if self.gdal_cache_bytes is None:
            return nullcontext()
        return cast(AbstractContextManager[Any], gdal_env(self.gdal_cache_bytes))

    def _read_and_transform(self, index: GeoSlice) -> Sample:
        files: list[str] = []
        if type(self).read_chip is Sentinel2Base.read_chip:
            sample, files = self.read_chip_with_sources(index)
        else:  # a subclass's own read
            sample = self.read_chip(index)
        if self.transforms is None:
            return sample
        try:
            return cast(Sample, self.transforms(sample))
        except ReflectanceError as err:  # a chip refused alone, its file passed the job's check
            raise ReflectanceError(f"{self._chip_named(files, sample)}: {err}") from None

    def _chip_named(self, files: Sequence[str], sample: Sample) -> str:
        """A chip for a message: its files and its bounds in the dataset's CRS."""
        where = ""
        bounds = sample.get("bounds")
        if isinstance(bounds, Tensor) and bounds.numel() >= 6:
            x0, x1, _, y0, y1, _ = (float(v) for v in bounds[:6])
            crs = crs_label(self.crs)
            where = f"the chip x {x0:.10g}..{x1:.10g}, y {y0:.10g}..{y1:.10g} ({crs})"
        names = _first_few([os.path.basename(f) for f in files])
        return ", ".join(part for part in (names, where) if part) or "a chip"

    def read_chip(self, index: GeoSlice) -> Sample:
        """Read a chip without applying ``transforms``.

        Args:
            index: a TorchGeo GeoSlice.

        Returns:
            The raw sample dict.

        Raises:
            IndexError: if the chip does not intersect any scene.
        """
        return self.read_chip_with_sources(index)[0]

    def read_chip_with_sources(self, index: GeoSlice) -> tuple[Sample, list[str]]:
        """Read a chip without applying ``transforms``, with the files its pixels came from.

        Scenes overlapping the chip are mosaicked in index order, each filling only the pixels
        earlier ones left without data, and reading stops once every pixel is filled; the files
        listed are those of the scenes that gave the chip at least one pixel (every band's file
        of a scene stored one file per band), or of every scene read when none did (a chip
        without valid pixels). With ``time_series``, every overlapping scene's.

        Args:
            index: a TorchGeo GeoSlice.

        Returns:
            The raw sample dict and the sorted file paths.

        Raises:
            IndexError: if the chip does not intersect any scene.
        """
        x, y, t, scenes = self._overlapping_scenes(index)
        xres, yres = float(x.step), float(y.step)
        width = max(1, round((x.stop - x.start) / xres))
        height = max(1, round((y.stop - y.start) / yres))
        top = float(y.stop)
        bounds = (float(x.start), top - height * yres, float(x.start) + width * xres, top)
        grid = (bounds, (xres, yres), height, width)

        if self.time_series:
            layers = [self._read_scene(sources, offsets, *grid) for sources, offsets in scenes]
            image_np = np.stack([d for d, _ in layers])
            valid_np = np.stack([v for _, v in layers])
            used = [sources for sources, _ in scenes]
        else:
            read: list[Any] = []
            used = []
            for sources, offsets in scenes:  # the first scene with a valid pixel wins
                data, valid = self._read_scene(sources, offsets, *grid)
                if not read:  # the first scene's data has the fill where it has no data
                    image_np, valid_np, take = data, valid, valid
                else:
                    take = valid & ~valid_np
                    np.copyto(image_np, data, where=take)
                    valid_np |= take
                read.append(sources)
                if take.any():
                    used.append(sources)
                if valid_np.all():
                    break
            used = used or read
        files = _files_of(used)

        transform = Affine(xres, 0.0, float(x.start), 0.0, -yres, float(y.stop))
        sample = {
            "image": torch.from_numpy(image_np.astype(np.float32, copy=False)),
            "wavelengths": self.wavelengths.clone(),
            "valid": torch.from_numpy(valid_np),
            "bounds": torch.tensor(
                [
                    x.start,
                    x.stop,
                    x.step,
                    y.start,
                    y.stop,
                    y.step,
                    pd.Timestamp(t.start).timestamp(),
                    pd.Timestamp(t.stop).timestamp(),
                    t.step,
                ],
                dtype=torch.float64,
            ),
            "transform": torch.tensor(list(transform), dtype=torch.float64),
        }
        return sample, files

    def scene_files(self, index: GeoSlice) -> list[str]:
        """Every file of the scenes whose footprint meets a chip, without reading pixels.

        A superset of the files :meth:`read_chip_with_sources` names (the mosaic may stop
        before the last scene, and a scene may give no valid pixel).

        Args:
            index: a TorchGeo GeoSlice.

        Returns:
            The sorted file paths.

        Raises:
            IndexError: if the chip does not intersect any scene.
        """
        return _files_of(sources for sources, _ in self._overlapping_scenes(index)[3])

    def _overlapping_scenes(
        self, index: GeoSlice
    ) -> tuple[slice, slice, slice, list[tuple[Any, Any]]]:
        """The chip's x, y, t slices and the (sources, offsets) of the scenes it meets."""
        x, y, t = self._disambiguate_slice(index)
        rows = self._time_rows(t)
        # the rows whose footprint box meets the chip (GeoPandas' ``.cx`` on boxes), on arrays
        # kept per index instead of copying the GeoDataFrame for every chip
        boxes, sources_of, offsets_of = self._query_arrays()
        b = boxes[rows]
        hit = (
            (b[:, 0] <= x.stop) & (b[:, 2] >= x.start) & (b[:, 1] <= y.stop) & (b[:, 3] >= y.start)
        )
        rows = rows[hit]
        if not len(rows):
            raise IndexError(f"index: {index} not found in dataset with bounds: {self.bounds}")
        return x, y, t, [(sources_of[i], offsets_of[i]) for i in rows]

    #: (state, cache) of :meth:`_index_cache`; None until first used.
    _per_index: tuple[tuple[Any, ...], dict[str, Any]] | None = None

    @functools.cached_property
    def _held_caches(self) -> dict[int, dict[str, Any]]:
        """Per thread id, the index cache held while that thread reads a batch.

        :meth:`__getitems__` fills it for the batch; :meth:`_index_cache` returns it unchecked.
        """
        return {}

    def _index_state(self) -> tuple[Any, ...]:
        """What the per-index caches below depend on, compared by identity.

        The GeoDataFrame, its time index (pandas indexes are immutable: changing it means
        assigning a new one) and its geometry array (a new one after ``to_crs``, also in
        place, as the ``crs`` setter and TorchGeo's ``&`` / ``|`` do), and the row count.
        The cache holds these objects, so their ids cannot be reused while it lives. Other
        edits in place (a cell, ``index.loc[i, "geometry"] = ...``, or a whole other column,
        ``index["sources"] = ...``) are not seen: assign a new index (``ds.index = ...``).
        """
        index = self.index
        return (index, index.index, index.geometry.array, len(index))

    def _index_cache(self) -> dict[str, Any]:
        """The per-index cache, emptied whenever :meth:`_index_state` changes."""
        held = self._held_caches.get(threading.get_ident())
        if held is not None:
            return held
        state = self._index_state()
        cached = self._per_index
        if (
            cached is None
            or any(a is not b for a, b in zip(cached[0][:-1], state[:-1]))
            or (cached[0][-1] != state[-1])
        ):
            cached = (state, {"times": {}})
            self._per_index = cached
        return cached[1]

    def _query_arrays(self) -> tuple[npt.NDArray[np.float64], list[Any], list[Any]]:
        """Footprint boxes (N, 4), sources and offsets of the index rows, cached per index."""
        cache = self._index_cache()
        if "query" not in cache:
            boxes = np.asarray(self.index.geometry.bounds.to_numpy(), dtype=np.float64)
            cache["query"] = (boxes, list(self.index["sources"]), list(self.index["offset"]))
        return cast(tuple[npt.NDArray[np.float64], list[Any], list[Any]], cache["query"])

    def _time_rows(self, t: slice) -> npt.NDArray[np.intp]:
        """Index rows whose time interval overlaps ``t`` (every ``t.step``-th), cached.

        A sampler asks for the same time slice (usually the dataset's whole span) for every
        chip; pandas' ``IntervalIndex.overlaps`` costs ~0.4 ms a call, so the answer is kept
        per index (see :meth:`_index_state`) and time slice.
        """
        times: dict[tuple[Any, Any, Any], npt.NDArray[np.intp]] = self._index_cache()["times"]
        key = (t.start, t.stop, t.step)
        rows = times.get(key)
        if rows is None:
            interval = pd.Interval(t.start, t.stop)
            rows = np.flatnonzero(self.index.index.overlaps(interval))[:: t.step]
            if len(times) >= 256:
                times.clear()
            times[key] = rows
        return rows

    @property
    def bounds(self) -> tuple[slice, slice, slice]:
        """Bounding x, y and t slices of the index (TorchGeo's), cached per index and res.

        TorchGeo recomputes them from the GeoDataFrame for every chip it reads (~0.4 ms);
        here they are kept per index (see :meth:`_index_state`) and resolution.
        """
        cache = self._index_cache()
        res = tuple(self.res)
        if cache.get("bounds_res") != res:
            cache["bounds"], cache["bounds_res"] = super().bounds, res
        return cast(tuple[slice, slice, slice], cache["bounds"])

    #: Read chips that lie on a file's own pixel grid (same CRS and resolution, whole-pixel
    #: offsets) with one windowed read instead of ``rasterio.merge`` (same pixels, several
    #: times faster per chip; ``benchmarks/run.py`` read rows). Other chips use ``merge``.
    direct_reads: bool = True

    def _read_scene(
        self,
        sources: Sequence[tuple[str, int]],
        offsets: Sequence[float],
        bounds: tuple[float, float, float, float],
        res: tuple[float, float],
        height: int,
        width: int,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """Read one scene's channels onto the chip grid: (C, H, W) data and (H, W) validity.

        float32 throughout: every raw value of the integer types Sentinel-2 products use
        (uint16 and smaller, offsets of -1000) is exact in float32.
        """
        shape = (len(sources), height, width)
        data: npt.NDArray[np.float32] | None = None
        by_path: dict[str, list[tuple[int, int]]] = {}
        for channel, (path, band_index) in enumerate(sources):
            by_path.setdefault(path, []).append((channel, band_index))
        for path, pairs in by_path.items():
            handle = self._open(path)
            indexes = [b for _, b in pairs]
            # alpha bands read as masks (one named by bands= is read as a band instead), by
            # a read of their own on the same path: the same source pixels at any resolution
            # and edge (one read of bands and alpha together gave other band values through
            # a bilinear WarpedVRT: the alpha tests)
            alphas = [a for a in self._alpha_masks.get(path, ()) if a not in indexes]
            try:
                array = self._read_file(handle, indexes, bounds, res, height, width)
                opacity = (
                    self._read_file(handle, alphas, bounds, res, height, width) if alphas else None
                )
            except rasterio.errors.RasterioError as err:
                raise unreadable_input(path, err) from err
            if not self.cache:
                self._close(path)
            array = array[:, :height, :width].astype(np.float32, copy=False)
            if opacity is not None:
                clear = self._transparent(opacity[:, :height, :width], self._infos[path])
                array[:, clear] = np.nan
            extra = self._extra_nodata(self._infos[path])
            if extra:
                array[np.isin(array, np.asarray(extra, dtype=np.float32))] = np.nan
            if (
                len(by_path) == 1
                and array.shape == shape
                and all(channel == k for k, (channel, _) in enumerate(pairs))
            ):
                data = array  # every channel from this one file, in order (a fresh array)
                break
            if data is None:
                data = np.full(shape, np.nan, dtype=np.float32)
            for k, (channel, _) in enumerate(pairs):
                data[channel, : array.shape[1], : array.shape[2]] = array[k]
        assert data is not None  # a scene has at least one source
        if any(offsets):
            data += np.asarray(offsets, dtype=np.float32)[:, None, None]
        valid = (data > NODATA_FLOOR).all(axis=0)  # NaN compares False: no data
        if not valid.all():
            data[:, ~valid] = self.fill_value
        return data, valid

    def _transparent(
        self, opacity: npt.NDArray[np.floating[Any]], info: _FileInfo
    ) -> npt.NDArray[np.bool_]:
        """(H, W) pixels that a file's alpha band(s), read as its bands are, make transparent.

        Alpha 0 is transparent. The read masks (NaN) the alpha where it equals the value
        the file is masked by (:meth:`_masked_nodata`): where that is 0, a masked alpha is
        transparent (or beyond the file); where it is another value (65535, a uint16
        alpha's opaque value, is a common nodata), a masked alpha is not transparent.
        Through a WarpedVRT (another CRS, a non-nearest resampling: :meth:`_needs_vrt`) it
        is the warp's alpha: GDAL warps the file's alpha with its bands, weighting the
        resampling by it.

        Args:
            opacity: (A, H, W) the alpha bands as read.
            info: the file.
        """
        transparent = (opacity == 0).any(axis=0)
        if self._masked_nodata(info) == 0:
            transparent |= np.isnan(opacity).any(axis=0)
        return np.asarray(transparent)

    def _read_file(
        self,
        handle: DatasetReader | WarpedVRT,
        indexes: list[int],
        bounds: tuple[float, float, float, float],
        res: tuple[float, float],
        height: int,
        width: int,
    ) -> npt.NDArray[np.floating[Any]]:
        """Read ``indexes`` of one file onto the chip grid (NaN where masked or outside)."""
        array = (
            _direct_read(handle, indexes, bounds, res, height, width) if self.direct_reads else None
        )
        if array is not None:
            return array
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged, _ = rasterio.merge.merge(
                [handle],
                bounds=bounds,
                res=res,
                indexes=indexes,
                resampling=self.resampling,
                nodata=np.nan,
                dtype="float64",
            )
        return merged

    def _primary_nodata(self, info: _FileInfo) -> float | None:
        """The no-data value GDAL masks while reading (and resampling) a file."""
        if self.nodata is not None:
            return float(self.nodata)
        if info.nodata is not None:
            return float(info.nodata)
        return 0.0 if self.zero_is_nodata else None

    def _needs_vrt(self, info: _FileInfo) -> bool:
        """Whether a file must be read through a WarpedVRT (warp, or no-data GDAL must know).

        Without warping, reading the file directly and masking no-data afterwards gives the
        same pixels, except when a no-data value the file does not declare, or a file's alpha
        band, must be kept out of a non-nearest resampling (GDAL's warp weights it by the
        alpha).
        """
        if info.crs is not None and info.crs != self._dst_rio_crs:
            return True
        if not _north_up(info.transform):  # rotated or south-up: GDAL warps it north-up
            return True
        if self.nodata is not None and self.nodata != info.nodata:
            return True
        primary = self._primary_nodata(info)
        if self.resampling != Resampling.nearest and info.path in self._alpha_masks:
            return True  # GDAL's warp weights the resampling by the alpha band
        return self.resampling != Resampling.nearest and primary != info.nodata

    def _masked_nodata(self, info: _FileInfo) -> float | None:
        """The no-data value GDAL masks while reading a file (NaN in :meth:`_read_file`)."""
        return self._primary_nodata(info) if self._needs_vrt(info) else info.nodata

    def _extra_nodata(self, info: _FileInfo) -> list[float]:
        """No-data values masked after reading (those GDAL did not mask already)."""
        masked = self._masked_nodata(info)
        values = {self._primary_nodata(info)}
        if self.zero_is_nodata:
            values.add(0.0)
        if self.nodata is None and info.nodata is None:
            values.update(CONVENTIONAL_FILLS)
        return [v for v in values if v is not None and not math.isnan(v) and v != masked]

    def _open(self, path: str) -> DatasetReader | WarpedVRT:
        """Open a file (as a VRT in the dataset CRS where needed); cached if ``cache``.

        At most :func:`cached_files_limit` files stay open, the least recently read closed
        first.
        """
        if self._handles_pid != os.getpid():
            self._handles = {}
            self._handles_pid = os.getpid()
        key = (path, self._dst_rio_crs.to_wkt())
        if key in self._handles:
            self._handles[key] = self._handles.pop(key)  # the most recently read: last
            return self._handles[key][1]
        room = cached_files_limit() - 1
        while len(self._handles) > room:  # close the least recently read (the first)
            src, vrt = self._handles.pop(next(iter(self._handles)))
            if vrt is not src:
                vrt.close()
            src.close()
        info = self._infos[path]
        src = rasterio.open(path)
        if not self._needs_vrt(info):
            self._handles[key] = (src, src)
            return src
        transform, width, height = self._grid(info, self._dst_rio_crs)
        nodata = self._primary_nodata(info)
        kwargs: dict[str, Any] = (
            {"src_nodata": nodata, "nodata": nodata}
            if nodata is not None
            else {}
            if any(info.alpha)  # rasterio gives the warp the file's own alpha band
            else {"add_alpha": True}
        )
        vrt = WarpedVRT(
            src,
            src_crs=info.crs or self._dst_rio_crs,  # a file without CRS is in the given one
            crs=self._dst_rio_crs,
            transform=transform,
            width=width,
            height=height,
            resampling=self.resampling,
            **kwargs,
        )
        self._handles[key] = (src, vrt)
        return vrt

    def _close(self, path: str | None = None) -> None:
        for key in [k for k in self._handles if path is None or k[0] == path]:
            src, vrt = self._handles.pop(key)
            if vrt is not src:
                vrt.close()
            src.close()

    def close(self) -> None:
        """Close every cached file handle."""
        self._close()

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without open file handles (DataLoader workers reopen them)."""
        state = self.__dict__.copy()
        state["_handles"] = {}
        state["_per_index"] = None  # rebuilt on first use
        state.pop("_held_caches", None)
        return state

    def __str__(self) -> str:
        """Summary: class, band order, CRS, resolution, scene count.

        Returns:
            A short description.
        """
        return (
            f"{self.__class__.__name__}(bands={list(self.bands)}, crs={crs_label(self.crs)}, "
            f"res={self.res}, scenes={len(self)})"
        )


class Sentinel2SR(Sentinel2Base):
    """Sentinel-2 surface reflectance from local GeoTIFF / JPEG2000 files.

    Layouts (detected per file; several may be mixed under one folder):

    * one multi-band file per scene; band names come from the band descriptions
      (``B04`` and ``B4`` both work), or from ``bands=`` / ``file_bands=`` when the file has
      none;
    * one file per band named like ESA's products, ``<scene>_B04[_10m].tif|jp2``
      (``T31UFQ_20220614T103629_B04_10m.jp2``, BigEarthNet's ``..._B04.tif``, ``.SAFE``
      ``IMG_DATA/R10m``, ``R20m``...): files sharing ``<scene>`` form one scene, the finest
      resolution of a band is used, and coarser bands are read onto the dataset grid (10 m
      by default) with ``resampling`` (nearest by default). SCL, AOT, WVP, TCI... are skipped.
    * item folders of Earth Search / STAC downloads, ``S2B_52SFA_20220126_0_L2A/B04.tif`` or
      with asset names (``red.tif``, ``nir08.tif``, ``swir16.tif``...; ``scl``, ``wvp``,
      ``visual`` skipped): one scene per folder, dated by a STAC item JSON beside the files
      or by the folder name.

    The acquisition time comes from a STAC item JSON beside the files, else the first date in
    the file name (``20220614T103629``, ``20220614`` or ``2022-06-14``) or its folder's, so
    ``ds[x, y, t0:t1]`` and TorchGeo's temporal samplers select dates. ``offset="auto"``
    removes ESA's +1000 of baseline 04.00 (see the module docs).

    Example:
        >>> ds = Sentinel2SR("S2A_MSIL2A_..._N0400_....SAFE")  # doctest: +SKIP
        >>> sample = ds[x0 : x0 + 2240, y0 : y0 + 2240]  # doctest: +SKIP
        >>> sample["image"].shape, ds.bands  # doctest: +SKIP
        (torch.Size([9, 224, 224]), ('B4', 'B3', 'B2', 'B5', 'B6', 'B7', 'B8', 'B11', 'B12'))
    """


class EarthEngineS2(Sentinel2Base):
    """Sentinel-2 GeoTIFFs exported from Google Earth Engine.

    Band names come from the band descriptions Earth Engine writes (``B1`` ... ``B12``,
    ``B8A``); non-spectral bands (``QA60``, ``SCL``, ``VV``, ``temperature_2m``,
    ``elevation``...) and the ``_1``, ``_2``... copies of multi-date stacks are skipped unless
    named in ``bands=`` (with ``wavelengths=`` for non-Sentinel-2 bands). The tiles of one
    large export (``<prefix>-0000000000-0000000000.tif``, ``<prefix>-0000000000-0000023296.tif``)
    are read as one mosaic. Exports in EPSG:4326 stay in EPSG:4326 unless ``crs=`` is given.

    Offset: ``COPERNICUS/S2_SR_HARMONIZED`` and ``COPERNICUS/S2_HARMONIZED`` already removed
    the baseline-04.00 offset (0). For the deprecated non-harmonized collections
    (``COPERNICUS/S2_SR``, ``COPERNICUS/S2``) pass ``collection=``: the offset is then -1000 for
    files whose name carries a date on or after 2022-01-25.
    """

    extensions: ClassVar[tuple[str, ...]] = (".tif", ".tiff")
    band_file_regex: ClassVar[str | None] = None

    #: Collections whose values still carry the baseline-04.00 offset.
    unharmonized: ClassVar[tuple[str, ...]] = ("COPERNICUS/S2_SR", "COPERNICUS/S2")

    def __init__(
        self,
        paths: Path | Iterable[Path] = "data",
        crs: CRS | str | int | None = None,
        res: float | tuple[float, float] | None = None,
        bands: Sequence[str] | None = None,
        transforms: Callable[[Sample], Sample] | None = None,
        *,
        collection: str = "COPERNICUS/S2_SR_HARMONIZED",
        **kwargs: Any,
    ) -> None:
        """Index the exported files.

        Args:
            paths: one or more folders to search (recursively) or files to load.
            crs: CRS to warp to (defaults to the CRS of the first file).
            res: resolution in CRS units (defaults to the finest of the files).
            bands: bands to return, in this order (see :class:`Sentinel2Base`).
            transforms: a function/transform applied to each sample dict.
            collection: the Earth Engine collection the export came from.
            **kwargs: further arguments of :class:`Sentinel2Base` (``wavelengths``,
                ``file_bands``, ``offset``, ``nodata``, ``resampling``, ``cache``,
                ``time_series``).
        """
        self.collection = collection
        super().__init__(paths, crs, res, bands, transforms, **kwargs)

    def _auto_offset(self, scene: _Scene) -> tuple[float | list[float] | ProductMetadata, str]:
        """Earth Engine: the files' own declared offsets, else by collection and date.

        Exports declare none (as of 2026); harmonized collections give 0, the others follow
        the date.
        """
        declared = self._declared_offsets(scene)
        if declared is not None:
            return declared
        if self.collection not in self.unharmonized:
            return 0.0, f"Earth Engine {self.collection} (harmonized)"
        acquired = self._scene_date(scene)
        if acquired is None:
            warn(
                f"{scene.key}: no date in the file name, cannot tell whether {self.collection} "
                "values carry the +1000 offset of baseline 04.00; assuming they do not "
                "(pass offset=-1000 if they do)",
                UserWarning,
            )
            return 0.0, f"Earth Engine {self.collection}, undated (assumed none)"
        value = BASELINE_OFFSET if acquired >= OFFSET_START else 0.0
        return value, f"Earth Engine {self.collection} dated {acquired.isoformat()}"


def _s2_order(names: Iterable[str]) -> list[str]:
    """Sort band names in Sentinel-2 order, unknown names last (alphabetically)."""
    order: dict[str, float] = {b: float(i) for i, b in enumerate(SENTINEL2_BANDS)}
    order["B10"] = order["B9"] + 0.5
    return sorted(names, key=lambda b: (order.get(b, len(order)), b))


# ---------------------------------------------------------------------- composition


def _is_label_dataset(dataset: GeoDataset) -> bool:
    """Whether ``dataset`` gives labels, not an image.

    A ``RasterDataset`` with ``is_image=False``, or a TorchGeo ``VectorDataset`` (polygons
    rasterised to a ``mask``, or boxes; it has no ``is_image``: helper-136 saw it refused as
    an image without bands).
    """
    return isinstance(dataset, VectorDataset) or not getattr(dataset, "is_image", True)


def _member_bands(dataset: GeoDataset) -> tuple[tuple[str, ...], Tensor] | None:
    """(bands, wavelengths) of a member that carries them, None for a label dataset.

    Raises:
        BandError: for an image dataset without band names or wavelengths.
    """
    bands = getattr(dataset, "bands", None)
    wavelengths = getattr(dataset, "wavelengths", None)
    if isinstance(wavelengths, Tensor) and bands is not None:
        return tuple(str(b) for b in bands), wavelengths
    if _is_label_dataset(dataset):
        return None
    members = getattr(dataset, "datasets", None)
    if members and all(_is_label_dataset(d) for d in members):
        raise BandError(
            f"label datasets combined with `{'|' if isinstance(dataset, UnionDataset) else '&'}`"
            f" ({type(dataset).__name__}) cannot be a member of `&` (TorchGeo merges or stacks "
            "their masks, and fills one's gaps with the other's nodata): give one label "
            "dataset all the label folders or files, e.g. Labels(['a/', 'b/']), which TorchGeo "
            "mosaics"
        )
    raise BandError(
        f"{type(dataset).__name__} carries no band names and wavelengths, so DOFA cannot "
        "tell what its channels are: combine Sentinel2SR / EarthEngineS2 datasets (or "
        "DOFAIntersectionDataset / DOFAUnionDataset of them), or label datasets "
        "(is_image=False, or TorchGeo's VectorDataset) with `&`"
    )


def _time_series_of(dataset: GeoDataset) -> bool | None:
    if isinstance(dataset, DOFAIntersectionDataset | DOFAUnionDataset):
        kinds = {_time_series_of(d) for d in dataset.datasets} - {None}
        return kinds.pop() if len(kinds) == 1 else None
    return cast(bool | None, getattr(dataset, "time_series", None))


def _check_same_geometry(values: Sequence[Tensor], key: str, how: str) -> None:
    shapes = {tuple(v.shape[-2:]) for v in values}
    if len(shapes) > 1:
        raise ValueError(
            f"cannot {how} samples whose '{key}' differ in size {sorted(shapes)}: the member "
            "datasets read different grids; give them the same res= and crs=, and put "
            "resizing transforms on the combined dataset (transforms=...), not on its members"
        )


def concat_dofa_samples(samples: Iterable[Sample]) -> Sample:
    """Join samples of one place from several datasets channel-wise (the ``&`` collate).

    Unlike TorchGeo's :func:`~torchgeo.datasets.utils.concat_samples`, which concatenates
    every key along its first axis (giving ``valid`` of shape (2H, W) and an 18-element
    ``bounds``), each key is joined by what it means:

    * ``image``: concatenated along the channel axis ((C1 + C2, H, W), or (T, C1 + C2, H, W));
    * ``wavelengths``: concatenated, in the same channel order;
    * ``valid``: a pixel is valid where every member holds data (logical AND), as within
      one dataset, where a pixel is valid when every channel is;
    * ``bounds``, ``transform``: the query's, identical in every member: the first one;
    * any other key held by several members (e.g. ``mask``): concatenated along its first
      axis, as TorchGeo does; a key held by one member passes through.

    Args:
        samples: one sample per member dataset, read at the same GeoSlice.

    Returns:
        The joined sample.

    Raises:
        ValueError: if the members' images differ in size or rank.
    """
    batch = list(samples)
    keys = list(dict.fromkeys(k for s in batch for k in s))
    out: Sample = {}
    for key in keys:
        values = [s[key] for s in batch if key in s]
        if len(values) == 1 or not all(isinstance(v, Tensor) for v in values):
            out[key] = values[0]
        elif key == "image":
            if len({v.ndim for v in values}) > 1:
                raise ValueError(
                    "cannot stack a time series (T, C, H, W) with a single image (C, H, W): "
                    "use the same time_series= for every dataset combined with `&`"
                )
            _check_same_geometry(values, key, "stack")
            out[key] = torch.cat(values, dim=-3)
        elif key == "wavelengths":
            out[key] = torch.cat(values, dim=-1)
        elif key == "valid":
            _check_same_geometry(values, key, "stack")
            valid = values[0].to(torch.bool)
            for v in values[1:]:
                valid = valid & v.to(torch.bool)
            out[key] = valid
        elif key in ("bounds", "transform"):
            out[key] = values[0]
        else:
            out[key] = torch.cat(values)
    return out


def merge_dofa_samples(samples: Iterable[Sample]) -> Sample:
    """Mosaic samples of one place from datasets with the same bands (the ``|`` collate).

    Unlike TorchGeo's :func:`~torchgeo.datasets.utils.merge_samples`, which takes the
    per-value maximum of every key (mixing channels of different bands, and bands of
    different dates), pixels are taken whole from the first member that holds valid data
    there, as :class:`Sentinel2Base` mosaics its own scenes; ``valid`` is their union.
    Keys without a ``valid`` mask to guide them (e.g. ``mask``) keep TorchGeo's maximum.

    Args:
        samples: one sample per member dataset that covers the query, in member order.

    Returns:
        The merged sample.

    Raises:
        MixedBandSetError: if the members' wavelength vectors differ.
    """
    batch = list(samples)
    keys = list(dict.fromkeys(k for s in batch for k in s))
    guided = all(isinstance(s.get("valid"), Tensor) for s in batch)
    out: Sample = {}
    for key in keys:
        values = [s[key] for s in batch if key in s]
        if len(values) == 1 or not all(isinstance(v, Tensor) for v in values):
            out[key] = values[0]
        elif key == "wavelengths":
            if any(v.shape != values[0].shape or not torch.equal(v, values[0]) for v in values):
                raise MixedBandSetError(
                    "cannot merge samples with different wavelength vectors "
                    f"{[_describe(v) for v in values]}: give every dataset combined with `|` "
                    "the same bands=[...] in the same order"
                )
            out[key] = values[0]
        elif key in ("bounds", "transform"):
            out[key] = values[0]
        elif key in ("image", "valid") and guided:
            continue  # below
        else:
            merged = values[0]
            for v in values[1:]:
                merged = torch.maximum(merged, v)
            out[key] = merged
    if guided and any("image" in s for s in batch):
        images = [s for s in batch if "image" in s]
        _check_same_geometry([s["image"] for s in images], "image", "merge")
        image = images[0]["image"].clone()
        valid = images[0]["valid"].to(torch.bool).clone()
        for sample in images[1:]:
            take = sample["valid"].to(torch.bool) & ~valid
            image = torch.where(take.unsqueeze(-3), sample["image"], image)
            valid |= take
        out["image"], out["valid"] = image, valid
    return out


class _DOFAComposition:
    """What DOFA's ``&`` / ``|`` datasets share: the band-set key and further composition."""

    wavelengths: Tensor

    @property
    def band_set(self) -> tuple[float, ...]:
        """The wavelength vector as a hashable key.

        Returns:
            Wavelengths rounded to 1e-6 um.
        """
        return tuple(round(float(w), 6) for w in self.wavelengths)

    def __and__(self, other: GeoDataset) -> DOFAIntersectionDataset:
        """Stack a further dataset (see :meth:`Sentinel2Base.__and__`).

        Args:
            other: another GeoDataset.

        Returns:
            A :class:`DOFAIntersectionDataset`.
        """
        return DOFAIntersectionDataset(cast(GeoDataset, self), other)

    def __or__(self, other: GeoDataset) -> DOFAUnionDataset:
        """Mosaic with a further dataset of the same bands (see :meth:`Sentinel2Base.__or__`).

        Args:
            other: another dataset with the same bands in the same order.

        Returns:
            A :class:`DOFAUnionDataset`.
        """
        return DOFAUnionDataset(cast(GeoDataset, self), other)


def _no_intersection(dataset1: GeoDataset, dataset2: GeoDataset) -> str:
    """The error for ``dataset1 & dataset2`` without a common pixel: both extents, one CRS.

    TorchGeo has put ``dataset2`` in ``dataset1``'s CRS by then (TorchGeo's own message named
    neither dataset nor extent).
    """
    extents = []
    for dataset in (dataset1, dataset2):
        x0, y0, x1, y1 = dataset.index.total_bounds
        extents.append(f"{type(dataset).__name__} [{x0:.10g}, {y0:.10g}, {x1:.10g}, {y1:.10g}]")
    return (
        f"{extents[0]} and {extents[1]} do not overlap (bounds as xmin, ymin, xmax, ymax in "
        f"{crs_label(dataset1.crs)}): check that both cover the same area, and that each "
        "file's CRS is the one its coordinates are in (a UTM zone off by one moves it ~600 km)"
    )


#: Label-file footprints are taken this many label pixels wider when checked for image area
#: beyond them (:func:`label_fill_problem`): a reprojected file's index footprint is the
#: polygon of its 4 corners, inside its curved edges by a sliver (4-10 pixels' area, well
#: under a pixel wide, for a 4326 file covering a 379 x 578 / 379 x 379 px UTM scene).
_FOOTPRINT_SLACK = 0.5


#: Files of a mask member whose values :func:`refuse_fractional_labels` samples at most.
FRACTIONAL_LABEL_FILES = 8


def refuse_fractional_labels(dataset1: GeoDataset, dataset2: GeoDataset) -> None:
    """Refuse a mask member of ``dataset1 & dataset2`` whose float files hold fractions.

    TorchGeo's ``RasterDataset`` reads a mask (``is_image=False``) as integers, truncating:
    a float label file of 0.7 and 1.5 trains as classes 0 and 1, without a word (the tasks'
    own check of whole class ids never sees the fractions). Float files of whole values
    (1.0, 2.0) are fine. Each of the first :data:`FRACTIONAL_LABEL_FILES` float files is
    read decimated (about 256 pixels a side, rasterio's overview or nearest sampling).

    Raises:
        ValueError: naming the file, a fractional value found and the fix.
    """
    for label in (dataset1, dataset2):
        if not isinstance(label, RasterDataset) or label.is_image:
            continue
        if "filepath" not in label.index:
            continue
        checked = 0
        for path in sorted({str(p) for p in label.index["filepath"]}):
            if checked == FRACTIONAL_LABEL_FILES:
                break
            try:
                with rasterio.open(path) as src:
                    if not np.issubdtype(np.dtype(src.dtypes[0]), np.floating):
                        continue
                    checked += 1
                    scale = max(1, max(src.width, src.height) // 256)
                    shape = (src.count, max(1, src.height // scale), max(1, src.width // scale))
                    values = src.read(out_shape=shape, masked=True).compressed()
            except rasterio.RasterioIOError:  # TorchGeo's read will name an unreadable file
                continue
            values = values[np.isfinite(values)]
            fractional = values[values != np.floor(values)]
            if fractional.size:
                raise ValueError(
                    f"label file {path} ({type(label).__name__}) holds values that are not "
                    f"whole class ids ({float(fractional[0]):g}, ...): TorchGeo reads a mask "
                    f"as integers, truncating them ({float(fractional[0]):g} -> class "
                    f"{int(np.trunc(fractional[0]))}); store the class ids as integers "
                    "(gdal_translate -ot Byte in.tif out.tif, after rounding or classifying "
                    "the values)"
                )


def label_fill_problem(dataset1: GeoDataset, dataset2: GeoDataset) -> str | None:
    """Whether label pixels beyond a label file would read as class 0 in ``dataset1 & dataset2``.

    TorchGeo's ``RasterDataset`` fills the pixels of a chip that no file covers with the
    files' nodata, or with 0 where neither the files nor the dataset (its ``nodata``
    attribute) declare one; a mask member (``is_image=False``) then reads class 0 there, and
    a segmentation task trains on it. That happens wherever the other member's footprint
    reaches beyond the label files' (chips at the labels' edge, gaps between label tiles).

    Args:
        dataset1: a member of the intersection (after TorchGeo has put both in one CRS).
        dataset2: the other member.

    Returns:
        A one-line warning naming the label dataset, how many of its files declare no nodata
        and the fix; None where no mask member leaves pixels to a fill of 0.
    """
    for label, other in ((dataset1, dataset2), (dataset2, dataset1)):
        if not isinstance(label, RasterDataset) or label.is_image or label.nodata is not None:
            continue
        index = label.index
        if "filepath" not in index:
            continue
        pixel = abs(label.res[0] * label.res[1])
        covered = shapely.union_all(index.geometry.to_numpy())
        reach = shapely.union_all(other.index.geometry.to_numpy())
        # footprints of reprojected files are 4-corner polygons of their curved edges: the
        # slivers between them (under a pixel wide) are no label file's edge
        slack = covered.buffer(_FOOTPRINT_SLACK * abs(label.res[0]))
        if shapely.difference(reach, slack).area < pixel:
            continue
        beyond = shapely.difference(reach, covered)
        # the files the images meet: a far tile's nodata is no matter (and opening every file
        # of a large label set cost ~2 ms each)
        files = sorted({str(p) for p in index["filepath"][index.intersects(reach)]})
        undeclared = []
        for path in files:
            try:
                with rasterio.open(path) as src:
                    if src.nodata is None:
                        undeclared.append(path)
            except rasterio.RasterioIOError:  # TorchGeo's read will name an unreadable file
                continue
        if not undeclared:
            continue
        name = type(label).__name__
        share = beyond.area / reach.area
        return (
            f"{len(undeclared)} of the {len(files)} label file(s) of {name} that the images "
            f"meet (first: {undeclared[0]}) declare no nodata, and the images reach beyond the "
            "label files "
            f"(about {beyond.area / pixel:,.0f} label pixels, {share * 100:.2g} % of the "
            "images' area): TorchGeo fills label pixels beyond a file with 0, so they read as "
            "class 0, and train as it where the image has data. Set `nodata = 255` (the unlabelled "
            f"value) on {name} (TorchGeo's RasterDataset.nodata) or in the files, and give "
            "the task ignore_index=255"
        )
    return None


class DOFAIntersectionDataset(_DOFAComposition, IntersectionDataset):
    """TorchGeo's ``&`` for DOFA datasets: bands of both members stacked, masks merged.

    ``Sentinel2SR(...) & Sentinel2SR(...)`` builds one; samples are joined with
    :func:`concat_dofa_samples` (image channels and wavelengths concatenated, ``valid`` the
    AND of the members'). Use it to stack bands that live in different datasets (e.g. 10 m
    bands from one folder, 20 m bands from another), or to pair images with labels (a
    TorchGeo ``RasterDataset`` with ``is_image=False``: its ``mask`` passes through).

    Attributes:
        bands: the image members' bands, in channel order.
        wavelengths: their wavelengths (um), float32 (C,).
    """

    def __init__(
        self,
        dataset1: GeoDataset,
        dataset2: GeoDataset,
        spatial_only: bool = False,
        collate_fn: Callable[[Sequence[Sample]], Sample] = concat_dofa_samples,
        transforms: Callable[[Sample], Sample] | None = None,
    ) -> None:
        """Check the band sets, then intersect as TorchGeo does.

        Args:
            dataset1: the first dataset (its CRS and resolution are used).
            dataset2: the second dataset.
            spatial_only: ignore time when intersecting.
            collate_fn: how samples are joined (default :func:`concat_dofa_samples`).
            transforms: applied to the joined sample (e.g. ``DOFAPreprocess(bands=ds.bands)``).

        Raises:
            BandError: if the members share a band (it would appear twice), or an image
                member has no band names.
            ValueError: if one member is a time series and the other is not.
            NoOverlapError: (a ``RuntimeError``, as TorchGeo's) if the datasets share no
                pixel, naming both extents in one CRS; RuntimeError: (TorchGeo) if they share
                no time (``spatial_only=True`` ignores it).
        """
        members = [_member_bands(d) for d in (dataset1, dataset2)]
        images = [m for m in members if m is not None]
        bands = tuple(b for m in images for b in m[0])
        try:
            check_unique_bands(bands, "the bands of the datasets combined with `&`")
        except BandError as err:
            raise BandError(
                f"{err}. `&` stacks the members' channels side by side. Give each dataset its "
                "own bands=[...]; to stack several dates of the same bands use "
                "time_series=True on one dataset, and to mosaic datasets use `|`"
            ) from err
        kinds = {_time_series_of(d) for d in (dataset1, dataset2)} - {None}
        if len(kinds) > 1 and len(images) > 1:
            raise ValueError(
                "cannot stack a time-series dataset (time_series=True) with a single-date one "
                "using `&`: give both the same time_series="
            )
        try:
            super().__init__(dataset1, dataset2, spatial_only, collate_fn, transforms)
        except RuntimeError as err:
            if "no spatial intersection" not in str(err):
                raise
            raise NoOverlapError(_no_intersection(dataset1, dataset2)) from None
        self.bands: tuple[str, ...] = bands
        self.wavelengths: Tensor = torch.cat([m[1] for m in images]) if images else torch.empty(0)
        refuse_fractional_labels(dataset1, dataset2)
        fill = label_fill_problem(dataset1, dataset2)
        if fill is not None:
            warn(fill, UserWarning)


class DOFAUnionDataset(_DOFAComposition, UnionDataset):
    """TorchGeo's ``|`` for DOFA datasets: one band set, mosaicked first-valid-wins.

    ``Sentinel2SR(...) | Sentinel2SR(...)`` builds one. Both members must read the same bands
    in the same order (checked here, so channels are never mixed); where both cover a pixel,
    the first member's valid pixel wins (:func:`merge_dofa_samples`).

    Attributes:
        bands: the common bands, in channel order.
        wavelengths: their wavelengths (um), float32 (C,).
    """

    def __init__(
        self,
        dataset1: GeoDataset,
        dataset2: GeoDataset,
        collate_fn: Callable[[Sequence[Sample]], Sample] = merge_dofa_samples,
        transforms: Callable[[Sample], Sample] | None = None,
    ) -> None:
        """Check the band sets, then unite as TorchGeo does.

        Args:
            dataset1: the first dataset (its CRS and resolution are used; its pixels win).
            dataset2: the second dataset.
            collate_fn: how samples are merged (default :func:`merge_dofa_samples`).
            transforms: applied to the merged sample.

        Raises:
            BandError: if the members' bands (or wavelengths) differ, or a member has no
                band names; the message gives the ``bands=`` that fixes it.
        """
        first, second = (_member_bands(d) for d in (dataset1, dataset2))
        if first is None or second is None:
            raise BandError(
                "`|` mosaics image datasets of the same bands; to pair images with labels "
                "(is_image=False) use `&`"
            )
        same_names = [_canonical_name(b) for b in first[0]] == [
            _canonical_name(b) for b in second[0]
        ]
        same_wavelengths = first[1].shape == second[1].shape and bool(
            torch.allclose(first[1], second[1])
        )
        if not (same_names and same_wavelengths):
            how = (
                "the same bands in a different order"
                if sorted(first[0]) == sorted(second[0])
                else "different bands"
            )
            ours, theirs = ([round(float(w), 4) for w in b[1]] for b in (first, second))
            raise BandError(
                f"datasets combined with `|` read {how}: {list(first[0])} (wavelengths "
                f"{ours}) and {list(second[0])} (wavelengths {theirs}). Merging them would put "
                f"one band's pixels into another's channel: open both with bands={list(first[0])}"
            )
        super().__init__(dataset1, dataset2, collate_fn, transforms)
        self.bands: tuple[str, ...] = first[0]
        self.wavelengths: Tensor = first[1].clone()


# ---------------------------------------------------------------------- batching


class MixedBandSetError(BandError):
    """Raised when one batch would mix samples with different wavelength vectors."""


#: Folders whose 8-bit chips were warned of in this process (:func:`chip_loader`)
_NARROW_CHIP_FOLDERS: set[str] = set()


def _narrow_chips_warning(path: Path, dtype: str, folder: str) -> None:
    """Warn of 8-bit chips once per ``folder`` and process."""
    narrow = narrow_dtype_problem(dtype, f"the chips of {folder}", plural=True)
    if narrow is not None and folder not in _NARROW_CHIP_FOLDERS:
        _NARROW_CHIP_FOLDERS.add(folder)
        warn(f"{narrow} (e.g. {path})", ReflectanceWarning)


def _chip_bands(src: DatasetReader, bands: int | None) -> tuple[list[int], list[int]]:
    """The numbers (from 1) of the bands a chip is read as, and of its alpha bands.

    An alpha band (GDAL's colour interpretation) beside ``bands`` bands is left out; one that
    ``bands`` counts (a 4-band 8-bit GeoTIFF's 4th is alpha by GDAL's default, even where it
    is near infrared) is a band; ``bands`` None keeps every band.
    """
    alpha = [i for i, c in enumerate(src.colorinterp, 1) if c == ColorInterp.alpha]
    every = list(range(1, src.count + 1))
    if bands is None or src.count == bands:
        return every, alpha
    return [i for i in every if i not in alpha], alpha


def _read_chip(
    path: Path, bands: int | None = None, warn_narrow: bool = True
) -> tuple[npt.NDArray[np.float32], list[str | None], list[int]]:
    """Read a chip's bands, their descriptions and their numbers in the file.

    Returns:
        (C, H, W) float32, NaN where the chip has no data; the bands' descriptions; their
        numbers in the file (from 1).

    Args:
        path: the chip file.
        bands: how many bands the chip should have, or None (every band): an alpha band
            beside that many (:func:`_chip_bands`) masks them where it is 0 and is left out;
            one that count includes is a band, read plainly, masked by the declared nodata
            alone, as GDAL would mask every band by its zeros.
        warn_narrow: warn of an 8-bit chip (once per folder and process).
    """
    try:
        with rasterio.open(path) as src:
            if warn_narrow:
                _narrow_chips_warning(path, src.dtypes[0], str(pathlib.Path(path).parent))
            kept, alpha = _chip_bands(src, bands)
            descriptions = [src.descriptions[i - 1] for i in kept]
            if alpha and bands is not None and src.count == bands:  # "alpha" is a band
                chip = src.read().astype(np.float32)
                for k, nodata in enumerate(src.nodatavals):
                    if nodata is not None:
                        chip[k][chip[k] == np.float32(nodata)] = np.nan
                return chip, descriptions, kept
            chip = np.empty((len(kept), src.height, src.width), dtype=np.float32)
            _read_into(src, kept, Window(0, 0, src.width, src.height), chip)
            if bands is not None:
                for i in alpha:  # GDAL masks by alpha only in 2- and 4-band files: here always
                    chip[:, ~(src.read(i) > 0)] = np.nan
            return chip, descriptions, kept
    except (rasterio.errors.RasterioError, CPLE_BaseError, OSError) as err:
        raise InputError(f"cannot read chip {path}: {err}") from err


def _chip_header(path: Path, bands: int) -> tuple[list[int], list[str | None], str]:
    """A chip's band numbers (from 1), band descriptions and dtype, its pixels unread.

    The bands are those :func:`_read_chip` gives for ``bands`` bands (:func:`_chip_bands`).

    Raises:
        InputError: when the file cannot be opened.
    """
    try:
        with rasterio.open(path) as src:
            kept, _ = _chip_bands(src, bands)
            return kept, [src.descriptions[i - 1] for i in kept], src.dtypes[0]
    except (rasterio.errors.RasterioError, CPLE_BaseError, OSError) as err:
        raise InputError(f"cannot read chip {path}: {err}") from err


def _chip_order(
    path: Path, numbers: Sequence[int], descriptions: Sequence[str | None], bands: list[str]
) -> list[int] | None:
    """The indexes that put a chip's bands into ``bands``' order, or None where they are.

    Args:
        path: the chip (for messages).
        numbers: the numbers in the file (from 1) of the bands read.
        descriptions: their descriptions.
        bands: the dataset's bands.

    Raises:
        BandError: for another band count, or band descriptions naming other bands.
    """
    count = len(numbers)
    if count != len(bands):
        raise BandError(
            f"chip {path} has {count} bands, but bands= names {len(bands)} "
            f"({', '.join(bands)}): give every chip the same bands, and bands= in their order"
        )
    named = [_canonical_name(d) if d else "" for d in descriptions]
    if all(is_known_band(n) for n in named) and named != bands:
        if sorted(named) != sorted(bands):
            raise BandError(
                f"chip {path} holds the bands {', '.join(named)} (its band descriptions), "
                f"not bands={bands}: give every chip the same bands"
            )
        return [named.index(b) for b in bands]
    wrong = [  # some described: those must be where bands= says
        f"band {number} is {n} (bands= says {b})"
        for number, n, b in zip(numbers, named, bands, strict=True)
        if is_known_band(n) and n != b
    ]
    if wrong:
        raise BandError(
            f"chip {path}'s band descriptions contradict bands={bands}: {'; '.join(wrong)}"
            f"{' (its alpha band left out)' if len(numbers) and numbers[-1] != count else ''}: "
            "give bands= in the chips' order"
        )
    return None


def chip_loader(path: Path) -> npt.NDArray[np.float32]:
    """Read a chip file for TorchGeo's ``NonGeoClassificationDataset`` (its ``loader=``).

    TorchGeo's ``rasterio_loader`` reads every band too, but casts to int32: an 8-bit chip
    (a display product, not reflectance) then passes
    :class:`~torchgeo_dofa.transforms.CheckReflectance` as dark reflectance, and the pixels a
    file declares nodata (or its mask hides) are read as values. Here those pixels become
    NaN, which ``CheckReflectance`` treats as missing (``valid`` False, filled), and an
    8-bit chip warns (once per folder and process). Every band is read, an alpha band too:
    :class:`ChipFolder`, which knows the bands, leaves it out.

    Args:
        path: a raster file rasterio reads (GeoTIFF, JPEG2000, ...).

    Returns:
        float32 (H, W, C) array, channels last as ``NonGeoClassificationDataset`` expects;
        every band in the file's order; NaN where it declares no data.

    Raises:
        InputError: when the file cannot be read (naming it and GDAL's reason).

    Warns:
        ReflectanceWarning: for 8-bit integer chips (see
            :func:`~torchgeo_dofa.transforms.narrow_dtype_problem`), once per folder.
    """
    return _read_chip(path)[0].transpose(1, 2, 0)


class ChipFolder(NonGeoClassificationDataset):
    """Labelled chips for classification: ``root/<class>/<chip>.tif``, one folder per class.

    TorchGeo's ``NonGeoClassificationDataset`` (torchvision's ``ImageFolder`` layout: the
    classes are the subfolders' names in sorted order, class ``i`` the ``i``-th) over
    GeoTIFF / JPEG2000 chips of raw reflectance, read as :func:`chip_loader` reads them
    (nodata and masks as missing pixels; an alpha band beside ``bands`` masks them and is
    left out) and prepared by ``transforms`` (default
    :class:`~torchgeo_dofa.transforms.DOFAPreprocess` of ``bands``: wavelengths, the
    raw-reflectance check, DOFA's normalisation, a resize to 224 x 224). Chips may differ in
    size and come from any CRS (they are not placed on a map). Hidden files and folders
    (``.name``: ``.ipynb_checkpoints``, macOS's ``._x.tif``) are left out.

    Every chip's header is checked as the dataset is made (as TorchGeo's ``RasterDataset``
    opens every file: about 1 ms a chip), and each chip again as it is read; every error
    names its file: its band count against ``bands`` (alpha left out), its band descriptions
    where they name known bands
    (a chip described ``B02, B03, B04, B08`` is reordered into ``bands=["B04", "B03", "B02",
    "B08"]``' order, where it would have swapped red and blue; other bands are an error), and
    the transforms' checks (values already scaled).

    Samples: ``image`` (C, 224, 224) float32, ``label`` () int64, and what the transforms
    add (``wavelengths`` (C,) um; ``valid`` (224, 224), ``empty`` (), ``valid_fraction`` ()).

    Attributes:
        bands: the chips' band names, in channel order (canonical spelling).
        classes: the class names, in the order of the labels (torchvision's).
    """

    #: file suffixes read as chips (lower case)
    extensions: ClassVar[tuple[str, ...]] = (".tif", ".tiff", ".jp2")

    def __init__(
        self,
        root: Path,
        bands: Sequence[str],
        wavelengths: Sequence[float] | None = None,
        transforms: Callable[[Sample], Sample] | None = None,
        nodata: float | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        """Index the chips of ``root``.

        Args:
            root: the folder holding one subfolder of chips per class.
            bands: the chips' bands in channel order (``B4`` or ``B04`` spelling; other
                names with ``wavelengths``, ``mean`` and ``std``).
            wavelengths: one per band (um), for bands without a known wavelength.
            transforms: applied to each sample (``image`` raw reflectance (C, H, W) with NaN
                where missing, ``label``); default ``DOFAPreprocess(bands, wavelengths,
                nodata=nodata, mean=mean, std=std)``. A ``DOFAPreprocess`` of other bands is
                refused.
            nodata: a value marking missing pixels in chips that do not declare it.
            mean: per-band means (DOFA's 0..255 scale) for bands without DOFA statistics.
            std: per-band standard deviations on the same scale.

        Raises:
            BandError: for bands the preprocessing cannot take (see
                :class:`~torchgeo_dofa.transforms.DOFAPreprocess`), ``transforms`` that
                preprocess other bands, or chips whose band count or band descriptions do
                not fit ``bands`` (the first named, with how many more and which).
            InputError: for a chip that cannot be opened.
            NoRasterFoundError: (TorchGeo's ``DatasetNotFoundError``, a
                ``FileNotFoundError``) for a root without class folders, or a class folder
                without chips (torchvision's message, and which files are read).

        Warns:
            ReflectanceWarning: where the first chip of a class is 8-bit (once per root).
        """
        refuse_one_string(bands)
        self.bands = [_canonical_name(b) for b in bands]
        if transforms is None:
            transforms = DOFAPreprocess(self.bands, wavelengths, nodata=nodata, mean=mean, std=std)
        elif isinstance(transforms, DOFAPreprocess) and not same_band_names(
            list(transforms.bands), self.bands
        ):
            raise BandError(
                f"ChipFolder(bands={self.bands}) was given transforms preprocessing the bands "
                f"{list(transforms.bands)}: give both the chips' bands, in their order"
            )
        try:
            super().__init__(
                root, transforms=transforms, loader=chip_loader, is_valid_file=self._is_chip
            )
        except FileNotFoundError as err:  # torchvision's: TorchGeo's kind, named
            read = ", ".join(self.extensions)
            raise NoRasterFoundError(
                f"ChipFolder: {err} (it reads {read} files, hidden ones left out)"
            ) from err
        # every chip's header, before any training (TorchGeo's RasterDataset opens every file
        # as it is made too): a bad chip met late in an epoch stopped the fit there
        refused: list[tuple[str, InputError | BandError]] = []
        with warnings.catch_warnings():  # once per dataset: chips need no georeferencing
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            for path, _ in self.samples:
                try:
                    numbers, descriptions, dtype = _chip_header(path, len(self.bands))
                    _chip_order(path, numbers, descriptions, self.bands)
                except (InputError, BandError) as err:
                    refused.append((path, err))
                    continue
                # 8-bit chips: said once for the root, here (loader workers would say it anew)
                _narrow_chips_warning(path, dtype, str(root))
        if refused:
            # a BandError where any chip's bands do not fit (an InputError: none opened)
            kind = BandError if any(isinstance(e, BandError) for _, e in refused) else InputError
            first = next(e for _, e in refused if isinstance(e, kind))
            others = [
                f"{p} ({'cannot be read' if isinstance(e, InputError) else 'other bands'})"
                for p, e in refused
                if e is not first
            ]
            more = (
                f" (and {len(others)} more of the {len(self.samples)} chips: "
                f"{', '.join(others[:3])}{' ...' if len(others) > 3 else ''})"
                if others
                else ""
            )
            raise kind(f"{first}{more}") from first

    @classmethod
    def _is_chip(cls, path: str | os.PathLike[str]) -> bool:
        name = os.path.basename(path)
        return not name.startswith(".") and name.lower().endswith(cls.extensions)

    def find_classes(self, directory: str | os.PathLike[str]) -> tuple[list[str], dict[str, int]]:
        """The class folders of ``directory`` (hidden ones left out), sorted by name."""
        classes, _ = super().find_classes(directory)
        classes = [c for c in classes if not c.startswith(".")]
        return classes, {c: i for i, c in enumerate(classes)}

    def __getitem__(self, index: int) -> Sample:
        """The chip ``index`` (in ``self.samples``' order) and its label.

        Raises:
            BandError: for a chip whose band count or described bands differ from ``bands``.
            InputError: for a file that cannot be read.
            ReflectanceError: from the transforms (values that are not raw reflectance).
        """
        path, label = self.samples[index]
        chip, descriptions, numbers = _read_chip(path, len(self.bands), warn_narrow=False)
        order = _chip_order(path, numbers, descriptions, self.bands)
        if order is not None:  # the same bands described in another order
            chip = chip[order]
        sample: Sample = {"image": torch.from_numpy(chip), "label": torch.tensor(label)}
        if self.tg_transforms is not None:
            try:
                sample = self.tg_transforms(sample)
            except (BandError, ReflectanceError) as err:
                raise type(err)(f"chip {path}: {err}") from err
        return sample


def stack_dofa_samples(samples: Iterable[Sample]) -> Sample:
    """Collate samples like :func:`torchgeo.datasets.stack_samples`, checking band sets.

    Args:
        samples: sample dicts of one batch.

    Returns:
        The batch: every key stacked along a new first dimension (``wavelengths`` becomes
        (B, C), all rows equal).

    Raises:
        MixedBandSetError: if samples carry different wavelength vectors (DOFA takes one
            per forward pass); the message says how to batch them.
        ValueError: if images differ in size, or samples hold different keys (a key only
            some samples hold would be stacked with fewer rows than the batch has chips,
            and its rows read as the first chips'; TorchGeo's ``stack_samples`` does so).
    """
    batch = list(samples)
    if not batch:
        raise ValueError("cannot collate an empty batch")
    reference = batch[0].get("wavelengths")
    for i, sample in enumerate(batch[1:], start=1):
        other = sample.get("wavelengths")
        same = (reference is None and other is None) or (
            isinstance(reference, Tensor)
            and isinstance(other, Tensor)
            and reference.shape == other.shape
            and bool(torch.equal(reference, other))
        )
        if not same:
            raise MixedBandSetError(
                "samples in one batch have different wavelength vectors: sample 0 has "
                f"{_describe(reference)}, sample {i} has {_describe(other)}. DOFA takes one "
                "wavelength vector per forward pass, so a batch must not mix band sets: batch "
                "with torchgeo_dofa.datasets.BandSetBatchSampler (it groups samples by band "
                "set), or use one band set per dataset and DataLoader (the same bands= for "
                "every dataset)"
            )
    keys = set(batch[0])
    for i, sample in enumerate(batch[1:], start=1):
        if set(sample) != keys:
            lacks, more = sorted(keys - set(sample)), sorted(set(sample) - keys)
            differs = "; ".join(
                f"{what} {', '.join(map(repr, names))}"
                for what, names in (("lacks", lacks), ("also holds", more))
                if names
            )
            raise ValueError(
                f"samples in one batch hold different keys: sample {i} {differs} (sample 0 "
                f"holds {', '.join(map(repr, sorted(keys)))}). Stacked, such a key would have "
                "fewer rows than the batch has chips, and its rows would be taken for the "
                "first chips' (a 'valid' mask applied to other chips): give every dataset of "
                "the batch the same transforms, or batch its samples apart"
            )
    shapes = {tuple(s["image"].shape) for s in batch if isinstance(s.get("image"), Tensor)}
    if len(shapes) > 1:
        raise ValueError(
            f"images in one batch differ in size {sorted(shapes)}: resize every chip to one "
            "size in the dataset's transforms (e.g. DOFAPreprocess, which resizes to 224), "
            "use one patch size / buffer for all chips, or batch_size=1"
        )
    return _stack(batch)


def _stack(batch: Sequence[Sample]) -> Sample:
    """:func:`torchgeo.datasets.stack_samples`, stacking into shared memory in a worker.

    In a DataLoader worker, tensors are stacked as :func:`torch.utils.data.default_collate`
    stacks them: straight into a shared-memory batch, which the worker then passes to the main
    process as it is (a batch stacked into ordinary memory is copied once more, into shared
    memory, to be passed: ~0.4 ms a 4-band 224 x 224 float32 chip on the 2-core VM).
    Anything else (values that are not all dense tensors of one dtype: mixed dtypes, sparse
    tensors, values other than tensors) goes to ``torch.stack`` as in TorchGeo, which
    promotes mixed dtypes and refuses what is not a tensor.
    """
    values: dict[str, list[Any]] = {}
    for sample in batch:
        for key, value in sample.items():
            values.setdefault(key, []).append(value)
    return {key: _stack_values(v) for key, v in values.items()}


def _stack_values(values: list[Any]) -> Any:
    dtype = getattr(values[0], "dtype", None)
    if all(
        isinstance(v, Tensor) and v.layout == torch.strided and not v.is_nested and v.dtype == dtype
        for v in values
    ):
        return default_collate(values)
    return torch.stack(values)


def _describe(wavelengths: Tensor | None) -> str:
    if wavelengths is None:
        return "no wavelengths"
    values = [round(float(w), 4) for w in wavelengths.flatten()]
    return f"{len(values)} wavelengths {values}"


def band_set_key(dataset: Any) -> Hashable:
    """The band-set key of a dataset: its wavelength vector (or band names).

    Args:
        dataset: a dataset with ``wavelengths`` (tensor or sequence, um) or ``bands``.

    Returns:
        A hashable key equal for datasets that may share a batch.

    Raises:
        BandError: if the dataset exposes neither.
    """
    wavelengths = getattr(dataset, "wavelengths", None)
    if wavelengths is not None:
        values = wavelengths.tolist() if isinstance(wavelengths, Tensor) else list(wavelengths)
        return tuple(round(float(w), 6) for w in values)
    bands = getattr(dataset, "bands", None)
    if bands is not None:
        return tuple(str(b) for b in bands)
    raise BandError(
        f"{type(dataset).__name__} exposes neither `wavelengths` nor `bands`: pass "
        "band_sets=[...] (one key per dataset) to BandSetBatchSampler"
    )


class DatasetCollection(Dataset[Sample]):
    """Several datasets indexed by ``(dataset_number, index)`` pairs.

    Use it with :class:`BandSetBatchSampler` for a list of GeoDatasets with different band
    sets (a ``ConcatDataset`` cannot hold GeoDatasets, which are indexed by slices).
    """

    def __init__(self, datasets: Sequence[Dataset[Sample]]) -> None:
        """Wrap the datasets.

        Args:
            datasets: the datasets, in the order their numbers refer to.
        """
        self.datasets = list(datasets)

    def __getitem__(self, index: tuple[int, Any]) -> Sample:
        """Get one sample.

        Args:
            index: ``(dataset_number, index_into_that_dataset)``.

        Returns:
            The sample.
        """
        number, inner = index
        return self.datasets[number][inner]

    def __len__(self) -> int:
        """Number of datasets.

        Returns:
            The number of wrapped datasets.
        """
        return len(self.datasets)


class BandSetBatchSampler(Sampler[list[Any]]):
    """Batches that never mix band sets.

    Given several datasets with different bands (a ``ConcatDataset`` or a list), it groups
    the datasets by band set (their wavelength vectors), draws each dataset's indices from its
    sampler and yields batches drawn from one group at a time.

    * ``ConcatDataset`` of int-indexed datasets: yields lists of global int indices; use it
      as ``DataLoader(concat, batch_sampler=..., collate_fn=stack_dofa_samples)``.
    * list of datasets (e.g. GeoDatasets with GeoSamplers): yields lists of
      ``(dataset_number, index)`` pairs; use it with :class:`DatasetCollection`.

    Example:
        >>> s2 = Sentinel2SR("s2/")  # doctest: +SKIP
        >>> rgb = Sentinel2SR("rgb/", bands=["B4", "B3", "B2"])  # doctest: +SKIP
        >>> samplers = [GriddedPatchSampler(d, size=224) for d in (s2, rgb)]  # doctest: +SKIP
        >>> loader = DataLoader(  # doctest: +SKIP
        ...     DatasetCollection([s2, rgb]),
        ...     batch_sampler=BandSetBatchSampler([s2, rgb], 8, samplers=samplers),
        ...     collate_fn=stack_dofa_samples,
        ... )
    """

    def __init__(
        self,
        datasets: ConcatDataset[Any] | Sequence[Any],
        batch_size: int,
        *,
        samplers: Sequence[Iterable[Any]] | None = None,
        band_sets: Sequence[Hashable] | None = None,
        shuffle: bool = False,
        drop_last: bool = False,
        generator: random.Random | int | None = None,
    ) -> None:
        """Group the datasets by band set.

        Args:
            datasets: a ``ConcatDataset`` or a sequence of datasets.
            batch_size: samples per batch.
            samplers: one index sampler per dataset (default: ``range(len(dataset))``; a
                GeoDataset needs a GeoSampler here).
            band_sets: one key per dataset (default: :func:`band_set_key`).
            shuffle: shuffle indices within each band set and the order of batches.
            drop_last: drop each band set's last incomplete batch.
            generator: seed or ``random.Random`` used when shuffling.

        Raises:
            ValueError: on a bad batch size, or lengths that do not match.
            TypeError: if a GeoDataset comes without a sampler.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.concat = isinstance(datasets, ConcatDataset)
        children: list[Any] = (
            list(datasets.datasets) if isinstance(datasets, ConcatDataset) else list(datasets)
        )
        self.offsets = [0]
        if isinstance(datasets, ConcatDataset):
            self.offsets = [0, *datasets.cumulative_sizes[:-1]]
        if samplers is None:
            geo = [i for i, d in enumerate(children) if isinstance(d, GeoDataset)]
            if geo:
                raise TypeError(
                    f"dataset(s) {geo} are GeoDatasets, indexed by slices: pass samplers=[...] "
                    "with one GeoSampler (e.g. GriddedPatchSampler) per dataset"
                )
            samplers = [range(len(d)) for d in children]
        if len(samplers) != len(children):
            raise ValueError(f"got {len(samplers)} samplers for {len(children)} datasets")
        keys = list(band_sets) if band_sets is not None else [band_set_key(d) for d in children]
        if len(keys) != len(children):
            raise ValueError(f"got {len(keys)} band_sets for {len(children)} datasets")
        self.samplers = list(samplers)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rng = generator if isinstance(generator, random.Random) else random.Random(generator)
        self.groups: dict[Hashable, list[int]] = {}
        for number, key in enumerate(keys):
            self.groups.setdefault(key, []).append(number)

    def _indices(self, number: int) -> list[Any]:
        if self.concat:
            return [self.offsets[number] + int(i) for i in self.samplers[number]]
        return [(number, i) for i in self.samplers[number]]

    def __iter__(self) -> Iterator[list[Any]]:
        """Yield batches, each from one band set.

        Yields:
            Lists of indices (ints for a ConcatDataset, ``(number, index)`` pairs otherwise).
        """
        batches: list[list[Any]] = []
        for numbers in self.groups.values():
            indices = [i for n in numbers for i in self._indices(n)]
            if self.shuffle:
                self.rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                if len(chunk) < self.batch_size and self.drop_last:
                    continue
                batches.append(chunk)
        if self.shuffle:
            self.rng.shuffle(batches)
        yield from batches

    def __len__(self) -> int:
        """Number of batches per epoch.

        Returns:
            The batch count.
        """
        total = 0
        for numbers in self.groups.values():
            n = sum(len(cast(Sized, self.samplers[k])) for k in numbers)
            total += n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        return total


def refuse_repeated_bands(bands: Sequence[str]) -> None:
    """Refuse a band set holding more than one date of a multi-date stack, for DOFA.

    Two kinds: two dates of one band (``B4`` and ``B4_1``), and bands of different dates
    (``B4, B3, B2`` of the first date with ``B8_1`` of the second: a forgotten suffix). The
    datasets read such sets (a time series of your own model); DOFA embeds one image, in
    which two dates of a band would be two channels of one wavelength, and bands of two dates
    an image that was never acquired. Only Sentinel-2 names carry a date (Earth Engine's
    ``_1``, ``_2`` suffixes, :func:`~torchgeo_dofa.bands.split_date_copy`); other bands
    (``VV``, your own) are not checked.

    Args:
        bands: band names in channel order.

    Raises:
        BandError: naming the repeated bands, or each date's bands, and how to select one
            date.
    """
    split = [split_date_copy(b) for b in bands]  # (base band, date suffix) per band
    seen: dict[str, list[str]] = {}
    for band, (base, _) in zip(bands, split, strict=True):
        seen.setdefault(base, []).append(band)
    repeated = {base: names for base, names in seen.items() if len(names) > 1}
    if repeated:
        listing = "; ".join(f"{base}: {', '.join(names)}" for base, names in repeated.items())
        first = [names[0] for names in seen.values()]
        later = [names[1] if len(names) > 1 else names[0] for names in seen.values()]
        raise BandError(
            f"bands={list(bands)} repeat the wavelength of a band ({listing}): these are "
            "several dates of one band (Earth Engine's B4, B4_1, ...), and DOFA embeds one "
            f"date at a time. Select one date, e.g. bands=[{', '.join(first)}] or "
            f"bands=[{', '.join(later)}]"
        )
    dates: dict[str | None, list[str]] = {}  # date suffix (None: the first date) -> bands
    for band, (base, suffix) in zip(bands, split, strict=True):
        if base in SENTINEL2_BANDS:
            dates.setdefault(suffix, []).append(band)
    if len(dates) < 2:
        return
    listing = "; ".join(
        f"{', '.join(names)} of {'the first date' if suffix is None else f'date _{suffix}'}"
        for suffix, names in dates.items()
    )

    def of_date(suffix: str | None) -> str:
        """The bands, the Sentinel-2 ones all of the date ``suffix``."""
        names = [
            (base + (f"_{suffix}" if suffix else "")) if base in SENTINEL2_BANDS else band
            for band, (base, _) in zip(bands, split, strict=True)
        ]
        return f"bands=[{', '.join(names)}]"

    options = [of_date(suffix) for suffix in list(dates)[:2]]
    raise BandError(
        f"bands={list(bands)} mix the dates of a multi-date stack ({listing}): DOFA embeds "
        "one date at a time, every band from it (Earth Engine names a later date's copy of "
        f"B4 as B4_1, B4_2, ...). Select one date, e.g. {options[0]} or {options[1]}"
    )


class InputError(ValueError):
    """A bad raster input (missing path, no raster, unreadable file, mixed CRS)."""


class NoOverlapError(InputError, RuntimeError):
    """Datasets combined with ``&`` share no pixel: the message names both extents in one CRS.

    A ``RuntimeError`` as TorchGeo's own "no spatial intersection" is, and an
    :class:`InputError`, so the command line reports it in one line (exit 2) wherever it is
    raised, a LightningCLI data module's ``setup`` included.
    """


class UndatedScenesError(InputError):
    """A time range asked for over scenes without an acquisition date, which it cannot select.

    A scene dated nowhere spans all time in the index, so no range leaves it out: it was
    embedded as if it matched. :attr:`files` names them, for a caller that words the refusal
    in its own option (``--datetime``, ``temporal=``): :func:`undated_scenes_problem`.
    """

    def __init__(self, message: str, files: Sequence[str]) -> None:
        """Keep the message and the files.

        Args:
            message: the refusal, one line.
            files: the undated scenes' files (one per scene), in index order.
        """
        super().__init__(message)
        self.files = list(files)


def undated_scenes_problem(files: Sequence[str], asked: str, option: str) -> str:
    """The refusal of a time range over scenes without an acquisition date.

    Args:
        files: the undated scenes' files (one per scene).
        asked: the range as the caller gave it (``--datetime 2023-01-01/2023-12-31``).
        option: the option to leave out (``--datetime``).

    Returns:
        One line naming the first few files and their count, where a date was looked for,
        and the fixes.
    """
    one = len(files) == 1
    subject = files[0] if one else f"{len(files)} scenes ({_first_few(files)})"
    it, they, names, give = (  # the object and subject pronouns
        ("it", "it", "its file, item or folder name", "it its")
        if one
        else ("them", "they", "their file, item or folder names", "each its")
    )
    return (
        f"{asked} cannot apply to {subject}: no acquisition date was found for {it} (no STAC "
        f"item JSON beside {it}, no date in {names}), so the dates cannot leave {it} out and "
        f"{they} would be embedded whatever they are: leave out {option}, give only dated files "
        f"as inputs, or give {give} date (in the file name, e.g. scene_20230601.tif, or a "
        "STAC item JSON beside it)"
    )


class NoRasterFoundError(DatasetNotFoundError):
    """A dataset's paths hold no file it reads (TorchGeo's DatasetNotFoundError, named)."""

    def __init__(self, message: str) -> None:
        """Keep the message (TorchGeo's own says "cannot be automatically downloaded").

        Args:
            message: what was looked for where, and what was found instead.
        """
        FileNotFoundError.__init__(self, message)


#: Raster formats GDAL reads that the datasets do not, and how to get a GeoTIFF from them.
_OTHER_FORMATS = {
    ".vrt": "a GDAL VRT is not read: convert it (gdal_translate {name} {stem}.tif) or give "
    "the files it lists",
    ".img": "convert it to GeoTIFF (gdal_translate {name} {stem}.tif)",
    ".nc": "convert it to GeoTIFF (gdal_translate {name} {stem}.tif)",
    ".hdf": "convert it to GeoTIFF (gdal_translate {name} {stem}.tif)",
    ".safe": "give the SAFE folder itself (its IMG_DATA JPEG2000 files are read)",
    ".zip": "unzip it first",
}


def _other_formats_hint(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], extensions: Sequence[str]
) -> str:
    """`` (extensions ...; found x.vrt: how to convert it)`` for a message about no raster."""
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    found: list[pathlib.Path] = []
    for item in items:
        path = pathlib.Path(item)
        files = path.rglob("*") if path.is_dir() else [path]
        found += [p for p in files if p.suffix.lower() in _OTHER_FORMATS and p.exists()]
    hint = f" (reads {', '.join(extensions)}"
    if found:
        first = found[0]
        how = _OTHER_FORMATS[first.suffix.lower()].format(name=first.name, stem=first.stem)
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        hint += f"; found {first.name}{more}: {how}"
    return hint + ")"


def _folder_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """Every file under ``folder``, links to folders followed, sorted.

    ``Path.rglob`` (Python 3.12) does not enter a linked folder, so a scene's tiles in a
    folder linked in (``more -> /data/tiles``) were left out of the job without a word; a
    folder linked twice, or into itself, is read once. A link to a raster that is not there
    (a file git-annex or DVC has not fetched, a moved target, a link to itself) was skipped
    silently too, where the same path given alone is "does not exist". A link to a folder
    that holds the input folder (``up -> ..``) is not entered: it would read its siblings.
    macOS's AppleDouble files (``._scene.tif``, left beside files copied from a Mac to
    another file system) are not rasters and are skipped (GDAL's "not recognized as being in
    a supported file format" stopped the job).

    Raises:
        InputError: naming a link with a raster's extension whose target is missing, and
            the fix.
    """
    found: list[pathlib.Path] = []
    seen: set[str] = set()
    root = os.path.realpath(folder)
    for top, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs.clear()  # a folder linked twice, or a link back into the folder
            continue
        seen.add(real)
        # a link to a folder holding the input folder (``up -> ..``) would read its siblings
        dirs[:] = sorted(
            d
            for d in dirs
            if not (root + os.sep).startswith(os.path.realpath(os.path.join(top, d)) + os.sep)
        )
        for name in names:
            if name.startswith("._"):  # macOS AppleDouble metadata beside a copied file
                continue
            file = pathlib.Path(top, name)
            if file.is_file():
                found.append(file)
            elif file.is_symlink() and file.suffix.lower() in Sentinel2Base.extensions:
                raise InputError(
                    f"input folder {str(folder)!r} holds {str(file)!r}, a link to "
                    f"{os.readlink(file)!r}, which is not there: fetch it (git annex get, "
                    "dvc pull) or remove the link"
                )
    return sorted(found)


def unreadable_input(path: str | os.PathLike[str], err: BaseException) -> InputError:
    """The error for a raster whose pixels cannot be read (a damaged block, a cut download).

    rasterio's own text (``Read failed. See previous exception for details.``) names neither
    the file nor GDAL's reason: both are given, with the fix.

    Args:
        path: the file.
        err: rasterio's error.

    Returns:
        An :class:`InputError` to raise (``from err``).
    """
    reasons = [str(e).strip() for e in (err.__cause__, err) if e is not None and str(e).strip()]
    reason = next((r for r in reasons if "See previous exception" not in r), "read failed")
    return InputError(
        f"cannot read the pixels of {path}: {reason.splitlines()[0]}: the file is damaged "
        "(a corrupt block or a cut download?); download or export it again, or leave it out "
        "of the inputs"
    )


#: File names of the tiles of one large Earth Engine export.
EE_TILE_PATTERN = re.compile(r"^(?P<prefix>.+)-\d{10}-\d{10}\.tiff?$")


@dataclass(frozen=True)
class RasterInput:
    """One region of an embed job: the rasters read as one dataset.

    Attributes:
        name: output name of the region (file stem, folder name or export prefix), unique
            within one :func:`find_raster_inputs` call.
        paths: the raster files.
        earth_engine: True when every file is an Earth Engine export tile
            (read with :class:`EarthEngineS2`, else :class:`Sentinel2SR`).
        crs: the files' CRS (WKT), None for files without one.
        bounds: ``(xmin, ymin, xmax, ymax)`` of the files together, in ``crs``.
    """

    name: str
    paths: tuple[str, ...]
    earth_engine: bool
    crs: str | None = None
    bounds: tuple[float, float, float, float] | None = None

    @property
    def dataset_class(self) -> type[Sentinel2Base]:
        """:class:`EarthEngineS2` for Earth Engine exports, else :class:`Sentinel2SR`."""
        return EarthEngineS2 if self.earth_engine else Sentinel2SR

    def open(self, **kwargs: Any) -> Sentinel2Base:
        """Open the region as a dataset.

        Args:
            **kwargs: dataset arguments (``bands``, ``file_bands``, ``wavelengths``,
                ``nodata``, ``crs``, ``transforms``...).

        Returns:
            The dataset.
        """
        return self.dataset_class(paths=list(self.paths), **kwargs)


def find_raster_inputs(
    inputs: Iterable[str | os.PathLike[str]], crs: str | int | None = None
) -> list[RasterInput]:
    """Group input files and folders into regions, as the embed job and the API read them.

    One region per input file or folder (its rasters, found recursively, read as one mosaic);
    the tiles of one Earth Engine export (``<prefix>-0000000000-0000000000.tif``) given as
    files merge into one region, and so do the per-band files of one scene given as files
    (``scene/*_B0?.tif``, ``R10m/*.jp2 R20m/*.jp2``: one region named for the scene, read
    as its folder is, however the paths are spelt; see :func:`_band_file_scene`). Region
    names are unique: where file names collide (``a/scene.tif``, ``b/scene.tif``) the
    parent folders are prefixed (``a_scene``, ``b_scene``).

    Args:
        inputs: GeoTIFF / JPEG2000 files or folders.
        crs: the CRS the rasters will be read in (the dataset's ``crs=``, ``--crs``), or None
            for their own; given, a region may mix CRSs and its bounds are in this one.

    Returns:
        The regions, in input order.

    Raises:
        InputError: for an empty name, a missing path, an input without raster, an
            unreadable or non-georeferenced file, a region mixing CRSs without ``crs``, or
            a folder holding a link to a raster that is not there (see
            :func:`_folder_files`).
    """
    regions: dict[str, tuple[list[str], bool, pathlib.Path]] = {}
    headers: dict[str, _Header] = {}  # every file is opened once
    for raw in inputs:
        if not str(raw).strip():  # pathlib.Path("") is the working folder
            raise InputError(
                f"an input is {str(raw)!r}, an empty name: give GeoTIFF/JP2 files or folders "
                "(an empty name is not the current folder)"
            )
        path = pathlib.Path(raw)
        if not path.exists():
            raise InputError(missing_input_problem(path))
        files = _folder_files(path) if path.is_dir() else [path]
        rasters = [str(p) for p in files if p.suffix.lower() in Sentinel2Base.extensions]
        if not rasters:
            raise InputError(
                f"input {str(path)!r} holds no GeoTIFF or JPEG2000 file"
                f"{_other_formats_hint(path, Sentinel2Base.extensions)}"
            )
        for raster in rasters:  # before any is opened: GDAL and the outputs need UTF-8
            refuse_undecodable_name(raster, "input", InputError)
        headers |= {p: _read_header(p) for p in rasters if p not in headers}
        match = EE_TILE_PATTERN.match(path.name)
        if path.is_dir():  # skip this package's outputs (e.g. -o inside the input folder)
            grids = [p for p in rasters if headers[p].embedding_grid]
            rasters = [p for p in rasters if not headers[p].embedding_grid]
            if not rasters:
                raise InputError(
                    f"input {str(path)!r} holds only embedding grids written by torchgeo-dofa: "
                    "give the folder of the scenes"
                )
            if grids:
                warn(
                    f"input folder {str(path)!r}: skipped {len(grids)} embedding grid(s) "
                    f"written by torchgeo-dofa ({', '.join(grids[:3])}"
                    f"{', ...' if len(grids) > 3 else ''})",
                    UserWarning,
                )
            ee = all(EE_TILE_PATTERN.match(os.path.basename(p)) for p in rasters)
            regions[str(path.resolve())] = (rasters, ee, path)
            continue
        if headers[str(path)].embedding_grid:
            raise InputError(
                f"input {str(path)!r} is an embedding grid written by torchgeo-dofa, not a "
                "scene with spectral bands: give the scene it was made from"
            )
        scene = None if match else _band_file_scene(path, headers[str(path)].band_count)
        if match:
            key = str(path.resolve().with_name(match["prefix"]))
            regions.setdefault(key, ([], True, path.with_name(match["prefix"])))[0].append(
                str(path)
            )
        elif scene is not None:  # one band of a scene's files: the scene is the region
            # keyed by the real folder (not a folder input's key): one scene however spelt
            real = _band_file_scene(pathlib.Path(os.path.realpath(path)), 1) or scene.resolve()
            key = "bands of " + str(real)
            regions.setdefault(key, ([], False, scene))[0].append(str(path))
        else:
            regions[str(path.resolve())] = ([str(path)], False, path)
    _warn_of_rasters_given_twice(regions)
    out = []
    names = unique_region_names([anchor for _, _, anchor in regions.values()])
    for name, (paths, ee, _) in zip(names, regions.values(), strict=True):
        region_crs, bounds = _one_crs(name, {p: headers[p] for p in paths}, crs)
        out.append(RasterInput(name, tuple(paths), ee, region_crs, bounds))
    return out


def _warn_of_rasters_given_twice(regions: dict[str, tuple[list[str], bool, pathlib.Path]]) -> None:
    """Warn where one raster is in two regions (a folder and a file inside it, given both).

    Each region is embedded on its own, so such a file's pixels are embedded twice, into
    two outputs: most often ``embed scenes/ scenes/a.tif`` meant one of them.
    """
    seen: dict[str, pathlib.Path] = {}
    twice: list[str] = []
    for paths, _, anchor in regions.values():
        for path in paths:
            real = os.path.realpath(path)
            if real in seen and seen[real] != anchor:
                twice.append(f"{path} (also in {str(seen[real])!r})")
            seen.setdefault(real, anchor)
    if twice:
        warn(
            f"{_first_few(twice)}: a raster in two of the inputs is embedded in each (each "
            "input is a region with outputs of its own: a folder and a file inside it, or two "
            "paths to one file, embed it twice); give one of them",
            UserWarning,
        )


class _Header(NamedTuple):
    """What the input search reads of a file: CRS (WKT), bounds, whether it is an output."""

    crs: str | None
    bounds: tuple[float, float, float, float]
    #: an embedding grid written by this package (band descriptions ``dofa_0000`` ...,
    #: see :class:`~torchgeo_dofa.writers.GridWriter`), which no scene has
    embedding_grid: bool
    #: the file's band count, its alpha bands (GDAL's colour interpretation) left out
    band_count: int


def _band_file_scene(path: pathlib.Path, count: int) -> pathlib.Path | None:
    """The scene a file of one band (or an ancillary product) belongs to, as a region's anchor.

    ESA's and Earth Search's per-band files (``<scene>_B04_10m.jp2``, ``<item>/red.tif``)
    name their band as :attr:`Sentinel2Base.band_file_regex` reads it; their scene is the
    folder (ESA's ``R10m`` / ``R20m`` folders skipped) with the name's part before the band
    (``<scene>``), or the folder alone where nothing comes before it. ESA's ancillary
    products of the same naming (``<scene>_SCL_20m.jp2``) belong to the scene as well (the
    dataset skips them). None for any other file: a region of its own.
    """
    stem = path.stem
    band = re.search(Sentinel2Base.band_file_regex or "(?!)", stem, re.IGNORECASE)
    ancillary = re.search(Sentinel2Base.ancillary_regex, stem, re.IGNORECASE)
    if not ((band is not None and count == 1) or (ancillary is not None and count <= 3)):
        return None
    found = band if band is not None and count == 1 else ancillary
    assert found is not None
    prefix = stem[: found.start()].strip("_.-")
    folder = pathlib.Path(_scene_folder(str(path)))
    return folder / prefix if prefix else folder


def _read_header(path: str) -> _Header:
    """Open a file once for the input search.

    Raises:
        InputError: if the file cannot be read or is not georeferenced.
    """
    try:
        with _open_quietly(path) as src:
            grid = _names_embedding_bands(src.descriptions)
            problem = None if grid else georeference_problem(src)
            if problem:
                raise InputError(problem)
            return _Header(
                src.crs.to_wkt() if src.crs else None,
                _corner_bounds(src.transform, src.width, src.height),
                grid,
                src.count - sum(c == ColorInterp.alpha for c in src.colorinterp),
            )
    except rasterio.errors.RasterioIOError as err:
        raise InputError(
            f"cannot read {path}: {err}: repair or remove it (or give the readable files as inputs)"
        ) from err


def unique_region_names(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Output names for regions, unique even when file names collide; independent of order.

    A region's base name is its file's stem (``a/scene.tif`` -> ``scene``) or its folder's or
    Earth Engine export prefix's name. Names that collide (compared case-insensitively, as on
    macOS and Windows filesystems) get their parent folders' names prepended, one level at a
    time (``a/scene.tif``, ``b/scene.tif`` -> ``a_scene``, ``b_scene``); files that differ
    only by suffix in one folder (``x/scene.tif``, ``x/scene.jp2``) get 8 hex digits of the
    sha1 of their resolved path instead (``scene_1a2b3c4d``). A name depends only on the set
    of paths, not on their order, so reruns find their outputs again.

    Args:
        paths: one path per region (file, folder or export prefix); duplicates are an error.

    Returns:
        One name per path, in the same order.

    Raises:
        ValueError: if the same path is given twice.
    """
    resolved = [pathlib.Path(p).resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        dup = next(str(p) for p in resolved if resolved.count(p) > 1)
        raise ValueError(f"input {dup!r} is given twice: pass every input once")

    def base(p: pathlib.Path) -> str:
        return p.stem if p.suffix.lower() in Sentinel2Base.extensions else p.name

    def with_parents(p: pathlib.Path, levels: int) -> str:
        parents = [q.name for q in list(p.parents)[:levels] if q.name][::-1]
        return "_".join([*parents, base(p)])

    def short_hash(p: pathlib.Path) -> str:
        return hashlib.sha1(str(p).encode()).hexdigest()[:8]

    # same folder, same name, other suffix: parent folders cannot tell these apart
    keys = [(p.parent, base(p).casefold()) for p in resolved]
    hashed = {i for i, k in enumerate(keys) if keys.count(k) > 1}

    def name(i: int, levels: int) -> str:
        text = with_parents(resolved[i], levels)
        return f"{text}_{short_hash(resolved[i])}" if i in hashed else text

    names = [name(i, 0) for i in range(len(resolved))]
    depth = max((len(p.parents) for p in resolved), default=0)
    for level in range(1, depth + 1):
        groups = _collisions(names)
        if not groups:
            break
        for i in groups:
            names[i] = name(i, level)
    for i in _collisions(names):  # pragma: no cover - distinct paths always separate above
        names[i] = f"{names[i]}_{short_hash(resolved[i])}"
    return names


def _collisions(names: Sequence[str]) -> list[int]:
    folded = [n.casefold() for n in names]
    return [i for i, n in enumerate(folded) if folded.count(n) > 1]


def canonical_crs(crs: Any) -> CRS:
    """A CRS however spelled, as one value: the EPSG code where it has one.

    A PROJ string of UTM 33N is EPSG:32633, so the index, the chips, the outputs and a
    resumed job agree on it.

    Args:
        crs: an EPSG code (``"EPSG:32633"``, 32633), a PROJ string, WKT or CRS object.

    Returns:
        The pyproj CRS.

    Raises:
        InputError: for a CRS pyproj does not know (a ``ValueError``), with the spellings to
            use; for one that is not a map's (geocentric x, y, z; vertical): chips are cut
            on a plane (a local, engineering CRS is one).
    """
    try:
        parsed = CRS.from_user_input(crs)
    except CRSError as err:
        raise InputError(
            f"unknown CRS {crs!r} ({err}): give an EPSG code such as EPSG:32633, a PROJ "
            "string or WKT"
        ) from None
    # a compound CRS is its horizontal part (UTM 33N + EGM96 height reads as UTM 33N)
    plane = _plane(parsed)
    if plane.is_geocentric or plane.is_vertical:
        kind = "geocentric (x, y, z from the Earth's centre)" if plane.is_geocentric else ""
        raise InputError(
            f"CRS {crs_label(parsed)} is a {kind or plane.type_name.removesuffix(' CRS').lower()}"
            " CRS, not a map's: "
            "rasters are read and chipped in a projected CRS (e.g. EPSG:32633, UTM 33N), a "
            "geographic one (EPSG:4326) or a file's local one"
        )
    epsg = exact_epsg(parsed)
    return CRS.from_epsg(epsg) if epsg else parsed


def _leading_band(description: str) -> str | None:
    """The Sentinel-2 band a description's first word names, else None.

    ``B3 (Green)`` gives ``B3``, ``B04_10m`` ``B4``, ``SR_B4`` None.
    """
    first = re.match(r"\s*([0-9A-Za-z]+)", description)
    band = canonical_band(first[1]) if first is not None else None
    return band if band in SENTINEL2_BANDS else None


def _offset_tags(src: DatasetReader) -> tuple[str | None, ...]:
    """Per band, its ``BOA_ADD_OFFSET`` / ``RADIO_ADD_OFFSET`` item, else the file's, else None.

    Metadata item names are matched case-insensitively (GDAL keeps them as written).
    """

    def find(tags: dict[str, str]) -> str | None:
        upper = {k.upper(): v for k, v in tags.items()}
        return upper.get("BOA_ADD_OFFSET", upper.get("RADIO_ADD_OFFSET"))

    own = find(src.tags())
    return tuple(find(src.tags(b)) or own for b in range(1, src.count + 1))


def _open_quietly(path: str) -> DatasetReader:
    """Open a raster for its header, without rasterio's ``NotGeoreferencedWarning``.

    The caller refuses such a file with the fix (:func:`georeference_problem`).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        return rasterio.open(path)


def _north_up(t: Affine) -> bool:
    """Whether a geotransform is north-up and unrotated.

    Windowed reads and :func:`rasterio.merge.merge` assume it; other files are read through
    GDAL's warper.
    """
    return t.b == 0 and t.d == 0 and t.a > 0 and t.e < 0


def georeference_problem(src: DatasetReader) -> str | None:
    """Why an open raster cannot be placed on a map, or None when it can.

    A file without geotransform (GDAL then reports the identity transform) would give chips
    and outputs in pixel units, upside down: without a CRS, or with one (it was embedded at
    the CRS's origin, 1 unit a pixel, with only a warning about the CRS's area of use); one
    georeferenced only by ground control points or RPCs needs warping first. A file with a
    geotransform but no CRS is fine here (the dataset's ``crs=`` names its CRS).

    Args:
        src: the open file.

    Returns:
        The problem and its fix, or None.
    """
    if not src.transform.is_identity:
        return None
    gcps, _ = src.gcps
    if gcps:
        return (
            f"{src.name} is georeferenced only by ground control points (no geotransform): "
            "warp it onto a map grid first (gdalwarp -t_srs EPSG:<code> in.tif out.tif)"
        )
    if src.rpcs is not None:
        return (
            f"{src.name} is georeferenced only by RPCs (no geotransform): orthorectify it "
            "onto a map grid first (gdalwarp -rpc -t_srs EPSG:<code> in.tif out.tif)"
        )
    if src.crs is not None:
        return (
            f"{src.name} has a CRS but no geotransform (GDAL then puts pixel (0, 0) at the "
            "CRS's origin, 1 unit a pixel): give it its place (gdal_edit.py -a_ullr <ulx> "
            "<uly> <lrx> <lry> in.tif)"
        )
    return (
        f"{src.name} is not georeferenced (no geotransform and no CRS): embeddings are "
        "written as maps, so the file must say where it lies; georeference it (e.g. "
        "gdal_translate -a_srs EPSG:<code> -a_ullr <ulx> <uly> <lrx> <lry> in.tif out.tif)"
    )


def _corner_bounds(t: Affine, width: int, height: int) -> tuple[float, float, float, float]:
    """``(xmin, ymin, xmax, ymax)`` of a raster's four corners, for any geotransform."""
    xs, ys = zip(*(t @ (c, r) for c in (0, width) for r in (0, height)), strict=True)
    return min(xs), min(ys), max(xs), max(ys)


def _names_embedding_bands(descriptions: Sequence[str | None]) -> bool:
    """Whether band descriptions are an embedding grid's (``dofa_0000`` ..., GridWriter's)."""
    return bool(descriptions) and descriptions[0] == "dofa_0000"


def _files_of(scenes: Iterable[Sequence[tuple[str, int]]]) -> list[str]:
    """The sorted files of scenes given as their ``(path, band)`` sources."""
    return sorted({path for sources in scenes for path, _ in sources})


def _one_crs(
    name: str, headers: Mapping[str, _Header], crs: str | int | None = None
) -> tuple[str | None, tuple[float, float, float, float]]:
    """The region's one CRS (WKT) and the union of its files' bounds.

    With ``crs`` given, the files are read in it whatever their own CRSs: the bounds are in
    it.
    """
    crss = {p: h.crs for p, h in headers.items()}
    bounds = [h.bounds for h in headers.values()]
    for own in {c for c in crss.values() if c is not None}:
        require_datum_grids(own)  # before GDAL meets it: it prints PROJ errors on its own
    if crs is not None:
        wanted = canonical_crs(crs)
        require_datum_grids(wanted, "crs=")  # before GDAL meets it: it prints PROJ errors
        target = RIO_CRS.from_wkt(wanted.to_wkt())
        try:
            bounds = [
                b
                if c is None or same_crs(c, target.to_wkt())
                else _transform_bounds(RIO_CRS.from_wkt(c), target, b)
                for c, b in zip(crss.values(), bounds, strict=True)
            ]
        except CRSTransformError as err:  # name the files, as the mixed-CRS refusal does
            files = [os.path.basename(p) for p, c in crss.items() if c and _is_local(c)]
            if not files:
                raise
            shown = _first_two(files)
            if len(files) == len(crss):  # all local: embedding them whole works
                raise CRSTransformError(f"{shown}: {err}", reason=err.reason) from None
            raise CRSTransformError(  # with others: embedding the folder whole is mixed CRS
                f"{shown}: in a local CRS, cannot be read in {crs_label(wanted)} ({err.reason}):"
                " pass the local files as separate inputs without crs=, or give them their "
                "real CRS (gdal_edit.py -a_srs EPSG:<code>)",
                reason=err.reason,
            ) from None
        crss = dict.fromkeys(crss, target.to_wkt())
    groups: dict[str | None, list[str]] = {}  # one CRS however spelled (ESRI or GDAL WKT)
    for path, wkt in crss.items():
        key = next((k for k in groups if same_crs(k, wkt)), wkt)
        groups.setdefault(key, []).append(os.path.basename(path))
    planes = {_horizontal(wkt) for wkt in groups if wkt is not None}
    if crs is None and len(groups) > 1 and None not in groups and len(planes) == 1:
        # one map CRS, some files with a vertical datum (EPSG:32633+5773 beside EPSG:32633):
        # read all in the horizontal one, as crs= naming it does
        return _one_crs(name, headers, planes.pop())
    if len(groups) > 1:
        listing = "; ".join(  # per CRS: how many files, the first two named
            f"{crs_label(wkt) if wkt else 'no CRS'}: {len(files)} file"
            f"{'s' if len(files) > 1 else ''} ({_first_two(files)})"
            for wkt, files in groups.items()
        )
        local = [f for wkt, files in groups.items() if wkt and _is_local(wkt) for f in files]
        if local:  # no CRS to read them in: a local CRS is not tied to the Earth
            raise InputError(
                f"mixed CRS in region {name!r} ({listing}): files in a local CRS "
                f"({_first_two(local)}) cannot be read in another CRS: pass them as separate "
                "inputs, or give them their real CRS (gdal_edit.py -a_srs EPSG:<code>)"
            )
        raise InputError(
            f"mixed CRS in region {name!r} ({listing}): read them in one CRS, "
            "crs=EPSG:<code>, for one mosaic of neighbouring scenes, or reproject them "
            "(gdalwarp -t_srs); scenes far apart (one map of both would be mostly empty) go "
            "as separate inputs, one output each"
        )
    union = (
        min(b[0] for b in bounds),
        min(b[1] for b in bounds),
        max(b[2] for b in bounds),
        max(b[3] for b in bounds),
    )
    return next(iter(crss.values())), union


def _plane(parsed: CRS) -> CRS:
    """A CRS's horizontal part: a compound CRS's first sub-CRS, else the CRS itself."""
    return parsed.sub_crs_list[0] if parsed.is_compound and parsed.sub_crs_list else parsed


def _horizontal(wkt: str) -> str:
    """A CRS's horizontal part as :func:`~torchgeo_dofa.spatial.crs_name` spells it."""
    return crs_name(_plane(CRS.from_wkt(wkt)))


def _first_two(names: Sequence[str]) -> str:
    """``"a.tif, b.tif, ..."``: the first two names, and an ellipsis where there are more."""
    return ", ".join(names[:2]) + (", ..." if len(names) > 2 else "")


@functools.lru_cache(maxsize=256)
def _is_local(wkt: str) -> bool:
    """Whether a CRS (WKT) is a local / engineering one, not tied to the Earth."""
    return bool(CRS.from_user_input(wkt).is_engineering)


def _check_transformable(src_wkt: str, dst_wkt: str) -> None:
    """Refuse, in one sentence, CRSs PROJ cannot transform between (a local CRS).

    GDAL would fail on them later with a PROJJSON dump. Answered once per pair (~10 ms
    each: a folder of tiles in one CRS asks once).

    Raises:
        CRSTransformError: as :func:`~torchgeo_dofa.spatial.transformer`.
    """
    problem = _transform_problem(src_wkt, dst_wkt)
    if problem is not None:
        raise CRSTransformError(*problem)


@functools.lru_cache(maxsize=256)
def _transform_problem(src_wkt: str, dst_wkt: str) -> tuple[str, str] | None:
    """The message and reason of :func:`_check_transformable`'s refusal, or None."""
    try:
        require_datum_grids(src_wkt)  # else GDAL prints its PROJ errors before failing
        require_datum_grids(dst_wkt)
        transformer(src_wkt, dst_wkt)
    except CRSTransformError as err:
        return str(err), err.reason
    return None


def _transform_bounds(
    src: RIO_CRS, dst: RIO_CRS, bounds: tuple[float, float, float, float]
) -> tuple[float, float, float, float]:
    """Bounds in another CRS (rasterio's ``transform_bounds``), failing in one sentence.

    Raises:
        CRSTransformError: as :func:`~torchgeo_dofa.spatial.transformer` (a local CRS).
    """
    _check_transformable(src.to_wkt(), dst.to_wkt())
    west, south, east, north = transform_bounds(src, dst, *bounds)
    return west, south, east, north


def _band_file_source(info: _FileInfo) -> tuple[str, int]:
    """A band file's (path, band index): its one band that is not an alpha band."""
    return info.path, next(i + 1 for i, a in enumerate(info.alpha or (False,)) if not a)


#: :func:`_band_masks` per open file (rasterio builds ``mask_flag_enums`` anew on every use)
_BAND_MASKS: weakref.WeakKeyDictionary[DatasetReader, tuple[str, ...]] = weakref.WeakKeyDictionary()


#: Band types whose every value and whole-number nodata float64 holds exactly
_SMALL_INTEGER_DTYPES = frozenset({"uint8", "int8", "uint16", "int16", "uint32", "int32"})


def _band_masks(handle: DatasetReader) -> tuple[str, ...]:
    """How GDAL masks each band of an open file, cached per file handle.

    ``"none"``: every pixel valid; ``"nodata"``: an integer band of at most 32 bits masked
    by a whole-number nodata value alone (the pixels equal to it); ``"gdal"``: anything else
    (a float band, a fractional nodata, which GDAL truncates to the band's type, a 64-bit or
    complex band, an internal mask, an alpha band), left to GDAL's masked read.
    """
    masks = _BAND_MASKS.get(handle)
    if masks is None:
        masks = tuple(
            "none"
            if flags == [MaskFlags.all_valid]
            else "nodata"
            if flags == [MaskFlags.nodata]
            and dtype in _SMALL_INTEGER_DTYPES
            and nodata is not None
            and float(nodata).is_integer()
            else "gdal"
            for flags, nodata, dtype in zip(
                handle.mask_flag_enums, handle.nodatavals, handle.dtypes, strict=True
            )
        )
        _BAND_MASKS[handle] = masks
    return masks


def _direct_read(
    handle: DatasetReader | WarpedVRT,
    indexes: list[int],
    bounds: tuple[float, float, float, float],
    res: tuple[float, float],
    height: int,
    width: int,
) -> npt.NDArray[np.float32] | None:
    """Read a chip that lies on ``handle``'s pixel grid with one windowed read.

    The same pixels as ``rasterio.merge.merge([handle], bounds, res, nodata=nan)`` with
    nearest resampling: values masked by the file (its nodata, internal masks) and pixels
    beyond the raster are NaN.

    Returns:
        (len(indexes), height, width) float32, or None when the chip is not on the file's
        grid (a VRT, another resolution, a rotated transform or a sub-pixel offset).
    """
    if isinstance(handle, WarpedVRT):
        return None
    t = handle.transform
    xres, yres = res
    if t.b or t.d or t.e >= 0 or t.a <= 0:
        return None
    if not (math.isclose(t.a, xres, rel_tol=1e-9) and math.isclose(-t.e, yres, rel_tol=1e-9)):
        return None
    col_f = (bounds[0] - t.c) / t.a
    row_f = (t.f - bounds[3]) / -t.e
    col, row = round(col_f), round(row_f)
    if abs(col_f - col) > 1e-6 or abs(row_f - row) > 1e-6:
        return None
    r0, r1 = max(row, 0), min(row + height, handle.height)
    c0, c1 = max(col, 0), min(col + width, handle.width)
    shape = (len(indexes), height, width)
    if (r0, r1, c0, c1) == (row, row + height, col, col + width):
        out = np.empty(shape, dtype=np.float32)  # the read fills every pixel
    else:  # pixels beyond the raster stay NaN
        out = np.full(shape, np.nan, dtype=np.float32)
    if r0 >= r1 or c0 >= c1:
        return out
    window = Window(c0, r0, c1 - c0, r1 - r0)
    _read_into(handle, indexes, window, out[:, r0 - row : r1 - row, c0 - col : c1 - col])
    return out


def _read_into(
    handle: DatasetReader, indexes: list[int], window: Window, block: npt.NDArray[np.float32]
) -> None:
    """Read ``window`` of the bands ``indexes`` into ``block``, NaN where the file masks."""
    masks = _band_masks(handle)
    if all(masks[i - 1] == "none" for i in indexes):  # no nodata, no mask: a plain read
        block[...] = handle.read(indexes, window=window)
        return
    if all(masks[i - 1] == "nodata" for i in indexes):
        # integer bands masked by their nodata value alone: GDAL's mask is the pixels equal
        # to it, found here on the plain read (a masked read costs ~3x the read itself)
        raw = handle.read(indexes, window=window)
        block[...] = raw
        for k, i in enumerate(indexes):
            np.copyto(block[k], np.nan, where=raw[k] == handle.nodatavals[i - 1])
        return
    # a 4-band 8-bit GeoTIFF is RGBA to GDAL: the masks follow the declared nodata, as this
    # read wants (rasterio says so with a warning on every chip); silenced only there, as
    # catch_warnings clears Python's record of the warnings shown once (they came again)
    if handle.count == 4 and handle.colorinterp[3] == ColorInterp.alpha:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NodataShadowWarning)
            data = handle.read(indexes, window=window, masked=True)
    else:
        data = handle.read(indexes, window=window, masked=True)
    block[...] = np.ma.getdata(data)
    block[np.ma.getmaskarray(data)] = np.nan
