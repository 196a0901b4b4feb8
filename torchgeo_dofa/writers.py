"""Georeferenced prediction writers (Lightning ``BasePredictionWriter`` callbacks).

* :class:`GridWriter`: one GeoTIFF embedding map per region, D bands, one pixel per 16 x 16
  input patch, chips placed by their coordinates, overlaps averaged, NaN where no chip landed.
* :class:`PooledWriter`: one GeoParquet table, a row per chip (footprint, CRS, time range,
  embedding vector, variant, weights identity).

Both are resumable and atomic. Every chip is first written as its own small part file under
``<output>.parts/`` (temporary name, then ``os.replace``), keyed by its position, so a crash
leaves complete parts only, a rerun skips chips whose part exists, and duplicates (a
distributed sampler pads ranks with repeated chips) overwrite the same part. When prediction
ends, rank 0 assembles the parts window by window into a temporary file, flushes it to disk,
reads it back (every block of every band of a GeoTIFF, compared with what was written; every
row and column of a GeoParquet), renames it onto the final name, flushes the folder and only
then removes the parts: the final file either does not exist or is complete and readable. Any
failure (a full disk, a libtiff error) raises :class:`OutputWriteError`, leaves no final file
and keeps the parts, so rerunning the same job finishes the assembly.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
import weakref
import zlib
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from errno import ENOSPC
from pathlib import Path
from typing import Any, ClassVar, cast

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pyproj
import rasterio
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.transform import Affine
from rasterio.windows import Window
from torch import Tensor

from . import _warnings
from ._errors import exception_chain
from .locks import (
    OutputLock,
    OutputPathError,
    die_with_launcher,
    is_launcher,
    mark_launcher,
    refuse_undecodable_name,
    signals_deferred,
)
from .runtime import GRID_SUFFIXES, TABLE_SUFFIXES
from .spatial import crs_label, same_crs

__all__ = [
    "ClassificationWriter",
    "GridGeometry",
    "GridWriter",
    "OutputPathError",
    "OutputWriteError",
    "PartsMismatchError",
    "PooledWriter",
    "SegmentationWriter",
    "atomic_write",
    "embed_manifest_listing",
    "finished_output_problem",
    "folders_removed_if_left_empty",
    "fsync_dir",
    "identity_differences",
    "parts_dir",
    "stale_temps",
    "temp_path",
]


#: File in a parts folder naming the job its parts belong to (JSON; not a part: its name ends
#: in neither part suffix).
PARTS_IDENTITY = "job-identity"

#: Output tags left out of a job's identity: the weights (identified by content, as
#: ``weights_crc32``), the inputs' acquisition span and their sizes and modification times
#: (``source_stats``, for ``preview``): both follow from the source files, which the
#: identity names by path, size and modification time (its ``sources``), and change no
#: chip's values: parts written before they were recorded are this job's.
_NOT_IDENTITY = frozenset({"weights", "acquisition_start", "acquisition_end", "source_stats"})

#: The longest acquisition span recorded as one instant, GDAL's ``ACQUISITIONDATETIME``
#: (IMAGERY metadata domain) in a grid GeoTIFF: scenes dated to the second (a STAC
#: ``datetime``, ``YYYYMMDDTHHMMSS`` in a name; the tiles of one pass, seconds apart). A
#: date without a time of day spans its day and is not one (its time is not known).
IMAGERY_INSTANT = pd.Timedelta(minutes=1)


class PartsMismatchError(ValueError):
    """The parts folder of an output holds chips of another job (other weights, bands ...)."""


def parts_dir(path: Path) -> Path:
    """The folder holding a job's part files for an output path."""
    return path.with_name(path.name + ".parts")


class OutputWriteError(OSError):
    """A final output could not be written, flushed or read back.

    The message is one line naming the file and the cause (the OS error where one is known).
    Nothing is left at the final path; a writer's parts are kept so a rerun can finish.

    Attributes:
        errno: the OS error number found in the cause's chain (e.g. ``errno.ENOSPC``), or
            None.
        exit_status: the CLI's exit status for it (1: a fault, not bad input).
    """

    exit_status = 1

    def __init__(self, message: str, errno: int | None = None) -> None:
        """Create the error.

        Args:
            message: the one-line message.
            errno: the OS error number, if known.
        """
        super().__init__(message)
        self.errno = errno


#: Temporary files of :func:`atomic_write`: ``.<final name>.<32 hex digits>.tmp``.
_TEMP = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{32}\.tmp$")


