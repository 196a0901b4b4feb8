"""Checkpoint resolution, formats, verification and error messages (no network)."""

from __future__ import annotations

import json
import os
import pickle
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.checkpoints import S2_WAVELENGTHS, not_official, write_checkpoint
from torchgeo_dofa import CheckpointError, load_dofa
from torchgeo_dofa.weights import (
    DEFAULT_HF_REPO_ID,
    DEFAULT_HF_REVISION,
    PRETRAINED,
    non_finite_tensors,
    read_state_dict,
    resolve_weights,
    sha256_file,
    verify_checkpoint_file,
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
    assert enc.weights_id == not_official(base_checkpoint)
    assert not enc.training
    torch.testing.assert_close(enc.norm.weight, state["norm.weight"])


def test_loaded_encoder_equals_one_initialised_then_filled(base_checkpoint, base_state) -> None:
    """load_dofa skips the random init a checkpoint overwrites: same tensors as init + load."""
    from torchgeo_dofa import build_encoder
    from torchgeo_dofa.weights import load_state_dict_into

    loaded = load_dofa("base", weights=base_checkpoint)
    filled = build_encoder("base")
    load_state_dict_into(filled, base_state, "state")
    got, want = loaded.state_dict(), filled.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].device.type == "cpu" and torch.equal(got[key], value), key
    # fc_norm is not in official files: it has LayerNorm's default init, not leftover memory
    assert "fc_norm.weight" not in base_state
    assert torch.equal(got["backbone.fc_norm.weight"], torch.ones(768))
    assert torch.equal(got["backbone.fc_norm.bias"], torch.zeros(768))
    x = torch.randn(1, 9, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():  # no tensor outside the state dict was left on the meta device
        torch.testing.assert_close(
            loaded(x, S2_WAVELENGTHS).grid, filled.eval()(x, S2_WAVELENGTHS).grid, rtol=0, atol=0
        )


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


def test_an_encoders_own_state_dict_loads_and_a_foreign_one_is_not_called_a_variant(
    tmp_path, base_checkpoint, x, reference
) -> None:
    """``torch.save(encoder.state_dict(), f)`` of a loaded encoder is accepted as weights
    (it was refused as "missing blocks.*, unexpected backbone.* (is it the other
    variant?)"); a state dict of other keys is not blamed on the variant."""
    encoder = load_dofa("base", weights=base_checkpoint)
    saved = tmp_path / "encoder.pth"
    torch.save(encoder.state_dict(), saved)
    with torch.inference_mode():
        pooled = load_dofa("base", weights=saved)(x, S2_WAVELENGTHS).pooled
    torch.testing.assert_close(pooled, reference, rtol=0, atol=0)
    backbone_only = tmp_path / "backbone.pth"
    torch.save(encoder.backbone.state_dict(), backbone_only)  # no trained final norm
    with pytest.raises(
        CheckpointError, match=r"missing key\(s\) \['norm.bias', 'norm.weight'\]"
    ) as e:
        load_dofa("base", weights=backbone_only)
    assert "other variant" not in str(e.value) and "official file's keys" in str(e.value)


def _small_state() -> dict[str, torch.Tensor]:
    return {"x": torch.arange(6.0).reshape(2, 3)}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("keep", [100_000, 0.5, 0], ids=["100kB", "half", "empty"])
def test_corrupt_or_truncated_file(tmp_path, base_checkpoint, legacy, keep) -> None:
    """A cut-off download (zip or legacy format) is corrupt, never 'executable content'."""
    whole = tmp_path / "whole.pth"
    if legacy:
        torch.save(_small_state(), whole, _use_new_zipfile_serialization=False)
    else:
        whole.write_bytes(base_checkpoint.read_bytes())
    data = whole.read_bytes()
    size = int(len(data) * keep) if isinstance(keep, float) else min(keep, len(data) // 2)
    path = tmp_path / "DOFA_ViT_base_e100.pth"
    path.write_bytes(data[:size])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as info:
        load_dofa("base", weights=path)
    message = str(info.value)
    assert "corrupt or truncated" in message and "download again" in message
    assert "executable" not in message and "weights_only" not in message


def test_a_byte_changed_inside_the_tensor_data_is_corrupt(tmp_path) -> None:
    """torch.load does not check the zip's CRC-32s: a byte flipped in the data (a disk or
    transfer error) loaded as other weights without a word."""
    path = tmp_path / "DOFA_ViT_base_e100.pth"
    state = {"x": torch.arange(4096.0)}
    torch.save(state, path)
    data = bytearray(path.read_bytes())
    at = data.find(state["x"][1000:1004].numpy().tobytes())  # inside the tensor's bytes
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path, weights_only=True)["x"], state["x"])  # silently
    with pytest.raises(CheckpointError, match=r"not a readable PyTorch checkpoint") as info:
        read_state_dict(path)
    assert "data/0 fails its CRC-32 check" in str(info.value)
    assert "download again" in str(info.value)


