"""Task writers: a fine-tuned task's predictions as a GeoTIFF map or a GeoParquet table.

Real Lightning prediction of a random DOFA base task over the bundled demo scene (6 chips),
checked against the task's own ``predict_step`` on each chip, computed here chip by chip.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import geopandas as gpd
import lightning.pytorch as pl
import numpy as np
import pytest
import rasterio
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torchgeo.datasets import stack_samples
from torchgeo.tasks import Classification

from tests.scenes import SCENE
from tests.trainers import cpu_trainer
from torchgeo_dofa.datamodules import DOFAPredictDataModule
from torchgeo_dofa.embedder import DOFAEmbedder, NonFiniteOutputError
from torchgeo_dofa.spatial import BBox, PointBuffer
from torchgeo_dofa.tasks import DOFAClassificationTask, DOFASegmentationTask
from torchgeo_dofa.weights import STATE_DIGEST_KEY, CheckpointError
from torchgeo_dofa.writers import (
    ClassificationWriter,
    GridWriter,
    PartsMismatchError,
    SegmentationWriter,
    parts_dir,
)


def _segmentation(seed: int = 0) -> DOFASegmentationTask:
    torch.manual_seed(seed)
    return DOFASegmentationTask(num_classes=3, weights=None, decoder_channels=32).eval()


@pytest.fixture(scope="module")
def segmentation() -> DOFASegmentationTask:
    return _segmentation()


@pytest.fixture(scope="module")
def classification() -> DOFAClassificationTask:
    torch.manual_seed(0)
    return DOFAClassificationTask(num_classes=4, weights=None).eval()


def _chips(task: pl.LightningModule) -> list[tuple[Any, dict[str, torch.Tensor], torch.Tensor]]:
    """Every chip of the demo scene's job, its preprocessed sample and the task's prediction
    for it alone (an independent computation: no writer, no Trainer)."""
    dm = DOFAPredictDataModule(SCENE)
    dm.setup("predict")
    assert dm.predict_dataset is not None and dm.predict_sampler is not None
    out = []
    task.eval()  # as Trainer.predict runs it (which leaves it in training mode after)
    with torch.inference_mode():
        for chip in dm.predict_sampler:
            sample = dm.predict_dataset[chip]
            batch = stack_samples([sample])
            out.append((chip, sample, task.predict_step(batch, 0)[0]))
    return out


def test_a_segmentation_map_holds_each_pixels_class_where_it_lies(
    tmp_path: Path, segmentation: DOFASegmentationTask
) -> None:
    """Class map and probabilities: the scene's pixel grid, the task's values chip by chip,
    no class where no pixel was read, a colour table, band names and tags."""
    names = ["water", "crop", "forest"]
    classes, probs = tmp_path / "out" / "classes.tif", tmp_path / "out" / "probs.tif"
    writers = [
        SegmentationWriter(classes, class_names=names),
        SegmentationWriter(probs, output="probabilities", class_names=names),
    ]
    dm = DOFAPredictDataModule(SCENE, batch_size=4)
    cpu_trainer(list(writers)).predict(segmentation, datamodule=dm, return_predictions=False)
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == [".torchgeo-dofa.lock", "classes.tif", "probs.tif"]  # no parts left

    with rasterio.open(SCENE) as src:
        scene_transform, scene_crs, (height, width) = src.transform, src.crs, src.shape
    with rasterio.open(probs) as p, rasterio.open(classes) as c:
        # the map's pixels are the scene's: same size, on the same grid, covering it
        assert p.crs == scene_crs == c.crs
        assert p.transform == c.transform
        t = p.transform
        assert (t.a, t.e) == (scene_transform.a, scene_transform.e)
        col0 = (scene_transform.c - t.c) / t.a
        row0 = (scene_transform.f - t.f) / t.e
        assert col0 == round(col0) and row0 == round(row0)
        col0, row0 = round(col0), round(row0)
        assert 0 <= row0 and row0 + height <= p.height and 0 <= col0 and col0 + width <= p.width
        assert p.descriptions == tuple(names) and c.descriptions == ("class",)
        assert p.dtypes == ("float32",) * 3 and p.nodata is not None and np.isnan(p.nodata)
        assert (c.dtypes, c.nodata) == (("uint8",), 255)
        colours = c.colormap(1)
        assert len({colours[k] for k in range(3)}) == 3 and colours[255][3] == 0  # nodata clear
        tags = c.tags()
        assert tags["task"] == "DOFASegmentationTask" and tags["num_classes"] == "3"
        assert tags["class_names"] == '["water", "crop", "forest"]'
        assert tags["sources"] == f'["{SCENE}"]'
        got_p, got_c = p.read(), c.read(1)
        map_top, map_left = t.f, t.c

    # every pixel outside the scene has no class
    inside = np.zeros(got_c.shape, bool)
    inside[row0 : row0 + height, col0 : col0 + width] = True
    assert (got_c[~inside] == 255).all() and np.isnan(got_p[:, ~inside]).all()
    # each chip's pixels are the task's own prediction for that chip, no-data pixels NaN
    for chip, sample, expected in _chips(segmentation):
        r = round((map_top - chip[1].stop) / 10.0)  # may lie above or left of the map
        col = round((chip[0].start - map_left) / 10.0)
        rows = slice(max(r, 0), min(r + 224, got_c.shape[0]))
        cols = slice(max(col, 0), min(col + 224, got_c.shape[1]))
        in_chip = (slice(rows.start - r, rows.stop - r), slice(cols.start - col, cols.stop - col))
        want = expected[:, in_chip[0], in_chip[1]].numpy().copy()
        want[:, ~sample["valid"][in_chip].numpy()] = np.nan
        assert want.shape[1] * want.shape[2] > 100 * 100
        np.testing.assert_allclose(got_p[:, rows, cols], want, rtol=1e-5, atol=1e-6)
    # the class map is the most probable class of those probabilities (the same float32
    # values: batch 1 here and batch 4 in the job may round a near tie the other way)
    scored = np.isfinite(got_p).all(axis=0)
    np.testing.assert_array_equal(got_c, np.where(scored, got_p.argmax(axis=0), 255))
    assert len(np.unique(got_c[inside])) > 1  # more than one class (else the test proves less)
    # overviews (QGIS drew a 10 m map zoomed out by decoding every block: helper-127): the
    # map is 592 px wide, halved to under 256; classes by mode, probabilities by average
    with rasterio.open(classes) as c, rasterio.open(probs) as p:
        assert c.overviews(1) == p.overviews(1) == [2, 4]
    with rasterio.open(classes, overview_level=0) as c, rasterio.open(probs, overview_level=0) as p:
        half_c, half_p = c.read(1), p.read()
    h, w = half_c.shape
    blocks = got_c[: 2 * h, : 2 * w].reshape(h, 2, w, 2)
    assert (blocks == half_c[:, None, :, None]).any(axis=(1, 3)).all()  # a class of its block
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # blocks without data: NaN
        mean = np.nanmean(got_p[:, : 2 * h, : 2 * w].reshape(3, h, 2, w, 2), axis=(2, 4))
    np.testing.assert_allclose(half_p, mean, rtol=1e-5, atol=1e-6)


def test_a_classification_table_holds_each_chips_probabilities_and_class(
    tmp_path: Path, classification: DOFAClassificationTask
) -> None:
    """One row per chip: its footprint in the scene's CRS, the task's probabilities for it
    (computed chip by chip here), the most probable class and its name."""
    names = ["a", "b", "c", "d"]
    path = tmp_path / "chips.parquet"
    dm = DOFAPredictDataModule(SCENE, batch_size=4)
    writer = ClassificationWriter(path, class_names=names)
    cpu_trainer([writer]).predict(classification, datamodule=dm, return_predictions=False)
    table = gpd.read_parquet(path)
    chips = _chips(classification)
    assert len(table) == len(chips) == 6
    with rasterio.open(SCENE) as src:
        assert table.crs == src.crs
    assert list(table.columns[:3]) == ["chip_id", "source", "time_start"]
    assert {"probabilities", "class", "class_name", "no_data", "geometry"} <= set(table.columns)
    assert "embedding" not in table.columns
    by_box = {tuple(round(v, 3) for v in g.bounds): i for i, g in enumerate(table.geometry)}
    for chip, _, expected in chips:
        row = table.iloc[by_box[(chip[0].start, chip[1].start, chip[0].stop, chip[1].stop)]]
        np.testing.assert_allclose(row["probabilities"], expected.numpy(), rtol=1e-5, atol=1e-6)
        assert row["class"] == int(expected.argmax()) and row["class_name"] == names[row["class"]]
        assert not row["no_data"]
    assert table["class"].dtype == np.int16


def test_a_multilabel_table_holds_each_chips_labels_at_the_threshold(tmp_path: Path) -> None:
    """A multilabel task's rows: the classes at or above ``threshold`` (as ``labels`` and
    ``label_names``), the threshold recorded in the file, no single ``class``."""
    torch.manual_seed(0)
    task = DOFAClassificationTask(num_classes=3, task="multilabel", weights=None).eval()
    path = tmp_path / "labels.parquet"
    dm = DOFAPredictDataModule(SCENE, batch_size=6)
    writer = ClassificationWriter(path, class_names=["a", "b", "c"], threshold=0.5)
    cpu_trainer([writer]).predict(task, datamodule=dm, return_predictions=False)
    table = gpd.read_parquet(path)
    assert "class" not in table.columns and table.attrs["threshold"] == "0.5"
    for _, _, expected in _chips(task):
        assert ((expected > 0) & (expected < 1)).all()  # sigmoid probabilities
    seen: set[int] = set()
    cut = 0  # chips where the threshold left a class out
    for probs, labels, names in zip(
        table.probabilities, table.labels, table.label_names, strict=True
    ):
        want = np.flatnonzero(np.asarray(probs) >= 0.5)
        np.testing.assert_array_equal(labels, want)
        assert list(names) == [["a", "b", "c"][i] for i in want]
        seen.update(want.tolist())
        cut += len(want) < 3
    assert seen and cut  # some labels given, some left out: the threshold was applied
    assert len(table) == 6


def test_an_interrupted_map_resumes_to_the_same_file_and_refuses_another_tasks_parts(
    tmp_path: Path, segmentation: DOFASegmentationTask
) -> None:
    """A stop after the first batch keeps its chips; the rerun computes the rest and gives
    the uninterrupted map. Parts of another task (other weights) are refused, not mixed."""
    whole, resumed = tmp_path / "whole.tif", tmp_path / "resumed.tif"
    dm = DOFAPredictDataModule(SCENE, batch_size=2)
    cpu_trainer([SegmentationWriter(whole)]).predict(segmentation, datamodule=dm)

    class FailAfterFirstBatch(pl.Callback):
        def on_predict_batch_end(self, *args: Any) -> None:
            raise RuntimeError("the job died")

    dm = DOFAPredictDataModule(SCENE, batch_size=2)
    with pytest.raises(RuntimeError, match="the job died"):
        trainer = cpu_trainer([SegmentationWriter(resumed), FailAfterFirstBatch()])
        trainer.predict(segmentation, datamodule=dm)
    assert not resumed.exists() and len(list(parts_dir(resumed).glob("*.npy"))) == 2
    with pytest.raises(PartsMismatchError, match="holds the chips of another job"):
        dm = DOFAPredictDataModule(SCENE, batch_size=2)
        cpu_trainer([SegmentationWriter(resumed)]).predict(_segmentation(seed=1), datamodule=dm)
    dm = DOFAPredictDataModule(SCENE, batch_size=2)
    cpu_trainer([SegmentationWriter(resumed)]).predict(segmentation, datamodule=dm)
    with rasterio.open(whole) as a, rasterio.open(resumed) as b:
        np.testing.assert_array_equal(a.read(), b.read())
        assert a.profile == b.profile
    assert not parts_dir(resumed).exists()


def test_a_task_writer_refuses_what_it_cannot_write_before_any_batch(
    tmp_path: Path, segmentation: DOFASegmentationTask, classification: DOFAClassificationTask
) -> None:
    """The wrong kind of model, class names that do not number the classes and tiled input:
    one error naming the fix, before a batch is computed, nothing written."""

    class CountBatches(pl.Callback):
        batches = 0

        def on_predict_batch_start(self, *args: Any) -> None:
            CountBatches.batches += 1

    out = tmp_path / "out"
    cases: list[tuple[pl.Callback, pl.LightningModule, type[Exception], str, dict[str, Any]]] = [
        (
            SegmentationWriter(out / "m.tif"),
            classification,
            TypeError,
            "SegmentationWriter writes the class probabilities of a segmentation task "
            "(DOFASegmentationTask), but DOFAClassificationTask is not one: "
            "ClassificationWriter writes that task's predictions",
            {},
        ),
        (
            ClassificationWriter(out / "t.parquet"),
            segmentation,
            TypeError,
            "ClassificationWriter writes the class probabilities of a classification task "
            "(DOFAClassificationTask), but DOFASegmentationTask is not one: "
            "SegmentationWriter writes that task's predictions",
            {},
        ),
        (
            SegmentationWriter(out / "m.tif"),
            DOFAEmbedder(weights=None),
            TypeError,
            "SegmentationWriter writes the class probabilities of a segmentation task "
            "(DOFASegmentationTask), but DOFAEmbedder is not one: GridWriter or PooledWriter "
            "write embeddings",
            {},
        ),
        (
            ClassificationWriter(out / "t.parquet"),
            Classification(model="resnet18", in_channels=4, num_classes=3),
            TypeError,
            "ClassificationWriter writes the class probabilities of a classification task "
            "(DOFAClassificationTask), but Classification is not one: the task writers take "
            "this package's DOFASegmentationTask and DOFAClassificationTask; write another "
            "task's predictions with a writer of your own",
            {},
        ),
        (
            SegmentationWriter(out / "m.tif", class_names=["a", "b"]),
            segmentation,
            ValueError,
            "2 class_names for the 3 classes of DOFASegmentationTask: give one name per "
            "class, in class-index order",
            {},
        ),
        (
            SegmentationWriter(out / "m.tif"),
            segmentation,
            ValueError,
            "SegmentationWriter writes a segmentation task's predictions over chips resized "
            "to the model input, but the data module cuts them into tiles (input_prep='tile')",
            {"input_prep": "tile"},
        ),
        (
            ClassificationWriter(out / "t.parquet"),
            classification,
            ValueError,
            "ClassificationWriter writes a classification task's predictions over chips "
            "resized to the model input, but the data module cuts them into tiles",
            {"input_prep": "tile", "patch_size": 448},
        ),
        (
            SegmentationWriter(out / "m.tif"),
            segmentation,
            ValueError,
            "SegmentationWriter writes a segmentation task's predictions, which take chips "
            "normalised as in training, but the data module serves raw reflectance "
            "(preprocess=False): give it preprocess=True (the default)",
            {"preprocess": False},
        ),
        (
            SegmentationWriter(out / "m.tif"),
            segmentation,
            ValueError,
            "SegmentationWriter maps pixels of chips cut on the rasters' grid, but the data "
            "module makes one chip of each extent (points), resampled off that grid",
            {"points": [PointBuffer(13.14, 48.29, 500.0)]},
        ),
        (
            SegmentationWriter(out / "m.tif"),
            segmentation,
            ValueError,
            "SegmentationWriter maps pixels of chips cut on the rasters' grid, but the data "
            "module makes one chip of each extent (roi_sampling='whole'), resampled off that "
            "grid: map the region with roi=... and roi_sampling='grid' (the default)",
            {"roi": BBox(13.13, 48.285, 13.15, 48.30), "roi_sampling": "whole"},
        ),
    ]
    for writer, module, error, message, data in cases:
        dm = DOFAPredictDataModule(SCENE, batch_size=2, **data)
        with pytest.raises(error) as refused:
            cpu_trainer([writer, CountBatches()]).predict(module, datamodule=dm)
        assert str(refused.value).startswith(message), str(refused.value)
    assert CountBatches.batches == 0
    assert not out.exists()
    with pytest.raises(ValueError, match="output must be 'classes' or 'probabilities'"):
        SegmentationWriter(out / "m.tif", output="logits")
    with pytest.raises(ValueError, match="class_names must be distinct"):
        ClassificationWriter(out / "t.parquet", class_names=["a", "a"])
    with pytest.raises(TypeError, match="class_names must be a list of names, one per class"):
        SegmentationWriter(out / "m.tif", class_names="abc")


def test_a_batch_without_what_places_its_chips_is_named(
    tmp_path: Path, segmentation: DOFASegmentationTask, classification: DOFAClassificationTask
) -> None:
    """A data module whose batches lose the key a writer places chips by: the error names
    that key (and the data module option behind it, only where there is one); no file."""

    class Dropping(DOFAPredictDataModule):
        drop = ""

        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            batch = super().on_after_batch_transfer(batch, dataloader_idx)
            return {k: v for k, v in batch.items() if k != self.drop}

    cases: list[tuple[pl.Callback, pl.LightningModule, str, str]] = [
        (ClassificationWriter(tmp_path / "t.parquet"), classification, "bounds", ""),
        (
            SegmentationWriter(tmp_path / "m.tif"),
            segmentation,
            "grid_transform",
            " (preprocess=True, the default, for 'grid_transform')",
        ),
    ]
    for writer, task, key, option in cases:
        dm = Dropping(SCENE, batch_size=4)
        dm.drop = key
        with pytest.raises(KeyError) as missing:
            cpu_trainer([writer]).predict(task, datamodule=dm, return_predictions=False)
        assert missing.value.args[0] == (
            f"{type(writer).__name__} places each chip by the batch's ['{key}'], which "
            f"DOFAPredictDataModule's batches carry{option}: predict the task over a "
            "DOFAPredictDataModule"
        )
    assert not (tmp_path / "t.parquet").exists() and not (tmp_path / "m.tif").exists()


def _save(task: pl.LightningModule, path: Path) -> Path:
    trainer = cpu_trainer([])
    trainer.strategy.connect(task)
    trainer.save_checkpoint(path, weights_only=True)
    return path


def test_the_checkpoint_a_trainer_loads_is_the_jobs_weights(
    tmp_path: Path, segmentation: DOFASegmentationTask
) -> None:
    """``Trainer.predict(ckpt_path=...)`` loads the weights after the writers' setup: the
    job's identity took the weights the module was built with, so another checkpoint's rerun
    mixed its chips into the first one's map. Now the parts of checkpoint A are refused
    under checkpoint B, the rerun under A finishes the map A alone gives, tagged with A."""
    a = _save(segmentation, tmp_path / "a.ckpt")
    b = _save(_segmentation(seed=1), tmp_path / "b.ckpt")
    out, direct = tmp_path / "map.tif", tmp_path / "direct.tif"

    class FailAfterFirstBatch(pl.Callback):
        def on_predict_batch_end(self, *args: Any) -> None:
            raise RuntimeError("the job died")

    def run(ckpt: Path, *callbacks: pl.Callback) -> None:
        dm = DOFAPredictDataModule(SCENE, batch_size=2)
        trainer = cpu_trainer([SegmentationWriter(out), *callbacks])
        trainer.predict(_segmentation(seed=2), datamodule=dm, ckpt_path=ckpt)

    with pytest.raises(RuntimeError, match="the job died"):
        run(a, FailAfterFirstBatch())
    with pytest.raises(PartsMismatchError, match="weights_crc32"):
        run(b)
    run(a)
    dm = DOFAPredictDataModule(SCENE, batch_size=2)
    cpu_trainer([SegmentationWriter(direct)]).predict(segmentation, datamodule=dm)
    with rasterio.open(out) as got, rasterio.open(direct) as want:
        np.testing.assert_array_equal(got.read(), want.read())
        assert got.tags()["weights"] == str(a)


def test_a_stopped_prediction_from_a_checkpoint_is_advised_to_resume(
    tmp_path: Path, segmentation: DOFASegmentationTask
) -> None:
    """A task built on a random encoder (the predict configs' ``weights: null``) whose
    weights the trainer restores from ``ckpt_path`` resumes: a Ctrl-C said "cannot be resumed
    (random weights without a seed ...): rerun with --overwrite, or with --seed N", options
    ``predict`` does not have. Without a checkpoint it still says so."""
    import os
    import signal

    from torchgeo_dofa.jobs import JobInterrupted, StopOnSignal

    ckpt = _save(segmentation, tmp_path / "a.ckpt")

    class CtrlC(pl.Callback):
        def on_predict_batch_start(self, *args: Any) -> None:
            os.kill(os.getpid(), signal.SIGINT)

    def stopped(name: str, **kwargs: Any) -> str:
        dm = DOFAPredictDataModule(SCENE, batch_size=2)
        with StopOnSignal() as stop, pytest.raises(JobInterrupted) as info:
            trainer = cpu_trainer([SegmentationWriter(tmp_path / name), stop, CtrlC()])
            trainer.predict(_segmentation(seed=2), datamodule=dm, **kwargs)
        return str(info.value)

    assert stopped("a.tif", ckpt_path=ckpt).endswith("rerun the same command to resume")
    assert "cannot be resumed" in stopped("b.tif")


def test_a_diverged_tasks_checkpoint_is_refused_before_a_batch(
    tmp_path: Path, classification: DOFAClassificationTask
) -> None:
    """A fine-tuning whose loss became NaN saves NaN weights: predicted, a table failed with a
    misleading write error ("read back other probabilities values than written") and a map
    wrote the NaN pixels as no-data. Its load now names the file and the tensors, from Python
    and through ``Trainer.predict(ckpt_path=...)``, before any part."""
    torch.manual_seed(0)
    task = DOFAClassificationTask(num_classes=4, weights=None)
    with torch.no_grad():
        # head (BatchNorm1d, Linear): as a diverged training leaves it
        task.get_parameter("head.1.weight")[1, :5] = float("nan")
    diverged = _save(task, tmp_path / "diverged.ckpt")
    message = (
        f"the checkpoint {diverged} holds non-finite weights (NaN or infinity) in 1 tensor(s): "
        "head.1.weight (5 of 3072 values)"
    )
    with pytest.raises(CheckpointError, match="non-finite") as info:
        DOFAClassificationTask.load_from_checkpoint(diverged)
    assert str(info.value).startswith(message)
    path = tmp_path / "chips.parquet"
    trainer = cpu_trainer([ClassificationWriter(path)])
    with pytest.raises(CheckpointError) as info:
        trainer.predict(classification, datamodule=DOFAPredictDataModule(SCENE), ckpt_path=diverged)
    assert str(info.value).startswith(message)
    assert not path.exists() and not parts_dir(path).exists()
    # judged as the task holds them: a float64 1e300 would load as infinity; a key the task
    # has not (ignored by a load with strict=False) is not judged
    ckpt = torch.load(_save(classification, diverged), weights_only=True)
    del ckpt[STATE_DIGEST_KEY]  # edited after saving
    ckpt["state_dict"]["extra.unused"] = torch.full((2,), float("nan"))
    torch.save(ckpt, diverged)
    DOFAClassificationTask.load_from_checkpoint(diverged, strict=False)
    # ... which a strict restore refuses in one line naming the file, not torch's report
    with pytest.raises(CheckpointError) as info:
        cpu_trainer([ClassificationWriter(path)]).predict(
            classification, datamodule=DOFAPredictDataModule(SCENE), ckpt_path=diverged
        )
    assert str(info.value).startswith(
        f"the checkpoint {diverged} does not fit DOFAClassificationTask as configured: "
        'Unexpected key(s) in state_dict: "extra.unused". (a checkpoint of other task settings'
    )
    assert "\n" not in str(info.value) and not path.exists()
    ckpt["state_dict"]["head.1.bias"] = torch.tensor([1e300, 0.0, 0.0, 0.0], dtype=torch.float64)
    torch.save(ckpt, diverged)
    with pytest.raises(CheckpointError) as info:
        DOFAClassificationTask.load_from_checkpoint(diverged, strict=False)
    assert str(info.value).startswith(
        f"the checkpoint {diverged} holds non-finite weights (NaN or infinity, or beyond the "
        "range of the task's float32) in 1 tensor(s): head.1.bias (1 of 4 values)"
    )


def test_a_prediction_that_overflows_is_refused_not_written(tmp_path: Path) -> None:
    """fp16 (``16-mixed``) overflows at 65504: logits beyond it became NaN probabilities,
    written as class 0 in a table and as no-data in a map. Finite weights and input, so only
    the outputs can tell; the batch is refused before its parts are written."""
    torch.manual_seed(0)
    task = DOFAClassificationTask(num_classes=2, weights=None, head_norm=False).eval()
    assert isinstance(task.head, torch.nn.Linear)
    with torch.no_grad():
        task.head.weight.fill_(0.0)
        task.head.bias.copy_(torch.tensor([1e5, 0.0]))  # finite in fp32, inf in fp16
    path = tmp_path / "chips.parquet"
    dm = DOFAPredictDataModule(SCENE, batch_size=2)
    cpu_trainer([ClassificationWriter(path)]).predict(task, datamodule=dm)  # fp32: fine
    assert (gpd.read_parquet(path)["class"] == 0).all()
    path.unlink()
    # 16-mixed as on a GPU (Lightning's precision="16-mixed" turns into bf16 on a CPU)
    fp16 = [MixedPrecision("16-mixed", "cpu")]
    trainer = cpu_trainer([ClassificationWriter(path)], plugins=fp16)
    with pytest.raises(NonFiniteOutputError, match="2 of the 2 chip") as info:
        trainer.predict(task, datamodule=dm)
    assert "fp16: run in bf16-mixed or 32-true precision" in str(info.value)
    assert not path.exists() and not list(parts_dir(path).glob("*.npz"))
    # an embedder: the same for its pooled vectors and grids
    embedder = DOFAEmbedder(weights=None)
    with torch.no_grad():
        embedder.encoder.get_parameter("backbone.blocks.11.mlp.fc2.bias").fill_(1e5)  # fp16 matmul
    grid = tmp_path / "grid.tif"
    with pytest.raises(NonFiniteOutputError, match="DOFAEmbedder gave NaN or infinite"):
        cpu_trainer([GridWriter(grid)], plugins=fp16).predict(embedder, datamodule=dm)
    assert not grid.exists()
