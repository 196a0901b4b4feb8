"""Regions of interest (rs-embed style) and their conversion onto a raster's pixel grid.

Regions are given in EPSG:4326 longitude/latitude, as rs-embed does:

* :class:`PointBuffer` ``(lon, lat, buffer_m)``: the square of side ``2 * buffer_m`` metres
  centred on the point (rs-embed's ``Point.buffer(buffer_m).bounds()``);
* :class:`BBox` ``(minlon, minlat, maxlon, maxlat)``;
* any shapely geometry, in EPSG:4326 or in a CRS you name.

:func:`region_window` turns a region into a chip on a dataset's pixel grid: the slices
``[xmin:xmax, ymin:ymax]`` a TorchGeo dataset is indexed with, snapped to whole pixels so that
pixels are read, never resampled.

:func:`read_points` reads a points file (CSV, GeoJSON, GeoPackage ...) into
:class:`PointBuffer` s and a table of their properties, so embeddings can be joined back to
their sites.
"""

from __future__ import annotations

import functools
import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyproj
import shapely
from pyproj import CRS
from pyproj.transformer import TransformerGroup
from shapely.geometry.base import BaseGeometry

__all__ = [
    "BBox",
    "CRSTransformError",
    "PointBuffer",
    "Region",
    "RegionGrid",
    "crs_label",
    "crs_name",
    "exact_epsg",
    "lonlat_bounds",
    "read_points",
    "region_to_crs",
    "region_window",
    "same_crs",
    "transform_geometry",
    "transformer",
    "utm_epsg",
    "utm_region_grid",
]

WGS84 = CRS.from_epsg(4326)


def _as_floats(obj: Any, names: Sequence[str]) -> None:
    """Set a frozen dataclass's fields ``names`` to Python floats.

    Raises:
        TypeError: naming a field that is not a real number (a string, a bool, None).
    """
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool | str | bytes) or value is None:
            raise TypeError(f"{name} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a number, got {value!r}") from None
        object.__setattr__(obj, name, number)


def _out_of_range(name: str, bounds: str, value: float) -> str:
    """The message of a coordinate out of its range in degrees.

    A value far beyond any in degrees (beyond +-360) gets the advice for metres of a
    projected CRS (a UTM zone's), the usual mistake; others (NaN, 190, 91) do not.
    """
    line = f"{name} must be in {bounds} degrees, got {value}"
    if math.isfinite(value) and abs(value) > 360.0:
        line += (
            " (longitude / latitude in degrees, EPSG:4326: transform projected coordinates, "
            "e.g. a UTM zone's metres, first)"
        )
    return line


@dataclass(frozen=True)
class PointBuffer:
    """A point with a buffer in metres: the square of side ``2 * buffer_m`` centred on it.

    Attributes:
        lon: longitude in degrees (EPSG:4326).
        lat: latitude in degrees (EPSG:4326).
        buffer_m: half the side of the square, in metres.
    """

    lon: float
    lat: float
    buffer_m: float

    def __post_init__(self) -> None:
        """Store the numbers as Python floats; validate the coordinates and the buffer.

        ``PointBuffer(13.16, 48.28, 1120)`` equals ``PointBuffer(13.16, 48.28, 1120.0)`` and
        one made of numpy floats, and so does its text (an export keys its rows by it).

        Raises:
            ValueError: if a coordinate is out of range or the buffer is not positive.
            TypeError: if a value is not a number.
        """
        _as_floats(self, ("lon", "lat", "buffer_m"))
        if not (math.isfinite(self.lon) and -180.0 <= self.lon <= 180.0):
            raise ValueError(_out_of_range("lon", "[-180, 180]", self.lon))
        if not (math.isfinite(self.lat) and -90.0 <= self.lat <= 90.0):
            raise ValueError(_out_of_range("lat", "[-90, 90]", self.lat))
        if not (math.isfinite(self.buffer_m) and self.buffer_m > 0):
            raise ValueError(f"buffer_m must be a positive number of metres, got {self.buffer_m}")

    def extent(self, crs: CRS | str | int) -> tuple[float, float, float, float]:
        """Centre and size of the buffered square in another CRS.

        In a projected CRS the square is ``2 * buffer_m`` metres (converted to the CRS's
        units) on each side, centred on the projected point. In a geographic CRS it is the
        bounding box of the metric square (built in an azimuthal equidistant projection
        centred on the point), so a "10 m" pixel grid in degrees still gets about
        ``2 * buffer_m / 10`` pixels per side.

        Args:
            crs: the target CRS.

        Returns:
            ``(cx, cy, width, height)`` in the target CRS's units.
        """
        target = CRS.from_user_input(crs)
        to_target = transformer(WGS84, target)
        cx, cy = to_target.transform(self.lon, self.lat)
        unit = _metres_per_unit(target)
        if unit is not None:
            side = 2.0 * self.buffer_m / unit
            return float(cx), float(cy), side, side
        xmin, ymin, xmax, ymax = self.to_geometry(target).bounds
        return float(cx), float(cy), xmax - xmin, ymax - ymin

    def to_geometry(self, crs: CRS | str | int = WGS84) -> BaseGeometry:
        """The buffered square as a polygon in ``crs`` (EPSG:4326 by default).

        Args:
            crs: the target CRS.

        Returns:
            A shapely polygon.
        """
        local = CRS.from_proj4(
            f"+proj=aeqd +lat_0={self.lat} +lon_0={self.lon} +datum=WGS84 +units=m +no_defs"
        )
        b = self.buffer_m
        square = shapely.segmentize(shapely.box(-b, -b, b, b), max_segment_length=b / 8)
        to_target = transformer(local, crs)
        return transform_geometry(square, to_target)