def test_a_checked_file_is_checked_again_once_changed(tmp_path) -> None:
    """A file's hash and CRC check are remembered for the process (a second job on the same
    checkpoint read 445 MB twice more), but only while the file is as it was: a byte flipped
    in place with its modification time put back (its change time moves) is found, as is
    a file just written (within the file system's timestamp resolution: not remembered)."""
    path = tmp_path / "w.pth"
    state = {"x": torch.arange(4096.0)}
    torch.save(state, path)
    old = path.stat().st_mtime_ns - 10**10
    os.utime(path, ns=(old, old))
    time.sleep(2.1)  # its change time: older than the 2 s within which nothing is remembered
    first = sha256_file(path)
    verify_checkpoint_file(path)
    assert torch.equal(read_state_dict(path)["x"], state["x"])  # a load's own CRC check
    data = bytearray(path.read_bytes())
    data[data.find(state["x"][1000:1004].numpy().tobytes())] ^= 0xFF
    with open(path, "r+b") as f:  # in place: same inode, same size
        f.write(bytes(data))
    os.utime(path, ns=(old, old))
    assert sha256_file(path) != first
    with pytest.raises(CheckpointError, match=r"data/0 fails its CRC-32 check"):
        verify_checkpoint_file(path)
    with pytest.raises(CheckpointError, match=r"data/0 fails its CRC-32 check"):
        read_state_dict(path)
    fresh = tmp_path / "fresh.pth"  # modified just now: checked each time
    torch.save(state, fresh)
    verify_checkpoint_file(fresh)
    data = bytearray(fresh.read_bytes())
    data[data.find(state["x"][1000:1004].numpy().tobytes())] ^= 0xFF
    with open(fresh, "r+b") as f:
        f.write(bytes(data))
    with pytest.raises(CheckpointError, match=r"data/0 fails its CRC-32 check"):
        verify_checkpoint_file(fresh)


def test_garbage_file_is_corrupt(tmp_path) -> None:
    path = tmp_path / "noise.pth"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="corrupt or truncated") as info:
        read_state_dict(path)
    assert "weights_only" not in str(info.value)


