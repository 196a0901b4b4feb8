"""Fine-tuning tasks: real Lightning training on synthetic spectral data (CPU, no mocks).

Speed: a random DOFA base with small inputs (32 x 32 via ``interpolate_pos_embed``), few
chips, few epochs. A random frozen encoder still separates spectrally distinct chips for a
linear probe. For segmentation, patch tokens of a random encoder carry almost no input signal
(the patch embedding scales its generated weights by 0.01, so the fixed position embedding
dominates), so the segmentation runs use a random checkpoint whose weight generator is scaled
up 10x, so that tokens carry the input, as a trained encoder's do; that also exercises
``weights=PATH``.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch import (
    Callback,
    LightningDataModule,
    LightningModule,
    Trainer,
    seed_everything,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from rasterio.enums import ColorInterp
from rasterio.transform import from_origin
from torch.utils.data import DataLoader
from torchgeo.datamodules import NonGeoDataModule
from torchgeo.datasets import IntersectionDataset, RasterDataset, stack_samples
from torchgeo.samplers import GriddedPatchSampler, RandomPatchSampler

from tests.checkpoints import official_state_dict, random_encoder, write_checkpoint
from tests.ddp import DDP_ENV, rendezvous_port, usable_memory
from torchgeo_dofa.bands import DOFA_S2_BANDS, BandError
from torchgeo_dofa.datasets import InputError
from torchgeo_dofa.embedder import NotNormalisedError
from torchgeo_dofa.synthetic import (
    EUROSAT_BANDS,
    SpectralChips,
    SpectralDataModule,
    class_spectra,
    normalise_reflectance,
)
from torchgeo_dofa.tasks import (
    TRAINED_ON_LABELS_KEY,
    TRAINED_WAVELENGTHS_KEY,
    DOFAClassificationTask,
    DOFASegmentationTask,
    NoLabelledPixelError,
    NoTrainingBatchError,
    UPerNetDecoder,
    layer_id,
    wavelengths_for_bands,
)
from torchgeo_dofa.transforms import ReflectanceWarning
from torchgeo_dofa.weights import CheckpointError

CONFIGS = Path(__file__).resolve().parents[1] / "torchgeo_dofa" / "configs"
RGBN = ["B4", "B3", "B2", "B8"]
S2 = list(DOFA_S2_BANDS)


class Recorder(Callback):
    """Training losses per batch, and the encoder's / head's mode during each batch."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.encoder_training: list[bool] = []
        self.trainable_training: list[bool] = []

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self.encoder_training.append(pl_module.encoder.training)
        head = getattr(pl_module, "head", None) or pl_module.decoder
        self.trainable_training.append(head.training)

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.losses.append(float(outputs["loss"]))


def make_trainer(root: Path, epochs: int, callbacks: list[Callback], **kwargs: Any) -> Trainer:
    return Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        callbacks=callbacks,
        **kwargs,
    )


def encoder_state(task: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in task.encoder.state_dict().items()}


def changed_keys(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in before if not torch.equal(before[k], after[k])]


def metric(trainer: Trainer, name: str) -> float:
    return float(trainer.callback_metrics[name])


# ------------------------------------------------------------------------------------------
# classification: one linear-probe run on 13-band EuroSAT-style chips, shared by several tests
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("probe")
    seed_everything(0)
    dm = SpectralDataModule(batch_size=16, num_classes=4, size=32, num_samples=64)
    task = DOFAClassificationTask(
        num_classes=4, weights=None, interpolate_pos_embed=True, lr=1e-3, patience=None
    )
    before = encoder_state(task)
    recorder = Recorder()
    trainer = make_trainer(root, 4, [recorder])
    start = time.perf_counter()
    trainer.fit(task, dm)
    seconds = time.perf_counter() - start
    path = root / "probe.ckpt"
    trainer.save_checkpoint(path)
    return {
        "task": task,
        "dm": dm,
        "trainer": trainer,
        "recorder": recorder,
        "before": before,
        "path": path,
        "seconds": seconds,
    }


def test_linear_probe_learns_13_bands(probe: dict[str, Any]) -> None:
    losses = probe["recorder"].losses
    assert len(losses) == 4 * 4
    assert probe["dm"].bands == EUROSAT_BANDS  # 13 bands, B10 included
    assert losses[0] > 0.8 * math.log(4)  # starts near chance
    last_epoch = float(np.mean(losses[-4:]))
    assert last_epoch < 0.5 * losses[0], losses
    assert metric(probe["trainer"], "val_OverallAccuracy") >= 0.75  # chance: 0.25
    print(
        f"probe: loss {losses[0]:.3f} -> {last_epoch:.3f}, val acc "
        f"{metric(probe['trainer'], 'val_OverallAccuracy'):.3f}, {probe['seconds']:.1f} s"
    )


def test_linear_probe_freezes_encoder(probe: dict[str, Any]) -> None:
    task = probe["task"]
    assert not changed_keys(probe["before"], encoder_state(task))
    assert not any(p.requires_grad for p in task.encoder.parameters())
    assert all(p.requires_grad for p in task.head.parameters())
    rec = probe["recorder"]
    assert rec.encoder_training and not any(rec.encoder_training)  # eval during training
    assert all(rec.trainable_training)
    task.train()
    assert not task.encoder.training and task.head.training


def test_checkpoint_reload_predicts_identically(probe: dict[str, Any]) -> None:
    task = probe["task"].eval()
    batch = next(iter(probe["dm"].val_dataloader()))
    with torch.no_grad():
        expected = task(batch["image"], batch["wavelengths"])
    loaded = DOFAClassificationTask.load_from_checkpoint(probe["path"])
    assert not loaded.training
    assert loaded.hparams["num_classes"] == 4 and loaded.hparams["weights"] is None
    with torch.no_grad():
        got = loaded(batch["image"], batch["wavelengths"])
    assert torch.equal(got, expected)
    assert expected.argmax(1).eq(batch["label"]).float().mean() >= 0.75


def test_a_python_load_of_the_wrong_checkpoint_names_the_fix(
    probe: dict[str, Any], tmp_path: Path
) -> None:
    """They were Lightning's "blocked to prevent arbitrary code execution ... import the
    module", torch's raw size mismatch and "PytorchStreamReader failed"."""
    path = probe["path"]
    with pytest.raises(
        CheckpointError,
        match=r"is a checkpoint of DOFAClassificationTask, not of DOFASegmentationTask: load "
        r"it with DOFAClassificationTask.load_from_checkpoint",
    ):
        DOFASegmentationTask.load_from_checkpoint(path)
    with pytest.raises(
        CheckpointError,
        match=r"with num_classes changed \(size mismatch for head.*torch.Size\(\[4, 768\]\).*"
        r"fine-tune a new task from its encoder: DOFAClassificationTask\(\.\.\., weights=",
    ):
        DOFAClassificationTask.load_from_checkpoint(path, num_classes=10)
    with pytest.raises(  # it said "for another number of classes"
        CheckpointError,
        match=r"with variant changed \(size mismatch .*: a checkpoint restores the task it "
        r"saved: load it without variant, or fine-tune a new task from its encoder",
    ):
        DOFAClassificationTask.load_from_checkpoint(path, variant="large")
    # a head saved as integers loaded truncated, silently
    saved = torch.load(path, map_location="cpu", weights_only=False)
    key = next(k for k in saved["state_dict"] if k.startswith("head.") and "weight" in k)
    saved["state_dict"][key] = saved["state_dict"][key].to(torch.int32)
    del saved["torchgeo_dofa_state_crc32"]  # as the CRC's own message says for an edit
    ints = tmp_path / "ints.ckpt"
    torch.save(saved, ints)
    with pytest.raises(
        CheckpointError, match=rf"holds 1 entry that are not dense .*: {key} \(int32"
    ):
        DOFAClassificationTask.load_from_checkpoint(ints)
    half = tmp_path / "half.ckpt"
    half.write_bytes(path.read_bytes()[:1_000_000])
    with pytest.raises(
        CheckpointError, match=r"half.ckpt is not a readable PyTorch checkpoint \(truncated"
    ):
        DOFAClassificationTask.load_from_checkpoint(half)


def test_a_trainer_given_the_other_task_s_checkpoint_names_it(
    probe: dict[str, Any], tmp_path: Path
) -> None:
    """``Trainer(...).predict(segmentation_task, ckpt_path=classification.ckpt)`` said
    "does not fit DOFASegmentationTask as configured: Missing key(s) in state_dict:
    "decoder...." (torch's key lists); it names the checkpoint's task now, as
    ``load_from_checkpoint`` does."""
    chips = SpectralChips(num_classes=4, bands=list(EUROSAT_BANDS), size=32, num_samples=2)
    loader = DataLoader(chips, batch_size=2, collate_fn=stack_samples)
    task = DOFASegmentationTask(num_classes=4, weights=None)
    with pytest.raises(
        CheckpointError,
        match=rf"^{re.escape(str(probe['path']))} is a checkpoint of DOFAClassificationTask, "
        r"not of DOFASegmentationTask: load it with DOFAClassificationTask",
    ):
        make_trainer(tmp_path, 1, []).predict(task, loader, ckpt_path=probe["path"])


