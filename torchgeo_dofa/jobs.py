"""The embed job's identity and safety: manifest, output-folder lock, names, signals, checks.

An embed job writes into an output folder. To never mix two jobs' results there:

* :class:`JobManifest` records what defines the job's results (inputs with size and mtime,
  bands, wavelengths, variant, weights identity, pooled norm, input preparation, chip size,
  stride, precision, output kinds and files, region / bbox / points, package version) in
  ``<folder>/.torchgeo-dofa-job.json``. :meth:`JobManifest.check_or_write` lets the same job
  resume and turns any difference into a one-line :class:`JobMismatchError` naming the first
  setting that differs; ``overwrite=True`` deletes the previous job's outputs first.
* :class:`OutputLock` holds an exclusive ``flock`` on ``<folder>/.torchgeo-dofa.lock`` for the
  job's lifetime: a second job on the same folder fails at once (:class:`JobLockedError`); the
  kernel drops the lock when the process dies, even on ``kill -9`` (defined, with
  :func:`is_launcher`, in :mod:`torchgeo_dofa.locks`, which loads no PyTorch; re-exported).
* :func:`unique_region_names` gives every region a distinct, order-independent output name.
* :class:`StopOnSignal` turns SIGINT / SIGTERM into a stop after the current batch's parts are
  written (:class:`JobInterrupted`); a rerun resumes from the parts.
* :func:`check_points` and :func:`job_size_warning` validate the whole job before the first
  chip is computed.

Only the launching process (global rank 0, or the only process) takes the lock and checks the
manifest; the other processes of a DDP job skip both (:func:`is_launcher`): those Lightning's
DDP launcher starts, and the other ranks ``torchrun`` or SLURM's ``srun`` start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from pyproj import CRS
from shapely.geometry import Point, box
from shapely.geometry.base import BaseGeometry

from ._errors import exception_chain
from ._warnings import warn
from .datasets import unique_region_names
from .locks import (  # defined there (no PyTorch needed); importable from here as before
    LAUNCHER_PID_VARIABLE,
    LOCK_NAME,
    JobError,
    JobLockedError,
    OutputLock,
    OutputPathError,
    _running,
    die_with_launcher,
    is_launcher,
    launched_ranks,
    mark_launcher,
    master_addr_problem,
    master_port_problem,
    missing_input_problem,
    refuse_undecodable_name,
    rendezvous_here,
    report_ctrl_c,
    signals_deferred,
    stop_advice,
)
from .runtime import GRID_SUFFIXES, TABLE_SUFFIXES
from .spatial import WGS84, PointBuffer, transformer
from .weights import checkpoint_sha256, resolve_weights, sha256_file
from .writers import (
    atomic_write,
    describe_change,
    embed_manifest_listing,
    identity_differences,
    parts_dir,
    stale_temps,
    stored_setting,
)

__all__ = [
    "LARGE_JOB_CHIPS",
    "LAUNCHER_PID_VARIABLE",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "SPARSE_GRID_BYTES",
    "SPARSE_GRID_COVER",
    "InputFile",
    "JobError",
    "JobInterrupted",
    "JobLockedError",
    "JobManifest",
    "JobMismatchError",
    "LoaderWorkerError",
    "OutputLock",
    "OutputPathError",
    "PointsOutsideError",
    "RendezvousPortError",
    "StopOnSignal",
    "check_points",
    "data_identity",
    "die_with_launcher",
    "end_workers_without_group",
    "estimate_seconds",
    "is_launcher",
    "job_size_warning",
    "launched_ranks",
    "loader_worker_error",
    "mark_launcher",
    "master_addr_problem",
    "master_port_problem",
    "missing_input_problem",
    "points_outside_warning",
    "refuse_undecodable_name",
    "region_identity",
    "rendezvous_here",
    "rendezvous_port_error",
    "report_ctrl_c",
    "signals_deferred",
    "sparse_grid_problem",
    "stop_advice",
    "unique_region_names",
    "weights_identity",
]

MANIFEST_NAME = ".torchgeo-dofa-job.json"
#: Manifest format version, bumped when its fields change meaning.
MANIFEST_FORMAT = 1
#: Above this many chips the job prints its size and a time estimate before starting.
LARGE_JOB_CHIPS = 5000
#: A grid GeoTIFF above this size uncompressed (2 GiB) whose chips cover less than
#: :data:`SPARSE_GRID_COVER` of it is refused (:func:`sparse_grid_problem`).
SPARSE_GRID_BYTES = 2 << 30
#: The share of a large grid's cells its chips must cover (10 %).
SPARSE_GRID_COVER = 0.1


class JobMismatchError(JobError, ValueError):
    """The output folder holds another job's results (a setting differs): exit status 2."""

    exit_status = 2


class PointsOutsideError(JobError, ValueError):
    """Points fall outside every input raster: exit status 2."""

    exit_status = 2


class JobInterrupted(JobError):
    """The job was stopped by a signal after writing its current batch.

    Attributes:
        signum: the signal number.
        exit_status: ``128 + signum`` (130 for SIGINT, 143 for SIGTERM), the shell convention.
    """

    def __init__(self, signum: int, what: str | None = None) -> None:
        """Create the exception.

        Args:
            signum: the signal that stopped the job.
            what: what was kept and how to go on (default: an embed job's,
                :func:`stop_advice` ``("embed")``).
        """
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}: {what or stop_advice('embed')}")
        self.signum = signum
        self.exit_status = 128 + signum


class RendezvousPortError(JobError):
    """A DDP job's process group could not start: its rendezvous port is taken (exit 1).

    Rank 0 listens on the port (``MASTER_PORT``; Lightning picks a free one when it is unset,
    or derives it from ``SLURM_JOB_ID`` under SLURM) and another process on the machine holds
    it, another DDP job most often. Raised instead of PyTorch's ``DistNetworkError`` and its
    C++ stack trace; nothing of the job was computed.
    """


def rendezvous_port_error(err: BaseException) -> RendezvousPortError | None:
    """The job's one-line error for a process group whose rendezvous port is in use.

    Args:
        err: an exception raised while a trainer ran; its causes and contexts are searched
            too (Lightning and jsonargparse may wrap it).

    Returns:
        A :class:`RendezvousPortError` naming the port and the fix (set ``MASTER_PORT`` to a
        free port), or None when no ``torch.distributed.DistNetworkError`` with ``EADDRINUSE``
        is among ``err`` and its causes.
    """
    import torch.distributed as dist

    network_error = getattr(dist, "DistNetworkError", None)
    for found in exception_chain(err):
        if network_error is not None and isinstance(found, network_error):
            text = str(found)
            # libuv's TCPStore says "EADDRINUSE", the older one ("USE_LIBUV=0", Windows)
            # "Address already in use" (as torch.distributed.elastic matches it)
            if "EADDRINUSE" in text or "address already in use" in text.lower():
                # Lightning has set MASTER_PORT by then; else the port libuv's message names
                port = os.environ.get("MASTER_PORT") or (
                    text.partition("port: ")[2].partition(",")[0].strip() or "?"
                )
                return RendezvousPortError(
                    f"the DDP job's processes could not connect: rank 0 cannot listen on the "
                    f"rendezvous port {port}, which another process on this machine holds "
                    "(another DDP job?); set MASTER_PORT to a free port (or end the other "
                    "job) and rerun the same command"
                )
    return None