class _Payload:
    """Pickles as a call to print: what a hostile checkpoint does with os.system."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this pickle ran code",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickle_with_code_is_refused_as_such(tmp_path, capsys, legacy) -> None:
    path = tmp_path / "DOFA_ViT_base_e100.pth"
    state = {**_small_state(), "payload": _Payload()}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError) as info:
        load_dofa("base", weights=path)
    message = str(info.value)
    assert "refused: the file contains executable pickle content, not plain tensors" in message
    assert "builtins.print" in message
    assert "weights_only" not in message and "will likely succeed" not in message
    assert "corrupt" not in message
    assert "this pickle ran code" not in capsys.readouterr().out  # refused, never run


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_bare_pickle_with_code_is_refused(tmp_path) -> None:
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps({"w": [1.0], "payload": _Payload()}, protocol=4))
    with pytest.raises(CheckpointError, match=r"refused: .*executable pickle.*builtins\.print"):
        read_state_dict(path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_plain_python_pickle_is_named_as_one(tmp_path, protocol) -> None:
    """``pickle.dump`` of weights was "not a readable PyTorch checkpoint (corrupt or
    truncated download?) ... delete it and download again", after torch's two warning lines
    about the pickle protocol; legacy ``torch.save`` files (their magic number first) load,
    and one pickled at protocol 4 (which torch's safe reader cannot read) says so."""
    import warnings

    path = tmp_path / "weights.pkl"
    path.write_bytes(pickle.dumps({"x": [0.0, 1.0, 2.0]}, protocol=protocol))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's protocol warning is not shown
        with pytest.raises(CheckpointError) as info:
            read_state_dict(path)
    assert str(info.value) == (
        f"{path} is a Python pickle (pickle.dump, joblib), not a checkpoint torch.save wrote: "
        "save the weights with torch.save(model.state_dict(), path) and give that file"
    )
    with pytest.raises(CheckpointError, match="is a Python pickle"):  # a Lightning ckpt_path
        verify_checkpoint_file(path, lightning=True)
    legacy = tmp_path / "legacy.pth"
    torch.save(_small_state(), legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(read_state_dict(legacy)["x"], _small_state()["x"])
    torch.save(_small_state(), legacy, _use_new_zipfile_serialization=False, pickle_protocol=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointError) as info:
            read_state_dict(legacy)
    assert "cannot read without running code (a legacy torch.save file with pickle " in str(
        info.value
    )
    assert "corrupt" not in str(info.value)


def test_checkpoint_with_arbitrary_objects_never_runs_code(tmp_path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "obj": Path("/")}, path)  # not allowlisted
    with pytest.raises(CheckpointError, match=r"refused: .*executable pickle.*pathlib\."):
        load_dofa("base", weights=path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_an_error_naming_the_tensor(tmp_path, base_state, bad) -> None:
    state = dict(base_state)
    weight = state["blocks.3.attn.qkv.weight"].clone()
    weight[0, :7] = bad
    state["blocks.3.attn.qkv.weight"] = weight
    path = write_checkpoint(tmp_path / "c.pth", state)
    with pytest.raises(CheckpointError, match="non-finite") as info:
        load_dofa("base", weights=path)
    message = str(info.value)
    assert f"blocks.3.attn.qkv.weight (7 of {weight.numel()} values)" in message
    assert "1 tensor(s)" in message


def test_weights_of_another_kind_are_an_error_naming_them(tmp_path, base_state) -> None:
    """Integer weights loaded truncated (mostly 0), complex ones as their real part (torch's
    warning only), a sparse one was torch's traceback: exit 0, or 1, never a clear refusal."""
    cases = {
        "int32": lambda v: (v * 100).to(torch.int32),
        "complex64": lambda v: v.to(torch.complex64),
        "sparse": lambda v: v.to_sparse(),
    }
    for kind, change in cases.items():
        state = dict(base_state)
        for key in ("norm.weight", "blocks.0.mlp.fc1.bias"):
            state[key] = change(state[key])
        path = write_checkpoint(tmp_path / f"{kind}.pth", state)
        with pytest.raises(CheckpointError) as info:
            load_dofa("base", weights=path)
        shown = "sparse_coo tensor" if kind == "sparse" else kind
        assert str(info.value) == (
            f"{path} holds 2 entries that are not dense floating-point tensors where the "
            f"model's weights are: blocks.0.mlp.fc1.bias ({shown}), norm.weight ({shown}); "
            "loading would truncate them (integers), keep their real part (complex) or fail "
            "(sparse): the file was changed after it was saved, use the original checkpoint"
        ), kind


def test_float64_values_beyond_float32_are_an_error(tmp_path, base_state) -> None:
    """Judged as the model holds them: 1e300 in a float64 file would load as infinity."""
    state = {k: v.double() for k, v in base_state.items()}
    state["blocks.0.mlp.fc1.bias"][:3] = 1e300
    path = write_checkpoint(tmp_path / "c.pth", state)
    with pytest.raises(CheckpointError, match=r"beyond the range of the model's float32") as info:
        load_dofa("base", weights=path)
    assert "blocks.0.mlp.fc1.bias (3 of 3072 values)" in str(info.value)
    state["blocks.0.mlp.fc1.bias"][:3] = 1e30  # large, but a float32
    loaded = load_dofa("base", weights=write_checkpoint(path, state))
    assert float(loaded.state_dict()["backbone.blocks.0.mlp.fc1.bias"][0]) == pytest.approx(1e30)


def test_finite_values_whose_sum_overflows_are_finite() -> None:
    """The finiteness check sums each tensor first and looks at every value only where the
    sum is not finite: finite values overflowing the sum are finite all the same, and NaN
    or infinity is found in every floating dtype."""
    big = {
        "float32": torch.full((4,), 3e38),
        "float16": torch.full((4,), 60000.0, dtype=torch.float16),
        "bfloat16": torch.full((4,), 3e38, dtype=torch.bfloat16),
        "float64": torch.full((4,), 1.7e308, dtype=torch.float64),
    }
    assert non_finite_tensors(big) == []
    for bad in (float("nan"), float("inf"), -float("inf")):
        state = {k: torch.cat([v, torch.tensor([bad], dtype=v.dtype)]) for k, v in big.items()}
        assert non_finite_tensors(state) == [f"{k} (1 of 5 values)" for k in big], bad
    mixed = torch.tensor([float("inf"), -float("inf"), 1.0])  # sums to NaN: still named
    assert non_finite_tensors({"w": mixed}) == ["w (2 of 3 values)"]


def test_weights_sharing_memory_in_the_file_load_as_separate_weights(tmp_path, base_state) -> None:
    """A load takes the file's tensors as the encoder's own (no copy), but two entries saved
    as one tensor (torch.save keeps such sharing) or as views of one are still two weights:
    fine-tuning one must not change the other."""
    state = dict(base_state)
    state["blocks.0.norm1.weight"] = state["norm.weight"]  # the same tensor under two keys
    qkv, proj = state["blocks.1.attn.qkv.bias"], state["blocks.1.attn.proj.bias"]
    both = torch.cat([qkv, proj])  # two views of one storage
    state["blocks.1.attn.qkv.bias"], state["blocks.1.attn.proj.bias"] = both[:2304], both[2304:]
    state["blocks.2.mlp.fc1.weight"] = state["blocks.2.mlp.fc1.weight"].t().contiguous().t()
    path = write_checkpoint(tmp_path / "shared.pth", state)
    encoder = load_dofa("base", weights=path)
    params = dict(encoder.named_parameters())
    norm, norm1 = params["norm.weight"], params["backbone.blocks.0.norm1.weight"]
    torch.testing.assert_close(norm1, base_state["norm.weight"], rtol=0, atol=0)
    with torch.no_grad():
        norm.add_(1.0)  # a training step on one of them
    torch.testing.assert_close(norm1, base_state["norm.weight"], rtol=0, atol=0)
    torch.testing.assert_close(norm, base_state["norm.weight"] + 1.0, rtol=0, atol=0)
    for key, want in (("qkv.bias", qkv), ("proj.bias", proj)):
        got = params[f"backbone.blocks.1.attn.{key}"]
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert got.untyped_storage().nbytes() == got.nbytes, key  # not the whole of `both`
    fc1 = params["backbone.blocks.2.mlp.fc1.weight"]
    assert fc1.is_contiguous()
    torch.testing.assert_close(fc1, base_state["blocks.2.mlp.fc1.weight"], rtol=0, atol=0)


def test_load_checkpoint_fills_the_encoders_own_parameters(base_checkpoint, base_state) -> None:
    """``load_checkpoint`` into an encoder in use copies into its parameters: an optimizer
    made before still trains it (taking the file's tensors as new parameters, as
    ``load_dofa`` does for its fresh encoder, left the optimizer stepping the old ones)."""
    from torchgeo_dofa.weights import load_checkpoint

    encoder = load_dofa("base", weights=None)
    params = list(encoder.parameters())
    optimizer = torch.optim.SGD(params, lr=1.0)
    load_checkpoint(encoder, resolve_weights("base", base_checkpoint))
    assert all(a is b for a, b in zip(encoder.parameters(), params, strict=True))
    torch.testing.assert_close(encoder.norm.weight, base_state["norm.weight"], rtol=0, atol=0)
    x = torch.randn(1, 4, 224, 224, generator=torch.Generator().manual_seed(7))
    encoder(x, S2_WAVELENGTHS[:4]).pooled.square().sum().backward()
    optimizer.step()
    assert not torch.equal(encoder.norm.weight, base_state["norm.weight"])  # trained


def test_a_read_failing_once_is_not_remembered_as_a_damaged_file(
    tmp_path, base_state, monkeypatch
) -> None:
    """The CRC check is remembered per unchanged file, but a read that failed (a flaky
    network share: EIO) was remembered as a damaged entry: every later load in the process
    said "delete it and download again" of a good file. The failed read itself said that
    its entry "([Errno 5] Input/output error) fails its CRC-32 check (bytes changed after it
    was saved); delete it and download again": now that the read failed, not the file."""
    import errno
    import zipfile

    from torchgeo_dofa import weights

    monkeypatch.setattr(weights, "_RACY_NS", -(10**18))  # remember even a file just written
    path = write_checkpoint(tmp_path / "w.pth", base_state)
    real = zipfile.ZipFile.testzip
    failures = [OSError(errno.EIO, "Input/output error")]

    def flaky(self: zipfile.ZipFile) -> str | None:
        if failures:
            raise failures.pop()
        return real(self)

    monkeypatch.setattr(zipfile.ZipFile, "testzip", flaky)
    said = (
        f"{path} could not be read (Input/output error: the read itself failed, as on a "
        "failing disk or network share, which says nothing of the file's content); check the "
        "disk, share or permissions and run again"
    )
    with pytest.raises(CheckpointError) as info:
        load_dofa("base", weights=path)
    assert str(info.value) == said
    failures.append(OSError(errno.EIO, "Input/output error"))  # a Lightning checkpoint's check
    with pytest.raises(CheckpointError) as info:
        verify_checkpoint_file(path)
    assert str(info.value) == said
    encoder = load_dofa("base", weights=path)  # read again, whole
    torch.testing.assert_close(encoder.norm.weight, base_state["norm.weight"], rtol=0, atol=0)
    # helper-134: the other reads of the file: its sha256 (the job's identity) was a bare
    # "[Errno 5] Input/output error"; the look for a zip's end record took the failed read
    # for "not a zip" (the CRC check skipped: a damaged file loaded; verify_checkpoint_file
    # said "its zip directory is missing"). The file's reads of this module, failing:
    from torchgeo_dofa.jobs import weights_identity

    def failing_open(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(weights, "open", failing_open, raising=False)  # (before builtins')
    for read in (
        lambda: load_dofa("base", weights=path),
        lambda: verify_checkpoint_file(path),
        lambda: weights_identity(str(path), "base", None),
    ):
        with pytest.raises(CheckpointError) as info:
            read()
        assert str(info.value) == said


def test_non_finite_in_ignored_pretraining_keys_is_harmless(tmp_path, base_state, x, reference):
    """``projector.*`` is not loaded, so a NaN there does not reach any output."""
    state = {**base_state, "projector.bias": torch.full((16,), float("nan"))}
    path = write_checkpoint(tmp_path / "c.pth", state)
    torch.testing.assert_close(_pooled(path, x), reference)


def test_a_file_under_the_official_name_is_tagged_by_its_hash(
    tmp_path, base_checkpoint, monkeypatch
) -> None:
    """``TORCHGEO_DOFA_WEIGHTS_DIR`` holding any file under the official name tagged every
    output ``file:DOFA_ViT_base_e100.pth``, as the official file's copy would be. The file is
    hashed: the official bytes (here: the official hash set to this file's) are
    ``official:... (local copy, sha256 verified)``, others say they are not; a file of
    another name is not hashed."""
    import hashlib
    from dataclasses import replace

    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "DOFA_ViT_base_e100.pth").symlink_to(base_checkpoint)
    monkeypatch.setenv("TORCHGEO_DOFA_WEIGHTS_DIR", str(folder))
    digest = hashlib.sha256(Path(base_checkpoint).read_bytes()).hexdigest()
    assert resolve_weights("base").identity == (
        f"file:DOFA_ViT_base_e100.pth (not the official file: sha256 {digest[:12]})"
    )
    monkeypatch.setitem(PRETRAINED, "base", replace(PRETRAINED["base"], sha256=digest))
    assert resolve_weights("base").identity == (
        "official:DOFA_ViT_base_e100.pth (local copy, sha256 verified)"
    )
    (tmp_path / "mine.pth").symlink_to(base_checkpoint)
    assert resolve_weights("base", tmp_path / "mine.pth").identity == "file:mine.pth"


def test_folder_as_weights_is_looked_into(tmp_path, base_checkpoint, x, reference) -> None:
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / PRETRAINED["base"].filename).symlink_to(base_checkpoint)
    resolution = resolve_weights("base", folder)
    assert resolution.path == folder / "DOFA_ViT_base_e100.pth"
    assert resolution.identity == not_official(base_checkpoint)
    torch.testing.assert_close(_pooled(folder, x), reference)


def test_folder_without_the_official_file_names_what_it_looked_for(tmp_path) -> None:
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "other.pth").write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        resolve_weights("large", folder)
    message = str(info.value)
    assert "is a folder" in message and "DOFA_ViT_large_e100.pth" in message
    assert "other.pth" in message and "does not exist" not in message
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"DOFA_ViT_base_e100.pth.*no \.pth"):
        resolve_weights("base", empty)


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