def test_a_checkpoint_records_its_bands_and_other_bands_predict_with_a_warning(
    probe: dict[str, Any], tmp_path: Path
) -> None:
    """A task checkpoint recorded no bands: a 13-band probe predicted 4-band chips without a
    word (DOFA's encoder takes any wavelengths; the head never saw those features)."""
    saved = torch.load(probe["path"], map_location="cpu", weights_only=False)
    expected = [round(v, 4) for v in wavelengths_for_bands(list(EUROSAT_BANDS))]
    assert saved[TRAINED_WAVELENGTHS_KEY] == [expected]

    def predict(bands: list[str], path: Path) -> list[warnings.WarningMessage]:
        chips = SpectralChips(num_classes=4, bands=bands, size=32, num_samples=4)
        loader = DataLoader(chips, batch_size=2, collate_fn=stack_samples)
        task = DOFAClassificationTask(num_classes=4, weights=None, interpolate_pos_embed=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_trainer(tmp_path, 1, []).predict(task, loader, ckpt_path=path)
        return [w for w in caught if "was trained on" in str(w.message)]

    assert predict(list(EUROSAT_BANDS), probe["path"]) == []
    # the same bands in another order: DOFA's output does not change (checked below), so no
    # warning (a file read in its own band order by a dataset that sorts them warned)
    assert predict(list(EUROSAT_BANDS)[::-1], probe["path"]) == []
    chips = SpectralChips(num_classes=4, bands=list(EUROSAT_BANDS), size=32, num_samples=2)
    batch = stack_samples([chips[0], chips[1]])
    with torch.no_grad():
        task = probe["task"].eval()
        given = task(batch["image"], batch["wavelengths"])
        flipped = task(batch["image"].flip(1), batch["wavelengths"].flip(1))
    assert torch.allclose(given, flipped, atol=1e-5), (given - flipped).abs().max()
    (other,) = predict(RGBN, probe["path"])  # once, though both batches carry them
    assert str(other.message).startswith(
        "DOFAClassificationTask was trained on 13 bands at 0.443, 0.49, 0.56, 0.665, 0.705, "
        "0.74, 0.783, 0.842, 0.945, 1.375, 1.61, 2.19, 0.865 um, and these chips carry 4 bands "
        "at 0.665, 0.56, 0.49, 0.842 um: "
    ), other.message
    assert "in that order" not in str(other.message)
    assert other.filename == __file__  # the caller's line, not the package's
    # a checkpoint saved before any training batch records an empty list, not nothing: a
    # fit resumed from it went on unrecorded (taken for an earlier release's)
    untrained = tmp_path / "untrained.ckpt"
    task = DOFAClassificationTask(num_classes=4, weights=None, interpolate_pos_embed=True)
    trainer = make_trainer(tmp_path, 1, [])
    trainer.strategy.connect(task)
    trainer.save_checkpoint(untrained)
    assert torch.load(untrained, weights_only=False)[TRAINED_WAVELENGTHS_KEY] == []
    resumed = make_trainer(tmp_path, 1, [], limit_train_batches=1, limit_val_batches=0)
    small = SpectralDataModule(batch_size=2, num_classes=4, size=32, num_samples=4)
    resumed.fit(task, small, ckpt_path=untrained)
    assert task._trained_wavelengths == {tuple(expected)}
    del saved[TRAINED_WAVELENGTHS_KEY]  # a checkpoint of an earlier release: unchecked
    older = tmp_path / "older.ckpt"
    torch.save(saved, older)
    assert predict(RGBN, older) == []


def test_a_task_records_every_band_set_it_trained_on(tmp_path: Path) -> None:
    """Batches of two sensors in one fit (datasets of 4 and 9 bands): both sets are recorded,
    so neither predicts with a warning; a task never trained has nothing to compare with."""
    sensors = [SpectralChips(num_classes=2, bands=b, size=32, num_samples=2) for b in (RGBN, S2)]
    batches: Any = [stack_samples([chips[0], chips[1]]) for chips in sensors]
    both = DataLoader(batches, batch_size=None)
    task = DOFAClassificationTask(
        num_classes=2, weights=None, interpolate_pos_embed=True, patience=None
    )
    trainer = make_trainer(tmp_path, 1, [], limit_val_batches=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.predict(task, DataLoader(batches[:1], batch_size=None))  # untrained: unchecked
        trainer.fit(task, train_dataloaders=both)
        trainer.predict(task, both)
    assert not [w for w in caught if "was trained on" in str(w.message)]
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    recorded = torch.load(tmp_path / "two.ckpt", weights_only=False)[TRAINED_WAVELENGTHS_KEY]
    assert sorted(map(len, recorded)) == [4, 9]


#: 2-process DDP fits on the CPU: a classification whose ranks train on other bands (rank 0:
#: 4 bands, rank 1: 9), validating after its first batch and saving every checkpoint in the
#: folder argv[3], then the checkpoint named by argv[1]; a segmentation whose labels
#: are all in rank 1's chips, validating after its first batch (val_check_interval=0.5) and
#: saving every checkpoint in the folder argv[2]. Lightning's launcher runs it as rank 1.
#: Each fit stops at that validation (max_steps=1): inside its 2-batch epoch, as a validation
#: of a longer fit is, and the checkpoints the test reads are those it saves and the fit's end.
_DDP_FIT = """
import sys
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset
from torchgeo.datasets import stack_samples
from torchgeo_dofa.bands import DOFA_S2_BANDS
from torchgeo_dofa.synthetic import SpectralChips
from torchgeo_dofa.tasks import DOFAClassificationTask

class PerRank(Dataset):
    sets = [SpectralChips(num_classes=2, bands=b, size=32, num_samples=2)
            for b in (["B4", "B3", "B2", "B8"], list(DOFA_S2_BANDS))]

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return self.sets[torch.distributed.get_rank()][i % 2]

task = DOFAClassificationTask(num_classes=2, weights=None, interpolate_pos_embed=True,
                              patience=None)
chips = DataLoader(PerRank(), batch_size=2, collate_fn=stack_samples)
trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=False,
                  enable_progress_bar=False, enable_model_summary=False,
                  val_check_interval=0.5, limit_val_batches=1, num_sanity_val_steps=0,
                  callbacks=[ModelCheckpoint(dirpath=sys.argv[3], save_top_k=-1)])
trainer.fit(task, chips, chips)
trainer.save_checkpoint(sys.argv[1])

from torchgeo_dofa.tasks import DOFASegmentationTask

class LabelsOnRank1(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        mask = torch.full((32, 32), 255, dtype=torch.long)
        if torch.distributed.get_rank() == 1:
            mask[:8] = 1
        image = torch.full((4, 32, 32), -0.4) + 0.1 * torch.randn(4, 32, 32)
        return {"image": image, "wavelengths": torch.tensor([0.665, 0.56, 0.49, 0.842]),
                "mask": mask}

chips = DataLoader(LabelsOnRank1(), batch_size=2, collate_fn=stack_samples)
task = DOFASegmentationTask(num_classes=3, weights=None, interpolate_pos_embed=True,
                            decoder_channels=32, patience=None, ignore_index=255)
trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=False,
                  enable_progress_bar=False, enable_model_summary=False,
                  val_check_interval=0.5, num_sanity_val_steps=0,
                  callbacks=[ModelCheckpoint(dirpath=sys.argv[2], save_top_k=-1)])
trainer.fit(task, chips, chips)
"""


@pytest.mark.skipif(
    usable_memory() < 6 * 2**30,
    reason="two DDP processes with DOFA base need ~3 GB beside the test process",
)
def test_ddp_ranks_training_on_other_bands_or_labels_are_all_recorded(tmp_path: Path) -> None:
    """Each process recorded its own batches' bands, and rank 0 saves the checkpoint: a set
    only rank 1 trained on was missing, and predicting on it warned. Likewise labels only in
    rank 1's chips: the checkpoint of a validation inside the first epoch said none were
    scored, so a fit resumed from it on unlabelled chips was refused as a first epoch."""
    script = tmp_path / "ddp_fit.py"
    script.write_text(_DDP_FIT)
    env = {k: v for k, v in os.environ.items() if k not in DDP_ENV}
    env |= {"MASTER_PORT": str(rendezvous_port()), "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, str(script), *(str(tmp_path / n) for n in ("ddp.ckpt", "seg", "cls"))],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for path in (tmp_path / "ddp.ckpt", tmp_path / "cls" / "epoch=0-step=1.ckpt"):
        saved = torch.load(path, weights_only=False)[TRAINED_WAVELENGTHS_KEY]
        assert sorted(map(len, saved)) == [4, 9], (path.name, saved)
    inner = torch.load(tmp_path / "seg" / "epoch=0-step=1.ckpt", weights_only=False)
    assert inner[TRAINED_ON_LABELS_KEY] is True


# ------------------------------------------------------------------------------------------
# classification: bands, wavelengths, multilabel, full fine-tuning, layer decay
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_task() -> DOFAClassificationTask:
    torch.manual_seed(0)
    return DOFAClassificationTask(
        num_classes=3, weights=None, interpolate_pos_embed=True, bands=list(DOFA_S2_BANDS)
    ).eval()


@pytest.mark.parametrize("bands", [RGBN, list(DOFA_S2_BANDS), list(EUROSAT_BANDS)])
def test_same_task_takes_4_9_13_bands(small_task: DOFAClassificationTask, bands: list[str]) -> None:
    ds = SpectralChips(num_classes=3, bands=bands, size=32, num_samples=2)
    image = torch.stack([ds[0]["image"], ds[1]["image"]])
    waves = ds.wavelengths
    with torch.no_grad():
        per_batch = small_task(image, waves.expand(2, -1))
        shared = small_task(image, waves)
    assert per_batch.shape == (2, 3)
    assert torch.allclose(per_batch, shared)
    if len(bands) != len(DOFA_S2_BANDS):  # hparam bands (9) do not fit this input
        with pytest.raises(BandError, match="wavelengths"):
            small_task(image)


def test_fixed_wavelengths_and_their_errors(small_task: DOFAClassificationTask) -> None:
    ds = SpectralChips(num_classes=3, bands=DOFA_S2_BANDS, size=32, num_samples=2)
    image = ds[0]["image"][None]
    with torch.no_grad():
        assert torch.allclose(small_task(image), small_task(image, ds.wavelengths))
    task = DOFAClassificationTask(num_classes=3, weights=None, interpolate_pos_embed=True)
    with pytest.raises(BandError, match="no wavelengths"):
        task(image)
    with pytest.raises(ValueError, match="224x224"):
        DOFAClassificationTask(num_classes=3, weights=None)(image, ds.wavelengths)
    with pytest.raises(ValueError, match="mode"):
        DOFAClassificationTask(num_classes=3, weights=None, mode="frozen")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="variant"):
        DOFAClassificationTask(num_classes=3, variant="huge", weights=None)
    assert wavelengths_for_bands(["B10", "B04", "B8A"]) == [1.375, 0.665, 0.865]


class _ClaimsBatches(torch.utils.data.Sampler[int]):
    """A sampler whose length promises chips it never yields (as a random geo sampler over
    areas smaller than its chips does: its length counts areas, its draws find no room)."""

    def __len__(self) -> int:
        return 4

    def __iter__(self) -> Iterator[int]:
        return iter(())


def test_a_fit_without_a_training_step_is_an_error_not_a_finished_fit(tmp_path: Path) -> None:
    """A fit whose training loader gave no batch returned normally: nothing learnt, no
    checkpoint. Now NoTrainingBatchError (a ValueError) at its end, whether the loader's
    length says so (Lightning's "No training batches") or promises batches it never
    yields; a fit asked for no training (max_epochs=0) is left alone."""
    chips = SpectralChips(num_classes=3, bands=RGBN, size=32, num_samples=4)
    task = DOFAClassificationTask(
        num_classes=3, weights=None, interpolate_pos_embed=True, patience=None
    )
    empty = DataLoader(chips, batch_size=2, sampler=_ClaimsBatches())
    none = DataLoader(chips, batch_size=8, drop_last=True)  # 4 chips: no whole batch
    for loader in (empty, none):
        with pytest.raises(NoTrainingBatchError, match="^fit ran no training step"):
            make_trainer(tmp_path, 1, []).fit(task, loader)
    make_trainer(tmp_path, 0, []).fit(task, none)  # asked for none: Lightning's own way
    # helper-111: with validation after the empty epoch, ModelCheckpoint saved the untrained
    # task as last.ckpt (NaN metrics), which predict then took; now refused before the file
    ckpts = tmp_path / "untrained"
    saving = ModelCheckpoint(dirpath=ckpts, save_last=True)
    trainer = Trainer(
        accelerator="cpu", max_epochs=1, logger=False, callbacks=[saving],
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    with pytest.raises(NoTrainingBatchError, match="^fit ran no training step"):
        trainer.fit(task, empty, DataLoader(chips, batch_size=2))
    assert not list(ckpts.glob("*.ckpt")), list(ckpts.iterdir())

    class SaveTheStart(Callback):  # helper-114: the starting weights, saved by the user
        def on_train_start(self, trainer: Trainer, *args: Any) -> None:
            trainer.save_checkpoint(tmp_path / "start.ckpt")

    fresh = DOFAClassificationTask(
        num_classes=3, weights=None, interpolate_pos_embed=True, patience=None
    )
    make_trainer(tmp_path, 1, [SaveTheStart()], limit_train_batches=1).fit(
        fresh, DataLoader(chips, batch_size=2)
    )
    assert (tmp_path / "start.ckpt").is_file()
    # resumed: into an empty loader, an error as well (it was taken for a finished run); a
    # run that had reached its limits trains nothing, with a warning
    trained = make_trainer(tmp_path, 1, [])
    trained.fit(task, DataLoader(chips, batch_size=2))
    trained.save_checkpoint(tmp_path / "epoch1.ckpt")
    with pytest.raises(NoTrainingBatchError, match="^fit ran no training step"):
        make_trainer(tmp_path, 2, []).fit(task, none, ckpt_path=tmp_path / "epoch1.ckpt")
    with pytest.warns(UserWarning, match="^fit trained nothing: the run resumed had already"):
        make_trainer(tmp_path, 1, []).fit(task, none, ckpt_path=tmp_path / "epoch1.ckpt")

    class OwnStep(DOFAClassificationTask):  # a training step of its own: not counted, so
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:  # not judged
            return self._step(batch, "train", self.train_metrics)

    own = OwnStep(num_classes=3, weights=None, interpolate_pos_embed=True, patience=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, 1, [], limit_train_batches=1).fit(own, DataLoader(chips, 2))
    assert not [w for w in caught if "trained nothing" in str(w.message)]


@pytest.mark.parametrize(
    ("task", "settings", "error"),
    [
        (DOFASegmentationTask, {"num_classes": 1}, "segmentation needs num_classes >= 2, got 1"),
        (DOFAClassificationTask, {"num_classes": 1, "task": "multilabel"},
         "multilabel needs num_classes >= 2 labels, got 1"),
        (DOFAClassificationTask, {"weight_decay": -1.0},
         "weight_decay must be a finite number >= 0, got -1.0"),
        (DOFASegmentationTask, {"weight_decay": math.nan},
         "weight_decay must be a finite number >= 0, got nan"),
        (DOFAClassificationTask, {"lr": 0.0}, "lr must be a positive, finite learning rate"),
        (DOFASegmentationTask, {"lr": -1e-3}, "lr must be a positive, finite learning rate"),
        (DOFAClassificationTask, {"patience": -3}, "patience must be a number of epochs >= 0"),
    ],
)  # fmt: skip
def test_settings_that_train_nothing_or_wrong_are_refused_when_the_task_is_made(
    task: type[Any], settings: dict[str, Any], error: str
) -> None:
    """Accepted before: a segmentation of num_classes=1 failed later inside torchmetrics (a
    traceback from the command); weight_decay=-1 reached AdamW's parameter groups (AdamW
    checks only its default) and grew the weights; patience=-3 made ReduceLROnPlateau cut
    the rate every epoch while the loss fell; lr=0 trained nothing. Refused as the task is
    made, before any model is built; the same settings at their edges are accepted."""
    base = {"num_classes": 3, "weights": None} | settings
    with pytest.raises(ValueError, match="^" + re.escape(error)):
        task(**base)
    for edge in ({"weight_decay": 0.0}, {"patience": 0}, {"patience": None}, {"lr": 1e-8}):
        task(num_classes=2, weights=None, **edge)  # no encoder built until configure_models


@pytest.mark.parametrize("name", ["lr", "weight_decay", "patience"])
@pytest.mark.parametrize("true", [True, np.True_, torch.tensor(True)], ids=["py", "np", "pt"])
def test_a_bool_is_not_taken_for_a_number_in_the_optimiser_settings(name: str, true: Any) -> None:
    """``lr=True`` (a bool is the number 1; numpy's and a bool tensor likewise) was accepted
    and trained at a rate of 1."""
    with pytest.raises(TypeError, match=f"^{name} must be a number, got the bool True$"):
        DOFAClassificationTask(num_classes=2, weights=None, **{name: true})


def test_a_batch_holding_nan_is_refused_before_it_poisons_the_weights(
    small_task: DOFAClassificationTask,
) -> None:
    """One NaN pixel (no-data left unfilled) made the loss NaN, and after one AdamW step
    every weight of the model."""
    ds = SpectralChips(num_classes=3, bands=DOFA_S2_BANDS, size=32, num_samples=2)
    image = torch.stack([ds[0]["image"], ds[1]["image"]])
    image[0, :, 3, 3] = float("nan")
    with pytest.raises(NotNormalisedError, match=r"holds 9 NaN or infinite value\(s\)"):
        small_task(image, ds.wavelengths)


class BandlessChips(SpectralChips):
    """EuroSAT-like: samples without ``wavelengths`` (TorchGeo's datasets never add them)."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = super().__getitem__(index)
        del sample["wavelengths"]
        return sample


class BandlessDataModule(NonGeoDataModule):
    """Like TorchGeo's EuroSATDataModule: ``bands`` only as a dataset argument."""

    def __init__(self, bands: list[str]) -> None:
        super().__init__(BandlessChips, 4, 0, bands=bands, size=32, num_samples=8)
        self.aug = lambda batch: batch


def test_wavelengths_from_datamodule_bands(tmp_path: Path) -> None:
    task = DOFAClassificationTask(num_classes=4, weights=None, interpolate_pos_embed=True)
    trainer = make_trainer(tmp_path, 1, [], limit_val_batches=1)
    dm = BandlessDataModule(RGBN)
    trainer.validate(task, dm, verbose=False)
    assert "val_loss" in trainer.callback_metrics
    assert torch.allclose(task._default_wavelengths(), torch.tensor([0.665, 0.56, 0.49, 0.842]))


def test_multilabel_learns(tmp_path: Path) -> None:
    seed_everything(0)
    dm = SpectralDataModule(
        batch_size=16,
        task="multilabel",
        num_classes=4,
        size=32,
        num_samples=48,
        bands=list(DOFA_S2_BANDS),
    )
    task = DOFAClassificationTask(
        num_classes=4,
        task="multilabel",
        weights=None,
        interpolate_pos_embed=True,
        lr=1e-3,
        patience=None,
    )
    recorder = Recorder()
    trainer = make_trainer(tmp_path, 3, [recorder])
    trainer.fit(task, dm)
    losses = recorder.losses
    assert isinstance(task.criterion, torch.nn.BCEWithLogitsLoss)
    assert float(np.mean(losses[-3:])) < 0.85 * losses[0], losses
    val_set = dm.val_dataset
    assert isinstance(val_set, SpectralChips)
    labels = torch.stack([val_set[i]["label"] for i in range(len(val_set))])
    prior = float(labels.float().mean())  # mAP of an uninformed ranking
    assert metric(trainer, "val_MicroAP") > prior + 0.15
    probs = task.predict_step(next(iter(dm.val_dataloader())), 0)
    assert probs.shape == (len(val_set), 4) and bool(((probs >= 0) & (probs <= 1)).all())


def test_full_mode_changes_encoder(tmp_path: Path) -> None:
    seed_everything(0)
    dm = SpectralDataModule(batch_size=4, num_classes=3, size=32, num_samples=8, bands=RGBN)
    task = DOFAClassificationTask(
        num_classes=3,
        weights=None,
        mode="full",
        interpolate_pos_embed=True,
        layer_decay=0.75,
        lr=1e-3,  # and the default patience: no validation, so no val_loss to follow
    )
    before = encoder_state(task)
    recorder = Recorder()
    trainer = make_trainer(tmp_path, 1, [recorder], limit_train_batches=1, limit_val_batches=0)
    with pytest.warns(RuntimeWarning, match="val_loss which is not available"):
        trainer.fit(task, dm)  # failed after the epoch (MisconfigurationException)
    changed = changed_keys(before, encoder_state(task))
    assert any(k.startswith("backbone.blocks.0.") for k in changed)
    assert any(k.startswith("backbone.blocks.11.") for k in changed)
    assert any(k.startswith("backbone.patch_embed.") for k in changed)
    assert "norm.weight" in changed
    assert "backbone.pos_embed" not in changed  # fixed sin/cos table
    assert not any(k.startswith("backbone.fc_norm.") for k in changed)  # unused, frozen
    assert recorder.encoder_training == [True]


@pytest.mark.parametrize("kind", ["multiclass", "multilabel"])
def test_linear_probe_batch_of_one_chip(tmp_path: Path, kind: Any) -> None:
    """head_norm's BatchNorm1d cannot train on 1 chip: a named error before the head runs,
    not torch's 'Expected more than 1 value per channel'; evaluation takes batches of 1."""
    seed_everything(0)
    task_kind: Any = "multilabel" if kind == "multilabel" else "classification"
    dm = SpectralDataModule(
        batch_size=1, task=task_kind, num_classes=4, size=32, num_samples=8, bands=RGBN
    )
    probe = DOFAClassificationTask(
        num_classes=4, task=kind, weights=None, interpolate_pos_embed=True, patience=None
    )
    trainer = make_trainer(tmp_path, 1, [], limit_train_batches=2, limit_val_batches=0)
    with pytest.raises(
        ValueError,
        match=r"training batch of 1 chip: the head's head_norm \(an affine-free BatchNorm1d.*"
        r"batch_size >= 2 and drop_last=True in the DataLoader.*or head_norm=False",
    ):
        trainer.fit(probe, dm)
    trainer = make_trainer(tmp_path, 1, [], limit_val_batches=2, limit_predict_batches=2)
    trainer.validate(probe, dm, verbose=False)
    assert "val_loss" in trainer.callback_metrics
    predictions: Any = trainer.predict(probe, dm)
    assert [p.shape for p in predictions] == [(1, 4), (1, 4)]
    plain = DOFAClassificationTask(
        num_classes=4,
        task=kind,
        weights=None,
        interpolate_pos_embed=True,
        head_norm=False,
        patience=None,
    )
    recorder = Recorder()
    make_trainer(tmp_path, 1, [recorder], limit_train_batches=2, limit_val_batches=0).fit(plain, dm)
    assert len(recorder.losses) == 2


def test_resuming_from_a_diverged_optimizer_state_is_refused_before_a_step(
    tmp_path: Path, probe: dict[str, Any]
) -> None:
    """NaN in a checkpoint's optimizer state only (its weights finite): a resumed fine-tuning
    restored it and AdamW turned the weights NaN at the first step, silently. Now ``fit``
    refuses the file before training, naming the tensors; predicting from it still works (the
    optimizer state is not used there)."""
    ckpt = torch.load(probe["path"], map_location="cpu", weights_only=False)
    per_param = ckpt["optimizer_states"][0]["state"]
    param = sorted(per_param)[0]
    per_param[param]["exp_avg"].view(-1)[:2] = float("nan")
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    size = per_param[param]["exp_avg"].numel()
    task = DOFAClassificationTask(
        num_classes=4, weights=None, interpolate_pos_embed=True, lr=1e-3, patience=None
    )
    recorder = Recorder()
    with pytest.raises(CheckpointError) as info:
        make_trainer(tmp_path, 5, [recorder]).fit(task, probe["dm"], ckpt_path=bad)
    assert str(info.value) == (
        f"the checkpoint {bad} holds non-finite optimizer state (NaN or infinity) in 1 "
        f"entry: optimizer 0 parameter #{param} exp_avg (2 of {size} values); resuming from "
        "it would make the updates of those parameters NaN (the weights NaN at the first "
        "step) or zero (no longer learning): resume from an earlier checkpoint, or start a "
        "new fine-tuning from its weights (without ckpt_path)"
    )
    # an infinite exp_avg_sq (those values stop learning) and a NaN learning rate (a Python
    # float of the param group, not a tensor) are the same kind
    per_param[param]["exp_avg"].view(-1)[:2] = 0.0
    per_param[param]["exp_avg_sq"].view(-1)[:1] = float("inf")
    ckpt["optimizer_states"][0]["param_groups"][0]["lr"] = float("nan")
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match="in 2 entries: ") as info:
        make_trainer(tmp_path, 5, [recorder]).fit(task, probe["dm"], ckpt_path=bad)
    assert (
        f"optimizer 0 parameter #{param} exp_avg_sq (1 of {size} values), optimizer 0 param "
        "group 0 lr (1 of 1 values); "
    ) in str(info.value)
    assert recorder.losses == []
    # the file's weights are finite: a prediction from it equals the probe's own
    trainer = make_trainer(tmp_path, 1, [])
    predicted = cast(list[torch.Tensor], trainer.predict(task, probe["dm"], ckpt_path=bad))
    expected = cast(list[torch.Tensor], probe["trainer"].predict(probe["task"], probe["dm"]))
    torch.testing.assert_close(torch.cat(predicted), torch.cat(expected))


def test_probe_checkpoint_loads_for_full_fine_tuning(tmp_path: Path) -> None:
    """head_norm=None is on for a probe, off for full: loading a probe's checkpoint with
    mode='full' names head_norm instead of a state-dict error; head_norm=True keeps its head."""
    seed_everything(0)
    dm = SpectralDataModule(batch_size=4, num_classes=3, size=32, num_samples=8, bands=RGBN)
    probe = DOFAClassificationTask(
        num_classes=3, weights=None, interpolate_pos_embed=True, patience=None
    )
    trainer = make_trainer(tmp_path, 1, [], limit_train_batches=1, limit_val_batches=0)
    trainer.fit(probe, dm)
    path = tmp_path / "probe.ckpt"
    trainer.save_checkpoint(path)
    saved = {k: v.clone() for k, v in probe.head.state_dict().items()}
    assert "0.running_mean" in saved and "1.weight" in saved
    with pytest.raises(
        ValueError,
        match=r"head_norm's BatchNorm1d.*plain linear layer \(head_norm=None with "
        r"mode='full'\).*load_from_checkpoint\(path, mode='full', head_norm=True\)",
    ):
        DOFAClassificationTask.load_from_checkpoint(path, mode="full")
    full = DOFAClassificationTask.load_from_checkpoint(path, mode="full", head_norm=True)
    assert not full.frozen and full.hparams["head_norm"] is True
    assert all(p.requires_grad for p in full.encoder.backbone.blocks.parameters())
    loaded = full.head.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())
    # strict=False: the probe's encoder with a new plain head (Lightning warns of the keys)
    with pytest.warns(UserWarning, match="not in the checkpoint"):
        fresh = DOFAClassificationTask.load_from_checkpoint(path, mode="full", strict=False)
    assert isinstance(fresh.head, torch.nn.Linear)
    # the reverse: a full fine-tuning checkpoint (plain head) loaded as a linear probe
    trainer = make_trainer(tmp_path, 1, [], limit_train_batches=1, limit_val_batches=0)
    trainer.fit(fresh, dm)
    full_path = tmp_path / "full.ckpt"
    trainer.save_checkpoint(full_path, weights_only=True)  # no AdamW state: 0.45, not 1.3 GB
    with pytest.raises(
        ValueError, match=r"load_from_checkpoint\(path, mode='linear-probe', head_norm=False\)"
    ):
        DOFAClassificationTask.load_from_checkpoint(full_path, mode="linear-probe")
    reprobe = DOFAClassificationTask.load_from_checkpoint(
        full_path, mode="linear-probe", head_norm=False
    )
    assert reprobe.frozen and isinstance(reprobe.head, torch.nn.Linear)
    assert torch.equal(reprobe.head.weight, fresh.head.weight)


def test_layer_decay_param_groups() -> None:
    lr, decay, depth = 1e-3, 0.75, 12
    task = DOFAClassificationTask(
        num_classes=3,
        weights=None,
        mode="full",
        layer_decay=decay,
        lr=lr,
        weight_decay=0.05,
        patience=None,
    )
    groups = task.parameter_groups()
    lr_of: dict[str, float] = {}
    wd_of: dict[str, float] = {}
    names = {id(p): n for n, p in task.named_parameters()}
    for group in groups:
        for p in group["params"]:
            name = names[id(p)]
            assert name not in lr_of, f"{name} in two groups"
            lr_of[name] = group["lr"]
            wd_of[name] = group["weight_decay"]
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert set(lr_of) == trainable
    emb = "encoder.backbone.patch_embed.weight_generator.fc_weight.weight"
    assert lr_of[emb] == pytest.approx(lr * decay ** (depth + 1))
    assert lr_of["encoder.backbone.cls_token"] == pytest.approx(lr * decay ** (depth + 1))
    for i in (0, 5, 11):
        assert lr_of[f"encoder.backbone.blocks.{i}.attn.qkv.weight"] == pytest.approx(
            lr * decay ** (depth - i)
        )
        assert layer_id(f"encoder.backbone.blocks.{i}.mlp.fc1.bias", depth) == i + 1
    assert lr_of["head.weight"] == pytest.approx(lr)
    assert lr_of["encoder.norm.weight"] == pytest.approx(lr)
    assert wd_of["head.weight"] == 0.05 and wd_of["head.bias"] == 0.0
    assert wd_of["encoder.backbone.blocks.3.norm1.weight"] == 0.0
    assert wd_of["encoder.backbone.cls_token"] == 0.0
    optimizer = task.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    assert sorted(g["lr"] for g in optimizer.param_groups) == sorted(g["lr"] for g in groups)
    assert len({round(g["lr"], 12) for g in groups}) == depth + 2

    with pytest.warns(UserWarning, match="layer_decay=0.75 is ignored with mode='linear-probe'"):
        probe = DOFAClassificationTask(num_classes=3, weights=None, layer_decay=decay, patience=3)
    params = [p for g in probe.parameter_groups() for p in g["params"]]
    assert {id(p) for p in params} == {id(p) for p in probe.head.parameters()}
    config: Any = probe.configure_optimizers()
    assert isinstance(config, dict) and config["lr_scheduler"]["monitor"] == "val_loss"


# ------------------------------------------------------------------------------------------
# segmentation
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seg_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random base checkpoint whose patch-embedding weight generator is scaled up 10x."""
    encoder = random_encoder("base", seed=0)
    gen = encoder.backbone.patch_embed.weight_generator
    with torch.no_grad():
        for layer in (gen.fc_weight, gen.fc_bias):
            layer.weight.mul_(10.0)
            layer.bias.mul_(10.0)
    root = tmp_path_factory.mktemp("seg_weights")
    return write_checkpoint(root / "dofa_base_scaled.pth", official_state_dict(encoder))


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory: pytest.TempPathFactory, seg_checkpoint: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("seg")
    seed_everything(0)
    dm = SpectralDataModule(
        batch_size=8, task="segmentation", num_classes=3, size=32, num_samples=64, bands=RGBN
    )
    task = DOFASegmentationTask(
        num_classes=3,
        weights=str(seg_checkpoint),
        interpolate_pos_embed=True,
        decoder_channels=64,
        lr=1e-3,
        patience=None,
    )
    before = encoder_state(task)
    decoder_before = {k: v.clone() for k, v in task.decoder.state_dict().items()}
    recorder = Recorder()
    trainer = make_trainer(root, 4, [recorder])
    start = time.perf_counter()
    trainer.fit(task, dm)
    seconds = time.perf_counter() - start
    path = root / "seg.ckpt"
    trainer.save_checkpoint(path)
    return {
        "task": task,
        "dm": dm,
        "trainer": trainer,
        "recorder": recorder,
        "before": before,
        "decoder_before": decoder_before,
        "path": path,
        "seconds": seconds,
    }


def test_segmentation_linear_probe_learns_4_bands(seg_run: dict[str, Any]) -> None:
    losses = seg_run["recorder"].losses
    assert len(losses) == 4 * 8
    first, last = float(np.mean(losses[:2])), float(np.mean(losses[-8:]))
    assert first > 0.9 and last < 0.8 * first, losses
    acc = metric(seg_run["trainer"], "val_OverallAccuracy")
    miou = metric(seg_run["trainer"], "val_AverageJaccardIndex")
    assert acc > 0.55 and miou > 0.35  # chance: 0.33 and ~0.2
    print(
        f"segmentation: loss {first:.3f} -> {last:.3f}, val acc {acc:.3f}, mIoU {miou:.3f}, "
        f"{seg_run['seconds']:.1f} s"
    )


def test_segmentation_frozen_encoder_trainable_decoder(seg_run: dict[str, Any]) -> None:
    task = seg_run["task"]
    assert not changed_keys(seg_run["before"], encoder_state(task))
    after = task.decoder.state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in seg_run["decoder_before"].items())
    assert not any(seg_run["recorder"].encoder_training)
    assert all(seg_run["recorder"].trainable_training)


def test_segmentation_output_size_and_reload(seg_run: dict[str, Any]) -> None:
    task = seg_run["task"].eval()
    batch = next(iter(seg_run["dm"].val_dataloader()))
    with torch.no_grad():
        logits = task(batch["image"], batch["wavelengths"])
        assert logits.shape == (8, 3, 32, 32)
        wide = task(torch.randn(2, 4, 48, 64), batch["wavelengths"][0])
        assert wide.shape == (2, 3, 48, 64)
    loaded = DOFASegmentationTask.load_from_checkpoint(seg_run["path"])
    with torch.no_grad():
        assert torch.equal(loaded(batch["image"], batch["wavelengths"]), logits)
    probs = loaded.predict_step(batch, 0)
    assert probs.shape == (8, 3, 32, 32)
    assert torch.allclose(probs.sum(1), torch.ones(8, 32, 32), atol=1e-5)


def test_segmentation_options() -> None:
    with pytest.raises(ValueError, match="block_indices"):
        DOFASegmentationTask(num_classes=2, weights=None, block_indices=[3, 5, 7])
    with pytest.raises(ValueError, match="block_indices"):
        DOFASegmentationTask(num_classes=2, weights=None, block_indices=[3, 5, 7, 12])
    task = DOFASegmentationTask(
        num_classes=2, weights=None, mode="full", block_indices=[0, 1, 2, -4]
    )
    assert task.block_indices == (0, 1, 2, 8)
    frozen = {n for n, p in task.encoder.named_parameters() if not p.requires_grad}
    assert any(n.startswith("backbone.blocks.9.") for n in frozen)  # unused blocks
    assert not any(n.startswith("backbone.blocks.8.") for n in frozen)
    assert "norm.weight" in frozen
    # the shipped config named base's blocks: switched to large, blocks 12-23 sat unused
    with pytest.warns(UserWarning) as said:
        large = DOFASegmentationTask(
            num_classes=2, weights=None, variant="large", block_indices=[3, 5, 7, 11]
        )
    assert [str(w.message) for w in said if "block_indices" in str(w.message)] == [
        "block_indices [3, 5, 7, 11] are DOFA base's default, but the encoder is DOFA large "
        "(24 blocks): blocks 12-23 are not used (and frozen); large's default is "
        "[7, 11, 15, 23] (leave block_indices out, or null in a config, to take it)"
    ]
    assert large.block_indices == (3, 5, 7, 11)  # as asked
    del large
    decoder = UPerNetDecoder(16, 5, channels=8, norm="batch")
    maps = [torch.randn(2, 16, 3, 5) for _ in range(4)]
    assert decoder(maps, (48, 80)).shape == (2, 5, 48, 80)
    with pytest.raises(ValueError, match="four|4"):
        decoder(maps[:3], (48, 80))


@pytest.mark.parametrize("channels", [2, 16, 32, 48, 256])
def test_a_group_norm_decoder_of_any_width_decodes_a_single_chip(channels: int) -> None:
    """GroupNorm groups hold at least 2 channels: with 32 channels in 32 groups the pooling
    module's 1 x 1 map left one value per group, and a batch of 1 (a one-chip prediction)
    failed with torch's "Expected more than 1 value per channel", even in evaluation."""
    decoder = UPerNetDecoder(16, 3, channels=channels).eval()
    norms = [m for m in decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_channels // m.num_groups >= 2 for m in norms)
    assert max(m.num_groups for m in norms) == min(32, channels // 2)
    with torch.no_grad():
        logits = decoder([torch.randn(1, 16, 14, 14) for _ in range(4)], (224, 224))
    assert logits.shape == (1, 3, 224, 224) and torch.isfinite(logits).all()


@pytest.mark.parametrize("ignore_index", [None, 255])
def test_segmentation_ignores_invalid_pixels(ignore_index: int | None) -> None:
    """Pixels whose valid is False are left out of the loss and the metrics whatever
    ignore_index is: the loss is cross-entropy over the valid (and not ignored) pixels only."""
    torch.manual_seed(0)
    seg = DOFASegmentationTask(
        num_classes=3,
        weights=None,
        interpolate_pos_embed=True,
        decoder_channels=64,
        ignore_index=ignore_index,
        patience=None,
    ).eval()
    image = torch.randn(2, 4, 32, 32)
    wl = torch.tensor(wavelengths_for_bands(RGBN))
    with torch.no_grad():
        logits = seg(image, wl)
    pred = logits.argmax(1)
    mask = torch.randint(0, 3, (2, 32, 32))
    valid = torch.ones(2, 32, 32, dtype=torch.bool)
    valid[:, :, :16] = False  # half the pixels are no-data
    mask[~valid] = pred[~valid]  # counted as correct where they are not left out
    kept = valid.clone()
    if ignore_index is not None:
        mask[:, :4, 16:] = ignore_index
        kept[:, :4, :] = False
    batch = {"image": image, "wavelengths": wl.expand(2, 4), "mask": mask, "valid": valid}
    target = seg._target(batch)
    assert torch.equal(target[kept], mask[kept])  # real classes untouched
    with torch.no_grad():
        loss = seg.training_step(batch, 0)  # in eval mode: no dropout, the logits above
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[kept], mask[kept])
    unmasked = F.cross_entropy(logits, mask, ignore_index=-100 if ignore_index is None else 255)
    assert not torch.isclose(expected, unmasked)
    assert torch.isclose(loss, expected, rtol=1e-5, atol=1e-6)
    accuracy = float(seg.train_metrics.compute()["train_OverallAccuracy"])
    assert accuracy == pytest.approx(float((pred[kept] == mask[kept]).float().mean()))
    assert accuracy < float((pred[mask != 255] == mask[mask != 255]).float().mean())
    # a batch without a counted pixel (a chip of the scene's margin): loss 0, no gradient
    # (it was 0 / 0 = NaN, which then reached val_loss and the learning-rate schedule)
    batch["valid"] = torch.zeros_like(valid)
    seg.train()
    loss = seg.training_step(batch, 1)
    loss.backward()
    assert loss.item() == 0.0
    grads = [p.grad for p in seg.parameters() if p.grad is not None]
    assert grads and all(bool((g == 0).all()) for g in grads)


def test_segmentation_val_loss_is_the_mean_over_the_epochs_counted_pixels(
    tmp_path: Path,
) -> None:
    """val_loss / test_loss weigh each batch by its counted pixels: a margin batch with 16
    valid pixels (or none) does not count like a full one (with Lightning's batch_size
    weighting a batch without a valid pixel logged 0 and pulled the epoch's mean down)."""
    torch.manual_seed(0)
    seg = DOFASegmentationTask(
        num_classes=3, weights=None, interpolate_pos_embed=True, decoder_channels=64,
        patience=None,
    )  # fmt: skip
    wl = torch.tensor(wavelengths_for_bands(RGBN))
    batches = []
    for kept in (32, 4, 0):  # a full batch, a margin batch, a batch of no-data only
        valid = torch.zeros(2, 32, 32, dtype=torch.bool)
        valid[:, :kept, :kept] = True
        batches.append(
            {
                "image": torch.randn(2, 4, 32, 32),
                "wavelengths": wl.expand(2, 4),
                "mask": torch.randint(0, 3, (2, 32, 32)),
                "valid": valid,
            }
        )
    seg.eval()
    with torch.no_grad():
        logits = torch.cat([seg(b["image"], wl) for b in batches])
    valid = torch.cat([b["valid"] for b in batches])
    mask = torch.cat([b["mask"] for b in batches])
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], mask[valid]).item()
    per_batch = [
        F.cross_entropy(g.permute(0, 2, 3, 1)[b["valid"]], b["mask"][b["valid"]]).item()
        for g, b in zip(logits.split(2), batches[:2], strict=False)
    ]
    chip_weighted = (2 * per_batch[0] + 2 * per_batch[1] + 2 * 0.0) / 6
    assert abs(expected - chip_weighted) > 0.1  # the two weightings tell apart
    loader = DataLoader[Any](cast(Any, batches), batch_size=None)
    trainer = make_trainer(tmp_path, 1, [])
    got = trainer.validate(seg, loader, verbose=False)[0]
    assert got["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert trainer.test(seg, loader, verbose=False)[0]["test_loss"] == pytest.approx(
        expected, rel=1e-5
    )
    # a validation epoch without a counted pixel has no loss: NaN, not a perfect 0
    empty = DataLoader[Any](cast(Any, batches[2:]), batch_size=None)
    assert math.isnan(trainer.validate(seg, empty, verbose=False)[0]["val_loss"])


