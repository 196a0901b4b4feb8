"""Official DOFA checkpoints: where to find them, how to verify and load them.

Resolution order for ``weights="official"`` (rs-embed's knobs, ``RS_EMBED_DOFA_*`` accepted too):

1. an explicit ``weights=PATH``;
2. ``TORCHGEO_DOFA_BASE_WEIGHTS`` / ``TORCHGEO_DOFA_LARGE_WEIGHTS`` (a file);
3. ``TORCHGEO_DOFA_WEIGHTS_DIR`` (a directory holding the official file names);
4. a download with ``huggingface_hub`` from ``TORCHGEO_DOFA_HF_REPO_ID`` (default
   ``earthflow/DOFA``) at ``TORCHGEO_DOFA_HF_REVISION`` (default ``main``), through the hub's
   cache. ``HF_HUB_OFFLINE=1`` uses the cache only; otherwise the hub is first probed with one
   request of ``HF_HUB_ETAG_TIMEOUT`` seconds (default :data:`HUB_PROBE_TIMEOUT_S`), and an
   unreachable hub falls back to the cache at once instead of huggingface_hub's retries.

A folder given as ``weights=DIR`` is looked into for the official file name.

Checkpoints are read with ``torch.load(weights_only=True)``: a checkpoint never runs code. A
file whose pickle would import and call code is refused as such; non-finite weights are an
error naming the tensor.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import inspect
import io
import math
import os
import pickletools
import time
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import torch
from torch import Tensor

from .model import DOFAEncoder, PooledNorm, build_encoder, canonical_variant
from .runtime import file_signature

__all__ = [
    "DEFAULT_HF_REPO_ID",
    "DEFAULT_HF_REVISION",
    "HUB_PROBE_TIMEOUT_S",
    "IGNORED_KEYS",
    "PRETRAINED",
    "RANDOM_WEIGHTS_NAMES",
    "STATE_DIGEST_KEY",
    "CheckpointError",
    "PretrainedConfig",
    "WeightsResolution",
    "checkpoint_sha256",
    "download_official",
    "env_setting",
    "hub_probe_timeout",
    "load_checkpoint",
    "load_dofa",
    "load_state_dict_into",
    "local_weights_file",
    "names_random_weights",
    "read_state_dict",
    "resolve_weights",
    "sha256_file",
    "state_dict_digest",
    "unfilled_encoder",
    "verify_checkpoint_file",
]

DEFAULT_HF_REPO_ID = "earthflow/DOFA"
DEFAULT_HF_REVISION = "main"
#: Pre-training leftovers in the official files that the encoder does not use.
IGNORED_KEYS = ("mask_token",)
IGNORED_PREFIXES = ("projector.",)
#: Seconds the hub probe waits for an answer when ``HF_HUB_ETAG_TIMEOUT`` is not set
#: (huggingface_hub's own default is 10 s per attempt, with retries).
HUB_PROBE_TIMEOUT_S = 5.0


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


#: Strings that mean random weights (any letter case): the CLI's ``--weights none`` and a
#: config's spellings, as :class:`~torchgeo_dofa.embedder.DOFAEmbedder` and the API take them.
RANDOM_WEIGHTS_NAMES = ("none", "random", "null")


def names_random_weights(weights: object) -> bool:
    """Whether ``weights`` is a string naming random weights (:data:`RANDOM_WEIGHTS_NAMES`)."""
    return isinstance(weights, str) and weights.strip().lower() in RANDOM_WEIGHTS_NAMES


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
        weights: ``"official"``, a path to a checkpoint file, or a folder holding the
            official file name (``DOFA_ViT_base_e100.pth`` / ``DOFA_ViT_large_e100.pth``).

    Returns:
        The resolution.

    Raises:
        CheckpointError: if a given path does not exist, a folder lacks the official file, or
            the download fails; for an empty (or blank) string, which the file system reads
            as the working folder (a YAML ``weights: ''`` or an unset variable expanded).
    """
    variant = canonical_variant(variant)
    cfg = PRETRAINED[variant]
    if isinstance(weights, str) and not weights.strip():
        raise CheckpointError(
            f"weights={weights!r} is empty: give 'official', a checkpoint file or a folder "
            f"holding {cfg.filename} ('.' for the working folder), or None for random weights"
        )
    if str(weights) != "official":
        path = Path(weights).expanduser()
        if path.is_dir():
            path = _official_file_in(path, cfg)
        elif not path.exists():
            raise CheckpointError(f"weights file {str(path)!r} does not exist")
        elif not path.is_file():
            raise CheckpointError(
                f"weights {str(path)!r} is not a file (a device or pipe): give a checkpoint"
            )
        return WeightsResolution(path, "argument", None, _local_identity(path, cfg))
    env_name = f"{variant.upper()}_WEIGHTS"
    file_value = env_setting(env_name)
    if file_value:
        path = Path(file_value).expanduser()
        if not path.is_file():
            raise CheckpointError(
                f"TORCHGEO_DOFA_{env_name} (or RS_EMBED_DOFA_{env_name}) points to "
                f"{str(path)!r}, which is not a file"
            )
        return WeightsResolution(
            path, f"TORCHGEO_DOFA_{env_name}", None, _local_identity(path, cfg)
        )
    dir_value = env_setting("WEIGHTS_DIR")
    if dir_value:
        path = Path(dir_value).expanduser() / cfg.filename
        if not path.is_file():
            raise CheckpointError(
                f"TORCHGEO_DOFA_WEIGHTS_DIR is {dir_value!r} but {cfg.filename} is not in it"
            )
        return WeightsResolution(
            path, "TORCHGEO_DOFA_WEIGHTS_DIR", None, _local_identity(path, cfg)
        )
    return download_official(variant)


