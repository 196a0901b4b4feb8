"""Google Earth Engine backend: build a Sentinel-2 pixel request, then fetch it as numpy.

The optional extra ``pip install "torchgeo-dofa[gee]"`` installs ``earthengine-api``;
authenticate once with ``earthengine authenticate`` and name a Cloud project (``project=`` or
the ``EE_PROJECT`` / ``GOOGLE_CLOUD_PROJECT`` environment variables).

Two steps, kept apart so the first is testable without a network:

1. :func:`build_gee_request` (pure): turns a region, a date range and the fetch settings into a
   :class:`GEERequest` - collection id, filters, composite, bands, the output pixel grid (CRS,
   affine, size) and the region in EPSG:4326. :meth:`GEERequest.as_dict` gives a plain,
   JSON-serialisable description.
2. :func:`fetch_gee_pixels`: runs it with ``ee.data.computePixels`` and returns raw values
   (C, H, W) plus a validity mask; masked pixels (clouds filtered out of a composite, no
   coverage) hold ``fill_value``.

Grid convention: the ROI is snapped to a ``scale_m`` grid in the UTM zone of its centre, with
the grid origin at (0, 0), so at 10 m the pixels coincide with Sentinel-2's native UTM pixels
(no resampling inside one zone). A :class:`~torchgeo_dofa.spatial.PointBuffer` gives
``round(2 * buffer_m / scale_m)`` pixels per side, centred on the point (as
:func:`~torchgeo_dofa.spatial.region_window` does for local files). This differs from
rs-embed, which samples in EPSG:3857 (whose "metres" shrink with latitude).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

import numpy as np
import shapely
import shapely.geometry

from .bands import canonical_band
from .spatial import Region, utm_epsg, utm_region_grid

__all__ = [
    "COMPOSITES",
    "COMPUTE_PIXELS_MAX_BYTES",
    "COMPUTE_PIXELS_MAX_SIDE",
    "DEFAULT_COLLECTION",
    "GEERequest",
    "GEEUnavailableError",
    "build_gee_request",
    "decode_pixels",
    "fetch_gee_pixels",
    "import_ee",
    "utm_epsg",
]

#: Default collection (DOFA's reference fetch).
DEFAULT_COLLECTION = "COPERNICUS/S2_SR_HARMONIZED"

#: Composite methods.
COMPOSITES: tuple[str, ...] = ("median", "mosaic")

#: Earth Engine's limit on one ``computePixels`` answer (48 MB) and on a grid side.
COMPUTE_PIXELS_MAX_BYTES = 48 * 1024 * 1024
COMPUTE_PIXELS_MAX_SIDE = 32768

#: Name of the extra band carrying the validity mask.
VALID_BAND = "torchgeo_dofa_valid"

_INSTALL_HINT = (
    'install the optional extra with `pip install "torchgeo-dofa[gee]"` (earthengine-api), '
    "then authenticate once with `earthengine authenticate`"
)

_initialized: set[str] = set()


class GEEUnavailableError(RuntimeError):
    """Earth Engine cannot be used: client missing, not authenticated, or unreachable."""


@dataclass(frozen=True)
class GEERequest:
    """A complete description of one Earth Engine pixel request (no ``ee`` objects).

    Attributes:
        collection: image collection id.
        start: first date (ISO, inclusive).
        end: last date (ISO, exclusive, as ``filterDate``).
        cloud_property: image property filtered on (``CLOUDY_PIXEL_PERCENTAGE`` for
            Sentinel-2 collections), or None for no cloud filter.
        cloudy_pct: keep images whose ``cloud_property`` is below this.
        composite: ``"median"`` or ``"mosaic"`` (least cloudy image on top).
        bands: band names selected, in channel order (Earth Engine spelling).
        fill_value: value written into masked pixels.
        crs: CRS code of the output grid (a UTM zone, ``EPSG:326xx`` / ``EPSG:327xx``).
        scale_m: pixel size in metres.
        transform: affine ``(a, b, c, d, e, f)`` of the output grid (north-up).
        width: output width in pixels.
        height: output height in pixels.
        region: the output footprint as a GeoJSON polygon in EPSG:4326 (used for
            ``filterBounds``).
    """

    collection: str
    start: str
    end: str
    cloud_property: str | None
    cloudy_pct: float | None
    composite: str
    bands: tuple[str, ...]
    fill_value: float
    crs: str
    scale_m: float
    transform: tuple[float, float, float, float, float, float]
    width: int
    height: int
    region: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """The request as a plain, JSON-serialisable dict.

        Returns:
            Every field, tuples as lists, plus ``grid`` (the ``computePixels`` grid).
        """
        out = asdict(self)
        out["bands"] = list(self.bands)
        out["transform"] = list(self.transform)
        out["grid"] = self.grid()
        return out

    def grid(self) -> dict[str, Any]:
        """The ``grid`` argument of ``ee.data.computePixels`` (a ``PixelGrid``).

        Returns:
            ``{"dimensions", "affineTransform", "crsCode"}``.
        """
        a, b, c, d, e, f = self.transform
        return {
            "dimensions": {"width": self.width, "height": self.height},
            "affineTransform": {
                "scaleX": a,
                "shearX": b,
                "translateX": c,
                "shearY": d,
                "scaleY": e,
                "translateY": f,
            },
            "crsCode": self.crs,
        }

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """Output extent ``(xmin, ymin, xmax, ymax)`` in :attr:`crs`."""
        a, _, c, _, e, f = self.transform
        return c, f + e * self.height, c + a * self.width, f


def build_gee_request(
    region: Region,
    start: str,
    end: str,
    *,
    collection: str = DEFAULT_COLLECTION,
    bands: Sequence[str],
    scale_m: float = 10.0,
    cloudy_pct: float | None = 30.0,
    composite: str = "median",
    fill_value: float = 0.0,
    crs: str | int | None = None,
) -> GEERequest:
    """Describe the Earth Engine request for a region and a date range (pure, no network).

    Args:
        region: a :class:`~torchgeo_dofa.spatial.PointBuffer`, a
            :class:`~torchgeo_dofa.spatial.BBox` or a shapely geometry in EPSG:4326.
        start: first date, ISO ``YYYY-MM-DD`` (inclusive).
        end: end date, ISO (exclusive).
        collection: image collection id.
        bands: bands to select, in channel order (``B04`` is written ``B4`` for Sentinel-2).
        scale_m: pixel size in metres.
        cloudy_pct: maximum ``CLOUDY_PIXEL_PERCENTAGE`` for Sentinel-2 collections (None: no
            cloud filter); ignored for other collections.
        composite: ``"median"`` or ``"mosaic"``.
        fill_value: value for masked pixels.
        crs: output CRS; default the UTM zone of the region's centre.

    Returns:
        The request.

    Raises:
        ValueError: for an unknown composite, a bad scale, no bands, or a region too large for
            one ``computePixels`` answer (the message says what to change).
    """
    if composite not in COMPOSITES:
        raise ValueError(f"unknown composite {composite!r}: choose one of {list(COMPOSITES)}")
    if not (math.isfinite(scale_m) and scale_m > 0):
        raise ValueError(f"scale_m must be a positive number of metres, got {scale_m}")
    if not bands:
        raise ValueError("bands is empty: name at least one band to fetch")
    grid = utm_region_grid(region, scale_m, crs)
    crs_code, width, height = grid.crs, grid.width, grid.height
    if max(width, height) > COMPUTE_PIXELS_MAX_SIDE:
        raise ValueError(
            f"region is {width} x {height} px at {scale_m} m, more than Earth Engine's "
            f"{COMPUTE_PIXELS_MAX_SIDE} px per side: use a smaller region or a coarser scale_m"
        )
    size = width * height * (len(bands) + 1) * 4
    if size > COMPUTE_PIXELS_MAX_BYTES:
        raise ValueError(
            f"region is {width} x {height} px x {len(bands)} bands at {scale_m} m "
            f"({size / 2**20:.0f} MiB), more than one Earth Engine computePixels answer "
            f"({COMPUTE_PIXELS_MAX_BYTES // 2**20} MiB): use a smaller buffer, a coarser "
            "scale_m, or export the area (Export.image.toDrive) and use backend='local'"
        )
    transform = grid.transform
    region_4326 = grid.footprint_4326
    is_s2 = collection.upper().startswith("COPERNICUS/S2")
    names = tuple(canonical_band(b) if is_s2 else str(b) for b in bands)
    return GEERequest(
        collection=collection,
        start=str(start),
        end=str(end),
        cloud_property="CLOUDY_PIXEL_PERCENTAGE" if is_s2 and cloudy_pct is not None else None,
        cloudy_pct=float(cloudy_pct) if is_s2 and cloudy_pct is not None else None,
        composite=composite,
        bands=names,
        fill_value=float(fill_value),
        crs=crs_code,
        scale_m=float(scale_m),
        transform=transform,
        width=width,
        height=height,
        region=shapely.geometry.mapping(region_4326),
    )


def import_ee() -> ModuleType:
    """Import the Earth Engine client.

    Returns:
        The ``ee`` module.

    Raises:
        GEEUnavailableError: if earthengine-api is not installed, saying how to install it.
    """
    try:
        import ee
    except ImportError as err:
        raise GEEUnavailableError(
            f"backend='gee' needs the Earth Engine Python client, which is not installed: "
            f"{_INSTALL_HINT}. Without Earth Engine, export the area as GeoTIFF and use "
            "backend='local' (paths=...)"
        ) from err
    return ee


def _initialize(ee: ModuleType, project: str | None) -> None:
    """Initialise Earth Engine once per project, with a clear error when it fails."""
    project = project or os.environ.get("EE_PROJECT") or os.environ.get("GOOGLE_CLOUD_PROJECT")
    key = project or ""
    if key in _initialized:
        return
    try:
        if project:
            ee.Initialize(project=project)
        else:
            ee.Initialize()
    except Exception as err:
        raise GEEUnavailableError(
            f"Earth Engine could not be initialised ({type(err).__name__}: {err}). Run "
            "`earthengine authenticate` once, name a Cloud project with Earth Engine enabled "
            "(project=... or EE_PROJECT), and check the network connection"
        ) from err
    _initialized.add(key)


def _collection(ee: Any, request: GEERequest) -> Any:
    """The filtered ImageCollection of a request."""
    region = ee.Geometry(request.region)
    images = (
        ee.ImageCollection(request.collection)
        .filterBounds(region)
        .filterDate(request.start, request.end)
    )
    if request.cloud_property is not None and request.cloudy_pct is not None:
        images = images.filter(ee.Filter.lt(request.cloud_property, request.cloudy_pct))
    return images


def _composite(images: Any, request: GEERequest) -> Any:
    if request.composite == "median":
        return images.median()
    if request.cloud_property is not None:
        # mosaic() paints the last image on top: most cloudy first, least cloudy last
        return images.sort(request.cloud_property, False).mosaic()
    return images.sort("system:time_start").mosaic()


def decode_pixels(
    array: np.ndarray, bands: Sequence[str], fill_value: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Turn a ``computePixels`` NUMPY_NDARRAY answer into (C, H, W) values and a mask.

    Args:
        array: a structured (H, W) array with one field per band (and the validity band), as
            Earth Engine returns it, or a plain (H, W, C) array in band order.
        bands: the spectral bands, in channel order.
        fill_value: value written into invalid pixels (and non-finite values).

    Returns:
        ``(image (C, H, W) float32, valid (H, W) bool)``.

    Raises:
        ValueError: if a band is missing from the answer.
    """
    names = array.dtype.names
    if names is not None:
        missing = [b for b in bands if b not in names]
        if missing:
            raise ValueError(
                f"Earth Engine answer lacks band(s) {missing} (it has {list(names)}): check "
                "the band names against the collection"
            )
        image = np.stack([np.asarray(array[b], dtype=np.float32) for b in bands])
        if VALID_BAND in names:
            valid = np.asarray(array[VALID_BAND]) > 0
        else:
            valid = np.ones(image.shape[1:], dtype=bool)
    else:
        if array.ndim != 3 or array.shape[-1] < len(bands):
            raise ValueError(f"expected a structured or (H, W, C) array, got shape {array.shape}")
        image = np.moveaxis(np.asarray(array[..., : len(bands)], dtype=np.float32), -1, 0)
        valid = (
            array[..., len(bands)] > 0
            if array.shape[-1] > len(bands)
            else np.ones(image.shape[1:], dtype=bool)
        )
    valid = valid & np.isfinite(image).all(axis=0)
    image = np.where(valid[None], image, np.float32(fill_value)).astype(np.float32)
    return image, valid


