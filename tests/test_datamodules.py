"""DOFAPredictDataModule (grid / roi / points), RegionSampler, read_roi and spatial helpers;
DOFAEuroSATDataModule."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import rasterio
import shapely
import torch
import torch.nn.functional as F
from pyproj import Geod, Transformer
from torchgeo.datamodules.utils import MisconfigurationException
from torchgeo.samplers import GriddedPatchSampler

from tests.test_datasets import DATA, LAYOUTS, SceneSpec, check_sample, fx
from torchgeo_dofa.bands import DOFA_S2_BANDS, BandError
from torchgeo_dofa.datamodules import DOFAPredictDataModule, RegionSampler, read_roi
from torchgeo_dofa.datasets import EarthEngineS2, Sentinel2SR
from torchgeo_dofa.spatial import BBox, PointBuffer, region_to_crs

MULTIBAND = LAYOUTS["multiband"].scenes
TO_LONLAT = Transformer.from_crs("EPSG:32631", "EPSG:4326", always_xy=True)


def lonlat(x: float, y: float) -> tuple[float, float]:
    lon, lat = TO_LONLAT.transform(x, y)
    return float(lon), float(lat)


def batches(dm: DOFAPredictDataModule) -> list[dict[str, torch.Tensor]]:
    dm.setup("predict")
    return list(dm.predict_dataloader())


# ----------------------------------------------------------------------------- grid


def test_grid_mode_covers_the_raster() -> None:
    dm = DOFAPredictDataModule(
        DATA / "multiband", patch_size=32, stride=24, batch_size=4, preprocess=False
    )
    assert dm.mode == "grid"
    out = batches(dm)
    ds = dm.predict_dataset
    assert isinstance(ds, Sentinel2SR)
    expected = len(GriddedPatchSampler(ds, size=32, stride=24))
    assert sum(b["image"].shape[0] for b in out) == expected == 20
    for batch in out:
        assert batch["image"].shape[1:] == (9, 32, 32)
        for i in range(batch["image"].shape[0]):
            check_sample(batch["image"][i], batch["valid"][i], batch["bounds"][i], MULTIBAND)


def test_default_patch_is_224_and_reaches_past_small_rasters() -> None:
    dm = DOFAPredictDataModule(DATA / "multiband", preprocess=False)
    # get_embedding warned below 50 % valid pixels, embed said nothing of a chip mostly fill
    with pytest.warns(UserWarning) as said:
        (batch,) = batches(dm)
    assert [str(w.message) for w in said if "-px chip: the rest" in str(w.message)] == [
        "the region multiband is 128 x 96 px, 24.5% of one 224-px chip: the rest of its chip "
        "is fill, so the model's output for it (an embedding, a segmentation) comes mostly "
        "from fill (the pooled table's valid_fraction gives the share); a smaller chip size "
        "(a multiple of 16) or a larger region fits it better"
    ]
    with warnings.catch_warnings():  # a region as large as half a chip: quiet
        warnings.simplefilter("error")
        DOFAPredictDataModule(DATA / "multiband", patch_size=144, preprocess=False).setup("predict")
    assert batch["image"].shape == (1, 9, 224, 224)
    assert int(batch["valid"].sum()) == 96 * 128  # the raster; the rest is padding
    check_sample(batch["image"][0], batch["valid"][0], batch["bounds"][0], MULTIBAND)


def test_only_predict_stage() -> None:
    dm = DOFAPredictDataModule(DATA / "multiband", preprocess=False)
    with pytest.raises(MisconfigurationException, match="prediction"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="not both"):
        DOFAPredictDataModule(DATA / "multiband", points=[], roi=BBox(0, 0, 1, 1))


def test_settings_are_checked_when_the_data_module_is_built() -> None:
    """A misspelt dataset keyword (resampling misspelt), batch_size=0 or num_workers=-1
    were taken without a word and failed at setup, after the model was built, as the
    dataset's TypeError or the DataLoader's."""
    with pytest.raises(
        ValueError,
        match=r"got 'resampeling' \(did you mean 'resampling'\?\): not an argument of "
        r"DOFAPredictDataModule nor of its dataset class Sentinel2SR, which takes crs, res, bands",
    ):
        DOFAPredictDataModule(DATA / "multiband", resampeling="bilinear")
    with pytest.raises(ValueError, match=r"got 'foo': not an argument"):
        DOFAPredictDataModule(DATA / "multiband", foo=1)
    for name, bad in (
        ("batch_size", 0),
        ("batch_size", 2.5),
        ("batch_size", True),
        ("num_workers", -1),
    ):
        with pytest.raises(ValueError, match=rf"{name} must be a whole number >= \d, got {bad!r}"):
            DOFAPredictDataModule(DATA / "multiband", **{name: bad})  # type: ignore[arg-type]
    # helper-115: a dataset class passing **kwargs on (EarthEngineS2) is checked by its
    # parents' arguments; a partial is named; the base class's **kwargs is no argument
    with pytest.raises(ValueError, match=r"class EarthEngineS2, which takes crs, res, bands"):
        DOFAPredictDataModule(DATA / "multiband", dataset_class=EarthEngineS2, resampeling=1)
    partial = functools.partial(Sentinel2SR, res=20)
    with pytest.raises(ValueError, match=r"dataset class functools.partial\(<class"):
        DOFAPredictDataModule(DATA / "multiband", dataset_class=partial, resampeling=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"got 'kwargs': not an argument"):
        DOFAPredictDataModule(DATA / "multiband", kwargs={"res": 20})
    with pytest.raises(ValueError, match=r"got 'batchsize' \(did you mean 'batch_size'\?\)"):
        DOFAPredictDataModule(DATA / "multiband", batchsize=4)  # its own arguments too
    cases: list[tuple[str, object]] = [("patch_size", "224"), ("stride", 112.5), ("patch_size", 0)]
    for name, value in cases:
        with pytest.raises(ValueError, match=rf"^{name} must be a whole number >= 1, got "):
            DOFAPredictDataModule(DATA / "multiband", **{name: value})  # type: ignore[arg-type]

    class OwnSetting(DOFAPredictDataModule):  # TorchGeo's way: its setup takes its own key
        def setup(self, stage: str) -> None:
            self.label_path = self.kwargs.pop("label_path", None)
            super().setup(stage)

    own = OwnSetting(DATA / "multiband", label_path="labels/", preprocess=False)
    own.setup("predict")
    assert own.label_path == "labels/"
    # what the dataset class takes passes, numpy's integers included
    dm = DOFAPredictDataModule(
        DATA / "multiband",
        resampling="bilinear",
        cache=False,
        batch_size=np.int64(2),  # type: ignore[arg-type]
        preprocess=False,
    )
    dm.setup("predict")
    assert dm.batch_size == 2 and dm.predict_dataset is not None


def test_grid_with_time_range_and_dataset_kwargs() -> None:
    dm = DOFAPredictDataModule(
        DATA / "esa",
        patch_size=32,
        time=("2022-06-01", "2022-06-30"),
        bands=["B4", "B8"],
        offset=0,
        preprocess=False,
    )
    out = batches(dm)
    assert sum(b["image"].shape[0] for b in out) == 4
    scene = SceneSpec(
        [(DATA / "esa" / f"T31UFQ_{fx.ESA_DATES[1]}_{b}_10m.tif", 1) for b in ("B04", "B08")]
    )
    for batch in out:
        check_sample(batch["image"][0], batch["valid"][0], batch["bounds"][0], [scene])


# ----------------------------------------------------------------------------- points


def test_points_give_centred_chips_in_order() -> None:
    x0, y1 = 620000.0, 5702000.0  # top-left corner of the multiband fixture
    targets = [(x0 + 403.0, y1 - 302.0), (x0 + 905.0, y1 - 500.0)]
    points = [
        PointBuffer(*lonlat(*targets[0]), buffer_m=160),
        PointBuffer(*lonlat(*targets[1]), buffer_m=100),
    ]
    dm = DOFAPredictDataModule(DATA / "multiband", points=points, preprocess=False)
    assert dm.mode == "points"
    out = batches(dm)
    assert [tuple(b["image"].shape[-2:]) for b in out] == [(32, 32), (20, 20)]
    for batch, (x, y) in zip(out, targets, strict=True):
        b = batch["bounds"][0].tolist()
        assert abs((b[0] + b[1]) / 2 - x) <= 5.0 + 1e-6 and abs((b[3] + b[4]) / 2 - y) <= 5.0
        assert (b[1] - b[0]) % 10 == 0 and (b[0] - x0) % 10 == 0  # on the pixel grid
        check_sample(batch["image"][0], batch["valid"][0], batch["bounds"][0], MULTIBAND)


def test_points_of_different_sizes_need_a_resize_or_batch_size_one() -> None:
    x0, y1 = 620000.0, 5702000.0
    points = [
        PointBuffer(*lonlat(x0 + 400, y1 - 300), buffer_m=160),
        PointBuffer(*lonlat(x0 + 900, y1 - 500), buffer_m=100),
    ]
    dm = DOFAPredictDataModule(DATA / "multiband", points=points, batch_size=2, preprocess=False)
    with pytest.raises(ValueError, match="differ in size"):
        batches(dm)

    def resize(sample):
        sample["image"] = F.interpolate(sample["image"][None], size=(24, 24), mode="bilinear")[0]
        sample["valid"] = torch.ones(24, 24, dtype=torch.bool)
        return sample

    dm = DOFAPredictDataModule(DATA / "multiband", points=points, batch_size=2, transforms=resize)
    (batch,) = batches(dm)
    assert batch["image"].shape == (2, 9, 24, 24)


def test_points_narrower_than_a_patch_warn_once_for_all_of_them() -> None:
    """A buffer of about a pixel (buffer_m=5: 1 x 1 px at 10 m) was embedded without a word,
    while a region smaller than half a chip warns: one warning counts every such point."""
    x0, y1 = 620000.0, 5702000.0
    points = [PointBuffer(*lonlat(x0 + 405 + 100 * i, y1 - 305), buffer_m=5) for i in range(3)]
    points.append(PointBuffer(*lonlat(x0 + 605, y1 - 505), buffer_m=10))  # 2 x 2 px
    patch = PointBuffer(*lonlat(x0 + 900, y1 - 500), buffer_m=80)  # 16 x 16 px: one patch
    dm = DOFAPredictDataModule(DATA / "multiband", points=[*points, patch])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("predict")
    assert [str(w.message) for w in caught if "point chips" in str(w.message)] == [
        "the region multiband: 4 of 5 point chips are 1 x 1 to 2 x 2 px (at most 0.008% of "
        "one 224-px chip, narrower than one 16-px DOFA patch): each fills the model's input "
        "with those few pixels (stretched, or repeated when tiled), so its embedding "
        "describes their values, not the place around the point; a larger buffer, "
        "buffer_m=80 or more (8 pixels a side of the point; 1120 gives a 224-px chip), fits "
        "it better"
    ]
    assert [tuple(b["image"].shape[-2:]) for b in dm.predict_dataloader()][-1] == (224, 224)
    with warnings.catch_warnings():  # a chip of one patch or more: quiet
        warnings.simplefilter("error")
        DOFAPredictDataModule(DATA / "multiband", points=[patch]).setup("predict")


def test_points_on_an_earth_engine_grid_in_degrees() -> None:
    lon, lat = 4.5 + 100 * fx.EE_RES, 51.0 - 16 * fx.EE_RES
    dm = DOFAPredictDataModule(
        DATA / "ee",
        dataset_class=EarthEngineS2,
        points=[PointBuffer(lon, lat, 50)],
        preprocess=False,
    )
    (batch,) = batches(dm)
    geod = Geod(ellps="WGS84")
    east, _, _ = geod.fwd(lon, lat, 90, 50)
    _, north, _ = geod.fwd(lon, lat, 0, 50)
    width = round(2 * (east - lon) / fx.EE_RES)
    height = round(2 * (north - lat) / fx.EE_RES)
    h, w = batch["image"].shape[-2:]
    assert abs(w - width) <= 1 and abs(h - height) <= 1 and w > h  # degrees: wider than tall
    check_sample(
        batch["image"][0], batch["valid"][0], batch["bounds"][0], LAYOUTS["ee_tiles"].scenes
    )


def test_points_outside_the_rasters_are_named() -> None:
    ds = Sentinel2SR(DATA / "multiband")
    inside = PointBuffer(*lonlat(620500, 5701500), 100)
    with pytest.raises(ValueError, match=r"1 region\(s\).*#1"):
        RegionSampler(ds, [inside, PointBuffer(10.0, 45.0, 100)])


# ----------------------------------------------------------------------------- roi


def _bbox_of(xmin: float, ymin: float, xmax: float, ymax: float) -> BBox:
    lon0, lat0 = lonlat(xmin, ymin)
    lon1, lat1 = lonlat(xmax, ymax)
    return BBox(lon0, lat0, lon1, lat1)


def test_bbox_roi_restricts_the_grid() -> None:
    bbox = _bbox_of(620200, 5701300, 620700, 5701800)
    dm = DOFAPredictDataModule(DATA / "multiband", roi=bbox, patch_size=16, preprocess=False)
    assert dm.mode == "roi"
    out = batches(dm)
    ds = dm.predict_dataset
    assert isinstance(ds, Sentinel2SR)
    polygon = bbox.to_geometry(ds.crs)
    total = len(GriddedPatchSampler(ds, size=16))
    chips = [b["bounds"][0].tolist() for b in out]
    assert 0 < len(chips) < total
    for b in chips:
        box = shapely.box(b[0], b[3], b[1], b[4])
        assert box.intersects(polygon) and not box.touches(polygon)
    covered = shapely.union_all([shapely.box(b[0], b[3], b[1], b[4]) for b in chips])
    assert covered.buffer(1e-6).contains(polygon.intersection(ds.index.geometry.iloc[0]))
    for batch in out:
        check_sample(batch["image"][0], batch["valid"][0], batch["bounds"][0], MULTIBAND)


def test_whole_roi_is_one_chip() -> None:
    bbox = _bbox_of(620200, 5701300, 620700, 5701800)
    dm = DOFAPredictDataModule(DATA / "multiband", roi=bbox, roi_sampling="whole", preprocess=False)
    (batch,) = batches(dm)
    b = batch["bounds"][0].tolist()
    xmin, ymin, xmax, ymax = region_to_crs(bbox, "EPSG:32631").bounds
    assert b[0] <= xmin < b[0] + 10 and b[1] - 10 < xmax <= b[1]
    assert b[3] <= ymin < b[3] + 10 and b[4] - 10 < ymax <= b[4]
    check_sample(batch["image"][0], batch["valid"][0], batch["bounds"][0], MULTIBAND)


def test_polygon_roi_in_the_dataset_crs() -> None:
    triangle = shapely.Polygon([(620050, 5701950), (620900, 5701950), (620050, 5701100)])
    dm = DOFAPredictDataModule(
        DATA / "multiband", roi=triangle, roi_crs="EPSG:32631", patch_size=16, preprocess=False
    )
    out = batches(dm)
    assert out
    for batch in out:
        b = batch["bounds"][0].tolist()
        assert shapely.box(b[0], b[3], b[1], b[4]).intersects(triangle)
    with pytest.raises(ValueError, match="does not overlap"):
        batches(DOFAPredictDataModule(DATA / "multiband", roi=BBox(10, 45, 10.1, 45.1)))


# ----------------------------------------------------------------------------- read_roi


def test_read_roi_returns_raw_array_and_affine() -> None:
    point = PointBuffer(*lonlat(620400, 5701700), 200)
    roi = read_roi(DATA / "multiband", point)
    assert roi.image.shape == (9, 40, 40) and roi.image.dtype == np.float32
    assert roi.bands == DOFA_S2_BANDS and roi.crs.to_epsg() == 32631
    assert roi.valid.all() and roi.wavelengths.shape == (9,)
    path = DATA / "multiband" / "S2_20220614_multiband.tif"
    with rasterio.open(path) as src:
        row, col = src.index(roi.transform.c + 5, roi.transform.f - 5)  # first pixel centre
        window = rasterio.windows.Window(col, row, 40, 40)
        for c, band in enumerate(DOFA_S2_BANDS):
            idx = fx.MULTIBAND_DESCRIPTIONS.index(
                band if band == "B8A" or len(band) == 3 else f"B0{band[1:]}"
            )
            np.testing.assert_array_equal(roi.image[c], src.read(idx + 1, window=window))
    assert roi.transform.a == 10 and roi.transform.e == -10
    assert abs(roi.transform.c + 200 - 620400) <= 5 and abs(roi.transform.f - 200 - 5701700) <= 5

    ds = Sentinel2SR(DATA / "esa", bands=["B8"])
    box = read_roi(ds, _bbox_of(600100, 5699500, 600300, 5699700))
    assert box.bands == ("B8",) and box.image.shape[0] == 1
    assert box.image.shape[1] >= 20 and box.image.shape[2] >= 20
    with pytest.raises(ValueError, match="outside"):
        read_roi(ds, PointBuffer(10.0, 45.0, 100))


# ----------------------------------------------------------------------------- Lightning


class MeanPerChip(pl.LightningModule):
    def predict_step(self, batch, batch_idx):
        valid = batch["valid"][:, None].float()
        return (batch["image"] * valid).sum(dim=(2, 3)) / valid.sum(dim=(2, 3))


def test_trainer_predict_uses_raw_batches() -> None:
    points = [
        PointBuffer(*lonlat(620400, 5701700), 100),
        PointBuffer(*lonlat(620800, 5701300), 100),
    ]
    dm = DOFAPredictDataModule(DATA / "multiband", points=points, batch_size=2, preprocess=False)
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    outputs = trainer.predict(MeanPerChip(), datamodule=dm)
    assert outputs is not None and len(outputs) == 1
    means = outputs[0]
    assert isinstance(means, torch.Tensor)
    for i, point in enumerate(points):
        expected = read_roi(DATA / "multiband", point)
        torch.testing.assert_close(means[i], torch.from_numpy(expected.image.mean(axis=(1, 2))))


def test_job_identity_names_what_the_chips_depend_on(tmp_path) -> None:
    """Loader settings do not change it; an input rewritten in place, bands or stride do."""
    import os
    import shutil
    from pathlib import Path

    scene = tmp_path / "scene.tif"
    shutil.copy(Path(__file__).resolve().parents[1] / "demo/data/ftw_s2_l2a_33N.tif", scene)

    def identity(**kwargs: object) -> dict[str, str]:
        dm = DOFAPredictDataModule(paths=str(scene), preprocess=True, **kwargs)  # type: ignore[arg-type]
        dm.setup("predict")
        return dm.job_identity()

    base = identity(batch_size=2)
    assert identity(batch_size=8, num_workers=1) == base
    assert json_sources(base) == [
        [str(scene.resolve()), scene.stat().st_size, scene.stat().st_mtime_ns]
    ]
    # how pixels are read, as read: another spelling of the same reading is the same job
    assert base["nodata"] == "0.0" and base["crs"] == "EPSG:32633"
    from torchgeo_dofa.writers import identity_differences

    utm33 = "+proj=utm +zone=33 +datum=WGS84 +units=m +no_defs"
    for same in (
        {"nodata": 0},
        {"crs": "EPSG:32633"},
        {"crs": utm33},
        {"bands": ("B2", "B3", "B4", "B8")},
    ):
        spelled = identity(**same)
        assert identity_differences(base, spelled) == [], same  # as the writers compare it
        assert spelled != base  # the spelling is kept, for identities without the record
    assert identity_differences(base, identity(nodata=3000)) == ["nodata", "nodata_masking"]
    # one CRS however spelled, in the output grid too (its WKT is in the parts' identity)
    dm = DOFAPredictDataModule(paths=str(scene), preprocess=True, crs=utm33)
    dm.setup("predict")
    assert dm.grid_geometry().crs.to_epsg() == 32633
    assert 'AUTHORITY["EPSG","32633"]' in dm.grid_geometry().crs.to_wkt()
    assert identity(nodata=3000)["nodata"] == "3000.0"
    assert identity(crs="EPSG:3857")["crs"] == "EPSG:3857"
    assert identity(bands=["B4", "B3", "B2"])["band_indexes"] == "[(1, 2, 3)]"
    assert base["band_indexes"] == "[(3, 2, 1, 4)]"  # the file stores B4, B3, B2, B8
    assert identity(resampling="bilinear")["data.resampling"] == "'bilinear'"  # as given
    assert identity(stride=112)["stride"] == "112" and base["stride"] == "224"
    other = identity(dataset_class=EarthEngineS2)  # another offset rule: another job
    assert base["dataset_class"] == "torchgeo_dofa.datasets.Sentinel2SR"
    assert other["dataset_class"] == "torchgeo_dofa.datasets.EarthEngineS2"
    assert identity(offset=-1000)["offsets"] == "[(-1000.0, -1000.0, -1000.0, -1000.0)]"
    os.utime(scene, ns=(1, 1))  # the same path, another file
    assert identity()["sources"] != base["sources"]


def json_sources(identity: dict[str, str]) -> list[list[object]]:
    import json

    return json.loads(identity["sources"])


def test_a_config_takes_every_reading_and_normalisation_setting() -> None:
    """LightningCLI (jsonargparse) passes nothing through ``**kwargs``: every setting the
    embed command has must be a named parameter to be set from a config."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(DOFAPredictDataModule, "data")
    cfg = parser.parse_args(
        ["--data.paths", "scene.tif", "--data.offset", "0", "--data.crs", "EPSG:32633",
         "--data.mean", "[80, 85]", "--data.std", "[40, 45]", "--data.bands", "[red, nir]",
         "--data.wavelengths", "[0.665, 0.865]", "--data.nodata", "0", "--data.preprocess",
         "true"]
    )  # fmt: skip
    dm = parser.instantiate_classes(cfg).data
    assert dm.kwargs["offset"] == 0 and dm.kwargs["crs"] == "EPSG:32633"
    assert dm.kwargs["bands"] == ["red", "nir"] and dm.kwargs["nodata"] == 0
    assert (dm.band_mean, dm.band_std) == ([80.0, 85.0], [40.0, 45.0])
    # the statistics follow bands=: without it, their order would be the default bands'
    with pytest.raises(ValueError, match=r"give bands=\[\.\.\.\] too"):
        DOFAPredictDataModule("scene.tif", mean=[80, 85], std=[40, 45])