def temp_path(path: Path) -> Path:
    """A fresh temporary name beside ``path``: ``.<name>.<32 hex digits>.tmp``."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def stale_temps(path: Path) -> list[Path]:
    """Temporary files of ``path`` left by an :func:`atomic_write` that was killed.

    Only this output's temporaries (``.<name>.<hex>.tmp`` beside it) and any temporary inside
    its parts folder are listed. Delete them only while holding the output folder's lock
    (:class:`torchgeo_dofa.locks.OutputLock`): a running job's temporaries look the same.

    Args:
        path: a final output path.

    Returns:
        The temporary files, sorted.
    """
    found = [
        p
        for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp")
        if (m := _TEMP.match(p.name)) and m["name"] == path.name
    ]
    parts = parts_dir(path)
    if parts.is_dir():
        found += [p for p in parts.glob(".*.tmp") if _TEMP.match(p.name)]
    return sorted(found)


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename inside it) to disk; a no-op where unsupported."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - platforms without directory fds (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def finished_output_problem(path: str | os.PathLike[str]) -> str | None:
    """Why an output an earlier run finished cannot be read now (damaged since), or None.

    A rerun skips a job's finished outputs; a file truncated or overwritten after it was
    written (a copy cut short, a disk error) was counted as done, with exit status 0. Checked
    without reading it all: a GeoTIFF opens and gives its last pixel in every band (the last
    blocks written; a cut file fails there), a GeoParquet table's footer (at the file's end)
    reads and holds rows.

    Args:
        path: the output file.

    Returns:
        The reason (the libraries' messages, the innermost first, at most 200 characters),
        or None for a readable file.
    """
    try:
        if Path(path).suffix.lower() in (".tif", ".tiff"):
            with rasterio.open(path) as src:
                src.read(window=Window(src.width - 1, src.height - 1, 1, 1))
        else:
            import pyarrow.parquet as pq

            if pq.ParquetFile(path).metadata.num_rows < 1:
                return "it holds no row"
    except Exception as err:  # rasterio's, pyarrow's and the OS's errors alike
        # rasterio's "Read failed. See previous exception for details." names no cause: the
        # libtiff / GDAL message it chains does
        return _chain_message(err)[:200]
    return None


def atomic_write(
    path: str | os.PathLike[str],
    write: Callable[[Path], Any],
    *,
    verify: Callable[[Path], None] | None = None,
    durable: bool = False,
    hint: str = "",
) -> None:
    """Write through a temporary name in the same folder, then rename onto ``path``.

    Steps: ``write(tmp)``; flush the file to disk (``fsync``, if ``durable``); ``verify(tmp)``
    (read it back); ``os.replace(tmp, path)``; flush the folder (if ``durable``). The
    temporary file is removed on any failure, so ``path`` is either the previous content, or
    the new, verified content.

    Args:
        path: the final file.
        write: a function writing the content to the path it is given.
        verify: a function reading the written file back, raising if it is not what was
            meant to be written (see :class:`GridWriter` and :class:`PooledWriter`).
        durable: fsync the file and the folder, so the content survives a power loss, not
            only a crash (final outputs, whose parts are deleted next). Off by default:
            parts are re-creatable and an fsync costs 8-12 ms per file on our disk.
        hint: appended to the error message (e.g. what to do to finish the job).

    Raises:
        OutputWriteError: if writing, flushing, verifying or renaming fails; one line naming
            ``path`` and the cause (an ``OSError``'s strerror, a GDAL/libtiff message, or "no
            space left on device" when the folder's filesystem is full).
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        if verify is not None:
            verify(tmp)
        os.replace(tmp, path)
    except Exception as err:  # any failure is a failed write of this file: say which, why
        raise OutputWriteError(
            f"could not write {path}: {_describe(err, path.parent)}{hint}", _errno_in(err)
        ) from err
    finally:  # not over the error above: a read-only folder refuses even this (EROFS)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    if durable:
        fsync_dir(path.parent)


@contextlib.contextmanager
def folders_removed_if_left_empty(*folders: Path) -> Iterator[None]:
    """Run the block; if it raises, remove the folders it made that are still empty.

    ``folders`` and those of their parents that did not exist before the block: a refused
    export (:func:`~torchgeo_dofa.api.export_batch`) or a failed dataset download leaves no
    empty folder behind, and what was written stays (``rmdir`` removes empty folders only),
    e.g. parts for a rerun to resume.

    Args:
        folders: the folders the block may make.

    Yields:
        Nothing: the block runs.
    """
    made = [d for folder in folders for d in (*reversed(folder.parents), folder) if not d.exists()]
    try:
        yield
    except BaseException:
        for folder in sorted(set(made), key=lambda d: len(d.parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _errno_in(err: BaseException) -> int | None:
    """The first OS error number in an exception's chain, if any."""
    for cur in exception_chain(err):
        if isinstance(cur, OSError) and cur.errno:
            return cur.errno
    return None


def _chain_message(err: BaseException) -> str:
    """One line of an exception chain's messages, the innermost first.

    rasterio's "Read failed. / Write failed. See previous exception for details." is left out
    for the libtiff / GDAL message it chains; an OS error is its ``strerror``.
    """
    messages: list[str] = []
    seen: set[str] = set()  # the texts, before a type's name is put in front of one
    for cur in exception_chain(err):
        code = cur.errno if isinstance(cur, OSError) else None
        os_error = bool(code) and not isinstance(cur, OutputWriteError)
        text = os.strerror(code) if os_error and code else str(cur)
        text = " ".join(text.split())
        if text and "see previous exception" not in text.lower() and text not in seen:
            seen.add(text)
            named = cur is not err or os_error
            messages.append(text if named else f"{type(cur).__name__}: {text}")
    return "; ".join(reversed(messages)) or type(err).__name__


def _describe(err: BaseException, folder: Path) -> str:
    """One line: the most specific message of an exception chain, plus a full-disk note.

    rasterio reports a libtiff write failure as "Write failed. See previous exception" with
    the libtiff message chained; the OS error itself (ENOSPC) is only printed by libtiff, so a
    full filesystem is detected by asking it for its free space.
    """
    line = _chain_message(err)
    errno_ = _errno_in(err)
    if errno_ is None:  # no OS error known (libtiff printed it): is the disk full?
        try:
            stats = os.statvfs(folder)
        except (OSError, AttributeError):  # pragma: no cover - no statvfs (Windows)
            stats = None
        if stats is not None and stats.f_bavail * stats.f_frsize < 1 << 20:
            free = stats.f_bavail * stats.f_frsize
            line += f" ({os.strerror(ENOSPC)}: {free // 1024} KiB free in {folder})"
    return line


@dataclass(frozen=True)
class GridGeometry:
    """The output grid of a region: anchored at the region's bottom-left corner.

    TorchGeo's gridded samplers place chips from the region's lower-left corner, so anchoring
    there keeps every chip on whole cells when the stride is a multiple of 16 pixels.

    Attributes:
        crs: the region's CRS.
        xmin: left edge (map units).
        ymin: bottom edge (map units).
        cell: cell width in map units (16 x the input's x resolution for 224-pixel chips).
        width: cells across.
        height: cells down.
        cell_y: cell height in map units where pixels are not square (16 x the y
            resolution); None for square cells (``cell``). See :attr:`cell_height`.
    """

    crs: CRS
    xmin: float
    ymin: float
    cell: float
    width: int
    height: int
    cell_y: float | None = None

    @property
    def cell_height(self) -> float:
        """Cell height in map units (``cell`` for square cells)."""
        return self.cell if self.cell_y is None else self.cell_y

    @classmethod
    def for_region(
        cls,
        crs: CRS,
        bounds: Sequence[float],
        res: float | Sequence[float],
        patch_px: float = 16.0,
    ) -> GridGeometry:
        """Grid covering ``bounds`` (xmin, ymin, xmax, ymax) at ``patch_px`` input pixels a cell.

        Args:
            crs: region CRS.
            bounds: (xmin, ymin, xmax, ymax) in map units.
            res: input pixel size in map units, or (x, y) sizes (TorchGeo's ``res``) for
                pixels that are not square (a 10 x 20 m raster gives 160 x 320 m cells).
            patch_px: input pixels per cell side (16 when chips are not rescaled).

        Returns:
            The geometry.
        """
        xmin, ymin, xmax, ymax = (float(b) for b in bounds)
        xres, yres = np.broadcast_to(np.asarray(res, dtype=float), (2,))
        cell, cell_y = float(xres) * patch_px, float(yres) * patch_px
        width = max(1, math.ceil((xmax - xmin) / cell - 1e-6))
        height = max(1, math.ceil((ymax - ymin) / cell_y - 1e-6))
        square = math.isclose(cell, cell_y, rel_tol=1e-9)
        return cls(crs, xmin, ymin, cell, width, height, None if square else cell_y)

    @classmethod
    def for_chips(
        cls,
        crs: CRS,
        chips: Sequence[tuple[slice, ...]],
        res: float | Sequence[float],
        patch_px: float = 16.0,
    ) -> GridGeometry:
        """Grid covering the union of a sampler's chips (e.g. TorchGeo's gridded samplers).

        Args:
            crs: the chips' CRS.
            chips: ``(x, y, ...)`` slices in map units.
            res: input pixel size in map units, or (x, y) sizes.
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
        cell_y = self.cell_height
        return Affine(self.cell, 0.0, self.xmin, 0.0, -cell_y, self.ymin + self.height * cell_y)

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
        cell_y = self.cell_height
        if not math.isclose(a, self.cell, rel_tol=1e-3) or not math.isclose(
            -e, cell_y, rel_tol=1e-3
        ):
            raise ValueError(
                f"chip grid cell size {a} x {-e} differs from the output's {self.cell} x "
                f"{cell_y}: all chips of a region must have the same size in pixels"
            )
        col = (c - self.xmin) / self.cell
        row = (self.ymin + self.height * cell_y - f) / cell_y
        if abs(col - round(col)) > 0.05 or abs(row - round(row)) > 0.05:
            raise ValueError(
                f"chip at ({c}, {f}) does not fall on whole output cells: use a sampler stride "
                "that is a multiple of 16 pixels"
            )
        return round(row), round(col)


def precision_coordinates_problem(trainer: pl.Trainer) -> str | None:
    """Why the trainer's precision cannot carry the chips' coordinates to a writer, or None.

    Lightning's "true" half precisions (``bf16-true``, ``16-true``: ``HalfPrecision``) cast
    every floating-point tensor of the batch, the chips' ``bounds`` and ``transform`` too:
    UTM easting 359130 becomes 358400 in bfloat16 and infinity in float16, so the writers
    would place chips wrongly or not at all; FSDP's plugins cast the batch to float32, which
    moves this package's float64 coordinates. Judged by what the trainer's precision plugin
    does to a float64 and a float32 coordinate (any plugin, present or future): a cast that
    keeps the values (``64-true``) is no problem.

    Args:
        trainer: the prediction trainer.

    Returns:
        The message (the precision, what it does to a coordinate, the fix), or None.
    """
    convert = getattr(getattr(trainer, "precision_plugin", None), "convert_input", None)
    if convert is None:
        return None
    # this package's datasets give float64 bounds; TorchGeo's own give float32. A value no
    # float32 holds: a cast to float32 (FSDP's plugins) moves it; a cast up loses nothing
    for dtype in (torch.float64, torch.float32):
        probe = torch.tensor([359_130.123456789, 5_341_184.987654321], dtype=dtype)
        got = convert({"bounds": probe})["bounds"]
        if isinstance(got, torch.Tensor) and not torch.equal(got.double(), probe.double()):
            given = ", ".join(f"{v:.15g}" for v in probe.double().tolist())
            shown = ", ".join(f"{v:.15g}" for v in got.double().tolist())
            return (
                f"precision {trainer.precision!r} ({type(trainer.precision_plugin).__name__}) "
                f"casts every floating-point tensor of the batch to "
                f"{str(got.dtype).removeprefix('torch.')}, the chips' coordinates too "
                f"(easting, northing {given} become {shown}): the outputs could not be "
                "placed exactly; use a precision that keeps the batch's values (bf16-mixed: "
                "the model computes in bf16; 32-true; 64-true), without FSDP or DeepSpeed, "
                "whose precision plugins cast the batch"
            )
    return None


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
    #: Suffix of the (empty) part a chip without any valid pixel leaves: the chip is done
    #: and NaN in the outputs (so assembly can tell it from a chip whose part is missing).
    empty_suffix = ".empty"
    #: Keys of a prediction this writer reads (see :meth:`write_on_batch_end`).
    needs: tuple[str, ...] = ()
    #: Threads writing part files (file I/O and compression release the GIL).
    write_threads = 2
    #: Batches that may wait to be written before the next batch waits for the oldest.
    max_pending_batches = 4
    #: Metadata key holding the number of values per chip for an output without any part
    #: (every chip empty): :class:`~torchgeo_dofa.embedder.DOFAEmbedder` records its
    #: ``embed_dim``.
    depth_tag = "embed_dim"

    #: The output file's format and the name endings it takes (any letter case): those of
    #: ``torchgeo-dofa embed -o`` (:data:`torchgeo_dofa.runtime.GRID_SUFFIXES` / ``TABLE_``).
    file_format = ""
    file_suffixes: tuple[str, ...] = ()

    def __init__(self, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None) -> None:
        super().__init__(write_interval="batch")
        self.path = Path(path).expanduser()  # "~/out.tif" in a config: no shell expands it
        if self.file_suffixes and self.path.suffix.lower() not in self.file_suffixes:
            # a GeoTIFF written under map.png, or Parquet under table.csv, opened as neither
            folder = self.path.name in ("", ".", "..")  # a folder's name: a file in it
            names = [
                self.path / f"output{s}" if folder else self.path.with_suffix(s)
                for s in self.file_suffixes
            ]
            raise ValueError(
                f"{type(self).__name__} writes a {self.file_format} file, but "
                f"{str(self.path)!r} ends in {self.path.suffix or 'no suffix'}: name it "
                + " or ".join(repr(str(n)) for n in names)
            )
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.written = 0
        #: chips of this run without any valid pixel (an empty part: NaN in the outputs)
        self.empty = 0
        #: seconds the trainer's loop waited for this writer's part-writing threads, which
        #: had fallen :attr:`max_pending_batches` batches behind (a writer slower than the
        #: model and the loader); the last batches' wait at the end of the job not counted
        self.waited_s = 0.0
        #: the key of every chip of the job (from the datamodule's sampler at setup), which
        #: assembly checks each has a part; None: not known, not checked
        self.chip_keys: list[str] | None = None
        #: whether the trainer sent every chip (no ``limit_predict_batches`` cut the job
        #: short): set before assembly
        self._whole_job = False
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future[None]] = deque()
        self._done: set[str] = set()
        #: this run's state: the output assembled, prediction failed (reset at setup)
        self._assembled = self._failed = False
        #: what the parts depend on (gathered at setup) and whether this run recorded it
        self._job: dict[str, str] = {}
        self._identity_written = self._parts_made = False
        #: the output folder's lock, when this writer took it, and its claimed output path
        #: (see :meth:`_claim_output`)
        self._lock: OutputLock | None = None
        self._claimed: Path | None = None
        mark_launcher()  # for the DDP workers Trainer.predict may start
        made = _PartsWriter._locking_when_made
        if made is not None:  # see lock_outputs_when_made
            self._refuse_path_taken({writer.path.resolve() for writer in made})
            made.append(self)
            self._refuse_folder_path()
            self._take_folder_lock()

    def __getstate__(self) -> dict[str, Any]:
        """Pickle/copy without the thread pool (made again on the first write)."""
        if self._pending:
            raise RuntimeError("cannot copy a writer with part files still being written")
        state = self.__dict__.copy()
        state["_pool"], state["_pending"] = None, deque()
        state["_lock"] = state["_claimed"] = None
        return state

    def _write_chips(
        self, prediction: Mapping[str, Any], chips: Sequence[int], empty: Sequence[int]
    ) -> None:
        try:
            for i in chips:
                self.write_chip(prediction, i)
            for i in empty:  # written as a part is: a failure (a full disk) is OutputWriteError
                path = self.parts / f"{self.part_key(prediction, i)}{self.empty_suffix}"
                atomic_write(path, lambda tmp: tmp.touch())
        except OutputWriteError as err:  # a part: say that the others are kept, and to rerun
            raise OutputWriteError(f"{err}{self._hint()}", err.errno) from err

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
        self._failed = True
        for future in self._pending:
            future.exception()
        self._pending.clear()
        self._shutdown()
        self._release_output()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Stop the writer threads; assemble the output if an earlier run wrote every chip.

        When every chip is already written (a rerun after an interruption between the last
        batch and the assembly), the loader is empty and Lightning skips the prediction loop
        with its epoch hooks, so the output is assembled here, on rank 0: the same file an
        uninterrupted run writes. Not after a failure, nor with ``limit_predict_batches=0``
        (the parts need not be complete then).
        """
        try:
            self.flush()
            self._shutdown()
            if (
                stage == "predict"
                and trainer.is_global_zero
                and not (self._assembled or self._failed or self.path.exists())
                and self._done  # parts of an earlier run, and ...
                and trainer.limit_predict_batches != 0
                and sum(trainer.num_predict_batches) == 0  # ... the loop skipped: nothing left
            ):
                self._check_weights(trainer, pl_module)  # on_predict_start did not run
                self._whole_job = _sends_every_batch(trainer)
                self.finalize()
                self._assembled = True
        finally:
            self._release_output()

    @property
    def parts(self) -> Path:
        """Folder of part files."""
        return parts_dir(self.path)

    def done_keys(self) -> set[str]:
        """Keys of chips whose part file (or empty-chip part) exists (for resuming)."""
        self.flush()
        if not self.parts.is_dir():
            return set()
        return {
            p.name.removesuffix(suffix)
            for suffix in (self.suffix, self.empty_suffix)
            for p in self.parts.glob(f"*{suffix}")
        }

    def check_every_chip_has_a_part(self) -> None:
        """Before assembly: every chip of the job (:attr:`chip_keys`) must have its part.

        A part can go missing only from outside (a part file deleted while the job ran, a
        cleanup of the parts folder); assembling without it would leave a hole of NaN (a
        row flagged ``no_data``) in a file written with exit status 0. Not checked when the
        job's chips are unknown or the trainer was told to send only some of them
        (``limit_predict_batches``).

        Raises:
            OutputWriteError: naming how many chips lack a part (the first three) and the
                fix: rerun the same command, which computes exactly those chips.
        """
        if self.chip_keys is None or not self._whole_job:
            return
        present = self.done_keys()
        missing = [k for k in dict.fromkeys(self.chip_keys) if k not in present]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise OutputWriteError(
                f"{len(missing)} chip(s) of {self.path.name} have no part in {self.parts} "
                f"({', '.join(missing[:3])}{more}): removed while the job ran? Nothing was "
                "assembled; rerun the same command to compute those chips and finish"
            )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Gather the outputs' tags and what the parts depend on; write nothing yet.

        Tags: the module's ``metadata`` (variant, weights ...), the datamodule's
        ``output_tags()`` (bands, wavelengths, sources), then those given to the writer.
        The parts folder (and the output's folder) is made with the first part, so a job
        refused or failed before any chip was embedded leaves nothing behind.

        Raises:
            TypeError: when the module is a TorchGeo fine-tuning task (this package's
                ``DOFAClassificationTask`` / ``DOFASegmentationTask`` too), whose predictions
                are class scores, not embeddings: refused before any batch is computed.
            ValueError: when the module's ``output`` (``grid`` / ``pooled``) does not give
                what this writer writes; for a trainer precision that casts the batch's
                coordinates (:func:`precision_coordinates_problem`).
        """
        self._check_module(pl_module)
        _RUN_DIGESTS.pop(trainer, None)  # a new run: its weights are read again
        problem = precision_coordinates_problem(trainer)
        if problem is not None:
            raise ValueError(problem)
        dm = getattr(trainer, "datamodule", None)
        output_tags = getattr(dm, "output_tags", None)
        given = self.metadata
        self.metadata = self._module_tags(trainer, pl_module)
        if callable(output_tags):
            self.metadata.update(output_tags())
        # the numbers depend on it (bf16 against fp32: a pooled cosine of ~0.997): recorded
        # in the output, not only in the embed job's hidden manifest
        self.metadata["precision"] = str(trainer.precision)
        # what the parts depend on: the model's tags and its weights by content (not the
        # file's name; nor the acquisition span: see _NOT_IDENTITY), the data module's
        # settings (job_identity: sources by resolved path, size and mtime as the embed
        # job's manifest identifies them), the chips
        self._job = {k: str(v) for k, v in self.metadata.items() if k not in _NOT_IDENTITY}
        inputs: list[str] = []
        if "sources" in self._job:
            inputs = sorted(str(Path(p).resolve()) for p in json.loads(self._job["sources"]))
            self._job["sources"] = json.dumps(inputs)
        self._job["precision"] = str(trainer.precision)
        if "mixed" in str(trainer.precision):  # autocast: the patch embedding runs in fp32
            self._job["patch_embedding"] = "fp32"
        # the weights' CRC-32 (weights_crc32) is taken once they are final, after a
        # checkpoint's restore: on_predict_start (see there), before the first batch
        prep = getattr(pl_module, "preprocess", None)  # preprocessing on the device
        if prep is not None:
            waves = getattr(prep, "wavelengths", None)
            self._job["model_preprocess"] = repr(
                (
                    type(prep).__name__,
                    getattr(prep, "bands", None),
                    None if waves is None else [round(float(w), 6) for w in waves],
                    getattr(prep, "input_prep", None),
                )
            )
        job_identity = getattr(dm, "job_identity", None)
        if callable(job_identity):
            self._job |= {k: str(v) for k, v in job_identity().items()}
        sampler = getattr(dm, "predict_sampler", None)
        if sampler is not None:  # after the settings, which name a difference better
            self._job["chips_crc32"] = _text_digest(repr([_chip_bounds(c) for c in sampler]))
        self._identity_written = self._parts_made = False
        self.metadata.update(given)
        self._done = set()
        self._assembled = self._failed = False
        self._claim_output(inputs)

    def _check_module(self, pl_module: pl.LightningModule) -> None:
        """Refuse a module whose predictions this writer does not write (at setup).

        Raises:
            TypeError: for a TorchGeo fine-tuning task (class scores, not embeddings).
            ValueError: when the module's ``output`` (``grid`` / ``pooled``) does not give
                what this writer writes.
        """
        tasks = sys.modules.get("torchgeo.tasks")  # not imported: the module is not a task
        if tasks is not None and isinstance(pl_module, tasks.BaseTask):
            raise TypeError(
                f"{type(self).__name__} writes embeddings, but {type(pl_module).__name__} is "
                "a fine-tuning task, whose predict_step returns class scores: write them with "
                "SegmentationWriter (a segmentation task) or ClassificationWriter (a "
                "classification task), or predict embeddings with DOFAEmbedder (its "
                "fine-tuned encoder: DOFAEmbedder(weights='task.ckpt'))"
            )
        output = getattr(pl_module, "output", None)  # DOFAEmbedder's: grid, pooled, both
        kind = self.needs[0] if self.needs else None
        if isinstance(output, str) and kind is not None and output not in (kind, "both"):
            raise ValueError(
                f"{type(self).__name__} writes {kind} embeddings but the model's output is "
                f"{output!r}: set the model's output to 'both' (or {kind!r}; "
                "model.init_args.output in a config), or remove the writer"
            )

    def _module_tags(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The output's tags from the model: its ``metadata`` (variant, weights ...)."""
        return dict(getattr(pl_module, "metadata", {}))

    #: Output folders locked by this process's writers: the lock and how many writers use it
    #: (a job's grid and table usually share a folder; the last one done releases it).
    _folder_locks: ClassVar[dict[Path, tuple[OutputLock, int]]] = {}
    #: Output paths of this process's writers between setup and teardown.
    _claimed_paths: ClassVar[set[Path]] = set()
    #: Writers made inside :func:`lock_outputs_when_made` (None outside it).
    _locking_when_made: ClassVar[list[_PartsWriter] | None] = None

    def _claim_output(self, inputs: Sequence[str]) -> None:
        """Refuse an output path that cannot be this job's, lock its folder, drop stale temps.

        Checked before any chip is computed: the path must not be a folder, one of the
        job's input files, another writer's output or a result of a ``torchgeo-dofa embed``
        job (listed by the job manifest in its folder: replacing it would leave that job
        "done" with another job's file). The launching process then takes the
        output folder's lock (:class:`~torchgeo_dofa.locks.OutputLock`, the one
        ``torchgeo-dofa embed`` takes; an embed job already holds it), so two jobs writing
        the same outputs at once fail at once instead of mixing their chips; holding it, the
        temporary files of an assembly that was killed are removed.

        Args:
            inputs: the job's input files, resolved.

        Raises:
            OutputPathError: for a folder, an input file, another writer's output, an
                embed job's result, or a folder that cannot be made or written.
            JobLockedError: when another job holds the folder's lock (exit status 75).
        """
        path, resolved = self.path, self.path.resolve()
        refuse_undecodable_name(resolved, "output", OutputPathError)
        self._refuse_folder_path()
        if is_input_file(path, set(inputs)):
            raise OutputPathError(
                f"output {path} is one of the job's inputs: write to another path"
            )
        self._refuse_path_taken(self._claimed_paths)
        folder = path.parent.resolve()  # where the file is written (a symlink is replaced)
        # the launcher checks (a DDP worker's OutputLock is a no-op: embed's own manifest
        # would look like another job's); inside embed, its manifest lists this very output
        inside_embed = folder in OutputLock._held and folder not in self._folder_locks
        if is_launcher() and not inside_embed:
            manifest = embed_manifest_listing(folder, path.name)
            if manifest is not None:
                raise OutputPathError(
                    f"output {path} is a result of the torchgeo-dofa embed job recorded in "
                    f"{manifest}: write to another path (or delete that job's outputs and "
                    "manifest first)"
                )
        self._claimed_paths.add(resolved)
        self._claimed = resolved
        if not is_launcher():  # a DDP worker: the launching process holds the lock
            die_with_launcher()  # and a worker must not write on once the lock is gone
            return
        self._take_folder_lock()
        for tmp in stale_temps(path):  # the lock is held: no running job's temporaries
            tmp.unlink(missing_ok=True)

    def _refuse_path_taken(self, taken: Collection[Path]) -> None:
        """Raise :class:`OutputPathError` when the output path is among other writers' paths."""
        if self.path.resolve() in taken:
            raise OutputPathError(
                f"output {self.path} is also another writer's output: give each writer its own path"
            )

    def _refuse_folder_path(self) -> None:
        """Raise :class:`OutputPathError` when the output path is a folder."""
        if self.path.is_dir():
            raise OutputPathError(f"output {self.path} is a folder: give the writer a file path")

    def _take_folder_lock(self) -> None:
        """Take the output folder's lock, or share it with this job's other writers there.

        In the launching process only (a DDP worker does nothing), and not when this writer
        holds it already or an embed job of this process holds it for its whole run.

        Raises:
            OutputPathError: for a folder that cannot be made or written.
            JobLockedError: when another job holds the folder's lock (exit status 75).
        """
        if self._lock is not None or not is_launcher():
            return
        folder = self.path.parent.resolve()
        if folder in self._folder_locks:  # another writer of this job took it
            lock, users = self._folder_locks[folder]
            self._folder_locks[folder] = (lock, users + 1)
            self._lock = lock
        elif folder not in OutputLock._held:  # else an embed job holds it for its whole run
            lock = OutputLock(folder, fix="write to another path")
            # recorded first: a Ctrl-C the instant it is taken is given back by
            # _release_output (on_exception) as the lock is
            self._folder_locks[folder] = (lock, 1)
            self._lock = lock
            try:
                lock.acquire()  # OutputPathError for a folder that cannot be made or locked
            except BaseException:
                if not lock.held:  # refused: not this job's to share or give back
                    self._folder_locks.pop(folder, None)
                    self._lock = None
                raise

    def _release_output(self) -> None:
        """Give up this writer's output path and its share of the folder's lock (idempotent).

        The last writer to let the lock go deletes the lock file, and the folders taking it
        created, when the job added nothing else there (refused or failed before its first
        part), as ``torchgeo-dofa embed`` does. A writer made inside
        :func:`lock_outputs_when_made` keeps its share of the lock until that block ends:
        ``predict --config`` removes the files its run made besides (LightningCLI's
        ``config.yaml``, in the output folder where the trainer's folder is that one) first.
        """
        if self._claimed is not None:
            self._claimed_paths.discard(self._claimed)
            self._claimed = None
        if not is_launcher():
            die_with_launcher(enable=False)  # the job is over: its workers may go on
        made = _PartsWriter._locking_when_made
        if self._lock is None or (made is not None and self in made):
            return  # (released as the block ends: lock_outputs_when_made)
        folder = self._lock.folder.resolve()
        lock, users = self._folder_locks.pop(folder, (self._lock, 1))
        self._lock = None
        if users > 1:
            self._folder_locks[folder] = (lock, users - 1)
            return
        lock.release(remove=lock.unchanged())  # with the folders it created, left empty

    def check_parts_identity(self, trainer: pl.Trainer, extra: Mapping[str, str]) -> None:
        """Refuse parts of another job (called at setup, before anything is written).

        The identity (:data:`PARTS_IDENTITY` in the parts folder, written with this job's
        first parts): the model's tags (variant, pooled norm, input preparation, bands,
        wavelengths), the precision, a CRC-32 of the module's parameters (another checkpoint,
        a fine-tuned one or another random draw differs; a renamed copy of the same checkpoint
        does not), the data module's ``job_identity()`` (sources with size and modification
        time, dataset arguments, preprocessing, chip size, stride, region, points), a CRC-32
        of the chip list and ``extra`` (the output grid or CRS). Settings recorded on one side
        only (another package version) are not compared; parts without an identity (an older
        version) are taken as this job's, and an identity without parts is replaced.
        ``torchgeo-dofa embed`` checks its job manifest first, so this guards the other doors
        (``predict --config``, a Python ``Trainer``), where a rerun with other settings would
        otherwise mix both jobs' chips.

        Args:
            trainer: the trainer.
            extra: further settings the writer's output depends on.

        Raises:
            PartsMismatchError: naming the first setting that differs and the fix.
        """
        self._job |= dict(extra)
        path = self.parts / PARTS_IDENTITY
        if not path.is_file() or not self.done_keys():
            return
        try:
            stored = json.loads(path.read_text())
            if not isinstance(stored, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            raise PartsMismatchError(
                f"{path} is unreadable ({err}): if the chips in {self.parts.name} are this "
                "job's, delete that file to keep them; else delete the folder to start afresh"
            ) from None
        for key in identity_differences(stored, self._job)[:1]:
            raise PartsMismatchError(
                f"{self.parts} holds the chips of another job "
                f"({describe_change(key, stored_setting(stored, key), self._job[key], 80)}): "
                "delete it (and "
                "the .parts folders of the job's other outputs beside it) to start afresh, "
                "or write to another path"
            )

    def _write_identity(self, trainer: pl.Trainer) -> None:
        """Record the job's identity beside its first parts (rank 0, once per run)."""
        if self._identity_written or not self._job:  # recorded, or never set up
            return
        self._identity_written = True
        if trainer.is_global_zero:
            text = json.dumps(self._job, indent=1)
            atomic_write(
                self.parts / PARTS_IDENTITY, lambda tmp: tmp.write_text(text), hint=self._hint()
            )

    def _make_parts(self) -> None:
        """Create the parts folder and its parents (every rank, before its first part)."""
        if not self._parts_made:
            try:
                self.parts.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise OutputWriteError(
                    f"could not write {self.parts}: {_describe(err, self.parts.parent)}",
                    _errno_in(err),
                ) from err
            self._parts_made = True

    def is_done(self, chip: Sequence[slice]) -> bool:  # pragma: no cover - abstract
        """Whether an earlier run already wrote this chip."""
        raise NotImplementedError

    def part_key(self, prediction: Mapping[str, Any], i: int) -> str:  # pragma: no cover
        """Part-file key of chip ``i`` of a prediction."""
        raise NotImplementedError

    @staticmethod
    def read_part(path: Path) -> Any:  # pragma: no cover - abstract
        """Read one part file (raising for a damaged one, see :func:`_read_parts`)."""
        raise NotImplementedError

    def _resume_keys(self) -> set[str]:
        """The chips an earlier run wrote, once every part it left has been read.

        A damaged part (a disk error, a power cut before it reached the disk) is removed
        with a warning, so this run computes its chip again: all outputs of a job are
        repaired by one rerun (assembly found them one output at a time). Every process of
        a DDP job reads them and so agrees on what is left to do; each warns of those it
        removed (the first to read a part removes it, whichever rank that is).
        """
        paths = sorted(self.parts.glob(f"*{self.suffix}")) if self.parts.is_dir() else []
        _read_parts(paths, self.read_part, warn=True)
        return self.done_keys()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the parts on disk against the weights, now final (before the first batch).

        ``Trainer.predict(ckpt_path=...)`` (``predict --ckpt_path``) loads the checkpoint's
        weights after the callbacks' setup: a CRC-32 taken there was of the weights the
        module was built with, so a rerun with another checkpoint took the first one's parts
        as its own and mixed both in one map, and the rerun of the same checkpoint into a
        module built with unseeded random weights was refused. Setup checks every other
        setting; the weights are checked here, after the restore.

        Raises:
            PartsMismatchError: when the parts on disk are of other weights.
        """
        self._check_weights(trainer, pl_module)

    def _check_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record the weights' CRC-32 in the job's identity and check the parts against it."""
        if not self._job:  # never set up
            return
        known = _RUN_DIGESTS.get(trainer)
        if known is None or known[0] != id(pl_module):
            known = _RUN_DIGESTS[trainer] = (id(pl_module), module_digest(pl_module))
        self._job["weights_crc32"] = known[1]
        self._weights_restored(trainer)
        self.check_parts_identity(trainer, {})

    def _weights_restored(self, trainer: pl.Trainer) -> None:
        """Update the tags once a checkpoint's weights were loaded (nothing here)."""

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Wait for every rank, then assemble the final file on rank 0."""
        self.flush()
        trainer.strategy.barrier("torchgeo_dofa_writer")
        self._whole_job = _sends_every_batch(trainer)
        if trainer.is_global_zero:
            self.finalize()
        trainer.strategy.barrier("torchgeo_dofa_writer_done")
        self._assembled = True

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
        """Save every non-empty chip of a batch as its own part file (in the background).

        Raises:
            TypeError: when the prediction is not a dict (the model is not an embedder,
                e.g. a fine-tuning task, whose predictions are class scores).
            KeyError: when the prediction lacks a key this writer needs (:attr:`needs`),
                naming it and where it comes from, before anything of the batch is written.
        """
        if not isinstance(prediction, Mapping):
            raise TypeError(
                f"{type(self).__name__} writes the embeddings DOFAEmbedder.predict_step returns "
                f"(a dict holding {list(self.needs)}, ...), but "
                f"{type(pl_module).__name__}.predict_step returned a "
                f"{type(prediction).__name__}: predict with DOFAEmbedder (a fine-tuned task's "
                "encoder: DOFAEmbedder(weights='task.ckpt')), or write a fine-tuning "
                "task's predictions with SegmentationWriter or ClassificationWriter"
            )
        missing = [k for k in self.needs if k not in prediction]
        if missing:
            raise KeyError(
                f"{type(self).__name__} needs {missing} in each prediction, which "
                "DOFAEmbedder.predict_step passes on from a batch preprocessed by "
                "DOFAPreprocess: give the data module preprocess=True (or "
                "transforms=DOFAPreprocess(...))"
            )
        while self._pending and self._pending[0].done():  # surface a failed write early
            self._pending.popleft().result()
        flags = prediction.get("empty")
        n = len(prediction["grid" if "grid" in prediction else "pooled"])
        empty = [i for i in range(n) if flags is not None and bool(flags[i])]
        chips = [i for i in range(n) if i not in empty]
        self.empty += len(empty)
        if not n:
            return
        self._make_parts()
        if trainer is not None:
            self._write_identity(trainer)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.write_threads, thread_name_prefix="dofa-parts")
        self._pending.append(self._pool.submit(self._write_chips, prediction, chips, empty))
        self.written += len(chips)
        while len(self._pending) > self.max_pending_batches:
            start = time.perf_counter()
            self._pending.popleft().result()
            self.waited_s += time.perf_counter() - start

    def write_chip(self, prediction: Mapping[str, Any], i: int) -> None:  # pragma: no cover
        """Save chip ``i`` of a prediction as a part file."""
        raise NotImplementedError

    def finalize(self) -> None:  # pragma: no cover - abstract
        """Assemble the parts into the final output."""
        raise NotImplementedError

    def _hint(self) -> str:
        return (
            f"; the chips already computed are kept in {self.parts}: fix the cause (e.g. free "
            "disk space) and rerun the same command to finish"
        )


@contextlib.contextmanager
def lock_outputs_when_made() -> Iterator[None]:
    """Writers made inside take their output folder's lock when made, not at setup.

    For ``torchgeo-dofa predict --config``: jsonargparse makes the trainer's callbacks
    before the model and the data module, so a job whose output folder another job holds
    is refused (:class:`~torchgeo_dofa.jobs.JobLockedError`, exit status 75) before the
    checkpoint loads, as ``embed`` refuses it, instead of after the model build (seconds
    to tens of seconds). An output path that is a folder or another writer's is refused
    then too. The writers made inside hold their locks until the block ends (their
    teardown and ``on_exception`` give up their output paths only), so a run refused late
    can first remove what else it made in the folder (LightningCLI's ``config.yaml``);
    leaving the block then releases the locks, removing the lock file and the folders
    taking it created where nothing else was written.

    Yields:
        Nothing; writers made outside the block take the lock at setup, as before.
    """
    made: list[_PartsWriter] = []
    outer, _PartsWriter._locking_when_made = _PartsWriter._locking_when_made, made
    try:
        yield
    finally:
        _PartsWriter._locking_when_made = outer
        with signals_deferred():  # a second Ctrl-C here left the later writers' locks
            for writer in reversed(made):
                writer._release_output()


def identity_differences(stored: Mapping[str, str], now: Mapping[str, str]) -> list[str]:
    """The settings in which a job's identity differs from a stored one, in ``now``'s order.

    A setting recorded on one side only (another package version) is no evidence of another
    job and is not compared, except those of :data:`IDENTITY_DEFAULTS`, which an identity
    without them had at their default. Dataset arguments as given (``data.nodata``,
    ``data.crs`` ...) whose effect the reading identity records as read (``nodata``,
    ``crs``, ``band_indexes`` ...;
    :meth:`~torchgeo_dofa.datasets.Sentinel2Base.reading_identity`) are compared only when
    one side lacks that record (an identity written before it existed): then the spelling is
    all there is to compare, and ``nodata=0`` for a file declaring 0 is refused as the
    earlier version refused it, rather than a changed nodata being taken as the same.

    Args:
        stored: the identity recorded beside the parts (or in a manifest).
        now: this job's identity.

    Returns:
        The keys of ``now`` whose values differ.
    """
    from .datasets import Sentinel2Base

    as_read = "band_indexes" in stored and "band_indexes" in now
    covered = {f"data.{k}" for k in Sentinel2Base.reading_arguments} if as_read else set()
    return [
        key
        for key, value in now.items()
        if (key in stored or key in IDENTITY_DEFAULTS)
        and key not in covered
        and not _same_setting(key, stored_setting(stored, key), value)
    ]


#: Identity settings that hold a CRS: compared as CRSs, not as text (an ESRI and a GDAL WKT,
#: or a PROJ string and the WKT a file declares, are one CRS).
_CRS_SETTINGS = frozenset({"crs", "grid_crs", "data.crs"})


def _crs_text(value: Any) -> Any:
    if value in ("", "None", None):
        return "none"
    try:
        return crs_label(value) if isinstance(value, str) else value
    except pyproj.exceptions.CRSError:
        return value


def _same_setting(key: str, stored: str, now: str) -> bool:
    return same_crs(stored, now) if key in _CRS_SETTINGS else stored == now


def stored_setting(stored: Mapping[str, str], key: str) -> str:
    """A setting of a stored identity, or its :data:`IDENTITY_DEFAULTS` value if absent.

    Args:
        stored: the identity recorded earlier.
        key: a key :func:`identity_differences` returned.

    Returns:
        The stored value.
    """
    return stored.get(key, IDENTITY_DEFAULTS.get(key, "absent"))


#: Identity settings added after jobs were first recorded, with the value every job recorded
#: without them had (DOFA's own statistics: ``mean`` / ``std`` of
#: :class:`~torchgeo_dofa.datamodules.DOFAPredictDataModule` were not settable before).
#: ``patch_embedding``: how a mixed-precision job computed the patch embedding; parts of a
#: bf16 job written before it ran in fp32 under autocast are other numbers (pooled cosine
#: 0.997 against 0.99999 to fp32 on the tests' weights), not resumed into one output.
IDENTITY_DEFAULTS: dict[str, str] = {"mean": "None", "std": "None", "patch_embedding": "autocast"}


def file_ids(paths: Iterable[str | os.PathLike[str]]) -> set[tuple[int, int]]:
    """``(st_dev, st_ino)`` of each readable path: what identifies a file across hard links."""
    ids = set()
    for item in paths:
        try:
            st = os.stat(item)
        except OSError:
            continue
        ids.add((st.st_dev, st.st_ino))
    return ids


def is_input_file(
    path: Path, inputs: Collection[str], ids: set[tuple[int, int]] | None = None
) -> bool:
    """Whether ``path`` is one of the inputs: the same path resolved, or the same file.

    Args:
        path: an output path.
        inputs: the job's input files, resolved, as strings.
        ids: their :func:`file_ids`, when already known (else taken here if needed: only
            for an output that exists).

    Returns:
        True for an input's path (through any symlink) or a hard link to an input.
    """
    if str(path.resolve()) in inputs:
        return True
    if not path.is_file():
        return False
    st = path.stat()
    return (st.st_dev, st.st_ino) in (file_ids(inputs) if ids is None else ids)


def embed_manifest_listing(folder: Path, name: str, skip: str = "") -> Path | None:
    """The embed job manifest in ``folder`` that lists the output ``name``, if any.

    A folder job's manifest (``.torchgeo-dofa-job.json``) and that of a job writing named
    files (``.NAME.tif.torchgeo-dofa-job.json``, which also lists the sibling
    ``NAME.parquet``) list their outputs. An unreadable manifest counts as listing it (the
    embed job refuses such a folder too).

    Args:
        folder: the output folder.
        name: the output's file name.
        skip: a manifest's file name not to look at (the asking job's own).

    Returns:
        The manifest's path, or None.
    """
    from .jobs import MANIFEST_NAME

    for manifest in sorted(folder.glob(f"*{MANIFEST_NAME}")):
        if manifest.name == skip:
            continue
        try:
            outputs = json.loads(manifest.read_text()).get("outputs", [])
        except (OSError, ValueError, AttributeError):
            return manifest
        if not isinstance(outputs, list) or name in outputs:  # a string: damaged, or edited
            return manifest
    return None


class GridWriter(_PartsWriter):
    """Write grid embeddings as one georeferenced GeoTIFF for a region.

    Each chip's (D, h, w) grid is placed by its ``grid_transform``; where chips overlap the
    average is written (deterministic: the order of chips does not matter); cells no chip
    covered, or that were entirely no-data, are NaN (the declared nodata). The map is
    assembled in windows of ``window`` x ``window`` cells, so memory stays bounded.
    """

    needs = ("grid", "grid_transform")
    file_format, file_suffixes = "GeoTIFF", GRID_SUFFIXES

    def __init__(
        self,
        path: str | os.PathLike[str],
        geometry: GridGeometry | None = None,
        metadata: Mapping[str, Any] | None = None,
        window: int = 128,
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
                multiple of 16), so every block is compressed and written exactly once; a
                grid side shorter than that gets blocks just covering it (rounded up to 16).
                128 (a 50 MB float32 window for base's 768 bands): GDAL's cost per block
                dominates small blocks; a 224 x 224-cell grid was written in 2.8 s with 64,
                0.7 s with 128 (``benchmarks/run.py`` machine, zstd, one thread).

        Raises:
            ValueError: for a ``path`` not ending in ``.tif`` / ``.tiff``, or a ``window``
                that is not a positive multiple of 16.
        """
        super().__init__(path, metadata)
        if window <= 0 or window % 16:
            raise ValueError(f"window must be a positive multiple of 16, got {window}")
        self._geometry = self._given_geometry = geometry
        self.window = window

    @property
    def geometry(self) -> GridGeometry:
        """The output grid."""
        if self._geometry is None:
            raise RuntimeError("GridWriter has no geometry yet: it is derived at setup")
        return self._geometry

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Gather the job's identity; derive the geometry from the datamodule if not given.

        A derived geometry is derived again at every setup, so a writer reused for another
        datamodule (another scene) places its chips on that scene's grid.

        Raises:
            ValueError: for a grid above :data:`~torchgeo_dofa.jobs.SPARSE_GRID_BYTES`
                uncompressed that its chips cover less than
                :data:`~torchgeo_dofa.jobs.SPARSE_GRID_COVER` of (rasters far apart in one
                data module), and as :meth:`_PartsWriter.setup`.
        """
        super().setup(trainer, pl_module, stage)
        dm = getattr(trainer, "datamodule", None)
        self._geometry = self._given_geometry
        if self._geometry is None:
            self._geometry = self._derived_geometry(dm)
        geom = self.geometry
        self._refuse_a_sparse_grid(getattr(dm, "predict_sampler", None), pl_module)
        self.check_parts_identity(
            trainer,
            {
                "grid_crs": geom.crs.to_wkt(),
                "grid_transform": json.dumps(list(geom.transform)[:6]),
                "grid_shape": f"{geom.height} x {geom.width}",
            },
        )
        sampler = getattr(dm, "predict_sampler", None)
        self.chip_keys = None if sampler is None else [self.key_for_chip(c) for c in sampler]
        self._done = self._resume_keys()

    def _derived_geometry(self, dm: Any) -> GridGeometry:
        """The embedding map's grid from a data module (``GridWriter(geometry=None)``).

        Its ``grid_geometry()`` where it has one (:class:`DOFAPredictDataModule`), else the
        chips of its ``predict_sampler`` at 16 input pixels a cell (for 224-px chips).

        Raises:
            ValueError: for a data module without ``predict_dataset`` / ``predict_sampler``
                (:func:`_not_on_a_map`).
        """
        grid_geometry = getattr(dm, "grid_geometry", None)
        if callable(grid_geometry):
            return cast(GridGeometry, grid_geometry())
        dataset = getattr(dm, "predict_dataset", None)
        sampler = getattr(dm, "predict_sampler", None)
        if dataset is None or sampler is None or getattr(dataset, "crs", None) is None:
            raise _not_on_a_map(self, dm)
        crs = CRS.from_user_input(dataset.crs.to_wkt())
        patch_px = float(getattr(dm, "patch_size", 224)) / 224 * 16
        return GridGeometry.for_chips(
            crs, list(sampler), tuple(float(r) for r in dataset.res), patch_px
        )

    def _bands_of(self, pl_module: pl.LightningModule) -> int | None:
        """Bands of the map before assembly (the embedding width), None where unknown."""
        depth = getattr(getattr(pl_module, "encoder", None), "embed_dim", None)
        return depth if isinstance(depth, int) else None

    def _refuse_a_sparse_grid(self, sampler: Any, pl_module: pl.LightningModule) -> None:
        """Refuse a huge grid its chips barely cover, before any chip is computed.

        Raises:
            ValueError: see :func:`torchgeo_dofa.jobs.sparse_grid_problem` (rasters far
                apart in one data module).
        """
        from .jobs import sparse_grid_problem

        depth = self._bands_of(pl_module)
        if sampler is None or not isinstance(depth, int):
            return
        geom = self.geometry
        cells = [
            (c[0].stop - c[0].start) / geom.cell * (c[1].stop - c[1].start) / geom.cell_height
            for c in sampler
        ]
        problem = sparse_grid_problem(
            self.path.name,
            geom.width,
            geom.height,
            depth,
            len(cells),
            sum(cells) / max(len(cells), 1),
            fix="Embed them with a data module each (a grid each), narrow it with roi=, or "
            "write pooled embeddings only (PooledWriter, model output 'pooled')",
        )
        if problem:
            raise ValueError(problem)

    def is_done(self, chip: Sequence[slice]) -> bool:
        """Whether an earlier run already wrote this chip (``(x, y, ...)`` slices).

        Args:
            chip: the chip's slices in map units.

        Returns:
            True when its part file exists.
        """
        return self.key_for_chip(chip) in self._done

    def key_for_chip(self, chip: Sequence[slice]) -> str:
        """Part-file key of a sampler's chip ``(x, y, ...)`` (slices in map units)."""
        cell, cell_y = self.geometry.cell, self.geometry.cell_height
        return self.chip_key([cell, 0.0, float(chip[0].start), 0.0, -cell_y, float(chip[1].stop)])

    def part_key(self, prediction: Mapping[str, Any], i: int) -> str:
        """Part-file key of chip ``i`` of a prediction (from its ``grid_transform``)."""
        return self.chip_key(prediction["grid_transform"][i].double().cpu().numpy())

    @staticmethod
    def key_for(geometry: GridGeometry, grid_transform: Sequence[float]) -> str:
        """Part-file key of a chip placed on ``geometry``: its top-left cell."""
        row, col = geometry.place(grid_transform)
        return f"r{row}_c{col}"

    def chip_key(self, grid_transform: Sequence[float]) -> str:
        """Part-file key of a chip: its top-left cell."""
        return self.key_for(self.geometry, grid_transform)

    @staticmethod
    def read_part(path: Path) -> tuple[int, ...]:
        """A grid part's shape ``(D, h, w)``, from its header (the data is mapped, not read)."""
        return tuple(np.load(path, mmap_mode="r").shape)

    def write_chip(self, prediction: Mapping[str, Any], i: int) -> None:
        """Save chip ``i``'s grid as a part file keyed by its top-left cell."""
        grid = prediction["grid"][i].float().cpu().numpy()
        key = self.part_key(prediction, i)

        def save(path: Path) -> None:
            with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a name
                np.save(f, grid, allow_pickle=False)

        atomic_write(self.parts / f"{key}.npy", save)

    def _chips(self) -> Iterator[tuple[int, int, Path]]:
        for p in sorted(self.parts.glob("*.npy")):
            r, c = p.stem.split("_")
            yield int(r[1:]), int(c[1:]), p

    def _layout(self, depth: int) -> tuple[int, str, float, tuple[str, ...]]:
        """The GeoTIFF's band count, data type, nodata and band descriptions.

        Args:
            depth: values per cell in the parts (the embedding width).

        Returns:
            ``depth`` float32 bands ``dofa_0000`` ... with NaN as nodata.
        """
        return depth, "float32", float("nan"), tuple(f"dofa_{w:04d}" for w in range(depth))

    def _window_values(self, window: np.ndarray) -> np.ndarray:
        """What is written for an assembled (depth, h, w) float32 window: itself here."""
        return window

    def _decorate(self, dst: Any, depth: int) -> None:
        """Add to the GeoTIFF being written (open in rasterio) what its bands need: nothing."""

    def _overviews(self, dst: Any) -> None:
        """Add overviews to the GeoTIFF once its pixels are written: none for a grid.

        A grid has a cell per 16 x 16 input pixels (a Sentinel-2 tile's: 687 x 687 cells),
        small enough to draw whole; its D bands would make overviews cost seconds.
        """

    def finalize(self) -> None:
        """Assemble the chip parts into the final GeoTIFF, window by window, verified.

        The GeoTIFF is written to a temporary file, flushed, and read back block by block:
        every window must decode to exactly the bytes written (a CRC-32 per window, so
        memory stays bounded; read back in two threads), and the shape, CRS, transform, data
        type and tags must be as written. Only then is it renamed onto :attr:`path` and the
        parts deleted.

        A region where no chip held a valid pixel has no part: with the embedding width known
        (``embed_dim`` in the metadata, as :class:`~torchgeo_dofa.embedder.DOFAEmbedder`
        records it) an all-NaN grid is written with a warning.

        Raises:
            OutputWriteError: if the file cannot be written or read back (the parts are
                kept; rerun the job to finish).
            RuntimeError: if there is no part and the embedding width is unknown.
        """
        self.flush()
        self.check_every_chip_has_a_part()
        geom = self.geometry
        chips = list(self._chips())
        sizes = _read_parts([p for _, _, p in chips], self.read_part)
        if chips:
            depth = int(next(iter(sizes.values()))[0])
        elif self.depth_tag in self.metadata:
            depth = int(self.metadata[self.depth_tag])
            _warnings.warn(
                f"no chip of {self.path.name} held a valid pixel: writing an all-NaN grid"
            )
        else:
            raise RuntimeError(f"no chip was written for {self.path}: nothing to assemble")
        # a grid smaller than the window gets blocks just covering it (GeoTIFF blocks are
        # multiples of 16): a 14 x 14-cell grid in one 128 x 128 block was 50 MB of padding
        # to compress and decode back for DOFA base (finalize 0.15 s; 0.05 s in 16 x 16)
        block_h, block_w = (
            min(self.window, -(-side // 16) * 16) for side in (geom.height, geom.width)
        )
        count, dtype, nodata, descriptions = self._layout(depth)
        profile = {
            "driver": "GTiff",
            "dtype": dtype,
            "count": count,
            "width": geom.width,
            "height": geom.height,
            "crs": geom.crs,
            "transform": geom.transform,
            "nodata": nodata,
            "tiled": True,
            "blockxsize": block_w,
            "blockysize": block_h,
            "compress": "zstd",
            "zstd_level": 1,
            "predictor": 3 if dtype == "float32" else 2,
            "interleave": "band",
            "BIGTIFF": "IF_SAFER",
            # no NUM_THREADS: with 64-cell blocks GDAL's threaded compression (ALL_CPUS) wrote
            # 2-3x slower on 2 cores; with these 128-cell blocks NUM_THREADS=2 finalized 256
            # chips in 1.15-1.26 s against 1.19-1.24 s without (three interleaved jobs, AMX
            # CPU): the assembly thread already overlaps the single-threaded compression
        }
        tags = {k: _tag(v) for k, v in self.metadata.items()}
        imagery = _imagery_tags(self.metadata)
        wins = list(_windows(geom.height, geom.width, block_h, block_w))  # the file's blocks
        digests: list[bytes] = []

        def write(tmp: Path) -> None:
            digests.clear()
            with rasterio.open(tmp, "w", **profile) as dst:
                for w, name in enumerate(descriptions):
                    dst.set_band_description(w + 1, name)
                dst.update_tags(**tags)
                if imagery:
                    dst.update_tags(ns="IMAGERY", **imagery)
                self._decorate(dst, depth)
                # the next window is assembled (numpy) while GDAL compresses this one; both
                # release the GIL, so assembly mostly overlaps the write
                with ThreadPoolExecutor(1, thread_name_prefix="assemble") as pool:
                    ahead = pool.submit(_assemble_window, wins[0], chips, sizes, depth)
                    for i, win in enumerate(wins):
                        out32 = self._window_values(ahead.result())
                        if i + 1 < len(wins):
                            nxt = wins[i + 1]
                            ahead = pool.submit(_assemble_window, nxt, chips, sizes, depth)
                        digests.append(_digest(out32))
                        dst.write(out32, window=win)
                        del out32
                self._overviews(dst)

        def verify(tmp: Path) -> None:
            with rasterio.open(tmp) as src:
                got = (src.count, src.height, src.width, src.dtypes[0], src.crs, src.transform)
                want = (count, geom.height, geom.width, dtype, geom.crs, geom.transform)
                if got != want:
                    raise ValueError(
                        f"read back (count, height, width, dtype, crs, transform) "
                        f"{got}, wrote {want}"
                    )
                if (
                    src.descriptions != descriptions
                    or any(src.tags().get(k) != v for k, v in tags.items())
                    or any(src.tags(ns="IMAGERY").get(k) != v for k, v in imagery.items())
                ):
                    raise ValueError("read back other band descriptions or tags than written")
                if len(wins) != len(digests):
                    raise ValueError(f"wrote {len(digests)} windows, expected {len(wins)}")
            pairs = list(zip(wins, digests, strict=True))
            threads = max(1, min(2, os.cpu_count() or 1, len(pairs)))

            def check(share: list[tuple[Window, bytes]]) -> None:
                with rasterio.open(tmp) as own:  # one dataset per thread (GDAL's rule)
                    for win, digest in share:
                        if _digest(own.read(window=win)) != digest:
                            raise ValueError(f"window {win} reads back other values than written")

            # decoding releases the GIL: two threads read back in about half the time
            # (nothing else runs after the last batch)
            with ThreadPoolExecutor(threads, thread_name_prefix="verify") as pool:
                for done in [pool.submit(check, pairs[i::threads]) for i in range(threads)]:
                    done.result()

        self.path.parent.mkdir(parents=True, exist_ok=True)  # no part made it (all chips empty)
        with _native_stderr_kept_on_success():
            atomic_write(self.path, write, verify=verify, durable=True, hint=self._hint())
        shutil.rmtree(self.parts, ignore_errors=True)


def point_properties(points: Sequence[Any]) -> pd.DataFrame:
    """The ``properties`` of a pooled table of a data module's ``points=``.

    ``point_index`` (0, 1, ... in the given order) and, for each
    :class:`~torchgeo_dofa.spatial.PointBuffer`, its ``lon`` / ``lat`` (NaN for a box or a
    geometry), as ``embed --points`` writes them.

    Args:
        points: the regions, in order.

    Returns:
        One row per region.
    """
    return pd.DataFrame(
        {
            "point_index": np.arange(len(points), dtype=np.int64),
            "lon": [float(getattr(p, "lon", math.nan)) for p in points],
            "lat": [float(getattr(p, "lat", math.nan)) for p in points],
        }
    )


class PooledWriter(_PartsWriter):
    """Write pooled embeddings as a GeoParquet table, one row per chip.

    Columns: ``geometry`` (chip footprint in the region's CRS), ``chip_id``, ``source``,
    ``time_start``/``time_end`` (UTC: the chip's time span as the sampler queried it: the
    acquisition span of the scenes it reads with this package's samplers; NaT where
    open-ended, e.g. a file name without a date), ``embedding`` (list of float32),
    ``variant``, ``weights``, ``pooled_norm``, ``no_data`` (True for a chip without any valid
    pixel: NaN embedding; not named ``empty``, which pandas reserves), ``valid_fraction``
    (float32, the share of the chip's pixels that are valid, from the batch's
    ``valid_fraction``; NaN where the batch has none): the pooled vector averages every
    patch, so a chip mostly outside the rasters describes mostly fill; with ``properties`` (points),
    also ``point_index`` and every input property.
    The table's CRS is the region's.

    Rows: without ``chip_keys``, one per chip that was written, north-west first. With
    ``chip_keys`` (every chip the job sends, e.g. ``[PooledWriter.key_for_chip(c) for c in
    sampler]``; taken from the trainer's datamodule's ``predict_sampler`` at setup when not
    given), exactly one row per entry, chips that held no valid pixel included (flagged
    ``no_data``). With ``properties`` as well, row ``k`` of ``properties`` describes the chip
    ``chip_keys[k]``; its columns are joined into that row and rows keep the points' input
    order (``point_index``). Two points with the same footprint share one part and get
    the same embedding.
    """

    suffix = ".json"
    #: Suffix of a batch's part: one JSON line per chip of the batch (a row, or
    #: ``{"chip_id": ..., "no_data": true}`` for a chip without any valid pixel), written in
    #: one step. Rows are 10-20 us of Python each; a file each (``.json`` / ``.empty`` parts,
    #: still read) cost ~0.45 ms a chip and held a GPU job to ~1,300 chips/s.
    batch_suffix = ".jsonl"
    needs = ("pooled", "bounds")
    file_format, file_suffixes = "GeoParquet", TABLE_SUFFIXES

    def __init__(
        self,
        path: str | os.PathLike[str],
        crs: CRS | None = None,
        metadata: Mapping[str, Any] | None = None,
        source: str = "",
        chip_keys: Sequence[str] | None = None,
        properties: pd.DataFrame | None = None,
    ) -> None:
        """Create a pooled writer.

        Args:
            path: output ``.parquet`` file.
            crs: CRS of the chips' coordinates; None takes the datamodule's
                ``predict_dataset`` CRS at setup.
            metadata: values stored in every row (``variant``, ``weights``, ``pooled_norm``)
                and in the file's metadata.
            source: name of the input (file or region) stored in every row; empty takes
                the datamodule's ``region_name`` at setup.
            chip_keys: the key (:meth:`chip_key`) of every chip of the job, in order.
            properties: one row per ``chip_keys`` entry with a ``point_index`` column (as
                :func:`torchgeo_dofa.spatial.read_points` returns, restricted to the points
                of this region); a property whose name is one of the table's own columns is
                stored as ``input_<name>``.

        Raises:
            ValueError: for a ``path`` not ending in ``.parquet`` / ``.geoparquet``; if
                ``properties`` is given without ``chip_keys``, with another number of rows,
                or without a unique integer ``point_index``.
        """
        super().__init__(path, metadata)
        self.crs = crs
        self.source = source
        self.chip_keys = self._given_keys = list(chip_keys) if chip_keys is not None else None
        #: chip key -> (start, stop) seconds, for the rows of chips without valid pixels
        self._chip_times: dict[str, tuple[float, float]] = {}
        #: batch part name -> the keys of its chips (those read at setup and written since)
        self._batch_keys: dict[str, list[str]] = {}
        if properties is not None:
            if self.chip_keys is None or len(properties) != len(self.chip_keys):
                raise ValueError(
                    "PooledWriter(properties=...) needs chip_keys with one key per properties "
                    f"row ({len(properties)} rows, "
                    f"{'no' if self.chip_keys is None else len(self.chip_keys)} keys)"
                )
            index = properties.get("point_index")
            if index is None or not pd.api.types.is_integer_dtype(index) or not index.is_unique:
                raise ValueError(
                    "PooledWriter(properties=...) needs a unique integer 'point_index' column "
                    "(as torchgeo_dofa.spatial.read_points returns)"
                )
            properties = properties.reset_index(drop=True)
        self.properties = self._given_properties = properties

    @staticmethod
    def key_for_chip(chip: Sequence[slice]) -> str:
        """Part-file key of a sampler's chip ``(x, y, ...)`` (slices in map units)."""
        x, y = chip[0], chip[1]
        return PooledWriter.chip_key([x.start, x.stop, 0.0, y.start, y.stop])

    @staticmethod
    def bounds_of_key(key: str) -> tuple[float, float, float, float]:
        """The footprint ``(xmin, ymin, xmax, ymax)`` a :meth:`chip_key` encodes."""
        xmin, ymin, xmax, ymax = (float(v.replace("m", "-")) for v in key.split("_"))
        return xmin, ymin, xmax, ymax

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Create the parts folder; take the CRS from the datamodule if needed."""
        super().setup(trainer, pl_module, stage)
        if self.crs is None:
            dataset = getattr(getattr(trainer, "datamodule", None), "predict_dataset", None)
            if dataset is None or getattr(dataset, "crs", None) is None:
                raise _not_on_a_map(self, getattr(trainer, "datamodule", None))
            self.crs = CRS.from_user_input(dataset.crs.to_wkt())
        dm = getattr(trainer, "datamodule", None)
        if not self.source:
            self.source = str(getattr(dm, "region_name", ""))
        sampler = getattr(dm, "predict_sampler", None)
        # every chip of the job gets a row, chips without any valid pixel flagged no_data
        # (with the chip's time span, as the dataset gives a chip's ``bounds``); taken again
        # at every setup (a writer reused for another scene takes its chips)
        chips = list(sampler) if sampler is not None else []
        keys = [self.key_for_chip(c) for c in chips]  # one per chip, repeats kept
        # a chip without a time slice (a point's) is read over the dataset's whole time
        # span, as TorchGeo's GeoDataset fills a missing slice from its bounds
        dataset = getattr(dm, "predict_dataset", None)
        bounds = getattr(dataset, "bounds", None)
        whole = bounds[2] if isinstance(bounds, tuple) and len(bounds) > 2 else None
        self._chip_times = {k: _time_span(c, whole) for k, c in zip(keys, chips, strict=True)}
        self.chip_keys = self._given_keys
        self.properties = self._given_properties
        if self.chip_keys is None and sampler is not None:
            self.chip_keys = keys
            points = getattr(dm, "points", None) if getattr(dm, "mode", "") == "points" else None
            if self.properties is None and points is not None and len(points) == len(keys):
                # a data module's points= (predict --config): rows in the points' order,
                # numbered as embed --points numbers them (they came north-west first)
                self.properties = point_properties(points)
        self.check_parts_identity(trainer, {"crs": self.crs.to_wkt(), "source": self.source})
        self._done = self._resume_keys()

    def is_done(self, chip: Sequence[slice]) -> bool:
        """Whether an earlier run already wrote this chip (``(x, y, ...)`` slices).

        Args:
            chip: the chip's slices in map units.

        Returns:
            True when its part file exists.
        """
        x, y = chip[0], chip[1]
        return self.chip_key([x.start, x.stop, 0.0, y.start, y.stop]) in self._done

    @staticmethod
    def chip_key(bounds: Sequence[float]) -> str:
        """Part-file key of a chip: its footprint to 10 significant digits (mm in UTM)."""
        xmin, xmax, _, ymin, ymax = (float(v) for v in list(bounds)[:5])
        return "_".join(f"{v:.10g}".replace("-", "m") for v in (xmin, ymin, xmax, ymax))

    @staticmethod
    def read_part(path: Path) -> dict[str, Any]:
        """A pooled part's row, its embedding as float32."""
        return _pooled_part(json.loads(path.read_text()))

    @staticmethod
    def read_batch_part(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
        """A batch part's rows (embeddings as float32) and the keys of its no-data chips.

        The part must hold exactly the chips its name records (:meth:`_write_chips`: their
        count and the CRC-32 of their keys, in order): a part that lost or gained lines is
        damaged, not a smaller batch. Blank lines are ignored.

        Raises:
            ValueError: for a name this writer does not give, lines that are not the chips
                the name records, a line that is not a row, embeddings of two lengths.
            KeyError / TypeError: for a row without, or with a malformed, ``chip_id``,
                ``bounds``, ``time`` or embedding (:func:`_pooled_part`).
        """
        named = _BATCH_PART.fullmatch(path.name)
        if named is None:
            raise ValueError("not a batch part's name (<first key>_n<chips>_<CRC-32>.jsonl)")
        rows: list[dict[str, Any]] = []
        empty: list[str] = []
        keys: list[str] = []
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            if not isinstance(entry, dict) or not isinstance(entry.get("chip_id"), str):
                raise ValueError("a line is not a row with a chip_id")
            keys.append(entry["chip_id"])
            if entry.get("no_data") is True:
                empty.append(keys[-1])
            else:
                rows.append(_pooled_part(entry))
        if len(keys) != int(named["n"]) or _keys_crc(keys) != int(named["crc"], 16):
            raise ValueError(
                f"holds {len(keys)} chip(s), not the {named['n']} its name records"
                if len(keys) != int(named["n"])
                else "holds other chips than its name records"
            )
        if len({len(r["embedding"]) for r in rows}) > 1:
            raise ValueError("holds embeddings of different lengths")
        return rows, empty

    def _batch_parts(self) -> list[Path]:
        """The batch parts on disk, sorted by name."""
        return sorted(self.parts.glob(f"*{self.batch_suffix}")) if self.parts.is_dir() else []

    def _resume_keys(self) -> set[str]:
        """As :class:`_PartsWriter`'s, batch parts included (damaged ones removed, warned)."""
        read = _read_parts(self._batch_parts(), self.read_batch_part, warn=True)
        self._batch_keys = {
            p.name: [r["chip_id"] for r in rows] + empty for p, (rows, empty) in read.items()
        }
        return super()._resume_keys()

    def done_keys(self) -> set[str]:
        """Keys of the chips in a readable part on disk: batch parts and per-chip ones.

        A batch part not read yet (another process's, or before :meth:`_resume_keys`) is
        read here; an unreadable one counts no chip and is left in place, for the resume
        (which removes it, warning) or the assembly (which stops, naming it) to report.
        """
        keys = super().done_keys()  # waits for the writes under way first
        for path in self._batch_parts():  # listed once: another rank may add parts meanwhile
            known = self._batch_keys.get(path.name)
            if known is None:
                try:
                    rows, empty = self.read_batch_part(path)
                except (OSError, EOFError, ValueError, KeyError, TypeError):
                    continue
                known = self._batch_keys[path.name] = [r["chip_id"] for r in rows] + empty
            keys.update(known)
        return keys

    def part_key(self, prediction: Mapping[str, Any], i: int) -> str:
        """Part-file key of chip ``i`` of a prediction (from its ``bounds``)."""
        return self.chip_key(prediction["bounds"][i].double().cpu().numpy())

    def write_chip(self, prediction: Mapping[str, Any], i: int) -> None:
        """Save chip ``i``'s row as a batch part of one chip (see :meth:`_write_chips`)."""
        self._write_chips(prediction, [i], [])

    def _write_chips(
        self, prediction: Mapping[str, Any], chips: Sequence[int], empty: Sequence[int]
    ) -> None:
        """Save a batch's rows as one part, named ``<first key>_n<chips>_<keys' CRC-32>.jsonl``.

        One JSON line per chip: ``chip_id``, ``bounds``, ``time`` and the embedding as the
        base64 of its little-endian float32 bytes (``embedding_f32``: exact, and about 40x
        cheaper to write than a list of 768 numbers in decimal), ``valid_fraction`` where
        the batch has it; a chip in ``empty`` is ``{"chip_id": ..., "no_data": true}``. The
        part is written through a temporary name (:func:`atomic_write`): a killed job leaves
        a batch whole or not at all. Per-chip parts (``.json`` with an ``embedding`` list or
        ``embedding_f32``, ``.empty``) of earlier versions are read too.
        """
        if not chips and not empty:
            return
        bounds = prediction["bounds"].double().cpu().numpy()
        pooled = prediction["pooled"].float().cpu().numpy().astype("<f4", copy=False)
        fraction = prediction.get("valid_fraction")
        fractions = None if fraction is None else fraction.float().cpu().numpy()
        keys: list[str] = []
        lines: list[str] = []
        for i in chips:
            b = bounds[i]
            keys.append(self.chip_key(b))
            row: dict[str, Any] = {
                "chip_id": keys[-1],
                "bounds": [float(b[0]), float(b[3]), float(b[1]), float(b[4])],
                "time": [float(b[6]), float(b[7])] if len(b) >= 8 else [math.nan, math.nan],
                "embedding_f32": base64.b64encode(pooled[i].tobytes()).decode("ascii"),
            }
            if fractions is not None:  # a time series' chip: the mean over its dates
                row["valid_fraction"] = float(fractions[i].mean())
            lines.append(json.dumps(row))
        for i in empty:
            keys.append(self.chip_key(bounds[i]))
            lines.append(json.dumps({"chip_id": keys[-1], "no_data": True}))
        name = f"{keys[0]}_n{len(keys)}_{_keys_crc(keys):08x}{self.batch_suffix}"
        text = "\n".join(lines) + "\n"
        atomic_write(self.parts / name, lambda p: Path(p).write_text(text))
        self._batch_keys[name] = keys

    def _rows(self) -> list[dict[str, Any]]:
        """The table's rows (see the class docstring), before properties are joined."""
        read = _read_parts(sorted(self.parts.glob(f"*{self.suffix}")), self.read_part)
        parts = {p.name.removesuffix(self.suffix): row for p, row in read.items()}
        for rows, _ in _read_parts(self._batch_parts(), self.read_batch_part).values():
            parts.update((r["chip_id"], r) for r in rows)
        if self.chip_keys is None:
            rows = [r | {"empty": False} for r in parts.values()]
        else:
            depth = next((len(r["embedding"]) for r in parts.values()), None)
            if depth is None:
                depth = int(self.metadata.get(self.depth_tag, 0))
                _warnings.warn(
                    f"no chip of {self.path.name} held a valid pixel: its rows are flagged "
                    "no_data (NaN embeddings)"
                )
            empty = {"embedding": [math.nan] * depth, "empty": True, "valid_fraction": 0.0}
            no_time = [math.nan, math.nan]
            rows = [
                parts[k] | {"empty": False}
                if k in parts
                else {
                    "chip_id": k,
                    "bounds": list(self.bounds_of_key(k)),
                    "time": list(self._chip_times.get(k, no_time)),
                }
                | empty
                for k in self.chip_keys
            ]
        if self.properties is None:
            rows.sort(key=lambda r: (-r["bounds"][3], r["bounds"][0]))
        return rows

    #: The table's column of per-chip vectors (checked value by value when read back).
    vector_column = "embedding"

    def _columns(self, rows: list[dict[str, Any]], meta: Mapping[str, str]) -> dict[str, Any]:
        """The table's columns but ``geometry``, from :meth:`_rows` and the metadata tags."""
        return {
            "chip_id": [r["chip_id"] for r in rows],
            "source": [self.source] * len(rows),
            "time_start": utc_us([_ts(r["time"][0]) for r in rows]),
            "time_end": utc_us([_ts(r["time"][1]) for r in rows]),
            "embedding": [np.asarray(r["embedding"], np.float32) for r in rows],
            "variant": [meta.get("variant", "")] * len(rows),
            "weights": [meta.get("weights", "")] * len(rows),
            "pooled_norm": [meta.get("pooled_norm", "")] * len(rows),
            "no_data": np.array([bool(r["empty"]) for r in rows], dtype=bool),
            "valid_fraction": np.array(
                [r.get("valid_fraction", math.nan) for r in rows], dtype=np.float32
            ),
        }

    def finalize(self) -> None:
        """Assemble the rows into the final GeoParquet, verified (see the class docstring).

        The table is written to a temporary file, flushed and read back (row count, columns,
        every embedding value) before it is renamed onto :attr:`path` and the parts deleted.

        Raises:
            OutputWriteError: if the file cannot be written or read back (the parts are
                kept; rerun the job to finish).
            RuntimeError: if no chip was written and ``chip_keys`` was not given.
        """
        self.flush()
        rows = self._rows()  # first: a damaged part is named as such, not as a missing chip
        self.check_every_chip_has_a_part()
        import geopandas as gpd
        import pyarrow.parquet as pq
        from shapely.geometry import box

        if not rows and self.chip_keys is None:
            raise RuntimeError(f"no chip was written for {self.path}: nothing to assemble")
        meta = {k: _tag(v) for k, v in self.metadata.items()}
        columns = self._columns(rows, meta)
        frame = gpd.GeoDataFrame(columns, geometry=[box(*r["bounds"]) for r in rows], crs=self.crs)
        if self.properties is not None:
            props = self.properties.rename(
                columns={
                    c: f"input_{c}"
                    for c in self.properties.columns
                    if c in frame.columns and c != "point_index"
                }
            )
            frame = gpd.GeoDataFrame(
                pd.concat([frame.drop(columns="geometry"), props], axis=1),
                geometry=frame.geometry,
                crs=self.crs,
            )
            frame = frame.sort_values("point_index", kind="stable").reset_index(drop=True)
        frame.attrs.update(meta)
        vectors = frame[self.vector_column].to_numpy()
        expected = np.concatenate([*vectors, np.empty(0, np.float32)])

        def verify(tmp: Path) -> None:
            table = pq.read_table(tmp)
            if table.num_rows != len(frame):
                raise ValueError(f"read back {table.num_rows} rows, wrote {len(frame)}")
            missing = [c for c in frame.columns if c not in table.column_names]
            if missing:
                raise ValueError(f"read back without the columns {missing}")
            values = (
                table.column(self.vector_column)
                .combine_chunks()
                .flatten()
                .to_numpy(zero_copy_only=False)
            )
            if _digest(np.asarray(values, np.float32)) != _digest(expected):
                raise ValueError(f"read back other {self.vector_column} values than written")

        self.path.parent.mkdir(parents=True, exist_ok=True)  # no part made it (all chips empty)
        atomic_write(self.path, frame.to_parquet, verify=verify, durable=True, hint=self._hint())
        shutil.rmtree(self.parts, ignore_errors=True)


#: The writer of each ``torchgeo_dofa.tasks`` class's predictions.
TASK_WRITERS = {
    "DOFASegmentationTask": "SegmentationWriter",
    "DOFAClassificationTask": "ClassificationWriter",
}


def _is_dofa_task(module: Any, name: str) -> bool:
    """Whether ``module`` is the ``torchgeo_dofa.tasks`` class ``name`` (once imported).

    Looked up among the imported modules: a writer under an embedder does not import the
    tasks (and TorchGeo's with them).
    """
    cls = getattr(sys.modules.get("torchgeo_dofa.tasks"), name, None)
    return isinstance(cls, type) and isinstance(module, cls)


class _TaskWriter(_PartsWriter):
    """What both task writers share: which modules they take, their tags, the scores."""

    #: the task this writer takes, a ``torchgeo_dofa.tasks`` class name; TorchGeo's own
    #: tasks are not taken: its segmentation task returns a dict since TorchGeo 0.9, and its
    #: binary / multilabel tasks count ``num_labels``, not classes
    task_class = ""
    #: what this writer's task predicts, for messages
    kind = ""
    #: dimensions of the task's prediction: (B, K, H, W) or (B, K)
    score_dims = 0
    depth_tag = "num_classes"
    class_names: list[str] | None

    def _check_names(self, class_names: Sequence[str] | None) -> None:
        if isinstance(class_names, str | bytes):
            raise TypeError(
                f"class_names must be a list of names, one per class, got the string "
                f"{class_names!r}"
            )
        if class_names is not None and (
            len(set(class_names)) != len(class_names) or not all(class_names)
        ):
            raise ValueError(f"class_names must be distinct and non-empty, got {class_names}")
        self.class_names = None if class_names is None else [str(n) for n in class_names]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse chips the task cannot take or this writer cannot place, then set up.

        Raises:
            ValueError: for a data module serving raw reflectance (``preprocess=False``
                without ``transforms``), tiles (``input_prep="tile"``), or, for a map,
                points or whole-region chips (:meth:`_refuse_sampling`); and as the
                writer's base class.
        """
        dm = getattr(trainer, "datamodule", None)
        name = type(self).__name__
        if getattr(dm, "input_prep", "resize") == "tile":
            raise ValueError(
                f"{name} writes a {self.kind} task's predictions over chips resized to the "
                "model input, but the data module cuts them into tiles (input_prep='tile'): "
                "use input_prep='resize' (the default) with 224-px chips (patch_size=224) to "
                "keep the input's pixels"
            )
        kwargs = getattr(dm, "kwargs", {})
        if getattr(dm, "preprocess", True) is False and kwargs.get("transforms") is None:
            raise ValueError(
                f"{name} writes a {self.kind} task's predictions, which take chips normalised "
                "as in training, but the data module serves raw reflectance "
                "(preprocess=False): give it preprocess=True (the default)"
            )
        self._refuse_sampling(dm)
        super().setup(trainer, pl_module, stage)

    def _refuse_sampling(self, dm: Any) -> None:
        """Refuse a data module's sampling this writer cannot place (nothing here)."""

    def _check_module(self, pl_module: pl.LightningModule) -> None:
        """Refuse a module that is not this writer's kind of task (before any batch).

        Raises:
            TypeError: for an embedder or another kind of task, naming the writer to use.
            ValueError: for ``class_names`` that do not number the task's classes.
        """
        name = type(pl_module).__name__
        if not _is_dofa_task(pl_module, self.task_class):
            tasks = sys.modules.get("torchgeo.tasks")
            writer = next((w for t, w in TASK_WRITERS.items() if _is_dofa_task(pl_module, t)), "")
            if writer:
                use = f"{writer} writes that task's predictions"
            elif tasks is not None and isinstance(pl_module, tasks.BaseTask):
                use = (
                    "the task writers take this package's DOFASegmentationTask and "
                    "DOFAClassificationTask; write another task's predictions with a writer "
                    "of your own"
                )
            else:
                use = "GridWriter or PooledWriter write embeddings"
            raise TypeError(
                f"{type(self).__name__} writes the class probabilities of a {self.kind} task "
                f"({self.task_class}), but {name} is not one: {use}"
            )
        k = int(pl_module.hparams["num_classes"])
        if self.class_names is not None and len(self.class_names) != k:
            raise ValueError(
                f"{len(self.class_names)} class_names for the {k} classes of {name}: give one "
                "name per class, in class-index order"
            )

    def _module_tags(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The task's class, variant, classes and checkpoint (``weights``)."""
        hp = pl_module.hparams
        tags: dict[str, Any] = {"task": type(pl_module).__name__}
        for key in ("variant", "mode", "num_classes"):
            if key in hp:
                tags[key] = hp[key]
        if "task" in hp:  # multiclass / multilabel
            tags["task_type"] = hp["task"]
        if self.class_names is not None:
            tags["class_names"] = json.dumps(self.class_names)
        threshold = getattr(self, "threshold", None)
        if threshold is not None and hp.get("task") == "multilabel":
            tags["threshold"] = threshold  # the labels' probability cut
        # where the encoder started; the checkpoint file once the trainer loads one
        # (_weights_restored); the job's identity follows the weights themselves
        tags["weights"] = str(hp.get("weights", ""))
        return tags

    def _weights_restored(self, trainer: pl.Trainer) -> None:
        """Record the checkpoint the trainer loaded as ``weights``."""
        if trainer.ckpt_path:
            self.metadata["weights"] = str(trainer.ckpt_path)

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
        """Save each chip's probabilities as its part, placed by the batch (see the class).

        Chips the batch flags ``empty`` (no valid pixel) get an empty part: no class.

        Raises:
            TypeError: for a prediction that is not the task's probabilities.
            KeyError: for a batch without what places its chips.
        """
        placed = self._placed(self._scores(pl_module, prediction, batch), batch)
        if "empty" in batch:
            placed["empty"] = batch["empty"].cpu()
        super().write_on_batch_end(
            trainer, pl_module, placed, batch_indices, batch, batch_idx, dataloader_idx
        )

    def _placed(self, probs: Tensor, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The prediction dict the embedding writer reads (:attr:`needs`), from the scores."""
        raise NotImplementedError

    def _scores(self, pl_module: pl.LightningModule, prediction: Any, batch: Any) -> Tensor:
        """The batch's probabilities, checked: a float tensor of :attr:`score_dims` dims.

        Raises:
            TypeError: for another prediction (a module whose ``predict_step`` was changed).
            KeyError: for a batch without what places its chips.
        """
        if (
            not isinstance(prediction, Tensor)
            or prediction.ndim != self.score_dims
            or not prediction.is_floating_point()
        ):
            shape = "(B, K, H, W)" if self.score_dims == 4 else "(B, K)"
            got = (
                f"a {tuple(prediction.shape)} tensor"
                if isinstance(prediction, Tensor)
                else f"a {type(prediction).__name__}"
            )
            raise TypeError(
                f"{type(self).__name__} writes the {shape} class probabilities a {self.kind} "
                f"task's predict_step returns, but {type(pl_module).__name__}.predict_step "
                f"returned {got}"
            )
        missing = [k for k in self.needs[1:] if not isinstance(batch, Mapping) or k not in batch]
        if missing:
            grid = (
                " (preprocess=True, the default, for 'grid_transform')"
                if "grid_transform" in missing
                else ""
            )
            raise KeyError(
                f"{type(self).__name__} places each chip by the batch's {missing}, which "
                f"DOFAPredictDataModule's batches carry{grid}: predict the task over a "
                "DOFAPredictDataModule"
            )
        return prediction.detach().float()


class SegmentationWriter(_TaskWriter, GridWriter):
    """Write a segmentation task's predictions as one georeferenced GeoTIFF map.

    For :class:`~torchgeo_dofa.tasks.DOFASegmentationTask` predicting over a
    :class:`~torchgeo_dofa.datamodules.DOFAPredictDataModule` with ``input_prep="resize"``
    (the default). The task's ``predict_step`` gives (B, K, H, W) class probabilities over
    each model input (the chip resized to 224 x 224); each chip is placed by the batch's
    ``grid_transform`` (16 map pixels a patch cell), so a map pixel is ``patch_size / 224``
    input pixels (the input's own pixels for the default 224-px chips). Where chips overlap
    (a stride below the chip size) the probabilities are averaged. Pixels whose ``valid`` is
    False (no-data, outside the rasters) and chips flagged ``empty`` take no class.

    ``output="classes"`` (default): one band ``class``, the index of the most probable class
    (uint8, nodata 255; uint16 with nodata 65535 above 255 classes), with a colour table
    QGIS shows as a paletted raster. ``output="probabilities"``: K float32 bands named for
    the classes (``class_names``, else ``class_0`` ...), NaN where no class. Tags: ``task``,
    ``variant``, ``num_classes``, ``class_names``, ``weights`` (the checkpoint the trainer
    loaded), ``bands``, ``wavelengths``, ``sources``.

    Resumable, locked, verified and atomic as :class:`GridWriter` (parts under
    ``<path>.parts/``, one per chip).
    """

    task_class = "DOFASegmentationTask"
    kind = "segmentation"
    score_dims = 4
    #: map pixels per side of one grid_transform cell (DOFA's patch size)
    patch = 16

    def __init__(
        self,
        path: str | os.PathLike[str],
        output: str = "classes",
        class_names: Sequence[str] | None = None,
        geometry: GridGeometry | None = None,
        metadata: Mapping[str, Any] | None = None,
        window: int = 512,
    ) -> None:
        """Create a segmentation writer.

        Args:
            path: output GeoTIFF.
            output: ``"classes"`` (a class map) or ``"probabilities"`` (a band per class).
            class_names: a name per class, in class-index order (band names and the
                ``class_names`` tag), or None.
            geometry: the map's pixel grid; None derives it at setup from the data module
                (its :meth:`~torchgeo_dofa.datamodules.DOFAPredictDataModule.grid_geometry`
                at 16 map pixels a cell).
            metadata: further tags stored in the GeoTIFF.
            window: map pixels per side of the assembly window and of the GeoTIFF's blocks
                (a multiple of 16).

        Raises:
            ValueError: for another ``output``, repeated or empty class names, or a bad
                ``window``.
        """
        if output not in ("classes", "probabilities"):
            raise ValueError(f"output must be 'classes' or 'probabilities', got {output!r}")
        self._check_names(class_names)
        self.output = output
        GridWriter.__init__(self, path, geometry=geometry, metadata=metadata, window=window)

    def _derived_geometry(self, dm: Any) -> GridGeometry:
        """The data module's embedding grid, each cell cut into 16 x 16 map pixels."""
        coarse = super()._derived_geometry(dm)
        p = self.patch
        return GridGeometry(
            coarse.crs,
            coarse.xmin,
            coarse.ymin,
            coarse.cell / p,
            coarse.width * p,
            coarse.height * p,
            None if coarse.cell_y is None else coarse.cell_y / p,
        )

    def _bands_of(self, pl_module: pl.LightningModule) -> int | None:
        """The task's number of classes (the parts' values per pixel)."""
        return int(pl_module.hparams["num_classes"])

    def _refuse_sampling(self, dm: Any) -> None:
        """Refuse points and whole-region chips: a map needs chips on the rasters' grid.

        Raises:
            ValueError: for ``points`` or ``roi_sampling="whole"`` (one chip resampled from
                each point's or region's extent, off the rasters' pixel grid).
        """
        if getattr(dm, "mode", None) == "points" or (
            getattr(dm, "roi", None) is not None and getattr(dm, "roi_sampling", None) == "whole"
        ):
            what = "points" if getattr(dm, "mode", None) == "points" else "roi_sampling='whole'"
            raise ValueError(
                f"SegmentationWriter maps pixels of chips cut on the rasters' grid, but the "
                f"data module makes one chip of each extent ({what}), resampled off that "
                "grid: map the region with roi=... and roi_sampling='grid' (the default), or "
                "classify each extent as a whole with a classification task and "
                "ClassificationWriter"
            )

    def _placed(self, probs: Tensor, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Each chip's (K, H, W) probabilities, no-data pixels NaN, with its pixels' affine."""
        valid = batch.get("valid")
        if isinstance(valid, Tensor) and valid.shape == (probs.shape[0], *probs.shape[-2:]):
            probs = probs.masked_fill(~valid.to(probs.device, torch.bool)[:, None], math.nan)
        cells = batch["grid_transform"].detach().to("cpu", torch.float64).clone()
        cells[:, [0, 1, 3, 4]] /= self.patch  # a patch cell's affine -> a map pixel's
        return {"grid": probs.cpu(), "grid_transform": cells}

    def _layout(self, depth: int) -> tuple[int, str, float, tuple[str, ...]]:
        """A class band (uint8 / uint16) or a float32 probability band per class."""
        if self.output == "classes":
            small = depth <= 255
            return 1, "uint8" if small else "uint16", 255 if small else 65535, ("class",)
        names = self.class_names or [f"class_{k}" for k in range(depth)]
        return depth, "float32", float("nan"), tuple(names)

    def _window_values(self, window: np.ndarray) -> np.ndarray:
        """The most probable class per pixel (nodata where no class), or the probabilities."""
        if self.output != "classes":
            return window
        _, dtype, nodata, _ = self._layout(window.shape[0])
        scored = np.isfinite(window).all(axis=0)
        classes = np.nan_to_num(window, nan=-1.0).argmax(axis=0).astype(dtype)
        classes[~scored] = nodata
        return classes[None]

    def _decorate(self, dst: Any, depth: int) -> None:
        """Give a class map a colour table (QGIS opens it as a paletted raster)."""
        if self.output == "classes" and depth <= 255:  # nodata (255) transparent
            dst.write_colormap(1, class_colours(depth) | {255: (0, 0, 0, 0)})

    def _overviews(self, dst: Any) -> None:
        """Internal overviews, halving down to under 256 px a side, for maps over 512 px.

        A map has the input's pixels (a Sentinel-2 tile's: 10980 x 10980): without
        overviews QGIS decodes every block to draw it zoomed out. Classes are reduced by
        ``mode`` (the most frequent class; no data left out), probabilities by ``average``.
        """
        side = max(dst.height, dst.width)
        if side <= 512:
            return
        factors = [2]
        while side // factors[-1] >= 256:
            factors.append(factors[-1] * 2)
        how = Resampling.mode if self.output == "classes" else Resampling.average
        dst.build_overviews(factors, how)


def class_colours(n: int) -> dict[int, tuple[int, int, int, int]]:
    """A distinct RGBA colour per class index ``0 .. n - 1`` (matplotlib's ``tab20``, cycled).

    Args:
        n: number of classes.

    Returns:
        ``{index: (r, g, b, 255)}``, as ``rasterio``'s ``write_colormap`` takes it.
    """
    from matplotlib import colormaps

    table = colormaps["tab20"]
    return {
        k: (*(round(255 * v) for v in table(k % 20)[:3]), 255)  # type: ignore[misc]
        for k in range(n)
    }


class ClassificationWriter(_TaskWriter, PooledWriter):
    """Write a classification task's predictions as a GeoParquet table, one row per chip.

    For :class:`~torchgeo_dofa.tasks.DOFAClassificationTask` predicting over a
    :class:`~torchgeo_dofa.datamodules.DOFAPredictDataModule`: each
    chip's footprint (``geometry``, the region's CRS), ``chip_id``, ``source``,
    ``time_start`` / ``time_end``, ``probabilities`` (float32, one per class), then for a
    multiclass task ``class`` (int16, the most probable class; -1 for a chip without any
    valid pixel) and ``class_name`` (with ``class_names``), for a multilabel task ``labels``
    (the classes whose probability is at least ``threshold``, recorded as the ``threshold``
    tag) and ``label_names`` (with ``class_names``); ``variant``, ``weights`` (the
    checkpoint the trainer loaded), ``no_data`` and ``valid_fraction`` as
    :class:`PooledWriter` writes them. Rows and resuming as :class:`PooledWriter`.
    """

    task_class = "DOFAClassificationTask"
    kind = "classification"
    score_dims = 2
    vector_column = "probabilities"

    def __init__(
        self,
        path: str | os.PathLike[str],
        class_names: Sequence[str] | None = None,
        threshold: float = 0.5,
        crs: CRS | None = None,
        metadata: Mapping[str, Any] | None = None,
        source: str = "",
        chip_keys: Sequence[str] | None = None,
        properties: pd.DataFrame | None = None,
    ) -> None:
        """Create a classification writer.

        Args:
            path: output ``.parquet`` file.
            class_names: a name per class, in class-index order, or None.
            threshold: a multilabel task's probability from which a class is in ``labels``.
            crs: as :class:`PooledWriter`.
            metadata: as :class:`PooledWriter`.
            source: as :class:`PooledWriter`.
            chip_keys: as :class:`PooledWriter`.
            properties: as :class:`PooledWriter`.

        Raises:
            ValueError: for repeated or empty class names, a threshold outside (0, 1), and
                as :class:`PooledWriter`.
        """
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self._check_names(class_names)
        self.threshold = float(threshold)
        PooledWriter.__init__(
            self, path, crs, metadata, source=source, chip_keys=chip_keys, properties=properties
        )

    def _placed(self, probs: Tensor, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Each chip's (K,) probabilities with its footprint and valid fraction."""
        placed: dict[str, Any] = {"pooled": probs.cpu(), "bounds": batch["bounds"].cpu()}
        if "valid_fraction" in batch:
            placed["valid_fraction"] = batch["valid_fraction"].cpu()
        return placed

    def _columns(self, rows: list[dict[str, Any]], meta: Mapping[str, str]) -> dict[str, Any]:
        """:class:`PooledWriter`'s columns, ``probabilities`` for ``embedding``, the class."""
        base = super()._columns(rows, meta)
        probs = base.pop("embedding")
        del base["pooled_norm"]
        columns = {k: v for k, v in base.items() if k not in ("variant", "weights")}
        columns["probabilities"] = probs
        empty = base["no_data"]
        if meta.get("task_type") == "multilabel":
            no_label = np.array([], np.int16)
            columns["labels"] = [
                no_label if e else np.flatnonzero(p >= self.threshold).astype(np.int16)
                for p, e in zip(probs, empty, strict=True)
            ]
            if self.class_names is not None:
                names = self.class_names
                columns["label_names"] = [[names[i] for i in row] for row in columns["labels"]]
        else:
            best = np.array(
                [-1 if e else int(np.argmax(p)) for p, e in zip(probs, empty, strict=True)],
                np.int16,
            )
            columns["class"] = best
            if self.class_names is not None:
                columns["class_name"] = [
                    self.class_names[b] if b >= 0 else None for b in best.tolist()
                ]
        return columns | {k: base[k] for k in ("variant", "weights", "no_data", "valid_fraction")}


def _sends_every_batch(trainer: pl.Trainer) -> bool:
    """Whether ``limit_predict_batches`` left every batch of the prediction loaders in.

    A fraction of 1.0 (the default), or a count at least each loader's length (``100`` for
    a 6-batch job: Lightning then runs all 6).
    """
    limit = getattr(trainer, "limit_predict_batches", 1.0)
    if isinstance(limit, float):
        return limit >= 1.0
    loaders = trainer.predict_dataloaders
    loaders = list(loaders) if isinstance(loaders, list | tuple) else [loaders]
    try:
        counts = zip(trainer.num_predict_batches, loaders, strict=True)
        return all(n >= len(loader) for n, loader in counts)
    except (TypeError, ValueError):  # a loader without a length, another layout: unknown
        return False


#: A :class:`PooledWriter` batch part's name: first chip key, chip count, CRC-32 of the keys.
_BATCH_PART = re.compile(r".+_n(?P<n>[1-9][0-9]*)_(?P<crc>[0-9a-f]{8})\.jsonl")


def _keys_crc(keys: Sequence[str]) -> int:
    """CRC-32 of a batch part's chip keys, in order (recorded in the part's name)."""
    return zlib.crc32("\n".join(keys).encode())


def _pooled_part(row: dict[str, Any]) -> dict[str, Any]:
    """A pooled part as read: ``embedding`` as float32 (from ``embedding_f32`` or a list).

    Raises:
        KeyError: for a row without ``chip_id``, ``bounds``, ``time`` or an embedding.
        TypeError / ValueError: for one of them malformed (``bounds`` not 4 numbers,
            ``time`` not 2, an empty embedding, base64 that is not).
    """
    encoded = row.pop("embedding_f32", None)
    if encoded is not None:
        row["embedding"] = np.frombuffer(base64.b64decode(encoded), "<f4").astype(np.float32)
    if not isinstance(row["chip_id"], str):
        raise TypeError("chip_id is not a string")
    for name, size in (("bounds", 4), ("time", 2)):
        values = row[name]
        if not isinstance(values, list) or len(values) != size:
            raise ValueError(f"{name} is not {size} numbers")
        row[name] = [float(v) for v in values]  # TypeError for a non-number
    if not len(row["embedding"]):
        raise ValueError("the embedding is empty")
    return row


@contextlib.contextmanager
def _native_stderr_kept_on_success() -> Iterator[None]:
    """Hold back what C libraries print on file descriptor 2 while a GeoTIFF is written.

    libtiff reports a failed write once per block (``_tiffWriteProc: No space left on
    device.``) straight to the process's stderr, past Python's logging. Those lines are
    dropped when the write fails (the :class:`OutputWriteError` names the file and the cause
    in one line) and printed as they were when it succeeds.
    """
    fd = 2  # the process's stderr, where C libraries write, whatever sys.stderr is now
    with contextlib.suppress(AttributeError, ValueError, OSError):
        sys.stderr.flush()
    try:
        saved = os.dup(fd)
    except OSError:  # no stderr at all
        yield
        return
    ok = False
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), fd)
        try:
            yield
            ok = True
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            if ok:
                held.seek(0)
                text = held.read()
                if text:
                    os.write(fd, text)


def _read_parts[T](
    paths: Sequence[Path], read: Callable[[Path], T], warn: bool | None = None
) -> dict[Path, T]:
    """Read part files; every unreadable one is removed, so its chip is computed again.

    Parts are written through a temporary name, so a killed job leaves none half-written; a
    truncated or garbled part comes from outside (a disk error, a power cut before the data
    reached the disk, an edit). All parts are read before the error, so one run finds them
    all.

    Args:
        paths: the part files.
        read: reads one (raising ``OSError``, ``EOFError``, ``ValueError``, ``KeyError`` or
            ``TypeError`` for a damaged one).
        warn: None (at assembly): raise; True / False (when a run resumes, which computes
            the removed parts' chips itself): warn / stay silent (a DDP worker).

    Returns:
        Each readable path's value.

    Raises:
        OutputWriteError: naming the damaged parts (the first three), the cause and the fix
            (rerun the same command), after removing them; only with ``warn=None``.
    """
    values: dict[Path, T] = {}
    bad: list[tuple[Path, BaseException]] = []
    for path in paths:
        try:
            values[path] = read(path)
        except (OSError, EOFError, ValueError, KeyError, TypeError) as err:
            bad.append((path, err))
    if not bad:
        return values
    for path, _ in bad:
        path.unlink(missing_ok=True)
    first, cause = bad[0]
    more = f" and {len(bad) - 1} more ({', '.join(p.name for p, _ in bad[1:4])}...)"
    what = f"part {first}{more if len(bad) > 1 else ''} was unreadable ({cause}) and is removed"
    if warn is None:
        raise OutputWriteError(
            f"{what}: rerun the same command to compute those chips again and finish"
        )
    if warn:
        _warnings.warn(f"{what}: this run computes those chips again", UserWarning)
    return values


def _time_span(chip: Sequence[Any], whole: slice | None = None) -> tuple[float, float]:
    """A sampler chip's time span in seconds since 1970, as the dataset's ``bounds`` hold it.

    Args:
        chip: a GeoSampler's ``(x, y)`` or ``(x, y, t)`` slices.
        whole: the time slice of a chip without one (the dataset's time bounds).

    Returns:
        ``(start, stop)`` in seconds; NaN where neither slice is known.
    """
    t = chip[2] if len(chip) > 2 else whole
    if not isinstance(t, slice) or t.start is None or t.stop is None:
        return math.nan, math.nan
    return pd.Timestamp(t.start).timestamp(), pd.Timestamp(t.stop).timestamp()


def utc_us(values: Any) -> pd.DatetimeIndex:
    """Times as UTC timestamps of microseconds, whatever they are given as.

    pandas infers a unit from the values (seconds for a column of None alone, nanoseconds
    for integers), and a table's column type followed it: tables of two jobs (one undated)
    did not read as one dataset. Microseconds hold every bound exactly (:func:`_ts`).

    Args:
        values: nanoseconds since 1970 (int), ISO 8601 strings, datetimes, or None (NaT).

    Returns:
        ``datetime64[us, UTC]`` values.
    """
    return pd.DatetimeIndex(pd.to_datetime(list(values), utc=True)).as_unit("us")


def _ts(value: float) -> int | None:
    """Nanoseconds of a time bound in seconds, to the microsecond (None: open-ended).

    TorchGeo's bounds end a day at 23:59:59.999999; seconds since 1970 as a float64 carry
    that to ~0.2 us, so the value is rounded to the microsecond (else ``...59.999998976``).
    """
    if not math.isfinite(value) or abs(value) > 9.2e9:  # TorchGeo's open-ended time bounds
        return None
    return round(value * 1e6) * 1000


def _assemble_window(
    win: Window,
    chips: list[tuple[int, int, Path]],
    sizes: Mapping[Path, tuple[int, ...]],
    depth: int,
) -> np.ndarray:
    """One window of the grid GeoTIFF from the chip parts that intersect it.

    Args:
        win: the window, in grid cells.
        chips: (row, col, part file) of every chip, offsets in grid cells.
        sizes: each part's (D, h, w).
        depth: D, the embedding width.

    Returns:
        (D, win.height, win.width) float32, C-contiguous: the mean of the chips' finite
        values per cell (a cell counts for a chip only when all its D values are finite),
        NaN where no chip has one. Where no two chips overlap in the window (stride = chip
        size, the default), the parts are copied in float32; overlaps are averaged in
        float64. Both give the same values for non-overlapping chips (x / 1 is exact; only
        a -0.0 keeps its sign in the copy, where the float64 sum made it +0.0).
    """
    pieces = []
    for r, c, p in chips:
        _, h, w = sizes[p]
        r0, r1 = max(r, win.row_off), min(r + h, win.row_off + win.height)
        c0, c1 = max(c, win.col_off), min(c + w, win.col_off + win.width)
        if r0 < r1 and c0 < c1:
            dst = (
                slice(r0 - win.row_off, r1 - win.row_off),
                slice(c0 - win.col_off, c1 - win.col_off),
            )
            pieces.append((p, (slice(None), slice(r0 - r, r1 - r), slice(c0 - c, c1 - c)), dst))
    covered = np.zeros((win.height, win.width), np.int32)
    for _, _, (wr, wc) in pieces:
        covered[wr, wc] += 1
    if int(covered.max(initial=0)) <= 1:  # no overlap: copy each chip's cells
        out = np.full((depth, win.height, win.width), np.nan, np.float32)
        for p, src, (wr, wc) in pieces:
            part = np.load(p, mmap_mode="r")[src]
            block = out[:, wr, wc]
            block[...] = part
            bad = ~np.isfinite(part).all(axis=0)
            if bad.any():
                block[:, bad] = np.nan
        return out
    total = np.zeros((depth, win.height, win.width), np.float64)
    count = np.zeros((win.height, win.width), np.int32)
    for p, src, (wr, wc) in pieces:
        part = np.load(p, mmap_mode="r")[src]
        ok = np.isfinite(part).all(axis=0)
        block = total[:, wr, wc]  # a view: summed in place, no window-sized temporaries
        np.add(block, part, out=block, where=np.broadcast_to(ok, part.shape))
        count[wr, wc] += ok
    total /= np.maximum(count, 1)
    total[:, count == 0] = np.nan
    return total.astype(np.float32)


#: The weights' :func:`module_digest` of a trainer's run, taken by the first writer's
#: ``on_predict_start`` and reused by the others (the grid and the table of ``--output
#: both``: 0.1 s each for base); cleared by every writer's ``setup``, so a trainer's next
#: run (weights changed in between) takes it again.
_RUN_DIGESTS: weakref.WeakKeyDictionary[pl.Trainer, tuple[int, str]] = weakref.WeakKeyDictionary()


def module_digest(module: Any) -> str:
    """CRC-32 of a module's parameters (names, shapes, dtypes and bytes), as 8 hex digits.

    Equal for the same weights; another checkpoint, a fine-tuned copy or another random draw
    gives another value. About 0.1 s for DOFA base on a CPU (344 MB of float32).

    Args:
        module: a ``torch.nn.Module`` (anything with ``named_parameters``), or None.

    Returns:
        The digest; ``"none"`` for an object without parameters.
    """
    named = getattr(module, "named_parameters", None)
    if not callable(named):
        return "none"
    crc = 0
    for name, param in named():
        data = param.detach().cpu().contiguous().reshape(-1)
        crc = zlib.crc32(repr((name, tuple(param.shape), str(param.dtype))).encode(), crc)
        if data.numel():
            crc = zlib.crc32(memoryview(data.view(torch.uint8).numpy()), crc)
    return f"{crc:08x}"


def _not_on_a_map(writer: object, datamodule: object) -> ValueError:
    """The error of a georeferenced writer run on chips that are not placed on a map.

    The grid, table and map writers place every chip by the data module's ``predict_dataset``
    (its CRS) and ``predict_sampler``; a data module of chips without either (TorchGeo's
    ``EuroSATDataModule``; a :class:`~torchgeo_dofa.datasets.ChipFolder` as its
    ``predict_dataset``, which has no CRS; none at all) failed with a ``RuntimeError`` or
    ``AttributeError`` traceback naming a writer class behind the one configured.

    Args:
        writer: the writer refusing.
        datamodule: the trainer's data module, or None.

    Returns:
        The ``ValueError`` to raise (one line from the command line, exit status 2).
    """
    dataset = getattr(datamodule, "predict_dataset", None)
    name = type(datamodule).__name__
    held = (
        "there is none"
        if datamodule is None
        else f"{name} has no predict_dataset"
        if dataset is None
        else f"{name}'s predict_dataset is a {type(dataset).__name__}, not a GeoDataset"
    )
    return ValueError(
        f"{type(writer).__name__} writes georeferenced outputs: it needs a data module whose "
        "predict_dataset and predict_sampler place the chips on a map (a TorchGeo GeoDataset "
        f"and sampler, as DOFAPredictDataModule's), and {held}; predict chips without a place "
        "in Python instead (Trainer.predict(task, dataloaders=...) returns each batch's "
        "predictions)"
    )


def _text_digest(text: str) -> str:
    return f"{zlib.crc32(text.encode()):08x}"


def _chip_bounds(chip: Any) -> Any:
    """A chip as plain numbers: TorchGeo's (x, y, t) slices, or whatever the sampler gives."""
    if isinstance(chip, tuple | list) and all(isinstance(s, slice) for s in chip):
        return [(s.start, s.stop) for s in chip]
    return chip


def describe_change(
    name: str, before: Any, now: Any, limit: int = 120, verbatim: bool = False
) -> str:
    """``"<name> was A, now B"`` for a one-line message, showing where the values differ.

    A string is quoted (unless ``verbatim``: values already written as text, e.g. a
    ``repr``), anything else written as JSON. Values longer than ``limit`` lose the start
    they share (all but 20 characters of context, replaced by ``...``), then are cut at
    ``limit``, so the first difference stays in view. Used by the job manifest's and the
    parts identity's refusals.
    """
    if name.split(" of ")[0] in _CRS_SETTINGS:  # a CRS by its short name, not its WKT
        before, now = (_crs_text(v) for v in (before, now))
    texts = [
        str(v) if verbatim else json.dumps(v) if not isinstance(v, str) else repr(v)
        for v in (before, now)
    ]
    if max(map(len, texts)) > limit:
        a, b = texts
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        shared = (min(len(a), len(b)) if same is None else same) - 20
        if shared > 3:
            texts = ["..." + t[shared:] for t in texts]
        texts = [t if len(t) <= limit else t[: limit - 3] + "..." for t in texts]
    return f"{name} was {texts[0]}, now {texts[1]}"


def _digest(array: np.ndarray) -> bytes:
    """Checksum of an array's shape, dtype and bytes (NaN payloads included).

    CRC-32 (zlib), which catches what the read-back is for (bytes lost or changed between
    memory and disk), not tampering: 3.5 ms per 12.6 MB window here against 14 ms for
    BLAKE2b, and the grid's windows are hashed twice (written, read back).
    """
    crc = zlib.crc32(repr((array.shape, array.dtype.str)).encode())
    if array.size:
        crc = zlib.crc32(memoryview(np.ascontiguousarray(array)).cast("B"), crc)  # no copy
    return crc.to_bytes(4, "big")


def _imagery_tags(metadata: Mapping[str, Any]) -> dict[str, str]:
    """GDAL's IMAGERY-domain tags for an output's ``acquisition_start`` / ``_end`` tags.

    ``ACQUISITIONDATETIME`` (``YYYY-MM-DD HH:MM:SS``, UTC: GDAL's spelling) is the span's
    start where the span is shorter than :data:`IMAGERY_INSTANT`; nothing otherwise (a
    date-only span, no span, text that is not an ISO 8601 time).

    Args:
        metadata: the output's tags.

    Returns:
        The tags for ``update_tags(ns="IMAGERY", ...)``; empty where there are none.
    """
    start, end = metadata.get("acquisition_start"), metadata.get("acquisition_end")
    if not start or not end:
        return {}
    try:
        first, last = pd.Timestamp(str(start)), pd.Timestamp(str(end))
        if first.tzinfo is None or last.tzinfo is None or last - first >= IMAGERY_INSTANT:
            return {}
    except (ValueError, TypeError):
        return {}
    return {"ACQUISITIONDATETIME": first.tz_convert("UTC").strftime("%Y-%m-%d %H:%M:%S")}


def _tag(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _windows(height: int, width: int, rows: int, cols: int) -> Iterator[Window]:
    for row in range(0, height, rows):
        for col in range(0, width, cols):
            yield Window(col, row, min(cols, width - col), min(rows, height - row))