class LoaderWorkerError(JobError):
    """A DataLoader worker could not hand its chips over, or died: exit status 1.

    Workers pass each batch to the job through shared memory (files in ``/dev/shm``):
    PyTorch's own error is a worker's traceback, or "exited unexpectedly" after its bus
    error, and names neither the cause in the machine's limits nor the fix. Raised instead
    of it by :func:`loader_worker_error`; nothing of the failed batch was written, and the
    job's outputs are removed or kept for resuming as after any other failure.
    """


#: PyTorch's shared-memory failures (``unable to resize file <...>: File too large (27)``,
#: ``unable to allocate shared memory(shm) for file <...>: No space left on device (28)``,
#: ``unable to open shared memory object <...>: Too many open files (24)``): their errno.
_SHM_FAILURE = re.compile(r"unable to [^\n]*(?:shared memory|file <[^>]*torch_)[^\n]*\((\d+)\)")
#: What each errno of a shared-memory failure means, and what to change besides workers.
_SHM_CAUSES = {
    errno.EFBIG: (
        "the process's file-size limit (ulimit -f) is smaller than a batch's segment",
        "raise it (ulimit -f unlimited)",
    ),
    errno.ENOSPC: (
        "/dev/shm is full or too small (a container's default is 64 MB)",
        "give it more (docker run --shm-size=2g, or free /dev/shm)",
    ),
    errno.ENOMEM: ("the machine is out of memory", "use a smaller batch (batch_size=)"),
    errno.EMFILE: (
        "the open-file limit (ulimit -n) is reached",
        "raise it (ulimit -n 4096)",
    ),
}


def _in_fd_passing(err: BaseException) -> bool:
    """Whether ``err`` was raised receiving a tensor's shared memory from a worker.

    PyTorch passes a batch's shared memory as file descriptors through
    ``multiprocessing.resource_sharer``: where the worker's side failed (its open-file limit
    reached as it accepted the job's connection) the job's side reads an end of file, or
    finds the worker's listener gone.
    """
    ends = ("multiprocessing/resource_sharer.py", "torch/multiprocessing/reductions.py")
    frames = traceback.extract_tb(err.__traceback__)
    return any(Path(f.filename).as_posix().endswith(ends) for f in frames)


def loader_worker_error(err: BaseException) -> LoaderWorkerError | None:
    """The job's one-line error for a DataLoader worker's shared-memory failure or death.

    Args:
        err: an exception raised while a trainer ran; its causes and contexts are searched
            too (Lightning and jsonargparse may wrap it).

    Returns:
        A :class:`LoaderWorkerError` naming the cause (the file-size limit, a full
        ``/dev/shm``, memory, the open-file limit, a worker killed by a signal) and the fix
        (``num_workers=0``, which reads chips in the job's own process without shared
        memory, or the limit to raise), or None when the error is not one of those.
    """
    for found in exception_chain(err):
        if isinstance(found, EOFError | OSError) and _in_fd_passing(found):
            cause, fix = _SHM_CAUSES[errno.EMFILE]
            return LoaderWorkerError(
                "a DataLoader worker reading chips could not pass chips through shared memory: "
                f"its end closed before the job took a batch ({cause}, most often); rerun "
                f"with num_workers=0 (chips read in the job's own process, no shared memory), "
                f"or {fix}"
            )
        if not isinstance(found, RuntimeError):
            continue
        text = str(found)
        failure = _SHM_FAILURE.search(text)
        killed = re.search(r"DataLoader worker \(pid[^)]*\) is killed by signal: ([^.]+)", text)
        # runtime.BatchHandOverError: the batch was read but could not be sent
        # (its message's last line: the worker's traceback above it shows the raising line)
        sent = re.findall(r"could not hand a batch over to the job: ([^\n]*)", text)
        unsent = sent[-1] if sent else None
        code = re.search(r"\[Errno (\d+)\]", unsent) if unsent is not None else None
        if failure is not None or code is not None:
            errno_ = int((failure or code)[1])  # type: ignore[index]
            cause, fix = _SHM_CAUSES.get(errno_, (os.strerror(errno_), "free the resource"))
            what = f"could not pass chips through shared memory: {cause}"
        elif unsent is not None:  # no errno: a sample that cannot be pickled, most often
            what = f"could not send its batch to the job ({unsent})"
            fix = "make every value of a sample a tensor or a number"
        elif killed is not None:
            bus = "bus" in killed[1].lower()
            what = f"was killed by signal {killed[1]}" + (
                ": /dev/shm is too small for a batch (a container's default is 64 MB)"
                if bus
                else " (the kernel's out-of-memory killer, most often)"
            )
            fix = (
                "give /dev/shm more (docker run --shm-size=2g)"
                if bus
                else "use a smaller batch (batch_size=)"
            )
        elif "DataLoader worker" in text and "exited unexpectedly" in text:
            what = "exited unexpectedly (a bus error: /dev/shm too small, most often)"
            fix = "give /dev/shm more (docker run --shm-size=2g)"
        else:
            continue
        return LoaderWorkerError(
            f"a DataLoader worker reading chips {what}; rerun with num_workers=0 (chips read "
            f"in the job's own process, no shared memory), or {fix}"
        )
    return None


def end_workers_without_group(trainer: pl.Trainer) -> None:
    """In a launcher whose job failed before its process group formed: kill its DDP workers.

    Lightning's launcher starts the other ranks first (``python -m torchgeo_dofa ...`` again)
    and they wait for rank 0 at the rendezvous, for up to the process-group timeout (30 min),
    deaf to SIGTERM and Ctrl-C (inside a C++ call); only a ``kill -9`` ended them, and a
    leftover that later reached a new job on the same port broke it (rank 0 failed with
    gloo's "Connection reset by peer"). Lightning kills them itself only after a Ctrl-C. A
    no-op in a worker, where Lightning started none, and once the process group exists
    (ranks that joined it end with rank 0: :func:`die_with_launcher`, Lightning's watcher).

    Args:
        trainer: the trainer whose ``fit`` / ``predict`` (...) raised.
    """
    import torch.distributed as dist

    workers = getattr(trainer.strategy.launcher, "procs", None)  # _SubprocessScriptLauncher
    if not isinstance(workers, list) or not workers:
        return
    if dist.is_available() and dist.is_initialized():
        return
    started = list(workers)
    # emptied in place first: Lightning's watcher thread polls this list, and a worker it saw
    # killed would make it kill this process too (before the job's error is reported)
    workers.clear()
    for proc in started:
        with contextlib.suppress(OSError):
            proc.kill()
    for proc in started:
        with contextlib.suppress(Exception):
            proc.wait(timeout=10)


@dataclass(frozen=True)
class InputFile:
    """One input file as the manifest identifies it.

    Attributes:
        path: resolved absolute path.
        size: size in bytes.
        mtime_ns: modification time in nanoseconds (a rewritten file changes it).
    """

    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> InputFile:
        """Identify a file on disk.

        Args:
            path: the file.

        Returns:
            Its identity.
        """
        p = Path(path).resolve()
        stat = p.stat()
        return cls(str(p), stat.st_size, stat.st_mtime_ns)


def _texts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _input_files(value: Any) -> bool:
    fields = {f.name for f in dataclasses.fields(InputFile)}
    return isinstance(value, list) and all(
        isinstance(v, dict) and set(v) == fields and isinstance(v["path"], str) for v in value
    )


#: What an embed job writes: grids and tables (a manifest listing anything else was edited).
_OUTPUT_SUFFIXES = frozenset((*GRID_SUFFIXES, *TABLE_SUFFIXES))