def test_segmentation_batch_norm_decoder_batch_of_one_chip(tmp_path: Path) -> None:
    """decoder_norm='batch' cannot train on 1 chip (the PPM's 1x1 bin): a named error;
    the default GroupNorm trains on it and evaluation takes it."""
    seed_everything(0)
    dm = SpectralDataModule(
        batch_size=1, task="segmentation", num_classes=3, size=32, num_samples=4, bands=RGBN
    )

    def make(norm: Any) -> DOFASegmentationTask:
        return DOFASegmentationTask(
            num_classes=3,
            weights=None,
            interpolate_pos_embed=True,
            decoder_channels=64,
            decoder_norm=norm,
            patience=None,
        )

    batch_norm = make("batch")
    trainer = make_trainer(tmp_path, 1, [], limit_train_batches=1, limit_val_batches=0)
    with pytest.raises(
        ValueError,
        match=r"training batch of 1 chip: decoder_norm='batch'.*batch_size >= 2 and "
        r"drop_last=True.*or decoder_norm='group'",
    ):
        trainer.fit(batch_norm, dm)
    trainer = make_trainer(tmp_path, 1, [], limit_val_batches=1)
    trainer.validate(batch_norm, dm, verbose=False)
    assert "val_loss" in trainer.callback_metrics
    recorder = Recorder()
    group = make("group")
    make_trainer(tmp_path, 1, [recorder], limit_train_batches=1, limit_val_batches=0).fit(group, dm)
    assert len(recorder.losses) == 1