@dataclass(frozen=True)
class BBox:
    """A longitude/latitude bounding box in EPSG:4326.

    Attributes:
        minlon: western edge (degrees).
        minlat: southern edge (degrees).
        maxlon: eastern edge (degrees).
        maxlat: northern edge (degrees).
    """

    minlon: float
    minlat: float
    maxlon: float
    maxlat: float

    def __post_init__(self) -> None:
        """Store the edges as Python floats (as :class:`PointBuffer`); validate the box.

        Raises:
            ValueError: if an edge is out of range or the box is empty (boxes crossing the
                antimeridian are not supported: split them in two).
            TypeError: if an edge is not a number.
        """
        _as_floats(self, ("minlon", "minlat", "maxlon", "maxlat"))
        for name in ("minlon", "maxlon"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -180.0 <= value <= 180.0):
                raise ValueError(_out_of_range(name, "[-180, 180]", value))
        for name in ("minlat", "maxlat"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -90.0 <= value <= 90.0):
                raise ValueError(_out_of_range(name, "[-90, 90]", value))
        if not (self.minlon < self.maxlon and self.minlat < self.maxlat):
            raise ValueError(
                f"empty BBox {self}: need minlon < maxlon and minlat < maxlat "
                "(a box crossing the antimeridian must be split in two)"
            )

    def to_geometry(self, crs: CRS | str | int = WGS84) -> BaseGeometry:
        """The box as a polygon in ``crs`` (edges densified before reprojection).

        Args:
            crs: the target CRS (EPSG:4326 by default).

        Returns:
            A shapely polygon.
        """
        box = shapely.box(self.minlon, self.minlat, self.maxlon, self.maxlat)
        return _reproject(box, WGS84, CRS.from_user_input(crs))


#: Anything :func:`region_window` accepts.
type Region = PointBuffer | BBox | BaseGeometry


def region_to_crs(
    region: Region, crs: CRS | str | int, region_crs: CRS | str | int = WGS84
) -> BaseGeometry:
    """Convert a region to a geometry in ``crs``.

    Args:
        region: a :class:`PointBuffer`, a :class:`BBox` or a shapely geometry.
        crs: the target CRS (usually the dataset's).
        region_crs: CRS of a shapely geometry (ignored for PointBuffer/BBox, which are
            always EPSG:4326).

    Returns:
        The region's geometry in ``crs``.

    Raises:
        TypeError: if ``region`` is none of the accepted types.
    """
    target = CRS.from_user_input(crs)
    if isinstance(region, PointBuffer | BBox):
        return region.to_geometry(target)
    if isinstance(region, BaseGeometry):
        return _reproject(region, CRS.from_user_input(region_crs), target)
    raise TypeError(f"expected a PointBuffer, BBox or shapely geometry, got {type(region)}")


