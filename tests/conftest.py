"""Shared fixtures: random full-size checkpoints with the official layout, real data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.checkpoints import official_state_dict, random_encoder, write_checkpoint

# Exact comparisons need fp32 whatever the CPU: `precision=auto` picks bf16 on AMX CPUs.
# Tests of the automatic choice clear this (and bf16 tests ask for bf16 explicitly).
os.environ.setdefault("TORCHGEO_DOFA_PRECISION", "32")

#: Real Sentinel-2 test files beside the repository (absent in some checkouts).
SHARED_S2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sentinel2"


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