_UNREACHABLE_SCRIPT = """
import json, os, time
from torchgeo_dofa.weights import CheckpointError, resolve_weights
results = {}
for name, repo in [("uncached", None), ("cached", "me/dofa-ft")]:
    os.environ.pop("TORCHGEO_DOFA_HF_REPO_ID", None)
    if repo:
        os.environ["TORCHGEO_DOFA_HF_REPO_ID"] = repo
    start = time.perf_counter()
    try:
        results[name] = "ok " + resolve_weights("base").identity
    except CheckpointError as err:
        results[name] = "error " + str(err)
    results[name + "_s"] = time.perf_counter() - start
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def unreachable_hub(tmp_path_factory, base_checkpoint) -> dict[str, Any]:
    """Real huggingface_hub, not offline, against a hub that accepts connections but never
    answers (a listening socket nobody reads): the worst case of a firewalled machine."""
    cache = tmp_path_factory.mktemp("hub_unreachable")
    _fake_hub_cache(cache, "me/dofa-ft", base_checkpoint)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
        env.pop("HF_HUB_OFFLINE", None)
        env |= {
            "HF_ENDPOINT": f"http://127.0.0.1:{port}",
            "HF_HUB_ETAG_TIMEOUT": "1",
            "HF_HUB_CACHE": str(cache),
            "HF_HOME": str(cache),
        }
        proc = subprocess.run(
            [sys.executable, "-c", _UNREACHABLE_SCRIPT],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def test_unreachable_hub_fails_in_seconds_with_the_good_message(unreachable_hub) -> None:
    message = unreachable_hub["uncached"]
    assert message.startswith("error could not download DOFA_ViT_base_e100.pth")
    assert "unreachable" in message and "waited at most 1 s" in message
    assert "TORCHGEO_DOFA_BASE_WEIGHTS" in message and "TORCHGEO_DOFA_WEIGHTS_DIR" in message
    # huggingface_hub alone retries with back-off (1 + 2 + 4 + 8 + 8 s of sleeps, plus a
    # timeout per attempt); the probe waits one timeout (1 s here)
    assert unreachable_hub["uncached_s"] < 8, unreachable_hub


def test_unreachable_hub_uses_the_cache(unreachable_hub) -> None:
    assert unreachable_hub["cached"] == "ok official:DOFA_ViT_base_e100.pth"
    assert unreachable_hub["cached_s"] < 8, unreachable_hub


def test_a_fine_tuned_task_checkpoint_gives_its_encoder(tmp_path) -> None:
    """Fine-tune, then embed with the result: the task's Lightning checkpoint was refused as
    "does not fit DOFA base ... unexpected 'encoder.backbone.blocks.0...'"."""
    import lightning.pytorch as pl

    from torchgeo_dofa.embedder import DOFAEmbedder
    from torchgeo_dofa.synthetic import SpectralDataModule
    from torchgeo_dofa.tasks import DOFAClassificationTask

    pl.seed_everything(0)
    task = DOFAClassificationTask(
        num_classes=4, weights=None, mode="full", interpolate_pos_embed=True, patience=None
    )
    start = {k: v.clone() for k, v in task.encoder.state_dict().items()}
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(task, SpectralDataModule(batch_size=4, size=32, num_samples=8))
    path = tmp_path / "task.ckpt"
    trainer.save_checkpoint(path)
    tuned = task.encoder.state_dict()
    assert any(not torch.equal(start[k], tuned[k]) for k in start)  # the step changed it
    x = torch.randn(2, 9, 224, 224, generator=torch.Generator().manual_seed(1))
    task.encoder.eval()
    with torch.inference_mode():
        expected = task.encoder(x, S2_WAVELENGTHS)
        loaded = load_dofa("base", weights=path)(x, S2_WAVELENGTHS)
    torch.testing.assert_close(loaded.pooled, expected.pooled, rtol=0, atol=0)
    torch.testing.assert_close(loaded.grid, expected.grid, rtol=0, atol=0)
    assert DOFAEmbedder(weights=str(path)).metadata["weights"] == "file:task.ckpt"


def _zip_directory_byte_flipped(data: bytes) -> bytes:
    """``data`` (a zip) with one byte of its last directory entry's file name changed."""
    import io
    import zipfile

    end = data.rindex(b"PK\x05\x06")  # the end-of-directory record: where the directory is
    start = int.from_bytes(data[end + 16 : end + 20], "little")
    last = data.rindex(b"PK\x01\x02", start, end)  # the last entry's header, name at +46
    flipped = bytearray(data)
    flipped[last + 46 + 3] ^= 0xFF
    assert zipfile.is_zipfile(io.BytesIO(bytes(flipped)))  # still looks whole
    return bytes(flipped)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda good: b"", "the file is empty (0 bytes; a copy or save that did not finish?)"),
        (
            lambda good: b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\n",
            "is not a PyTorch checkpoint but a Git LFS pointer (a text file naming it): fetch "
            "the file itself (git lfs pull)",
        ),
        (
            lambda good: b"<!DOCTYPE html><html>404 Not Found</html>",
            "is not a PyTorch checkpoint (it starts with '<!DOCTYPE html><html>404', not a zip "
            "archive or a pickle",
        ),
        (lambda good: good[: len(good) // 2], "its zip directory is missing"),
        (_zip_directory_byte_flipped, "its zip directory cannot be read ("),
        (None, "is not a Lightning checkpoint (no 'pytorch-lightning_version' in it: a plain "),
    ],
    ids=["empty", "git-lfs-pointer", "web-page", "truncated", "directory-byte", "state-dict"],
)
def test_a_file_that_is_no_lightning_checkpoint_is_named_before_torch_loads_it(
    tmp_path, content, message
) -> None:
    """Such files failed deep inside torch / Lightning: EOFError (empty), KeyError: 101 (text),
    UnicodeDecodeError (a byte of the zip's directory), KeyError: 'pytorch-lightning_version'
    (a plain state dict as ``ckpt_path``)."""
    from torchgeo_dofa.tasks import DOFAClassificationTask
    from torchgeo_dofa.weights import verify_checkpoint_file

    good = tmp_path / "good.ckpt"  # the layout of a Lightning checkpoint, small
    torch.save({"state_dict": {"w": torch.ones(64)}, "pytorch-lightning_version": "2.5"}, good)
    verify_checkpoint_file(good, lightning=True)
    bad = tmp_path / "bad.ckpt"
    if content is None:
        torch.save({"w": torch.ones(64)}, bad)
        verify_checkpoint_file(bad)  # as weights it is fine
    else:
        bad.write_bytes(content(good.read_bytes()))
    with pytest.raises(CheckpointError, match=re.escape(message)) as err:
        verify_checkpoint_file(bad, lightning=True)
    assert str(err.value).startswith(f"{bad} is not a ")
    with pytest.raises(CheckpointError, match=re.escape(message)):
        DOFAClassificationTask.load_from_checkpoint(bad)