def test_tasks_refuse_raw_reflectance_and_mismatched_masks(
    small_task: DOFAClassificationTask,
) -> None:
    """Raw reflectance would train on noise silently, as it would embed as noise; a mask at
    another size than its image (the image alone resized) is named, not a reshape error."""
    wl = torch.tensor([0.665, 0.56, 0.49, 0.842])
    raw = torch.full((2, 4, 32, 32), 3000.0)
    normalised = (raw / 10000 * 255 - 100) / 60
    seg = DOFASegmentationTask(
        num_classes=3, weights=None, interpolate_pos_embed=True, ignore_index=255, patience=None
    )
    labelled = {  # the 9 bands small_task was given: other wavelengths are refused first
        "image": torch.full((2, 9, 32, 32), 3000.0),
        "wavelengths": torch.tensor(wavelengths_for_bands(DOFA_S2_BANDS)),
        "label": torch.tensor([0, 1]),
    }
    for run in (
        lambda: small_task(raw, wl),
        lambda: small_task.training_step(labelled, 0),
        lambda: seg(raw, wl),
        lambda: seg.predict_step({"image": raw, "wavelengths": wl}, 0),
        lambda: small_task(raw.long(), wl),
    ):  # fmt: skip
        with pytest.raises(NotNormalisedError, match=r"NormalizeReflectance.*not DOFA's"):
            run()
    with torch.no_grad():
        assert small_task(normalised, wl).shape == (2, 3)
    batch = {
        "image": normalised,
        "wavelengths": wl.expand(2, 4),
        "mask": torch.zeros(2, 16, 16, dtype=torch.long),
        "valid": torch.ones(2, 32, 32, dtype=torch.bool),
    }
    with pytest.raises(ValueError, match=r"mask is \(16, 16\) px but its image is \(32, 32\)"):
        seg.training_step(batch, 0)
    batch["mask"] = torch.zeros(2, 1, 32, 32, dtype=torch.long)  # (B, 1, H, W) as TorchGeo's
    assert seg.training_step(batch, 0).ndim == 0


# ------------------------------------------------------------------------------------------
# batches that do not fit the task: one ValueError naming the problem and the fix
# ------------------------------------------------------------------------------------------


def chips(task: Any, num_classes: int, bands: list[str] = RGBN, n: int = 4) -> dict[str, Any]:
    """A collated batch of ``n`` synthetic chips (image, wavelengths, label or mask)."""
    ds = SpectralChips(task=task, num_classes=num_classes, bands=bands, size=32, num_samples=n)
    return cast(dict[str, Any], stack_samples([ds[i] for i in range(n)]))


def small_segmentation(**kwargs: Any) -> DOFASegmentationTask:
    kwargs = {"interpolate_pos_embed": True, "decoder_channels": 32, "patience": None, **kwargs}
    return DOFASegmentationTask(num_classes=3, weights=None, **kwargs)


def test_tasks_name_a_batch_without_their_target(tmp_path: Path) -> None:
    """Classification on segmentation data raised KeyError 'label', segmentation on
    classification data KeyError 'mask' (also what a config of one kind with a checkpoint of
    the other gives through LightningCLI's --ckpt_path)."""
    seg_data = SpectralDataModule(
        batch_size=2, task="segmentation", num_classes=3, size=32, num_samples=4, bands=RGBN
    )
    classifier = DOFAClassificationTask(
        num_classes=3, weights=None, interpolate_pos_embed=True, patience=None
    )
    trainer = make_trainer(tmp_path, 1, [], limit_train_batches=1, limit_val_batches=0)
    with pytest.raises(
        ValueError,
        match=r"^DOFAClassificationTask needs a 'label' per sample; the batch has image, mask, "
        r"wavelengths: segmentation data needs DOFASegmentationTask$",
    ):
        trainer.fit(classifier, seg_data)
    class_data = SpectralDataModule(batch_size=2, num_classes=3, size=32, num_samples=4, bands=RGBN)
    trainer = make_trainer(tmp_path, 1, [], limit_val_batches=1)
    with pytest.raises(
        ValueError,
        match=r"^DOFASegmentationTask needs a 'mask' per sample; the batch has image, label, "
        r"wavelengths: classification data needs DOFAClassificationTask$",
    ):
        trainer.validate(small_segmentation(), class_data, verbose=False)
    unlabelled = chips("classification", 3)
    del unlabelled["label"]
    with pytest.raises(
        ValueError, match=r"the batch has image, wavelengths: add each chip's class index"
    ):
        classifier.training_step(unlabelled, 0)


@pytest.mark.parametrize("kind", ["multiclass", "multilabel"])
def test_classification_refuses_labels_of_the_other_task_kind(tmp_path: Path, kind: Any) -> None:
    """task='multilabel' on class indices raised 'Target size ... must be the same as input
    size', task='multiclass' on 0/1 vectors 'Expected input batch_size (4) to match target
    batch_size (16)'."""
    other: Any = "classification" if kind == "multilabel" else "multilabel"
    dm = SpectralDataModule(
        batch_size=4, task=other, num_classes=4, size=32, num_samples=8, bands=RGBN
    )
    task = DOFAClassificationTask(
        num_classes=4, task=kind, weights=None, interpolate_pos_embed=True, patience=None
    )
    expected = {
        "multiclass": r"^task='multiclass' needs 'label' as one class index per chip, shape "
        r"\(4,\), but the batch's is \(4, 4\): a 0/1 vector per chip is multilabel data: use "
        r"task='multilabel'$",
        "multilabel": r"^task='multilabel' needs 'label' as a 0/1 vector per chip, shape "
        r"\(4, 4\) \(num_classes=4\), but the batch's is \(4,\): one class index per chip is "
        r"multiclass data: use task='multiclass'$",
    }[kind]
    five = chips("multilabel", 5)  # 0/1 vectors of another class count
    with pytest.raises(ValueError, match=r"\(4, 5\): .*num_classes=5$"):
        task.training_step(five, 0)
    if kind == "multiclass":  # (B, 1) class indices are fine, as before
        column = chips("classification", 4)
        column["label"] = column["label"][:, None]
        assert task.training_step(column, 0).ndim == 0
    trainer = make_trainer(tmp_path, 1, [], limit_train_batches=1, limit_val_batches=0)
    with pytest.raises(ValueError, match=expected):
        trainer.fit(task, dm)


def test_labels_outside_the_classes_are_named() -> None:
    """Labels 0..5 with num_classes=4 raised 'IndexError: Target 4 is out of bounds'."""
    classifier = DOFAClassificationTask(
        num_classes=4, weights=None, interpolate_pos_embed=True, patience=None
    )
    batch = chips("classification", 6, n=6)
    batch["label"] = torch.tensor([0, 5, 1, 4, 2, 5])
    with pytest.raises(
        ValueError,
        match=r"^the batch's labels hold 4, 5, outside the classes 0..3 \(num_classes=4\): set "
        r"num_classes=6 if they are classes, or remap the labels to class indices 0..3 "
        r"\(DOFAClassificationTask has no ignore_index",
    ):
        classifier.training_step(batch, 0)
    batch["label"] = torch.tensor([0, -1, 1, 2, 3, 3])  # negative: no num_classes to suggest
    with pytest.raises(ValueError, match=r"labels hold -1, outside .*: remap the labels"):
        classifier.validation_step(batch, 0)
    multilabel = DOFAClassificationTask(
        num_classes=4, task="multilabel", weights=None, interpolate_pos_embed=True
    )
    counts = chips("multilabel", 4)
    counts["label"][0, 1] = 2
    with pytest.raises(ValueError, match=r"needs 'label' as 0/1 per class, but the batch's "):
        multilabel.training_step(counts, 0)
    seg = small_segmentation()
    masks = chips("segmentation", 5)  # classes 0..4 for a 3-class task
    with pytest.raises(
        ValueError,
        match=r"^the batch's mask holds 3, 4, outside the classes 0..2 \(num_classes=3\): if "
        r"some mark no-data pixels, map those to one value and set ignore_index to it .*; if "
        r"they are classes, set num_classes=5$",
    ):
        seg.training_step(masks, 0)
    nodata = small_segmentation(ignore_index=255)
    masks = chips("segmentation", 3)
    masks["mask"][:, :4] = 255  # ignore_index: allowed
    assert nodata.training_step(masks, 0).ndim == 0
    masks["mask"][:, -2:] = 7
    with pytest.raises(
        ValueError,
        match=r"mask holds 7, outside the classes 0..2 \(num_classes=3, ignore_index=255\): if "
        r"some mark no-data pixels, map those to ignore_index=255 \(or set ignore_index=7\)",
    ):
        nodata.training_step(masks, 0)
    masks["valid"] = torch.ones(4, 32, 32, dtype=torch.bool)
    masks["valid"][:, -2:] = False  # values under valid=False are left out, whatever they are
    assert nodata.training_step(masks, 0).ndim == 0


def test_labels_and_masks_that_are_not_whole_numbers_are_refused() -> None:
    """A cast truncated them: soft multilabel targets 0.7 trained as 0, a multiclass 1.5 as
    class 1, a bilinearly resampled mask's 1.5 as class 1, and a NaN became an arbitrary
    integer (refused as a class -9.2e18)."""
    multilabel = DOFAClassificationTask(
        num_classes=4, task="multilabel", weights=None, interpolate_pos_embed=True
    )
    soft = chips("multilabel", 4)
    soft["label"] = soft["label"].float()
    assert multilabel.training_step(soft, 0).ndim == 0  # 0.0 / 1.0 as floats: fine
    soft["label"][0, 1] = 0.7
    with pytest.raises(
        ValueError,
        match=r"^the batch's labels hold 0\.7, not whole numbers in int64's range: "
        r"DOFAClassificationTask takes "
        r"class indices .* not soft labels or probabilities .* round or threshold them",
    ):
        multilabel.training_step(soft, 0)
    multiclass = DOFAClassificationTask(
        num_classes=4, weights=None, interpolate_pos_embed=True, patience=None
    )
    batch = chips("classification", 4)
    batch["label"] = torch.tensor([0.0, 1.5, 2.0, float("nan")])
    with pytest.raises(ValueError, match=r"^the batch's labels hold 1\.5, nan, not whole"):
        multiclass.validation_step(batch, 0)
    batch["label"] = torch.tensor([0.0, 1.0, 2.0, 1e20])  # the cast made it -9.2e18
    with pytest.raises(ValueError, match=r"^the batch's labels hold 1e\+20, not whole numbers in"):
        multiclass.validation_step(batch, 0)
    seg = small_segmentation()
    masks = chips("segmentation", 3)
    masks["mask"] = masks["mask"].float()
    assert seg.training_step(masks, 0).ndim == 0
    masks["mask"][:, :2] = 1.5
    masks["mask"][:, -1] = float("nan")
    with pytest.raises(
        ValueError,
        match=r"^the batch's mask holds 1\.5, nan, not whole numbers in .* resample mask rasters "
        r"with nearest neighbour",
    ):
        seg.training_step(masks, 0)
    masks["valid"] = torch.ones(4, 16, 16, dtype=torch.bool)  # another shape: RuntimeError
    with pytest.raises(ValueError, match=r"^the batch's valid is \(4, 16, 16\) but its mask is "
                       r"\(4, 32, 32\): 'valid' is one bool per mask pixel"):  # fmt: skip
        seg.training_step(masks, 0)
    masks["valid"] = torch.ones(4, 32, 32, dtype=torch.bool)
    masks["valid"][:, :2] = False
    masks["valid"][:, -1] = False  # no-data pixels: whatever they hold is left out
    loss = seg.training_step(masks, 0)
    assert torch.isfinite(loss)
    counted = masks["mask"][masks["valid"]]
    assert seg._target(masks)[~masks["valid"]].eq(seg._ignore_target).all()
    assert torch.equal(seg._target(masks)[masks["valid"]], counted.long())
    listed = chips("segmentation", 3)
    listed["mask"] = listed["mask"].tolist()  # as labels, a list is taken (was AttributeError)
    assert seg.training_step(listed, 0).ndim == 0
    listed["mask"] = list(torch.tensor(listed["mask"]))  # a list of per-chip tensors
    listed["valid"] = np.ones((4, 32, 32), dtype=bool)  # an array: was silently ignored
    listed["valid"][:, :16] = False
    target = seg._target(listed)
    assert int((target == seg._ignore_target).sum()) == 4 * 32 * 16
    wide = small_segmentation()  # a uint32 nodata is named as the integer it is
    big = chips("segmentation", 3)
    big["mask"][:, :2] = 4294967295
    with pytest.raises(ValueError, match=r"holds 4294967295, outside .* set ignore_index="
                       r"4294967295 \(pixels equal"):  # fmt: skip
        wide.training_step(big, 0)
    # TorchGeo's mask datasets cast a float raster's NaN to int64 themselves
    cast = chips("segmentation", 3)
    cast["mask"][:, :3] = torch.tensor(float("nan")).long()
    with pytest.raises(
        ValueError,
        match=r"^the batch's mask holds -9223372036854775808, outside the classes 0..2 "
        r"\(num_classes=3\): -9223372036854775808 is what NaN becomes when cast to an integer "
        r".* set ignore_index to it$",
    ):
        seg.training_step(cast, 0)


