"""The DOFA encoder: TorchGeo's ``DOFA`` with pooled and grid outputs from one forward pass.

The architecture is :class:`torchgeo.models.DOFA`, reused as is. :class:`DOFAEncoder` wraps it
and adds what the official checkpoints need and TorchGeo leaves out: the trained final
``norm`` (rs-embed's pooled convention), the patch-token grid, input checks and a proper
2-D sin/cos position embedding for randomly initialised models.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Self

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torchgeo.models import DOFA
from torchgeo.models.dofa import position_embedding

from ._warnings import warn
from .bands import validate_wavelengths

__all__ = [
    "VARIANTS",
    "DOFAEncoder",
    "DOFAOutput",
    "PooledNorm",
    "VariantConfig",
    "build_encoder",
    "canonical_variant",
    "cpu_has_fast_bf16",
    "dofa_base_patch16_224",
    "dofa_large_patch16_224",
    "grid_side",
    "sincos_pos_embed_2d",
]

PooledNorm = Literal["trained", "plain"]
_POOLED_NORMS: tuple[str, ...] = ("trained", "plain")
#: Wavelength sets whose generated patch-embedding weights an encoder keeps (inference only).
PATCH_WEIGHT_CACHE_SIZE = 8


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether PyTorch has fast bfloat16 matrix-multiply kernels on this CPU.

    True where oneDNN's bf16 kernels run (x86 with AVX-512 BW/VL/DQ, avx512_bf16 or AMX, or
    ARM with BF16). On an AVX2-only x86 CPU (e.g. AMD Zen 2/3) there are none: bf16 matmuls
    fall back to reference kernels that run several times slower than fp32.

    Returns:
        The answer PyTorch gives (``torch.ops.mkldnn._is_mkldnn_bf16_supported``); True if
        this build cannot tell, so nothing changes where the question has no answer.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return True


@dataclass(frozen=True)
class VariantConfig:
    """Architecture of one DOFA variant.

    Attributes:
        name: variant name.
        embed_dim: transformer width D.
        depth: number of blocks.
        num_heads: attention heads.
        patch_size: patch size in pixels.
        img_size: input side the position embedding is built for.
    """

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 16
    img_size: int = 224

    @property
    def grid_size(self) -> int:
        """Tokens per side of the patch grid (14 for 224 / 16)."""
        return self.img_size // self.patch_size


VARIANTS: dict[str, VariantConfig] = {
    "base": VariantConfig("base", embed_dim=768, depth=12, num_heads=12),
    "large": VariantConfig("large", embed_dim=1024, depth=24, num_heads=16),
}
_ALIASES = {"b": "base", "l": "large", "base": "base", "large": "large"}


def canonical_variant(variant: str) -> str:
    """Return ``base`` or ``large`` for a variant name or its alias (``b``, ``l``).

    Args:
        variant: a variant name, case-insensitive.

    Returns:
        The canonical variant name.

    Raises:
        ValueError: for any other name, listing the valid choices.
    """
    key = str(variant).strip().lower()
    if key not in _ALIASES:
        raise ValueError(
            f"unknown DOFA variant {variant!r}: choose one of 'base' ('b') or 'large' ('l')"
        )
    return _ALIASES[key]


@dataclass
class DOFAOutput:
    """Outputs of one encoder forward pass.

    Attributes:
        pooled: (B, D) mean of the patch tokens after the last block, then LayerNorm.
        grid: (B, D, h, w) patch tokens after the last block, no norm, row-major from the
            top-left patch (h = w = 14 at 224 x 224).
        pooled_norm: which LayerNorm affine ``pooled`` used: ``"trained"`` (the checkpoint's
            ``norm``, rs-embed's convention) or ``"plain"`` (weight 1, bias 0, as TorchGeo's
            ``forward_features``).

    ``pooled`` and ``grid`` are float32, or bfloat16 when computed under bf16 autocast with
    gradients off.
    """

    pooled: Tensor
    grid: Tensor
    pooled_norm: str


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> Tensor:
    """MAE's fixed 2-D sin/cos position embedding (the table the official weights store).

    Args:
        embed_dim: embedding width D (divisible by 4).
        grid_size: tokens per side.
        cls_token: prepend an all-zero row for the class token.

    Returns:
        A float32 tensor (1, grid_size**2 [+1], D).
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4, got {embed_dim}")

    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    coords = np.arange(grid_size, dtype=np.float32)
    grid_w, grid_h = np.meshgrid(coords, coords)  # w varies fastest, as in MAE
    emb = np.concatenate([one_d(embed_dim // 2, grid_w), one_d(embed_dim // 2, grid_h)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)


#: Weak references to the parameters a cached entry was made from (:func:`_still_these`).
_ParamRefs = tuple["weakref.ref[Tensor]", ...]


def _parameters_key(params: Sequence[Tensor]) -> tuple[tuple[int, int], ...]:
    """Each parameter's storage address and version counter: a cache's key.

    An address is reused once its tensor is freed (a ``load_state_dict(..., assign=True)``
    or a parameter set anew gives new tensors, at version 0, often where the old ones were),
    so a match is confirmed with the entry's weak references (:func:`_still_these`): the
    bf16 copies or patch weights of the old tensors served the new ones before.
    """
    return tuple((p.data_ptr(), p._version) for p in params)


def _still_these(refs: _ParamRefs, params: Sequence[Tensor]) -> bool:
    """Whether ``refs`` (weak references) still point to exactly ``params``."""
    return len(refs) == len(params) and all(r() is p for r, p in zip(refs, params, strict=True))


class DOFAEncoder(nn.Module):
    """DOFA encoder returning pooled vectors and patch-token grids.

    ``encoder(x, wavelengths)`` takes ``x`` (B, C, 224, 224), normalised as DOFA expects, and
    ``wavelengths`` (C values in micrometres) and returns a :class:`DOFAOutput`.

    The wrapped :class:`torchgeo.models.DOFA` is ``self.backbone``; its state-dict keys are
    those of the official checkpoint, under ``backbone.``, with the trained final LayerNorm
    as ``norm``.

    Inference (measured by ``benchmarks/run.py``):

    - the patch-embedding weights generated from the wavelengths are cached per band set
      (``cache_patch_weights``, on) in eval mode when no gradient is needed, so the
      weight-generator transformer runs once per band set instead of once per batch (about
      +10 % images/s at batch 1 on a 2-core CPU; within noise at batch 8 and 32);
    - under bf16 autocast with gradients off, the residual token stream stays in bf16 and
      ``pooled``/``grid`` come out in bf16 (pooled cosine to fp32 >= 0.99999);
    - ``cpu_bf16_fallback`` (opt-in) runs fp32 when bf16 autocast is asked for on a CPU
      without fast bf16 kernels (AVX2-only x86), where bf16 is emulated and about 7x slower.
    """

    def __init__(
        self,
        config: VariantConfig,
        pooled_norm: PooledNorm = "trained",
        interpolate_pos_embed: bool = False,
    ) -> None:
        """Build an encoder with the fixed 2-D sin/cos position embedding.

        Args:
            config: the variant's architecture.
            pooled_norm: default pooled convention, ``"trained"`` (rs-embed) or ``"plain"``
                (TorchGeo's ``forward_features``).
            interpolate_pos_embed: accept square-or-not inputs of other sizes (multiples of
                the patch size) by bicubic interpolation of the position embedding. Off by
                default: the official weights are trained at 224 x 224.
        """
        super().__init__()
        _check_pooled_norm(pooled_norm)
        self.config = config
        self.pooled_norm: str = pooled_norm
        self.interpolate_pos_embed = interpolate_pos_embed
        self.backbone = DOFA(
            img_size=config.img_size,
            patch_size=config.patch_size,
            embed_dim=config.embed_dim,
            depth=config.depth,
            num_heads=config.num_heads,
            num_classes=0,
            global_pool=True,
        )
        with torch.no_grad():
            self.backbone.pos_embed.copy_(sincos_pos_embed_2d(config.embed_dim, config.grid_size))
        self.norm = nn.LayerNorm(config.embed_dim, eps=1e-6)
        #: Where the weights came from (set by :func:`torchgeo_dofa.load_dofa`).
        self.weights_id: str = "random"
        #: Keep the wavelength-generated patch-embedding weights per band set at inference
        #: (eval mode, no gradient needed). They depend only on the wavelengths and the
        #: weights, so a job whose band set repeats generates them once.
        self.cache_patch_weights: bool = True
        #: Opt-in: under CPU bf16 autocast on a CPU without fast bf16 kernels (see
        #: :func:`cpu_has_fast_bf16`), run the encoder in fp32 instead, since there bf16 is
        #: emulated and measured about 7x slower than fp32 (``benchmarks/run.py``). Outputs
        #: are then the fp32 ones. Off by default: bf16 autocast means bf16 compute.
        self.cpu_bf16_fallback: bool = False
        #: Under bf16 autocast at inference (no gradient), run the transformer blocks on a
        #: bf16 copy of their linear layers' weights made once (and remade only when the
        #: weights change) instead of letting autocast cast every weight again in every
        #: forward pass. Outputs are bit-identical to plain autocast; the module's own
        #: parameters stay fp32 (state dicts and training are unaffected); the copy costs 2
        #: bytes a block parameter (170 MB for base, 600 MB for large). The
        #: wavelength-conditioned patch weights are still generated in fp32.
        self.bf16_weights: bool = True
        self._patch_weights: OrderedDict[
            tuple[object, ...], tuple[_ParamRefs, tuple[Tensor, Tensor]]
        ] = OrderedDict()
        self._block_copy: tuple[tuple[object, ...], _ParamRefs, list[dict[str, Tensor]]] | None = (
            None
        )

    @property
    def embed_dim(self) -> int:
        """Embedding width D."""
        return self.config.embed_dim

    @property
    def variant(self) -> str:
        """Variant name (``base`` or ``large``)."""
        return self.config.name

    def check_inputs(self, x: Tensor, wavelengths: Sequence[float] | Tensor) -> Tensor:
        """Validate an input batch and its wavelengths before any compute.

        Args:
            x: input batch (B, C, H, W).
            wavelengths: C wavelengths in micrometres.

        Returns:
            The wavelengths as a 1-D tensor on ``x``'s device, in ``x``'s float dtype.

        Raises:
            ValueError: for a wrong rank, a wrong spatial size or bad wavelengths.
        """
        if x.ndim != 4:
            raise ValueError(
                f"expected input of shape (B, C, H, W), got rank {x.ndim} {tuple(x.shape)}; "
                "add a batch dimension with x.unsqueeze(0)"
            )
        size = self.config.img_size
        h, w = x.shape[-2:]
        if self.interpolate_pos_embed:
            p = self.config.patch_size
            if h % p or w % p:
                raise ValueError(f"input size {h}x{w} must be a multiple of the patch size {p}")
        elif (h, w) != (size, size):
            raise ValueError(
                f"DOFA takes {size}x{size} inputs, got {h}x{w}: resize or tile first "
                "(torchgeo_dofa.transforms.DOFAPreprocess(input_prep='resize'|'tile')), or "
                "build the encoder with interpolate_pos_embed=True for fine-tuning"
            )
        if isinstance(wavelengths, Tensor) and wavelengths.ndim == 2:
            if not bool((wavelengths == wavelengths[:1]).all()):
                raise ValueError(
                    "all images in a batch must share one wavelength vector; group samples "
                    "by band set (torchgeo_dofa.datasets.BandSetBatchSampler)"
                )
            wavelengths = wavelengths[0]
        validate_wavelengths(wavelengths, x.shape[1])
        dtype = x.dtype if x.is_floating_point() else torch.float32
        if isinstance(wavelengths, Tensor):
            return wavelengths.detach().to(device=x.device, dtype=dtype).flatten()
        return torch.tensor([float(v) for v in wavelengths], device=x.device, dtype=dtype)

    def _pos_embed(self, h: int, w: int) -> Tensor:
        pos = self.backbone.pos_embed
        n = self.config.grid_size
        if (h, w) == (n, n):
            return pos
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        patch_pos = patch_pos.reshape(1, n, n, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(h, w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def train(self, mode: bool = True) -> Self:
        """Set training mode; entering it drops the cached patch-embedding weights.

        Args:
            mode: training (True) or evaluation (False).

        Returns:
            The encoder.
        """
        if mode:
            self._patch_weights.clear()
            self._block_copy = None
        return super().train(mode)

    def __getstate__(self) -> dict[str, Any]:
        """The encoder's state for pickling (``torch.save(encoder)``, a spawned process).

        Without the cached patch weights and bf16 block copies: their entries hold weak
        references, which cannot be pickled, and are made again on first use.
        """
        state = super().__getstate__()
        state["_patch_weights"] = OrderedDict()
        state["_block_copy"] = None
        return dict(state)

    def _apply(self, fn: Any, recurse: bool = True) -> Self:
        # .to() / .cuda() / .half() make new parameters: drop weights cached for the old ones
        self._patch_weights.clear()
        self._block_copy = None
        return super()._apply(fn, recurse)

    def _bf16_block_weights(self) -> list[dict[str, Tensor]]:
        """Per block, bf16 copies of the weights autocast would cast to bf16 in every call.

        Those of layers autocast runs in bf16 (linear layers) are copied to bf16 once; the
        LayerNorms' stay the module's fp32 tensors, since autocast runs LayerNorm in fp32.
        Results are therefore those of plain bf16 autocast, bit for bit. The copy is remade
        when any parameter changes (new tensor or in-place edit).
        """
        blocks = self.backbone.blocks
        params = [dict(block.named_parameters()) for block in blocks]
        flat = [p for d in params for p in d.values()]
        key = _parameters_key(flat)
        if (
            self._block_copy is None
            or self._block_copy[0] != key
            or not _still_these(self._block_copy[1], flat)
        ):
            self._block_copy = None  # free the old copy before making the new one
            copies: list[dict[str, Tensor]] = []
            with torch.inference_mode(False), torch.no_grad():
                for block in blocks:
                    copy: dict[str, Tensor] = {}
                    for mod_name, module in block.named_modules():
                        keep = isinstance(module, nn.LayerNorm)
                        for name, p in module.named_parameters(recurse=False):
                            full = f"{mod_name}.{name}" if mod_name else name
                            use_bf16 = not keep and p.is_floating_point()
                            copy[full] = p.detach().to(torch.bfloat16) if use_bf16 else p
                    copies.append(copy)
            self._block_copy = (key, tuple(weakref.ref(p) for p in flat), copies)
        return self._block_copy[2]

    def compile_blocks(self, **kwargs: Any) -> None:
        """Opt-in: compile every transformer block with ``torch.compile`` (in place).

        Not used by default: on a 2-core Sapphire Rapids CPU (AMX, torch 2.14) compiled
        blocks ran DOFA base under bf16 autocast at 0.80x the eager encoder (batch 8), 0.94x
        with inductor's ``options={"freezing": True}``; compiling the whole forward with
        freezing gave 0.98-1.01x in bf16 (batch 8, 32) and 1.16x in fp32 (batch 8), after a
        ~30 s compile (timed interleaved in one process; the README's AVX2 CPU measured
        0.97-1.07x for compiled blocks). GPUs are where it may pay. The bf16 weight copies are
        turned off (swapping parameters would defeat the compiled graphs' guards); the
        compiled blocks see the module's own parameters.

        Args:
            **kwargs: arguments of :func:`torch.compile` (``mode``, ``dynamic`` ...).
        """
        self.bf16_weights = False
        for block in self.backbone.blocks:
            block.compile(**kwargs)

    def uses_fp32_for_bf16(self, x: Tensor) -> bool:
        """Whether this call would run fp32 although CPU autocast asks for bf16.

        Args:
            x: the input batch (only its device matters).

        Returns:
            True when ``cpu_bf16_fallback`` is on, ``x`` is on the CPU, CPU autocast is
            enabled with bfloat16 and :func:`cpu_has_fast_bf16` is False.
        """
        return (
            self.cpu_bf16_fallback
            and x.device.type == "cpu"
            and _autocast_dtype(x) == torch.bfloat16
            and not cpu_has_fast_bf16()
        )

    def patch_embedding_weights(self, waves: Tensor) -> tuple[Tensor, Tensor]:
        """Generate the patch-embedding conv weight and bias for a wavelength vector.

        The same computation as :class:`torchgeo.models.dofa.DOFAEmbedding` (sin/cos
        encoding of ``1000 * waves``, residual MLP, weight-generator transformer, reshape to
        ``(D, C, k, k)``, both scaled by 0.01).

        Args:
            waves: (C,) wavelengths in micrometres.

        Returns:
            (weight (D, C, k, k), bias (D,)).
        """
        pe = self.backbone.patch_embed
        k = pe.kernel_size
        enc = position_embedding(pe.dynamic_embed_dim, waves * 1000)
        weight, bias = pe.weight_generator(pe.fclayer(enc))
        weight = weight.view(waves.shape[0], k, k, pe.embed_dim).permute(3, 0, 1, 2)
        return weight * pe.scaler, bias.view(pe.embed_dim) * pe.scaler

    def _cached_patch_weights(self, waves: Tensor) -> tuple[Tensor, Tensor]:
        """Patch-embedding weights for ``waves``, generated once per band set and weights.

        Generated in the weights' dtype with autocast off (as fp32 as the model is), as
        ordinary tensors (not inference tensors), so the entry can serve later calls in and
        out of ``torch.inference_mode``. The key holds the parameters' version counters and
        storage (:func:`_parameters_key`), and the entry weak references to them, so loading
        or editing the weights invalidates it (not an edit through ``.data``, which no
        version counter sees).
        """
        params = list(self.backbone.patch_embed.parameters())
        dtype = params[0].dtype
        key = (
            tuple(float(v) for v in waves.detach().float().cpu().tolist()),
            str(waves.device),
            dtype,
            _parameters_key(params),
        )
        hit = self._patch_weights.get(key)
        if hit is not None and _still_these(hit[0], params):
            self._patch_weights.move_to_end(key)
            return hit[1]
        with (
            torch.inference_mode(False),
            torch.no_grad(),
            torch.autocast(waves.device.type, enabled=False),
        ):
            fresh = torch.tensor(key[0], device=waves.device, dtype=dtype)
            weight, bias = self.patch_embedding_weights(fresh)
            entry = (weight.contiguous(), bias.contiguous())
        self._patch_weights[key] = (tuple(weakref.ref(p) for p in params), entry)
        while len(self._patch_weights) > PATCH_WEIGHT_CACHE_SIZE:
            self._patch_weights.popitem(last=False)
        return entry

    def embed_patches(self, x: Tensor, waves: Tensor) -> Tensor:
        """Wavelength-conditioned patch embedding: (B, C, H, W) -> (B, h*w, D) tokens.

        Args:
            x: input batch.
            waves: (C,) wavelengths (um) on ``x``'s device.

        Returns:
            The patch tokens, row-major from the top-left patch.
        """
        pe = self.backbone.patch_embed
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in pe.parameters())
        cacheable = self.cache_patch_weights and not self.training and not needs_grad
        kind = x.device.type
        if torch.is_autocast_enabled(kind):
            # the patch embedding in fp32 under autocast (~2 % of the model's FLOPs): in bf16
            # its sum over C x 16 x 16 inputs with generated kernels loses most of the
            # signal for some weights (pooled cosine to fp32 0.30 on the demo scene for
            # TorchGeo's initialisation, 0.9973 for the tests' random checkpoint; 0.99997 /
            # 0.99999 with this step in fp32, the rest of the model in bf16)
            with torch.autocast(kind, enabled=False):
                return self.embed_patches(x.to(self.backbone.cls_token.dtype), waves)
        if not cacheable or any(p.is_inference() for p in pe.parameters()):
            tokens, _ = pe(x, waves)
            return tokens
        weight, bias = self._cached_patch_weights(waves)
        weight, bias = weight.to(x.dtype), bias.to(x.dtype)
        out = F.conv2d(x, weight, bias, stride=pe.kernel_size, padding=1)
        return out.flatten(2).transpose(1, 2)

    def forward_tokens(
        self,
        x: Tensor,
        wavelengths: Sequence[float] | Tensor,
        return_blocks: Sequence[int] = (),
    ) -> tuple[Tensor, list[Tensor]]:
        """Run the encoder and return all tokens after the last block (CLS first).

        Args:
            x: input batch (B, C, H, W).
            wavelengths: C wavelengths (um).
            return_blocks: indices of blocks whose patch tokens are also returned, as
                (B, D, h, w) maps (for segmentation decoders).

        Returns:
            (tokens (B, 1 + h*w, D), intermediate maps in ``return_blocks`` order).

        Note:
            Outside autocast, input of another dtype (float64, float16, integers) is cast to
            the weights' dtype first, so it gives exactly its cast's result.
        """
        weights_dtype = self.backbone.cls_token.dtype
        if x.dtype != weights_dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(weights_dtype)
        waves = self.check_inputs(x, wavelengths)
        if self.uses_fp32_for_bf16(x):
            with torch.autocast("cpu", enabled=False):
                return self._forward_tokens(x.float(), waves.float(), return_blocks)
        if (
            x.device.type == "cpu"
            and _autocast_dtype(x) == torch.bfloat16
            and not cpu_has_fast_bf16()
        ):
            _warn_slow_cpu_bf16()
        return self._forward_tokens(x, waves, return_blocks)

    def _forward_tokens(
        self, x: Tensor, waves: Tensor, return_blocks: Sequence[int]
    ) -> tuple[Tensor, list[Tensor]]:
        bb = self.backbone
        p = self.config.patch_size
        h, w = grid_side(x.shape[-2], p), grid_side(x.shape[-1], p)
        tokens = self.embed_patches(x, waves)
        pos = self._pos_embed(h, w)
        tokens = tokens + pos[:, 1:, :]
        cls = (bb.cls_token + pos[:, :1, :]).expand(tokens.shape[0], -1, -1)
        tokens = torch.cat((cls, tokens), dim=1)
        copies: list[dict[str, Tensor]] | None = None
        if not torch.is_grad_enabled() and _autocast_dtype(x) == torch.bfloat16:
            # inference under bf16 autocast: keep the residual stream in bf16 too (the
            # position embedding would otherwise promote it to fp32 for every block)
            tokens = tokens.to(torch.bfloat16)
            if self.bf16_weights:
                copies = self._bf16_block_weights()
        wanted = {i % len(bb.blocks) for i in return_blocks}
        maps: dict[int, Tensor] = {}
        for i, block in enumerate(bb.blocks):
            if copies is None:
                tokens = block(tokens)
            else:  # autocast stays on: its casts of the bf16 copies are no-ops
                tokens = functional_call(block, copies[i], (tokens,))
            if i in wanted:
                maps[i] = _tokens_to_grid(tokens, h, w)
        return tokens, [maps[i % len(bb.blocks)] for i in return_blocks]

    def pool(self, tokens: Tensor, pooled_norm: str | None = None) -> Tensor:
        """Pool last-block tokens (CLS excluded) and apply the chosen LayerNorm.

        Args:
            tokens: (B, 1 + N, D) tokens after the last block.
            pooled_norm: ``"trained"`` or ``"plain"``; default: the encoder's setting.

        Returns:
            (B, D) pooled embeddings.
        """
        norm = pooled_norm or self.pooled_norm
        _check_pooled_norm(norm)
        mean = tokens[:, 1:, :].mean(dim=1)
        if norm == "plain":
            return F.layer_norm(mean, (mean.shape[-1],), eps=1e-6)
        return self.norm(mean)

    def forward(
        self,
        x: Tensor,
        wavelengths: Sequence[float] | Tensor,
        pooled_norm: PooledNorm | None = None,
    ) -> DOFAOutput:
        """Encode a batch: pooled vectors and patch-token grids from one pass.

        Args:
            x: (B, C, 224, 224) normalised input.
            wavelengths: C wavelengths in micrometres (list, tuple or tensor; a (B, C)
                tensor whose rows are identical is accepted too).
            pooled_norm: override the pooled convention for this call.

        Returns:
            A :class:`DOFAOutput`.
        """
        norm = pooled_norm or self.pooled_norm
        _check_pooled_norm(norm)
        tokens, _ = self.forward_tokens(x, wavelengths)
        p = self.config.patch_size
        h, w = grid_side(x.shape[-2], p), grid_side(x.shape[-1], p)
        return DOFAOutput(
            pooled=self.pool(tokens, norm), grid=_tokens_to_grid(tokens, h, w), pooled_norm=norm
        )


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The autocast dtype in force for ``x``'s device, or None."""
    try:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
    except (RuntimeError, ValueError):  # a device type autocast does not know
        pass
    return None


@functools.cache
def _warn_slow_cpu_bf16() -> None:
    warn(
        "bf16 autocast on a CPU without fast bf16 kernels (no AVX-512/AMX): bf16 is emulated "
        "here and runs several times slower than fp32; use fp32, or set "
        "encoder.cpu_bf16_fallback = True to run fp32 whenever bf16 is asked for"
    )


def _tokens_to_grid(tokens: Tensor, h: int, w: int) -> Tensor:
    patches = tokens[:, 1:, :]
    return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], h, w)


def _check_pooled_norm(name: str) -> None:
    if name not in _POOLED_NORMS:
        raise ValueError(
            f"unknown pooled_norm {name!r}: choose 'trained' (rs-embed's convention, the "
            "checkpoint's final norm) or 'plain' (TorchGeo's forward_features)"
        )


def build_encoder(
    variant: str = "base", pooled_norm: PooledNorm = "trained", interpolate_pos_embed: bool = False
) -> DOFAEncoder:
    """Build a randomly initialised encoder of a variant (no weights loaded).

    Args:
        variant: ``base``/``b`` or ``large``/``l``.
        pooled_norm: default pooled convention.
        interpolate_pos_embed: allow input sizes other than 224 (see :class:`DOFAEncoder`).

    Returns:
        The encoder.
    """
    return DOFAEncoder(VARIANTS[canonical_variant(variant)], pooled_norm, interpolate_pos_embed)


def dofa_base_patch16_224(pooled_norm: PooledNorm = "trained") -> DOFAEncoder:
    """DOFA base (ViT-B/16, D=768), randomly initialised.

    Args:
        pooled_norm: default pooled convention.

    Returns:
        The encoder.
    """
    return build_encoder("base", pooled_norm)


def dofa_large_patch16_224(pooled_norm: PooledNorm = "trained") -> DOFAEncoder:
    """DOFA large (ViT-L/16, D=1024), randomly initialised.

    Args:
        pooled_norm: default pooled convention.

    Returns:
        The encoder.
    """
    return build_encoder("large", pooled_norm)


def grid_side(size: int, patch_size: int = 16) -> int:
    """Tokens per side for an input side (224 -> 14): DOFA's stride-16 conv with padding 1.

    Args:
        size: input side in pixels.
        patch_size: patch size.

    Returns:
        Number of tokens per side.
    """
    return math.floor((size + 2 - patch_size) / patch_size) + 1