def _local_identity(path: Path, cfg: PretrainedConfig) -> str:
    """The outputs' ``weights`` tag for a local file.

    ``file:<name>``; a file named as the official one (``DOFA_ViT_base_e100.pth``, the name
    ``TORCHGEO_DOFA_WEIGHTS_DIR`` looks for) is hashed (0.3 s for base, remembered per
    process): the official bytes are ``official:<name> (local copy, sha256 verified)``, any
    other ``file:<name> (not the official file: sha256 <first 12 hex>)``. A random or
    fine-tuned file placed under the official name was tagged as if it were the official one.
    """
    if path.name != cfg.filename:
        return f"file:{path.name}"
    digest = checkpoint_sha256(path)
    if digest == cfg.sha256:
        return f"official:{cfg.filename} (local copy, sha256 verified)"
    return f"file:{path.name} (not the official file: sha256 {digest[:12]})"


def local_weights_file(variant: str, weights: str | os.PathLike[str] | None) -> Path | None:
    """The local file :func:`resolve_weights` would read, without downloading or checking.

    Args:
        variant: ``base``/``b`` or ``large``/``l``.
        weights: ``"official"``, a checkpoint path or a folder holding the official file
            name, or None (random weights).

    Returns:
        The file (which may not exist), or None for random weights and for official weights
        from the Hugging Face cache (whose files are named by their content).
    """
    if weights is None:
        return None
    cfg = PRETRAINED[canonical_variant(variant)]
    if str(weights) != "official":
        path = Path(weights).expanduser()
        return path / cfg.filename if path.is_dir() else path
    file_value = env_setting(f"{canonical_variant(variant).upper()}_WEIGHTS")
    if file_value:
        return Path(file_value).expanduser()
    dir_value = env_setting("WEIGHTS_DIR")
    return Path(dir_value).expanduser() / cfg.filename if dir_value else None


def _official_file_in(folder: Path, cfg: PretrainedConfig) -> Path:
    """The official checkpoint file inside a folder given as ``weights``."""
    path = folder / cfg.filename
    if path.is_file():
        return path
    found = sorted(p.name for p in folder.iterdir() if p.suffix in (".pth", ".pt", ".ckpt"))
    holds = f"it holds {found[:5]}{' ...' if len(found) > 5 else ''}" if found else "it holds no "
    holds += "" if found else ".pth/.pt/.ckpt file"
    raise CheckpointError(
        f"weights {str(folder)!r} is a folder, and the DOFA {cfg.variant} checkpoint was looked "
        f"for in it under its official name {cfg.filename}, which is not there ({holds}); pass "
        f"the checkpoint file itself (weights=PATH/TO/FILE.pth) or put {cfg.filename} in it"
    )


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_probe_timeout() -> float:
    """Seconds to wait for the hub: ``HF_HUB_ETAG_TIMEOUT`` if set, else the probe default."""
    value = os.environ.get("HF_HUB_ETAG_TIMEOUT", "").strip()
    try:
        return float(value) if value else HUB_PROBE_TIMEOUT_S
    except ValueError:
        return HUB_PROBE_TIMEOUT_S


def _hub_unreachable(repo_id: str, filename: str, revision: str, timeout: float) -> str | None:
    """Probe the hub with one metadata request; return why it is unreachable, or None.

    A server that answers (even 404 / 401) is reachable: the download then reports the
    precise problem. Connection, DNS, proxy and timeout errors mean unreachable.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import HfHubHTTPError

    url = hf_hub_url(repo_id=repo_id, filename=filename, revision=revision)
    kwargs: dict[str, object] = {"timeout": timeout}
    if "retry_on_errors" in inspect.signature(get_hf_file_metadata).parameters:
        kwargs["retry_on_errors"] = False
    try:
        get_hf_file_metadata(url, **kwargs)  # type: ignore[arg-type]
    except HfHubHTTPError:
        return None
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else ""
        return f"{type(err).__name__}: {first}"
    return None


def download_official(variant: str) -> WeightsResolution:
    """Download (or find in the Hugging Face cache) the official checkpoint of a variant.

    Offline (``HF_HUB_OFFLINE=1``) only the hub's cache is looked into. Otherwise one probe
    request of :func:`hub_probe_timeout` seconds checks that the hub answers; if it does not
    (no network, DNS failure, firewall), the cache is used at once, so an offline machine
    fails in seconds rather than after huggingface_hub's retries.

    Args:
        variant: ``base`` or ``large``.

    Returns:
        The resolution; the sha256 is checked when the file comes from the default repo.

    Raises:
        CheckpointError: if the download fails; the message names the file, repo and revision,
            why (offline, unreachable, not found) and the variables that point to a local copy.
    """
    from huggingface_hub import constants, hf_hub_download

    cfg = PRETRAINED[canonical_variant(variant)]
    repo_id = env_setting("HF_REPO_ID") or DEFAULT_HF_REPO_ID
    revision = env_setting("HF_REVISION") or DEFAULT_HF_REVISION
    timeout = hub_probe_timeout()
    offline = _env_true("HF_HUB_OFFLINE") or bool(constants.HF_HUB_OFFLINE)
    unreachable = None if offline else _hub_unreachable(repo_id, cfg.filename, revision, timeout)
    try:
        local = hf_hub_download(
            repo_id=repo_id,
            filename=cfg.filename,
            revision=revision,
            local_files_only=offline or unreachable is not None,
            etag_timeout=timeout,
        )
    except Exception as err:
        cache = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
        if offline:
            why = f"HF_HUB_OFFLINE is set and the file is not in {cache}"
        elif unreachable is not None:
            why = (
                f"the Hub is unreachable from this machine ({unreachable}; waited at most "
                f"{timeout:g} s, set HF_HUB_ETAG_TIMEOUT to wait longer) and the file is not "
                f"in {cache}"
            )
        else:
            why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise CheckpointError(
            f"could not download {cfg.filename} from Hugging Face repo {repo_id!r} at revision "
            f"{revision!r} ({why})"
            f"; to use a local copy set TORCHGEO_DOFA_{cfg.variant.upper()}_WEIGHTS=/path/to/"
            f"{cfg.filename} or TORCHGEO_DOFA_WEIGHTS_DIR=/dir/holding/it, or pass weights=PATH"
        ) from err
    expected = cfg.sha256 if repo_id == DEFAULT_HF_REPO_ID else None
    return WeightsResolution(
        Path(local), f"hub:{repo_id}@{revision}", expected, f"official:{cfg.filename}"
    )


#: What was learnt of a file, by (what, real path): the file's :func:`file_signature` then
#: and the result (:func:`_known_of_file`).
_FILE_FACTS: dict[tuple[str, str], tuple[tuple[int, ...], Any]] = {}

#: A file modified this recently (ns) when it was read is not remembered: a write within the
#: file system's timestamp resolution after the read would keep its signature ("racy Git").
_RACY_NS = 2_000_000_000


def _known_of_file(what: str, path: Path, compute: Any) -> Any:
    """``compute()``, remembered for ``path`` while the file stays as it was.

    A job reads its checkpoint's hash and checks its zip's CRC-32s (0.3 + 0.5 s for base's
    445 MB, 1-2 s for large): a second job of the same process on the same file (embed calls
    in a notebook, the API) reused them. The file's device, inode, size and modification /
    change times must be those of the first read (a file replaced or rewritten is read
    again), and a file modified within 2 s of the read is not remembered. Errors are not
    remembered (``compute`` raising).
    """
    key = (what, os.path.realpath(path))
    before = file_signature(path)
    known = _FILE_FACTS.get(key)
    if known is not None and known[0] == before:
        return known[1]
    value = compute()
    if file_signature(path) == before and time.time_ns() - max(before[3:]) > _RACY_NS:
        _FILE_FACTS[key] = (before, value)
    return value


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Return the hex sha256 of a file, read in chunks.

    Remembered for the process while the file stays as it was (:func:`_known_of_file`).

    Args:
        path: the file.
        chunk: bytes per read.

    Returns:
        The hex digest.
    """

    def compute() -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
        return digest.hexdigest()

    return str(_known_of_file("sha256", Path(path), compute))


