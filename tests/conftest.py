"""Shared fixtures: random full-size checkpoints with the official layout, real data paths."""

from __future__ import annotations

import gc
import os
import signal
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tests.checkpoints import official_state_dict, random_encoder, write_checkpoint

# Exact comparisons need fp32 whatever the CPU: `precision=auto` picks bf16 on AMX CPUs.
# Tests of the automatic choice clear this (and bf16 tests ask for bf16 explicitly).
os.environ.setdefault("TORCHGEO_DOFA_PRECISION", "32")

#: Real Sentinel-2 test files beside the repository (absent in some checkouts).
SHARED_S2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sentinel2"

#: Resident memory a test may add before the next teardown runs Python's cyclic collector.
GC_AFTER_GROWTH_BYTES = 256 * 2**20
_rss_after_gc: list[int] = []


def _rss_bytes() -> int | None:
    """This process's resident memory (Linux; None elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def pytest_configure(config: pytest.Config) -> None:
    """Handle Ctrl-C as a terminal's process does, also when the suite was started with
    SIGINT ignored (a POSIX shell ignores it for a background job, ``make test &``).

    The commands the tests start inherit an ignored SIGINT, so the Ctrl-C tests of
    ``test_startup.py`` failed in such a run unless a notebook test (nbclient sets Python's
    handler back) had run before them in the same process: serially it had, in a
    pytest-xdist worker it need not.

    Then, in a pytest-xdist worker, :func:`_share_cores`.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    _share_cores()


def _share_cores() -> None:
    """Give PyTorch's intra-op pool of each pytest-xdist worker its share of the cores.

    Every worker's PyTorch (and every command a test starts) took a thread per usable core,
    so two workers on 2 cores ran 4 busy threads (OpenMP's waiting threads spin): the suite
    took 887-897 s in two workers, 595 s with one thread each (user 885 s + system 212 s of
    CPU; ``pytest -n auto --dist worksteal``, 2-core AMD EPYC, 2026-12-05). A user's
    ``OMP_NUM_THREADS`` is kept; one process (``-n 0``) keeps every core.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers <= 1 or "OMP_NUM_THREADS" in os.environ:
        return
    from torchgeo_dofa.runtime import _usable_cpus

    threads = max(1, _usable_cpus() // workers)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for the commands the tests start


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze the objects the collected modules' imports made, as the command does.

    torch, Lightning, TorchGeo and the test modules make ~600,000 long-lived objects; every
    full collection (Python's own, a finished job's ``gc.collect()``, the teardown's below)
    walked them all (~0.2 s each). The ``torchgeo-dofa`` command freezes its libraries'
    objects the same way (:func:`torchgeo_dofa.__main__.end_import_pause`). Five of
    ``test_cli.py``'s in-process job tests: 82 -> 69 s; ``test_tasks.py`` unchanged (66 s),
    its peak RSS 5.8 -> 7.2 GB (glibc keeps freed pages longer in another order of frees:
    after a full collection no model is left alive in either case).
    """
    gc.collect()
    gc.freeze()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None]:
    """Collect reference cycles once a test's fixtures are gone, when memory has grown.

    A Trainer and its LightningModule refer to each other, so a test's model (DOFA base:
    ~450 MB) is freed only by Python's cyclic collector, which runs by object count, not by
    memory: the serial suite's process reached 14.7 GB of resident memory (13.4 GB by the
    fine-tuning tests) without this; a collection per test would cost ~0.3-0.5 s each. Then
    the signal check of :func:`_signals_kept` (a finaliser the collection ran included).
    """
    with _signals_kept("teardown"):
        try:
            yield
        finally:
            rss = _rss_bytes()
            if rss is not None and (
                not _rss_after_gc or rss - _rss_after_gc[0] > GC_AFTER_GROWTH_BYTES
            ):
                gc.collect()
                _rss_after_gc[:] = [_rss_bytes() or rss]