def test_the_default_normalisation_names_its_way_out() -> None:
    """``preprocess`` defaults to DOFA's stack (it defaulted to raw chips): its refusals then
    say ``preprocess=False`` serves raw chips; given explicitly, they do not."""
    # bands without DOFA statistics (B8A has none) and no mean= / std=
    dm = DOFAPredictDataModule(DATA / "multiband", bands=["B8A", "B4"])
    with pytest.raises(BandError, match=r"; or give preprocess=False for raw chips$"):
        dm.setup("predict")
    raw = DOFAPredictDataModule(DATA / "multiband", bands=["B8A", "B4"], preprocess=False)
    raw.setup("predict")
    assert isinstance(raw.predict_dataset, Sentinel2SR) and raw.predict_dataset.transforms is None


def test_a_map_refuses_chips_off_its_cells() -> None:
    """Chip sizes and strides off the map's cells are refused where a map is drawn
    (``grid_geometry``: GridWriter, SegmentationWriter), not for pooled or class tables."""

    def map_refusal(**kwargs: Any) -> str:
        """Set up (as a pooled job does: fine), then the refusal of the map's grid."""
        dm = DOFAPredictDataModule(DATA / "multiband", **kwargs)
        dm.setup("predict")
        with pytest.raises(ValueError) as refused:
            dm.grid_geometry()
        return str(refused.value)

    # a stride off the map's cells is refused for a map alone (a pooled table of such chips
    # was refused at construction), raw chips included: they land on the same cells
    for preprocess in (None, True, False):
        assert map_refusal(patch_size=32, stride=24, preprocess=preprocess) == (
            "stride 24 px is not a multiple of the output cell (2.28571 px for 32-px chips with "
            "input_prep='resize'): chips would not land on whole cells of the map (an embedding "
            "grid, or a task's class map): give a stride of whole cells, e.g. 32 (a pooled "
            "table or class table takes any stride)"
        )
    # helper-114: tiles of 100-px chips (16-px cells) were advised the stride refused (100)
    assert "e.g. 96 or 112 (a pooled" in map_refusal(patch_size=100, input_prep="tile")
    # helper-113: a map of points was a RuntimeError from deep in Lightning's setup
    x0, y1 = 620000.0, 5702000.0  # top-left corner of the multiband fixture
    point = PointBuffer(*lonlat(x0 + 403.0, y1 - 302.0), buffer_m=160)
    points = DOFAPredictDataModule(DATA / "multiband", points=[point])
    points.setup("predict")
    with pytest.raises(ValueError, match=r"^points give one pooled row per point, not a map"):
        points.grid_geometry()
    # a map of chips off the 16-pixel patch grid, as embed's --chip-size (it ran: 7.14-px
    # cells); pooled chips of any size (BigEarthNet's 120 px) stay
    assert map_refusal(patch_size=100, stride=100) == (
        "patch_size 100 px is not a multiple of 16, DOFA's patch: the embedding map's cells "
        "would be 7.143 px, not whole patches; use 96 or 112 for a map (a pooled table or "
        "class table takes any patch_size)"
    )