def region_window(
    region: Region,
    crs: CRS | str | int,
    res: tuple[float, float],
    origin: tuple[float, float],
    region_crs: CRS | str | int = WGS84,
) -> tuple[slice, slice]:
    """Chip bounds for a region, snapped to a pixel grid.

    Convention: a :class:`PointBuffer` gives a chip of ``round(2 * buffer_m / res)`` pixels
    per side (at least 1) whose centre is the grid node nearest the point (so the point is
    within half a pixel of the chip centre); a :class:`BBox` or geometry gives the smallest
    grid-aligned box covering the region's bounding box.

    Args:
        region: the region.
        crs: the grid's CRS.
        res: ``(xres, yres)`` pixel size in CRS units.
        origin: any grid corner ``(x, y)`` (e.g. the dataset bounds' ``(xmin, ymax)``).
        region_crs: CRS of a shapely geometry region.

    Returns:
        ``(slice(xmin, xmax), slice(ymin, ymax))`` in CRS units.
    """
    xres, yres = res
    x0, y0 = origin
    if isinstance(region, PointBuffer):
        cx, cy, width, height = region.extent(crs)
        nx = max(1, round(width / xres))
        ny = max(1, round(height / yres))
        col = round((cx - x0) / xres - nx / 2)
        row = round((cy - y0) / yres - ny / 2)
        xmin = x0 + col * xres
        ymin = y0 + row * yres
        return slice(xmin, xmin + nx * xres), slice(ymin, ymin + ny * yres)
    geometry = region_to_crs(region, crs, region_crs)
    gxmin, gymin, gxmax, gymax = geometry.bounds
    eps = 1e-6
    col0 = math.floor((gxmin - x0) / xres + eps)
    col1 = max(col0 + 1, math.ceil((gxmax - x0) / xres - eps))
    row0 = math.floor((gymin - y0) / yres + eps)
    row1 = max(row0 + 1, math.ceil((gymax - y0) / yres - eps))
    return (
        slice(x0 + col0 * xres, x0 + col1 * xres),
        slice(y0 + row0 * yres, y0 + row1 * yres),
    )


def _metres_per_unit(crs: CRS) -> float | None:
    """Metres per CRS unit for a projected CRS with linear units, else None."""
    if not crs.is_projected:
        return None
    axis = crs.axis_info[0] if crs.axis_info else None
    if axis is None or axis.unit_name in ("degree", "radian"):
        return None
    return float(axis.unit_conversion_factor)


def transform_geometry(geometry: BaseGeometry, transformer: pyproj.Transformer) -> BaseGeometry:
    """Apply a pyproj transformer to every vertex of a geometry (shapely 2's vectorised way).

    Replaces ``shapely.ops.transform(transformer.transform, geometry)``, deprecated in shapely
    2.1: the coordinates go through ``transformer`` as one (N, 2) array (x, y; a Z coordinate
    is dropped), so no ``DeprecationWarning`` is issued and the vertices are the same.

    Args:
        geometry: any shapely geometry.
        transformer: a ``pyproj.Transformer`` built with ``always_xy=True``.

    Returns:
        The transformed geometry (2D), same type and vertex count.
    """

    def apply(xy: np.ndarray) -> np.ndarray:
        x, y = transformer.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])

    return shapely.transform(geometry, apply)


def _reproject(geometry: BaseGeometry, src: CRS, dst: CRS) -> BaseGeometry:
    """Reproject a geometry, densifying its edges first so curved edges are followed."""
    if src == dst:
        return geometry
    xmin, ymin, xmax, ymax = geometry.bounds
    span = max(xmax - xmin, ymax - ymin)
    if span > 0:
        geometry = shapely.segmentize(geometry, max_segment_length=span / 32)
    return transform_geometry(geometry, transformer(src, dst))


#: Coordinate column pairs of a points CSV, in order of preference (matched case-insensitively).
POINT_COLUMNS = (("lon", "lat"), ("longitude", "latitude"), ("lng", "lat"), ("x", "y"))
#: Columns :func:`read_points` adds; input properties of these names become ``input_<name>``.
_RESERVED = ("point_index", "lon", "lat")
#: coordinates, properties, and how to name row ``i`` in an error message.
type _PointsRead = tuple[list[tuple[float, float]], pd.DataFrame, Callable[[int], str]]
_LEADING_ZERO = re.compile(r"^[+-]?0\d")


