"""A TorchGeo data module for DOFA prediction, and a helper to read one region as an array.

:class:`DOFAPredictDataModule` serves one of three kinds of chips to ``Trainer.predict``:

* ``grid`` (default): whole rasters cut into ``patch_size`` x ``patch_size`` chips (224 px by
  default) every ``stride`` pixels (TorchGeo's :class:`~torchgeo.samplers.GriddedPatchSampler`;
  chips at the edges may reach past the raster, those pixels are marked invalid);
* ``roi``: the same grid restricted to a region of interest, a :class:`~torchgeo_dofa.spatial.BBox`
  (EPSG:4326) or a shapely geometry (EPSG:4326 unless ``roi_crs`` says otherwise); with
  ``roi_sampling="whole"`` the region's bounding box is one chip instead;
* ``points``: one chip per :class:`~torchgeo_dofa.spatial.PointBuffer`, in the given order,
  centred on the point, ``round(2 * buffer_m / res)`` pixels per side (e.g. 2240 m = 224 px at
  10 m). Chips of other sizes are brought to 224 by the dataset's transforms
  (``DOFAPreprocess`` resizes); without them, points of different buffers need
  ``batch_size=1``.

Chips are pixel-aligned with the dataset grid, so pixels are read, never resampled. Batches are
collated with :func:`~torchgeo_dofa.datasets.stack_dofa_samples`; no batch augmentation is
applied (normalisation belongs to the dataset's ``transforms``).

:class:`DOFAEuroSATDataModule` (and its EuroSAT100 / EuroSATSpatial kin) is TorchGeo's
EuroSAT data module with DOFA's preprocessing in place of EuroSAT's own normalisation, for
fine-tuning a classification task on the DOFA paper's benchmark.

:func:`read_roi` reads one region as a raw (C, H, W) reflectance array with its affine
transform, CRS, band names, wavelengths and validity mask (the local backend of an
rs-embed-style ``get_embedding``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import http.client
import inspect
import json
import math
import operator
import os
import pathlib
import socket
import urllib.error
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
import rasterio
import shapely
import torch
from pyproj import CRS
from rasterio.crs import CRS as RioCRS
from rasterio.transform import Affine
from shapely.geometry.base import BaseGeometry
from torch.utils.data import DataLoader
from torchgeo.datamodules import GeoDataModule, NonGeoDataModule
from torchgeo.datamodules.utils import MisconfigurationException
from torchgeo.datasets import EuroSAT, EuroSAT100, EuroSATSpatial
from torchgeo.datasets.utils import GeoSlice, Path, Sample
from torchgeo.samplers import GeoSampler

from torchgeo_dofa import _warnings
from torchgeo_dofa.bands import BandError, canonical_band, refuse_one_string
from torchgeo_dofa.datasets import (
    ChipFolder,
    InputError,
    RasterInput,
    Sentinel2Base,
    Sentinel2SR,
    TimeRange,
    UndatedScenesError,
    _first_few,
    find_raster_inputs,
    no_scene_within,
    refuse_repeated_bands,
    stack_dofa_samples,
    time_slice,
    undated_scenes_problem,
    unreadable_input,
)
from torchgeo_dofa.runtime import (
    MAX_CHIP_PX,
    decimated_read,
    file_signature,
    gdal_cache_bytes,
    gdal_worker_init,
    loader_context,
    loader_workers,
    workers_open_file_problem,
)
from torchgeo_dofa.spatial import (
    WGS84,
    BBox,
    PointBuffer,
    Region,
    _metres_per_unit,
    crs_label,
    lonlat_bounds,
    region_to_crs,
    region_window,
    same_crs,
)
from torchgeo_dofa.transforms import INPUT_PREPS, LOW_MAX, LOW_VALUES_ADVICE, DOFAPreprocess
from torchgeo_dofa.writers import GridGeometry, folders_removed_if_left_empty

__all__ = [
    "EUROSAT_DOFA_BANDS",
    "ChipGridSampler",
    "DOFAChipFolderDataModule",
    "DOFAEuroSAT100DataModule",
    "DOFAEuroSATDataModule",
    "DOFAEuroSATSpatialDataModule",
    "DOFAPredictDataModule",
    "RegionSampler",
    "RoiArray",
    "TimeRange",
    "acquisition_span",
    "chip_time",
    "chip_times",
    "read_roi",
    "refuse_mixed_acquisitions",
    "refuse_undated_scenes",
    "scenes_read",
    "scenes_within",
]


def _time_slice(time: TimeRange | None) -> slice | None:
    """:func:`~torchgeo_dofa.datasets.time_slice`, None for None."""
    return None if time is None else time_slice(time)


def scenes_within(dataset: Sentinel2Base, time: TimeRange | slice | None) -> Any:
    """The dataset's index rows (one per scene) whose acquisition span meets ``time``.

    Args:
        dataset: the dataset.
        time: ``(start, stop)`` (inclusive), a slice of timestamps, or None for every scene.

    Returns:
        A GeoDataFrame: a subset of ``dataset.index`` (IntervalIndex of acquisition spans).
    """
    tslice = time if isinstance(time, slice) or time is None else _time_slice(time)
    index = dataset.index
    if tslice is None:
        return index
    wanted = pd.Interval(pd.Timestamp(tslice.start), pd.Timestamp(tslice.stop), closed="both")
    return index[index.index.overlaps(wanted)]


def _iso_utc(value: Any) -> str:
    """A time bound as ISO 8601 UTC text (``2017-09-14T09:30:29Z``); naive times are UTC."""
    stamp = pd.Timestamp(value)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.isoformat().replace("+00:00", "Z")


def acquisition_span(dataset: Sentinel2Base, scenes: Any = None) -> tuple[str, str] | None:
    """When the scenes were acquired: the earliest start and latest end of their spans.

    A scene's span is the one the ``time`` / ``--datetime`` selection uses: a STAC item's
    ``datetime`` (its second) or ``start_datetime`` / ``end_datetime``, else a date in its
    name (that day, or that second for ``YYYYMMDDTHHMMSS``). A scene without a date spans
    all time, so the span of scenes that include one is unknown; so is that of a scene dated
    by the first of several dates in its name (``Sentinel2Base.first_of_several_dates``: a
    range such as ``..._2019-02-06_2020-02-01.tif``, which the time selection dates by
    that first day).

    Args:
        dataset: the dataset.
        scenes: some of its index rows (default: all of them).

    Returns:
        ``(start, end)`` as ISO 8601 UTC text (the end inclusive, e.g.
        ``2017-09-14T23:59:59.999999Z`` for a date-only name), or None where a scene has no
        date or there is no scene.
    """
    rows = dataset.index if scenes is None else scenes
    if not len(rows):
        return None
    first_only: frozenset[str] = getattr(dataset, "first_of_several_dates", frozenset())
    if any(str(path) in first_only for path in rows["filepath"]):
        return None  # a name's first date is not its span (a range: 2019-02-06_2020-02-01)
    spans = rows.index
    mint, maxt = pd.Timestamp(dataset.mint), pd.Timestamp(dataset.maxt)
    if bool(((spans.left <= mint) | (spans.right >= maxt)).any()):
        return None
    return _iso_utc(spans.left.min()), _iso_utc(spans.right.max())


def scenes_read(dataset: Sentinel2Base, chips: Sequence[tuple[slice, slice, slice]]) -> Any:
    """The index rows of the scenes some of ``chips`` read (as TorchGeo queries them).

    A scene is read by a chip whose footprint meets its area (not only its edge, as
    :func:`chip_times`) and whose time slice meets its span.

    Args:
        dataset: the dataset the chips are read from.
        chips: ``(x, y, t)`` slices in the dataset's CRS (a sampler's).

    Returns:
        Those rows of ``dataset.index``, in index order.
    """
    index = dataset.index
    if not len(chips) or not len(index):
        return index.iloc[:0]
    xy = np.array([(c[0].start, c[1].start, c[0].stop, c[1].stop) for c in chips], dtype=float)
    boxes = shapely.box(xy[:, 0], xy[:, 1], xy[:, 2], xy[:, 3])
    chip, scene = index.sindex.query(boxes, predicate="intersects")
    inside = ~shapely.touches(boxes[chip], index.geometry.array[scene])  # not edge-only
    chip, scene = chip[inside], scene[inside]
    spans = index.index
    low, high = pd.Timestamp(dataset.mint), pd.Timestamp(dataset.maxt)
    starts = pd.DatetimeIndex([low if c[2].start is None else c[2].start for c in chips])
    stops = pd.DatetimeIndex([high if c[2].stop is None else c[2].stop for c in chips])
    meets = (spans.left[scene] <= stops[chip]) & (spans.right[scene] >= starts[chip])
    return index.iloc[np.unique(scene[np.asarray(meets)])]


def _dated_scenes(dataset: Sentinel2Base, time: TimeRange | None) -> Any:
    """:func:`scenes_within`, refusing a time range that holds no scene."""
    scenes = scenes_within(dataset, time)
    if scenes.empty:
        assert time is not None  # every scene is within no range
        raise no_scene_within(time, dataset.index.index.left)
    return scenes


def chip_time(scenes: Any, box: BaseGeometry, default: slice) -> slice:
    """A chip's time slice: the span of the scenes it reads (``default`` if it reads none).

    Args:
        scenes: index rows (as :func:`scenes_within` gives), in the chip's CRS.
        box: the chip's footprint.
        default: the slice to use where no scene's area meets the chip.

    Returns:
        ``slice(earliest start, latest end)`` of the scenes whose area meets the chip, so a
        TorchGeo query reads the same scenes as with ``default`` and a chip's recorded time
        is its own, not its region's.
    """
    return chip_times(scenes, [box], default)[0]


def chip_times(scenes: Any, boxes: Sequence[BaseGeometry], default: slice) -> list[slice]:
    """:func:`chip_time` of many chips, in one spatial-index query (a sampler's whole grid).

    Args:
        scenes: index rows (as :func:`scenes_within` gives), in the chips' CRS.
        boxes: the chips' footprints.
        default: the slice of a chip no scene's area meets.

    Returns:
        One slice per box, in order.
    """
    if not len(boxes):
        return []
    geoms = np.asarray(boxes, dtype=object)
    chip, scene = scenes.sindex.query(geoms, predicate="intersects")
    inside = ~shapely.touches(geoms[chip], scenes.geometry.array[scene])  # not edge-only
    chip, scene = chip[inside], scene[inside]
    spans = scenes.index
    starts = pd.Series(spans.left[scene]).groupby(chip).min()
    stops = pd.Series(spans.right[scene]).groupby(chip).max()
    times = [default] * len(boxes)
    for i, start, stop in zip(starts.index, starts, stops, strict=True):
        times[int(i)] = slice(start, stop)
    return times


def refuse_mixed_acquisitions(
    dataset: Sentinel2Base,
    time: TimeRange | slice | None,
    *,
    box: BaseGeometry | None = None,
    fix: Callable[[str], str] | None = None,
) -> None:
    """Refuse scenes acquired at different times that overlap: a chip would mix them.

    TorchGeo merges every scene a chip meets (the first file's valid pixels, gaps filled from
    the next), which is a mosaic for tiles of one acquisition but, for a time series of one
    place, one embedding of several dates' pixels. Scenes of one UTC day (a pass's tiles,
    seconds apart) or whose spans overlap in time are one acquisition. A scene without a date
    (no STAC item, no date in its name: it spans all time, so a time range cannot leave it
    out) overlapping a dated one is refused too; undated scenes among themselves are not.

    Args:
        dataset: the dataset (``time_series=True`` datasets stack dates and are not checked).
        time: the ``(start, stop)`` the job reads (or a slice), or None.
        box: only the scenes meeting this footprint (one chip's), in the dataset's CRS.
        fix: the hint choosing one date, from its ISO day (default: the data module's
            ``time=('DAY', 'DAY 23:59:59')``).

    Raises:
        InputError: naming two of the scenes, their dates and the fixes (``time=``, or
            the files as separate inputs).
    """
    if getattr(dataset, "time_series", False):
        return
    scenes = scenes_within(dataset, time)
    if box is not None:
        scenes = scenes.iloc[scenes.sindex.query(box, predicate="intersects")]
    mint, maxt = pd.Timestamp(dataset.mint), pd.Timestamp(dataset.maxt)
    undated_rows = (scenes.index.left <= mint) & (scenes.index.right >= maxt)
    dated, undated = scenes[~undated_rows], scenes[undated_rows]
    pixel = abs(float(dataset.res[0]) * float(dataset.res[1]))

    def overlap(a: Any, b: Any) -> bool:
        return bool(a.geometry.union_all().intersection(b.geometry.union_all()).area > pixel)

    def name(rows: Any) -> str:
        return os.path.basename(str(rows.iloc[0]["filepath"]))

    # one acquisition: the tiles of one UTC day (a pass's tiles differ by seconds), or spans
    # that overlap in time (a product over several days)
    days = sorted({span.left.date() for span in dated.index})
    by_day = {day: dated[[span.left.date() == day for span in dated.index]] for day in days}
    for i, early in enumerate(days):
        for late in days[i + 1 :]:
            a, b = by_day[early], by_day[late]
            if a.index.right.max() >= b.index.left.min() or not overlap(a, b):
                continue
            hint = fix(early.isoformat()) if fix is not None else _time_hint(early.isoformat())
            raise InputError(
                f"{name(a)} (acquired {early.isoformat()}) and {name(b)} (acquired "
                f"{late.isoformat()}) overlap: a chip would mix the two dates' pixels, and DOFA "
                f"embeds one acquisition at a time ({len(days)} dates among the inputs). "
                f"Choose the dates with {hint}, or give the files as separate inputs (one "
                "output each)"
            )
    for k in range(len(undated)):
        alone = undated.iloc[k : k + 1]
        for day in days:
            if overlap(alone, by_day[day]):
                raise InputError(
                    f"{name(alone)} has no date (no STAC item JSON beside it, no date in its "
                    f"name) and overlaps {name(by_day[day])} (acquired {day.isoformat()}): a "
                    "chip would mix them. Give the files as separate inputs (one output "
                    "each), or name the file with its date (e.g. scene_YYYYMMDD.tif)"
                )


def refuse_undated_scenes(
    dataset: Sentinel2Base,
    time: TimeRange | slice | None,
    *,
    box: BaseGeometry | None = None,
    asked: str | None = None,
    option: str = "time=",
) -> None:
    """Refuse a time range where scenes have no acquisition date: it cannot select them.

    A scene dated nowhere (no STAC item JSON beside it, no date in its file, item or folder
    name) spans all time, so the dataset's ``time=`` keeps it whatever the dates: it was
    embedded as if it matched, alone or beside the dated scenes of the range.

    Args:
        dataset: the dataset, opened with ``time`` (the scenes of other dates left out).
        time: the range asked for, or None (nothing to refuse; nor for a range open at
            both ends, which leaves no scene out).
        box: only the scenes meeting this footprint (one chip's), in the dataset's CRS.
        asked: the range as the caller names it in the message (default ``time=...``).
        option: the option the message says to leave out.

    Raises:
        UndatedScenesError: naming the first few undated scenes' files, their count, where a
            date was looked for and the fixes.
    """
    if time is None:
        return
    window = time if isinstance(time, slice) else time_slice(time)
    if window.start == pd.Timestamp.min and window.stop == pd.Timestamp.max:
        return  # open at both ends (--datetime /, ../..): it leaves nothing out
    scenes = dataset.index
    if box is not None:
        scenes = scenes.iloc[scenes.sindex.query(box, predicate="intersects")]
    mint, maxt = pd.Timestamp(dataset.mint), pd.Timestamp(dataset.maxt)
    undated = scenes[(scenes.index.left <= mint) & (scenes.index.right >= maxt)]
    if undated.empty:
        return
    files = [str(p) for p in undated["filepath"]]
    problem = undated_scenes_problem(files, asked or f"time={time!r}", option)
    raise UndatedScenesError(problem, files)


def _time_hint(day: str) -> str:
    """The data module's ``time=`` for the scenes of one day."""
    return f"time=('{day}', '{day} 23:59:59')"


def _lattice_corner(dataset: Sentinel2Base, left: float, top: float) -> tuple[float, float]:
    """The rasters' top-left corner ``(left, top)``, on the pixel grid of a mosaic's files.

    Moved out by less than a pixel onto the grid of the files read in their own CRS where a
    mosaic warps others (:meth:`~torchgeo_dofa.datasets.Sentinel2Base.native_lattice`).
    """
    lattice = dataset.native_lattice() if isinstance(dataset, Sentinel2Base) else None
    if lattice is None:
        return left, top
    xres, yres = (float(r) for r in dataset.res)
    x, y = lattice
    return (
        x + math.floor((left - x) / xres + 1e-6) * xres,
        y + math.ceil((top - y) / yres - 1e-6) * yres,
    )


class RegionSampler(GeoSampler):
    """One chip per region (PointBuffer, BBox or geometry), in the given order.

    See :func:`torchgeo_dofa.spatial.region_window` for the chip convention.
    """

    def __init__(
        self,
        dataset: Sentinel2Base,
        regions: Sequence[Region],
        *,
        region_crs: CRS | str | int = WGS84,
        time: TimeRange | None = None,
        check_footprint: bool = True,
        max_side: int | None = None,
    ) -> None:
        """Compute every chip now.

        Args:
            dataset: the dataset to sample (its CRS, resolution and grid origin are used).
            regions: the regions.
            region_crs: CRS of shapely geometries among ``regions``.
            time: optional ``(start, stop)`` or ``"A/B"`` of the scenes to read.
            check_footprint: raise for regions whose chip misses every raster.
            max_side: the largest chip side in pixels (a chip is read whole), or None.

        Raises:
            ValueError: naming every region whose chip misses all rasters; for a region
                whose chip is larger than ``max_side``.
        """
        if not regions:
            raise ValueError("no regions given")
        x, y, _ = dataset.bounds
        left, top = _lattice_corner(dataset, float(x.start), float(y.stop))
        scenes = _dated_scenes(dataset, time)
        footprint = scenes.geometry.union_all()
        self.time = _time_slice(time)
        everything = self.time or slice(scenes.index.left.min(), scenes.index.right.max())
        self.chips: list[tuple[slice, slice]] = []
        #: each chip's time: the span of the scenes it reads
        self.times: list[slice] = []
        outside: list[str] = []
        boxes = []
        for number, region in enumerate(regions):
            xs, ys = region_window(region, dataset.crs, dataset.res, (left, top), region_crs)
            side = max((xs.stop - xs.start) / dataset.res[0], (ys.stop - ys.start) / dataset.res[1])
            if max_side is not None and side > max_side:  # a 200 km buffer: 24 GiB
                pixels = f"{dataset.res[0]:g} x {dataset.res[1]:g}"
                raise ValueError(
                    f"region #{number} {region} is {side:.0f} px a side at the data's {pixels} "
                    f"pixels ({crs_label(dataset.crs)}), read as one chip: at most "
                    f"{max_side} px (a smaller buffer (buffer_m=) or box; a large area "
                    "is embedded as many chips, without points)"
                )
            box = shapely.box(xs.start, ys.start, xs.stop, ys.stop)
            if check_footprint and not footprint.intersects(box):
                outside.append(f"#{number} {region}")
            self.chips.append((xs, ys))
            boxes.append(box)
        self.times = chip_times(scenes, boxes, everything)
        if outside:
            raise ValueError(
                f"{len(outside)} region(s) fall outside every raster of the dataset "
                f"(CRS {crs_label(dataset.crs)}): {', '.join(outside)}"
            )
        self._length = len(self.chips)

    def __iter__(self) -> Iterator[GeoSlice]:
        """Yield the chips.

        Yields:
            ``(x, y, t)`` slices; ``t`` spans the scenes the chip reads.
        """
        for (xs, ys), ts in zip(self.chips, self.times, strict=True):
            yield xs, ys, ts


#: The most chips one region's grid may hold (a 10 m grid of 224-px chips that large spans
#: 224,000 km a side): beyond it a resolution or stride was surely given in the wrong units.
MAX_CHIPS = 100_000_000

#: Metres along a meridian per degree of latitude (WGS84 mean, 111.32 km), for a buffer
#: in metres around points read in a CRS of degrees.
DEGREE_M = 111_320.0

#: DOFA's patch side in pixels: a point chip narrower than one patch fills the model's whole
#: 224-px input with a few pixels (its embedding describes their values, not a place).
MIN_CHIP_PX = 16

#: The side of DOFA's input in pixels (a point chip of another size is resized or tiled to it).
MODEL_INPUT_PX = 224


class ChipGridSampler(GeoSampler):
    """Chips on one grid over the rasters, anchored at their lower-left pixel corner.

    Chips of ``size`` pixels are placed every ``stride`` pixels from the lower-left corner of
    the rasters' bounds (of the scenes within ``time``), on the dataset's pixel grid, so chips
    read whole pixels and never resample; the last row and column reach past the top/right
    edge where the sizes do not divide (those pixels are read as no data). Chips that do not
    touch the rasters' footprint are skipped. Unlike TorchGeo's
    :class:`~torchgeo.samplers.GriddedPatchSampler`, which centres its grid on the region, the
    grid is anchored at the corner, so the embedding map's left and bottom edges are the
    raster's and every chip falls on whole output cells whenever ``stride`` is a multiple of
    the output cell.

    A region of interest keeps the same lattice: its chips are those of the whole rasters'
    lattice that meet it, so a job over a box is a window of the job over the scene (the same
    chips, the same values, grid cells on the same lattice) and boxes side by side tile.

    Attributes:
        region_bounds: ``(xmin, ymin, xmax, ymax)`` of the region (the rasters' bounds, or
            the region of interest clipped to them), snapped outward to whole output cells
            of the lattice (``cell`` pixels), map units.
        chips: ``(x, y, t)`` slices, bottom row first, west to east.
    """

    def __init__(
        self,
        dataset: Sentinel2Base,
        size: int,
        stride: int | None = None,
        *,
        roi: BaseGeometry | None = None,
        time: TimeRange | None = None,
        cell: float = 1.0,
    ) -> None:
        """Compute every chip now.

        Args:
            dataset: the dataset to cut (its CRS, resolution, bounds and footprint are used).
            size: chip side in pixels.
            stride: distance between chips in pixels (default ``size``).
            roi: region of interest in the dataset's CRS (default: the whole dataset).
            time: optional ``(start, stop)`` or ``"A/B"`` of the scenes to read.
            cell: pixels per cell of the embedding map (``size / 14`` for resized chips, 16
                for tiles), to which :attr:`region_bounds` is snapped; 1 snaps to pixels.

        Raises:
            ValueError: if the region of interest does not overlap the rasters.
        """
        if size < 1 or (stride is not None and stride < 1):
            raise ValueError(f"chip size and stride must be >= 1 pixel, got {size}, {stride}")
        xres, yres = (float(r) for r in dataset.res)
        scenes = _dated_scenes(dataset, time)
        x0, y0, x1, y1 = (float(v) for v in scenes.total_bounds)
        x0, y1 = _lattice_corner(dataset, x0, y1)  # a mosaic: on its unwarped files' pixels
        footprint = scenes.geometry.union_all()
        region = footprint
        if roi is not None:
            if not roi.intersects(footprint):
                raise ValueError(
                    f"the region of interest {roi.bounds} does not overlap the rasters "
                    f"(CRS {crs_label(dataset.crs)}, bounds {(x0, y0, x1, y1)})"
                )
            region = footprint.intersection(roi)
        bx0, by0, bx1, by1 = (float(v) for v in region.bounds)
        pixels = f"a pixel size of {xres:g} x {yres:g} ({crs_label(dataset.crs)} units)"
        across = ((x1 - x0) / xres) * ((y1 - y0) / yres) / size**2  # chips, about
        if not math.isfinite(across) or across > MAX_CHIPS:  # a res= in the wrong units
            shown = f"{across:.3g}" if math.isfinite(across) else "countless"
            raise ValueError(
                f"the rasters at {pixels} make {shown} chips of {size} px, more than "
                f"{MAX_CHIPS:.0e}: check res= (in the CRS's units: metres for UTM) or cover less"
            )
        # the lattice's origin: the rasters' lower-left corner on the pixel grid whose origin
        # is their top-left corner (whole pixels: y0 may not be, for bounds of mixed files)
        oy = y1 - math.ceil((y1 - y0) / yres - 1e-6) * yres
        # the region, snapped outward to whole cells of the lattice: the map's extent
        cx_, cy_ = cell * xres, cell * yres
        xmin = x0 + math.floor((bx0 - x0) / cx_ + 1e-6) * cx_
        xmax = x0 + math.ceil((bx1 - x0) / cx_ - 1e-6) * cx_
        ymin = oy + math.floor((by0 - oy) / cy_ + 1e-6) * cy_
        ymax = oy + math.ceil((by1 - oy) / cy_ - 1e-6) * cy_
        self.region_bounds = (xmin, ymin, xmax, ymax)
        step = stride or size
        sx, sy = step * xres, step * yres
        # the whole rasters' lattice: columns 0 .. n_cols - 1 (the last reaches past x1) ...
        n_cols = max(1, math.ceil((x1 - x0 - size * xres) / sx - 1e-9) + 1)
        n_rows = max(1, math.ceil((y1 - oy - size * yres) / sy - 1e-9) + 1)
        if x1 - x0 < xres / 2 or y1 - y0 < yres / 2:  # a huge res=: no whole pixel, no chip
            raise ValueError(
                f"the rasters ({x1 - x0:.6g} x {y1 - y0:.6g} CRS units) are smaller than one "
                f"pixel at {pixels}: check res= (in the CRS's units: metres for UTM)"
            )
        # ... of which those meeting the map's extent: ending past xmin, starting before xmax
        col0 = min(n_cols - 1, max(0, math.floor((xmin - x0 - size * xres) / sx + 1e-9) + 1))
        row0 = min(n_rows - 1, max(0, math.floor((ymin - oy - size * yres) / sy + 1e-9) + 1))
        cols = max(1, min(n_cols - 1, math.ceil((xmax - x0) / sx - 1e-9) - 1) - col0 + 1)
        rows = max(1, min(n_rows - 1, math.ceil((ymax - oy) / sy - 1e-9) - 1) - row0 + 1)
        tslice = _time_slice(time) or slice(scenes.index.left.min(), scenes.index.right.max())
        shapely.prepare(region)
        self.chips: list[tuple[slice, slice, slice]] = []
        block = max(1, 100_000 // cols)  # rows of candidate boxes tested at once
        for first in range(0, rows, block):
            i, j = (
                a.ravel()
                for a in np.meshgrid(
                    np.arange(first, min(rows, first + block)), np.arange(cols), indexing="ij"
                )
            )
            cx, cy = x0 + (col0 + j) * sx, oy + (row0 + i) * sy
            boxes = shapely.box(cx, cy, cx + size * xres, cy + size * yres)
            keep = shapely.intersects(boxes, region) & ~shapely.touches(boxes, region)
            times = chip_times(scenes, list(boxes[keep]), tslice)
            self.chips += [
                (slice(x, x + size * xres), slice(y, y + size * yres), t)
                for x, y, t in zip(cx[keep].tolist(), cy[keep].tolist(), times, strict=True)
            ]

    def __iter__(self) -> Iterator[GeoSlice]:
        """Yield the chips.

        Yields:
            ``(x, y, t)`` slices.
        """
        yield from self.chips

    def __len__(self) -> int:
        """Number of chips."""
        return len(self.chips)


class _ChipList(GeoSampler):
    """A fixed list of chips (what is left of a sampler's chips on resume)."""

    def __init__(self, chips: Sequence[GeoSlice]) -> None:
        self.chips = list(chips)

    def __iter__(self) -> Iterator[GeoSlice]:
        yield from self.chips

    def __len__(self) -> int:
        return len(self.chips)


def _passthrough(batch: Sample) -> Sample:
    """Batch 'augmentation' that leaves the batch unchanged."""
    return batch


#: Dataset arguments recorded as given in :meth:`DOFAPredictDataModule.job_identity` even
#: when not given (their defaults then), as versions before ``reading_identity`` compared
#: them: parts of such a version are still compared on them.
_DATASET_SETTINGS = ("bands", "file_bands", "wavelengths", "nodata", "offset", "crs", "res")


def _check_whole(name: str, value: Any, minimum: int) -> None:
    """Refuse a count that is not a whole number of at least ``minimum`` (numpy ints taken).

    Raises:
        ValueError: naming the argument, the value and the bound.
    """
    try:
        whole = not isinstance(value, bool) and operator.index(value) >= minimum
    except TypeError:
        whole = False
    if not whole:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")


def _named_arguments(cls: Any) -> list[str] | None:
    """The keyword arguments ``cls(...)`` takes by name, or None where it takes any.

    A class whose ``__init__`` takes ``**kwargs`` passes them to its parent (TorchGeo's
    way, e.g. :class:`~torchgeo_dofa.datasets.EarthEngineS2`): the parents' named
    arguments are followed up the MRO, as jsonargparse does, until an ``__init__`` without
    ``**kwargs``. None where that chain never ends (a class or callable that takes any).
    """
    named: list[str] = []
    owners = [c for c in getattr(cls, "__mro__", ()) if "__init__" in vars(c)] or [cls]
    for owner in owners:
        try:
            parameters = inspect.signature(owner).parameters
        except (TypeError, ValueError):  # a builtin without a signature
            return None
        named += [
            n
            for n, p in parameters.items()
            if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
            and n not in named
        ]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return named
    return None


def _check_dataset_arguments(
    owner: type, dataset_class: Any, kwargs: dict[str, Any], own: Sequence[str]
) -> None:
    """Refuse keywords ``dataset_class`` does not take.

    Args:
        owner: the data module's class: keywords its TorchGeo base class takes (e.g.
            ``GeoDataModule``'s ``length``, which a LightningCLI config passes) pass too.
        dataset_class: the dataset class ``kwargs`` go to (its parents' arguments count
            where it passes ``**kwargs`` on: :func:`_named_arguments`; any keyword passes
            where it takes any).
        kwargs: the keywords the data module passes on.
        own: the dataset's arguments the data module sets itself (not offered).

    Raises:
        ValueError: naming each unknown keyword, the nearest one the class takes and the
            class's arguments.
    """
    named = _named_arguments(dataset_class)
    if named is None:
        return
    taken = [n for n in named if n not in own]
    base = next(c for c in owner.__mro__ if c.__module__.startswith("torchgeo."))
    unknown = sorted(set(kwargs) - set(taken) - set(_named_arguments(base) or ()))
    if unknown:  # the nearest among the data module's own arguments too (batchsize)
        known = [*taken, *(n for n in _named_arguments(owner) or () if n not in own)]
        near = {n: difflib.get_close_matches(n, known, n=1) for n in unknown}
        listed = ", ".join(
            f"{n!r}" + (f" (did you mean {m[0]!r}?)" if m else "") for n, m in near.items()
        )
        name = getattr(dataset_class, "__name__", None) or repr(dataset_class)
        raise ValueError(
            f"{owner.__name__} got {listed}: not an argument of {owner.__name__} nor of its "
            f"dataset class {name}, which takes {', '.join(taken)}"
        )


class DOFAPredictDataModule(GeoDataModule):
    """Prediction chips from Sentinel-2 rasters: grid, region of interest or points.

    The one prediction pipeline of this package: ``torchgeo-dofa embed``, a LightningCLI
    ``torchgeo-dofa predict --config`` run and the API's ``backend="local"`` all read their
    chips through it, so the same inputs and settings give the same chips, values and tags.

    Example:
        >>> dm = DOFAPredictDataModule(  # doctest: +SKIP
        ...     "scenes/",
        ...     file_bands=["B4", "B3", "B2", "B8", "B4_1", "B3_1", "B2_1", "B8_1"],
        ...     bands=["B4", "B3", "B2", "B8"],
        ... )
        >>> trainer = Trainer(callbacks=[GridWriter("out.tif")])  # doctest: +SKIP
        >>> trainer.predict(DOFAEmbedder(), datamodule=dm)  # doctest: +SKIP
    """

    def __init__(
        self,
        paths: Path | Iterable[Path],
        *,
        dataset_class: type[Sentinel2Base] = Sentinel2SR,
        points: Sequence[PointBuffer] | None = None,
        roi: BBox | BaseGeometry | None = None,
        roi_crs: CRS | str | int = "EPSG:4326",
        roi_sampling: Literal["grid", "whole"] = "grid",
        patch_size: int = 224,
        stride: int | None = None,
        time: TimeRange | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        transforms: Callable[[Sample], Sample] | None = None,
        preprocess: bool | None = None,
        input_prep: Literal["resize", "tile"] = "resize",
        check_scale: bool = True,
        bands: Sequence[str] | None = None,
        file_bands: Sequence[str] | None = None,
        wavelengths: Sequence[float] | None = None,
        nodata: float | None = None,
        crs: str | int | None = None,
        res: float | None = None,
        offset: float | str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Configure the data module (datasets are opened in :meth:`setup`).

        Args:
            paths: folders or files for the dataset.
            dataset_class: :class:`~torchgeo_dofa.datasets.Sentinel2SR` or
                :class:`~torchgeo_dofa.datasets.EarthEngineS2` (or a subclass).
            points: points with a buffer in metres (``points`` mode).
            roi: bounding box or geometry (``roi`` mode).
            roi_crs: CRS of a shapely ``roi`` (a BBox is always EPSG:4326).
            roi_sampling: ``"grid"`` (chips of ``patch_size`` over the ROI) or ``"whole"``
                (one chip: the ROI's bounding box).
            patch_size: chip side in pixels for grid sampling (224: one model input per
                chip; larger chips are resized or tiled to 224 by ``input_prep``).
            stride: distance between grid chips in pixels (default ``patch_size``); with
                ``preprocess``, a multiple of the output cell (:attr:`cell_px`) so chips land
                on whole cells of the embedding map.
            time: optional ``(start, stop)`` or ``"A/B"`` limiting the scenes read (a
                scene without a date, which no range can select, is refused at setup).
            batch_size: chips per batch.
            num_workers: DataLoader workers.
            transforms: per-sample transforms given to the dataset (e.g. ``DOFAPreprocess``).
            preprocess: when ``transforms`` is None, give the dataset DOFA's standard
                :class:`~torchgeo_dofa.transforms.DOFAPreprocess` for its own bands and
                wavelengths (so a YAML config need not repeat the band list): the chips are
                ready for :class:`~torchgeo_dofa.embedder.DOFAEmbedder`. False serves raw
                reflectance (for ``DOFAEmbedder.preprocess`` on the device, or your own
                model). None (the default) is True, and the errors of that stack (a stride
                off the output cells, bands without DOFA statistics) then name
                ``preprocess=False`` as a way out (earlier versions defaulted to False).
            input_prep: ``"resize"`` or ``"tile"``, for that automatic stack.
            check_scale: reject rasters whose values all lie in [0, 2] (already scaled to
                reflectance) at setup, before any chip is computed.
            bands: bands to read, in order (default: DOFA's nine Sentinel-2 bands B4, B3,
                B2, B5, B6, B7, B8, B11, B12 where the files hold them, else every band of
                the files, as the dataset class reads them); as ``--bands``.
            file_bands: names of the bands of files without band descriptions, in file
                order; as ``--file-bands``.
            wavelengths: centre wavelength (um) of each band, for bands that are not
                Sentinel-2's; as ``--wavelengths``.
            nodata: no-data value of the inputs (default: the files'); as ``--nodata``.
            crs: CRS to read the inputs in (e.g. ``"EPSG:32633"``; default: theirs).
            res: resolution in CRS units (default: the finest of the selected bands).
            offset: radiometric offset added to the digital numbers (``0``, ``-1000``), or
                ``"auto"`` / None for the dataset's rule; as ``--offset``.
            mean: with ``preprocess``, one normalisation mean per band on DOFA's 0..255 scale,
                for bands without DOFA statistics (another sensor's); as ``--mean``.
            std: with ``preprocess``, one standard deviation per band on that scale; as
                ``--std``.
            **kwargs: further dataset arguments (e.g. ``resampling``). The dataset arguments
                above are named parameters so that a LightningCLI config (jsonargparse) accepts
                them.

        Raises:
            ValueError: if both ``points`` and ``roi`` are given, sizes are invalid
                (``batch_size``, ``patch_size`` or ``stride`` below 1, ``num_workers`` below
                0, or any of them not a whole number),
                ``mean`` / ``std`` are given without ``bands``, ``time_series=True`` (one
                acquisition per chip: embed each date as its own job with ``time``), or a
                keyword in ``kwargs`` is not an argument of ``dataset_class`` (named, with
                the nearest argument it takes), so a misspelt setting fails here, not at
                :meth:`setup`.
        """
        if points is not None and roi is not None:
            raise ValueError("give either points= or roi=, not both")
        _check_whole("batch_size", batch_size, 1)
        _check_whole("num_workers", num_workers, 0)
        if type(self).setup is DOFAPredictDataModule.setup:  # a subclass's setup may take its own
            _check_dataset_arguments(type(self), dataset_class, kwargs, own=("paths", "transforms"))
        _check_whole("patch_size", patch_size, 1)
        if stride is not None:
            _check_whole("stride", stride, 1)
        if roi_sampling not in ("grid", "whole"):
            raise ValueError(f"roi_sampling must be 'grid' or 'whole', got {roi_sampling!r}")
        if stride is not None and stride > patch_size and points is None and roi_sampling == "grid":
            # helper-136: the predict configs' stride 224 under patch_size 64 read 11% of a map
            _warnings.warn(
                f"the stride of {stride} px is larger than the chip size of {patch_size} px: "
                f"{1 - (patch_size / stride) ** 2:.0%} of the raster, between the chips, is "
                "never read (a map keeps no-data there, a table has no rows for it); give a "
                f"stride of at most {patch_size} px (by default it is the chip size: chips "
                "edge to edge)",
                UserWarning,
            )
        if input_prep not in INPUT_PREPS:
            raise ValueError(f"input_prep must be one of {list(INPUT_PREPS)}, got {input_prep!r}")
        if kwargs.get("time_series"):
            raise ValueError(
                "time_series=True stacks every date of a chip into one (T, C, H, W) sample, "
                "but DOFA embeds one acquisition per chip: embed each date as its own job, "
                "with time=(start, stop) or time='A/B' (CLI: --datetime A/B) and its own "
                "output path"
            )
        named = {
            "bands": bands,
            "file_bands": file_bands,
            "wavelengths": wavelengths,
            "nodata": nodata,
            "crs": crs,
            "res": res,
            "offset": offset,
        }
        kwargs |= {k: v for k, v in named.items() if v is not None}
        super().__init__(
            dataset_class,
            batch_size=batch_size,
            patch_size=patch_size,
            num_workers=num_workers,
            paths=paths,
            transforms=transforms,
            **kwargs,
        )
        self.points = list(points) if points is not None else None
        self.roi = roi
        self.roi_crs = roi_crs
        self.roi_sampling = roi_sampling
        self.stride = stride
        self.time = time
        self.collate_fn = stack_dofa_samples
        self.aug = _passthrough
        #: ``preprocess`` left to its default: the stack's errors offer preprocess=False
        self._default_preprocess = preprocess is None and transforms is None
        self.preprocess = (preprocess is None or preprocess) and transforms is None
        self.input_prep = input_prep
        self.check_scale = check_scale
        # (not ``self.mean`` / ``self.std``: TorchGeo's data modules use those for their own
        # batch normalisation, which this module's ``aug`` skips)
        self.band_mean = None if mean is None else [float(v) for v in mean]
        self.band_std = None if std is None else [float(v) for v in std]
        if (mean is not None or std is not None) and bands is None:
            raise ValueError(
                "mean= and std= follow the order of bands=: give bands=[...] too (the "
                "default bands' order is not the files' order)"
            )
        self.chip_size = patch_size
        #: chips left out of the last loader because the trainer's writers had them.
        self.skipped = 0
        self._regions: list[RasterInput] | None = None

    @property
    def mode(self) -> Literal["grid", "roi", "points"]:
        """Which chips are served.

        Returns:
            ``"points"``, ``"roi"`` or ``"grid"``.
        """
        if self.points is not None:
            return "points"
        if self.roi is not None:
            return "roi"
        return "grid"

    @property
    def region_name(self) -> str:
        """Name of the region read, as the embed job names its outputs.

        Returns:
            The file stem, folder name or Earth Engine export prefix of ``paths``
            (several regions joined by ``+``).
        """
        return "+".join(r.name for r in self._raster_inputs())

    def _raster_inputs(self) -> list[RasterInput]:
        """``paths`` grouped into regions (:func:`find_raster_inputs`, which checks them).

        Found once (each file's header is read): setup and :attr:`region_name` share it.
        """
        if self._regions is None:
            paths = self.kwargs["paths"]
            items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
            self._regions = find_raster_inputs(items, self.kwargs.get("crs"))
        return self._regions

    @property
    def cell_px(self) -> float:
        """Input pixels per side of one grid-output cell.

        16 with ``input_prep="tile"`` (tiles keep the pixels) and for 224-px chips;
        ``patch_size / 14`` with ``"resize"`` (a chip becomes 14 x 14 cells).

        Returns:
            The cell side in input pixels.
        """
        if self.input_prep == "tile":
            return 16.0
        return float(self.chip_size) / 224 * 16

    def setup(self, stage: str) -> None:
        """Open the dataset, check its scale and build the prediction sampler.

        Args:
            stage: must be ``"predict"``.

        Raises:
            MisconfigurationException: for any other stage.
            InputError: for a missing input, an input without raster, a file that cannot be
                read, a region mixing CRSs (as ``torchgeo-dofa embed`` says it), scenes
                of different dates that overlap (:func:`refuse_mixed_acquisitions`), or
                ``time`` given for scenes without a date (:func:`refuse_undated_scenes`).
            ValueError: if the ROI or points miss the rasters.
            BandError: for a band set holding two dates of one band, or, with
                ``preprocess``, bands without DOFA normalisation statistics and no
                ``mean`` / ``std``.
            ReflectanceError: if the rasters look already scaled to [0, 1].
        """
        if stage != "predict":
            raise MisconfigurationException(
                f"{self.__class__.__name__} only serves prediction (stage 'predict'), "
                f"got stage {stage!r}"
            )
        if self.predict_dataset is not None and self.predict_sampler is not None:
            return
        regions = self._raster_inputs()  # every input exists, holds rasters, in one CRS
        # the scenes outside the dates are left out of the index: they decide nothing (the
        # default resolution, CRS and bands, the outputs' sources)
        timed: dict[str, Any] = {} if self.time is None else {"time": self.time}
        if self.kwargs.get("crs") is None and len(regions) == 1 and regions[0].crs:
            # files differing only by a vertical datum are read in the region's horizontal
            # CRS whichever file comes first (TorchGeo takes the first file's)
            with rasterio.open(regions[0].paths[0]) as first:
                own = first.crs
            if own is not None and not same_crs(own.to_wkt(), regions[0].crs):
                timed["crs"] = regions[0].crs
        dataset = self.dataset_class(**self.kwargs, **timed)
        assert isinstance(dataset, Sentinel2Base)
        refuse_repeated_bands(dataset.bands)
        refuse_undated_scenes(dataset, self.time)
        refuse_mixed_acquisitions(dataset, self.time)
        if self.preprocess:
            from torchgeo_dofa.transforms import DOFAPreprocess

            try:
                dataset.transforms = DOFAPreprocess(
                    dataset.bands,
                    dataset.wavelengths,
                    input_prep=self.input_prep,
                    nodata=self.kwargs.get("nodata"),
                    mean=self.band_mean,
                    std=self.band_std,
                )
            except BandError as err:
                if not self._default_preprocess:
                    raise
                raise BandError(f"{err}; or give preprocess=False for raw chips") from err
        self.predict_sampler = self._make_sampler(dataset)
        if self.check_scale:
            files: set[str] | None = None  # every file
            if self.roi is not None or self.points is not None:  # not a far one none reads
                chips: list[Any] = list(self.predict_sampler)
                read = scenes_read(dataset, chips)["sources"]
                files = {path for sources in read for path, _ in sources}
            check_raw_reflectance(dataset, paths=files)
        self.predict_dataset = dataset

    def _make_sampler(self, dataset: Sentinel2Base) -> GeoSampler:
        if self.points is not None:
            points = RegionSampler(dataset, self.points, time=self.time, max_side=MAX_CHIP_PX)
            self._warn_small_point_chips(dataset, points)
            return points
        if self.roi is not None and self.roi_sampling == "whole":
            return RegionSampler(
                dataset, [self.roi], region_crs=self.roi_crs, time=self.time, max_side=MAX_CHIP_PX
            )
        roi = None
        if self.roi is not None:
            roi = region_to_crs(self.roi, dataset.crs, self.roi_crs)
            if isinstance(self.roi, BBox):  # a box is a rectangle in the rasters' CRS too
                # (its lon/lat outline is turned there: cells in the corners of its map were
                # left out, NaN, or averaged from fewer chips than the scene's map)
                roi = shapely.box(*roi.bounds)
        try:
            sampler = ChipGridSampler(
                dataset,
                self.chip_size,
                self.stride or self.chip_size,
                roi=roi,
                time=self.time,
                cell=self.cell_px,
            )
        except ValueError as err:
            if roi is None or "does not overlap" not in str(err):
                raise
            x0, y0, x1, y1 = (float(v) for v in dataset.index.total_bounds)
            lon0, lat0, lon1, lat1 = lonlat_bounds((x0, y0, x1, y1), dataset.crs)
            raise ValueError(
                f"the region of interest {self.roi} does not overlap the rasters, which cover "
                f"lon {lon0:.5f}..{lon1:.5f}, lat {lat0:.5f}..{lat1:.5f} (EPSG:4326; "
                f"{crs_label(dataset.crs)} bounds {[round(v, 1) for v in (x0, y0, x1, y1)]})"
            ) from err
        if roi is None:  # after the sampler's own refusals (a res in the wrong units)
            self._warn_small_region(dataset)
        return sampler

    def _warn_small_region(self, dataset: Sentinel2Base) -> None:
        """Warn where the whole region fills less than half of one chip.

        Its one chip is then mostly fill (the pooled vector averages every patch), as
        :func:`torchgeo_dofa.api.get_embedding` warns below ``LOW_VALID_FRACTION`` (50 %).
        """
        x0, y0, x1, y1 = (float(v) for v in dataset.index.total_bounds)
        width, height = ((x1 - x0) / dataset.res[0], (y1 - y0) / dataset.res[1])
        share = min(width, self.chip_size) * min(height, self.chip_size) / self.chip_size**2
        if share < 0.5:
            _warnings.warn(
                f"the region {self.region_name} is {width:.0f} x {height:.0f} px, "
                f"{share:.1%} of one {self.chip_size}-px chip: the rest of its chip is fill, "
                "so the model's output for it (an embedding, a segmentation) comes mostly from "
                "fill (the pooled table's valid_fraction gives the share); a smaller chip size "
                "(a multiple of 16) or a larger region fits it better"
            )

    def _warn_small_point_chips(self, dataset: Sentinel2Base, sampler: RegionSampler) -> None:
        """Warn, once for all the points, of point chips narrower than one DOFA patch.

        Such a chip (a ``buffer_m`` of about a pixel: 1 x 1 px at 10 m for 5 m) is not fill,
        as a region smaller than half a chip is (:meth:`_warn_small_region`), but a few pixels
        stretched over the model's whole 224-px input (repeated with ``input_prep="tile"``):
        its embedding describes those pixels' values, not the place around the point. One
        warning counts them and gives their sizes, however many points there are.
        """
        xres, yres = (float(v) for v in dataset.res)
        sizes = [
            (round((xs.stop - xs.start) / xres), round((ys.stop - ys.start) / yres))
            for xs, ys in sampler.chips
        ]
        small = [size for size in sizes if min(size) < MIN_CHIP_PX]
        if not small:
            return
        low, high = min(small, key=lambda s: s[0] * s[1]), max(small, key=lambda s: s[0] * s[1])
        share = high[0] * high[1] / MODEL_INPUT_PX**2
        if low == high:
            what = f"{low[0]} x {low[1]} px ({100 * share:.2g}% of"
        else:
            what = f"{low[0]} x {low[1]} to {high[0]} x {high[1]} px (at most {100 * share:.2g}% of"
        crs = CRS.from_user_input(dataset.crs.to_wkt())
        metres = _metres_per_unit(crs)
        half = MIN_CHIP_PX // 2  # pixels of buffer on each side of the point
        about = ""
        if metres is not None:
            pixel = max(xres, yres) * metres
        elif crs.is_geographic:  # pixels in degrees: their size in metres at the points
            lat = math.radians(sum(ys.start + ys.stop for _, ys in sampler.chips) / 2 / len(sizes))
            pixel = max(xres * math.cos(lat), yres) * DEGREE_M
            about = "about "
        if metres is None and not crs.is_geographic:  # no buffer in metres to name
            larger = f"a buffer_m= of {half} pixels or more"
        else:
            pixel = float(f"{pixel:.2g}")  # a round figure: 10 m, not 9.87 m
            each = f" of {about}{pixel:g} m" if about else ""
            larger = (
                f"buffer_m={half * pixel:g} or more ({half} pixels{each} a side of the point; "
                f"{MODEL_INPUT_PX // 2 * pixel:g} gives a {MODEL_INPUT_PX}-px chip)"
            )
        _warnings.warn(
            f"the region {self.region_name}: {len(small)} of {len(sizes)} point chips are "
            f"{what} one {MODEL_INPUT_PX}-px chip, narrower than one {MIN_CHIP_PX}-px DOFA "
            "patch): each fills the model's input with those few pixels (stretched, or "
            "repeated when tiled), so its embedding describes their values, not the place "
            f"around the point; a larger buffer, {larger}, fits it better"
        )

    def grid_geometry(self) -> GridGeometry:
        """The embedding map's grid: the sampled region at :attr:`cell_px` pixels a cell.

        Returns:
            The geometry (CRS, lower-left corner, cell size, width and height in cells).

        Raises:
            RuntimeError: before :meth:`setup`, or for points (no map, one row per point).
            ValueError: for resized chips whose ``patch_size`` is not a multiple of 16,
                DOFA's patch, as ``embed``'s ``--chip-size``, or a ``stride`` that is not a
                multiple of :attr:`cell_px` (pooled outputs take any of either).
        """
        dataset, sampler = self._dataset(), self.predict_sampler
        if sampler is None:
            raise RuntimeError("call setup('predict') before grid_geometry()")
        size = self.chip_size
        if self.input_prep == "resize" and size % 16:
            lower, upper = max(16, size // 16 * 16), -(-size // 16) * 16
            raise ValueError(
                f"patch_size {size} px is not a multiple of 16, DOFA's patch: the embedding "
                f"map's cells would be {size / 14:.4g} px, not whole patches; use {lower} or "
                f"{upper} for a map (a pooled table or class table takes any patch_size)"
            )
        cell, step = self.cell_px, self.stride or size
        gridded = self.mode == "grid" or self.roi_sampling == "grid"
        if gridded and abs(step / cell - round(step / cell)) > 1e-6:
            # whole-pixel strides of whole cells near the one given (a cell may be fractional)
            near = [
                k * cell
                for k in (math.floor(step / cell), math.ceil(step / cell))
                if k >= 1 and abs(k * cell - round(k * cell)) < 1e-6
            ]
            fits = " or ".join(f"{round(v)}" for v in dict.fromkeys(near)) or f"{size}"
            raise ValueError(
                f"stride {step} px is not a multiple of the output cell ({cell:g} px for "
                f"{size}-px chips with input_prep={self.input_prep!r}): chips would not land "
                "on whole cells of the map (an embedding grid, or a task's class map): give a "
                f"stride of whole cells, e.g. {fits} (a pooled table or class table takes any "
                "stride)"
            )
        crs = RioCRS.from_user_input(dataset.crs.to_wkt())
        res = (float(dataset.res[0]), float(dataset.res[1]))  # (x, y): pixels may be oblong
        if isinstance(sampler, ChipGridSampler):
            return GridGeometry.for_region(crs, sampler.region_bounds, res, self.cell_px)
        if self.mode == "points":
            raise ValueError(
                "points give one pooled row per point, not a map: write them with "
                "PooledWriter (or a task's ClassificationWriter), or give a region (roi= or "
                "the whole rasters) for GridWriter / SegmentationWriter"
            )
        chips: list[Any] = list(sampler)
        return GridGeometry.for_chips(crs, chips, res, self.cell_px)

    def output_tags(self) -> dict[str, str]:
        """What every output records about its inputs: bands, wavelengths, source files, dates.

        Returns:
            JSON-encoded ``bands``, ``wavelengths`` (um), ``sources`` (absolute paths) and
            ``source_bands`` (one list per source, in the order of ``sources``: the file's
            band, counted from 1, read for each of ``bands``; 0 where that file does not give
            it: what ``torchgeo-dofa preview`` draws from), ``source_offsets`` (per source,
            in that order, the offset added to each of ``bands`` as read: -1000 for a
            Level-2A product of processing baseline 04.00 or later, 0 where not read),
            ``chip_size`` and ``stride`` (px), ``input_nodata`` (the values read as no
            data in the inputs besides NaN and values at or below -1000),
            ``source_stats`` (per source, in
            that order, ``[size in bytes, modification time in ns]`` as the job read it, the
            embed manifest's identity of a file; null for a path that is no local file:
            ``preview`` warns of a source rewritten since), the ``stac_*`` provenance tags
            of STAC composites among the sources, and ``acquisition_start`` /
            ``acquisition_end`` (ISO 8601 UTC: :func:`acquisition_span` of the scenes the
            predict sampler's chips read, :func:`scenes_read`) where every one of them is
            dated (none otherwise).

        Raises:
            RuntimeError: before :meth:`setup`.
        """
        dataset = self._dataset()
        reads: dict[str, list[int]] = {}
        offsets: dict[str, list[float]] = {}
        for scene, added in zip(dataset.index["sources"], dataset.index["offset"], strict=True):
            for i, (path, band) in enumerate(scene):  # (path, file band) per dataset band
                source = os.path.abspath(path)
                reads.setdefault(source, [0] * len(dataset.bands))[i] = int(band)
                offsets.setdefault(source, [0.0] * len(dataset.bands))[i] = float(added[i])
        sources = sorted(reads)
        tags = {
            "bands": json.dumps(list(dataset.bands)),
            "wavelengths": json.dumps([round(float(w), 4) for w in dataset.wavelengths]),
            "sources": json.dumps(sources),
            "source_bands": json.dumps([reads[p] for p in sources]),
            "source_offsets": json.dumps([offsets[p] for p in sources]),
            "source_stats": json.dumps([_file_stats(p) for p in sources]),
            "chip_size": str(self.chip_size),
            "stride": str(self.stride or self.chip_size),
            "input_nodata": json.dumps(dataset.nodata_values()),
        }
        for path in sources:  # a STAC composite's provenance (items, dates, rule) travels on
            with rasterio.open(path) as src:
                tags |= {k.lower(): v for k, v in src.tags().items() if k.startswith("STAC_")}
        chips: list[Any] = list(self.predict_sampler or [])
        span = acquisition_span(dataset, scenes_read(dataset, chips))
        if span is not None:
            tags["acquisition_start"], tags["acquisition_end"] = span
        return tags

    def job_identity(self) -> dict[str, str]:
        """What the chips' values depend on besides the model, for resuming only the same job.

        The prediction writers record it beside their parts and refuse a rerun that differs
        (:meth:`torchgeo_dofa.writers.GridWriter.check_parts_identity`); loader settings
        (``batch_size``, ``num_workers``) are left out, they do not change a chip.

        Returns:
            Text values: each source file as its resolved path, size and modification time
            (a file rewritten in place is another input); the dataset class; how the
            pixels are read, as read rather than as spelled
            (:meth:`~torchgeo_dofa.datasets.Sentinel2Base.reading_identity`: CRS,
            resolution, resampling, no-data masking, the file band read for each band, the
            reflectance offsets applied), then every dataset argument as given (``data.nodata``,
            ``data.time_series`` ...: see :func:`~torchgeo_dofa.writers.identity_differences`
            for which are compared); the preprocessing
            (``preprocess``, ``input_prep``, ``mean``, ``std``, the type of given
            ``transforms``); and the
            sampling (``chip_size``, ``stride``, ``roi``, ``points``, ``time``).

        Raises:
            RuntimeError: before :meth:`setup`.
        """
        dataset = self._dataset()
        sources = sorted({p for s in dataset.index["sources"] for p, _ in s})
        from torchgeo_dofa.jobs import InputFile  # the embed manifest's identity of a file

        files: list[tuple[str, int | None, int | None]] = []
        for path in sources:
            if pathlib.Path(path).exists():
                files.append(dataclasses.astuple(InputFile.of(path)))
            else:  # e.g. a GDAL virtual path
                files.append((str(path), None, None))
        cls = type(dataset)
        identity = {
            "sources": json.dumps(sorted(files)),
            "dataset_class": f"{cls.__module__}.{cls.__qualname__}",
        }
        # how the pixels are read, as read (not as spelled: nodata=0 for files declaring 0 is
        # the same job), then every dataset argument as given: those whose effect the
        # reading identity records are compared only with an identity that lacks it (an
        # older version's: see PartsIdentity rules in check_parts_identity)
        identity |= dataset.reading_identity()
        names = {*self.kwargs, *_DATASET_SETTINGS} - {"paths", "transforms"}
        identity |= {f"data.{k}": repr(self.kwargs.get(k)) for k in sorted(names)}
        given = self.kwargs.get("transforms")
        identity |= {
            "preprocess": repr(self.preprocess),
            "input_prep": self.input_prep,
            "mean": repr(self.band_mean),
            "std": repr(self.band_std),
            "transforms": type(given).__name__ if given is not None else "None",
            "chip_size": repr(self.chip_size),
            "stride": repr(self.stride or self.chip_size),
            "roi": repr(self.roi),
            "points": repr(self.points),
            "time": repr(self.time),
        }
        return identity

    def _dataset(self) -> Sentinel2Base:
        dataset = self.predict_dataset
        if not isinstance(dataset, Sentinel2Base):
            raise RuntimeError(f"call {type(self).__name__}.setup('predict') first")
        return dataset

    def predict_dataloader(self) -> DataLoader[Sample]:
        """The prediction loader, without the chips the trainer's writers already hold.

        Writers (callbacks with an ``is_done(chip)`` method, e.g.
        :class:`~torchgeo_dofa.writers.GridWriter`) report the chips an earlier run wrote;
        a chip is left out when every writer has it, so a rerun resumes. The count left
        out is :attr:`skipped`. With fewer chips than processes (DDP), chips are repeated
        so that every process gets one.

        Returns:
            The DataLoader.
        """
        sampler = self.predict_sampler
        trainer = getattr(self, "trainer", None)
        writers = [c for c in getattr(trainer, "callbacks", []) if hasattr(c, "is_done")]
        if writers and sampler is not None:
            chips = list(sampler)
            todo = [c for c in chips if not all(w.is_done(c) for w in writers)]
            self.skipped = len(chips) - len(todo)
            sampler = _ChipList(todo)
        world = int(getattr(trainer, "world_size", 1) or 1)
        if sampler is not None and 0 < len(sampler) < world:
            # Lightning's distributed predict sampler needs a chip for every process: repeat
            # chips (a repeated chip is written to the same part, once in the outputs)
            chips = list(sampler)
            sampler = _ChipList([chips[i % len(chips)] for i in range(world)])
        accelerator = getattr(trainer, "accelerator", None)
        workers = int(self.num_workers)
        problem = workers_open_file_problem(workers)
        if problem is not None:
            _warnings.warn(problem)
        if sampler is not None:
            workers = loader_workers(workers, len(sampler), int(self.batch_size))
        elif problem is not None:
            workers = 0
        dataset = self._dataset()
        # workers set the sized cache once, at start (worker_init_fn); reading in the main
        # process (0 workers), every read sets it (a per-chip env is not needed in workers)
        dataset.gdal_cache_bytes = None if workers else self.gdal_cache
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=self.collate_fn,
            persistent_workers=False,
            pin_memory=type(accelerator).__name__ == "CUDAAccelerator",
            worker_init_fn=gdal_worker_init(self.gdal_cache) if workers else None,
            # a batch a worker cannot send raises instead of hanging the job
            multiprocessing_context=loader_context() if workers else None,
        )

    @functools.cached_property
    def gdal_cache(self) -> int:
        """GDAL block cache for reading this data module's rasters, in bytes per process.

        Sized once (after :meth:`setup`; it opens every file) by
        :func:`torchgeo_dofa.runtime.gdal_cache_bytes` so one chip row of decoded
        blocks of every file stays cached (compressed formats are not decoded again for each
        chip) while memory stays bounded; set in each DataLoader worker, or, with no
        workers, through the dataset's ``gdal_cache_bytes`` around every chip read in the
        main process.

        Returns:
            Bytes.
        """
        sources = sorted({p for s in self._dataset().index["sources"] for p, _ in s})
        return gdal_cache_bytes(
            sources, chip_px=self.chip_size, processes=int(self.num_workers) + 1
        )


def _file_stats(path: str) -> list[int] | None:
    """``[size, mtime_ns]`` of a local file (the embed manifest's identity), else None."""
    try:
        stat = os.stat(path)
    except OSError:  # a GDAL virtual path (/vsicurl/...), or a file gone since
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _cache_key(value: float | None) -> float | None:
    """``value`` as a cache key: ``float``, one NaN object for every NaN (NaN != NaN)."""
    if value is None:
        return None
    return math.nan if math.isnan(float(value)) else float(value)


def _on_grid(mask: npt.NDArray[np.bool_], grid: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """``mask`` (rows, cols) taken nearest at ``grid`` (rows, cols), no larger than it."""
    rows = np.arange(grid[0]) * mask.shape[0] // grid[0]
    cols = np.arange(grid[1]) * mask.shape[1] // grid[1]
    return mask[np.ix_(rows, cols)]


@dataclass(frozen=True)
class _FileVerdict:
    """What :func:`check_raw_reflectance` found in one file's decimated read."""

    scale_error: str | None  # stored values all in [0, 2] / all above 20000
    negative_error: str | None  # offset added, every valid value negative (enough pixels)
    valid: npt.NDArray[np.bool_]  # (rows, cols) valid pixels of the read
    negative: npt.NDArray[np.bool_]  # (rows, cols) of them negative in every band read
    high: tuple[str, ...]  # "B08 33080": bands whose median exceeds 10000
    low: tuple[str, ...]  # "B04 75": every band's maximum, where none exceeds LOW_MAX
    count: int  # the file's bands
    offset_added: bool
    size: int  # width x height of the file, pixels (each sample of the read stands for a share)
    #: bands read that hold no valid value where the others hold some: every pixel no data
    dead: tuple[str, ...] = ()


#: What a band without a valid value does to a file (a pixel is no data where any band is).
_NO_PIXEL_LEFT = (
    "a pixel is no data where any band is, so the file's pixels are no data wherever the "
    "band has none (chips of this file alone embed as NaN); choose bands without it, or "
    "repair or remove the file"
)


@functools.lru_cache(maxsize=256)
def _file_verdict(
    path: str,
    identity: tuple[int, ...] | None,
    read: tuple[int, ...],
    shifts: tuple[float, ...],
    nodata: float | None,
    declared: float | None,
    zero_is_nodata: bool,
    max_side: int,
) -> _FileVerdict:
    """Read and judge one file (cached: a file read again, unchanged, is not read again).

    ``identity`` (device, inode, size, modification and change times; ``path`` is the real
    path) is part of the key, so a file rewritten or replaced since is read anew;
    ``nodata`` is the value the file's pixels are masked by, ``declared`` the one the
    dataset was given (as a chip's :class:`~torchgeo_dofa.transforms.CheckReflectance`).
    """
    from torchgeo_dofa.transforms import (
        NARROW_DTYPES,
        NODATA_FLOOR,
        OFFSET_QUESTION,
        REFLECTANCE_MAX,
        WHOLE_INPUT_MIN_PIXELS,
        CheckReflectance,
        ReflectanceError,
        check_reflectance_range,
    )

    try:
        pixels = decimated_read(path, max_side)
    except rasterio.errors.RasterioError as err:
        raise unreadable_input(path, err) from err
    raw = torch.from_numpy(pixels[[b - 1 for b in read]].astype(np.float32))
    with rasterio.open(path) as src:
        names = [src.descriptions[b - 1] or f"band {b}" for b in read]
        count, size = src.count, src.width * src.height
    area = size / (raw.shape[-2] * raw.shape[-1])  # the file's pixels per sample read
    # per band, as the dataset masks the file's pixels (a pixel is valid where all bands are)
    held = ~_band_nodata(raw, nodata)
    if zero_is_nodata:
        held &= raw != 0
    try:  # the stored values, as the rules of scale were written for
        valid = CheckReflectance(nodata=nodata)({"image": raw, "valid": held.all(dim=0)})["valid"]
    except ReflectanceError as err:
        empty = np.zeros(tuple(raw.shape[1:]), dtype=bool)
        return _FileVerdict(str(err), None, empty, empty, (), (), count, False, size)
    shift = torch.tensor(shifts, dtype=torch.float32)
    values = raw + shift[:, None, None]
    held &= values > NODATA_FLOOR  # a 0 with -1000 added: no data
    if declared is not None:
        held &= ~_band_nodata(values, declared)
    valid &= held.all(dim=0)
    negative = (values < 0).all(dim=0) & valid
    offset_added = bool(shift.any())
    dead = _dead_bands(held, names)
    told: str | None = None
    if bool(valid.any()) and bool(negative[valid].all()):
        try:  # its error, worded for a whole input (refused with enough pixels only)
            check_reflectance_range(
                values, valid, ~valid.any(), 0.0, whole_input=True, pixel_area=area
            )
        except ReflectanceError as err:
            told = str(err)
            if not offset_added:  # no offset added: the question is of dB values
                told = told.replace(OFFSET_QUESTION, "Are these dB / log values?")
    kept = values[:, valid]  # (bands, valid pixels of the read)
    medians = kept.median(dim=1).values.tolist() if kept.shape[1] else []
    high = tuple(
        f"{n} {m:.0f}" for n, m in zip(names, medians, strict=False) if m > REFLECTANCE_MAX
    )
    low: tuple[str, ...] = ()
    judged = kept.shape[1] * area >= WHOLE_INPUT_MIN_PIXELS
    if judged and str(pixels.dtype) not in NARROW_DTYPES:  # 8-bit: its dtype's own warning
        maxima = kept.amax(dim=1).tolist()
        # not negative values: dB values, or an offset added twice, have their own rules
        if max(maxima) <= LOW_MAX and float(kept.amin()) >= 0:
            low = tuple(f"{n} {m:.4g}" for n, m in zip(names, maxima, strict=True))
    return _FileVerdict(
        None, told, valid.numpy(), negative.numpy(), high, low, count, offset_added, size, dead
    )


def _band_nodata(image: torch.Tensor, nodata: float | None) -> torch.Tensor:
    """(C, H, W): :func:`~torchgeo_dofa.transforms.nodata_mask`'s rule per band, not per pixel."""
    from torchgeo_dofa.transforms import nodata_mask

    return torch.stack([nodata_mask(image[b : b + 1], nodata) for b in range(image.shape[0])])


def _dead_bands(held: torch.Tensor, names: Sequence[str]) -> tuple[str, ...]:
    """The bands of a read that hold no valid value while the other bands hold some.

    A pixel is no data where any band is, so one such band (a band exported empty, all 0;
    a band of another product's nodata) leaves the whole file without a valid pixel.

    Args:
        held: (C, H, W) where each band holds a valid value, by the dataset's rules.
        names: the bands' names.
    """
    if held.shape[0] < 2:
        return ()
    some = held.any(dim=(1, 2))
    if bool(some.all()) or not bool(some.any()):
        return ()
    return tuple(n for n, h in zip(names, some.tolist(), strict=True) if not h)


def _warn_of_files(
    found: list[tuple[str, _FileVerdict]],
    one: Callable[[str, _FileVerdict], str],
    many: Callable[[int, str], str],
    items: Callable[[_FileVerdict], tuple[str, ...]],
) -> None:
    """One :class:`~torchgeo_dofa.transforms.ReflectanceWarning` for all the files of a kind.

    Args:
        found: (file name, verdict) of each file of the kind.
        one: the message for a single file.
        many: the message for ``count`` files, given the first few listed
            (``name: items; ...``, :func:`~torchgeo_dofa.datasets._first_few`).
        items: what a verdict lists for its file (each band's median or maximum).
    """
    from torchgeo_dofa.transforms import ReflectanceWarning

    if len(found) == 1:
        _warnings.warn(one(*found[0]), ReflectanceWarning)
    elif found:
        each = [f"{name}: {', '.join(items(verdict))}" for name, verdict in found]
        _warnings.warn(many(len(found), _first_few(each, separator="; ")), ReflectanceWarning)


def check_raw_reflectance(
    dataset: Sentinel2Base, max_side: int = 256, paths: Iterable[str] | None = None
) -> None:
    """Reject rasters that are not raw surface reflectance, before any chip is computed.

    Each file is read decimated (about ``max_side`` pixels a side), the bands the dataset
    reads of it, and checked with :class:`~torchgeo_dofa.transforms.CheckReflectance`: its
    stored values all in [0, 2] (already scaled) or all above
    :data:`~torchgeo_dofa.transforms.SATURATED_MIN` are refused. Then, with the offset the
    dataset adds, a scene is refused where every valid value of each of its files is
    negative in every band (dB values, an offset applied twice) over at least
    :data:`~torchgeo_dofa.transforms.WHOLE_INPUT_MIN_PIXELS` valid pixels of the read: a
    patch of cloud shadow or dark water can be, a whole scene is not, and a file of one band
    among a scene's (ESA's layout) is judged with the scene's other files. The read
    (:func:`~torchgeo_dofa.runtime.decimated_read`) goes one row of the file's blocks at a
    time under a cache of that row, so the check's memory does not grow with the file; a
    file's verdict is kept in the process and read again only once the file changes (its
    real path, device, inode, size, modification or change time).

    Chips are not judged for negative values (see
    :class:`~torchgeo_dofa.transforms.CheckReflectance`): a loader of your own over a
    :class:`~torchgeo_dofa.datasets.Sentinel2Base` dataset calls this first, as
    :class:`DOFAPredictDataModule` and ``get_embedding``'s ``local`` backend do.

    Args:
        dataset: the dataset whose files to check.
        max_side: side of the decimated read, pixels.
        paths: only these of the dataset's files (a region's); None: every file.

    Warns (:class:`~torchgeo_dofa.transforms.ReflectanceWarning`) where more than half of
    the valid values of any band of a file the dataset reads
    exceed :data:`~torchgeo_dofa.transforms.REFLECTANCE_MAX` (they embed as saturated); where
    every valid value of every band of a file (at least
    :data:`~torchgeo_dofa.transforms.WHOLE_INPUT_MIN_PIXELS` of them), offset added, lies in
    [0, :data:`LOW_MAX`] (8-bit or percent values in a wider type; an 8-bit file has its
    dtype's own warning); and
    where more than half of the valid pixels of a scene (of at least
    :data:`~torchgeo_dofa.transforms.WHOLE_INPUT_MIN_PIXELS`) are negative in every band
    read, offset added (an offset applied twice over a dark scene, dB values beside some
    positive ones; over vegetation with a near-infrared band an offset applied twice leaves
    that band positive, and no warning comes).

    Raises:
        ReflectanceError: naming the file (or a scene's files) whose valid values all lie in
            [0, 2], all exceed :data:`~torchgeo_dofa.transforms.SATURATED_MIN`, or, offset
            added, are all negative in every band.
        InputError: naming a file whose pixels cannot be read (a damaged block).
    """
    from torchgeo_dofa.transforms import (
        REFLECTANCE_MAX,
        WHOLE_INPUT_MIN_PIXELS,
        ReflectanceError,
        ReflectanceWarning,
    )

    # the bands the dataset reads of each file (not an elevation or QA band beside them),
    # with the offset it adds to each (-1000 for processing baseline 04.00 on)
    offsets: dict[str, dict[int, float]] = {}
    scenes: set[tuple[str, ...]] = set()
    for sources, item_offsets in zip(
        dataset.index["sources"], dataset.index["offset"], strict=True
    ):
        for (p, b), offset in zip(sources, item_offsets, strict=True):
            offsets.setdefault(p, {})[b] = float(offset)
        scenes.add(tuple(dict.fromkeys(p for p, _ in sources)))
    wanted = set(offsets) if paths is None else set(offsets) & {str(p) for p in paths}
    verdicts: dict[str, _FileVerdict] = {}
    for path in sorted(wanted):
        read = tuple(sorted(offsets[path]))
        # the file's own nodata, as the dataset indexed it (not an open per file per call)
        nodata = dataset.nodata if dataset.nodata is not None else dataset._infos[path].nodata
        try:
            identity: tuple[int, ...] | None = file_signature(path)
        except OSError:  # a GDAL virtual path (/vsicurl/...)
            identity = None
        verdict = _file_verdict(
            os.path.realpath(path) if identity is not None else path,
            identity,
            read,
            tuple(offsets[path][b] for b in read),
            _cache_key(nodata),
            _cache_key(dataset.nodata),
            dataset.zero_is_nodata,
            max_side,
        )
        if verdict.scale_error is not None:
            raise ReflectanceError(f"{os.path.basename(path)}: {verdict.scale_error}")
        verdicts[path] = verdict
    # one warning for all the files of a kind (a folder of 200 files scaled alike: one line)
    clips = f"DOFA clips reflectance at {REFLECTANCE_MAX:.0f}, so those pixels embed as saturated."
    _warn_of_files(
        [(os.path.basename(p), v) for p, v in verdicts.items() if v.high],
        lambda name, verdict: (
            f"{name}: more than half of the valid values of {len(verdict.high)} of its "
            f"{verdict.count} bands exceed {REFLECTANCE_MAX:.0f} (medians: "
            f"{', '.join(verdict.high)}; read decimated): {clips} Is the file scaled (x 10, "
            "or x 10000 twice) or radiance? (A scene of bright cloud or snow can do this.)"
        ),
        lambda count, listed: (
            f"{count} files: more than half of the valid values of a band exceed "
            f"{REFLECTANCE_MAX:.0f} in each (medians: {listed}; read "
            f"decimated): {clips} Are the files scaled (x 10, or x 10000 twice) or "
            "radiance? (Scenes of bright cloud or snow can do this.)"
        ),
        lambda verdict: verdict.high,
    )
    _warn_of_files(
        [(os.path.basename(p), v) for p, v in verdicts.items() if v.low],
        lambda name, verdict: (
            f"{name}: the valid values of every band stay at or below {LOW_MAX:.0f} (maxima: "
            f"{', '.join(verdict.low)}; read decimated): {LOW_VALUES_ADVICE} (A scene of dark "
            "water alone can do this.)"
        ),
        lambda count, listed: (
            f"{count} files: the valid values of every band of each stay at or below "
            f"{LOW_MAX:.0f} (maxima: {listed}; read decimated): {LOW_VALUES_ADVICE} (Scenes "
            "of dark water alone can do this.)"
        ),
        lambda verdict: verdict.low,
    )
    _warn_of_files(
        [(os.path.basename(p), v) for p, v in verdicts.items() if v.dead],
        lambda name, verdict: (
            f"{name}: band(s) {', '.join(verdict.dead)} hold no valid value (each is no data "
            "everywhere: 0, the nodata value, NaN or at or below -1000; read decimated) where "
            f"the file's other bands hold data: {_NO_PIXEL_LEFT}"
        ),
        lambda count, listed: (
            f"{count} files: a band of each holds no valid value where the file's other "
            f"bands hold data ({listed}; read decimated): {_NO_PIXEL_LEFT}"
        ),
        lambda verdict: verdict.dead,
    )
    # a scene stored one file per band (ESA's layout): a band file of no valid value
    blank = [
        os.path.basename(p)
        for scene in sorted(scenes)
        if len(scene) > 1 and any(verdicts[p].valid.any() for p in scene if p in verdicts)
        for p in scene
        if p in verdicts and not verdicts[p].valid.any()
    ]
    if blank:
        _warnings.warn(
            f"{_first_few(blank)}: no valid value (each is no data everywhere: 0, the nodata "
            "value, NaN or at or below -1000; read decimated) where the other band files of "
            f"its scene hold data: {_NO_PIXEL_LEFT}",
            ReflectanceWarning,
        )
    dark: dict[bool, list[tuple[str, float]]] = {}  # scenes mostly negative, by offset added
    for scene in sorted(scenes):
        files = [verdicts[p] for p in scene if p in verdicts]
        label = ", ".join(os.path.basename(p) for p in scene if p in verdicts)
        if files and all(v.negative_error is not None for v in files):
            raise ReflectanceError(f"{label}: {files[0].negative_error}")
        if not files:
            continue
        # band files of one scene at other resolutions (ESA's 10, 20, 60 m) read at other
        # sizes: each mask taken at the smallest read's grid (they cover the same extent)
        grid = (min(v.valid.shape[0] for v in files), min(v.valid.shape[1] for v in files))
        valid = np.logical_and.reduce([_on_grid(v.valid, grid) for v in files])
        negative = np.logical_and.reduce([_on_grid(v.negative, grid) for v in files]) & valid
        judged = int(valid.sum())
        share = int(negative.sum()) / judged if judged else 0.0
        finest = max(v.size for v in files)  # counted in the finest file's pixels
        if judged * finest / (grid[0] * grid[1]) >= WHOLE_INPUT_MIN_PIXELS and share > 0.5:
            dark.setdefault(any(v.offset_added for v in files), []).append((label, share))
    for offset_added, told in sorted(dark.items()):
        question = (
            "Was the -1000 offset of processing baseline 04.00 added to data already "
            "corrected (offset=0)?"
            if offset_added
            else "Are these dB / log values, or is a fill value undeclared (nodata=<value>)?"
        )
        how = f"({'offset added; ' if offset_added else ''}read decimated)"
        if len(told) == 1:
            label, share = told[0]
            said = f"{label}: {share:.0%} of the valid pixels are negative in every band read {how}"
        else:
            each = [f"{label}: {share:.0%}" for label, share in told]
            said = (
                f"{len(told)} scenes: most of the valid pixels of each are negative in every "
                f"band read ({_first_few(each, separator='; ')}; {how[1:-1]})"
            )
        _warnings.warn(
            f"{said}, more than patches of cloud shadow or dark water make (DOFA clips them "
            f"to reflectance 0). {question}",
            ReflectanceWarning,
        )


@dataclass(frozen=True)
class RoiArray:
    """One region read as raw reflectance.

    Attributes:
        image: (C, H, W) float32 reflectance x 10000 (offset removed), 0 where invalid.
        valid: (H, W) bool, True where every band holds a measurement.
        transform: affine transform of the pixel grid.
        crs: CRS of the grid.
        bands: band names in channel order.
        wavelengths: (C,) float32 centre wavelengths in micrometres.
    """

    image: npt.NDArray[np.float32]
    valid: npt.NDArray[np.bool_]
    transform: Affine
    crs: CRS
    bands: tuple[str, ...]
    wavelengths: npt.NDArray[np.float32]


def read_roi(
    source: Sentinel2Base | Path | Iterable[Path],
    roi: Region,
    *,
    roi_crs: CRS | str | int = WGS84,
    time: TimeRange | None = None,
    dataset_class: type[Sentinel2Base] = Sentinel2SR,
    **kwargs: Any,
) -> RoiArray:
    """Read one region as a raw (C, H, W) array with its affine transform.

    The chip follows :func:`torchgeo_dofa.spatial.region_window`: a PointBuffer gives a square
    of ``round(2 * buffer_m / res)`` pixels centred on the point, a BBox or geometry the
    grid-aligned box covering it. The dataset's ``transforms`` are not applied.

    Args:
        source: an open dataset, or paths to open with ``dataset_class(paths, **kwargs)``.
        roi: PointBuffer, BBox (EPSG:4326) or shapely geometry.
        roi_crs: CRS of a shapely geometry.
        time: optional ``(start, stop)`` or ``"A/B"`` limiting the scenes read.
        dataset_class: dataset class used when ``source`` is paths.
        **kwargs: dataset arguments used when ``source`` is paths.

    Returns:
        The :class:`RoiArray`.

    Raises:
        ValueError: if the region misses every raster.
    """
    if isinstance(source, Sentinel2Base):
        dataset = source
    else:
        dataset = dataset_class(source, **kwargs)
    sampler = RegionSampler(dataset, [roi], region_crs=roi_crs, time=time)
    index = next(iter(sampler))
    sample = dataset.read_chip(index)
    values = sample["transform"].tolist()
    return RoiArray(
        image=sample["image"].numpy(),
        valid=sample["valid"].numpy(),
        transform=Affine(*values[:6]),
        crs=dataset.crs,
        bands=tuple(dataset.bands),
        wavelengths=sample["wavelengths"].numpy(),
    )


#: EuroSAT's bands that have DOFA normalisation statistics, in TorchGeo's spelling and DOFA's
#: 9-band order (B4, B3, B2, B5, B6, B7, B8, B11, B12: the statistics of
#: :data:`~torchgeo_dofa.bands.SENTINEL2_BANDS`, from DOFA's pre-training data). EuroSAT's
#: other four, B01, B09, B10 and B8A, have none.
EUROSAT_DOFA_BANDS: tuple[str, ...] = (
    "B04",
    "B03",
    "B02",
    "B05",
    "B06",
    "B07",
    "B08",
    "B11",
    "B12",
)


class DOFAEuroSATDataModule(NonGeoDataModule):
    """TorchGeo's EuroSAT data module with DOFA's preprocessing in place of its normalisation.

    TorchGeo's :class:`~torchgeo.datamodules.EuroSATDataModule` normalises every batch with
    EuroSAT's own per-band mean and standard deviation of the raw values (its ``aug``), where
    DOFA's pretrained encoder was trained on reflectance / 10000 x 255 normalised with DOFA's
    statistics: both give values of about +-3, so nothing downstream can tell them apart, and
    a linear probe on TorchGeo's module learns from inputs the encoder never saw. Here ``aug``
    (every split's) is :class:`~torchgeo_dofa.transforms.DOFAPreprocess` for the bands read:
    each batch, on its device after the transfer, is checked as raw reflectance (x 10000;
    EuroSAT holds Sentinel-2 Level-1C top-of-atmosphere reflectance x 10000), normalised with
    DOFA's statistics, resized from EuroSAT's 64 x 64 pixels to ``size`` x ``size``
    (bilinear, as DOFA's reference pipeline) and given DOFA's keys.

    Batches: ``image`` (B, C, size, size) float32, ``label`` (B,) int64 class index (EuroSAT's
    10 classes), ``wavelengths`` (B, C) um, ``valid`` (B, size, size) bool, ``empty`` (B,)
    and ``valid_fraction`` (B,): train :class:`~torchgeo_dofa.tasks.DOFAClassificationTask`
    with ``num_classes=10``; it reads the batch's wavelengths. The dataset is downloaded
    with ``download=True`` (TorchGeo's download, from Hugging Face; EuroSAT100,
    :class:`DOFAEuroSAT100DataModule`, is 100 of its images, for a first try).

    Attributes:
        eurosat_class: TorchGeo's dataset class read (class-level).
        bands: the bands read, in channel order (TorchGeo's spelling).
    """

    eurosat_class: ClassVar[type[EuroSAT]] = EuroSAT

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        bands: Sequence[str] = EUROSAT_DOFA_BANDS,
        size: int = 224,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Set the data module up; every configuration error is raised here.

        Args:
            batch_size: chips per batch.
            num_workers: DataLoader worker processes.
            bands: EuroSAT bands to read, in channel order (``B04`` or ``B4``: read as
                TorchGeo spells them); by default the nine with DOFA statistics,
                :data:`EUROSAT_DOFA_BANDS`.
            size: the side the chips are resized to (224: DOFA's input; another size needs
                the task's ``interpolate_pos_embed=True``).
            mean: per-band means on DOFA's 0..255 scale (reflectance x 255), for bands
                without DOFA statistics (B01, B09, B10, B8A): one per band of ``bands``, as
                :class:`~torchgeo_dofa.transforms.NormalizeReflectance` takes them.
            std: per-band standard deviations on the same scale, with ``mean``.
            **kwargs: passed to the dataset class: ``root``, ``download``, ``checksum``.

        Raises:
            BandError: for bands given as one string or none, a band EuroSAT does not have
                (naming its bands), a band without DOFA statistics when ``mean`` / ``std``
                are not given, or given statistics that do not fit (see
                :func:`~torchgeo_dofa.bands.norm_stats`).
            ValueError: for ``split`` or ``transforms`` among ``kwargs`` (the data module
                sets each split's dataset, and its ``aug`` preprocesses), another keyword
                the dataset class does not take (named, with the nearest it takes), or
                ``batch_size`` below 1 / ``num_workers`` below 0.
        """
        refuse_one_string(bands)
        for key in ("split", "transforms"):
            if key in kwargs:
                raise ValueError(
                    f"{key}= is the data module's own ({type(self).__name__} makes each "
                    "split's dataset, and preprocesses its batches in aug): leave it out"
                )
        _check_whole("batch_size", batch_size, 1)
        _check_whole("num_workers", num_workers, 0)
        if type(self).setup is DOFAEuroSATDataModule.setup:  # a subclass's may take its own
            _check_dataset_arguments(
                type(self), self.eurosat_class, kwargs, own=("split", "bands", "transforms")
            )
        spelt = {canonical_band(b): b for b in EuroSAT.all_band_names}  # B4 or B04: B04
        given = tuple(str(b) for b in bands)
        bands = tuple(spelt.get(canonical_band(b), b) for b in given)
        unknown = [b for b in given if canonical_band(b) not in spelt]
        if unknown or not bands:
            has = f"no band(s) {unknown}" if unknown else "no bands given (bands=[])"
            raise BandError(
                f"{self.eurosat_class.__name__} has {has}: choose among "
                f"{list(EuroSAT.all_band_names)}; DOFA's statistics cover "
                f"{list(EUROSAT_DOFA_BANDS)}"
            )
        preprocess = DOFAPreprocess(list(bands), size=size, mean=mean, std=std)
        super().__init__(self.eurosat_class, batch_size, num_workers, bands=bands, **kwargs)
        self.bands = bands
        self.aug = preprocess

    def prepare_data(self) -> None:
        """Download the dataset where ``download=True`` (TorchGeo's ``prepare_data``).

        Raises:
            DatasetDownloadError: where the download fails, in one line: the network's
                failure naming the dataset, its folder, the address and the fixes, or the
                folder's (read-only, full, a file in the way) naming the OS's reason.
        """
        with _download_errors(self.eurosat_class, self.kwargs):
            super().prepare_data()

    def setup(self, stage: str) -> None:
        """Make the datasets of ``stage`` (TorchGeo's ``setup``).

        It downloads them too where ``download=True`` and :meth:`prepare_data` has not run
        (from Python).

        Args:
            stage: ``fit``, ``validate``, ``test`` or ``predict``.

        Raises:
            DatasetDownloadError: as :meth:`prepare_data`.
        """
        with _download_errors(self.eurosat_class, self.kwargs):
            super().setup(stage)


class DatasetDownloadError(InputError):
    """A TorchGeo dataset's download failed: the network, or the folder it goes to.

    One line naming the dataset, its folder and the cause: for the network, the address it
    is fetched from and the fixes; for the folder (read-only, full, a file in the way), the
    OS's reason (the command line: exit status 2).
    """


#: The network's failures of a TorchGeo download (urllib's, HTTPError among them; connection,
#: time-out, name resolution, HTTP): :func:`_download_errors` names the address for them.
_NETWORK_ERRORS = (
    urllib.error.URLError,
    ConnectionError,
    TimeoutError,
    socket.gaierror,
    http.client.HTTPException,
)


@contextlib.contextmanager
def _download_errors(dataset_class: type, kwargs: dict[str, Any]) -> Iterator[None]:
    """Turn a failed TorchGeo download into :class:`DatasetDownloadError`.

    TorchGeo's ``download_url`` (torchvision's, urllib) fails offline with a traceback ending
    in ``URLError: <urlopen error [Errno -2] Name or service not known>``, having made the
    dataset's folder: the folders it made and left empty are removed
    (:func:`~torchgeo_dofa.writers.folders_removed_if_left_empty`). The network's failures
    (:data:`_NETWORK_ERRORS`) name the address and the fixes; a root that cannot be written
    (read-only, full, a file in the way) names the OS's reason.
    """
    root = pathlib.Path(kwargs.get("root", "data"))
    with folders_removed_if_left_empty(root):
        try:
            yield
        except (OSError, http.client.HTTPException) as err:
            if not kwargs.get("download", False):
                raise
            name = dataset_class.__name__
            if isinstance(err, _NETWORK_ERRORS):
                url = getattr(dataset_class, "url", "its address")
                raise DatasetDownloadError(
                    f"could not download {name} into {root} ({type(err).__name__}: "
                    f"{' '.join(str(err).split())}): TorchGeo fetches it from {url}; run "
                    f"where that address is reachable, or put the dataset's files in {root} "
                    "yourself and set download: false"
                ) from None
            # the folder's: read-only, full, a file in the way
            code: int | None = getattr(err, "errno", None)
            cause = os.strerror(code) if code else type(err).__name__
            where = f": {err.filename}" if getattr(err, "filename", None) else ""
            raise DatasetDownloadError(
                f"could not download {name} into {root} ({cause}{where}): give root a "
                "folder that can be written, with space for the dataset"
            ) from None


class DOFAEuroSAT100DataModule(DOFAEuroSATDataModule):
    """:class:`DOFAEuroSATDataModule` over EuroSAT100, 100 images to try a set-up on.

    10 images a class (6 train, 2 val, 2 test): "not for benchmarking" (TorchGeo).
    """

    eurosat_class: ClassVar[type[EuroSAT]] = EuroSAT100


class DOFAEuroSATSpatialDataModule(DOFAEuroSATDataModule):
    """:class:`DOFAEuroSATDataModule` over EuroSATSpatial, EuroSAT split by longitude.

    TorchGeo's ``EuroSATSpatial``: spatially disjoint train / val / test splits (60 / 20 / 20 %).
    """

    eurosat_class: ClassVar[type[EuroSAT]] = EuroSATSpatial


class DOFAChipFolderDataModule(NonGeoDataModule):
    """Labelled chips of a :class:`~torchgeo_dofa.datasets.ChipFolder` for classification.

    ``root/<class>/<chip>.tif``, one folder per class, split at random (seeded) into
    training, validation and test chips: the data module of ``fit --config`` for a
    :class:`~torchgeo_dofa.tasks.DOFAClassificationTask` on your own labelled chips
    (``finetune_chips.yaml``). The chips are checked and DOFA-normalised by the dataset
    (``DOFAPreprocess(bands)``); the batches are left as they are (TorchGeo's default
    ``aug`` divides them by 255). TorchGeo drops a last partial training batch (``head_norm``
    needs two chips a batch).

    Attributes:
        bands: the chips' bands (canonical spelling), which a task without ``bands`` reads.
        classes: the class names, in the order of the labels (set at setup).
    """

    def __init__(
        self,
        root: str,
        bands: Sequence[str],
        wavelengths: Sequence[float] | None = None,
        nodata: float | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        val_split: float = 0.2,
        test_split: float = 0.0,
        seed: int = 0,
        batch_size: int = 16,
        num_workers: int = 0,
    ) -> None:
        """Record the settings (the chips are read at setup).

        Args:
            root: the folder holding one subfolder of chips per class.
            bands: the chips' bands in channel order.
            wavelengths: one per band (um), for bands without a known wavelength.
            nodata: a value marking missing pixels in chips that declare none.
            mean: per-band means (DOFA's 0..255 scale) for bands without DOFA statistics.
            std: per-band standard deviations on the same scale.
            val_split: the fraction of chips held out for validation (0 for none).
            test_split: the fraction held out for testing (0 for none).
            seed: the seed of the random split (the same split on every run).
            batch_size: chips a batch.
            num_workers: DataLoader worker processes.

        Raises:
            ValueError: for fractions outside [0, 1) or leaving no training chip, or a
                ``batch_size`` / ``num_workers`` that is not a whole number (>= 1 / >= 0).
        """
        refuse_one_string(bands)
        _check_whole("batch_size", batch_size, 1)
        _check_whole("num_workers", num_workers, 0)
        for name, value in (("val_split", val_split), ("test_split", test_split)):
            if not (isinstance(value, int | float) and 0 <= value < 1):
                raise ValueError(f"{name} must be a fraction from 0 to below 1, got {value!r}")
        if val_split + test_split >= 1:
            raise ValueError(
                f"val_split {val_split} and test_split {test_split} leave no training chip: "
                "their sum must be below 1"
            )
        super().__init__(
            ChipFolder,
            batch_size,
            num_workers,
            root=root,
            bands=list(bands),
            wavelengths=wavelengths,
            nodata=nodata,
            mean=mean,
            std=std,
        )
        self.bands = [canonical_band(b) for b in bands]
        self.classes: list[str] = []
        self.splits = (1 - val_split - test_split, val_split, test_split)
        self.seed = seed
        self.aug = _passthrough  # the dataset's DOFAPreprocess has normalised the chips
        self.collate_fn = stack_dofa_samples

    def setup(self, stage: str) -> None:
        """Read the chips' folder and split it (the same split for every stage).

        The split is the same for the same chips, fractions and seed: another ``val_split``
        or ``test_split`` draws other chips (a test set may then hold chips a checkpoint was
        trained on).

        Raises:
            BandError: for chips whose bands do not fit ``bands`` (see
                :class:`~torchgeo_dofa.datasets.ChipFolder`).
            InputError: for a chip that cannot be opened.
            NoRasterFoundError: for a root without class folders or chips.
            ValueError: for a task (the trainer's module) whose ``num_classes`` is not the
                number of class folders (``task: multiclass``), or fractions that leave no
                training chip.
        """
        dataset = ChipFolder(**self.kwargs)
        self.classes = list(dataset.classes)
        self._check_the_tasks_classes()
        n = len(dataset)
        held = [round(n * f) for f in self.splits[1:]]  # counts: torch warns of empty fractions
        if n - sum(held) < 1:
            raise ValueError(
                f"val_split {self.splits[1]} and test_split {self.splits[2]} of the {n} chips "
                f"of {self.kwargs['root']} leave no training chip: lower them"
            )
        generator = torch.Generator().manual_seed(self.seed)
        train, val, test = torch.utils.data.random_split(dataset, [n - sum(held), *held], generator)
        self.train_dataset = train
        self.val_dataset = val if len(val) else None
        self.test_dataset = test if len(test) else None

    def _check_the_tasks_classes(self) -> None:
        """Refuse a multiclass task whose class count is not the number of class folders.

        Fewer classes than folders failed at the first batch holding a label beyond them
        (maybe late in an epoch); more trained a head for classes no chip has.
        """
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        hparams = getattr(module, "hparams", {})
        classes = hparams.get("num_classes") if hasattr(hparams, "get") else None
        if classes is None or hparams.get("task", "multiclass") != "multiclass":
            return
        if int(classes) != len(self.classes):
            raise ValueError(
                f"the task has num_classes={classes}, but {self.kwargs['root']} holds "
                f"{len(self.classes)} class folders ({_first_few(self.classes, 5)}): set "
                f"num_classes={len(self.classes)} (--model.init_args.num_classes "
                f"{len(self.classes)})"
            )

    def val_dataloader(self) -> Any:
        """The validation chips' loader; none in ``fit`` with ``val_split: 0``.

        Raises:
            ValueError: for ``validate`` with ``val_split: 0`` (no validation chip).
        """
        if self.val_dataset is None:
            return self._no_chips("validate", "val_split")
        return super().val_dataloader()

    def test_dataloader(self) -> Any:
        """The test chips' loader.

        Raises:
            ValueError: with ``test_split: 0`` (no test chip).
        """
        if self.test_dataset is None:
            return self._no_chips("test", "test_split")
        return super().test_dataloader()

    def _no_chips(self, command: str, fraction: str) -> list[Any]:
        """No loader where ``fit`` asks (it trains without), an error where ``command`` does."""
        from lightning.pytorch.trainer.states import TrainerFn

        trainer = getattr(self, "trainer", None)
        if getattr(getattr(trainer, "state", None), "fn", None) == TrainerFn.FITTING:
            return []
        raise ValueError(
            f"{type(self).__name__} holds no chips to {command}: {fraction} is 0; a fit "
            f"with {fraction} set (e.g. 0.2) holds them out: {command} its checkpoint with "
            "the same fractions and seed (other fractions draw other chips)"
        )