def test_every_byte_changed_in_a_zip_directory_is_refused_or_loads(tmp_path) -> None:
    """A changed byte in the last 200 of a checkpoint (its zip directory and end records)
    either loads as before or is one CheckpointError: 101 of them passed the file check and
    then failed in torch.load ("PytorchStreamReader ... internal miniz error"), 10 more
    raised BadZipFile / NotImplementedError from the check itself."""
    from torchgeo_dofa.weights import verify_checkpoint_file

    good = tmp_path / "good.ckpt"
    layers = {f"layer{i}.weight": torch.full((8, 8), float(i)) for i in range(20)}
    torch.save({"state_dict": layers, "pytorch-lightning_version": "2.5"}, good)
    data = good.read_bytes()
    bad = tmp_path / "bad.ckpt"
    refused = 0
    for back in range(1, 201):
        changed = bytearray(data)
        changed[len(data) - back] ^= 0x01
        bad.write_bytes(changed)
        try:
            verify_checkpoint_file(bad, lightning=True)
        except CheckpointError as err:
            assert str(err).startswith(f"{bad} is not a readable PyTorch checkpoint"), err
            refused += 1
            continue
        loaded = torch.load(bad, weights_only=True)  # passed: it must load, and as saved
        for name, value in layers.items():
            torch.testing.assert_close(loaded["state_dict"][name], value)
    assert refused > 100  # most of them are refused (145 when written)


