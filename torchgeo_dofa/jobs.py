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
  kernel drops the lock when the process dies, even on ``kill -9``.
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
import fcntl
import itertools
import json
import math
import os
import shutil
import signal
import sys
import threading
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, ClassVar, Self

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from pyproj import CRS, Transformer
from shapely.geometry import Point, box
from shapely.geometry.base import BaseGeometry

from .datasets import unique_region_names
from .spatial import WGS84, PointBuffer
from .weights import resolve_weights, sha256_file
from .writers import (
    OutputPathError,
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
    "LOCK_NAME",
    "MANIFEST_NAME",
    "InputFile",
    "JobError",
    "JobInterrupted",
    "JobLockedError",
    "JobManifest",
    "JobMismatchError",
    "OutputLock",
    "PointsOutsideError",
    "StopOnSignal",
    "check_points",
    "data_identity",
    "estimate_seconds",
    "is_launcher",
    "job_size_warning",
    "points_outside_warning",
    "region_identity",
    "unique_region_names",
    "weights_identity",
]

MANIFEST_NAME = ".torchgeo-dofa-job.json"
LOCK_NAME = ".torchgeo-dofa.lock"
#: Manifest format version, bumped when its fields change meaning.
MANIFEST_FORMAT = 1
#: Above this many chips the job prints its size and a time estimate before starting.
LARGE_JOB_CHIPS = 5000


class JobError(Exception):
    """Base of the embed job's own errors; ``exit_status`` is the CLI's exit status."""

    exit_status: int = 1


class JobMismatchError(JobError, ValueError):
    """The output folder holds another job's results (a setting differs): exit status 2."""

    exit_status = 2


class JobLockedError(JobError, RuntimeError):
    """Another torchgeo-dofa job holds the output folder's lock: exit status 75 (EX_TEMPFAIL)."""

    exit_status = 75


class PointsOutsideError(JobError, ValueError):
    """Points fall outside every input raster: exit status 2."""

    exit_status = 2


class JobInterrupted(JobError):
    """The job was stopped by a signal after writing its current batch.

    Attributes:
        signum: the signal number.
        exit_status: ``128 + signum`` (130 for SIGINT, 143 for SIGTERM), the shell convention.
    """

    def __init__(self, signum: int) -> None:
        """Create the exception.

        Args:
            signum: the signal that stopped the job.
        """
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name}: the chips written so far are kept; rerun the same command "
            "to resume"
        )
        self.signum = signum
        self.exit_status = 128 + signum


def is_launcher() -> bool:
    """Whether this process launched the job: global rank 0 of a DDP job, or its only process.

    Read from the variables the launchers set, before the process group exists (the lock
    and the manifest come first), where Lightning's cluster environments read them:
    ``LOCAL_RANK`` / ``NODE_RANK`` (Lightning's own DDP launcher, ``torchrun``), ``RANK``
    where Lightning detects ``torchrun`` (``TorchElasticEnvironment.detect()``:
    ``TORCHELASTIC_RUN_ID`` set; the first process of a second node has ``LOCAL_RANK``
    0) and ``SLURM_PROCID`` where it detects SLURM's ``srun``
    (``SLURMEnvironment.detect()``): ``srun`` starts every rank itself, and each ran as a
    launcher before (rank 1 was refused as "in use by another job" and rank 0 waited).

    Returns:
        False when one of those ranks is set and not ``0``.
    """
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    ranks = [os.environ.get(name, "0") for name in ("LOCAL_RANK", "NODE_RANK")]
    if TorchElasticEnvironment.detect():
        ranks.append(os.environ.get("RANK", "0"))
    with warnings.catch_warnings():  # its "srun is available but not used": Lightning's own
        warnings.simplefilter("ignore")  # Trainer warns once; not once per call here
        srun = SLURMEnvironment.detect()
    if srun:
        ranks.append(os.environ.get("SLURM_PROCID", "0"))
    return all(rank.strip() in ("", "0") for rank in ranks)


#: Environment variable holding the launching process's pid, for its DDP workers.
LAUNCHER_PID_VARIABLE = "TORCHGEO_DOFA_LAUNCHER_PID"


def mark_launcher() -> None:
    """In the launching process: record its pid for the DDP workers it will start.

    Called when a writer is made (before ``Trainer.predict`` starts the workers, which
    inherit the environment); see :func:`die_with_launcher`. A no-op in a worker.
    """
    if is_launcher():
        os.environ[LAUNCHER_PID_VARIABLE] = str(os.getpid())