def fetch_gee_pixels(
    request: GEERequest, project: str | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Run a request on Earth Engine and return raw values, validity and fetch metadata.

    The collection is filtered by region, dates and cloud cover, composited, the bands are
    selected, masked pixels are filled with ``fill_value`` (``unmask``) and the pixels are
    read on the request's grid with ``ee.data.computePixels`` (with a validity band: a pixel
    is valid when every band was unmasked in the composite).

    Args:
        request: from :func:`build_gee_request`.
        project: Cloud project for ``ee.Initialize`` (default ``EE_PROJECT`` /
            ``GOOGLE_CLOUD_PROJECT``).

    Returns:
        ``(image (C, H, W) float32, valid (H, W) bool, meta)``; ``meta`` has ``n_images``.

    Raises:
        GEEUnavailableError: if the client is missing, not authenticated, or the request fails.
        LookupError: if no image matches the filters.
    """
    ee = import_ee()
    _initialize(ee, project)
    try:
        images = _collection(ee, request)
        count = int(images.size().getInfo())
    except Exception as err:
        raise GEEUnavailableError(
            f"Earth Engine request for {request.collection} failed ({type(err).__name__}: "
            f"{err}); check authentication (`earthengine authenticate`) and the network"
        ) from err
    if count == 0:
        cloud = (
            f" with {request.cloud_property} < {request.cloudy_pct}"
            if request.cloud_property
            else ""
        )
        raise LookupError(
            f"no {request.collection} image over the region between {request.start} and "
            f"{request.end}{cloud}: widen the dates or raise cloudy_pct"
        )
    selected = _composite(images, request).select(list(request.bands))
    valid = selected.mask().reduce(ee.Reducer.min()).gt(0).rename(VALID_BAND)
    expression = (
        selected.toFloat()
        .unmask(request.fill_value, False)
        .addBands(valid.unmask(0, False).toFloat())
    )
    try:
        answer = ee.data.computePixels(
            {"expression": expression, "fileFormat": "NUMPY_NDARRAY", "grid": request.grid()}
        )
    except Exception as err:
        raise GEEUnavailableError(
            f"Earth Engine computePixels failed ({type(err).__name__}: {err})"
        ) from err
    image, mask = decode_pixels(np.asarray(answer), request.bands, request.fill_value)
    return image, mask, {"n_images": count}