def test_chip_times_are_each_chips_own_scenes_span(tmp_path) -> None:
    """One spatial-index query for a whole grid gives each box the span of the scenes whose
    area it meets (not the ones it only touches at an edge), the default where none."""
    import pandas as pd

    from tests.scenes import dated_copies
    from torchgeo_dofa.datamodules import chip_time, chip_times, scenes_within

    folder = tmp_path / "tiles"  # west tile on Jan 1, east tile (2560 m on) on Jan 3
    dated_copies(folder, [("T33UVP_20210101.tif", 0, 0), ("T33UVP_20210103.tif", 2560, 0)])
    ds = Sentinel2SR(folder)
    scenes = scenes_within(ds, None)
    (x0, y0, x1, _), (west, east) = ds.index.total_bounds, sorted(ds.index.index)
    mid, default = x0 + 2560, slice(pd.Timestamp("1999-01-01"), pd.Timestamp("1999-01-02"))
    boxes = [
        shapely.box(x0 + 10, y0 + 10, x0 + 100, y0 + 100),  # west tile only
        shapely.box(mid + 10, y0 + 10, mid + 100, y0 + 100),  # east tile only
        shapely.box(mid - 50, y0 + 10, mid + 50, y0 + 100),  # both
        shapely.box(x0 - 100, y0 + 10, x0, y0 + 100),  # touches the west edge only
        shapely.box(x1 + 10, y0 + 10, x1 + 100, y0 + 100),  # outside
    ]
    expected = [
        slice(west.left, west.right),
        slice(east.left, east.right),
        slice(west.left, east.right),
        default,
        default,
    ]
    assert chip_times(scenes, boxes, default) == expected
    assert [chip_time(scenes, b, default) for b in boxes] == expected
    assert chip_times(scenes, [], default) == []