#: Globals a plain PyTorch state dict pickle imports besides ``torch``'s own (used when
#: torch's allowlist cannot be read).
_PLAIN_GLOBALS = frozenset({"collections.OrderedDict", "builtins.set", "_codecs.encode"})


def _plain_global(name: str) -> bool:
    """Whether ``torch.load(weights_only=True)`` would accept this global (no code runs)."""
    try:
        from torch import _weights_only_unpickler as wou

        allowed = set(wou._get_allowed_globals()) | set(wou._get_user_allowed_globals())
    except Exception:  # pragma: no cover - a torch without the private allowlist
        return name in _PLAIN_GLOBALS or name.startswith(("torch._utils._rebuild", "torch."))
    return name in allowed or (name.endswith("Storage") and name.startswith("torch."))


_STRING_OPS = frozenset(
    {
        "STRING",
        "BINSTRING",
        "SHORT_BINSTRING",
        "UNICODE",
        "SHORT_BINUNICODE",
        "BINUNICODE",
        "BINUNICODE8",
    }
)


def _pickle_streams(path: Path) -> list[bytes]:
    """The pickle bytes of a checkpoint file, read without unpickling anything.

    A zip checkpoint (``torch.save``'s default) holds its pickle in ``.../data.pkl``; any other
    file (the legacy format: several pickles in a row, then raw storage bytes; or a bare
    pickle) is returned whole.
    """
    if _is_zip(path):
        with zipfile.ZipFile(path) as archive:
            return [archive.read(n) for n in archive.namelist() if n.endswith("data.pkl")]
    return [path.read_bytes()]


