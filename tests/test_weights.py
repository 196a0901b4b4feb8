"""Checkpoint resolution, formats, verification and error messages (no network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.checkpoints import S2_WAVELENGTHS, write_checkpoint
from torchgeo_dofa import CheckpointError, load_dofa
from torchgeo_dofa.weights import (
    DEFAULT_HF_REPO_ID,
    DEFAULT_HF_REVISION,
    PRETRAINED,
    read_state_dict,
    resolve_weights,
    sha256_file,
)

ENV_VARS = [
    f"{p}{s}"
    for p in ("TORCHGEO_DOFA_", "RS_EMBED_DOFA_")
    for s in ("BASE_WEIGHTS", "LARGE_WEIGHTS", "WEIGHTS_DIR", "HF_REPO_ID", "HF_REVISION")
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(1, 9, 224, 224, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def reference(base_checkpoint, x) -> torch.Tensor:
    with torch.inference_mode():
        return load_dofa("base", weights=base_checkpoint)(x, S2_WAVELENGTHS).pooled


def _pooled(path: Path, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return load_dofa("b", weights=path)(x, S2_WAVELENGTHS).pooled


def test_official_layout_loads_and_records_identity(base_checkpoint) -> None:
    state = read_state_dict(base_checkpoint)
    assert len(state) == 173  # 168 encoder keys + 5 pre-training keys
    enc = load_dofa("base", weights=base_checkpoint)
    assert enc.weights_id == "file:DOFA_ViT_base_e100.pth"
    assert not enc.training
    torch.testing.assert_close(enc.norm.weight, state["norm.weight"])


@pytest.mark.parametrize("layout", ["model", "state_dict", "module", "model+module"])
def test_wrapped_and_prefixed_checkpoints(tmp_path, base_state, x, reference, layout) -> None:
    state = dict(base_state)
    if "module" in layout:
        state = {f"module.{k}": v for k, v in state.items()}
    obj: object = state
    if layout.startswith("model"):
        obj = {"model": state, "epoch": 100}
    elif layout == "state_dict":
        obj = {"state_dict": state}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    torch.testing.assert_close(_pooled(path, x), reference)


def test_missing_key_is_named(tmp_path, base_state) -> None:
    state = {k: v for k, v in base_state.items() if k != "blocks.3.attn.qkv.weight"}
    path = write_checkpoint(tmp_path / "c.pth", state)
    with pytest.raises(CheckpointError, match=r"DOFA base.*missing key\(s\) \['blocks.3.attn"):
        load_dofa("base", weights=path)


def test_unexpected_key_is_named(tmp_path, base_state) -> None:
    state = {**base_state, "decoder_pred.weight": torch.zeros(2)}
    path = write_checkpoint(tmp_path / "c.pth", state)
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\) \['decoder_pred.weight'\]"):
        load_dofa("base", weights=path)


def test_large_shaped_file_for_base_is_a_shape_error(tmp_path, base_state) -> None:
    state = dict(base_state)
    state["cls_token"] = torch.zeros(1, 1, 1024)
    state["pos_embed"] = torch.zeros(1, 197, 1024)
    path = write_checkpoint(tmp_path / "c.pth", state)
    with pytest.raises(CheckpointError, match=r"DOFA base.*shape mismatch.*cls_token.*1024"):
        load_dofa("base", weights=path)


def test_base_file_for_large_is_an_error(base_checkpoint) -> None:
    with pytest.raises(CheckpointError, match=r"does not fit DOFA large.*other variant"):
        load_dofa("large", weights=base_checkpoint)


def test_corrupt_file(tmp_path, base_checkpoint) -> None:
    path = tmp_path / "DOFA_ViT_base_e100.pth"
    path.write_bytes(base_checkpoint.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_dofa("base", weights=path)


def test_checkpoint_never_runs_code(tmp_path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "obj": Path("/")}, path)  # not allowlisted
    with pytest.raises(CheckpointError, match="not a readable"):
        load_dofa("base", weights=path)


def test_missing_explicit_file() -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_dofa("base", weights="/nonexistent/DOFA.pth")


def test_resolution_order(monkeypatch, tmp_path, base_checkpoint) -> None:
    wdir = tmp_path / "dir"
    wdir.mkdir()
    (wdir / PRETRAINED["base"].filename).symlink_to(base_checkpoint)
    monkeypatch.setenv("TORCHGEO_DOFA_WEIGHTS_DIR", str(wdir))
    assert resolve_weights("base").source == "TORCHGEO_DOFA_WEIGHTS_DIR"
    monkeypatch.setenv("TORCHGEO_DOFA_BASE_WEIGHTS", str(base_checkpoint))
    assert resolve_weights("base").source == "TORCHGEO_DOFA_BASE_WEIGHTS"
    assert resolve_weights("base", base_checkpoint).source == "argument"
    with pytest.raises(CheckpointError, match="DOFA_ViT_large_e100.pth is not in it"):
        resolve_weights("large")  # dir lacks the large file


def test_rs_embed_variable_names(monkeypatch, base_checkpoint, x, reference) -> None:
    monkeypatch.setenv("RS_EMBED_DOFA_BASE_WEIGHTS", str(base_checkpoint))
    with torch.inference_mode():
        out = load_dofa("base")(x, S2_WAVELENGTHS).pooled
    torch.testing.assert_close(out, reference)


_OFFLINE_SCRIPT = """
import json, os
from torchgeo_dofa.weights import CheckpointError, load_dofa
results = {}
for name, env in [
    ("missing", {"TORCHGEO_DOFA_HF_REVISION": "v9"}),
    ("mismatch", {}),
    ("other_repo", {"TORCHGEO_DOFA_HF_REPO_ID": "me/dofa-ft"}),
]:
    for key in ("TORCHGEO_DOFA_HF_REVISION", "TORCHGEO_DOFA_HF_REPO_ID"):
        os.environ.pop(key, None)
    os.environ.update(env)
    try:
        results[name] = "ok " + load_dofa("base").weights_id
    except CheckpointError as err:
        results[name] = "error " + str(err)