def read_points(
    path: str | os.PathLike[str], buffer_m: float
) -> tuple[list[PointBuffer], pd.DataFrame]:
    """Read points and keep their properties, in input order.

    Formats: ``.csv`` (comma-, semicolon- or tab-separated, with a header) whose coordinate
    columns are ``lon``/``lat``, ``longitude``/``latitude``, ``lng``/``lat`` or ``x``/``y``
    (any case; degrees, EPSG:4326); anything else is read as a vector file with geopandas
    (GeoJSON, GeoPackage, Shapefile ...; Point geometries, reprojected to EPSG:4326; a file
    without a CRS is taken as EPSG:4326, as GeoJSON specifies).

    Properties: every other CSV column or vector attribute, kept as it is written. CSV cells
    are read as text; a column becomes numeric only if every non-empty cell is a number and
    none has a leading zero (so ids like ``007`` stay text); empty cells are missing values.

    Args:
        path: the points file.
        buffer_m: half-side of each point's chip, in metres.

    Returns:
        ``(points, properties)``: one :class:`PointBuffer` per point, and a DataFrame with
        one row per point in the same order: ``point_index`` (0, 1, ... in input order),
        ``lon``, ``lat`` (degrees), then every input property (a property named like one
        of these three is renamed ``input_<name>``).

    Raises:
        ValueError: one line naming the file and the problem: missing file, unreadable
            or malformed file, no coordinate columns, a coordinate that is not a number or
            is out of range (with its line or feature number), a geometry that is not a
            point, no points at all, or a non-positive ``buffer_m``.
    """
    path = Path(path)
    if not (math.isfinite(buffer_m) and buffer_m > 0):
        raise ValueError(f"buffer_m must be a positive number of metres, got {buffer_m}")
    if not path.is_file():
        raise ValueError(f"points file {str(path)!r} does not exist")
    if path.suffix.lower() == ".csv":
        coords, props, where = _read_points_csv(path)
    else:
        coords, props, where = _read_points_vector(path)
    if not coords:
        raise ValueError(f"points file {path} holds no points")
    points = []
    for i, (lon, lat) in enumerate(coords):
        try:
            points.append(PointBuffer(lon, lat, buffer_m))
        except ValueError as err:
            raise ValueError(f"points file {path}, {where(i)}: {err}") from None
    props = props.reset_index(drop=True)
    props = props.rename(columns={c: f"input_{c}" for c in props.columns if c in _RESERVED})
    head = pd.DataFrame(
        {
            "point_index": pd.RangeIndex(len(points)).to_numpy(dtype="int64"),
            "lon": [p.lon for p in points],
            "lat": [p.lat for p in points],
        }
    )
    return points, pd.concat([head, props], axis=1)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _read_points_csv(
    path: Path,
) -> _PointsRead:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = f.readline()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read points file {path}: {_one_line(err)}") from None
    sep = ","
    if "," not in header:
        sep = ";" if ";" in header else "\t" if "\t" in header else ","
    try:
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read points file {path} as CSV: {_one_line(err)}") from None
    by_lower: dict[str, list[str]] = {}
    for col in frame.columns:
        by_lower.setdefault(str(col).strip().lower(), []).append(str(col))
    pair = next((p for p in POINT_COLUMNS if p[0] in by_lower and p[1] in by_lower), None)
    if pair is None:
        names = " / ".join(f"{a}, {b}" for a, b in POINT_COLUMNS)
        raise ValueError(
            f"points file {path} has no coordinate columns (found {list(frame.columns)}): "
            f"name them {names} (any case; degrees, EPSG:4326)"
        )
    for key in pair:
        if len(by_lower[key]) > 1:
            raise ValueError(
                f"points file {path} has several {key!r} columns {by_lower[key]}: keep one"
            )
    lon_col, lat_col = by_lower[pair[0]][0], by_lower[pair[1]][0]

    def where(i: int) -> str:
        return f"line {i + 2}"

    coords = []
    for i, (lon, lat) in enumerate(zip(frame[lon_col], frame[lat_col], strict=True)):
        try:
            coords.append((float(lon), float(lat)))
        except ValueError:
            raise ValueError(
                f"points file {path}, {where(i)}: {lon_col}={lon!r}, {lat_col}={lat!r} is not "
                "a pair of numbers (decimal degrees with a point, e.g. 4.35)"
            ) from None
    props = frame.drop(columns=[lon_col, lat_col])
    for col in props.columns:
        props[col] = _typed(props[col])
    return coords, props, where