def _pickle_globals(stream: io.BytesIO) -> list[str]:
    """Names (``module.name``) of the globals one pickle imports, found without running it.

    Raises:
        ValueError: if the stream does not start with a complete pickle (truncated, garbage).
    """
    names: list[str] = []
    strings: list[str | None] = []
    memo: dict[int, str | None] = {}
    last: str | None = None
    for op, raw, _ in pickletools.genops(stream):
        arg: Any = raw
        if op.name in _STRING_OPS:
            last = arg if isinstance(arg, str) else bytes(arg).decode("latin-1")
            strings.append(last)
            continue
        if op.name == "MEMOIZE":
            memo[len(memo)] = last
            continue
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = last
            continue
        if op.name in ("GET", "BINGET", "LONG_BINGET"):
            last = memo.get(int(arg))
            strings.append(last)
            continue
        if op.name in ("GLOBAL", "INST"):
            names.append(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            module, attr = (strings[-2], strings[-1]) if len(strings) >= 2 else (None, None)
            names.append(f"{module}.{attr}")
        last = None
    return names


def _code_globals(path: Path) -> list[str] | None:
    """Globals of a checkpoint's pickles that a plain state dict of tensors does not use.

    Returns:
        The offending names (sorted; empty when every pickle is plain), or None when the file
        does not start with a complete pickle (truncated or corrupt).
    """
    try:
        streams = _pickle_streams(path)
    except Exception:  # OSError, or a damaged zip (BadZipFile, UnicodeDecodeError, ...)
        return None
    if not streams:
        return None
    found: set[str] = set()
    for data in streams:
        stream = io.BytesIO(data)
        for count in range(8):  # a legacy file: magic, protocol, sys info, object, keys
            if stream.tell() >= len(data):
                break
            try:
                names = _pickle_globals(stream)
            except Exception:
                if count == 0:
                    return None
                break  # the raw storage bytes after a legacy file's pickles
            # protocol 0-2 pickles spell builtins as Python 2 did
            found.update(n.replace("__builtin__.", "builtins.") for n in names)
    found = {n for n in found if not _plain_global(n)}
    return sorted(found)


def read_state_dict(path: Path, check_crc: bool = True) -> dict[str, Tensor]:
    """Read a checkpoint safely and return a flat state dict.

    Accepts a raw state dict, one wrapped in ``model`` or ``state_dict``, ``module.``
    prefixed keys (from DataParallel / DDP), the Lightning checkpoint of a fine-tuning
    task of :mod:`torchgeo_dofa.tasks`, of which the encoder's weights are taken
    (``encoder.backbone.*`` and ``encoder.norm.*``; the task's head is left out), and a
    :class:`~torchgeo_dofa.model.DOFAEncoder`'s own ``state_dict()`` (``backbone.*``,
    ``norm.*``).

    Args:
        path: checkpoint file.
        check_crc: check every entry of a zip checkpoint (``torch.save``'s format) against
            its CRC-32 (``zipfile``'s ``testzip``): ``torch.load`` does not, so a byte
            changed inside the tensor data (a disk or transfer error) loaded silently as
            other weights. About 0.5 s for base's 445 MB; False where a sha256 was checked.

    Returns:
        The state dict with wrappers and prefixes removed.

    Raises:
        CheckpointError: if the file holds executable pickle content (it is refused, never
            run), or is not a readable checkpoint (corrupt, truncated, or an entry failing
            its CRC-32).
    """
    try:
        with warnings.catch_warnings():  # a plain pickle's protocol: refused below, by name
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if _is_read_failure(err):  # (the file may be whole)
            raise _read_failed(path, err) from err
        code = _code_globals(path)
        if code:
            shown = ", ".join(code[:5]) + (" ..." if len(code) > 5 else "")
            raise CheckpointError(
                f"{path} refused: the file contains executable pickle content, not plain "
                f"tensors (loading it would import and call {shown}); a DOFA checkpoint is a "
                "plain state dict of tensors, so this file is not one: get the checkpoint from "
                "its official source (Hugging Face earthflow/DOFA) or save a plain state dict "
                "(torch.save(model.state_dict(), path)) where it was trained"
            ) from err
        head = _head(path)
        problem = _plain_pickle_problem(path, head) or _foreign_file_problem(path, head)
        if problem is not None:
            raise CheckpointError(problem) from err
        if "Unsupported operand" in str(err) and _is_legacy_torch_file(head):
            # whole, but pickled as the safe reader cannot read
            raise CheckpointError(
                f"{path} is a checkpoint torch.load cannot read without running code (a "
                "legacy torch.save file with pickle protocol 4 or 5, or pickle opcodes its "
                "safe reader lacks); where you trust it, save it again in the default "
                "format: torch.save(torch.load(path, weights_only=False), new_path)"
            ) from err
        # torch's text may advise disabling weights_only: quote only its first sentence
        detail = str(err).strip().split(". ")[0].splitlines()[0] if str(err).strip() else ""
        if "weights_only" in detail or "Weights only" in detail:
            detail = "not a complete PyTorch checkpoint"
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (corrupt or truncated download?): "
            f"{type(err).__name__}: {detail or 'unexpected end of file'}; delete it and "
            "download again"
        ) from err
    damaged = _failed_crc(path) if check_crc else None
    if damaged is not None:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (corrupt download or disk error?): "
            f"its entry {damaged} fails its CRC-32 check (bytes changed after it was saved); "
            "delete it and download again"
        )
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    state = {str(k): v for k, v in obj.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith(TASK_ENCODER_PREFIX) for k in state):  # a fine-tuned task's encoder
        state = {
            k.removeprefix("encoder.").removeprefix("backbone."): v
            for k, v in state.items()
            if k.startswith("encoder.")
        }
    elif any(k.startswith("backbone.") for k in state):  # a DOFAEncoder's own state_dict()
        state = {k.removeprefix("backbone."): v for k, v in state.items()}
    return state


#: Keys of a :mod:`torchgeo_dofa.tasks` checkpoint's encoder (TorchGeo's DOFA under the
#: task's ``encoder.backbone``; the trained final norm is ``encoder.norm``).
TASK_ENCODER_PREFIX = "encoder.backbone."


#: Key of a fine-tuning task's Lightning checkpoint holding :func:`state_dict_digest` of its
#: ``state_dict`` (written by the task's ``on_save_checkpoint``, checked on load).
STATE_DIGEST_KEY = "torchgeo_dofa_state_crc32"


def state_dict_digest(state: Mapping[str, Any]) -> str:
    """CRC-32 of a state dict's names, shapes, dtypes and tensor bytes, as 8 hex digits.

    About 0.1 s for DOFA base (344 MB of float32) on a CPU. Non-tensor entries count by name.

    Args:
        state: the state dict.

    Returns:
        The digest.
    """
    crc = 0
    for name, value in state.items():
        if not isinstance(value, Tensor):
            crc = zlib.crc32(repr(name).encode(), crc)
            continue
        crc = zlib.crc32(repr((name, tuple(value.shape), str(value.dtype))).encode(), crc)
        data = value.detach().cpu().contiguous().reshape(-1)
        if data.numel():
            crc = zlib.crc32(memoryview(data.view(torch.uint8).numpy()), crc)
    return f"{crc:08x}"


#: The start of the first pickle of a legacy (non-zip) ``torch.save`` file: its magic number
#: ``0x1950a86a20f9469cfc6c`` as a pickled 10-byte long (``torch.serialization.MAGIC_NUMBER``).
_LEGACY_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"


def _head(path: str | os.PathLike[str]) -> bytes:
    """A file's first 64 bytes: what tells a checkpoint's kind (a failed read: raised)."""
    with _reading(Path(path)), open(path, "rb") as f:
        return f.read(64)


