"""Sentinel-2 L2A from STAC catalogs: search, load, mask, composite, save as a local GeoTIFF.

Most people who embed Sentinel-2 have no Earth Engine account: they search a public STAC API
(Element 84's Earth Search, Microsoft Planetary Computer) and read the cloud-optimised
GeoTIFFs directly. This module does that and *materialises* the result as one local GeoTIFF,
which the rest of the package (``Sentinel2SR``, ``backend="local"``, ``torchgeo-dofa embed``)
reads like any other input:

1. :func:`search_items`: items of a collection over a bounding box and a date range whose
   ``eo:cloud_cover`` is below ``max_cloud``, from a STAC API (``pystac-client``), a saved item
   collection (``FeatureCollection`` JSON) or a static catalog (``catalog.json`` /
   ``collection.json``). Planetary Computer hrefs are signed (optional ``planetary-computer``).
2. :func:`composite_to_geotiff`: every item is read with ``odc-stac`` onto one grid: the
   region's UTM zone (or ``crs=``) at ``resolution`` metres, origin (0, 0), so at 10 m the
   pixels are Sentinel-2's own (the grid of :mod:`torchgeo_dofa.gee`); 20 m bands and the SCL
   are read with nearest resampling (raw values kept). Each item's digital numbers get its
   radiometric offset (:func:`item_offset`); pixels whose SCL class is in ``mask_scl``, or
   where any band is 0 (no data), are dropped; the remaining dates are composited per pixel
   (``median``, or ``mosaic``: the first valid date, in date order).
3. The composite is written as float32 GeoTIFF: surface reflectance x 10000 with the offset
   already removed (the raw-reflectance contract of DOFA's reference pipeline), band
   descriptions ``B04``, ``B03``, ... (so ``Sentinel2SR`` needs no options), NaN declared as
   no data, and tags ``STAC_*`` recording the source, collection, item ids, dates, offsets,
   composite rule and mask. File names never look like ESA products (no date, no ``_N0400_``),
   so the datasets do not apply the offset a second time.

Loader: ``odc-stac`` (actively released, depends on the installed pandas/numpy/xarray);
``stackstac`` (last release 2024-08) would downgrade pandas 3 to 2.3 in this environment.

SCL mask (ESA's Sentinel-2 L2A scene classification, Sen2Cor / L2A Product Definition):
0 no data, 1 saturated or defective, 2 dark area / topographic shadow, 3 cloud shadow,
4 vegetation, 5 not vegetated, 6 water, 7 unclassified, 8 cloud medium probability, 9 cloud
high probability, 10 thin cirrus, 11 snow or ice. :data:`DEFAULT_SCL_MASK` drops 0, 1, 3, 8,
9 and 10 (no data, defects, clouds and their shadows). Snow (11) is kept: it is a real
surface, and masking it would empty winter and mountain composites; pass
``mask_scl=(0, 1, 3, 8, 9, 10, 11)`` to drop it too. Dark areas (2) and unclassified (7) are
kept (Sen2Cor puts much legitimate dark ground and water edge there).

Radiometric offset per item (:func:`item_offset`): from processing baseline 04.00
(2022-01-25) ESA stores ``reflectance x 10000 + 1000``. The offset (-1000) is applied unless
the provider already removed it (``earthsearch:boa_offset_applied: true``). The baseline is
read from ``s2:processing_baseline`` or ``processing:version``; items with neither use the
acquisition date (on or after 2022-01-25: -1000). ``offset=`` overrides the rule.

Install with ``pip install "torchgeo-dofa[stac]"`` (``pystac-client``, ``odc-stac``;
``planetary-computer`` for Planetary Computer). Without it, or when the API cannot be reached
or an asset cannot be read, the functions raise :class:`StacUnavailableError` /
:class:`StacError` with a one-line message saying what to do.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import rasterio
import shapely
import shapely.geometry
from affine import Affine

from .bands import DOFA_S2_BANDS, SENTINEL2_BANDS, STAC_ITEM_ASSETS, BandError, canonical_band
from .spatial import BBox, PointBuffer, Region, utm_region_grid
from .writers import atomic_write

__all__ = [
    "BASELINE_OFFSET",
    "COMPOSITES",
    "COMPOSITE_WINDOW_BYTES",
    "DEFAULT_COLLECTION",
    "DEFAULT_SCL_MASK",
    "EARTH_SEARCH_URL",
    "OFFSET_START",
    "PLANETARY_COMPUTER_URL",
    "SCL_CLASSES",
    "StacError",
    "StacGrid",
    "StacUnavailableError",
    "asset_key",
    "composite_to_geotiff",
    "default_cache_dir",
    "item_offset",
    "masked_reflectance",
    "materialise",
    "materialise_for_embed",
    "search_items",
    "stac_grid",
]

#: Element 84's Earth Search v1 (no account, no signing).
EARTH_SEARCH_URL = "https://earth-search.aws.element84.com/v1"
#: Microsoft Planetary Computer (asset hrefs need signing: ``planetary-computer``).
PLANETARY_COMPUTER_URL = "https://planetarycomputer.microsoft.com/api/stac/v1"
#: Sentinel-2 L2A collection id on both services.
DEFAULT_COLLECTION = "sentinel-2-l2a"
#: Composite rules (``median``: per-pixel median of the valid dates; ``mosaic``: first valid
#: date in date order).
COMPOSITES: tuple[str, ...] = ("median", "mosaic")

#: Bytes of the float64 date stack (every date's bands and SCL) one window of a composite may
#: hold: a region larger than that is read and composited window by window, so memory follows
#: the window, not the region times the dates (20 dates x 10 assets of a 10 km box are 1.6 GB
#: of float64, and reading and the median copy it). 256 MiB: windows of about 1290 x 1290 px
#: for 2 dates x 10 assets, 410 x 410 px for 20, each read from every item.
#: ``benchmarks/stac_composite.py`` (10 dates x 5 assets, 1800 x 1800 px, 2 cores): peak RSS
#: 2.2 GB in 29 s (9 windows) against 7.6 GB in 35 s in one piece; 32 MiB: 1.2 GB in 45 s.
COMPOSITE_WINDOW_BYTES = 256 << 20

#: ESA's L2A scene classification (SCL) classes.
SCL_CLASSES: dict[int, str] = {
    0: "no data",
    1: "saturated or defective",
    2: "dark area pixels (topographic shadow)",
    3: "cloud shadows",
    4: "vegetation",
    5: "not vegetated",
    6: "water",
    7: "unclassified",
    8: "cloud medium probability",
    9: "cloud high probability",
    10: "thin cirrus",
    11: "snow or ice",
}
#: SCL classes dropped by default: no data, defects, cloud shadows, clouds, cirrus.
DEFAULT_SCL_MASK: tuple[int, ...] = (0, 1, 3, 8, 9, 10)

#: First acquisition processed with baseline 04.00 (values stored with +1000).
OFFSET_START = date(2022, 1, 25)
#: The offset ESA declares (``BOA_ADD_OFFSET``) from baseline 04.00 on.
BASELINE_OFFSET = -1000.0

_INSTALL = 'pip install "torchgeo-dofa[stac]"'
_TAG_PREFIX = "STAC_"


class StacError(RuntimeError):
    """A STAC request that cannot be served (missing asset, unreadable file, bad argument)."""


class StacUnavailableError(StacError):
    """The STAC tools are not installed, or the API / catalog cannot be reached."""


def _import(module: str, extra: str = _INSTALL) -> ModuleType:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise StacUnavailableError(
            f"the STAC backend needs the Python package {module.split('.')[0]!r}: {extra}"
        ) from err


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


# ----------------------------------------------------------------------------------------------
# search
# ----------------------------------------------------------------------------------------------


def _parse_time(text: str, end: bool) -> datetime | None:
    text = text.strip()
    if text in ("", ".."):
        return None
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            day = datetime.fromisoformat(text).replace(tzinfo=UTC)
            # the day's last microsecond (9999-12-31 has no next day to count back from)
            return day.replace(hour=23, minute=59, second=59, microsecond=999999) if end else day
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as err:  # not ISO, or no such day ("2023-13-45": month must be in 1..12)
        why = "" if "isoformat" in str(err) else f" ({err})"
        raise StacError(
            f"bad datetime {text!r}{why}: use ISO dates, e.g. '2022-06-01/2022-08-31'"
        ) from err
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _interval(
    value: str | tuple[str | date | None, str | date | None] | None,
) -> tuple[datetime | None, datetime | None, str | None]:
    """Parse a STAC datetime (``A/B``, ``A``, ``(A, B)``; ends inclusive) into UTC bounds."""
    if value is None:
        return None, None, None
    if isinstance(value, tuple | list):
        if len(value) != 2:
            raise StacError(f"datetime must be 'A/B' or (A, B), got {value!r}")
        parts = ["" if v is None else str(v) for v in value]
        text = "/".join(p or ".." for p in parts)
    else:
        text = str(value)
        parts = text.split("/") if "/" in text else [text, text]
    if len(parts) != 2:
        raise StacError(f"datetime must be 'A/B' (ISO dates), got {value!r}")
    start, stop = _parse_time(parts[0], False), _parse_time(parts[1], True)
    if start is not None and stop is not None and start > stop:
        raise StacError(f"datetime {text!r} ends before it starts")
    return start, stop, text


def _item_times(item: Any) -> tuple[datetime, datetime]:
    props = item.properties
    if item.datetime is not None:
        moment = item.datetime
        return moment, moment
    start = datetime.fromisoformat(str(props["start_datetime"]).replace("Z", "+00:00"))
    end = datetime.fromisoformat(str(props["end_datetime"]).replace("Z", "+00:00"))
    return start, end


def _cloud(item: Any) -> float | None:
    value = item.properties.get("eo:cloud_cover")
    return None if value is None else float(value)


def _matches(
    item: Any,
    collection: str | None,
    box: shapely.geometry.Polygon | None,
    start: datetime | None,
    stop: datetime | None,
    max_cloud: float | None,
) -> bool:
    """Client-side filter: the STAC API's semantics (bbox intersects, interval inclusive)."""
    if collection is not None and item.collection_id not in (None, collection):
        return False
    if box is not None:
        geometry = item.geometry or (
            shapely.geometry.mapping(shapely.geometry.box(*item.bbox)) if item.bbox else None
        )
        if geometry is not None and not shapely.geometry.shape(geometry).intersects(box):
            return False
    first, last = _item_times(item)
    if first.tzinfo is None:
        first, last = first.replace(tzinfo=UTC), last.replace(tzinfo=UTC)
    if start is not None and last < start:
        return False
    if stop is not None and first > stop:
        return False
    if max_cloud is not None:
        cloud = _cloud(item)
        if cloud is None or not cloud < max_cloud:
            return False
    return True