def test_task_bands_must_match_the_batch_wavelengths(tmp_path: Path) -> None:
    """Bands given to the task were silently replaced by the batch's wavelengths: 3 bands
    fitted on 13-band chips trained without a word and the checkpoint recorded 3 bands."""
    task = DOFAClassificationTask(
        num_classes=4,
        bands=["B4", "B3", "B2"],
        weights=None,
        interpolate_pos_embed=True,
        patience=None,
    )
    dm = SpectralDataModule(batch_size=4, num_classes=4, size=32, num_samples=8)  # 13 bands
    trainer = make_trainer(tmp_path, 1, [], limit_train_batches=1, limit_val_batches=0)
    with pytest.raises(
        ValueError,
        match=r"^the batch carries 13 wavelengths \(0.443, 0.49, .* \(13 values\) um\) but the "
        r"task was given bands=\['B4', 'B3', 'B2'\] \(0.665, 0.56, 0.49 um\), which serve "
        r"batches without 'wavelengths'.*drop the task's bands= / wavelengths= \(the batch's "
        r"wavelengths suffice\), or make them match the batch's channels, in order. A "
        r"checkpoint brings them back \(predict --ckpt_path too, whatever the config says\): "
        r"DOFAClassificationTask.load_from_checkpoint\(path, bands=None\) in Python drops them$",
    ):
        trainer.fit(task, dm)
    # ... as the message says, a checkpoint of it loaded without its bands takes the batch's
    trainer.strategy.connect(task)
    trainer.save_checkpoint(tmp_path / "bands.ckpt", weights_only=True)
    loaded = DOFAClassificationTask.load_from_checkpoint(tmp_path / "bands.ckpt", bands=None)
    batch = next(iter(dm.train_dataloader()))
    assert loaded.eval().predict_step(batch, 0).shape == (4, 4)
    # the same count in another order is as wrong (prediction and segmentation too)
    bgrn = DOFAClassificationTask(
        num_classes=4, wavelengths=[0.49, 0.56, 0.665, 0.842], weights=None
    )
    batch = chips("classification", 4)
    match = (
        r"the batch carries 4 wavelengths \(0.665, 0.56, 0.49, 0.842 um\) but the task was "
        r"given wavelengths=\[0.49, 0.56, 0.665, 0.842\]"
    )
    with pytest.raises(ValueError, match=match):
        bgrn.predict_step(batch, 0)
    seg = small_segmentation(bands=["B2", "B3", "B4", "B8"])
    with pytest.raises(ValueError, match=r"but the task was given bands=\['B2', 'B3', 'B4'"):
        seg.training_step(chips("segmentation", 3), 0)
    # bands that match the batch's (any spelling) train as before
    same = DOFAClassificationTask(
        num_classes=4,
        bands=["B04", "B03", "B02", "B08"],
        weights=None,
        interpolate_pos_embed=True,
        patience=None,
    )
    recorder = Recorder()
    dm = SpectralDataModule(batch_size=4, num_classes=4, size=32, num_samples=8, bands=RGBN)
    make_trainer(tmp_path, 1, [recorder], limit_train_batches=1, limit_val_batches=0).fit(same, dm)
    assert len(recorder.losses) == 1


def test_layer_decay_needs_full_mode() -> None:
    """layer_decay with mode='linear-probe' was accepted and silently ignored."""
    match = (
        r"^layer_decay=0.75 is ignored with mode='linear-probe': layer decay applies only to "
        r"mode='full'.*drop layer_decay, or use mode='full'"
    )
    with pytest.warns(UserWarning, match=match):
        DOFAClassificationTask(num_classes=3, weights=None, layer_decay=0.75)
    with pytest.warns(UserWarning, match=match):
        DOFASegmentationTask(num_classes=3, weights=None, layer_decay=0.75)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DOFAClassificationTask(num_classes=3, weights=None, mode="full", layer_decay=0.75)
    assert not [w for w in caught if "layer_decay" in str(w.message)]


# ------------------------------------------------------------------------------------------
# segmentation on TorchGeo raster datasets (a generated image raster + mask raster)
# ------------------------------------------------------------------------------------------


class TinyS2(RasterDataset):
    """A 4-band raster whose samples look like Sentinel2SR's: image (raw x 10000),
    wavelengths, valid, bounds, transform."""

    filename_glob = "image.tif"
    is_image = True
    all_bands = tuple(RGBN)

    def __getitem__(self, index: Any) -> dict[str, Any]:
        sample = super().__getitem__(index)
        image = sample["image"]
        sample["valid"] = (image > 0).all(dim=0)
        sample["wavelengths"] = torch.tensor(wavelengths_for_bands(RGBN))
        sample["image"] = normalise_reflectance(image, RGBN)
        return sample


class TinyMask(RasterDataset):
    filename_glob = "mask.tif"
    is_image = False


def write_rasters(root: Path, side: int = 128, cell: int = 16) -> None:
    rng = np.random.default_rng(0)
    cells = rng.integers(0, 3, size=(side // cell, side // cell))
    mask = np.kron(cells, np.ones((cell, cell), dtype=np.int64)).astype(np.uint8)
    spectra = class_spectra(3, wavelengths_for_bands(RGBN)).numpy()
    image = spectra[mask].transpose(2, 0, 1) + rng.normal(0, 300, (4, side, side))
    image = np.clip(image, 1, 10000).astype(np.float32)
    image[:, :, :8] = 0  # a no-data strip on the left: valid False there
    profile = {
        "driver": "GTiff",
        "height": side,
        "width": side,
        "crs": "EPSG:32631",
        "transform": from_origin(500000, 5000000, 10, 10),
    }
    with rasterio.open(root / "image.tif", "w", count=4, dtype="float32", **profile) as dst:
        dst.write(image)
    with rasterio.open(root / "mask.tif", "w", count=1, dtype="uint8", **profile) as dst:
        dst.write(mask[None])


def test_segmentation_trains_on_raster_dataset_batches(
    tmp_path: Path, seg_checkpoint: Path
) -> None:
    write_rasters(tmp_path)
    dataset = IntersectionDataset(TinyS2(tmp_path), TinyMask(tmp_path))
    sampler = RandomPatchSampler(dataset, size=32, length=32, generator=0)
    train = DataLoader(dataset, batch_size=8, sampler=sampler, collate_fn=stack_samples)
    val = DataLoader(
        dataset,
        batch_size=8,
        sampler=GriddedPatchSampler(dataset, size=32, stride=32),
        collate_fn=stack_samples,
    )
    batch = next(iter(train))
    assert {"image", "mask", "wavelengths", "valid", "bounds", "transform"} <= set(batch)
    assert batch["image"].shape == (8, 4, 32, 32) and batch["mask"].shape == (8, 32, 32)
    assert batch["wavelengths"].shape == (8, 4)
    seed_everything(0)
    task = DOFASegmentationTask(
        num_classes=3,
        weights=str(seg_checkpoint),
        interpolate_pos_embed=True,
        decoder_channels=64,
        ignore_index=255,
        lr=1e-3,
        patience=None,
    )
    target = task._target(batch)
    assert bool((target[~batch["valid"]] == 255).all())  # no-data pixels are ignored
    assert bool((target[batch["valid"]] < 3).all())
    recorder = Recorder()
    trainer = make_trainer(tmp_path, 4, [recorder])
    trainer.fit(task, train, val)
    losses = recorder.losses
    assert len(losses) == 4 * 4
    first, last = float(np.mean(losses[:4])), float(np.mean(losses[-4:]))
    assert last < 0.92 * first, losses
    assert metric(trainer, "val_OverallAccuracy") > 0.5  # chance: 0.33
    print(f"raster segmentation: loss {first:.3f} -> {last:.3f}")


def test_segmentation_mask_nodata_needs_ignore_index(tmp_path: Path) -> None:
    """A mask raster whose nodata is 255, with ignore_index=None, raised 'IndexError: Target
    255 is out of bounds': its declared nodata is not turned into ignored pixels."""
    write_rasters(tmp_path)
    with rasterio.open(tmp_path / "mask.tif", "r+") as dst:
        mask = dst.read(1)
        mask[np.arange(len(mask)) % 32 < 4] = 255  # no-data rows in every chip, image valid
        dst.write(mask, 1)
        dst.nodata = 255
    dataset = IntersectionDataset(TinyS2(tmp_path), TinyMask(tmp_path))
    sampler = GriddedPatchSampler(dataset, size=32, stride=32)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, collate_fn=stack_samples)
    trainer = make_trainer(tmp_path, 1, [], limit_train_batches=1, limit_val_batches=0)
    with pytest.raises(
        ValueError,
        match=r"^the batch's mask holds 255, outside the classes 0..2 \(num_classes=3\): if 255 "
        r"marks no-data pixels, set ignore_index=255 \(pixels equal to ignore_index are left "
        r"out of the loss and metrics; a mask raster's nodata value is not ignored by itself\); "
        r"if they are classes, set num_classes=256$",
    ):
        trainer.fit(small_segmentation(), loader)
    recorder = Recorder()
    trainer = make_trainer(tmp_path, 1, [recorder], limit_train_batches=1, limit_val_batches=0)
    trainer.fit(small_segmentation(ignore_index=255), loader)
    assert len(recorder.losses) == 1 and math.isfinite(recorder.losses[0])


def _readme_block(heading: str, smaller: dict[str, str]) -> str:
    """The README's first Python block after ``heading``, each key of ``smaller`` (which it
    must hold) replaced by its value."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split(heading, 1)[1]
    code = block.split("```python\n", 1)[1].split("```", 1)[0]
    for old, new in smaller.items():
        assert old in code, old
        code = code.replace(old, new)
    return code


def test_the_readme_raster_labels_example_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's "Your own rasters and labels" block, run as written but smaller (random
    weights, 4 chips, 1 epoch) on the demo scene and labels generated from its NDVI."""
    from tests.scenes import SCENE

    code = _readme_block(
        "**Your own rasters and labels**",
        {
            'weights="official"': "weights=None, decoder_channels=32",
            "length=256": "length=4",
            "batch_size=8": "batch_size=2",
            "pl.Trainer(max_epochs=10)": "pl.Trainer(max_epochs=1, logger=False, "
            "enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=2)",
        },
    )
    (tmp_path / "scenes").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "scenes" / SCENE.name).write_bytes(SCENE.read_bytes())
    with rasterio.open(SCENE) as src:
        profile, raw = src.profile, src.read().astype(np.float64)
        order = [d.upper().replace("B0", "B") for d in src.descriptions]
    red, nir = raw[order.index("B4")], raw[order.index("B8")]
    ndvi = (nir - red) / np.maximum(nir + red, 1)
    labels = np.digitize(ndvi, [0.3, 0.6]).astype(np.uint8)  # classes 0, 1, 2
    labels[(raw == 0).all(axis=0)] = 255
    profile.update(count=1, dtype="uint8", nodata=255)
    with rasterio.open(tmp_path / "labels" / "labels.tif", "w", **profile) as dst:
        dst.write(labels[None])
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    task = namespace["task"]
    assert task.trainer.state.finished and task.trainer.current_epoch == 1
    assert math.isfinite(float(task.trainer.callback_metrics["val_loss"]))
    batch = next(iter(namespace["val"]))
    assert batch["image"].shape == (2, 4, 224, 224) and batch["mask"].shape == (2, 224, 224)
    assert batch["wavelengths"].shape == (2, 4)
    assert set(batch["mask"].unique().tolist()) <= {0, 1, 2, 255}
    assert float(batch["image"].abs().max()) < 50  # normalised, not raw reflectance


def _labelled_chips(root: Path, per_class: int) -> dict[str, list[np.ndarray]]:
    """32-px 4-band chips of the demo scene in ``root/<class>/``: "cropland" where the mean
    NDVI exceeds 0.5, "bare" below 0.3; the arrays written, by class."""
    from tests.scenes import SCENE

    with rasterio.open(SCENE) as src:
        raw, profile, t = src.read(), src.profile, src.transform
    red, nir = raw[0].astype(np.float64), raw[3].astype(np.float64)  # B04, B03, B02, B08
    ndvi = (nir - red) / np.maximum(nir + red, 1)
    written: dict[str, list[np.ndarray]] = {}
    for name, wanted in (("cropland", lambda v: v > 0.5), ("bare", lambda v: v < 0.3)):
        (root / name).mkdir(parents=True)
        chips = written.setdefault(name, [])
        for r in range(0, raw.shape[1] - 32, 32):
            for c in range(0, raw.shape[2] - 32, 32):
                if len(chips) < per_class and wanted(ndvi[r : r + 32, c : c + 32].mean()):
                    chip = raw[:, r : r + 32, c : c + 32]
                    transform = from_origin(t.c + 10 * c, t.f - 10 * r, 10, 10)
                    profile.update(width=32, height=32, transform=transform)
                    with rasterio.open(root / name / f"{len(chips)}.tif", "w", **profile) as dst:
                        dst.write(chip)
                    chips.append(chip)
        assert len(chips) == per_class, name
    return written