def _foreign_file_problem(path: str | os.PathLike[str], head: bytes) -> str | None:
    """The message for a file that is neither a zip nor a pickle (text, YAML, HTML), or None.

    Such a file is no checkpoint of any kind: "corrupt or truncated download" misleads when
    it is a config given as weights, say.

    Args:
        path: the file, for the message.
        head: its first bytes (:func:`_head`).
    """
    if not head or head.startswith((b"PK\x03\x04", b"\x80")):  # empty: said elsewhere
        return None
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head) / len(head)
    if printable < 0.9:  # binary: damaged, not another kind of file
        return None
    shown = head[:24].decode("ascii", "replace").splitlines()[0]
    return (
        f"{path} is not a PyTorch checkpoint (it starts with {shown!r}, not a zip archive "
        "or a pickle: a text, config or web page saved under its name?); give the file "
        "written by torch.save / Lightning"
    )


def _is_legacy_torch_file(head: bytes) -> bool:
    """Whether a file's first bytes start a legacy (non-zip) ``torch.save`` file."""
    return head.startswith(b"\x80") and _LEGACY_MAGIC in head[:24]


def _plain_pickle_problem(path: str | os.PathLike[str], head: bytes) -> str | None:
    """The message for a Python pickle that ``torch.save`` did not write, else None.

    A pickle starts with byte 0x80; a legacy ``torch.save`` file's first pickle is its magic
    number (:data:`_LEGACY_MAGIC`, within its first 16 bytes at any pickle protocol).

    Args:
        path: the file, for the message.
        head: its first bytes (:func:`_head`).
    """
    if not head.startswith(b"\x80") or _is_legacy_torch_file(head):
        return None
    return (
        f"{path} is a Python pickle (pickle.dump, joblib), not a checkpoint torch.save "
        "wrote: save the weights with torch.save(model.state_dict(), path) and give that file"
    )


def verify_checkpoint_file(path: str | os.PathLike[str], lightning: bool = False) -> None:
    """Refuse a damaged checkpoint file before a library loads it without looking.

    ``torch.load`` (and so Lightning's ``ckpt_path`` and ``load_from_checkpoint``) reads a
    zip checkpoint without its CRC-32s: a changed byte loads silently as other weights, and a
    file that is not a checkpoint at all failed deep inside it (``EOFError`` for an empty
    file, ``KeyError: 101`` for a text file, ``UnicodeDecodeError`` for a damaged zip
    directory). Refuses an empty file, a file that is neither a zip nor a pickle (a Git LFS
    pointer, an HTML error page), a zip that is not a whole one (a truncated copy) or whose
    directory or entries fail to read, and an entry failing its CRC-32 (``zipfile``'s
    ``testzip``, about 0.5 s for 445 MB); a legacy (non-zip) ``torch.save`` file has no CRC
    and passes.

    Args:
        path: the checkpoint file.
        lightning: also require a Lightning checkpoint (its ``pytorch-lightning_version``
            entry, looked for in the zip's pickle without loading the tensors): a plain
            state dict given as ``ckpt_path`` failed with ``KeyError:
            'pytorch-lightning_version'``.

    A file that passed is not checked again by the same process while it stays as it was
    (:func:`_known_of_file`).

    Raises:
        CheckpointError: naming the file, the damage and the fix.
    """
    path = Path(path)
    if not path.is_file():  # torch / Lightning say what is missing
        return _verify_checkpoint_file(path, lightning)
    _known_of_file(
        f"checked lightning={lightning}", path, lambda: _verify_checkpoint_file(path, lightning)
    )


def _verify_checkpoint_file(path: Path, lightning: bool) -> None:
    """:func:`verify_checkpoint_file`'s checks, every time."""
    head = _head(path)
    if not head:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint: the file is empty (0 bytes; a copy "
            "or save that did not finish?); copy or save it again"
        )
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint but a Git LFS pointer (a text file naming "
            "it): fetch the file itself (git lfs pull) or download it again"
        )
    problem = _foreign_file_problem(path, head)
    if problem is not None:
        raise CheckpointError(problem)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # binary, neither a zip nor a pickle
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (it is neither a zip archive nor a pickle: "
            "damaged, or another kind of file); give the file written by torch.save / "
            "Lightning"
        )
    problem = _plain_pickle_problem(path, head)
    if problem is not None:
        raise CheckpointError(problem)
    zipped = _is_zip(path)
    if head.startswith(b"PK\x03\x04") and not zipped:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated copy or download?): its "
            "zip directory is missing; copy or save it again"
        )
    try:
        damaged = _failed_crc(path, strict=True)
        if damaged is None and zipped:
            # the directory as torch.load reads it (miniz, not zipfile: a changed byte there
            # can pass one and fail the other); the entries' data are not read again
            torch._C.PyTorchFileReader(str(path)).get_all_records()
    except CheckpointError:  # a read failing (_read_failed)
        raise
    except Exception as err:  # BadZipFile, UnicodeDecodeError, NotImplementedError, miniz's
        detail = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (corrupt copy or disk error?): its "
            f"zip directory cannot be read ({type(err).__name__}: {detail}); copy or save it "
            "again"
        ) from None
    if damaged is not None:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (corrupt copy or disk error?): its "
            f"entry {damaged} fails its CRC-32 check (bytes changed after it was saved); copy "
            "or save it again"
        )
    if lightning and zipped and not _names_lightning_version(path):
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint (no 'pytorch-lightning_version' in it: a "
            "plain state dict or model weights?): give the file a Lightning Trainer saved "
            "(ModelCheckpoint, trainer.save_checkpoint), or start a task from these weights "
            "with weights= (--model.init_args.weights on the command line)"
        )


def _is_zip(path: Path) -> bool:
    """``zipfile.is_zipfile``, True also where it raises on a damaged end record.

    (It raises ``BadZipFile`` "zipfiles that span multiple disks are not supported" for a
    changed byte in the zip64 end record; the file is then a damaged zip.) A read that fails
    raises (:func:`_read_failed`): ``zipfile`` returned False, and the CRC check was skipped.
    """
    with _reading(path), open(path, "rb") as f:  # zipfile takes a failed read for "no zip"
        f.seek(max(0, os.fstat(f.fileno()).st_size - (1 << 16) - 22))
        f.read()  # the bytes of the end record it looks for (its comment: 64 KiB at most)
    try:
        return zipfile.is_zipfile(path)
    except zipfile.BadZipFile:
        return True


