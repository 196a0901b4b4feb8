"""Shared fixtures: random full-size checkpoints with the official layout, real data paths."""

from __future__ import annotations

import gc
import os
from collections.abc import Generator
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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, None, None]:
    """Collect reference cycles once a test's fixtures are gone, when memory has grown.

    A Trainer and its LightningModule refer to each other, so a test's model (DOFA base:
    ~450 MB) is freed only by Python's cyclic collector, which runs by object count, not by
    memory: the serial suite's process reached 14.7 GB of resident memory (13.4 GB by the
    fine-tuning tests) without this; a collection per test would cost ~0.3-0.5 s each.
    """
    yield
    rss = _rss_bytes()
    if rss is not None and (not _rss_after_gc or rss - _rss_after_gc[0] > GC_AFTER_GROWTH_BYTES):
        gc.collect()
        _rss_after_gc[:] = [_rss_bytes() or rss]


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
