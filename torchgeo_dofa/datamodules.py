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

:func:`read_roi` reads one region as a raw (C, H, W) reflectance array with its affine
transform, CRS, band names, wavelengths and validity mask (the local backend of an
rs-embed-style ``get_embedding``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
import shapely
from pyproj import CRS
from rasterio.transform import Affine
from shapely.geometry.base import BaseGeometry
from torchgeo.datamodules import GeoDataModule
from torchgeo.datamodules.utils import MisconfigurationException
from torchgeo.datasets.utils import GeoSlice, Path, Sample
from torchgeo.samplers import GeoSampler, GriddedPatchSampler

from torchgeo_dofa.datasets import Sentinel2Base, Sentinel2SR, stack_dofa_samples
from torchgeo_dofa.spatial import WGS84, BBox, PointBuffer, Region, region_to_crs, region_window

__all__ = [
    "DOFAPredictDataModule",
    "RegionSampler",
    "RoiArray",
    "read_roi",
]

TimeRange = tuple[datetime | str, datetime | str]


def _time_slice(time: TimeRange | None) -> slice | None:
    if time is None:
        return None
    start, stop = (pd.Timestamp(t) for t in time)
    if stop < start:
        raise ValueError(f"time range ends before it starts: {time}")
    return slice(start, stop)


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
    ) -> None:
        """Compute every chip now.

        Args:
            dataset: the dataset to sample (its CRS, resolution and grid origin are used).
            regions: the regions.
            region_crs: CRS of shapely geometries among ``regions``.
            time: optional ``(start, stop)`` of the scenes to read.

        Raises:
            ValueError: naming every region whose chip misses all rasters.
        """
        if not regions:
            raise ValueError("no regions given")
        x, y, _ = dataset.bounds
        footprint = dataset.index.geometry.union_all()
        self.time = _time_slice(time)
        self.chips: list[tuple[slice, slice]] = []
        outside: list[str] = []
        for number, region in enumerate(regions):
            xs, ys = region_window(
                region, dataset.crs, dataset.res, (float(x.start), float(y.stop)), region_crs
            )
            if not footprint.intersects(shapely.box(xs.start, ys.start, xs.stop, ys.stop)):
                outside.append(f"#{number} {region}")
            self.chips.append((xs, ys))
        if outside:
            raise ValueError(
                f"{len(outside)} region(s) fall outside every raster of the dataset "
                f"(CRS {dataset.crs.to_string()}): {', '.join(outside)}"
            )
        self._length = len(self.chips)

    def __iter__(self) -> Iterator[GeoSlice]:
        """Yield the chips.

        Yields:
            ``(x, y)`` or ``(x, y, t)`` slices.
        """
        for xs, ys in self.chips:
            yield (xs, ys) if self.time is None else (xs, ys, self.time)


class _TimedSampler(GeoSampler):
    """Adds a time slice to the spatial slices of another sampler."""

    def __init__(self, sampler: GeoSampler, time: slice) -> None:
        self.sampler = sampler
        self.time = time

    def __iter__(self) -> Iterator[GeoSlice]:
        for index in self.sampler:
            assert isinstance(index, tuple)
            spatial: tuple[slice, ...] = index
            yield spatial[0], spatial[1], self.time

    def __len__(self) -> int:
        return len(self.sampler)


def _passthrough(batch: Sample) -> Sample:
    """Batch 'augmentation' that leaves the batch unchanged."""
    return batch


class DOFAPredictDataModule(GeoDataModule):
    """Prediction chips from Sentinel-2 rasters: grid, region of interest or points.

    Example:
        >>> dm = DOFAPredictDataModule(  # doctest: +SKIP
        ...     "scenes/",
        ...     points=[PointBuffer(4.35, 50.85, 1120)],
        ...     transforms=DOFAPreprocess(bands=...),
        ... )
        >>> trainer.predict(model, datamodule=dm)  # doctest: +SKIP
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
        preprocess: bool = False,
        input_prep: Literal["resize", "tile"] = "resize",
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
            patch_size: chip size in pixels for grid sampling.
            stride: distance between grid chips in pixels (default ``patch_size``).
            time: optional ``(start, stop)`` limiting the scenes read.
            batch_size: chips per batch.
            num_workers: DataLoader workers.
            transforms: per-sample transforms given to the dataset (e.g. ``DOFAPreprocess``).
            preprocess: when ``transforms`` is None, give the dataset DOFA's standard
                :class:`~torchgeo_dofa.transforms.DOFAPreprocess` for its own bands and
                wavelengths (so a YAML config need not repeat the band list).
            input_prep: ``"resize"`` or ``"tile"``, for that automatic stack.
            **kwargs: further dataset arguments (``bands``, ``wavelengths``, ``offset``,
                ``nodata``, ``crs``, ``res``...).

        Raises:
            ValueError: if both ``points`` and ``roi`` are given, or sizes are invalid.
        """
        if points is not None and roi is not None:
            raise ValueError("give either points= or roi=, not both")
        if patch_size < 1 or (stride is not None and stride < 1):
            raise ValueError(f"patch_size and stride must be >= 1, got {patch_size}, {stride}")
        if roi_sampling not in ("grid", "whole"):
            raise ValueError(f"roi_sampling must be 'grid' or 'whole', got {roi_sampling!r}")
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
        self.preprocess = preprocess and transforms is None
        self.input_prep = input_prep

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

    def setup(self, stage: str) -> None:
        """Open the dataset and build the prediction sampler.

        Args:
            stage: must be ``"predict"``.

        Raises:
            MisconfigurationException: for any other stage.
            ValueError: if the ROI or points miss the rasters.
        """
        if stage != "predict":
            raise MisconfigurationException(
                f"{self.__class__.__name__} only serves prediction (stage 'predict'), "
                f"got stage {stage!r}"
            )
        if self.predict_dataset is not None and self.predict_sampler is not None:
            return
        dataset = self.dataset_class(**self.kwargs)
        assert isinstance(dataset, Sentinel2Base)
        if self.preprocess:
            from torchgeo_dofa.transforms import DOFAPreprocess

            dataset.transforms = DOFAPreprocess(
                dataset.bands, dataset.wavelengths, input_prep=self.input_prep
            )
        self.predict_dataset = dataset
        self.predict_sampler = self._make_sampler(dataset)

    def _make_sampler(self, dataset: Sentinel2Base) -> GeoSampler:
        if self.points is not None:
            return RegionSampler(dataset, self.points, time=self.time)
        if self.roi is not None and self.roi_sampling == "whole":
            return RegionSampler(dataset, [self.roi], region_crs=self.roi_crs, time=self.time)
        roi = None
        if self.roi is not None:
            roi = region_to_crs(self.roi, dataset.crs, self.roi_crs)
            if not roi.intersects(dataset.index.geometry.union_all()):
                raise ValueError(
                    f"the region of interest {self.roi} does not overlap the rasters "
                    f"(CRS {dataset.crs.to_string()}, bounds {dataset.index.total_bounds})"
                )
        sampler: GeoSampler = GriddedPatchSampler(
            dataset, size=self.patch_size, stride=self.stride or self.patch_size, roi=roi
        )
        time = _time_slice(self.time)
        return sampler if time is None else _TimedSampler(sampler, time)


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
        time: optional ``(start, stop)`` limiting the scenes read.
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