def test_a_task_checkpoint_with_changed_bytes_is_refused_by_every_loader(tmp_path) -> None:
    """A byte changed in a fine-tuned task's checkpoint loaded silently as other weights
    through ``load_from_checkpoint`` and ``Trainer.validate(ckpt_path=...)`` (torch.load does
    not check the zip's CRC-32s): the task records a CRC-32 of its weights and checks it."""
    import zipfile

    import lightning.pytorch as pl

    from torchgeo_dofa.synthetic import SpectralDataModule
    from torchgeo_dofa.tasks import DOFAClassificationTask
    from torchgeo_dofa.weights import (
        STATE_DIGEST_KEY,
        CheckpointError,
        state_dict_digest,
        verify_checkpoint_file,
    )

    task = DOFAClassificationTask(num_classes=4, weights=None, interpolate_pos_embed=True)
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    data = SpectralDataModule(batch_size=4, size=32, num_samples=8)
    trainer.validate(task, data)
    good = tmp_path / "task.ckpt"
    trainer.save_checkpoint(good)
    saved = torch.load(good, weights_only=True)
    assert saved[STATE_DIGEST_KEY] == state_dict_digest(task.state_dict())
    raw = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as archive:
        entry = max(archive.infolist(), key=lambda i: i.file_size)  # a tensor's bytes
    raw[entry.header_offset + 30 + len(entry.filename) + entry.file_size // 2] ^= 0xFF
    flipped = tmp_path / "flipped.ckpt"
    flipped.write_bytes(raw)
    message = (
        r" fail their CRC-32 check \(saved [0-9a-f]{8}, now [0-9a-f]{8}\): .* or its "
        f"state_dict was edited after saving \\(then delete its '{STATE_DIGEST_KEY}' entry"
    )
    with pytest.raises(CheckpointError, match=f"^the weights of {flipped}{message}"):
        trainer.validate(task, data, ckpt_path=flipped)  # the file is named
    with pytest.raises(CheckpointError, match=f"entry {entry.filename} fails its CRC-32"):
        verify_checkpoint_file(flipped)
    with pytest.raises(CheckpointError, match=f"entry {entry.filename} fails its CRC-32"):
        DOFAClassificationTask.load_from_checkpoint(flipped)  # the file is checked first
    edited = dict(saved, state_dict=dict(saved["state_dict"]))
    edited["state_dict"]["head.1.bias"] = edited["state_dict"]["head.1.bias"] + 1.0
    torch.save(edited, tmp_path / "edited.ckpt")  # a whole zip: only the digest tells
    with pytest.raises(CheckpointError, match=f"^the weights of {tmp_path / 'edited.ckpt'}"):
        DOFAClassificationTask.load_from_checkpoint(tmp_path / "edited.ckpt")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated copy or download"):
        verify_checkpoint_file(truncated)
    verify_checkpoint_file(good)  # intact: passes, and loads
    loaded = DOFAClassificationTask.load_from_checkpoint(good)
    assert isinstance(loaded, DOFAClassificationTask)
    with pytest.raises(CheckpointError, match=f"^the checkpoint's weights{message}"):
        loaded.on_load_checkpoint(edited)  # no file known: none named
    # a checkpoint saved before the digest existed loads as before
    del saved[STATE_DIGEST_KEY]
    torch.save(saved, tmp_path / "older.ckpt")
    DOFAClassificationTask.load_from_checkpoint(tmp_path / "older.ckpt")


@pytest.mark.parametrize("empty", ["", "  "])
def test_empty_weights_are_not_the_working_folder(
    empty: str, base_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """helper-113: ``DOFAEmbedder(weights="")`` and ``load_dofa(weights="")`` loaded the
    official file name found in the working folder, without a word (``get_embedding`` and
    the command line refused it). Now every loader refuses it; ``"."`` still names the
    folder."""
    from torchgeo_dofa.embedder import DOFAEmbedder
    from torchgeo_dofa.tasks import DOFAClassificationTask

    monkeypatch.chdir(base_checkpoint.parent)  # holds DOFA_ViT_base_e100.pth
    said = rf"weights={empty!r} is empty: give 'official', a checkpoint file or a folder"
    with pytest.raises(CheckpointError, match=said):
        load_dofa("base", weights=empty)
    with pytest.raises(CheckpointError, match=said):
        DOFAEmbedder(weights=empty)
    with pytest.raises(CheckpointError, match=said):
        DOFAClassificationTask(num_classes=2, weights=empty)
    assert load_dofa("base", weights=".").weights_id.startswith("file:DOFA_ViT_base_e100.pth")
