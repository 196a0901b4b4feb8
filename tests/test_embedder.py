"""DOFAEmbedder: preprocessing on the device after transfer equals preprocessing in the loader."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader
from torchgeo.samplers import GriddedPatchSampler

from tests.scenes import SCENE
from tests.trainers import cpu_trainer
from torchgeo_dofa.datasets import Sentinel2SR, stack_dofa_samples
from torchgeo_dofa.embedder import DOFAEmbedder
from torchgeo_dofa.transforms import DOFAPreprocess


def _predict(module: DOFAEmbedder, dataset: Sentinel2SR) -> tuple[list[Any], list[torch.Tensor]]:
    """Predict 3 chips; also returns the images the encoder received."""
    chips = list(GriddedPatchSampler(dataset, size=224))[:3]
    loader = DataLoader(dataset, sampler=chips, batch_size=3, collate_fn=stack_dofa_samples)
    seen: list[torch.Tensor] = []
    hook = module.encoder.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    trainer = cpu_trainer()
    try:
        out = trainer.predict(module, dataloaders=loader)
    finally:
        hook.remove()
    assert out is not None
    return out, seen


def test_preprocessing_after_transfer_equals_loader_preprocessing() -> None:
    torch.manual_seed(0)
    module = DOFAEmbedder(weights=None, output="both")
    dataset = Sentinel2SR(SCENE)
    prep = DOFAPreprocess(dataset.bands, dataset.wavelengths)

    dataset.transforms = prep  # the usual way: per sample, in the loader
    in_loader, loader_images = _predict(module, dataset)

    dataset.transforms = None  # raw chips to the device, the batch preprocessed there
    module.preprocess = prep
    raw: list[torch.Tensor] = []
    prep.register_forward_pre_hook(lambda _, args: raw.append(args[0]["image"].clone()))
    on_device, device_images = _predict(module, dataset)

    assert len(raw) == 1 and raw[0].shape == (3, 4, 224, 224)  # one batched call
    assert raw[0].max() > 100  # it received raw reflectance ...
    torch.testing.assert_close(device_images[0], loader_images[0])  # ... and gave the same
    for a, b in zip(in_loader, on_device, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5, equal_nan=True)


def test_empty_chips_are_not_sent_through_the_encoder() -> None:
    torch.manual_seed(0)
    module = DOFAEmbedder(weights=None, seed=0, output="both").eval()
    dataset = Sentinel2SR(SCENE, transforms=DOFAPreprocess(["B2", "B3", "B4", "B8"]))
    chips = list(GriddedPatchSampler(dataset, size=224))[:3]
    batch = stack_dofa_samples([dataset[c] for c in chips])
    sizes: list[int] = []
    hook = module.encoder.register_forward_pre_hook(lambda m, a: sizes.append(int(a[0].shape[0])))
    try:
        with torch.inference_mode():
            full = module.predict_step(dict(batch), 0)
            batch["empty"] = torch.tensor([False, True, False])
            masked = module.predict_step(dict(batch), 0)
            batch["empty"] = torch.tensor([True, True, True])
            none = module.predict_step(dict(batch), 0)
    finally:
        hook.remove()
    assert sizes == [3, 2]  # the empty chip never reached the encoder; all-empty: no call
    for key in ("pooled", "grid"):
        assert masked[key].shape == full[key].shape == none[key].shape
        assert torch.isnan(masked[key][1]).all() and torch.isnan(none[key]).all()
        torch.testing.assert_close(
            masked[key][[0, 2]], full[key][[0, 2]], rtol=1e-4, atol=1e-4, equal_nan=True
        )
    assert masked["empty"].tolist() == [False, True, False]


def test_each_output_kind_returns_only_its_output_with_the_same_values() -> None:
    """A pooled job copies no grid from the device (and a grid job no pooled vector)."""
    dataset = Sentinel2SR(SCENE, transforms=DOFAPreprocess(["B2", "B3", "B4", "B8"]))
    chips = list(GriddedPatchSampler(dataset, size=224))[:3]
    batch = stack_dofa_samples([dataset[c] for c in chips])
    batch["valid"][1, :20, :40] = False  # a corner of chip 1 is nodata: grid cells NaN
    outs = {}
    for kind in ("both", "pooled", "grid"):
        module = DOFAEmbedder(weights=None, seed=0, output=kind).eval()
        with torch.inference_mode():
            outs[kind] = module.predict_step(dict(batch), 0)
    assert "grid" not in outs["pooled"] and "pooled" not in outs["grid"]
    grid = outs["grid"]["grid"][1]  # 16-px cells: NaN where no pixel is valid
    assert torch.isnan(grid[:, 0, :2]).all() and not torch.isnan(grid[:, 1, 2]).any()
    for kind in ("pooled", "grid"):
        assert outs[kind][kind].dtype == torch.float32 and outs[kind][kind].device.type == "cpu"
        torch.testing.assert_close(outs[kind][kind], outs["both"][kind], equal_nan=True)
        assert outs[kind]["bounds"].shape == (3, *outs["both"]["bounds"].shape[1:])


def test_device_preprocessing_also_runs_with_the_data_module() -> None:
    """The model's preprocessing runs with TorchGeo's data module too, without Lightning's
    warning about both defining ``on_after_batch_transfer`` (it used to print on every job)."""
    from torchgeo_dofa.datamodules import DOFAPredictDataModule

    torch.manual_seed(0)
    module = DOFAEmbedder(weights=None, seed=0, output="pooled")
    results = []
    for on_device in (False, True):
        dm = DOFAPredictDataModule(SCENE, preprocess=True, batch_size=3)
        dm.setup("predict")
        if on_device:  # what the embed job does on CUDA
            dataset = dm._dataset()
            assert isinstance(dataset.transforms, DOFAPreprocess)
            module.preprocess, dataset.transforms = dataset.transforms, None
        trainer = cpu_trainer()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out: Any = trainer.predict(module, datamodule=dm)
        assert not [w for w in caught if "on_after_batch_transfer" in str(w.message)]
        results.append(torch.cat([o["pooled"] for o in out]))
    module.preprocess = None
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)


def test_predict_step_with_preprocess_leaves_the_callers_batch_raw() -> None:
    """Called twice on one dict (outside Lightning), the second result equals the first."""
    torch.manual_seed(0)
    dataset = Sentinel2SR(SCENE)
    chips = list(GriddedPatchSampler(dataset, size=224))[:2]
    raw = stack_dofa_samples([dataset[c] for c in chips])
    image = raw["image"].clone()
    module = DOFAEmbedder(weights=None, seed=0, output="pooled").eval()
    module.preprocess = DOFAPreprocess(dataset.bands, dataset.wavelengths)
    with torch.inference_mode():
        first = module.predict_step(raw, 0)["pooled"]
        second = module.predict_step(raw, 0)["pooled"]
    torch.testing.assert_close(raw["image"], image, rtol=0, atol=0)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_a_batch_that_was_not_normalised_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    """A data module without preprocessing hands the model raw reflectance: refused with the
    fix, before the writers get a chip (it used to embed noise into the pooled part, then
    fail in the grid writer with KeyError: 'grid_transform')."""
    import pytest

    from torchgeo_dofa.datamodules import DOFAPredictDataModule
    from torchgeo_dofa.embedder import NotNormalisedError
    from torchgeo_dofa.writers import GridWriter, PooledWriter

    module = DOFAEmbedder(weights=None, seed=0, output="both")
    dm = DOFAPredictDataModule(SCENE, preprocess=False, batch_size=2)
    out = tmp_path / "out"
    writers: list[pl.Callback] = [GridWriter(out / "g.tif"), PooledWriter(out / "p.parquet")]
    trainer = cpu_trainer(writers)
    with pytest.raises(
        NotNormalisedError, match=r"values up to \d+, raw reflectance .* preprocess=True"
    ):
        trainer.predict(module, datamodule=dm, return_predictions=False)
    # no output, no part, no empty .parts folder, no lock file: not even the folder
    assert not out.exists()
    with pytest.raises(NotNormalisedError, match="torch.uint16, not normalised"):
        module.predict_step(
            {
                "image": torch.zeros(1, 4, 224, 224, dtype=torch.uint16),
                "wavelengths": torch.ones(4),
            },
            0,
        )


def test_the_data_modules_defaults_serve_the_embedder_normalised_chips(tmp_path: Path) -> None:
    """``DOFAPredictDataModule(paths)`` and ``DOFAEmbedder()`` work together as they come (the
    data module normalised nothing by default: the embedder refused its raw chips); adding
    on-device preprocessing to that is refused as normalising twice, with nothing written."""
    import pytest

    from torchgeo_dofa.datamodules import DOFAPredictDataModule
    from torchgeo_dofa.writers import PooledWriter

    module = DOFAEmbedder(weights=None, seed=0, output="pooled")
    results = []
    for kwargs in ({}, {"preprocess": True}):
        dm = DOFAPredictDataModule(SCENE, batch_size=2, **kwargs)  # type: ignore[arg-type]
        trainer = pl.Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, limit_predict_batches=1
        )
        out: Any = trainer.predict(module, datamodule=dm)
        results.append(out[0]["pooled"])
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    dataset = Sentinel2SR(SCENE)
    module.preprocess = DOFAPreprocess(dataset.bands, dataset.wavelengths)
    folder = tmp_path / "out"
    trainer = cpu_trainer([PooledWriter(folder / "p.parquet")])
    with pytest.raises(ValueError, match="the chips would be normalised twice.*preprocess=False"):
        trainer.predict(module, datamodule=DOFAPredictDataModule(SCENE), return_predictions=False)
    assert not folder.exists()
    dm = DOFAPredictDataModule(SCENE)  # its loader given on its own: the same refusal
    dm.setup("predict")
    with pytest.raises(ValueError, match="the chips would be normalised twice"):
        cpu_trainer().predict(module, dataloaders=dm.predict_dataloader())
    raw = DOFAPredictDataModule(SCENE, batch_size=2, preprocess=False)  # on the device: fine
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, limit_predict_batches=1
    )
    out = trainer.predict(module, datamodule=raw)
    torch.testing.assert_close(out[0]["pooled"], results[0], rtol=1e-5, atol=1e-5)


def test_a_grid_writer_reused_on_another_scene_takes_that_scenes_grid(tmp_path: Path) -> None:
    """A GridWriter without a given geometry derives it again at every setup (it kept the
    first scene's, so the second scene's grid was written at the first scene's place); a
    PooledWriter takes the scene's chips again (it kept the first scene's: its one row was
    that chip, flagged no_data, and the second scene's chip was left out)."""
    import geopandas as gpd
    import rasterio
    from rasterio.windows import Window

    from torchgeo_dofa.datamodules import DOFAPredictDataModule
    from torchgeo_dofa.writers import GridWriter, PooledWriter

    module = DOFAEmbedder(weights=None, seed=0, output="both")
    writer, table = GridWriter(tmp_path / "g.tif"), PooledWriter(tmp_path / "p.parquet")
    for i, (row, col) in enumerate([(0, 0), (224, 448)]):  # two one-chip crops of the scene
        crop = tmp_path / f"crop{i}.tif"
        with rasterio.open(SCENE) as src:
            window = Window(col, row, 224, 224)
            profile = src.profile | {
                "width": 224,
                "height": 224,
                "transform": src.window_transform(window),
            }
            with rasterio.open(crop, "w", **profile) as dst:
                dst.write(src.read(window=window))
                dst.descriptions = src.descriptions
        dm = DOFAPredictDataModule(crop, preprocess=True, batch_size=1)
        cpu_trainer([writer, table]).predict(module, datamodule=dm, return_predictions=False)
        with rasterio.open(tmp_path / "g.tif") as grid, rasterio.open(crop) as scene:
            assert grid.crs == scene.crs and (grid.width, grid.height) == (14, 14)
            assert grid.transform == scene.transform @ scene.transform.scale(16)
            rows = gpd.read_parquet(tmp_path / "p.parquet")
            assert rows.geometry.iloc[0].bounds == tuple(scene.bounds)
            assert rows.no_data.tolist() == [False]


def test_a_writer_names_the_prediction_keys_it_lacks(tmp_path: Path) -> None:
    import pytest

    from torchgeo_dofa.writers import GridWriter

    writer = GridWriter(tmp_path / "g.tif")
    prediction = {"grid": torch.zeros(1, 8, 14, 14)}
    with pytest.raises(KeyError, match=r"GridWriter needs \['grid_transform'\] .* preprocess=True"):
        writer.write_on_batch_end(None, None, prediction, None, None, 0, 0)  # type: ignore[arg-type]


def test_a_writer_of_what_the_model_does_not_output_is_refused_at_setup(tmp_path: Path) -> None:
    """``output: grid`` with a PooledWriter failed after the first chip with a KeyError
    advising preprocess=True; now refused at setup, naming the model's output."""
    import pytest

    from torchgeo_dofa.datamodules import DOFAPredictDataModule
    from torchgeo_dofa.writers import GridWriter, PooledWriter

    dm = DOFAPredictDataModule(SCENE, preprocess=True, batch_size=2)
    out = tmp_path / "out"
    for output, writer in (
        ("grid", PooledWriter(out / "p.parquet")),
        ("pooled", GridWriter(out / "g.tif")),
    ):
        module = DOFAEmbedder(weights=None, seed=0, output=output)  # type: ignore[arg-type]
        kind = "pooled" if output == "grid" else "grid"
        with pytest.raises(ValueError, match=f"writes {kind} embeddings but the model's output"):
            cpu_trainer([writer]).predict(module, datamodule=dm, return_predictions=False)
        assert not out.exists()


class _CrashAfterBatch(pl.Callback):
    """Stop the job after its first batch's parts are written (listed after the writer)."""

    def on_predict_batch_end(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("simulated crash")


def test_a_resume_with_other_preprocessing_on_the_device_is_refused(tmp_path: Path) -> None:
    """The parts' identity records the preprocessing the model runs on the device: resumed
    with another one, the job is refused by name and the first run's parts are kept."""
    import pytest

    from torchgeo_dofa.datamodules import DOFAPredictDataModule
    from torchgeo_dofa.writers import PartsMismatchError, PooledWriter, parts_dir

    out = tmp_path / "p.parquet"

    def run(input_prep: str, crash: bool) -> None:
        module = DOFAEmbedder(weights=None, seed=0, output="pooled")
        dm = DOFAPredictDataModule(SCENE, preprocess=True, batch_size=2)
        dm.setup("predict")
        dataset = dm._dataset()
        module.preprocess = DOFAPreprocess(
            dataset.bands, dataset.wavelengths, input_prep=input_prep
        )
        dataset.transforms = None  # raw chips: the model preprocesses them
        callbacks: list[pl.Callback] = [PooledWriter(out), *([_CrashAfterBatch()] if crash else [])]
        cpu_trainer(callbacks).predict(module, datamodule=dm, return_predictions=False)

    with pytest.raises(RuntimeError, match="simulated crash"):
        run("resize", crash=True)
    parts = sorted(p.name for p in parts_dir(out).iterdir())
    assert "job-identity" in parts and len(parts) == 2  # the batch of two chips, the identity
    refused = r"\(model_preprocess was .*'resize'.*now .*'tile'"  # the difference in view
    with pytest.raises(PartsMismatchError, match=refused):
        run("tile", crash=False)
    assert sorted(p.name for p in parts_dir(out).iterdir()) == parts and not out.exists()
    run("resize", crash=False)  # the same preprocessing resumes and finishes
    assert out.exists() and not parts_dir(out).exists()


def test_a_batch_holding_nan_or_infinity_is_refused_with_the_count() -> None:
    """One unfilled NaN made the chip's every output NaN, written as a valid embedding."""
    import pytest

    from torchgeo_dofa.embedder import NotNormalisedError

    module = DOFAEmbedder(weights=None, seed=0)
    for bad in (float("nan"), float("inf")):
        image = torch.zeros(2, 4, 224, 224)
        image[1, :, 3, 3] = bad
        batch = {"image": image, "wavelengths": torch.tensor([0.49, 0.56, 0.665, 0.842])}
        with pytest.raises(NotNormalisedError) as refused:
            module.predict_step(batch, 0)
        assert str(refused.value).startswith(
            "the batch's image holds 4 NaN or infinite value(s): no-data pixels must be filled "
            "before the model (DOFAPreprocess / CheckReflectance fill them and mark them in "
            "'valid'); give the data module preprocess=True"
        )


def test_on_device_preprocessing_for_another_band_order_is_refused(tmp_path: Path) -> None:
    """The scene stores B4, B3, B2, B8, the data module serves B2, B3, B4, B8 (its bands):
    a DOFAPreprocess spelled in the file's order would normalise B2's data as B4's."""
    import pytest

    from torchgeo_dofa.bands import BandError
    from torchgeo_dofa.datamodules import DOFAPredictDataModule
    from torchgeo_dofa.writers import PooledWriter

    dm = DOFAPredictDataModule(SCENE, preprocess=False, batch_size=2)
    module = DOFAEmbedder(weights=None, seed=0, output="pooled")
    module.preprocess = DOFAPreprocess(bands=["B04", "B03", "B02", "B08"])
    out = tmp_path / "out"
    trainer = cpu_trainer([PooledWriter(out / "p.parquet")])
    with pytest.raises(BandError, match=r"wavelengths \[0.49, 0.56, 0.665, 0.842\] um .* "):
        trainer.predict(module, datamodule=dm, return_predictions=False)
    assert not out.exists()


def test_a_writer_under_a_model_that_is_not_an_embedder_says_so(tmp_path: Path) -> None:
    """A fine-tuning task's predictions (class scores) under a PooledWriter failed with
    torch's "Tensor.__contains__ only supports Tensor or scalar"."""
    import pytest

    from torchgeo_dofa.datamodules import DOFAPredictDataModule
    from torchgeo_dofa.writers import PooledWriter

    class Scores(pl.LightningModule):
        def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return batch["image"].mean(dim=(1, 2, 3))

    dm = DOFAPredictDataModule(SCENE, batch_size=2)
    out = tmp_path / "out"
    trainer = cpu_trainer([PooledWriter(out / "p.parquet")])
    with pytest.raises(TypeError) as refused:
        trainer.predict(Scores(), datamodule=dm, return_predictions=False)
    assert str(refused.value).startswith(
        "PooledWriter writes the embeddings DOFAEmbedder.predict_step returns (a dict holding "
        "['pooled', 'bounds'], ...), but Scores.predict_step returned a Tensor: predict "
        "with DOFAEmbedder"
    )
    assert not out.exists()


def test_a_writer_under_a_fine_tuning_task_is_refused_before_any_batch(tmp_path: Path) -> None:
    """A task's predict (class scores) under an embedding writer is a TypeError at setup,
    before the first batch is read and computed."""
    import pytest

    from torchgeo_dofa.datamodules import DOFAPredictDataModule
    from torchgeo_dofa.tasks import DOFAClassificationTask
    from torchgeo_dofa.writers import GridWriter, PooledWriter

    class CountBatches(pl.Callback):
        batches = 0

        def on_predict_batch_start(self, *args: Any) -> None:
            CountBatches.batches += 1

    task = DOFAClassificationTask(num_classes=3, weights=None, bands=["B4", "B3", "B2", "B8"])
    dm = DOFAPredictDataModule(SCENE, batch_size=2)
    out = tmp_path / "out"
    for writer in (PooledWriter(out / "p.parquet"), GridWriter(out / "g.tif")):
        trainer = cpu_trainer([writer, CountBatches()])
        with pytest.raises(TypeError) as refused:
            trainer.predict(task, datamodule=dm, return_predictions=False)
        assert str(refused.value) == (
            f"{type(writer).__name__} writes embeddings, but DOFAClassificationTask is a "
            "fine-tuning task, whose predict_step returns class scores: write them with "
            "SegmentationWriter (a segmentation task) or ClassificationWriter (a "
            "classification task), or predict embeddings with DOFAEmbedder (its "
            "fine-tuned encoder: DOFAEmbedder(weights='task.ckpt'))"
        )
    assert CountBatches.batches == 0
    assert not out.exists()


def test_a_time_series_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """``time_series=True`` stacks a chip's dates (B, T, C, H, W): the data module refuses it
    at construction and the embedder refuses such a batch naming the fix, instead of failing
    deep in the encoder ("got 16 wavelengths for 4 channels") or reading the dates as tiles."""
    import pytest

    from tests.scenes import dated_copies
    from torchgeo_dofa.datamodules import DOFAPredictDataModule
    from torchgeo_dofa.writers import PooledWriter

    folder = tmp_path / "series"
    dated_copies(folder, [("T33UVP_20210101.tif", 0, 0), ("T33UVP_20230601.tif", 0, 100)])
    with pytest.raises(ValueError, match=r"one acquisition per chip.*time=\(start, stop\)"):
        DOFAPredictDataModule(folder, time_series=True)
    series = Sentinel2SR(folder, time_series=True)
    series.transforms = DOFAPreprocess(series.bands)
    chips = list(GriddedPatchSampler(series, size=224))[:2]
    loader = DataLoader(series, sampler=chips, batch_size=2, collate_fn=stack_dofa_samples)
    out = tmp_path / "out"
    trainer = cpu_trainer([PooledWriter(out / "p.parquet", crs=series.crs)])
    module = DOFAEmbedder(weights=None, seed=0, output="pooled")
    with pytest.raises(
        ValueError, match=r"\(2, 2, 4, 224, 224\) batch without tile_offsets.*--datetime"
    ):
        trainer.predict(module, dataloaders=loader, return_predictions=False)
    assert not out.exists()


def test_finite_outputs_whose_sum_overflows_are_not_refused() -> None:
    """The output check sums in float32 (a 25x cheaper pass than float64); a sum that overflows
    from finite values (fp16 logits near 65504, float64 beyond float32's range) is told apart
    by counting, and only NaN / infinity is refused, naming the chips that hold it."""
    from torchgeo_dofa.embedder import NonFiniteOutputError, check_finite_output

    for finite in (
        torch.full((2, 4), 3e38),  # float32: the sum overflows
        torch.full((2, 4), 6e4, dtype=torch.float16),
        torch.full((2, 4), 1e300, dtype=torch.float64),  # beyond float32 itself
        torch.full((2, 4), 3e38, dtype=torch.bfloat16),
    ):
        check_finite_output(finite, "m")
    for bad, dtype in ((float("nan"), torch.float32), (float("inf"), torch.float16),
                       (float("-inf"), torch.float64), (float("nan"), torch.bfloat16)):  # fmt: skip
        values = torch.ones(3, 2, 5, dtype=dtype)
        values[1, 1, 4] = bad
        with pytest.raises(NonFiniteOutputError, match="for 1 of the 3 chip"):
            check_finite_output(values, "m")
    # a value per chip, (B,), and a lone value, as the docstring's (B, ...) allows
    check_finite_output(torch.full((3,), 3e38), "m")
    check_finite_output(torch.tensor(3e38), "m")
    with pytest.raises(NonFiniteOutputError, match="for 1 of the 3 chip"):
        check_finite_output(torch.tensor([1.0, float("nan"), 2.0]), "m")
    with pytest.raises(NonFiniteOutputError, match="for 1 of the 1 chip"):
        check_finite_output(torch.tensor(float("inf")), "m")


def test_a_batch_scaled_again_after_normalising_warns() -> None:
    """A TorchGeo data module's default aug divides by 255 after the samples' DOFA
    normalisation: the model saw values within +-0.02, and nothing noticed."""
    from torchgeo.datamodules import NonGeoDataModule
    from torchgeo.datasets import EuroSAT

    from torchgeo_dofa.embedder import check_normalised
    from torchgeo_dofa.transforms import ReflectanceWarning

    ds = Sentinel2SR(SCENE)
    ds.transforms = DOFAPreprocess(ds.bands, ds.wavelengths)
    batch = stack_dofa_samples([ds[next(iter(GriddedPatchSampler(ds, size=224)))]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_normalised(batch["image"])  # DOFA-normalised: quiet
        check_normalised(torch.zeros(1, 4, 8, 8))  # all fill: quiet
    aug = NonGeoDataModule(EuroSAT, batch_size=1).aug  # TorchGeo's default: Normalize(0, 255)
    again = aug({"image": batch["image"].clone()})["image"]
    assert float(again.abs().amax()) < 0.1
    with pytest.warns(ReflectanceWarning, match=r"values within \+-0\.0\d+ only, .*divides by 255"):
        check_normalised(again, scaled_again=True)  # as the tasks check their batches
    with warnings.catch_warnings():  # the embed job normalises once: a uniform chip near
        warnings.simplefilter("error")  # DOFA's means (bright) looks the same, no warning
        check_normalised(again)
    from torchgeo_dofa.tasks import DOFAClassificationTask

    task = DOFAClassificationTask(num_classes=2, weights=None, mode="linear-probe").eval()
    with pytest.warns(ReflectanceWarning, match="divides by 255"), torch.no_grad():
        task(again, batch["wavelengths"][0])
    with warnings.catch_warnings(), torch.no_grad():  # helper-111: it came with every batch
        warnings.simplefilter("error")  # of a fit (its value differs from batch to batch)
        task(again * 0.5, batch["wavelengths"][0])
