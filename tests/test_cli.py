"""The embed job end to end: CLI, georeferencing, values against the encoder, resume, DDP."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import geopandas as gpd
import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import rasterio
import torch
import yaml
from pyproj import CRS
from rasterio.enums import Resampling
from rasterio.transform import Affine
from rasterio.windows import Window, from_bounds
from torchgeo.datasets import stack_samples

from tests.checkpoints import not_official
from tests.ddp import DDP_ENV, rendezvous_port, usable_memory
from tests.precision import assert_as_exact_as_torchgeo, cosine_error, torchgeo_bf16_error
from tests.scenes import SCENE, dated_copies
from tests.tmpfs import tmpfs
from torchgeo_dofa import load_dofa
from torchgeo_dofa.cli import (
    _rendezvous_problem,
    config_hints,
    embed,
    main,
    option_problem,
    output_folder,
)
from torchgeo_dofa.datamodules import DOFAPredictDataModule
from torchgeo_dofa.datasets import InputError, Sentinel2SR
from torchgeo_dofa.spatial import CRSTransformError
from torchgeo_dofa.tasks import DOFAClassificationTask, DOFASegmentationTask, restoring_from
from torchgeo_dofa.transforms import DOFAPreprocess
from torchgeo_dofa.writers import ClassificationWriter, precision_coordinates_problem

#: Tolerance between two fp32 runs of the same job by different paths (``embed`` and
#: ``predict --config``, or ``get_embedding``). 1e-6 on a CPU; on a GPU ``embed`` normalises
#: and resizes the chips there (``predict --config`` in the loader, on the CPU) and the
#: kernels differ: up to 4.4e-6 measured on an H200 (grid cells of the bundled scene).
SAME_JOB_ATOL = 1e-5 if torch.cuda.is_available() else 1e-6


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, base_checkpoint) -> Path:
    out = tmp_path_factory.mktemp("ref")
    code = main(
        [
            "embed",
            str(SCENE),
            "-o",
            str(out),
            "--weights",
            str(base_checkpoint),
            "--output",
            "both",
            "--batch-size",
            "4",
            "--no-progress",
        ]
    )
    assert code == 0
    return out


def test_grid_geotiff_georeferencing(reference_run: Path, base_checkpoint: Path) -> None:
    with (
        rasterio.open(SCENE) as src,
        rasterio.open(reference_run / "ftw_s2_l2a_33N_grid.tif") as emb,
    ):
        assert emb.crs == src.crs
        assert emb.count == 768
        assert emb.res == (160.0, 160.0)  # one cell per 16 x 16 pixels at 10 m
        # anchored at the scene's lower-left corner; covers the scene
        assert emb.bounds.left == src.bounds.left
        assert emb.bounds.bottom == src.bounds.bottom
        assert emb.bounds.right >= src.bounds.right and emb.bounds.top >= src.bounds.top
        assert (emb.width, emb.height) == (int(np.ceil(578 / 16)), int(np.ceil(379 / 16)))
        assert emb.descriptions[0] == "dofa_0000"
        assert emb.tags()["variant"] == "base"
        assert emb.tags()["weights"] == not_official(base_checkpoint)
        assert emb.nodata is not None and np.isnan(emb.nodata)
        # the precision the numbers were computed in (the suite runs fp32), in both outputs
        assert emb.tags()["precision"] == "32-true"
    pooled = gpd.read_parquet(reference_run / "ftw_s2_l2a_33N_pooled.parquet")
    assert pooled.attrs["precision"] == "32-true"


def test_cell_vectors_equal_encoder_grid(reference_run: Path, base_checkpoint) -> None:
    """Independent path: rasterio window -> DOFAPreprocess -> encoder, vs the written cells."""
    with rasterio.open(SCENE) as src:
        left, bottom = src.bounds.left, src.bounds.bottom
        # second chip of the first (bottom) row: x from left + 2240 m, y from bottom
        window = from_bounds(left + 2240, bottom, left + 4480, bottom + 2240, src.transform)
        raw = src.read(window=window, boundless=True, fill_value=0).astype(np.float32)
        names = list(src.descriptions)
    pre = DOFAPreprocess(bands=names)
    sample = pre({"image": torch.from_numpy(raw)})
    enc = load_dofa("base", weights=base_checkpoint)
    with torch.inference_mode():
        grid = enc(sample["image"][None], sample["wavelengths"]).grid[0].numpy()
    with rasterio.open(reference_run / "ftw_s2_l2a_33N_grid.tif") as emb:
        top = bottom + 2240
        row, col = emb.index(left + 2240 + 80, top - 80)  # centre of the chip's top-left cell
        cells = emb.read(window=((row, row + 14), (col, col + 14)))
    # cells inside this chip and no other chip (no overlap at stride 224)
    np.testing.assert_allclose(cells, grid, rtol=1e-4, atol=1e-4)


def test_oblong_pixels_give_oblong_cells(tmp_path: Path, base_checkpoint) -> None:
    """A 10 x 20 m raster (and any non-square pixels, e.g. degrees in EPSG:4326): 160 x 320 m
    cells placed on the chips' pixels (the job failed after its first batch, with parts left,
    on "chip grid cell size 160.0 x 320.0 differs from the output's 160.0")."""
    with rasterio.open(SCENE) as src:
        profile, names, t = src.profile, list(src.descriptions), src.transform
        data = src.read(window=((0, 300), (0, 300)))
    oblong = tmp_path / "oblong.tif"
    transform = Affine(10.0, 0.0, t.c, 0.0, -20.0, t.f)
    with rasterio.open(
        oblong, "w", **(profile | {"width": 300, "height": 300, "transform": transform})
    ) as dst:
        dst.write(data)
        dst.descriptions = names
    out = tmp_path / "out"
    args = ["embed", str(oblong), "-o", str(out), "--weights", str(base_checkpoint)]
    assert main([*args, "--no-progress", "--precision", "32"]) == 0
    with rasterio.open(oblong) as src, rasterio.open(out / "oblong_grid.tif") as emb:
        assert emb.crs == src.crs and emb.res == (160.0, 320.0)
        assert (emb.width, emb.height) == (19, 19)  # ceil(300 / 16) both ways
        assert (emb.bounds.left, emb.bounds.bottom) == (src.bounds.left, src.bounds.bottom)
        # the chip at the lower-left corner: 224 x 224 pixels = 2240 x 4480 m
        left, bottom = src.bounds.left, src.bounds.bottom
        window = from_bounds(left, bottom, left + 2240, bottom + 4480, src.transform)
        raw = src.read(window=window, boundless=True, fill_value=0).astype(np.float32)
        row, col = emb.index(left + 80, bottom + 4480 - 160)  # its top-left cell's centre
        cells = emb.read(window=((row, row + 14), (col, col + 14)))
    sample = DOFAPreprocess(bands=names)({"image": torch.from_numpy(raw)})
    enc = load_dofa("base", weights=base_checkpoint)
    with torch.inference_mode():
        grid = enc(sample["image"][None], sample["wavelengths"]).grid[0].numpy()
    np.testing.assert_allclose(cells, grid, rtol=1e-4, atol=1e-4)
    frame = gpd.read_parquet(out / "oblong_pooled.parquet")
    widths = frame.geometry.bounds.maxx - frame.geometry.bounds.minx
    heights = frame.geometry.bounds.maxy - frame.geometry.bounds.miny
    assert set(widths) == {2240.0} and set(heights) == {4480.0}


def test_outputs_record_the_inputs_acquisition_span(tmp_path: Path) -> None:
    """The grid GeoTIFF had no acquisition date (the pooled table had its chips' times):
    now ``acquisition_start`` / ``acquisition_end`` (ISO 8601 UTC) in both (the table's
    metadata), for the scenes read (those --datetime selects), and GDAL's IMAGERY
    ``ACQUISITIONDATETIME`` where the inputs date them to the second; an undated input gets
    none of them."""
    series, single = tmp_path / "series", tmp_path / "single"
    dated_copies(series, [("T33UVP_20210101.tif", 0.0, 0), ("T33UVP_20230601.tif", 0.0, 300)])
    dated_copies(single, [("T33UVP_20220614T101559.tif", 0.0, 0), ("undated.tif", 0.0, 0)])
    out = tmp_path / "out"
    common = ["--weights", "none", "--no-progress", "-o"]
    when = ["--datetime", "2023-06-01/2023-06-01"]
    assert main(["embed", str(series), *common, str(out / "series"), *when]) == 0
    for name in ("T33UVP_20220614T101559", "undated"):
        assert main(["embed", str(single / f"{name}.tif"), *common, str(out / name)]) == 0
    day = ("2023-06-01T00:00:00Z", "2023-06-01T23:59:59.999999Z")  # not 2021's too
    second = ("2022-06-14T10:15:59Z", "2022-06-14T10:15:59.999999Z")
    for name, span, imagery in [
        ("series", day, {}),  # a date without a time of day: no instant
        ("T33UVP_20220614T101559", second, {"ACQUISITIONDATETIME": "2022-06-14 10:15:59"}),
        ("undated", None, {}),
    ]:
        with rasterio.open(out / name / f"{name}_grid.tif") as src:
            tags = src.tags()
            got = tags.get("acquisition_start"), tags.get("acquisition_end")
            assert got == (span or (None, None)), (name, tags)
            assert src.tags(ns="IMAGERY") == imagery, name
        table = gpd.read_parquet(out / name / f"{name}_pooled.parquet")
        attrs = table.attrs
        assert (attrs.get("acquisition_start"), attrs.get("acquisition_end")) == got, name
        if span is None:
            assert table.time_start.isna().all() and table.time_end.isna().all()
        else:
            assert {str(v) for v in table.time_start} == {
                str(pd.Timestamp(span[0]).tz_convert("UTC"))
            }
    # one column type, dated or not (an undated table's was timestamp[s], a dated one's
    # timestamp[ns]: tables of two jobs did not read as one pyarrow dataset)
    import pyarrow.dataset
    import pyarrow.parquet

    tables = sorted(out.glob("*/*_pooled.parquet"))
    for path in tables:
        schema = pyarrow.parquet.read_schema(path)
        for column in ("time_start", "time_end"):
            assert schema.field(column).type == pyarrow.timestamp("us", tz="UTC"), path
    assert pyarrow.dataset.dataset(tables).to_table().num_rows == sum(
        len(gpd.read_parquet(p)) for p in tables
    )
    # not part of the job's identity (it follows from the inputs): parts written without it
    # (an earlier release's) are this job's; the resumed job tags its outputs all the same
    timed, resumed = single / "T33UVP_20220614T101559.tif", tmp_path / "resumed"
    kwargs: dict[str, Any] = dict(weights=None, seed=0, batch_size=1, progress=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        embed([timed], resumed, callbacks=[CrashAfterBatch()], **kwargs)
    for parts in resumed.glob("*.parts"):
        identity = json.loads((parts / "job-identity").read_text())
        assert "bands" in identity and not {"acquisition_start", "acquisition_end"} & {*identity}
    summary = embed([timed], resumed, **kwargs)
    assert (summary.skipped, summary.chips) == (1, 3)
    with rasterio.open(resumed / f"{timed.stem}_grid.tif") as src:
        assert (src.tags()["acquisition_start"], src.tags()["acquisition_end"]) == second
    assert embed([timed], resumed, **kwargs).chips == 0  # finished: nothing redone


def test_acquisition_span_is_that_of_the_scenes_the_chips_read(tmp_path: Path) -> None:
    """Two scenes side by side, a_20230601 (left) and b_20230715 (right): a --bbox or a point
    inside a recorded acquisition_end 2023-07-15 (the whole index's span) while its rows said
    2023-06-01; now the span of the scenes the job's chips read. The whole folder: both."""
    folder = tmp_path / "scenes"
    dated_copies(folder, [("a_20230601.tif", 0.0, 0), ("b_20230715.tif", 2560.0, 0)])
    common = ["--weights", "none", "--no-progress", "-o"]
    june = ("2023-06-01T00:00:00Z", "2023-06-01T23:59:59.999999Z")
    with rasterio.open(folder / "a_20230601.tif") as src:
        b = src.bounds
    lon, lat = _scene_lonlat(b.left + 1280, b.bottom + 1280)
    (tmp_path / "pts.csv").write_text(f"lon,lat\n{lon},{lat}\n")
    box = _one_chip_bbox(folder / "a_20230601.tif")
    points = ["--points", str(tmp_path / "pts.csv"), "--buffer-m", "500", "--output", "pooled"]
    runs = [("box", box, june), ("point", points, june)]
    runs.append(("whole", [], (june[0], "2023-07-15T23:59:59.999999Z")))
    for name, args, span in runs:
        out = tmp_path / name
        assert main(["embed", str(folder), *common, str(out), *args]) == 0
        grids = list(out.glob("*_grid.tif"))
        for grid in grids:
            with rasterio.open(grid) as src:
                got = src.tags().get("acquisition_start"), src.tags().get("acquisition_end")
                assert got == span, name
        assert len(grids) == (name != "point")
        (pooled,) = out.glob("*_pooled.parquet")
        table = gpd.read_parquet(pooled)
        assert (table.attrs.get("acquisition_start"), table.attrs.get("acquisition_end")) == span
        assert str(table.time_start.min()) == str(pd.Timestamp(span[0]).tz_convert("UTC"))
        assert str(table.time_end.max()) == str(pd.Timestamp(span[1]).tz_convert("UTC"))


def test_a_name_of_two_dates_records_no_acquisition_span(tmp_path: Path) -> None:
    """``togo_2019-02-06_2020-02-01.tif`` (a stack over a year) was recorded as acquired on
    2019-02-06 alone (the first date of its name, which --datetime dates it by): now no
    acquisition tags (nothing false), alone or beside a dated scene; --datetime still selects
    it by that first date, and a name of one date keeps its tags."""
    folder = tmp_path / "scenes"
    ranged = "togo_2019-02-06_2020-02-01.tif"
    dated_copies(folder, [(ranged, 0.0, 0), ("b_20230715.tif", 2560.0, 0)])
    common = ["--weights", "none", "--no-progress", "--output", "pooled", "-o"]
    july = ("2023-07-15T00:00:00Z", "2023-07-15T23:59:59.999999Z")
    for name, args, span in [
        ("alone", [str(folder / ranged)], None),
        ("folder", [str(folder)], None),
        ("first", [str(folder), "--datetime", "2019-02-06/2019-02-06"], None),
        ("other", [str(folder), "--datetime", "2023-07-15/2023-07-15"], july),
    ]:
        out = tmp_path / name
        assert main(["embed", *args, *common, str(out)]) == 0, name
        (pooled,) = out.glob("*_pooled.parquet")
        table = gpd.read_parquet(pooled)
        got = table.attrs.get("acquisition_start"), table.attrs.get("acquisition_end")
        assert got == (span or (None, None)), name
        if name == "first":  # the filtering is unchanged: dated by the first date
            assert {str(v.date()) for v in table.time_start} == {"2019-02-06"}
    out = tmp_path / "grid"
    assert main(["embed", str(folder / ranged), "--weights", "none", "-o", str(out)]) == 0
    with rasterio.open(out / f"{Path(ranged).stem}_grid.tif") as src:
        assert "acquisition_start" not in src.tags() and not src.tags(ns="IMAGERY")


def test_a_time_series_of_one_place_is_refused_and_datetime_picks_a_date(
    tmp_path: Path, capsys, base_checkpoint
) -> None:
    """Two dates of one place in a folder were merged into one image per chip (the first
    file's pixels, gaps filled from the other), and --datetime was ignored without --stac."""
    series = tmp_path / "series"
    dated_copies(series, [("T33UVP_20210101.tif", 0.0, 0), ("T33UVP_20230601.tif", 0.0, 300)])
    common = ["--weights", str(base_checkpoint), "--no-progress", "--output", "pooled"]
    assert main(["embed", str(series), "-o", str(tmp_path / "mixed"), *common]) == 2
    err = capsys.readouterr().err
    assert err == (
        "torchgeo-dofa: error: T33UVP_20210101.tif (acquired 2021-01-01) and "
        "T33UVP_20230601.tif (acquired 2023-06-01) overlap: a chip would mix the two dates' "
        "pixels, and DOFA embeds one acquisition at a time (2 dates among the inputs). Choose "
        "the dates with --datetime 2021-01-01/2021-01-01, or give the files as separate "
        "inputs (one output each)\n"
    )
    assert not (tmp_path / "mixed").exists()
    # --datetime reads the scenes of those dates: the same rows as that file alone
    picked, alone = tmp_path / "picked", tmp_path / "alone"
    when = ["--datetime", "2023-06-01/2023-06-01"]
    assert main(["embed", str(series), "-o", str(picked), *common, *when]) == 0
    assert main(["embed", str(series / "T33UVP_20230601.tif"), "-o", str(alone), *common]) == 0
    got = gpd.read_parquet(picked / "series_pooled.parquet")
    ref = gpd.read_parquet(alone / "T33UVP_20230601_pooled.parquet")
    assert list(got.chip_id) == list(ref.chip_id) and len(got) == 4
    np.testing.assert_array_equal(np.stack(got.embedding), np.stack(ref.embedding))
    assert set(got.time_start.astype(str)) == {"2023-06-01 00:00:00+00:00"}
    # dates holding no scene, and a malformed range: one line each, nothing written
    empty = ["--datetime", "2022-01-01/2022-12-31"]
    capsys.readouterr()
    assert main(["embed", str(series), "-o", str(tmp_path / "none"), *common, *empty]) == 2
    assert capsys.readouterr().err == (
        "torchgeo-dofa: error: no scene of the inputs is acquired within 2022-01-01/2022-12-31 "
        "(they are dated 2021-01-01, 2023-06-01): choose dates that hold scenes\n"
    )
    bad = ["--datetime", "June"]
    assert main(["embed", str(series), "-o", str(tmp_path / "bad"), *common, *bad]) == 2
    assert "--datetime June: bad datetime 'June'" in capsys.readouterr().err
    assert not (tmp_path / "none").exists() and not (tmp_path / "bad").exists()
    # the scenes --datetime leaves out decide nothing: a 20 m date beside a 10 m one was read
    # at 10 m (the folder's finest), and both were the outputs' sources
    coarse = series / "T33UVP_20210101.tif"
    with rasterio.open(coarse) as src:
        profile, names = src.profile, src.descriptions
        data = src.read(out_shape=(src.count, 128, 128), resampling=Resampling.nearest)
    t = profile["transform"]
    profile |= {"width": 128, "height": 128, "transform": Affine(20.0, 0, t.c, 0, -20.0, t.f)}
    with rasterio.open(coarse, "w", **profile) as dst:
        dst.write(data)
        dst.descriptions = names
    grid = ["--weights", str(base_checkpoint), "--no-progress", "--output", "grid"]
    when = ["--datetime", "2021-01-01/2021-01-01"]
    assert main(["embed", str(series), "-o", str(tmp_path / "g_picked"), *grid, *when]) == 0
    assert main(["embed", str(coarse), "-o", str(tmp_path / "g_alone"), *grid]) == 0
    with rasterio.open(tmp_path / "g_picked" / "series_grid.tif") as got_grid:
        with rasterio.open(tmp_path / "g_alone" / "T33UVP_20210101_grid.tif") as alone_grid:
            assert got_grid.res == alone_grid.res == (320.0, 320.0)
            assert got_grid.transform == alone_grid.transform
            assert json.loads(got_grid.tags()["sources"]) == [str(coarse)]
            np.testing.assert_array_equal(got_grid.read(), alone_grid.read())
    capsys.readouterr()
    # from Python, the hint is the data module's time=
    dm = DOFAPredictDataModule(series)
    with pytest.raises(InputError, match=r"time=\('2021-01-01', '2021-01-01 23:59:59'\)"):
        dm.setup("predict")
    dm = DOFAPredictDataModule(series, time="2021-01-01/2021-01-01")
    dm.setup("predict")  # that date alone: 128 x 128 px at 20 m, one chip
    assert isinstance(dm.predict_dataset, Sentinel2SR) and dm.predict_dataset.res == (20.0, 20.0)
    assert len(dm.predict_sampler or []) == 1


def test_one_days_tiles_mosaic_an_undated_file_among_dated_ones_is_refused(
    tmp_path: Path, capsys, base_checkpoint
) -> None:
    """Tiles of one pass (times seconds apart) overlap and mosaic, as TorchGeo's; a file
    without a date overlapping a dated one is refused (a time range cannot leave it out: it
    was merged into the chosen date's chips, the row's time NaT); a rerun over other dates
    is another job (it resumed, keeping the first dates' rows)."""
    tiles = tmp_path / "tiles"
    dated_copies(
        tiles, [("S2A_20230601T102021_a.tif", 0.0, 0), ("S2A_20230601T102031_b.tif", 1000.0, 7)]
    )
    common = ["--weights", str(base_checkpoint), "--no-progress", "--output", "pooled"]
    assert main(["embed", str(tiles), "-o", str(tmp_path / "mosaic"), *common]) == 0
    frame = gpd.read_parquet(tmp_path / "mosaic" / "tiles_pooled.parquet")
    assert {str(t.date()) for t in frame.time_start} == {"2023-06-01"}
    mixed = tmp_path / "mixed"
    dated_copies(mixed, [("scene_20230601.tif", 0.0, 0), ("plain.tif", 0.0, 300)])
    capsys.readouterr()
    assert main(["embed", str(mixed), "-o", str(tmp_path / "m"), *common]) == 2
    assert capsys.readouterr().err.endswith(
        "error: plain.tif has no date (no STAC item JSON beside it, no date in its name) "
        "and overlaps scene_20230601.tif (acquired 2023-06-01): a chip would mix them. "
        "Give the files as separate inputs (one output each), or name the file with its "
        "date (e.g. scene_YYYYMMDD.tif)\n"
    )
    # with --datetime, the file no date range can select is refused as such (see
    # test_datetime_over_files_without_a_date_is_refused)
    when = ["--datetime", "2023-06-01/2023-06-01"]
    assert main(["embed", str(mixed), "-o", str(tmp_path / "m"), *common, *when]) == 2
    assert f"--datetime 2023-06-01/2023-06-01 cannot apply to {mixed / 'plain.tif'}: " in (
        capsys.readouterr().err
    )
    series = tmp_path / "series"
    dated_copies(series, [("T_20210101.tif", 0.0, 0), ("T_20230601.tif", 0.0, 300)])
    out = ["-o", str(tmp_path / "job")]
    assert main(["embed", str(series), *out, *common, "--datetime", "2021-01-01/2021-12-31"]) == 0
    capsys.readouterr()
    assert main(["embed", str(series), *out, *common, "--datetime", "2023-01-01/.."]) == 2
    assert (
        'region was {"datetime": "2021-01-01/2021-12-31"}, now {"datetime": "2023-01-01/.."}'
        in (capsys.readouterr().err)
    )
    # aware datetimes are converted to the index's naive UTC (was a TypeError)
    from datetime import UTC, datetime

    aware = (datetime(2023, 6, 1, tzinfo=UTC), datetime(2023, 6, 2, tzinfo=UTC))
    dm = DOFAPredictDataModule(series, time=aware)
    dm.setup("predict")
    assert len(dm.predict_sampler or []) == 4


def test_datetime_over_files_without_a_date_is_refused(tmp_path: Path, capsys) -> None:
    """--datetime over a file dated nowhere (no date in its name, no STAC item JSON) embedded
    it as if it were acquired within the dates (it spans all time, so no range leaves it
    out), alone or beside the dated files of a folder: refused before anything is written,
    naming the files (the first few and a count) of every region, where a date was looked
    for and the fixes; from Python, the data module's time= likewise."""
    folder = tmp_path / "scenes"
    dated_copies(folder, [("plain.tif", 0.0, 0)])
    plain = folder / "plain.tif"
    common = ["--weights", "none", "--no-progress", "--output", "pooled"]
    when = ["--datetime", "2023-01-01/2023-12-31"]
    out = tmp_path / "out"
    assert main(["embed", str(plain), "-o", str(out), *common, *when]) == 2
    assert capsys.readouterr().err == (
        f"torchgeo-dofa: error: --datetime 2023-01-01/2023-12-31 cannot apply to {plain}: no "
        "acquisition date was found for it (no STAC item JSON beside it, no date in its file, "
        "item or folder name), so the dates cannot leave it out and it would be embedded "
        "whatever they are: leave out --datetime, give only dated files as inputs, or give it "
        "its date (in the file name, e.g. scene_20230601.tif, or a STAC item JSON beside it)\n"
    )
    assert not out.exists()
    # a range open at both ends leaves nothing out: nothing to refuse
    for k, whole in enumerate(("/", "../..", "0001-01-01/9999-12-31")):  # the last: pandas'
        run = ["embed", str(plain), "-o", str(out / f"whole{k}"), *common, "--datetime", whole]
        assert main(run) == 0  # years end in 1677 / 2262: clamped (it was an OverflowError)
        assert (out / f"whole{k}" / "plain_pooled.parquet").exists()
    capsys.readouterr()
    shutil.rmtree(out)
    # a folder mixing dated and undated files (side by side: no overlap to refuse), and
    # undated files given as regions of their own: every undated file is named at once
    mixed = tmp_path / "mixed"
    names = ["a.tif", "b.tif", "c.tif", "d.tif"]
    dated_copies(
        mixed,
        [("scene_20230601.tif", 0.0, 0)] + [(n, 2560.0 * (k + 1), 0) for k, n in enumerate(names)],
    )
    assert main(["embed", str(mixed), "-o", str(out), *common, *when]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"torchgeo-dofa: error: --datetime 2023-01-01/2023-12-31 cannot apply to 4 scenes "
        f"({mixed / 'a.tif'}, {mixed / 'b.tif'}, {mixed / 'c.tif'} and 1 more): no acquisition "
        "date was found for them (no STAC item JSON beside them, no date in their file, item "
        "or folder names), so the dates cannot leave them out and they would be embedded "
        "whatever they are: leave out --datetime, give only dated files as inputs, or give "
        "each its date"
    )
    assert len(err.splitlines()) == 1 and not out.exists()
    regions = [str(mixed / "scene_20230601.tif"), str(plain), str(mixed / "a.tif")]
    assert main(["embed", *regions, "-o", str(out), *common, *when]) == 2
    assert f"cannot apply to 2 scenes ({plain}, {mixed / 'a.tif'}): " in capsys.readouterr().err
    assert not out.exists()
    # the dated file alone is read as before
    dated = [str(mixed / "scene_20230601.tif"), "-o", str(out), "--chip-size", "128"]
    assert main(["embed", *dated, *common, *when]) == 0
    assert len(gpd.read_parquet(out / "scene_20230601_pooled.parquet")) == 4
    dm = DOFAPredictDataModule(plain, time="2023-01-01/2023-12-31")
    said = r"^time='2023-01-01/2023-12-31' cannot apply to .*plain\.tif: no acquisition date"
    with pytest.raises(InputError, match=said + r" was found for it .* leave out time=, "):
        dm.setup("predict")


def test_each_pooled_row_records_the_dates_of_the_scenes_it_reads(
    tmp_path: Path, base_checkpoint
) -> None:
    """Side by side scenes of two dates: a chip's time_start / time_end were the region's
    whole span (2021-01-01 .. 2023-06-01 on every row)."""
    folder = tmp_path / "dated"
    dated_copies(folder, [("a_20210101.tif", 0.0, 0), ("b_20230601.tif", 2560.0, 0)])
    out = tmp_path / "out"
    args = ["embed", str(folder), "-o", str(out), "--weights", str(base_checkpoint)]
    assert main([*args, "--no-progress", "--output", "pooled"]) == 0
    frame = gpd.read_parquet(out / "dated_pooled.parquet")
    days = {
        (round(g.bounds[0] - frame.total_bounds[0]), str(a.date()), str(b.date()))
        for g, a, b in zip(frame.geometry, frame.time_start, frame.time_end, strict=True)
    }
    # chips 2240 m wide from the west edge; scene b starts 2560 m east
    assert days == {
        (0, "2021-01-01", "2021-01-01"),  # in a only
        (2240, "2021-01-01", "2023-06-01"),  # across both
        (4480, "2023-06-01", "2023-06-01"),  # in b only
    }


def test_a_huge_mostly_empty_grid_is_refused_before_anything(
    tmp_path: Path, capsys, base_checkpoint
) -> None:
    """Rasters far apart in one folder: the grid spanned the gap (two BigEarthNet patches
    in --crs EPSG:32634 wrote 644 MB for 2 chips, 74 GB uncompressed, with no word)."""
    with rasterio.open(SCENE) as src:
        profile, names, t = src.profile, list(src.descriptions), src.transform
        data = src.read(window=((0, 64), (0, 64)))
    folder = tmp_path / "far"
    folder.mkdir()
    for name, east, south in (("a.tif", 0.0, 0.0), ("b.tif", 1_000_000.0, 1_500_000.0)):
        transform = Affine(10.0, 0.0, t.c + east, 0.0, -10.0, t.f - south)
        with rasterio.open(
            folder / name, "w", **(profile | {"width": 64, "height": 64, "transform": transform})
        ) as dst:
            dst.write(data)
            dst.descriptions = names
    common = ["--weights", str(base_checkpoint), "--no-progress"]
    assert main(["embed", str(folder), "-o", str(tmp_path / "out"), *common]) == 2
    assert capsys.readouterr().err == (
        "torchgeo-dofa: error: the grid of far would be 6254 x 9379 cells x 768 bands "
        "(167.8 GiB uncompressed) for 2 chip(s) covering 0.00067 % of it: its rasters lie far "
        "apart. Give them as separate inputs (a grid each), narrow it with --bbox, or write "
        "--output pooled\n"
    )
    assert not (tmp_path / "out").exists()
    # predict --config: the grid writer refuses it at setup, before any chip is computed
    import yaml

    cfg = _predict_config(tmp_path / "out", base_checkpoint)
    cfg["data"]["init_args"]["paths"] = str(folder)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["predict", "--config", str(tmp_path / "cfg.yaml")]) == 2
    assert capsys.readouterr().err.endswith(
        "the grid of g.tif would be 6254 x 9379 cells x 768 bands (167.8 GiB uncompressed) for "
        "2 chip(s) covering 0.00067 % of it: its rasters lie far apart. Embed them with a data "
        "module each (a grid each), narrow it with roi=, or write pooled embeddings only "
        "(PooledWriter, model output 'pooled')\n"
    )
    assert not (tmp_path / "out").exists()
    pooled = ["--output", "pooled", "--precision", "32"]
    assert main(["embed", str(folder), "-o", str(tmp_path / "out"), *common, *pooled]) == 0
    assert len(gpd.read_parquet(tmp_path / "out" / "far_pooled.parquet")) == 2


def test_pooled_table(reference_run: Path, base_checkpoint) -> None:
    frame = gpd.read_parquet(reference_run / "ftw_s2_l2a_33N_pooled.parquet")
    assert len(frame) == 6  # 2 rows x 3 columns of 224-px chips
    assert frame.crs.to_epsg() == 32633
    assert frame.chip_id.is_unique
    assert set(frame.columns) >= {"geometry", "embedding", "variant", "weights", "time_start"}
    assert frame.geometry.iloc[0].area == pytest.approx(2240.0**2)
    assert len(frame.embedding.iloc[0]) == 768
    # valid_fraction: the share of each chip's pixels inside the raster and not no data
    # (the top row reaches past the scene's 379 rows), from rasterio's own mask
    assert frame.valid_fraction.dtype == np.float32
    with rasterio.open(SCENE) as src:
        for chip, got in zip(frame.geometry, frame.valid_fraction, strict=True):
            window = from_bounds(*chip.bounds, src.transform)
            masks = src.read_masks(window=window, boundless=True)
            assert masks.shape[1:] == (224, 224)
            assert got == pytest.approx(float((masks > 0).all(axis=0).mean()), abs=1e-6)
    # 578 x 379 px: the top row's chips hold 155 of 224 rows, the last column 130 of 224 columns
    expected = [155 / 224, 155 / 224, 155 * 130 / 224**2, 1.0, 1.0, 130 / 224]
    np.testing.assert_allclose(frame.valid_fraction, expected, rtol=1e-6)


class CrashAfterBatch(pl.Callback):
    """Raise after the first batch, or after the last one (every chip written, not assembled).

    Listed after the writers (as ``embed`` adds extra callbacks), so the batch is written.
    """

    def __init__(self, last: bool = False) -> None:
        self.last = last

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not self.last or batch_idx + 1 == trainer.num_predict_batches[dataloader_idx]:
            raise RuntimeError("simulated crash")


class SigtermAfterFirstBatch(pl.Callback):
    """Send rank 0's process a real SIGTERM after its first batch (as ``kill PID`` would)."""

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0 and trainer.global_rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("last", [False, True], ids=["after-first-batch", "before-assembly"])
def test_resume_after_crash_equals_uninterrupted(
    tmp_path, reference_run, base_checkpoint, last
) -> None:
    kwargs: dict[str, Any] = dict(
        output="both", weights=str(base_checkpoint), batch_size=4, progress=False
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        embed([SCENE], tmp_path, callbacks=[CrashAfterBatch(last)], **kwargs)
    assert not (tmp_path / "ftw_s2_l2a_33N_grid.tif").exists()  # nothing half-written
    assert not (tmp_path / "ftw_s2_l2a_33N_pooled.parquet").exists()
    assert len(list((tmp_path / "ftw_s2_l2a_33N_grid.tif.parts").glob("*.npy"))) == (
        6 if last else 4
    )
    if last:  # the same checkpoint under another name is the same job (by content)
        renamed = tmp_path / "copy" / "renamed.pth"
        renamed.parent.mkdir()
        shutil.copy(base_checkpoint, renamed)
        kwargs["weights"] = str(renamed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = embed([SCENE], tmp_path, **kwargs)
    # every chip written: Lightning skips the loop and its warning about it is not shown
    assert (summary.skipped, summary.chips) == ((6, 0) if last else (4, 2))
    assert not [w for w in caught if "Total length" in str(w.message)], caught
    with (
        rasterio.open(tmp_path / "ftw_s2_l2a_33N_grid.tif") as a,
        rasterio.open(reference_run / "ftw_s2_l2a_33N_grid.tif") as b,
    ):
        np.testing.assert_array_equal(a.read(), b.read())
    got = gpd.read_parquet(tmp_path / "ftw_s2_l2a_33N_pooled.parquet")
    ref = gpd.read_parquet(reference_run / "ftw_s2_l2a_33N_pooled.parquet")
    assert list(got.chip_id) == list(ref.chip_id)
    np.testing.assert_array_equal(np.stack(got.embedding), np.stack(ref.embedding))
    # a third run finds everything done
    assert embed([SCENE], tmp_path, **kwargs).chips == 0


def test_ddp_two_cpu_processes_write_every_chip_once(
    tmp_path, reference_run, base_checkpoint
) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable, "-m", "torchgeo_dofa", "embed", str(SCENE), "-o", str(tmp_path),
        "--weights", str(base_checkpoint), "--output", "both", "--batch-size", "2",
        "--strategy", "ddp", "--devices", "2", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    frame = gpd.read_parquet(tmp_path / "ftw_s2_l2a_33N_pooled.parquet")
    ref = gpd.read_parquet(reference_run / "ftw_s2_l2a_33N_pooled.parquet")
    assert sorted(frame.chip_id) == sorted(ref.chip_id)  # no loss, no duplicates
    np.testing.assert_allclose(np.stack(frame.embedding), np.stack(ref.embedding), atol=1e-4)
    with (
        rasterio.open(tmp_path / "ftw_s2_l2a_33N_grid.tif") as a,
        rasterio.open(reference_run / "ftw_s2_l2a_33N_grid.tif") as b,
    ):
        np.testing.assert_allclose(a.read(), b.read(), atol=1e-4)
    assert not list(tmp_path.glob("*.parts"))
    # the summary counts every process's chips; DDP's set-up lines are not shown
    assert "embedded 6 chips" in proc.stdout, proc.stdout
    assert "Initializing distributed" not in proc.stderr, proc.stderr
    assert "distributed_backend" not in proc.stderr, proc.stderr


def test_sigterm_to_a_ddp_config_run_stops_every_process(tmp_path, base_checkpoint) -> None:
    """``kill PID`` of the launching process stops the DDP workers too (Lightning forwards
    SIGTERM to them; the job's stop-after-the-batch handler used to swallow it, and rank 1
    embedded its whole share, then died at the barrier with a traceback)."""
    import yaml

    cfg = _predict_config(tmp_path, base_checkpoint)
    cfg["data"]["init_args"]["batch_size"] = 1
    cfg["trainer"] |= {"strategy": "ddp", "devices": 2, "accelerator": "cpu"}
    cfg["trainer"]["callbacks"].append({"class_path": f"{__name__}.SigtermAfterFirstBatch"})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [
        sys.executable,
        "-m",
        "torchgeo_dofa",
        "predict",
        "--config",
        str(tmp_path / "cfg.yaml"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("torchgeo-dofa: error")]
    assert errors == [
        "torchgeo-dofa: error: stopped by SIGTERM: the chips written so far are kept; rerun "
        "the same command to resume"
    ]  # once for the job, not once per process
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "g.tif").exists() and (tmp_path / "g.tif.parts").is_dir()


def _write_scene_variant(path: Path, data: np.ndarray, **profile: Any) -> Path:
    """Write ``data`` as a GeoTIFF with the demo scene's profile (``profile`` overriding it)
    and band descriptions."""
    with rasterio.open(SCENE) as src:
        base, names = src.profile, src.descriptions
    with rasterio.open(path, "w", **(base | profile)) as dst:
        dst.write(data)
        dst.descriptions = names
    return path


def _ddp_embed_command(
    scene: Path, out: Path, checkpoint: Path, output: str, devices: int
) -> list[str]:
    """``torchgeo-dofa embed`` with DDP on CPU processes, one chip per batch, no workers."""
    return [
        sys.executable, "-m", "torchgeo_dofa", "embed", str(scene), "-o", str(out),
        "--weights", str(checkpoint), "--output", output, "--strategy", "ddp",
        "--devices", str(devices), "--device", "cpu", "--num-workers", "0",
        "--batch-size", "1", "--precision", "32", "--no-progress",
    ]  # fmt: skip


def _state_and_parent(pid: int) -> tuple[str, int] | None:
    """A process's state letter and parent pid from /proc; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    found = _state_and_parent(pid)
    return found is not None and found[0] != "Z"


def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        info = _state_and_parent(int(entry.name)) if entry.name.isdigit() else None
        if info is not None and info[0] != "Z" and info[1] == pid:
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG, /proc")
def test_kill_9_of_a_ddp_launcher_ends_its_workers_at_once(tmp_path, base_checkpoint) -> None:
    """``kill -9`` of the process that launched a DDP job ends its workers with it (a worker
    used to embed and write parts on for ~10 s, until a collective call timed out, into a
    folder whose lock had died with the launcher)."""
    with rasterio.open(SCENE) as src:
        data = src.read()
    tiled = np.concatenate([data, data[:, :, ::-1], data], axis=2)  # 18 chips
    scene = _write_scene_variant(tmp_path / "wide.tif", tiled, width=tiled.shape[2])
    out = tmp_path / "out"
    cmd = _ddp_embed_command(scene, out, base_checkpoint, "grid", devices=2)
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = out / "wide_grid.tif.parts"
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and launcher.poll() is None:
            workers = workers or _children(launcher.pid)
            if workers and len(list(parts.glob("*.npy"))) >= 2:  # both ranks are embedding
                break
            time.sleep(0.05)
        assert workers and launcher.poll() is None, "the job ended before it was killed"
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 5
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(w) for w in workers), "a DDP worker outlived its launcher"
        written = sorted(p.name for p in parts.glob("*.npy"))
        time.sleep(1.0)
        assert sorted(p.name for p in parts.glob("*.npy")) == written  # nobody writes on
        assert not (out / "wide_grid.tif").exists()
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for w in filter(_alive, workers):
            with contextlib.suppress(OSError):
                os.kill(w, signal.SIGKILL)


def _ranks_report(ranks: list[tuple[int, str, str]]) -> str:
    """Each rank's exit status and the last lines of its stderr that are not C++ frames."""
    lines = []
    for rank, (status, _, err) in enumerate(ranks):
        said = [line for line in err.splitlines() if line.strip() and "frame #" not in line]
        lines.append(f"rank {rank}: exit {status}: " + " | ".join(said[-3:]))
    return "\n".join(lines)


#: What a DDP rank's PyTorch prints as its store client first tries to reach rank 0's store,
#: with C++ debug logging on (:data:`_RENDEZVOUS_LOGGING`): the rank is at the rendezvous,
#: past everything the job does before its trainer starts.
_AT_THE_RENDEZVOUS = "The client socket will attempt to connect to an IPv"
_RENDEZVOUS_LOGGING = {"TORCH_CPP_LOG_LEVEL": "INFO", "TORCH_DISTRIBUTED_DEBUG": "INFO"}


def _srun(
    cmd: list[str], ntasks: int, timeout: float = 300, rank_0_last: bool = False
) -> list[tuple[int, str, str]]:
    """Run ``cmd`` as SLURM's ``srun --ntasks-per-node=N`` runs it on one node: N processes
    started at once, each told its rank in SLURM's variables (no srun here; Lightning's
    SLURMEnvironment reads these); as ``srun --kill-on-bad-exit=1`` does, a rank that fails
    ends the others (they would wait for it). Each rank's (exit status, stdout, stderr).
    ``rank_0_last``: rank 0 starts last, once every other rank has reached the rendezvous
    (its store client says so: PyTorch's debug logging is on in those ranks) or exited, as
    srun's tasks may start in any order."""
    import tempfile

    port = rendezvous_port()
    with contextlib.ExitStack() as stack:
        procs: list[subprocess.Popen[str]] = []
        logs: list[tuple[Any, Any]] = []
        for rank in [*range(1, ntasks), 0] if rank_0_last else range(ntasks):
            if rank == 0 and rank_0_last:
                _wait_at_the_rendezvous(procs, [err for _, err in logs], timeout)
            env = os.environ | {
                "SLURM_NTASKS": str(ntasks), "SLURM_NTASKS_PER_NODE": str(ntasks),
                "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": str(rank),
                "SLURM_LOCALID": str(rank), "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "embed",
                "SLURM_NODELIST": "127.0.0.1", "MASTER_PORT": str(port),
            }  # fmt: skip
            if rank_0_last and rank != 0:
                env |= _RENDEZVOUS_LOGGING
            out, err = (stack.enter_context(tempfile.TemporaryFile("w+")) for _ in range(2))
            procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True))
            logs.append((out, err))
        if rank_0_last:  # back in rank order
            procs, logs = [procs[-1], *procs[:-1]], [logs[-1], *logs[:-1]]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(proc.poll() is None for proc in procs):
            if any(proc.poll() not in (None, 0) for proc in procs):
                break
            time.sleep(0.2)
        for proc in procs:
            proc.kill()
        results = []
        for proc, (out, err) in zip(procs, logs, strict=True):
            status = proc.wait()
            out.seek(0), err.seek(0)
            results.append((status, out.read(), err.read()))
    return results


def _wait_at_the_rendezvous(
    procs: list[subprocess.Popen[str]], errs: list[Any], timeout: float
) -> None:
    """Wait until each of ``procs`` has exited or printed :data:`_AT_THE_RENDEZVOUS` to its
    stderr file (read where the process writes: ``pread`` leaves the shared offset alone)."""
    deadline = time.monotonic() + timeout
    waiting = list(zip(procs, errs, strict=True))
    while waiting:
        waiting = [
            (proc, err)
            for proc, err in waiting
            if proc.poll() is None
            and _AT_THE_RENDEZVOUS.encode() not in os.pread(err.fileno(), 2**24, 0)
        ]
        if waiting and time.monotonic() > deadline:
            for proc, _ in waiting:
                proc.kill()
            said = [os.pread(err.fileno(), 2**24, 0).decode()[-3000:] for _, err in waiting]
            pytest.fail(f"a rank never reached the rendezvous: {said}")
        time.sleep(0.2)


def _first_two_chips() -> tuple[np.ndarray, Affine]:
    """The bundled scene's first 448 x 224 px (two chips side by side) and their transform."""
    with rasterio.open(SCENE) as src:
        return src.read(window=Window(0, 0, 448, 224)), src.window_transform(Window(0, 0, 448, 224))


@pytest.mark.skipif(
    usable_memory() < 10 * 2**30,
    reason="three DDP processes with DOFA base need ~5 GB beside the test process",
)
def test_ddp_with_fewer_chips_than_processes(tmp_path, base_checkpoint) -> None:
    """Two chips (the first without data), three processes: a chip is repeated so that every
    process has one; each chip is written once and counted once in the summary. The three
    are started as SLURM's srun starts a job's ranks (each on its own, at once): only rank 0
    takes the output folder's lock and writes the manifest (every rank took them before, so
    rank 1 was refused as "in use by another job" and rank 0 waited for it)."""
    data, transform = _first_two_chips()
    data = np.clip(data // 40, 1, 255).astype(np.uint8)  # 8-bit: a warning every rank sees
    data[:, :, :224] = 0  # the left chip holds no valid pixel
    scene = _write_scene_variant(
        tmp_path / "two.tif", data, width=448, height=224, transform=transform, dtype="uint8"
    )
    out = tmp_path / "out"
    cmd = _ddp_embed_command(scene, out, base_checkpoint, "both", devices=3)
    ranks = _srun(cmd, ntasks=3)
    assert [status for status, _, _ in ranks] == [0, 0, 0], _ranks_report(ranks)
    (_, stdout, stderr), *others = ranks
    assert "embedded 2 chips, 1 without valid pixels in " in stdout, stdout
    assert "1 chip(s) held no valid pixel" in stderr, stderr
    assert not any("embedded" in out for _, out, _ in others)  # one summary per job
    # the inputs' warnings once per job (each rank checked the inputs and warned before)
    assert stderr.count("torchgeo-dofa: warning: two.tif has dtype uint8") == 1, stderr
    assert not any("warning" in err.lower() for _, _, err in others), others
    frame = gpd.read_parquet(out / "two_pooled.parquet")
    assert sorted(frame.no_data) == [False, True]
    with rasterio.open(out / "two_grid.tif") as grid:
        cells = np.isfinite(grid.read(1))
    assert cells.shape == (14, 28) and cells[:, 14:].all() and not cells[:, :14].any()
    assert not list(out.glob("*.parts"))


@pytest.mark.skipif(
    usable_memory() < 8 * 2**30,
    reason="two DDP processes with DOFA base need ~4 GB beside the test process",
)
def test_srun_ranks_overwrite_a_finished_job_whichever_starts_first(
    tmp_path, base_checkpoint
) -> None:
    """``--overwrite`` on a finished folder under srun, rank 1 started first: it saw the old
    outputs, skipped its trainer and exited 0, while rank 0 deleted them and waited for it
    for the 30-min process-group timeout. Every rank now runs the overwriting job."""
    data, transform = _first_two_chips()
    scene = _write_scene_variant(
        tmp_path / "two.tif", data, width=448, height=224, transform=transform
    )
    out = tmp_path / "out"
    first = ["embed", str(scene), "-o", str(out), "--weights", str(base_checkpoint)]
    assert main([*first, "--output", "pooled", "--device", "cpu", "--no-progress"]) == 0
    before = (out / "two_pooled.parquet").stat().st_mtime_ns
    cmd = [*_ddp_embed_command(scene, out, base_checkpoint, "pooled", devices=2), "--overwrite"]
    ranks = _srun(cmd, ntasks=2, timeout=240, rank_0_last=True)
    assert [status for status, _, _ in ranks] == [0, 0], _ranks_report(ranks)
    assert "embedded 2 chips in " in ranks[0][1], ranks[0][1]
    assert (out / "two_pooled.parquet").stat().st_mtime_ns != before
    assert len(gpd.read_parquet(out / "two_pooled.parquet")) == 2


def _rendezvous_port_error(port: int) -> str:
    return (
        "torchgeo-dofa: error: the DDP job's processes could not connect: rank 0 cannot "
        f"listen on the rendezvous port {port}, which another process on this machine holds "
        "(another DDP job?); set MASTER_PORT to a free port (or end the other job) and rerun "
        "the same command"
    )


@pytest.fixture
def ddp_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """``monkeypatch`` with Lightning's DDP variables unset, each put back after the test
    (``setenv`` first records a variable the test's DDP sets that was absent before)."""
    for name in DDP_ENV:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize("libuv", ["1", "0"])
def test_a_ddp_rendezvous_port_in_use_is_one_line_and_leaves_nothing(
    tmp_path, ddp_env, capsys, base_checkpoint, libuv
) -> None:
    """Another process holding the rendezvous port (``MASTER_PORT``: two DDP jobs on one node,
    or a port picked free, released, and taken meanwhile) ended rank 0 in PyTorch's
    ``DistNetworkError`` with its C++ stack trace, exit 1. Both commands now name the port and
    the fix in one line (still exit 1: a fault, not bad input), and a new job leaves nothing
    in its output folder. DDP of one CPU process, in this process; with PyTorch's libuv
    TCPStore (its default) and the older one (``USE_LIBUV=0``, the default on Windows), whose
    message differs ("Address already in use" and no port)."""
    import socket

    import yaml

    monkeypatch = ddp_env
    monkeypatch.setenv("USE_LIBUV", libuv)

    cfg = _predict_config(tmp_path / "config", base_checkpoint)
    cfg["trainer"] |= {"strategy": "ddp", "devices": 1, "accelerator": "cpu"}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "embed"
    embed = [
        "embed", str(SCENE), "-o", str(out), "--weights", str(base_checkpoint),
        "--strategy", "ddp", "--devices", "1", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port))
        predict = ["predict", "--config", str(tmp_path / "cfg.yaml")]
        for args, written in [(embed, out), (predict, tmp_path / "config")]:
            assert main(args) == 1
            err = capsys.readouterr().err
            assert err.splitlines()[-1] == _rendezvous_port_error(port), err[-3000:]
            assert "Traceback" not in err and "frame #" not in err, err[-3000:]
            assert not written.exists() or not list(written.iterdir()), list(written.iterdir())


@pytest.mark.parametrize(
    ("port", "strategy", "devices", "said"),
    [
        ("abc", "ddp", "2", "MASTER_PORT='abc' is not a TCP port (an integer from 1 to 65535)"),
        ("70000", "ddp", "1", "MASTER_PORT='70000' is not a TCP port (an integer from 1 to 65535)"),
        ("-5", "ddp_find_unused_parameters_true", "2", "MASTER_PORT='-5' is not a TCP port"),
        ("0", "ddp", "2", "MASTER_PORT=0 (any free port) cannot bring a job's processes together"),
        # Lightning's "auto" strategy is DDP for several devices; FSDP / DeepSpeed read it too
        ("abc", "auto", "2", "MASTER_PORT='abc' is not a TCP port (an integer from 1 to 65535)"),
        ("0", "auto", "0,1", "MASTER_PORT=0 (any free port) cannot bring a job's processes"),
        ("abc", "fsdp", "1", "MASTER_PORT='abc' is not a TCP port (an integer from 1 to 65535)"),
        ("abc", "deepspeed_stage_2", "2", "MASTER_PORT='abc' is not a TCP port (an integer"),
    ],
)
def test_a_master_port_a_ddp_job_cannot_use_is_named_before_anything_runs(
    tmp_path, monkeypatch, capsys, port, strategy, devices, said
) -> None:
    """Lightning's ``int('abc')`` / PyTorch's "port must have value from 0 to 65535" did not
    name the variable, and ``0`` with two processes waited 30 min (rank 0 listened where the
    other could not find it): refused first, nothing written. ``--devices 2`` without a
    ``--strategy`` (Lightning's DDP) was not checked at first, nor FSDP / DeepSpeed."""
    monkeypatch.setenv("MASTER_PORT", port)
    out = tmp_path / "out"
    args = ["embed", str(SCENE), "-o", str(out), "--strategy", strategy, "--devices", devices]
    device = "gpu" if "," in devices else "cpu"  # GPU indices: refused before any GPU is used
    assert main([*args, "--device", device, "--weights", "none", "--no-progress"]) == 2
    fix = "set it to a free port, or unset it to let Lightning choose one"
    err = capsys.readouterr().err
    assert err.startswith(f"torchgeo-dofa: error: {said}") and err.endswith(f"{fix}\n"), err
    assert not out.exists()


@pytest.mark.parametrize(
    ("addr", "said"),
    [
        # PyTorch retried the name for 30 min, a warning every few seconds
        ("nonexistent.invalid", "MASTER_ADDR='nonexistent.invalid' does not resolve to an"),
        # TEST-NET-1 (RFC 5737), never an address of this machine: rank 0 waited 30 min
        ("192.0.2.1", "MASTER_ADDR='192.0.2.1' is not an address of this machine"),
        (" ", "MASTER_ADDR is empty"),
    ],
)
def test_a_master_addr_the_processes_cannot_meet_at_is_named_before_anything_runs(
    tmp_path, ddp_env, capsys, base_checkpoint, addr, said
) -> None:
    """Both hung with ``--devices 2`` after writing the manifest and the lock file (kill -9
    left them): now one line naming ``MASTER_ADDR`` and the fix, exit 2, nothing written, in
    ``embed`` and in ``predict --config`` (whose trainer is checked once built)."""
    import yaml

    ddp_env.setenv("MASTER_ADDR", addr)
    out = tmp_path / "out"
    embed = ["embed", str(SCENE), "-o", str(out), "--devices", "2", "--device", "cpu"]
    cfg = _predict_config(tmp_path / "config", base_checkpoint)
    cfg["trainer"] |= {"strategy": "ddp", "devices": 2, "accelerator": "cpu"}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    predict = ["predict", "--config", str(tmp_path / "cfg.yaml")]
    for args in ([*embed, "--weights", "none", "--no-progress"], predict):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith(f"torchgeo-dofa: error: {said}"), err[-3000:]
        assert err.rstrip().endswith("or unset it") and "Traceback" not in err, err[-3000:]
    assert not out.exists() and not (tmp_path / "config").exists()


def test_strategies_embed_cannot_run_are_one_line_and_write_nothing(tmp_path, capsys) -> None:
    """``ddp_spawn`` / ``ddp_fork`` / ``ddp_notebook`` started their processes from the job's
    own, after it had taken the output folder: each refused the outputs as another job's
    (exit 1, a traceback); DeepSpeed without its package was Lightning's traceback; FSDP on a
    CPU and an unknown name were Lightning's line without the option it refused."""
    import importlib.util

    out = tmp_path / "out"
    args = ["embed", str(SCENE), "-o", str(out), "--device", "cpu", "--weights", "none"]
    for strategy in ("ddp_spawn", "ddp_fork", "ddp_notebook"):
        assert main([*args, "--strategy", strategy, "--devices", "2"]) == 2
        assert capsys.readouterr().err == (
            f"torchgeo-dofa: error: --strategy {strategy} is not supported by embed: Lightning "
            "starts its processes from the job's own after the job has taken its output "
            "folder, and each would refuse the outputs as another job's; use --strategy ddp "
            "(its processes are commands of their own)\n"
        )
        assert not out.exists()
    # Lightning's refusals of the trainer's settings: the unknown name and FSDP on the CPU
    # printed Lightning's text alone (no option named)
    refused = {
        "fsdp": "The strategy `fsdp` requires a GPU accelerator",
        "nonsense": "You selected an invalid strategy name: `strategy='nonsense'`",
    }
    if importlib.util.find_spec("deepspeed") is None:
        refused["deepspeed"] = "To use the `DeepSpeedStrategy`, you must have DeepSpeed installed"
    for strategy, text in refused.items():
        assert main([*args, "--strategy", strategy, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith(
            "torchgeo-dofa: error: Lightning refuses the job's trainer settings (device cpu, "
            f"devices 1, strategy {strategy}, precision 32-true): {text}"
        ), err[-2000:]
        assert not out.exists()
    # checked before --overwrite deletes a finished job's outputs (a typo deleted them, then
    # failed), and where every chip is done (it was accepted: no trainer was built)
    one_chip = [*args, "--bbox", "13.11", "48.28", "13.12", "48.29", "--no-progress"]
    assert main(one_chip) == 0
    made = sorted(p.name for p in out.iterdir())
    for again in (["--overwrite"], []):
        assert main([*one_chip, *again, "--strategy", "nonsense"]) == 2
        assert "invalid strategy name" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == made


def test_embed_refuses_a_node_rank_it_cannot_be(tmp_path, ddp_env, capsys) -> None:
    """embed has no --num-nodes: with NODE_RANK=1 left from a multi-node script, two processes
    waited for a node 0 that never came (no line said so), and one ran without its summary."""
    ddp_env.setenv("NODE_RANK", "1")
    out = tmp_path / "out"
    args = ["embed", str(SCENE), "-o", str(out), "--device", "cpu", "--weights", "none"]
    for devices in ("1", "2"):
        assert main([*args, "--devices", devices]) == 2
        assert capsys.readouterr().err == (
            "torchgeo-dofa: error: NODE_RANK=1, but embed runs every process on this machine "
            "(one node: it has no --num-nodes), so it would wait for a node 0 that never comes; "
            "unset NODE_RANK (for several machines, start embed's ranks with srun or torchrun)\n"
        )
        assert not out.exists()
    ddp_env.setenv("NODE_RANK", "0")
    assert _rendezvous_problem("auto", "1", "cpu") is None


def _can_listen(address: str) -> bool:
    import socket

    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True


def test_a_master_addr_is_checked_where_it_can_be_known(ddp_env) -> None:
    """The address must be one rank 0 can listen on where rank 0 runs on this machine
    (Lightning's launcher; srun's task 0); elsewhere (srun's other tasks, torchrun, whose
    store is its own) only the name's resolving is checked. This machine's own names pass;
    white space around a name (PyTorch keeps it), a link-local IPv6 address without its zone
    and a multicast address hung, and are refused."""
    import socket

    from torchgeo_dofa.locks import master_addr_problem

    assert master_addr_problem(here=True) is None  # unset: Lightning's 127.0.0.1
    for own in ("127.0.0.1", "localhost", "::1", socket.gethostname()):
        if own == "::1" and not _can_listen("::1"):
            continue  # IPv6 off here
        ddp_env.setenv("MASTER_ADDR", own)
        assert master_addr_problem(here=True) is None, own
    for padded in ("127.0.0.1 ", " localhost", "127.0.0.1\n"):
        ddp_env.setenv("MASTER_ADDR", padded)
        assert master_addr_problem(here=False) == (
            f"MASTER_ADDR={padded!r} has white space around the address, which PyTorch keeps "
            f"(the name then does not resolve): set it to {padded.strip()!r}"
        )
    fix = "set it to rank 0's host name or address (127.0.0.1 on one machine), or unset it"
    for here in (True, False):  # no process can connect to these, from any machine
        ddp_env.setenv("MASTER_ADDR", "224.0.0.1")
        assert master_addr_problem(here=here) == (
            "MASTER_ADDR='224.0.0.1' is a multicast or broadcast address, which no process can "
            f"connect to: {fix}"
        )
        ddp_env.setenv("MASTER_ADDR", "fe80::1")
        assert master_addr_problem(here=here) == (
            "MASTER_ADDR='fe80::1' is a link-local IPv6 address without its zone, which no "
            f"process can connect to: add the zone (e.g. fe80::1%eth0), or {fix}"
        )
    ddp_env.setenv("MASTER_ADDR", "192.0.2.1")
    assert master_addr_problem(here=False) is None  # rank 0 may be there
    assert "is not an address of this machine" in (master_addr_problem(here=True) or "")
    # srun: task 0 is rank 0, here; the others meet it wherever it is
    ddp_env.setenv("SLURM_NTASKS", "2")
    ddp_env.setenv("SLURM_PROCID", "0")
    assert "is not an address of this machine" in (_rendezvous_problem("ddp", "1", "cpu") or "")
    ddp_env.setenv("SLURM_PROCID", "1")
    assert _rendezvous_problem("ddp", "1", "cpu") is None
    ddp_env.setenv("MASTER_ADDR", "nonexistent.invalid")
    assert "does not resolve" in (_rendezvous_problem("ddp", "1", "cpu") or "")
    # an salloc shell (job named bash): Lightning launches the processes itself, as without
    # SLURM, so one process reads nothing, and srun's task number is no rank
    ddp_env.setenv("SLURM_JOB_NAME", "bash")
    ddp_env.setenv("SLURM_NTASKS", "4")
    ddp_env.setenv("MASTER_ADDR", "192.0.2.1")
    assert _rendezvous_problem("auto", "1", "cpu") is None
    assert "not an address of this machine" in (_rendezvous_problem("auto", "2", "cpu") or "")
    ddp_env.delenv("SLURM_JOB_NAME")
    ddp_env.setenv("MASTER_ADDR", "nonexistent.invalid")
    # srun's single task without a distributed strategy: one process, nothing read
    ddp_env.setenv("SLURM_NTASKS", "1")
    ddp_env.setenv("SLURM_PROCID", "0")
    assert _rendezvous_problem("auto", "1", "cpu") is None
    ddp_env.delenv("SLURM_NTASKS")
    # torchrun's ranks: its agent's store, on the address torchrun set
    ddp_env.setenv("TORCHELASTIC_RUN_ID", "none")
    ddp_env.setenv("WORLD_SIZE", "2")
    ddp_env.setenv("MASTER_ADDR", "192.0.2.1")
    assert _rendezvous_problem("auto", "1", "cpu") is None
    ddp_env.setenv("WORLD_SIZE", "1")
    ddp_env.setenv("MASTER_PORT", "abc")
    assert _rendezvous_problem("auto", "1", "cpu") is None  # one rank: not read


def test_a_master_port_is_checked_only_where_the_job_reads_it(monkeypatch) -> None:
    """One process without a distributed strategy never reads ``MASTER_PORT``: a value there
    refuses nothing. Where the process count needs PyTorch (``--devices auto`` on a GPU),
    ``embed`` checks once it has counted the GPUs (the last case, here one CPU process)."""
    fix = "set it to a free port, or unset it to let Lightning choose one"
    monkeypatch.setenv("MASTER_PORT", "0")
    assert _rendezvous_problem("auto", "1", "cpu") is None
    assert _rendezvous_problem("auto", "auto", "cpu") is None  # one CPU process
    assert _rendezvous_problem("auto", "-1", "cuda") is None  # every GPU: counted later
    assert _rendezvous_problem("ddp", "1", "cpu") is None  # 0 is a free port for one process
    assert (_rendezvous_problem("auto", "2", "cpu") or "").endswith(fix)
    assert (_rendezvous_problem("ddp", "auto", "cuda") or "").endswith(fix)  # taken as several
    monkeypatch.setenv("MASTER_PORT", "x")
    assert _rendezvous_problem("auto", "auto", "auto") is None
    assert (_rendezvous_problem("ddp", "1", "cpu") or "").endswith(fix)
    monkeypatch.setenv("MASTER_PORT", "\u00b2")  # a digit to str.isdigit, not to int(): crashed
    assert (_rendezvous_problem("ddp", "1", "cpu") or "").startswith("MASTER_PORT='²' is not a")
    for port in ("+29517", " 29517\n", "\uff12\uff19\uff15\uff11\uff17"):  # as int() reads
        monkeypatch.setenv("MASTER_PORT", port)
        assert _rendezvous_problem("ddp", "2", "cpu") is None, port
    monkeypatch.setenv("MASTER_PORT", "0")
    assert _rendezvous_problem("ddp", "0,1", "cpu") is None  # GPU indices on the CPU: embed's
    monkeypatch.setenv("MASTER_PORT", "0")
    with pytest.raises(ValueError, match="MASTER_PORT=0 .* cannot bring"):  # Python's embed
        embed([SCENE], "unused", device="cpu", devices=2, weights=None)


def test_predict_config_names_a_master_port_that_is_no_port(
    tmp_path, ddp_env, capsys, base_checkpoint
) -> None:
    """``predict --config`` with DDP and ``MASTER_PORT=abc`` ended in Lightning's
    ``ValueError: invalid literal for int()`` traceback; now one line naming MASTER_PORT."""
    import yaml

    cfg = _predict_config(tmp_path, base_checkpoint)
    cfg["trainer"] |= {"strategy": "ddp", "devices": 1, "accelerator": "cpu"}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    fix = "set it to a free port, or unset it to let Lightning choose one"
    for port, devices, said in [
        ("abc", 1, "MASTER_PORT='abc' is not a TCP port (an integer from 1 to 65535)"),
        # waited 30 min before: rank 1 could not find rank 0's port
        ("0", 2, "MASTER_PORT=0 (any free port) cannot bring a job's processes together: "
         "rank 0 would listen on a port the others cannot know"),
    ]:  # fmt: skip
        cfg["trainer"]["devices"] = devices
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        ddp_env.setenv("MASTER_PORT", port)
        assert main(["predict", "--config", str(tmp_path / "cfg.yaml")]) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1] == f"torchgeo-dofa: error: {said}; {fix}".replace(
            "65535); ", "65535): "
        ), err[-3000:]
        assert "Traceback" not in err
        assert not (tmp_path / "g.tif").exists() and not (tmp_path / "p.parquet").exists()


def test_predict_config_hints_name_the_config_overrides(tmp_path, capsys, base_checkpoint) -> None:
    """A ``predict --config`` error's hint said ``file_bands=[B1, ...]`` / ``weights=PATH``,
    Python's names: it names the config's overrides, as ``embed``'s names its options."""
    import yaml

    bare = tmp_path / "bare.tif"
    with rasterio.open(SCENE) as src:
        profile, data = src.profile, src.read()
    with rasterio.open(bare, "w", **profile) as dst:  # no band descriptions
        dst.write(data)
    cfg = _predict_config(tmp_path, base_checkpoint)
    cfg["data"]["init_args"]["paths"] = str(bare)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["predict", "--config", str(tmp_path / "cfg.yaml")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"torchgeo-dofa: error: {bare} has 4 bands and no band descriptions, so its band names "
        "are unknown: name all 4 bands in file order with --data.init_args.file_bands "
        "'[B1, B2, B3, ...]' (a second date of a band as B4_1, a third as B4_2, as Earth Engine "
        "does) and select the ones to embed with --data.init_args.bands '[...]'"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.tif", "cfg.yaml"]
    said = "pass weights=PATH; or file_bands=[B1, B2] and "
    said += "time=('2021-01-01', '2021-01-01 23:59:59')"
    assert config_hints(said, data=True) == (
        "pass --model.init_args.weights PATH; or --data.init_args.file_bands '[B1, B2]' and "
        "--data.init_args.time 2021-01-01/2021-01-01"
    )
    assert config_hints(said, data=False) == (  # a fit's data module is the user's own
        "pass --model.init_args.weights PATH; or file_bands=[B1, B2] and "
        "time=('2021-01-01', '2021-01-01 23:59:59')"
    )
    repr_list = "file_bands=['B2'] name ...: leave out file_bands= (bands= selects)"
    assert config_hints(repr_list, data=True) == (  # it said '['B2']' and "bands  (selects"
        "--data.init_args.file_bands '[B2]' name ...: leave out --data.init_args.file_bands "
        "(--data.init_args.bands selects)"
    )
    example = "use DOFAPreprocess(bands=[B4]) or weights=PATH"  # Python code stays Python
    assert config_hints(example, data=True) == (
        "use DOFAPreprocess(bands=[B4]) or --model.init_args.weights PATH"
    )


def test_predict_config_names_trainer_settings_lightning_refuses(
    tmp_path, capsys, base_checkpoint
) -> None:
    """``devices: -1`` on the CPU was Lightning's ``TypeError`` traceback (exit 1), an unknown
    strategy Lightning's ``ValueError`` one: one line naming the trainer settings, exit 2."""
    import yaml

    cfg = _predict_config(tmp_path, base_checkpoint)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"devices": -1}, "`devices` selected with `CPUAccelerator` should be an int > 0."),
        ({"strategy": "nonsense"}, "You selected an invalid strategy name"),
    ]
    for settings, text in cases:
        cfg["trainer"] |= {"accelerator": "cpu", "devices": 1, "strategy": "auto"} | settings
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["predict", "--config", str(tmp_path / "cfg.yaml")]) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith(
            "torchgeo-dofa: error: the trainer settings (trainer: in the config, --trainer.* "
            f"options): {text}"
        ), err[-3000:]
        assert "Traceback" not in err
        assert not (tmp_path / "g.tif").exists() and not (tmp_path / "p.parquet").exists()
    # a GPU on a machine without one: Lightning says "No supported gpu backend found!" (gpu) or
    # "`CUDAAccelerator` can not run on your system ..." (cuda), without the setting or the fix
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        for name in ("gpu", "cuda", "mps"):
            cfg["trainer"] |= {"accelerator": name, "devices": 1, "strategy": "auto"}
            (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
            assert main(["predict", "--config", str(tmp_path / "cfg.yaml")]) == 2
            err = capsys.readouterr().err
            assert err.splitlines()[-1] == (
                "torchgeo-dofa: error: the trainer settings (trainer: in the config, "
                f"--trainer.* options): --trainer.accelerator {name} asked for a GPU, but "
                f"PyTorch sees none on this machine (torch {torch.__version__}, CUDA build: "
                f"{torch.version.cuda or 'no'}): use --trainer.accelerator cpu or "
                "--trainer.accelerator auto"
            ), err[-3000:]
            assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]
        cfg["trainer"]["accelerator"] = "cpu"
    # a "true" half precision cast the chips' coordinates with the batch (359130 -> 358400):
    # a misleading stride error or "chips have no part", parts and lock left behind
    cfg["trainer"] |= {"devices": 1, "strategy": "auto", "precision": "bf16-true"}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["predict", "--config", str(tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "torchgeo-dofa: error: precision 'bf16-true' (HalfPrecision) casts every floating-point "
        "tensor of the batch to bfloat16, the chips' coordinates too (easting, northing "
        "359130.123456789, 5341184.98765432 become 358400, 5341184): the outputs could not be "
        "placed exactly; use a precision that keeps the batch's values (bf16-mixed: the model "
        "computes in bf16; 32-true; 64-true), without FSDP or DeepSpeed, whose precision "
        "plugins cast the batch"
    ), err[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]
    # a fraction of no batch: Lightning's MisconfigurationException as the run starts was a
    # traceback, exit 1
    cfg["trainer"] |= {"precision": "32-true", "limit_predict_batches": 0.001}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["predict", "--config", str(tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith(
        "torchgeo-dofa: error: You requested to check 0.001 of the `predict_dataloader`"
    ), err[-3000:]
    assert not [p for p in tmp_path.iterdir() if p.suffix in (".tif", ".parquet", ".parts")]
    cfg["trainer"] |= {"limit_predict_batches": 0}  # was exit 0
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["predict", "--config", str(tmp_path / "cfg.yaml")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "torchgeo-dofa: error: predict would write nothing: trainer.limit_predict_batches is "
        "0 (no batch); remove it (from the config, or --trainer.limit_predict_batches), or "
        "give a number of batches or a fraction > 0"
    )
    # a cast that keeps the coordinates is no problem (64-true was refused by the first fix)
    for precision in ("64-true", "32-true", "bf16-mixed"):
        trainer = pl.Trainer(accelerator="cpu", precision=precision, logger=False)
        assert precision_coordinates_problem(trainer) is None
    # FSDP's plugins cast the batch to float32, which moves float64 coordinates (a probe of
    # whole metres passed it); the trainer stands in: FSDP needs a GPU
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import FSDPPrecision

    fsdp = SimpleNamespace(precision="32-true", precision_plugin=FSDPPrecision("32-true"))
    said = precision_coordinates_problem(fsdp)  # type: ignore[arg-type]
    assert said is not None and said.startswith(
        "precision '32-true' (FSDPPrecision) casts every floating-point tensor of the batch to "
        "float32, the chips' coordinates too (easting, northing 359130.123456789, "
        "5341184.98765432 become 359130.125, 5341185)"
    ), said


def test_only_lightnings_own_refusals_are_named_trainer_settings() -> None:
    """A plugin of the user's whose method has another signature raised Python's TypeError
    inside Lightning's frame: it was shown as "the trainer settings", without a traceback."""
    import importlib.util

    from lightning.pytorch.plugins.environments import LightningEnvironment

    from torchgeo_dofa.cli import _trainer_settings_error

    class OtherSignature(LightningEnvironment):
        def set_world_size(self) -> None:  # type: ignore[override]
            pass

    def error_of(**settings: Any) -> BaseException:
        with pytest.raises(Exception) as caught:
            pl.Trainer(logger=False, enable_progress_bar=False, **settings)
        return caught.value

    assert _trainer_settings_error(error_of(accelerator="cpu", devices=-1))
    assert _trainer_settings_error(error_of(strategy="nonsense"))
    bug = error_of(accelerator="cpu", strategy="ddp", devices=1, plugins=[OtherSignature()])
    assert isinstance(bug, TypeError) and not _trainer_settings_error(bug)
    if importlib.util.find_spec("torch_xla") is None:  # a package missing: named, one line
        assert _trainer_settings_error(error_of(strategy="xla"))
    # a registered strategy that its name alone cannot build (needs a device): a setting
    unbuilt = error_of(strategy="single_xla")
    assert isinstance(unbuilt, TypeError) and _trainer_settings_error(unbuilt)


def _processes_naming(text: str) -> list[int]:
    """The pids of the running processes whose command line holds ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _alive(int(entry.name)):
            with contextlib.suppress(OSError):
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc (Linux)")
def test_a_ddp_job_refused_at_the_rendezvous_ends_the_workers_it_started(
    tmp_path, base_checkpoint
) -> None:
    """The worker Lightning started (rank 1) was left waiting at the rendezvous for up to 30
    min after rank 0 exited, deaf to SIGTERM and Ctrl-C, and joined the next job on the port
    (that job's rank 0 then failed with gloo's "Connection reset by peer"). Now the launcher
    kills its workers when its job fails before the process group forms."""
    import socket
    import tempfile

    scene = tmp_path / "scene.tif"
    shutil.copy(SCENE, scene)
    out = tmp_path / "out"
    cmd = _ddp_embed_command(scene, out, base_checkpoint, "grid", devices=2)
    with socket.socket() as holder, tempfile.TemporaryFile("w+") as stderr:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        # to a file, not a pipe: a worker left running would hold a pipe open
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            status = proc.wait(timeout=300)
        finally:
            proc.kill()
            left = _processes_naming(str(out))
            for pid in left:  # not to leave them running should the test fail
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        stderr.seek(0)
        err = stderr.read()
    assert status == 1, err[-3000:]
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert errors == [_rendezvous_port_error(port)], err[-3000:]
    assert left == [], f"workers still running: {left}"
    assert not out.exists() or not list(out.iterdir()), list(out.iterdir())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bands", "B4", "B3", "B99"], "B99"),
        (["--weights", "/no/such.pth"], "does not exist"),
        (["--stride", "100"], "not a multiple of the output cell (16 px"),
        (["--chip-size", "448", "--stride", "16"], "output cell (32 px for 448-px chips"),
        (["--chip-size", "100"], "--chip-size must be a multiple of 16"),
        pytest.param(
            ["--device", "gpu"],
            "asked for a GPU, but PyTorch sees none",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here"),
        ),
        (["--bbox", "0", "0", "0.1", "0.1"], "does not overlap the rasters, which cover lon 13.1"),
        (["--file-bands", "B4", "B3", "B2"], "has 4 bands but --file-bands names 3"),
        (["--devices", "0"], "--devices must be >= 1"),
        (["--crs", "EPSG:9999999"], "unknown CRS 'EPSG:9999999' ("),
        (["--seed", "3"], "--seed applies to random weights only: add --weights none"),
        (["--output", "grid", "--points", "p.csv"], "use --output pooled"),
        (["--output", "pooled", "--points", "p.csv"], "points file 'p.csv' does not exist"),
        (["--device", "cpu", "--devices", "0,1"], "names GPUs, but the job runs on the cpu"),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, capsys, args, message) -> None:
    code = main(["embed", str(SCENE), "-o", str(tmp_path / "out"), *args, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("torchgeo-dofa: error:") and message in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize(
    ("option", "value", "problem"),
    [
        ("--variant", "huge", "invalid choice: 'huge' (choose from 'base', 'large', 'b', 'l')"),
        ("--output", "cube", "invalid choice: 'cube' (choose from 'grid', 'pooled', 'both')"),
        ("--input-prep", "crop", "invalid choice: 'crop' (choose from 'resize', 'tile')"),
        (
            "--precision",
            "fp8",
            "invalid choice: 'fp8' (choose from 'auto', '32', '32-true', 'fp32', 'bf16', "
            "'bf16-mixed')",
        ),
        (
            "--device",
            "tpu",
            "invalid choice: 'tpu' (choose from 'auto', 'cpu', 'gpu', 'cuda', 'mps')",
        ),
        ("--composite", "max", "invalid choice: 'max' (choose from 'median', 'mosaic')"),
        ("--batch-size", "0", "must be at least 1, got 0"),
        ("--num-workers", "-1", "must be at least 0, got -1"),
        ("--batch-size", "eight", "not an integer: 'eight'"),
        # beyond a machine integer: itertools' "Stop argument for islice() ..." and torch's
        # "Overflow when unpacking long long" once the job had started
        ("--batch-size", "1" + "0" * 20, "must be at most 2147483647, got 1" + "0" * 20),
        ("--seed", "1" + "0" * 20, "must be at most 9223372036854775807, got 1" + "0" * 20),
        ("--seed", "-1", "must be at least 0, got -1"),
        ("--res", "0", "'0' is not a pixel size: give a positive number"),
        # any finite number was taken: 1000 (a slipped sign) raised every pixel by 2000
        ("--offset", "1000", "1000 cannot be an offset of reflectance x 10000: a whole number "),
        ("--offset", "-0.1", "-0.1 cannot be an offset of reflectance x 10000"),
    ],
)
def test_bad_option_value_is_a_usage_error(tmp_path, capsys, option, value, problem) -> None:
    """A value outside an option's set or range is argparse's usage error (exit 2), naming
    the option and listing the set."""
    with pytest.raises(SystemExit) as exit_:
        main(["embed", str(SCENE), "-o", str(tmp_path / "out"), option, value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert f"argument {option}: {problem}" in err
    assert not (tmp_path / "out").exists()


def test_weights_that_are_no_checkpoint_and_impossible_dates_are_named(tmp_path, capsys) -> None:
    """A YAML config given as --weights said "corrupt or truncated download? ... delete it and
    download again"; /dev/null "does not exist"; --datetime 2023-13-45/... "month must be in
    1..12" without naming the option's value."""
    config = tmp_path / "p.yaml"
    config.write_text("model:\n  class_path: x\n")
    args = ["embed", str(SCENE), "-o", str(tmp_path / "out"), "--no-progress"]
    cases = {
        ("--weights", str(config)): (
            f"{config} is not a PyTorch checkpoint (it starts with 'model:', not a zip archive "
            "or a pickle: a text, config or web page saved under its name?); give the file "
            "written by torch.save / Lightning"
        ),
        ("--weights", "/dev/null"): (
            "--weights '/dev/null' is not a file (a device or pipe): give a checkpoint"
        ),
        ("--datetime", "2023-13-45/2023-01-01"): (
            "--datetime 2023-13-45/2023-01-01: bad datetime '2023-13-45' (month must be in "
            "1..12): use ISO dates, e.g. '2022-06-01/2022-08-31'"
        ),
    }
    for (option, value), said in cases.items():
        extra = [] if option == "--weights" else ["--weights", "none"]
        assert main([*args, option, value, *extra]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"torchgeo-dofa: error: {said}"
    assert not (tmp_path / "out").exists()


def test_a_new_job_failing_before_its_first_chip_leaves_nothing(tmp_path, capsys) -> None:
    """Refused by Lightning after the manifest was written (an unknown strategy), a new job
    removes its manifest, lock file and the folders it made, so the corrected command is a
    new job, not 'another job's results'."""
    out = tmp_path / "a" / "b"
    common = [str(SCENE), "-o", str(out), *_one_chip_bbox(SCENE), "--weights", "none"]
    code = main(["embed", *common, "--seed", "1", "--strategy", "foo", "--no-progress"])
    assert code != 0 and "invalid strategy name" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert main(["embed", *common, "--seed", "2", "--no-progress"]) == 0
    # a resumed job keeps its manifest and folder whatever happens; its settings are checked
    # though nothing is left to do (it exited 0: no trainer was built)
    made = sorted(p.name for p in out.iterdir())
    code = main(["embed", *common, "--seed", "2", "--strategy", "foo", "--no-progress"])
    assert code == 2 and "invalid strategy name" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == made
    assert (out / ".torchgeo-dofa-job.json").is_file()


def test_weights_path_with_a_tilde_is_read_as_the_loader_reads_it(tmp_path, monkeypatch) -> None:
    """``--weights=~/x.pth`` (no shell expansion after ``=``) is checked as expanded."""
    from torchgeo_dofa.cli import option_problem

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "x.pth").write_bytes(b"")
    assert option_problem([SCENE], weights="~/x.pth") is None
    assert option_problem([SCENE], weights="~/y.pth") == "weights file '~/y.pth' does not exist"


def test_api_takes_one_input_as_a_string(tmp_path) -> None:
    from torchgeo_dofa.datasets import InputError

    with pytest.raises(InputError, match="input 'no_such_scene.tif' does not exist$"):
        embed("no_such_scene.tif", tmp_path / "out", weights=None)  # not 'n', 'o', ...


def test_a_wildcard_is_named_with_the_fix_for_each_door(tmp_path, capsys) -> None:
    """``embed "dir/*.tif"`` (quoted: the shell left the pattern) said only "does not
    exist"; a pattern in a config file's ``paths`` was given Python's advice alone. One text
    from every door now, naming each one's way."""
    from torchgeo_dofa.datasets import InputError

    advice = (
        " does not exist (a wildcard pattern is not expanded: on the command line leave it "
        "unquoted for the shell to expand; in Python give sorted(glob.glob(pattern)), in a "
        "config file a list of the files; or give the folder)"
    )
    pattern = str(SCENE.parent / "*.tif")
    assert main(["embed", pattern, "-o", str(tmp_path / "out"), "--weights", "none"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"torchgeo-dofa: error: input {pattern!r}{advice}"
    )
    other = SCENE.parent / "ftw_s2_l2a_3?N.tif"
    with pytest.raises(InputError) as info:  # Python
        embed([other], tmp_path / "out", weights=None)
    assert str(info.value) == f"input {str(other)!r}{advice}"
    with pytest.raises(InputError) as info:  # a dataset's paths (predict --config)
        DOFAPredictDataModule(pattern).setup("predict")
    assert str(info.value) == f"input {pattern!r}{advice}"
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("make", "output", "message"),
    [
        ("scene", "p.png", "is not a grid embedding, or a damaged one (its bands are not named"),
        # GDAL's "Read failed. See previous exception for details." with no exception shown
        ("half", "p.png", "e_grid.tif is damaged: its cells cannot be read (truncated or corrupt"),
        (
            "grid",
            "p",
            "-o '{tmp}/p': give an image file name ending in .png / .jpg / .jpeg / .webp, "
            "e.g. {tmp}/p.png",
        ),
        ("grid", "p.tif", "give an image file name ending in .png"),  # not a GeoTIFF
        ("copy", "e_grid.tif", "give an image file name"),  # never the embedding itself
        ("copy", "x.png.", "give an image file name"),
        ("pooled", "p.png", "is a pooled table (one vector per chip, no map to draw)"),
    ],
)
def test_preview_refuses_what_it_cannot_draw(
    tmp_path, capsys, reference_run, make, output, message
) -> None:
    source = SCENE if make == "scene" else reference_run / "ftw_s2_l2a_33N_grid.tif"
    if make == "pooled":
        source = reference_run / "ftw_s2_l2a_33N_pooled.parquet"
    if make in ("copy", "half"):
        source = Path(shutil.copy(source, tmp_path / "e_grid.tif"))
    if make == "half":
        os.truncate(source, source.stat().st_size // 2)
    before = sorted(tmp_path.iterdir())
    assert main(["preview", str(source), "-o", str(tmp_path / output)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("torchgeo-dofa: error:") and len(err.splitlines()) == 1
    assert message.format(tmp=tmp_path) in err
    assert sorted(tmp_path.iterdir()) == before
    if make == "copy":
        with rasterio.open(source) as src:
            assert src.count == 768  # untouched


def test_cli_shows_the_packages_warnings_on_one_line(tmp_path) -> None:
    import torchgeo_dofa.cli as cli
    from torchgeo_dofa.datasets import Sentinel2SR

    inside = cli.__file__
    with cli._one_line_warnings():
        ours = warnings.formatwarning("2 chip(s) held no valid pixel", UserWarning, inside, 9)
        theirs = warnings.formatwarning("other", UserWarning, "/x/lightning/y.py", 3)
    assert ours == "torchgeo-dofa: warning: 2 chip(s) held no valid pixel\n"
    with cli._one_line_warnings():  # Python keywords become the options (as in errors)
        hint = warnings.formatwarning("name them with file_bands=[...]", UserWarning, inside, 9)
    assert hint == "torchgeo-dofa: warning: name them with --file-bands ...\n"
    assert theirs.startswith("/x/lightning/y.py:3:") and "other" in theirs  # the usual form
    assert warnings.formatwarning("m", UserWarning, inside, 9).startswith(f"{inside}:9:")
    # a real warning issued while the command runs (outside it, it names the caller's line)
    with rasterio.open(SCENE) as src:
        profile = src.profile | {"dtype": "uint8", "nodata": None}
    with rasterio.open(tmp_path / "u8.tif", "w", **profile) as dst:
        dst.write(np.ones((profile["count"], profile["height"], profile["width"]), "uint8"))
    for one_line in (True, False):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with cli._one_line_warnings() if one_line else contextlib.nullcontext():
                Sentinel2SR(tmp_path / "u8.tif", bands=["B4", "B3", "B2", "B8"], offset=0)
                [w] = caught
                shown = warnings.formatwarning(w.message, w.category, w.filename, w.lineno)
        said = "u8.tif has dtype uint8, which cannot hold raw surface reflectance"
        if one_line:
            assert shown.startswith(f"torchgeo-dofa: warning: {said}"), shown
        else:
            assert shown.startswith(f"{__file__}:") and said in shown, shown


def test_option_values_are_case_insensitive_where_the_library_is(tmp_path) -> None:
    from torchgeo_dofa.cli import _parser

    args = _parser().parse_args(
        ["embed", "x", "-o", "o", "--variant", "Large", "--precision", "BF16", "--device", "CPU"]
    )
    assert (args.variant, args.precision, args.device) == ("large", "bf16", "cpu")


def test_option_choices_are_what_the_library_accepts() -> None:
    """The parser's sets (checked before torch loads) are the library's, no more, no less."""
    from torchgeo_dofa import cli, model, runtime, stac, transforms
    from torchgeo_dofa.embedder import OUTPUT_KINDS

    assert set(cli.VARIANT_NAMES) == set(model._ALIASES)
    assert set(cli.OUTPUT_NAMES) == set(OUTPUT_KINDS)
    assert set(cli.INPUT_PREP_NAMES) == set(transforms.INPUT_PREPS)
    assert set(cli.COMPOSITE_NAMES) == set(stac.COMPOSITES)
    for name in runtime.PRECISION_NAMES:
        assert runtime.resolve_precision(name.upper()).precision == runtime.PRECISION_NAMES[name]
    for name in runtime.DEVICE_NAMES:  # known: a kind, or (a GPU asked for here) no GPU
        try:
            assert runtime.resolve_accelerator(name.upper()) in ("cpu", "cuda", "mps")
        except ValueError as err:
            assert "asked for a GPU, but PyTorch sees none" in str(err)
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        runtime.resolve_accelerator("tpu")


def test_unreadable_and_normalised_inputs(tmp_path, capsys) -> None:
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"not a tiff")
    assert main(["embed", str(bad), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"cannot read {bad}: " in err and "repair or remove it (or give the readable" in err
    with rasterio.open(SCENE) as src:
        data = src.read().astype(np.float32) / 10000
    scaled = _write_scene_variant(tmp_path / "scaled.tif", data, dtype="float32", nodata=None)
    assert main(["embed", str(scaled), "-o", str(tmp_path / "o"), "--weights", "none"]) == 2
    err = capsys.readouterr().err
    assert "raw surface reflectance 0..10000" in err
    assert err.endswith("If these are fill pixels, pass --nodata <their value>.\n")  # not nodata=
    assert not (tmp_path / "o").exists()
    # a bright outlier lets the file pass the job's check: a chip without it is refused as
    # the job reads it, by a loader worker or not; the error named neither file nor chip
    data[0, :40, :40] = 7.0  # large enough to be seen in the check's decimated read
    outlier = _write_scene_variant(tmp_path / "outlier.tif", data, dtype="float32", nodata=None)
    with rasterio.open(outlier) as src:
        (left, bottom, right, top), res = src.bounds, src.res[0]
    for workers in ("0", "1"):
        args = ["embed", str(outlier), "-o", str(tmp_path / "o"), "--weights", "none"]
        assert main([*args, "--num-workers", workers, "--no-progress"]) == 2
        err = capsys.readouterr().err.splitlines()[-1]
        found = re.fullmatch(
            r"torchgeo-dofa: error: outlier\.tif, the chip x (\S+)\.\.(\S+), y (\S+)\.\.(\S+) "
            r"\(EPSG:32633\): input looks already scaled: all valid values lie in .*",
            err,
        )
        assert found is not None, err
        x0, x1, y0, y1 = (float(v) for v in found.groups())
        assert x1 - x0 == y1 - y0 == 224 * res  # a chip of the scene ...
        assert left <= x0 and x1 <= right and bottom <= y0 and y1 <= top
        assert x0 >= left + 40 * res or y1 <= top - 40 * res  # ... without the outlier
        assert not (tmp_path / "o").exists()


def test_a_chip_of_cloud_shadow_embeds_and_a_negative_file_is_refused(
    tmp_path, base_checkpoint, capsys
) -> None:
    """A chip negative in every band (cloud shadow or dark water after baseline 04.00's -1000
    offset: the real T29UNU tile has such patches) stopped the job as 'every valid value is
    negative', and every rerun at it. A chip embeds as its values clipped to 0 (any negative
    values, the same vector); a whole file that negative (dB values) is still refused, before
    anything is written."""
    window = Window(0, 0, 64, 64)
    with rasterio.open(SCENE) as src:
        data = src.read(window=window).astype(np.float32)
        crop = {"width": 64, "height": 64, "transform": src.window_transform(window)}
    rows = {}
    for name, shadow in (
        ("random", -np.random.default_rng(0).uniform(1, 999, (4, 16, 16))),
        ("flat", np.full((4, 16, 16), -1.0)),
    ):
        scene = data.copy()
        scene[:, 16:32, 32:48] = shadow  # the chip of row 1, column 2
        path = _write_scene_variant(
            tmp_path / f"{name}.tif", scene, dtype="float32", nodata=None, **crop
        )
        out = tmp_path / name
        args = ["embed", str(path), "-o", str(out), "--weights", str(base_checkpoint)]
        assert main([*args, "--chip-size", "16", "--output", "pooled", "--no-progress"]) == 0
        table = gpd.read_parquet(out / f"{name}_pooled.parquet")
        assert len(table) == 16 and bool((table["valid_fraction"] == 1.0).all())
        t = crop["transform"]
        x0, y1 = t.c + 32 * t.a, t.f + 16 * t.e
        (hit,) = np.flatnonzero(
            table.geometry.bounds.round(3).eq([x0, y1 - 160, x0 + 160, y1]).all(axis=1)
        )
        rows[name] = np.stack(table["embedding"].to_numpy())
        assert np.isfinite(rows[name]).all()
    # the shadow chip: one input whatever its negative values (both clip to 0), and the
    # other chips of the two files alike, as their pixels are
    np.testing.assert_array_equal(rows["random"], rows["flat"])
    assert not np.allclose(rows["random"][hit], rows["random"][hit - 1])
    capsys.readouterr()
    decibels = -np.random.default_rng(1).uniform(3, 25, (4, 64, 64)).astype(np.float32)
    path = _write_scene_variant(tmp_path / "db.tif", decibels, dtype="float32", nodata=None, **crop)
    assert main(["embed", str(path), "-o", str(tmp_path / "db"), "--weights", "none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchgeo-dofa: error: db.tif: every valid value is negative (in ["), err
    # no offset was added to it: asked of dB values only (--offset 0 would change nothing)
    assert "Are these dB / log values?" in err and "--offset" not in err, err
    assert not (tmp_path / "db").exists()
    # the file check judges what the chips are: with the offset the job adds (raw 1..999
    # with --offset -1000), and the bands it reads (not a QA band beside them): it judged
    # the stored values of every band, and a chip refused the job after some were written
    dark = np.random.default_rng(2).integers(1, 1000, (4, 64, 64)).astype(np.uint16)
    path = _write_scene_variant(tmp_path / "dark.tif", dark, **crop)
    args = ["embed", str(path), "-o", str(tmp_path / "dark"), "--weights", "none"]
    assert main([*args, "--offset", "-1000", "--chip-size", "16", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchgeo-dofa: error: dark.tif: every valid value is negative"), err
    assert "applied to data already corrected (--offset 0)" in err, err
    assert not (tmp_path / "dark").exists()
    scaled = np.concatenate([data[:3] / 10000, np.full((1, 64, 64), 200.0)]).astype(np.float32)
    path = _write_scene_variant(tmp_path / "qa.tif", scaled, dtype="float32", nodata=None, **crop)
    args = ["embed", str(path), "-o", str(tmp_path / "qa"), "--weights", "none", "--chip-size"]
    files = ["--file-bands", "B4", "B3", "B2", "QA", "--bands", "B4", "B3", "B2"]
    assert main([*args, "16", *files, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchgeo-dofa: error: qa.tif: input looks already scaled"), err
    assert not (tmp_path / "qa").exists()


def test_a_bbox_job_checks_the_files_it_reads_not_a_far_one(tmp_path, capsys) -> None:
    """A --bbox over one file of a folder was refused for a file of dB values 30 km away,
    which the job never reads (and get_embedding embeds the same region)."""
    from pyproj import Transformer

    window = Window(0, 0, 64, 64)
    with rasterio.open(SCENE) as src:
        data = src.read(window=window).astype(np.float32)
        t = src.window_transform(window)
    folder = tmp_path / "far"
    folder.mkdir()
    _write_scene_variant(
        folder / "good_2023-01-01.tif", data, dtype="float32", nodata=None, width=64,
        height=64, transform=t,
    )  # fmt: skip
    decibels = -np.random.default_rng(5).uniform(3, 25, data.shape).astype(np.float32)
    _write_scene_variant(
        folder / "db_2023-01-01.tif", decibels, dtype="float32", nodata=None, width=64,
        height=64, transform=Affine(t.a, 0, t.c + 30000, 0, t.e, t.f),
    )  # fmt: skip
    to_wgs84 = Transformer.from_crs(32633, 4326, always_xy=True)
    (lon0, lon1), (lat1, lat0) = to_wgs84.transform([t.c + 100, t.c + 540], [t.f - 100, t.f - 540])
    args = ["embed", str(folder), "-o", str(tmp_path / "o"), "--weights", "none"]
    bbox = ["--bbox", *(f"{v:.6f}" for v in (lon0, lat0, lon1, lat1)), "--chip-size", "64"]
    assert main([*args, *bbox, "--output", "pooled", "--no-progress"]) == 0
    capsys.readouterr()
    assert main([*args[:3], str(tmp_path / "all"), *args[4:], "--no-progress"]) == 2
    assert "db_2023-01-01.tif: every valid value is negative" in capsys.readouterr().err


def test_each_runs_warnings_name_its_own_options() -> None:
    """A predict --config run's warnings named Python's keywords ('(offset=0)',
    'nodata=<value>') where its errors name its overrides; embed's name its options."""
    from torchgeo_dofa import _warnings, cli

    told = "a.tif: 75% ... already corrected (offset=0)? Or undeclared (nodata=<value>)?"
    source = os.path.join(_warnings.PACKAGE_DIR, "datamodules.py")
    shown = {}
    for name, run in (("embed", None), ("predict", "predict")):
        with cli._one_line_warnings(run):
            shown[name] = warnings.formatwarning(told, UserWarning, source, 1)
    assert shown == {
        "embed": "torchgeo-dofa: warning: a.tif: 75% ... already corrected (--offset 0)? Or "
        "undeclared (--nodata <value>)?\n",
        "predict": "torchgeo-dofa: warning: a.tif: 75% ... already corrected "
        "(--data.init_args.offset 0)? Or undeclared (--data.init_args.nodata <value>)?\n",
    }


def test_mixed_crs_region_is_an_error(tmp_path, capsys) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    with rasterio.open(SCENE) as src:
        data = src.read()
    for name, crs in (
        ("a-0000000000-0000000000.tif", "EPSG:32633"),
        ("a-0000000000-0000000256.tif", "EPSG:32632"),
    ):
        _write_scene_variant(folder / name, data, crs=crs)
    assert main(["embed", str(folder), "-o", str(tmp_path / "o")]) == 2
    assert "mixed CRS" in capsys.readouterr().err


def test_res_sets_the_pixel_size_of_a_folder_read_in_another_crs(tmp_path, capsys) -> None:
    """``--crs`` on a folder of files in two UTM zones read every file at the pixel size
    GDAL's warp of the first one gives (9.99 m for a 10 m file from the zone beside it: 159.85
    m cells, fractional chip ids), and ``embed`` had no ``--res`` to say 10. Then (helper-135)
    the file already in the CRS set the pixel size only with ``--res``: it sets it alone."""
    from rasterio.warp import calculate_default_transform, reproject

    folder = tmp_path / "zones"
    folder.mkdir()
    with rasterio.open(SCENE) as src:
        data, t, crs = src.read(window=Window(0, 0, 224, 224)), src.transform, src.crs
    # the first file (by name) in the zone west of the scene's, the second in the scene's own
    bounds = rasterio.transform.array_bounds(224, 224, t)
    moved, width, height = calculate_default_transform(crs, "EPSG:32632", 224, 224, *bounds)
    warped = np.zeros((data.shape[0], height, width), data.dtype)
    reproject(data, warped, src_transform=t, src_crs=crs, dst_transform=moved,
              dst_crs="EPSG:32632", resampling=Resampling.nearest)  # fmt: skip
    _write_scene_variant(folder / "a.tif", warped, crs="EPSG:32632", transform=moved,
                         width=width, height=height)  # fmt: skip
    east = Affine(t.a, t.b, t.c + 224 * t.a, t.d, t.e, t.f)
    _write_scene_variant(folder / "b.tif", data, transform=east, width=224, height=224)
    args = ["embed", str(folder), "--crs", str(crs), "--weights", "none", "--seed", "0"]
    args += ["--no-progress", "--num-workers", "0", "--output", "grid"]
    assert main([*args, "-o", str(tmp_path / "auto")]) == 0
    assert main([*args, "-o", str(tmp_path / "ten"), "--res", "10"]) == 0
    for name in ("auto", "ten"):
        with rasterio.open(tmp_path / name / "zones_grid.tif") as grid:
            assert grid.res == (160.0, 160.0) and grid.crs == crs, name  # auto: b.tif's 10 m
            # its cells lie on b.tif's pixels (read unwarped, not shifted by a fraction of a
            # pixel to the corner the warped a.tif sets)
            offsets = ((grid.transform.c - east.c) / 10, (grid.transform.f - east.f) / 10)
            assert offsets == (round(offsets[0]), round(offsets[1])), (name, offsets)
    capsys.readouterr()
    assert main([*args, "-o", str(tmp_path / "ten"), "--res", "20"]) == 2  # another job
    assert "holds another job's results" in capsys.readouterr().err
    from torchgeo_dofa.cli import _parser

    for bad in ("0", "-10", "nan", "ten", "5e-324", "1e308"):  # beyond: float overflows
        with pytest.raises(SystemExit):
            _parser().parse_args(["embed", "x.tif", "-o", "o", f"--res={bad}"])
    # sizes in the wrong units (degrees for metres, say): GEOS's bad_alloc traceback, numpy's
    # "Maximum allowed size exceeded", or "embedded 0 chips" naming files never written
    for res, said in (
        ("0.0001", "chips of 224 px, more than 1e+08: check --res (in the CRS's units"),
        ("1e-12", "chips of 224 px, more than 1e+08: check --res (in the CRS's units"),
        ("1e10", "are smaller than one pixel at a pixel size of 1e+10 x 1e+10 (EPSG:32633"),
    ):
        out = tmp_path / f"res{res}"
        assert main([*args, "-o", str(out), "--res", res, "--crs", str(crs)]) == 2
        assert said in capsys.readouterr().err, res
        assert not out.exists()


def test_files_with_and_without_a_vertical_datum_are_one_map(tmp_path, base_checkpoint) -> None:
    """A folder of one file in EPSG:32633+5773 (UTM 33N + EGM96 height) and one in EPSG:32633
    was refused as mixed CRS: the map is the same. Each file's chips embed as alone."""
    from rasterio.crs import CRS as RioCRS

    folder = tmp_path / "scenes"
    folder.mkdir()
    with rasterio.open(SCENE) as src:  # two chips a file: the region's chips are the files'
        data, t = src.read(window=Window(0, 0, 448, 224)), src.transform
    size = {"width": 448, "height": 224}
    beside = Affine(t.a, t.b, t.c + 448 * t.a, t.d, t.e, t.f)  # the next scene east
    compound = RioCRS.from_user_input("EPSG:32633+5773")
    # the compound file first: the region was read in its CRS (the outputs' CRS followed the
    # files' order; helper-91)
    _write_scene_variant(folder / "a.tif", data, crs=compound, **size)
    _write_scene_variant(folder / "b.tif", data[::-1], crs="EPSG:32633", transform=beside, **size)
    common = ["--weights", str(base_checkpoint), "--precision", "32", "--no-progress"]
    common += ["--output", "grid", "--num-workers", "0"]
    assert main(["embed", str(folder), "-o", str(tmp_path / "both"), *common]) == 0
    assert main(["embed", str(folder / "b.tif"), "-o", str(tmp_path / "b"), *common]) == 0
    with (
        rasterio.open(tmp_path / "both/scenes_grid.tif") as both,
        rasterio.open(tmp_path / "b/b_grid.tif") as alone,
    ):
        assert both.crs.to_epsg() == 32633  # the horizontal CRS, not the first file's
        window = from_bounds(*alone.bounds, transform=both.transform)
        np.testing.assert_allclose(
            both.read(window=window.round_offsets().round_lengths()),
            alone.read(),
            rtol=0,
            atol=1e-5,
        )


def test_a_folder_region_is_named_in_warnings_as_its_outputs_are(tmp_path) -> None:
    """The small-region warning named a folder of files by its files' stems joined with +
    (``a+b``, every date of a time series too), while the outputs were ``scenes_*``."""
    folder = tmp_path / "scenes"
    folder.mkdir()
    with rasterio.open(SCENE) as src:
        data, t = src.read(window=Window(0, 0, 64, 64)), src.transform
    for i, name in enumerate(("a.tif", "b.tif")):
        shifted = Affine(t.a, t.b, t.c + 64 * i * t.a, t.d, t.e, t.f)
        _write_scene_variant(folder / name, data, transform=shifted, width=64, height=64)
    args = ["embed", str(folder), "-o", str(tmp_path / "o"), "--weights", "none"]
    with pytest.warns(UserWarning, match=r"^the region scenes is 128 x 64 px, 16\.3% of one"):
        assert main([*args, "--no-progress", "--num-workers", "0"]) == 0
    assert sorted(p.name for p in (tmp_path / "o").glob("*_*")) == [
        "scenes_grid.tif",
        "scenes_pooled.parquet",
    ]


def test_one_crs_spelled_twice_is_one_region_and_a_local_crs_is_one_line(tmp_path, capsys) -> None:
    """Files whose CRS is the same but written differently (an ESRI WKT in a .aux.xml) were
    refused as 'mixed CRS (EPSG:32633 ...; EPSG:32633 ...)'; a local (engineering) CRS with
    --bbox or --crs ended in a PROJ / GDAL traceback."""
    folder = tmp_path / "spelled"
    folder.mkdir()
    data = np.full((4, 224, 224), 1500, dtype=np.uint16)
    a = _write_one_chip_scene(folder / "a.tif", data, ("B2", "B3", "B4", "B8"))
    b = shutil.copy(a, folder / "b.tif")
    with rasterio.open(b, "r+") as dst:
        dst.transform = Affine(10, 0, 502240, 0, -10, 5000000)  # the tile east of a
    esri = CRS.from_epsg(32633).to_wkt("WKT1_ESRI")
    Path(f"{b}.aux.xml").write_text(f"<PAMDataset><SRS>{escape(esri)}</SRS></PAMDataset>")
    with rasterio.open(b) as src:
        assert src.crs.to_wkt() != rasterio.open(a).crs.to_wkt()  # two spellings indeed
    out = tmp_path / "two.tif"
    assert main(["embed", str(folder), "-o", str(out), "--weights", "none", "--no-progress"]) == 0
    with rasterio.open(out) as grid:
        assert grid.crs.to_epsg() == 32633 and grid.width == 28  # both tiles, one region
    local = _write_one_chip_scene(
        tmp_path / "local.tif", data, ("B2", "B3", "B4", "B8"), 'LOCAL_CS["site",UNIT["metre",1]]'
    )
    for extra, flag in (
        (["--bbox", "13.6", "48.2", "13.7", "48.3"], "bbox"),
        (["--crs", "EPSG:32633"], "crs"),
        (["--crs", 'LOCAL_CS["other",UNIT["metre",1]]'], "other"),  # PROJ: identity, relabelled
    ):
        capsys.readouterr()
        assert main(["embed", str(local), "-o", str(tmp_path / flag), *extra]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / flag).exists(), err
        assert "cannot transform coordinates from" in err and "Engineering CRS 'site'" in err
        assert "a local CRS is not tied to the Earth" in err and "gdal_edit.py -a_srs" in err


def test_a_folder_mixing_a_local_crs_names_the_local_files_and_fixes_that_work(
    tmp_path, capsys
) -> None:
    """A folder of a UTM tile and a local-CRS tile was told to read them in one CRS with
    --crs EPSG:<code>, which a local CRS cannot be read in; doing so was refused without
    naming the file."""
    data = np.full((4, 224, 224), 1500, dtype=np.uint16)
    bands = ("B2", "B3", "B4", "B8")
    folder = tmp_path / "mixed"
    folder.mkdir()
    _write_one_chip_scene(folder / "utm.tif", data, bands)
    _write_one_chip_scene(folder / "site.tif", data, bands, 'LOCAL_CS["site",UNIT["metre",1]]')
    for extra, said in (
        ([], "files in a local CRS (site.tif) cannot be read in another CRS: pass them as "
             "separate inputs, or give them their real CRS (gdal_edit.py -a_srs EPSG:<code>)"),
        (["--crs", "EPSG:32633"], "error: site.tif: in a local CRS, cannot be read in "
                                  "EPSG:32633 (a local CRS is not tied to the Earth): pass the "
                                  "local files as separate inputs without --crs"),
    ):  # fmt: skip
        capsys.readouterr()
        assert main(["embed", str(folder), "-o", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, err
        assert "--crs EPSG:<code>" not in err and not (tmp_path / "o").exists()


def test_a_crs_needing_a_datum_grid_proj_lacks_is_one_line_before_gdal_meets_it(
    tmp_path, capfd
) -> None:
    """A CRS tied to WGS 84 only through a grid file PROJ lacks: in a file's .aux.xml it was a
    traceback at the scan; given as --crs to a file without CRS the job ran (exit 0) with
    dozens of GDAL 'ERROR 1: PROJ' lines, a grid GeoTIFF labelled with the bare datum's code
    (EPSG:23033) and a table in the CRS with the grid; given to a UTM file, those lines came
    before the one-line error."""
    data = np.full((4, 224, 224), 1500, dtype=np.uint16)
    bands = ("B2", "B3", "B4", "B8")
    utm = _write_one_chip_scene(tmp_path / "utm.tif", data, bands)
    bare = _write_one_chip_scene(tmp_path / "bare.tif", data, bands, crs=None)
    aux = shutil.copy(utm, tmp_path / "aux.tif")
    srs = "+proj=utm +zone=33 +ellps=intl +units=m +nadgrids=nonexistent.gsb"
    Path(f"{aux}.aux.xml").write_text(f"<PAMDataset><SRS>{srs}</SRS></PAMDataset>")
    own = "or give the files a CRS PROJ can use (gdal_edit.py -a_srs EPSG:<code>)"
    for i, (path, extra, fix) in enumerate(
        (
            (aux, [], own),  # the file's CRS is what to change
            (aux, ["--crs", "EPSG:32633"], own),
            (bare, ["--crs", srs], "or pass another --crs"),  # the setting is what to change
            (utm, ["--crs", srs], "or pass another --crs"),
        )
    ):
        capfd.readouterr()
        assert main(["embed", str(path), "-o", str(tmp_path / f"o{i}"), *extra]) == 2
        err = capfd.readouterr().err  # the file descriptor: GDAL prints there, not via Python
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / f"o{i}").exists(), err
        assert "needs the datum grid nonexistent.gsb, which PROJ lacks" in err
        assert "projsync --file nonexistent.gsb" in err and err.rstrip().endswith(fix), err
    # an old grid name is asked for by the name PROJ's CDN (and so projsync) knows
    conus = "+proj=utm +zone=17 +ellps=clrk66 +nadgrids=conus +units=m"
    assert main(["embed", str(bare), "-o", str(tmp_path / "c"), "--crs", conus]) == 2
    assert "projsync --file us_noaa_conus.tif" in capfd.readouterr().err
    # the Python dataset, before it reads anything
    with pytest.raises(CRSTransformError, match="datum grid nonexistent.gsb") as caught:
        Sentinel2SR(bare, crs=srs)
    assert caught.value.reason == "it needs the datum grid nonexistent.gsb, which PROJ lacks"
    assert "ERROR" not in capfd.readouterr().err


def test_preview_png(tmp_path, reference_run) -> None:
    out = tmp_path / "p.png"
    assert main(["preview", str(reference_run / "ftw_s2_l2a_33N_grid.tif"), "-o", str(out)]) == 0
    from PIL import Image

    img = np.asarray(Image.open(out))
    assert img.shape[0] == 24 * 8 and img.shape[1] == 2 * 37 * 8 + 8  # input RGB | PCA
    assert img[:, : 37 * 8].std() > 5 and img[:, -37 * 8 :].std() > 5


def test_a_preview_that_cannot_be_written_keeps_the_previous_one(
    tmp_path, reference_run, capsys
) -> None:
    """Pillow removes its partial file on an Exception only: a Ctrl-C (or a kill) while it
    wrote left a truncated PNG in place of the previous preview. The preview is written
    under a hidden name and renamed; here a full disk fails the write (the previous
    preview, drawn smaller, was truncated by the write and then removed by Pillow)."""
    from tests.tmpfs import tmpfs
    from torchgeo_dofa.preview import render_preview

    grid = str(reference_run / "ftw_s2_l2a_33N_grid.tif")
    with tmpfs(tmp_path / "disk", "1m") as disk:
        out = disk / "p.png"
        render_preview(grid, out, cell_px=1)
        before = out.read_bytes()
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * (free - 4096))  # room for 4 KiB, not a PNG
        capsys.readouterr()
        assert main(["preview", grid, "-o", str(out)]) == 1  # the disk, not the input (2)
        assert capsys.readouterr().err == (  # it named the hidden temporary file
            f"torchgeo-dofa: error: cannot write {out} (No space left on device): give -o a "
            "file in a folder you can write to, with free space\n"
        )
        assert out.read_bytes() == before  # the previous preview, whole
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "p.png"]  # no temporary


def test_a_ctrl_c_while_the_preview_writes_is_pythons_own(
    tmp_path, reference_run, monkeypatch
) -> None:
    """The command ends at once on a Ctrl-C while its libraries load (no temporary file can
    exist yet); the preview's write must get Python's ``KeyboardInterrupt`` instead, which
    removes the hidden temporary file."""
    import torchgeo_dofa.preview
    from torchgeo_dofa.__main__ import run_as_command

    real, handlers = torchgeo_dofa.preview.render_preview, []

    def render_preview(*args: Any, **kwargs: Any) -> Path:
        handlers.append(signal.getsignal(signal.SIGINT))
        return real(*args, **kwargs)

    monkeypatch.setattr(torchgeo_dofa.preview, "render_preview", render_preview)
    monkeypatch.setenv("TORCHGEO_DOFA_FAST_EXIT", "0")  # pytest's process must not end here
    grid, out = reference_run / "ftw_s2_l2a_33N_grid.tif", tmp_path / "p.png"
    assert run_as_command(lambda: main(["preview", str(grid), "-o", str(out)])) == 0
    assert handlers == [signal.default_int_handler] and out.is_file()


def test_preview_draws_the_bands_the_grid_embedded(tmp_path, base_checkpoint) -> None:
    """The input panel drew the first source's bands 1-3 (B4, B3, B2 where described): the
    first date of a two-date stack whose second date was embedded, and a grey B02 for a
    scene of per-band files. The same pixels in any layout now draw the same panel."""
    from PIL import Image

    with rasterio.open(SCENE) as src:
        profile = src.profile | {"width": 224, "height": 224}
        profile["transform"] = src.transform  # the crop's corner is the scene's
        first = src.read(window=Window(0, 0, 224, 224))
    second = first[[2, 1, 0, 3]] // 2 + 100  # another date: other pixels

    def written(path: Path, data: np.ndarray, names: tuple[str, ...] | None) -> Path:
        path.parent.mkdir(exist_ok=True)
        with rasterio.open(path, "w", **(profile | {"count": len(data)})) as dst:
            dst.write(data)
            if names:
                dst.descriptions = names
        return path

    stack = written(tmp_path / "in" / "stack.tif", np.concatenate([first, second]), None)
    alone = written(tmp_path / "in" / "alone.tif", second, ("B04", "B03", "B02", "B08"))
    whole = written(tmp_path / "in" / "whole.tif", first, ("B04", "B03", "B02", "B08"))
    for band, values in zip(("B04", "B03", "B02", "B08"), first, strict=True):
        written(tmp_path / "perband" / f"scene_{band}.tif", values[None], None)
    common = ["--weights", str(base_checkpoint), "--no-progress", "--output", "grid"]
    file_bands = ["--file-bands", "B4", "B3", "B2", "B8", "B4_1", "B3_1", "B2_1", "B8_1"]
    jobs = {
        "date2": [str(stack), *file_bands, "--bands", "B4_1", "B3_1", "B2_1", "B8_1"],
        "date1": [str(stack), *file_bands, "--bands", "B4", "B3", "B2", "B8"],
        "alone": [str(alone)],
        "whole": [str(whole)],
        "perband": [str(tmp_path / "perband")],
    }
    panels = {}
    for name, args in jobs.items():
        grid = tmp_path / "out" / f"{name}.tif"
        assert main(["embed", *args, "-o", str(grid), *common]) == 0
        assert main(["preview", str(grid), "-o", str(tmp_path / f"{name}.png")]) == 0
        img = np.asarray(Image.open(tmp_path / f"{name}.png"))
        assert img.shape == (14 * 8, 2 * 14 * 8 + 8, 3)
        panels[name] = img[:, : 14 * 8]
    np.testing.assert_array_equal(panels["date2"], panels["alone"])
    np.testing.assert_array_equal(panels["date1"], panels["whole"])
    np.testing.assert_array_equal(panels["perband"], panels["whole"])
    # the second date is the first with red and blue swapped (and scaled: the stretch undoes it)
    assert np.abs(panels["date1"].astype(int) - panels["date2"]).mean() > 3
    assert np.abs(panels["date1"].astype(int) - panels["date2"][..., ::-1]).mean() < 1
    assert panels["whole"].std(axis=2).mean() > 3  # colour, not grey
    with rasterio.open(tmp_path / "out" / "perband.tif") as src:
        tags = {k: json.loads(src.tags()[k]) for k in ("bands", "sources", "source_bands")}
    assert [Path(p).name for p in tags["sources"]] == [f"scene_B0{b}.tif" for b in (2, 3, 4, 8)]
    one_band_each = [[int(b == f"B{k}") for b in tags["bands"]] for k in (2, 3, 4, 8)]
    assert tags["source_bands"] == one_band_each  # each file's band 1, where it is embedded


def test_preview_of_a_grid_whose_input_was_rewritten_warns(tmp_path) -> None:
    """A grid whose input file was replaced after the job was drawn from the new file
    without a word: the outputs record each source's size and modification time
    (``source_stats``), and preview warns in one line where the file is not that one."""
    with rasterio.open(SCENE) as src:
        data = src.read(window=Window(0, 0, 224, 224))
    scene = _write_scene_variant(tmp_path / "scene.tif", data, width=224, height=224)
    out = tmp_path / "o"
    args = ["embed", str(scene), "-o", str(out), "--weights", "none", "--no-progress"]
    assert main([*args, "--output", "both"]) == 0
    grid = out / "scene_grid.tif"
    with rasterio.open(grid) as src:
        recorded = json.loads(src.tags()["source_stats"])
    stat = scene.stat()
    assert recorded == [[stat.st_size, stat.st_mtime_ns]]
    table = gpd.read_parquet(out / "scene_pooled.parquet")
    assert json.loads(table.attrs["source_stats"]) == recorded
    with warnings.catch_warnings():  # the file it was made from: quiet
        warnings.simplefilter("error")
        assert main(["preview", str(grid), "-o", str(tmp_path / "same.png")]) == 0
    time.sleep(0.01)  # a new modification time, whatever the file system's clock step
    _write_scene_variant(scene, data[:, ::-1], width=224, height=224)  # replaced: flipped
    assert [scene.stat().st_size, scene.stat().st_mtime_ns] != recorded[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["preview", str(grid), "-o", str(tmp_path / "new.png")]) == 0
    [said] = [str(w.message) for w in caught]
    assert said.startswith(
        f"the input of {grid}, {scene}, changed since the embedding was made (now "
    ), said
    assert said.endswith(
        "its RGB panel shows the file as it is now, which may not be the pixels embedded "
        "(embed it again to match)"
    ), said


def test_preview_of_an_earlier_grid_draws_its_input_in_the_grids_crs(
    tmp_path, base_checkpoint
) -> None:
    """A grid without ``source_bands`` (an earlier release's) embedded with --crs other than
    the file's drew a black input panel: its window was read in the file's own CRS."""
    from PIL import Image

    grid = tmp_path / "g.tif"
    common = ["--weights", str(base_checkpoint), "--no-progress", "--output", "grid"]
    assert main(["embed", str(SCENE), "-o", str(grid), "--crs", "EPSG:32634", *common]) == 0
    panels = []
    for tagged in (True, False):
        if not tagged:
            with rasterio.open(grid, "r+") as dst:
                dst.update_tags(source_bands="")  # as written before the tag existed
        assert main(["preview", str(grid), "-o", str(tmp_path / f"{tagged}.png")]) == 0
        img = np.asarray(Image.open(tmp_path / f"{tagged}.png"))
        panels.append(img[:, : (img.shape[1] - 8) // 2])
    assert panels[1].std() > 20  # the scene, not black
    np.testing.assert_array_equal(panels[0], panels[1])


def test_preview_of_damaged_tags_or_an_unwritable_path_is_one_line(
    tmp_path, reference_run, capsys
) -> None:
    """A source_bands tag naming a band the file has not was an IndexError traceback, a
    sources tag that is no JSON a bare "Expecting value"; -o under a file named the hidden
    temporary file (the cleanup's error replaced the one reported)."""
    from PIL import Image

    grid = tmp_path / "grid.tif"
    shutil.copy(reference_run / "ftw_s2_l2a_33N_grid.tif", grid)
    out = tmp_path / "p.png"
    with rasterio.open(grid, "r+") as dst:
        dst.update_tags(source_bands="[[9, 9, 9, 9]]")
    with pytest.warns(UserWarning, match=r"cannot be read \(band index 9 .*PCA colours only"):
        assert main(["preview", str(grid), "-o", str(out)]) == 0
    assert np.asarray(Image.open(out)).shape[:2] == (24 * 8, 37 * 8)  # the PCA panel only
    with rasterio.open(grid, "r+") as dst:
        dst.update_tags(sources="not json{")
    with pytest.warns(UserWarning, match=r"does not name its input .*PCA colours only"):
        assert main(["preview", str(grid), "-o", str(out)]) == 0
    (tmp_path / "afile").write_text("")
    capsys.readouterr()
    assert main(["preview", str(grid), "-o", str(tmp_path / "afile" / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"torchgeo-dofa: error: cannot write {tmp_path / 'afile' / 'x.png'} (")
    assert ".tmp" not in err


def test_preview_without_a_readable_input_draws_the_pca_panel_alone(
    tmp_path, reference_run
) -> None:
    # the grid's ``sources`` tag names an input that is now corrupt: the docstring's promise
    grid = tmp_path / "grid.tif"
    shutil.copy(reference_run / "ftw_s2_l2a_33N_grid.tif", grid)
    corrupt = tmp_path / "input.tif"
    corrupt.write_bytes(b"II*\x00 not a GeoTIFF")
    with rasterio.open(grid, "r+") as dst:
        dst.update_tags(sources=json.dumps([str(corrupt)]))
    out = tmp_path / "p.png"
    # ... and says why (it used to say only "wrote ..."; one line on the console)
    shown = "the preview shows the embedding's PCA colours only"
    said = f"the input of {grid}, {corrupt}, cannot be read .*: {shown}"
    with pytest.warns(UserWarning, match=said):
        assert main(["preview", str(grid), "-o", str(out)]) == 0
    from PIL import Image

    img = np.asarray(Image.open(out))
    assert img.shape[:2] == (24 * 8, 37 * 8)  # the PCA panel only
    corrupt.unlink()
    with pytest.warns(UserWarning, match=f"the input of {grid}, {corrupt}, is not found .*"):
        assert main(["preview", str(grid), "-o", str(out)]) == 0
    # a grid without any valid cell: a black picture, with a warning saying so
    with rasterio.open(grid, "r+") as dst:
        dst.write(np.full((dst.count, dst.height, dst.width), np.nan, np.float32))
        dst.update_tags(sources=json.dumps([str(SCENE)]))
    with pytest.warns(UserWarning, match=r"every cell of .* is no data .* PCA panel is black"):
        assert main(["preview", str(grid), "-o", str(out)]) == 0


def test_a_preview_says_what_weights_drew_it(tmp_path, reference_run) -> None:
    """The demo's preview of random weights (offline) showed their position-embedding stripes
    like a result, and no PNG said what made it. A grid of random weights gets a red caption
    strip under the panels; every PNG carries the grid's weights and its source."""
    from PIL import Image

    from torchgeo_dofa.preview import CAPTION_PX, CAPTION_RGB

    grid = tmp_path / "grid.tif"
    shutil.copy(reference_run / "ftw_s2_l2a_33N_grid.tif", grid)
    with rasterio.open(grid) as src:
        h, w, weights = src.height, src.width, src.tags()["weights"]
    assert main(["preview", str(grid), "-o", str(tmp_path / "trained.png")]) == 0
    with Image.open(tmp_path / "trained.png") as png:
        trained = np.asarray(png)
        assert png.info["weights"] == weights and weights.startswith("file:")
        assert png.info["Source"] == str(grid)
        assert png.info["Description"].startswith("left: the input's RGB bands; right: the ")
    assert trained.shape == (h * 8, 2 * w * 8 + 8, 3)  # no caption
    with rasterio.open(grid, "r+") as dst:
        dst.update_tags(weights="random (seed 0)")
    assert main(["preview", str(grid), "-o", str(tmp_path / "random.png")]) == 0
    with Image.open(tmp_path / "random.png") as png:
        drawn = np.asarray(png)
        assert png.info["weights"] == "random (seed 0)"
    assert drawn.shape == (h * 8 + CAPTION_PX, 2 * w * 8 + 8, 3)
    np.testing.assert_array_equal(drawn[: h * 8], trained)  # the panels as they were
    strip = drawn[h * 8 :].reshape(-1, 3)
    red = (strip == CAPTION_RGB).all(axis=1).mean()
    white = (strip.min(axis=1) > 180).any()  # the text's (anti-aliased) white
    assert 0.5 < red < 1.0 and white
    assert main(["preview", str(grid), "-o", str(tmp_path / "random.jpg")]) == 0  # no chunks
    # a narrow preview (1 px a cell) is widened to hold the whole caption (it was cut short)
    from torchgeo_dofa.preview import render_preview

    narrow = np.asarray(Image.open(render_preview(grid, tmp_path / "narrow.png", cell_px=1)))
    assert narrow.shape[1] > 2 * w + 8 and narrow.shape[0] == h + CAPTION_PX
    text = np.nonzero((narrow[h:].min(axis=-1) > 180).any(axis=0))[0]  # its white columns
    assert text.max() < narrow.shape[1] - 2  # the text ends before the edge


def test_tile_mode_matches_resize_on_224_chips(tmp_path, reference_run, base_checkpoint) -> None:
    # a 224-px chip is one tile at offset 0, and resizing 224 -> 224 is the identity
    summary = embed(
        [SCENE],
        tmp_path,
        output="grid",
        input_prep="tile",
        weights=str(base_checkpoint),
        batch_size=6,
        progress=False,
    )
    assert summary.chips == 6
    with (
        rasterio.open(tmp_path / "ftw_s2_l2a_33N_grid.tif") as a,
        rasterio.open(reference_run / "ftw_s2_l2a_33N_grid.tif") as b,
    ):
        assert a.tags()["input_prep"] == "tile"
        np.testing.assert_allclose(a.read(), b.read(), atol=1e-4)


def _predict_config(out: Path, checkpoint: Path) -> dict[str, Any]:
    """The shipped predict_grid.yaml on the bundled scene, writing g.tif / p.parquet in out."""
    import yaml

    cfg_path = Path(__file__).resolve().parents[1] / "torchgeo_dofa/configs/predict_grid.yaml"
    cfg: dict[str, Any] = yaml.safe_load(cfg_path.read_text())
    cfg["model"]["init_args"]["weights"] = str(checkpoint)
    cfg["data"]["init_args"]["paths"] = str(SCENE)
    cfg["trainer"]["callbacks"][0]["init_args"]["path"] = str(out / "g.tif")
    cfg["trainer"]["callbacks"][1]["init_args"]["path"] = str(out / "p.parquet")
    cfg["trainer"] |= {"enable_progress_bar": False, "default_root_dir": str(out)}
    return cfg


@pytest.mark.parametrize("seeded", [True, False], ids=["lightning-seeds", "unseeded"])
def test_random_weights_lightning_seeded_are_resumed_and_named_so(tmp_path, capsys, seeded) -> None:
    """``predict --config`` with ``weights: null`` and no seed of the model's own: LightningCLI
    seeds before it builds the model (``seed_everything``, default true: seed 0), so every
    run draws the same weights and a stopped run resumes; it was told that its chips "cannot
    be resumed" and to delete them. With ``seed_everything: false`` that stays so."""
    import yaml

    cfg = _predict_config(tmp_path, tmp_path / "unused.pth")
    cfg["model"]["init_args"]["weights"] = None
    cfg["data"]["init_args"]["batch_size"] = 2
    cfg["trainer"]["callbacks"].append({"class_path": f"{__name__}.SigtermAfterFirstBatch"})
    if not seeded:
        cfg["seed_everything"] = False
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["predict", "--config", str(config)]) == 143
    said = capsys.readouterr().err.strip().splitlines()[-1]
    if not seeded:
        assert said.startswith(
            "torchgeo-dofa: error: stopped by SIGTERM: the chips written so far cannot be resumed"
        ), said
        return
    assert said == (
        "torchgeo-dofa: error: stopped by SIGTERM: the chips written so far are kept; rerun "
        "the same command to resume"
    )
    cfg["trainer"]["callbacks"].pop()  # the same job, not stopped: the same weights resume
    config.write_text(yaml.safe_dump(cfg))
    assert main(["predict", "--config", str(config)]) == 0, capsys.readouterr().err
    with rasterio.open(tmp_path / "g.tif") as grid:
        assert grid.tags()["weights"] == "random (seed_everything 0)"


def test_predict_config_writes_the_same_files_as_embed(
    tmp_path, reference_run, base_checkpoint, capsys
):
    import yaml

    cfg = _predict_config(tmp_path, base_checkpoint)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    before = _encoders_holding_weights()
    assert main(["predict", "--config", str(tmp_path / "cfg.yaml")]) == 0
    # the run's model is freed as it ends (a context variable of jsonargparse kept it)
    assert _encoders_holding_weights() <= before
    said = capsys.readouterr().err.splitlines()  # where it wrote (nothing was said)
    assert said[-2:] == [f"torchgeo-dofa: wrote {tmp_path / n}" for n in ("g.tif", "p.parquet")]
    # the same grid GeoTIFF as `torchgeo-dofa embed` on the same scene and settings
    with (
        rasterio.open(tmp_path / "g.tif") as got,
        rasterio.open(reference_run / "ftw_s2_l2a_33N_grid.tif") as ref,
    ):
        assert (got.crs, got.transform, got.shape, got.count) == (
            ref.crs,
            ref.transform,
            ref.shape,
            ref.count,
        )
        assert got.tags() == ref.tags()
        assert json.loads(got.tags()["bands"]) == ["B2", "B3", "B4", "B8"]
        np.testing.assert_allclose(
            got.read(), ref.read(), rtol=0, atol=SAME_JOB_ATOL, equal_nan=True
        )
    frame = gpd.read_parquet(tmp_path / "p.parquet")
    ref_frame = gpd.read_parquet(reference_run / "ftw_s2_l2a_33N_pooled.parquet")
    assert list(frame.columns) == list(ref_frame.columns)
    assert list(frame.chip_id) == list(ref_frame.chip_id)
    assert frame.geometry.equals(ref_frame.geometry) and frame.crs == ref_frame.crs
    assert (frame.source == ref_frame.source).all()
    np.testing.assert_allclose(
        np.stack(frame.embedding), np.stack(ref_frame.embedding), rtol=0, atol=SAME_JOB_ATOL
    )
    assert frame.attrs == ref_frame.attrs


def test_predict_config_points_are_rows_in_their_order_as_embed_writes_them(
    tmp_path, base_checkpoint
) -> None:
    """``predict --config`` with the data module's ``points=`` wrote its rows north-west
    first, without ``point_index`` (nor lon / lat), so rows could not be matched to the
    points (two equal points: two rows alike). Its table is ``embed --points``'s now: rows in
    the points' order, numbered, the same columns and values."""
    import yaml

    with rasterio.open(SCENE) as src:
        b = src.bounds
    south = _scene_lonlat(b.left + 1500, b.bottom + 1500)
    north = _scene_lonlat(b.left + 4000, b.top - 1200)
    pts = [south, north, south]
    (tmp_path / "pts.csv").write_text("lon,lat\n" + "".join(f"{x},{y}\n" for x, y in pts))
    common = ["--weights", str(base_checkpoint), "--no-progress", "--precision", "32"]
    points = ["--points", str(tmp_path / "pts.csv"), "--buffer-m", "1120", "--output", "pooled"]
    assert main(["embed", str(SCENE), *points, "-o", str(tmp_path / "e"), *common]) == 0
    cfg = _predict_config(tmp_path, base_checkpoint)
    cfg["data"]["init_args"]["points"] = [{"lon": x, "lat": y, "buffer_m": 1120} for x, y in pts]
    cfg["model"]["init_args"]["output"] = "pooled"
    cfg["trainer"]["callbacks"] = cfg["trainer"]["callbacks"][1:]  # the table alone
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["predict", "--config", str(tmp_path / "cfg.yaml")]) == 0
    got = gpd.read_parquet(tmp_path / "p.parquet")
    ref = gpd.read_parquet(tmp_path / "e" / "ftw_s2_l2a_33N_pooled.parquet")
    assert list(got.columns) == list(ref.columns)
    assert got.point_index.tolist() == [0, 1, 2]
    np.testing.assert_allclose(got[["lon", "lat"]].to_numpy(), np.array(pts))
    assert got.chip_id.tolist() == ref.chip_id.tolist()
    assert got.chip_id[0] == got.chip_id[2] != got.chip_id[1]
    np.testing.assert_allclose(
        np.stack(got.embedding), np.stack(ref.embedding), rtol=0, atol=SAME_JOB_ATOL
    )


def test_predict_config_resumed_with_every_chip_written_assembles(
    tmp_path, reference_run, base_checkpoint, capsys
) -> None:
    """Interrupted between the last batch and the assembly, a rerun of ``predict --config``
    writes the outputs (Lightning skips the empty loop and its epoch hooks)."""
    import yaml

    cfg = _predict_config(tmp_path, base_checkpoint)
    crash = {"class_path": f"{__name__}.CrashAfterBatch", "init_args": {"last": True}}
    (tmp_path / "crash.yaml").write_text(
        yaml.safe_dump(
            cfg | {"trainer": cfg["trainer"] | {"callbacks": [*cfg["trainer"]["callbacks"], crash]}}
        )
    )
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["predict", "--config", str(tmp_path / "crash.yaml")])
    assert not (tmp_path / "g.tif").exists() and (tmp_path / "g.tif.parts").is_dir()
    parts = sorted(p.name for p in (tmp_path / "g.tif.parts").iterdir())
    # a rerun with other weights (same file name, other values) or bands is another job: refused,
    # naming the setting, before the parts are touched
    other = tmp_path / "other" / base_checkpoint.name
    other.parent.mkdir()
    state = torch.load(base_checkpoint, map_location="cpu", weights_only=True)
    state["norm.weight"] = state["norm.weight"] + 1
    torch.save(state, other)
    for option, match in (
        (f"--model.init_args.weights={other}", "weights_crc32 was"),
        (
            "--data.init_args.bands=[B4,B3,B2]",
            """bands was '["B2", "B3", "B4", "B8"]', now '["B4", "B3", "B2"]'""",
        ),
        ("--data.init_args.file_bands=[B3,B2,B4,B8]", ""),  # same names, other order
        ("--data.init_args.stride=112", "stride was '224', now '112'"),
    ):
        capsys.readouterr()
        assert main(["predict", "--config", str(tmp_path / "cfg.yaml"), option]) == 2
        err = capsys.readouterr().err  # one line (PartsMismatchError), no traceback
        assert err.startswith("torchgeo-dofa: error: ") and err.count("\n") == 1, err
        assert f"g.tif.parts holds the chips of another job ({match}" in err
    assert sorted(p.name for p in (tmp_path / "g.tif.parts").iterdir()) == parts
    # a refused run writes nothing, not even a parts folder or an identity beside a writer
    # it did not refuse
    shutil.rmtree(tmp_path / "g.tif.parts")
    capsys.readouterr()
    rerun = f"predict --config {tmp_path / 'cfg.yaml'} --model.init_args.weights={other}"
    assert main(rerun.split()) == 2
    assert "p.parquet.parts holds the chips of another job" in capsys.readouterr().err
    assert not (tmp_path / "g.tif.parts").exists()
    assert main(["predict", "--config", str(tmp_path / "cfg.yaml")]) == 0
    assert not list(tmp_path.glob("*.parts"))
    with (
        rasterio.open(tmp_path / "g.tif") as got,
        rasterio.open(reference_run / "ftw_s2_l2a_33N_grid.tif") as ref,
    ):
        assert (got.transform, got.shape, got.count) == (ref.transform, ref.shape, ref.count)
        np.testing.assert_allclose(
            got.read(), ref.read(), rtol=0, atol=SAME_JOB_ATOL, equal_nan=True
        )
    assert len(gpd.read_parquet(tmp_path / "p.parquet")) == 6


def test_predict_config_refusals_are_one_line_and_write_nothing(
    tmp_path, base_checkpoint, capsys
) -> None:
    """Bad input through ``predict --config`` ends as ``embed``'s does: one line naming the
    fix, exit status 2, no traceback, and no output, part or empty .parts folder left (nor
    the output folder's lock file and LightningCLI's own config.yaml, which were)."""
    import yaml

    out = tmp_path / "out"

    def refused(name: str, cfg: dict[str, Any], *overrides: str) -> str:
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        capsys.readouterr()
        assert main(["predict", "--config", str(tmp_path / f"{name}.yaml"), *overrides]) == 2
        err = capsys.readouterr().err
        assert err.startswith("torchgeo-dofa: error: ") and err.count("\n") == 1, err
        assert not list(out.glob("*.parts")) and not list(out.glob("*.tif"))
        assert not list(out.glob("*.parquet"))
        return err

    cfg = _predict_config(out, base_checkpoint)
    raw = _predict_config(out, base_checkpoint)
    raw["data"]["init_args"]["preprocess"] = False  # raw reflectance would reach the model
    err = refused("raw", raw)
    assert "the batch's image holds values up to " in err
    assert "give the data module preprocess=True" in err
    assert not out.exists()  # the run made it: nothing of it is left
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    assert str(broken) in refused("broken", _predict_config(out, broken))
    # a ValueError of this package's, wrapped by jsonargparse, is one line too
    assert "unknown DOFA variant 'huge'" in refused("cfg", cfg, "--model.init_args.variant=huge")
    assert "stride 100 px is not a multiple" in refused("cfg", cfg, "--data.init_args.stride=100")
    # no writer among the callbacks: it computed every chip and exited 0, writing nothing
    assert refused("cfg", cfg, "--trainer.callbacks=[]").endswith(
        "predict would write nothing: the config's trainer.callbacks has no prediction writer; "
        "add torchgeo_dofa.writers.GridWriter or PooledWriter there, as "
        f"{Path(__file__).resolve().parents[1] / 'torchgeo_dofa/configs/predict_grid.yaml'} does\n"
    )
    # inputs are checked as embed checks them, not TorchGeo's "Dataset not found" traceback
    missing = refused("cfg", cfg, f"--data.init_args.paths={tmp_path / 'nope.tif'}")
    assert f"input '{tmp_path / 'nope.tif'}' does not exist" in missing
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"not a GeoTIFF")
    assert "cannot read" in refused("cfg", cfg, f"--data.init_args.paths={garbage}")
    # output paths that cannot be the job's, refused before any chip is computed; all but
    # the input's path before the model loads (the broken checkpoint is never read)
    (tmp_path / "folder.tif").mkdir()
    for path, match, checkpoint in (
        (SCENE, "is one of the job's inputs", base_checkpoint),  # embed refuses that too
        (tmp_path / "folder.tif", "is a folder", broken),
        (out, "GridWriter writes a GeoTIFF file, but", broken),  # not a GeoTIFF's name
        (out / "p.parquet", "GridWriter writes a GeoTIFF file, but", broken),  # the table's
        (broken / "g.tif", f"cannot use output folder {broken}", broken),  # cannot be made
    ):
        bad = _predict_config(out, checkpoint)
        bad["trainer"]["callbacks"][0]["init_args"]["path"] = str(path)
        assert match in refused("bad", bad)
    bad = _predict_config(out, broken)  # two writers of one file
    bad["trainer"]["callbacks"].append(bad["trainer"]["callbacks"][0])
    assert "is also another writer's output" in refused("bad", bad)
    copy = shutil.copy(SCENE, tmp_path / "copy.tif")  # an output hard-linked to the input
    os.link(copy, tmp_path / "link.tif")
    bad = _predict_config(out, base_checkpoint)
    bad["data"]["init_args"]["paths"] = str(copy)
    bad["trainer"]["callbacks"][0]["init_args"]["path"] = str(tmp_path / "link.tif")
    assert "is one of the job's inputs" in refused("bad", bad)
    assert SCENE.stat().st_size > 1_000_000  # the scene is intact
    assert not (SCENE.parent / ".torchgeo-dofa.lock").exists()  # and its folder untouched
    # an embed job's result: replacing it would leave that job "done" with this job's file
    done = tmp_path / "embedded"
    args = [str(SCENE), "-o", str(done), *_one_chip_bbox(SCENE), "--weights", "none"]
    assert main(["embed", *args, "--seed", "1", "--no-progress", "--output", "pooled"]) == 0
    table = done / "ftw_s2_l2a_33N_pooled.parquet"
    before = table.read_bytes()
    bad = _predict_config(out, base_checkpoint)
    bad["trainer"]["callbacks"][1]["init_args"]["path"] = str(table)
    err = refused("bad", bad)
    assert f"output {table} is a result of the torchgeo-dofa embed job recorded in " in err
    assert table.read_bytes() == before
    # -o NAME.tif: that job's manifest is named for the grid and lists the sibling table too
    named = tmp_path / "named" / "x.tif"
    args = [str(SCENE), "-o", str(named), *_one_chip_bbox(SCENE), "--weights", "none"]
    assert main(["embed", *args, "--seed", "1", "--no-progress"]) == 0
    bad["trainer"]["callbacks"][1]["init_args"]["path"] = str(named.with_suffix(".parquet"))
    assert f"recorded in {named.parent / '.x.tif.torchgeo-dofa-job.json'}" in refused("bad", bad)
    # a job refused before its first part leaves no folder it made, nor a lock file there
    new = tmp_path / "new" / "deep"
    raw = _predict_config(new, base_checkpoint)
    raw["data"]["init_args"]["preprocess"] = False
    raw["trainer"]["default_root_dir"] = str(tmp_path)
    assert "the batch's image holds values up to " in refused("raw", raw)
    assert not (tmp_path / "new").exists()
    # also when it failed before its prediction started (the writers lock when made)
    broken_new = _predict_config(new, broken)
    broken_new["trainer"]["default_root_dir"] = str(tmp_path)
    assert str(broken) in refused("broken", broken_new)
    assert not (tmp_path / "new").exists()


def test_predict_config_locks_its_outputs_and_cleans_up_after_failures(
    tmp_path, base_checkpoint
) -> None:
    """A config run takes the output folder's lock (a second job fails at once, exit 75,
    before its model loads, instead of mixing both jobs' chips); a failed run prints its error
    on a line of its own and nothing after it (open raster handles used to print "Error in
    sys.excepthook" at exit); SIGTERM stops it after the batch (exit 143); the rerun resumes
    and deletes a killed assembly's temporary file."""
    import yaml

    from torchgeo_dofa.jobs import OutputLock

    out = tmp_path / "out"
    cfg = _predict_config(out, base_checkpoint)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "torchgeo_dofa", "predict", "--config"]
    # the second job's checkpoint is broken: refused as locked, it never loaded it (the
    # writers are made before the model, and take the lock then)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    (tmp_path / "second.yaml").write_text(yaml.safe_dump(_predict_config(out, broken)))
    with OutputLock(out):  # another job holds the folder (this process, via the real lock)
        second = subprocess.run(
            [*cmd, str(tmp_path / "second.yaml")], capture_output=True, text=True, timeout=300
        )
    assert second.returncode == 75, second.stderr[-2000:]
    last = second.stderr.strip().splitlines()[-1]
    assert last == (
        f"torchgeo-dofa: error: output folder {out} is in use by another torchgeo-dofa job "
        f"(pid {os.getpid()}); wait for it or write to another path"
    )
    assert not list(out.glob("*.parts"))
    cfg["data"]["init_args"]["preprocess"] = False
    cfg["trainer"]["enable_progress_bar"] = True
    (tmp_path / "raw.yaml").write_text(yaml.safe_dump(cfg))
    failed = subprocess.run(
        [*cmd, str(tmp_path / "raw.yaml")], capture_output=True, text=True, timeout=300
    )
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert failed.stderr.strip().splitlines()[-1].startswith("torchgeo-dofa: error: the batch")
    assert "Predicting" in failed.stdout and failed.stdout.endswith("\n")  # the bar was closed
    # SIGTERM stops a config run after the batch, as it stops embed (Lightning alone ran on)
    term = _predict_config(out, base_checkpoint)
    term["trainer"]["callbacks"].append({"class_path": f"{__name__}.SigtermAfterFirstBatch"})
    (tmp_path / "term.yaml").write_text(yaml.safe_dump(term))
    before = signal.getsignal(signal.SIGTERM)
    assert main(["predict", "--config", str(tmp_path / "term.yaml")]) == 143
    assert signal.getsignal(signal.SIGTERM) == before
    assert len(list((out / "g.tif.parts").glob("*.npy"))) == 4  # the first batch, kept
    killed = out / ".g.tif.0123456789abcdef0123456789abcdef.tmp"
    killed.write_bytes(b"half an assembly")
    assert main(["predict", "--config", str(tmp_path / "cfg.yaml")]) == 0
    assert not killed.exists() and (out / "g.tif").is_file()


def _scene_lonlat(x: float, y: float) -> tuple[float, float]:
    from pyproj import Transformer

    lon, lat = Transformer.from_crs(32633, 4326, always_xy=True).transform(x, y)
    return float(lon), float(lat)


def test_points_of_a_pixel_or_two_warn_once_for_the_job(tmp_path) -> None:
    """``--points pts.geojson --buffer-m 5`` (1 x 1 px chips at 10 m) embedded without the
    warning a region smaller than half a chip gets: one line for all its points, naming
    the option that fixes it."""
    import torchgeo_dofa.cli as cli

    with rasterio.open(SCENE) as src:
        b = src.bounds
    pts = [_scene_lonlat(b.left + 1505 + 100 * i, b.bottom + 1505) for i in range(3)]
    gj = gpd.GeoDataFrame(geometry=gpd.points_from_xy(*zip(*pts, strict=True)), crs=4326)
    gj.to_file(tmp_path / "pts.geojson", driver="GeoJSON")
    args = ["embed", str(SCENE), "--points", str(tmp_path / "pts.geojson"), "--buffer-m", "5",
            "-o", str(tmp_path / "o"), "--weights", "none", "--no-progress"]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(args) == 0
    [said] = [w for w in caught if "point chips" in str(w.message)]
    with cli._one_line_warnings():
        shown = warnings.formatwarning(said.message, said.category, said.filename, said.lineno)
    assert shown.startswith(
        "torchgeo-dofa: warning: the region ftw_s2_l2a_33N: 3 of 3 point chips are 1 x 1 px "
        "(0.002% of one 224-px chip, narrower than one 16-px DOFA patch): "
    ), shown
    assert shown.endswith(
        "a larger buffer, --buffer-m 80 or more (8 pixels a side of the point; 1120 gives a "
        "224-px chip), fits it better\n"
    ), shown
    assert len(gpd.read_parquet(tmp_path / "o" / "ftw_s2_l2a_33N_pooled.parquet")) == 3

    # read in degrees (--crs EPSG:4326): the buffer it names is in metres at the points (it
    # said "a --buffer-m of 8 pixels"), and that buffer gives whole patches
    def in_degrees(buffer_m: str, out: str) -> list[str]:
        return [*args[:5], buffer_m, "--crs", "EPSG:4326", "-o", str(tmp_path / out), *args[-3:]]

    degrees = in_degrees("5", "deg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(degrees) == 0
    [told] = [str(w.message) for w in caught if "point chips" in str(w.message)]
    found = re.search(r"buffer_m=(\d+) or more \(8 pixels of about (\d+) m a side", told)
    assert found is not None, told
    assert int(found[1]) == 8 * int(found[2]) and 10 <= int(found[2]) <= 15, told
    buffered = in_degrees(found[1], "deg2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(buffered) == 0
    assert not [w for w in caught if "point chips" in str(w.message)]


def test_points_csv_and_geojson(tmp_path, base_checkpoint) -> None:
    with rasterio.open(SCENE) as src:
        b = src.bounds
    pts = [
        _scene_lonlat(b.left + 1500, b.bottom + 1500),
        _scene_lonlat(b.left + 4000, b.top - 1200),
    ]
    csv_path = tmp_path / "pts.csv"
    csv_path.write_text(
        "id,lon,lat\n" + "".join(f"{i},{lo},{la}\n" for i, (lo, la) in enumerate(pts))
    )
    common = ["--weights", str(base_checkpoint), "--output", "pooled", "--no-progress"]
    args = ["embed", str(SCENE), "--points", str(csv_path), "--buffer-m", "1120"]
    assert main([*args, "-o", str(tmp_path / "a"), *common]) == 0
    frame = gpd.read_parquet(tmp_path / "a" / "ftw_s2_l2a_33N_pooled.parquet")
    assert len(frame) == 2
    centres = frame.geometry.centroid
    for x, y in [(b.left + 1500, b.bottom + 1500), (b.left + 4000, b.top - 1200)]:
        d = np.hypot(centres.x - x, centres.y - y).min()
        assert d <= 10  # centred within a pixel
    assert frame.geometry.area.round().tolist() == [2240.0**2] * 2  # 2 x 1120 m = 224 px
    gj = gpd.GeoDataFrame(geometry=gpd.points_from_xy(*zip(*pts, strict=True)), crs=4326)
    gj.to_file(tmp_path / "pts.geojson", driver="GeoJSON")
    args[3] = str(tmp_path / "pts.geojson")
    assert main([*args, "-o", str(tmp_path / "b"), *common]) == 0
    other = gpd.read_parquet(tmp_path / "b" / "ftw_s2_l2a_33N_pooled.parquet")
    np.testing.assert_array_equal(np.stack(other.embedding), np.stack(frame.embedding))


def test_python_embed_arguments_the_command_line_cannot_give_are_checked(
    tmp_path, base_checkpoint
) -> None:
    """In Python, ``wavelengths="0.665"`` was read as 5 wavelengths (its characters),
    ``bbox=BBox(...)`` failed with a TypeError ("argument after * must be an iterable") and
    ``stride=112.5`` placed chips off the pixel grid. One InputError each, before anything is
    written; a BBox is taken as its corners."""
    from torchgeo_dofa.spatial import BBox

    with rasterio.open(SCENE) as src:
        b = src.bounds
    lo0, la0 = _scene_lonlat(b.left + 100, b.bottom + 100)
    lo1, la1 = _scene_lonlat(b.left + 2000, b.bottom + 2000)
    kwargs: dict[str, Any] = {"weights": str(base_checkpoint), "progress": False}
    bad: dict[str, dict[str, Any]] = {
        "wavelengths='0.665' is one string: give a list, one entry per band": {
            "bands": ["B4"], "wavelengths": "0.665"},
        "bands='B4' is one string: give a list, one entry per band": {"bands": "B4"},
        "bbox=(1.0, 2.0): give (minlon, minlat, maxlon, maxlat) in degrees, or a torchgeo_dofa"
        ".BBox": {"bbox": (1.0, 2.0)},
        "stride=112.5: give a whole number of pixels": {"stride": 112.5},
        "chip_size=True: give a whole number of pixels": {"chip_size": True},
        "bbox='1234': give (minlon, minlat, maxlon, maxlat) in degrees, or a torchgeo_dofa.BBox":
            {"bbox": "1234"},
    }  # fmt: skip
    for said, given in bad.items():
        with pytest.raises(InputError) as refused:
            embed([SCENE], tmp_path / "bad", **kwargs, **given)
        assert str(refused.value) == said
    assert not (tmp_path / "bad").exists()
    box = BBox(lo0, la0, lo1, la1)
    embed([SCENE], tmp_path / "a", bbox=box, output="pooled", **kwargs)
    embed([SCENE], tmp_path / "b", bbox=(lo0, la0, lo1, la1), output="pooled", **kwargs,
          chip_size=np.int64(224), stride=224.0)  # type: ignore[arg-type]  # fmt: skip
    a, c = (gpd.read_parquet(tmp_path / n / "ftw_s2_l2a_33N_pooled.parquet") for n in "ab")
    assert len(a) == 1 and a.chip_id.tolist() == c.chip_id.tolist()


def test_bbox_restricts_the_region(tmp_path, base_checkpoint, reference_run) -> None:
    """A box's chips and grid cells are the whole scene's that meet it, with their values:
    the chips were placed from the box's own south-west pixel, so a box's outputs could not
    be checked against (or mosaicked with) the scene's, nor boxes side by side tiled."""
    with rasterio.open(SCENE) as src:
        b = src.bounds
    ref_rows = gpd.read_parquet(reference_run / "ftw_s2_l2a_33N_pooled.parquet")
    ref = ref_rows.set_index("chip_id")
    boxes = {  # (scene-relative metres): one chip's corner; across four chips; inside a cell
        "corner": (100, 100, 2000, 2000),
        "across": (650, 1000, 3500, 3200),
        "cell": (1873, 1887, 1900, 1900),
    }
    for name, (dx0, dy0, dx1, dy1) in boxes.items():
        lo0, la0 = _scene_lonlat(b.left + dx0, b.bottom + dy0)
        lo1, la1 = _scene_lonlat(b.left + dx1, b.bottom + dy1)
        out = tmp_path / name
        code = main(
            ["embed", str(SCENE), "-o", str(out), "--bbox", str(lo0), str(la0), str(lo1),
             str(la1), "--weights", str(base_checkpoint), "--output", "both", "--no-progress"]
        )  # fmt: skip
        assert code == 0
        rows = gpd.read_parquet(out / "ftw_s2_l2a_33N_pooled.parquet")
        assert set(rows.chip_id) <= set(ref.index), name
        np.testing.assert_allclose(
            np.stack(rows.embedding), np.stack(ref.loc[list(rows.chip_id)].embedding), atol=1e-5
        )
        with (
            rasterio.open(out / "ftw_s2_l2a_33N_grid.tif") as emb,
            rasterio.open(reference_run / "ftw_s2_l2a_33N_grid.tif") as whole,
        ):
            window = from_bounds(*emb.bounds, transform=whole.transform)
            assert window.col_off == round(window.col_off) and window.row_off == round(
                window.row_off
            ), f"{name}: the box's cells are not the scene's"
            assert (emb.width, emb.height) == (round(window.width), round(window.height))
            cell = 16 * 10  # m; the box, snapped outward to whole cells of the scene's lattice
            assert emb.bounds.left == b.left + dx0 // cell * cell, name
            assert emb.bounds.right == b.left + -(-dx1 // cell) * cell, name
            np.testing.assert_allclose(
                emb.read(),
                whole.read(window=window.round_offsets().round_lengths()),
                atol=1e-5,
                equal_nan=True,
            )
    assert len(gpd.read_parquet(tmp_path / "corner/ftw_s2_l2a_33N_pooled.parquet")) == 1
    with rasterio.open(tmp_path / "cell/ftw_s2_l2a_33N_grid.tif") as emb:
        assert (emb.width, emb.height) == (1, 1)
    # helper-91: overlapping chips (--stride 112) meeting a box were left out (1 of 4, cells
    # off by up to 1.47), and a lon/lat box's corner cell, outside the box's rotated outline
    # in UTM but inside its grid, was NaN
    common = ["--weights", str(base_checkpoint), "--output", "both", "--no-progress"]
    whole112 = tmp_path / "whole112"
    assert main(["embed", str(SCENE), "-o", str(whole112), "--stride", "112", *common]) == 0
    cases = {
        "overlap": (whole112, ["--stride", "112", "--bbox", "13.11", "48.275", "13.13", "48.29"]),
        "rotated": (
            reference_run,
            ["--bbox", "13.12435713157111", "48.29426017949499", "13.13073483776841",
             "48.303202020698826"],
        ),
    }  # fmt: skip
    for name, (whole_run, extra) in cases.items():
        out = tmp_path / name
        assert main(["embed", str(SCENE), "-o", str(out), *extra, *common]) == 0
        rows = gpd.read_parquet(out / "ftw_s2_l2a_33N_pooled.parquet")
        ref_rows = gpd.read_parquet(whole_run / "ftw_s2_l2a_33N_pooled.parquet")
        assert set(rows.chip_id) <= set(ref_rows.chip_id), name
        with (
            rasterio.open(out / "ftw_s2_l2a_33N_grid.tif") as emb,
            rasterio.open(whole_run / "ftw_s2_l2a_33N_grid.tif") as whole,
        ):
            window = from_bounds(*emb.bounds, transform=whole.transform)
            expected = whole.read(window=window.round_offsets().round_lengths())
            got = emb.read()
        assert not np.isnan(got).any(), name  # the scene has data under every cell
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=name)
    assert len(gpd.read_parquet(tmp_path / "overlap/ftw_s2_l2a_33N_pooled.parquet")) == 4


def test_fit_on_a_full_disk_is_one_line_and_leaves_no_cut_checkpoint(tmp_path, monkeypatch, capsys):
    """Lightning's checkpoint save on a full disk: a traceback (exit 1) and a last.ckpt cut
    short under its final name (184 of 445 MB), its temporary file left in /tmp."""
    monkeypatch.chdir(tmp_path)
    cfg = Path(__file__).resolve().parents[1] / "torchgeo_dofa/configs/finetune_classification.yaml"
    with tmpfs(tmp_path / "full", "64m") as full:
        args = ["fit", "--config", str(cfg), "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
                "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                f"--trainer.logger.init_args.save_dir={full}"]  # fmt: skip
        assert main(args) == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("torchgeo-dofa: error: the disk is full (No space left on device)")
        assert err.endswith(
            "free space there (or point the trainer's default_root_dir / the logger's "
            "save_dir elsewhere) and rerun"
        ), err
        assert not [p for p in full.rglob("*.ckpt")], "a cut checkpoint was left"
        assert ".ckpt (cut short: removed): free space" in err, err


def test_predict_on_a_full_disk_names_its_output_folder(tmp_path, base_checkpoint, capsys):
    """helper-122: a predict config whose output folder could not be made on a full disk
    said "checkpoints are saved to the temporary folder ... set TMPDIR" (fit's line for
    Lightning's own checkpoint writes): the writers' line naming the folder was replaced."""
    with tmpfs(tmp_path / "full", "1m") as full:
        free = os.statvfs(full).f_bavail * os.statvfs(full).f_frsize
        (full / "filler").write_bytes(b"\0" * free)
        cfg = _predict_config(full / "out", base_checkpoint)
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["predict", "--config", str(tmp_path / "cfg.yaml")]) == 2
        assert (
            capsys.readouterr()
            .err.splitlines()[-1]
            .startswith(
                f"torchgeo-dofa: error: cannot use output folder {full / 'out'}: No space left on "
                "device (free some space there)"
            )
        )
        assert sorted(p.name for p in full.iterdir()) == ["filler"]


_FAR_LABELS = """
import lightning.pytorch as pl
from torchgeo.datasets import RasterDataset

from torchgeo_dofa import Sentinel2SR


class Labels(RasterDataset):
    is_image = False
    nodata = 255


class ImageAndLabels(pl.LightningDataModule):
    def __init__(self, image: str, labels: str) -> None:
        super().__init__()
        self.image, self.labels = image, labels

    def setup(self, stage: str) -> None:
        self.data = Sentinel2SR(self.image) & Labels(self.labels)


class LabelsAndImage(ImageAndLabels):
    def setup(self, stage: str) -> None:  # TorchGeo's own IntersectionDataset (its __and__)
        self.data = Labels(self.labels) & Sentinel2SR(self.image)
"""


def test_labels_off_the_image_in_a_fit_config_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """helper-111: labels that do not overlap the image, found by ``image & labels`` in a
    user's data module's ``setup`` under ``fit --config``, were Lightning's traceback and
    exit 1 (the message named both extents). Now that message alone, exit 2, and no run
    folder left. A folder of
    labels or images holding no raster likewise (TorchGeo's ``DatasetNotFoundError``)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "farlabels.py").write_text(_FAR_LABELS)
    with rasterio.open(SCENE) as src:  # one label file 5 km east of the scene
        east, top = src.bounds.right + 5000, src.bounds.top
        profile = {"driver": "GTiff", "width": 64, "height": 64, "count": 1, "dtype": "uint8",
                   "crs": src.crs, "nodata": 255,
                   "transform": Affine(10, 0, east, 0, -10, top)}  # fmt: skip
    (tmp_path / "labels").mkdir()
    with rasterio.open(tmp_path / "labels" / "far.tif", "w", **profile) as dst:
        dst.write(np.ones((1, 64, 64), np.uint8))
    config: dict[str, Any] = {
        "model": {"class_path": "torchgeo_dofa.tasks.DOFASegmentationTask",
                  "init_args": {"num_classes": 3, "weights": None, "ignore_index": 255}},
        "data": {"class_path": "farlabels.ImageAndLabels",
                 "init_args": {"image": str(SCENE), "labels": str(tmp_path / "labels")}},
        "trainer": {"max_epochs": 1, "enable_progress_bar": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": "logs"}}},
    }  # fmt: skip

    def refusal(config: dict[str, Any]) -> str:
        """The one line of a fit of ``config`` refused with exit 2, leaving no run folder."""
        (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
        assert main(["fit", "--config", "fit.yaml"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert not [line for line in err if line.startswith("Traceback")], err
        assert not list(tmp_path.glob("logs/*/version_*")), "the refused run left its folder"
        return err[-1]

    line = refusal(config)
    assert re.fullmatch(
        r"torchgeo-dofa: error: Sentinel2SR \[.*\] and Labels \[.*\] do not overlap \(bounds "
        r"as xmin, ymin, xmax, ymax in EPSG:32633\): check that both cover the same area, .*",
        line,
    ), line
    # helper-116: TorchGeo's own `labels & image` refuses it without extents: one line too
    config["data"]["class_path"] = "farlabels.LabelsAndImage"
    assert refusal(config) == "torchgeo-dofa: error: Datasets have no spatial intersection"
    # helper-122: a label folder holding no raster was TorchGeo's DatasetNotFoundError in a
    # traceback, exit 1: its message alone, naming the dataset's class, exit 2
    (tmp_path / "empty").mkdir()
    config["data"]["class_path"] = "farlabels.ImageAndLabels"
    config["data"]["init_args"]["labels"] = str(tmp_path / "empty")
    assert refusal(config) == (
        f"torchgeo-dofa: error: Labels: Dataset not found in `paths={str(tmp_path / 'empty')!r}` "
        "and cannot be automatically downloaded, either specify a different `paths` or "
        "manually download the dataset."
    )
    # TorchGeo's DependencyNotFoundError (a package a dataset needs; pip's name, with -):
    # its nine lines as one
    (tmp_path / "needs.py").write_text(
        "from farlabels import ImageAndLabels\n"
        "from torchgeo.datasets.utils import lazy_import\n"
        "class Needs(ImageAndLabels):\n"
        "    def setup(self, stage: str) -> None:\n"
        "        lazy_import('no_such_package_xyz')\n"
    )
    needs = {"class_path": "needs.Needs", "init_args": config["data"]["init_args"]}
    assert refusal(config | {"data": needs}) == (
        "torchgeo-dofa: error: no-such-package-xyz is not installed and is required to use this "
        "feature. Either run: $ pip install no-such-package-xyz to install just this "
        "dependency, or: $ pip install torchgeo[datasets,models] to install all optional "
        "dependencies."
    )
    # a TorchGeo dataset's download=True where its address is unreachable (the discard
    # port: nothing listens; offline it was the same URLError traceback, exit 1)
    (tmp_path / "refused.py").write_text(
        "from torchgeo.datamodules import NonGeoDataModule\n"
        "from torchgeo.datasets import EuroSAT100\n"
        "class Refused(EuroSAT100):\n"
        "    url = 'http://127.0.0.1:9/eurosat/'\n"
        "class RefusedModule(NonGeoDataModule):\n"
        "    def __init__(self, root: str) -> None:\n"
        "        super().__init__(Refused, batch_size=2, root=root, download=True)\n"
    )
    refused = {"class_path": "refused.RefusedModule", "init_args": {"root": "eurosat"}}
    line = refusal(config | {"data": refused})
    assert re.fullmatch(
        r"torchgeo-dofa: error: Refused: could not download the dataset \(URLError: .*\): run "
        r"where its address is reachable, or put the dataset's files in its root yourself and "
        r"set download: false",
        line,
    ), line
    # ... and an image folder holding none: the package's own NoRasterFoundError (one too)
    config["data"]["init_args"]["image"] = str(tmp_path / "empty")
    assert refusal(config) == (
        f"torchgeo-dofa: error: Sentinel2SR found no raster in paths={str(tmp_path / 'empty')!r}"
        " (reads .tif, .tiff, .jp2)"
    )


def test_config_values_pytorch_or_torchgeo_refuse_are_one_line(
    tmp_path, monkeypatch, capsys, base_checkpoint
) -> None:
    """``--model.init_args.lr -1`` (torch's "Invalid learning rate"; the task refuses it
    itself now, as it is made), a data module's ``batch_size 0`` (TorchGeo's
    MisconfigurationException; torch's DataLoader for predict): tracebacks, exit 1. Now one
    line, exit 2, nothing written."""
    import yaml

    monkeypatch.chdir(tmp_path)
    configs = Path(__file__).resolve().parents[1] / "torchgeo_dofa/configs"
    fit = ["fit", "--config", str(configs / "finetune_classification.yaml"),
           "--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false"]  # fmt: skip
    cases = [
        ([*fit, "--model.init_args.lr", "-1"], "lr must be a positive, finite learning"),
        ([*fit, "--data.init_args.batch_size", "0"], "SpectralDataModule.batch_size has length 0"),
    ]
    cfg = _predict_config(tmp_path / "out", base_checkpoint)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    predict = ["predict", "--config", str(tmp_path / "cfg.yaml")]
    cases.append(
        ([*predict, "--data.init_args.batch_size", "0"], "batch_size must be a whole number >= 1")
    )
    for args, said in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"torchgeo-dofa: error: {said}"), err[-3:]
        assert not any(line.startswith("Traceback") for line in err)
    # no output, nor the predict run's folder (it held LightningCLI's config.yaml and the lock)
    assert not list(tmp_path.rglob("*.tif")) and not list(tmp_path.rglob("*.parquet"))
    assert not (tmp_path / "out").exists()


def test_predict_never_saves_its_settings_over_a_config_it_did_not_save(
    tmp_path, monkeypatch, base_checkpoint, capsys
) -> None:
    """``predict --config config.yaml`` in the config's own folder (a predict config has no
    logger: LightningCLI saves the run's settings in the working folder) replaced the user's
    file with the resolved config, comments gone, exit 0. A file this package did not save
    is kept, with a warning; one it saved (an earlier run's, its first line says so) is
    replaced by the next run's, which loads as a --config again."""
    import yaml

    monkeypatch.chdir(tmp_path)
    cfg = _predict_config(tmp_path / "a", base_checkpoint)
    del cfg["trainer"]["default_root_dir"]  # as the shipped configs: the working folder
    mine = "# my notes\n" + yaml.safe_dump(cfg)
    (tmp_path / "config.yaml").write_text(mine)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["predict", "--config", "config.yaml"]) == 0
    assert (tmp_path / "config.yaml").read_text() == mine
    assert (
        f"{tmp_path / 'config.yaml'} is not a config this package saved (your own, or the "
        "--config given?): kept as it is, and this run's settings are not saved; give "
        "--trainer.default_root_dir FOLDER (or a logger) to keep them there"
    ) in [str(w.message) for w in caught]
    assert (tmp_path / "a" / "g.tif").is_file()
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(run)
    for out in ("b", "c"):  # the second run replaces the first one's settings
        table = str(tmp_path / out / "p.parquet")
        assert main(["predict", "--config", "../config.yaml",
                     f"--trainer.callbacks.init_args.path={table}"]) == 0  # fmt: skip
        saved = (run / "config.yaml").read_text()
        assert saved.startswith("# torchgeo-dofa: the settings of a predict run (")
        assert yaml.safe_load(saved)["trainer"]["callbacks"][1]["init_args"]["path"] == table
    capsys.readouterr()
    (tmp_path / "c" / "p.parquet").unlink()
    assert main(["predict", "--config", "config.yaml"]) == 0  # the saved one reruns the job
    assert (tmp_path / "c" / "p.parquet").is_file()


def test_a_predict_config_refused_late_leaves_nothing_it_made(
    tmp_path, monkeypatch, base_checkpoint, capsys
) -> None:
    """``predict --config`` refused after LightningCLI saved its config.yaml (Lightning
    refusing a limit_predict_batches fraction of no batch as the loop starts; a batch_size
    of 0 was refused so, as the loader was made, and is now refused as the data module is
    built) left that file and the writers' lock file in the output folder, which the run
    may have made: as embed, it leaves nothing it made, and what was there before stays."""
    import yaml

    def refused(out: Path, where: Path | None = None) -> None:
        cfg = _predict_config(out, base_checkpoint)
        if where is not None:  # no default_root_dir: LightningCLI saves in the working folder
            del cfg["trainer"]["default_root_dir"]
            monkeypatch.chdir(where)
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        args = ["predict", "--config", str(tmp_path / "cfg.yaml")]
        assert main([*args, "--trainer.limit_predict_batches", "0.001"]) == 2
        err = capsys.readouterr().err
        assert "`limit_predict_batches` argument. Try at least" in err, err

    refused(tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()  # made by the run, with its parent
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    refused(kept)
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]
    (kept / "config.yaml").write_text("an earlier run's\n")
    refused(kept)  # (LightningCLI overwrites it: what was there before stays there)
    assert sorted(p.name for p in kept.iterdir()) == ["config.yaml", "notes.txt"]
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.csv").write_text("x\n")
    refused(tmp_path / "elsewhere", where=work)
    assert sorted(p.name for p in work.iterdir()) == ["data.csv"]
    assert not (tmp_path / "elsewhere").exists()


def test_fit_through_the_console_script(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the example config logs to ./logs
    cfg = Path(__file__).resolve().parents[1] / "torchgeo_dofa/configs/finetune_classification.yaml"
    args = ["fit", "--config", str(cfg), "--trainer.fast_dev_run=true"]
    assert main([*args, "--trainer.enable_progress_bar=false"]) == 0


def test_a_damaged_or_foreign_ckpt_path_is_one_line_before_anything_runs(
    tmp_path, monkeypatch, capsys
) -> None:
    """``--ckpt_path`` went to Lightning's ``torch.load`` unchecked: a changed byte validated
    as other weights (exit 0, another val_loss), a truncated file gave a traceback, and a
    classification checkpoint under the segmentation config became a classification task
    (LightningCLI takes the class from the checkpoint) failing with KeyError: 'label'."""
    import zipfile

    monkeypatch.chdir(tmp_path)  # the example configs log to ./logs
    configs = Path(__file__).resolve().parents[1] / "torchgeo_dofa/configs"
    small = ["--data.init_args.num_samples=8", "--data.init_args.batch_size=4"]
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    fit = ["fit", "--config", str(configs / "finetune_classification.yaml"), *small, *quiet]
    assert main([*fit, "--trainer.max_epochs=1"]) == 0
    (saved,) = tmp_path.glob("logs/*/version_0/checkpoints/epoch=*.ckpt")  # and last.ckpt
    data = bytearray(saved.read_bytes())
    with zipfile.ZipFile(saved) as archive:
        entry = max(archive.infolist(), key=lambda i: i.file_size)  # a tensor's bytes
    data[entry.header_offset + 30 + len(entry.filename) + entry.file_size // 2] ^= 0xFF
    (tmp_path / "flip.ckpt").write_bytes(data)
    (tmp_path / "half.ckpt").write_bytes(saved.read_bytes()[: len(data) // 2])
    capsys.readouterr()
    validate = ["validate", "--config", str(configs / "finetune_classification.yaml"), *small]
    assert main([*validate, *quiet, "--ckpt_path", "flip.ckpt"]) == 2
    assert capsys.readouterr().err == (
        f"torchgeo-dofa: error: flip.ckpt is not a readable PyTorch checkpoint (corrupt copy or "
        f"disk error?): its entry {entry.filename} fails its CRC-32 check (bytes changed after "
        "it was saved); copy or save it again\n"
    )
    assert main([*validate, *quiet, "--ckpt_path", "half.ckpt"]) == 2
    assert "half.ckpt is not a readable PyTorch checkpoint (truncated" in capsys.readouterr().err
    versions = sorted(tmp_path.glob("logs/*/version_*"))
    for path, what in (("nope.ckpt", "does not exist"), ("logs", "is a folder")):
        assert main([*validate, *quiet, "--ckpt_path", path]) == 2  # tracebacks, exit 1, before
        assert capsys.readouterr().err == (
            f"torchgeo-dofa: error: --ckpt_path {path} {what}: give a checkpoint file (a fit's "
            "are in logs/<name>/version_<n>/checkpoints/), or 'last' / 'best' for those of this "
            "run's trainer\n"
        )
    assert sorted(tmp_path.glob("logs/*/version_*")) == versions  # no run folder made
    # a resume refused after LightningCLI saved its config.yaml (the checkpoint's optimizer
    # state diverged: checked as it is restored) left a version folder holding only that
    ckpt = torch.load(saved, map_location="cpu", weights_only=False)
    state = ckpt["optimizer_states"][0]["state"]
    state[sorted(state)[0]]["exp_avg"].view(-1)[:1] = float("nan")
    torch.save(ckpt, tmp_path / "nan.ckpt")
    assert main([*fit, "--trainer.max_epochs=2", "--ckpt_path", "nan.ckpt"]) == 2
    assert "holds non-finite optimizer state" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.glob("logs/*/version_*")) == ["version_0"]
    torch.save({"w": torch.ones(4)}, tmp_path / "weights.pth")  # no Lightning checkpoint
    assert main([*validate, *quiet, "--ckpt_path", "weights.pth"]) == 2  # KeyError before
    assert capsys.readouterr().err.startswith(
        "torchgeo-dofa: error: weights.pth is not a Lightning checkpoint (no "
        "'pytorch-lightning_version' in it"
    )
    segment = ["validate", "--config", str(configs / "finetune_segmentation.yaml"), *small]
    assert main([*segment, *quiet, "--ckpt_path", str(saved)]) == 2
    assert capsys.readouterr().err.endswith(
        "is a checkpoint of DOFAClassificationTask, but the config's model is "
        "DOFASegmentationTask: give a checkpoint of that task, or set model.class_path to "
        "torchgeo_dofa.tasks.DOFAClassificationTask\n"
    )
    # a fine-tuned task's predict had no writer: every batch computed, exit 0, nothing written
    task_predict = ["predict", "--config", str(configs / "finetune_classification.yaml")]
    assert main([*task_predict, *small, *quiet, "--ckpt_path", str(saved)]) == 2
    assert capsys.readouterr().err.endswith(
        "predict would write nothing: the config's trainer.callbacks has no prediction writer; "
        "DOFAClassificationTask's class probabilities are written by "
        "torchgeo_dofa.writers.ClassificationWriter over a DOFAPredictDataModule: predict "
        f"--config {configs / 'predict_classification.yaml'} --ckpt_path {saved} "
        "--data.init_args.paths YOUR_RASTERS\n"
    )
    # ... which that config does: a row per chip of the demo scene, its class and probabilities
    table = tmp_path / "outputs" / "classes.parquet"
    by_chip = [
        "predict", "--config", str(configs / "predict_classification.yaml"), *quiet,
        "--data.init_args.paths", str(SCENE), "--trainer.callbacks.init_args.path", str(table),
    ]  # fmt: skip
    assert main([*by_chip, "--ckpt_path", str(saved)]) == 0
    frame = gpd.read_parquet(table)
    assert len(frame) == 6 and frame.attrs["weights"] == str(saved)
    assert frame["class"].between(0, 3).all()  # the config's 4 classes
    np.testing.assert_allclose(np.stack(frame.probabilities).sum(axis=1), 1.0, rtol=1e-5)
    table.unlink()
    assert main(by_chip) == 2  # without the fine-tuned weights: an untrained head's classes
    assert capsys.readouterr().err.endswith(
        "torchgeo-dofa: error: predict with DOFAClassificationTask needs its fine-tuned "
        "weights: give --ckpt_path TASK.ckpt (a fit's are in logs/<name>/version_<n>/"
        f"checkpoints/), as in predict --config {configs / 'predict_classification.yaml'} "
        "--ckpt_path TASK.ckpt\n"
    )
    # the embedder takes a task checkpoint's encoder as weights, not as --ckpt_path
    embed_cfg = ["predict", "--config", str(configs / "predict_grid.yaml"), *quiet]
    assert main([*embed_cfg, "--ckpt_path", str(saved)]) == 2
    assert capsys.readouterr().err.endswith(
        "is a checkpoint of DOFAClassificationTask, but the config's model is DOFAEmbedder, "
        "which takes a fine-tuned task's encoder as its weights, not as --ckpt_path: give "
        f"--model.init_args.weights {saved} instead\n"
    )
    # the segmentation map's config with this classification checkpoint: its own config named
    map_cfg = ["predict", "--config", str(configs / "predict_segmentation.yaml"), *quiet]
    own = (
        f"predict --config {configs / 'predict_classification.yaml'} --ckpt_path {saved} "
        "--data.init_args.paths YOUR_RASTERS\n"
    )
    assert main([*map_cfg, "--ckpt_path", str(saved)]) == 2
    assert capsys.readouterr().err.endswith(
        "is a checkpoint of DOFAClassificationTask, but the config's model is "
        f"DOFASegmentationTask: give a checkpoint of that task, or predict it with its own "
        f"config: {own}"
    )
    # ... and with the task's class changed there, the map writer refused at once (a traceback)
    task = ["--model.class_path", "torchgeo_dofa.tasks.DOFAClassificationTask"]
    assert main([*map_cfg, *task, "--ckpt_path", str(saved)]) == 2
    assert capsys.readouterr().err.endswith(
        "SegmentationWriter writes the class probabilities of a segmentation task "
        "(DOFASegmentationTask), but DOFAClassificationTask is not one: ClassificationWriter "
        f"writes that task's predictions; the config for DOFAClassificationTask: {own}"
    )
    assert not table.exists() and not (tmp_path / "outputs" / "predict_classes.tif").exists()


@pytest.mark.parametrize("origin", ["file", "official"])
def test_a_task_checkpoint_predicts_where_its_original_weights_are_not(
    tmp_path, monkeypatch, capsys, base_checkpoint, origin
) -> None:
    """``predict --ckpt_path`` built the task from its hyperparameters' ``weights`` (the
    encoder it was fine-tuned from) before the checkpoint replaced them: on a machine without
    that file (or without the official weights, offline) the job failed ("weights file ...
    does not exist"), and the warning listed the weights, and settings the config never gave,
    as settings the checkpoint replaced.
    """
    monkeypatch.chdir(tmp_path)  # the example configs log to ./logs
    configs = Path(__file__).resolve().parents[1] / "torchgeo_dofa/configs"
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    encoder = tmp_path / "w" / "DOFA_ViT_base_e100.pth"
    encoder.parent.mkdir()
    shutil.copy(base_checkpoint, encoder)
    fit = [
        "fit", "--config", str(configs / "finetune_classification.yaml"), *quiet,
        "--data.init_args.num_samples=8", "--data.init_args.batch_size=4",
        "--trainer.max_epochs=1", "--model.init_args.weights", str(encoder),
    ]  # fmt: skip
    assert main(fit) == 0
    (saved,) = tmp_path.glob("logs/*/version_0/checkpoints/epoch=*.ckpt")
    if origin == "official":  # fine-tuned from the official weights, absent here
        ckpt = torch.load(saved, weights_only=True)
        ckpt["hyper_parameters"]["weights"] = "official"
        torch.save(ckpt, saved)
        monkeypatch.setenv("TORCHGEO_DOFA_BASE_WEIGHTS", str(tmp_path / "absent.pth"))
    encoder.unlink()
    capsys.readouterr()
    table = tmp_path / "classes.parquet"
    predict = [
        "predict", "--config", str(configs / "predict_classification.yaml"), *quiet,
        "--data.init_args.paths", str(SCENE), "--trainer.callbacks.init_args.path", str(table),
        "--ckpt_path", str(saved),
    ]  # fmt: skip
    assert main(predict) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    # the shipped predict config names the shipped fit config's num_classes: nothing replaced
    # (it said 2, and every checkpoint of the shipped fit config was warned about; the
    # warning itself: test_a_ckpt_path_keyword_is_checked_as_the_file_it_names, num_classes 3
    # under a 4-class file)
    assert "hyperparameters replace the config's" not in err, err
    # the same probabilities as the task loaded in Python and predicted chip by chip
    task = DOFAClassificationTask.load_from_checkpoint(saved)
    assert task.encoder.weights_id == f"file:{saved.name}"
    _assert_the_tasks_table(gpd.read_parquet(table), task, saved)
    if origin == "file":  # a file named as Lightning's keyword is not what it loads for it
        Path("last").symlink_to(saved)
        table.unlink()
        assert main([*predict[:-1], "last"]) == 2  # no last checkpoint of this run: ...
        assert capsys.readouterr().err.endswith(f"weights file '{encoder}' does not exist\n")
        assert not table.exists()  # ... the task's own weights, absent here: nothing written


def _save_from_python(task: DOFAClassificationTask, path: Path) -> Path:
    """Give ``task`` a head whose classes differ from chip to chip and save its checkpoint as
    Python code does (``trainer.save_checkpoint``)."""
    assert isinstance(task.head, torch.nn.Linear)
    torch.nn.init.normal_(task.head.weight)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(task)
    trainer.save_checkpoint(path)
    return path


class HeadOnlyTask(DOFAClassificationTask):
    """Lightning's way to keep a frozen encoder out of checkpoints: ``strict_loading = False``
    and a state dict of the head alone (the encoder comes from ``weights``)."""

    def __init__(self, num_classes: int, weights: str | None = None) -> None:
        super().__init__(num_classes=num_classes, weights=weights, head_norm=False)
        self.strict_loading = False

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        state = super().state_dict(*args, **kwargs)
        return {k: v for k, v in state.items() if not k.startswith("encoder.")}


def test_a_checkpoint_without_the_encoder_takes_it_from_weights(tmp_path, base_checkpoint) -> None:
    """A task keeping its encoder out of its checkpoints, loaded from one (Python's
    ``load_from_checkpoint``, or built for ``--ckpt_path`` as the command builds it), ran the
    encoder built unfilled for the checkpoint: NaN probabilities, class 0, exit 0."""
    task = HeadOnlyTask(num_classes=3, weights=str(base_checkpoint))
    saved = _save_from_python(task, tmp_path / "head.ckpt")
    state = torch.load(saved, weights_only=True)["state_dict"]
    assert state and not any(k.startswith("encoder.") for k in state)
    # the command's build for --ckpt_path, then Lightning's restore of the head
    with restoring_from(saved):
        built = HeadOnlyTask(num_classes=3, weights=str(base_checkpoint))
    table = tmp_path / "classes.parquet"
    trainer = pl.Trainer(
        callbacks=[ClassificationWriter(table, metadata={"weights": str(saved)})],
        logger=False,
        enable_progress_bar=False,
    )
    dm = DOFAPredictDataModule(SCENE, batch_size=4)
    trainer.predict(built, datamodule=dm, ckpt_path=saved, return_predictions=False)
    _assert_the_tasks_table(gpd.read_parquet(table), task.eval(), saved)
    # Python's load: the same probabilities as the task saved
    loaded = HeadOnlyTask.load_from_checkpoint(saved)
    _assert_the_tasks_table(gpd.read_parquet(table), loaded, saved)
    assert loaded.encoder.weights_id == not_official(base_checkpoint)
    assert loaded.hparams["weights"] == str(base_checkpoint)  # for its next checkpoint
    # a random encoder left out of the checkpoint cannot come back: said, not silent
    _save_from_python(HeadOnlyTask(num_classes=3), saved)
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="lacks 172 of the encoder's tensors and the task's "):
        first = HeadOnlyTask.load_from_checkpoint(saved)
    # ... drawn with one seed: every DDP rank and rerun the same, whatever the global RNG's state
    torch.manual_seed(2)
    with pytest.warns(UserWarning, match=r"drawn at random \(seed 0\)"):
        again = HeadOnlyTask.load_from_checkpoint(saved)
    for (name, a), b in zip(
        first.encoder.state_dict().items(), again.encoder.state_dict().values()
    ):
        assert torch.equal(a, b), name
    assert first.encoder.weights_id == "random (seed 0)"


def _assert_the_tasks_table(frame: Any, task: DOFAClassificationTask, saved: Path) -> None:
    """``frame`` (``predict_classification.yaml`` over the demo scene, ``--ckpt_path saved``)
    holds ``task``'s probabilities of each chip, computed here chip by chip."""
    assert len(frame) == 6 and frame.attrs["weights"] == str(saved)
    dm = DOFAPredictDataModule(SCENE)
    dm.setup("predict")
    assert dm.predict_dataset is not None and dm.predict_sampler is not None
    chips: list[Any] = list(dm.predict_sampler)  # (x, y, t) slices
    with torch.inference_mode():
        want = {
            (chip[0].start, chip[1].start, chip[0].stop, chip[1].stop): task.predict_step(
                stack_samples([dm.predict_dataset[chip]]), 0
            )[0].numpy()
            for chip in chips
        }
    got = dict(zip(map(tuple, frame.geometry.bounds.to_numpy()), frame.probabilities, strict=True))
    assert sorted(got) == sorted(want)
    for bounds, probabilities in got.items():
        np.testing.assert_allclose(probabilities, want[bounds], atol=1e-5)  # batch of 4 vs 1


SCENE_WAVELENGTHS = [0.49, 0.56, 0.665, 0.842]


def test_a_checkpoint_of_a_task_built_in_python_predicts_from_the_command(
    tmp_path, monkeypatch, capsys, base_checkpoint
) -> None:
    """A checkpoint of a task built in Python failed under ``predict --ckpt_path`` ("Parsing
    of ckpt_path hyperparameters failed": no ``_class_path``, Lightning #20801), and one built
    with ``weights=Path(...)`` or NumPy wavelengths failed every loader, Python's too
    ("Weights only load failed": torch >= 2.6 reads hyperparameters with ``weights_only``)."""
    monkeypatch.chdir(tmp_path)
    # what Python code passes, beside the annotated str / int / list[float]
    given: dict[str, Any] = {
        "num_classes": np.int64(3),
        "weights": Path(base_checkpoint),
        "wavelengths": np.array(SCENE_WAVELENGTHS),  # the demo scene's B02, B03, B04, B08
    }
    task = DOFAClassificationTask(**given, head_norm=False)
    saved = _save_from_python(task, tmp_path / "notebook.ckpt")
    hparams = torch.load(saved, weights_only=True)["hyper_parameters"]
    assert hparams["weights"] == str(base_checkpoint) and hparams["num_classes"] == 3
    assert hparams["wavelengths"] == SCENE_WAVELENGTHS
    loaded = DOFAClassificationTask.load_from_checkpoint(saved)
    assert "_class_path" not in loaded.hparams
    configs = Path(__file__).resolve().parents[1] / "torchgeo_dofa/configs"
    table = tmp_path / "classes.parquet"
    predict = [
        "predict", "--config", str(configs / "predict_classification.yaml"),
        "--trainer.enable_progress_bar=false", "--data.init_args.paths", str(SCENE),
        "--trainer.callbacks.init_args.path", str(table), "--ckpt_path", str(saved),
    ]  # fmt: skip
    assert main(predict) == 0, capsys.readouterr().err
    _assert_the_tasks_table(gpd.read_parquet(table), loaded, saved)
    # a diverged fine-tuning's (NaN weights): refused at its load, one line, nothing written
    table.unlink()
    with torch.no_grad():
        task.get_parameter("head.bias")[1] = float("nan")
    _save_from_python(task, saved)
    assert main(predict) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith(
        f"torchgeo-dofa: error: the checkpoint {saved} holds non-finite weights (NaN or "
        "infinity) in 1 tensor(s): head.bias (1 of 3 values); every output of the model would "
        "be NaN"
    )
    assert not table.exists()
    # a segmentation task's, under the classification config: named, as for the command's own
    segmentation = DOFASegmentationTask(num_classes=3, weights=str(base_checkpoint))
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(segmentation)
    trainer.save_checkpoint(saved)
    assert main(predict) == 2
    assert capsys.readouterr().err.endswith(
        f"torchgeo-dofa: error: {saved} is a checkpoint of DOFASegmentationTask, but the "
        "config's model is DOFAClassificationTask: give a checkpoint of that task, or predict "
        f"it with its own config: predict --config {configs / 'predict_segmentation.yaml'} "
        f"--ckpt_path {saved} --data.init_args.paths YOUR_RASTERS\n"
    )
    assert not table.exists()


def test_predict_of_chips_on_no_map_is_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    base_checkpoint: Path,
) -> None:
    """helper-123: ``predict --config`` with a data module of chips that have no place
    (TorchGeo's EuroSATDataModule: no predict_dataset) ended in a RuntimeError traceback,
    exit 1, naming PooledWriter (behind the configured ClassificationWriter) and no fix; the
    segmentation map's GridWriter alike. Now one line naming the writer configured, the data
    module and the fix, exit 2, nothing written."""
    monkeypatch.chdir(tmp_path)
    configs = Path(__file__).resolve().parents[1] / "torchgeo_dofa/configs"
    eurosat = ["--data", "torchgeo.datamodules.EuroSATDataModule",
               "--data.dict_kwargs.root", str(tmp_path / "no-eurosat")]  # fmt: skip
    segmentation = DOFASegmentationTask(num_classes=3, weights=str(base_checkpoint))
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(segmentation)
    trainer.save_checkpoint(tmp_path / "seg.ckpt")
    classification = DOFAClassificationTask(3, weights=str(base_checkpoint), head_norm=False)
    for config, ckpt, writer, suffix in (
        ("predict_classification.yaml", _save_from_python(classification, tmp_path / "cls.ckpt"),
         "ClassificationWriter", ".parquet"),
        ("predict_segmentation.yaml", tmp_path / "seg.ckpt", "SegmentationWriter", ".tif"),
    ):  # fmt: skip
        out = tmp_path / "out" / f"{writer}{suffix}"
        given = ["predict", "--config", str(configs / config), "--ckpt_path", str(ckpt),
                 "--trainer.callbacks.init_args.path", str(out), *eurosat]  # fmt: skip
        assert main(given) == 2, writer
        err = capsys.readouterr().err.strip().splitlines()
        assert not [line for line in err if line.startswith("Traceback")], err
        assert err[-1] == (
            f"torchgeo-dofa: error: {writer} writes georeferenced outputs: it needs a data "
            "module whose predict_dataset and predict_sampler place the chips on a map (a "
            "TorchGeo GeoDataset and sampler, as DOFAPredictDataModule's), and "
            "EuroSATDataModule has no predict_dataset; predict chips without a place in "
            "Python instead (Trainer.predict(task, dataloaders=...) returns each batch's "
            "predictions)"
        ), err[-3:]
        assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    # a data module whose predict_dataset is no GeoDataset (a ChipFolder's kind): it was an
    # AttributeError traceback ('... has no attribute crs'), or named no predict_dataset
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "chipsdm.py").write_text(
        "import lightning.pytorch as pl\n"
        "import torch\n"
        "class Chips(torch.utils.data.Dataset):\n"
        "    def __len__(self) -> int:\n"
        "        return 2\n"
        "    def __getitem__(self, i: int) -> dict:\n"
        "        return {'image': torch.zeros(4, 224, 224)}\n"
        "class ChipsModule(pl.LightningDataModule):\n"
        "    def setup(self, stage: str) -> None:\n"
        "        self.predict_dataset = Chips()\n"
        "    def predict_dataloader(self):\n"
        "        return torch.utils.data.DataLoader(self.predict_dataset, batch_size=2)\n"
    )
    out = tmp_path / "out" / "chips.parquet"
    given = ["predict", "--config", str(configs / "predict_classification.yaml"), "--ckpt_path",
             str(tmp_path / "cls.ckpt"), "--trainer.callbacks.init_args.path", str(out),
             "--data", "chipsdm.ChipsModule"]  # fmt: skip
    assert main(given) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1].startswith(
            "torchgeo-dofa: error: ClassificationWriter writes georeferenced outputs: it needs a "
        )
        and "and ChipsModule's predict_dataset is a Chips, not a GeoDataset; " in err[-1]
    ), err[-3:]
    assert not out.exists()


def test_a_ckpt_path_keyword_is_checked_as_the_file_it_names(
    tmp_path, monkeypatch, capsys, base_checkpoint
) -> None:
    """Lightning's ``--ckpt_path last`` found no last checkpoint in a new ``predict`` and only
    warned, so the task's untrained head wrote a table (exit 0); ``best`` (a fit's in the same
    process) and ``hpc`` ended in Lightning's ``ValueError`` traceback. A file ``last`` did
    find was not taken as a file given by name: a truncated one, another task's or one saved
    with other settings ended in tracebacks. Now it is, and predicts."""
    monkeypatch.chdir(tmp_path)
    configs = Path(__file__).resolve().parents[1] / "torchgeo_dofa/configs"
    table = tmp_path / "classes.parquet"
    predict = [
        "predict", "--config", str(configs / "predict_classification.yaml"),
        "--trainer.enable_progress_bar=false", "--data.init_args.paths", str(SCENE),
        "--trainer.callbacks.init_args.path", str(table),
        "--model.init_args.weights", str(base_checkpoint), "--model.init_args.num_classes", "3",
        "--model.init_args.head_norm", "false",
    ]  # fmt: skip
    # Lightning's own ModelCheckpoint (the predict configs name none) looks in ./checkpoints
    folder = tmp_path / "checkpoints"
    for keyword, reason in [
        ("last", f"no last checkpoint in {folder}, where the trainer's ModelCheckpoint looks, "
         "so the predict would use the task's untrained head"),
        ("best", "'best' is the best checkpoint of a fit run earlier in the same process, and "
         "this command has run none"),
        ("hpc", "'hpc' is a SLURM requeue checkpoint, and none was found"),
    ]:  # fmt: skip
        assert main([*predict, "--ckpt_path", keyword]) == 2
        assert capsys.readouterr().err.endswith(
            f"torchgeo-dofa: error: --ckpt_path {keyword} names no checkpoint here ({reason}): "
            "give the checkpoint file instead (a fit's are in logs/<name>/version_<n>/"
            "checkpoints/, e.g. last.ckpt)\n"
        )
        assert not table.exists()
    last = folder / "last.ckpt"
    # found, saved with other settings: they replace the config's, as for a file given by
    # name (the config's num_classes=3 built a head the 4-class checkpoint failed to fill)
    four = DOFAClassificationTask(num_classes=4, weights=str(base_checkpoint), head_norm=False)
    _save_from_python(four, last)
    assert main([*predict, "--ckpt_path", "last"]) == 0
    err = capsys.readouterr().err
    assert f"torchgeo-dofa: --ckpt_path last is {last}\n" in err
    # helper-111: predict was advised to give --model.init_args.weights instead (a new,
    # untrained head): that advice is fit's alone
    assert "hyperparameters replace the config's: num_classes=4 (the config said 3)\n" in err
    _assert_the_tasks_table(gpd.read_parquet(table), four, last)
    table.unlink()
    # ... and the config the run saves says so (it said the config's num_classes=3)
    saved_config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved_config["model"]["init_args"]["num_classes"] == 4
    # another task's, and a truncated one: as when given by name
    segmentation = DOFASegmentationTask(num_classes=3, weights=str(base_checkpoint))
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(segmentation)
    trainer.save_checkpoint(last)
    assert main([*predict, "--ckpt_path", "last"]) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith(
        f"torchgeo-dofa: error: {last} is a checkpoint of DOFASegmentationTask, but the "
        "config's model is DOFAClassificationTask"
    )
    last.write_bytes(last.read_bytes()[: 2**20])
    assert main([*predict, "--ckpt_path", "last"]) == 2
    assert "is not a readable PyTorch checkpoint" in capsys.readouterr().err.splitlines()[-1]
    assert not table.exists()
    # a matching one in the folder of the trainer's ModelCheckpoint: Lightning loads it
    task = DOFAClassificationTask(num_classes=3, weights=str(base_checkpoint), head_norm=False)
    _save_from_python(task, last)
    keep = [
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.dirpath", str(folder), "--trainer.callbacks.save_last", "true",
    ]  # fmt: skip
    assert main([*predict, *keep, "--ckpt_path", "last"]) == 0, capsys.readouterr().err
    _assert_the_tasks_table(gpd.read_parquet(table), task, last)


class _KeepBatch(pl.Callback):
    """Keeps the preprocessed input of the first prediction batch."""

    batch: dict[str, Any] | None = None

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.batch is None:
            self.batch = {k: v.detach().float().cpu().clone() for k, v in batch.items()}


def test_bf16_mixed_precision_is_as_exact_as_torchgeo(tmp_path, base_checkpoint, base_state):
    with rasterio.open(SCENE) as src:
        b = src.bounds
    lo0, la0 = _scene_lonlat(b.left + 100, b.bottom + 100)
    lo1, la1 = _scene_lonlat(b.left + 2000, b.bottom + 2000)
    frames, kept = {}, _KeepBatch()
    for precision in ("32", "bf16"):
        summary = embed(
            [SCENE],
            tmp_path / precision,
            output="pooled",
            weights=str(base_checkpoint),
            precision=precision,
            bbox=(lo0, la0, lo1, la1),
            progress=False,
            callbacks=[kept],
        )
        assert summary.chips == 1
        frames[precision] = gpd.read_parquet(tmp_path / precision / "ftw_s2_l2a_33N_pooled.parquet")
    ref, low = (torch.from_numpy(np.stack(frames[p].embedding)) for p in ("32", "bf16"))
    assert not torch.equal(ref, low)  # bf16 really ran
    # judged against TorchGeo's DOFA under the same autocast on the same chip and weights
    assert kept.batch is not None
    image, wavelengths = kept.batch["image"], kept.batch["wavelengths"][0].tolist()
    reference = torchgeo_bf16_error(base_state, image, wavelengths)
    assert_as_exact_as_torchgeo(cosine_error(ref, low), reference)


def _one_chip_bbox(path: Path) -> list[str]:
    """A --bbox covering about one 224-px chip at the lower-left of a raster in EPSG:32633."""
    with rasterio.open(path) as src:
        b = src.bounds
    lo0, la0 = _scene_lonlat(b.left + 100, b.bottom + 100)
    lo1, la1 = _scene_lonlat(b.left + 2000, b.bottom + 2000)
    return ["--bbox", str(lo0), str(la0), str(lo1), str(la1)]


FTW_DATES = ["B4", "B3", "B2", "B8", "B4_1", "B3_1", "B2_1", "B8_1"]


def test_multidate_stack_without_descriptions_embeds_one_date(
    tmp_path, capsys, shared_s2, base_checkpoint
) -> None:
    ftw = shared_s2 / "ftw" / "inference-img.tif"
    common = [*_one_chip_bbox(ftw), "--weights", str(base_checkpoint), "--no-progress"]
    # without names the error names the CLI's own option
    assert main(["embed", str(ftw), "-o", str(tmp_path / "x"), *common]) == 2
    err = capsys.readouterr().err
    assert "--file-bands B1 B2 B3" in err and "file_bands=" not in err
    # naming both dates and selecting all of them is refused: one date at a time
    args = ["embed", str(ftw), "--file-bands", *FTW_DATES]
    assert main([*args, "--bands", *FTW_DATES, "-o", str(tmp_path / "y"), *common]) == 2
    err = capsys.readouterr().err
    assert "Select one date, e.g. --bands B4 B3 B2 B8 or --bands B4_1 B3_1 B2_1 B8_1" in err
    assert not (tmp_path / "y").exists()
    # the second date, selected by its Earth Engine style names
    second = FTW_DATES[4:]
    assert main([*args, "--bands", *second, "-o", str(tmp_path / "d2.tif"), *common]) == 0
    assert main([*args, "--bands", *FTW_DATES[:4], "-o", str(tmp_path / "d1.tif"), *common]) == 0
    with rasterio.open(tmp_path / "d2.tif") as d2, rasterio.open(tmp_path / "d1.tif") as d1:
        assert json.loads(d2.tags()["bands"]) == second
        assert json.loads(d2.tags()["wavelengths"]) == [0.665, 0.56, 0.49, 0.842]
        assert json.loads(d1.tags()["wavelengths"]) == [0.665, 0.56, 0.49, 0.842]
        assert not np.allclose(d1.read(), d2.read(), equal_nan=True)  # two dates differ
    assert (tmp_path / "d2.parquet").is_file()  # --output both: the sibling table


def test_bands_of_two_dates_are_refused_before_anything_is_written(tmp_path, capsys) -> None:
    """helper-135: ``--bands B4 B3 B2 B8_1`` (a forgotten ``_1``, or one too many) embedded
    the first date's visible bands with the second date's near infrared, an image never
    acquired, exit 0; only two dates of one band (``B4 B4_1``) were refused."""
    out = tmp_path / "out"
    named = ["--file-bands", "B4", "B3", "B2", "B8_1"]
    common = ["--weights", "none", "--no-progress", "-o", str(out)]
    assert main(["embed", str(SCENE), *named, "--bands", "B4", "B3", "B2", "B8_1", *common]) == 2
    assert capsys.readouterr().err.endswith(
        "torchgeo-dofa: error: --bands B4 B3 B2 B8_1 mix the dates of a multi-date stack (B4, "
        "B3, B2 of the first date; B8_1 of date _1): DOFA embeds one date at a time, every "
        "band from it (Earth Engine names a later date's copy of B4 as B4_1, B4_2, ...). "
        "Select one date, e.g. --bands B4 B3 B2 B8 or --bands B4_1 B3_1 B2_1 B8_1\n"
    )
    assert not out.exists()
    # two later dates, other bands beside them unchecked (they carry no date)
    bands = ["B4_2", "B3_2", "VV", "B8_1"]
    assert main(["embed", str(SCENE), "--file-bands", *bands, "--bands", *bands, *common]) == 2
    assert capsys.readouterr().err.endswith(
        "(B4_2, B3_2 of date _2; B8_1 of date _1): DOFA embeds one date at a time, every band "
        "from it (Earth Engine names a later date's copy of B4 as B4_1, B4_2, ...). Select one "
        "date, e.g. --bands B4_2 B3_2 VV B8_2 or --bands B4_1 B3_1 VV B8_1\n"
    )
    assert not out.exists()


def test_a_region_failing_after_another_names_the_outputs_kept(tmp_path, capsys) -> None:
    """helper-135: a job of two inputs whose second was refused while its chips were read
    exited 2 with the first input's outputs in the folder and not a word of them."""
    with rasterio.open(SCENE) as src:
        data = src.read().astype(np.float32) / 10000  # already scaled, but for an outlier
    data[0, :40, :40] = 7.0  # passes the job's check; a chip without it is refused as read
    outlier = _write_scene_variant(tmp_path / "outlier.tif", data, dtype="float32", nodata=None)
    out = tmp_path / "out"
    args = [str(SCENE), str(outlier), "-o", str(out), "--weights", "none", "--no-progress"]
    assert main(["embed", *args, "--output", "pooled"]) == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith("torchgeo-dofa: error: outlier.tif, the chip "), line
    assert line.endswith(
        "(the outputs of the 1 region(s) before it are finished and kept: "
        "ftw_s2_l2a_33N_pooled.parquet; a rerun of the same command skips them)"
    ), line
    assert (out / "ftw_s2_l2a_33N_pooled.parquet").is_file()
    assert main(["embed", *args, "--output", "pooled", "--overwrite"]) == 2
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .endswith("ftw_s2_l2a_33N_pooled.parquet; a rerun with --overwrite computes them again)")
    )  # it said a rerun skips them (helper-137)
    # the first region failing: nothing before it to name
    assert main(["embed", str(outlier), "-o", str(tmp_path / "alone"), *args[4:]]) == 2
    assert "region(s) before it" not in capsys.readouterr().err


def test_a_sentinel2_product_asked_for_as_a_band_is_named_as_such(tmp_path, capsys) -> None:
    """helper-135: ``--bands B4 B3 B2 SCL`` was told to pass ``--wavelengths`` for SCL (which
    would embed class codes as reflectance), or that SCL was not found, where the file of a
    folder holding it is left out on purpose."""
    out = tmp_path / "out"
    common = ["--weights", "none", "--no-progress", "-o", str(out)]
    product = (
        "is a Sentinel-2 product (scene classes, quality or cloud masks, aerosol or water "
        "vapour, a true-colour preview), not reflectance, which DOFA embeds (it has no "
        "wavelength for it): leave it out of --bands; to leave pixels out, give --nodata or a "
        "mask or alpha band in the files\n"
    )
    named = ["--file-bands", "B4", "B3", "B2", "SCL", "--bands", "B4", "B3", "B2", "SCL"]
    assert main(["embed", str(SCENE), *named, *common]) == 2
    assert capsys.readouterr().err.endswith(f"torchgeo-dofa: error: SCL {product}")
    # a band of your own named like a product is not one (helper-137)
    named = ["--file-bands", "B4", "B3", "B2", "LST_QA", "--bands", "B4", "B3", "B2", "LST_QA"]
    assert main(["embed", str(SCENE), *named, *common]) == 2
    assert "cannot infer wavelengths for band(s) ['LST_QA']" in capsys.readouterr().err
    assert main(["embed", str(SCENE), "--bands", "B4", "B3", "QA60", *common]) == 2
    assert capsys.readouterr().err.endswith(
        f"band(s) ['QA60'] not found in {SCENE} (it has ['B4', 'B3', 'B2', 'B8']); QA60 {product}"
    )
    assert not out.exists()


def test_list_options_take_comma_separated_values(tmp_path, capsys) -> None:
    """helper-135: ``--bands B4,B3,B2`` was one band named ``B4,B3,B2`` ("not found"), and
    ``--file-bands B4,B3,B2,B8`` a name refused with a hint to write ``B4``; GDAL and many
    tools write lists so. Read as the same bands as ``B4 B3 B2``, ``B4, B3, B2`` too; numbers
    are not split (a decimal comma)."""
    common = ["--weights", "none", "--no-progress", "--output", "pooled", "--seed", "1"]
    runs = {
        "spaced": ["--bands", "B4", "B3", "B2"],
        "commas": ["--file-bands", "B4, B3,", "B2", "B8", "--bands", "B4,B3,B2"],
    }
    tables = {}
    for name, args in runs.items():
        assert main(["embed", str(SCENE), *args, *common, "-o", str(tmp_path / name)]) == 0
        tables[name] = gpd.read_parquet(tmp_path / name / "ftw_s2_l2a_33N_pooled.parquet")
    assert tables["commas"].attrs["bands"] == tables["spaced"].attrs["bands"]
    assert json.loads(tables["commas"].attrs["bands"]) == ["B4", "B3", "B2"]
    np.testing.assert_array_equal(
        np.stack(tables["commas"].embedding), np.stack(tables["spaced"].embedding)
    )
    capsys.readouterr()
    for args, error in [
        (["--wavelengths", "0.6", "x"], "argument --wavelengths: invalid float value: 'x'"),
        (  # a decimal comma, not two values (helper-137)
            ["--wavelengths", "0,8"],
            "argument --wavelengths: '0,8' holds a comma: separate the numbers with spaces and "
            "write decimals with a point (0.8, not 0,8)",
        ),
        (["--bands", ","], "argument --bands: expected at least one value, not commas alone"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(["embed", str(SCENE), *args, *common, "-o", str(tmp_path / "bad")])
        assert exit_.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1].endswith(error)
    assert not (tmp_path / "bad").exists()


def _write_one_chip_scene(
    path: Path,
    data: np.ndarray,
    descriptions: tuple[str, ...] | None = None,
    crs: str | None = "EPSG:32633",
) -> Path:
    """Write ``data`` (C, 224, 224) as a one-chip GeoTIFF at 10 m (UTM 33N unless ``crs``;
    None: no CRS)."""
    from rasterio.transform import from_origin

    with rasterio.open(
        path, "w", driver="GTiff", width=224, height=224, count=data.shape[0],
        dtype=data.dtype, crs=crs, transform=from_origin(500000, 5000000, 10, 10),
    ) as dst:  # fmt: skip
        dst.write(data)
        if descriptions is not None:
            dst.descriptions = descriptions
    return path


def test_a_crs_without_an_epsg_code_is_written_as_it_is(tmp_path, capsys) -> None:
    """A transverse Mercator on GRS80 with no datum was written out as EPSG:25833 (ETRS89 /
    UTM 33N, the closest code at 70 % confidence): the outputs relabelled the file's datum."""
    tmerc = "+proj=tmerc +lat_0=0 +lon_0=15 +k=0.9996 +x_0=500000 +y_0=0 +ellps=GRS80 +units=m"
    data = np.full((4, 224, 224), 1500, dtype=np.uint16)
    scene = _write_one_chip_scene(tmp_path / "s.tif", data, ("B2", "B3", "B4", "B8"), tmerc)
    out = tmp_path / "e.tif"
    job = ["embed", str(scene), "-o", str(out), "--weights", "none", "--seed", "0", "--no-progress"]
    assert main(job) == 0
    want = CRS.from_user_input(tmerc)
    with rasterio.open(out) as grid:
        assert CRS.from_user_input(grid.crs.to_wkt()).equals(want)
    assert gpd.read_parquet(out.with_suffix(".parquet")).crs.equals(want)
    # the job manifest recorded EPSG:25833 too: a rerun in ETRS89 was taken as the same job
    capsys.readouterr()
    assert main([*job, "--crs", "EPSG:25833"]) == 2
    err = capsys.readouterr().err
    utm = "+proj=utm +zone=33 +ellps=GRS80 +units=m +no_defs"  # the file's CRS, by its PROJ name
    assert f"another job's results: crs was {utm}, now EPSG:25833;" in err
    assert main([*job, "--crs", tmerc]) == 0  # the file's own CRS, spelled otherwise: resumed
    assert "(1 already done)" in capsys.readouterr().out.splitlines()[-1]
    # a CRS with an equivalent code keeps its code, however spelled (the same job resumes)
    utm = CRS.from_epsg(32633).to_wkt("WKT1_ESRI")
    esri = _write_one_chip_scene(tmp_path / "esri.tif", data, ("B2", "B3", "B4", "B8"), utm)
    common = ["-o", str(tmp_path / "u.tif"), "--weights", "none", "--seed", "0", "--no-progress"]
    assert main(["embed", str(esri), *common]) == 0
    with rasterio.open(tmp_path / "u.tif") as grid:
        assert grid.crs.to_epsg(confidence_threshold=100) == 32633
    assert main(["embed", str(esri), *common, "--crs", "EPSG:32633"]) == 0
    assert "(1 already done)" in capsys.readouterr().out.splitlines()[-1]


def test_a_resumed_jobs_counts_say_they_are_this_runs() -> None:
    """helper-127: a resumed job said "embedded 61 chips, 21 without valid pixels (20 already
    done)" and warned "21 chip(s) held no valid pixel" while its table held 30 no_data rows
    (9 among the chips done before): the counts are this run's, and now say so."""
    from torchgeo_dofa.cli import EmbedSummary

    line = EmbedSummary(chips=61, empty=21, skipped=20, seconds=2.0).line()
    assert line.startswith("embedded 61 more chips, 21 of them without valid pixels (20 "
                           "already done) in 2.0 s")  # fmt: skip
    fresh = EmbedSummary(chips=12, empty=6, seconds=2.0).line()
    assert fresh.startswith("embedded 12 chips, 6 without valid pixels in 2.0 s")


def test_13_band_stack_without_descriptions(tmp_path, base_checkpoint) -> None:
    names = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]
    rng = np.random.default_rng(0)
    data = rng.integers(300, 4000, (13, 224, 224), dtype=np.uint16)
    path = _write_one_chip_scene(tmp_path / "l1c_stack.tif", data)
    out = tmp_path / "out.tif"
    code = main(
        ["embed", str(path), "--file-bands", *names, "-o", str(out), "--output", "grid",
         "--weights", str(base_checkpoint), "--no-progress"]
    )  # fmt: skip
    assert code == 0
    with rasterio.open(out) as emb:
        # DOFA's 9 bands selected by default among the 13 named ones
        assert json.loads(emb.tags()["bands"]) == [
            "B4", "B3", "B2", "B5", "B6", "B7", "B8", "B11", "B12"
        ]  # fmt: skip
        grid = emb.read()
    # against the encoder on the same 9 channels, preprocessed independently of the job
    picks = [names.index(b) for b in ["B4", "B3", "B2", "B5", "B6", "B7", "B8", "B11", "B12"]]
    stack = DOFAPreprocess(["B4", "B3", "B2", "B5", "B6", "B7", "B8", "B11", "B12"])
    sample = stack({"image": torch.from_numpy(data[picks].astype(np.float32))})
    encoder = load_dofa("base", weights=base_checkpoint)
    with torch.inference_mode():
        ref = encoder(sample["image"][None], sample["wavelengths"]).grid[0].numpy()
    np.testing.assert_allclose(grid, ref, rtol=1e-4, atol=1e-4)


def test_another_sensors_bands_with_their_statistics_and_an_offset(
    tmp_path, base_checkpoint, capsys
) -> None:
    """Bands that are not Sentinel-2's embed with their wavelengths and statistics
    (--wavelengths, --mean, --std on DOFA's 0..255 scale); --offset is added to the digital
    numbers first. Checked against a numpy normalisation and the encoder."""
    rng = np.random.default_rng(1)
    data = rng.integers(1200, 5000, (4, 224, 224), dtype=np.uint16)
    path = _write_one_chip_scene(tmp_path / "planet.tif", data, ("red", "green", "blue", "nir"))
    waves, mean, std = [0.665, 0.565, 0.49, 0.865], [80.0, 85.0, 90.0, 70.0], [40, 45, 50, 35]
    common = [
        "embed", str(path), "--weights", str(base_checkpoint), "--no-progress",
        "--output", "grid", "--bands", "red", "green", "blue", "nir",
        "--wavelengths", *map(str, waves),
    ]  # fmt: skip
    capsys.readouterr()
    # without --bands: the names found, in file order, and the Sentinel-2 reading of them
    assert main([*common[: common.index("--bands")], "-o", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.strip() == (
        "torchgeo-dofa: error: no Sentinel-2 band is present in every scene (found ['red', "
        "'green', 'blue', 'nir']): pass --bands ... (and --wavelengths ... for non-Sentinel-2 "
        "bands); if they are Sentinel-2's bands, named as Earth Search's assets, name them "
        "so: --file-bands B4 B3 B2 B8 (in file order)"
    )
    # without wavelengths: refused with the CLI's option only (no Python example)
    no_waves = common[: common.index("--wavelengths")]
    assert main([*no_waves, "-o", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "torchgeo-dofa: error: cannot infer wavelengths for band(s) ['red', 'green', 'blue', "
        "'nir']: only Sentinel-2 bands"
    )
    assert err.endswith(
        "are known; pass --wavelengths ... (um, one per band of --bands red green blue nir)"
    )
    assert "(" not in err.split("are known;")[1].split("(um")[0]  # no DOFAPreprocess(...)
    # without statistics: refused, naming the options (not Python keywords)
    assert main([*common, "-o", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "no DOFA normalisation statistics" in err and "--mean ... and --std ..." in err
    for bad, message in [
        (["--mean", *map(str, mean)], "give both --mean ... and --std ..."),
        (["--mean", "80", "--std", "40"], "1 means and 1 stds for 4 bands"),
        (["--mean", "4475", "80", "80", "80", "--std", *map(str, std)], "multiply them by 0.0255"),
        (["--mean", *map(str, mean), "--std", "40", "0", "1", "1"], "std > 0"),
    ]:
        assert main([*common, *bad, "-o", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
    stats = ["--mean", *map(str, mean), "--std", *map(str, std)]
    out = tmp_path / "out"
    assert main([*common, *stats, "--offset", "-1000", "-o", str(out)]) == 0
    with rasterio.open(out / "planet_grid.tif") as emb:
        grid = emb.read()
        assert json.loads(emb.tags()["wavelengths"]) == waves
        # how the values were made travels with the file (helper-127: only the hidden
        # manifest said the offset, chip size and stride)
        made = {k: emb.tags()[k] for k in ("source_offsets", "chip_size", "stride")}
        assert made == {"source_offsets": "[[-1000.0, -1000.0, -1000.0, -1000.0]]",
                        "chip_size": "224", "stride": "224"}  # fmt: skip
        # a file declaring no nodata: the conventional fills are no data (helper-129: the
        # tag named one value of the four, and a class map's read "0.0" beside its own 255)
        assert json.loads(emb.tags()["input_nodata"]) == [-32768.0, -9999.0, 0.0, 65535.0]
        assert "nodata" not in emb.tags()
    raw = np.clip(data.astype(np.float64) - 1000, 0, 10000) / 10000 * 255
    x = (raw - np.array(mean)[:, None, None]) / np.array(std, dtype=np.float64)[:, None, None]
    encoder = load_dofa("base", weights=base_checkpoint)
    with torch.inference_mode():
        ref = encoder(torch.from_numpy(x).float()[None], waves).grid[0].numpy()
    np.testing.assert_allclose(grid, ref, rtol=1e-4, atol=1e-4)
    # other statistics, or another offset, are another job
    capsys.readouterr()
    other = ["--mean", "81", *map(str, mean[1:]), "--std", *map(str, std)]
    assert main([*common, *other, "--offset", "-1000", "-o", str(out)]) == 2
    assert "mean" in capsys.readouterr().err
    assert main([*common, *stats, "--offset", "0", "-o", str(out)]) == 2
    assert "offset" in capsys.readouterr().err


def test_a_refused_job_leaves_no_lock_file_in_a_folder_it_did_not_change(tmp_path, capsys) -> None:
    """A folder holding a file of the job's output name without a manifest is refused; the
    folder is left as it was (the lock file the job took was left behind)."""
    out = tmp_path / "notes"
    out.mkdir()
    (out / "ftw_s2_l2a_33N_pooled.parquet").write_text("notes\n")
    args = ["embed", str(SCENE), "-o", str(out), "--weights", "none", "--no-progress"]
    assert main([*args, *_one_chip_bbox(SCENE)]) == 2
    assert "cannot tell whether output folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["ftw_s2_l2a_33N_pooled.parquet"]


def _with_a_damaged_block(path: Path) -> Path:
    """A copy of the demo scene with one compressed block of band 1 overwritten at its start
    (the deflate stream's header: GDAL's decoder fails on it)."""
    shutil.copy(SCENE, path)
    with rasterio.open(path) as src:
        offset = int(src.get_tag_item("BLOCK_OFFSET_1_1", "TIFF", bidx=1))
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(200))
    return path


def test_a_damaged_raster_is_named_in_one_line(tmp_path, capsys) -> None:
    """rasterio's "Read failed. See previous exception for details." named neither the file
    nor a fix; read in a loader worker, the error came with the worker's traceback."""
    from torch.utils.data import DataLoader
    from torchgeo.samplers import GridGeoSampler

    from torchgeo_dofa.cli import error_line
    from torchgeo_dofa.datasets import InputError, Sentinel2SR, stack_dofa_samples

    bad = _with_a_damaged_block(tmp_path / "damaged.tif")
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["embed", str(bad), "-o", str(out), "--weights", "none", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"torchgeo-dofa: error: cannot read the pixels of {bad}: ")
    assert "damaged" in err and len(err.splitlines()) == 1, err
    assert not out.exists()
    ds = Sentinel2SR(bad)  # the chips themselves, read in a DataLoader worker
    loader = DataLoader(
        ds, sampler=GridGeoSampler(ds, 256, 256), num_workers=1, collate_fn=stack_dofa_samples
    )
    with pytest.raises(InputError) as raised:
        list(loader)
    assert error_line(raised.value).startswith(f"cannot read the pixels of {bad}: ")
    assert "\n" not in error_line(raised.value)


def test_cli_hints_keep_python_examples_as_python() -> None:
    from torchgeo_dofa.cli import cli_hints

    text = (
        "pass wavelengths, e.g. DOFAPreprocess(bands=[...], wavelengths=[0.665]) or "
        "get_embedding(..., sensor=SensorSpec(bands=[...])); for Sentinel2SR, pass "
        "wavelengths=[...] (one per band of bands=['B4', 'x']), or offset=0"
    )
    assert cli_hints(text) == (
        "pass wavelengths, e.g. DOFAPreprocess(bands=[...], wavelengths=[0.665]) or "
        "get_embedding(..., sensor=SensorSpec(bands=[...])); for Sentinel2SR, pass "
        "--wavelengths ... (one per band of --bands B4 x), or --offset 0"
    )


def test_a_rank_refused_while_checking_keeps_the_warning_filters(tmp_path, monkeypatch) -> None:
    """A DDP rank (not the launcher) silences the input checks' warnings, which the launcher
    shows; a job refused during the checks left that filter in place for the process."""
    from torchgeo_dofa.cli import embed
    from torchgeo_dofa.datasets import InputError

    monkeypatch.setenv("LOCAL_RANK", "1")
    other = shutil.copy(SCENE, tmp_path / "other.tif")
    before = list(warnings.filters)
    with pytest.raises(InputError, match="names one file but the job has 2 regions"):
        embed([SCENE, other], tmp_path / "x.tif", weights=None, seed=1, progress=False)
    assert warnings.filters == before


def test_output_file_names_and_seeded_random_weights(tmp_path, capsys) -> None:
    common = [*_one_chip_bbox(SCENE), "--weights", "none", "--no-progress"]
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    assert (
        main(["embed", str(SCENE), "-o", str(a), "--output", "pooled", "--seed", "7", *common]) == 0
    )
    assert (
        main(["embed", str(SCENE), "-o", str(b), "--output", "pooled", "--seed", "7", *common]) == 0
    )
    visible = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert visible == ["a.parquet", "b.parquet"]
    fa, fb = gpd.read_parquet(a), gpd.read_parquet(b)
    np.testing.assert_array_equal(np.stack(fa.embedding), np.stack(fb.embedding))
    assert set(fa.weights) == {"random (seed 7)"}
    # unseeded random weights differ on every run: a rerun says so and how to resume
    unseeded = ["embed", str(SCENE), "-o", str(tmp_path / "u"), "--output", "pooled", *common]
    assert main(unseeded) == 0
    capsys.readouterr()
    assert main(unseeded) == 2
    assert capsys.readouterr().err == (
        f"torchgeo-dofa: error: output folder {tmp_path / 'u'} holds another job's results: "
        "they come from random weights without a seed (--weights none without --seed), drawn "
        "anew on every run, so they cannot be resumed (a job started with --seed N can be); "
        f"rerun with --overwrite to replace them (it deletes {SCENE.stem}_pooled.parquet), or "
        f"choose another -o to keep them (another folder; for one region, -o {tmp_path / 'u'}"
        "/NAME.parquet is a job of its own beside them)\n"  # the kind of file it writes
    )
    assert main([*unseeded, "--seed", "1"]) == 2  # a seed now: still not that job's results
    assert "they come from random weights without a seed" in capsys.readouterr().err
    # the way to keep them (a file per job, a folder of per-file jobs): both kept
    assert main([*unseeded[:3], str(tmp_path / "u" / "seeded.parquet"), *unseeded[4:]]) == 0
    kept = sorted(p.name for p in (tmp_path / "u").iterdir() if not p.name.startswith("."))
    assert kept == [f"{SCENE.stem}_pooled.parquet", "seeded.parquet"]
    shutil.rmtree(tmp_path / "u")
    # a file name for two regions, or of the wrong kind, is a one-line error
    assert (
        main(["embed", str(SCENE), str(SCENE.parent), "-o", str(tmp_path / "c.tif"), *common]) == 2
    )
    assert "names one file but the job has 2 regions" in capsys.readouterr().err
    assert (
        main(["embed", str(SCENE), "-o", str(tmp_path / "d.parquet"), "--output", "grid", *common])
        == 2
    )
    assert f"use -o {tmp_path / 'd.tif'} or a folder" in capsys.readouterr().err
    assert not (tmp_path / "c.tif").exists() and not (tmp_path / "d.parquet").exists()
    # an existing folder named as the file, or as its sibling: refused in one line
    for name, folder, fix in (
        ("dd.tif", "dd.tif", f"-o {tmp_path / 'dd.tif'}/ writes into it"),
        ("ee.tif", "ee.parquet", "move it away"),
    ):
        (tmp_path / folder).mkdir()
        for extra in ([], ["--overwrite"]):
            assert main(["embed", str(SCENE), "-o", str(tmp_path / name), *common, *extra]) == 2
            err = capsys.readouterr().err
            said = f"output {tmp_path / folder} is an existing folder, not a file: {fix}, or give"
            assert said in err, err
            assert err.count("\n") == 1
        assert (tmp_path / folder).is_dir() and not list((tmp_path / folder).iterdir())
    # the file named is written as named (.geoparquet, .TIF), its sibling beside it
    named = tmp_path / "named"
    grid_only = ["--output", "grid", *common]
    assert main(["embed", str(SCENE), "-o", str(named / "e.GeoParquet"), *grid_only]) == 2
    assert f"use -o {named / 'e.tif'} or a folder" in capsys.readouterr().err
    args = ["--seed", "7", *common]
    pooled = ["--output", "pooled", *args]
    assert main(["embed", str(SCENE), "-o", str(named / "e.geoparquet"), *pooled]) == 0
    assert main(["embed", str(SCENE), "-o", str(named / "f.TIF"), *args]) == 0
    # an output that is a hard link to the input is the input
    scene = shutil.copy(SCENE, tmp_path / "scene.tif")
    os.link(scene, named / "hard.tif")
    assert main(["embed", str(scene), "-o", str(named / "hard.tif"), *args]) == 2
    assert f"output {named / 'hard.tif'} is one of the inputs" in capsys.readouterr().err
    (named / "hard.tif").unlink()
    # a trailing slash makes a folder of any name
    assert main(["embed", str(SCENE), "-o", f"{named / 'g.tif'}/", *pooled]) == 0
    assert (named / "g.tif" / "ftw_s2_l2a_33N_pooled.parquet").is_file()
    assert main(["embed", str(SCENE), "-o", f"{named / 'h.tif'}/.", *pooled]) == 0
    assert (named / "h.tif" / "ftw_s2_l2a_33N_pooled.parquet").is_file()
    # a folder made by an earlier job keeps its name, whatever it ends in
    (named / "old.png").mkdir()
    assert main(["embed", str(SCENE), "-o", str(named / "old.png"), *pooled]) == 0
    assert (named / "old.png" / "ftw_s2_l2a_33N_pooled.parquet").is_file()
    visible = sorted(p.name for p in named.iterdir() if not p.name.startswith("."))
    assert visible == ["e.geoparquet", "f.TIF", "f.parquet", "g.tif", "h.tif", "old.png"]
    np.testing.assert_array_equal(
        np.stack(gpd.read_parquet(named / "e.geoparquet").embedding), np.stack(fa.embedding)
    )
    with rasterio.open(named / "f.TIF") as src:
        assert src.count == 768 and src.crs == "EPSG:32633"


@pytest.mark.parametrize(
    "name", ["emb.npy", "map.PNG", "chips.csv", "x.gpkg", "x.geotiff", "emb.zarr", "p.pq"]
)
def test_an_output_name_of_another_format_is_refused_before_anything(tmp_path, capsys, name):
    out = tmp_path / name
    assert main(["embed", str(SCENE), "-o", str(out), "--weights", "none", "--no-progress"]) == 2
    err = capsys.readouterr().err
    suffix = out.suffix.lower()
    assert err == (
        f"torchgeo-dofa: error: -o {out}: the job writes GeoTIFF grids (.tif, .tiff) and "
        f"GeoParquet tables (.parquet, .geoparquet), not {suffix} files: name one of those, "
        f"or a folder (-o {out}/ makes a folder of this name)\n"
    )
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match=f"not {suffix} files"):  # the Python door too
        embed(SCENE, out, weights=None)
    assert list(tmp_path.iterdir()) == []
    for folder in (f"{out}/", f"{out}/."):  # folders of that name, as the job takes them
        assert option_problem([str(SCENE)], output_dir=folder) is None
        assert output_folder(folder) == out


def test_a_warning_made_an_error_by_w_error_is_one_line(tmp_path, capsys) -> None:
    """``python -W error`` turned the 8-bit warning into an exception with a traceback."""
    from torchgeo_dofa.transforms import ReflectanceWarning

    with rasterio.open(SCENE) as src:
        profile = src.profile | {"dtype": "uint8", "nodata": None}
    scene = tmp_path / "u8.tif"
    with rasterio.open(scene, "w", **profile) as dst:
        dst.write(np.ones((profile["count"], profile["height"], profile["width"]), "uint8"))
        dst.descriptions = ("B04", "B03", "B02", "B08")
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReflectanceWarning)
        assert main(["embed", str(scene), "-o", str(out), "--weights", "none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchgeo-dofa: error: u8.tif has dtype uint8, which cannot hold")
    assert (
        err.endswith("(ReflectanceWarning, an error under the -W / PYTHONWARNINGS filters)\n")
        and err.count("\n") == 1
    )
    assert not out.exists()


def test_local_backend_equals_embed_on_a_point(tmp_path, base_checkpoint) -> None:
    from torchgeo_dofa import OutputSpec, PointBuffer, get_embedding

    with rasterio.open(SCENE) as src:
        b = src.bounds
    lon, lat = _scene_lonlat(b.left + 3000, b.bottom + 1800)
    (tmp_path / "p.csv").write_text(f"lon,lat\n{lon},{lat}\n")
    code = main(
        ["embed", str(SCENE), "--points", str(tmp_path / "p.csv"), "--buffer-m", "1120",
         "-o", str(tmp_path / "p.parquet"), "--output", "pooled",
         "--weights", str(base_checkpoint), "--no-progress"]
    )  # fmt: skip
    assert code == 0
    row = np.asarray(gpd.read_parquet(tmp_path / "p.parquet").embedding.iloc[0])
    emb = get_embedding(
        "dofa",
        spatial=PointBuffer(lon, lat, 1120),
        output=OutputSpec.pooled(),
        backend="local",
        paths=SCENE,
        weights=str(base_checkpoint),
    )
    np.testing.assert_allclose(emb.data, row, rtol=0, atol=SAME_JOB_ATOL)


def test_rerun_with_another_setting_is_refused_until_overwrite(tmp_path, capsys, base_checkpoint):
    out = tmp_path / "out"
    common = [*_one_chip_bbox(SCENE), "-o", str(out), "--output", "pooled", "--no-progress"]
    assert main(["embed", str(SCENE), "--weights", str(base_checkpoint), *common]) == 0
    capsys.readouterr()
    before = (out / "ftw_s2_l2a_33N_pooled.parquet").read_bytes()
    # another model in the same folder: refused, naming the setting; outputs untouched
    assert main(["embed", str(SCENE), "--weights", "none", "--seed", "1", *common]) == 2
    err = capsys.readouterr().err
    assert "weights" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (out / "ftw_s2_l2a_33N_pooled.parquet").read_bytes() == before
    # the same job resumes (nothing left to do)
    assert main(["embed", str(SCENE), "--weights", str(base_checkpoint), *common]) == 0
    assert (out / "ftw_s2_l2a_33N_pooled.parquet").read_bytes() == before
    # how the pixels are read is part of the job too (these were taken as "already done"),
    # as read, not as spelled: the scene declares nodata 0, is in EPSG:32633 and stores B4,
    # B3, B2, B8 (the default order is B2, B3, B4, B8), and the Python door spells them its way
    for option in (
        ["--nodata", "0"],
        ["--crs", "EPSG:32633"],
        ["--crs", "+proj=utm +zone=33 +datum=WGS84 +units=m +no_defs"],
        ["--bands", "B2", "B3", "B4", "B8"],
        ["--file-bands", "B4", "B3", "B2", "B8"],  # the file's own descriptions
    ):
        assert main(["embed", str(SCENE), "--weights", str(base_checkpoint), *common, *option]) == 0
    bbox = [float(v) for v in _one_chip_bbox(SCENE)[1:]]
    again = embed(
        SCENE, out, weights=str(base_checkpoint), bbox=bbox, output="pooled", progress=False,
        nodata=0, bands=("B2", "B3", "B4", "B8"),
    )  # fmt: skip
    assert again.skipped == 1 and again.chips == 0
    for option, clause in (
        (["--nodata", "3000"], "nodata was 0.0, now 3000.0"),
        (["--crs", "EPSG:3857"], "crs was EPSG:32633, now EPSG:3857"),
    ):
        capsys.readouterr()
        assert main(["embed", str(SCENE), "--weights", str(base_checkpoint), *common, *option]) == 2
        assert f"another job's results: {clause}; rerun with --overwrite" in capsys.readouterr().err
    assert (out / "ftw_s2_l2a_33N_pooled.parquet").read_bytes() == before
    # a job named by its file beside the folder's job may not take that job's file
    named = ["embed", str(SCENE), "-o", str(out / "ftw_s2_l2a_33N_pooled.parquet")]
    for extra in ([], ["--overwrite"]):
        capsys.readouterr()
        one_chip = _one_chip_bbox(SCENE)
        assert main([*named, *one_chip, "--output", "pooled", "--weights", "none", *extra]) == 2
        assert "is a result of another torchgeo-dofa embed job" in capsys.readouterr().err
    assert (out / "ftw_s2_l2a_33N_pooled.parquet").read_bytes() == before
    # --overwrite replaces the earlier job's outputs
    args = ["embed", str(SCENE), "--weights", "none", "--seed", "1", "--overwrite", *common]
    assert main(args) == 0
    frame = gpd.read_parquet(out / "ftw_s2_l2a_33N_pooled.parquet")
    assert set(frame.weights) == {"random (seed 1)"}


def test_points_keep_their_properties_and_order(tmp_path, base_checkpoint) -> None:
    with rasterio.open(SCENE) as src:
        b = src.bounds
    rows = [("007", b.left + 4000, b.top - 1200), ("site-b", b.left + 1500, b.bottom + 1500)]
    text = "site,crop,lon,lat\n" + "".join(
        f"{site},{crop},{lo},{la}\n"
        for (site, x, y), crop in zip(rows, ["maize", "wheat"], strict=True)
        for lo, la in [_scene_lonlat(x, y)]
    )
    (tmp_path / "sites.csv").write_text(text)
    code = main(
        ["embed", str(SCENE), "--points", str(tmp_path / "sites.csv"), "--buffer-m", "1120",
         "-o", str(tmp_path / "out"), "--output", "pooled", "--weights", str(base_checkpoint),
         "--no-progress"]
    )  # fmt: skip
    assert code == 0
    frame = gpd.read_parquet(tmp_path / "out" / "ftw_s2_l2a_33N_pooled.parquet")
    assert frame.point_index.tolist() == [0, 1]  # input order, not north-west first
    assert frame.site.tolist() == ["007", "site-b"] and frame.crop.tolist() == ["maize", "wheat"]
    centres = frame.geometry.centroid
    assert abs(centres.iloc[0].x - rows[0][1]) <= 10 and abs(centres.iloc[1].y - rows[1][2]) <= 10


def test_points_outside_every_raster_are_listed_first_or_skipped(tmp_path, capsys, base_checkpoint):
    with rasterio.open(SCENE) as src:
        b = src.bounds
    inside = _scene_lonlat(b.left + 1500, b.bottom + 1500)
    (tmp_path / "p.csv").write_text(f"id,lon,lat\na,{inside[0]},{inside[1]}\nb,0.5,0.5\n")
    args = ["embed", str(SCENE), "--points", str(tmp_path / "p.csv"), "--buffer-m", "1120",
            "--output", "pooled", "--weights", str(base_checkpoint), "--no-progress"]  # fmt: skip
    assert main([*args, "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert (
        "1 of 2 points lie outside every input raster: #1 (0.5" in err and "--skip-outside" in err
    )
    assert not (tmp_path / "x").exists()  # reported before anything is written
    with pytest.warns(UserWarning, match="skipping 1 of 2 points"):
        assert main([*args, "-o", str(tmp_path / "y"), "--skip-outside"]) == 0
    frame = gpd.read_parquet(tmp_path / "y" / "ftw_s2_l2a_33N_pooled.parquet")
    assert frame.id.tolist() == ["a"] and frame.point_index.tolist() == [0]
    (tmp_path / "q.csv").write_text("lon,lat\n0.5,0.5\n")
    args[3] = str(tmp_path / "q.csv")
    with pytest.warns(UserWarning, match="skipping 1 of 1 points"):
        assert main([*args, "-o", str(tmp_path / "z"), "--skip-outside"]) == 2
    assert "none of the 1 points lies inside an input raster" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()


def test_an_all_zero_raster_beside_a_good_one_writes_both(tmp_path, base_checkpoint) -> None:
    with rasterio.open(SCENE) as src:
        profile, shape = src.profile, (src.count, src.height, src.width)
    empty = tmp_path / "empty_20230615.tif"  # dated: its chips have a time span
    with rasterio.open(empty, "w", **profile) as dst:
        dst.write(np.zeros(shape, dtype=profile["dtype"]))
        dst.descriptions = ("B04", "B03", "B02", "B08")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="held a valid pixel") as caught:
        summary = embed(
            [empty, SCENE], out, weights=str(base_checkpoint), output="both", progress=False
        )
    # the job's own warnings point at the caller's line, not inside the package
    ours = [w for w in caught if "held" in str(w.message) and "valid pixel" in str(w.message)]
    assert ours and {w.filename for w in ours} == {__file__}
    # the empty scene: 6 chips without a valid pixel, among the 12 of the job (the line said
    # "embedded 6 chips, 6 without valid pixels": the 6 of the scene with data)
    assert summary.chips == 12 and summary.empty == 6
    assert summary.line().startswith("embedded 12 chips, 6 without valid pixels in ")
    with (
        rasterio.open(out / "empty_20230615_grid.tif") as e,
        rasterio.open(out / "ftw_s2_l2a_33N_grid.tif") as g,
    ):
        assert e.count == g.count == 768 and e.shape == g.shape
        assert np.isnan(e.read(1)).all() and np.isfinite(g.read(1)).any()
    rows = gpd.read_parquet(out / "empty_20230615_pooled.parquet")
    assert len(rows) == 6 and rows.no_data.all()
    # as the README says: NaN in geopandas; in the file, lists of 768 nulls (not NULL lists)
    assert np.isnan(np.stack(rows.embedding.to_numpy())).all()
    lists = pq.read_table(out / "empty_20230615_pooled.parquet").column("embedding")
    lists = lists.combine_chunks()
    assert lists.null_count == 0 and set(lists.value_lengths().to_pylist()) == {768}
    assert lists.flatten().null_count == 6 * 768
    full = gpd.read_parquet(out / "ftw_s2_l2a_33N_pooled.parquet")
    assert not full.no_data.any()
    # an empty chip's row has the chip's time span, as a chip with data has (it was NaT)
    assert set(rows.time_start) == {pd.Timestamp("2023-06-15T00:00:00", tz="UTC")}
    assert set(rows.time_end) == {pd.Timestamp("2023-06-15T23:59:59.999999", tz="UTC")}
    # a point's chip too (its sampler's chips have no time slice: the dataset's span is read)
    with rasterio.open(SCENE) as src:
        lon, lat = _scene_lonlat(src.bounds.left + 1500, src.bounds.bottom + 1500)
    (tmp_path / "p.csv").write_text(f"lon,lat\n{lon},{lat}\n")
    with pytest.warns(UserWarning, match="held a valid pixel"):
        embed(
            [empty], tmp_path / "pts", weights=None, output="pooled", points=tmp_path / "p.csv",
            buffer_m=1120, progress=False,
        )  # fmt: skip
    point = gpd.read_parquet(tmp_path / "pts" / "empty_20230615_pooled.parquet")
    assert point.no_data.tolist() == [True] and point.point_index.tolist() == [0]
    assert point.time_start.tolist() == [pd.Timestamp("2023-06-15T00:00:00", tz="UTC")]
    assert point.time_end.tolist() == [pd.Timestamp("2023-06-15T23:59:59.999999", tz="UTC")]
    # the warning names only the outputs the job writes (it spoke of a table with --output grid)
    for output, said in (
        ("grid", r"the rasters\): NaN in the grid$"),
        ("pooled", r"the rasters\): rows flagged no_data in the pooled table$"),
    ):
        with pytest.warns(UserWarning, match=said):
            embed([empty], tmp_path / output, weights=None, output=output, progress=False)


def test_a_second_concurrent_job_on_the_folder_fails_at_once(tmp_path, base_checkpoint) -> None:
    from torchgeo_dofa.jobs import OutputLock

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torchgeo_dofa", "embed", str(SCENE), "-o", str(out),
           "--no-progress", "--output", "pooled"]  # fmt: skip
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    corrupt = [*cmd[3:], "--weights", str(tmp_path / "corrupt.pth")]
    second = (  # the command as a process would run it, telling whether PyTorch was loaded
        "import sys; from torchgeo_dofa.cli import main; code = main(sys.argv[1:]); "
        "print(code, 'torch' in sys.modules)"
    )
    for folder in (out, out / "x.parquet"):  # -o a folder, or a file in it
        argv = [a if a != str(out) else str(folder) for a in corrupt]
        with OutputLock(out):  # another job holds the folder (this process, the real lock)
            # the lock is checked first: before the inputs are read, the weights loaded or
            # even the libraries (it took ~10 s to say so)
            proc = subprocess.run(
                [sys.executable, "-c", second, *argv], capture_output=True, text=True, timeout=300
            )
        assert proc.stdout.split() == ["75", "False"], proc.stdout + proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last == (
            f"torchgeo-dofa: error: output folder {out} is in use by another torchgeo-dofa job "
            f"(pid {os.getpid()}); wait for it or use another -o"
        )
    assert not (out / "ftw_s2_l2a_33N_pooled.parquet").exists()
    # once the other job is gone the same command runs
    done = subprocess.run(
        [*cmd, "--weights", str(base_checkpoint)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(gpd.read_parquet(out / "ftw_s2_l2a_33N_pooled.parquet")) == 6
    # the job's own line says device and precision; Lightning's start-up lines, adverts and
    # the LeafSpec deprecation it triggers in torch are not shown
    assert done.stderr.startswith("torchgeo-dofa: device cpu, precision "), done.stderr
    for noise in ("GPU available", "Tip:", "LeafSpec", "Automatic Mixed Precision"):
        assert noise not in done.stderr, done.stderr


@pytest.mark.parametrize("wrote", [False, True], ids=["before-the-first-batch", "in-it"])
def test_a_stop_says_whether_the_job_wrote_a_chip(tmp_path, wrote: bool) -> None:
    """SIGTERM as the prediction starts, taken by the job's own handler: the job stopped
    before its first batch and said "the chips written so far are kept" (none were, and it
    left nothing). During the first batch: that batch is written, kept, and resumed."""
    import signal

    import lightning.pytorch as pl

    from torchgeo_dofa.jobs import JobInterrupted

    class Sigterm(pl.Callback):  # (after the job's own callbacks: its checks came first)
        def on_predict_epoch_start(self, *args: Any) -> None:
            if not wrote:  # the job checks next at the first batch's start
                os.kill(os.getpid(), signal.SIGTERM)

        def on_predict_batch_start(self, *args: Any) -> None:
            if wrote:  # the job checks next at this batch's end
                os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "out"
    kwargs: dict[str, Any] = dict(weights=None, seed=0, output="pooled", progress=False)
    with pytest.raises(JobInterrupted) as info:
        embed([SCENE], out, batch_size=2, callbacks=[Sigterm()], **kwargs)
    assert info.value.exit_status == 143
    if not wrote:
        assert str(info.value) == (
            "stopped by SIGTERM: embed stopped before its first chip: rerun the same command"
        )
        assert not out.exists()
    else:
        assert str(info.value) == (
            "stopped by SIGTERM: the chips written so far are kept; rerun the same command "
            "to resume"
        )
        assert embed([SCENE], out, **kwargs).skipped == 2  # the first batch's two chips


def test_a_signal_once_the_job_has_finished_says_its_outputs_are_written(
    tmp_path, capsys, monkeypatch, base_checkpoint
) -> None:
    """SIGTERM in the instant after the job wrote its last output, before the command
    returned (its lock released, its summary printed), said "stopped by SIGTERM: embed
    stopped before its first chip: rerun the same command" of a job whose outputs were
    complete. The command's SIGTERM handler there (``terminate_before_the_job``, installed
    by the console script) is installed here by hand; the real signal is sent as the job
    records that it has finished. (A ``predict --config`` records it inside its job's own
    handler, which lets a finished prediction end as one: exit 0.)"""
    import signal

    import yaml

    import torchgeo_dofa.__main__ as launcher
    from torchgeo_dofa import locks

    noted = locks.note_job_finished
    recorded: list[bool] = []

    def finished_then_signalled(finished: bool = True) -> None:
        noted(finished)
        recorded.append(finished)
        if finished:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(locks, "note_job_finished", finished_then_signalled)
    args = ["embed", str(SCENE), "-o", str(tmp_path), "--weights", str(base_checkpoint),
            "--no-progress"]  # fmt: skip
    config = tmp_path / "config" / "cfg.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump(_predict_config(config.parent, base_checkpoint)))
    previous = signal.signal(signal.SIGTERM, launcher.terminate_before_the_job)
    try:
        assert main(args) == 143
        said = capsys.readouterr().err.splitlines()[-1]
        assert main(["predict", "--config", str(config)]) == 0  # (its own handler took it)
    finally:
        signal.signal(signal.SIGTERM, previous)
        launcher._terminating.clear()  # (the command's end does so)
    assert said == (
        "torchgeo-dofa: SIGTERM once embed had finished: every output is written; nothing to rerun"
    )
    assert recorded == [False, True, False, True]  # each command's start, its job's end
    assert len(gpd.read_parquet(tmp_path / "ftw_s2_l2a_33N_pooled.parquet")) == 6  # whole
    assert len(gpd.read_parquet(config.parent / "p.parquet")) == 6
    monkeypatch.setattr(locks, "note_job_finished", noted)
    capsys.readouterr()
    assert main(args) == 0  # and done: a rerun has nothing left to do
    assert capsys.readouterr().out.startswith("embedded 0 more chips (6 already done)")
    # as a predict --config's stop after its job's handler is gone would say
    locks.note_job_finished()
    assert locks.report_ctrl_c(["predict"], signal.SIGINT) == 130
    assert capsys.readouterr().err == (
        "torchgeo-dofa: Ctrl-C once predict had finished: every output is written; nothing "
        "to rerun\n"
    )
    locks.note_job_finished(False)


def test_a_second_ctrl_c_stops_at_once_with_the_interrupted_error(tmp_path) -> None:
    """Ctrl-C twice: Lightning's own shutdown (it exits with 1 and ignores SIGINT after) ends
    as the job's interrupted error, exit status 130, and Ctrl-C works again afterwards."""
    import signal

    import lightning.pytorch as pl

    from torchgeo_dofa.jobs import JobInterrupted

    class CtrlCTwice(pl.Callback):
        def on_predict_batch_start(self, *args: Any, **kwargs: Any) -> None:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    class Lines(logging.Handler):  # what Lightning's info logger lets through
        def __init__(self) -> None:
            super().__init__()
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage())

    lines = Lines()
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    log.addHandler(lines)
    before = signal.getsignal(signal.SIGINT)
    out = tmp_path / "out"
    try:
        with pytest.raises(JobInterrupted) as info:
            embed([SCENE], out, weights=None, output="pooled", num_workers=0, progress=False,
                  callbacks=[CtrlCTwice()])  # fmt: skip
    finally:
        log.removeHandler(lines)
    assert info.value.exit_status == 130
    # before its first chip: nothing of the job is left, whatever its weights (random ones
    # without a seed: it said "the chips written so far cannot be resumed")
    assert str(info.value) == (
        "stopped by SIGINT: embed stopped before its first chip: rerun the same command"
    )
    assert signal.getsignal(signal.SIGINT) is before
    assert not out.exists()
    # Lightning's reason stays visible; its start-up lines do not
    assert any("Detected KeyboardInterrupt" in line for line in lines.lines), lines.lines
    assert not any("available:" in line or "Tip:" in line for line in lines.lines), lines.lines
    assert not log.filters  # the job's filter is gone


def test_quiet_lightning_leaves_the_callers_warning_filters() -> None:
    """Filters the caller has (even the same one) or adds during the job stay; ours goes."""
    import warnings

    from torchgeo_dofa.cli import JOB_WARNINGS, quiet_lightning

    (leafspec, category), *others = JOB_WARNINGS
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=leafspec, category=category)
        before = list(warnings.filters)
        with quiet_lightning():  # the same filter is not added twice
            assert warnings.filters[len(others) :] == before
        assert warnings.filters == before  # nor removed
    with warnings.catch_warnings():
        before = list(warnings.filters)
        with quiet_lightning():
            assert len(warnings.filters) == len(before) + len(JOB_WARNINGS)
            warnings.filterwarnings("error", message="added during the job")
        assert warnings.filters[1:] == before and "added during" in str(warnings.filters[0][1])


def test_an_output_that_is_an_input_is_refused_even_with_overwrite(tmp_path, capsys) -> None:
    import shutil

    scene = tmp_path / "scene.tif"
    shutil.copy(SCENE, scene)
    before = scene.read_bytes()
    for extra in ([], ["--overwrite"]):
        args = ["embed", str(scene), "-o", str(scene), "--output", "grid", "--weights", "none"]
        assert main([*args, "--no-progress", *extra]) == 2
        assert "is one of the inputs" in capsys.readouterr().err
        assert scene.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.tif"]


def test_an_output_that_is_not_a_folder_is_named_for_what_it_is(tmp_path, capsys) -> None:
    """``-o /dev/null`` said "File exists (a part of the path is a file, not a folder)"."""
    (tmp_path / "notes").write_text("")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    cases = {
        "/dev/null": "not a folder (a device or pipe)",
        str(fifo): "not a folder (a device or pipe)",
        str(tmp_path / "notes"): "an existing file",
    }
    for given, what in cases.items():
        assert main(["embed", str(SCENE), "-o", given, "--weights", "none", "--no-progress"]) == 2
        assert capsys.readouterr().err == (
            f"torchgeo-dofa: error: -o {given} is {what}: give a folder or a .tif name\n"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "pipe"]


def test_names_that_are_not_utf8_are_refused_before_anything_is_computed(
    tmp_path, base_checkpoint, capsys, monkeypatch
) -> None:
    """An output folder named in Latin-1 failed after every chip was computed (its paths go
    into the outputs' UTF-8 metadata), exit 1, and every rerun likewise; an input file so
    named was Python's "'utf-8' codec can't encode character '\\udce8' ...: surrogates not
    allowed", naming neither the file nor the fix. Both are one line, exit 2, nothing made."""
    latin = os.fsdecode(b"caf\xe9")
    common = ["--weights", str(base_checkpoint), "--no-progress"]
    out = tmp_path / latin
    assert main(["embed", str(SCENE), "-o", str(out), *common]) == 2
    fix = "its name is not valid UTF-8 (a name in another encoding, e.g. Latin-1), which the"
    assert capsys.readouterr().err == (
        f"torchgeo-dofa: error: -o '{tmp_path}/caf\\xe9': {fix} outputs' metadata "
        "cannot record: rename it in UTF-8 (convmv -f latin1 -t utf8 --notest NAME), or choose "
        "another name\n"
    )
    assert not out.exists()
    # named as given, before the libraries load: a relative -o stays relative (it was made
    # absolute); a NAME.tif too (refused after the libraries loaded, named absolute, and a
    # NAME.parquet by its sibling NAME.tif: helper-134); so does the Python API's embed
    monkeypatch.chdir(tmp_path)
    for given in (f"out/{latin}", f"{latin}.tif", f"{latin}.parquet"):
        assert main(["embed", str(SCENE), "-o", given, *common]) == 2
        shown = given.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        assert capsys.readouterr().err.startswith(f"torchgeo-dofa: error: -o '{shown}': {fix}")
    with pytest.raises(InputError, match=r"^-o 'out/caf\\xe9': its name is not valid UTF-8"):
        embed([SCENE], f"out/{latin}", weights=None)
    from torchgeo_dofa.locks import OutputLock, OutputPathError

    with pytest.raises(OutputPathError, match=r"^output folder 'out/caf\\xe9': its name"):
        OutputLock(f"out/{latin}").acquire()  # a writer's folder, an export's
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # a working folder so named: the folder to rename is named (it said to rename "out")
    (tmp_path / latin).mkdir()
    monkeypatch.chdir(tmp_path / latin)
    assert main(["embed", str(SCENE), "-o", "out", *common]) == 2
    assert capsys.readouterr().err == (
        f"torchgeo-dofa: error: -o 'out': its real path '{tmp_path}/caf\\xe9/out' goes through "
        f"the folder 'caf\\xe9', whose name {fix.removeprefix('its name ')} outputs' metadata "
        "cannot record: rename that folder in UTF-8 (convmv -f latin1 -t utf8 --notest NAME), "
        "or choose a place outside it\n"
    )
    monkeypatch.chdir(tmp_path)
    (tmp_path / latin).rmdir()
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(SCENE, folder / f"{latin}.tif")
    assert main(["embed", str(folder), "-o", str(tmp_path / "o"), *common]) == 2
    assert capsys.readouterr().err.startswith(
        f"torchgeo-dofa: error: input '{folder}/caf\\xe9.tif': {fix} outputs' metadata"
    )
    assert not (tmp_path / "o").exists()
    with pytest.raises(InputError, match=r"^input '.*/caf\\xe9\.tif': its name is not valid"):
        Sentinel2SR(folder)  # a dataset of your own (predict --config) likewise
    # reached through a link of a UTF-8 name: the real path is what is read and recorded
    from torchgeo_dofa.preview import render_preview

    real = tmp_path / latin
    real.mkdir()
    shutil.copy(SCENE, real / "scene.tif")
    (tmp_path / "link").symlink_to(real)
    assert main(["embed", str(tmp_path / "link" / "scene.tif"), "-o", str(tmp_path / "o"),
                 *common]) == 2  # fmt: skip
    assert capsys.readouterr().err.startswith(  # (the folder to rename is named)
        f"torchgeo-dofa: error: input '{tmp_path}/link/scene.tif': its real path "
        f"'{tmp_path}/caf\\xe9/scene.tif' goes through the folder 'caf\\xe9', whose name is "
        "not valid UTF-8"
    )
    with pytest.raises(ValueError, match=r"^the embedding '.*caf\\xe9/g.tif': its name is not"):
        render_preview(real / "g.tif", tmp_path / "p.png")


def test_an_output_folder_inside_the_input_folder_is_not_read_as_input(tmp_path) -> None:
    """``embed scenes/ -o scenes/out``: the grid written there is not a scene of the rerun
    (it used to be taken as an input and the rerun refused), nor of a config run."""
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    shutil.copy(SCENE, scenes / SCENE.name)
    out = scenes / "out"
    common = [*_one_chip_bbox(SCENE), "--weights", "none", "--seed", "1", "--no-progress"]
    assert main(["embed", str(scenes), "-o", str(out), *common]) == 0
    grid = out / "scenes_grid.tif"
    before = grid.read_bytes()
    with pytest.warns(UserWarning, match=r"skipped 1 embedding grid\(s\) written by torchgeo-dofa"):
        bbox = [float(v) for v in _one_chip_bbox(SCENE)[1:]]
        summary = embed([scenes], out, bbox=bbox, weights=None, seed=1, progress=False)
    assert (summary.chips, summary.skipped) == (0, 1)  # the same job: nothing left to do
    assert grid.read_bytes() == before
    from torchgeo_dofa.datasets import InputError, Sentinel2SR

    with pytest.raises(InputError, match="is an embedding grid written by torchgeo-dofa, not a"):
        embed([grid], tmp_path / "x", weights=None)
    with pytest.raises(InputError, match="holds only embedding grids written by torchgeo-dofa"):
        embed([out], tmp_path / "x", weights=None)
    assert not (tmp_path / "x").exists()
    dataset = Sentinel2SR(paths=str(scenes))  # the dataset itself, as a config run reads it
    assert {p for s in dataset.index["sources"] for p, _ in s} == {str(scenes / SCENE.name)}


def test_file_bands_replace_band_descriptions_with_a_warning(tmp_path) -> None:
    from torchgeo_dofa.datasets import Sentinel2SR

    with pytest.warns(UserWarning, match="replace the file's band descriptions"):
        ds = Sentinel2SR(SCENE, file_bands=["B8", "B2", "B3", "B4"])
    assert ds.bands == ("B2", "B3", "B4", "B8")  # default order among the named bands
    plain = Sentinel2SR(SCENE)
    box = plain.bounds
    chip = (slice(box[0].start, box[0].start + 640), slice(box[1].start, box[1].start + 640))
    # the channel the file describes as B08 (its 4th) is now called B4: a real renaming
    np.testing.assert_array_equal(ds[chip]["image"][2], plain[chip]["image"][3])


def test_embedder_takes_the_cli_spelling_of_random_weights() -> None:
    from torchgeo_dofa.embedder import DOFAEmbedder

    a = DOFAEmbedder(weights="none", seed=3, output="pooled")
    b = DOFAEmbedder(weights=None, seed=3, output="pooled")
    assert a.encoder.weights_id == "random (seed 3)"
    for x, y in zip(a.encoder.parameters(), b.encoder.parameters(), strict=True):
        assert torch.equal(x, y)


def _wait_for_a_part(job: subprocess.Popen[Any], parts: Path, timeout: float = 240) -> None:
    """Wait until the job has written a grid part into ``parts`` (or has ended)."""
    deadline = time.monotonic() + timeout
    while not list(parts.glob("*.npy")) and job.poll() is None:
        assert time.monotonic() < deadline, "the job wrote no chip in time"
        time.sleep(0.05)


def test_kill_9_during_prediction_then_rerun_equals_uninterrupted(
    tmp_path, reference_run, base_checkpoint
) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torchgeo_dofa", "embed", str(SCENE), "-o", str(out),
           "--weights", str(base_checkpoint), "--output", "both", "--batch-size", "1",
           "--num-workers", "0", "--no-progress"]  # fmt: skip
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = out / "ftw_s2_l2a_33N_grid.tif.parts"
    try:
        _wait_for_a_part(job, parts)
        job.kill()  # SIGKILL: no handler runs
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    assert not (out / "ftw_s2_l2a_33N_grid.tif").exists(), "finished before it was killed"
    assert main([*cmd[3:]]) == 0  # the same command resumes
    with (
        rasterio.open(out / "ftw_s2_l2a_33N_grid.tif") as a,
        rasterio.open(reference_run / "ftw_s2_l2a_33N_grid.tif") as b,
    ):
        assert a.transform == b.transform and a.shape == b.shape
        np.testing.assert_allclose(a.read(), b.read(), rtol=0, atol=1e-5, equal_nan=True)
    got = gpd.read_parquet(out / "ftw_s2_l2a_33N_pooled.parquet")
    ref = gpd.read_parquet(reference_run / "ftw_s2_l2a_33N_pooled.parquet")
    assert list(got.chip_id) == list(ref.chip_id)
    np.testing.assert_allclose(np.stack(got.embedding), np.stack(ref.embedding), atol=1e-5)
    assert not list(out.glob("*.parts")) and not list(out.glob(".*.tmp"))


def test_a_loader_worker_without_shared_memory_is_one_line_naming_the_limit(
    tmp_path, base_checkpoint
) -> None:
    """Under ``ulimit -f`` (or a full ``/dev/shm``) the loader worker cannot make the shared
    memory segment of a batch: PyTorch's worker traceback and exit 1 ("unable to resize file
    </torch_...> to the right size: File too large (27)"), in ``embed`` and ``predict
    --config``. Now one line naming the limit and the fix; no output file is left."""
    import resource

    import yaml

    def small_files() -> None:  # a batch's segment is ~1.3 MB a band: 1 MB is too small
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    out = tmp_path / "out"
    cfg = _predict_config(tmp_path / "config", base_checkpoint)
    cfg["data"]["init_args"]["num_workers"] = 1
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    embed = ["embed", str(SCENE), "-o", str(out), "--weights", str(base_checkpoint),
             "--num-workers", "1", "--no-progress"]  # fmt: skip
    said = (
        "torchgeo-dofa: error: a DataLoader worker reading chips could not pass chips through "
        "shared memory: the process's file-size limit (ulimit -f) is smaller than a batch's "
        "segment; rerun with {option} 0 (chips read in the job's own process, no shared "
        "memory), or raise it (ulimit -f unlimited)"
    )
    for args, option in (
        (embed, "--num-workers"),
        (["predict", "--config", str(tmp_path / "cfg.yaml")], "--data.init_args.num_workers"),
    ):
        cmd = [sys.executable, "-m", "torchgeo_dofa", *args]
        run = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=small_files)
        assert run.returncode == 1, run.stderr[-3000:]
        assert run.stderr.splitlines()[-1] == said.format(option=option), run.stderr[-3000:]
        assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert not list(tmp_path.rglob("*.tif")) and not list(tmp_path.rglob("*.parquet"))


def test_reflectance_scaled_up_is_refused_or_warned_of(tmp_path, base_checkpoint, capsys):
    """The demo scene x 1e30 (every value clipped to 10000 by DOFA's normalisation: all
    chips embed alike) ran with exit 0 and no word; x 10 (most NIR values clipped) too. Now
    x 1e30 is one line, exit 2, before any output; x 10 embeds with a warning naming the
    band whose median exceeds 10000 (a vegetated scene's visible bands stay below it); the
    scene itself gets neither."""
    with rasterio.open(SCENE) as src:
        profile, data, names = src.profile, src.read().astype(np.float32), src.descriptions
    profile.update(dtype="float32", nodata=None)
    for name, factor in (("x1e30", 1e30), ("x10", 10.0)):
        with rasterio.open(tmp_path / f"{name}.tif", "w", **profile) as dst:
            dst.write(data * factor)
            dst.descriptions = names
    weights = ["--weights", str(base_checkpoint), "--no-progress"]
    assert main(["embed", str(tmp_path / "x1e30.tif"), "-o", str(tmp_path / "a"), *weights]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(
        "torchgeo-dofa: error: x1e30.tif: every valid value exceeds 20000 (in [1.06e+32, "
    ), err
    assert "Was a scale applied twice" in err[-1] and len(err) == 1, err
    assert not (tmp_path / "a").exists()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["embed", str(tmp_path / "x10.tif"), "-o", str(tmp_path / "b"), *weights]) == 0
        warned = [str(w.message) for w in caught if "exceed" in str(w.message)]
        caught.clear()
        assert main(["embed", str(SCENE), "-o", str(tmp_path / "c"), *weights]) == 0
        assert not [w for w in caught if "exceed" in str(w.message)]
    assert len(warned) == 1 and warned[0].startswith(
        "x10.tif: more than half of the valid values of 1 of its 4 bands exceed 10000 "
        "(medians: B08 "
    ), warned
    valid = (data != 0).all(axis=0)
    medians = np.median(data[:, valid] * 10, axis=1)  # all pixels, not decimated
    assert medians[3] > 10000 and (medians[:3] < 10000).all(), medians  # NIR alone
    said = float(warned[0].split("(medians: B08 ")[1].split(";")[0])
    assert abs(said - medians[3]) < 0.05 * medians[3], (said, medians)  # a decimated read
    assert (tmp_path / "b" / "x10_grid.tif").exists()
    # only the bands read are judged: x 10 without its NIR, and an elevation band of 12000
    # beside the scene's four (the dataset does not read it), warn of nothing
    profile.update(count=5)
    with rasterio.open(tmp_path / "elevation.tif", "w", **profile) as dst:
        dst.write(np.concatenate([data, np.full_like(data[:1], 12000.0)]))
        dst.descriptions = (*names, "elevation")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        visible = ["--bands", "B4", "B3", "B2"]
        assert main(["embed", str(tmp_path / "x10.tif"), "-o", str(tmp_path / "d"), *weights,
                     *visible]) == 0  # fmt: skip
        assert main(["embed", str(tmp_path / "elevation.tif"), "-o", str(tmp_path / "e"),
                     *weights]) == 0  # fmt: skip
        assert not [w for w in caught if "exceed" in str(w.message)]


def test_a_low_open_file_limit_reads_chips_in_the_job_instead_of_hanging(
    tmp_path, base_checkpoint
) -> None:
    """Under ``ulimit -n 24`` the loader worker could not hand its first batch over (its
    queue's sending thread failed with "Too many open files" and dropped the batch) and the
    job waited for it until a second SIGTERM; ``fit`` alike. Now chips are read in the job's
    own process, with a warning naming the limit and the fix; the same grid as a run with a
    worker. A soft limit below a higher hard one is raised to it (workers start)."""
    import resource

    def limit(soft: int, hard: int) -> Callable[[], None]:
        return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    def run(args: list[str], soft: int, hard: int) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "torchgeo_dofa", *args]
        return subprocess.run(
            cmd, capture_output=True, text=True, preexec_fn=limit(soft, hard), timeout=300,
            cwd=tmp_path,
        )  # fmt: skip

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 512:
        pytest.skip(f"the hard open-file limit here is {hard}")
    embed = ["embed", str(SCENE), "--weights", str(base_checkpoint), "--num-workers", "1",
             "--no-progress"]  # fmt: skip
    low = run([*embed, "-o", "low"], 24, 24)
    assert low.returncode == 0, low.stderr[-3000:]
    lines = low.stderr.splitlines()
    assert lines[0].endswith("0 loader worker(s) (of 1: the open-file limit)"), lines[0]
    assert (
        "torchgeo-dofa: warning: the open-file limit (ulimit -n) is 24, below the 128 that "
        "DataLoader workers need: the data is read in the job's own process, not in 1 "
        "worker(s); raise it (ulimit -n 4096) to read it in workers"
    ) in lines, lines
    soft = run([*embed, "-o", "soft"], 24, 4096)  # soft limit only: raised, the worker runs
    assert soft.returncode == 0, soft.stderr[-3000:]
    assert soft.stderr.splitlines()[0].endswith(", 1 loader worker(s)"), soft.stderr[-3000:]
    assert "open-file limit" not in soft.stderr
    name = "ftw_s2_l2a_33N_grid.tif"
    with rasterio.open(tmp_path / "low" / name) as a, rasterio.open(tmp_path / "soft" / name) as b:
        assert a.transform == b.transform
        np.testing.assert_allclose(a.read(), b.read(), rtol=0, atol=1e-5, equal_nan=True)
    configs = Path(__file__).resolve().parents[1] / "torchgeo_dofa/configs"
    fit = ["fit", "--config", str(configs / "finetune_classification.yaml"),
           "--data.init_args.num_workers", "1", "--data.init_args.num_samples=8",
           "--data.init_args.batch_size=4", "--trainer.max_epochs=1",
           "--trainer.enable_progress_bar=false",
           "--trainer.enable_model_summary=false"]  # fmt: skip
    trained = run(fit, 24, 24)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "warning: the open-file limit (ulimit -n) is 24" in trained.stderr
    assert list(tmp_path.glob("logs/*/version_0/checkpoints/last.ckpt"))


def test_a_folder_of_more_files_than_the_open_file_limit_allows_is_read(tmp_path) -> None:
    """A dataset kept every file it read open: a folder of 150 files failed with "Too many
    open files" (exit 2, blaming one input) under ``ulimit -n 127``, with or without loader
    workers. Now at most ``cached_files_limit()`` files stay open (an eighth of the limit),
    the least recently read closed first: 60 files embed under a limit of 48 (as three chips
    of 224 px, each reading up to 28 of the 32-px files: the code before failed at the 26th
    file; one chip a file, ``--chip-size 32``, ran 20x the model for the same check)."""
    import resource

    from rasterio.windows import Window

    folder = tmp_path / "tiles"
    folder.mkdir()
    with rasterio.open(SCENE) as src:
        for k in range(60):
            window = Window(32 * (k % 15), 32 * (k // 15), 32, 32)
            profile = src.profile | {
                "width": 32, "height": 32, "transform": src.window_transform(window)
            }  # fmt: skip
            with rasterio.open(folder / f"tile_{k:02d}.tif", "w", **profile) as dst:
                dst.write(src.read(window=window))
                dst.descriptions = src.descriptions
    cmd = [sys.executable, "-m", "torchgeo_dofa", "embed", str(folder), "-o", str(tmp_path / "out"),
           "--weights", "none", "--no-progress", "--output", "pooled",
           "--num-workers", "0"]  # fmt: skip
    run = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48)),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "embedded 3 chips" in run.stdout + run.stderr, run.stderr[-3000:]


_LOCKED_BATCHES = """
import threading

from torch.utils.data import default_collate

from torchgeo_dofa.synthetic import SpectralDataModule


def with_a_lock(samples):
    batch = default_collate(samples)
    batch["lock"] = threading.Lock()  # cannot be pickled: the worker cannot send the batch
    return batch


class LockedBatches(SpectralDataModule):
    def setup(self, stage):
        super().setup(stage)
        self.collate_fn = with_a_lock
"""


def test_fit_with_a_batch_its_worker_cannot_send_stops_instead_of_hanging(tmp_path) -> None:
    """``fit`` on a TorchGeo-style data module (its loaders made without a
    ``multiprocessing_context``) whose worker cannot send a batch (here a value that cannot
    be pickled; under the open-file limit, the batch's shared memory) waited for it forever.
    The CLI gives every loader of a config's data module the context that raises instead:
    one line naming the cause and the fix, exit 1."""
    (tmp_path / "lockedbatches.py").write_text(_LOCKED_BATCHES)
    configs = Path(__file__).resolve().parents[1] / "torchgeo_dofa/configs"
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), repo])}
    fit = [sys.executable, "-m", "torchgeo_dofa", "fit",
           "--config", str(configs / "finetune_classification.yaml"),
           "--data.class_path", "lockedbatches.LockedBatches",
           "--data.init_args.num_workers", "1", "--data.init_args.num_samples=8",
           "--data.init_args.batch_size=4", "--trainer.max_epochs=1",
           "--trainer.enable_progress_bar=false",
           "--trainer.enable_model_summary=false"]  # fmt: skip
    run = subprocess.run(fit, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert run.returncode == 1, run.stderr[-3000:]
    assert run.stderr.splitlines()[-1] == (
        "torchgeo-dofa: error: a DataLoader worker reading chips could not send its batch to "
        "the job (TypeError: cannot pickle '_thread.lock' object); rerun with "
        "--data.init_args.num_workers 0 (chips read in the job's own process, no shared "
        "memory), or make every value of a sample a tensor or a number"
    ), run.stderr[-3000:]


def test_a_batch_a_loader_worker_cannot_send_raises_instead_of_hanging() -> None:
    """A worker's queue sends in a thread of its own: a batch that fails to pickle there
    (an open-file limit reached as its shared memory is passed, an object that cannot be
    pickled) was printed and dropped, and the DataLoader waited for it forever. Through
    :func:`~torchgeo_dofa.runtime.loader_context` it raises in the job, and the job's
    error names the cause (the DataLoader's timeout only stops the old behaviour)."""
    import threading

    from torch.utils.data import DataLoader

    from torchgeo_dofa.jobs import loader_worker_error
    from torchgeo_dofa.runtime import BatchHandOverError, loader_context

    class Locked(torch.utils.data.Dataset[Any]):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"image": torch.zeros(2), "lock": threading.Lock()}

    loader = DataLoader(
        Locked(), batch_size=1, num_workers=1, collate_fn=lambda batch: batch[0],
        multiprocessing_context=loader_context("fork"), timeout=60,
    )  # fmt: skip
    with pytest.raises(BatchHandOverError, match="could not hand a batch over to the job: "
                       "TypeError: cannot pickle '_thread.lock' object") as info:  # fmt: skip
        next(iter(loader))
    found = loader_worker_error(info.value)
    assert found is not None and str(found) == (
        "a DataLoader worker reading chips could not send its batch to the job (TypeError: "
        "cannot pickle '_thread.lock' object); rerun with num_workers=0 (chips read in the "
        "job's own process, no shared memory), or make every value of a sample a tensor or "
        "a number"
    )


def test_a_full_dev_shm_is_one_line_naming_it(tmp_path, base_checkpoint) -> None:
    """A container's small ``/dev/shm`` (here a 200 KB tmpfs in a mount namespace of the
    job's own, root only): PyTorch's worker traceback, now the line naming it."""
    import shlex
    import shutil

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torchgeo_dofa", "embed", str(SCENE), "-o", str(out),
           "--weights", str(base_checkpoint), "--num-workers", "1", "--no-progress"]  # fmt: skip
    shell = f"mount -t tmpfs -o size=200k tmpfs /dev/shm && exec {shlex.join(cmd)}"
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a mount namespace needs root and unshare(1)")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /dev/shm"])
    if probe.returncode:
        pytest.skip("cannot mount in a new mount namespace here")
    run = subprocess.run(["unshare", "-m", "sh", "-c", shell], capture_output=True, text=True)
    assert run.returncode == 1, run.stderr[-3000:]
    assert run.stderr.splitlines()[-1] == (
        "torchgeo-dofa: error: a DataLoader worker reading chips could not pass chips through "
        "shared memory: /dev/shm is full or too small (a container's default is 64 MB); rerun "
        "with --num-workers 0 (chips read in the job's own process, no shared memory), or give "
        "it more (docker run --shm-size=2g, or free /dev/shm)"
    ), run.stderr[-3000:]
    assert not list(tmp_path.rglob("*.tif")) and not list(tmp_path.rglob("*.parquet"))


def test_a_batch_whose_shared_memory_cannot_be_received_is_named() -> None:
    """A worker whose side of the descriptor passing failed (its open-file limit reached as
    it accepted the job's connection) left the job a bare ``EOFError`` traceback from
    ``multiprocessing.resource_sharer`` (half the runs over 150 files under ``ulimit -n
    200``). Here the worker's listener is stopped before the job takes the descriptor, as a
    real failure leaves it: one line naming the cause."""
    from multiprocessing import resource_sharer

    from torchgeo_dofa.jobs import loader_worker_error

    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        shared = resource_sharer.DupFd(fd)
        resource_sharer.stop()
        with pytest.raises(OSError) as info:
            shared.detach()
    finally:
        os.close(fd)
    found = loader_worker_error(info.value)
    assert found is not None and str(found) == (
        "a DataLoader worker reading chips could not pass chips through shared memory: its end "
        "closed before the job took a batch (the open-file limit (ulimit -n) is reached, most "
        "often); rerun with num_workers=0 (chips read in the job's own process, no shared "
        "memory), or raise it (ulimit -n 4096)"
    )
    assert loader_worker_error(OSError(24, "Too many open files")) is None  # not from there


@pytest.mark.parametrize(
    ("torch_says", "cause"),
    [
        (
            "Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most "
            "recent call last):\nRuntimeError: unable to allocate shared memory(shm) for file "
            "</torch_31444_2788556858_0>: No space left on device (28)",
            "could not pass chips through shared memory: /dev/shm is full or too small",
        ),
        (
            "unable to open shared memory object </torch_1_2_0> in read-write mode: Too many "
            "open files (24)",
            "could not pass chips through shared memory: the open-file limit (ulimit -n)",
        ),
        (
            "DataLoader worker (pid 4242) is killed by signal: Bus error. It is possible that "
            "dataloader's workers are out of shared memory.",
            "was killed by signal Bus error: /dev/shm is too small for a batch",
        ),
        (
            "DataLoader worker (pid 4242) is killed by signal: Killed. ",
            "was killed by signal Killed (the kernel's out-of-memory killer, most often)",
        ),
        ("DataLoader worker (pid(s) 4242) exited unexpectedly", "exited unexpectedly"),
        (  # runtime.BatchHandOverError: the batch's shared memory could not be passed
            "Caught BatchHandOverError in DataLoader worker process.\nOriginal Traceback (most "
            "recent call last):\nOSError: [Errno 24] Too many open files\n\nDuring handling "
            "...\ntorchgeo_dofa.runtime.BatchHandOverError: could not hand a batch over to the "
            "job: OSError: [Errno 24] Too many open files",
            "could not pass chips through shared memory: the open-file limit (ulimit -n)",
        ),
    ],
)
def test_each_loader_worker_failure_torch_reports_is_named(torch_says, cause) -> None:
    """PyTorch's texts for the other shared-memory failures and worker deaths (a full
    ``/dev/shm``: its tmpfs needs root to shrink, so the real failure is the test above),
    wrapped as Lightning wraps them, map to their cause; other errors map to nothing."""
    from torchgeo_dofa.jobs import loader_worker_error

    try:
        try:
            raise RuntimeError(torch_says)
        except RuntimeError as err:
            raise ValueError("wrapped") from err
    except ValueError as wrapped:
        found = loader_worker_error(wrapped)
    assert found is not None and cause in str(found), found
    assert "rerun with num_workers=0" in str(found)
    assert loader_worker_error(RuntimeError("CUDA out of memory")) is None
    assert loader_worker_error(ValueError(torch_says)) is None  # PyTorch raises RuntimeError


def test_a_chip_larger_than_one_read_allows_is_one_line(tmp_path, capsys) -> None:
    """``--chip-size 100000`` and ``--points`` with ``--buffer-m 200000`` asked numpy for
    149 GiB / 24 GiB (a traceback, exit 1): a chip is read whole. Now one line, exit 2."""
    out = tmp_path / "out"
    args = ["embed", str(SCENE), "-o", str(out), "--weights", "none", "--no-progress"]
    assert main([*args, "--chip-size", "100000"]) == 2
    assert capsys.readouterr().err == (
        "torchgeo-dofa: error: --chip-size 100000 reads 100000 x 100000 pixels a band at once "
        "(37.3 GiB a band in float32) for one model input: at most 4096 (a chip is resized or "
        "tiled to 224 px; cover a large area with more chips)\n"
    )
    with pytest.warns(UserWarning, match="of one 4096-px chip"):  # the largest is taken
        assert main([*args, "--chip-size", "4096", "--output", "pooled"]) == 0
    points = tmp_path / "p.csv"
    with rasterio.open(SCENE) as src:
        lon, lat = _scene_lonlat(src.bounds.left + 1000, src.bounds.bottom + 1000)
    points.write_text(f"lon,lat\n{lon},{lat}\n")
    pooled = ["--points", str(points), "--output", "pooled", "-o", str(tmp_path / "pts")]
    assert main([*args[:2], *args[4:], *pooled, "--buffer-m", "200000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("torchgeo-dofa: error: region #0 PointBuffer("), err
    assert "is 40000 px a side at the data's 10 x 10 pixels (EPSG:32633), read as one chip: " in err
    assert err.endswith(
        "at most 4096 px (a smaller buffer (--buffer-m) or box; a large area is embedded as "
        "many chips, without points)"
    ), err
    assert not (tmp_path / "pts").exists()


def test_loader_workers_are_never_more_than_batches(tmp_path, capsys) -> None:
    """``--num-workers 100`` for a job of one batch started 100 processes (13 s for a chip),
    and the job's first line said 100."""
    args = ["embed", str(SCENE), "-o", str(tmp_path / "o"), "--weights", "none", "--seed", "0"]
    assert main([*args, "--num-workers", "100", "--batch-size", "8", "--no-progress"]) == 0
    assert "batch size 8, 1 loader worker(s) (of 100: one per batch)\n" in capsys.readouterr().err
    dm = DOFAPredictDataModule(SCENE, batch_size=4, num_workers=100)
    dm.setup("predict")
    assert dm.predict_dataloader().num_workers == 2  # 6 chips, batches of 4


def test_a_finished_output_damaged_since_is_not_done(tmp_path, capsys) -> None:
    """A rerun over outputs truncated or overwritten after the job finished said "0 chips (6
    already done)" with exit 0, keeping the broken files. Now exit 1 naming the file and the
    fix; after it, the same command computes that output again."""
    out = tmp_path / "out"
    args = ["embed", str(SCENE), "-o", str(out), "--weights", "none", "--seed", "1"]
    args += ["--output", "both", "--no-progress", "--num-workers", "0"]
    assert main(args) == 0
    grid, table = out / "ftw_s2_l2a_33N_grid.tif", out / "ftw_s2_l2a_33N_pooled.parquet"
    whole = grid.read_bytes()
    for damaged, cut in ((grid, len(whole) // 2), (table, 100)):
        original = damaged.read_bytes()
        damaged.write_bytes(original[:cut])  # a copy cut short
        capsys.readouterr()
        assert main(args) == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(
            f"torchgeo-dofa: error: {damaged} was finished by an earlier run of this job but "
            "cannot be read now ("
        ), err
        assert err.endswith("delete it and rerun the same command (its chips are computed again)")
        # helper-119: the cause said "Read failed. See previous exception for details.", an
        # exception never shown; now the library's own message (libtiff's for the grid)
        assert "see previous exception" not in err.lower(), err
        if damaged == grid:
            assert "TIFFReadEncodedTile() failed" in err, err
        assert damaged.stat().st_size == cut  # left as found, for the user to look at
        damaged.write_bytes(b"garbage")
        assert main(args) == 1
        damaged.unlink()
        assert main(args) == 0  # computed again
    with rasterio.open(grid) as got, rasterio.open(SCENE):
        assert got.read().shape[0] == 768
    assert grid.read_bytes() == whole  # the same seed, the same bytes


def test_sigterm_to_the_process_group_stops_after_the_batch(tmp_path, base_checkpoint) -> None:
    """``scancel`` / systemd send SIGTERM to every process of the job: the loader worker
    used to die first and the job ended with a traceback and exit 1."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torchgeo_dofa", "embed", str(SCENE), "-o", str(out),
           "--weights", str(base_checkpoint), "--output", "grid", "--batch-size", "1",
           "--num-workers", "1", "--no-progress"]  # fmt: skip
    job = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    parts = out / "ftw_s2_l2a_33N_grid.tif.parts"
    try:
        _wait_for_a_part(job, parts)
        os.killpg(job.pid, signal.SIGTERM)
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 143, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "stopped by SIGTERM" in err
    # acknowledged at once, by the job alone (its loader worker got the SIGTERM as well)
    assert err.count("torchgeo-dofa: SIGTERM: stopping once the batch or output") == 1, err
    assert not (out / "ftw_s2_l2a_33N_grid.tif").exists() and list(parts.glob("*.npy"))


def _embed_with_stdout(out: Path, stdout: Any, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torchgeo_dofa", "embed", str(SCENE), "-o", str(out),
           "--weights", "none", "--seed", "0", *extra]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.run(
        cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, env=env, timeout=300
    )


def _closed_pipe() -> int:
    """The writing end of a pipe whose reader is gone (``| head`` that exited)."""
    read, write = os.pipe()
    os.close(read)
    return write


def test_a_closed_stdout_is_one_line_and_a_finished_job_exits_0(tmp_path: Path) -> None:
    """``embed ... | true``: the summary's BrokenPipeError was a traceback and exit 1 (120
    with buffered stdout) after a job that had finished; with the progress bar, the first
    refresh failed the job as "[Errno 32] Broken pipe", exit 2 (bad input)."""
    pipe = _closed_pipe()
    try:
        done = _embed_with_stdout(tmp_path / "done", pipe, "--no-progress")
        bar = _embed_with_stdout(tmp_path / "bar", pipe)  # the progress bar writes to stdout
    finally:
        os.close(pipe)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.splitlines()[-1].startswith(
        "torchgeo-dofa: warning: could not write to stdout (broken pipe: its reader is gone), "
        "so this line was not printed there: embedded 6 chips in "
    ), done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
    with rasterio.open(tmp_path / "done" / "ftw_s2_l2a_33N_grid.tif") as grid:
        assert grid.count == 768 and np.isfinite(grid.read(1)).all()
    assert len(gpd.read_parquet(tmp_path / "done" / "ftw_s2_l2a_33N_pooled.parquet")) == 6
    # the job stops, saying why and how to resume
    assert bar.returncode == 1, bar.stderr[-3000:]
    assert bar.stderr.splitlines()[-1] == (
        "torchgeo-dofa: error: could not write to stdout (broken pipe: its reader is gone) "
        "while the command ran (the progress bar writes there): rerun it with stdout open or "
        "without the progress bar (embed --no-progress; --trainer.enable_progress_bar false "
        "with --config); an embed or predict job resumes where it stopped"
    )
    assert "Traceback" not in bar.stderr and "Exception ignored" not in bar.stderr


def test_a_stdout_whose_reader_leaves_during_the_job_is_named(tmp_path: Path) -> None:
    """``embed ... | head -c 0`` with ``PYTHONUNBUFFERED=1``: the progress bar's failed write
    left nothing in stdout's buffer to fail a flush, and the job ended as bad input ("[Errno
    32] Broken pipe", exit 2), not as the stdout fault it is (exit 1)."""
    cmd = [sys.executable, "-m", "torchgeo_dofa", "embed", str(SCENE), "-o", str(tmp_path),
           "--weights", "none", "--seed", "0"]  # fmt: skip
    env = os.environ | {"PYTHONUNBUFFERED": "1"}  # a failed write then leaves no buffer
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert job.stdout is not None
    job.stdout.close()  # the reader goes while the job runs, as head -c 0 does
    _, err = job.communicate(timeout=300)
    assert job.returncode == 1, err[-3000:]
    assert err.splitlines()[-1].startswith(
        "torchgeo-dofa: error: could not write to stdout (broken pipe: its reader is gone) "
        "while the command ran"
    ), err[-3000:]


def test_a_result_line_neither_stdout_nor_stderr_takes_is_dropped_quietly(monkeypatch) -> None:
    """``embed ... 2>&1 | head -c 10`` after a finished job: the warning carrying the summary
    failed on stderr too, and the finished job exited 1 (a stranger's finding)."""
    from torchgeo_dofa.cli import _print_result

    streams = []
    for name in ("stdout", "stderr"):  # two pipes whose readers are gone
        read, write = os.pipe()
        os.close(read)
        streams.append(open(write, "w"))  # closed below
        monkeypatch.setattr(sys, name, streams[-1])
    try:
        _print_result("embedded 6 chips in 2.0 s")  # no exception: the job's result stands
        for stream in streams:  # the exit's flush cannot fail on them
            assert os.readlink(f"/proc/self/fd/{stream.fileno()}") == "/dev/null"
    finally:
        for stream in streams:
            stream.close()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_stdout_names_stdout(tmp_path: Path) -> None:
    """``embed ... >/dev/full`` (stdout on a full disk): the progress bar's write failed the
    job as "[Errno 28] No space left on device", exit 2, as if the input or output were at
    fault; with stdout closed (``>&-``) the summary was lost without a word."""
    with open("/dev/full", "w") as full:
        bar = _embed_with_stdout(tmp_path / "bar", full)
    assert bar.returncode == 1, bar.stderr[-3000:]
    assert bar.stderr.splitlines()[-1].startswith(
        "torchgeo-dofa: error: could not write to stdout ([Errno 28] No space left on "
        "device) while the command ran (the progress bar writes there)"
    ), bar.stderr
    closed = subprocess.run(
        [sys.executable, "-m", "torchgeo_dofa", "embed", str(SCENE), "-o", str(tmp_path / "c"),
         "--weights", "none", "--no-progress"],
        stderr=subprocess.PIPE, text=True, timeout=300, pass_fds=(), close_fds=True,
        preexec_fn=lambda: os.close(1),
    )  # fmt: skip
    assert closed.returncode == 0, closed.stderr[-3000:]
    assert closed.stderr.splitlines()[-1].startswith(
        "torchgeo-dofa: warning: could not write to stdout (it is closed), so this line was "
        "not printed there: embedded 6 chips"
    ), closed.stderr


def test_write_error_starts_its_own_line_after_the_progress_bar(tmp_path: Path) -> None:
    """A full disk with the progress bar on: the bar (stdout) is closed before the one-line
    error (stderr), which used to be glued to the bar's last refresh."""
    with tmpfs(tmp_path / "disk", "4m") as disk:
        cmd = [
            sys.executable, "-m", "torchgeo_dofa", "embed", str(SCENE), "-o",
            str(disk / "out"), "--weights", "none", "--device", "cpu", "--precision", "32",
        ]  # fmt: skip
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300
        )
    assert proc.returncode == 1, proc.stdout[-3000:]
    lines = proc.stdout.replace("\r", "\n").splitlines()
    errors = [i for i, line in enumerate(lines) if "torchgeo-dofa: error:" in line]
    assert len(errors) == 1 and lines[errors[0]].startswith("torchgeo-dofa: error: could not")
    bars = [i for i, line in enumerate(lines) if "Predicting DataLoader" in line]
    assert bars and max(bars) < errors[0]  # the bar was closed before the error


@pytest.mark.parametrize("value", ["abc", "2.5", ""])
def test_a_hub_timeout_huggingface_hub_cannot_read_is_one_line(
    value: str, monkeypatch, capsys, tmp_path
) -> None:
    """HF_HUB_ETAG_TIMEOUT=abc failed every job, --weights none too, with huggingface_hub's
    int() traceback as it loaded (timm imports it), exit 1."""
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", value)
    out = tmp_path / "out"
    assert main(["embed", str(SCENE), "-o", str(out), "--weights", "none"]) == 2
    assert capsys.readouterr().err == (
        f"torchgeo-dofa: error: the environment's HF_HUB_DOWNLOAD_TIMEOUT={value!r} is not a "
        "whole number of seconds, which huggingface_hub needs as it loads (it reads it with "
        "int()): set it to e.g. HF_HUB_DOWNLOAD_TIMEOUT=10, or unset it\n"
    )
    assert not out.exists()
    assert main(["fit", "--help"]) == 2  # LightningCLI's help loads the hub: its traceback
    capsys.readouterr()
    with pytest.raises(SystemExit) as helped:  # embed's help, and preview, load no hub
        main(["embed", "--help"])
    assert helped.value.code == 0
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", " 30 ")  # int() takes it: so does the hub
    from torchgeo_dofa.cli import environment_problem

    assert environment_problem(os.environ) is None


def test_negative_numbers_with_an_exponent_are_values() -> None:
    """``--nodata -3.4028234663852886e+38`` (float rasters' usual no-data) was argparse's
    "expected one argument": it took the value for an option."""
    from torchgeo_dofa.cli import _parser

    nodata = ["--nodata", "-3.4028234663852886e+38"]
    bbox = ["--bbox", "-1e-1", "-.5", "-0.05", "-2E-1"]
    args = _parser().parse_args(
        ["embed", "in.tif", "-o", "out", *nodata, *bbox, "--offset", "-1e3"]
    )
    assert args.nodata == -3.4028234663852886e38 and args.offset == -1000.0
    assert args.bbox == [-0.1, -0.5, -0.05, -0.2]
    with pytest.raises(SystemExit):  # an option is still an option
        _parser().parse_args(["embed", "in.tif", "-o", "out", "--nodata", "-e5"])
    for text in ("-inf", "-Inf", "-INFINITY"):  # gdalinfo's "NoData Value=-inf"
        args = _parser().parse_args(["embed", "in.tif", "-o", "out", "--nodata", text])
        assert args.nodata == float("-inf")
    args = _parser().parse_args(["embed", "in.tif", "-o", "out", "--nodata", "-nan"])
    assert math.isnan(args.nodata)


def test_file_bands_serve_the_regions_of_multiband_files(tmp_path, capsys, base_checkpoint) -> None:
    """--file-bands applies to a job's every region: a region of per-band files beside a
    stack that needs them was refused ("the inputs hold only single-band files")."""
    with rasterio.open(SCENE) as src:
        profile = src.profile | {"width": 64, "height": 64}
        data = src.read(window=Window(0, 0, 64, 64))
    with rasterio.open(tmp_path / "stack.tif", "w", **profile) as dst:  # no descriptions
        dst.write(data)
    (tmp_path / "perband").mkdir()
    for band, values in zip(("B04", "B03", "B02", "B08"), data, strict=True):
        one = profile | {"count": 1}
        with rasterio.open(tmp_path / "perband" / f"scene_{band}.tif", "w", **one) as dst:
            dst.write(values[None])
    names = ["--file-bands", "B4", "B3", "B2", "B8", "--bands", "B4", "B3", "B2", "B8"]
    common = ["--weights", str(base_checkpoint), "--no-progress", "--output", "grid"]
    both = [str(tmp_path / "stack.tif"), str(tmp_path / "perband")]
    assert (
        main(["embed", *both, *names, *common, "--chip-size", "64", "-o", str(tmp_path / "o")]) == 0
    )
    with rasterio.open(tmp_path / "o" / "stack_grid.tif") as a:
        with rasterio.open(tmp_path / "o" / "perband_grid.tif") as b:
            np.testing.assert_array_equal(a.read(), b.read())  # the same pixels, named alike
    capsys.readouterr()
    alone = [str(tmp_path / "perband"), *names, *common, "-o", str(tmp_path / "p")]
    assert main(["embed", *alone]) == 2  # no input takes them: still refused
    assert "leave out --file-bands" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_every_file_bands_name_is_read_or_reported(tmp_path, capsys) -> None:
    """A --file-bands name that is no band (``X``) was dropped without a word, its channel
    read as nothing: it is refused before anything is written, naming the names known and
    the fixes (from Python too); a known name the default bands leave out is warned of."""
    from torchgeo_dofa.bands import BandError

    with rasterio.open(SCENE) as src:
        profile = src.profile | {"width": 64, "height": 64}
        data = src.read(window=Window(0, 0, 64, 64))
    stack = tmp_path / "stack.tif"
    with rasterio.open(stack, "w", **profile) as dst:  # no band descriptions
        dst.write(data)
    common = ["--weights", "none", "--no-progress", "--output", "pooled", "--chip-size", "64"]
    out = tmp_path / "out"
    unknown = ["--file-bands", "B4", "B3", "B2", "X"]
    assert main(["embed", str(stack), "-o", str(out), *unknown, *common]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "torchgeo-dofa: error: --file-bands B4 B3 B2 X names 'X', which is not a band name "
        "this package knows, so that channel would be read as nothing. Known names: "
        "Sentinel-2's B1 ... B12 and B8A"
    )
    assert "a band not to embed by its position (band4)" in err
    assert "--bands ... and give its --wavelengths ..." in err
    assert len(err.splitlines()) == 1 and not out.exists()
    # a band named as an asset is told its Sentinel-2 name
    nir = ["--file-bands", "B4", "B3", "B2", "nir"]
    assert main(["embed", str(stack), "-o", str(out), *nir, *common]) == 2
    assert "names 'nir', which is not a band name this package knows (for 'nir', write B8)" in (
        capsys.readouterr().err
    )
    assert not out.exists()
    # the data module and the dataset refuse it alike; selected (another sensor's band) it
    # is read, and a bandN placeholder names a band not to read
    with pytest.raises(BandError, match=r"^file_bands=\['B4', 'B3', 'B2', 'X'\] names 'X'"):
        DOFAPredictDataModule(stack, file_bands=["B4", "B3", "B2", "X"]).setup("predict")
    other = Sentinel2SR(stack, file_bands=["B4", "B3", "B2", "X"], bands=["B4", "X"],
                        wavelengths=[0.665, 0.842])  # fmt: skip
    assert other.bands == ("B4", "X")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Sentinel2SR(stack, file_bands=["B4", "B3", "B2", "band4"]).bands == (
            "B2", "B3", "B4",
        )  # fmt: skip
    # a known name the default bands leave out: embedded, with a warning naming it
    known = ["--file-bands", "B4", "B3", "B2", "QA60"]
    said = r"file_bands= names QA60, which the default bands \['B2', 'B3', 'B4'\] leave out"
    with pytest.warns(UserWarning, match=said):
        assert main(["embed", str(stack), "-o", str(out), *known, *common]) == 0


def test_an_output_path_longer_than_the_system_takes_is_one_line(tmp_path, capsys) -> None:
    """Every name fitting, but the path of the parts beyond PATH_MAX (4096 on Linux): the
    bare ``[Errno 36] File name too long`` with the 4 KB path. Now one line, exit 2, nothing
    made."""
    import os

    deep = tmp_path
    while len(os.fsencode(str(deep))) < 3700:
        deep = deep / ("a" * 200)
    deep = deep / ("b" * (3899 - len(os.fsencode(str(deep)))))  # 3900 bytes
    deep.mkdir(parents=True)
    out = deep / ("d" * 150)  # fits (4051 bytes), but not its grid's parts
    assert main(["embed", str(SCENE), "-o", str(out), "--weights", "none", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("torchgeo-dofa: error: output "), err[-300:]
    assert main(["embed", str(SCENE), "-o", str(out / ("e" * 200)), "--weights", "none"]) == 2
    too_long = capsys.readouterr().err.strip()  # the -o path itself
    assert too_long.startswith("torchgeo-dofa: error: -o "), too_long[-300:]
    assert "the system takes for a path: give a shorter -o" in too_long, too_long[-300:]
    assert err.endswith(
        "(the parts inside its parts folder), more than the 4095 the system takes for a path: "
        "give a shorter -o (a folder nearer the root)"
    ), err[-300:]
    assert len(err.splitlines()) == 1 and not out.exists()


def test_names_too_long_for_the_file_system_are_one_line(tmp_path, capsys) -> None:
    """A -o name longer than the file system takes (255 bytes), or an input whose outputs'
    names in -o (or their parts folders, temporary files, a -o NAME.tif's manifest) would be,
    failed with the bare "[Errno 36] File name too long" (a temporary file's only once the
    job had embedded everything): one line naming the name, its length, the limit and the
    fix, exit 2, before anything is written; a too long input name the same way."""
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    common = ["--weights", "none", "--no-progress", "--output", "pooled", "--chip-size", "64"]

    def refused(*args: str) -> str:
        assert main(["embed", *args, *common]) == 2
        err = capsys.readouterr().err
        assert err.startswith("torchgeo-dofa: error: ") and len(err.splitlines()) == 1, err
        assert "Errno" not in err
        assert {p.name for p in tmp_path.iterdir()} <= {"scene.tif", "named"}  # nothing written
        return err

    with rasterio.open(SCENE) as src:
        profile = src.profile | {"width": 64, "height": 64}
        data, names = src.read(window=Window(0, 0, 64, 64)), src.descriptions
    scene = tmp_path / "scene.tif"
    with rasterio.open(scene, "w", **profile) as dst:
        dst.write(data)
        dst.descriptions = names
    # -o itself, or a folder on its way
    long = "o" * (limit + 45)
    said = (
        f"the name '{'o' * 40}...{'o' * 16}' is {limit + 45} bytes, more than the {limit} its "
        "file system takes for a file or folder name: give a shorter -o\n"
    )
    assert refused(str(scene), "-o", str(tmp_path / long)).endswith(said)
    assert refused(str(scene), "-o", str(tmp_path / long / "out")).endswith(said)
    # an input whose output fits, but not the output's temporary file (38 bytes longer)
    stem = "i" * (limit - 40)
    named = tmp_path / "named"
    named.mkdir()
    shutil.copy(scene, named / f"{stem}.tif")
    err = refused(str(named / f"{stem}.tif"), "-o", str(tmp_path / "out"))
    assert (
        f"_pooled.parquet: its temporary file '.{'i' * 39}...arquet.<hex>.tmp' would be "
        f"{limit - 40 + 15 + 38} bytes, more than the {limit} its file system takes for a file "
        f"or folder name: the outputs in -o are named after their input, '{'i' * 40}..."
    ) in err
    assert err.endswith(
        f"shorten that input's name (without its extension) to at most {limit - 53} bytes, or "
        "give it alone with a shorter -o NAME.tif\n"
    )
    shutil.rmtree(named)
    # -o NAME.parquet: its manifest's temporary file is 62 bytes longer than the name
    file = f"{'n' * (limit - 60)}.parquet"
    err = refused(str(scene), "-o", str(tmp_path / file))
    assert "the manifest's temporary file '..nnnnnn" in err
    assert err.endswith(f"give a shorter -o name (at most {limit - 62} bytes)\n")
    # an input named too long for any file to have it
    err = refused(str(tmp_path / f"{long}.tif"), "-o", str(tmp_path / "out"))
    assert f"the name '{'o' * 40}...{'o' * 12}.tif' is {limit + 49} bytes" in err
    # the longest names that fit are written
    fits = f"{'n' * (limit - 62 - 8)}.parquet"
    assert main(["embed", str(scene), "-o", str(tmp_path / fits), *common]) == 0
    assert (tmp_path / fits).is_file()


def test_an_embed_in_a_python_process_frees_its_model_when_it_ends(
    tmp_path, base_checkpoint
) -> None:
    """A notebook or script calling the command's ``main`` / ``embed`` job after job: each
    job's model is freed as it ends (its trainer, module and data module refer to each
    other, so Python freed them only at a later cyclic collection: 400 MB more each job);
    a module a callback kept still works (emptying the job's tensors broke it, and the
    end-to-end benchmark)."""

    class Keep(pl.Callback):
        module: Any = None

        def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
            self.module = pl_module

    before = _encoders_holding_weights()
    box = [13.11, 48.275, 13.111, 48.276]  # one chip
    keep = Keep()
    embed(SCENE, tmp_path / "kept", weights=str(base_checkpoint), output="pooled", bbox=box,
          progress=False, callbacks=[keep])  # fmt: skip
    for i in range(2):
        out = tmp_path / f"job{i}"
        assert main(["embed", str(SCENE), "-o", str(out), "--bbox", *map(str, box), "--weights",
                     str(base_checkpoint), "--no-progress"]) == 0  # fmt: skip
        assert _encoders_holding_weights() - {id(keep.module.encoder)} <= before, i
        assert len(gpd.read_parquet(out / "ftw_s2_l2a_33N_pooled.parquet")) == 1
    x = torch.randn(1, 4, 224, 224)
    with torch.inference_mode():
        assert keep.module.encoder(x, SCENE_WAVELENGTHS).pooled.isfinite().all()


def _encoders_holding_weights() -> set[int]:
    """The ids of the DOFA encoders alive in this process that hold weights."""
    import gc

    from torchgeo_dofa.model import DOFAEncoder

    return {
        id(o)
        for o in gc.get_objects()
        if isinstance(o, DOFAEncoder) and any(p.device.type != "meta" for p in o.parameters())
    }