def _text(value: Any) -> bool:
    return isinstance(value, str)


#: What each field of a stored :class:`JobManifest` must hold (checked as it is read), and
#: how its message says it.
_MANIFEST_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "inputs": (_input_files, "a list of input files"),
    "file_bands": (lambda v: v is None or _texts(v), "a list of band names or null"),
    "bands": (_texts, "a list of band names"),
    "wavelengths": (
        lambda v: isinstance(v, list) and all(_number(w) for w in v),
        "a list of numbers",
    ),
    "chip_size": (_count, "a whole number"),
    "stride": (_count, "a whole number"),
    "outputs": (_texts, "a list of file names"),
    "region": (lambda v: isinstance(v, dict), "an object"),
    "data": (
        lambda v: (
            v is None or (isinstance(v, dict) and all(isinstance(d, dict) for d in v.values()))
        ),
        "an object of objects or null",
    ),
    "format": (_count, "a whole number"),
} | {
    k: (_text, "a string")
    for k in ("variant", "weights", "pooled_norm", "input_prep", "precision", "output", "version")
}


@dataclass
class JobManifest:
    """What defines an embed job's results; stored beside them as ``.torchgeo-dofa-job.json``.

    Two runs with equal manifests produce the same files, so the second may resume the first.
    Fields are compared in the order below; the first that differs is named in the error.

    Attributes:
        inputs: every input file (sorted by path).
        file_bands: names given to the bands of files without descriptions, or None.
        bands: the bands fed to the model, in order.
        wavelengths: their wavelengths (micrometres).
        variant: ``base`` or ``large``.
        weights: identity of the weights (:func:`weights_identity`): ``sha256:<hex>`` of a
            checkpoint file, ``random:seed=<n>``, or ``official:<repo>@<commit>/<file>``.
        pooled_norm: ``trained`` or ``plain``.
        input_prep: ``resize`` or ``tile``.
        chip_size: chip side in input pixels.
        stride: chip stride in input pixels.
        precision: ``32`` or ``bf16`` (as given to Lightning).
        output: ``grid``, ``pooled`` or ``both``.
        outputs: the files the job writes, relative to the output folder (sorted). These, and
            their ``.parts`` folders, are what ``overwrite=True`` deletes.
        region: the area selection (:func:`region_identity`): ``{}`` (whole rasters),
            ``{"bbox": [...]}``, or ``{"points_sha256": ..., "buffer_m": ...,
            "skip_outside": ...}``; any other setting that changes the chips (a time range)
            may be added as a key.
        data: per region (by output name), how its pixels are read, as text
            (:func:`data_identity`): the dataset class, the CRS, resolution, no-data masking,
            band indexes and reflectance offsets as read (``nodata=0`` for a file declaring
            0 is the same job), and any other dataset argument as given. None in a manifest
            written before this field existed (not compared).
        version: the torchgeo-dofa version that wrote the outputs.
        format: manifest format version.
    """

    inputs: list[InputFile]
    file_bands: list[str] | None
    bands: list[str]
    wavelengths: list[float]
    variant: str
    weights: str
    pooled_norm: str
    input_prep: str
    chip_size: int
    stride: int
    precision: str
    output: str
    outputs: list[str]
    region: dict[str, Any] = field(default_factory=dict)
    data: dict[str, dict[str, str]] | None = None
    version: str = ""
    format: int = MANIFEST_FORMAT

    def __post_init__(self) -> None:
        """Normalise: inputs and outputs sorted, numbers rounded as stored, version filled."""
        self.inputs = sorted(
            (i if isinstance(i, InputFile) else InputFile(**i) for i in self.inputs),
            key=lambda i: i.path,
        )
        self.outputs = sorted(str(o) for o in self.outputs)
        self.wavelengths = [round(float(w), 6) for w in self.wavelengths]
        self.bands = [str(b) for b in self.bands]
        if self.file_bands is not None:
            self.file_bands = [str(b) for b in self.file_bands]
        if not self.version:
            from . import __version__

            self.version = __version__
        for out in self.outputs:
            if Path(out).is_absolute() or ".." in Path(out).parts or "/" in out:
                raise ValueError(f"manifest outputs are file names in the folder, got {out!r}")
            if out.startswith(".") or Path(out).suffix.lower() not in _OUTPUT_SUFFIXES:
                raise ValueError(
                    f"manifest outputs are GeoTIFF / GeoParquet file names, got {out!r}"
                )

    def to_json(self) -> dict[str, Any]:
        """The manifest as a JSON-ready dict (field order kept)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobManifest:
        """Rebuild a manifest from :meth:`to_json`.

        Args:
            data: the dict.

        Returns:
            The manifest.

        Raises:
            ValueError: if it is not a JSON object, if fields are missing or unknown, or a
                field's value is not of its kind (a list of names, a number ...): a manifest
                edited or damaged (``[]`` failed with an ``AttributeError`` traceback, and
                ``"outputs": "a.tif"`` was taken as the outputs ``a``, ``.``, ``t``, ``i``,
                ``f``, which ``--overwrite`` then deleted).
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"the manifest is a JSON {type(data).__name__}, not an object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown manifest fields {sorted(unknown)}")
        for key, value in data.items():
            holds, kind = _MANIFEST_KINDS[key]
            if not holds(value):
                raise ValueError(f"manifest field {key!r} holds {value!r}, not {kind}")
        return cls(**{k: v for k, v in data.items()})

    def first_difference(self, other: JobManifest) -> tuple[str, Any, Any] | None:
        """The first field (in declaration order) where two manifests differ.

        Args:
            other: the manifest to compare with (e.g. the stored one).

        Returns:
            ``(field, other's value, this value)`` or None if equal. For ``inputs`` the
            value is the first differing file entry; for ``data``, the field is
            ``data:<setting>`` (e.g. ``data:nodata``) and the values are its text.
        """
        mine, theirs = self.to_json(), other.to_json()
        for f in dataclasses.fields(self):
            a, b = theirs.get(f.name), mine.get(f.name)
            if a == b:
                continue
            if f.name == "inputs":
                return "inputs", *_first_input_difference(a or [], b or [])
            if f.name == "data":
                if a is None or b is None:  # recorded on one side only (an older version)
                    continue
                found = _first_data_difference(a, b)
                if found is None:  # differ only where not compared
                    continue
                return found
            if f.name == "file_bands" and theirs.get("data") and mine.get("data"):
                continue  # its effect is in data (bands read, band indexes), as read
            return f.name, a, b
        return None

    def check_or_write(
        self,
        folder: str | os.PathLike[str],
        overwrite: bool = False,
        name: str = MANIFEST_NAME,
        given: Sequence[str] = (),
    ) -> bool:
        """Start or resume this job in ``folder``; call it while holding :class:`OutputLock`.

        * no manifest and none of this job's outputs or parts in the folder: a new job,
          the manifest is written (atomically);
        * the same manifest: the job resumes (temporary files of killed writes are removed,
          and the parts of outputs that are already complete);
        * another manifest: :class:`JobMismatchError` naming the first setting that
          differs, nothing is touched;
        * outputs or parts of this job's names but no manifest (an older version, or files
          of unknown origin): :class:`JobMismatchError`, nothing is touched;
        * ``overwrite=True``: the previous job's outputs (from its manifest) and this job's
          output names are deleted with their parts and temporaries, then the manifest is
          written: the job starts afresh;
        * an output listed by another job's manifest in the folder (``-o DIR`` beside
          ``-o DIR/NAME.tif``): :class:`JobMismatchError`, also with ``overwrite``.

        Only the launching process acts (:func:`is_launcher`); DDP workers return at once.

        Args:
            folder: the output folder (created if needed).
            overwrite: replace the previous job's outputs instead of refusing.
            name: the manifest's file name (one per job: a folder holds one job, an output
                named by the user, ``-o NAME.tif``, has ``.NAME.tif.torchgeo-dofa-job.json``).
            given: the reading options this job was given (``--nodata``, ``--crs``): a
                manifest of an older version, without :attr:`data`, cannot show they are the
                same, so the job is refused (without any, it resumes with a warning).

        Returns:
            True when the manifest was written (a new job, or ``overwrite``); False when the
            job resumes, and in a DDP worker.

        Raises:
            JobMismatchError: if the folder holds another job's results and not overwrite.
            RuntimeError: if the folder's lock is not held by this process.
        """
        if not is_launcher():
            return False
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if folder.resolve() not in OutputLock._held:
            raise RuntimeError(
                f"JobManifest.check_or_write({str(folder)!r}) must run inside OutputLock(folder)"
            )
        path = folder / name
        for output in self.outputs:  # another embed job's file (a -o NAME.tif job beside it)
            owner = embed_manifest_listing(folder, output, skip=name)
            if owner is not None:
                raise JobMismatchError(
                    f"output {folder / output} is a result of another torchgeo-dofa embed "
                    f"job, recorded in {owner}: choose another -o (--overwrite replaces only "
                    "this job's own results)"
                )
        previous: JobManifest | None = None
        problem = ""
        if path.exists():
            try:
                previous = JobManifest.from_json(json.loads(path.read_text()))
            except (ValueError, TypeError, OSError) as err:
                problem = f"its job manifest {path} is unreadable ({err})"
        if overwrite:
            old = previous.outputs if previous is not None else []
            inputs = {i.path for i in self.inputs}  # resolved paths
            listed = [n for n in old if str((folder / n).resolve()) in inputs]
            if listed:  # an edited manifest: deleting the job's own input loses data
                raise JobMismatchError(
                    f"the job manifest {path} lists {', '.join(listed)}, an input of this "
                    "job, as an output: it was edited or damaged; --overwrite deletes nothing: "
                    "delete that manifest (keep the input) and rerun, or choose another -o"
                )
            for name in sorted(set(old) | set(self.outputs)):
                _remove_output(folder / name)
        elif previous is not None:
            diff = self.first_difference(previous)
            if diff is None and previous.data is None and given:
                raise JobMismatchError(
                    f"output folder {folder} holds the results of an older torchgeo-dofa job, "
                    f"whose manifest does not record how pixels were read ({', '.join(given)}"
                    " cannot be checked): rerun with --overwrite to compute them with these "
                    "settings, or choose another -o"
                )
            if diff is None:
                if previous.data is None:
                    warn(
                        f"output folder {folder} holds the results of an older torchgeo-dofa "
                        "job, whose manifest does not record how pixels were read: if it was "
                        "run with --nodata or --crs, rerun with --overwrite",
                        UserWarning,
                    )
                for name in self.outputs:
                    _clean_resumed(folder / name)
                return False
            deleted = ", ".join(previous.outputs) or "none listed"
            suffix = next((Path(n).suffix for n in self.outputs), ".tif")  # a file this job writes
            named = shlex.quote(f"{folder}{os.sep}NAME{suffix}")
            raise JobMismatchError(
                f"output folder {folder} holds another job's results: {_difference(*diff)}; "
                f"rerun with --overwrite to replace them (it deletes {deleted}), or choose "
                f"another -o to keep them (another folder; for one region, -o {named} is a "
                "job of its own beside them)"
            )
        else:
            present = [
                q.name
                for n in self.outputs
                for q in (folder / n, parts_dir(folder / n))
                if q.exists()
            ]
            if problem or present:
                what = problem or f"it holds {', '.join(present)} without a job manifest"
                raise JobMismatchError(
                    f"cannot tell whether output folder {folder} holds this job's results: "
                    f"{what}; rerun with --overwrite to replace them, or choose another -o"
                )
        text = json.dumps(self.to_json(), indent=1)
        atomic_write(path, lambda p: p.write_text(text + "\n"), durable=True)
        return True


