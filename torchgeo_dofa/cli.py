"""The ``torchgeo-dofa`` command line: ``embed``, ``preview``, ``fit``/``predict`` (LightningCLI).

``embed`` is also importable as :func:`embed`, the product's main job: rasters in,
georeferenced embeddings out (a grid GeoTIFF and/or a pooled GeoParquet per region).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import rasterio
import rasterio.errors
from pyproj import CRS
from rasterio.crs import CRS as RioCRS
from torch.utils.data import DataLoader, Sampler

from .bands import BandError
from .datasets import EarthEngineS2, Sentinel2Base, Sentinel2SR, stack_dofa_samples
from .embedder import OUTPUT_KINDS, DOFAEmbedder
from .model import canonical_variant
from .spatial import BBox, PointBuffer, region_to_crs, region_window
from .transforms import DOFAPreprocess
from .weights import CheckpointError
from .writers import GridGeometry, GridWriter, PooledWriter

__all__ = ["EmbedSummary", "InputError", "embed", "main"]

GeoSlice = tuple[slice, slice, slice]
CHIP = 224
#: GDAL block cache for the embed job, in MB (GDAL's default is 5 % of RAM).
GDAL_CACHE_MB = 256
_EE_TILE = re.compile(r"^(?P<prefix>.+)-\d{10}-\d{10}\.tiff?$")
_PRECISIONS = {
    "32": "32-true",
    "bf16": "bf16-mixed",
    "32-true": "32-true",
    "bf16-mixed": "bf16-mixed",
}


class InputError(ValueError):
    """A bad input to the embed job (reported as a one-line error by the CLI)."""


@dataclass
class EmbedSummary:
    """What an embed job did.

    Attributes:
        chips: chips embedded in this run (resumed chips excluded).
        skipped: chips skipped because an earlier run had written them.
        seconds: wall time of the job.
        outputs: files written.
    """

    chips: int = 0
    skipped: int = 0
    seconds: float = 0.0
    outputs: list[Path] = field(default_factory=list)

    def line(self) -> str:
        """One-line summary for the terminal."""
        rate = self.chips / self.seconds if self.seconds > 0 else 0.0
        resumed = f" ({self.skipped} already done)" if self.skipped else ""
        paths = ", ".join(str(p) for p in self.outputs) or "none"
        return (
            f"embedded {self.chips} chips{resumed} in {self.seconds:.1f} s "
            f"({rate:.2f} chips/s) -> {paths}"
        )


@dataclass
class _Region:
    name: str
    paths: list[Path]
    ee: bool


class ChipSampler(Sampler[GeoSlice]):
    """A fixed list of chips (TorchGeo ``GeoSlice``s), in order."""

    def __init__(self, chips: Sequence[GeoSlice]) -> None:
        """Wrap a chip list.

        Args:
            chips: ``(x, y, t)`` slices.
        """
        self.chips = list(chips)

    def __iter__(self) -> Iterator[GeoSlice]:
        """Yield the chips."""
        return iter(self.chips)

    def __len__(self) -> int:
        """Number of chips."""
        return len(self.chips)


def _group_inputs(inputs: Sequence[str | Path]) -> list[_Region]:
    """One region per input file or folder; the tiles of one Earth Engine export merge."""
    regions: dict[str, _Region] = {}
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise InputError(f"input {str(path)!r} does not exist")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        rasters = [p for p in files if p.suffix.lower() in (".tif", ".tiff", ".jp2")]
        if not rasters:
            raise InputError(f"input {str(path)!r} holds no GeoTIFF or JPEG2000 file")
        for p in rasters:
            try:
                with rasterio.open(p):
                    pass
            except rasterio.errors.RasterioIOError as err:
                raise InputError(f"cannot read {p}: {err}") from err
        match = _EE_TILE.match(path.name)
        if path.is_dir():
            ee = all(_EE_TILE.match(p.name) for p in rasters)
            regions[str(path)] = _Region(path.name, rasters, ee)
        elif match:
            key = str(path.with_name(match["prefix"]))
            regions.setdefault(key, _Region(match["prefix"], [], True)).paths.append(path)
        else:
            regions[str(path)] = _Region(path.stem, [path], False)
    for region in regions.values():
        crss = {}
        for p in region.paths:
            with rasterio.open(p) as src:
                crss[str(p)] = src.crs
        if len({c.to_string() if c else None for c in crss.values()}) > 1:
            listing = ", ".join(f"{Path(k).name}: {v}" for k, v in crss.items())
            raise InputError(
                f"mixed CRS in region {region.name!r} ({listing}): reproject them to one CRS "
                "(gdalwarp -t_srs) or pass them as separate inputs"
            )
    return list(regions.values())


def _open(region: _Region, bands: Sequence[str] | None) -> Sentinel2Base:
    cls: type[Sentinel2Base] = EarthEngineS2 if region.ee else Sentinel2SR
    return cls(paths=region.paths, bands=bands)


def _check_reflectance(ds: Sentinel2Base) -> None:
    """Reject inputs already scaled to [0, 1] before anything is written (decimated read)."""
    for path in {Path(p) for p in ds.index.filepath}:
        with rasterio.open(path) as src:
            scale = max(1, math.ceil(max(src.width, src.height) / 256))
            data = src.read(
                out_shape=(src.count, max(1, src.height // scale), max(1, src.width // scale))
            ).astype(np.float64)
            ok = np.isfinite(data) & (data != 0)
            if src.nodata is not None:
                ok &= data != src.nodata
            if ok.any() and data[ok].min() >= 0 and data[ok].max() <= 2:
                raise InputError(
                    f"{path.name}: all values lie in [0, 2], which looks already normalised; "
                    "DOFA's pipeline expects raw surface reflectance 0..10000 (multiply by "
                    "10000 if the file holds reflectance in [0, 1])"
                )


def _region_chips(
    ds: Sentinel2Base, bounds: tuple[float, float, float, float], stride_px: int
) -> list[GeoSlice]:
    """224-px chips covering ``bounds`` from the lower-left corner (TorchGeo's grid order)."""
    xres, yres = ds.res
    xmin, ymin, xmax, ymax = bounds
    size_x, size_y = CHIP * xres, CHIP * yres
    step_x, step_y = stride_px * xres, stride_px * yres
    cols = max(1, math.ceil((xmax - xmin - size_x) / step_x - 1e-9) + 1)
    rows = max(1, math.ceil((ymax - ymin - size_y) / step_y - 1e-9) + 1)
    tmin, tmax = ds.index.index.left.min(), ds.index.index.right.max()
    return [
        (
            slice(xmin + j * step_x, xmin + j * step_x + size_x),
            slice(ymin + i * step_y, ymin + i * step_y + size_y),
            slice(tmin, tmax),
        )
        for i in range(rows)
        for j in range(cols)
    ]


def _grid_key_of(geometry: GridGeometry, chip: GeoSlice) -> str:
    cell = geometry.cell
    return GridWriter.key_for(geometry, [cell, 0.0, chip[0].start, 0.0, -cell, chip[1].stop])


def _pooled_key_of(chip: GeoSlice) -> str:
    return PooledWriter.chip_key([chip[0].start, chip[0].stop, 0.0, chip[1].start, chip[1].stop])


def _read_points(path: Path, buffer_m: float) -> list[PointBuffer]:
    if not path.is_file():
        raise InputError(f"points file {str(path)!r} does not exist")
    points: list[PointBuffer] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                keys = {k.lower(): v for k, v in row.items() if k}
                lon = keys.get("lon", keys.get("longitude", keys.get("x")))
                lat = keys.get("lat", keys.get("latitude", keys.get("y")))
                if lon is None or lat is None:
                    raise InputError(f"{path}: CSV needs 'lon' and 'lat' columns")
                points.append(PointBuffer(float(lon), float(lat), buffer_m))
    else:
        import geopandas as gpd

        frame = gpd.read_file(path).to_crs(4326)
        for geom in frame.geometry:
            if geom.geom_type != "Point":
                raise InputError(f"{path}: only Point geometries are supported for --points")
            points.append(PointBuffer(float(geom.x), float(geom.y), buffer_m))
    if not points:
        raise InputError(f"{path} holds no points")
    return points


def embed(
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    *,
    variant: str = "base",
    output: str = "both",
    input_prep: str = "resize",
    weights: str | None = "official",
    batch_size: int = 8,
    num_workers: int = 0,
    device: str = "auto",
    devices: int | str = 1,
    strategy: str = "auto",
    precision: str = "32",
    bands: Sequence[str] | None = None,
    stride: int = CHIP,
    points: str | Path | None = None,
    buffer_m: float = 2048.0,
    bbox: Sequence[float] | None = None,
    progress: bool = True,
    metadata: dict[str, str] | None = None,
    callbacks: Sequence[pl.Callback] = (),
) -> EmbedSummary:
    """Embed rasters with DOFA and write georeferenced outputs, resumably.

    Every input is validated (files, bands, reflectance scale, variant, weights) before any
    output is written. Per region (an input file, a folder, or the tiles of one Earth Engine
    export) it writes ``<name>_grid.tif`` (grid embedding map) and/or ``<name>_pooled.parquet``
    (one row per chip) into ``output_dir``. Running the same job again skips chips already
    written and regions already complete.

    Args:
        inputs: GeoTIFF/JP2 files or folders.
        output_dir: folder for the outputs.
        variant: ``base``/``large``.
        output: ``grid``, ``pooled`` or ``both``.
        input_prep: ``resize`` or ``tile`` (how chips become 224 x 224 model inputs).
        weights: ``official``, a checkpoint path, or None (random weights).
        batch_size: chips per batch.
        num_workers: DataLoader workers.
        device: Lightning accelerator (``auto``, ``cpu``, ``gpu``).
        devices: number of devices (e.g. 2 with ``strategy="ddp"``).
        strategy: Lightning strategy.
        precision: ``32`` or ``bf16``.
        bands: bands to read (default: DOFA's 9 bands, or every S2 band present).
        stride: chip stride in pixels (a multiple of 16; 224 = no overlap).
        points: CSV (lon, lat) or GeoJSON of points; one chip per point (pooled only).
        buffer_m: half-side of each point's chip, metres.
        bbox: ``(minlon, minlat, maxlon, maxlat)`` region of interest.
        progress: show Lightning's progress bar.
        metadata: extra tags stored in every output.
        callbacks: extra Lightning callbacks for the prediction trainer.

    Returns:
        An :class:`EmbedSummary`.

    Raises:
        InputError, BandError, CheckpointError, ValueError: for bad input, before writing.
    """
    start = time.perf_counter()
    variant = canonical_variant(variant)
    if output not in OUTPUT_KINDS:
        raise InputError(f"unknown --output {output!r}: choose one of {list(OUTPUT_KINDS)}")
    if input_prep not in ("resize", "tile"):
        raise InputError(f"unknown --input-prep {input_prep!r}: choose 'resize' or 'tile'")
    if precision not in _PRECISIONS:
        raise InputError(f"unknown --precision {precision!r}: choose '32' or 'bf16'")
    if stride <= 0 or stride % 16:
        raise InputError(f"--stride must be a positive multiple of 16 pixels, got {stride}")
    if points is not None and output != "pooled":
        raise InputError("--points gives one chip per point: use --output pooled")
    point_list = _read_points(Path(points), buffer_m) if points is not None else None

    regions = _group_inputs(inputs)
    datasets = [(region, _open(region, bands)) for region in regions]
    for _, ds in datasets:
        _check_reflectance(ds)
    module = DOFAEmbedder(variant=variant, weights=weights, output=output, input_prep=input_prep)  # type: ignore[arg-type]
    meta = module.metadata | (metadata or {})

    out_dir = Path(output_dir)
    summary = EmbedSummary()
    for region, ds in datasets:
        crs = RioCRS.from_user_input(ds.crs.to_wkt() if hasattr(ds.crs, "to_wkt") else ds.crs)
        xres = float(ds.res[0])
        total = tuple(float(v) for v in ds.index.total_bounds)
        if bbox is not None:
            roi = region_to_crs(BBox(*bbox), CRS.from_user_input(crs.to_wkt()))
            total = tuple(float(v) for v in roi.intersection(_box(total)).bounds)
            if not total or total[2] <= total[0]:
                raise InputError(f"--bbox {list(bbox)} does not overlap {region.name}")
        if point_list is not None:
            origin = (float(ds.index.total_bounds[0]), float(ds.index.total_bounds[3]))
            tmin, tmax = ds.index.index.left.min(), ds.index.index.right.max()
            chips = [
                (
                    *region_window(
                        p, CRS.from_user_input(crs.to_wkt()), (xres, float(ds.res[1])), origin
                    ),
                    slice(tmin, tmax),
                )
                for p in point_list
            ]
        else:
            chips = _region_chips(ds, total, stride)  # type: ignore[arg-type]
        region_meta = meta | {
            "bands": json.dumps(list(ds.bands)),
            "wavelengths": json.dumps([round(float(w), 4) for w in ds.wavelengths]),
            "sources": json.dumps([str(p.resolve()) for p in region.paths]),
        }
        writers: list[GridWriter | PooledWriter] = []
        if output in ("grid", "both") and point_list is None:
            geometry = GridGeometry.for_region(crs, total, xres)
            writers.append(GridWriter(out_dir / f"{region.name}_grid.tif", geometry, region_meta))
        if output in ("pooled", "both"):
            writers.append(
                PooledWriter(
                    out_dir / f"{region.name}_pooled.parquet", crs, region_meta, region.name
                )
            )
        pending = [w for w in writers if not w.path.exists()]
        if not pending:
            summary.skipped += len(chips)
            summary.outputs += [w.path for w in writers]
            continue
        done = [w.done_keys() for w in pending]
        todo = []
        for chip in chips:
            keys = [
                _grid_key_of(w.geometry, chip)
                if isinstance(w, GridWriter)
                else _pooled_key_of(chip)
                for w in pending
            ]
            if all(k in d for k, d in zip(keys, done, strict=True)):
                summary.skipped += 1
            else:
                todo.append(chip)
        ds.transforms = DOFAPreprocess(ds.bands, ds.wavelengths, input_prep=input_prep)
        loader = DataLoader(
            ds,
            sampler=ChipSampler(todo),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=stack_dofa_samples,
        )
        trainer = pl.Trainer(
            accelerator=device,
            devices=devices,
            strategy=strategy,
            precision=_PRECISIONS[precision],  # type: ignore[arg-type]
            callbacks=[*pending, *callbacks],
            logger=False,
            enable_progress_bar=progress,
            enable_model_summary=False,
        )
        # bounded GDAL block cache: memory must not grow with the region (benchmarks/run.py)
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
            if todo:
                trainer.predict(module, dataloaders=loader, return_predictions=False)
            else:
                for w in pending:
                    w.finalize()
        summary.chips += sum(w.written for w in pending[:1])
        summary.outputs += [w.path for w in writers]
    summary.seconds = time.perf_counter() - start
    return summary


def _box(bounds: Sequence[float]) -> Any:
    from shapely.geometry import box

    return box(*bounds)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchgeo-dofa", description="DOFA embeddings for Earth observation rasters."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("embed", help="embed GeoTIFFs into a grid GeoTIFF / pooled GeoParquet")
    e.add_argument("inputs", nargs="+", help="GeoTIFF/JP2 files or folders")
    e.add_argument("-o", "--output-dir", required=True, help="folder for the outputs")
    e.add_argument("--variant", default="base", help="base | large (b | l)")
    e.add_argument("--output", default="grid", help="grid | pooled | both")
    e.add_argument("--input-prep", default="resize", help="resize | tile")
    e.add_argument("--weights", default="official", help="official | none | PATH")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--num-workers", type=int, default=0)
    e.add_argument("--device", default="auto", help="auto | cpu | gpu")
    e.add_argument("--devices", default="1", help="number of devices (with --strategy ddp)")
    e.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")
    e.add_argument("--precision", default="32", help="32 | bf16")
    e.add_argument("--bands", nargs="+", default=None, help="bands to read, e.g. B4 B3 B2 B8")
    e.add_argument("--stride", type=int, default=CHIP, help="chip stride in pixels (x16)")
    e.add_argument("--points", default=None, help="CSV (lon,lat) or GeoJSON points")
    e.add_argument("--buffer-m", type=float, default=2048.0, help="point buffer in metres")
    e.add_argument(
        "--bbox",
        type=float,
        nargs=4,
        default=None,
        metavar=("MINLON", "MINLAT", "MAXLON", "MAXLAT"),
    )
    e.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p = sub.add_parser("preview", help="PCA picture of a grid embedding beside the input")
    p.add_argument("embedding")
    p.add_argument("-o", "--output", required=True)
    for name in ("fit", "validate", "test", "predict"):
        sub.add_parser(name, help=f"LightningCLI {name} (--config cfg.yaml)", add_help=False)
    return parser


def _lightning_cli(args: Sequence[str] | None) -> None:
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=None if args is None else list(args),
        save_config_kwargs={"overwrite": True},
    )
    # close cached raster handles now, not during interpreter shutdown
    for name in ("train_dataset", "val_dataset", "test_dataset", "predict_dataset"):
        close = getattr(getattr(cli.datamodule, name, None), "close", None)
        if callable(close):
            close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torchgeo-dofa`` console script.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for bad input (one-line error, no traceback).
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in ("fit", "validate", "test", "predict"):
        _lightning_cli(None if argv is None else args_list)
        return 0
    args = _parser().parse_args(args_list)
    try:
        if args.command == "preview":
            from .preview import render_preview

            out = render_preview(args.embedding, args.output)
            print(f"wrote {out}")
            return 0
        weights = None if str(args.weights).lower() == "none" else args.weights
        devices: int | str = int(args.devices) if str(args.devices).isdigit() else args.devices
        summary = embed(
            args.inputs,
            args.output_dir,
            variant=args.variant,
            output=args.output,
            input_prep=args.input_prep,
            weights=weights,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=args.device,
            devices=devices,
            strategy=args.strategy,
            precision=args.precision,
            bands=args.bands,
            stride=args.stride,
            points=args.points,
            buffer_m=args.buffer_m,
            bbox=args.bbox,
            progress=not args.no_progress,
        )
    except (InputError, BandError, CheckpointError, ValueError, OSError) as err:
        print(f"torchgeo-dofa: error: {err}", file=sys.stderr)
        return 2
    if _is_rank_zero():
        print(summary.line())
    return 0


def _is_rank_zero() -> bool:
    import os

    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


if __name__ == "__main__":
    sys.exit(main())