@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_input_name_is_refused_not_read_as_the_working_folder(empty, tmp_path) -> None:
    """``Path("")`` is the working folder: the regions of an empty name were its rasters, then
    the dataset said "found no raster in paths=''"; every door's shared lookup refuses it."""
    from torchgeo_dofa.datasets import InputError, find_raster_inputs

    with pytest.raises(InputError, match=f"an input is '{empty}', an empty name: give GeoTIFF"):
        find_raster_inputs([empty])
    dm = DOFAPredictDataModule(paths=empty)
    with pytest.raises(InputError, match="an empty name is not the current folder"):
        dm.setup("predict")


# ------------------------------------------------------------------------------------------
# EuroSAT with DOFA's preprocessing (TorchGeo's layout, generated: tests/data/eurosat/data.py)
# ------------------------------------------------------------------------------------------

#: DOFA's statistics on the 0..255 scale, in its 9-band order (shared/reference/dofa.md).
DOFA_MEAN = [114.1099739, 114.81779093, 126.63977424, 84.33539309, 97.84789168, 103.94461911,
             101.435633, 72.32804172, 56.66528851]  # fmt: skip
DOFA_STD = [77.84352553, 69.96844919, 67.42465279, 64.57022983, 61.72545487, 61.34187099,
            60.29744676, 47.88519516, 42.55886798]  # fmt: skip


