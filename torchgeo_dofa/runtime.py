"""Runtime defaults chosen from the hardware: precision, batch size, loader workers, GDAL cache.

Every embed job needs the same handful of decisions, and each has one right answer per kind
of machine. They live here so that every entry point (``torchgeo-dofa embed``, LightningCLI
configs, the Python API) takes the same defaults, each of which stays overridable:

* :func:`default_precision`: bf16 where the hardware runs it natively (a CUDA GPU with bf16
  support; a CPU with AVX-512 BF16 / AMX, see :func:`torchgeo_dofa.model.cpu_has_fast_bf16`),
  fp32 elsewhere, with a one-line reason to print;
* :func:`default_batch_size`: chips per batch for the device, precision and variant;
* :func:`default_num_workers` and :func:`loader_options`: DataLoader workers (reading and
  preprocessing off the compute thread) and pinned memory for GPU transfers;
* :func:`gdal_cache_bytes` and :func:`gdal_env`: GDAL's block cache, in **bytes**;
  :func:`gdal_scan_env` for a decimated read of a whole file (the scale check, previews).

GDAL cache units: ``rasterio.Env(GDAL_CACHEMAX=256)`` sets a cache of 256 *bytes*: rasterio
hands an integer to ``GDALSetCacheMax64``, which takes bytes (checked with GDAL 3.12 /
rasterio 1.5 by reading ``GDALGetCacheMax64`` back: 256 -> 256; GDAL's own "values below
100000 are megabytes" rule applies only to the ``GDAL_CACHEMAX`` *environment variable*
string). A cache that small makes GDAL decode a compressed block again for every chip that
touches it, which for JPEG2000 is 50-150x slower than a plain read. The cache here is sized
from the input files so that one row of compressed blocks across the raster stays decoded
while the chips of that row are read (the samplers visit chips row by row), and it is capped
so memory stays bounded whatever the region's size.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import multiprocessing.context
import multiprocessing.queues
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# torch is imported inside the functions that need it: the CLI checks option values against
# PRECISION_NAMES and DEVICE_NAMES before PyTorch loads (seconds), so a typo answers at once.

__all__ = [
    "DEVICE_NAMES",
    "GDAL_CACHE_DEFAULT_BYTES",
    "GDAL_CACHE_MAX_BYTES",
    "GDAL_CACHE_MIN_BYTES",
    "GDAL_SCAN_MIN_BYTES",
    "MIN_OPEN_FILES_FOR_WORKERS",
    "OPEN_FILES_WANTED",
    "PRECISION_NAMES",
    "BatchHandOverError",
    "PrecisionChoice",
    "cpu_has_native_bf16",
    "decimated_read",
    "default_batch_size",
    "default_num_workers",
    "default_precision",
    "file_signature",
    "gdal_cache_bytes",
    "gdal_env",
    "gdal_scan_cache_bytes",
    "gdal_scan_env",
    "gdal_worker_init",
    "handing_over",
    "loader_context",
    "loader_options",
    "loader_workers",
    "loaders_hand_over",
    "open_file_limit",
    "raise_open_file_limit",
    "resolve_accelerator",
    "resolve_precision",
    "workers_open_file_problem",
]

Precision = Literal["32", "bf16"]
Accelerator = Literal["cpu", "cuda", "mps"]

#: Precision names :func:`resolve_precision` accepts (case-insensitive; besides ``auto``),
#: Lightning's own spellings included.
PRECISION_NAMES: dict[str, Precision] = {
    "32": "32",
    "32-true": "32",
    "fp32": "32",
    "bf16": "bf16",
    "bf16-mixed": "bf16",
}
#: Lightning accelerator names :func:`resolve_accelerator` accepts (case-insensitive).
DEVICE_NAMES: tuple[str, ...] = ("auto", "cpu", "gpu", "cuda", "mps")
#: The largest chip side a job reads, in pixels: a chip is read whole, as one float32 array
#: a band (4096 x 4096: 64 MiB a band), before it is resized or tiled to 224 px; as the
#: API's ``TORCHGEO_DOFA_MAX_PIXELS`` default for one region.
MAX_CHIP_PX = 4096
#: Output file name endings (any letter case) of the GeoTIFF grids / maps and the GeoParquet
#: tables: what ``embed -o NAME`` takes for a file and what the prediction writers accept.
GRID_SUFFIXES: tuple[str, ...] = (".tif", ".tiff")
TABLE_SUFFIXES: tuple[str, ...] = (".parquet", ".geoparquet")

_MIB = 2**20
#: Smallest GDAL block cache the embed job uses (bytes): a few rows of 1024 x 1024 blocks.
GDAL_CACHE_MIN_BYTES = 64 * _MIB
#: Largest GDAL block cache per process (bytes); also never more than 1/8 of the RAM.
GDAL_CACHE_MAX_BYTES = 2048 * _MIB
#: Cache used when the input files are not known (bytes).
GDAL_CACHE_DEFAULT_BYTES = 512 * _MIB
#: Smallest cache for a decimated scan of a whole file (bytes), see
#: :func:`gdal_scan_cache_bytes`.
GDAL_SCAN_MIN_BYTES = 16 * _MIB

#: Lightning precision flag for each precision name this package uses.
LIGHTNING_PRECISION: dict[str, str] = {"32": "32-true", "bf16": "bf16-mixed"}


@dataclass(frozen=True)
class PrecisionChoice:
    """A precision and why it was chosen.

    Attributes:
        precision: ``"32"`` or ``"bf16"``.
        reason: one line for the terminal, e.g. ``"bf16: this CPU has native bf16 (AMX)"``.
        chosen_by: ``"default"`` (picked from the hardware) or ``"user"``.
    """

    precision: Precision
    reason: str
    chosen_by: Literal["default", "user"] = "default"

    @property
    def lightning(self) -> str:
        """Lightning's ``Trainer(precision=...)`` value: ``32-true`` or ``bf16-mixed``."""
        return LIGHTNING_PRECISION[self.precision]


