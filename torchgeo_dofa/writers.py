"""Georeferenced prediction writers (Lightning ``BasePredictionWriter`` callbacks).

* :class:`GridWriter`: one GeoTIFF embedding map per region, D bands, one pixel per 16 x 16
  input patch, chips placed by their coordinates, overlaps averaged, NaN where no chip landed.
* :class:`PooledWriter`: one GeoParquet table, a row per chip (footprint, CRS, time range,
  embedding vector, variant, weights identity).

Both are resumable and atomic. Every chip is first written as its own small part file under
``<output>.parts/`` (temporary name, then ``os.replace``), keyed by its position, so a crash
leaves complete parts only, a rerun skips chips whose part exists, and duplicates (a
distributed sampler pads ranks with repeated chips) overwrite the same part. When prediction
ends, rank 0 assembles the parts window by window into a temporary file, renames it onto the
final name and removes the parts: the final file either does not exist or is complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import rasterio
from lightning.pytorch.callbacks import BasePredictionWriter
from rasterio.crs import CRS
from rasterio.transform import Affine
from rasterio.windows import Window

__all__ = ["GridGeometry", "GridWriter", "PooledWriter", "atomic_write", "parts_dir"]


def parts_dir(path: Path) -> Path:
    """The folder holding a job's part files for an output path."""
    return path.with_name(path.name + ".parts")


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Write through a temporary name in the same folder, then rename onto ``path``.

    Args:
        path: the final file.
        write: a function writing the content to the path it is given.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class GridGeometry:
    """The output grid of a region: anchored at the region's bottom-left corner.

    TorchGeo's gridded samplers place chips from the region's lower-left corner, so anchoring
    there keeps every chip on whole cells when the stride is a multiple of 16 pixels.

    Attributes:
        crs: the region's CRS.
        xmin: left edge (map units).
        ymin: bottom edge (map units).
        cell: cell size in map units (16 x the input resolution for 224-pixel chips).
        width: cells across.
        height: cells down.
    """

    crs: CRS
    xmin: float
    ymin: float
    cell: float
    width: int
    height: int

    @classmethod
    def for_region(
        cls, crs: CRS, bounds: Sequence[float], res: float, patch_px: float = 16.0
    ) -> GridGeometry:
        """Grid covering ``bounds`` (xmin, ymin, xmax, ymax) at ``patch_px`` input pixels a cell.

        Args:
            crs: region CRS.
            bounds: (xmin, ymin, xmax, ymax) in map units.
            res: input pixel size in map units.
            patch_px: input pixels per cell side (16 when chips are not rescaled).

        Returns:
            The geometry.
        """
        xmin, ymin, xmax, ymax = (float(b) for b in bounds)
        cell = res * patch_px
        width = max(1, math.ceil((xmax - xmin) / cell - 1e-6))
        height = max(1, math.ceil((ymax - ymin) / cell - 1e-6))
        return cls(crs, xmin, ymin, cell, width, height)

    @classmethod
    def for_chips(
        cls, crs: CRS, chips: Sequence[tuple[slice, ...]], res: float, patch_px: float = 16.0
    ) -> GridGeometry:
        """Grid covering the union of a sampler's chips (e.g. TorchGeo's gridded samplers).

        Args:
            crs: the chips' CRS.
            chips: ``(x, y, ...)`` slices in map units.
            res: input pixel size in map units.
            patch_px: input pixels per cell side.

        Returns:
            The geometry.

        Raises:
            ValueError: if there are no chips.
        """
        if not chips:
            raise ValueError("the sampler yields no chip: nothing to write")
        xmin = min(float(c[0].start) for c in chips)
        ymin = min(float(c[1].start) for c in chips)
        xmax = max(float(c[0].stop) for c in chips)
        ymax = max(float(c[1].stop) for c in chips)
        return cls.for_region(crs, (xmin, ymin, xmax, ymax), res, patch_px)

    @property
    def transform(self) -> Affine:
        """The output raster's affine transform (north-up)."""
        return Affine(
            self.cell, 0.0, self.xmin, 0.0, -self.cell, self.ymin + self.height * self.cell
        )

    def place(self, grid_transform: Sequence[float]) -> tuple[int, int]:
        """Row and column of a chip grid's top-left cell in this grid.

        Args:
            grid_transform: the chip grid's affine (a, b, c, d, e, f, ...).

        Returns:
            (row, col) offsets, possibly negative or past the edge.

        Raises:
            ValueError: if the chip grid is not aligned with this grid.
        """
        a, _, c, _, e, f = (float(v) for v in list(grid_transform)[:6])
        if not math.isclose(a, self.cell, rel_tol=1e-3) or not math.isclose(
            -e, self.cell, rel_tol=1e-3
        ):
            raise ValueError(
                f"chip grid cell size {a} x {-e} differs from the output's {self.cell}: all "
                "chips of a region must have the same size in pixels"
            )
        col = (c - self.xmin) / self.cell
        row = (self.ymin + self.height * self.cell - f) / self.cell
        if abs(col - round(col)) > 0.05 or abs(row - round(row)) > 0.05:
            raise ValueError(
                f"chip at ({c}, {f}) does not fall on whole output cells: use a sampler stride "
                "that is a multiple of 16 pixels"
            )
        return round(row), round(col)