def die_with_launcher(enable: bool = True) -> None:
    """In a DDP worker Lightning started on this machine: die when the launching process dies.

    Asks Linux (``prctl(PR_SET_PDEATHSIG, SIGKILL)``) to kill this process the moment its
    parent, the launcher, ends. Without it, a launcher killed with ``kill -9`` left its
    workers embedding and writing parts for ~10 s, until a collective call timed out, into a
    folder whose lock had died with the launcher: a rerun started meanwhile (``--overwrite``
    included) could have found their parts. Parts are written atomically, so a worker killed
    this way leaves at most a temporary file, which the next run removes. Called at the
    writers' setup, and with ``enable=False`` at their teardown (the request would otherwise
    outlive the job: a user's script that goes on after ``predict`` in its workers). If the
    launcher recorded by :func:`mark_launcher` is no longer running when this is called, the
    worker exits at once (status 1). A no-op in the launcher (``LOCAL_RANK`` unset or ``0``)
    and off Linux.

    Args:
        enable: False to withdraw the request.
    """
    if os.environ.get("LOCAL_RANK", "0") == "0" or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = ctypes.c_int(1)  # <linux/prctl.h>
    zero = ctypes.c_ulong(0)
    libc = ctypes.CDLL(None, use_errno=True)
    if not enable:
        libc.prctl(pr_set_pdeathsig, zero, zero, zero, zero)
        return
    parent = os.getppid()
    if libc.prctl(pr_set_pdeathsig, ctypes.c_ulong(signal.SIGKILL), zero, zero, zero) != 0:
        return  # not allowed here (a seccomp profile): the collective timeout still ends it
    launcher = os.environ.get(LAUNCHER_PID_VARIABLE, "")
    if os.getppid() != parent or (
        launcher.isdigit() and int(launcher) != parent and not _running(int(launcher))
    ):
        os._exit(1)  # the launcher died before the request (or while it was made)