def test_dofa_eurosat_batches_are_the_files_bands_dofa_normalised(eurosat_root: Path) -> None:
    """TorchGeo's EuroSATDataModule normalises with EuroSAT's own statistics (values of
    +-3, as DOFA's), so nothing downstream could tell; this one's batches are the file's
    B4 ... B12 normalised with DOFA's statistics and resized to 224, with wavelengths."""
    from torchgeo_dofa.datamodules import EUROSAT_DOFA_BANDS, DOFAEuroSATDataModule

    dm = DOFAEuroSATDataModule(root=eurosat_root, batch_size=2)
    dm.setup("validate")
    raw = next(iter(dm.val_dataloader()))
    path = dm.val_dataset.samples[0][0]  # type: ignore[union-attr]
    with rasterio.open(path) as src:  # TorchGeo's order B01 ... B12, B8A: B04 is band 4
        file = src.read([4, 3, 2, 5, 6, 7, 8, 11, 12]).astype(np.float32)
    np.testing.assert_array_equal(raw["image"][0].numpy(), file)
    batch = dm.aug(dict(raw))
    mean = torch.tensor(DOFA_MEAN)[:, None, None]
    std = torch.tensor(DOFA_STD)[:, None, None]
    want = ((torch.from_numpy(file).clamp(0, 10000) / 10000 * 255) - mean) / std
    want = F.interpolate(want[None], size=224, mode="bilinear", align_corners=False)[0]
    assert batch["image"].shape == (2, 9, 224, 224)
    torch.testing.assert_close(batch["image"][0], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        batch["wavelengths"][0],
        torch.tensor([0.665, 0.56, 0.49, 0.705, 0.74, 0.783, 0.842, 1.61, 2.19]),
    )
    assert batch["label"].tolist() == raw["label"].tolist() and bool(batch["valid"].all())
    assert dm.bands == EUROSAT_DOFA_BANDS