def _first_input_difference(before: list[dict[str, Any]], now: list[dict[str, Any]]) -> tuple:
    old = {i["path"]: i for i in before}
    new = {i["path"]: i for i in now}
    for p in sorted(set(old) | set(new)):
        if old.get(p) != new.get(p):
            return old.get(p, "absent"), new.get(p, "absent")
    return before, now  # pragma: no cover - equal dicts compare equal


def _first_data_difference(
    before: dict[str, dict[str, str]], now: dict[str, dict[str, str]]
) -> tuple[str, Any, Any] | None:
    """The first reading setting that differs, as ``("data:<name>", before, now)``.

    Compared as the parts identity is (:func:`~torchgeo_dofa.writers.identity_differences`):
    a setting recorded on one side only is not compared, nor the spelling of an argument
    whose effect both sides record as read.
    """
    for region in sorted(set(before) & set(now)):  # other regions: other outputs, named first
        old, new = before[region], now[region]
        for key in identity_differences(old, new)[:1]:
            name = key.removeprefix("data.")  # an embed option's name: --nodata
            if len(before | now) > 1:
                name += f" of {region}"
            return f"data:{name}", stored_setting(old, key), new[key]
    return None


def data_identity(identity: Mapping[str, str]) -> dict[str, str]:
    """The reading settings of a data module's ``job_identity()``, as a manifest keeps them.

    Everything but what the manifest records in its own fields (inputs, input preparation,
    chip size, stride, region) or what a manifest need not compare (the preprocessing, which
    ``embed`` sets): the dataset class, how the pixels are read (CRS, resolution, no-data
    masking, band indexes, offsets: as read, not as spelled) and any other dataset argument.

    Args:
        identity: :meth:`torchgeo_dofa.datamodules.DOFAPredictDataModule.job_identity`.

    Returns:
        The settings, as text, in the identity's order.
    """
    return {k: v for k, v in identity.items() if k not in _MANIFEST_FIELDS_OF_THE_DATA}


#: ``job_identity()`` keys the manifest has as fields of its own, or that embed fixes.
_MANIFEST_FIELDS_OF_THE_DATA = frozenset(
    {"sources", "preprocess", "input_prep", "transforms", "chip_size", "stride"}
    | {"roi", "points", "time"}
)


def _difference(name: str, before: Any, now: Any) -> str:
    """One clause naming a difference between the stored and the new manifest."""
    if name.startswith("data:"):  # a reading setting: its values are already text
        return describe_change(name.removeprefix("data:"), before, now, verbatim=True)
    if name == "weights" and str(before).startswith("random:unseeded:"):
        return (
            "they come from random weights without a seed (--weights none without --seed), "
            "drawn anew on every run, so they cannot be resumed (a job started with --seed N "
            "can be)"
        )
    if name != "inputs":
        return describe_change(name, before, now)
    if before == "absent":
        return f"input {now['path']} is new to this job"
    if now == "absent":
        return f"input {before['path']} is no longer part of this job"
    changes = [
        f"{key} {before[key]} -> {now[key]}"
        for key in ("size", "mtime_ns")
        if before.get(key) != now.get(key)
    ]
    return f"input {now['path']} changed since ({', '.join(changes)})"