def _running(pid: int) -> bool:
    """Whether a process ``pid`` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
            ValueError: if fields are missing or unknown.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown manifest fields {sorted(unknown)}")
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
                    warnings.warn(
                        f"output folder {folder} holds the results of an older torchgeo-dofa "
                        "job, whose manifest does not record how pixels were read: if it was "
                        "run with --nodata or --crs, rerun with --overwrite",
                        UserWarning,
                        stacklevel=2,
                    )
                for name in self.outputs:
                    _clean_resumed(folder / name)
                return False
            raise JobMismatchError(
                f"output folder {folder} holds another job's results: {_difference(*diff)}; "
                "rerun with --overwrite to replace them, or choose another -o"
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
    return f"sha256:{sha256_file(resolution.path)}"


def region_identity(
    bbox: Sequence[float] | None = None,
    points: str | os.PathLike[str] | None = None,
    buffer_m: float | None = None,
    skip_outside: bool = False,
) -> dict[str, Any]:
    """The manifest's ``region`` field for the CLI's area options.

    Args:
        bbox: ``--bbox`` (minlon, minlat, maxlon, maxlat), or None.
        points: ``--points`` file, or None (identified by the sha256 of its content).
        buffer_m: ``--buffer-m`` (recorded with points only).
        skip_outside: ``--skip-outside`` (recorded with points only).

    Returns:
        ``{}`` for whole rasters, ``{"bbox": [...]}``, and/or ``{"points_sha256": ...,
        "buffer_m": ..., "skip_outside": ...}``.
    """
    region: dict[str, Any] = {}
    if bbox is not None:
        region["bbox"] = [float(v) for v in bbox]
    if points is not None:
        region["points_sha256"] = sha256_file(Path(points))
        region["buffer_m"] = float(buffer_m) if buffer_m is not None else None
        region["skip_outside"] = bool(skip_outside)
    return region


class OutputLock:
    """Exclusive, non-blocking lock on an output folder for the duration of a job.

    ``flock`` on ``<folder>/.torchgeo-dofa.lock`` (the file stays after a job; only the lock
    matters): the kernel releases it when the process exits in any way (``kill -9``
    included), so there is never a stale lock. The lock file records the holder's pid for
    the error message. A lock is held only on the file the path names when it is taken (the
    usual ``flock`` protocol: after locking, the open file must still be the one at the
    path, else it is opened again), so a job that removes its lock file
    (``release(remove=True)``, a job refused before writing) cannot let two others in. In a
    DDP worker started by Lightning (:func:`is_launcher` is False) it does nothing.

    Taking the lock creates the folder (and missing parents) when needed; those folders are
    recorded, and ``release(remove=True)`` removes them again, deepest first, where they are
    left empty, so a job refused before writing anything leaves no trace. A folder that still
    holds another lock's new folder of the same process (a grid and a table in two new
    folders under one new parent) goes when that lock is released too, and a failed
    acquisition (a name too long, a read-only parent) removes what it made.

    Example:
        >>> with OutputLock("out/"):  # doctest: +SKIP
        ...     manifest.check_or_write("out/", overwrite=False)
        ...     trainer.predict(...)
    """

    _held: ClassVar[set[Path]] = set()
    #: Locks this process holds (for :func:`_forget_locks_in_child`).
    _holders: ClassVar[set[OutputLock]] = set()
    #: Folders released locks created and could not remove yet (not empty then).
    _unremoved: ClassVar[list[_MadeFolder]] = []

    def __init__(self, folder: str | os.PathLike[str], fix: str = "use another -o") -> None:
        """Create the lock (not yet acquired).

        Args:
            folder: the output folder (created on acquisition if needed).
            fix: what the refusal tells the user to do besides waiting.
        """
        #: the folder as given (for messages) and absolute (fixed at creation: a later
        #: change of the working directory does not move the lock)
        self.shown = Path(folder)
        self.folder = self.shown.absolute()
        self.fix = fix
        self._fd: int | None = None
        self._made: list[_MadeFolder] = []
        #: the folder's entries when the lock was taken (but the lock file)
        self._found: frozenset[str] = frozenset()

    @property
    def created(self) -> list[Path]:
        """Folders that acquiring created (absolute, deepest first)."""
        return [made.path for made in self._made]

    @property
    def path(self) -> Path:
        """The lock file."""
        return self.folder / LOCK_NAME

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            JobLockedError: if another job (process or open lock) holds it.
            OutputPathError: if the folder or its lock file cannot be made (a full disk, a
                read-only file system, a file in the path), naming the folder and the fix;
                nothing made is left behind.
        """
        if not is_launcher():
            return
        created: list[Path] = []
        fd: int | None = None
        try:
            for attempt in itertools.count(1):
                created = [d for d in (self.folder, *self.folder.parents) if not d.exists()]
                self.folder.mkdir(parents=True, exist_ok=True)
                made = _MadeFolder.identify(created)
                try:
                    found = frozenset(os.listdir(self.folder)) - {LOCK_NAME}
                    fd = self._lock_file()
                    break
                except FileNotFoundError:
                    # another job refused or done removed the empty folder it had made,
                    # between our mkdir and our lock: make it again (a few times at most)
                    if attempt == 10:
                        raise
            assert fd is not None  # the loop breaks with it
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except BaseException as err:  # refused, or a folder only partly made: leave none of it
            if fd is not None:  # held: ours to remove (as release(remove=True) does)
                with contextlib.suppress(OSError):
                    self.path.unlink()
                os.close(fd)
            _remove_empty(_MadeFolder.identify(created))
            if isinstance(err, OSError):
                raise OutputPathError(self._cannot_use(err)) from None
            raise
        self._fd = fd
        self._made, self._found = made, found
        OutputLock._held.add(self.folder.resolve())
        OutputLock._holders.add(self)

    def _cannot_use(self, err: OSError) -> str:
        """One line for an OS error making the folder or its lock file, with the fix."""
        fixes = {
            errno.ENOSPC: "free some space there",
            errno.EDQUOT: "free some space there (disk quota)",
            errno.EROFS: "the file system is read-only",
            errno.EACCES: "you may not write there",
            errno.EPERM: "you may not write there",
            errno.ENOTDIR: "a part of the path is a file, not a folder",
            errno.EEXIST: "a part of the path is a file, not a folder",
        }
        why = fixes.get(err.errno or 0, "")
        return (
            f"cannot use output folder {self.shown}: {err.strerror or err}"
            f"{f' ({why})' if why else ''}; {self.fix}"
        )

    def _lock_file(self) -> int:
        """Open and ``flock`` the lock file; the locked descriptor."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _same_file(fd, self.path):
                    return fd
            except BlockingIOError:
                pid = os.read(fd, 64).decode(errors="replace").strip()
                os.close(fd)
                holder = f"pid {pid}" if pid else "starting now"  # the pid follows the lock
                raise JobLockedError(
                    f"output folder {self.shown} is in use by another torchgeo-dofa job "
                    f"({holder}); wait for it or {self.fix}"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the file was removed (or replaced) while we locked it: again

    def unchanged(self) -> bool:
        """Whether the folder holds nothing but what it held when the lock was taken.

        The lock file aside: a job whose lock finds this at the end wrote nothing there, and
        may release with ``remove=True``. False when the folder cannot be listed.
        """
        try:
            return frozenset(os.listdir(self.folder)) - {LOCK_NAME} <= self._found
        except OSError:
            return False

    def release(self, remove: bool = False) -> None:
        """Release the lock (idempotent).

        Args:
            remove: also delete the lock file, while still holding the lock (for a job that
                leaves nothing else behind; a job waiting on the old file takes a new one),
                then the folders that acquiring created, deepest first, while empty.
        """
        if self._fd is None:
            return
        OutputLock._held.discard(self.folder.resolve())
        OutputLock._holders.discard(self)
        try:
            if remove:
                self.path.unlink(missing_ok=True)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None
        if remove:  # only while empty: another job may have written there
            # a folder this lock made may still hold another lock's folder of the same job
            # (a grid and a table in two new folders under one new parent): retried as the
            # other locks let go, while one of them is inside it
            # (one pass, deepest first: a parent comes after the folders inside it)
            pending = OutputLock._unremoved + self._made
            left = _remove_empty(sorted(pending, key=lambda made: -len(made.path.parts)))
            held = [lock.folder for lock in OutputLock._holders]
            OutputLock._unremoved = [m for m in left if any(m.path in h.parents for h in held)]
        self._made = []

    def __enter__(self) -> Self:
        """Acquire the lock."""
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Release the lock."""
        self.release()