def _names_lightning_version(path: Path) -> bool:
    """Whether a zip checkpoint's pickle holds the ``pytorch-lightning_version`` key.

    Reads the archive's ``data.pkl`` only (the object graph with the tensors as references,
    a few hundred kB for a task), not the tensor data.
    """
    return any(b"pytorch-lightning_version" in data for data in _pickle_streams(path))


def _failed_crc(path: Path, strict: bool = False) -> str | None:
    """The first entry of a zip checkpoint whose data fails its CRC-32, or None.

    None too for a file that is not a zip (a legacy ``torch.save``), which has no CRC.
    Remembered for the process while the file stays as it was (:func:`_known_of_file`): a
    second job on the same checkpoint skips the 0.15-0.5 s read of base's 445 MB.

    Args:
        path: the file.
        strict: raise where the zip's directory or an entry's header cannot be read (a
            changed byte there: ``BadZipFile``, ``UnicodeDecodeError`` for a damaged name);
            else give the reason in brackets in place of an entry name.
    """
    if not _is_zip(path):
        return None

    def compute() -> str | None:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()

    try:  # an error (a damaged directory, or a read failing once) is not remembered
        result = _known_of_file("zip CRC-32", path, compute)
    except Exception as err:  # zipfile raises more than BadZipFile on a damaged directory
        if _is_read_failure(err):  # the read failed, not the bytes
            raise _read_failed(path, err) from err
        if strict:  # (also EINVAL: a changed byte in the directory seeking before the start)
            raise
        return f"({err})"
    return None if result is None else str(result)


def _is_read_failure(err: BaseException) -> TypeGuard[OSError]:
    """Whether ``err`` is a read of the file failing, not a sign of what the file holds.

    An ``OSError`` with an ``errno`` (EIO of a failing disk, a network share's timeout or
    stale handle, a permission taken away), but EINVAL: a changed byte in a zip's directory
    makes ``zipfile`` seek before the file's start.
    """
    return isinstance(err, OSError) and err.errno is not None and err.errno != errno.EINVAL


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Raise a read of ``path`` that fails as :func:`_read_failed`'s error (others as they are)."""
    try:
        yield
    except OSError as err:
        if _is_read_failure(err):
            raise _read_failed(path, err) from err
        raise


def checkpoint_sha256(path: Path) -> str:
    """:func:`sha256_file` of a checkpoint; a read that fails is a :class:`CheckpointError`.

    Raises:
        CheckpointError: naming the file and the failed read (``Input/output error``: a
            failing disk or network share), not a damage of the file.
    """
    with _reading(path):
        return sha256_file(path)