def _is_url(source: str) -> bool:
    return re.match(r"^https?://", source, re.IGNORECASE) is not None


def _wants_signing(source: str, sign: bool | str) -> bool:
    if sign == "auto":
        return "planetarycomputer.microsoft.com" in source.lower()
    return bool(sign)


def _sign(items: list[Any]) -> list[Any]:
    pc = _import(
        "planetary_computer",
        'pip install "torchgeo-dofa[stac]" planetary-computer (needed to sign Planetary '
        "Computer hrefs)",
    )
    return [pc.sign(item) for item in items]


def _read_local_source(path: Path) -> list[Any]:
    pystac = _import("pystac")
    try:
        with open(path) as f:
            kind = json.load(f).get("type")
    except (OSError, ValueError) as err:
        raise StacUnavailableError(
            f"cannot read the STAC file {str(path)!r} ({_one_line(err)}): give a STAC API URL, "
            "an item collection (FeatureCollection JSON) or a catalog.json / collection.json"
        ) from err
    try:
        if kind == "FeatureCollection":
            return list(pystac.ItemCollection.from_file(str(path)))
        if kind == "Feature":
            return [pystac.Item.from_file(str(path))]
        if kind in ("Catalog", "Collection"):
            root = pystac.read_file(str(path))
            return list(root.get_items(recursive=True))
    except Exception as err:  # pystac raises many types for malformed catalogs
        raise StacError(f"cannot read the STAC file {str(path)!r}: {_one_line(err)}") from err
    raise StacError(
        f"{str(path)!r} is a JSON of type {kind!r}: expected a FeatureCollection (item "
        "collection), a Feature (item), or a Catalog / Collection"
    )