def resolve_accelerator(device: str = "auto", *, option: str = "--device") -> Accelerator:
    """The kind of device a Lightning ``accelerator`` name runs on here.

    Args:
        device: ``auto``, ``cpu``, ``gpu``, ``cuda`` or ``mps`` (Lightning's names).
        option: the setting that gave ``device``, named in the messages
            (``--trainer.accelerator`` for a ``--config`` run).

    Returns:
        ``"cuda"``, ``"mps"`` or ``"cpu"``. ``auto`` takes CUDA, then MPS, then the CPU.

    Raises:
        ValueError: for an unknown name, or a GPU asked for on a machine without one (the
            message says to use ``--device cpu``, or ``option``'s ``cpu``).
    """
    name = str(device).strip().lower()
    if name not in DEVICE_NAMES:
        raise ValueError(f"unknown device {device!r}: choose auto, cpu or gpu")
    if name == "cpu":
        return "cpu"
    import torch

    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if name == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if name != "mps" and cuda:  # gpu, cuda
        return "cuda"
    if name != "cuda" and mps:  # gpu, mps
        return "mps"
    raise ValueError(
        f"{option} {device} asked for a GPU, but PyTorch sees none on this machine "
        f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}): use "
        f"{option} cpu or {option} auto"
    )


def _cpu_bf16_flags() -> list[str] | None:
    """Native bf16 features this CPU reports in /proc/cpuinfo; None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in ("amx_bf16", "avx512_bf16", "bf16") if f in have]
    except OSError:
        pass
    return None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matrix multiplies natively and PyTorch uses that.

    Both must hold: :func:`torchgeo_dofa.model.cpu_has_fast_bf16` (oneDNN has bf16 kernels
    here) and, where ``/proc/cpuinfo`` can be read, a native bf16 instruction set
    (``amx_bf16`` or ``avx512_bf16`` on x86, ``bf16`` on ARM). oneDNN also reports bf16
    support on AVX-512 CPUs without bf16 instructions (Skylake/Cascade Lake), where it
    converts in software and gains nothing over fp32.

    Returns:
        True where bf16 is the faster choice on this CPU.
    """
    from .model import cpu_has_fast_bf16

    flags = _cpu_bf16_flags()
    return cpu_has_fast_bf16() and (flags is None or bool(flags))


def default_precision(device: str = "auto") -> PrecisionChoice:
    """bf16 where the hardware has it, fp32 elsewhere.

    * CUDA: bf16 when ``torch.cuda.is_bf16_supported()`` (Ampere and newer), else fp32;
    * CPU: bf16 where it is native (:func:`cpu_has_native_bf16`: AVX-512 BF16 / AMX on
      x86, BF16 on ARM, and PyTorch's oneDNN kernels for it), else fp32, since bf16 is
      emulated there and about 7x slower (``benchmarks/run.py``);
    * MPS: fp32 (bf16 autocast support on MPS varies with the macOS version).

    bf16 changes the embeddings slightly (pooled cosine to fp32 about 0.997-0.9999, as
    TorchGeo's own DOFA under the same autocast; see ``tests/test_model.py``).

    Args:
        device: Lightning accelerator name (``auto``, ``cpu``, ``gpu``).

    Returns:
        The choice, with a one-line reason to print.

    Raises:
        ValueError: as :func:`resolve_accelerator`.
    """
    kind = resolve_accelerator(device)
    if kind == "cuda":
        import torch

        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", f"bf16: the GPU ({name}) supports bf16")
        return PrecisionChoice("32", f"fp32: the GPU ({name}) has no bf16 support")
    if kind == "mps":
        return PrecisionChoice("32", "fp32: bf16 autocast is not relied on on Apple MPS")
    if cpu_has_native_bf16():
        flags = _cpu_bf16_flags()
        what = f" ({', '.join(flags)})" if flags else ""
        return PrecisionChoice("bf16", f"bf16: this CPU has native bf16{what}")
    return PrecisionChoice(
        "32", "fp32: this CPU has no native bf16 (no AVX-512 BF16 / AMX); bf16 would be emulated"
    )