def _read_failed(path: Path, err: OSError) -> CheckpointError:
    """The error of a checkpoint whose read failed (not its content: it may be whole)."""
    return CheckpointError(
        f"{path} could not be read ({err.strerror or err}: the read itself failed, as on a "
        "failing disk or network share, which says nothing of the file's content); check the "
        "disk, share or permissions and run again"
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _all_finite(tensor: Tensor) -> bool:
    """Whether every value of a floating-point tensor is finite.

    One sum first, in the tensor's own dtype (float32 for 16-bit ones): NaN and infinity
    propagate into it, so a finite sum proves every value finite; a sum that is not finite
    (a non-finite value, or finite values overflowing it) gets the exact element check.
    For base's 86 M float32 weights on one thread of the 2-core AMD EPYC: 0.02 s, where a
    float64 sum took 0.53 s and ``torch.isfinite(t).all()`` 0.61 s.
    """
    dtype = torch.float32 if tensor.element_size() < 4 else None
    if math.isfinite(float(tensor.sum(dtype=dtype))):
        return True
    return bool(torch.isfinite(tensor).all())


#: Encoder keys an official-layout checkpoint may lack (not in the official files: TorchGeo's
#: ``fc_norm``, unused by the pooled outputs here); they keep their default initialisation.
OPTIONAL_KEYS: tuple[str, ...] = ("backbone.fc_norm.weight", "backbone.fc_norm.bias")


def unfilled_encoder(
    variant: str = "base", pooled_norm: PooledNorm = "trained", interpolate_pos_embed: bool = False
) -> DOFAEncoder:
    """Build an encoder for a state dict to fill, without the random initialisation.

    The random initialisation a checkpoint overwrites costs about 1 s for base and 2-4 s for
    large on 2 CPU cores (``torch.nn.init`` draws every weight; a task's
    ``load_from_checkpoint`` took 1.5 / 3.9 s with it, 0.9 / 2.3 s without, on the 2-core AMD
    machine of the README's performance section). Here the tensors are
    allocated on the CPU but not initialised (``Module.to_empty``), except the keys a
    checkpoint may lack (:data:`OPTIONAL_KEYS`, TorchGeo's unused ``fc_norm``), which get their
    usual initialisation. Every other tensor holds arbitrary memory until a strict
    ``load_state_dict`` (:func:`load_state_dict_into`, a Lightning checkpoint's restore)
    fills it: never use the encoder before.

    Args:
        variant: ``base``/``b`` or ``large``/``l``.
        pooled_norm: default pooled convention.
        interpolate_pos_embed: allow input sizes other than 224 (see :class:`DOFAEncoder`).

    Returns:
        The encoder, in training mode as built, with ``weights_id`` ``"unfilled"``.

    Raises:
        ValueError: for an unknown variant.
    """
    with torch.device("meta"):
        encoder = build_encoder(variant, pooled_norm, interpolate_pos_embed)
    encoder.to_empty(device="cpu")
    for name in {k.rpartition(".")[0] for k in OPTIONAL_KEYS}:
        encoder.get_submodule(name).reset_parameters()  # type: ignore[operator]
    encoder.weights_id = "unfilled"
    return encoder


def load_state_dict_into(
    encoder: DOFAEncoder, state: Mapping[str, Tensor], origin: str, assign: bool = False
) -> None:
    """Load an official-layout state dict into an encoder, strictly.

    ``norm.*`` goes to the encoder's trained final norm; ``mask_token`` and ``projector.*``
    are ignored; every other key must match the backbone exactly. ``fc_norm.*`` and ``head.*``
    are allowed to be absent (they are not in the official files).

    Args:
        encoder: the encoder to fill.
        state: the state dict (official key names, no ``backbone.`` prefix).
        origin: a name for the source, used in error messages.
        assign: make ``state``'s tensors the encoder's own (``load_state_dict(assign=True)``)
            instead of copying them into its tensors: the encoder then shares memory with
            ``state`` and has new parameter objects where ``state``'s tensors are (the CPU
            for a file), so pass True only for a state dict nothing else holds (one just
            read from a file) and an encoder nothing refers to yet (no optimizer, not moved
            to a device: :func:`load_dofa`'s). Saves a copy of the weights (0.3 s and 445 MB
            of peak memory for base). A tensor that is a view of a larger storage, not
            contiguous, or shares its memory with another entry is copied all the same, so
            no two weights share memory.

    Raises:
        CheckpointError: naming missing, unexpected or mis-shaped keys and the variant, the
            entries that are not dense floating-point tensors (:func:`check_tensor_kinds`),
            or the tensors holding NaN / infinite values.
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
    missing = sorted(
        k.removeprefix("backbone.") for k in set(target) - set(mapped) - set(OPTIONAL_KEYS)
    )
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
        hint = (
            "is it the other variant?"
            if mismatched
            else "a DOFA state dict has the official file's keys (patch_embed.*, blocks.N.*, "
            "norm.*), a DOFAEncoder's state_dict() the same under backbone.* beside norm.*"
        )
        raise CheckpointError(
            f"{origin} does not fit DOFA {encoder.variant} (embed dim {encoder.embed_dim}, "
            f"{encoder.config.depth} blocks): " + "; ".join(problems) + f" ({hint})"
        )
    official = {k.removeprefix("backbone."): v for k, v in target.items()}  # the file's names
    check_tensor_kinds(
        {k.removeprefix("backbone."): v for k, v in mapped.items()}, official, origin
    )
    as_loaded = held_as(mapped, target)
    check_finite_state(
        {k.removeprefix("backbone."): v for k, v in as_loaded.items()},
        origin,
        f" (NaN or infinity, or beyond the range of the model's "
        f"{_dtype_name(next(iter(target.values())).dtype)})",
    )
    if assign:
        as_loaded = _owning(as_loaded)
    encoder.load_state_dict(as_loaded, strict=False, assign=assign)  # in the model's dtypes


def _owning(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with each tensor made the sole, contiguous user of its whole storage.

    A tensor already so is kept as it is; one that is a view (a slice of a larger tensor,
    saved with it), not contiguous, or in a storage another entry uses too is cloned.
    """
    seen: set[int] = set()
    owned: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, Tensor):
            storage = value.untyped_storage()
            whole = value.is_contiguous() and storage.nbytes() == value.nbytes
            if not whole or storage.data_ptr() in seen:
                value = value.clone(memory_format=torch.contiguous_format)
            seen.add(value.untyped_storage().data_ptr())
        owned[key] = value
    return owned


def held_as(state: Mapping[str, Any], target: Mapping[str, Tensor]) -> dict[str, Any]:
    """``state``'s entries for ``target``'s keys, as ``target`` will hold them.

    Floating-point tensors are cast to their ``target`` tensor's dtype, so that a check of
    them judges what loads: a float64 value beyond float32's range becomes infinity. Other
    entries are passed as they are; keys ``target`` has not are left out (a strict load
    refuses them, a lax one ignores them).

    Args:
        state: the state dict to load.
        target: the module's own state dict (``module.state_dict()``).

    Returns:
        The entries as held; an entry needing no cast is the same object as in ``state``.
    """
    return {
        k: v.to(target[k].dtype)
        if isinstance(v, Tensor) and v.is_floating_point() and v.dtype != target[k].dtype
        else v
        for k, v in state.items()
        if k in target
    }


def check_tensor_kinds(state: Mapping[str, Any], target: Mapping[str, Tensor], origin: str) -> None:
    """Refuse entries a load would silently change: not dense tensors of the target's kind.

    torch's ``load_state_dict`` copies an integer tensor into a float weight (truncated: most
    weights become 0), a complex one as its real part (with a warning) and fails on a sparse
    one with a traceback; a file holding such tensors is not a checkpoint as saved.

    Args:
        state: the state dict to load (keys ``target`` has not are left to the load).
        target: the module's own state dict.
        origin: a name for the source, used in the message.

    Raises:
        CheckpointError: naming up to five of the entries and what they hold.
    """
    wrong = []
    for key, value in state.items():
        if key not in target:
            continue
        want = target[key]
        if not isinstance(value, Tensor):
            wrong.append(f"{key} ({type(value).__name__}, not a tensor)")
        elif value.layout != torch.strided:
            wrong.append(f"{key} ({str(value.layout).removeprefix('torch.')} tensor)")
        elif want.is_floating_point() and not value.is_floating_point():
            wrong.append(f"{key} ({_dtype_name(value.dtype)})")
    if wrong:
        raise CheckpointError(
            f"{origin} holds {len(wrong)} entr{'y' if len(wrong) == 1 else 'ies'} that are not "
            f"dense floating-point tensors where the model's weights are: "
            f"{', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}; loading would "
            "truncate them (integers), keep their real part (complex) or fail (sparse): the "
            "file was changed after it was saved, use the original checkpoint"
        )