def _search_api(
    url: str,
    collection: str,
    bbox: Sequence[float] | None,
    datetime_text: str | None,
    max_cloud: float | None,
    limit: int | None,
    sign: bool,
) -> list[Any]:
    client_mod = _import("pystac_client")
    conformance = _import("pystac_client.conformance")
    requests = _import("requests")
    modifier = None
    if sign:
        pc = _import(
            "planetary_computer",
            'pip install "torchgeo-dofa[stac]" planetary-computer (needed to sign Planetary '
            "Computer hrefs)",
        )
        modifier = pc.sign_inplace
    errors: tuple[type[BaseException], ...] = (
        client_mod.exceptions.APIError,
        requests.RequestException,
        OSError,
    )
    try:
        client = client_mod.Client.open(url, modifier=modifier)
        kwargs: dict[str, Any] = {"collections": [collection], "max_items": limit}
        if bbox is not None:
            kwargs["bbox"] = list(bbox)
        if datetime_text is not None:
            kwargs["datetime"] = datetime_text
        classes = conformance.ConformanceClasses
        if max_cloud is not None:
            if client.conforms_to(classes.QUERY):
                kwargs["query"] = {"eo:cloud_cover": {"lt": max_cloud}}
            elif client.conforms_to(classes.FILTER):
                kwargs["filter"] = {
                    "op": "<",
                    "args": [{"property": "eo:cloud_cover"}, max_cloud],
                }
                kwargs["filter_lang"] = "cql2-json"
            # otherwise filtered below, client side
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return list(client.search(**kwargs).items())
    except errors as err:
        raise StacUnavailableError(
            f"cannot search the STAC API at {url} ({_one_line(err)}): check the URL and the "
            "network, or pass a saved item collection / static catalog instead"
        ) from err


def search_items(
    source: str | os.PathLike[str] | Iterable[Any],
    collection: str = DEFAULT_COLLECTION,
    bbox: Sequence[float] | None = None,
    datetime: str | tuple[str | date | None, str | date | None] | None = None,
    max_cloud: float | None = None,
    *,
    limit: int | None = None,
    sign: bool | str = "auto",
) -> list[Any]:
    """Find the Sentinel-2 items of a region and a date range.

    Args:
        source: a STAC API URL (``https://earth-search.aws.element84.com/v1``), a saved item
            collection (``FeatureCollection`` JSON, e.g. from ``stac-client search --save``),
            a static catalog or collection (``catalog.json`` / ``collection.json``, walked
            recursively), a single item JSON, or an iterable of ``pystac.Item``.
        collection: collection id (``sentinel-2-l2a`` on Earth Search and Planetary
            Computer); local sources keep items of that collection or of none.
        bbox: ``(minlon, minlat, maxlon, maxlat)`` in degrees (EPSG:4326); items whose
            geometry intersects it are kept. None: anywhere.
        datetime: STAC interval ``"2022-06-01/2022-08-31"`` (both ends inclusive, a date-only
            end means the whole day; ``..`` for an open end) or a ``(start, end)`` pair.
        max_cloud: keep items with ``eo:cloud_cover < max_cloud`` (percent); items without
            the property are dropped. Sent to the API as a ``query`` (or CQL2 ``filter``)
            where it conforms to one, and always checked again on the client.
        limit: at most this many items from the API (None: all).
        sign: sign asset hrefs with ``planetary_computer.sign`` (``"auto"``: when the source
            is a Planetary Computer URL; ``True`` also signs items from files).

    Returns:
        ``pystac.Item`` objects sorted by acquisition time, then id.

    Raises:
        StacUnavailableError: the extra is missing, or the API / file cannot be reached.
        StacError: a malformed source or argument.
    """
    start, stop, text = _interval(datetime)
    if bbox is not None:
        if len(bbox) != 4:
            raise StacError(f"bbox must be (minlon, minlat, maxlon, maxlat), got {bbox!r}")
        box = shapely.geometry.box(*[float(v) for v in bbox])
    else:
        box = None
    if max_cloud is not None and not (0 <= float(max_cloud) <= 100 or math.isinf(max_cloud)):
        raise StacError(f"max_cloud is a percentage in [0, 100], got {max_cloud}")
    if isinstance(source, str | os.PathLike):
        name = os.fspath(source)
        if _is_url(name):
            items = _search_api(
                name, collection, bbox, text, max_cloud, limit, _wants_signing(name, sign)
            )
        else:
            path = Path(name).expanduser()
            if not path.exists():
                raise StacUnavailableError(
                    f"STAC source {name!r} is neither an http(s) URL nor an existing file: give "
                    "a STAC API URL, an item collection JSON or a catalog.json"
                )
            items = _read_local_source(path)
            if sign is True:
                items = _sign(items)
    else:
        items = list(source)
        if sign is True:
            items = _sign(items)
    kept = [it for it in items if _matches(it, collection, box, start, stop, max_cloud)]
    kept.sort(key=lambda it: (_item_times(it)[0].timestamp(), it.id))
    return kept[:limit] if limit is not None else kept