def _typed(column: pd.Series) -> pd.Series:
    """A text CSV column as numbers when every non-empty cell is one (no leading zeros)."""
    text = column.str.strip()
    present = text != ""
    if present.any() and not text[present].str.match(_LEADING_ZERO).any():
        numbers = pd.to_numeric(text.where(present), errors="coerce")
        if numbers[present].notna().all():
            return numbers
    return column.where(present, None)


def _read_points_vector(
    path: Path,
) -> _PointsRead:
    import geopandas as gpd

    try:
        frame = gpd.read_file(path)
    except Exception as err:  # pyogrio / fiona raise their own types for a malformed file
        raise ValueError(
            f"cannot read points file {path} as a vector file (GeoJSON, GeoPackage, ...; "
            f"use .csv for a CSV): {_one_line(err)}"
        ) from None

    def where(i: int) -> str:
        return f"feature {i}"

    geoms = frame.geometry
    for i, g in enumerate(geoms):
        if g is None or g.is_empty:
            raise ValueError(f"points file {path}, {where(i)}: has no geometry")
        if g.geom_type != "Point":
            raise ValueError(
                f"points file {path}, {where(i)}: is a {g.geom_type}; only Point geometries "
                "are supported (one chip per point)"
            )
    if frame.crs is None:
        frame = frame.set_crs(4326)
    frame = frame.to_crs(4326)
    coords = [(float(g.x), float(g.y)) for g in frame.geometry]
    props = pd.DataFrame(frame.drop(columns=frame.geometry.name))
    return coords, props, where


def exact_epsg(crs: object) -> int | None:
    """The EPSG code of a CRS only where the code's definition is the same CRS.

    ``to_epsg()`` alone answers with the closest code at 70 % confidence: a transverse
    Mercator on GRS80 with an unknown datum comes back as EPSG:25833 (ETRS89 / UTM 33N), and
    writing that code would relabel the file's datum. The code is kept only where PROJ finds
    its definition equivalent to the CRS (names, WKT flavour and axis order aside), so an
    ESRI or GDAL WKT of UTM 33N still gives 32633.

    Args:
        crs: anything ``pyproj.CRS.from_user_input`` takes (a rasterio CRS, WKT, a PROJ
            string, ``"EPSG:32633"``).

    Returns:
        The EPSG code, or None where the CRS has no equivalent one.
    """
    parsed = CRS.from_user_input(crs)
    epsg = parsed.to_epsg()
    if epsg is None or not CRS.from_epsg(epsg).equals(parsed, ignore_axis_order=True):
        return None
    return int(epsg)


def crs_name(crs: object) -> str:
    """A CRS as text that names no other CRS: ``EPSG:<code>`` (:func:`exact_epsg`), else WKT.

    rasterio's and pyproj's ``to_string()`` answer with the nearest EPSG code, which
    relabels a CRS without one (a transverse Mercator on GRS80 with no datum reads
    ``EPSG:25833``): this is what job identities and output metadata record instead.

    Args:
        crs: anything ``pyproj.CRS.from_user_input`` takes.

    Returns:
        ``"EPSG:32633"``, or the CRS's WKT.
    """
    parsed = CRS.from_user_input(crs)
    epsg = exact_epsg(parsed)
    return f"EPSG:{epsg}" if epsg else parsed.to_wkt()


def crs_label(crs: object) -> str:
    """A short name of a CRS for messages.

    Args:
        crs: anything ``pyproj.CRS.from_user_input`` takes.

    Returns:
        ``EPSG:<code>`` where exact (:func:`exact_epsg`), else its PROJ string, else (a
        local CRS has none) its kind and name, ``Engineering CRS 'arbitrary'``.
    """
    parsed = CRS.from_user_input(crs)
    epsg = exact_epsg(parsed)
    if epsg:
        return f"EPSG:{epsg}"
    parts = [exact_epsg(sub) for sub in parsed.sub_crs_list] if parsed.is_compound else []
    if parts and all(parts):  # EPSG:32633+5773 (UTM 33N + EGM96 height)
        return "EPSG:" + "+".join(str(p) for p in parts)
    with warnings.catch_warnings():  # PROJ strings drop details (datum names): only a label
        warnings.simplefilter("ignore", UserWarning)
        try:
            proj = None if parsed.is_engineering else parsed.to_proj4()
        except pyproj.exceptions.CRSError:
            proj = None
    return proj.replace(" +type=crs", "") if proj else f"{parsed.type_name} {parsed.name!r}"