def _clean_resumed(path: Path) -> None:
    """Before resuming, drop a killed write's temporaries and a complete output's parts.

    A final file exists only once verified, so its parts are leftovers of a job killed
    between the rename and their removal.
    """
    for tmp in stale_temps(path):
        tmp.unlink(missing_ok=True)
    if path.exists():
        shutil.rmtree(parts_dir(path), ignore_errors=True)


def _remove_output(path: Path) -> None:
    """Delete an output file, its parts folder and its temporaries."""
    for tmp in stale_temps(path):
        tmp.unlink(missing_ok=True)
    path.unlink(missing_ok=True)
    shutil.rmtree(parts_dir(path), ignore_errors=True)


def weights_identity(
    weights: str | os.PathLike[str] | None, variant: str, seed: int | None = None
) -> str:
    """What the manifest records about the weights: equal only for the same model.

    Args:
        weights: ``"official"``, a checkpoint path, or None (random).
        variant: ``base`` or ``large``.
        seed: the seed of random weights (``--seed``).

    Returns:
        ``random:seed=<n>``; ``random:unseeded:<uuid4>`` for random weights without a seed
        (never equal: such a job cannot be resumed, rerun it with ``--overwrite`` or set a
        seed); ``official:<repo>@<commit>/<file>`` for a file from the Hugging Face cache
        (the snapshot's commit, not a moving branch name); ``sha256:<hex>`` of any other
        file (an explicit path or one named by ``TORCHGEO_DOFA_*`` variables), so a file
        replaced under the same name is a different job.

    Raises:
        CheckpointError: if the weights cannot be found (as when loading them).
    """
    if weights is None:
        return f"random:seed={seed}" if seed is not None else f"random:unseeded:{uuid.uuid4()}"
    resolution = resolve_weights(variant, weights)
    if resolution.source.startswith("hub:"):
        repo = resolution.source.removeprefix("hub:").split("@")[0]
        commit = resolution.path.parent.name  # <cache>/snapshots/<commit>/<file>
        return f"official:{repo}@{commit}/{resolution.path.name}"
    return f"sha256:{checkpoint_sha256(resolution.path)}"


def region_identity(
    bbox: Sequence[float] | None = None,
    points: str | os.PathLike[str] | None = None,
    buffer_m: float | None = None,
    skip_outside: bool = False,
    datetime: str | None = None,
) -> dict[str, Any]:
    """The manifest's ``region`` field for the CLI's area and time options.

    Args:
        bbox: ``--bbox`` (minlon, minlat, maxlon, maxlat), or None.
        points: ``--points`` file, or None (identified by the sha256 of its content).
        buffer_m: ``--buffer-m`` (recorded with points only).
        skip_outside: ``--skip-outside`` (recorded with points only).
        datetime: ``--datetime`` as given, or None (a job over other dates is another job).

    Returns:
        ``{}`` for whole rasters, ``{"bbox": [...]}``, and/or ``{"points_sha256": ...,
        "buffer_m": ..., "skip_outside": ...}``, and ``{"datetime": ...}``.
    """
    region: dict[str, Any] = {}
    if bbox is not None:
        region["bbox"] = [float(v) for v in bbox]
    if points is not None:
        region["points_sha256"] = sha256_file(Path(points))
        region["buffer_m"] = float(buffer_m) if buffer_m is not None else None
        region["skip_outside"] = bool(skip_outside)
    if datetime is not None:
        region["datetime"] = str(datetime).strip()
    return region


_SignalHandler = Callable[[int, FrameType | None], Any] | int | None


def _chips_all_computed(trainer: pl.Trainer | None) -> bool:
    """Whether a prediction has computed and written every batch (its writers now assemble).

    Also where its loop had no batch to run (an earlier run wrote every chip: the writers
    assemble in their teardown); not before its data loader exists.
    """
    if trainer is None:
        return False
    totals = list(trainer.num_predict_batches)
    if not totals or not all(math.isfinite(t) for t in totals):
        return False
    return trainer.predict_loop.batch_progress.total.completed >= sum(totals)