def check_finite_state(state: Mapping[str, Any], origin: str, what: str = "") -> None:
    """Refuse a state dict whose floating-point tensors hold NaN or infinity.

    Such weights make every output of the model NaN (a fine-tuning whose loss diverged saves
    them at its next checkpoint): refused when loaded, before anything is computed or written.

    Args:
        state: the state dict (non-tensor and integer entries are not checked).
        origin: a name for the source, used in the message.
        what: what counts as non-finite, for the message (default: NaN or infinity).

    Raises:
        CheckpointError: naming up to five of the tensors and how many values each holds.
    """
    bad = non_finite_tensors(state)
    if bad:
        raise CheckpointError(
            f"{origin} holds non-finite weights{what or ' (NaN or infinity)'} in {len(bad)} "
            f"tensor(s): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; every output of "
            "the model would be NaN: the file is corrupt or comes from a diverged training "
            "run, use another checkpoint (an earlier epoch's, or train with a lower learning "
            "rate)"
        )


def non_finite_tensors(state: Mapping[str, Any]) -> list[str]:
    """The floating-point tensors of ``state`` holding NaN or infinity.

    Args:
        state: name -> value (non-tensor and integer entries are skipped).

    Returns:
        ``"name (N of M values)"`` for each such tensor, in ``state``'s order.
    """
    return [
        f"{k} ({int((~torch.isfinite(v)).sum())} of {v.numel()} values)"
        for k, v in state.items()
        if isinstance(v, Tensor) and v.is_floating_point() and not _all_finite(v)
    ]


def check_finite_optimizer_states(checkpoint: Mapping[str, Any], origin: str) -> None:
    """Refuse a Lightning checkpoint whose optimizer state holds NaN or infinity.

    A fine-tuning resumed from it (``fit(ckpt_path=...)``) would restore that state: NaN in
    Adam's ``exp_avg`` / ``exp_avg_sq`` or its ``step``, or a NaN learning rate, makes the
    updates NaN and the weights NaN at the first step; an infinite ``exp_avg_sq`` makes
    those values' updates 0 (they stop learning). The weights themselves may be finite, so
    :func:`check_finite_state` does not see it. Prediction and evaluation do not use the
    optimizer state.

    Args:
        checkpoint: the loaded checkpoint (its ``optimizer_states``: a list of
            ``torch.optim.Optimizer.state_dict()``; absent in a ``weights_only`` save).
        origin: a name for the source, used in the message.

    Raises:
        CheckpointError: naming up to five entries: ``optimizer I parameter #P KEY``
            (``P``: the parameter's index in that optimizer's parameter list, as the state
            dict keys it) or ``optimizer I param group G KEY`` (a float setting such as
            ``lr``).
    """
    named: dict[str, Any] = {}
    states = checkpoint.get("optimizer_states")
    for i, optimizer in enumerate(states if isinstance(states, list) else []):
        if not isinstance(optimizer, Mapping):
            continue
        for param, entry in (optimizer.get("state") or {}).items():
            if isinstance(entry, Mapping):
                named |= {f"optimizer {i} parameter #{param} {k}": v for k, v in entry.items()}
        for g, group in enumerate(optimizer.get("param_groups") or []):
            if isinstance(group, Mapping):
                for k, v in group.items():  # lr, eps, betas, weight_decay...
                    for j, x in enumerate(v if isinstance(v, tuple | list) else [v]):
                        if isinstance(x, float) and not math.isfinite(x):
                            at = f"[{j}]" if isinstance(v, tuple | list) else ""
                            named[f"optimizer {i} param group {g} {k}{at}"] = torch.tensor(x)
    bad = non_finite_tensors(named)
    if bad:
        raise CheckpointError(
            f"{origin} holds non-finite optimizer state (NaN or infinity) in {len(bad)} "
            f"entr{'y' if len(bad) == 1 else 'ies'}: {', '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}; resuming from it would make the updates of "
            "those parameters NaN (the weights NaN at the first step) or zero (no longer "
            "learning): resume from an earlier checkpoint, or start a new fine-tuning from "
            "its weights (without ckpt_path)"
        )


def load_checkpoint(
    encoder: DOFAEncoder, resolution: WeightsResolution, assign: bool = False
) -> None:
    """Verify (where an official digest applies) and load a resolved checkpoint.

    Args:
        encoder: the encoder to fill.
        resolution: from :func:`resolve_weights`.
        assign: take the file's tensors as the encoder's parameters (new parameter objects,
            on the CPU: see :func:`load_state_dict_into`) instead of copying into its own;
            only for an encoder nothing else refers to yet (:func:`load_dofa`'s): an
            optimizer made before would hold the replaced parameters, and an encoder
            moved to a GPU would be back on the CPU.

    Raises:
        CheckpointError: on a digest mismatch or a state dict that does not fit.
    """
    if resolution.verify_sha256 is not None:
        actual = checkpoint_sha256(resolution.path)
        if actual != resolution.verify_sha256:
            raise CheckpointError(
                f"{resolution.path} has sha256 {actual}, expected {resolution.verify_sha256} "
                f"for the official {encoder.variant} weights: the file is corrupt or not the "
                "official one; delete it and download again"
            )
    state = read_state_dict(resolution.path, check_crc=resolution.verify_sha256 is None)
    load_state_dict_into(encoder, state, str(resolution.path), assign=assign)
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
    if weights is None:
        encoder = build_encoder(variant, pooled_norm, interpolate_pos_embed)
    else:
        resolution = resolve_weights(variant, weights)
        encoder = unfilled_encoder(variant, pooled_norm, interpolate_pos_embed)
        load_checkpoint(encoder, resolution, assign=True)  # nothing refers to it yet
    encoder.eval()
    if device is not None:
        encoder.to(device)
    return encoder