def same_crs(a: object, b: object) -> bool:
    """Whether two CRSs, however spelled (EPSG code, PROJ string, any WKT), are the same.

    Args:
        a: anything ``pyproj.CRS.from_user_input`` takes (or None: no CRS).
        b: the same.

    Returns:
        True for equal text, two Nones, or two CRSs PROJ finds equivalent (axis order
        aside; local CRSs also by name); False where either cannot be parsed.
    """
    if isinstance(a, str) and a == b:
        return True
    if a is None or b is None:
        return a is None and b is None  # two files without CRS are alike
    try:  # (not CRS objects' ==: pyproj's ignores names)
        first, second = CRS.from_user_input(a), CRS.from_user_input(b)
    except pyproj.exceptions.CRSError:
        return False
    if (first.is_engineering or second.is_engineering) and first.name != second.name:
        return False  # local CRSs are told apart by name alone (PROJ's equals ignores names)
    return bool(first.equals(second, ignore_axis_order=True))


class CRSTransformError(ValueError):
    """Coordinates cannot be transformed between two CRSs (e.g. a local CRS and EPSG:4326).

    Attributes:
        reason: why, in a few words (``"a local CRS is not tied to the Earth"``, or PROJ's
            message); empty where unknown.
    """

    def __init__(self, message: str, reason: str = "") -> None:
        """Create the error: ``message`` is what is shown, ``reason`` its cause alone."""
        super().__init__(message)
        self.reason = reason


def transformer(src: object, dst: object) -> pyproj.Transformer:
    """``pyproj.Transformer.from_crs(src, dst, always_xy=True)``, failing in one sentence.

    Args:
        src: the source CRS (anything ``pyproj.CRS.from_user_input`` takes).
        dst: the target CRS.

    Returns:
        The transformer (x, y order: longitude first for geographic CRSs).

    Raises:
        CRSTransformError: where PROJ finds no transformation (a local / engineering CRS has
            none to longitude / latitude or to another CRS), naming both CRSs and the fixes.
    """
    source, target = CRS.from_user_input(src), CRS.from_user_input(dst)
    if (source.is_engineering or target.is_engineering) and not same_crs(source, target):
        # PROJ links two local CRSs by the identity: they need not be the same place
        raise _crs_transform_error(source, target, None)
    try:
        return pyproj.Transformer.from_crs(source, target, always_xy=True)
    except pyproj.exceptions.ProjError as err:
        raise _crs_transform_error(source, target, err) from None


def lonlat_bounds(bounds: Sequence[float], crs: object) -> tuple[float, float, float, float]:
    """Bounds in a CRS as (west, south, east, north) longitude / latitude (EPSG:4326).

    PROJ's ``transform_bounds`` (21 points a side), for messages saying where data lies.

    Args:
        bounds: (xmin, ymin, xmax, ymax) in ``crs``.
        crs: anything ``pyproj.CRS.from_user_input`` takes.

    Returns:
        The bounds in degrees (west > east across the antimeridian).

    Raises:
        CRSTransformError: as :func:`transformer` (a local CRS).
    """
    x0, y0, x1, y1 = (float(b) for b in bounds)
    west, south, east, north = transformer(crs, WGS84).transform_bounds(x0, y0, x1, y1)
    return west, south, east, north