class StopOnSignal(Callback):
    """Stop a job cleanly on SIGINT / SIGTERM: an embed job after the current batch is written.

    The handler only records the signal. The job stops at the next batch boundary: after a
    batch, once every prediction writer has written its parts (this callback must come
    after the writers in ``Trainer(callbacks=...)``; :meth:`setup` checks), or before the
    next batch is computed, by raising :class:`JobInterrupted` (Lightning's predict loop has
    no ``should_stop``). Used as a context manager around the job (as ``embed`` and
    ``predict --config`` do), it is installed before the trainer runs, so Lightning's own
    SIGTERM handler, which forwards the signal to the DDP workers it started, composes with
    it and still runs; passed to a trainer alone, it replaces Lightning's at predict start
    and DDP workers get no SIGTERM from the launcher. A second signal gets the
    previous handlers' behaviour (Python's ``KeyboardInterrupt`` for SIGINT, termination for
    SIGTERM): press Ctrl-C twice to stop at once.

    Use it as a context manager around the whole job (several regions, several trainers)
    and pass it to every trainer; or pass it to a trainer alone, and it installs its handlers
    for that ``predict`` only. Previous handlers are restored when it exits.

    Training, validation and testing (``torchgeo-dofa fit / validate / test``, where it is
    used as a context manager) stop the same way at the end of the batch in progress, after
    its optimizer step: ``fit`` first saves the training state as ``interrupted.ckpt`` in
    the checkpoint folder (the first ``ModelCheckpoint``'s, else ``<log dir>/checkpoints``;
    written under a hidden name and renamed, so never partial), and the
    :class:`JobInterrupted` raised names it for ``--ckpt_path``. A signal during ``fit``'s
    validation lets it finish: training stops at the next training batch end, or at the
    epoch's end after its ``ModelCheckpoint`` saves (a state saved inside the validation
    resumed without the rest of it). A signal before the trainer starts stops it at setup
    (or in the sanity check), nothing saved. Lightning alone
    ended ``fit`` on SIGTERM with exit status 0 and nothing saved, and this callback used
    to swallow a first Ctrl-C there (training went on to its last epoch). With several
    processes (DDP) training keeps Lightning's handling: SIGTERM stops at a batch end, a
    Ctrl-C at once (Lightning's graceful shutdown), exit status 143 / 130 from the command,
    nothing saved at the stop (a checkpoint save waits for every rank, and ranks may stop at
    different batches).

    Attributes:
        received: the first signal received, or None.
        announce: the program name to acknowledge the first signal with on stderr (one
            line, e.g. ``torchgeo-dofa: Ctrl-C: stopping once the batch or output in
            progress is written; Ctrl-C again stops at once``), or None for silence; said
            by the process that installed the handler, and in a DDP job by the launcher
            only. The command line sets it: a job's last output can take seconds to
            assemble, and a silent Ctrl-C looked ignored.
        final: whether the prediction being run is the job's last (default True; ``embed``
            sets it False for every region but its last). A signal once its chips are all
            computed (its writers assembling) then stops nothing, as no check follows: the
            job finishes its outputs, and the acknowledgement says "every chip is computed,
            so the job finishes writing its outputs".
        began: whether a prediction run with this callback wrote a batch (set at each
            batch's end, after the writers): a stop before says ``embed stopped before its
            first chip`` (:func:`stop_advice`), as nothing of the job is left then.
    """

    signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: str | None = None, command: str = "predict") -> None:
        """Create the callback (no handler installed yet).

        Args:
            announce: see the class attribute.
            command: the command a stopped prediction is advised for (:func:`stop_advice`:
                ``embed`` and ``predict`` name their own options).
        """
        self.received: int | None = None
        self.announce = announce
        self.command = command
        self._pid = os.getpid()
        self._previous: dict[int, _SignalHandler] = {}
        self._context = False
        #: the LightningCLI subcommand (``fit``, ``validate``, ``test``; set by the command
        #: line before the trainer exists, and at setup) or None (a prediction): the
        #: acknowledgement says what happens
        self.stage: str | None = None
        #: the trainer being run (set at setup): the acknowledgement says where it stops
        self._trainer: pl.Trainer | None = None
        #: training or evaluation with several processes (set at setup): signals get
        #: Lightning's own handling (see :meth:`_handle`)
        self._lightnings = False
        #: how a signal ended training or evaluation (with the checkpoint saved), or None
        self.interrupted: JobInterrupted | None = None
        #: a signal during ``fit``'s validation ended training at the epoch's end
        self._epoch_end_stop = False
        #: the signal came once ``fit``'s last epoch had trained: it finished, nothing to
        #: resume (the command then exits 0, as without the signal)
        self.finished_anyway = False
        #: whether a rerun resumes a stopped prediction (False for random weights drawn
        #: without a seed; set at the prediction's start)
        self.resumable = True
        self.final = True  # see the class's attributes
        self.began = False  # see the class's attributes
        #: the prediction's trainer (set at setup)
        self._predicting: pl.Trainer | None = None

    @property
    def advice(self) -> str:
        """What a stopped prediction kept and how to go on (:func:`stop_advice`)."""
        return stop_advice(self.command, began=self.began, resumable=self.resumable)

    # installation ---------------------------------------------------------------------
    def install(self) -> None:
        """Install the handlers (main thread only; elsewhere a no-op)."""
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        self._pid = os.getpid()  # forked DataLoader workers inherit the handler, not the job
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Put the previous handlers back (idempotent).

        Also over a handler set meanwhile by someone else: after a second Ctrl-C, Lightning
        sets SIGINT to ``SIG_IGN`` for its shutdown, which would otherwise outlive the job
        (a notebook's kernel could no longer be interrupted).
        """
        self._put_back()
        self._previous = {}

    def _put_back(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._lightnings:
            # DDP training: ranks must stop at the same batch, which only Lightning can
            # arrange without a collective call of its own crossing Lightning's (its SIGTERM
            # handler broadcasts): SIGTERM is left to Lightning's handler (composed with
            # this one; it stops at a batch end, exit 143 from the command), a Ctrl-C raises
            # KeyboardInterrupt at once (Lightning's graceful shutdown; exit 130)
            self.received = self.received or signum
            if signum == signal.SIGINT and os.getpid() == self._pid:  # not in loader workers
                raise KeyboardInterrupt
            return
        if self.received is None:
            self.received = signum
            # a terminal's Ctrl-C reaches the loader workers (forked with this handler) and
            # every DDP rank too: the job's launching process alone says it
            if self.announce and os.getpid() == self._pid and is_launcher():
                self._acknowledge(signum)
            return
        # a second signal: stop now, as without this callback (the handlers are put back
        # again when the job ends, see restore)
        previous = self._previous.get(signum)
        self._put_back()
        if callable(previous) and not _composes(previous) and not _before_the_job(previous):
            previous(signum, frame)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _acknowledge(self, signum: int) -> None:
        """Say on stderr that the signal was received and what happens next."""
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        again = "Ctrl-C again" if signum == signal.SIGINT else f"a second {name}"
        trainer = self._trainer
        if self.stage in ("validate", "test"):
            what = "stopping after the batch in progress"
        elif self.stage != "fit" and self.final and _chips_all_computed(self._predicting):
            what = "every chip is computed, so the job finishes writing its outputs"
        elif self.stage != "fit":
            what = "stopping once the batch or output in progress is written"
        elif trainer is None or trainer.sanity_checking:
            what = "stopping before training begins (nothing to save yet)"
        elif _last_epoch_trained(trainer):
            what = "the last epoch has trained, so training finishes (nothing to resume)"
        elif trainer.validating:
            what = (
                "stopping once the validation in progress ends, saving a checkpoint to resume from"
            )
        else:
            what = (
                "stopping after the training batch in progress, saving a checkpoint to resume from"
            )
        line = f"{self.announce}: {name}: {what}; {again} stops at once\n"
        # os.write, not print: a handler runs between two bytecodes of the main thread,
        # which may be inside a write to sys.stderr's buffer (a reentrant write raises);
        # on a terminal, the progress bar's line is left first
        with contextlib.suppress(OSError):
            os.write(2, (("\n" if os.isatty(2) else "") + line).encode())

    def raise_if_received(self) -> None:
        """Raise :class:`JobInterrupted` if a signal was received.

        Raises:
            JobInterrupted: carrying the signal.
        """
        if self.received is not None:
            raise JobInterrupted(self.received, self.advice)

    def __enter__(self) -> Self:
        """Install the handlers for the whole job."""
        self._context = True
        self.install()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Restore the previous handlers."""
        self._context = False
        self.restore()

    # Lightning hooks ------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check that every prediction writer runs before this callback.

        Raises:
            RuntimeError: if a ``BasePredictionWriter`` comes after it in the callbacks.
        """
        stage = str(getattr(stage, "value", stage))  # Lightning passes TrainerFn.FITTING
        self._lightnings = stage != "predict" and trainer.world_size > 1
        if stage != "predict":
            self.stage, self._trainer = stage, trainer
        else:
            self._predicting = trainer
        callbacks = list(trainer.callbacks)  # type: ignore[attr-defined]
        me = callbacks.index(self)
        late = [
            type(c).__name__ for c in callbacks[me + 1 :] if isinstance(c, BasePredictionWriter)
        ]
        if late:
            raise RuntimeError(
                f"StopOnSignal must come after the prediction writers in Trainer(callbacks=...) "
                f"so that a batch is written before the job stops; {late} come after it"
            )
        if (
            stage != "predict"
            and self._previous
            and self.received is not None
            and not self._lightnings
        ):
            raise self._not_begun(stage)

    def _not_begun(self, stage: str) -> JobInterrupted:
        """The :class:`JobInterrupted` of a signal received before ``stage`` began."""
        self.interrupted = JobInterrupted(
            self.received or signal.SIGTERM,
            stop_advice(stage, began=False),
        )
        return self.interrupted

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Install the handlers (unless used as a context manager); stop if already signalled."""
        # random weights without a seed (DOFAEncoder.weights_id "random") differ per run,
        # unless a checkpoint's replaced them (a task's predict --ckpt_path: restored by now)
        encoder = getattr(pl_module, "encoder", None)
        unseeded = getattr(encoder, "weights_id", None) == "random"
        self.resumable = not unseeded or bool(trainer.ckpt_path)
        if not self._context:
            self.install()
        self.raise_if_received()

    def on_predict_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Stop before computing a batch if a signal arrived while it was loaded."""
        self.raise_if_received()

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Stop after the writers saved this batch if a signal arrived meanwhile."""
        self.began = True  # (the writers, before this callback, have written it)
        self.raise_if_received()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """After the batch's optimizer step: save the training state and stop if signalled."""
        self._stop_training(trainer)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Stop validating if signalled; within ``fit``, let the validation finish.

        A ``fit`` stopped inside its validation saved a state whose resume skipped the rest
        of that validation (its metrics, the ``ModelCheckpoint`` it drives): ``fit`` stops
        at the training batch or epoch end that follows instead (see
        :meth:`on_train_epoch_end`), or at once, with nothing to save, in the sanity check
        before training.
        """
        if trainer.state.fn != TrainerFn.FITTING:
            self._stop_training(trainer)
        elif trainer.sanity_checking and self._previous and self.received is not None:
            if trainer.world_size == 1:
                raise self._not_begun("fit")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the epoch's validation, if signalled: end training after this epoch.

        ``trainer.should_stop``, so the ``ModelCheckpoint`` saves of the epoch (they come
        after this callback) still run; :meth:`on_train_end` then saves and stops.
        """
        if not (self._previous and self.received is not None and trainer.world_size == 1):
            return
        if _last_epoch(trainer):  # training ends here anyway: it finishes, exit status 0
            self._finished_anyway()
            return
        trainer.should_stop = True
        self._epoch_end_stop = True

    def _finished_anyway(self) -> None:
        """A stop that came once the last epoch had trained: say so once (training finishes)."""
        if self.finished_anyway:
            return
        self.finished_anyway = True
        if self.announce and is_launcher():
            print(
                f"{self.announce}: the stop came after the last epoch had trained: training "
                "finished, nothing to resume",
                file=sys.stderr,
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save the training state and stop, where :meth:`on_train_epoch_end` ended training.

        A signal that came after that hook in the last epoch (the epoch's checkpoints being
        saved) lets training finish: said once, as there.

        Raises:
            JobInterrupted: naming the saved checkpoint.
        """
        if self._epoch_end_stop:
            raise self._interruption(trainer, f"at the end of epoch {trainer.current_epoch - 1}")
        if self._previous and self.received is not None and trainer.world_size == 1:
            self._finished_anyway()

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Stop testing if signalled."""
        self._stop_training(trainer)

    def _stop_training(self, trainer: pl.Trainer) -> None:
        """Stop training / evaluation at this batch end if a signal arrived (one process).

        Only where the handlers are installed (used as a context manager), so a trainer that
        merely carries this callback keeps Lightning's own handling; and only in a
        one-process run (see :meth:`_handle` for several).

        Raises:
            JobInterrupted: naming the saved checkpoint, if any.
        """
        if self._previous and self.received is not None and trainer.world_size == 1:
            raise self._interruption(trainer)

    def _interruption(self, trainer: pl.Trainer, where: str | None = None) -> JobInterrupted:
        """Save a fitting trainer's state; the :class:`JobInterrupted` that says so.

        Sets :attr:`interrupted` (read by the command line once Lightning has ended the run).

        Args:
            trainer: the trainer.
            where: where training stopped, for the message (default: in the current epoch
                after the current step).
        """
        signum = self.received if self.received is not None else signal.SIGTERM
        if trainer.state.fn != TrainerFn.FITTING:
            stage = str(trainer.state.fn.value) if trainer.state.fn else None
            began = self.began or stage != "predict"  # (validate, test: stopped in them)
            advice = stop_advice(stage, began=began, resumable=self.resumable)
            what = f"{stage} did not finish; {advice}" if stage else None
            self.interrupted = JobInterrupted(signum, what)
            return self.interrupted
        path = interrupted_checkpoint_path(trainer)
        _save_checkpoint_whole(trainer, path)  # one process (see _stop_training)
        self.interrupted = JobInterrupted(
            signum,
            f"training stopped {where or f'in epoch {trainer.current_epoch}'} after step "
            f"{trainer.global_step}, its state saved in {path}: resume with the same command "
            f"and --ckpt_path {path}",
        )
        return self.interrupted

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore the handlers (when not used as a context manager)."""
        if not self._context:
            self.restore()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Save ``fit``'s state if Lightning's stop on SIGTERM ended a signalled run.

        See :meth:`_stop_training`. In a DDP launcher whose process group never formed, kill
        the workers it started (:func:`end_workers_without_group`). Also restore the handlers
        (when not used as a context manager).
        """
        end_workers_without_group(trainer)
        if (
            self._previous
            and self.received is not None
            and self.interrupted is None
            and isinstance(exception, SIGTERMException)
            and trainer.world_size == 1  # ranks may stop at different batches: no barrier
        ):
            # a SIGTERM just after this callback's last check: Lightning stops at the next
            # batch or, once an epoch has ended (its checkpoints saved), before the next one
            progress = trainer.fit_loop.epoch_progress.current
            between = trainer.state.fn == TrainerFn.FITTING and progress.ready == progress.completed
            if between and _training_done(trainer):
                self._finished_anyway()  # the last epoch ended: nothing to resume
            elif between or self._epoch_end_stop:
                self._interruption(trainer, f"at the end of epoch {trainer.current_epoch - 1}")
            else:
                self._interruption(trainer)
        if not self._context:
            self.restore()


def _training_done(trainer: pl.Trainer) -> bool:
    """Whether ``fit`` has trained its ``max_epochs`` epochs (or ``max_steps`` steps)."""
    return _limit_reached(trainer, trainer.current_epoch)


def _last_epoch_trained(trainer: pl.Trainer) -> bool:
    """Whether ``fit``'s last training batch is done (its validation or checkpoints remain)."""
    if _training_done(trainer):
        return True
    batches = trainer.fit_loop.epoch_loop.batch_progress
    return (  # the last batch fetched and done with (not the one in progress: it stops there)
        _last_epoch(trainer)
        and batches.is_last_batch
        and batches.current.completed == batches.current.ready
    )


def _last_epoch(trainer: pl.Trainer) -> bool:
    """Whether ``fit`` ends after the epoch in progress (its ``max_epochs`` / ``max_steps``)."""
    return _limit_reached(trainer, trainer.current_epoch + 1)


def _limit_reached(trainer: pl.Trainer, epochs: int) -> bool:
    """Whether ``epochs`` ended epochs reach ``max_epochs``, or the steps ``max_steps``.

    ``trainer.current_epoch`` counts the epochs ended.
    """
    loop = trainer.fit_loop
    if loop.max_epochs is not None and loop.max_epochs != -1 and epochs >= loop.max_epochs:
        return True
    return loop.max_steps != -1 and trainer.global_step >= loop.max_steps


def _save_checkpoint_whole(trainer: pl.Trainer, path: Path | str) -> None:
    """``trainer.save_checkpoint(path)`` that never leaves a partial file at ``path``.

    Lightning writes the file through fsspec, which stages it in the temporary folder and
    then moves it: across file systems (``$TMPDIR`` on another disk, as on many clusters)
    the move is a copy, and a kill during it left a truncated ``interrupted.ckpt``. The
    checkpoint is saved under a hidden name beside ``path``, flushed to disk and renamed.
    A remote ``path`` (an fsspec URL, ``s3://...``) is Lightning's to write, as it is.
    """
    # the whole training state, as ModelCheckpoint saves it (weights_only=None logged
    # "`weights_only` was not set, defaulting to `False`." at every stop)
    if isinstance(path, str):
        trainer.save_checkpoint(path, weights_only=False)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.partial"):  # a killed save's, not a live one
        pid = stale.name.removeprefix(f".{path.name}.").removesuffix(".partial")
        if pid.isdigit() and not _running(int(pid)):
            with contextlib.suppress(OSError):
                stale.unlink()
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        trainer.save_checkpoint(partial, weights_only=False)
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


def interrupted_checkpoint_path(trainer: pl.Trainer) -> Path | str:
    """Where an interrupted ``fit`` saves its training state (see :class:`StopOnSignal`).

    Args:
        trainer: the fitting trainer (after setup, when the checkpoint folder is resolved).

    Returns:
        ``interrupted.ckpt`` in the first ``ModelCheckpoint``'s folder, else in
        ``<log dir>/checkpoints`` (Lightning's default checkpoint folder): a path, or a URL
        string where that folder is remote (``s3://...``; ``Path`` would drop a slash).
    """
    callback = trainer.checkpoint_callback
    folder = getattr(callback, "dirpath", None)
    if not folder:
        folder = os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
    if "://" in str(folder):
        return f"{str(folder).rstrip('/')}/interrupted.ckpt"
    return Path(folder) / "interrupted.ckpt"


def _composes(handler: Any) -> bool:
    return type(handler).__name__ == "_HandlersCompose"


def _before_the_job(handler: Any) -> bool:
    """Whether ``handler`` is the command's SIGTERM handler outside a job.

    A second SIGTERM during a job treats it as Python's default: the process ends at once.
    """
    from .__main__ import terminate_before_the_job

    return handler is terminate_before_the_job


def check_points(
    points: Sequence[PointBuffer],
    footprints: Mapping[str, tuple[CRS | str | int, BaseGeometry | Sequence[float]]],
    skip_outside: bool = False,
) -> tuple[dict[str, list[int]], list[int]]:
    """Assign every point to the regions whose raster footprint holds it, before any compute.

    A point belongs to a region when its centre lies in the region's footprint (boundary
    included); a point in several overlapping regions belongs to each.

    Args:
        points: the points (EPSG:4326), in input order.
        footprints: region name -> (CRS, footprint geometry or ``(xmin, ymin, xmax, ymax)``
            bounds in that CRS), e.g. a dataset's ``crs`` and ``index.total_bounds``.
        skip_outside: return the points outside every footprint instead of raising.

    Returns:
        ``(inside, outside)``: region name -> indices of its points (input order), and the
        indices of the points in no region.

    Raises:
        PointsOutsideError: (without ``skip_outside``) one line listing every point outside
            every raster as ``#index (lon, lat)`` (the first 20, then a count) and the fix.
    """
    inside: dict[str, list[int]] = {}
    covered = [False] * len(points)
    for name, (crs, footprint) in footprints.items():
        geom = footprint if isinstance(footprint, BaseGeometry) else box(*footprint)
        target = CRS.from_user_input(crs)
        to_crs = transformer(WGS84, target)
        xs, ys = to_crs.transform([p.lon for p in points], [p.lat for p in points])
        hits = [
            i
            for i, (x, y) in enumerate(zip(xs, ys, strict=True))
            if math.isfinite(x) and math.isfinite(y) and geom.covers(Point(x, y))
        ]
        inside[name] = hits
        for i in hits:
            covered[i] = True
    outside = [i for i, c in enumerate(covered) if not c]
    if outside and not skip_outside:
        raise PointsOutsideError(
            f"{len(outside)} of {len(points)} points lie outside every input raster: "
            f"{_list_points(points, outside)}; fix their coordinates (lon, lat in degrees, "
            "EPSG:4326), add the rasters that cover them, or pass --skip-outside to skip them"
        )
    return inside, outside


def points_outside_warning(points: Sequence[PointBuffer], outside: Sequence[int]) -> str:
    """The warning printed for points skipped under ``--skip-outside``.

    Args:
        points: all points.
        outside: indices of the skipped ones.

    Returns:
        One line.
    """
    return (
        f"skipping {len(outside)} of {len(points)} points outside every input raster "
        f"(--skip-outside): {_list_points(points, outside)}"
    )


def _list_points(points: Sequence[PointBuffer], indices: Iterable[int], limit: int = 20) -> str:
    idx = list(indices)
    shown = ", ".join(f"#{i} ({points[i].lon:.6g}, {points[i].lat:.6g})" for i in idx[:limit])
    return shown + (f" and {len(idx) - limit} more" if len(idx) > limit else "")


def estimate_seconds(chips: int, chips_per_second: float) -> float:
    """Estimated compute time of a job.

    Args:
        chips: chips to compute.
        chips_per_second: measured throughput (e.g. 4.2 chips/s for DOFA base fp32 on the
            README's 2-core CPU; measure yours with ``make bench``).

    Returns:
        Seconds.

    Raises:
        ValueError: if the throughput is not positive.
    """
    if not (chips_per_second > 0 and math.isfinite(chips_per_second)):
        raise ValueError(f"chips_per_second must be positive, got {chips_per_second}")
    return chips / chips_per_second


def job_size_warning(
    chips: int, chips_per_second: float, threshold: int = LARGE_JOB_CHIPS
) -> str | None:
    """The line printed before a job of more than ``threshold`` chips, else None.

    Args:
        chips: chips to compute.
        chips_per_second: measured throughput (see :func:`estimate_seconds`).
        threshold: chip count above which to warn.

    Returns:
        e.g. ``"199809 chips to compute, about 13 h 12 min at 4.2 chips/s: narrow it with
        --bbox or a larger --stride, or stop with Ctrl-C (the job resumes)"``, or None.
    """
    if chips <= threshold:
        return None
    return (
        f"{chips} chips to compute, about {_duration(estimate_seconds(chips, chips_per_second))}"
        f" at {chips_per_second:.3g} chips/s: narrow it with --bbox or a larger --stride, or "
        "stop with Ctrl-C (the job resumes)"
    )


def sparse_grid_problem(
    name: str,
    width: int,
    height: int,
    depth: int,
    chips: int,
    chip_cells: float,
    fix: str = "Give them as separate inputs (a grid each), narrow it with --bbox, or write "
    "--output pooled",
) -> str | None:
    """Why a region's grid GeoTIFF would be a huge, mostly empty file, or None.

    Rasters far apart in one region (a folder of scenes from several places, brought into
    one CRS with ``--crs``) make a grid spanning the gap: two BigEarthNet patches 1800 km apart
    gave 2127 x 11321 cells x 768 bands (74 GB uncompressed) for 2 chips.

    Args:
        name: the region's name.
        width: grid cells across.
        height: grid cells down.
        depth: bands (the encoder's width D).
        chips: chips of the region.
        chip_cells: grid cells one chip covers (196 for 224-px chips).
        fix: what to do instead, in the words of the door used (default: the CLI's options).

    Returns:
        The one-line reason and fix when the grid exceeds :data:`SPARSE_GRID_BYTES`
        uncompressed and its chips cover less than :data:`SPARSE_GRID_COVER` of it.
    """
    cells = width * height
    size = cells * depth * 4
    cover = min(1.0, chips * chip_cells / max(cells, 1))
    if size <= SPARSE_GRID_BYTES or cover >= SPARSE_GRID_COVER:
        return None
    return (
        f"the grid of {name} would be {width} x {height} cells x {depth} bands "
        f"({size / 2**30:.1f} GiB uncompressed) for {chips} chip(s) covering "
        f"{cover * 100:.2g} % of it: its rasters lie far apart. {fix}"
    )


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 1:
        return f"{seconds:.0f} s"
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days} d {hours} h"
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"
