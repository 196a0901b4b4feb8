"""Random checkpoints with the official DOFA key layout, for tests (no network)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from torchgeo_dofa.model import DOFAEncoder, build_encoder

S2_WAVELENGTHS = [0.665, 0.56, 0.49, 0.705, 0.74, 0.783, 0.842, 1.61, 2.19]


def official_state_dict(encoder: DOFAEncoder, seed: int = 0) -> dict[str, Tensor]:
    """The state dict an official file would hold for these weights.

    TorchGeo's DOFA keys (without ``fc_norm``/``head``), plus the five pre-training keys:
    ``mask_token``, ``norm.weight``, ``norm.bias``, ``projector.weight``, ``projector.bias``.
    The final norm gets a non-trivial affine so the two pooled conventions differ.
    """
    gen = torch.Generator().manual_seed(seed)
    d = encoder.embed_dim
    state = {
        k: v.clone()
        for k, v in encoder.backbone.state_dict().items()
        if not k.startswith(("fc_norm.", "head."))
    }
    state["mask_token"] = torch.zeros(1, 1, d)
    state["norm.weight"] = 1.0 + 0.5 * torch.rand(d, generator=gen)
    state["norm.bias"] = 0.1 * torch.randn(d, generator=gen)
    state["projector.weight"] = torch.randn(16, d, generator=gen)
    state["projector.bias"] = torch.zeros(16)
    return state


def random_encoder(variant: str = "base", seed: int = 0) -> DOFAEncoder:
    """A randomly initialised encoder with a seeded initialisation."""
    torch.manual_seed(seed)
    return build_encoder(variant)


def write_checkpoint(path: Path, state: dict[str, Tensor]) -> Path:
    """Save a state dict as the official files do (a plain dict of tensors)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def not_official(path: Path) -> str:
    """The outputs' ``weights`` tag of a random checkpoint saved under the official name:
    ``file:<name> (not the official file: sha256 <first 12 hex>)``, hashed here with
    hashlib (independently of the package)."""
    import hashlib

    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return f"file:{Path(path).name} (not the official file: sha256 {digest[:12]})"