def _crs_transform_error(src: CRS, dst: CRS, err: BaseException | None) -> CRSTransformError:
    """The :class:`CRSTransformError` of a pair of CRSs.

    Args:
        src: the source CRS.
        dst: the target CRS.
        err: PROJ's error (None for two local CRSs PROJ would link by identity, or for a
            pair whose every transformation needs a datum grid PROJ lacks).

    Returns:
        The error: one sentence naming both CRSs, why, and the command line's fixes.
    """
    fix = (
        "give the files their real CRS (gdal_edit.py -a_srs EPSG:<code>), or embed them whole "
        "in their own CRS (no bbox or points, and crs= only to name theirs)"
    )
    if src.is_engineering or dst.is_engineering:
        why = "a local CRS is not tied to the Earth"
    elif grids := missing_grids(src, dst):
        why = f"it needs the datum grid {', '.join(grids)}, which PROJ lacks"
        fix = (
            f"{_install_grid(grids[0])}, or give the files a CRS PROJ can use "
            "(gdal_edit.py -a_srs EPSG:<code>)"
        )
    else:
        why = str(err).splitlines()[0]
    return CRSTransformError(
        f"cannot transform coordinates from {crs_label(src)} to {crs_label(dst)} ({why}): {fix}",
        reason=why,
    )


def _install_grid(grid: str) -> str:
    """How to get a datum grid PROJ lacks (its CDN file name, as :func:`missing_grids` gives)."""
    return f"install it (projsync --file {grid}, or PROJ_NETWORK=ON to fetch grids when used)"


@functools.lru_cache(maxsize=256)
def _missing_grids(src_wkt: str, dst_wkt: str) -> tuple[str, ...]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyproj warns that the best one is unavailable
        group = TransformerGroup(src_wkt, dst_wkt, always_xy=True)
    if group.transformers:
        return ()
    names = {  # the name on PROJ's CDN (us_noaa_conus.tif), which projsync matches
        os.path.basename(grid.url) or grid.short_name or grid.full_name
        for operation in group.unavailable_operations
        for grid in operation.grids
        if not grid.available
    }
    return tuple(sorted(names))


def missing_grids(src: object, dst: object) -> list[str]:
    """The datum grids PROJ lacks where every transformation from ``src`` to ``dst`` needs one.

    A CRS such as ``+proj=utm +zone=33 +ellps=intl +nadgrids=ntv2.gsb`` is tied to WGS 84
    only through its grid file: without it PROJ has no transformation, GDAL prints
    ``ERROR 1: PROJ: hgridshift: could not find required grid(s)`` and a GeoTIFF written in
    it loses the grid (GDAL labels it with the bare datum's EPSG code).

    Args:
        src: the source CRS (anything ``pyproj.CRS.from_user_input`` takes).
        dst: the target CRS.

    Returns:
        The grids' file names as PROJ's CDN serves them (``+nadgrids=conus`` is
        ``us_noaa_conus.tif``; the name given where PROJ knows no other), sorted; empty
        where PROJ can run a transformation (or none needs a grid). Answered once per pair
        of CRSs.
    """
    source, target = CRS.from_user_input(src), CRS.from_user_input(dst)
    if source.is_engineering or target.is_engineering:
        return []
    return list(_missing_grids(source.to_wkt(), target.to_wkt()))


def require_datum_grids(crs: object, setting: str = "") -> None:
    """Refuse a CRS that PROJ cannot tie to longitude / latitude for want of a datum grid.

    Checked before a job reads or writes anything: without the grid, GDAL fails on every
    transformation with ``ERROR 1: PROJ ...`` lines and the grid GeoTIFF would be labelled
    with another CRS than the table.

    Args:
        crs: the CRS (anything ``pyproj.CRS.from_user_input`` takes).
        setting: the argument that named it (``"crs="``) where the user gave it, not a file:
            the fix is then another value for it, not another CRS for the files.

    Raises:
        CRSTransformError: naming the missing grid and the fixes (``projsync``, or another
            CRS).
    """
    source = CRS.from_user_input(crs)
    if not (grids := missing_grids(source, WGS84)):
        return
    err = _crs_transform_error(source, WGS84, None)  # its reason names the grids
    if not setting:
        raise err
    raise CRSTransformError(
        f"{setting} {crs_label(source)} cannot be tied to longitude / latitude ({err.reason}): "
        f"{_install_grid(grids[0])}, or pass another {setting}",
        reason=err.reason,
    )