def test_dofa_eurosat_band_errors_name_the_fix(eurosat_root: Path) -> None:
    from torchgeo.datasets import EuroSAT

    from torchgeo_dofa.datamodules import DOFAEuroSAT100DataModule, DOFAEuroSATDataModule

    with pytest.raises(BandError, match=r"EuroSAT has no band\(s\) \['B99'\]: choose among"):
        DOFAEuroSATDataModule(root=eurosat_root, bands=["B99", "B03"])
    with pytest.raises(BandError, match=r"EuroSAT100 has no bands given \(bands=\[\]\)"):
        DOFAEuroSAT100DataModule(root=eurosat_root, bands=[])
    # helper-114: the package's own spelling was refused, one string split into letters, and
    # split= / transforms= failed at setup or were dropped
    assert DOFAEuroSATDataModule(root=eurosat_root, bands=["B4", "B03"]).bands == ("B04", "B03")
    with pytest.raises(BandError, match=r"bands='B04' is one string"):
        DOFAEuroSATDataModule(root=eurosat_root, bands="B04")
    for key in ("split", "transforms"):
        with pytest.raises(ValueError, match=rf"^{key}= is the data module's own"):
            DOFAEuroSATDataModule(root=eurosat_root, **{key: None})  # type: ignore[arg-type]
    # a misspelt keyword failed at setup as EuroSAT's TypeError; batch_size=0 at the loader
    with pytest.raises(ValueError, match=r"got 'downlaod' \(did you mean 'download'\?\)"):
        DOFAEuroSATDataModule(root=eurosat_root, downlaod=True)
    with pytest.raises(ValueError, match=r"batch_size must be a whole number >= 1, got 0"):
        DOFAEuroSATDataModule(root=eurosat_root, batch_size=0)
    with pytest.raises(BandError, match=r"statistics for band\(s\) \['B01', 'B09', 'B10', 'B8A'\]"):
        DOFAEuroSATDataModule(root=eurosat_root, bands=EuroSAT.all_band_names)
    # all 13 with statistics of one's own (DOFA's 0..255 scale)
    dm = DOFAEuroSAT100DataModule(
        root=eurosat_root, bands=EuroSAT.all_band_names, mean=[100.0] * 13, std=[50.0] * 13
    )
    dm.setup("test")
    batch = dm.aug(next(iter(dm.test_dataloader())))
    assert batch["image"].shape[1:] == (13, 224, 224) and batch["wavelengths"].shape[-1] == 13