def resolve_precision(precision: str | None, device: str = "auto") -> PrecisionChoice:
    """The precision to run: the user's if given, else :func:`default_precision`.

    Args:
        precision: ``None`` or ``"auto"`` for the default (``TORCHGEO_DOFA_PRECISION``
            when set, e.g. ``32`` for results that do not depend on the CPU kind);
            ``"32"``/``"32-true"`` or ``"bf16"``/``"bf16-mixed"``.
        device: Lightning accelerator name.

    Returns:
        The choice and its reason.

    Raises:
        ValueError: for an unknown precision name, given or in ``TORCHGEO_DOFA_PRECISION``
            (naming which, and listing the choices).
    """
    if precision is None or str(precision).lower() == "auto":
        setting = os.environ.get("TORCHGEO_DOFA_PRECISION", "").strip()
        if not setting or setting.lower() == "auto":
            return default_precision(device)
        if setting.lower() not in PRECISION_NAMES:
            raise ValueError(
                f"the environment's TORCHGEO_DOFA_PRECISION={setting!r} is not a precision: "
                "set it to auto, 32 or bf16, or unset it"
            )
        choice = resolve_precision(setting, device)
        return PrecisionChoice(
            choice.precision, f"{choice.reason.split(':')[0]}: TORCHGEO_DOFA_PRECISION={setting}"
        )
    key = str(precision).strip().lower()
    if key not in PRECISION_NAMES:
        raise ValueError(f"unknown precision {precision!r}: choose auto, 32 or bf16")
    value = PRECISION_NAMES[key]
    label = "fp32" if value == "32" else "bf16"
    return PrecisionChoice(value, f"{label}: asked for", "user")


#: Chips per batch, per (device kind, precision), for DOFA base. On the CPU bf16 keeps
#: gaining up to batch 32 with AMX (11 img/s at 8, 21 at 32 measured in issue 14) while fp32
#: is flat from batch 8 (4.24 vs 4.33 img/s, README); on a GPU larger batches fill the device.
_BATCH: dict[tuple[str, str], int] = {
    ("cpu", "32"): 8,
    ("cpu", "bf16"): 32,
    ("mps", "32"): 16,
    ("mps", "bf16"): 16,
    ("cuda", "32"): 64,
    ("cuda", "bf16"): 128,
}


def default_batch_size(device: str = "auto", precision: str = "32", variant: str = "base") -> int:
    """Chips per batch for a device, precision and DOFA variant.

    Base: CPU 8 (fp32) / 32 (bf16); CUDA 64 (fp32) / 128 (bf16); MPS 16. Large (about 3x
    the compute and activations of base) gets half, at least 4. On CUDA the batch is
    halved again while the activations (about 40 MB an image for base in bf16, 80 in fp32,
    twice that for large) would exceed a quarter of the GPU's memory.

    Args:
        device: Lightning accelerator name.
        precision: ``"32"`` or ``"bf16"`` (Lightning's ``32-true`` / ``bf16-mixed`` too).
        variant: ``base``/``large`` (or ``b``/``l``).

    Returns:
        The batch size.

    Raises:
        ValueError: for an unknown device, precision or variant.
    """
    from .model import canonical_variant

    kind = resolve_accelerator(device)
    prec = resolve_precision(precision, device).precision
    batch = _BATCH[(kind, prec)]
    large = canonical_variant(variant) == "large"
    if large:
        batch = max(4, batch // 2)
    if kind == "cuda":
        import torch

        per_image = (40 if prec == "bf16" else 80) * (2 if large else 1) * _MIB
        budget = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 4
        while batch > 4 and batch * per_image > budget:
            batch //= 2
    return batch


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


#: Most loader workers a CUDA job starts by default (see :func:`default_num_workers`).
CUDA_MAX_WORKERS = 8


def loader_workers(asked: int, chips: int, batch_size: int) -> int:
    """DataLoader workers worth starting: no more than the job has batches.

    None at all under an open-file limit too low for them (see
    :func:`workers_open_file_problem`). A worker reads whole batches, so one beyond the
    batches starts idle (``--num-workers 100`` for one batch started 100 processes: 13.5 s
    for one chip on 2 cores).

    Args:
        asked: the workers asked for.
        chips: the chips to read.
        batch_size: chips per batch.

    Returns:
        ``min(asked, ceil(chips / batch_size))``; 0 where the open-file limit is too low.
    """
    if workers_open_file_problem(asked) is not None:
        return 0
    return min(asked, -(-chips // max(1, batch_size)))


#: The open-file limit (``ulimit -n``) below which a job starts no DataLoader workers. A
#: worker hands each batch's tensors over as open files (PyTorch's ``file_descriptor``
#: sharing, a socket and a descriptor per tensor while the batch is in flight), and
#: TorchGeo keeps up to 128 rasters open in every process that reads them. Measured: one
#: worker on the demo scene needed a limit of 40 (32 failed).
MIN_OPEN_FILES_FOR_WORKERS = 128

#: What :func:`raise_open_file_limit` raises a lower soft open-file limit to, at most.
OPEN_FILES_WANTED = 65536


def open_file_limit() -> int | None:
    """The process's open-file limit (``ulimit -n``: the soft ``RLIMIT_NOFILE``).

    Returns:
        The limit; None where it is unlimited or cannot be read (not a POSIX system).
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def raise_open_file_limit() -> int | None:
    """Raise the soft open-file limit to the hard one (at most :data:`OPEN_FILES_WANTED`).

    As Go programs do at start (since Go 1.19): the soft limit is a default kept low for
    programs using ``select(2)`` (256 on macOS, 1024 on most Linux systems), which neither
    Python's event loops nor PyTorch's DataLoader use; a hard limit set on purpose (``ulimit
    -n 24`` sets both) is kept. Called by the ``torchgeo-dofa`` command before its job.

    Returns:
        The soft limit now (None where unlimited or unknown).
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_WANTED)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (OSError, ValueError):  # a kernel maximum below the hard limit: keep it
            pass
    return open_file_limit()


def workers_open_file_problem(workers: int) -> str | None:
    """Why ``workers`` DataLoader workers cannot start under this process's open-file limit.

    Below :data:`MIN_OPEN_FILES_FOR_WORKERS` a worker could not hand its batches over: the
    job failed, or (where the failure hit the sending thread) waited for its first batch
    forever. The job reads its chips in its own process instead.

    Args:
        workers: the workers asked for.

    Returns:
        One line naming the limit, what is done and the fix; None where workers can start
        (or none were asked for).
    """
    limit = open_file_limit()
    if workers <= 0 or limit is None or limit >= MIN_OPEN_FILES_FOR_WORKERS:
        return None
    return (
        f"the open-file limit (ulimit -n) is {limit}, below the {MIN_OPEN_FILES_FOR_WORKERS} "
        f"that DataLoader workers need: the data is read in the job's own process, not in "
        f"{workers} worker(s); raise it (ulimit -n 4096) to read it in workers"
    )


class BatchHandOverError(RuntimeError):
    """A DataLoader worker read a batch but could not send it to the job's process.

    Raised in the job's process (as PyTorch re-raises a worker's error), with the worker's
    cause in its message: ``could not hand a batch over to the job: <cause>``. See
    :func:`loader_context`.
    """


class _WorkerResultQueue(multiprocessing.queues.Queue[Any]):
    """A ``multiprocessing`` queue whose failed sends reach the reader instead of stderr.

    A queue sends in a background thread (its feeder): when pickling a batch fails there
    (PyTorch passes each tensor's shared memory as a file descriptor, which takes a socket;
    at the open-file limit that is ``OSError: [Errno 24] Too many open files``; an object
    that cannot be pickled), the standard queue prints the traceback and drops the batch,
    and a DataLoader then waits for that batch forever. Here the failure is sent instead,
    as PyTorch sends a worker's exception, so the job raises :class:`BatchHandOverError`;
    where even that cannot be sent the worker ends (exit status 1), which the DataLoader
    reports within seconds ("exited unexpectedly").
    """

    def _on_queue_feeder_error(self, e: Exception, obj: object) -> None:
        from torch._utils import ExceptionWrapper

        sent = isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], int)
        if sent and not isinstance(obj[1], ExceptionWrapper):  # type: ignore[index]
            what = f"{type(e).__name__}: {e}"
            try:
                raise BatchHandOverError(f"could not hand a batch over to the job: {what}")
            except BatchHandOverError:
                wrapped = ExceptionWrapper(sys.exc_info(), where="in DataLoader worker process")
            try:
                self.put((obj[0], wrapped))  # type: ignore[index]
                return
            except Exception:
                pass
        super()._on_queue_feeder_error(e, obj)  # type: ignore[misc]  # the standard traceback
        sys.stderr.flush()
        os._exit(1)


