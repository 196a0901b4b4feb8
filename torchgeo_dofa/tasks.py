"""Fine-tuning DOFA on your own labels: Lightning tasks in TorchGeo's style.

Two tasks, both :class:`torchgeo.tasks.BaseTask` subclasses (``save_hyperparameters``,
train/val/test :class:`~torchmetrics.MetricCollection`, ``configure_optimizers``), configurable
from a LightningCLI YAML file:

* :class:`DOFAClassificationTask`: a head on the pooled embedding, multiclass or multilabel.
* :class:`DOFASegmentationTask`: a compact UPerNet (:class:`UPerNetDecoder`) on the patch maps
  of several encoder blocks, logits at input resolution.

Both follow the paper's GEO-Bench protocol by default (``mode="linear-probe"``: frozen encoder;
for segmentation a frozen encoder with a trainable decoder) and offer ``mode="full"``
fine-tuning with optional layer-wise learning-rate decay (``layer_decay``).

Wavelengths: a batch is a dict with ``image`` (B, C, H, W), ``label`` (classification) or
``mask`` (segmentation) and, usually, ``wavelengths`` ((B, C) as collated, or (C,)). Batches
without ``wavelengths`` (TorchGeo's own datasets never add them) use, in order: the task's
``wavelengths`` or ``bands`` hyperparameter, then the datamodule's ``wavelengths`` or ``bands``
attribute, its ``bands`` dataset argument, or its datasets' ``bands``. So one task trains on 4,
9 or 13 bands alike. A batch whose ``wavelengths`` contradict the task's ``bands`` /
``wavelengths`` is refused (``ValueError``), as are batches without the task's target, labels
of the other ``task`` kind and class indices outside ``0 .. num_classes - 1`` (other than
``ignore_index``), each naming the fix. Inputs other than 224 x 224 need
``interpolate_pos_embed=True``.

Checkpoints hold every weight, so :meth:`~DOFAClassificationTask.load_from_checkpoint` rebuilds
the encoder without its original weights (``weights=None`` unless you pass one) and loads the
stored state: reloading never downloads anything.
"""

from __future__ import annotations

import math
import os
import re
from abc import abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from pathlib import Path
from typing import IO, Any, Literal, Self

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor, nn
from torch.optim import AdamW
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torchgeo.tasks import BaseTask
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassJaccardIndex,
    MultilabelAccuracy,
    MultilabelAveragePrecision,
    MultilabelF1Score,
)

from . import _warnings
from .bands import (
    WAVELENGTH_TOLERANCE,
    BandError,
    canonical_band,
    infer_wavelengths,
    refuse_one_string,
    resolve_wavelengths,
)
from .embedder import (
    _values,
    check_finite_output,
    check_normalised,
    warn_of_datamodule_normalisation,
)
from .model import DOFAEncoder, canonical_variant
from .weights import (
    STATE_DIGEST_KEY,
    CheckpointError,
    check_finite_optimizer_states,
    check_finite_state,
    check_tensor_kinds,
    held_as,
    load_dofa,
    names_random_weights,
    state_dict_digest,
    unfilled_encoder,
    verify_checkpoint_file,
)

__all__ = [
    "DEFAULT_BLOCK_INDICES",
    "EXTRA_WAVELENGTHS",
    "MODES",
    "TRAINED_ON_LABELS_KEY",
    "TRAINED_WAVELENGTHS_KEY",
    "DOFAClassificationTask",
    "DOFASegmentationTask",
    "DecoderNorm",
    "Mode",
    "NoLabelledPixelError",
    "PixelMeanLoss",
    "UPerNetDecoder",
    "layer_id",
    "restoring_from",
    "wavelengths_for_bands",
]

Mode = Literal["linear-probe", "full"]

#: Valid values of ``mode``: ``linear-probe`` (frozen encoder) or ``full`` fine-tuning.
MODES: tuple[str, ...] = ("linear-probe", "full")

#: Encoder blocks whose patch maps feed the segmentation decoder, per variant (0-based; the
#: ViT-UPerNet recipe's choice: blocks 4, 6, 8, 12 of 12 and 8, 12, 16, 24 of 24).
DEFAULT_BLOCK_INDICES: dict[str, tuple[int, ...]] = {
    "base": (3, 5, 7, 11),
    "large": (7, 11, 15, 23),
}

#: Sentinel-2 bands missing from :data:`torchgeo_dofa.bands.SENTINEL2_BANDS` (they have no
#: DOFA statistics) but present in datasets such as EuroSAT: B10 (cirrus), 1.375 um.
EXTRA_WAVELENGTHS: dict[str, float] = {"B10": 1.375}

_ENCODER = "encoder."
_EMBED_PREFIXES = (
    "encoder.backbone.patch_embed.",
    "encoder.backbone.cls_token",
    "encoder.backbone.pos_embed",
)
_BLOCK_PREFIX = "encoder.backbone.blocks."

#: How to normalise a task's batches (for :func:`~torchgeo_dofa.embedder.check_normalised`).
_NORMALISE_FIX = (
    "normalise the samples with DOFA's statistics in the dataset's or data module's "
    "transforms (torchgeo_dofa.transforms.NormalizeReflectance, or DOFAPreprocess for "
    "classification chips); a TorchGeo data module's own normalisation is not DOFA's"
)

#: Class counts beyond this are not suggested as a fix (a nodata 65535 is no class).
_MAX_CLASSES = 2**16

#: What NaN becomes when a float mask is cast to int64 (as TorchGeo's mask datasets do).
_NAN_AS_INT64 = -(2**63)

#: Target value of pixels left out of the segmentation loss and metrics when ``ignore_index``
#: is None: ``valid`` False pixels get it (torch's own default; never a class index >= 0).
_IGNORE_INDEX = -100

#: Whether the :meth:`_DOFATask.load_from_checkpoint` in progress loads strictly.
_STRICT_LOAD: ContextVar[bool] = ContextVar("_STRICT_LOAD", default=True)
#: The file the :meth:`_DOFATask.load_from_checkpoint` in progress reads, for its errors.
_LOADING_FILE: ContextVar[str | None] = ContextVar("_LOADING_FILE", default=None)
#: The checkpoint whose state dict fills the task being built (``load_from_checkpoint``, or
#: LightningCLI's ``--ckpt_path``): the encoder is then built unfilled
#: (:func:`~torchgeo_dofa.weights.unfilled_encoder`) instead of from its ``weights``, which
#: the checkpoint replaces (a fine-tuning run's original file need not exist where it loads).
_RESTORING: ContextVar[str | None] = ContextVar("_RESTORING", default=None)

#: Seed of the random encoder tensors a checkpoint without them gets where the task's
#: ``weights`` are None (:meth:`_DOFATask._fill_unfilled_encoder`): one seed, so every DDP
#: rank and every rerun draws the same encoder (as ``DOFAEmbedder(seed=...)`` does).
_RANDOM_FILL_SEED = 0

#: Checkpoint entry listing the wavelength sets (um; one list per set, in band order) of the
#: batches a task was trained on, so a prediction on other bands is noticed
#: (:meth:`_DOFATask.on_predict_batch_start`). Checkpoints without it load unchecked.
TRAINED_WAVELENGTHS_KEY = "torchgeo_dofa_trained_wavelengths"

#: Checkpoint entry: whether a training epoch of the task scored a labelled target, so a
#: resumed fit is not taken for a first epoch (:meth:`_DOFATask._no_labelled_pixel`).
TRAINED_ON_LABELS_KEY = "torchgeo_dofa_trained_on_labels"

#: Distinct wavelength sets recorded per task at most; beyond it the record is dropped (a
#: dataset whose every chip has its own bands: nothing to compare predictions with).
_MAX_TRAINED_SETS = 64

#: Words for the metric prefixes in messages.
_SPLIT_NAMES = {"train": "training", "val": "validation", "test": "test"}