# ----------------------------------------------------------------------------------------------
# per-item conventions
# ----------------------------------------------------------------------------------------------


def _baseline(value: Any) -> float | None:
    match = re.fullmatch(r"N?(\d{1,2})\.?(\d{2})", str(value).strip())
    if not match:
        return None
    return int(match.group(1)) + int(match.group(2)) / 100


def item_offset(item: Any) -> tuple[float, str]:
    """The additive offset that turns an item's digital numbers into reflectance x 10000.

    Rules, in order: ``earthsearch:boa_offset_applied: true`` (Earth Search removed it) -> 0;
    a processing baseline (``s2:processing_baseline`` or ``processing:version``, e.g.
    ``"04.00"``, ``"N0509"``) >= 04.00 -> -1000, below -> 0; otherwise the acquisition date
    (on or after 2022-01-25, the first baseline-04.00 products -> -1000, before -> 0).
    Source: ESA's L2A product metadata (``BOA_ADD_OFFSET = -1000`` from baseline 04.00).

    Args:
        item: a ``pystac.Item``.

    Returns:
        ``(offset, rule)``: the offset (0 or -1000) and which rule fired.
    """
    props = item.properties
    if props.get("earthsearch:boa_offset_applied") is True:
        return 0.0, "earthsearch:boa_offset_applied=true"
    for key in ("s2:processing_baseline", "processing:version"):
        if props.get(key) is not None:
            baseline = _baseline(props[key])
            if baseline is not None:
                value = BASELINE_OFFSET if baseline >= 4.0 else 0.0
                return value, f"{key}={props[key]}"
    acquired = _item_times(item)[0].date()
    value = BASELINE_OFFSET if acquired >= OFFSET_START else 0.0
    return value, f"acquisition date {acquired.isoformat()} (no baseline property)"


def _item_bands(item: Any) -> set[str]:
    """The Sentinel-2 bands (canonical names, not the SCL) an item has an asset for."""
    return {STAC_ITEM_ASSETS[k] for k in item.assets if STAC_ITEM_ASSETS.get(k, "SCL") != "SCL"}


def asset_key(item: Any, band: str, bands: Sequence[str] | None = None) -> str:
    """The asset of an item holding a band (``B4`` -> ``red`` or ``B04``; ``SCL`` -> ``scl``).

    Args:
        item: a ``pystac.Item``.
        band: a Sentinel-2 band name (either spelling) or ``SCL``.
        bands: all the bands requested with it, so that the error can suggest those of them
            the item provides (default: suggest every band it provides).

    Returns:
        The asset key.

    Raises:
        StacError: if no asset of the item maps to the band: names the assets it has and the
            ``bands=[...]`` it could serve (the CLI shows that as ``--bands ...``); for the
            SCL, says to use an L2A collection or ``mask_scl=()``.
    """
    wanted = "SCL" if band.strip().upper() == "SCL" else canonical_band(band)
    keys = [k for k in item.assets if STAC_ITEM_ASSETS.get(k) == wanted]
    if keys:
        return keys[0]
    known = sorted(k for k, v in STAC_ITEM_ASSETS.items() if v == wanted)
    assets = f"(looked for {known}; it has {sorted(item.assets)})"
    if wanted == "SCL":
        raise StacError(
            f"item {item.id} has no asset for the SCL scene classification used for cloud "
            f"masking {assets}: use a Sentinel-2 L2A collection, whose items carry it (from "
            "Python, mask_scl=() composites without cloud masking)"
        )
    has = _item_bands(item)
    asked = [canonical_band(b) for b in bands] if bands is not None else []
    usable = [b for b in asked if b in has] or [b for b in SENTINEL2_BANDS if b in has]
    if not usable:
        raise StacError(
            f"item {item.id} has no asset for band {band} {assets}, nor for any other "
            "Sentinel-2 band: check the collection (a Sentinel-2 L2A one, e.g. sentinel-2-l2a)"
        )
    raise StacError(
        f"item {item.id} has no asset for band {band} {assets}: choose bands the collection "
        f"provides, e.g. bands={usable}"
    )