def outside_area_of_use(
    crs: object, bounds: tuple[float, float, float, float]
) -> tuple[float, float, float, float] | None:
    """The CRS's area of use, where ``bounds`` lie wholly outside it; else None.

    Coordinates far from where a CRS is defined (a file without CRS given the wrong
    ``crs=``: UTM northings labelled British National Grid) read without error but place
    the outputs in the wrong spot. Only no overlap at all counts: a tile reaching past its
    UTM zone's edge, as Sentinel-2 tiles do, is not outside.

    Args:
        crs: the CRS (anything ``pyproj.CRS.from_user_input`` takes).
        bounds: ``(xmin, ymin, xmax, ymax)`` in ``crs``.

    Returns:
        ``(west, south, east, north)`` of the area of use in degrees (EPSG's), or None where
        ``bounds`` meet it, or the CRS has no area of use (a PROJ string, a local CRS) or it
        cannot be projected into the CRS.
    """
    source = CRS.from_user_input(crs)
    area = source.area_of_use or next((c.area_of_use for c in source.sub_crs_list), None)
    if area is None or area.west > area.east or source.is_engineering:  # antimeridian: skip
        return None
    try:
        x0, y0, x1, y1 = transformer(WGS84, source).transform_bounds(
            area.west, area.south, area.east, area.north, densify_pts=21
        )
    except (CRSTransformError, pyproj.exceptions.ProjError):
        return None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return None
    xmin, ymin, xmax, ymax = bounds
    if xmin <= x1 and xmax >= x0 and ymin <= y1 and ymax >= y0:
        return None
    return area.west, area.south, area.east, area.north


def utm_epsg(lon: float, lat: float) -> int:
    """EPSG code of the WGS 84 UTM zone holding a point (no Norway/Svalbard exceptions).

    Args:
        lon: longitude in degrees.
        lat: latitude in degrees.

    Returns:
        ``326zz`` north of the equator, ``327zz`` south of it.
    """
    zone = math.floor((lon + 180.0) / 6.0) % 60 + 1
    return (32600 if lat >= 0 else 32700) + zone


@dataclass(frozen=True)
class RegionGrid:
    """A region's pixel grid in its UTM zone (or a given CRS), origin (0, 0).

    Attributes:
        crs: the grid's CRS as ``EPSG:n`` (WKT for CRSs without a code).
        transform: affine ``(a, b, c, d, e, f)`` of the grid, north-up.
        width: pixels across.
        height: pixels down.
        footprint_4326: the grid's extent in EPSG:4326 (edges densified, so it holds the
            whole grid after reprojection).
    """

    crs: str
    transform: tuple[float, float, float, float, float, float]
    width: int
    height: int
    footprint_4326: BaseGeometry


def utm_region_grid(region: Region, resolution: float, crs: str | int | None = None) -> RegionGrid:
    """The grid Earth Engine and STAC composites of a region are read on.

    The region's UTM zone (from its centre) unless ``crs`` is given, ``resolution`` map
    units a pixel, origin (0, 0), so at 10 m the pixels are Sentinel-2's own; the window
    follows :func:`region_window` (a PointBuffer gives ``round(2 * buffer_m / resolution)``
    pixels a side, a box the smallest covering window).

    Args:
        region: PointBuffer, BBox or shapely geometry (EPSG:4326).
        resolution: pixel size in metres (map units of ``crs``).
        crs: output CRS; default the UTM zone of the region's centre.

    Returns:
        The grid.
    """
    resolution = float(resolution)
    if isinstance(region, PointBuffer):
        lon, lat = region.lon, region.lat
    elif isinstance(region, BBox):
        lon, lat = (region.minlon + region.maxlon) / 2, (region.minlat + region.maxlat) / 2
    else:
        centre = region.centroid
        lon, lat = float(centre.x), float(centre.y)
    target = CRS.from_user_input(crs if crs is not None else utm_epsg(lon, lat))
    xs, ys = region_window(region, target, (resolution, resolution), (0.0, 0.0))
    width = max(1, round((xs.stop - xs.start) / resolution))
    height = max(1, round((ys.stop - ys.start) / resolution))
    footprint = shapely.segmentize(
        shapely.box(xs.start, ys.start, xs.stop, ys.stop),
        max_segment_length=max(width, height) * resolution / 8,
    )
    to_wgs84 = transformer(target, WGS84)
    return RegionGrid(
        crs=crs_name(target),
        transform=(
            float(resolution),
            0.0,
            float(xs.start),
            0.0,
            -float(resolution),
            float(ys.stop),
        ),
        width=width,
        height=height,
        footprint_4326=transform_geometry(footprint, to_wgs84),
    )