def test_a_eurosat_download_that_fails_is_one_line_and_leaves_no_folder(tmp_path: Path) -> None:
    """helper-119: offline, ``fit --config finetune_eurosat.yaml`` (random weights) ended in
    TorchGeo's download traceback (``URLError: <urlopen error [Errno -2] Name or service not
    known>``), exit 1, and left an empty ``data/eurosat/``. Now one error naming the dataset,
    its folder, the address and the fixes; the folders the download made are removed. (A real
    TorchGeo download, from an address that refuses connections: no network needed.)"""
    from torchgeo.datasets import EuroSAT100

    from torchgeo_dofa.datamodules import DatasetDownloadError, DOFAEuroSAT100DataModule

    class Refused(EuroSAT100):
        url = "http://127.0.0.1:9/eurosat/"  # the discard port: nothing listens

    class RefusedModule(DOFAEuroSAT100DataModule):
        eurosat_class = Refused

    root = tmp_path / "data" / "eurosat"
    dm = RefusedModule(root=root, download=True)
    for step in (dm.prepare_data, functools.partial(dm.setup, "fit")):
        with pytest.raises(DatasetDownloadError) as refused:
            step()
        message = str(refused.value)
        assert message.startswith(f"could not download Refused into {root} (URLError: "), message
        assert message.endswith(
            f"): TorchGeo fetches it from {Refused.url}; run where that address is reachable, "
            f"or put the dataset's files in {root} yourself and set download: false"
        )
        assert "\n" not in message
        assert sorted(p.name for p in tmp_path.iterdir()) == []  # data/eurosat made, removed
    # helper-120: a root that cannot be made (a file in the way; read-only, full) is the
    # folder's fault, not the network's: said so
    (tmp_path / "afile").touch()
    with pytest.raises(DatasetDownloadError) as in_the_way:
        RefusedModule(root=tmp_path / "afile" / "eurosat", download=True).prepare_data()
    assert str(in_the_way.value) == (
        f"could not download Refused into {tmp_path / 'afile' / 'eurosat'} (Not a directory: "
        f"{tmp_path / 'afile' / 'eurosat'}): give root a folder that can be written, with "
        "space for the dataset"
    )
    # without download=True a missing dataset stays TorchGeo's own error (it says the fix)
    from torchgeo.datasets import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError):
        RefusedModule(root=root).setup("fit")