# ----------------------------------------------------------------------------------------------
# grid, load, mask, composite
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StacGrid:
    """The output pixel grid of a composite.

    Attributes:
        crs: CRS code (``EPSG:326zz`` by default).
        transform: affine ``(a, b, c, d, e, f)``, north-up.
        width: pixels.
        height: pixels.
        bbox_4326: the grid's footprint bounds in degrees (used for the search).
    """

    crs: str
    transform: tuple[float, float, float, float, float, float]
    width: int
    height: int
    bbox_4326: tuple[float, float, float, float]


def _as_region(region: Region | Sequence[float]) -> Region:
    if isinstance(region, PointBuffer | BBox) or hasattr(region, "geom_type"):
        return region
    values = [float(v) for v in region]
    if len(values) != 4:
        raise StacError(f"a bbox is (minlon, minlat, maxlon, maxlat), got {region!r}")
    return BBox(*values)


def stac_grid(
    region: Region | Sequence[float], resolution: float = 10.0, crs: str | int | None = None
) -> StacGrid:
    """The grid a region is composited on: its UTM zone, ``resolution`` m, origin (0, 0).

    The same grid as :func:`torchgeo_dofa.gee.build_gee_request` (at 10 m the pixels are
    Sentinel-2's own): a :class:`~torchgeo_dofa.spatial.PointBuffer` gives
    ``round(2 * buffer_m / resolution)`` pixels per side, a box the smallest covering window.

    Args:
        region: a PointBuffer, BBox, shapely geometry (EPSG:4326) or
            ``(minlon, minlat, maxlon, maxlat)``.
        resolution: pixel size in metres.
        crs: output CRS; default the UTM zone of the region's centre.

    Returns:
        The grid.

    Raises:
        StacError: for a bad resolution or region.
    """
    if not (math.isfinite(resolution) and resolution > 0):
        raise StacError(f"resolution must be a positive number of metres, got {resolution}")
    grid = utm_region_grid(_as_region(region), resolution, crs)
    bounds = grid.footprint_4326.bounds
    return StacGrid(
        crs=grid.crs,
        transform=grid.transform,
        width=grid.width,
        height=grid.height,
        bbox_4326=(bounds[0], bounds[1], bounds[2], bounds[3]),
    )


def _with_resolved_hrefs(item: Any, keys: Sequence[str]) -> Any:
    """A copy of the item whose used assets have absolute hrefs, resolved as STAC says.

    pystac (and so odc-stac) joins every href with the item's self link, which turns an
    absolute local path of an item served over HTTP into a URL on that server; local paths
    (and ``file://`` URIs) are kept as paths, relative hrefs are resolved against the item.
    """
    clone = item.clone()
    for key in keys:
        asset = clone.assets[key]
        href = str(asset.href)
        if href.lower().startswith("file://"):
            from urllib.parse import unquote, urlparse

            href = unquote(urlparse(href).path)
        elif re.match(r"^[a-z][a-z0-9+.-]*://", href, re.IGNORECASE) is None:
            if not os.path.isabs(href):
                href = str(item.assets[key].get_absolute_href() or href)
        asset.href = href
    clone.set_self_href(None)
    return clone


_CLOUD_CONFIGURED: list[bool] = []


def _cloud_defaults(odc_stac: ModuleType) -> None:
    """Once: odc-stac's GDAL settings for COGs over HTTP (no side-car lookups, retries)."""
    if not _CLOUD_CONFIGURED:
        odc_stac.configure_rio(cloud_defaults=True)
        _CLOUD_CONFIGURED.append(True)


def _load_item(
    item: Any, keys: Sequence[str], grid: StacGrid
) -> npt.NDArray[np.float64]:  # (len(keys), H, W), raw digital numbers, NaN outside
    odc_stac = _import("odc.stac")
    geobox_mod = _import("odc.geo.geobox")
    geobox = geobox_mod.GeoBox((grid.height, grid.width), Affine(*grid.transform), grid.crs)
    item = _with_resolved_hrefs(item, keys)
    if any(re.match(r"^(https?|s3|gs|az)://", str(item.assets[k].href)) for k in keys):
        _cloud_defaults(odc_stac)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = odc_stac.load(
                [item],
                bands=list(keys),
                geobox=geobox,
                resampling="nearest",
                dtype="float64",
                groupby="id",
                fail_on_error=True,
            )
    except Exception as err:  # rasterio / GDAL / HTTP errors all end here
        hrefs = {k: item.assets[k].href for k in keys}
        raise StacError(
            f"cannot read assets of item {item.id} ({_one_line(err)}); hrefs {hrefs}: check "
            "that they exist and are reachable (Planetary Computer needs signing)"
        ) from err
    return np.stack([np.asarray(data[k].values[0], dtype=np.float64) for k in keys])


@dataclass
class _Layer:
    item_id: str
    when: datetime
    offset: float
    offset_rule: str
    valid_fraction: float


