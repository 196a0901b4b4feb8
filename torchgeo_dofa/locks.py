"""The output folder's lock, and the job's processes: which one takes it, which die with it.

:class:`OutputLock` holds an exclusive ``flock`` on ``<folder>/.torchgeo-dofa.lock`` for a
job's lifetime: a second job on the same folder fails at once (:class:`JobLockedError`); the
kernel drops the lock when the process dies, even on ``kill -9``. Only the launching process
takes it (:func:`is_launcher`). Kept apart from :mod:`torchgeo_dofa.jobs` and free of
PyTorch and Lightning, so taking or checking a lock loads nothing heavy (about 0.1 s, not
the ~10 s of the libraries): a script can see whether a folder is in use, and the job's
refusals come as early as the lock is taken. :func:`stop_advice` words a stopped job's
error line, also for a Ctrl-C while the libraries load. :mod:`torchgeo_dofa.jobs`
re-exports all of it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import itertools
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

__all__ = [
    "LAUNCHER_PID_VARIABLE",
    "LOCK_NAME",
    "JobError",
    "JobLockedError",
    "OutputLock",
    "OutputPathError",
    "die_with_launcher",
    "is_launcher",
    "launched_ranks",
    "mark_launcher",
    "master_addr_problem",
    "master_port_problem",
    "missing_input_problem",
    "refuse_undecodable_name",
    "rendezvous_here",
    "report_ctrl_c",
    "signals_deferred",
    "stop_advice",
]

LOCK_NAME = ".torchgeo-dofa.lock"
#: Variables without which neither of Lightning's launcher detections used by
#: :func:`is_launcher` can be True.
_LAUNCHER_VARIABLES = ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS")


def master_port_problem(processes: int = 1) -> str | None:
    """What is wrong with ``MASTER_PORT`` for a job of several processes, if anything.

    The processes of a DDP job meet on rank 0's port, ``MASTER_PORT`` where it is set.
    Lightning read ``abc`` as ``int("abc")`` (its ``ValueError``, not naming the variable),
    PyTorch refused ``70000`` ("port must have value from 0 to 65535"), and ``0`` (any free
    port) let rank 0 listen where the others could not find it: they waited 30 min.

    Args:
        processes: the job's process count on this machine (``0`` is refused above 1).

    Returns:
        A one-line error naming ``MASTER_PORT`` and the fix, or None (unset, or a port).
    """
    value = os.environ.get("MASTER_PORT")
    if value is None:
        return None
    fix = "set it to a free port, or unset it to let Lightning choose one"
    try:  # as Lightning reads it: int() takes spaces, a sign, any Unicode decimal digits
        port = int(value)
    except ValueError:  # "abc", "", "²" (a digit to str.isdigit, not to int)
        port = -1
    if not 0 <= port <= 65535:
        return f"MASTER_PORT={value!r} is not a TCP port (an integer from 1 to 65535): {fix}"
    if port == 0 and processes > 1:
        return (
            "MASTER_PORT=0 (any free port) cannot bring a job's processes together: rank 0 "
            f"would listen on a port the others cannot know; {fix}"
        )
    return None


#: IPv4 broadcast addresses that are one whatever the network: the limited broadcast and
#: loopback's (a subnet's own broadcast address depends on its mask, unknown here).
_BROADCAST = (ipaddress.ip_address("255.255.255.255"), ipaddress.ip_address("127.255.255.255"))


def master_addr_problem(here: bool) -> str | None:
    """What is wrong with ``MASTER_ADDR`` for a job of several processes, if anything.

    The processes of a job meet at ``MASTER_ADDR`` (Lightning's default ``127.0.0.1``), where
    rank 0 listens. A name that does not resolve (also one with white space around it, which
    PyTorch does not strip) made PyTorch retry for the process-group timeout (30 min),
    printing a warning every few seconds; an address rank 0 cannot listen on (not this
    machine's, a link-local IPv6 address without its zone, a multicast one) made it wait the
    same 30 min, silently, for a connection to itself.

    Args:
        here: rank 0 runs in this process's machine and listens there
            (:func:`rendezvous_here`), so ``MASTER_ADDR`` must be an address this machine can
            listen on. Elsewhere only its resolving is checked.

    Returns:
        A one-line error naming ``MASTER_ADDR`` and the fix, or None (unset, or usable as
        far as can be told without the other processes).
    """
    value = os.environ.get("MASTER_ADDR")
    if value is None:
        return None
    fix = "set it to rank 0's host name or address (127.0.0.1 on one machine), or unset it"
    if not value.strip():
        return f"MASTER_ADDR is empty: {fix}"
    if value != value.strip():
        return (
            f"MASTER_ADDR={value!r} has white space around the address, which PyTorch keeps "
            f"(the name then does not resolve): set it to {value.strip()!r}"
        )
    try:
        found = socket.getaddrinfo(value, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        why = err.strerror if isinstance(err, socket.gaierror) else str(err)
        return f"MASTER_ADDR={value!r} does not resolve to an address ({why}): {fix}"
    ips = [ipaddress.ip_address(str(found_[4][0]).partition("%")[0]) for found_ in found]
    if all(ip.is_multicast or ip in _BROADCAST for ip in ips):  # from any machine
        return (
            f"MASTER_ADDR={value!r} is a multicast or broadcast address, which no process can "
            f"connect to: {fix}"
        )
    if all(ip.version == 6 and ip.is_link_local for ip in ips) and "%" not in value:
        return (
            f"MASTER_ADDR={value!r} is a link-local IPv6 address without its zone, which no "
            f"process can connect to: add the zone (e.g. {value}%eth0), or {fix}"
        )
    if not here:
        return None
    head = f"MASTER_ADDR={value!r} is not an address of this machine"
    for family, _, _, _, address in found:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((address[0], 0, *address[2:]))
        except OSError as err:
            if err.errno != errno.EADDRNOTAVAIL:
                head = (
                    f"MASTER_ADDR={value!r} is no address this machine can listen on "
                    f"({err.strerror or err})"
                )
            continue
        return None
    return (
        f"{head}, where rank 0 of the job runs and the others meet it (it would wait 30 min "
        "for itself there): set it to this machine's host name or address (127.0.0.1), or "
        "unset it"
    )


def _srun_used() -> bool:
    """Lightning's ``SLURMEnvironment.detect()``, without loading Lightning.

    ``SLURM_NTASKS`` set, and the job not named ``bash`` / ``interactive`` (an ``salloc``
    shell: Lightning then launches the processes itself, as without SLURM).
    """
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in (
        "bash",
        "interactive",
    )


def launched_ranks() -> int:
    """The ranks a launcher started for the job, 0 where none did.

    ``srun``'s ``SLURM_NTASKS`` (where Lightning detects ``srun``), ``torchrun``'s
    ``WORLD_SIZE`` (1 where unreadable); 0 for Lightning's own launcher or a single process.
    """
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        text = os.environ.get("WORLD_SIZE", "").strip()
    elif _srun_used():
        text = os.environ.get("SLURM_NTASKS", "").strip()
    else:
        return 0
    return int(text) if text.isdecimal() else 1


def rendezvous_here(num_nodes: int = 1) -> bool:
    """Whether rank 0 of the job listens on this machine, so ``MASTER_ADDR`` must be its own.

    Under ``torchrun`` the rendezvous store is its agent's, on ``MASTER_ADDR`` as torchrun set
    it: not this process's to check. Under ``srun``, rank 0 is the task with
    ``SLURM_PROCID`` 0 (Lightning's ``SLURMEnvironment``). Otherwise Lightning's launcher
    starts rank 0 on node 0 (``NODE_RANK``), and every rank on this machine for one node.

    Args:
        num_nodes: the trainer's ``num_nodes``.
    """
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return False
    if _srun_used():
        return os.environ.get("SLURM_PROCID", "0").strip() == "0"
    return num_nodes == 1 or os.environ.get("NODE_RANK", "0").strip() == "0"


class JobError(Exception):
    """Base of the embed job's own errors; ``exit_status`` is the CLI's exit status."""

    exit_status: int = 1


def stop_advice(command: str | None, began: bool = True, resumable: bool = True) -> str:
    """What a command stopped by a signal (or Ctrl-C) kept, and how to go on.

    One wording for every place a stop is reported (the job's own handler, Lightning's
    shutdown after a second Ctrl-C, a Ctrl-C while the libraries load).

    Args:
        command: the subcommand stopped: ``"embed"`` or ``"predict"`` (their writers keep
            every chip written), ``"fit"``, ``"validate"``, ``"test"``, another or None.
        began: False when the stop came before the command's trainer began (``fit`` has
            then no checkpoint of this run to resume from), or before an embed or predict
            job wrote its first chip in this run (it then left nothing of its own: whether
            its weights are resumable does not matter).
        resumable: False for an embed or predict job with random weights drawn without a
            seed: a rerun draws other weights, so it cannot resume the chips written. The
            fix is named with the command's own options (``embed``: ``--overwrite`` /
            ``--seed``; ``predict``: the parts folders / the model's ``seed``).

    Returns:
        The advice, e.g. ``"the chips written so far are kept; rerun the same command to
        resume"``.
    """
    if command in ("embed", "predict"):
        if not began:  # (an earlier run's chips: kept, unless this run's --overwrite went)
            return f"{command} stopped before its first chip: rerun the same command"
        if not resumable:
            fix = (
                "rerun with --overwrite, or with --seed N"
                if command == "embed"
                else "delete the outputs' .parts folders to start afresh, or give the model "
                "a seed (--model.init_args.seed N)"
            )
            return (
                "the chips written so far cannot be resumed (random weights without a seed "
                f"are drawn anew on every run): {fix} to make a job resumable"
            )
        return "the chips written so far are kept; rerun the same command to resume"
    if not began and command in ("fit", "validate", "test"):
        return f"{command} stopped before it began, nothing saved: rerun the same command"
    if command == "fit":
        return (
            "nothing saved at the stop: rerun the same command with --ckpt_path of the last "
            "checkpoint saved, if any"
        )
    return "nothing saved at the stop: rerun the same command"


#: Whether the command's job has written every output (until the next command begins).
_finished_job: list[bool] = [False]


def note_job_finished(finished: bool = True) -> None:
    """Record that the command's job has written every output (False: a command begins).

    A Ctrl-C or SIGTERM in the instant between the job's end and the command's return (its
    lock released, its summary printed) was reported as a stop before the job ("embed
    stopped before its first chip: rerun the same command") of a job whose outputs were
    complete; :func:`report_ctrl_c` now says that they are.
    """
    _finished_job[0] = finished


def report_ctrl_c(argv: Sequence[str] | None, signum: int = signal.SIGINT) -> int:
    """Say on stderr that Ctrl-C stopped the command before its job's handlers existed.

    For a Ctrl-C while the libraries load (or a second one): one line, no traceback. Also
    for SIGTERM while the libraries load (``signum``): ``stopped by SIGTERM: ...``. After
    the job has written every output (:func:`note_job_finished`), the line says so instead
    (``SIGTERM once embed had finished: every output is written; nothing to rerun``).

    Args:
        argv: the command line's arguments (default: ``sys.argv[1:]``); the first names
            the subcommand.
        signum: the signal: SIGINT (Ctrl-C) or another.

    Returns:
        The shell's status for the signal: 130 for SIGINT, 143 for SIGTERM.
    """
    command = next(iter(sys.argv[1:] if argv is None else argv), None)
    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    if _finished_job[0]:  # (no error: the job's outputs are complete)
        line = f"{name} once {command} had finished: every output is written; nothing to rerun"
    elif signum == signal.SIGINT:
        line = f"error: interrupted (Ctrl-C); {stop_advice(command, began=False)}"
    else:
        line = f"error: stopped by {name}: {stop_advice(command, began=False)}"
    with contextlib.suppress(OSError):  # stderr gone: the status still says it
        print(f"torchgeo-dofa: {line}", file=sys.stderr)
    return 128 + signum


class JobLockedError(JobError, RuntimeError):
    """Another torchgeo-dofa job holds the output folder's lock: exit status 75 (EX_TEMPFAIL)."""

    exit_status = 75


def _is_utf8(text: str) -> bool:
    """Whether a path's text encodes as UTF-8 (its undecodable bytes are surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def missing_input_problem(path: str | os.PathLike[str]) -> str:
    """The line naming an input that does not exist, and a wildcard pattern as such.

    Nothing here expands a pattern (``*``, ``?``, ``[``), as TorchGeo's datasets do not; a
    shell expands an unquoted one on the command line, and the advice names each door's way
    (the command, Python, a LightningCLI config's ``paths``): the same text from all of them.

    Args:
        path: the input as given.

    Returns:
        ``input '<path>' does not exist``, with the wildcard advice where it holds one.
    """
    text = os.fspath(path)
    line = f"input {text!r} does not exist"
    if any(c in text for c in "*?["):
        line += (
            " (a wildcard pattern is not expanded: on the command line leave it unquoted for "
            "the shell to expand; in Python give sorted(glob.glob(pattern)), in a config file "
            "a list of the files; or give the folder)"
        )
    return line


def refuse_undecodable_name(
    path: str | os.PathLike[str], what: str, error: type[Exception] = ValueError
) -> None:
    r"""Refuse a path whose name, as given or as its real path, is not valid UTF-8.

    The outputs' metadata (GeoTIFF tags, GeoParquet columns, the job manifest) hold paths
    as UTF-8 text: an output folder named in Latin-1 (``caf\xe9/``) failed after every chip
    was computed, and every rerun failed the same way; an input file so named failed with
    Python's "surrogates not allowed" naming neither the file nor the fix. The real path
    (links and ``..`` resolved, relative to the working folder) is what is read and
    recorded, so a UTF-8 link to such a folder is refused too.

    Args:
        path: the path.
        what: what to call it in the message (``"output folder"``, ``"input"``).
        error: the exception class to raise.

    Raises:
        error: naming the path (its undecodable bytes as ``\xNN``) and the fix.
    """
    given, real = os.fspath(path), os.path.realpath(path)
    why = (
        "is not valid UTF-8 (a name in another encoding, e.g. Latin-1), which the outputs' "
        "metadata cannot record"
    )
    fix = "in UTF-8 (convmv -f latin1 -t utf8 --notest NAME)"
    if not _is_utf8(given):
        raise error(
            f"{what} '{_shown_name(given)}': its name {why}: rename it {fix}, or choose "
            "another name"
        ) from None
    if not _is_utf8(real):  # through the working folder, or a link
        folder = next(part for part in Path(real).parts if not _is_utf8(part))
        raise error(
            f"{what} '{_shown_name(given)}': its real path '{_shown_name(real)}' goes "
            f"through the folder '{_shown_name(folder)}', whose name {why}: rename that "
            f"folder {fix}, or choose a place outside it"
        ) from None


def _shown_name(text: str) -> str:
    r"""A path's text with its undecodable bytes as ``\xNN``."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


class OutputPathError(ValueError):
    """A writer's output path cannot be this job's.

    A folder, an input, another writer's output, an ``embed`` job's result, or a path in a
    folder that cannot be written.
    """


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
    ranks = [os.environ.get(name, "0") for name in ("LOCAL_RANK", "NODE_RANK")]
    if not any(name in os.environ for name in _LAUNCHER_VARIABLES):
        # neither detection below can be True (TorchElasticEnvironment.detect() needs
        # TORCHELASTIC_RUN_ID, SLURMEnvironment.detect() SLURM_NTASKS): no need to load
        # Lightning, so the lock is light to take (a script, a test's child process)
        return all(rank.strip() in ("", "0") for rank in ranks)
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

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


#: The signals :func:`signals_deferred` holds back.
DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM back for the block; their handlers run after it.

    Python runs a signal's handler between two steps of the main thread, wherever it is: a
    ``KeyboardInterrupt`` (or the command's :class:`~torchgeo_dofa.__main__.Terminated`)
    raised between opening a lock file and recording it left the file, its folder and the
    ``flock`` behind (the stopped command's rerun found a folder it had not made). Inside
    this block the two signals are only recorded; on leaving it the previous handlers are
    put back and each signal received is raised again (:func:`signal.raise_signal`), every one
    in the order received (two Ctrl-Cs stay two), so its handler runs once the block's work is
    whole. Blocking the signals in the thread (``pthread_sigmask``) would not do: the kernel
    hands a process's signal to any thread not blocking it (PyTorch's, GDAL's), and Python
    then runs the handler in the main thread all the same. Blocks may nest (the inner one
    hands what it held to the outer one).

    In a thread other than the main thread (whose steps no handler interrupts), and for a
    signal whose handler Python did not install (it could not be put back), nothing is held.
    A handler installed from C behind Python's back (``signal.getsignal`` still names
    Python's) is replaced by the one Python names when the block ends. A signal whose
    handler, already put back, raises while the block ends can leave another signal's
    handler the recorder: it then hands that signal, when it comes, to the handler it held
    back and puts that one back, so no signal is lost.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    over: list[bool] = []  # non-empty once the block has ended
    previous: dict[int, Any] = {}

    def record(signum: int, frame: object) -> None:
        if not over:
            received.append(signum)
            return
        # the block is over, yet this is still the handler (a signal raised out of putting
        # the others back): put the one it held back in place, which takes this signal
        signal.signal(signum, previous[signum])
        signal.raise_signal(signum)

    with contextlib.ExitStack() as leaving:
        # each step of the way out runs even where one raises (a handler put back running):
        # the block ends, every handler is put back, then each signal held is raised again
        # (last in, first out: the steps run in the reverse of their order here)
        leaving.callback(_raise_each, received)
        for sig in DEFERRED_SIGNALS:
            handler = signal.getsignal(sig)
            if handler is not None:  # (None: installed outside Python, cannot be put back)
                previous[sig] = handler
                leaving.callback(signal.signal, sig, handler)
                signal.signal(sig, record)
        leaving.callback(over.append, True)
        yield


def _raise_each(signums: list[int]) -> None:
    """Raise each signal in ``signums`` again, in order, each even where one's handler raised.

    Every one is raised (two Ctrl-Cs are a Ctrl-C pressed twice; a SIGTERM after a Ctrl-C
    still reaches its handler); where handlers raise, the last one's exception propagates,
    the others as its context.
    """
    with contextlib.ExitStack() as raising:
        for signum in reversed(signums):  # (last in, first out: raised in the order given)
            raising.callback(signal.raise_signal, signum)


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

    #: How long :meth:`acquire` retries a lock held by someone else before refusing: a job
    #: holds it for its whole run, a :meth:`check_free` look for microseconds.
    settle_seconds: ClassVar[float] = 0.2
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
        self._resolved = self.folder  # (resolved when taken)
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
                nothing made is left behind; if the folder's name is not valid UTF-8
                (:func:`refuse_undecodable_name`).
            KeyboardInterrupt: (or whatever the handler of SIGINT / SIGTERM raises) for a
                signal received while taking it: held back until the lock is whole
                (:func:`signals_deferred`), then the lock is given back as
                ``release(remove=True)`` does and the handler's exception raised. A caller
                takes the lock inside the ``try`` whose ``finally`` releases it (release is
                idempotent): a signal the instant ``acquire`` returns is raised in the caller.
        """
        if not is_launcher():
            return
        # named as given (a relative -o stays relative), then whole (the working folder's)
        refuse_undecodable_name(self.shown, "output folder", OutputPathError)
        refuse_undecodable_name(self.folder, "output folder", OutputPathError)
        try:
            with signals_deferred():  # taken whole, or not at all (nothing left)
                self._acquire()
        except BaseException:  # a signal held back while taking it: give it back whole
            self.release(remove=True)
            raise

    def _acquire(self) -> None:
        """Take the lock, or leave nothing made (see :meth:`acquire`)."""
        created: list[Path] = []
        fd: int | None = None
        try:
            for attempt in itertools.count(1):
                created = [d for d in (self.folder, *self.folder.parents) if not d.exists()]
                try:
                    self.folder.mkdir(parents=True, exist_ok=True)
                    made = _MadeFolder.identify(created)
                    found = frozenset(os.listdir(self.folder)) - {LOCK_NAME}
                    fd = self._lock_file()
                    break
                except (FileNotFoundError, FileExistsError) as err:
                    # another job refused or done removed the empty folder it had made:
                    # between our mkdir and our lock (not found), or between mkdir meeting
                    # it and checking that it is a folder (exists, yet no file is there
                    # now): make it again (a few times at most). A file in the path stays.
                    name = err.filename or self.folder
                    a_file = os.path.lexists(name) and not os.path.isdir(name)
                    if attempt == 10 or (isinstance(err, FileExistsError) and a_file):
                        raise
            assert fd is not None  # the loop breaks with it
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            resolved = self.folder.resolve()
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
        self._resolved = resolved
        OutputLock._held.add(resolved)
        OutputLock._holders.add(self)

    @property
    def held(self) -> bool:
        """Whether this lock is taken (by :meth:`acquire`, not yet released)."""
        return self._fd is not None

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

    def check_free(self) -> None:
        """Refuse now if another job holds the lock; make nothing, keep nothing.

        A look before the real :meth:`acquire` (which checks again), for a command line that
        can answer a second job at once instead of after loading its libraries. The look is
        a shared ``flock`` held for an instant; :meth:`acquire` retries for
        :attr:`settle_seconds` before refusing, so a look never turns a starting job away.
        A folder or lock file that does not exist, or cannot be opened, is free as far as
        this can tell.

        Raises:
            JobLockedError: as :meth:`acquire` does.
        """
        if not is_launcher():
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # fails while a job holds it
        except BlockingIOError:
            raise self._held_by_another(fd) from None
        finally:
            os.close(fd)  # (and with it the shared lock, if taken)

    def _held_by_another(self, fd: int) -> JobLockedError:
        """The refusal, naming the holder's pid as its lock file ``fd`` records it."""
        pid = os.read(fd, 64).decode(errors="replace").strip()
        holder = f"pid {pid}" if pid else "starting now"  # the pid follows the lock
        return JobLockedError(
            f"output folder {self.shown} is in use by another torchgeo-dofa job "
            f"({holder}); wait for it or {self.fix}"
        )

    def _lock_file(self) -> int:
        """Open and ``flock`` the lock file; the locked descriptor."""
        deadline = time.monotonic() + self.settle_seconds
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _same_file(fd, self.path):
                    return fd
            except BlockingIOError:
                if time.monotonic() < deadline:  # a check_free look lasts microseconds
                    os.close(fd)
                    time.sleep(0.002)
                    continue
                refusal = self._held_by_another(fd)
                os.close(fd)
                raise refusal from None
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
        with signals_deferred():  # given back whole: a Ctrl-C halfway left the lock file
            self._release(remove)

    def _release(self, remove: bool) -> None:
        """Release the taken lock (see :meth:`release`)."""
        assert self._fd is not None  # (release checks)
        OutputLock._held.discard(self._resolved)
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
        """Release the lock (removing what taking it made where the block raised).

        Where the block raised and added nothing to the folder, as ``release(remove=True)``:
        the lock file and the folders taking it made go too.
        """
        self.release(remove=exc is not None and self.unchanged())


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