_LOADER_CONTEXTS: dict[str, type[Any]] = {}


def _loader_context_class(base: type[Any]) -> type[Any]:
    def queue(self: Any, maxsize: int = 0) -> _WorkerResultQueue:
        return _WorkerResultQueue(maxsize, ctx=self.get_context())

    name = f"HandOver{base.__name__}"
    if name not in _LOADER_CONTEXTS:
        _LOADER_CONTEXTS[name] = type(name, (base,), {"Queue": queue, "__module__": __name__})
    return _LOADER_CONTEXTS[name]


def loader_context(method: str | None = None) -> multiprocessing.context.BaseContext:
    """The ``multiprocessing_context`` for a DataLoader whose workers cannot hang the job.

    PyTorch's DataLoader makes its queues from this context; the queue of worker results is
    a :class:`_WorkerResultQueue`, so a batch a worker cannot send (the open-file limit
    reached as the batch's shared memory is passed, an unpicklable sample) raises
    :class:`BatchHandOverError` in the job, where it hung forever (a job under ``ulimit -n
    24`` waited for its first batch until killed). Everything else is the start method's
    own context.

    Args:
        method: the start method (``fork``, ``spawn``, ``forkserver``); None for the
            process's default (``multiprocessing.get_start_method()``).

    Returns:
        A context of the start method's own class, with its ``Queue`` replaced.
    """
    base = multiprocessing.get_context(method)
    context: multiprocessing.context.BaseContext = _loader_context_class(type(base))()
    return context


def handing_over(loaders: Any) -> Any:
    """Give every DataLoader with workers in ``loaders`` a :func:`loader_context`.

    A loader's own start method is kept (``multiprocessing_context="spawn"`` gets the spawn
    context's); a loader with another kind of context, or without workers, is left as it is.

    Args:
        loaders: a DataLoader, or a list, tuple or dict of them (what a Lightning data
            module's ``*_dataloader`` hooks return); anything else is returned unchanged.

    Returns:
        ``loaders`` (the DataLoaders changed in place).
    """
    from torch.utils.data import DataLoader

    if isinstance(loaders, DataLoader):
        given = loaders.multiprocessing_context
        if loaders.num_workers > 0 and not isinstance(given, tuple(_LOADER_CONTEXTS.values())):
            if given is None or isinstance(given, multiprocessing.context.BaseContext):
                method = None if given is None else given.get_start_method()
                loaders.multiprocessing_context = loader_context(method)
    elif isinstance(loaders, dict):
        for value in loaders.values():
            handing_over(value)
    elif isinstance(loaders, list | tuple):
        for value in loaders:
            handing_over(value)
    return loaders