def _composite_windows(
    grid: StacGrid, bytes_per_pixel: int, budget: int
) -> list[tuple[int, int, int, int]]:
    """``(row, col, height, width)`` windows tiling ``grid``, each within ``budget`` bytes.

    One window (the whole grid) when it fits; else squares of the largest side that fits
    (at least 16 px), row by row.
    """
    if grid.width * grid.height * bytes_per_pixel <= budget:
        return [(0, 0, grid.height, grid.width)]
    side = max(16, math.isqrt(max(budget, 0) // max(bytes_per_pixel, 1)))
    return [
        (row, col, min(side, grid.height - row), min(side, grid.width - col))
        for row in range(0, grid.height, side)
        for col in range(0, grid.width, side)
    ]


def masked_reflectance(
    item: Any,
    bands: Sequence[str],
    grid: StacGrid,
    *,
    mask_scl: Sequence[int] = DEFAULT_SCL_MASK,
    offset: float | str = "auto",
) -> tuple[npt.NDArray[np.float64], float, str]:
    """One item's reflectance x 10000 on a grid, NaN where it is masked.

    A pixel is masked where any band is 0 or missing (no data, outside the item) or, when
    ``mask_scl`` is not empty, where its SCL class is in ``mask_scl`` (or the SCL is missing).

    Args:
        item: a ``pystac.Item``.
        bands: Sentinel-2 band names in channel order.
        grid: the output grid (:func:`stac_grid`).
        mask_scl: SCL classes to drop (empty: no SCL needed or read).
        offset: ``"auto"`` (:func:`item_offset`) or a number added to every digital number.

    Returns:
        ``(values (C, H, W) float64, offset applied, rule)``.

    Raises:
        StacError: a band or the SCL has no asset, or an asset cannot be read.
    """
    keys = [asset_key(item, b, bands) for b in bands]
    if mask_scl:
        keys.append(asset_key(item, "SCL"))
    raw = _load_item(item, keys, grid)
    data = raw[: len(bands)]
    valid = np.isfinite(data).all(axis=0) & (data != 0).all(axis=0)
    if mask_scl:
        scl = raw[-1]
        valid &= np.isfinite(scl) & ~np.isin(scl, np.asarray(list(mask_scl), dtype=np.float64))
    if offset == "auto":
        value, rule = item_offset(item)
    else:
        value, rule = float(offset), "explicit"
    out = data + value
    out[:, ~valid] = np.nan
    return out, value, rule


def _composite(layers: Sequence[npt.NDArray[np.float64]], rule: str) -> npt.NDArray[np.float32]:
    stack = np.stack(layers)  # (T, C, H, W), T in date order
    if rule == "median":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels stay NaN
            return np.nanmedian(stack, axis=0).astype(np.float32)
    out = np.full(stack.shape[1:], np.nan)
    for layer in stack:  # first valid date wins
        take = np.isnan(out) & ~np.isnan(layer)
        out[take] = layer[take]
    return out.astype(np.float32)


def _esa_name(band: str) -> str:
    canon = canonical_band(band)
    match = re.fullmatch(r"B(\d+)(A?)", canon)
    if not match:
        return canon
    return f"B{int(match.group(1)):02d}{match.group(2)}"


def _check_bands(bands: Sequence[str]) -> list[str]:
    if isinstance(bands, str) or not bands:
        raise StacError(f"bands must be a non-empty list of Sentinel-2 band names, got {bands!r}")

    names = [canonical_band(b) for b in bands]
    unknown = [b for b, n in zip(bands, names, strict=True) if n not in SENTINEL2_BANDS]
    if unknown:
        raise BandError(f"{unknown} are not Sentinel-2 bands: choose among {list(SENTINEL2_BANDS)}")
    if len(set(names)) != len(names):
        raise StacError(f"bands {list(bands)} name a band twice")
    return names


def composite_to_geotiff(
    items: Sequence[Any],
    region: Region | Sequence[float],
    bands: Sequence[str] = DOFA_S2_BANDS,
    out_path: str | os.PathLike[str] = "stac_composite.tif",
    *,
    composite: str = "median",
    resolution: float = 10.0,
    crs: str | int | None = None,
    mask_scl: Sequence[int] = DEFAULT_SCL_MASK,
    offset: float | str = "auto",
    tags: dict[str, str] | None = None,
    window_bytes: int = COMPOSITE_WINDOW_BYTES,
) -> Path:
    """Composite STAC items over a region into a float32 GeoTIFF of raw reflectance.

    Every item is read onto the region's grid (:func:`stac_grid`), masked and offset-corrected
    (:func:`masked_reflectance`), then the dates are combined per pixel: ``median`` (numpy's
    ``nanmedian`` over the valid dates; of an even count, the mean of the middle two) or
    ``mosaic`` (the first valid date, items sorted by acquisition time). Pixels without a valid
    date are NaN (the declared no data). A region whose date stack exceeds ``window_bytes`` is
    read and composited in square windows of the grid, so memory holds one window's dates plus
    the float32 result: the same pixels for items in the grid's CRS; an item in another CRS
    (a neighbouring UTM zone) is warped by GDAL's approximate transformer, whose
    nearest-neighbour pick near pixel boundaries depends on the extent read, so a few of its
    pixels can differ with the window size. The file
    is written atomically (temporary name, then rename) and only after every item was read.

    Args:
        items: ``pystac.Item`` objects (e.g. from :func:`search_items`).
        region: PointBuffer, BBox, shapely geometry (EPSG:4326) or a lon/lat bbox.
        bands: Sentinel-2 bands in output order (default DOFA's 9).
        out_path: the GeoTIFF to write (parent folders are created).
        composite: ``"median"`` or ``"mosaic"``.
        resolution: pixel size in metres.
        crs: output CRS (default the region's UTM zone).
        mask_scl: SCL classes to drop (see :data:`DEFAULT_SCL_MASK`); empty: no SCL masking.
        offset: ``"auto"`` (per item, :func:`item_offset`) or a number for every item.
        tags: extra GeoTIFF tags (e.g. the STAC source), stored with the ``STAC_`` prefix.
        window_bytes: the most bytes of float64 date stack read at once (see
            :data:`COMPOSITE_WINDOW_BYTES`).

    Returns:
        The path written. Bands ``(C, H, W)`` float32, reflectance x 10000 (offset removed),
        descriptions ``B04``..., nodata NaN; tags ``STAC_ITEM_IDS``, ``STAC_ITEM_DATETIMES``,
        ``STAC_ITEM_OFFSETS``, ``STAC_COMPOSITE``, ``STAC_SCL_MASK``... (JSON values).

    Raises:
        StacError: unknown composite, no items, a missing asset, an unreadable file.
        BandError: a name that is not a Sentinel-2 band.
    """
    if composite not in COMPOSITES:
        raise StacError(f"unknown composite {composite!r}: choose one of {list(COMPOSITES)}")
    names = _check_bands(bands)
    items = sorted(items, key=lambda it: (_item_times(it)[0].timestamp(), it.id))
    if not items:
        raise StacError("no STAC items to composite: widen the dates or the cloud limit")
    bad = [c for c in mask_scl if int(c) not in SCL_CLASSES]
    if bad:
        raise StacError(f"unknown SCL classes {bad}: choose among {sorted(SCL_CLASSES)}")
    grid = stac_grid(region, resolution, crs)
    for item in items:  # every asset named before anything is read
        for band in names:
            asset_key(item, band, names)
        if mask_scl:
            asset_key(item, "SCL")
    result = np.full((len(names), grid.height, grid.width), np.nan, np.float32)
    valid = np.zeros(len(items), np.int64)
    offsets: list[tuple[float, str]] = []
    assets = len(names) + (1 if mask_scl else 0)
    for window in _composite_windows(grid, len(items) * assets * 8, window_bytes):
        row, col, height, width = window
        a, b, c, d, e, f = grid.transform
        part = replace(
            grid,
            transform=(a, b, c + col * a, d, e, f + row * e),
            width=width,
            height=height,
        )
        stack = []
        for i, item in enumerate(items):
            values, value, rule = masked_reflectance(
                item, names, part, mask_scl=mask_scl, offset=offset
            )
            valid[i] += int(np.isfinite(values[0]).sum())
            if len(offsets) < len(items):
                offsets.append((value, rule))
            stack.append(values)
        result[:, row : row + height, col : col + width] = _composite(stack, composite)
        del stack
    layers = [
        _Layer(item.id, _item_times(item)[0], value, rule, float(n) / (grid.width * grid.height))
        for item, (value, rule), n in zip(items, offsets, valid, strict=True)
    ]
    meta = {
        "ITEM_IDS": json.dumps([layer.item_id for layer in layers]),
        "ITEM_DATETIMES": json.dumps([layer.when.isoformat() for layer in layers]),
        "ITEM_OFFSETS": json.dumps([layer.offset for layer in layers]),
        "ITEM_OFFSET_RULES": json.dumps([layer.offset_rule for layer in layers]),
        "ITEM_VALID_FRACTIONS": json.dumps([round(layer.valid_fraction, 6) for layer in layers]),
        "COMPOSITE": composite
        + (" (per-pixel median of valid dates)" if composite == "median" else "")
        + (" (first valid date in date order)" if composite == "mosaic" else ""),
        "SCL_MASK": json.dumps([int(c) for c in mask_scl]),
        "RESOLUTION_M": str(resolution),
        "VALUES": "surface reflectance x 10000, radiometric offset removed; NaN = no data",
        "LOADER": f"odc-stac {_version('odc-stac')}",
        **{k.upper(): str(v) for k, v in (tags or {}).items()},
    }
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(path: Path) -> None:
        profile = {
            "driver": "GTiff",
            "width": grid.width,
            "height": grid.height,
            "count": len(names),
            "dtype": "float32",
            "crs": grid.crs,
            "transform": Affine(*grid.transform),
            "nodata": float("nan"),
            "compress": "deflate",
            "predictor": 3,
            "tiled": grid.width >= 256 and grid.height >= 256,
        }
        if profile["tiled"]:
            profile.update(blockxsize=256, blockysize=256)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(result)
            dst.descriptions = tuple(_esa_name(n) for n in names)
            dst.update_tags(**{_TAG_PREFIX + k: v for k, v in meta.items()})

    atomic_write(out, write)
    return out


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------------------------
# search + composite, cached
# ----------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where composites are kept: ``TORCHGEO_DOFA_STAC_CACHE`` or ``~/.cache/torchgeo-dofa/stac``.

    Returns:
        The folder (not created).
    """
    env = os.environ.get("TORCHGEO_DOFA_STAC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "torchgeo-dofa" / "stac"


_NO_DIGITS = str.maketrans("0123456789", "ghijklmnop")


def _source_label(source: str | os.PathLike[str] | Iterable[Any]) -> str:
    if isinstance(source, str | os.PathLike):
        name = os.fspath(source)
        return name if _is_url(name) else str(Path(name).expanduser().resolve())
    return "<items>"


def materialise(
    region: Region | Sequence[float],
    datetime: str | tuple[str | date | None, str | date | None],
    source: str | os.PathLike[str] | Iterable[Any] = EARTH_SEARCH_URL,
    *,
    collection: str = DEFAULT_COLLECTION,
    bands: Sequence[str] = DOFA_S2_BANDS,
    max_cloud: float | None = 30.0,
    composite: str = "median",
    resolution: float = 10.0,
    crs: str | int | None = None,
    mask_scl: Sequence[int] = DEFAULT_SCL_MASK,
    offset: float | str = "auto",
    out_dir: str | os.PathLike[str] | None = None,
    sign: bool | str = "auto",
) -> Path:
    """Search a STAC source for a region and write (or reuse) its composite GeoTIFF.

    The file name holds a digest of the settings and the item ids found
    (``s2stac_<collection>_<composite>_<digest>.tif``, no date, nothing ESA-like), so a second
    call with the same request and the same search result reuses the file; new items make a
    new file.

    Args:
        region: PointBuffer, BBox, shapely geometry (EPSG:4326) or lon/lat bbox.
        datetime: STAC interval ``"A/B"`` (inclusive) or ``(A, B)``.
        source: STAC API URL, item collection / catalog file, or items (see
            :func:`search_items`).
        collection: collection id.
        bands: Sentinel-2 bands in output order.
        max_cloud: ``eo:cloud_cover`` limit in percent (None: no limit).
        composite: ``"median"`` or ``"mosaic"``.
        resolution: pixel size in metres.
        crs: output CRS (default the region's UTM zone).
        mask_scl: SCL classes to drop.
        offset: ``"auto"`` or a number (see :func:`item_offset`).
        out_dir: folder of the composites (default :func:`default_cache_dir`).
        sign: sign Planetary Computer hrefs (``"auto"``: for Planetary Computer URLs).

    Returns:
        The GeoTIFF.

    Raises:
        LookupError: no item matches (the message gives the search).
        StacUnavailableError: extra missing, API or file unreachable.
        StacError: missing asset, unreadable file, bad argument.
    """
    names = _check_bands(bands)
    if composite not in COMPOSITES:
        raise StacError(f"unknown composite {composite!r}: choose one of {list(COMPOSITES)}")
    grid = stac_grid(region, resolution, crs)
    _, _, text = _interval(datetime)
    items = search_items(source, collection, grid.bbox_4326, datetime, max_cloud, sign=sign)
    label = _source_label(source)
    if not items:
        raise LookupError(
            f"no {collection} item at {label} intersects bbox "
            f"{[round(v, 5) for v in grid.bbox_4326]} in {text} with eo:cloud_cover < "
            f"{max_cloud}: widen the dates or raise max_cloud"
        )
    digest = hashlib.sha1(
        json.dumps(
            [
                label,
                collection,
                grid.crs,
                grid.transform,
                grid.width,
                grid.height,
                names,
                composite,
                sorted(int(c) for c in mask_scl),
                str(offset),
                [it.id for it in items],
                text,  # the request's dates and cloud limit: the file's stac_* tags say them
                max_cloud,
            ],
            default=str,
        ).encode()
    ).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z-]+", "-", collection).strip("-") or "items"
    folder = Path(out_dir).expanduser() if out_dir is not None else default_cache_dir()
    out = folder / f"s2stac_{safe}_{composite}_{digest.translate(_NO_DIGITS)}.tif"
    if out.exists():
        return out
    return composite_to_geotiff(
        items,
        region,
        names,
        out,
        composite=composite,
        resolution=resolution,
        crs=crs,
        mask_scl=mask_scl,
        offset=offset,
        tags={
            "SOURCE": label,
            "COLLECTION": collection,
            "DATETIME": str(text),
            "MAX_CLOUD": str(max_cloud),
            "BBOX_4326": json.dumps([round(v, 7) for v in grid.bbox_4326]),
        },
    )


def materialise_for_embed(
    stac: str | os.PathLike[str],
    collection: str,
    bbox: Sequence[float],
    datetime: str,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    bands: Sequence[str] = DOFA_S2_BANDS,
    max_cloud: float | None = 30.0,
    composite: str = "median",
    resolution: float = 10.0,
    mask_scl: Sequence[int] = DEFAULT_SCL_MASK,
) -> list[Path]:
    """What ``torchgeo-dofa embed --stac URL --collection C --bbox ... --datetime A/B`` reads.

    Materialises the composite of the box and returns it as the list of local inputs the
    embed job takes (one file today; a list so per-tile or per-date outputs can follow).

    Args:
        stac: STAC API URL, item collection JSON or static catalog.
        collection: collection id.
        bbox: ``(minlon, minlat, maxlon, maxlat)`` in degrees.
        datetime: STAC interval ``"A/B"`` (inclusive).
        out_dir: folder for the composite (default :func:`default_cache_dir`).
        bands: Sentinel-2 bands.
        max_cloud: ``eo:cloud_cover`` limit in percent.
        composite: ``"median"`` or ``"mosaic"``.
        resolution: pixel size in metres.
        mask_scl: SCL classes to drop.

    Returns:
        The GeoTIFF paths.

    Raises:
        LookupError: no item matches.
        StacUnavailableError: extra missing, API or file unreachable.
        StacError: missing asset, unreadable file, bad argument.
    """
    region = _as_region(bbox)
    return [
        materialise(
            region,
            datetime,
            stac,
            collection=collection,
            bands=bands,
            max_cloud=max_cloud,
            composite=composite,
            resolution=resolution,
            mask_scl=mask_scl,
            out_dir=out_dir,
        )
    ]
