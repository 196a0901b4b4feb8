"""The ``torchgeo-dofa`` console script and ``python -m torchgeo_dofa``.

Both set :data:`OPENMP_DEFAULTS` in the environment, where the user has not set them, before
PyTorch is imported (its OpenMP runtime reads them once, when it is loaded), raise glibc's
allocator thresholds for a prediction job (:func:`apply_malloc_defaults`, below), then run
:func:`torchgeo_dofa.cli.main`, and exit through :func:`run_as_command` (see there: without
Python's interpreter teardown, which takes ~1.1 s once torch, Lightning and TorchGeo are loaded).

Why passive waiting: an embed job on the CPU runs the model's OpenMP threads (one per core)
beside DataLoader worker processes that read chips on the same cores. With OpenMP's default
active wait, a thread that finishes its share of an operation spins on its core until the
others are done, so a worker scheduled on any core stalls the whole model step while the
spinning thread keeps its core busy. Passive waiting yields the core instead. Measured on a
2-core Sapphire Rapids VM, ``benchmarks/e2e_worker.py``, 256 chips, bf16, batch 8, one loader
worker, three interleaved pairs: 18.9 / 17.6 / 18.6 chips/s passive vs 16.5 / 17.5 / 17.0
active (+8 % on average); the encoder alone, with no other work on the cores, is ~5 % slower
passive. Set ``OMP_WAIT_POLICY=ACTIVE`` (or any value) to choose otherwise; Python callers of
:func:`torchgeo_dofa.cli.embed` set it themselves, before importing torch.

Why the allocator settings (:func:`apply_malloc_defaults`, glibc only): a DOFA forward on the
CPU allocates and frees tensors of tens of MB per block (the MLP's hidden activations of a
batch of 32 are 39 MB in bf16, 77 MB in fp32). glibc's ``malloc`` serves blocks above its
mmap threshold (128 KiB, rising to at most 32 MiB as large blocks are freed) with a fresh
``mmap`` and returns them with ``munmap`` when freed, and trims the heap's free top above its
trim threshold: every batch then maps, zero-fills (a page fault a 4 KiB page) and unmaps
the same memory again. Measured on a 2-core Intel Xeon VM with AMX, DOFA base, bf16,
batch 32, three timings of three batches each: the encoder alone 34.7-35.8 img/s with 0.7-0.9
s of system time and 400,000-600,000 page faults per three batches, against 35.2-39.1 img/s,
0.02-0.1 s and none after the first batches with both thresholds at 1 GiB; an embed job of
256 chips (``benchmarks/e2e_worker.py``, one loader worker, three interleaved pairs) 22.3 /
22.3 / 22.4 -> 29.8 / 28.9 / 29.0 chips/s after the first batch (the job's peak RSS
2348-2397 vs 2350-2360 MB there; the whole ``torchgeo-dofa embed`` process 2.36-2.44 vs
2.24 GB): the freed memory stays in the heap for the next batch, so the process keeps its
peak until it ends. Applied to ``embed`` and ``predict`` (:data:`MALLOC_COMMANDS`).
Setting one threshold alone is worse than glibc's defaults (it fixes the other at its
initial value): the encoder alone ran 22 img/s with only the trim threshold raised.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import os
import signal
import sys
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

#: Environment defaults the command line applies before PyTorch is loaded (see above).
OPENMP_DEFAULTS: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}

#: glibc's ``mallopt`` parameter numbers (``<malloc.h>``).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3

#: The mmap thresholds :func:`apply_malloc_defaults` tries, in order: 1 GiB keeps every
#: tensor of a DOFA large batch in the heap (``mallopt`` takes an ``int``); glibc releases
#: that refuse a threshold above ``HEAP_MAX_SIZE / 2`` (32 MiB on 64-bit) get 32 MiB, the
#: most glibc's own dynamic threshold reaches, fixed from the start.
MALLOC_MMAP_THRESHOLDS = (1 << 30, 32 << 20)

#: The trim threshold, set once an mmap threshold is: the heap's free top is returned to the
#: system only beyond it.
MALLOC_TRIM_THRESHOLD = 1 << 30

#: The subcommands whose process gets :func:`apply_malloc_defaults`: the prediction jobs, where
#: they were measured to pay. ``fit`` keeps glibc's defaults: the segmentation example
#: (``configs/finetune_segmentation.yaml``, 2 epochs) peaked at 5.37 GB with them against 4.43
#: GB without (its checkpoints' buffers stay in the heap), in the same time (39.0 vs 39.9 s).
MALLOC_COMMANDS = ("embed", "predict")

#: Set to ``0`` to keep glibc's allocator as it is (:func:`apply_malloc_defaults`).
MALLOPT_VARIABLE = "TORCHGEO_DOFA_MALLOPT"

#: glibc's own environment variables for the settings :func:`apply_malloc_defaults` makes
#: (set, even empty, they are the user's: glibc reads an empty one as 0), and their
#: ``GLIBC_TUNABLES`` names.
_MALLOC_ENVIRONMENT = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
)
_MALLOC_TUNABLES = (
    "glibc.malloc.mmap_threshold",
    "glibc.malloc.trim_threshold",
    "glibc.malloc.top_pad",
    "glibc.malloc.mmap_max",
)

#: Allocators that replace glibc's through ``LD_PRELOAD`` (matched in the library's name).
_PRELOADED_ALLOCATORS = (
    "jemalloc",
    "tcmalloc",
    "mimalloc",
    "hoard",
    "scudo",
    "snmalloc",
    "tbbmalloc",
    "rpmalloc",
    "hardened_malloc",
)

#: Set to ``0`` to leave the command's exit to Python (the interpreter's full teardown).
FAST_EXIT_VARIABLE = "TORCHGEO_DOFA_FAST_EXIT"

_exit_status: list[int] = []  # the command's status, once it has returned one
_fast_exit_armed: list[bool] = []  # non-empty once run_as_command will end the process
_collector_paused: list[bool] = []  # non-empty while run_as_command pauses the collector
#: SIGINT / SIGTERM's handlers before the command's libraries began to load, by signal, while
#: :func:`_exit_on_signal` handles them (see :func:`run_as_command`)
_load_handlers: dict[int, Any] = {}
#: SIGTERM's handler before the command began, while :func:`terminate_before_the_job` handles
#: it (from :func:`end_import_pause` until the command returns; the job's own handler in between)
_gap_handlers: dict[int, Any] = {}
_terminating: list[int] = []  # non-empty once terminate_before_the_job has raised


class Terminated(KeyboardInterrupt):
    """SIGTERM reached the command after its libraries loaded, outside its job's handler.

    Raised (by :func:`terminate_before_the_job`) where a Ctrl-C raises ``KeyboardInterrupt``,
    and handled as it is: what the command holds is released on the way out (its output
    folder's lock, a folder it made, a picture's hidden temporary file), and the command
    reports one line, ``stopped by SIGTERM: ...``, exit status 143.

    Attributes:
        signum: the signal (``signal.SIGTERM``).
    """

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)
        self.signum = signum


def terminate_before_the_job(signum: int, frame: object) -> None:
    """SIGTERM between the libraries' load and the job's handler: raise :class:`Terminated`.

    Python's default for SIGTERM ends the process at once: in the second or so when an
    ``embed`` or ``predict --config`` command checks its inputs and loads its weights (after
    :func:`end_import_pause`, before :class:`~torchgeo_dofa.jobs.StopOnSignal` takes the
    signal), that left the output folder's lock file and the folder behind, with no line and
    the status of a process killed by a signal (a Ctrl-C there was one line, exit 130, nothing
    left). The job's handler treats this one as Python's default: a second SIGTERM during a
    job still ends the process at once.

    A SIGTERM while the command already unwinds from one does nothing (it raised from the
    unwinding's ``finally`` blocks: a traceback, exit 1).

    Raises:
        Terminated: the first time.
    """
    if _terminating:
        return
    _terminating.append(signum)
    raise Terminated(signum)


def process_ends_after_command() -> bool:
    """Whether this process ends (without teardown) once its command returns.

    Then a job need not free its memory for a next one (``gc.collect()``, 0.3 s).
    """
    return bool(_fast_exit_armed)


def run_as_command(command: Callable[[], int]) -> int:
    """Run ``command`` as this process's command; it exits with the status returned, quickly.

    Python tears the interpreter down after the ``atexit`` handlers: it frees every module
    and object. With torch, Lightning, TorchGeo and rasterio loaded that takes ~1.1 s (a
    2-core VM: a one-chip ``embed`` printed its summary 1.2-1.3 s before the process ended;
    ``python -c "import torch, lightning.pytorch, torchgeo.datasets, torchgeo.models,
    rasterio"`` ran 4.9 s, 3.8 s ending in ``os._exit``), with nothing of the job left to
    do: every output is closed, flushed to disk and read back before the command returns.
    Here the last ``atexit`` handler (registered before ``command`` runs, so run after every
    handler registered meanwhile: multiprocessing's cleanup of child processes, logging,
    temporary folders) flushes stdout and stderr and ends the process with ``os._exit``
    (Python has already waited for non-daemon threads by then).

    It also makes the status the one returned: run as ``python -m``, Python ends a process
    whose command returned (or exited) normally by SIGINT instead when a Ctrl-C interrupted
    code run through ``PyRun_*`` inside it (as happens while the libraries load): exit 130
    came out as "killed by SIGINT" now and then.

    While the command loads its libraries (until it calls :func:`end_import_pause`), a
    Ctrl-C prints one line and ends the process at once with 130 (:func:`_exit_on_signal`;
    SIGTERM likewise, 143),
    without raising ``KeyboardInterrupt`` into the libraries' compiled code. From then until
    the command returns, SIGTERM raises :class:`Terminated` where no job's handler takes it
    (:func:`terminate_before_the_job`), as Ctrl-C raises ``KeyboardInterrupt``. Once the
    command has returned, Ctrl-C and SIGTERM are ignored until the process ends: a Ctrl-C in
    those milliseconds interrupted the exit handlers (a KeyboardInterrupt traceback after a
    successful job, the handlers after it skipped), a SIGTERM ended the finished job by the
    signal, without a word (the shell's 143).

    Python's cyclic garbage collector is paused while the command loads its libraries
    (until it calls :func:`end_import_pause`), and what they made is then frozen
    (``gc.freeze``), out of every later collection. The imports make ~530,000 objects that
    live as long as the process; each collection of the oldest generation walked them all
    (~0.12 s each: eight during a one-chip job's run, 0.95 s in all). Measured on a 2-core
    Sapphire Rapids VM: importing torch, Lightning, TorchGeo, rasterio and this package's job
    modules 3.9 s -> 3.0 s (three interleaved pairs); the job after them (``embedded N chips
    in X s``) 1.6 -> 1.3 s for one chip and 4.6 -> 4.0 s for 64 chips (bf16). Freezing
    before the DataLoader workers fork also keeps those objects' memory pages shared with
    them (Python's documented use of ``gc.freeze``).

    Python's own exit is kept where the command raises (a traceback, ``SystemExit`` from a
    usage error), under ``python -i``, where ``atexit`` handlers were registered before the
    command started (a coverage tool's, which must still run), and with
    ``TORCHGEO_DOFA_FAST_EXIT=0``.

    Args:
        command: the command, returning its exit status.

    Returns:
        The status ``command`` returned (the process then exits with it when Python exits).
    """
    earlier = getattr(atexit, "_ncallbacks", lambda: 0)()  # CPython; elsewhere assume none
    fast = os.environ.get(FAST_EXIT_VARIABLE) != "0" and not sys.flags.inspect and not earlier
    if fast:
        atexit.register(_exit_without_teardown)
        _fast_exit_armed.append(True)
    if gc.isenabled():  # until the command's libraries are loaded: see end_import_pause
        gc.disable()
        _collector_paused.append(True)
    for signum, usual in (
        (signal.SIGINT, signal.default_int_handler),
        (signal.SIGTERM, signal.SIG_DFL),
    ):
        if signal.getsignal(signum) is usual:  # not ignored, nor someone else's
            _load_handlers[signum] = usual
            signal.signal(signum, _exit_on_signal)  # until end_import_pause
    try:
        status = command()
        if fast:  # the command is done: a Ctrl-C now would only break the exit handlers,
            # a SIGTERM end a finished job by the signal (143) after its summary
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except KeyboardInterrupt as err:  # in the instant between the command's return and above
        status = 128 + getattr(err, "signum", signal.SIGINT)
    finally:
        if _collector_paused:  # a command that loaded no library (--help, a usage error)
            _collector_paused.clear()
            gc.enable()
        _end_signal_exit()
    _exit_status.append(status)
    return status


def end_import_pause() -> None:
    """The command's libraries are loaded: freeze what they made, resume collecting.

    Ctrl-C raises Python's ``KeyboardInterrupt`` again from here, and SIGTERM raises
    :class:`Terminated` (:func:`terminate_before_the_job`) until the command returns (the
    job's handlers take them while it runs; :func:`_exit_on_signal` ended the process while
    the libraries loaded).

    Called by the command (:func:`torchgeo_dofa.cli.embed`, the LightningCLI subcommands)
    once PyTorch, Lightning, TorchGeo and the job's modules are imported, before its job
    makes any object worth collecting. The few cycles the imports left unreachable (18,498
    objects in a stranger's count, ~10 MB of peak RSS) are frozen with the rest: collecting
    them first would walk every object once more (~0.2 s). Does nothing unless
    :func:`run_as_command` paused Python's cyclic collector (a Python caller of the CLI
    functions keeps its collector as it was: freezing would keep the garbage its own objects
    may hold until it ends).
    """
    _end_signal_exit(job_begins=True)
    if _collector_paused:
        _collector_paused.clear()
        gc.freeze()
        gc.enable()


def _exit_on_signal(signum: int, frame: object) -> None:
    """SIGINT or SIGTERM while the command's libraries load: one line, end at once (130 / 143).

    Python's own handler raises ``KeyboardInterrupt`` wherever the main thread is, and while
    torch, Lightning and TorchGeo load that is often inside their compiled code: a
    ``pybind11`` callback then ended the process with ``terminate called after throwing an
    instance of 'pybind11::error_already_set'`` (SIGABRT, exit -6), and an extension
    module's initialisation (``matplotlib._image``) with an ``ImportError: initialization
    failed`` traceback (exit 1). Seen on a 2-core AMD EPYC VM: the abort once in a run of the
    test suite, the ``ImportError`` once in 24 Ctrl-Cs sent 0.2-2.4 s after the start. This
    handler raises nothing: no job has begun, so nothing is left to clean up or flush but
    stderr. SIGTERM ended the process silently there (by the signal, no line).
    """
    from .locks import report_ctrl_c  # free of PyTorch, imported in milliseconds

    status = report_ctrl_c(None, signum)
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os._exit(status)


def _end_signal_exit(job_begins: bool = False) -> None:
    """Give SIGINT / SIGTERM back their usual handlers (``KeyboardInterrupt``, termination).

    Args:
        job_begins: the libraries are loaded and the command goes on: SIGTERM raises
            :class:`Terminated` (:func:`terminate_before_the_job`) until this is called
            again without it, when the command has returned.
    """
    for signum, usual in list(_load_handlers.items()):
        del _load_handlers[signum]
        if signal.getsignal(signum) is _exit_on_signal:
            if job_begins and signum == signal.SIGTERM:
                _gap_handlers[signum] = usual
                signal.signal(signum, terminate_before_the_job)
            else:
                signal.signal(signum, usual)
    if not job_begins:
        for signum, usual in list(_gap_handlers.items()):
            del _gap_handlers[signum]
            if signal.getsignal(signum) is terminate_before_the_job:
                signal.signal(signum, usual)
        _terminating.clear()  # the command is over: a next one in this process starts afresh


def _exit_without_teardown() -> None:
    """Flush stdout / stderr and ``os._exit`` with the command's status (the last handler)."""
    if not _exit_status:  # the command raised: Python reports it and exits as usual
        return
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):  # a closed or broken stream: Python's usual report
        return
    os._exit(_exit_status[-1])


def apply_openmp_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set :data:`OPENMP_DEFAULTS` where ``environ`` lacks them, if torch is not loaded yet.

    Args:
        environ: the environment to change (default: ``os.environ``).

    Returns:
        The variables set (empty when the user set them all, or when ``torch`` is already
        imported in this process: its OpenMP runtime has read the environment then, so a
        change would have no effect).
    """
    env = os.environ if environ is None else environ
    if "torch" in sys.modules:
        return {}
    applied = {k: v for k, v in OPENMP_DEFAULTS.items() if k not in env}
    env.update(applied)
    return applied


def _is_glibc() -> bool:
    """Whether this process runs on glibc (not musl, macOS's libc or Windows)."""
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError, AttributeError):  # not glibc, or no confstr (Windows)
        return False


def apply_malloc_defaults(
    environ: Mapping[str, str] | None = None,
    *,
    mallopt: Callable[[int, int], int] | None = None,
) -> dict[str, int]:
    """Raise glibc's mmap and trim thresholds for this process.

    Freed tensors then stay in the heap for the next batch instead of being unmapped and
    mapped (and zero-filled) again: see the module's docstring for why and what it measured.
    The mmap threshold is set first (:data:`MALLOC_MMAP_THRESHOLDS`, the first glibc takes),
    then the trim threshold (:data:`MALLOC_TRIM_THRESHOLD`); where glibc takes no mmap
    threshold nothing is set, since a trim threshold alone fixes the mmap threshold at 128
    KiB, slower than glibc's defaults. DataLoader workers started by ``fork`` inherit the
    setting (Linux's default start method before Python 3.14; a ``forkserver`` or ``spawn``
    worker allocates with glibc's defaults, its batches are small). The ``torchgeo-dofa``
    command applies it to its own process for ``embed`` and ``predict``
    (:data:`MALLOC_COMMANDS`); a Python program may call it once, early (it changes how the
    whole process allocates: memory freed stays reserved until the process ends, so the
    peak resident memory can be higher: +5-9 % for a 256-chip ``embed``, +21 % for a fit,
    see :data:`MALLOC_COMMANDS`).

    Args:
        environ: the environment to consult (default: ``os.environ``).
        mallopt: glibc's ``mallopt`` (default: this process's, through ctypes); any callable
            taking (parameter, value) and returning non-zero on success.

    Returns:
        The settings applied, by name (``M_MMAP_THRESHOLD``, ``M_TRIM_THRESHOLD``); empty where
        nothing was changed: not glibc (macOS, musl, Windows), ``TORCHGEO_DOFA_MALLOPT=0``, a
        setting of the user's own (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
        ``MALLOC_TOP_PAD_`` or ``MALLOC_MMAP_MAX_`` set, even empty; their
        ``glibc.malloc.*`` entries in ``GLIBC_TUNABLES``), another allocator in
        ``LD_PRELOAD`` (jemalloc, tcmalloc, mimalloc, Hoard, Scudo, snmalloc, oneTBB's
        tbbmalloc, rpmalloc, hardened_malloc), or a glibc that takes no mmap threshold.
    """
    env = os.environ if environ is None else environ
    preload = env.get("LD_PRELOAD", "").lower()
    if (
        any(k in env for k in _MALLOC_ENVIRONMENT)
        or any(t in env.get("GLIBC_TUNABLES", "") for t in _MALLOC_TUNABLES)
        or any(name in preload for name in _PRELOADED_ALLOCATORS)
        or env.get(MALLOPT_VARIABLE) == "0"
    ):
        return {}
    if mallopt is None:
        if not _is_glibc():
            return {}
        libc_mallopt = ctypes.CDLL(None).mallopt
        libc_mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        mallopt = libc_mallopt
    applied: dict[str, int] = {}
    for value in MALLOC_MMAP_THRESHOLDS:
        if mallopt(M_MMAP_THRESHOLD, value):
            applied["M_MMAP_THRESHOLD"] = value
            break
    else:
        return applied  # glibc's dynamic threshold stays
    if mallopt(M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD):
        applied["M_TRIM_THRESHOLD"] = MALLOC_TRIM_THRESHOLD
    return applied


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torchgeo-dofa`` console script.

    Args:
        argv: arguments (default: ``sys.argv[1:]``, the process's command line: then the
            process exits as :func:`run_as_command` says once Python exits; with ``argv``
            given, as when called from Python, nothing about the exit changes).

    Returns:
        The exit status of :func:`torchgeo_dofa.cli.main`.
    """
    if argv is None:  # this process is the command's: its allocator too, where it predicts
        if sys.argv[1:2] and sys.argv[1] in MALLOC_COMMANDS:
            apply_malloc_defaults()
        return run_as_command(_command)  # before the imports below register exit handlers
    return _command(argv)


def _command(argv: Sequence[str] | None = None) -> int:
    apply_openmp_defaults()
    if argv is None:  # this process is the command's (run_as_command's exit handler is in
        # place: multiprocessing, imported here, registers its own after it, which runs first)
        from .runtime import raise_open_file_limit

        raise_open_file_limit()  # a low soft ``ulimit -n`` up to the hard one, as Go does
    if sys.argv and os.path.basename(sys.argv[0]) == "__main__.py":
        sys.argv[0] = "torchgeo-dofa"  # LightningCLI's usage lines name the program by it
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:  # before cli.main's own handler exists (exit 130, no word)
        from .locks import report_ctrl_c

        return report_ctrl_c(argv)
    return cli_main(argv)


if __name__ == "__main__":
    # python -m runs this file as __main__, a module apart from torchgeo_dofa.__main__, which
    # the CLI asks about its process (process_ends_after_command, end_import_pause): run the
    # command through that one, so both see the same state
    from torchgeo_dofa.__main__ import main as _package_main

    sys.exit(_package_main())