class _HandingOver:
    """A data module's ``*_dataloader`` hook whose loaders get :func:`loader_context`.

    Picklable (a data module is pickled to spawned processes): it holds the data module and
    the hook's name, and calls the class's own hook.
    """

    def __init__(self, datamodule: Any, name: str) -> None:
        self.datamodule, self.name = datamodule, name
        #: the class's hook (Lightning's ``is_overridden`` looks at its code)
        self.__wrapped__ = getattr(type(datamodule), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        hook = getattr(type(self.datamodule), self.name)
        return handing_over(hook(self.datamodule, *args, **kwargs))


#: The Lightning data module hooks that make DataLoaders.
LOADER_HOOKS = ("train_dataloader", "val_dataloader", "test_dataloader", "predict_dataloader")


def loaders_hand_over(datamodule: Any) -> None:
    """Make every loader of a Lightning data module raise where a batch cannot be sent.

    Each ``*_dataloader`` hook the data module's class defines is wrapped on the instance
    (:func:`handing_over`), so TorchGeo's data modules, which make their loaders without a
    ``multiprocessing_context``, get :func:`loader_context` too: a ``fit`` whose worker
    reached the open-file limit as it sent a batch waited for it forever. Hooks the class
    leaves to Lightning's defaults stay unset (Lightning tells them apart).

    Args:
        datamodule: a ``LightningDataModule`` (None: nothing to do).
    """
    if datamodule is None:
        return
    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.utilities.model_helpers import is_overridden

    for name in LOADER_HOOKS:
        if name not in vars(datamodule) and is_overridden(name, datamodule, LightningDataModule):
            setattr(datamodule, name, _HandingOver(datamodule, name))


def default_num_workers(
    cpus: int | None = None, accelerator: str = "cpu", processes: int = 1
) -> int:
    """DataLoader workers that read and preprocess chips beside the model.

    CPU: ``min(4, cpus - 1)``: the model's threads need the cores, one stays with them, and
    beyond about four workers reading stops being the bottleneck (a 224 x 224 chip reads and
    is preprocessed in ~3 ms in a worker, against ~40-120 ms of model time per chip on a
    CPU); 0 (read in the main process) only on a single-core machine.

    CUDA: the GPU computes, so every core but two (the main process launching kernels and
    transferring batches; the writer threads) reads chips, shared among the job's
    ``processes`` (one per GPU with DDP), at most :data:`CUDA_MAX_WORKERS` each and at least
    one where there are two cores. Why more than on a CPU: at ~3 ms a chip a worker reads
    ~300 chips/s, while DOFA base in bf16 on a data-centre GPU runs thousands of images/s;
    why a cap: each worker holds ``prefetch_factor`` (2) batches ahead, ~0.4 GB at batch 128
    of 9-band chips. Measured on one H200 with 16 cores (``benchmarks/gpu.py``, README
    "GPU"): 14 workers did not beat 8 (of 7 configurations, 1 gained, 1 tied, 5 lost; in
    two later runs, of 6 pairs, 2 gained, 4 lost); the end-to-end rate stayed at 757-1,330
    chips/s either way (large fp32 aside, GPU-bound), held by the loader's start and pace
    (a worker's ~3.5 ms a chip) and, until the table's parts became one file a batch, the
    pooled writer.

    Args:
        cpus: usable CPU cores (default: this process's CPU affinity).
        accelerator: ``"cpu"``, ``"cuda"`` or ``"mps"`` (resolved, see
            :func:`resolve_accelerator`); MPS is treated as a CPU (shared cores).
        processes: processes of the job on this machine (``devices`` with DDP), CUDA only.

    Returns:
        The number of workers per process.
    """
    n = _usable_cpus() if cpus is None else int(cpus)
    if accelerator == "cuda":
        share = (n - 2) // max(1, int(processes))
        return max(0, min(n - 1, CUDA_MAX_WORKERS, max(1, share)))
    return max(0, min(4, n - 1))


def loader_options(device: str = "auto", num_workers: int | None = None) -> dict[str, Any]:
    """DataLoader keyword arguments for an embed job on ``device``.

    Args:
        device: Lightning accelerator name.
        num_workers: workers (default :func:`default_num_workers` for the device).

    Returns:
        ``num_workers``, ``pin_memory`` (True on CUDA, so Lightning's transfer to the GPU is
        asynchronous: it passes ``non_blocking=True``), and with workers
        ``persistent_workers=False`` and ``prefetch_factor=2`` (batches read ahead per worker).
    """
    if num_workers is None:
        workers = default_num_workers(accelerator=resolve_accelerator(device))
    else:
        workers = int(num_workers)
    if workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {workers}")
    options: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": resolve_accelerator(device) == "cuda",
    }
    if workers > 0:
        options |= {"persistent_workers": False, "prefetch_factor": 2}
    return options