def _forget_locks_in_child() -> None:
    """In a forked child (a DataLoader worker): close the inherited lock files.

    ``flock`` belongs to the open file, which a fork shares: a worker keeping it would hold
    the lock after its job was killed (``kill -9`` leaves the workers running a moment), and
    the rerun would be refused as locked. The child never held the lock itself.
    """
    for lock in OutputLock._holders:
        if lock._fd is not None:
            with contextlib.suppress(OSError):
                os.close(lock._fd)
            lock._fd = None
    OutputLock._holders.clear()
    OutputLock._held.clear()
    OutputLock._unremoved = []


@dataclass(frozen=True)
class _MadeFolder:
    """A folder a lock created: its absolute path and identity (device, inode)."""

    path: Path
    ident: tuple[int, int]

    @classmethod
    def identify(cls, paths: Iterable[Path]) -> list[_MadeFolder]:
        """Those of ``paths`` that exist now, with their identities."""
        made = []
        for path in paths:
            with contextlib.suppress(OSError):
                st = path.stat()
                made.append(cls(path, (st.st_dev, st.st_ino)))
        return made


def _remove_empty(folders: Iterable[_MadeFolder]) -> list[_MadeFolder]:
    """Remove each folder, in the order given, if it is still the one made and empty.

    Returns:
        those still there (not empty).
    """
    left = []
    for made in folders:
        try:
            st = made.path.stat()
            if (st.st_dev, st.st_ino) == made.ident:  # not a folder made again since
                made.path.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            left.append(made)
    return left


os.register_at_fork(after_in_child=_forget_locks_in_child)


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is the file at ``path`` now (not removed or replaced)."""
    try:
        now = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


_SignalHandler = Callable[[int, FrameType | None], Any] | int | None


class StopOnSignal(Callback):
    """Stop an embed job cleanly on SIGINT / SIGTERM, after the current batch is written.

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

    Attributes:
        received: the first signal received, or None.
    """

    signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        """Create the callback (no handler installed yet)."""
        self.received: int | None = None
        self._previous: dict[int, _SignalHandler] = {}
        self._context = False

    # installation ---------------------------------------------------------------------
    def install(self) -> None:
        """Install the handlers (main thread only; elsewhere a no-op)."""
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
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
        if self.received is None:
            self.received = signum
            return
        # a second signal: stop now, as without this callback (the handlers are put back
        # again when the job ends, see restore)
        previous = self._previous.get(signum)
        self._put_back()
        if callable(previous) and not _composes(previous):
            previous(signum, frame)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def raise_if_received(self) -> None:
        """Raise :class:`JobInterrupted` if a signal was received.

        Raises:
            JobInterrupted: carrying the signal.
        """
        if self.received is not None:
            raise JobInterrupted(self.received)

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

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Install the handlers (unless used as a context manager); stop if already signalled."""
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
        self.raise_if_received()

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore the handlers (when not used as a context manager)."""
        if not self._context:
            self.restore()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Restore the handlers (when not used as a context manager)."""
        if not self._context:
            self.restore()


def _composes(handler: Any) -> bool:
    return type(handler).__name__ == "_HandlersCompose"


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
        to_crs = Transformer.from_crs(WGS84, target, always_xy=True)
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


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 1:
        return f"{seconds:.0f} s"
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days} d {hours} h"
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"