def test_the_readme_labelled_chips_example_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's "Your own labelled chips" block (ChipFolder: TorchGeo's
    NonGeoClassificationDataset of a folder per class), run as written but smaller (random
    weights, 10 chips, 1 epoch): every band read, labels by sorted folder name, chips
    normalised by DOFA's statistics (an independent computation) and resized."""
    code = _readme_block(
        "**Your own labelled chips**",
        {
            'weights="official"': "weights=None",
            '"batch_size": 16': '"batch_size": 4',
            '"num_workers": 4': '"num_workers": 0',
            "pl.Trainer(max_epochs=10)": "pl.Trainer(max_epochs=1, logger=False, "
            "enable_checkpointing=False, enable_progress_bar=False)",
        },
    )
    chips = _labelled_chips(tmp_path / "chips", per_class=5)
    (tmp_path / "chips/.ipynb_checkpoints").mkdir()  # hidden: no class
    (tmp_path / "chips/bare/._0.tif").write_bytes(b"\0" * 4096)  # macOS's: no chip
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    task, data = namespace["task"], namespace["data"]
    assert task.trainer.state.finished and task.trainer.global_step == 2  # 8 chips, 4 a batch
    assert math.isfinite(float(task.trainer.callback_metrics["val_loss"]))
    assert data.classes == ["bare", "cropland"] and len(data) == 10
    first = data[0]  # bare/0.tif: class 0, DOFA's normalisation of its raw reflectance
    assert first["label"] == 0 and first["image"].shape == (4, 224, 224)
    torch.testing.assert_close(first["wavelengths"], torch.tensor([0.665, 0.56, 0.49, 0.842]))
    # DOFA's statistics (../shared/reference/dofa.md, 0..255 scale) of B04, B03, B02, B08
    mean = torch.tensor([114.1099739, 114.81779093, 126.63977424, 101.435633])[:, None, None]
    std = torch.tensor([77.84352553, 69.96844919, 67.42465279, 60.29744676])[:, None, None]
    raw = torch.from_numpy(chips["bare"][0].astype(np.float32))
    expected = (raw.clamp(0, 10000) / 10000 * 255 - mean) / std
    expected = F.interpolate(expected[None], size=224, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(first["image"], expected, rtol=0, atol=1e-4)
    assert data[len(data) - 1]["label"] == 1 and bool(first["valid"].all())


def test_the_chips_config_fine_tunes_on_a_chip_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``fit --config finetune_chips.yaml`` (DOFAChipFolderDataModule): the command line's way
    to fine-tune on a folder of labelled chips (it had only Python's). The split is seeded and
    disjoint, the batches are the dataset's DOFA-normalised chips (TorchGeo's default aug
    would divide them by 255), and a root without chips is one line, exit 2."""
    from torchgeo_dofa.cli import main
    from torchgeo_dofa.datamodules import DOFAChipFolderDataModule

    _labelled_chips(tmp_path / "chips", per_class=5)
    monkeypatch.chdir(tmp_path)
    bands = ["B04", "B03", "B02", "B08"]
    dm = DOFAChipFolderDataModule("chips", bands=bands, batch_size=4)
    dm.setup("fit")
    assert dm.classes == ["bare", "cropland"] and dm.bands == ["B4", "B3", "B2", "B8"]
    train, val = set(dm.train_dataset.indices), set(dm.val_dataset.indices)  # type: ignore[union-attr]
    assert (len(train), len(val), train & val, dm.test_dataset) == (8, 2, set(), None)
    again = DOFAChipFolderDataModule("chips", bands=bands)
    again.setup("fit")
    assert set(again.val_dataset.indices) == val  # type: ignore[union-attr]
    batch = dm.aug(next(iter(dm.train_dataloader())))
    assert batch["image"].shape == (4, 4, 224, 224) and batch["wavelengths"].shape == (4, 4)
    assert float(batch["image"].abs().max()) > 0.5  # DOFA-normalised, not divided by 255
    with pytest.raises(ValueError, match="leave no training chip"):
        DOFAChipFolderDataModule("chips", bands=bands, val_split=0.5, test_split=0.5)
    fit = ["fit", "--config", str(CONFIGS / "finetune_chips.yaml"),
           "--model.init_args.weights", "null", "--data.init_args.batch_size", "4",
           "--data.init_args.num_workers", "0", "--trainer.max_epochs", "1",
           "--trainer.enable_progress_bar", "false",
           "--trainer.enable_model_summary", "false"]  # fmt: skip
    assert main(fit) == 0
    run = tmp_path / "logs/dofa-linear-probe-chips/version_0"
    assert (run / "checkpoints/last.ckpt").is_file()
    assert "val_OverallAccuracy" in (run / "metrics.csv").read_text()
    capsys.readouterr()
    (tmp_path / "nochips").mkdir()
    for args, said in (
        (["--data.init_args.root", "nochips"], "ChipFolder: Couldn't find any class folder"),
        # helper-126: fewer classes failed at the first batch with a label beyond them (maybe
        # late in an epoch), more trained a head for classes no chip has
        (["--model.init_args.num_classes", "3"], "the task has num_classes=3, but chips/ holds 2 "
         "class folders (bare, cropland): set num_classes=2 (--model.init_args.num_classes 2)"),
    ):  # fmt: skip
        assert main([*fit, *args]) == 2, args
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith(f"torchgeo-dofa: error: {said}"), line
    # test without test chips (test_split 0) ran nothing and exited 0
    last = str(run / "checkpoints/last.ckpt")
    test = ["test", *fit[1:3], "--model.init_args.weights", "null", "--ckpt_path", last,
            "--trainer.enable_progress_bar", "false"]  # fmt: skip
    assert main(test) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(
        "torchgeo-dofa: error: DOFAChipFolderDataModule holds no chips to test: test_split is 0"
    ), line
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]  # none left


def test_a_chip_folder_reads_what_its_files_say_and_names_the_file_it_refuses(
    tmp_path: Path,
) -> None:
    """helper-123: TorchGeo's rasterio_loader read nodata as values, an alpha band as a
    fifth band and ignored band descriptions (red and blue swapped), and the errors of a bad
    chip did not name it; an 8-bit folder warned once per chip read."""
    from torchgeo_dofa.datasets import ChipFolder
    from torchgeo_dofa.transforms import DOFAPreprocess, ReflectanceError

    chips = _labelled_chips(tmp_path / "chips", per_class=2)
    bands = ["B04", "B03", "B02", "B08"]
    data = ChipFolder(tmp_path / "chips", bands=bands)
    path = tmp_path / "chips/bare/0.tif"
    with rasterio.open(path) as src:
        profile = src.profile
    four = chips["bare"][0]
    reference = data[0]["image"]

    def write(array: np.ndarray, descriptions: tuple[str, ...] = (), **changes: Any) -> None:
        with rasterio.open(path, "w", **(profile | {"count": len(array)} | changes)) as dst:
            if len(array) == 5:  # the 5th band is an alpha band (said before the write)
                dst.colorinterp = [ColorInterp.gray] * 4 + [ColorInterp.alpha]
            dst.write(array.astype(changes.get("dtype", profile["dtype"])))
            if descriptions:
                dst.descriptions = descriptions

    # a declared nodata, then an alpha band: missing pixels (4 of 32 columns), 4 bands
    write(np.where(np.arange(32) < 4, 0, four), nodata=0)
    valid = data[0]["valid"]
    assert 0.85 < float(valid.float().mean()) < 0.9 and not bool(valid[:, :16].any())
    alpha = np.where(np.arange(32) < 4, 0, 255)[None].repeat(32, 0)[None]
    write(np.concatenate([four, alpha]), nodata=None)  # the alpha band masks instead
    with rasterio.open(path) as src:
        assert src.colorinterp[4].name == "alpha"
    assert data[0]["image"].shape == (4, 224, 224)
    assert 0.85 < float(data[0]["valid"].float().mean()) < 0.9
    # described in another order: put into bands=' order (the same image as before)
    write(four[[2, 1, 0, 3]], descriptions=("B02", "B03", "B04", "B08"))
    torch.testing.assert_close(data[0]["image"], reference)
    # the refusals, each naming the chip
    write(four, descriptions=("B04", "B03", "B02", "B05"))
    with pytest.raises(
        BandError, match=f"^chip {re.escape(str(path))} holds the bands B4, B3, B2, B5 "
    ):
        data[0]
    write(four[:3])
    with pytest.raises(
        BandError, match=f"^chip {re.escape(str(path))} has 3 bands, but bands= names 4"
    ):
        data[0]
    # ... and as the dataset is made, before any training, with how many more and which
    with pytest.raises(BandError, match=f"^chip {re.escape(str(path))} has 3 bands, .*order$"):
        ChipFolder(tmp_path / "chips", bands=bands)
    other = tmp_path / "chips/cropland/1.tif"
    other.write_text("not a raster")
    more = f"order \\(and 1 more of the 4 chips: {re.escape(str(other))} \\(cannot be read\\)\\)$"
    with pytest.raises(BandError, match=more):
        ChipFolder(tmp_path / "chips", bands=bands)
    other.write_bytes((tmp_path / "chips/cropland/0.tif").read_bytes())
    write(four / 10000, dtype="float32")
    with pytest.raises(
        ReflectanceError, match=f"^chip {re.escape(str(path))}: input looks already scaled"
    ):
        data[0]
    path.write_text("not a raster")
    with pytest.raises(InputError, match=f"^cannot read chip {re.escape(str(path))}: "):
        data[0]
    # descriptions of some bands that contradict bands=
    write(four, descriptions=("B02", "", "B04", "nir"))
    with pytest.raises(
        BandError,
        match=f"^chip {re.escape(str(path))}'s band descriptions contradict bands=.*: band 1 is "
        r"B2 \(bands= says B4\); band 3 is B4 \(bands= says B2\)",
    ):
        data[0]
    # 8-bit chips: one warning for the root, as the dataset is made (not per chip read, nor
    # per loader worker); a 4-band one is RGBA to GDAL: its 4th band's zeros mask nothing
    for name in ("0.tif", "1.tif"):
        path = tmp_path / "chips/bare" / name
        nir_zero = np.where(np.arange(32) < 4, 0, four // 40)  # 4 zero columns in every band
        nir_zero[:3] = four[:3] // 40 + 1
        write(nir_zero, dtype="uint8", nodata=None)
    with rasterio.open(path) as src:
        assert src.colorinterp[3] == ColorInterp.alpha  # GDAL's default for 4 x uint8
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        data = ChipFolder(tmp_path / "chips", bands=bands)
        for _ in range(3):
            data[0], data[1]
    said = [str(w.message) for w in seen if issubclass(w.category, ReflectanceWarning)]
    assert len(said) == 1 and said[0].startswith(
        f"the chips of {tmp_path / 'chips'} have dtype uint8, which cannot hold raw"
    ), said
    assert bool(data[0]["valid"].all()), "the 4th band's zeros masked the chip"
    # transforms for other bands; a class folder without chips
    with pytest.raises(BandError, match=r"was given transforms preprocessing the bands"):
        ChipFolder(tmp_path / "chips", bands=bands, transforms=DOFAPreprocess(bands[::-1]))
    (tmp_path / "chips/water").mkdir()
    (tmp_path / "chips/water/w.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(
        FileNotFoundError, match=r"^ChipFolder: .*water.* \(it reads \.tif, \.tiff, \.jp2"
    ):
        ChipFolder(tmp_path / "chips", bands=bands)
    (tmp_path / "chips/water/w.png").unlink()
    (tmp_path / "chips/water").rmdir()
    # a JPEG2000 chip (lossless) is read as its GeoTIFF; a PNG is no chip
    crop = tmp_path / "chips/cropland"
    with rasterio.open(crop / "0.tif") as src:
        jp2 = {"driver": "JP2OpenJPEG", "width": 32, "height": 32, "count": 4,
               "dtype": "uint16", "crs": src.crs, "transform": src.transform}  # fmt: skip
        with rasterio.open(crop / "2.jp2", "w", REVERSIBLE="YES", QUALITY=100, **jp2) as dst:
            dst.write(src.read())
    (crop / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    data = ChipFolder(tmp_path / "chips", bands=bands)
    assert [Path(p).name for p, _ in data.samples[-3:]] == ["0.tif", "1.tif", "2.jp2"]
    torch.testing.assert_close(data[len(data) - 1]["image"], data[len(data) - 3]["image"])


def test_empty_chips_are_left_out_of_a_classification_loss_and_metrics(tmp_path: Path) -> None:
    """helper-123: a chip without a valid pixel (all nodata) was trained and scored as its
    folder's class. It is left out of the loss and the metrics now (checked against the loss
    and accuracy computed by hand over the other chips), with one warning; a first training
    epoch of such chips only is refused, as segmentation's without a labelled pixel."""
    from torch.utils.data import Subset

    from torchgeo_dofa import stack_dofa_samples
    from torchgeo_dofa.datasets import ChipFolder

    _labelled_chips(tmp_path / "chips", per_class=2)
    for name in ("bare/1.tif", "cropland/1.tif"):  # the demo scene's nodata is 0
        with rasterio.open(tmp_path / "chips" / name, "r+") as dst:
            assert dst.nodata == 0
            dst.write(np.zeros((4, 32, 32), np.uint16))
    data = ChipFolder(tmp_path / "chips", bands=["B04", "B03", "B02", "B08"])
    batch = stack_dofa_samples([data[i] for i in range(4)])
    assert batch["empty"].tolist() == [False, True, False, True]
    task = DOFAClassificationTask(num_classes=2, weights=None, head_norm=False)
    quiet: dict[str, Any] = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    trainer = Trainer(**quiet)
    loader = DataLoader(data, batch_size=4, collate_fn=stack_dofa_samples)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.validate(task, loader)
        trainer.validate(task, loader)
    said = [str(w.message) for w in seen if "chips without a valid pixel" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("chips without a valid pixel"), said
    held = ~batch["empty"]
    with torch.no_grad():
        logits = task.eval()(batch["image"][held], batch["wavelengths"][held])
    loss = F.cross_entropy(logits, batch["label"][held])
    accuracy = (logits.argmax(1) == batch["label"][held]).float().mean()
    metrics = trainer.callback_metrics
    assert float(metrics["val_loss"]) == pytest.approx(float(loss), rel=1e-5)
    assert float(metrics["val_OverallAccuracy"]) == pytest.approx(float(accuracy))
    # predictions: NaN rows for the empty chips (as DOFAEmbedder's NaN embeddings); they
    # were confident probabilities of a class
    (probabilities,) = cast(list[torch.Tensor], trainer.predict(task, loader))
    assert bool(probabilities[~held].isnan().all())
    torch.testing.assert_close(probabilities[held], logits.softmax(1), rtol=1e-4, atol=1e-6)
    # head_norm's BatchNorm learns its statistics from the chips with data alone
    probe = DOFAClassificationTask(num_classes=2, weights=None)  # linear probe, head_norm
    three = DataLoader(Subset(data, [0, 1, 2]), batch_size=3, collate_fn=stack_dofa_samples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(max_steps=1, **quiet).fit(probe, three)
    norm = probe._head_batch_norm()
    assert norm is not None and norm.running_mean is not None
    with torch.no_grad():
        pooled = probe.eval().embed(batch["image"][[0, 2]], batch["wavelengths"][[0, 2]])
    # after one batch: its mean (a cumulative average, momentum None), or momentum x mean
    expected = pooled.mean(0) * (1.0 if norm.momentum is None else norm.momentum)
    torch.testing.assert_close(norm.running_mean, expected, rtol=1e-4, atol=1e-5)
    # an epoch of empty chips only: refused first in training; NaN metrics in a validation
    # (multilabel's average precision failed in torchmetrics' compute without a sample)
    empty_only = DataLoader(Subset(data, [1, 3]), batch_size=2, collate_fn=stack_dofa_samples)
    for kind in ("multiclass", "multilabel"):
        task = DOFAClassificationTask(num_classes=2, weights=None, task=kind, head_norm=False)
        loader = empty_only
        if kind == "multilabel":  # 0/1 per class
            multilabel = [data[i] | {"label": F.one_hot(data[i]["label"], 2)} for i in (1, 3)]
            loader = DataLoader(multilabel, batch_size=2, collate_fn=stack_dofa_samples)  # type: ignore[arg-type]
        with pytest.raises(
            NoLabelledPixelError,
            match="^the first training epoch had no chip with data: every chip was empty",
        ):
            Trainer(max_epochs=1, **quiet).fit(task, loader)
        checked = Trainer(**quiet)
        with pytest.warns(UserWarning, match="epoch had no chip with data"):
            checked.validate(task, loader)
        assert math.isnan(float(checked.callback_metrics["val_OverallAccuracy"]))


# ------------------------------------------------------------------------------------------
# LightningCLI
# ------------------------------------------------------------------------------------------


@pytest.fixture
def cli_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI reads sys.argv too; give it a clean one (pytest's are not for it)."""
    monkeypatch.setattr(sys, "argv", ["torchgeo-dofa"])


@pytest.mark.usefixtures("cli_argv")
def test_cli_parses_task_init_args() -> None:
    cli = LightningCLI(
        DOFAClassificationTask,
        SpectralDataModule,
        run=False,
        save_config_callback=None,
        args=[
            "--model.num_classes=5",
            "--model.weights=null",
            "--model.mode=full",
            "--model.task=multilabel",
            "--model.layer_decay=0.65",
            "--model.bands=[B4,B3,B2,B8]",
            "--model.interpolate_pos_embed=true",
            "--model.patience=null",
            "--data.bands=[B4,B3,B2,B8]",
            "--data.size=32",
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
        ],
    )
    model = cli.model
    assert isinstance(model, DOFAClassificationTask)
    assert model.hparams["num_classes"] == 5 and model.hparams["mode"] == "full"
    assert model.hparams["task"] == "multilabel" and model.hparams["layer_decay"] == 0.65
    assert model.hparams["weights"] is None and model.hparams["patience"] is None
    assert model.hparams["bands"] == RGBN and model.encoder.interpolate_pos_embed
    assert isinstance(cli.datamodule, SpectralDataModule) and cli.datamodule.bands == tuple(RGBN)
    with pytest.raises(SystemExit):
        LightningCLI(
            DOFAClassificationTask,
            SpectralDataModule,
            run=False,
            save_config_callback=None,
            args=["--model.num_classes=5", "--model.mode=frozen"],
        )


@pytest.mark.usefixtures("cli_argv")
def test_example_classification_config_runs(tmp_path: Path) -> None:
    config = CONFIGS / "finetune_classification.yaml"
    cli = LightningCLI(
        save_config_callback=None,
        args=[
            "fit",
            "--config",
            str(config),
            "--trainer.fast_dev_run=true",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
    )
    assert isinstance(cli.model, DOFAClassificationTask)
    assert cli.model.hparams["weights"] is None
    assert cli.trainer.state.finished
    assert "train_loss" in cli.trainer.callback_metrics


@pytest.mark.usefixtures("cli_argv")
def test_last_ckpt_is_the_last_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The example configs' ``save_last: true`` kept ``last.ckpt`` at the best epoch, not the
    last: Lightning >= 2.6 writes it only when the monitored metric improves, so a resume from
    it after a kill lost every epoch since (here the metric never moves: lr 1e-30)."""
    from torchgeo_dofa.cli import main

    monkeypatch.chdir(tmp_path)  # the config logs to ./logs
    args = [
        "fit", "--config", str(CONFIGS / "finetune_classification.yaml"),
        "--data.init_args.num_samples=8", "--data.init_args.batch_size=4",
        "--trainer.max_epochs=2", "--model.init_args.lr=1e-30",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    ]  # fmt: skip
    assert main(args) == 0
    (folder,) = tmp_path.glob("logs/*/version_0/checkpoints")
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    last = torch.load(folder / "last.ckpt", weights_only=False, map_location="cpu")
    assert (last["epoch"], last["global_step"]) == (1, 4)
    for name in ("finetune_classification", "finetune_eurosat", "finetune_segmentation"):
        callbacks = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["trainer"]["callbacks"]
        saving = [c["init_args"] for c in callbacks if c["class_path"].endswith("ModelCheckpoint")]
        assert [c.get("filename") for c in saving] == [None, "last"], name
        assert not any(c.get("save_last") for c in saving), name


@pytest.mark.usefixtures("cli_argv")
def test_example_segmentation_config_parses() -> None:
    config = CONFIGS / "finetune_segmentation.yaml"
    cli = LightningCLI(run=False, save_config_callback=None, args=["--config", str(config)])
    assert isinstance(cli.model, DOFASegmentationTask)
    assert isinstance(cli.datamodule, SpectralDataModule)
    assert cli.datamodule.kwargs["task"] == "segmentation"
    assert cli.model.hparams["num_classes"] == cli.datamodule.kwargs["num_classes"]
    # a random encoder (weights: null) passes almost none of the input through its frozen patch
    # embedding, so the example trains it (a linear probe stays at chance: README, Fine-tuning)
    assert cli.model.hparams["weights"] is None and cli.model.hparams["mode"] == "full"
    assert all(p.requires_grad for p in cli.model.encoder.backbone.patch_embed.parameters())

    # the README predicts a map from this run's last.ckpt (see test_last_ckpt_is_the_last_epoch)
    callbacks: list[Callback] = cli.trainer.callbacks  # type: ignore[attr-defined]
    saving = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    assert [(c.monitor, c.filename) for c in saving] == [
        ("val_AverageJaccardIndex", None),
        (None, "last"),
    ]
    assert "val_AverageJaccardIndex" in cli.model.val_metrics.keys()


class SignalAfterTrainBatch(Callback):
    """Send this process a real signal after training batch ``batch`` (as ``kill`` would)."""

    def __init__(self, signum: int, batch: int = 0) -> None:
        self.signum, self.batch = signum, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.batch + 1:
            os.kill(os.getpid(), self.signum)


def _fit_command(tmp_path: Path, *extra: str) -> list[str]:
    """``torchgeo-dofa fit`` with the example classification config, small and fast."""
    return [
        sys.executable, "-m", "torchgeo_dofa", "fit",
        "--config", str(CONFIGS / "finetune_classification.yaml"),
        "--data.init_args.num_samples", "8", "--data.init_args.batch_size", "2",
        "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_stops_fit_after_the_batch_and_saves_a_checkpoint_to_resume(
    tmp_path: Path, signum: int
) -> None:
    """A first Ctrl-C during ``fit`` was acknowledged, then training ran to its last epoch
    (exit 0); Lightning alone ended ``fit`` on SIGTERM with exit status 0 and nothing saved."""
    import subprocess

    callback = json.dumps(
        [{"class_path": f"{__name__}.SignalAfterTrainBatch", "init_args": {"signum": signum}}]
    )
    # trained in full, where the config says linear-probe (the class's default)
    cmd = _fit_command(tmp_path, f"--trainer.callbacks+={callback}", "--model.init_args.mode=full")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 128 + signum, proc.stderr[-3000:]
    folder = tmp_path / "logs" / "dofa-linear-probe-synthetic" / "version_0" / "checkpoints"
    saved = folder / "interrupted.ckpt"
    name = signal.Signals(signum).name
    errors = [line for line in proc.stderr.splitlines() if "torchgeo-dofa: error" in line]
    assert errors == [
        f"torchgeo-dofa: error: stopped by {name}: training stopped in epoch 0 after step 1, "
        f"its state saved in {saved}: resume with the same command and --ckpt_path {saved}"
    ], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "weights_only" not in proc.stderr  # Lightning's note on an unset choice
    if signum == signal.SIGINT:
        assert "torchgeo-dofa: Ctrl-C: stopping after the training batch in progress" in (
            proc.stderr
        )
    state = torch.load(saved, map_location="cpu", weights_only=False)
    assert (state["epoch"], state["global_step"]) == (0, 1)  # right after the first step
    assert sorted(p.name for p in folder.iterdir()) == ["interrupted.ckpt"]  # no epoch ended
    if signum == signal.SIGTERM:
        return
    # the command it names resumes: training goes on from that step to the epoch's end; a
    # setting changed on the command line is the checkpoint's again, which is said (it was
    # replaced without a word), as is the config's mode (helper-122: it went unsaid, the
    # config's value being the class's default)
    proc = subprocess.run(
        [*_fit_command(tmp_path), "--model.init_args.lr", "0.01", "--ckpt_path", str(saved)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Restored all states from the checkpoint" in proc.stderr
    assert (
        f"torchgeo-dofa: warning: --ckpt_path {saved} restores the task it saved, so its "
        "hyperparameters replace the config's: mode='full' (the config said 'linear-probe'), "
        "lr=0.001 (the config said 0.01); to start a new "
        "run with other settings from its encoder's weights (the head starts anew), give "
        f"--model.init_args.weights {saved} instead of --ckpt_path"
    ) in proc.stderr, proc.stderr[-3000:]
    resumed = tmp_path / "logs" / "dofa-linear-probe-synthetic" / "version_1"
    last = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (0, 4)  # the epoch's 4 batches


class SignalAt(Callback):
    """Send this process a real signal in ``setup``, at the first validation batch or at
    training's end (after the last epoch's checkpoints)."""

    def __init__(self, signum: int, where: str) -> None:
        self.signum, self.where = signum, where

    def setup(self, trainer, pl_module, stage) -> None:
        if self.where == "setup":
            os.kill(os.getpid(), self.signum)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.where == "train_end":
            os.kill(os.getpid(), self.signum)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.where == "validation" and not trainer.sanity_checking and batch_idx == 0:
            os.kill(os.getpid(), self.signum)


def test_a_signal_before_training_or_during_its_validation_stops_fit_where_it_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """A Ctrl-C before training began ended in the embed job's "chips already written are
    kept" (or, once the handler ran, stopped after one training step); one during the
    validation in ``fit`` saved a state whose resume never ran that validation (no val
    metrics for the epoch, ModelCheckpoint without its epoch checkpoint)."""
    from torchgeo_dofa.cli import main

    monkeypatch.chdir(tmp_path)
    base = _fit_command(tmp_path)[3:]  # without python -m torchgeo_dofa

    def fit(where: str, *extra: str, signum: int = 2) -> tuple[int, str]:
        callback = [
            {"class_path": f"{__name__}.SignalAt", "init_args": {"signum": signum, "where": where}}
        ]
        code = main([*base, f"--trainer.callbacks+={json.dumps(callback)}", *extra])
        return code, capfd.readouterr().err  # the acknowledgement is an os.write to fd 2

    logs = tmp_path / "logs" / "dofa-linear-probe-synthetic"
    code, err = fit("setup")
    assert code == 130, err[-3000:]
    assert "torchgeo-dofa: Ctrl-C: stopping before training begins (nothing to save yet)" in err
    assert err.endswith(
        "torchgeo-dofa: error: stopped by SIGINT: fit stopped before it began, nothing saved: "
        "rerun the same command\n"
    ), err[-3000:]
    assert not (tmp_path / "logs").exists()  # no run folder holding only the config.yaml

    code, err = fit("validation", "--trainer.max_epochs", "2")
    assert code == 130, err[-3000:]
    assert "torchgeo-dofa: Ctrl-C: stopping once the validation in progress ends, saving" in err
    folder = logs / "version_0" / "checkpoints"
    saved = folder / "interrupted.ckpt"
    assert f"training stopped at the end of epoch 0 after step 4, its state saved in {saved}" in err
    # the validation ran to its end: its metric and the epoch's checkpoints are there
    names = sorted(p.name for p in folder.iterdir())
    assert names[1:] == ["interrupted.ckpt", "last.ckpt"] and names[0].startswith("epoch=0-")
    assert "val_OverallAccuracy" in (logs / "version_0" / "metrics.csv").read_text()
    state = torch.load(saved, map_location="cpu", weights_only=False)
    assert state["global_step"] == 4
    # resumed, the next epoch runs (and not epoch 0's validation or batches again)
    code, err = fit("none", "--trainer.max_epochs", "2", "--ckpt_path", str(saved))
    assert code == 0, err[-3000:]
    last = torch.load(
        logs / "version_1" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert (last["epoch"], last["global_step"]) == (1, 8)
    assert not list(folder.glob(".*partial"))  # the save's staging file is gone
    # in the last epoch's validation there is nothing left to stop: it finishes, exit 0 (130
    # and "resume with ..." before, a resume that did nothing)
    # SIGTERM too (Lightning's own stop after the epoch then raised: exit 143, and a state
    # "in epoch 1" saved of a run with one epoch); a stop after the last epoch's checkpoints
    # likewise (it promised a checkpoint, then exited 0 without a word)
    finished = "the stop came after the last epoch had trained: training finished, nothing to "
    for version, (where, signum) in enumerate(
        [("validation", 2), ("validation", 15), ("train_end", 2), ("train_end", 15)], start=2
    ):
        code, err = fit(where, signum=signum)
        assert code == 0, (where, signum, err[-3000:])
        assert err.count(finished) == 1, (where, signum, err[-3000:])
        if where == "validation":
            name = "Ctrl-C" if signum == 2 else "SIGTERM"
            assert f"torchgeo-dofa: {name}: the last epoch has trained, so training " in err
        assert not (logs / f"version_{version}" / "checkpoints" / "interrupted.ckpt").exists()
        last = logs / f"version_{version}" / "checkpoints" / "last.ckpt"
        assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4
    # SIGTERM in an earlier epoch's validation: Lightning's stop after the epoch said "in
    # epoch 1", where epoch 0 had ended
    code, err = fit("validation", "--trainer.max_epochs", "2", signum=15)
    assert code == 143, err[-3000:]
    assert "training stopped at the end of epoch 0 after step 4, its state saved in " in err
    # validate stopped in its run says what to do (it said only "validate did not finish")
    assert base[0] == "fit"
    callback = [
        {"class_path": f"{__name__}.SignalAt", "init_args": {"signum": 2, "where": "validation"}}
    ]
    code = main(["validate", *base[1:], f"--trainer.callbacks+={json.dumps(callback)}"])
    err = capfd.readouterr().err
    assert code == 130, err[-3000:]
    assert err.endswith(
        "torchgeo-dofa: error: stopped by SIGINT: validate did not finish; nothing saved at the "
        "stop: rerun the same command\n"
    ), err[-3000:]


def test_the_interrupted_checkpoint_is_renamed_into_place_and_a_killed_save_is_cleared(
    tmp_path: Path,
) -> None:
    """Lightning stages a checkpoint in $TMPDIR and moves it: across disks a kill during that
    copy left a partial ``interrupted.ckpt``. It is saved under a hidden name and renamed; a
    killed save's hidden file is removed by the next save, a running one's kept."""
    from torchgeo_dofa.jobs import _save_checkpoint_whole

    model = torch.nn.Linear(2, 1)

    class Tiny(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = model

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.layer(batch).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(Tiny(), DataLoader(cast(Any, torch.ones(2, 2))))
    path = tmp_path / "checkpoints" / "interrupted.ckpt"
    path.parent.mkdir()
    killed = path.parent / ".interrupted.ckpt.999999999.partial"  # no such process
    running = path.parent / f".interrupted.ckpt.{os.getppid()}.partial"
    killed.write_bytes(b"PK\x03\x04 half")
    running.write_bytes(b"PK\x03\x04 in progress")
    _save_checkpoint_whole(trainer, path)
    assert sorted(p.name for p in path.parent.iterdir()) == [running.name, path.name]
    state = torch.load(path, map_location="cpu", weights_only=False)
    assert state["global_step"] == 1
    torch.testing.assert_close(state["state_dict"]["layer.weight"], model.weight.detach())
    # a remote checkpoint folder (an fsspec URL) is Lightning's to write: Path("s3://b/c")
    # would have made a local folder s3:/b/c
    import fsspec

    from torchgeo_dofa.jobs import interrupted_checkpoint_path

    trainer = Trainer(
        max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", callbacks=[ModelCheckpoint(dirpath="memory://ckpts/")],
    )  # fmt: skip
    trainer.fit(Tiny(), DataLoader(cast(Any, torch.ones(2, 2))))
    remote = interrupted_checkpoint_path(trainer)
    assert remote == "memory://ckpts/interrupted.ckpt"
    _save_checkpoint_whole(trainer, remote)
    assert fsspec.filesystem("memory").exists("/ckpts/interrupted.ckpt")
    assert not Path("memory:").exists()


@pytest.mark.parametrize("spelling", ["none", "Random", "null"])
def test_the_commands_spelling_of_random_weights_builds_a_random_encoder(spelling: str) -> None:
    """``--model.init_args.weights none`` in a fine-tuning config was taken for a file named
    'none' ("weights file 'none' does not exist"), while the embedder's took it as random."""
    for task in (
        DOFAClassificationTask(num_classes=2, weights=spelling, patience=None),
        DOFASegmentationTask(num_classes=2, weights=spelling, patience=None),
    ):
        task.configure_models()
        assert task.encoder.weights_id.startswith("random")


def loader(mask: torch.Tensor) -> DataLoader[Any]:
    """Normalised 4-band 32 x 32 chips (one spectrum plus noise) with the masks given."""
    image = (torch.full((len(mask), 4, 32, 32), 3000.0) / 10000 * 255 - 100) / 60
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(0))
    wl = torch.tensor([0.665, 0.56, 0.49, 0.842])
    samples = [
        {"image": image[i] + 0.1 * noise[i], "wavelengths": wl, "mask": mask[i]}
        for i in range(len(mask))
    ]
    return DataLoader(samples, batch_size=2, collate_fn=stack_samples)  # type: ignore[arg-type]


class UnlabelledChips(LightningDataModule):
    """Segmentation chips whose every mask pixel is 255 (no label), for a CLI fit."""

    def train_dataloader(self) -> DataLoader[Any]:
        return loader(torch.full((4, 32, 32), 255, dtype=torch.long))

    def val_dataloader(self) -> DataLoader[Any]:
        return self.train_dataloader()


def test_an_epoch_without_a_labelled_pixel_is_named_not_scored_zero(tmp_path: Path) -> None:
    """Every pixel of an epoch ignored (ignore_index or no-data): torchmetrics' 0.0 was logged
    as train_OverallAccuracy, read as a model that gets every pixel wrong, and a fit whose
    batches had no labelled pixel trained to its last epoch on loss 0, learning nothing. Now
    the first training epoch without one is an error (before its checkpoint is saved), and a
    validation epoch without one logs NaN with a warning."""
    ignored = torch.full((4, 32, 32), 255, dtype=torch.long)
    labelled = ignored.clone()
    labelled[:, :8] = 1  # a strip of class 1 in every chip
    names = ("OverallAccuracy", "AverageAccuracy", "AverageJaccardIndex")

    seed_everything(0)
    trainer = make_trainer(tmp_path, 2, [])
    with pytest.warns(UserWarning, match="the validation epoch had no labelled pixel") as caught:
        trainer.fit(small_segmentation(ignore_index=255), loader(labelled), loader(ignored))
    message = next(str(w.message) for w in caught if "validation epoch" in str(w.message))
    assert (
        "(every mask pixel was ignore_index=255 or had 'valid' False): its metrics and "
        "val_loss are NaN; check that the label rasters cover the image chips" in message
    )
    logged = trainer.logged_metrics
    assert all(math.isnan(float(logged[f"val_{n}"])) for n in names), dict(logged)
    assert all(0.0 <= float(logged[f"train_{n}"]) <= 1.0 for n in names), dict(logged)

    saved = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = Trainer(
        accelerator="cpu", max_epochs=2, logger=False, callbacks=[saved],
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    with pytest.raises(
        ValueError,
        match=r"^the first training epoch had no labelled pixel: every mask pixel was "
        r"ignore_index=255 or had 'valid' False, so the loss was 0 and DOFASegmentationTask "
        r"learned nothing from it; check that the label rasters cover",
    ):
        trainer.fit(small_segmentation(ignore_index=255), loader(ignored))
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())
    # with validations inside the epoch (val_check_interval), ModelCheckpoint saves at each
    # validation's end, the last one before the epoch's end hooks: the epoch is judged as
    # that one starts (the checkpoint of step 2 was saved, then the error). One inside the
    # epoch judges nothing: the labelled chips of sparse labels may come later (here the
    # second batch has them), so the checkpoint of step 1 stays
    for masks, every in ((ignored, 0.5), (torch.cat([ignored[:2], labelled[2:]]), 1)):
        folder = tmp_path / f"ckpt{every}"
        trainer = Trainer(
            accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
            callbacks=[ModelCheckpoint(dirpath=folder, save_top_k=-1)],
            enable_model_summary=False, val_check_interval=every, num_sanity_val_steps=0,
        )  # fmt: skip
        task = small_segmentation(ignore_index=255)
        if every == 0.5:
            with pytest.raises(NoLabelledPixelError, match="^the first training epoch had no"):
                trainer.fit(task, loader(masks), loader(labelled))
            assert [p.name for p in folder.iterdir()] == ["epoch=0-step=1.ckpt"]
        else:
            trainer.fit(task, loader(masks), loader(labelled))
            assert task._trained_on_labels and trainer.global_step == 2

    # a fit resumed after a labelled epoch is no first epoch: an unlabelled one warns, as in
    # the fit that was not interrupted (it raised: the resumed fit was taken for a new one)
    seed_everything(0)
    task = small_segmentation(ignore_index=255)
    trainer = make_trainer(tmp_path, 1, [], limit_val_batches=0)
    trainer.fit(task, loader(labelled))
    trainer.save_checkpoint(tmp_path / "epoch0.ckpt")
    trainer = make_trainer(tmp_path, 2, [], limit_val_batches=0)
    with pytest.warns(
        UserWarning,
        match=r"the training epoch had no labelled pixel \(.*\): its metrics are NaN and "
        r"train_loss 0 \(no gradient\)",
    ):
        trainer.fit(
            small_segmentation(ignore_index=255),
            loader(ignored),
            ckpt_path=tmp_path / "epoch0.ckpt",
        )
    assert math.isnan(float(trainer.logged_metrics["train_OverallAccuracy"]))
    # the same checkpoint loaded to fine-tune anew on other data: a first epoch again
    task = DOFASegmentationTask.load_from_checkpoint(tmp_path / "epoch0.ckpt")
    trainer = make_trainer(tmp_path, 1, [], limit_val_batches=0)
    with pytest.raises(NoLabelledPixelError, match="^the first training epoch had no"):
        trainer.fit(task, loader(ignored))


def test_a_cli_fit_without_labels_says_so_and_leaves_no_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first epoch's refusal through ``fit --config``: one line, exit 2, and the run
    folder (config.yaml, hparams.yaml, metrics.csv of loss-0 rows) removed."""
    import yaml

    from torchgeo_dofa.cli import main

    monkeypatch.chdir(tmp_path)
    cfg = yaml.safe_load((CONFIGS / "finetune_segmentation.yaml").read_text())
    cfg["model"]["init_args"] |= {"ignore_index": 255, "mode": "linear-probe"}
    cfg["data"] = {"class_path": f"{__name__}.UnlabelledChips"}
    cfg["trainer"] |= {"max_epochs": 1, "enable_progress_bar": False}
    cfg["trainer"]["enable_model_summary"] = False
    (tmp_path / "seg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(tmp_path / "seg.yaml")]) == 2
    said = capsys.readouterr().err.splitlines()[-1]
    assert said.startswith(
        "torchgeo-dofa: error: the first training epoch had no labelled pixel: every mask "
        "pixel was ignore_index=255 or had 'valid' False"
    ), said
    assert not list(tmp_path.glob("logs/*/version_*")), sorted(tmp_path.rglob("*"))
    # a run that saved a checkpoint (a validation inside the epoch; outside the run's folder)
    # keeps its folder: its metrics.csv holds that validation's rows
    cfg["trainer"] |= {"val_check_interval": 0.5}
    cfg["trainer"]["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ckpts"), "save_last": True},
        }
    ]
    (tmp_path / "seg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(tmp_path / "seg.yaml")]) == 2
    assert (tmp_path / "ckpts" / "last.ckpt").is_file()
    (kept,) = tmp_path.glob("logs/*/version_*")
    assert "val_loss" in (kept / "metrics.csv").read_text()


def test_a_fit_refused_at_its_first_batch_leaves_no_run_folder(tmp_path: Path) -> None:
    """A fit refused at its first batch (here a batch of 1 chip for the probe's BatchNorm)
    left logs/<name>/version_0 holding config.yaml and the logger's hparams.yaml, taken for
    a run; the next run became version_1. Its warnings are one line each (they were Python's
    form, located at runpy's line)."""
    one_chip = ["--data.init_args.batch_size", "1", "--trainer.limit_val_batches", "0"]
    done = subprocess.run(
        _fit_command(tmp_path, *one_chip, "--model.init_args.layer_decay", "0.75"),
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "torchgeo-dofa: error: a training batch of 1 chip" in done.stderr
    said = "torchgeo-dofa: warning: layer_decay=0.75 is ignored with mode='linear-probe'"
    assert any(line.startswith(said) for line in done.stderr.splitlines()), done.stderr[-3000:]
    assert not list(tmp_path.glob("logs/*/version_*")), list(tmp_path.rglob("*"))


def test_a_fit_refused_by_its_settings_or_data_leaves_no_new_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The synthetic data module checked its settings at setup, after the logger made
    logs/<name>/version_N: a refused run (exit 2) left it empty, taken for a run, the next
    run's folder the one after. Now they are checked as it is built, before the trainer;
    a refusal by a data module's setup (TorchGeo's dataset not found) removes the empty
    folder its logger made; an earlier run's empty folder is kept."""
    from torchgeo_dofa.cli import main

    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "logs" / "dofa-linear-probe-synthetic"
    (runs / "version_0").mkdir(parents=True)  # an earlier run's, empty: kept

    def only_the_earlier_folder() -> None:
        assert [p.name for p in runs.iterdir()] == ["version_0"], sorted(tmp_path.rglob("*"))
        assert not list((runs / "version_0").iterdir())

    fit = [
        "fit", "--config", str(CONFIGS / "finetune_classification.yaml"),
        "--data.init_args.num_samples", "8", "--data.init_args.batch_size", "2",
        "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]  # fmt: skip
    refused = [
        (["--data.init_args.num_samples", "0"], "num_samples 0 (needs >= 1)"),
        (["--data.init_args.size", "0"], "size 0 (needs >= 1 pixel)"),
        (["--data.init_args.bands", "[]"], "bands [] (needs at least one band)"),
        (
            ["--data.init_args.task", "segmentation", "--data.init_args.cell_size", "0"],
            "cell_size 0 (needs >= 1 pixel)",
        ),
        (["--data.init_args.num_classes", "1"], "num_classes 1 (needs >= 2)"),
    ]
    for args, said in refused:
        assert main([*fit, *args]) == 2, args
        only_the_earlier_folder()
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line == f"torchgeo-dofa: error: synthetic chips cannot be made with {said}", line
    # refused by the optimizer (the folder held config.yaml), by the data loader
    for args in (["--model.init_args.lr", "-1"], ["--data.init_args.batch_size", "0"]):
        assert main([*fit, *args]) == 2, args
        only_the_earlier_folder()
    # no training batch: 8 chips, batch_size 100 and drop_last (it ended with exit 0, a run
    # folder of its settings alone and Lightning's "No training batches" line)
    assert main([*fit, "--data.init_args.batch_size", "100"]) == 2
    only_the_earlier_folder()
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(
        "torchgeo-dofa: error: fit ran no training step: the training loader gave no batch "
        "(its length says 0). A batch_size above the number of training chips with drop_last"
    ), line
    # a data module whose setup finds no dataset: the logger had made the run's folder
    eurosat = {
        "class_path": "torchgeo.datamodules.EuroSATDataModule",
        "init_args": {"batch_size": 2},
        "dict_kwargs": {"root": str(tmp_path / "no-eurosat")},
    }
    for args in ([], ["--trainer.logger.init_args.version", "0"]):  # an earlier run's: kept
        assert main([*fit, "--data", json.dumps(eurosat), *args]) == 2  # one line, not raised
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("torchgeo-dofa: error: EuroSAT: Dataset not found in `root="), line
        only_the_earlier_folder()
    with pytest.raises(ValueError, match=r"^synthetic chips cannot be made with size 0 \("):
        SpectralDataModule(size=0)  # as it is built, not at setup


# ------------------------------------------------------------------------------------------
# EuroSAT: TorchGeo's data module normalises its own way; DOFAEuroSATDataModule as DOFA does
# ------------------------------------------------------------------------------------------


def test_a_torchgeo_data_module_normalising_its_own_way_is_warned_of(
    tmp_path: Path, eurosat_root: Path
) -> None:
    """TorchGeo's EuroSATDataModule (the config's comment suggested it) normalises every
    batch with EuroSAT's statistics: values of +-3 as DOFA's, so a probe trained on inputs
    the encoder never saw, unwarned. Now its set-up warns, naming what it does and the fix
    (DOFAEuroSATDataModule does not: the next test)."""
    from torchgeo.datamodules import EuroSATDataModule

    from torchgeo_dofa.datamodules import EUROSAT_DOFA_BANDS
    from torchgeo_dofa.transforms import ReflectanceWarning

    task = DOFAClassificationTask(num_classes=3, weights=None)
    torchgeo_dm = EuroSATDataModule(root=eurosat_root, batch_size=2, bands=EUROSAT_DOFA_BANDS)
    trainer = make_trainer(tmp_path, 1, [], limit_val_batches=1)
    said = (
        r"EuroSATDataModule's batch augmentation \(aug\) subtracts mean \[947\.626, "
        r"1042\.93, 1118\.24, 1199\.47, \.\.\. \(9 values\)\] and divides by std \[.*not "
        r"DOFA's normalisation, so DOFAClassificationTask sees inputs .* "
        r"datamodule\.aug = DOFAPreprocess\(bands\)"
    )
    with pytest.warns(ReflectanceWarning, match=said), pytest.raises(ValueError, match="64x64"):
        trainer.validate(task, torchgeo_dm, verbose=False)  # warned before the first batch
    # kornia.enhance.Normalize likewise (helper-114: it went unnoticed)
    import kornia

    from torchgeo_dofa.embedder import foreign_normalisation

    enhance = kornia.enhance.Normalize(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]))
    assert foreign_normalisation(torch.nn.Sequential(enhance)) == (
        "subtracts mean [1, 2] and divides by std [3, 4]"
    )
    # TorchGeo's default for data modules without statistics: divides by 255
    bare = NonGeoDataModule(BandlessChips, 2, 0, bands=RGBN, size=32, num_samples=4)
    with pytest.warns(ReflectanceWarning, match=r"\(aug\) divides every batch by 255: "):
        make_trainer(tmp_path, 1, [], limit_val_batches=1).validate(
            DOFAClassificationTask(num_classes=4, weights=None, interpolate_pos_embed=True),
            bare,
            verbose=False,
        )


@pytest.mark.usefixtures("cli_argv")
def test_the_eurosat_config_trains_offline_with_its_overrides(
    tmp_path: Path, eurosat_root: Path
) -> None:
    """``finetune_eurosat.yaml`` as the README runs it for a first try: EuroSAT100's data
    module, random weights and a root that holds the data (no download); DOFA-normalised
    224 x 224 batches with their wavelengths, no warning of the normalisation."""
    from torchgeo_dofa.transforms import ReflectanceWarning

    seen: list[dict[str, Any]] = []

    class Seen(Callback):
        def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
            seen.append(args[1])

    with warnings.catch_warnings():
        warnings.simplefilter("error", ReflectanceWarning)
        cli = LightningCLI(
            run=False,
            save_config_callback=None,
            args=[
                "--config", str(CONFIGS / "finetune_eurosat.yaml"),
                "--model.init_args.weights", "null",
                "--data.class_path", "torchgeo_dofa.datamodules.DOFAEuroSAT100DataModule",
                "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
                "--data.dict_kwargs.root", str(eurosat_root),
                "--data.dict_kwargs.download", "false",
                "--trainer.fast_dev_run", "true", "--trainer.logger", "false",
                "--trainer.default_root_dir", str(tmp_path),
            ],
        )  # fmt: skip
        cli.trainer.callbacks.append(Seen())  # type: ignore[attr-defined]
        cli.trainer.fit(cli.model, cli.datamodule)
    assert len(seen) == 1 and seen[0]["image"].shape == (2, 9, 224, 224)
    assert seen[0]["wavelengths"].shape == (2, 9) and seen[0]["label"].shape == (2,)
    assert 0.5 < float(seen[0]["image"].abs().amax()) < 5  # DOFA-normalised reflectance
    assert cli.model.hparams["num_classes"] == 10 and cli.model.hparams["mode"] == "linear-probe"
    assert type(cli.datamodule).__name__ == "DOFAEuroSAT100DataModule"
    assert cli.trainer.state.finished and "train_loss" in cli.trainer.callback_metrics


def test_the_readme_eurosat_example_trains(eurosat_root: Path) -> None:
    """The README's EuroSAT block, run as written but offline and smaller."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("**EuroSAT (the DOFA paper's classification benchmark)**", 1)[1]
    code = block.split("```python\n", 1)[1].split("```", 1)[0]
    for old, new in {
        'root="data/eurosat", download=True, batch_size=64': (
            f"root={str(eurosat_root)!r}, download=False, batch_size=2"
        ),
        'weights="official"': "weights=None",
        "pl.Trainer(max_epochs=20)": "pl.Trainer(fast_dev_run=True, enable_progress_bar=False)",
    }.items():
        assert old in code, old
        code = code.replace(old, new)
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    task = namespace["task"]
    assert task.trainer.state.finished and "train_loss" in task.trainer.callback_metrics


def test_task_bands_given_as_one_string_are_refused() -> None:
    """helper-114: ``bands="RGB"`` was read as three bands without a word, ``"B4"`` as 'B'
    and '4' ("cannot infer wavelengths for band(s) ['4']")."""
    for bands in ("RGB", "B4"):
        with pytest.raises(BandError, match=rf"bands='{bands}' is one string: give a list"):
            DOFAClassificationTask(num_classes=2, weights=None, bands=bands)  # type: ignore[arg-type]