def _physical_memory(address_space: bool = True) -> int | None:
    """Memory this process may use (bytes): the RAM, or less where a limit says so.

    The smallest of the physical RAM, the address-space limit (``ulimit -v``) and the memory
    limits of this process's cgroup and of those above it (a container's, a SLURM job's:
    :func:`_cgroup_memory_limits`), as GDAL takes for its default cache of 5 %. None where
    none of them can be read.

    Args:
        address_space: False to leave ``ulimit -v`` out: it limits each process on its own
            (and counts address space, not memory), so it is no share of the machine's
            memory among processes (the test suite's worker count).
    """
    found: list[int] = []
    try:
        found.append(int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE")))
    except (AttributeError, OSError, ValueError):  # pragma: no cover - not POSIX
        pass
    if address_space:
        try:
            import resource

            soft, _ = resource.getrlimit(resource.RLIMIT_AS)
            if soft != resource.RLIM_INFINITY and soft > 0:
                found.append(int(soft))
        except (ImportError, OSError, ValueError):  # pragma: no cover - not POSIX
            pass
    found += _cgroup_memory_limits()
    return min(found) if found else None


def _cgroup_memory_limits(
    root: str | os.PathLike[str] = "/sys/fs/cgroup",
    membership: str | os.PathLike[str] = "/proc/self/cgroup",
) -> list[int]:
    """The memory limits (bytes) of this process's cgroup and of every cgroup above it.

    A limit may sit on any level: a container's on the hierarchy's root as the container
    sees it, a SLURM job's (``--mem``) or a systemd slice's on a nested cgroup
    (``/slurm/uid_1000/job_42/step_0``), which the root's files do not show. The cgroup comes
    from ``membership`` (``/proc/self/cgroup``): the v2 line (``0::/path``, limit file
    ``memory.max``) and the v1 memory controller's (``N:memory:/path``, ``memory/<path>/
    memory.limit_in_bytes``); without it, the root's files only. ``max`` or a huge number
    (v1's "no limit") counts as none.

    Args:
        root: where the cgroup hierarchies are mounted.
        membership: the file naming this process's cgroups.

    Returns:
        Every limit found, in no order; empty where none is set or nothing can be read.
    """
    root = Path(root)
    paths: list[tuple[Path, str]] = []  # (the cgroup's folder, its limit file's name)
    try:
        lines = Path(membership).read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        relative = path.strip().lstrip("/")
        if controllers == "":
            paths.append((root / relative, "memory.max"))
        elif "memory" in controllers.split(","):
            paths.append((root / "memory" / relative, "memory.limit_in_bytes"))
    if not paths:
        paths = [(root, "memory.max"), (root / "memory", "memory.limit_in_bytes")]
    limits: list[int] = []
    for folder, name in paths:
        top = root / "memory" if name == "memory.limit_in_bytes" else root
        for level in (folder, *folder.parents):
            try:
                text = (level / name).read_text().strip()
            except OSError:
                text = ""
            if text.isdigit() and 0 < int(text) < 2**62:
                limits.append(int(text))
            if level == top or not level.is_relative_to(top):
                break
    return limits


def gdal_cache_bytes(
    paths: Iterable[str | os.PathLike[str]] = (),
    *,
    chip_px: int = 224,
    processes: int = 1,
    memory_bytes: int | None = None,
) -> int:
    """GDAL block-cache size (bytes) that keeps one chip row of decoded blocks per file.

    For every file: the bytes of the block rows a chip row spans, all bands, in the file's
    data type: ``ceil(width / block_w) * block_w * block_h * ceil(chip_px / block_h + 1)
    * bands * itemsize`` (a chip row of ``chip_px`` pixels can straddle one more block row
    than it covers). The sum over the files (all are read in turn for each chip) is doubled
    for GDAL's own overhead and a warped VRT's block cache on top of the file's, then
    clamped to ``[GDAL_CACHE_MIN_BYTES, min(GDAL_CACHE_MAX_BYTES, RAM / 8) / processes]``,
    so memory stays bounded whatever the region's size (each process holding a cache, a
    DataLoader worker included, counts once in ``processes``).

    Examples: one 10980 x 10980 uint16 JP2 with 1024 x 1024 blocks needs 11 x 2 MB x 2 rows x
    2 = 88 MB; a 2240 x 2240 9-band GeoTIFF tiled 512 x 512, 18 MB x 2.

    Args:
        paths: the rasters the job reads (none: :data:`GDAL_CACHE_DEFAULT_BYTES`).
        chip_px: chip side in the files' pixels.
        processes: processes reading at once (main process plus DataLoader workers).
        memory_bytes: RAM to size against (default: this machine's physical memory).

    Returns:
        The cache size in bytes, for ``rasterio.Env(GDAL_CACHEMAX=...)``.

    Raises:
        rasterio.errors.RasterioIOError: for a file that cannot be opened.
    """
    import rasterio

    ram = _physical_memory() if memory_bytes is None else memory_bytes
    cap = GDAL_CACHE_MAX_BYTES if ram is None else min(GDAL_CACHE_MAX_BYTES, ram // 8)
    cap = max(GDAL_CACHE_MIN_BYTES, cap // max(1, processes))
    need = 0
    listed = list(paths)
    if not listed:
        return min(cap, GDAL_CACHE_DEFAULT_BYTES)
    for path in listed:
        with rasterio.open(path) as src:
            per_line, block_h = _block_row_layout(src)
            rows = math.ceil(min(chip_px, src.height) / block_h) + 1
            need += per_line * min(rows * block_h, src.height + block_h)
    return int(min(cap, max(GDAL_CACHE_MIN_BYTES, 2 * need)))


def _block_row_layout(src: Any) -> tuple[int, int]:
    """(decoded bytes of one pixel line across a row of blocks, all bands; block height).

    A block row of an open rasterio dataset ``src`` decodes ``block_h`` such lines: the
    width rounded up to whole blocks, times the bands and the widest band's item size.
    """
    import numpy as np

    block_h, block_w = src.block_shapes[0] if src.block_shapes else (1, src.width)
    itemsize = max(int(np.dtype(d).itemsize) for d in src.dtypes)
    across = math.ceil(src.width / block_w) * block_w
    return across * src.count * itemsize, int(block_h)


def gdal_env(cache_bytes: int | None = None, **options: Any) -> Any:
    """A ``rasterio.Env`` with GDAL's block cache set in bytes.

    Args:
        cache_bytes: cache size in bytes (default :data:`GDAL_CACHE_DEFAULT_BYTES`).
        **options: further GDAL configuration options.

    Returns:
        The ``rasterio.Env`` (use it as a context manager around the reads).

    Raises:
        ValueError: for a cache below 1 MiB (a value in MB by mistake would be that small).
    """
    import rasterio

    size = GDAL_CACHE_DEFAULT_BYTES if cache_bytes is None else int(cache_bytes)
    if size < _MIB:
        raise ValueError(
            f"GDAL cache of {size} bytes is too small to hold one block: the size is in bytes "
            f"(e.g. {256 * _MIB} for 256 MiB), not MB"
        )
    return rasterio.Env(GDAL_CACHEMAX=size, **options)


def gdal_scan_cache_bytes(path: str | os.PathLike[str], memory_bytes: int | None = None) -> int:
    """GDAL cache (bytes) for a decimated read of one row of a file's blocks at a time.

    Reading a row of blocks (all bands) decimated decodes each of its blocks once when the
    row fits the cache; GDAL serves the bands one after the other, so for a
    pixel-interleaved file a smaller cache decodes every block again for each band. A chunk
    of rows can straddle two block rows, so the size is ``ceil(width / block_w) * block_w
    * 2 * block_h * bands * itemsize`` x 1.25 (GDAL's per-block overhead), at least
    :data:`GDAL_SCAN_MIN_BYTES`, and never more than GDAL's own default (5 % of the memory
    the process may use), so a scan never holds more than it would have without it.

    Args:
        path: the raster to scan.
        memory_bytes: memory to size against (default: what the process may use).

    Returns:
        Bytes.

    Raises:
        rasterio.errors.RasterioIOError: if the file cannot be opened.
    """
    import rasterio

    with rasterio.open(path) as src:
        per_line, block_h = _block_row_layout(src)
        row = per_line * min(2 * block_h, src.height)
    ram = _physical_memory() if memory_bytes is None else memory_bytes
    ceiling = GDAL_CACHE_DEFAULT_BYTES if ram is None else max(GDAL_SCAN_MIN_BYTES, ram // 20)
    return int(min(ceiling, max(GDAL_SCAN_MIN_BYTES, math.ceil(1.25 * row))))


def gdal_scan_env(path: str | os.PathLike[str]) -> Any:
    """A ``rasterio.Env`` whose GDAL cache holds one row of ``path``'s blocks, for a scan.

    For reading a whole file decimated one block row at a time (see
    :func:`decimated_read`). Read in one call under GDAL's default cache (5 % of the memory),
    the decoded blocks stay cached until it is full, so the peak memory of the read grows
    with the file: a 9096 x 13872 4-band uint16 GeoTIFF took the process's peak RSS from
    0.6 to 1.6 GB. GDAL's cache size is process-wide: scans in several threads at once leave
    whichever size was set last.

    Args:
        path: the raster to scan.

    Returns:
        The ``rasterio.Env`` (a context manager around the open and the reads).

    Raises:
        rasterio.errors.RasterioIOError: if the file cannot be opened.
    """
    return gdal_env(gdal_scan_cache_bytes(path))


def file_signature(path: str | os.PathLike[str]) -> tuple[int, ...]:
    """A file's identity on disk: device, inode, size, modification and change times (ns).

    Two equal signatures are the same bytes but for a rewrite within the file system's
    timestamp resolution (the checkpoint facts of :mod:`torchgeo_dofa.weights` are not
    remembered within 2 s of a write for that reason).

    Raises:
        OSError: if the file cannot be stat'ed.
    """
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def decimated_read(path: str | os.PathLike[str], max_side: int) -> Any:
    """Read a whole raster decimated to about ``max_side`` pixels a side, in bounded memory.

    The file is read one row of its blocks at a time (nearest neighbour, every ``scale``-th
    pixel, ``scale = ceil(max(width, height) / max_side)``) under :func:`gdal_scan_env`, so
    each block is decoded once and at most one row of them is held, whatever the file's
    size or interleaving. Measured on a dense 4096 x 16384 4-band deflate GeoTIFF (pixel
    interleaved, 512-px blocks): one whole-file read took 1.8-1.9 s under GDAL's default
    cache (the whole file cached) and 6.6-6.9 s under a one-row cache (each block decoded
    once per band); block rows under the one-row cache ~1.9 s with 20-40 MB of memory.

    Args:
        path: the raster.
        max_side: pixels a side of the result, about.

    Returns:
        (bands, rows, cols) array in the file's data type; rows and cols at least 1.

    Raises:
        rasterio.errors.RasterioIOError: if the file cannot be opened or read.
    """
    import numpy as np
    import rasterio
    from rasterio.windows import Window

    with gdal_scan_env(path), rasterio.open(path) as src:
        scale = max(1, math.ceil(max(src.width, src.height) / max_side))
        cols = max(1, src.width // scale)
        _, block_h = _block_row_layout(src)
        # rows of whole blocks, each a multiple of ``scale`` rows so the samples stay evenly
        # spaced across the chunks
        step = max(scale, block_h // scale * scale)
        parts = []
        for top in range(0, max(1, src.height - scale + 1), step):
            height = min(step, src.height - top)
            rows = max(1, height // scale)
            window = Window(0, top, src.width, height)
            parts.append(src.read(window=window, out_shape=(src.count, rows, cols)))
        return np.concatenate(parts, axis=1)


def _enter_gdal_env(cache_bytes: int, worker_id: int) -> None:
    _sigterm_from_parent_only()
    env = gdal_env(cache_bytes)
    env.__enter__()  # for the worker's lifetime
    _WORKER_ENVS.append(env)


_WORKER_ENVS: list[Any] = []


#: Seconds a worker that cannot tell SIGTERM's sender keeps serving after one (see
#: :func:`_sigterm_from_parent_only`): time for the main process to finish its batch.
SIGTERM_GRACE_S = 20.0


def _sigterm_from_parent_only(grace_s: float | None = None) -> None:
    """In a DataLoader worker: end on the parent's SIGTERM, leave everyone else's to it.

    SIGTERM sent to every process of a job (``scancel``, a SLURM time limit, systemd,
    ``kill -TERM -PGID``) is the main process's to handle: it stops the job after the batch
    and ends the workers, which otherwise died first, and the loader raised "worker killed by
    signal" with a traceback. But the parent's own SIGTERM (the loader's shutdown, and
    multiprocessing's at interpreter exit, which terminates daemonic children and waits for
    them) must end the worker: ignoring every SIGTERM made a job that failed while its
    workers were alive hang at exit forever.

    A worker with one thread (Linux's default fork start) tells the sender apart exactly:
    SIGTERM is blocked and taken by a thread in ``sigwaitinfo``, which ends the worker when
    ``si_pid`` is the process that made it. A signal is delivered to any thread not blocking
    it, so where threads already run (libraries imported by a spawned or forkserver worker
    start thread pools) or ``sigwaitinfo`` is missing (macOS, Windows), any SIGTERM ends the
    worker :data:`SIGTERM_GRACE_S` seconds later instead. PyTorch's workers already ignore
    SIGINT; an orphaned worker exits when it sees its parent gone.

    Args:
        grace_s: seconds of that grace; None for :data:`SIGTERM_GRACE_S`.
    """
    grace = SIGTERM_GRACE_S if grace_s is None else grace_s
    if hasattr(signal, "sigwaitinfo") and _thread_count() == 1:
        made_by = multiprocessing.parent_process()  # under forkserver, not getppid()
        parent = made_by.pid if made_by is not None and made_by.pid else os.getppid()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

        def wait_for_the_parents() -> None:
            while True:
                if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                    os._exit(128 + signal.SIGTERM)  # as a shell reports death by SIGTERM

        threading.Thread(target=wait_for_the_parents, name="sigterm", daemon=True).start()
        return

    def end_after_a_grace(signum: int, frame: Any) -> None:
        timer = threading.Timer(grace, os._exit, (128 + signal.SIGTERM,))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, end_after_a_grace)


def _thread_count() -> int:
    """The process's native threads (Linux's /proc), or 0 where that cannot be read."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def gdal_worker_init(cache_bytes: int) -> Callable[[int], None]:
    """A DataLoader ``worker_init_fn`` that sets GDAL's cache in each worker.

    Forked workers inherit the parent's cache size, spawned ones (macOS, Windows) do not;
    with this every worker has ``cache_bytes`` whatever the start method. Workers also
    ignore SIGTERM from any process but their parent, as PyTorch's ignore SIGINT: a signal
    sent to the whole process group is the main process's to act on
    (:class:`~torchgeo_dofa.jobs.StopOnSignal` stops after the batch and the loader ends its
    workers), while the parent's own SIGTERM (a loader's shutdown, Python's exit) ends them.

    Args:
        cache_bytes: cache size in bytes per worker (see :func:`gdal_cache_bytes` with
            ``processes`` = workers + 1).

    Returns:
        A picklable function of the worker id.
    """
    return functools.partial(_enter_gdal_env, int(cache_bytes))