def _plain_value(value: Any) -> Any:
    """``value`` as plain Python.

    A path becomes a ``str``, a NumPy / torch number or array a number or (nested) list;
    lists, tuples and dicts are converted element by element.
    """
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Tensor | np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, list | tuple):
        return type(value)(_plain_value(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain_value(v) for k, v in value.items()}
    return value


def _plain_hyperparameters(module: Any) -> None:
    """Make a task's saved hyperparameters plain Python values, in place.

    A checkpoint's hyperparameters are read by ``torch.load(weights_only=True)`` (Lightning's
    ``load_from_checkpoint`` and LightningCLI's ``--ckpt_path``, torch >= 2.6), which refuses
    a ``pathlib.Path`` or a NumPy value: a task built with ``weights=Path(...)`` or NumPy
    ``wavelengths`` saved checkpoints that no loader could read ("Weights only load failed").
    """
    for hparams in (module.hparams, getattr(module, "_hparams_initial", None)):
        if hparams is None:
            continue
        for key, value in list(hparams.items()):
            hparams[key] = _plain_value(value)


@contextmanager
def restoring_from(checkpoint: str | os.PathLike[str]) -> Iterator[None]:
    """Build the tasks made inside for ``checkpoint``'s state dict to fill them.

    A task made inside builds its encoder without reading its ``weights`` (``"official"``
    downloaded or read from the cache, a file that may not exist on this machine) and without
    the random initialisation: the checkpoint's load fills every tensor. The task's
    hyperparameters keep their values. Used by :meth:`_DOFATask.load_from_checkpoint` and by
    the ``torchgeo-dofa`` command for ``--ckpt_path``. Where no state dict holding the whole
    encoder is loaded into the task (a checkpoint without it, loaded with Lightning's
    ``strict_loading = False``), the task's first forward pass fills the encoder from its
    ``weights`` as it would have been built (calling ``task.encoder`` directly before that
    uses the unfilled one).

    Args:
        checkpoint: the checkpoint file (its name becomes the encoder's ``weights_id``; ""
            for a file object).
    """
    token = _RESTORING.set(os.fspath(checkpoint))
    try:
        yield
    finally:
        _RESTORING.reset(token)


def _clipped(text: str, limit: int = 300) -> str:
    """``text`` cut to ``limit`` characters (a list of 172 key names is not one line's worth)."""
    return text if len(text) <= limit else text[: limit - 5] + " ...."


def _batch_of_one(norm: str, fix: str) -> str:
    """The message for a training batch of one chip through a BatchNorm that needs two."""
    return (
        f"a training batch of 1 chip: {norm} needs at least 2 chips per training batch "
        "(with 1, torch fails with 'Expected more than 1 value per channel'): use "
        "batch_size >= 2 and drop_last=True in the DataLoader (a last batch of 1 comes from "
        f"k * batch_size + 1 training chips), or {fix}"
    )


def _missing_target(task: str, key: str, batch: Mapping[str, Any], other: str, fix: str) -> str:
    """The message for a batch without the task's target ``key`` (``label`` or ``mask``)."""
    keys = ", ".join(sorted(str(k) for k in batch)) or "no keys"
    if other == "mask" and "mask" in batch:
        fix = "segmentation data needs DOFASegmentationTask"
    elif other == "label" and "label" in batch:
        fix = "classification data needs DOFAClassificationTask"
    return f"{task} needs a '{key}' per sample; the batch has {keys}: {fix}"


def _tensor(values: Any) -> Tensor:
    """A batch entry as a tensor: tensors, arrays, nested lists, or a list of per-chip tensors."""
    if isinstance(values, (list, tuple)) and values and all(isinstance(v, Tensor) for v in values):
        return torch.stack(list(values))
    return torch.as_tensor(values)


def _class_indices(values: Tensor, what: str, fix: str, keep: Tensor | None = None) -> Tensor:
    """``values`` as int64 class indices, refusing floating values that are not whole numbers.

    A cast alone truncates: a soft label 0.7 would train as 0, a mask resampled bilinearly
    (class 1.5 between classes 1 and 2) as class 1, and NaN would become an arbitrary integer.

    Args:
        values: labels or mask, any dtype.
        what: how the message names them, with the verb (``"labels hold"``, ``"mask holds"``).
        fix: the message's advice.
        keep: where ``values`` must be whole numbers (True); elsewhere (no-data pixels about
            to be ignored) any value, NaN included, is accepted and becomes 0.

    Raises:
        ValueError: naming the values that are not whole numbers (NaN, infinities, fractions).
    """
    if not values.is_floating_point():
        return values.long()
    checked = values if keep is None else values[keep]
    # beyond 2**62 a cast to int64 overflows (1e20 became -9.2e18)
    wrong = ~torch.isfinite(checked) | (checked != checked.round()) | (checked.abs() > 2**62)
    if bool(wrong.any()):
        nan = checked.isnan()
        listed = checked[wrong & ~nan].unique().tolist()  # unique() keeps every NaN apart
        bad = _values(listed + ([float("nan")] if bool(nan.any()) else []))
        raise ValueError(f"the batch's {what} {bad}, not whole numbers in int64's range: {fix}")
    if keep is not None:
        values = values.masked_fill(~keep, 0)
    return values.long()


class NoLabelledPixelError(ValueError):
    """A task's first training epoch scored nothing: it would learn nothing.

    Segmentation: no labelled pixel; classification: no chip with data.
    """


class NoTrainingBatchError(ValueError):
    """A fit ended without a training step: its training loader gave no batch."""


def _same_bands(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two wavelength sets hold the same bands, in any order (``WAVELENGTH_TOLERANCE``).

    The order does not matter to DOFA: each channel's patch-embedding weights are generated
    from its own wavelength and the channels' projections are summed, so reordering the
    channels with their wavelengths gives the same output (to float rounding).
    """
    return len(a) == len(b) and all(
        abs(x - y) <= WAVELENGTH_TOLERANCE for x, y in zip(sorted(a), sorted(b))
    )


def wavelengths_for_bands(bands: Sequence[str]) -> list[float]:
    """Centre wavelengths (um) for Sentinel-2 band names, including B10 (1.375 um).

    Like :func:`torchgeo_dofa.bands.infer_wavelengths` (``B4`` / ``B04`` spellings, any order),
    plus :data:`EXTRA_WAVELENGTHS`, so all 13 EuroSAT bands resolve.

    Args:
        bands: band names in channel order.

    Returns:
        One wavelength per band.

    Raises:
        BandError: for a name that is not a Sentinel-2 band.
    """
    out: list[float] = []
    for name in bands:
        canon = canonical_band(name)
        if canon in EXTRA_WAVELENGTHS:
            out.append(EXTRA_WAVELENGTHS[canon])
        else:
            out.extend(infer_wavelengths([name]))
    return out


def layer_id(name: str, depth: int) -> int:
    """Layer index of a task parameter for layer-wise learning-rate decay (BEiT / MAE rule).

    Patch embedding, class token and position embedding are layer 0, encoder block ``i`` is
    layer ``i + 1`` and everything else (final norms, head, decoder) is layer ``depth + 1``.
    A parameter of layer ``l`` gets ``lr * layer_decay ** (depth + 1 - l)``: block ``i`` is
    scaled by ``layer_decay ** (depth - i)``, the embedding by ``layer_decay ** (depth + 1)``
    and the head keeps the full learning rate.

    Args:
        name: parameter name as in ``task.named_parameters()`` (``encoder.backbone....``).
        depth: number of encoder blocks.

    Returns:
        The layer index, 0 .. depth + 1.
    """
    if name.startswith(_EMBED_PREFIXES):
        return 0
    if name.startswith(_BLOCK_PREFIX):
        return int(name[len(_BLOCK_PREFIX) :].split(".", 1)[0]) + 1
    return depth + 1


def _no_weight_decay(name: str, param: Tensor) -> bool:
    """Biases, norm weights and the class / position tokens get no weight decay."""
    return param.ndim <= 1 or name.endswith(("cls_token", "pos_embed"))


class _DOFATask(BaseTask):
    """Shared machinery: encoder, freezing, wavelengths, optimiser, metric logging."""

    #: Keep every init argument (``weights`` too) in the hyperparameters.
    ignore = None

    encoder: DOFAEncoder
    train_metrics: MetricCollection
    val_metrics: MetricCollection
    test_metrics: MetricCollection

    # -- construction ------------------------------------------------------------------------

    @staticmethod
    def _check_optimizer(lr: float, weight_decay: float, patience: int | None) -> None:
        """Refuse optimiser settings that train nothing or train wrong.

        Raises:
            ValueError: for ``lr`` not positive and finite, ``weight_decay`` negative or not
                finite (AdamW checks only its default, not each parameter group's: a
                negative decay grew the weights), ``patience`` negative
                (``ReduceLROnPlateau`` then cut the rate every epoch, the loss falling).
            TypeError: for a bool given as any of them (Python's, numpy's or a bool tensor:
                ``True`` is the number 1, ``lr=True`` trained at a rate of 1).
        """
        for name, value in (("lr", lr), ("weight_decay", weight_decay), ("patience", patience)):
            if isinstance(value, bool | np.bool_) or (
                isinstance(value, Tensor) and value.dtype == torch.bool
            ):
                raise TypeError(f"{name} must be a number, got the bool {bool(value)}")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive, finite learning rate, got {lr}")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(
                f"weight_decay must be a finite number >= 0, got {weight_decay} (a negative "
                "decay makes the weights grow): 0 for none"
            )
        if patience is not None and patience < 0:
            raise ValueError(
                f"patience must be a number of epochs >= 0, or None for a constant learning "
                f"rate, got {patience}"
            )

    @staticmethod
    def _check_common(
        mode: str,
        num_classes: int,
        layer_decay: float | None,
        wavelengths: Sequence[float] | None,
        bands: Sequence[str] | None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: choose one of {list(MODES)}")
        refuse_one_string(bands)  # "RGB" was read as three bands, "B4" as 'B' and '4'
        if num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes}")
        if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1] or None, got {layer_decay}")
        if layer_decay is not None and mode != "full":
            # a warning, not an error: a full fine-tuning checkpoint (its hyperparameters hold
            # layer_decay) loads as a probe with load_from_checkpoint(path, mode=...)
            _warnings.warn(
                f"layer_decay={layer_decay} is ignored with mode={mode!r}: layer decay applies "
                "only to mode='full' (it scales the encoder blocks' learning rates, and a "
                f"{mode} keeps the encoder frozen); drop layer_decay, or use mode='full' to "
                "fine-tune the encoder"
            )
        if wavelengths is not None and bands is not None and len(wavelengths) != len(bands):
            raise BandError(
                f"{len(bands)} bands but {len(wavelengths)} wavelengths: give one per band"
            )

    def _build_encoder(self) -> None:
        """Build ``self.encoder`` from the hyperparameters and resolve fixed wavelengths."""
        _plain_hyperparameters(self)
        hp = self.hparams
        restoring = _RESTORING.get()
        if restoring is not None:  # a checkpoint's state dict fills it (restoring_from)
            self.encoder = unfilled_encoder(
                hp["variant"],
                pooled_norm=hp.get("pooled_norm", "trained"),
                interpolate_pos_embed=hp["interpolate_pos_embed"],
            )
            # "" for a file object (load_from_checkpoint)
            self.encoder.weights_id = f"file:{Path(restoring).name}" if restoring else "checkpoint"
            self._encoder_keys_to_fill = set(self.encoder.state_dict())
            self._restored_from = restoring
        else:
            self._encoder_keys_to_fill = set()
            self.encoder = self._encoder_as_configured()
        #: wavelength sets (um, rounded to 1e-4) of the training batches; None: too many
        self._trained_wavelengths: set[tuple[float, ...]] | None = set()
        self._warned_wavelengths: set[tuple[float, ...]] = set()
        #: whether a training epoch has scored a labelled target (kept in checkpoints)
        self._trained_on_labels = False
        self._fixed_wavelengths: Tensor | None = None
        if hp["wavelengths"] is not None:
            self._fixed_wavelengths = resolve_wavelengths(hp["bands"], hp["wavelengths"])
        elif hp["bands"] is not None:
            self._fixed_wavelengths = torch.tensor(wavelengths_for_bands(hp["bands"]))
        # fc_norm / head of TorchGeo's DOFA are never used here: keep them out of training
        for name, param in self.encoder.named_parameters():
            if name.startswith(("backbone.fc_norm.", "backbone.head.")):
                param.requires_grad_(False)
        if self.frozen:
            self.encoder.requires_grad_(False)
        # load_dofa returns an eval-mode encoder; Lightning keeps modules' modes at fit start
        self.encoder.train(not self.frozen)

    def _encoder_as_configured(self) -> DOFAEncoder:
        """The encoder the hyperparameters describe, its ``weights`` loaded (``load_dofa``).

        ``weights`` spelled as the command spells random weights (``none``, ``random``,
        ``null``; :data:`torchgeo_dofa.weights.RANDOM_WEIGHTS_NAMES`) is None, as for
        :class:`~torchgeo_dofa.embedder.DOFAEmbedder`, not a file of that name.
        """
        hp = self.hparams
        weights = None if names_random_weights(hp["weights"]) else hp["weights"]
        return load_dofa(
            hp["variant"],
            weights=os.fspath(weights) if weights is not None else None,
            pooled_norm=hp.get("pooled_norm", "trained"),
            interpolate_pos_embed=hp["interpolate_pos_embed"],
        )

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """``nn.Module.load_state_dict``; notes which keys of an unfilled encoder it filled.

        Args:
            state_dict: the task's state dict (``encoder.*``, ``head.*`` / ``decoder.*``).
            strict: as ``nn.Module.load_state_dict``.
            assign: as ``nn.Module.load_state_dict``.

        Returns:
            The missing and unexpected keys, as ``nn.Module.load_state_dict``.

        Raises:
            CheckpointError: for entries that are not dense floating-point tensors where
                the task's weights are (:func:`~torchgeo_dofa.weights.check_tensor_kinds`),
                for tensors holding NaN / infinity (a fine-tuning whose loss
                diverged), before any is loaded: every prediction would be NaN; for keys or
                shapes that do not fit the task (torch's report, one line, naming the source).
        """
        trainer = getattr(self, "_trainer", None)  # Lightning's restore: the file it reads
        origin = getattr(trainer, "ckpt_path", None) or getattr(self, "_restored_from", None)
        # judged as the task will hold them (a float64 1e300 loads as infinity); keys the
        # task has not are refused or ignored by the load itself, so not judged here
        source = f"the checkpoint {origin}" if origin else "the state dict"
        own = self.state_dict()
        check_tensor_kinds(state_dict, own, source)
        as_held = held_as(state_dict, own)
        cast = sorted(
            {
                str(v.dtype).removeprefix("torch.")
                for k, v in as_held.items()
                if v is not state_dict[k]
            }
        )
        check_finite_state(
            as_held,
            source,
            f" (NaN or infinity, or beyond the range of the task's {' / '.join(cast)})"
            if cast
            else "",
        )
        try:
            result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as err:  # torch's multi-line report of keys and shapes
            # load_from_checkpoint names the fix itself (another task, a changed setting)
            if "Error(s) in loading state_dict" not in str(err) or _LOADING_FILE.get():
                raise
            other = _other_task_in(type(self), err)  # Trainer(...).predict(ckpt_path=...)
            if other is not None:
                raise _other_task(type(self), origin or "the state dict", other) from err
            problems = [
                _clipped(line.strip()) for line in str(err).splitlines()[1:] if line.strip()
            ]
            raise CheckpointError(
                f"{source} does not fit {type(self).__name__} as configured: "
                + " ".join(problems)
                + " (a checkpoint of other task settings, e.g. num_classes, or of another "
                "package version; a state dict with other keys loads with strict=False)"
            ) from err
        if getattr(self, "_encoder_keys_to_fill", None):
            given = {k.removeprefix("encoder.") for k in state_dict if k.startswith("encoder.")}
            self._encoder_keys_to_fill -= given
        return result

    def _fill_unfilled_encoder(self) -> None:
        """Fill what no checkpoint filled of an encoder built unfilled, from ``weights``.

        A task built inside :func:`restoring_from` whose checkpoint left the encoder (or some
        of it) out (a task with Lightning's ``strict_loading = False`` saving only its head,
        or no checkpoint loaded after all) gets those tensors from the encoder it would have
        been built with: its ``weights`` (None: a random one), never the unfilled memory.
        """
        missing = getattr(self, "_encoder_keys_to_fill", None)
        if not missing:
            return
        if self.hparams["weights"] is None:
            _warnings.warn(
                f"the checkpoint lacks {len(missing)} of the encoder's tensors and the task's "
                f"weights are None: they are drawn at random (seed {_RANDOM_FILL_SEED}), not "
                "the ones it was trained with; save checkpoints with the whole encoder (no "
                "strict_loading=False), or build the task on weights a file holds"
            )
            # the same draw in every process (DDP ranks, reruns); the global RNG untouched
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_RANDOM_FILL_SEED)
                source = self._encoder_as_configured()
            source.weights_id = f"random (seed {_RANDOM_FILL_SEED})"
        else:
            source = self._encoder_as_configured()
        whole = missing == set(self.encoder.state_dict())
        state = {k: v for k, v in source.state_dict().items() if k in missing}
        with torch.inference_mode(False), torch.no_grad():
            self.encoder.load_state_dict(state, strict=False)
        if whole:
            self.encoder.weights_id = source.weights_id
        self._encoder_keys_to_fill = set()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the weights' CRC-32 and the wavelengths the task was trained on.

        The CRC-32 of the checkpoint's ``state_dict`` is checked when it loads; the
        wavelength sets (:data:`TRAINED_WAVELENGTHS_KEY`) when it predicts.

        Args:
            checkpoint: the Lightning checkpoint being saved.
        """
        super().on_save_checkpoint(checkpoint)
        if self._trained_nothing():  # a callback's checkpoint of the untrained task
            raise self._no_training_batch_error()
        state = checkpoint.get("state_dict")
        if isinstance(state, Mapping):
            checkpoint[STATE_DIGEST_KEY] = state_dict_digest(state)
        if self._trained_wavelengths is not None:  # None: too many sets, or unknown
            checkpoint[TRAINED_WAVELENGTHS_KEY] = [
                list(waves) for waves in sorted(self._trained_wavelengths)
            ]
        scored = getattr(self, "_scored", {}).get("train", 0)  # mid-epoch (an interruption)
        checkpoint[TRAINED_ON_LABELS_KEY] = self._trained_on_labels or bool(scored > 0)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse changed weights, or (to resume a fine-tuning) a non-finite optimizer state.

        The wavelengths the task was trained on (:data:`TRAINED_WAVELENGTHS_KEY`) are
        restored for :meth:`on_predict_batch_start`.

        ``torch.load`` does not check a file's CRC-32s, so a byte changed on disk or in a copy
        loaded silently as other weights (through ``ckpt_path`` and ``load_from_checkpoint``
        alike); checkpoints saved by this package carry :func:`~torchgeo_dofa.weights.
        state_dict_digest` of their weights, compared here (about 0.1 s for DOFA base).
        Checkpoints without it (older ones) load as before.

        Args:
            checkpoint: the loaded Lightning checkpoint.

        Raises:
            CheckpointError: when the weights' CRC-32 differs from the one saved (a damaged
                file, or a ``state_dict`` edited after saving: deleting the checkpoint's
                :data:`~torchgeo_dofa.weights.STATE_DIGEST_KEY` entry loads it unchecked);
                when a fine-tuning resumes (``fit``) from a checkpoint whose optimizer state
                holds NaN / infinity (:func:`~torchgeo_dofa.weights.
                check_finite_optimizer_states`).
        """
        super().on_load_checkpoint(checkpoint)
        trained = checkpoint.get(TRAINED_WAVELENGTHS_KEY)
        self._trained_wavelengths = (
            {tuple(float(v) for v in waves) for waves in trained}
            if isinstance(trained, list)
            else None  # an older checkpoint: its bands are unknown, predictions unchecked
        )
        self._warned_wavelengths = set()
        # a fit resumed from it goes on from its record (an older checkpoint: taken as
        # trained on labels, its first epoch long past); a task loaded to be fine-tuned
        # anew (load_from_checkpoint) starts a new record: its first epoch is checked
        trainer = self._trainer
        resuming = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        self._trained_on_labels = resuming and bool(checkpoint.get(TRAINED_ON_LABELS_KEY, True))
        path = _LOADING_FILE.get() or getattr(trainer, "ckpt_path", None)
        saved, state = checkpoint.get(STATE_DIGEST_KEY), checkpoint.get("state_dict")
        if isinstance(saved, str) and isinstance(state, Mapping):
            now = state_dict_digest(state)
            if now != saved:
                raise CheckpointError(
                    (f"the weights of {path}" if path else "the checkpoint's weights")
                    + f" fail their CRC-32 check (saved {saved}, now "
                    f"{now}): its bytes changed after it was saved (a disk or copy error: "
                    "copy or save it again), or its state_dict was edited after saving (then "
                    f"delete its {STATE_DIGEST_KEY!r} entry before loading)"
                )
        if resuming:  # the weights' damage first, then the optimizer's state
            check_finite_optimizer_states(
                checkpoint, f"the checkpoint {path}" if path else "the checkpoint"
            )

    @property
    def frozen(self) -> bool:
        """Whether the encoder is frozen (``mode="linear-probe"``)."""
        return bool(self.hparams.get("mode") == "linear-probe")

    def train(self, mode: bool = True) -> Self:
        """Set training mode; a frozen encoder always stays in eval mode.

        Args:
            mode: training (True) or evaluation (False) mode.

        Returns:
            The task.
        """
        super().train(mode)
        if self.frozen and hasattr(self, "encoder"):
            self.encoder.eval()
        return self

    def on_train_start(self) -> None:
        """Put the task in training mode (a frozen encoder stays in eval mode).

        Lightning keeps each module's mode at the start of training, so a task that was put
        in eval mode (e.g. by :meth:`load_from_checkpoint`) would otherwise train in it.
        """
        self.train()

    def setup(self, stage: str) -> None:
        """Warn where a TorchGeo data module normalises batches otherwise than DOFA.

        TorchGeo's ``EuroSATDataModule`` and its kin, before any batch: see
        :func:`~torchgeo_dofa.embedder.warn_of_datamodule_normalisation`.

        Args:
            stage: Lightning's stage (``fit``, ``validate``, ``test`` or ``predict``).
        """
        warn_of_datamodule_normalisation(self, stage)

    def on_fit_start(self) -> None:
        """Count this fit's training batches from 0 (see :meth:`on_fit_end`)."""
        self._fit_batches = 0
        self._epoch_batches_over = False

    def on_train_epoch_start(self) -> None:
        """Mark a training epoch's batches as still to come (see :meth:`_trained_nothing`)."""
        self._epoch_batches_over = False

    def on_validation_start(self) -> None:
        """Mark, in a fit, that the epoch's training batches so far are over.

        A checkpoint saved from here on (``ModelCheckpoint`` at the validation's end) judges
        them.
        """
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            self._epoch_batches_over = not self.trainer.sanity_checking

    def on_fit_end(self) -> None:
        """Refuse a fit that ran no training step where its limits allowed some.

        A training loader without a batch (a ``batch_size`` above the number of training
        chips with ``drop_last``; TorchGeo's ``RandomPatchSampler`` over areas smaller than
        about 1.4 chips a side, which keeps half a chip's diagonal from the edges and yields
        nothing while its length says otherwise) ended ``fit`` normally:
        nothing learnt, no checkpoint, exit status 0. ``max_epochs=0``, ``max_steps=0`` or
        ``limit_train_batches=0`` ask for no training and are left alone; a fit resumed from
        a run that had already reached its limits warns that it trained nothing. A subclass
        with a ``training_step`` of its own is not checked (its batches are not counted).

        Raises:
            NoTrainingBatchError: naming the loader's length and the likely causes.
        """
        trainer = self.trainer
        if not self._no_step_where_steps_were_asked():
            return
        epochs, steps = trainer.max_epochs, trainer.max_steps
        reached = (epochs is not None and 0 <= epochs <= trainer.current_epoch) or (
            0 <= steps <= trainer.global_step
        )
        if trainer.global_step > 0 and reached:  # restored from a run that had ended
            _warnings.warn(
                f"fit trained nothing: the run resumed had already reached its limits (epoch "
                f"{trainer.current_epoch}, step {trainer.global_step}; max_epochs="
                f"{trainer.max_epochs}, max_steps={trainer.max_steps}): raise max_epochs (or "
                "max_steps) to train on"
            )
            return
        raise self._no_training_batch_error()

    def _no_step_where_steps_were_asked(self) -> bool:
        """Whether this fit has run no training step though its limits allowed some.

        Not where it was interrupted, nor for a subclass with its own ``training_step`` (its
        batches are not counted).
        """
        trainer = self._trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return False
        if type(self).training_step is not _DOFATask.training_step:
            return False  # a subclass's own training step: its batches are not counted here
        if getattr(self, "_fit_batches", 1) or trainer.interrupted:
            return False
        return 0 not in (trainer.max_epochs, trainer.max_steps, trainer.limit_train_batches)

    def _trained_nothing(self) -> bool:
        """Whether a checkpoint saved now would hold a task never trained.

        No training step in this fit, none before it (a fresh run: ``global_step`` 0), where
        steps were asked, and the epoch's batches over (at its validation or end: a save of
        the starting weights in ``on_train_start`` is the user's). A ``ModelCheckpoint``
        saved one at the validation after an epoch without a batch (``last.ckpt``, untrained
        weights, NaN metrics), which ``predict`` then took; its fit is refused instead
        (:meth:`on_fit_end`'s error), before the file is written.
        """
        trainer = self._trainer
        return (
            trainer is not None
            and trainer.global_step == 0
            and getattr(self, "_epoch_batches_over", False)
            and self._no_step_where_steps_were_asked()
        )

    def _no_training_batch_error(self) -> NoTrainingBatchError:
        batches = self.trainer.num_training_batches
        return NoTrainingBatchError(
            f"fit ran no training step: the training loader gave no batch (its length says "
            f"{batches:g}). A batch_size above the number of training chips with drop_last "
            "gives none, and so does a random sampler over areas smaller than its chips "
            "(TorchGeo's RandomPatchSampler keeps half a chip's diagonal from the edges: "
            "about 1.4 chip sizes a side of labelled area): give more or larger data, a "
            "smaller batch_size or a smaller chip size"
        )

    # -- wavelengths -------------------------------------------------------------------------

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        """Record a training batch's wavelength sets (saved as :data:`TRAINED_WAVELENGTHS_KEY`).

        Args:
            batch: the batch dict (``wavelengths`` (B, C) or (C,), um, when it carries them).
            batch_idx: index of the batch.

        Returns:
            None (Lightning's -1 would skip the rest of the epoch).
        """
        if self._trained_wavelengths is not None and isinstance(batch, Mapping):
            self._trained_wavelengths |= self._wavelength_sets(batch)
            if len(self._trained_wavelengths) > _MAX_TRAINED_SETS:
                self._trained_wavelengths = None
        return None

    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Warn, once per set, where a predicted batch's wavelengths are none it trained on.

        DOFA's encoder takes any wavelengths, but the head learned the features of the
        training bands, so predictions on others (another band count or sensor, beyond
        :data:`~torchgeo_dofa.bands.WAVELENGTH_TOLERANCE`; the order does not matter to DOFA,
        see :func:`_same_bands`) were never validated. A task
        restored from a checkpoint without :data:`TRAINED_WAVELENGTHS_KEY` (an earlier
        release's), or never trained, is not checked.

        Args:
            batch: the batch dict.
            batch_idx: index of the batch.
            dataloader_idx: index of the DataLoader.
        """
        if not self._trained_wavelengths or not isinstance(batch, Mapping):
            return
        for waves in sorted(self._wavelength_sets(batch) - self._warned_wavelengths):
            self._warned_wavelengths.add(waves)
            if not any(_same_bands(waves, t) for t in self._trained_wavelengths):
                self._warn_untrained_wavelengths(waves)

    def _wavelength_sets(self, batch: Mapping[str, Any]) -> set[tuple[float, ...]]:
        """The distinct wavelength rows of a batch (its own, else the task's default)."""
        waves = batch.get("wavelengths")
        if not isinstance(waves, Tensor):
            try:
                waves = self._default_wavelengths()
            except ValueError:  # the step raises it, naming the fix
                return set()
        if waves.ndim == 0:
            return set()
        rows = waves.detach().reshape(-1, waves.shape[-1]).cpu().double().unique(dim=0)
        return {tuple(round(v, 4) for v in row) for row in rows.tolist()}

    def _warn_untrained_wavelengths(self, waves: tuple[float, ...]) -> None:
        trained = sorted(self._trained_wavelengths or ())
        listed = "; ".join(f"{len(t)} bands at {_values(t, 13)} um" for t in trained[:3])
        more = f" (and {len(trained) - 3} more sets)" if len(trained) > 3 else ""
        _warnings.warn(
            f"{type(self).__name__} was trained on {listed}{more}, and these chips carry "
            f"{len(waves)} bands at {_values(waves, 13)} um: DOFA's encoder takes any "
            "wavelengths, but the task's head learned the features of the training bands, so "
            "these predictions were never validated; predict on the bands the task was trained "
            "on, or fine-tune it on these"
        )

    def _check_normalised(self, image: Tensor) -> None:
        """Check a batch as :func:`~torchgeo_dofa.embedder.check_normalised` does.

        Its warning of values scaled again comes once per task: it repeated with every
        batch of a fit.
        """
        said = getattr(self, "_said_scaled_again", False)
        if check_normalised(image, _NORMALISE_FIX, scaled_again=not said):
            self._said_scaled_again = True

    def _default_wavelengths(self) -> Tensor:
        if self._fixed_wavelengths is not None:
            return self._fixed_wavelengths
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        if dm is not None:
            waves = getattr(dm, "wavelengths", None)
            if waves is not None:
                return torch.as_tensor(waves, dtype=torch.float32).flatten()
            bands = getattr(dm, "bands", None)
            kwargs = getattr(dm, "kwargs", None)
            if bands is None and isinstance(kwargs, Mapping):
                bands = kwargs.get("bands")
            for attr in ("train_dataset", "val_dataset", "test_dataset", "dataset"):
                if bands is None:
                    bands = getattr(getattr(dm, attr, None), "bands", None)
            if bands is not None:
                return torch.tensor(wavelengths_for_bands(list(bands)))
        raise BandError(
            "no wavelengths: the batch has no 'wavelengths' key and none are configured; add "
            "them to the samples (torchgeo_dofa.transforms.AttachWavelengths) or set the task's "
            "wavelengths=[...] (um) or bands=[...] (Sentinel-2 names)"
        )

    def _wavelengths(self, image: Tensor, wavelengths: Tensor | Sequence[float] | None) -> Tensor:
        if wavelengths is None:
            wavelengths = self._default_wavelengths()
        if not isinstance(wavelengths, Tensor):
            wavelengths = torch.tensor([float(v) for v in wavelengths])
        return wavelengths.to(image.device)

    def _batch_wavelengths(self, batch: Mapping[str, Any]) -> Tensor | None:
        """The batch's ``wavelengths``, refused where they contradict the task's own.

        The task's ``bands`` / ``wavelengths`` serve batches without ``wavelengths``; a batch
        carrying others would silently win, and the model (and its checkpoint's
        hyperparameters) would not be what was configured.

        Raises:
            ValueError: when the task was given ``bands`` / ``wavelengths`` and the batch
                carries another count of wavelengths, or values more than
                :data:`~torchgeo_dofa.bands.WAVELENGTH_TOLERANCE` from them.
        """
        waves = batch.get("wavelengths")
        if not isinstance(waves, Tensor):
            return None
        fixed = self._fixed_wavelengths
        if fixed is None or waves.ndim == 0:
            return waves
        # the count is a shape check; the values cost one read of a (B, C) tensor
        differs = waves.shape[-1:] != fixed.shape or bool(
            ((waves.float() - fixed.to(waves.device)).abs() > WAVELENGTH_TOLERANCE).any()
        )
        if differs:
            hp = self.hparams
            given = (
                f"bands={list(hp['bands'])}"
                if hp["wavelengths"] is None
                else f"wavelengths={list(hp['wavelengths'])}"
            )
            rows = waves.detach().reshape(-1, waves.shape[-1]).cpu().unique(dim=0)
            batch_waves = "; ".join(_values(row.tolist()) for row in rows)
            raise ValueError(
                f"the batch carries {waves.shape[-1]} wavelengths ({batch_waves} um) but the "
                f"task was given {given} ({_values(fixed.tolist())} um), which serve batches "
                "without 'wavelengths': the batch's would silently replace them (and the "
                "checkpoint would record the task's); drop the task's bands= / wavelengths= "
                "(the batch's wavelengths suffice), or make them match the batch's channels, "
                f"in order. A checkpoint brings them back (predict --ckpt_path too, whatever "
                f"the config says): {type(self).__name__}.load_from_checkpoint(path, "
                f"{given.split('=')[0]}=None) in Python drops them"
            )
        return waves

    # -- optimisation ------------------------------------------------------------------------

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups: trainable parameters only, layer-wise lr decay if set.

        Without ``layer_decay`` there are two groups (with / without weight decay) at ``lr``.
        With it, one group per (layer, weight decay) pair, at ``lr * layer_decay ** (depth + 1 -
        layer)`` (see :func:`layer_id`). Biases, norms and the class token never get weight
        decay. Each group carries ``name``, ``layer`` and ``lr_scale`` for inspection.

        Returns:
            The groups, ready for :class:`torch.optim.AdamW`.
        """
        lr: float = self.hparams["lr"]
        wd: float = self.hparams["weight_decay"]
        decay: float | None = self.hparams["layer_decay"]
        depth = self.encoder.config.depth
        groups: dict[tuple[int, bool], dict[str, Any]] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            layer = layer_id(name, depth) if decay is not None else depth + 1
            no_wd = _no_weight_decay(name, param)
            key = (layer, no_wd)
            if key not in groups:
                scale = 1.0 if decay is None else decay ** (depth + 1 - layer)
                groups[key] = {
                    "name": f"layer{layer}_{'no_decay' if no_wd else 'decay'}",
                    "layer": layer,
                    "lr_scale": scale,
                    "lr": lr * scale,
                    "weight_decay": 0.0 if no_wd else wd,
                    "params": [],
                }
            groups[key]["params"].append(param)
        return [groups[k] for k in sorted(groups)]

    def configure_optimizers(self) -> OptimizerLRScheduler:
        """AdamW over :meth:`parameter_groups`; ReduceLROnPlateau on ``val_loss`` if ``patience``.

        Without validation (no ``val_dataloader``, ``limit_val_batches=0``) there is no
        ``val_loss`` to follow: the rate stays constant and Lightning warns once (``...
        conditioned on metric val_loss which is not available ...``) instead of failing at
        the end of the first epoch, after it was spent.

        Returns:
            The optimizer, and the scheduler when ``patience`` is not None.
        """
        optimizer = AdamW(self.parameter_groups(), lr=self.hparams["lr"])
        patience = self.hparams["patience"]
        if patience is None:
            return optimizer
        scheduler = ReduceLROnPlateau(optimizer, patience=patience)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": self.monitor, "strict": False},
        }

    # -- steps -------------------------------------------------------------------------------

    @abstractmethod
    def _loss_and_logits(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """Return (loss, logits, target) for a batch."""

    def _step(self, batch: Mapping[str, Any], split: str, metrics: MetricCollection) -> Tensor:
        loss, logits, target = self._loss_and_logits(batch)
        if target.shape[0]:  # a classification batch of empty chips only scores none
            metrics.update(*self._metric_inputs(logits, target))
        scored = self._scored_targets(target)  # no sync per step
        self._scored[split] = self._scored.get(split, 0) + scored
        self._log_loss(split, loss, logits, target)
        return loss

    def _scored_targets(self, target: Tensor) -> Tensor | int:
        """How many targets of a batch the metrics score: every chip's label here."""
        return int(target.shape[0])

    def _log_metrics(self, split: str, metrics: MetricCollection) -> None:
        """Log a split's epoch metrics and reset them.

        An epoch whose metrics scored no target (every pixel ignored or no-data) logs NaN:
        torchmetrics gives 0.0 there (``train_OverallAccuracy`` 0.0 read as a model that
        gets everything wrong). The count is summed over DDP processes first. Such an epoch
        is an error where no training epoch of the task scored a target yet, else a warning
        (:meth:`_no_labelled_pixel`).

        Raises:
            ValueError: where no pixel of the task's first training epoch was labelled.
        """
        total, ran_anywhere = self._scored_everywhere(split)
        self._scored.pop(split, None)
        values: dict[str, Any]
        if total == 0:  # compute() of metrics never updated fails (average precision) or warns
            values = {str(k): torch.tensor(math.nan) for k in metrics.keys(keep_base=False)}
            if ran_anywhere:
                self._no_labelled_pixel(split)
        else:
            values = {str(k): v for k, v in metrics.compute().items()}
            if split == "train":
                self._trained_on_labels = True
        self.log_dict(values)
        metrics.reset()

    def _scored_everywhere(self, split: str) -> tuple[int, int]:
        """Targets of ``split`` scored so far this epoch, and processes that ran a batch of it.

        Both summed over DDP processes (one reduce of two numbers: a collective, so every
        process must call it; one device sync).
        """
        ran = split in self._scored  # a batch of this split ran in this process
        # a tensor on the task's device (segmentation) or an int
        scored = self._scored.get(split, 0)
        counts = torch.tensor([int(scored), int(ran)], device=self.device)
        total, ran_anywhere = self.trainer.strategy.reduce(counts, reduce_op="sum").tolist()
        return int(total), int(ran_anywhere)

    def _nothing_scored(self) -> tuple[str, str, str]:
        """What a task scores, why an epoch scored none, and what to check (for messages)."""
        ignore = self.hparams.get("ignore_index")
        causes = (
            f"every mask pixel was ignore_index={ignore} or had 'valid' False"
            if ignore is not None
            else "every mask pixel had 'valid' False (no data in the image)"
        )
        checks = (
            "check that the label rasters cover the image chips (pixels no label file covers "
            "read the labels' nodata), that ignore_index is the labels' nodata and not a class, "
            "and that the image has data where the labels are"
        )
        return "labelled pixel", causes, checks

    def _no_labelled_pixel(self, split: str) -> None:
        """An epoch of ``split`` scored no target: raise for the task's first, else warn.

        Segmentation: every mask pixel was ``ignore_index`` or had ``valid`` False;
        classification: every chip was ``empty`` (no valid pixel). Training on such batches
        gives loss 0 and no gradient, so a fit whose first epoch had none learns nothing.

        Raises:
            NoLabelledPixelError: for a training epoch where none before it scored a
                labelled target (the task's first, across resumed fits:
                :data:`TRAINED_ON_LABELS_KEY`), before its checkpoint is saved.
        """
        what, causes, checks = self._nothing_scored()
        if split == "train" and not self._trained_on_labels:
            raise NoLabelledPixelError(
                f"the first training epoch had no {what}: {causes}, so the loss was 0 "
                f"and {type(self).__name__} learned nothing from it; {checks}"
            )
        if not self.trainer.sanity_checking:
            said = (
                "its metrics are NaN and train_loss 0 (no gradient)"
                if split == "train"
                else f"its metrics and {split}_loss are NaN"
            )
            _warnings.warn(
                f"the {_SPLIT_NAMES[split]} epoch had no {what} ({causes}): {said}; {checks}"
            )

    def on_validation_epoch_start(self) -> None:
        """Refuse a first training epoch without a labelled pixel before its validation.

        The validation at an epoch's end runs before the epoch's end hooks, and ends with
        ``ModelCheckpoint``'s save: the epoch's training batches are judged here (summed over
        DDP processes). A validation inside the epoch (``val_check_interval``) is not: the
        labelled chips of sparse labels may all come later in the epoch; it records labels
        scored so far. Both gather every process's record (labels scored, band sets) for the
        checkpoint saved at their end.

        Raises:
            NoLabelledPixelError: where every training batch of the task's first epoch has
                run and none scored a labelled pixel.
        """
        super().on_validation_epoch_start()
        trainer = self.trainer
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self._gather_trained_wavelengths()  # for the checkpoint saved at its end
        if self._trained_on_labels:
            return
        # every process's count (a checkpoint saved at this validation's end is rank 0's,
        # and its shard may hold none of the labels seen so far)
        total, ran_anywhere = self._scored_everywhere("train")
        if total > 0:
            self._trained_on_labels = True
            return
        progress = trainer.fit_loop.epoch_loop.batch_progress
        epoch_done = progress.is_last_batch or (
            progress.current.ready >= trainer.num_training_batches
        )
        if ran_anywhere and epoch_done:
            self._no_labelled_pixel("train")

    def _log_loss(self, split: str, loss: Tensor, logits: Tensor, target: Tensor) -> None:
        """Log ``{split}_loss``; its epoch value is the mean over batches weighted by chips."""
        self.log(f"{split}_loss", loss, batch_size=logits.shape[0])

    def _metric_inputs(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        return logits, target

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        """Compute the training loss and update the train metrics.

        Args:
            batch: the batch dict.
            batch_idx: index of the batch.

        Returns:
            The loss.

        Raises:
            ValueError: for a batch without the task's target (``label`` / ``mask``), a
                target whose shape or values do not fit ``task`` / ``num_classes``, or
                ``wavelengths`` other than the task's ``bands`` / ``wavelengths``.
        """
        self._fit_batches = getattr(self, "_fit_batches", 0) + 1
        return self._step(batch, "train", self.train_metrics)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """Compute the validation loss and update the validation metrics.

        Args:
            batch: the batch dict.
            batch_idx: index of the batch.

        Raises:
            ValueError: as :meth:`training_step`.
        """
        self._step(batch, "val", self.val_metrics)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """Compute the test loss and update the test metrics.

        Args:
            batch: the batch dict.
            batch_idx: index of the batch.

        Raises:
            ValueError: as :meth:`training_step`.
        """
        self._step(batch, "test", self.test_metrics)

    def on_train_epoch_end(self) -> None:
        """Log the train metrics (NaN for an epoch without a scored target).

        Under DDP, the wavelength sets every process trained on are gathered first, so the
        checkpoint rank 0 saves holds them all (:data:`TRAINED_WAVELENGTHS_KEY`).
        """
        self._epoch_batches_over = True  # before ModelCheckpoint's save (a monitoring callback)
        self._gather_trained_wavelengths()
        self._log_metrics("train", self.train_metrics)

    def _gather_trained_wavelengths(self) -> None:
        """The union of every process's training wavelength sets, in every process."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        gathered: list[set[tuple[float, ...]] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self._trained_wavelengths)
        union: set[tuple[float, ...]] = set()
        for sets in gathered:
            if sets is None:  # a process had too many: the record is dropped everywhere
                self._trained_wavelengths = None
                return
            union |= sets
        self._trained_wavelengths = union if len(union) <= _MAX_TRAINED_SETS else None

    def on_validation_epoch_end(self) -> None:
        """Log the validation metrics (NaN for an epoch without a scored target)."""
        self._log_metrics("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        """Log the test metrics (NaN for an epoch without a scored target)."""
        self._log_metrics("test", self.test_metrics)

    def _set_metrics(self, metrics: MetricCollection) -> None:
        #: per split, the targets the metrics scored this epoch (see :meth:`_log_metrics`)
        self._scored: dict[str, Tensor | int] = {}
        self.train_metrics = metrics.clone(prefix="train_")
        self.val_metrics = metrics.clone(prefix="val_")
        self.test_metrics = metrics.clone(prefix="test_")

    # -- checkpoints -------------------------------------------------------------------------

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str | Path | IO[Any],
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> Self:
        """Load a task from a Lightning checkpoint, without fetching the original weights.

        The checkpoint holds the whole state dict, so the encoder is built unfilled (no
        random initialisation, no read of the original weights; :func:`restoring_from`) and
        filled by the checkpoint; ``hparams["weights"]`` keeps the weights the task was
        fine-tuned from. Encoder tensors the checkpoint lacks (a task saving its head alone,
        with ``strict_loading = False`` or ``strict=False``) come from those weights (a
        random draw, with a warning, where they are None). Passing ``weights`` builds the
        encoder from those first, as ``__init__`` does.

        Args:
            checkpoint_path: path or file object of the checkpoint.
            map_location: as :meth:`lightning.pytorch.LightningModule.load_from_checkpoint`.
            hparams_file: optional YAML file of hyperparameters.
            strict: whether the state dict must match exactly.
            weights_only: passed on to ``torch.load``.
            **kwargs: hyperparameters that override the stored ones.

        Returns:
            The task, in eval mode.

        Raises:
            ValueError: where the checkpoint's layout does not fit these hyperparameters in a
                way :meth:`on_load_checkpoint` can name (``head_norm``).
            CheckpointError: (raised before anything is built) if the file is damaged
                (truncated, a byte changed); if it is another task's checkpoint; if a
                hyperparameter given (``num_classes``, ...) does not fit its weights.
        """
        if isinstance(checkpoint_path, str | os.PathLike) and Path(checkpoint_path).is_file():
            # torch.load reads a damaged zip silently, and fails deep inside on a non-checkpoint
            verify_checkpoint_file(checkpoint_path, lightning=True)
        overrides = sorted(kwargs)
        # the checkpoint fills the encoder: neither the original weights nor a random
        # initialisation first; what it lacks comes from the original weights after
        restoring = "weights" not in kwargs
        restore = (
            restoring_from(
                checkpoint_path if isinstance(checkpoint_path, str | os.PathLike) else ""
            )
            if restoring
            else nullcontext()
        )
        token = _STRICT_LOAD.set(strict is not False)
        loading = _LOADING_FILE.set(
            str(checkpoint_path) if isinstance(checkpoint_path, str | os.PathLike) else None
        )
        try:
            with restore:
                task = super().load_from_checkpoint(
                    checkpoint_path,
                    map_location=map_location,
                    hparams_file=hparams_file,
                    strict=strict,
                    weights_only=weights_only,
                    **kwargs,
                )
        except ValueError as err:  # Lightning's: the checkpoint names another task class
            other = re.search(r"The class '([\w.]+)' requested by the checkpoint", str(err))
            if other is None:
                raise
            raise _other_task(cls, checkpoint_path, other.group(1).rsplit(".", 1)[-1]) from None
        except RuntimeError as err:  # torch's: a hyperparameter given changed a shape, or ...
            saved_by = _other_task_in(cls, err)  # ... the other task's weights (from Python)
            if saved_by is not None:
                raise _other_task(cls, checkpoint_path, saved_by) from None
            if "size mismatch" not in str(err) or not overrides:
                raise
            detail = next((t.strip() for t in str(err).splitlines() if "size mismatch" in t), "")
            raise CheckpointError(
                f"{checkpoint_path} does not fit {cls.__name__} with {', '.join(overrides)} "
                f"changed ({detail}): "
                "a checkpoint restores the task it saved: "
                + (
                    "for another number of classes, fine-tune a new task from its encoder: "
                    f"{cls.__name__}(..., weights={str(checkpoint_path)!r})"
                    if overrides == ["num_classes"]
                    else f"load it without {', '.join(overrides)}, or fine-tune a new task "
                    f"from its encoder: {cls.__name__}(..., weights="
                    f"{str(checkpoint_path)!r}) (of the variant it was trained as)"
                )
            ) from None
        finally:
            _STRICT_LOAD.reset(token)
            _LOADING_FILE.reset(loading)
        if restoring:
            task._fill_unfilled_encoder()  # what the checkpoint lacked, from its weights
        task.eval()
        return task


def _other_task_in(cls: type, err: RuntimeError) -> str | None:
    """The other task whose weights torch's load report ``err`` shows as unexpected, or None.

    A classification task's own tensors are ``head.*``, a segmentation task's ``decoder.*``.
    """
    unexpected = re.search(r"Unexpected key\(s\) in state_dict: (.*)", str(err))
    if unexpected is None:
        return None
    for name, prefix in (
        ("DOFAClassificationTask", '"head.'),
        ("DOFASegmentationTask", '"decoder.'),
    ):
        if name != cls.__name__ and prefix in unexpected.group(1):
            return name
    return None


def _other_task(cls: type, path: object, name: str) -> CheckpointError:
    """The error for a checkpoint of task ``name`` loaded as ``cls``."""
    return CheckpointError(
        f"{path} is a checkpoint of {name}, not of {cls.__name__}: load it with "
        f"{name}.load_from_checkpoint(...), or fine-tune a {cls.__name__} from its encoder "
        f"with {cls.__name__}(..., weights={str(path)!r})"
    )


class DOFAClassificationTask(_DOFATask):
    """Image classification with DOFA: linear probing or full fine-tuning.

    The head sits on the pooled embedding (mean of the patch tokens after the last block, then
    the encoder's final LayerNorm). ``task(image, wavelengths)`` returns logits (B, num_classes).

    Modes:

    * ``linear-probe`` (GEO-Bench protocol): the encoder is frozen (``requires_grad=False``)
      and kept in eval mode throughout training; only the head trains. With ``head_norm``
      (the default here) the head is MAE's linear-probe head: a ``BatchNorm1d`` without affine
      parameters, then a linear layer. That BatchNorm needs at least 2 chips per training
      batch: a training batch of 1 raises a ``ValueError`` naming the fixes (evaluation and
      prediction take any batch size).
    * ``full``: everything trains; ``layer_decay`` scales block ``i``'s learning rate by
      ``layer_decay ** (depth - i)`` and the patch embedding's by ``layer_decay ** (depth + 1)``.

    Loading a linear probe's checkpoint for full fine-tuning needs its head layout:
    ``load_from_checkpoint(path, mode="full", head_norm=True)`` (``head_norm=None`` is off in
    ``full`` mode); a checkpoint whose head layout differs from the task's raises a
    ``ValueError`` naming ``head_norm`` instead of a state-dict error.

    Metrics (``train_`` / ``val_`` / ``test_`` prefixes): multiclass ``OverallAccuracy``,
    ``AverageAccuracy``, ``AverageF1Score``; multilabel ``OverallAccuracy``,
    ``AverageF1Score`` and ``MicroAP`` (micro-averaged mAP, GEO-Bench's BigEarthNet metric).
    """

    def __init__(
        self,
        num_classes: int,
        variant: str = "base",
        weights: str | None = "official",
        mode: Mode = "linear-probe",
        task: Literal["multiclass", "multilabel"] = "multiclass",
        wavelengths: list[float] | None = None,
        bands: list[str] | None = None,
        interpolate_pos_embed: bool = False,
        pooled_norm: Literal["trained", "plain"] = "trained",
        head_norm: bool | None = None,
        layer_decay: float | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        patience: int | None = 10,
    ) -> None:
        """Build the task.

        Args:
            num_classes: number of classes (multiclass) or labels (multilabel).
            variant: ``base`` or ``large``.
            weights: as :func:`torchgeo_dofa.load_dofa`: ``"official"``, a checkpoint path or
                None (or ``"none"`` / ``"random"``, the command's spelling) for a random
                encoder.
            mode: ``"linear-probe"`` (frozen encoder) or ``"full"`` fine-tuning.
            task: ``"multiclass"`` (cross-entropy; ``label`` (B,) class indices) or
                ``"multilabel"`` (binary cross-entropy; ``label`` (B, num_classes) 0/1).
            wavelengths: fixed wavelengths (um) for batches without ``wavelengths``; a batch
                carrying other wavelengths is refused.
            bands: Sentinel-2 band names to infer those wavelengths from.
            interpolate_pos_embed: accept inputs other than 224 x 224 (multiples of 16).
            pooled_norm: the pooled embedding's LayerNorm convention (``"trained"`` or
                ``"plain"``, see :class:`torchgeo_dofa.DOFAEncoder`).
            head_norm: put an affine-free ``BatchNorm1d`` before the linear head (MAE's
                linear-probe head; training batches need at least 2 chips); None: on for
                ``linear-probe``, off for ``full``.
            layer_decay: layer-wise learning-rate decay factor in (0, 1] (``full`` mode), or
                None for one learning rate; with ``linear-probe`` it is ignored, with a
                warning.
            lr: learning rate (AdamW).
            weight_decay: AdamW weight decay (not applied to biases, norms and tokens).
            patience: ReduceLROnPlateau patience on ``val_loss``; None for a constant rate.

        Raises:
            ValueError: for an unknown mode or task, or a bad ``num_classes`` /
                ``layer_decay`` / ``lr`` / ``weight_decay`` / ``patience``.
            BandError: for inconsistent ``bands`` / ``wavelengths``.
        """
        canonical_variant(variant)
        self._check_common(mode, num_classes, layer_decay, wavelengths, bands)
        self._check_optimizer(lr, weight_decay, patience)
        if task not in ("multiclass", "multilabel"):
            raise ValueError(f"unknown task {task!r}: choose 'multiclass' or 'multilabel'")
        if task == "multiclass" and num_classes < 2:
            raise ValueError(f"multiclass needs num_classes >= 2, got {num_classes}")
        if task == "multilabel" and num_classes < 2:  # torchmetrics' multilabel metrics
            raise ValueError(
                f"multilabel needs num_classes >= 2 labels, got {num_classes}: for one label "
                "(present or not), use task='multiclass' with num_classes=2"
            )
        super().__init__()

    def configure_models(self) -> None:
        """Build the encoder and the head."""
        self._build_encoder()
        dim = self.encoder.embed_dim
        use_norm = self.hparams["head_norm"]
        if use_norm is None:
            use_norm = self.frozen
        linear = nn.Linear(dim, self.hparams["num_classes"])
        nn.init.trunc_normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        self.head: nn.Module = (
            nn.Sequential(nn.BatchNorm1d(dim, eps=1e-6, momentum=None, affine=False), linear)
            if use_norm
            else linear
        )

    def _head_batch_norm(self) -> nn.BatchNorm1d | None:
        """The head's ``BatchNorm1d`` (``head_norm``), or None for a plain linear head."""
        head = self.head
        if isinstance(head, nn.Sequential) and isinstance(head[0], nn.BatchNorm1d):
            return head[0]
        return None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check, before its state dict loads, that the checkpoint's head fits this task's.

        ``head_norm=None`` resolves by mode (on for ``linear-probe``, off for ``full``), so a
        probe's checkpoint loaded with ``mode="full"`` would otherwise fail in
        ``load_state_dict`` with missing ``head.weight`` and unexpected ``head.0.running_mean``.
        Skipped for ``load_from_checkpoint(..., strict=False)``, which keeps the new head.

        Args:
            checkpoint: the loaded Lightning checkpoint.

        Raises:
            ValueError: where the checkpoint's head has ``head_norm``'s BatchNorm and this
                task's has not, or the reverse, with the ``head_norm`` value that fits.
        """
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("state_dict")
        if not isinstance(state, Mapping) or not (_STRICT_LOAD.get() and self.strict_loading):
            return
        head_keys = [k for k in state if isinstance(k, str) and k.startswith("head.")]
        if not head_keys:
            return
        saved_norm = any(k.startswith("head.0.") for k in head_keys)
        task_norm = self._head_batch_norm() is not None
        if saved_norm == task_norm:
            return
        mode = self.hparams["mode"]
        setting = f"head_norm={self.hparams['head_norm']!r} with mode={mode!r}"
        if saved_norm:
            raise ValueError(
                "the checkpoint's head has head_norm's BatchNorm1d (a linear probe's head: "
                "head_norm=None is on for mode='linear-probe', off for mode='full') but this "
                f"task's head is a plain linear layer ({setting}): load it with "
                f"load_from_checkpoint(path, mode={mode!r}, head_norm=True) to keep the "
                "probe's head (and its trained weights), or strict=False to start a new head "
                "without head_norm"
            )
        raise ValueError(
            "the checkpoint's head is a plain linear layer (no head_norm: head_norm=None is "
            "off for mode='full', on for mode='linear-probe') but this task's head has "
            f"head_norm's BatchNorm1d ({setting}): load it with "
            f"load_from_checkpoint(path, mode={mode!r}, head_norm=False) to keep the "
            "checkpoint's head (and its trained weights), or strict=False to start a new head "
            "with head_norm"
        )

    def configure_losses(self) -> None:
        """Cross-entropy (multiclass) or binary cross-entropy with logits (multilabel)."""
        self.criterion: nn.Module = (
            nn.CrossEntropyLoss()
            if self.hparams["task"] == "multiclass"
            else nn.BCEWithLogitsLoss()
        )

    def configure_metrics(self) -> None:
        """Build the train / val / test metric collections."""
        k = self.hparams["num_classes"]
        metrics: dict[str, Metric | MetricCollection]
        if self.hparams["task"] == "multiclass":
            metrics = {
                "OverallAccuracy": MulticlassAccuracy(k, average="micro"),
                "AverageAccuracy": MulticlassAccuracy(k, average="macro"),
                "AverageF1Score": MulticlassF1Score(k, average="macro"),
            }
        else:
            metrics = {
                "OverallAccuracy": MultilabelAccuracy(k, average="micro"),
                "AverageF1Score": MultilabelF1Score(k, average="macro"),
                "MicroAP": MultilabelAveragePrecision(k, average="micro"),
            }
        self._set_metrics(MetricCollection(metrics))

    def embed(self, image: Tensor, wavelengths: Tensor | Sequence[float] | None = None) -> Tensor:
        """Pooled embeddings the head sees (no gradient through a frozen encoder).

        Args:
            image: (B, C, H, W) normalised input.
            wavelengths: C wavelengths (um), a (B, C) tensor of identical rows, or None for
                the configured ones.

        Returns:
            (B, D) pooled embeddings.

        Raises:
            NotNormalisedError: for an integer image or values beyond
                :data:`~torchgeo_dofa.embedder.NORMALISED_LIMIT` (raw reflectance).
        """
        self._check_normalised(image)
        waves = self._wavelengths(image, wavelengths)
        self._fill_unfilled_encoder()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.encoder(image, waves).pooled

    def forward(self, image: Tensor, wavelengths: Tensor | Sequence[float] | None = None) -> Tensor:
        """Classify a batch.

        Args:
            image: (B, C, H, W) normalised input.
            wavelengths: C wavelengths (um), a (B, C) tensor of identical rows, or None for
                the configured ones.

        Returns:
            Logits (B, num_classes).

        Raises:
            NotNormalisedError: for an integer image or values beyond
                :data:`~torchgeo_dofa.embedder.NORMALISED_LIMIT` (raw reflectance).
            ValueError: for a batch of 1 chip in training with ``head_norm``'s BatchNorm.
        """
        embedding = self.embed(image, wavelengths)  # input errors first
        norm = self._head_batch_norm()
        if norm is not None and norm.training and embedding.shape[0] == 1:
            raise ValueError(
                _batch_of_one(
                    "the head's head_norm (an affine-free BatchNorm1d, as MAE's linear probe)",
                    "head_norm=False",
                )
            )
        logits: Tensor = self.head(embedding)
        return logits

    def _target(self, batch: Mapping[str, Any]) -> Tensor:
        """The batch's ``label``, checked against ``task`` and ``num_classes``.

        Shapes are checked for free; the values cost one read of the (small) label tensor,
        before the forward pass (torch's own errors for these are an ``IndexError`` on the
        CPU and a device-side assert on a GPU).

        Raises:
            ValueError: for a batch without ``label``, a label shape of the other ``task``
                (or another count of classes), or values outside the classes.
        """
        if "label" not in batch:
            raise ValueError(
                _missing_target(
                    "DOFAClassificationTask",
                    "label",
                    batch,
                    "mask",
                    "add each chip's class index (task='multiclass') or 0/1 vector per class "
                    "(task='multilabel') to the samples as 'label'",
                )
            )
        label = _tensor(batch["label"])
        chips, k, kind = batch["image"].shape[0], self.hparams["num_classes"], self.hparams["task"]
        shape = tuple(label.shape)
        if kind == "multiclass":
            if label.ndim == 2 and shape[1] == 1:
                label = label.reshape(-1)
            if shape[:1] != (chips,) or label.ndim != 1:
                multilabel = label.ndim == 2 and shape[0] == chips
                fix = (
                    "a 0/1 vector per chip is multilabel data: use task='multilabel'"
                    + (f" with num_classes={shape[1]}" if shape[1] != k else "")
                    if multilabel
                    else "give one class index per chip"
                )
                raise ValueError(
                    f"task='multiclass' needs 'label' as one class index per chip, shape "
                    f"({chips},), but the batch's is {shape}: {fix}"
                )
        elif shape != (chips, k):
            fix = (
                "one class index per chip is multiclass data: use task='multiclass'"
                if label.ndim == 1 or shape == (chips, 1)
                else f"set num_classes={shape[1]}"
                if label.ndim == 2 and shape[0] == chips
                else "give a 0/1 vector of num_classes values per chip"
            )
            raise ValueError(
                f"task='multilabel' needs 'label' as a 0/1 vector per chip, shape ({chips}, "
                f"{k}) (num_classes={k}), but the batch's is {shape}: {fix}"
            )
        target = _class_indices(
            label,
            "labels hold",
            "DOFAClassificationTask takes class indices (task='multiclass') or 0/1 per class "
            "(task='multilabel'), not soft labels or probabilities (a cast would truncate "
            "0.7 to 0): round or threshold them (for example label >= 0.5) in the dataset's "
            "transforms",
        )
        if target.numel():
            low, high = torch.stack([target.min(), target.max()]).tolist()
            top = k - 1 if kind == "multiclass" else 1
            if low < 0 or high > top:
                bad = _values(target[(target < 0) | (target > top)].unique().tolist())
                if kind == "multilabel":
                    raise ValueError(
                        f"task='multilabel' needs 'label' as 0/1 per class, but the batch's "
                        f"labels hold {bad}: mark each class a chip shows with 1 and every "
                        "other with 0 (class indices per chip are multiclass data: use "
                        "task='multiclass')"
                    )
                plausible = 0 <= low and high < _MAX_CLASSES
                fix = f"set num_classes={high + 1} if they are classes, or " if plausible else ""
                raise ValueError(
                    f"the batch's labels hold {bad}, outside the classes 0..{k - 1} "
                    f"(num_classes={k}): {fix}remap the labels to class indices 0..{k - 1} "
                    "(DOFAClassificationTask has no ignore_index: leave chips without a class "
                    "out of the dataset)"
                )
        return target

    def _loss_and_logits(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """Loss, logits and target of the batch's chips that hold data.

        A chip flagged ``empty`` (no valid pixel: no data or fill values only, as
        :class:`~torchgeo_dofa.transforms.CheckReflectance` flags it) is left out before the
        forward pass (so out of ``head_norm``'s batch statistics too), of the loss and of the
        metrics, with one warning: its image says nothing of its label. A batch left without
        a chip, or in training with one under ``head_norm`` (its BatchNorm needs two), gives
        loss 0 (no gradient) and scores nothing.
        """
        target = self._target(batch)  # before the forward pass: a bad label costs none
        held, image, waves = self._chips_with_data(batch)
        if held is not None:
            if not getattr(self, "_warned_of_empty_chips", False):  # once per task
                self._warned_of_empty_chips = True
                _warnings.warn(
                    "chips without a valid pixel (no data or fill values only: 'empty') are "
                    "left out of DOFAClassificationTask's loss and metrics: their image says "
                    "nothing of their label; leave them out of the dataset to silence this"
                )
            norm = self._head_batch_norm()
            if image.shape[0] == 1 and norm is not None and norm.training:
                held[:], image = False, image[:0]  # one chip cannot make batch statistics
            target = target[held]
            if not image.shape[0]:
                nothing = torch.zeros((), device=image.device, requires_grad=self.training)
                k = self.hparams["num_classes"]
                return nothing, image.new_zeros((0, k)), target
        logits = self(image, waves)
        if self.hparams["task"] == "multiclass":
            loss = self.criterion(logits, target)
        else:
            loss = self.criterion(logits, target.float())
        return loss, logits, target

    def _chips_with_data(self, batch: Mapping[str, Any]) -> tuple[Tensor | None, Tensor, Any]:
        """The batch's chips not flagged ``empty``, for the forward pass.

        Returns:
            Which chips (a (B,) bool mask; None where none is empty), their images, and their
            wavelengths (a (B, C) tensor cut to them; the task's own, or one row, kept).
        """
        image, waves = batch["image"], self._batch_wavelengths(batch)
        empty = batch.get("empty")
        if not (isinstance(empty, Tensor) and empty.shape == image.shape[:1] and bool(empty.any())):
            return None, image, waves
        held = ~empty.to(torch.bool)
        if isinstance(waves, Tensor) and waves.ndim == 2:  # (B, C): one row a chip
            waves = waves[held]
        return held, image[held], waves

    def _nothing_scored(self) -> tuple[str, str, str]:
        return (
            "chip with data",
            "every chip was empty (no valid pixel: no data or fill values only)",
            "check that the chips hold data where the file does not declare its nodata",
        )

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        """Class probabilities (softmax) or label probabilities (sigmoid).

        Args:
            batch: the batch dict (``image``, optionally ``wavelengths``).
            batch_idx: index of the batch.

        Returns:
            (B, num_classes) probabilities; NaN rows for chips flagged ``empty`` (no valid
            pixel: their image says nothing of a class), as ``DOFAEmbedder`` gives NaN
            embeddings for them; those chips are not computed.

        Raises:
            ValueError: for ``wavelengths`` other than the task's ``bands`` / ``wavelengths``.
            NonFiniteOutputError: for NaN / infinite logits
                (:func:`~torchgeo_dofa.embedder.check_finite_output`).
        """
        held, image, waves = self._chips_with_data(batch)
        k = self.hparams["num_classes"]
        logits = self(image, waves) if image.shape[0] else image.new_zeros((0, k))
        check_finite_output(logits, type(self).__name__)
        if self.hparams["task"] == "multiclass":
            probabilities = logits.softmax(dim=1)
        else:
            probabilities = logits.sigmoid()
        if held is None:
            return probabilities
        every = probabilities.new_full((held.shape[0], k), math.nan)
        every[held] = probabilities
        return every


DecoderNorm = Literal["group", "batch"]


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    # up to 32 groups of at least 2 channels: the pooling module's 1 x 1 maps leave a group
    # of one channel a single value at batch size 1, which torch's group_norm refuses
    # ("Expected more than 1 value per channel") even in evaluation
    groups = max(g for g in range(1, 33) if channels % g == 0 and channels // g >= 2)
    return nn.GroupNorm(groups, channels)


def _conv_norm_act(cin: int, cout: int, kernel: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
        _norm(norm, cout),
        nn.GELU(),
    )


class PixelMeanLoss(Metric):
    """The mean of a per-pixel loss over every pixel counted in an epoch.

    Each batch adds ``loss * pixels`` and ``pixels`` (summed across processes under DDP);
    :meth:`compute` divides. Unlike Lightning's ``batch_size`` weighting (one int per batch)
    a batch weighs by the pixels its loss was averaged over, so a margin chip with few valid
    pixels (or none: loss 0, weight 0) does not pull the mean towards 0. No device sync per
    step. An epoch without any counted pixel gives NaN.
    """

    full_state_update = False
    total: Tensor
    pixels: Tensor

    def __init__(self, **kwargs: Any) -> None:
        """Start at zero.

        Args:
            **kwargs: passed on to :class:`torchmetrics.Metric`.
        """
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("pixels", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, loss: Tensor, pixels: Tensor) -> None:
        """Add one batch.

        Args:
            loss: the batch's mean loss over its counted pixels (scalar).
            pixels: how many pixels that mean is over (scalar, may be 0).
        """
        self.total += loss.detach().float() * pixels
        self.pixels += pixels

    def compute(self) -> Tensor:
        """The pixel-weighted mean loss (NaN where no pixel was counted)."""
        return self.total / self.pixels


class UPerNetDecoder(nn.Module):
    """A compact UPerNet for ViT features (the BEiT / MAE ViT-UPerNet recipe, slimmed).

    Input: four (B, D, h, w) maps at 1/16 of the image (from four encoder blocks, shallow to
    deep). Each is first projected to ``channels`` (1x1 conv + norm + GELU; the recipe
    deconvolves at width D, projecting first keeps the neck small) and resampled to a pyramid:
    x4 (two 2x2 transposed convs) -> 1/4, x2 -> 1/8, kept -> 1/16, 2x2 max-pool -> 1/32.
    A pyramid pooling module (PPM, bins ``pool_scales``) runs on the 1/32 level, an FPN adds
    each level to the upsampled coarser one and smooths it (3x3 conv), all levels are
    upsampled to 1/4 and fused (3x3 conv), and a 1x1 conv gives the class logits, upsampled
    bilinearly to the requested size.

    Normalisation: GroupNorm by default (up to 32 groups of at least 2 channels). It behaves
    the same in training and evaluation and at any batch size, which suits short runs with
    small batches;
    ``norm="batch"`` gives mmsegmentation's BatchNorm, whose running statistics need many
    steps to settle.
    """

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        channels: int = 256,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        norm: DecoderNorm = "group",
    ) -> None:
        """Build the decoder.

        Args:
            embed_dim: width D of the encoder maps.
            num_classes: number of output classes.
            channels: decoder width (mmsegmentation's ViT-UPerNet uses 512).
            pool_scales: output sizes of the PPM's adaptive average pools.
            dropout: dropout before the classifier.
            norm: ``"group"`` (GroupNorm) or ``"batch"`` (BatchNorm).

        Raises:
            ValueError: for an unknown ``norm``.
        """
        super().__init__()
        if norm not in ("group", "batch"):
            raise ValueError(f"unknown norm {norm!r}: choose 'group' or 'batch'")
        c = channels

        def cna(cin: int, cout: int, kernel: int) -> nn.Sequential:
            return _conv_norm_act(cin, cout, kernel, norm)

        def up2() -> nn.ConvTranspose2d:
            return nn.ConvTranspose2d(c, c, kernel_size=2, stride=2)

        self.neck = nn.ModuleList(
            [
                nn.Sequential(cna(embed_dim, c, 1), up2(), _norm(norm, c), nn.GELU(), up2()),
                nn.Sequential(cna(embed_dim, c, 1), up2()),
                cna(embed_dim, c, 1),
                nn.Sequential(cna(embed_dim, c, 1), nn.MaxPool2d(2, stride=2, ceil_mode=True)),
            ]
        )
        self.ppm = nn.ModuleList(
            [nn.Sequential(nn.AdaptiveAvgPool2d(s), cna(c, c, 1)) for s in pool_scales]
        )
        self.bottleneck = cna(c * (1 + len(pool_scales)), c, 3)
        self.fpn_convs = nn.ModuleList([cna(c, c, 3) for _ in range(3)])
        self.fuse = cna(4 * c, c, 3)
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(c, num_classes, 1))

    def forward(self, maps: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        """Decode four encoder maps into logits.

        Args:
            maps: four (B, D, h, w) maps, shallow to deep.
            size: output (H, W), normally the input image's.

        Returns:
            (B, num_classes, H, W) logits.
        """
        if len(maps) != len(self.neck):
            raise ValueError(f"UPerNetDecoder takes {len(self.neck)} maps, got {len(maps)}")
        feats = [neck(m) for neck, m in zip(self.neck, maps, strict=True)]
        top = feats[-1]
        pooled = [_resize(ppm(top), top.shape[-2:]) for ppm in self.ppm]
        feats[-1] = self.bottleneck(torch.cat([top, *pooled], dim=1))
        for i in range(len(feats) - 1, 0, -1):
            feats[i - 1] = feats[i - 1] + _resize(feats[i], feats[i - 1].shape[-2:])
        outs = [conv(f) for conv, f in zip(self.fpn_convs, feats[:-1], strict=True)]
        outs.append(feats[-1])
        fine = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0]] + [_resize(o, fine) for o in outs[1:]], dim=1))
        return _resize(self.classifier(fused), size)


def _resize(x: Tensor, size: tuple[int, ...] | torch.Size) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class DOFASegmentationTask(_DOFATask):
    """Semantic segmentation with DOFA and a UPerNet decoder.

    Patch maps of ``block_indices`` (default: the ViT-UPerNet choice, (3, 5, 7, 11) for base)
    feed a :class:`UPerNetDecoder`; ``task(image, wavelengths)`` returns logits
    (B, num_classes, H, W) at input resolution.

    Modes: ``linear-probe`` (the GEO-Bench protocol: frozen encoder, kept in eval mode, and a
    trainable decoder) or ``full`` (encoder trains too; ``layer_decay`` as in
    :class:`DOFAClassificationTask`). Encoder parameters the decoder never uses (blocks after
    the last of ``block_indices``, the final norm) are frozen in both modes.

    Loss: cross-entropy, ignoring ``ignore_index``; where the batch has a ``valid`` (B, H, W)
    mask (:class:`torchgeo_dofa.datasets.Sentinel2SR` samples), pixels whose ``valid`` is
    False are left out of the loss and the metrics too, whatever ``ignore_index`` is (with
    ``ignore_index=None`` they get the internal target -100, which no class index can be).
    Metrics: ``OverallAccuracy`` (pixels), ``AverageAccuracy`` and ``AverageJaccardIndex``
    (mIoU). ``decoder_norm="batch"`` needs at least 2 chips per training batch (a batch of 1
    raises a ``ValueError`` naming the fixes); the default GroupNorm takes any batch size.
    """

    def __init__(
        self,
        num_classes: int,
        variant: str = "base",
        weights: str | None = "official",
        mode: Mode = "linear-probe",
        block_indices: list[int] | None = None,
        decoder_channels: int = 256,
        decoder_norm: DecoderNorm = "group",
        ignore_index: int | None = None,
        wavelengths: list[float] | None = None,
        bands: list[str] | None = None,
        interpolate_pos_embed: bool = False,
        layer_decay: float | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        patience: int | None = 10,
    ) -> None:
        """Build the task.

        Args:
            num_classes: number of classes.
            variant: ``base`` or ``large``.
            weights: as :func:`torchgeo_dofa.load_dofa`: ``"official"``, a checkpoint path or
                None (or ``"none"`` / ``"random"``, the command's spelling) for a random
                encoder.
            mode: ``"linear-probe"`` (frozen encoder, trainable decoder) or ``"full"``.
            block_indices: four encoder blocks (0-based, negative counts from the end) whose
                patch maps feed the decoder, shallow to deep; None: the variant's default
                (:data:`DEFAULT_BLOCK_INDICES`).
            decoder_channels: UPerNet width (at least 2).
            decoder_norm: the decoder's normalisation, ``"group"`` (GroupNorm) or ``"batch"``
                (BatchNorm, mmsegmentation's choice); see :class:`UPerNetDecoder`.
            ignore_index: mask value left out of loss and metrics, or None. Pixels whose
                ``valid`` is False are left out either way. A mask raster's nodata value is
                not ignored by itself: give it here.
            wavelengths: fixed wavelengths (um) for batches without ``wavelengths``; a batch
                carrying other wavelengths is refused.
            bands: Sentinel-2 band names to infer those wavelengths from.
            interpolate_pos_embed: accept inputs other than 224 x 224 (multiples of 16).
            layer_decay: layer-wise learning-rate decay factor (``full`` mode), or None; with
                ``linear-probe`` it is ignored, with a warning.
            lr: learning rate (AdamW).
            weight_decay: AdamW weight decay (not applied to biases, norms and tokens).
            patience: ReduceLROnPlateau patience on ``val_loss``; None for a constant rate.

        Raises:
            ValueError: for an unknown mode, ``num_classes`` < 2, bad ``block_indices``,
                ``lr``, ``weight_decay``, ``patience`` or other bad values.
            BandError: for inconsistent ``bands`` / ``wavelengths``.
        """
        name = canonical_variant(variant)
        self._check_common(mode, num_classes, layer_decay, wavelengths, bands)
        self._check_optimizer(lr, weight_decay, patience)
        if num_classes < 2:
            raise ValueError(
                f"segmentation needs num_classes >= 2, got {num_classes}: a mask of one class "
                "against the rest (binary) is num_classes=2, class 0 the background"
            )
        depth = 12 if name == "base" else 24
        indices = DEFAULT_BLOCK_INDICES[name] if block_indices is None else tuple(block_indices)
        if len(indices) != 4 or any(not -depth <= i < depth for i in indices):
            raise ValueError(
                f"block_indices must be four block indices in [-{depth}, {depth}) for DOFA "
                f"{name}, got {block_indices}"
            )
        self.block_indices: tuple[int, ...] = tuple(i % depth for i in indices)
        other = next((v for v, ix in DEFAULT_BLOCK_INDICES.items() if v != name), "")
        if block_indices is not None and self.block_indices == DEFAULT_BLOCK_INDICES.get(other):
            _warnings.warn(  # a base config switched to large: half of the encoder unused
                f"block_indices {list(self.block_indices)} are DOFA {other}'s default, but the "
                f"encoder is DOFA {name} ({depth} blocks): blocks {max(self.block_indices) + 1}"
                f"-{depth - 1} are not used (and frozen); {name}'s default is "
                f"{list(DEFAULT_BLOCK_INDICES[name])} (leave block_indices out, or null in a "
                "config, to take it)",
                UserWarning,
            )
        if decoder_channels < 2:
            raise ValueError(f"decoder_channels must be at least 2, got {decoder_channels}")
        if decoder_norm not in ("group", "batch"):
            raise ValueError(f"unknown decoder_norm {decoder_norm!r}: choose 'group' or 'batch'")
        super().__init__()

    def configure_models(self) -> None:
        """Build the encoder and the decoder."""
        self._build_encoder()
        last = max(self.block_indices)
        for name, param in self.encoder.named_parameters():
            unused_block = name.startswith("backbone.blocks.") and int(name.split(".")[2]) > last
            if unused_block or name.startswith("norm."):
                param.requires_grad_(False)
        self.decoder = UPerNetDecoder(
            self.encoder.embed_dim,
            self.hparams["num_classes"],
            channels=self.hparams["decoder_channels"],
            norm=self.hparams["decoder_norm"],
        )

    @property
    def _ignore_target(self) -> int:
        """Target value the loss and metrics ignore: ``ignore_index``, or -100 if None."""
        ignore = self.hparams["ignore_index"]
        return _IGNORE_INDEX if ignore is None else int(ignore)

    def configure_losses(self) -> None:
        """Cross-entropy ignoring ``ignore_index`` (and ``valid`` False pixels, see ``_target``).

        The criterion sums over pixels; the step divides by the count of pixels it counted.
        """
        self.criterion: nn.Module = nn.CrossEntropyLoss(
            ignore_index=self._ignore_target, reduction="sum"
        )

    def configure_metrics(self) -> None:
        """Build the train / val / test metric collections (ignoring what the loss ignores)."""
        k = self.hparams["num_classes"]
        ignore = self._ignore_target
        metrics = MetricCollection(
            {
                "OverallAccuracy": MulticlassAccuracy(k, average="micro", ignore_index=ignore),
                "AverageAccuracy": MulticlassAccuracy(k, average="macro", ignore_index=ignore),
                "AverageJaccardIndex": MulticlassJaccardIndex(
                    k, average="macro", ignore_index=ignore
                ),
            }
        )
        self._set_metrics(metrics)
        # val_loss / test_loss are means over the pixels counted in the whole epoch: a batch
        # weighs by its counted pixels (Lightning's batch_size weighting is one int per batch,
        # and would let a margin chip's loss of 0 pull the mean down like a full chip's)
        self.val_loss_mean = PixelMeanLoss()
        self.test_loss_mean = PixelMeanLoss()

    def _log_loss(self, split: str, loss: Tensor, logits: Tensor, target: Tensor) -> None:
        if split == "train":
            super()._log_loss(split, loss, logits, target)
            return
        mean = self.val_loss_mean if split == "val" else self.test_loss_mean
        mean.update(loss, (target != self._ignore_target).sum())
        self.log(f"{split}_loss", mean, on_step=False, on_epoch=True)

    def features(
        self, image: Tensor, wavelengths: Tensor | Sequence[float] | None = None
    ) -> list[Tensor]:
        """Encoder maps the decoder sees (no gradient through a frozen encoder).

        Args:
            image: (B, C, H, W) normalised input.
            wavelengths: C wavelengths (um), (B, C) identical rows, or None for the configured.

        Returns:
            Four (B, D, H/16, W/16) maps, in ``block_indices`` order.

        Raises:
            NotNormalisedError: for an integer image or values beyond
                :data:`~torchgeo_dofa.embedder.NORMALISED_LIMIT` (raw reflectance).
        """
        self._check_normalised(image)
        waves = self._wavelengths(image, wavelengths)
        self._fill_unfilled_encoder()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            _, maps = self.encoder.forward_tokens(image, waves, self.block_indices)
        return maps

    def forward(self, image: Tensor, wavelengths: Tensor | Sequence[float] | None = None) -> Tensor:
        """Segment a batch.

        Args:
            image: (B, C, H, W) normalised input.
            wavelengths: C wavelengths (um), (B, C) identical rows, or None for the configured.

        Returns:
            Logits (B, num_classes, H, W).

        Raises:
            NotNormalisedError: for an integer image or values beyond
                :data:`~torchgeo_dofa.embedder.NORMALISED_LIMIT` (raw reflectance).
            ValueError: for a batch of 1 chip in training with ``decoder_norm="batch"``.
        """
        maps = self.features(image, wavelengths)  # input errors first
        if (  # BatchNorm2d proper: SyncBatchNorm (sync_batchnorm=True) pools every rank's
            self.decoder.training
            and image.shape[0] == 1
            and any(type(m) is nn.BatchNorm2d for m in self.decoder.modules())
        ):
            raise ValueError(
                _batch_of_one(
                    "decoder_norm='batch' (BatchNorm2d; the pyramid pooling's 1x1 bin has one "
                    "value per channel and chip)",
                    "decoder_norm='group' (the default)",
                )
            )
        h, w = image.shape[-2:]
        logits: Tensor = self.decoder(maps, (h, w))
        return logits

    def _scored_targets(self, target: Tensor) -> Tensor | int:
        """How many pixels of a batch the metrics score: those not ignored (a tensor)."""
        return (target != self._ignore_target).sum()

    def _target(self, batch: Mapping[str, Any]) -> Tensor:
        """The batch's mask as class indices, ``valid`` False pixels set to the ignored value.

        Shapes are checked for free; the values cost one reduction over the mask, before
        the forward pass (torch's own error for them is an ``IndexError`` on the CPU and a
        device-side assert on a GPU).

        Raises:
            ValueError: for a batch without ``mask``, a mask that is not one class index per
                pixel of the image, or values outside the classes other than ``ignore_index``
                (in pixels whose ``valid`` is not False).
        """
        if "mask" not in batch:
            raise ValueError(
                _missing_target(
                    "DOFASegmentationTask",
                    "mask",
                    batch,
                    "label",
                    "add each chip's (H, W) class map to the samples as 'mask' (for rasters: "
                    "an IntersectionDataset of the image dataset and a mask RasterDataset "
                    "with is_image=False)",
                )
            )
        mask = _tensor(batch["mask"])
        if mask.ndim == 4 and mask.shape[1] == 1:
            mask = mask.squeeze(1)
        chips = batch["image"].shape[0]
        if mask.ndim != 3 or mask.shape[0] != chips:
            raise ValueError(
                f"the batch's mask is {tuple(mask.shape)} but a segmentation target is one "
                f"class index per pixel, ({chips}, H, W) or ({chips}, 1, H, W) for "
                f"{chips} chips: give each chip's mask as a single band of class indices "
                "(not one band per class)"
            )
        image_size = tuple(batch["image"].shape[-2:])
        if tuple(mask.shape[-2:]) != image_size:
            raise ValueError(
                f"the batch's mask is {tuple(mask.shape[-2:])} px but its image is "
                f"{image_size} px: a segmentation target must cover the image pixel for "
                "pixel. A transform resized the image alone (DOFAPreprocess resizes to 224): "
                "normalise without resizing (AttachWavelengths, CheckReflectance and "
                "NormalizeReflectance of torchgeo_dofa.transforms) and sample chips of the "
                "size to train on (224 px, or any multiple of 16 with "
                "interpolate_pos_embed=True)"
            )
        valid = batch.get("valid")
        if valid is not None:
            valid = _tensor(valid)
            if valid.numel() != mask.numel():
                raise ValueError(
                    f"the batch's valid is {tuple(valid.shape)} but its mask is "
                    f"{tuple(mask.shape)}: 'valid' is one bool per mask pixel, True where the "
                    "pixel holds data (a transform changed one of them alone?)"
                )
            valid = valid.reshape(mask.shape).to(device=mask.device, dtype=torch.bool)
        mask = _class_indices(
            mask,
            "mask holds",
            "a segmentation mask is one whole class index per pixel (a cast would truncate "
            "1.5 to class 1): resample mask rasters with nearest neighbour, never bilinear "
            "or averaging (TorchGeo reads is_image=False datasets with nearest), and map a "
            "NaN no-data to ignore_index or mark those pixels False in 'valid'",
            keep=valid,
        )
        if valid is not None:
            mask = mask.masked_fill(~valid, self._ignore_target)
        k, ignore = self.hparams["num_classes"], self._ignore_target
        outside = ((mask < 0) | (mask >= k)) & (mask != ignore)
        if bool(outside.any()):
            found = mask[outside].unique().tolist()
            given = self.hparams["ignore_index"]
            fixes = []
            values = [v for v in found if v != _NAN_AS_INT64]
            if len(values) < len(found):
                fixes.append(
                    f"{_NAN_AS_INT64} is what NaN becomes when cast to an integer (TorchGeo "
                    "reads is_image=False datasets as int64): write the mask raster as "
                    "integers with a nodata value (e.g. 255) and set ignore_index to it"
                )
            if values:  # besides the NaN cast
                bad = _values(values)
                if given is None and len(values) == 1:
                    fixes.append(
                        f"if {bad} marks no-data pixels, set ignore_index={bad} (pixels equal "
                        "to ignore_index are left out of the loss and metrics; a mask raster's "
                        "nodata value is not ignored by itself)"
                    )
                elif given is None:
                    fixes.append(
                        "if some mark no-data pixels, map those to one value and set "
                        "ignore_index to it (pixels equal to ignore_index are left out of the "
                        "loss and metrics)"
                    )
                else:
                    fixes.append(
                        f"if some mark no-data pixels, map those to ignore_index={given}"
                        + (f" (or set ignore_index={bad})" if len(values) == 1 else "")
                    )
                if min(values) >= 0 and max(values) < _MAX_CLASSES:
                    fixes.append(f"if they are classes, set num_classes={max(values) + 1}")
            setting = f"num_classes={k}" + (f", ignore_index={given}" if given is not None else "")
            raise ValueError(
                f"the batch's mask holds {_values(found)}, outside the classes 0..{k - 1} "
                f"({setting}): " + "; ".join(fixes)
            )
        return mask

    def _loss_and_logits(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        target = self._target(batch)  # before the forward pass: a bad mask costs none
        logits = self(batch["image"], self._batch_wavelengths(batch))
        # the mean over counted pixels; a batch without any (all no-data or ignored) gives
        # 0 with zero gradients, not the NaN of 0 / 0, which would poison val_loss and the
        # learning-rate schedule (and no device sync: the count is clamped, not tested)
        counted = (target != self._ignore_target).sum().clamp(min=1)
        return self.criterion(logits, target) / counted, logits, target

    def _metric_inputs(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        return logits.argmax(dim=1), target

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        """Per-pixel class probabilities.

        Args:
            batch: the batch dict (``image``, optionally ``wavelengths``).
            batch_idx: index of the batch.

        Returns:
            (B, num_classes, H, W) softmax probabilities.

        Raises:
            ValueError: for ``wavelengths`` other than the task's ``bands`` / ``wavelengths``.
            NonFiniteOutputError: for NaN / infinite logits
                (:func:`~torchgeo_dofa.embedder.check_finite_output`).
        """
        logits = self(batch["image"], self._batch_wavelengths(batch))
        check_finite_output(logits, type(self).__name__)
        return logits.softmax(dim=1)