print(json.dumps(results))
"""


def _fake_hub_cache(cache: Path, repo_id: str, checkpoint: Path) -> None:
    """Lay out a file in the hub cache as huggingface_hub would after a download."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / PRETRAINED["base"].filename).symlink_to(checkpoint)


@pytest.fixture(scope="module")
def offline_hub(tmp_path_factory, base_checkpoint) -> dict[str, str]:
    """One offline process (real huggingface_hub, HF_HUB_OFFLINE=1) trying three situations."""
    cache = tmp_path_factory.mktemp("hub")
    _fake_hub_cache(cache, "earthflow/DOFA", base_checkpoint)
    _fake_hub_cache(cache, "me/dofa-ft", base_checkpoint)
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env |= {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache)}
    proc = subprocess.run(
        [sys.executable, "-c", _OFFLINE_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results: dict[str, str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def test_download_failure_names_file_repo_revision_and_variable(offline_hub) -> None:
    message = offline_hub["missing"]
    assert message.startswith("error could not download DOFA_ViT_base_e100.pth")
    assert "'earthflow/DOFA'" in message and "'v9'" in message
    assert "TORCHGEO_DOFA_BASE_WEIGHTS" in message and "TORCHGEO_DOFA_WEIGHTS_DIR" in message


def test_official_sha256_mismatch_is_an_error(offline_hub, base_checkpoint) -> None:
    message = offline_hub["mismatch"]
    assert message.startswith("error ")
    assert f"has sha256 {sha256_file(base_checkpoint)}" in message
    assert PRETRAINED["base"].sha256 in message


def test_other_repo_is_not_hash_checked(offline_hub) -> None:
    assert offline_hub["other_repo"] == "ok official:DOFA_ViT_base_e100.pth"


def test_default_repo_and_revision() -> None:
    assert (DEFAULT_HF_REPO_ID, DEFAULT_HF_REVISION) == ("earthflow/DOFA", "main")