def test_a_stride_beyond_the_chip_size_is_warned_of_and_the_configs_keep_chips_edge_to_edge() -> (
    None
):
    """helper-136: the predict configs fixed ``stride: 224``; trained on 64-px chips, a user
    gave ``patch_size: 64`` and 89% of the class map stayed no-data (a 224-px stride between
    64-px chips), exit 0 without a word. The configs now leave the stride to the chip size,
    and a stride beyond it is warned of."""
    import yaml

    from tests.scenes import SCENE

    configs = Path(__file__).resolve().parents[1] / "torchgeo_dofa" / "configs"
    with rasterio.open(SCENE) as src:  # 578 x 379 px
        width, height = src.width, src.height
    for name in ["predict_grid", "predict_classification", "predict_segmentation"]:
        data = yaml.safe_load((configs / f"{name}.yaml").read_text())["data"]["init_args"]
        data |= {"paths": str(SCENE), "patch_size": 64, "preprocess": False}
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            dm = DOFAPredictDataModule(**data)
        dm.setup("predict")
        # chips edge to edge over the whole raster: TorchGeo's grid, its last chips at the edges
        chips = sum(len(b["image"]) for b in dm.predict_dataloader())
        assert chips == -(-width // 64) * -(-height // 64), name
    with pytest.warns(UserWarning) as caught:
        DOFAPredictDataModule(SCENE, patch_size=64, stride=224)
    assert [str(w.message) for w in caught] == [
        "the stride of 224 px is larger than the chip size of 64 px: 92% of the raster, "
        "between the chips, is never read (a map keeps no-data there, a table has no rows "
        "for it); give a stride of at most 64 px (by default it is the chip size: chips edge "
        "to edge)"
    ]
