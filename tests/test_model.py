"""The encoder: outputs against TorchGeo's DOFA and independent computations, input checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchgeo.models import DOFA, dofa_base_patch16_224

from tests.checkpoints import S2_WAVELENGTHS
from tests.precision import assert_as_exact_as_torchgeo, bf16_error, torchgeo_bf16_error
from torchgeo_dofa import BandError, DOFAEncoder, build_encoder, load_dofa
from torchgeo_dofa.model import VARIANTS, canonical_variant, sincos_pos_embed_2d


@pytest.fixture(scope="module")
def encoder(base_checkpoint: Path) -> DOFAEncoder:
    return load_dofa("base", weights=base_checkpoint)


@pytest.fixture(scope="module")
def torchgeo_dofa(base_state) -> DOFA:
    """TorchGeo's own DOFA with the same weights (its loader's strict=False rules)."""
    model = dofa_base_patch16_224()
    missing, unexpected = model.load_state_dict(base_state, strict=False)
    assert set(missing) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert set(unexpected) == {
        "mask_token",
        "norm.weight",
        "norm.bias",
        "projector.weight",
        "projector.bias",
    }
    return model.eval()


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(2, 9, 224, 224, generator=torch.Generator().manual_seed(1))


def test_variants_and_aliases() -> None:
    assert canonical_variant("b") == "base"
    assert canonical_variant("L") == "large"
    assert (VARIANTS["base"].embed_dim, VARIANTS["base"].depth, VARIANTS["base"].num_heads) == (
        768,
        12,
        12,
    )
    assert (VARIANTS["large"].embed_dim, VARIANTS["large"].depth) == (1024, 24)
    with pytest.raises(ValueError, match=r"unknown DOFA variant 'huge'.*'base'.*'large'"):
        load_dofa("huge", weights=None)


def test_base_parameter_count() -> None:
    n = sum(p.numel() for p in build_encoder("b").parameters())
    assert 105e6 < n < 120e6  # ~112 M


def test_plain_pooled_equals_torchgeo_forward_features(encoder, torchgeo_dofa, batch) -> None:
    with torch.inference_mode():
        ours = encoder(batch, S2_WAVELENGTHS, pooled_norm="plain")
        theirs = torchgeo_dofa.forward_features(batch, S2_WAVELENGTHS)
    assert ours.pooled_norm == "plain"
    assert ours.pooled.shape == (2, 768)
    torch.testing.assert_close(ours.pooled, theirs, rtol=1e-5, atol=1e-5)


def test_grid_equals_last_block_tokens_of_torchgeo(encoder, torchgeo_dofa, batch) -> None:
    captured: list[torch.Tensor] = []
    hook = torchgeo_dofa.blocks[-1].register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        with torch.inference_mode():
            torchgeo_dofa.forward_features(batch, S2_WAVELENGTHS)
            grid = encoder(batch, S2_WAVELENGTHS).grid
    finally:
        hook.remove()
    tokens = captured[0][:, 1:, :]  # drop CLS
    assert grid.shape == (2, 768, 14, 14)
    # row-major from the top-left patch: token r*14 + c is cell (r, c)
    for r, c in [(0, 0), (0, 13), (5, 7), (13, 0), (13, 13)]:
        torch.testing.assert_close(grid[:, :, r, c], tokens[:, r * 14 + c, :])


def test_trained_pooled_uses_checkpoint_norm(encoder, base_state, batch) -> None:
    with torch.inference_mode():
        out = encoder(batch, torch.tensor(S2_WAVELENGTHS))
    assert out.pooled_norm == "trained"
    mean = out.grid.flatten(2).mean(-1)
    expected = F.layer_norm(
        mean, (768,), weight=base_state["norm.weight"], bias=base_state["norm.bias"], eps=1e-6
    )
    torch.testing.assert_close(out.pooled, expected, rtol=1e-5, atol=1e-5)
    plain = F.layer_norm(mean, (768,), eps=1e-6)
    assert (out.pooled - plain).abs().max() > 1e-2  # the conventions really differ


def test_random_init_has_2d_sincos_pos_embed() -> None:
    enc = load_dofa("base", weights=None)
    pos = enc.backbone.pos_embed[0]
    assert pos.shape == (197, 768)
    assert torch.count_nonzero(pos[0]) == 0  # class token row
    # independent formula: first half encodes the column, second half the row (MAE)
    quarter = 768 // 4
    for row, col in [(0, 1), (3, 5), (13, 13)]:
        token = pos[1 + row * 14 + col]
        for j in [0, 7, quarter - 1]:
            omega = 1.0 / 10000 ** (j / quarter)
            assert math.isclose(token[j].item(), math.sin(col * omega), abs_tol=1e-5)
            assert math.isclose(token[quarter + j].item(), math.cos(col * omega), abs_tol=1e-5)
            assert math.isclose(token[2 * quarter + j].item(), math.sin(row * omega), abs_tol=1e-5)
    assert torch.count_nonzero(DOFA(embed_dim=64, depth=1, num_heads=2).pos_embed) == 0
    torch.testing.assert_close(sincos_pos_embed_2d(768, 14), enc.backbone.pos_embed.detach())


@pytest.mark.parametrize(
    ("shape", "wavelengths", "message"),
    [
        ((1, 9, 224, 224), S2_WAVELENGTHS[:4], "got 4 wavelengths for 9 channels"),
        ((1, 2, 224, 224), [0.665, -0.5], "finite and positive"),
        ((1, 2, 224, 224), [0.665, float("nan")], "finite and positive"),
        ((1, 2, 224, 224), [0.0, 0.56], "finite and positive"),
        ((1, 3, 224, 224), [665.0, 560.0, 490.0], "look like nanometres"),
        ((1, 9, 100, 100), S2_WAVELENGTHS, "224x224 inputs, got 100x100"),
        ((9, 224, 224), S2_WAVELENGTHS, "expected input of shape"),
    ],
)
def test_bad_inputs_raise_before_compute(encoder, shape, wavelengths, message) -> None:
    calls: list[int] = []
    # the first block runs on every path (the patch-weight cache bypasses patch_embed)
    hook = encoder.backbone.blocks[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises((ValueError, BandError), match=message):
            encoder(torch.zeros(shape), wavelengths)
    finally:
        hook.remove()
    assert calls == []


def test_mixed_wavelength_rows_rejected(encoder) -> None:
    wl = torch.tensor([S2_WAVELENGTHS[:3], [0.49, 0.56, 0.665]])
    with pytest.raises(ValueError, match="share one wavelength vector"):
        encoder(torch.zeros(2, 3, 224, 224), wl)


def test_unknown_pooled_norm(encoder, batch) -> None:
    with pytest.raises(ValueError, match="unknown pooled_norm 'fancy'"):
        encoder(batch, S2_WAVELENGTHS, pooled_norm="fancy")


def test_any_band_count_works(encoder) -> None:
    x = torch.randn(1, 4, 224, 224)
    calls: list[int] = []  # the hook used to prove "no compute" above does fire on valid input
    hook = encoder.backbone.blocks[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        out = encoder(x, [0.665, 0.56, 0.49, 0.842])
    finally:
        hook.remove()
    assert calls == [1]
    assert out.grid.shape == (1, 768, 14, 14)


def test_interpolated_pos_embed_for_other_sizes(encoder) -> None:
    wl = [0.665, 0.56, 0.49]
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        locked = encoder(x, wl).pooled
        encoder.interpolate_pos_embed = True
        try:
            out = encoder(torch.randn(1, 3, 64, 96), wl)
            # at 224 the interpolation is the identity: same as the locked encoder
            torch.testing.assert_close(encoder(x, wl).pooled, locked)
            with pytest.raises(ValueError, match="multiple of the patch size"):
                encoder(torch.randn(1, 3, 50, 64), wl)
        finally:
            encoder.interpolate_pos_embed = False
    assert out.grid.shape == (1, 768, 4, 6)


def test_bf16_autocast_is_as_exact_as_torchgeo(encoder, batch, base_state) -> None:
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = encoder(batch, S2_WAVELENGTHS)
    assert out.grid.dtype == torch.bfloat16  # autocast really ran the blocks in bf16
    reference = torchgeo_bf16_error(base_state, batch, S2_WAVELENGTHS)
    for norm in ("trained", "plain"):
        ours = bf16_error(lambda: encoder(batch, S2_WAVELENGTHS, pooled_norm=norm).pooled)  # noqa: B023
        assert ours > 0  # bf16 really ran
        assert_as_exact_as_torchgeo(ours, reference)


def test_bf16_keeps_the_patch_embedding_whatever_the_weights(base_state) -> None:
    """Under bf16 autocast the wavelength-conditioned patch embedding ran in bf16: on the
    demo scene's first chip, TorchGeo's own initialisation (an untrained weight generator)
    gave a pooled cosine of 0.30 to fp32 (TorchGeo's forward alike), the tests' random
    checkpoint 0.9973. It now runs in fp32 (the rest in bf16): both within 1e-3 of fp32."""
    import rasterio

    from tests.scenes import SCENE
    from torchgeo_dofa.transforms import DOFAPreprocess
    from torchgeo_dofa.weights import load_state_dict_into

    with rasterio.open(SCENE) as src:
        raw = torch.from_numpy(src.read(window=((0, 224), (0, 224))).astype("float32"))
        sample = DOFAPreprocess(bands=list(src.descriptions))({"image": raw})
    x, waves = sample["image"][None], sample["wavelengths"]
    torch.manual_seed(0)
    untrained = dofa_base_patch16_224(weights=None).state_dict()
    untrained |= {"norm.weight": torch.ones(768), "norm.bias": torch.zeros(768)}
    for name, state in (("tests' checkpoint", base_state), ("TorchGeo's init", untrained)):
        model = build_encoder("base")
        kept = {k: v for k, v in state.items() if not k.startswith(("fc_norm", "head"))}
        load_state_dict_into(model, kept, name)  # strictly, as a checkpoint file loads
        model.eval()

        def pooled(m: DOFAEncoder = model) -> torch.Tensor:
            return m(x, waves).pooled

        error = bf16_error(pooled)
        assert 0 < error < 1e-3, f"{name}: bf16 pooled 1 - cos = {error:.2e}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(encoder, batch, base_state) -> None:
    gpu = load_dofa("base", weights=None, device="cuda")
    gpu.load_state_dict(encoder.state_dict())
    on_gpu = batch.cuda()
    with torch.inference_mode():
        ref = encoder(batch, S2_WAVELENGTHS).pooled
        out = gpu(on_gpu, S2_WAVELENGTHS).pooled.cpu()
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    # bf16 on the GPU: judged against TorchGeo's own bf16 there, as on the CPU (issue 14)
    ours = bf16_error(lambda: gpu(on_gpu, S2_WAVELENGTHS).pooled, device="cuda")
    assert ours > 0  # bf16 really ran
    reference = torchgeo_bf16_error(base_state, batch, S2_WAVELENGTHS, device="cuda")
    assert_as_exact_as_torchgeo(ours, reference)


def test_patch_weight_cache_is_exact_and_invalidated(encoder, base_state) -> None:
    x = torch.randn(1, 4, 224, 224)
    wl = [0.665, 0.56, 0.49, 0.842]
    with torch.inference_mode():
        cached = encoder(x, wl).pooled
        encoder.cache_patch_weights = False
        try:
            uncached = encoder(x, wl).pooled
        finally:
            encoder.cache_patch_weights = True
        torch.testing.assert_close(cached, uncached, rtol=0, atol=0)
    # editing the weights must not serve stale generated weights
    gen = encoder.backbone.patch_embed.fclayer.w1.weight
    with torch.no_grad():
        gen.mul_(1.5)
    try:
        with torch.inference_mode():
            changed = encoder(x, wl).pooled
        assert (changed - cached).abs().max() > 1e-4
    finally:
        with torch.no_grad():
            gen.copy_(base_state["patch_embed.fclayer.w1.weight"])
    with torch.inference_mode():
        torch.testing.assert_close(encoder(x, wl).pooled, cached)


def _bf16_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Worst (1 - cosine similarity) between rows of a bf16 result and its fp32 reference."""
    return float((1 - F.cosine_similarity(out.float(), ref.float(), dim=-1)).max())


@pytest.mark.parametrize("channels", [9, 4])
def test_bf16_weight_copies_as_exact_as_torchgeo_bf16(encoder, torchgeo_dofa, channels) -> None:
    """The bf16 weight copies (default under bf16 autocast at inference) are as exact, relative
    to fp32, as TorchGeo's own DOFA under the same autocast on the same weights and input."""
    x = torch.randn(2, channels, 224, 224, generator=torch.Generator().manual_seed(3))
    wl = S2_WAVELENGTHS[:channels]
    assert encoder.bf16_weights
    with torch.inference_mode():
        ref = encoder(x, wl, pooled_norm="plain").pooled
        tg_ref = torchgeo_dofa.forward_features(x, wl)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = encoder(x, wl, pooled_norm="plain")
            tg = torchgeo_dofa.forward_features(x, wl)
            encoder.bf16_weights = False
            try:
                per_call = encoder(x, wl, pooled_norm="plain")
            finally:
                encoder.bf16_weights = True
    copy = encoder._block_copy
    assert copy is not None  # the copies were used ...
    assert copy[2][0]["mlp.fc1.weight"].dtype == torch.bfloat16
    assert copy[2][0]["norm1.weight"].dtype == torch.float32  # ... LayerNorm kept as autocast does
    assert next(encoder.backbone.blocks.parameters()).dtype == torch.float32  # module untouched
    ours_err, tg_err = _bf16_error(ours.pooled, ref), _bf16_error(tg, tg_ref)
    assert ours_err <= 2 * tg_err + 1e-4, (ours_err, tg_err)
    # the copies only skip autocast's per-call casts: the same numbers as plain autocast
    torch.testing.assert_close(ours.grid, per_call.grid, rtol=0, atol=0)
    torch.testing.assert_close(ours.pooled, per_call.pooled, rtol=0, atol=0)


def test_bf16_weight_copies_follow_weight_edits_and_skip_training(encoder, base_state) -> None:
    x = torch.randn(1, 4, 224, 224, generator=torch.Generator().manual_seed(4))
    wl = S2_WAVELENGTHS[:4]
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    with torch.inference_mode(), bf16:
        before = encoder(x, wl).pooled
    fc = encoder.backbone.blocks[0].mlp.fc1.weight
    with torch.no_grad():
        fc.mul_(2.0)
    try:
        with torch.inference_mode(), bf16:
            edited = encoder(x, wl).pooled
            encoder.bf16_weights = False
            try:
                reference = encoder(x, wl).pooled
            finally:
                encoder.bf16_weights = True
        torch.testing.assert_close(edited, reference, rtol=0, atol=0)  # not the stale copy
        assert (edited.float() - before.float()).abs().max() > 1e-3
        # with gradients the module's own parameters are used (the copy has no autograd)
        encoder._block_copy = None
        with bf16:
            out = encoder(x, wl).pooled
        assert out.requires_grad and encoder._block_copy is None
    finally:
        with torch.no_grad():
            fc.copy_(base_state["blocks.0.mlp.fc1.weight"])


def test_caches_follow_parameters_set_anew_at_the_old_ones_address(encoder, base_state) -> None:
    """The patch weights and bf16 copies were cached by each parameter's address and version
    counter: a parameter set anew at the same address and version (a load with assign=True
    gives version 0, often where the freed tensors were; here a new parameter over the old
    one's storage, its values changed through ``.data``) was served the old weights' entry."""
    x = torch.randn(1, 4, 224, 224, generator=torch.Generator().manual_seed(6))
    wl = S2_WAVELENGTHS[:4]
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)

    def pooled(cached: bool) -> tuple[torch.Tensor, torch.Tensor]:
        encoder.cache_patch_weights = encoder.bf16_weights = cached
        try:
            with torch.inference_mode():
                fp32 = encoder(x, wl).pooled
                with bf16:
                    return fp32, encoder(x, wl).pooled
        finally:
            encoder.cache_patch_weights = encoder.bf16_weights = True

    before = pooled(cached=True)  # fills both caches
    modules = {
        "patch_embed.fclayer.w1.weight": encoder.backbone.patch_embed.fclayer.w1,
        "blocks.0.mlp.fc1.weight": encoder.backbone.blocks[0].mlp.fc1,
    }
    olds = {key: module.weight for key, module in modules.items()}
    try:
        for module in modules.values():
            new = torch.nn.Parameter(module.weight.detach())  # its storage and version counter
            assert (new.data_ptr(), new._version) == (
                module.weight.data_ptr(),
                module.weight._version,
            )
            new.data.mul_(1.5)
            module.weight = new
        got, want = pooled(cached=True), pooled(cached=False)
        for g, w, b in zip(got, want, before, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)  # not the old weights' entries
            assert (g.float() - b.float()).abs().max() > 1e-4
    finally:
        for key, module in modules.items():
            module.weight = olds[key]
            with torch.no_grad():
                module.weight.copy_(base_state[key])  # the storage the new one changed
    for g, b in zip(pooled(cached=True), before, strict=True):
        torch.testing.assert_close(g, b, rtol=0, atol=0)


def test_an_encoder_that_ran_pickles_and_saves_whole(encoder) -> None:
    """The caches' entries hold weak references, which cannot be pickled: an encoder that
    had run a forward (in fp32, or bf16 with its block copies) failed ``torch.save(encoder)``
    and ``pickle.dumps`` with a TypeError (helper-132). Saved without them, loaded equal."""
    import io
    import pickle

    x = torch.randn(1, 4, 224, 224, generator=torch.Generator().manual_seed(8))
    wl = S2_WAVELENGTHS[:4]
    with torch.inference_mode():
        want = encoder(x, wl).pooled
        with torch.autocast("cpu", dtype=torch.bfloat16):
            encoder(x, wl)
    assert encoder._patch_weights and encoder._block_copy is not None  # both caches filled
    buffer = io.BytesIO()
    torch.save(encoder, buffer)
    buffer.seek(0)
    for copy in (torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(encoder))):
        with torch.inference_mode():
            torch.testing.assert_close(copy(x, wl).pooled, want, rtol=0, atol=0)
    assert encoder._patch_weights and encoder._block_copy is not None  # its own kept
