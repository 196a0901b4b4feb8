"""``DOFAEmbedder``: the LightningModule that turns preprocessed chips into embeddings.

The module holds the encoder and the prediction step; data (datasets, samplers, the
preprocessing stack) and outputs (the writers in :mod:`torchgeo_dofa.writers`) stay outside
it, as Lightning intends. It is configurable from YAML through ``LightningCLI``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _warnings, bands
from .model import DOFAEncoder, PooledNorm
from .transforms import ReflectanceWarning, stitch_tiles
from .weights import load_dofa, names_random_weights

__all__ = [
    "OUTPUT_KINDS",
    "DOFAEmbedder",
    "NotNormalisedError",
    "check_normalised",
    "warn_of_datamodule_normalisation",
]

OutputKind = Literal["pooled", "grid", "both"]
OUTPUT_KINDS: tuple[str, ...] = ("pooled", "grid", "both")


class DOFAEmbedder(pl.LightningModule):
    """Embed chips with DOFA through ``Trainer.predict``.

    ``predict_step`` takes a batch from :mod:`torchgeo_dofa.datasets` after the
    :class:`~torchgeo_dofa.transforms.DOFAPreprocess` stack: ``image`` (B, C, 224, 224), or
    (B, N, C, 224, 224) tiles with ``tile_offsets`` and ``tiled_size``; ``wavelengths`` (B, C)
    (always from the batch); optional ``valid``, ``empty``, ``bounds``, ``grid_transform``.
    It returns a dict of tensors: ``pooled`` (B, D), ``grid`` (B, D, h, w) with NaN in cells
    whose 16 x 16 patch held no valid pixel, and the batch's georeferencing keys passed
    through, ready for the writers.
    """

    def __init__(
        self,
        variant: str = "base",
        weights: str | None = "official",
        output: OutputKind = "both",
        input_prep: Literal["resize", "tile"] = "resize",
        pooled_norm: PooledNorm = "trained",
        seed: int | None = None,
    ) -> None:
        """Build the embedder and load the encoder's weights.

        Args:
            variant: ``base``/``b`` or ``large``/``l``.
            weights: ``"official"``, a checkpoint path, or None (random; never chosen
                silently; ``"none"`` is accepted for it, as on the command line).
            output: ``"pooled"``, ``"grid"`` or ``"both"``.
            input_prep: how the chips were prepared, ``"resize"`` or ``"tile"`` (recorded in
                outputs; tiled batches are recognised by their shape).
            pooled_norm: pooled convention, ``"trained"`` (rs-embed) or ``"plain"`` (TorchGeo).
            seed: with ``weights=None``, the seed of the random initialisation (the same
                seed gives the same model; the global RNG is left untouched); recorded in
                the outputs' ``weights`` tag as ``random (seed N)``.

        Raises:
            ValueError: for an unknown variant, output kind or input preparation, or a seed
                given with weights.
        """
        super().__init__()
        if output not in OUTPUT_KINDS:
            raise ValueError(f"unknown output {output!r}: choose one of {list(OUTPUT_KINDS)}")
        if input_prep not in ("resize", "tile"):
            raise ValueError(f"unknown input_prep {input_prep!r}: choose 'resize' or 'tile'")
        if names_random_weights(weights):
            weights = None  # the CLI's spelling, also from a YAML config
        if seed is not None and weights is not None:
            raise ValueError("seed= applies to random weights only: pass weights=None")
        self.save_hyperparameters()
        weights_arg: str | os.PathLike[str] | None = weights
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.encoder: DOFAEncoder = load_dofa(
                variant, weights=weights_arg, pooled_norm=pooled_norm
            )
        if seed is not None:
            self.encoder.weights_id = f"random (seed {seed})"
        self.output = output
        self.input_prep = input_prep
        #: Preprocessing applied to each batch on the model's device, at the start of
        #: :meth:`predict_step` (after Lightning's transfer), e.g. a batched
        #: :class:`~torchgeo_dofa.transforms.DOFAPreprocess` while the DataLoader serves raw
        #: chips: on a GPU the normalisation and resizing then run there instead of in the
        #: loader's CPU workers. None (default): the dataset's transforms did it.
        self.preprocess: nn.Module | None = None

    def setup(self, stage: str) -> None:
        """Warn where a TorchGeo data module normalises batches otherwise than DOFA.

        See :func:`warn_of_datamodule_normalisation`.

        Args:
            stage: Lightning's stage (``predict``).
        """
        warn_of_datamodule_normalisation(self, stage)

    def on_predict_start(self) -> None:
        """Refuse a job that would normalise its chips twice, before the first batch.

        Raises:
            ValueError: when :attr:`preprocess` normalises (holds a
                :class:`~torchgeo_dofa.transforms.NormalizeReflectance`) and so do the
                transforms (a module) of the data module's predict dataset
                (``preprocess=True``, the data module's default, or
                ``transforms=DOFAPreprocess(...)``) or of a prediction loader's dataset.
        """
        if not _normalises(self.preprocess):
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        datasets = [getattr(datamodule, "predict_dataset", None)]
        loaders = self.trainer.predict_dataloaders  # also given as dataloaders=[...]
        for loader in loaders if isinstance(loaders, list | tuple) else [loaders]:
            dataset = getattr(loader, "dataset", None)
            datasets += [dataset, *getattr(dataset, "datasets", [])]  # and a ConcatDataset's
        if any(_normalises(getattr(d, "transforms", None)) for d in datasets):
            raise ValueError(
                "DOFAEmbedder.preprocess and the data module's dataset transforms both "
                "normalise with DOFA's statistics: the chips would be normalised twice. For "
                "preprocessing on the device, give the data module preprocess=False (or move "
                "its dataset's transforms to DOFAEmbedder.preprocess); else set "
                "DOFAEmbedder.preprocess = None"
            )

    @property
    def metadata(self) -> dict[str, str]:
        """What every output records about the model that produced it."""
        return {
            "variant": self.encoder.variant,
            "weights": self.encoder.weights_id,
            "pooled_norm": self.encoder.pooled_norm,
            "input_prep": self.input_prep,
            "embed_dim": str(self.encoder.embed_dim),
        }

    def forward(self, image: Tensor, wavelengths: Tensor) -> tuple[Tensor, Tensor]:
        """Encode a batch of 224 x 224 images, or of tiles (B, N, C, 224, 224).

        Args:
            image: normalised input.
            wavelengths: (C,) or (B, C) wavelengths in micrometres.

        Returns:
            (pooled (B, D), grid (B, D, h, w) or, for tiles, (B, N, D, h, w)).
        """
        if image.ndim == 5:
            b, n = image.shape[:2]
            out = self.encoder(image.flatten(0, 1), wavelengths)
            return out.pooled.unflatten(0, (b, n)), out.grid.unflatten(0, (b, n))
        out = self.encoder(image, wavelengths)
        return out.pooled, out.grid

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Embed one batch and keep what the writers need to place the results.

        Args:
            batch: a collated batch on the model's device: preprocessed by the dataset's
                transforms, or raw when :attr:`preprocess` is set (it runs here first, on a
                copy of the dict, and sets ``valid`` / ``empty`` from the raw values).
            batch_idx: index of the batch.

        Returns:
            ``pooled`` and / or ``grid`` as :attr:`output` asks (float32, on CPU; only
            those are checked and copied from the device) and the passed-through metadata
            keys.
            Chips flagged ``empty`` (no valid pixel) are not sent through the encoder: their
            ``pooled`` and ``grid`` are NaN.

        Raises:
            NotNormalisedError: when the image is an integer tensor or holds values beyond
                :data:`NORMALISED_LIMIT` (raw reflectance: the data module was given neither
                ``preprocess=True`` nor ``DOFAPreprocess`` transforms).
            ValueError: for a (B, T, C, H, W) batch that is not tiles (no ``tile_offsets``):
                a time series (``time_series=True``), where DOFA embeds one acquisition per
                chip; for tiles of inputs of different sizes (``tiled_size``) in one batch.
            NonFiniteOutputError: when the encoder gives NaN / infinity for the batch
                (:func:`check_finite_output`).
        """
        if batch["image"].ndim == 5 and "tile_offsets" not in batch:
            raise ValueError(
                f"got a {tuple(batch['image'].shape)} batch without tile_offsets: a time "
                "series (time_series=True) stacks the dates of each chip, but DOFA embeds one "
                "acquisition per chip; embed each date as its own job (the data module's "
                "time=(start, stop), CLI --datetime A/B)"
            )
        if self.preprocess is not None:  # on a copy: the caller's dict keeps its raw image
            batch = self.preprocess(dict(batch))
        return self._predict(batch, batch_idx)

    def _predict(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """:meth:`predict_step` on a preprocessed batch."""
        empty = batch.get("empty")
        if empty is not None and bool(empty.any()):
            return self._predict_non_empty(batch, ~empty.to(torch.bool), batch_idx)
        image, wavelengths = batch["image"], batch["wavelengths"]
        check_normalised(image)
        pooled, grid = self(image, wavelengths)
        # only what the writers take is checked and copied to the host (a grid is 0.6-0.8
        # MB a chip in float32: per chip, the largest device-to-host copy of a pooled job)
        kept = {"pooled": (pooled,), "grid": (grid,)}.get(self.output, (pooled, grid))
        for values in kept:
            check_finite_output(values, type(self).__name__)
        patch = self.encoder.config.patch_size
        valid = batch.get("valid")
        if image.ndim == 5:
            sizes = batch["tiled_size"]
            if len({tuple(int(v) for v in size) for size in sizes}) > 1:
                raise ValueError(
                    f"{type(self).__name__}: a batch of tiled inputs of different sizes "
                    f"({', '.join(f'{int(h)}x{int(w)}' for h, w in sizes)} px), whose grids "
                    "cannot be stacked: batch the inputs of one size together (batch_size=1 "
                    "where sizes differ)"
                )
            grids, pools = [], []
            for i in range(image.shape[0]):
                h, w = (int(v) for v in sizes[i])
                g = stitch_tiles(grid[i].float(), batch["tile_offsets"][i], h, w, patch)
                tokens = torch.cat([g.new_zeros(1, g.shape[0]), g.flatten(1).T])[None]
                grids.append(g)
                pools.append(self.encoder.pool(tokens.to(self.encoder.norm.weight.dtype))[0])
                if valid is not None:
                    cells = _cell_valid(valid[i], patch)  # (N, 14, 14)
                    mask = stitch_tiles(
                        cells[:, None].float(), batch["tile_offsets"][i], h, w, patch
                    )[0]
                    grids[-1] = torch.where(mask > 0, g, torch.nan)
            grid, pooled = torch.stack(grids), torch.stack(pools)
        elif valid is not None and self.output != "pooled":
            cells = _cell_valid(valid, patch)[:, None]
            grid = torch.where(cells, grid, torch.nan)
        out: dict[str, Tensor] = {}
        if self.output != "grid":
            out["pooled"] = pooled.float().cpu()
        if self.output != "pooled":
            out["grid"] = grid.float().cpu()
        for key in _PASSED_ON:
            if key in batch:
                out[key] = batch[key].cpu()
        return out

    def _predict_non_empty(
        self, batch: dict[str, Tensor], keep: Tensor, batch_idx: int
    ) -> dict[str, Tensor]:
        """:meth:`predict_step` on the chips in ``keep`` only; NaN outputs for the others."""
        n = int(keep.numel())
        sub = {
            k: v[keep] if isinstance(v, Tensor) and v.ndim and v.shape[0] == n else v
            for k, v in batch.items()
        }
        shapes: dict[str, tuple[int, ...]]
        if bool(keep.any()):
            part = self._predict(sub, batch_idx)
            shapes = {k: tuple(part[k].shape[1:]) for k in ("pooled", "grid") if k in part}
        else:
            image, patch, d = batch["image"], self.encoder.config.patch_size, self.encoder.embed_dim
            if image.ndim == 5:
                h, w = (int(v) for v in batch["tiled_size"][0])
            else:
                h, w = int(image.shape[-2]), int(image.shape[-1])
            every = {"pooled": (d,), "grid": (d, -(-h // patch), -(-w // patch))}
            shapes = {k: v for k, v in every.items() if self.output in (k, "both")}
            part = {}
        out: dict[str, Tensor] = {}
        for key, shape in shapes.items():
            full = torch.full((n, *shape), torch.nan)
            if key in part:
                full[keep.cpu()] = part[key]
            out[key] = full
        for name in _PASSED_ON:
            if name in batch:
                out[name] = batch[name].cpu()
        return out


#: Batch keys a prediction passes on to the writers (placing chips, flagging empty ones).
_PASSED_ON = ("bounds", "transform", "grid_transform", "empty", "valid_fraction")


def _cell_valid(valid: Tensor, patch: int) -> Tensor:
    """(…, H, W) pixel validity -> (…, H/p, W/p): a cell is valid if any of its pixels is."""
    v = valid.float()
    shape = v.shape
    pooled = F.max_pool2d(v.reshape(-1, 1, *shape[-2:]), patch, ceil_mode=True)
    return (pooled.reshape(*shape[:-2], *pooled.shape[-2:]) > 0).to(torch.bool)


def _normalises(transforms: Any) -> bool:
    """Whether a transform module applies DOFA's normalisation (anywhere inside it)."""
    from .transforms import NormalizeReflectance

    return isinstance(transforms, nn.Module) and any(
        isinstance(m, NormalizeReflectance) for m in transforms.modules()
    )


#: The data splits whose batch augmentation a Lightning stage runs: TorchGeo's
#: ``BaseDataModule.on_after_batch_transfer`` applies ``{split}_aug``, else ``aug``.
STAGE_SPLITS: dict[str, tuple[str, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("predict",),
}


def foreign_normalisation(aug: Any) -> str | None:
    """What a batch augmentation's kornia ``Normalize`` steps do, or None when it has none.

    TorchGeo's data modules normalise each batch in their ``aug`` (a kornia
    ``AugmentationSequential`` holding ``K.Normalize(mean, std)``; ``kornia.enhance.Normalize``
    likewise): with their dataset's own
    statistics of the raw values (EuroSAT, BigEarthNet, ...), or dividing by 255 where they
    have none. Neither is DOFA's normalisation, and the first gives values of about +-3 as
    DOFA's does, so no check of the batch can tell them apart. An identity ``Normalize``
    (mean 0, std 1) is left out.

    Args:
        aug: a data module's batch augmentation (any callable).

    Returns:
        ``"divides every batch by 255"``, ``"subtracts mean [..] and divides by std [..]"``
        (one phrase per ``Normalize``, joined by ``"; then "``), or None.
    """
    if not isinstance(aug, nn.Module):
        return None
    from kornia.augmentation import Normalize
    from kornia.enhance import Normalize as EnhanceNormalize

    found = []
    for module in aug.modules():
        if isinstance(module, Normalize):
            settings = (module.flags["mean"], module.flags["std"])
        elif isinstance(module, EnhanceNormalize):
            settings = (module.mean, module.std)
        else:
            continue
        mean = torch.as_tensor(settings[0], dtype=torch.float64).flatten()
        std = torch.as_tensor(settings[1], dtype=torch.float64).flatten()
        if bool((mean == 0).all()):
            if bool((std == 1).all()):
                continue
            if bool((std == std[0]).all()):
                found.append(f"divides every batch by {float(std[0]):g}")
                continue
        found.append(
            f"subtracts mean [{_values(mean.tolist(), 4)}] and divides by std "
            f"[{_values(std.tolist(), 4)}]"
        )
    return "; then ".join(found) or None


def _values(values: Sequence[float], limit: int = 8) -> str:
    """``values`` for a message: ``4, 5`` or, beyond ``limit``, the first ones and the count."""
    shown = ", ".join(str(v) if isinstance(v, int) else f"{v:g}" for v in values[:limit])
    return shown if len(values) <= limit else f"{shown}, ... ({len(values)} values)"


def warn_of_datamodule_normalisation(module: pl.LightningModule, stage: str) -> None:
    """Warn where the trainer's TorchGeo data module normalises batches otherwise than DOFA.

    Called from the models' ``setup`` (:class:`DOFAEmbedder`, the tasks of
    :mod:`torchgeo_dofa.tasks`), once the trainer holds the data module and before any
    batch: TorchGeo's :class:`~torchgeo.datamodules.EuroSATDataModule` and its kin normalise
    every batch after the transfer with statistics of their own (see
    :func:`foreign_normalisation`), so DOFA's pretrained encoder would see inputs it was
    never trained on. A data module that is not TorchGeo's, or whose ``aug`` holds no
    kornia ``Normalize`` (``DOFAPredictDataModule``, ``SpectralDataModule``,
    :class:`~torchgeo_dofa.datamodules.DOFAEuroSATDataModule`, ``aug`` set to
    ``DOFAPreprocess(...)`` or to ``lambda batch: batch``), is left alone.

    Args:
        module: the model being set up.
        stage: Lightning's stage (``fit``, ``validate``, ``test`` or ``predict``).

    Warns:
        ReflectanceWarning: once per augmentation, naming the data module, the split, what
            it does and the fix.
    """
    from torchgeo.datamodules.geo import BaseDataModule

    trainer = module._trainer
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    if not isinstance(datamodule, BaseDataModule) or module.global_rank != 0:
        return  # once for a DDP job: every process sets up the same data module
    seen: set[int] = set()
    for split in STAGE_SPLITS.get(stage, ()):
        name = f"{split}_aug"
        aug = getattr(datamodule, name, None)
        if aug is None:
            name, aug = "aug", getattr(datamodule, "aug", None)
        if id(aug) in seen or (does := foreign_normalisation(aug)) is None:
            continue
        seen.add(id(aug))
        kind = type(datamodule).__name__
        _warnings.warn(
            f"{kind}'s batch augmentation ({name}) {does}: that is not DOFA's normalisation, "
            f"so {type(module).__name__} sees inputs DOFA's encoder was never trained on "
            "(DOFA takes reflectance / 10000 x 255 normalised with DOFA's per-band "
            "statistics). Give the data module DOFA's preprocessing of raw reflectance, "
            "on the device, after building it: datamodule.aug = DOFAPreprocess(bands) "
            "(torchgeo_dofa.transforms; for EuroSAT, torchgeo_dofa.datamodules."
            "DOFAEuroSATDataModule does this), or, where the samples are already "
            "DOFA-normalised, datamodule.aug = lambda batch: batch",
            ReflectanceWarning,
        )


def batch_kind(batch: dict[str, Any]) -> str:
    """``"tile"`` for a tiled batch, else ``"resize"``."""
    return "tile" if batch["image"].ndim == 5 else "resize"


#: Largest magnitude a normalised input may hold (:data:`torchgeo_dofa.bands.NORMALISED_LIMIT`,
#: where given statistics are checked against it too).
NORMALISED_LIMIT = bands.NORMALISED_LIMIT

#: Below this, every value of a batch is too close to 0 for DOFA-normalised reflectance, which
#: is (x - mean) / std per band (DOFA's statistics on the 0..255 scale): a batch of real
#: chips spans at least one standard deviation (+-1). TorchGeo's data modules divide by 255
#: in their default ``aug`` (mean 0, std 255), which brings +-5 to +-0.02.
SCALED_AGAIN_LIMIT = 0.1


class NotNormalisedError(ValueError):
    """A batch reached the encoder without DOFA's normalisation (e.g. raw reflectance)."""


class NonFiniteOutputError(ValueError):
    """A model gave NaN or infinite values for a batch it was given finite input for."""


def check_finite_output(values: Tensor, model: str) -> None:
    """Refuse a prediction holding NaN or infinity before a writer can store it.

    Finite, normalised input (:func:`check_normalised`) through finite weights (checked at
    load: :func:`torchgeo_dofa.weights.load_state_dict_into`, a task's ``load_state_dict``)
    gives finite outputs, unless the arithmetic overflowed (fp16, ``16-mixed``: its largest
    value is 65504) or the module was changed after loading. Written, such outputs were
    indistinguishable from no-data (NaN cells, an empty class map) or read as class 0 (the
    ``argmax`` of NaN probabilities).

    Args:
        values: the batch's outputs, (B, ...), before no-data is masked.
        model: the model's name, for the message.

    Raises:
        NonFiniteOutputError: naming how many chips of the batch hold NaN / infinity, and
            the fixes.
    """
    # a finite sum means every value is finite (NaN and infinity propagate): 0.4 ms for a
    # (32, 768, 14, 14) grid summed in float32 against 10 ms in float64; a sum that
    # overflowed from finite values is told apart by the exact count below
    if values.numel() == 0 or math.isfinite(float(values.detach().sum(dtype=torch.float32))):
        return
    chips = values.detach().reshape(values.shape[0] if values.ndim else 1, -1)  # (B,) too
    bad = int((~torch.isfinite(chips)).any(dim=1).sum())
    if not bad:
        return
    raise NonFiniteOutputError(
        f"{model} gave NaN or infinite values for {bad} of the {chips.shape[0]} chip(s) of a "
        "batch whose input is finite: the arithmetic overflowed (fp16: run in bf16-mixed or "
        "32-true precision) or the model's weights were changed to non-finite values after "
        "they were loaded; nothing of that batch was written"
    )


_EMBEDDER_FIX = (
    "give the data module preprocess=True or transforms=DOFAPreprocess(...), or set "
    "DOFAEmbedder.preprocess"
)


def check_normalised(image: Tensor, fix: str = _EMBEDDER_FIX, scaled_again: bool = False) -> bool:
    """Refuse a batch that was not normalised (raw reflectance would embed as noise).

    Args:
        image: the batch's image.
        fix: how to normalise, for the message.
        scaled_again: also warn for a batch scaled again after normalising (the tasks: a
            TorchGeo data module of the user's own divides by 255). Not for the embed job,
            whose data module normalises once: there one chip of a uniform surface near
            DOFA's means (a bright one: the means are 0.45-0.5 reflectance) looks the same.

    Raises:
        NotNormalisedError: naming the dtype or the largest value (above
            :data:`NORMALISED_LIMIT`: raw reflectance), and the fix; or the count of NaN /
            infinite values (one would make the chip's every output NaN, and a training
            step's weights).

    Returns:
        Whether it warned (the tasks warn once, not once per batch).

    Warns:
        ReflectanceWarning: with ``scaled_again``, for a batch whose values all lie within
            +-:data:`SCALED_AGAIN_LIMIT` (not all 0): scaled again after normalising.
    """
    if not image.is_floating_point():
        raise NotNormalisedError(
            f"the batch's image is {image.dtype}, not normalised: DOFA takes reflectance "
            f"normalised with DOFA's statistics; {fix}"
        )
    # one reduction (one device sync): NaN propagates through amax, infinity exceeds the limit
    peak = float(image.detach().abs().amax()) if image.numel() else 0.0
    if not math.isfinite(peak):
        bad = int((~torch.isfinite(image.detach())).sum())
        raise NotNormalisedError(
            f"the batch's image holds {bad} NaN or infinite value(s): no-data pixels must be "
            "filled before the model (DOFAPreprocess / CheckReflectance fill them and mark "
            f"them in 'valid'); {fix}"
        )
    if peak > NORMALISED_LIMIT:
        raise NotNormalisedError(
            f"the batch's image holds values up to {peak:g}, raw reflectance rather than "
            f"input normalised with DOFA's statistics: {fix}"
        )
    if not (scaled_again and 0 < peak < SCALED_AGAIN_LIMIT):
        return False
    # a warning, not an error: one chip of a uniform surface could be this flat
    _warnings.warn(
        f"the batch's image holds values within +-{peak:.3g} only, where reflectance "
        "normalised with DOFA's statistics spreads over about +-1 to +-5 (a band's mean "
        "+- its standard deviation is +-1): was it scaled again after normalising? A "
        "TorchGeo GeoDataModule's default aug divides by 255: give the data module an aug "
        "that keeps the batch (self.aug = lambda batch: batch in its __init__, after "
        "super().__init__(), as torchgeo_dofa's data modules do)",
        ReflectanceWarning,
    )
    return True
