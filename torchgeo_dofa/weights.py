"""Official DOFA checkpoints: where to find them, how to verify and load them.

Resolution order for ``weights="official"`` (rs-embed's knobs, ``RS_EMBED_DOFA_*`` accepted too):

1. an explicit ``weights=PATH``;
2. ``TORCHGEO_DOFA_BASE_WEIGHTS`` / ``TORCHGEO_DOFA_LARGE_WEIGHTS`` (a file);
3. ``TORCHGEO_DOFA_WEIGHTS_DIR`` (a directory holding the official file names);
4. a download with ``huggingface_hub`` from ``TORCHGEO_DOFA_HF_REPO_ID`` (default
   ``earthflow/DOFA``) at ``TORCHGEO_DOFA_HF_REVISION`` (default ``main``), through the hub's
   cache and honouring ``HF_HUB_OFFLINE``.

Checkpoints are read with ``torch.load(weights_only=True)``: a checkpoint never runs code.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .model import DOFAEncoder, PooledNorm, build_encoder, canonical_variant

__all__ = [
    "DEFAULT_HF_REPO_ID",
    "DEFAULT_HF_REVISION",
    "IGNORED_KEYS",
    "PRETRAINED",
    "CheckpointError",
    "PretrainedConfig",
    "WeightsResolution",
    "download_official",
    "env_setting",
    "load_checkpoint",
    "load_dofa",
    "load_state_dict_into",
    "read_state_dict",
    "resolve_weights",
    "sha256_file",
]

DEFAULT_HF_REPO_ID = "earthflow/DOFA"
DEFAULT_HF_REVISION = "main"
#: Pre-training leftovers in the official files that the encoder does not use.
IGNORED_KEYS = ("mask_token",)
IGNORED_PREFIXES = ("projector.",)


class CheckpointError(RuntimeError):
    """A checkpoint could not be found, downloaded, verified or loaded."""


@dataclass(frozen=True)
class PretrainedConfig:
    """Where an official checkpoint lives and how to verify it.

    Attributes:
        variant: ``base`` or ``large``.
        filename: file name in the Hugging Face repo and in ``TORCHGEO_DOFA_WEIGHTS_DIR``.
        sha256: expected digest of the official file.
    """

    variant: str
    filename: str
    sha256: str


PRETRAINED: dict[str, PretrainedConfig] = {
    "base": PretrainedConfig(
        "base",
        "DOFA_ViT_base_e100.pth",
        "4720985e42b918ac0307009eb06121a3435d9bbce6fd95446f84824a538165b1",
    ),
    "large": PretrainedConfig(
        "large",
        "DOFA_ViT_large_e100.pth",
        "ea9910bc026268ca36c30b76fd1169aeaca9ea51af5eaff840a20f150ea03d49",
    ),
}


def env_setting(suffix: str) -> str | None:
    """Read ``TORCHGEO_DOFA_<suffix>``, falling back to rs-embed's ``RS_EMBED_DOFA_<suffix>``.

    Args:
        suffix: variable suffix, e.g. ``WEIGHTS_DIR``.

    Returns:
        The value, or None if neither is set (or both are empty).
    """
    for prefix in ("TORCHGEO_DOFA_", "RS_EMBED_DOFA_"):
        value = os.environ.get(prefix + suffix)
        if value:
            return value
    return None


@dataclass(frozen=True)
class WeightsResolution:
    """A resolved checkpoint file.

    Attributes:
        path: local file.
        source: how it was found (``argument``, the environment variable's name, or ``hub``).
        verify_sha256: expected digest to check, or None (only official downloads are checked).
        identity: a short string naming the weights, stored in outputs' metadata.
    """

    path: Path
    source: str
    verify_sha256: str | None
    identity: str


def resolve_weights(
    variant: str, weights: str | os.PathLike[str] = "official"
) -> WeightsResolution:
    """Find the checkpoint file for a variant, downloading it if needed.

    Args:
        variant: ``base``/``b`` or ``large``/``l``.
        weights: ``"official"`` or a path to a checkpoint file.

    Returns:
        The resolution.

    Raises:
        CheckpointError: if a given path does not exist or the download fails.
    """
    variant = canonical_variant(variant)
    cfg = PRETRAINED[variant]
    if str(weights) != "official":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise CheckpointError(f"weights file {str(path)!r} does not exist")
        return WeightsResolution(path, "argument", None, f"file:{path.name}")
    env_name = f"{variant.upper()}_WEIGHTS"
    file_value = env_setting(env_name)
    if file_value:
        path = Path(file_value).expanduser()
        if not path.is_file():
            raise CheckpointError(
                f"TORCHGEO_DOFA_{env_name} (or RS_EMBED_DOFA_{env_name}) points to "
                f"{str(path)!r}, which is not a file"
            )
        return WeightsResolution(path, f"TORCHGEO_DOFA_{env_name}", None, f"file:{path.name}")
    dir_value = env_setting("WEIGHTS_DIR")
    if dir_value:
        path = Path(dir_value).expanduser() / cfg.filename
        if not path.is_file():
            raise CheckpointError(
                f"TORCHGEO_DOFA_WEIGHTS_DIR is {dir_value!r} but {cfg.filename} is not in it"
            )
        return WeightsResolution(path, "TORCHGEO_DOFA_WEIGHTS_DIR", None, f"file:{cfg.filename}")
    return download_official(variant)


def download_official(variant: str) -> WeightsResolution:
    """Download (or find in the Hugging Face cache) the official checkpoint of a variant.

    Args:
        variant: ``base`` or ``large``.

    Returns:
        The resolution; the sha256 is checked when the file comes from the default repo.

    Raises:
        CheckpointError: if the download fails; the message names the file, repo and revision
            and the variables that point to a local copy instead.
    """
    from huggingface_hub import hf_hub_download

    cfg = PRETRAINED[canonical_variant(variant)]
    repo_id = env_setting("HF_REPO_ID") or DEFAULT_HF_REPO_ID
    revision = env_setting("HF_REVISION") or DEFAULT_HF_REVISION
    try:
        local = hf_hub_download(repo_id=repo_id, filename=cfg.filename, revision=revision)
    except Exception as err:
        raise CheckpointError(
            f"could not download {cfg.filename} from Hugging Face repo {repo_id!r} at revision "
            f"{revision!r} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            f"; to use a local copy set TORCHGEO_DOFA_{cfg.variant.upper()}_WEIGHTS=/path/to/"
            f"{cfg.filename} or TORCHGEO_DOFA_WEIGHTS_DIR=/dir/holding/it, or pass weights=PATH"
        ) from err
    expected = cfg.sha256 if repo_id == DEFAULT_HF_REPO_ID else None
    return WeightsResolution(
        Path(local), f"hub:{repo_id}@{revision}", expected, f"official:{cfg.filename}"
    )


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Return the hex sha256 of a file, read in chunks.

    Args:
        path: the file.
        chunk: bytes per read.

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Read a checkpoint safely and return a flat state dict.

    Accepts a raw state dict, one wrapped in ``model`` or ``state_dict``, and ``module.``
    prefixed keys (from DataParallel / DDP).

    Args:
        path: checkpoint file.

    Returns:
        The state dict with wrappers and prefixes removed.

    Raises:
        CheckpointError: if the file is not a readable checkpoint.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (corrupt or truncated download?): "
            f"{type(err).__name__}: {err}; delete it and download again"
        ) from err
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    state = {str(k): v for k, v in obj.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_state_dict_into(encoder: DOFAEncoder, state: Mapping[str, Tensor], origin: str) -> None:
    """Load an official-layout state dict into an encoder, strictly.

    ``norm.*`` goes to the encoder's trained final norm; ``mask_token`` and ``projector.*``
    are ignored; every other key must match the backbone exactly. ``fc_norm.*`` and ``head.*``
    are allowed to be absent (they are not in the official files).

    Args:
        encoder: the encoder to fill.
        state: the state dict (official key names, no ``backbone.`` prefix).
        origin: a name for the source, used in error messages.

    Raises:
        CheckpointError: naming missing, unexpected or mis-shaped keys and the variant.
    """
    target = encoder.state_dict()
    mapped: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        if key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES):
            continue
        name = key if key.startswith("norm.") else f"backbone.{key}"
        if name in target:
            mapped[name] = value
        else:
            unexpected.append(key)
    optional = {"backbone.fc_norm.weight", "backbone.fc_norm.bias"}
    missing = sorted(k.removeprefix("backbone.") for k in set(target) - set(mapped) - optional)
    mismatched = [
        f"{k.removeprefix('backbone.')}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in mapped.items()
        if v.shape != target[k].shape
    ]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch for {len(mismatched)} key(s): {mismatched[:5]}")
    if missing:
        problems.append(f"missing key(s) {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        problems.append(
            f"unexpected key(s) {sorted(unexpected)[:10]}{' ...' if len(unexpected) > 10 else ''}"
        )
    if problems:
        raise CheckpointError(
            f"{origin} does not fit DOFA {encoder.variant} (embed dim {encoder.embed_dim}, "
            f"{encoder.config.depth} blocks): "
            + "; ".join(problems)
            + " (is it the other variant?)"
        )
    encoder.load_state_dict(mapped, strict=False)


def load_checkpoint(encoder: DOFAEncoder, resolution: WeightsResolution) -> None:
    """Verify (where an official digest applies) and load a resolved checkpoint.

    Args:
        encoder: the encoder to fill.
        resolution: from :func:`resolve_weights`.

    Raises:
        CheckpointError: on a digest mismatch or a state dict that does not fit.
    """
    if resolution.verify_sha256 is not None:
        actual = sha256_file(resolution.path)
        if actual != resolution.verify_sha256:
            raise CheckpointError(
                f"{resolution.path} has sha256 {actual}, expected {resolution.verify_sha256} "
                f"for the official {encoder.variant} weights: the file is corrupt or not the "
                "official one; delete it and download again"
            )
    state = read_state_dict(resolution.path)
    load_state_dict_into(encoder, state, str(resolution.path))
    encoder.weights_id = resolution.identity


def load_dofa(
    variant: str = "base",
    weights: str | os.PathLike[str] | None = "official",
    device: str | torch.device | None = None,
    pooled_norm: PooledNorm = "trained",
    interpolate_pos_embed: bool = False,
) -> DOFAEncoder:
    """Build a DOFA encoder and load its weights.

    Args:
        variant: ``base``/``b`` or ``large``/``l``; anything else raises at once.
        weights: ``"official"`` (resolved as the module docstring describes), a path to a
            checkpoint file, or None for a randomly initialised model (with the proper fixed
            2-D sin/cos position embedding).
        device: where to put the model (default: CPU).
        pooled_norm: default pooled convention: ``"trained"`` (rs-embed's, the checkpoint's
            final norm) or ``"plain"`` (TorchGeo's ``forward_features``).
        interpolate_pos_embed: allow inputs other than 224 x 224 (bicubic position-embedding
            interpolation; for fine-tuning).

    Returns:
        The encoder in eval mode.

    Raises:
        ValueError: for an unknown variant.
        CheckpointError: if the weights cannot be found, verified or loaded.
    """
    encoder = build_encoder(variant, pooled_norm, interpolate_pos_embed)
    if weights is not None:
        load_checkpoint(encoder, resolve_weights(variant, weights))
    encoder.eval()
    if device is not None:
        encoder.to(device)
    return encoder