#: Memory a pytest-xdist worker is given when ``-n auto`` sizes the pool (``make test``): a
#: serial run of the suite peaked at 9-10.5 GB of resident memory (glibc keeps freed model
#: pages), two workers together at 15.7 GB on a 23 GB, 2-core machine.
XDIST_WORKER_MEMORY_BYTES = 10 * 2**30


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto``: a worker per usable CPU core, one per 10 GiB of usable memory at most.

    Usable memory: the RAM, or a container's cgroup limit where lower
    (:func:`torchgeo_dofa.runtime._physical_memory`; ``ulimit -v`` left out: it limits each
    worker on its own).

    One worker would only add a worker process's start-up: 0 then runs the tests in this
    process. ``PYTEST_XDIST_AUTO_NUM_WORKERS`` set: pytest-xdist's own choice (None here).
    Measured on a 2-core, 23 GB machine: the suite in 1,456 s in one process, 889 s in two
    workers (``--dist worksteal``, as ``make test`` runs it).
    """
    from torchgeo_dofa.runtime import _physical_memory, _usable_cpus

    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    memory = _physical_memory(address_space=False) or XDIST_WORKER_MEMORY_BYTES
    workers = min(_usable_cpus(), memory // XDIST_WORKER_MEMORY_BYTES)
    return workers if workers > 1 else 0


#: Signals whose handling a job changes while it runs (:class:`torchgeo_dofa.jobs`).
JOB_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _signal_state() -> tuple[object, ...]:
    """The main thread's handlers of :data:`JOB_SIGNALS` and its blocked-signal mask."""
    handlers = tuple(signal.getsignal(sig) for sig in JOB_SIGNALS)
    return (*handlers, frozenset(signal.pthread_sigmask(signal.SIG_BLOCK, ())))


def _put_back_signals(before: tuple[object, ...]) -> str:
    """Put :func:`_signal_state` back as it was; say what had changed ("" when nothing)."""
    after = _signal_state()
    if after == before:
        return ""
    for sig, handler in zip(JOB_SIGNALS, before, strict=False):
        signal.signal(sig, handler)  # type: ignore[arg-type]
    signal.pthread_sigmask(signal.SIG_SETMASK, before[-1])  # type: ignore[arg-type]
    names = [*(signal.Signals(sig).name for sig in JOB_SIGNALS), "blocked signals"]
    return "; ".join(
        f"{name}: {b} -> {a}" for name, b, a in zip(names, before, after, strict=True) if a != b
    )


@contextmanager
def _signals_kept(phase: str) -> Iterator[None]:
    """Fail a test phase that leaves SIGINT / SIGTERM handled or blocked otherwise than it
    found them (and put them back).

    A handler left behind changes every later test of the process (and a command a later
    test starts inherits an ignored or blocked signal), so the outcome would depend on the
    order of the tests, which pytest-xdist's workers change. The package's jobs must leave the
    process as they found it (:meth:`torchgeo_dofa.jobs.StopOnSignal.restore`). A phase that
    failed anyway keeps its own error, with a note of what it left changed.

    Raises:
        pytest.fail.Exception: naming what changed.
    """
    before = _signal_state()
    try:
        yield
    except BaseException as error:
        if changed := _put_back_signals(before):
            error.add_note(f"the test's {phase} also left signal handling changed: {changed}")
        raise
    if changed := _put_back_signals(before):
        pytest.fail(f"the test's {phase} left signal handling changed: {changed}", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None]:
    """The signal check of :func:`_signals_kept` around a test's fixtures' set-up."""
    with _signals_kept("setup"):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None]:
    """The signal check of :func:`_signals_kept` around a test's body."""
    with _signals_kept("call"):
        return (yield)


@pytest.fixture(scope="session")
def eurosat_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small EuroSAT look-alike in TorchGeo's layout (``tests/data/eurosat/data.py``)."""
    from tests.data.eurosat.data import generate

    return generate(tmp_path_factory.mktemp("eurosat"))


@pytest.fixture(scope="session")
def base_state() -> dict[str, torch.Tensor]:
    """Official-layout state dict of a random base model (seeded)."""
    return official_state_dict(random_encoder("base", seed=0), seed=0)


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory: pytest.TempPathFactory, base_state) -> Path:
    """A random base checkpoint saved under the official file name."""
    root = tmp_path_factory.mktemp("weights")
    return write_checkpoint(root / "DOFA_ViT_base_e100.pth", base_state)


@pytest.fixture
def shared_s2() -> Path:
    """The shared real Sentinel-2 folder, or skip when it is absent."""
    if not SHARED_S2.is_dir():
        pytest.skip(f"real Sentinel-2 files not present at {SHARED_S2}")
    return SHARED_S2