class _PartsWriter(BasePredictionWriter):
    """Shared part-file bookkeeping for both writers.

    Part files are written off the compute thread: each batch's chips go to a small thread
    pool (``write_threads``), so the model does not wait for the disk. At most
    ``max_pending_batches`` batches wait to be written (memory stays bounded: a slow disk
    slows the job down instead of queueing predictions). Every pending write is waited for
    before the parts are assembled (:meth:`flush`, at epoch end and in ``finalize``) and when
    prediction fails; an error in a background write is raised in the main thread at the
    next batch or at the latest by :meth:`flush`.
    """

    suffix = ".npy"
    #: Threads writing part files (file I/O and compression release the GIL).
    write_threads = 2
    #: Batches that may wait to be written before the next batch waits for the oldest.
    max_pending_batches = 4

    def __init__(self, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None) -> None:
        super().__init__(write_interval="batch")
        self.path = Path(path)
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.written = 0
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future[None]] = deque()

    def __getstate__(self) -> dict[str, Any]:
        """Pickle/copy without the thread pool (made again on the first write)."""
        if self._pending:
            raise RuntimeError("cannot copy a writer with part files still being written")
        state = self.__dict__.copy()
        state["_pool"], state["_pending"] = None, deque()
        return state

    def _write_chips(self, prediction: Mapping[str, Any], chips: Sequence[int]) -> None:
        for i in chips:
            self.write_chip(prediction, i)

    def flush(self) -> None:
        """Wait for every part file being written; raise the first error among them.

        Raises:
            Exception: whatever a background write raised (after all writes have ended).
        """
        error: BaseException | None = None
        while self._pending:
            future = self._pending.popleft()
            exc = future.exception()
            if exc is not None and error is None:
                error = exc
        if error is not None:
            raise error

    def _shutdown(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Prediction failed: let the writes under way end, without masking the error.

        Parts written stay valid for a resume; a failed write leaves no part.
        """
        for future in self._pending:
            future.exception()
        self._pending.clear()
        self._shutdown()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Stop the writer threads."""
        self.flush()
        self._shutdown()

    @property
    def parts(self) -> Path:
        """Folder of part files."""
        return parts_dir(self.path)

    def done_keys(self) -> set[str]:
        """Keys of chips whose part file exists (for resuming)."""
        self.flush()
        if not self.parts.is_dir():
            return set()
        return {p.name.removesuffix(self.suffix) for p in self.parts.glob(f"*{self.suffix}")}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Create the parts folder (every rank; idempotent)."""
        self.parts.mkdir(parents=True, exist_ok=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Wait for every rank, then assemble the final file on rank 0."""
        self.flush()
        trainer.strategy.barrier("torchgeo_dofa_writer")
        if trainer.is_global_zero:
            self.finalize()
        trainer.strategy.barrier("torchgeo_dofa_writer_done")

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Save every non-empty chip of a batch as its own part file (in the background)."""
        while self._pending and self._pending[0].done():  # surface a failed write early
            self._pending.popleft().result()
        empty = prediction.get("empty")
        chips = [
            i
            for i in range(len(prediction["grid" if "grid" in prediction else "pooled"]))
            if empty is None or not bool(empty[i])
        ]
        if not chips:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.write_threads, thread_name_prefix="dofa-parts")
        self._pending.append(self._pool.submit(self._write_chips, prediction, chips))
        self.written += len(chips)
        while len(self._pending) > self.max_pending_batches:
            self._pending.popleft().result()

    def write_chip(self, prediction: Mapping[str, Any], i: int) -> None:  # pragma: no cover
        """Save chip ``i`` of a prediction as a part file."""
        raise NotImplementedError

    def finalize(self) -> None:  # pragma: no cover - abstract
        """Assemble the parts into the final output."""
        raise NotImplementedError


class GridWriter(_PartsWriter):
    """Write grid embeddings as one georeferenced GeoTIFF for a region.

    Each chip's (D, h, w) grid is placed by its ``grid_transform``; where chips overlap the
    average is written (deterministic: the order of chips does not matter); cells no chip
    covered, or that were entirely no-data, are NaN (the declared nodata). The map is
    assembled in windows of ``window`` x ``window`` cells, so memory stays bounded.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        geometry: GridGeometry | None = None,
        metadata: Mapping[str, Any] | None = None,
        window: int = 64,
    ) -> None:
        """Create a grid writer.

        Args:
            path: output GeoTIFF.
            geometry: the output grid (see :meth:`GridGeometry.for_region`); None derives it
                at setup from the trainer's datamodule (its ``predict_dataset`` CRS and
                resolution, and the chips of its ``predict_sampler``), as in a
                ``torchgeo-dofa predict --config`` run.
            metadata: tags stored in the GeoTIFF (variant, weights, bands ...).
            window: cells per side of the assembly window and of the GeoTIFF's blocks (a
                multiple of 16), so every block is compressed and written exactly once.
        """
        super().__init__(path, metadata)
        if window <= 0 or window % 16:
            raise ValueError(f"window must be a positive multiple of 16, got {window}")
        self._geometry = geometry
        self.window = window

    @property
    def geometry(self) -> GridGeometry:
        """The output grid."""
        if self._geometry is None:
            raise RuntimeError("GridWriter has no geometry yet: it is derived at setup")
        return self._geometry

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Create the parts folder; derive the geometry from the datamodule if needed."""
        super().setup(trainer, pl_module, stage)
        if self._geometry is None:
            dm = getattr(trainer, "datamodule", None)
            dataset = getattr(dm, "predict_dataset", None)
            sampler = getattr(dm, "predict_sampler", None)
            if dataset is None or sampler is None:
                raise RuntimeError(
                    "GridWriter(geometry=None) needs a datamodule with predict_dataset and "
                    "predict_sampler (e.g. torchgeo_dofa.datamodules.DOFAPredictDataModule)"
                )
            crs = CRS.from_user_input(dataset.crs.to_wkt())
            patch_px = float(getattr(dm, "patch_size", 224)) / 224 * 16
            self._geometry = GridGeometry.for_chips(
                crs, list(sampler), float(dataset.res[0]), patch_px
            )
        self.metadata.update(getattr(pl_module, "metadata", {}))

    @staticmethod
    def key_for(geometry: GridGeometry, grid_transform: Sequence[float]) -> str:
        """Part-file key of a chip placed on ``geometry``: its top-left cell."""
        row, col = geometry.place(grid_transform)
        return f"r{row}_c{col}"

    def chip_key(self, grid_transform: Sequence[float]) -> str:
        """Part-file key of a chip: its top-left cell."""
        return self.key_for(self.geometry, grid_transform)

    def write_chip(self, prediction: Mapping[str, Any], i: int) -> None:
        """Save chip ``i``'s grid as a part file keyed by its top-left cell."""
        grid = prediction["grid"][i].float().cpu().numpy()
        key = self.chip_key(prediction["grid_transform"][i].double().cpu().numpy())

        def save(path: Path) -> None:
            with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a name
                np.save(f, grid, allow_pickle=False)

        atomic_write(self.parts / f"{key}.npy", save)

    def _chips(self) -> Iterator[tuple[int, int, Path]]:
        for p in sorted(self.parts.glob("*.npy")):
            r, c = p.stem.split("_")
            yield int(r[1:]), int(c[1:]), p

    def finalize(self) -> None:
        """Assemble the chip parts into the final GeoTIFF, window by window."""
        self.flush()
        geom = self.geometry
        chips = list(self._chips())
        if not chips:
            raise RuntimeError(f"no chip was written for {self.path}: nothing to assemble")
        sizes = {p: np.load(p, mmap_mode="r").shape for _, _, p in chips}
        depth = next(iter(sizes.values()))[0]
        profile = {
            "driver": "GTiff",
            "dtype": "float32",
            "count": depth,
            "width": geom.width,
            "height": geom.height,
            "crs": geom.crs,
            "transform": geom.transform,
            "nodata": float("nan"),
            "tiled": True,
            "blockxsize": self.window,
            "blockysize": self.window,
            "compress": "zstd",
            "zstd_level": 1,
            "predictor": 3,
            "num_threads": "ALL_CPUS",
            "interleave": "band",
            "BIGTIFF": "IF_SAFER",
        }

        def write(tmp: Path) -> None:
            with rasterio.open(tmp, "w", **profile) as dst:
                for w in range(depth):
                    dst.set_band_description(w + 1, f"dofa_{w:04d}")
                dst.update_tags(**{k: _tag(v) for k, v in self.metadata.items()})
                for win in _windows(geom.height, geom.width, self.window):
                    total = np.zeros((depth, win.height, win.width), np.float64)
                    count = np.zeros((win.height, win.width), np.int32)
                    for r, c, p in chips:
                        _, h, w = sizes[p]
                        r0, r1 = max(r, win.row_off), min(r + h, win.row_off + win.height)
                        c0, c1 = max(c, win.col_off), min(c + w, win.col_off + win.width)
                        if r0 >= r1 or c0 >= c1:
                            continue
                        part = np.load(p, mmap_mode="r")[:, r0 - r : r1 - r, c0 - c : c1 - c]
                        ok = np.isfinite(part).all(axis=0)
                        wr, wc = (
                            slice(r0 - win.row_off, r1 - win.row_off),
                            slice(c0 - win.col_off, c1 - win.col_off),
                        )
                        total[:, wr, wc] += np.where(ok, part, 0.0)
                        count[wr, wc] += ok
                    with np.errstate(invalid="ignore", divide="ignore"):
                        out = np.where(count > 0, total / np.maximum(count, 1), np.nan)
                    dst.write(out.astype(np.float32), window=win)

        atomic_write(self.path, write)
        shutil.rmtree(self.parts, ignore_errors=True)


class PooledWriter(_PartsWriter):
    """Write pooled embeddings as a GeoParquet table, one row per chip.

    Columns: ``geometry`` (chip footprint in the region's CRS), ``chip_id``, ``source``,
    ``time_start``/``time_end`` (UTC), ``embedding`` (list of float32), ``variant``,
    ``weights``, ``pooled_norm``; the table's CRS is the region's.
    """

    suffix = ".json"

    def __init__(
        self,
        path: str | os.PathLike[str],
        crs: CRS | None = None,
        metadata: Mapping[str, Any] | None = None,
        source: str = "",
    ) -> None:
        """Create a pooled writer.

        Args:
            path: output ``.parquet`` file.
            crs: CRS of the chips' coordinates; None takes the datamodule's
                ``predict_dataset`` CRS at setup.
            metadata: values stored in every row (``variant``, ``weights``, ``pooled_norm``)
                and in the file's metadata.
            source: name of the input (file or region) stored in every row.
        """
        super().__init__(path, metadata)
        self.crs = crs
        self.source = source

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Create the parts folder; take the CRS from the datamodule if needed."""
        super().setup(trainer, pl_module, stage)
        if self.crs is None:
            dataset = getattr(getattr(trainer, "datamodule", None), "predict_dataset", None)
            if dataset is None:
                raise RuntimeError("PooledWriter(crs=None) needs a datamodule's predict_dataset")
            self.crs = CRS.from_user_input(dataset.crs.to_wkt())
        self.metadata.update(getattr(pl_module, "metadata", {}))

    @staticmethod
    def chip_key(bounds: Sequence[float]) -> str:
        """Part-file key of a chip: its footprint to 10 significant digits (mm in UTM)."""
        xmin, xmax, _, ymin, ymax = (float(v) for v in list(bounds)[:5])
        return "_".join(f"{v:.10g}".replace("-", "m") for v in (xmin, ymin, xmax, ymax))

    def write_chip(self, prediction: Mapping[str, Any], i: int) -> None:
        """Save chip ``i``'s row as a small JSON part keyed by its footprint."""
        b = prediction["bounds"][i].double().cpu().numpy()
        key = self.chip_key(b)
        row = {
            "chip_id": key,
            "bounds": [float(b[0]), float(b[3]), float(b[1]), float(b[4])],
            "time": [float(b[6]), float(b[7])] if len(b) >= 8 else [math.nan, math.nan],
            "embedding": prediction["pooled"][i].float().cpu().numpy().tolist(),
        }
        text = json.dumps(row)
        atomic_write(self.parts / f"{key}.json", lambda p: Path(p).write_text(text))

    def finalize(self) -> None:
        """Assemble the rows into the final GeoParquet, sorted north-west first."""
        self.flush()
        import geopandas as gpd
        import pandas as pd
        from shapely.geometry import box

        rows = [json.loads(p.read_text()) for p in sorted(self.parts.glob("*.json"))]
        if not rows:
            raise RuntimeError(f"no chip was written for {self.path}: nothing to assemble")
        rows.sort(key=lambda r: (-r["bounds"][3], r["bounds"][0]))
        meta = {k: _tag(v) for k, v in self.metadata.items()}
        frame = gpd.GeoDataFrame(
            {
                "chip_id": [r["chip_id"] for r in rows],
                "source": self.source,
                "time_start": pd.to_datetime([_ts(r["time"][0]) for r in rows], utc=True),
                "time_end": pd.to_datetime([_ts(r["time"][1]) for r in rows], utc=True),
                "embedding": [np.asarray(r["embedding"], np.float32) for r in rows],
                "variant": meta.get("variant", ""),
                "weights": meta.get("weights", ""),
                "pooled_norm": meta.get("pooled_norm", ""),
            },
            geometry=[box(*r["bounds"]) for r in rows],
            crs=self.crs,
        )
        frame.attrs.update(meta)
        atomic_write(self.path, lambda p: frame.to_parquet(p))
        shutil.rmtree(self.parts, ignore_errors=True)


def _ts(value: float) -> float | None:
    if not math.isfinite(value) or abs(value) > 9.2e9:  # TorchGeo's open-ended time bounds
        return None
    return value * 1e9


def _tag(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _windows(height: int, width: int, size: int) -> Iterator[Window]:
    for row in range(0, height, size):
        for col in range(0, width, size):
            yield Window(col, row, min(size, width - col), min(size, height - row))
