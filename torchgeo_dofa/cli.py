"""The ``torchgeo-dofa`` command line: ``embed``, ``preview``, ``fit``/``predict`` (LightningCLI).

``embed`` is also importable as :func:`embed`, the product's main job: rasters in,
georeferenced embeddings out (a grid GeoTIFF and/or a pooled GeoParquet per region).
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import functools
import gc
import json
import logging
import math
import os
import re
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import _warnings
from ._errors import exception_chain
from ._warnings import warn
from .bands import offset_problem
from .runtime import DEVICE_NAMES, GRID_SUFFIXES, MAX_CHIP_PX, PRECISION_NAMES, TABLE_SUFFIXES

if TYPE_CHECKING:  # the heavy modules load when a job runs, not for --help or a usage error
    import lightning.pytorch as pl

    from .datasets import InputError, RasterInput

__all__ = ["EmbedSummary", "InputError", "embed", "main"]

CHIP = 224

#: ``embed``'s options with a fixed set of values, checked by the parser before PyTorch loads
#: (a typo answers at once, not after seconds of imports). Each set is the one the library
#: accepts (``tests/test_cli.py`` keeps them equal): :func:`torchgeo_dofa.model.canonical_variant`
#: (case-insensitive), :data:`torchgeo_dofa.embedder.OUTPUT_KINDS`,
#: :data:`torchgeo_dofa.transforms.INPUT_PREPS`, :data:`torchgeo_dofa.stac.COMPOSITES`.
VARIANT_NAMES: tuple[str, ...] = ("base", "large", "b", "l")
OUTPUT_NAMES: tuple[str, ...] = ("grid", "pooled", "both")
INPUT_PREP_NAMES: tuple[str, ...] = ("resize", "tile")
COMPOSITE_NAMES: tuple[str, ...] = ("median", "mosaic")


@dataclass
class EmbedSummary:
    """What an embed job did.

    Attributes:
        chips: chips embedded in this run (resumed chips excluded), the empty ones included
            (the summary line's ``embedded N chips, M without valid pixels``: M of the N).
        empty: chips of this run without any valid pixel (NaN outputs; among ``chips``).
        skipped: chips skipped because an earlier run had written them.
        seconds: wall time of the job.
        outputs: files written.
    """

    chips: int = 0
    empty: int = 0
    skipped: int = 0
    seconds: float = 0.0
    outputs: list[Path] = field(default_factory=list)

    def line(self) -> str:
        """One-line summary for the terminal."""
        rate = self.chips / self.seconds if self.seconds > 0 else 0.0
        # a resumed job's counts are this run's: the done chips' empty ones are not counted
        resumed = f" ({self.skipped} already done)" if self.skipped else ""
        of_them = " of them" if self.skipped else ""
        empty = f", {self.empty}{of_them} without valid pixels" if self.empty else ""
        more = " more" if self.skipped else ""
        paths = ", ".join(str(p) for p in self.outputs) or "none"
        return (
            f"embedded {self.chips}{more} chip{'' if self.chips == 1 else 's'}{empty}{resumed} in "
            f"{self.seconds:.1f} s "
            f"({rate:.2f} chips/s) -> {paths}"
        )


#: ``-o`` names ending in these are taken for files of a format the job does not write (an
#: image, an array, a vector or text table) and refused, unless such a folder already exists.
OTHER_FILE_SUFFIXES: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".jp2", ".webp", ".gif", ".bmp", ".vrt", ".nc", ".h5", ".hdf5",
    ".zarr", ".npy", ".npz", ".pt", ".pth", ".pkl", ".csv", ".txt", ".json", ".yaml", ".yml",
    ".xml", ".html", ".geojson", ".gpkg", ".shp", ".fgb", ".kml", ".kmz", ".feather", ".pq",
    ".geotiff", ".gtiff", ".cog", ".zip", ".gz", ".tar",
)  # fmt: skip


#: A file or folder name's longest length (bytes) where the file system cannot say: Linux's
#: ext4, XFS, Btrfs, tmpfs, macOS's APFS and Windows' NTFS (in UTF-16 units) all take 255.
DEFAULT_NAME_MAX = 255


def name_limit(folder: str | os.PathLike[str]) -> int | None:
    """The longest file or folder name (bytes) the file system of ``folder`` takes.

    The nearest existing folder of ``folder`` and its parents is asked
    (``os.pathconf(..., "PC_NAME_MAX")``): the job makes the rest of the path there.

    Args:
        folder: a folder, existing or to be made.

    Returns:
        The limit; :data:`DEFAULT_NAME_MAX` where no folder of the path can tell (no
        ``os.pathconf``, as on Windows), None where the file system sets none.
    """
    found, limit = _nearest_pathconf(folder, "PC_NAME_MAX")
    return limit if found else DEFAULT_NAME_MAX


def _nearest_pathconf(folder: str | os.PathLike[str], name: str) -> tuple[bool, int | None]:
    """``os.pathconf(..., name)`` of ``folder`` or its nearest existing parent.

    Returns:
        ``(True, value)`` (None where the file system sets no limit), or ``(False, None)``
        where no folder of the path can tell (no ``os.pathconf``, as on Windows).
    """
    here = Path(os.path.abspath(folder))
    for candidate in (here, *here.parents):
        try:
            limit = os.pathconf(candidate, name)
        except (OSError, ValueError, AttributeError):  # not there (yet), no pathconf
            continue
        return True, None if limit < 0 else int(limit)
    return False, None


#: The longest name the writers give a file inside an output's parts folder, in bytes, and
#: the separator before it: a part's temporary file, ``.r12345_c12345.npy.<32 hex>.tmp``.
PART_NAME_BYTES = 64


def path_limit(folder: str | os.PathLike[str]) -> int | None:
    """The longest path (bytes, with its final NUL) the system takes under ``folder``.

    ``os.pathconf(..., "PC_PATH_MAX")`` of the nearest existing folder (Linux: 4096).

    Args:
        folder: a folder, existing or to be made.

    Returns:
        The limit; None where no folder of the path can tell or the system sets none.
    """
    return _nearest_pathconf(folder, "PC_PATH_MAX")[1]


def _shortened(name: str) -> str:
    """A long name for a message: its start and end, enough to tell which it is."""
    return name if len(name) <= 60 else f"{name[:40]}...{name[-16:]}"


def long_name_in(path: str | os.PathLike[str]) -> tuple[str, int, int] | None:
    """The first file or folder name of ``path`` longer than its file system takes.

    The OS refuses such a path with the bare ``[Errno 36] File name too long``, at the first
    ``stat`` or ``mkdir``.

    Args:
        path: a path as given (relative to the working folder, or absolute).

    Returns:
        ``(name, its length in bytes, the limit)``, or None where every name fits.
    """
    given = Path(path)
    parent = Path(given.anchor) if given.anchor else Path(".")
    for part in given.parts:
        if part == given.anchor:
            continue
        size, limit = len(os.fsencode(part)), name_limit(parent)
        if limit is not None and size > limit:
            return part, size, limit
        parent = parent / part
    return None


def _long_name_problem(what: str, path: str | os.PathLike[str], fix: str) -> str | None:
    """The refusal of a path too long, or holding a name too long, for its file system.

    Args:
        what: the path as the command names it (``-o out``, ``input 'x.tif'``).
        path: the path.
        fix: what to do (``give a shorter -o``).

    Returns:
        One line naming the name, its length, the file system's limit and ``fix``.
    """
    full = len(os.fsencode(os.path.abspath(path)))
    most = path_limit(Path(os.path.abspath(path)).parent)
    if most is not None and full >= most:
        return (
            f"{what}: its path is {full} bytes, more than the {most - 1} the system takes for "
            f"a path: {fix}"
        )
    found = long_name_in(path)
    if found is None:
        return None
    name, size, limit = found
    return (
        f"{what}: the name {_shortened(name)!r} is {size} bytes, more than the {limit} its "
        f"file system takes for a file or folder name: {fix}"
    )


def _names_file(output_dir: str | os.PathLike[str]) -> bool:
    """Whether ``-o`` names the output file itself (``x.tif``; ``x.tif/``, ``x.tif/.`` are folders).

    Raises:
        InputError: for a name of another file format (:data:`OTHER_FILE_SUFFIXES`) that is
            not an existing folder.
    """
    text = os.fspath(output_dir)
    if _spelled_as_folder(text):
        return False
    problem = _other_format_problem(text)
    if problem is not None:
        from .datasets import InputError

        raise InputError(problem)
    return Path(text).suffix.lower() in GRID_SUFFIXES + TABLE_SUFFIXES


def _spelled_as_folder(text: str) -> bool:
    """Whether ``-o`` ends in ``/``, ``/.`` or ``/..`` (pathlib would drop those)."""
    return text.endswith(("/", os.sep)) or os.path.basename(text) in (".", "..")


def _other_format_problem(text: str) -> str | None:
    """The refusal of ``-o x.png`` (a format the job does not write), or None."""
    suffix = Path(text).suffix.lower()
    if _spelled_as_folder(text) or suffix not in OTHER_FILE_SUFFIXES or Path(text).is_dir():
        return None
    return (
        f"-o {text}: the job writes GeoTIFF grids (.tif, .tiff) and GeoParquet tables "
        f"(.parquet, .geoparquet), not {suffix} files: name one of those, or a folder "
        f"(-o {text}/ makes a folder of this name)"
    )


def _output_paths(
    output_dir: str | Path, regions: Sequence[RasterInput], output: str, points: bool
) -> list[dict[str, Path]]:
    """Per region, the grid / pooled files to write (``-o DIR`` or ``-o NAME.tif``)."""
    from .datasets import InputError

    names_file = _names_file(output_dir)
    output_dir = Path(output_dir)

    kinds = ["pooled"] if points or output == "pooled" else ["grid"]
    if output == "both" and not points:
        kinds = ["grid", "pooled"]
    inputs = {Path(p).resolve() for r in regions for p in r.paths}
    suffix = output_dir.suffix.lower()
    if names_file:
        if len(regions) != 1:
            raise InputError(
                f"-o {output_dir} names one file but the job has {len(regions)} regions "
                f"({', '.join(r.name for r in regions)}): give a folder with -o DIR"
            )
        wanted = "pooled" if suffix in TABLE_SUFFIXES else "grid"
        sibling = {"grid": ".tif", "pooled": ".parquet"}
        if wanted not in kinds:
            raise InputError(
                f"-o {output_dir} is a {'GeoParquet' if wanted == 'pooled' else 'GeoTIFF'} "
                f"name but the job writes {' and '.join(kinds)} output: use "
                f"-o {output_dir.with_suffix(sibling[kinds[0]])} or a folder"
            )
        # the file named is written as named (letter case included), its sibling beside it
        named = {
            k: output_dir if k == wanted else output_dir.with_suffix(sibling[k]) for k in kinds
        }
        _refuse_long_output_names([named], regions, output_dir)
        return _not_inputs([named], inputs, given=output_dir)
    if output_dir.exists() and not output_dir.is_dir():  # a file, a device (/dev/null), a FIFO
        what = "an existing file" if output_dir.is_file() else "not a folder (a device or pipe)"
        raise InputError(f"-o {output_dir} is {what}: give a folder or a .tif name")
    ext = {"grid": "_grid.tif", "pooled": "_pooled.parquet"}
    paths = [{k: output_dir / f"{r.name}{ext[k]}" for k in kinds} for r in regions]
    _refuse_long_output_names(paths, regions, None)
    return _not_inputs(paths, inputs)


#: The random part of a temporary file's name (:func:`~torchgeo_dofa.writers.temp_path`).
_TEMP_HEX = re.compile(r"\.[0-9a-f]{32}\.tmp$")


def _refuse_long_output_names(
    paths: list[dict[str, Path]], regions: Sequence[RasterInput], named: Path | None
) -> None:
    """Refuse outputs the job could not make: a name too long for the file system.

    The OS refused them with the bare ``[Errno 36] File name too long``. Beside each output
    the writers make its parts folder (``<name>.parts``) and its temporary file
    (``.<name>.<32 hex digits>.tmp``, 38 bytes longer than the name); ``-o NAME.tif`` adds
    the job's manifest ``.NAME.tif.torchgeo-dofa-job.json`` and that one's temporary file.
    The ``-o`` folder's own names are checked with the options (:func:`option_problem`).

    Args:
        paths: per region, the output files (as :func:`_output_paths` names them).
        regions: the regions, in that order (their names name the outputs in a folder).
        named: ``-o NAME.tif`` (the file named), or None for a folder.

    Raises:
        InputError: naming the output, the name too long, its length, the file system's limit
            and the fix: a shorter ``-o`` name, or a shorter input name (the outputs in a
            folder are named after their input).
    """
    from .datasets import InputError
    from .jobs import MANIFEST_NAME
    from .writers import parts_dir, temp_path

    for region, outputs in zip(regions, paths, strict=True):
        base = named.name if named is not None else region.name  # the name to shorten
        made: list[tuple[Path, str, Path]] = []  # (output, what, the path made for it)
        for path in outputs.values():
            made += [
                (path, "its name", path),
                (path, "its parts folder", parts_dir(path)),
                (path, "its temporary file", temp_path(path)),
            ]
        if named is not None:
            manifest = named.with_name(f".{named.name}{MANIFEST_NAME}")
            made += [
                (named, "its job manifest", manifest),
                (named, "the manifest's temporary file", temp_path(manifest)),
            ]
        longest = max(len(os.fsencode(os.path.abspath(p))) for _, _, p in made)
        most_path = path_limit(made[0][0].parent)
        if most_path is not None and longest + PART_NAME_BYTES >= most_path:
            raise InputError(
                f"output {_shortened(str(made[0][0]))}: its files would have paths of up to "
                f"{longest + PART_NAME_BYTES} bytes (the parts inside its parts folder), more "
                f"than the {most_path - 1} the system takes for a path: give a shorter -o "
                "(a folder nearer the root)"
            )
        limit = name_limit(made[0][0].parent)  # every name is made in the outputs' folder
        if limit is None:
            continue
        sizes = [len(os.fsencode(p.name)) for _, _, p in made]
        too_long = [k for k, size in enumerate(sizes) if size > limit]
        if not too_long:
            continue
        path, what, made_path = made[too_long[0]]
        # the longest the name may be for every name made from it to fit
        most = max(1, limit - (max(sizes) - len(os.fsencode(base))))
        if named is not None:
            fix = f"give a shorter -o name (at most {most} bytes)"
        else:
            fix = (
                f"the outputs in -o are named after their input, {_shortened(base)!r} here: "
                f"shorten that input's name (without its extension) to at most {most} bytes, "
                "or give it alone with a shorter -o NAME.tif"
            )
        shown = _shortened(_TEMP_HEX.sub(".<hex>.tmp", made_path.name))
        raise InputError(
            f"output {_shortened(str(path))}: {what} {shown!r} would be {sizes[too_long[0]]} "
            f"bytes, more than the {limit} its file system takes for a file or folder name: "
            f"{fix}"
        )


def _not_inputs(
    paths: list[dict[str, Path]], inputs: set[Path], given: Path | None = None
) -> list[dict[str, Path]]:
    """Refuse an output that is an input (it would be replaced) or an existing folder."""
    from .datasets import InputError
    from .writers import file_ids, is_input_file

    resolved = {str(i) for i in inputs}
    outputs = [path for per_region in paths for path in per_region.values()]
    # hard links: the inputs' inode numbers, needed only where an output exists already
    ids = file_ids(resolved) if any(p.is_file() for p in outputs) else set()
    for path in outputs:
        if is_input_file(path, resolved, ids):  # a symlink or a hard link to one too
            raise InputError(
                f"output {path} is one of the inputs: give another -o (a folder or a new file name)"
            )
        if path.is_dir():
            into = f"-o {path}/ writes into it" if path == given else "move it away"
            raise InputError(
                f"output {path} is an existing folder, not a file: {into}, or give another -o"
            )
    return paths


def _footprint(region: RasterInput) -> tuple[str, tuple[float, float, float, float]]:
    """CRS and bounds of a region's rasters (their union), for assigning points."""
    assert region.bounds is not None  # set by find_raster_inputs
    return region.crs or "EPSG:4326", region.bounds


def _refuse_a_sparse_grid(name: str, dm: Any, variant: str) -> None:
    """Refuse, before anything is written, a grid GeoTIFF that would be huge and mostly empty.

    Raises:
        InputError: see :func:`torchgeo_dofa.jobs.sparse_grid_problem`.
    """
    from .datasets import InputError
    from .jobs import sparse_grid_problem
    from .model import VARIANTS, canonical_variant

    geometry = dm.grid_geometry()
    chip_cells = (dm.patch_size / dm.cell_px) ** 2
    chips = len(dm.predict_sampler or [])
    depth = VARIANTS[canonical_variant(variant)].embed_dim
    problem = sparse_grid_problem(name, geometry.width, geometry.height, depth, chips, chip_cells)
    if problem:
        raise InputError(problem)


def default_chips_per_second(precision: str, accelerator: str) -> float:
    """A rough throughput for the job-size estimate, chips/s (DOFA base, measured here).

    CPU (2 cores): fp32 4.2 (README performance section), bf16 with AMX 7.9
    (``benchmarks/run.py``); CUDA: 200, a conservative figure (not measured here).
    """
    if accelerator == "cuda":
        return 200.0
    return 7.9 if precision == "bf16" else 4.2


def _python_argument_problem(
    *,
    bbox: Any,
    chip_size: Any,
    stride: Any,
    **lists: Any,
) -> str | None:
    """The first argument of :func:`embed` given in a form the command line cannot give.

    A string for a list, a box of other than 4 numbers, a fractional pixel count; or None.

    ``wavelengths="0.665"`` was read as 5 values (its characters), ``bbox=`` of a ``BBox``
    failed with a ``TypeError`` ("argument after * must be an iterable") and ``stride=112.5``
    placed chips off the pixel grid.
    """
    for name, value in lists.items():
        if isinstance(value, str | bytes):
            return f"{name}={value!r} is one string: give a list, one entry per band"
    if bbox is not None:
        try:
            corners = [] if isinstance(bbox, str | bytes) else [float(v) for v in bbox]
        except (TypeError, ValueError):
            corners = []
        if len(corners) != 4:
            return (
                f"bbox={bbox!r}: give (minlon, minlat, maxlon, maxlat) in degrees, or a "
                "torchgeo_dofa.BBox"
            )
    for name, value in (("chip_size", chip_size), ("stride", stride)):
        if value is None:
            continue
        try:  # numpy's integers and floats too; a bool is not a pixel count
            whole = not isinstance(value, bool) and float(value) == int(value)
        except (TypeError, ValueError, OverflowError):
            whole = False
        if not whole:
            return f"{name}={value!r}: give a whole number of pixels"
    return None


def option_problem(
    inputs: Sequence[str | os.PathLike[str]],
    *,
    output_dir: str | os.PathLike[str] | None = None,
    stac: str | None = None,
    bbox: Sequence[float] | None = None,
    datetime: str | None = None,
    output: str = "both",
    points: str | os.PathLike[str] | None = None,
    weights: str | os.PathLike[str] | None = "official",
    seed: int | None = None,
    chip_size: int = CHIP,
    devices: int | str = 1,
    bands: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    stride: int | None = None,
) -> str | None:
    """The first problem among ``embed``'s arguments that needs no raster read, or None.

    Checked by the command line before PyTorch loads and by :func:`embed`: an empty or missing
    input, weights file, points file or output name, one holding a name longer than its file
    system takes (:func:`long_name_in`), no input at all, options that do not go together, a
    chip size off the model's 16-pixel patch grid, a device count below 1 or a ``--devices``
    value Lightning would not read.

    Args:
        inputs: input files or folders (each must exist).
        output_dir: the ``-o`` folder or file name (not empty).
        stac: STAC URL or file (inputs may then be empty; needs ``bbox`` and ``datetime``).
        bbox: the STAC search area.
        datetime: the STAC search dates; without ``stac``, the dates of the local scenes
            to read (``"A/B"``, inclusive; the data module's ``time``).
        output: ``grid``, ``pooled`` or ``both``.
        points: points file (pooled output only).
        weights: ``None`` for random weights, else a checkpoint (``~`` expanded) or
            ``official``.
        seed: seed of random weights (with ``weights=None`` only).
        chip_size: chip side in pixels (a multiple of 16).
        devices: a count (``2``), ``auto``, or GPU indices (``"0,1"``).
        bands: the bands asked for, or None.
        mean: normalisation means (need ``bands``: they follow its order).
        std: normalisation standard deviations.
        stride: distance between chips in pixels (None: the chip size).

    Returns:
        One line naming the problem and the fix, or None.
    """
    for raw in inputs:
        if not str(raw).strip():  # Path("") is the working folder
            return "an input is an empty string: give GeoTIFF/JP2 files or folders"
        shown = _shortened(str(raw))
        if long := _long_name_problem(f"input {shown!r}", raw, "no such file can exist"):
            return f"{long}: check the path"
        if not Path(raw).exists():
            from .locks import missing_input_problem

            return missing_input_problem(raw)
    if not inputs and stac is None:
        return "no input: give GeoTIFF/JP2 files or folders, or --stac URL"
    if output_dir is not None and not str(output_dir).strip():
        return "-o is an empty string: give an output folder, or a NAME.tif / NAME.parquet"
    if output_dir is not None and (
        long := _long_name_problem(
            f"-o {_shortened(os.fspath(output_dir))}", output_dir, "give a shorter -o"
        )
    ):
        return long
    if output_dir is not None and (other := _other_format_problem(os.fspath(output_dir))):
        return other
    if output_dir is not None:  # (a NAME.tif was refused once the libraries had loaded)
        from .locks import refuse_undecodable_name

        try:
            refuse_undecodable_name(output_dir, "-o")
        except ValueError as err:
            return str(err)
    if stac is not None and (bbox is None or datetime is None):
        return (
            "--stac needs --bbox MINLON MINLAT MAXLON MAXLAT and --datetime "
            "YYYY-MM-DD/YYYY-MM-DD (the area and the dates to composite)"
        )
    text = str(devices).strip()
    if _DEVICE_COUNT.fullmatch(text):
        if int(text) < 1:
            return f"--devices must be >= 1 (or auto for every GPU), got {int(text)}"
    elif text.lower() != "auto" and not _GPU_INDICES.fullmatch(text):
        return f"--devices {text!r}: give a count (2), auto, or GPU indices (0,1)"
    if chip_size < 16 or chip_size % 16:
        return f"--chip-size must be a multiple of 16 pixels >= 16, got {chip_size}"
    if chip_size > MAX_CHIP_PX:  # a chip is read whole: 100000 px asked numpy for 149 GiB
        gib = chip_size**2 * 4 / 2**30
        return (
            f"--chip-size {chip_size} reads {chip_size} x {chip_size} pixels a band at once "
            f"({gib:.3g} GiB a band in float32) for one model input: at most {MAX_CHIP_PX} "
            "(a chip is resized or tiled to 224 px; cover a large area with more chips)"
        )
    if stride is not None and stride < 1:
        return f"--stride must be at least 1 pixel (default: the chip size), got {stride}"
    if points is not None and output == "grid":
        return "--points gives one pooled row per point: use --output pooled"
    if seed is not None and weights is not None:
        return "--seed applies to random weights only: add --weights none"
    if weights is not None and not str(weights).strip():
        return "--weights is an empty string: give official, none or a checkpoint file"
    if weights is not None and str(weights) != "official":
        found = Path(weights).expanduser()  # as resolve_weights reads it
        shown = _shortened(str(weights))
        if long := _long_name_problem(f"--weights {shown}", found, "no such file can exist"):
            return f"{long}: check the path"
        if not found.exists():
            return f"weights file {str(weights)!r} does not exist"
        if not found.is_file() and not found.is_dir():  # /dev/null, a pipe
            return f"--weights {str(weights)!r} is not a file (a device or pipe): give a checkpoint"
    if points is not None and not str(points).strip():
        return "--points is an empty string: give a CSV or GeoJSON file"
    if points is not None and (
        long := _long_name_problem(
            f"--points {_shortened(str(points))}", points, "no such file can exist"
        )
    ):
        return f"{long}: check the path"
    if points is not None and not Path(points).is_file():
        what = "is a folder" if Path(points).is_dir() else "does not exist"
        return f"points file {str(points)!r} {what}: give a CSV or GeoJSON file"
    if mean is not None or std is not None:
        from .bands import BandError, norm_stats

        if bands is None:
            return (
                "--mean and --std follow the order of --bands: give --bands too (the "
                "statistics of which band is which)"
            )
        try:
            norm_stats(bands, mean, std)
        except BandError as err:
            return cli_hints(str(err))
    return None


#: The subcommands run by LightningCLI (``--config``), not by this module's own parser.
_LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

#: A negative number, exponents and ``-inf`` included (argparse's own matcher stops at
#: ``-1.5``; ``-inf`` is a float raster's no-data value as GDAL writes it).
_NEGATIVE_NUMBER = re.compile(
    r"^-(?:(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|inf(?:inity)?|nan)$", re.IGNORECASE
)

#: ``--devices`` as a count (Lightning reads ``"2"`` as 2) and as GPU indices (``0,1``, ``[0]``).
_DEVICE_COUNT = re.compile(r"[+-]?[0-9]+")
_GPU_INDICES = re.compile(r"\[?\s*[0-9]+\s*(?:,\s*[0-9]+\s*)*,?\s*\]?")


def _strategy_problem(strategy: str) -> str | None:
    """A ``--strategy`` embed cannot run: one whose processes Lightning spawns or forks.

    ``ddp_spawn`` / ``ddp_fork`` / ``ddp_notebook`` (and FSDP's ``*_spawn``) start the other
    processes from this one after embed has taken the output folder's lock and written the
    job's manifest, so each refused the outputs as another job's (exit 1, a traceback).

    Returns:
        The one-line error naming the fix (``--strategy ddp``), or None.
    """
    name = str(strategy).lower()
    if any(kind in name for kind in ("spawn", "fork", "notebook")):
        return (
            f"--strategy {strategy} is not supported by embed: Lightning starts its processes "
            "from the job's own after the job has taken its output folder, and each would "
            "refuse the outputs as another job's; use --strategy ddp (its processes are "
            "commands of their own)"
        )
    return None


#: Lightning strategy names (and their variants: ``ddp_spawn``, ``fsdp_cpu_offload``,
#: ``deepspeed_stage_2``, ...) whose processes meet at ``MASTER_PORT``, also with one device.
_DISTRIBUTED_STRATEGIES = ("ddp", "fsdp", "deepspeed")


def _rendezvous_problem(strategy: str, devices: int | str, accelerator: str) -> str | None:
    """A ``MASTER_PORT`` / ``MASTER_ADDR`` a distributed embed job cannot meet at.

    See :func:`.locks.master_port_problem` and :func:`.locks.master_addr_problem`.

    Checked where the job's processes meet at ``MASTER_PORT``: ``--strategy`` names a
    distributed strategy (DDP, FSDP, DeepSpeed), or the job runs several processes:
    ``--devices`` asks for them (Lightning's ``auto`` strategy is DDP there), or a launcher
    (SLURM's ``srun``, ``torchrun``) started several ranks.

    Args:
        strategy: ``--strategy``.
        devices: ``--devices``: a count, GPU indices, or ``auto`` / ``-1`` (every GPU; one
            process on the CPU).
        accelerator: ``--device`` (``cpu``, ``cuda``, ...; ``auto`` where not yet resolved).

    Returns:
        The one-line error, or None (no problem, or not knowable before PyTorch counts the
        GPUs: ``--devices auto`` on a GPU without a distributed strategy; the job checks
        again once it knows its process count).
    """
    from .locks import launched_ranks, master_addr_problem, master_port_problem, rendezvous_here

    ranks = launched_ranks()  # srun's / torchrun's, each a process of the job
    node = os.environ.get("NODE_RANK", "").strip()
    if node not in ("", "0") and not ranks:
        return (
            f"NODE_RANK={node}, but embed runs every process on this machine (one node: it has "
            "no --num-nodes), so it would wait for a node 0 that never comes; unset NODE_RANK "
            "(for several machines, start embed's ranks with srun or torchrun)"
        )
    named = any(name in str(strategy).lower() for name in _DISTRIBUTED_STRATEGIES)
    text = str(devices)
    if accelerator == "cpu" and ("," in text or "[" in text):
        return None  # no job: embed names that problem (GPU indices for the CPU)
    processes = _known_device_count(devices, accelerator)  # None: every GPU, uncounted
    if ranks:
        processes = max(processes or 1, ranks)
    if processes is None:
        if not named:
            return None
        processes = 2
    if not (named or processes > 1):
        return None  # one process, no process group: neither variable is read
    return master_port_problem(processes) or master_addr_problem(here=rendezvous_here())


def _stac_inputs(
    stac: str,
    collection: str,
    bbox: Sequence[float] | None,
    datetime: str | None,
    bands: Sequence[str] | None,
    max_cloud: float | None,
    composite: str,
) -> list[Path]:
    """The composite GeoTIFF of a STAC search, as one more input of the job."""
    from .datasets import InputError

    assert bbox is not None and datetime is not None  # option_problem checked
    from .bands import DOFA_S2_BANDS
    from .stac import StacError, materialise_for_embed

    try:
        return materialise_for_embed(
            stac,
            collection,
            bbox,
            datetime,
            out_dir=None,
            bands=bands or DOFA_S2_BANDS,
            max_cloud=max_cloud,
            composite=composite,
        )
    except (StacError, LookupError) as err:
        raise InputError(f"--stac {stac}: {err}") from None


def output_folder(output_dir: str | os.PathLike[str]) -> Path:
    """The folder an embed job's ``-o`` writes into (and locks).

    Args:
        output_dir: ``-o``: a folder, or a file name ending in one of
            :data:`GRID_SUFFIXES` or :data:`TABLE_SUFFIXES` (the file's folder); with a
            trailing ``/`` always a folder.

    Returns:
        The folder.

    Raises:
        InputError: for a file name of a format the job does not write (``x.png``).
    """
    out = Path(output_dir)
    return out.parent if _names_file(output_dir) else out


def _freeing_the_job[**P, R](job: Callable[P, R]) -> Callable[P, R]:
    """Run ``job``, then :func:`_free_the_job` once the job's frame is gone.

    Its locals hold the model, so a collection from inside it (in its ``finally``) freed
    only the previous job's: each in-process job ended holding its own model (~450 MB for
    base) until the next one.
    """

    @functools.wraps(job)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return job(*args, **kwargs)
        finally:
            _free_the_job()

    return run


@_freeing_the_job
def embed(
    inputs: Sequence[str | Path] | str | Path,
    output_dir: str | Path,
    *,
    variant: str = "base",
    output: str = "both",
    input_prep: str = "resize",
    weights: str | None = "official",
    seed: int | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    device: str = "auto",
    devices: int | str = 1,
    strategy: str = "auto",
    precision: str | None = None,
    bands: Sequence[str] | None = None,
    file_bands: Sequence[str] | None = None,
    wavelengths: Sequence[float] | None = None,
    nodata: float | None = None,
    crs: str | None = None,
    res: float | None = None,
    offset: float | str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    chip_size: int = CHIP,
    stride: int | None = None,
    points: str | Path | None = None,
    buffer_m: float = 2048.0,
    bbox: Sequence[float] | Any | None = None,
    progress: bool = True,
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
    skip_outside: bool = False,
    stac: str | None = None,
    collection: str = "sentinel-2-l2a",
    datetime: str | None = None,
    max_cloud: float | None = 30.0,
    composite: str = "median",
    callbacks: Sequence[Any] = (),
) -> EmbedSummary:
    """Embed rasters with DOFA and write georeferenced outputs, resumably.

    Each region (an input file, a folder, or the tiles of one Earth Engine export, see
    :func:`~torchgeo_dofa.datasets.find_raster_inputs`) is read by a
    :class:`~torchgeo_dofa.datamodules.DOFAPredictDataModule`, embedded by
    :class:`~torchgeo_dofa.embedder.DOFAEmbedder` through ``Trainer.predict`` and written by
    the :mod:`~torchgeo_dofa.writers`: the same pipeline as ``torchgeo-dofa predict --config``.
    Every region is opened and checked (files, bands, scale, chips) and the model loaded
    before any output is written. ``output_dir`` is a folder (``<name>_grid.tif`` and/or
    ``<name>_pooled.parquet`` per region) or, for one region, a file name ``NAME.tif`` /
    ``NAME.parquet`` (also ``.tiff``, ``.geoparquet``, any letter case; written as named, with
    its sibling ``NAME.parquet`` / ``NAME.tif`` for ``both``). Running
    the same job again skips chips already written.

    Args:
        inputs: GeoTIFF/JP2 files or folders (one may be given alone, as a string or path).
        output_dir: folder for the outputs, or one output file name (see above).
        variant: ``base``/``large``.
        output: ``grid``, ``pooled`` or ``both``.
        input_prep: ``resize`` or ``tile``: how a chip of ``chip_size`` pixels becomes
            224 x 224 model inputs (no effect for 224-px chips).
        weights: ``official``, a checkpoint path, or None (random weights).
        seed: seed of the random weights (``weights=None``), for repeatable runs.
        batch_size: chips per batch (default: chosen for the device and precision,
            :func:`torchgeo_dofa.runtime.default_batch_size`).
        num_workers: DataLoader workers reading and preprocessing chips beside the model
            (default :func:`torchgeo_dofa.runtime.default_num_workers` for the device:
            ``min(4, cores - 1)`` on a CPU, up to 8 on a CUDA machine).
        device: Lightning accelerator (``auto``, ``cpu``, ``gpu``).
        devices: number of devices (e.g. 2 with ``strategy="ddp"``), ``"auto"``, or GPU
            indices (``"0,1"``, with a GPU).
        strategy: Lightning strategy.
        precision: ``32``, ``bf16`` or None / ``auto``: bf16 where the hardware has it
            (CUDA, a CPU with AMX / AVX-512 BF16), fp32 elsewhere; the choice is printed.
        bands: bands to embed, in this order (default: DOFA's 9 bands, or every S2 band
            present); with ``file_bands``, a selection among them.
        file_bands: names of the bands of files without band descriptions, in file order
            (a second date as ``B4_1``...).
        wavelengths: centre wavelengths (um), one per band, for bands that are not
            Sentinel-2's (their statistics: ``mean``, ``std``).
        nodata: no-data value overriding the files' own.
        crs: CRS to read the inputs in (default: the first file's); also reads a folder of
            files in several CRSs as one region.
        res: pixel size to read the inputs at, in the CRS's units (default: the finest band's
            of the files; with ``crs``, that of the files already in it, else what GDAL's
            warp gives, e.g. 9.9909 m for a 10 m file from a neighbouring UTM zone).
        offset: radiometric offset added to the digital numbers (``0``, ``-1000``), or
            ``"auto"`` / None for the datasets' rule (product metadata, name, date).
        mean: one normalisation mean per band on DOFA's 0..255 scale, for bands without DOFA
            statistics (another sensor's); given with ``std``.
        std: one standard deviation per band on that scale.
        chip_size: chip side in pixels (224: one model input per chip, one grid cell per
            16 x 16 pixels; larger chips are resized (cells of ``chip_size / 14`` pixels) or
            tiled (cells of 16 pixels) to 224).
        stride: chip stride in pixels (default ``chip_size``), a multiple of the cell.
        points: CSV (lon, lat) or GeoJSON of points; one chip per point (pooled only).
        buffer_m: half-side of each point's chip, metres.
        bbox: ``(minlon, minlat, maxlon, maxlat)`` region of interest, or a
            :class:`~torchgeo_dofa.spatial.BBox` (typed ``Any`` beside the sequence so that
            the signature's type hints resolve without importing the spatial module).
        progress: show Lightning's progress bar.
        metadata: extra tags stored in every output.
        overwrite: replace the outputs of a different earlier job in ``output_dir``
            (without it, a different job is refused, see :mod:`torchgeo_dofa.jobs`).
        skip_outside: skip (with a warning) points outside every raster instead of
            refusing the job.
        stac: a STAC API URL, saved item collection or static catalog: the cloud-masked
            composite of ``bbox`` over ``datetime`` (:func:`torchgeo_dofa.stac.materialise`,
            cached outside ``output_dir``) is embedded as one more region. Needs the
            ``torchgeo-dofa[stac]`` extra.
        collection: STAC collection id (``sentinel-2-l2a`` on Earth Search and Planetary
            Computer).
        datetime: STAC interval ``"YYYY-MM-DD/YYYY-MM-DD"`` (inclusive), with ``stac``.
        max_cloud: ``eo:cloud_cover`` limit in percent, with ``stac``.
        composite: ``median`` or ``mosaic`` (first valid date), with ``stac``.
        callbacks: extra Lightning callbacks (``lightning.pytorch.Callback``) for the
            prediction trainer (typed ``Any`` so that the signature's type hints resolve
            without importing Lightning).

    Returns:
        An :class:`EmbedSummary`.

    Raises:
        InputError, BandError, CheckpointError, ValueError: for bad input, before writing.
        JobMismatchError: when ``output_dir`` holds a different job's outputs.
        JobLockedError: when another job is writing into ``output_dir``.
        JobInterrupted: after SIGINT / SIGTERM, once the current batch is written.
        OutputWriteError: when a final file cannot be written and verified (parts kept).
    """
    import lightning.pytorch as pl
    import torch

    from .__main__ import end_import_pause
    from .datamodules import DOFAPredictDataModule
    from .datasets import (
        InputError,
        UndatedScenesError,
        UnusedFileBandsError,
        find_raster_inputs,
        undated_scenes_problem,
    )
    from .embedder import OUTPUT_KINDS, DOFAEmbedder
    from .jobs import (
        MANIFEST_NAME,
        InputFile,
        JobInterrupted,
        JobManifest,
        OutputLock,
        StopOnSignal,
        check_points,
        data_identity,
        is_launcher,
        job_size_warning,
        loader_worker_error,
        points_outside_warning,
        region_identity,
        rendezvous_port_error,
        weights_identity,
    )
    from .locks import note_job_finished, signals_deferred
    from .model import canonical_variant
    from .runtime import (
        default_batch_size,
        default_num_workers,
        gdal_env,
        loader_workers,
        resolve_accelerator,
        resolve_precision,
        workers_open_file_problem,
    )
    from .spatial import BBox, PointBuffer, read_points
    from .writers import (
        GridWriter,
        OutputWriteError,
        PooledWriter,
        finished_output_problem,
        parts_dir,
    )

    end_import_pause()
    start = time.perf_counter()  # the job, not the imports (a Python caller pays them once)
    variant = canonical_variant(variant)
    if output not in OUTPUT_KINDS:
        raise InputError(f"unknown --output {output!r}: choose one of {list(OUTPUT_KINDS)}")
    if input_prep not in ("resize", "tile"):
        raise InputError(f"unknown --input-prep {input_prep!r}: choose 'resize' or 'tile'")
    try:
        choice = resolve_precision(precision, device)
        accelerator = resolve_accelerator(device)
    except ValueError as err:
        raise InputError(str(err).replace("unknown precision", "unknown --precision")) from None
    inputs = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    if isinstance(bbox, BBox):  # the API's box: taken as its corners
        bbox = (bbox.minlon, bbox.minlat, bbox.maxlon, bbox.maxlat)
    problem = _python_argument_problem(
        bands=bands,
        file_bands=file_bands,
        wavelengths=wavelengths,
        mean=mean,
        std=std,
        bbox=bbox,
        chip_size=chip_size,
        stride=stride,
    ) or option_problem(
        inputs,
        output_dir=output_dir,
        stac=stac,
        bbox=bbox,
        datetime=datetime,
        output=output,
        points=points,
        weights=weights,
        seed=seed,
        chip_size=chip_size,
        devices=devices,
        bands=bands,
        mean=mean,
        std=std,
        stride=stride,
    )
    if problem is not None:
        raise InputError(problem)
    chip_size = int(chip_size)  # numpy's integers, 224.0: the manifest's JSON takes ints
    stride = None if stride is None else int(stride)
    if _DEVICE_COUNT.fullmatch(str(devices).strip()):
        devices = int(str(devices).strip())
    elif accelerator != "cuda" and str(devices).strip().lower() != "auto":
        raise InputError(
            f"--devices {devices} names GPUs, but the job runs on the {accelerator}: give a "
            "number of processes (e.g. --devices 2) or --device gpu"
        )
    if batch_size is None:
        batch_size = default_batch_size(device, choice.precision, variant)
    processes = _device_count(devices, accelerator)
    # the GPUs are counted now: the rendezvous checked for --devices auto too
    strategy_problem = _strategy_problem(strategy) or _rendezvous_problem(
        strategy, processes, accelerator
    )
    if strategy_problem is not None:
        raise InputError(strategy_problem)

    def prediction_trainer(job_callbacks: list[Any]) -> pl.Trainer:
        """The job's trainer; settings Lightning refuses are an ``InputError`` naming them."""
        try:
            with quiet_lightning():
                return pl.Trainer(
                    accelerator=device,
                    devices=devices,
                    strategy=strategy,
                    precision=choice.lightning,  # type: ignore[arg-type]
                    callbacks=[*job_callbacks, *callbacks],
                    logger=False,
                    enable_progress_bar=progress,
                    enable_model_summary=False,
                )
        except Exception as err:  # FSDP on a CPU, an unknown strategy, no DeepSpeed
            if not _trainer_settings_error(err):
                raise
            given = f"device {accelerator}, devices {devices}, strategy {strategy}, "
            given += f"precision {choice.lightning}"
            given += f", {len(callbacks)} callback(s) given" if callbacks else ""
            named = [f"{k} is {v}" for k, v in _LIGHTNING_NAMES.items() if k in str(err)]
            hint = f" (Lightning's {'; '.join(named)})" if named else ""
            raise InputError(
                f"Lightning refuses the job's trainer settings ({given}): {err}{hint}"
            ) from None

    # before anything is written or deleted (--overwrite): a typo must cost no outputs
    prediction_trainer([])
    if num_workers is None:
        num_workers = default_num_workers(accelerator=accelerator, processes=processes)
    point_list, properties = (None, None)
    if points is not None:
        try:
            point_list, properties = read_points(points, buffer_m)
        except (OSError, ValueError) as err:
            raise InputError(str(err)) from None
    if stac is not None:
        inputs += _stac_inputs(stac, collection, bbox, datetime, bands, max_cloud, composite)
    # every DDP rank checks the same inputs: their warnings are shown once, by the launcher
    # (until the data modules are set up; a writer's warnings later are each rank's own)
    checking = contextlib.ExitStack()
    if not is_launcher():
        checking.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
    try:  # the window closes on every path (a rank's filter must not outlive the checks)
        regions = find_raster_inputs(inputs, crs)
        point_sets: list[list[int] | None] = [None] * len(regions)
        if point_list is not None:  # each point to the regions holding it, none left out
            inside, outside = check_points(
                point_list, {r.name: _footprint(r) for r in regions}, skip_outside
            )
            if outside:
                message = points_outside_warning(point_list, outside)
                warn(message, UserWarning)
            point_sets = [inside[r.name] for r in regions]
            regions = [r for r, s in zip(regions, point_sets, strict=True) if s]
            point_sets = [s for s in point_sets if s]
            if not regions:
                raise InputError(
                    f"none of the {len(point_list)} points lies inside an input raster: nothing "
                    "to embed (check the coordinates: lon, lat in degrees, EPSG:4326)"
                )
        out_paths = _output_paths(output_dir, regions, output, point_list is not None)
        dataset_kwargs: dict[str, Any] = {
            "bands": bands,
            "file_bands": file_bands,
            "wavelengths": wavelengths,
            "nodata": nodata,
            "crs": crs,
            "res": res,
            "offset": offset,
            "mean": mean,
            "std": std,
        }
        # a folder holds one job; an output named by the user (-o NAME.tif) is a job of its own
        out = Path(output_dir)
        folder = output_folder(output_dir)
        manifest_name = MANIFEST_NAME if folder == out else f".{out.name}{MANIFEST_NAME}"
        lock = OutputLock(folder)
    except BaseException:
        checking.close()
        raise
    started = fresh = failed = False
    finished_regions = 0  # the regions the job has done, whose outputs a failure names
    try:
        # the lock first, so a second job on the folder fails before loading anything; a job
        # refused during validation leaves no folder behind. Taken inside the block whose
        # end gives it back: a Ctrl-C or SIGTERM the instant it is taken left it otherwise
        lock.acquire()
        settings = {k: v for k, v in dataset_kwargs.items() if v is not None}

        def region_module(
            region: RasterInput, chosen: list[PointBuffer] | None, settings: dict[str, Any]
        ) -> DOFAPredictDataModule:
            dm = DOFAPredictDataModule(
                paths=list(region.paths),
                dataset_class=region.dataset_class,
                points=chosen,
                roi=BBox(*bbox) if bbox is not None else None,
                patch_size=chip_size,
                stride=stride,
                batch_size=batch_size,
                num_workers=num_workers,
                input_prep=input_prep,  # type: ignore[arg-type]
                preprocess=True,
                time=datetime if stac is None else None,  # a STAC composite is one date
                **settings,
            )
            # the job's own grouping: messages name the region as its outputs are named
            # (a folder's name, not its files' stems joined), and no header is read again
            dm._regions = [region]
            dm.setup("predict")
            return dm

        modules = []
        no_file_bands: list[UnusedFileBandsError] = []  # regions of per-band files only
        undated: list[str] = []  # files --datetime cannot select, of every region
        for i, (region, subset) in enumerate(zip(regions, point_sets, strict=True)):
            chosen = (
                None if subset is None or point_list is None else [point_list[i] for i in subset]
            )
            try:
                try:
                    dm = region_module(region, chosen, settings)
                except UnusedFileBandsError as err:  # the job's other regions may name theirs
                    no_file_bands.append(err)
                    without = {k: v for k, v in settings.items() if k != "file_bands"}
                    dm = region_module(region, chosen, without)
            except UndatedScenesError as err:  # named once, with the other regions' ones
                undated += err.files
                continue
            modules.append(dm)
            if "grid" in out_paths[i]:
                _refuse_a_sparse_grid(region.name, dm, variant)
        if undated:
            asked = f"--datetime {datetime}"
            raise InputError(undated_scenes_problem(undated, asked, "--datetime"))
        if no_file_bands and len(no_file_bands) == len(regions):  # no region reads them
            raise no_file_bands[0]
        checking.close()
        module = DOFAEmbedder(
            variant=variant,
            weights=weights,
            output="pooled" if point_list is not None else output,  # type: ignore[arg-type]
            input_prep=input_prep,  # type: ignore[arg-type]
            seed=seed,
        )
        extra = dict(metadata or {})
        summary = EmbedSummary()
        first = modules[0]._dataset()
        manifest = JobManifest(
            inputs=[InputFile.of(p) for r in regions for p in r.paths],
            file_bands=list(file_bands) if file_bands is not None else None,
            bands=list(first.bands),
            wavelengths=[float(w) for w in first.wavelengths],
            variant=variant,
            weights=weights_identity(weights, variant, seed),
            pooled_norm=module.encoder.pooled_norm,
            input_prep=input_prep,
            chip_size=chip_size,
            stride=stride or chip_size,
            precision=choice.lightning,
            output=output,
            outputs=[p.name for paths in out_paths for p in paths.values()],
            region=region_identity(bbox, points, buffer_m, skip_outside, datetime),
            data={
                r.name: data_identity(dm.job_identity())
                for r, dm in zip(regions, modules, strict=True)
            },
        )
        started = True
        with StopOnSignal(announce="torchgeo-dofa", command="embed") as stop, quiet_lightning():
            given = [f"--{k}" for k in ("nodata", "crs") if dataset_kwargs[k] is not None]
            fresh = manifest.check_or_write(
                folder, overwrite=overwrite, name=manifest_name, given=given
            )
            if is_launcher():
                count = f" x {processes}" if processes > 1 else ""
                # the data modules start no more workers than they have batches
                used = max(
                    loader_workers(num_workers, len(dm.predict_sampler or []), batch_size)
                    for dm in modules
                )
                why = "the open-file limit" if workers_open_file_problem(num_workers) else ""
                workers = (
                    f"{num_workers} loader worker(s)"
                    if used == num_workers
                    else f"{used} loader worker(s) (of {num_workers}: {why or 'one per batch'})"
                )
                print(
                    f"torchgeo-dofa: device {accelerator}{count}, precision {choice.reason}; "
                    f"batch size {batch_size}, {workers}",
                    file=sys.stderr,
                )
            todo = sum(len(dm.predict_sampler or []) for dm in modules)
            size = job_size_warning(todo, default_chips_per_second(choice.precision, accelerator))
            if size and is_launcher():
                print(f"torchgeo-dofa: {size}", file=sys.stderr)
            for index, (region, dm, paths, subset) in enumerate(
                zip(regions, modules, out_paths, point_sets, strict=True)
            ):
                finished_regions = index
                stop.raise_if_received()
                stop.final = index == len(regions) - 1  # no check after the last region's
                writers: list[GridWriter | PooledWriter] = []
                if "grid" in paths:
                    writers.append(GridWriter(paths["grid"], metadata=extra))
                if "pooled" in paths:
                    keys: dict[str, Any] = {}
                    if properties is not None and subset is not None:
                        chips: list[Any] = list(dm.predict_sampler or [])
                        keys["chip_keys"] = [PooledWriter.key_for_chip(c) for c in chips]
                        keys["properties"] = properties.iloc[subset].reset_index(drop=True)
                    writers.append(
                        PooledWriter(paths["pooled"], metadata=extra, source=region.name, **keys)
                    )
                # --overwrite: rank 0 has deleted every output of the job, or will (a rank of
                # srun / torchrun may get here first, see the old files, skip the trainer and
                # leave rank 0 waiting for it): all are pending, on every rank
                pending = [w for w in writers if overwrite or not w.path.exists()]
                for done_before in (w for w in writers if w not in pending):
                    damage = finished_output_problem(done_before.path)
                    if damage is not None:
                        raise OutputWriteError(
                            f"{done_before.path} was finished by an earlier run of this job "
                            f"but cannot be read now ({damage}): delete it and rerun the "
                            "same command (its chips are computed again)"
                        )
                summary.outputs += [w.path for w in writers]
                if not pending:
                    summary.skipped += len(dm.predict_sampler or [])
                    continue
                trainer = prediction_trainer([*pending, stop])
                if accelerator == "cuda":  # preprocess on the GPU after the transfer
                    dataset = dm._dataset()
                    if isinstance(dataset.transforms, torch.nn.Module):
                        module.preprocess, dataset.transforms = dataset.transforms, None
                try:
                    with gdal_env(dm.gdal_cache):
                        # the writers assemble the outputs, also when an earlier run had
                        # written every chip (then in their teardown: the loop is skipped)
                        trainer.predict(module, datamodule=dm, return_predictions=False)
                        done, empty = _job_counts(trainer, dm, pending[0].empty)
                except BaseException as err:
                    _close_progress_bar(trainer)
                    # a second Ctrl-C: Lightning exits (1); it is the job's interruption
                    received = stop.received
                    if received is not None and isinstance(err, SystemExit | KeyboardInterrupt):
                        raise JobInterrupted(received, stop.advice) from None
                    known = rendezvous_port_error(err) or loader_worker_error(err)
                    if known is not None:
                        raise known from err
                    raise
                summary.chips += done
                summary.empty += empty
                summary.skipped += dm.skipped
            finished_regions = len(out_paths)
        note_job_finished()  # a signal from here on: said of a finished job
        if summary.empty and is_launcher():
            kinds = {kind for paths in out_paths for kind in paths}
            where = [
                text
                for kind, text in (
                    ("grid", "NaN in the grid"),
                    ("pooled", "rows flagged no_data in the pooled table"),
                )
                if kind in kinds
            ]
            warn(
                f"{summary.empty} chip(s) {'embedded in this run ' if summary.skipped else ''}"
                "held no valid pixel (no data, fill values or outside the rasters): "
                f"{', '.join(where)}",
                UserWarning,
            )
    except BaseException as err:
        failed = True
        finished = [p for paths in out_paths[:finished_regions] for p in paths.values()]
        if finished and isinstance(err, Exception) and not isinstance(err, JobInterrupted):
            # helper-135: a job failing at its second region exited 2 with its first
            # region's outputs in the folder and not a word of them
            names = ", ".join(p.name for p in finished[:4]) + (
                f" and {len(finished) - 4} more" if len(finished) > 4 else ""
            )
            rerun = (
                "a rerun with --overwrite computes them again"
                if overwrite
                else "a rerun of the same command skips them"
            )
            err.add_note(
                f"the outputs of the {finished_regions} region(s) before it are finished and "
                f"kept: {names}; {rerun}"
            )
        raise
    finally:
        # a second Ctrl-C or SIGTERM while the job unwinds from a first is held back until
        # the folder is as it should be (it left the manifest or the lock file behind)
        with signals_deferred():
            checking.close()  # (closed already unless the job failed while checking)
            # a job refused before its manifest, or a new one that failed before its first
            # part (a Trainer or loader setting refused), leaves nothing: a corrected rerun
            # is a new job
            written = [q for p in out_paths for w in p.values() for q in (w, parts_dir(w))]
            unused = not started or (fresh and failed and not any(q.exists() for q in written))
            if unused and started:
                (folder / manifest_name).unlink(missing_ok=True)
            # a failed job that changed nothing in the folder (refused by the manifest check:
            # another job's results, files it cannot tell apart) leaves no lock file there
            lock.release(remove=unused or (failed and lock.unchanged()))
    summary.seconds = time.perf_counter() - start
    return summary


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchgeo-dofa", description="DOFA embeddings for Earth observation rasters."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser(
        "embed",
        help="embed GeoTIFFs into a grid GeoTIFF / pooled GeoParquet",
        description="Embed rasters with DOFA: a grid GeoTIFF and/or a pooled GeoParquet per "
        "region (an input file, folder, or the tiles of one Earth Engine export).",
    )
    # argparse (3.12, 3.13) takes "-1e+38" for an option ("--nodata: expected one
    # argument"): float rasters' usual no-data, -3.4028234663852886e+38, needs an exponent
    e._negative_number_matcher = _NEGATIVE_NUMBER
    e.add_argument(
        "inputs", nargs="*", help="GeoTIFF/JP2 files or folders (none with --stac alone)"
    )
    e.add_argument(
        "-o",
        "--output-dir",
        required=True,
        metavar="OUT",
        help="folder for the outputs, or with one region a file name NAME.tif / "
        "NAME.parquet (also .tiff, .geoparquet, any case; --output both writes the "
        "file named and its sibling NAME.tif or NAME.parquet)",
    )
    e.add_argument(
        "--variant",
        type=_lowercase,
        choices=VARIANT_NAMES,
        default="base",
        metavar="VARIANT",
        help="base | large (b | l)",
    )
    e.add_argument(
        "--output",
        choices=OUTPUT_NAMES,
        default="both",
        metavar="KIND",
        help="grid | pooled | both (default both)",
    )
    e.add_argument(
        "--chip-size",
        type=int,
        default=CHIP,
        help="chip side in pixels (default 224 = one model input per chip, one grid cell "
        "per 16 x 16 pixels); larger chips are brought to 224 by --input-prep",
    )
    e.add_argument(
        "--input-prep",
        choices=INPUT_PREP_NAMES,
        default="resize",
        metavar="HOW",
        help="resize | tile: how a chip larger than 224 px becomes model input; resize: one "
        "224 px input, grid cells of chip-size/14 px; tile: 224 px tiles, cells of 16 px "
        "(no effect with --chip-size 224)",
    )
    e.add_argument("--weights", default="official", help="official | none | PATH")
    e.add_argument(
        "--seed",
        type=_count(0, 2**63 - 1),  # what torch.manual_seed takes (an int64)
        default=None,
        help="seed for --weights none",
    )
    e.add_argument(
        "--batch-size",
        type=_count(1),
        default=None,
        help="chips per batch (default: for the device)",
    )
    e.add_argument(
        "--num-workers",
        type=_count(0),
        default=None,
        help="DataLoader workers reading chips (default: min(4, cores - 1) on a CPU; on CUDA "
        "(cores - 2) / GPUs, at most 8)",
    )
    e.add_argument(
        "--device",
        type=_lowercase,
        choices=DEVICE_NAMES,
        default="auto",
        metavar="DEVICE",
        help="auto | cpu | gpu",
    )
    e.add_argument(
        "--devices",
        default="1",
        help="devices to run on: a count (more than 1 with --strategy ddp), auto, or GPU "
        "indices such as 0,1",
    )
    e.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")
    e.add_argument(
        "--precision",
        type=_lowercase,
        choices=("auto", *PRECISION_NAMES),
        default="auto",
        metavar="PRECISION",
        help="auto | 32 | bf16 (auto: bf16 on CUDA and on CPUs with AMX / AVX-512 BF16)",
    )
    e.add_argument(
        "--file-bands",
        nargs="+",
        action=_ListOption,
        default=None,
        metavar="BAND",
        help="names of the bands of files without band descriptions, in file order; a "
        "second date as B4_1 (e.g. B4 B3 B2 B8 B4_1 B3_1 B2_1 B8_1)",
    )
    e.add_argument(
        "--bands",
        nargs="+",
        action=_ListOption,
        default=None,
        metavar="BAND",
        help="bands to embed, in order (B4 B3 B2 or B4,B3,B2)",
    )
    e.add_argument(
        "--wavelengths",
        nargs="+",
        action=_ListOption,
        convert=float,
        default=None,
        metavar="UM",
        help="centre wavelength (um) of each band, for bands that are not Sentinel-2's (their "
        "statistics: --mean, --std)",
    )
    e.add_argument(
        "--mean",
        nargs="+",
        action=_ListOption,
        convert=float,
        default=None,
        metavar="M",
        help="normalisation mean of each band on DOFA's 0..255 scale (reflectance / 10000 x "
        "255), for bands without DOFA statistics (another sensor's); with --std",
    )
    e.add_argument(
        "--std",
        nargs="+",
        action=_ListOption,
        convert=float,
        default=None,
        metavar="S",
        help="normalisation standard deviation of each band, same scale; with --mean",
    )
    e.add_argument("--nodata", type=float, default=None, help="no-data value of the inputs")
    e.add_argument(
        "--offset",
        type=_offset_value,
        default=None,
        help="radiometric offset added to the digital numbers, e.g. 0 or -1000 (default: "
        "auto, from the product metadata, name or date)",
    )
    e.add_argument(
        "--crs", default=None, help="CRS to read the inputs in (e.g. EPSG:32633; default: theirs)"
    )
    e.add_argument(
        "--res",
        type=_res_value,
        default=None,
        metavar="SIZE",
        help="pixel size to read the inputs at, in the CRS's units (default: the finest "
        "band's; with --crs, that of the files already in it, else what GDAL's warp gives)",
    )
    e.add_argument(
        "--stride", type=int, default=None, help="chip stride in pixels (default: chip size)"
    )
    e.add_argument("--points", default=None, help="CSV (lon,lat) or GeoJSON points")
    e.add_argument(
        "--buffer-m", type=float, default=None, help="point buffer in metres (default 2048)"
    )
    e.add_argument(
        "--skip-outside",
        action="store_true",
        help="skip points outside every raster (with a warning) instead of refusing the job",
    )
    e.add_argument(
        "--bbox",
        type=float,
        nargs=4,
        default=None,
        metavar=("MINLON", "MINLAT", "MAXLON", "MAXLAT"),
        help="embed only the chips meeting this box (degrees, EPSG:4326): the whole "
        "scene's chips, so the outputs are a window of the scene's",
    )
    e.add_argument(
        "--stac",
        default=None,
        metavar="URL|FILE",
        help="STAC API URL (e.g. https://earth-search.aws.element84.com/v1), item collection "
        "or catalog: embed the cloud-masked composite of --bbox over --datetime",
    )
    e.add_argument("--collection", default="sentinel-2-l2a", help="STAC collection id")
    e.add_argument(
        "--datetime",
        default=None,
        metavar="A/B",
        help="dates, e.g. 2023-06-01/2023-08-31 (inclusive): the STAC search's, or which local "
        "scenes to read (their dates from STAC item JSON or file names)",
    )
    e.add_argument("--max-cloud", type=float, default=30.0, help="eo:cloud_cover limit, %%")
    e.add_argument(
        "--composite",
        choices=COMPOSITE_NAMES,
        default="median",
        metavar="HOW",
        help="median | mosaic (first valid date)",
    )
    e.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the outputs of a different earlier job in the -o folder",
    )
    e.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p = sub.add_parser("preview", help="PCA picture of a grid embedding beside the input")
    p.add_argument("embedding")
    p.add_argument("-o", "--output", required=True)
    for name in _LIGHTNING_COMMANDS:
        sub.add_parser(name, help=f"LightningCLI {name} (--config cfg.yaml)", add_help=False)
    return parser


def _count(least: int, most: int = 2**31 - 1) -> Callable[[str], int]:
    """An argparse type: an integer from ``least`` to ``most`` (argparse names the option)."""

    def count(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
        if number < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {number}")
        if number > most:
            raise argparse.ArgumentTypeError(f"must be at most {most}, got {number}")
        return number

    return count


class _ListOption(argparse.Action):
    """A list option's values, given apart or, for names, comma-separated (``B4,B3``).

    ``--bands B4,B3,B2`` was one band named ``B4,B3,B2`` (refused as not found); GDAL's and
    many tools' lists are comma-separated, so band names are read either way (``B4, B3``
    too). Numbers (``convert`` not ``str``) are not split: ``0,8`` may be a decimal comma,
    which split would read as two values (helper-137), so a comma in one is refused.
    """

    def __init__(
        self, option_strings: Sequence[str], dest: str, convert: Callable[[str], Any] = str,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        self.convert = convert
        super().__init__(option_strings, dest, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        if self.convert is not str:  # numbers: "0,8" may be a decimal comma, not two values
            decimal = next((str(v) for v in values or () if "," in str(v)), None)
            if decimal is not None:
                raise argparse.ArgumentError(
                    self, f"{decimal!r} holds a comma: separate the numbers with spaces and "
                    "write decimals with a point (0.8, not 0,8)"
                )  # fmt: skip
        parts = [part.strip() for value in values or () for part in str(value).split(",")]
        items = [part for part in parts if part]  # "B4, B3, B2" too: its tokens end in ","
        if not items:
            raise argparse.ArgumentError(self, "expected at least one value, not commas alone")
        converted = []
        for item in items:
            try:
                converted.append(self.convert(item))
            except ValueError:
                name = getattr(self.convert, "__name__", "")
                raise argparse.ArgumentError(self, f"invalid {name} value: {item!r}") from None
        setattr(namespace, self.dest, converted)


def _lowercase(value: str) -> str:
    """An option value compared case-insensitively (``--variant Base``, ``--precision BF16``)."""
    return value.strip().lower()


#: The first line of a ``config.yaml`` this package saved for a LightningCLI run: a later
#: run in the folder may replace it, never a file without it (a user's own config).
_CONFIG_MARK = "# torchgeo-dofa: the settings of a"


def _saved_here(path: Path) -> bool:
    """Whether ``path`` is a run's ``config.yaml`` this package saved (its first line)."""
    try:
        with path.open(encoding="utf-8", errors="replace") as file:
            return file.readline().startswith(_CONFIG_MARK)
    except OSError:
        return False


@_freeing_the_job
def _lightning_cli(args: Sequence[str] | None) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
    from lightning.pytorch.trainer.states import TrainerFn
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from .__main__ import end_import_pause
    from .datasets import InputError
    from .jobs import JobInterrupted, StopOnSignal, stop_advice
    from .locks import note_job_finished
    from .weights import CheckpointError, verify_checkpoint_file
    from .writers import _PartsWriter, atomic_write, lock_outputs_when_made

    end_import_pause()
    trainers: list[pl.Trainer] = []
    run_folders: list[_RunFolder] = []  # where each trainer's config.yaml goes, before the run

    @functools.cache
    def given_settings() -> frozenset[str]:
        """The model settings the command line names (read once, where a checkpoint asks)."""
        return _given_model_settings(sys.argv[1:] if args is None else args)

    # Ctrl-C / SIGTERM stop a prediction after the current batch's parts are written (exit
    # 130 / 143), as in embed; Lightning alone let SIGTERM run to the end. fit / validate /
    # test stop after the batch in progress (fit saves its state first), also 130 / 143:
    # Lightning alone ended fit on SIGTERM with exit status 0. Installed before
    # the trainer runs, so Lightning's own SIGTERM handler, which forwards the signal to the
    # DDP workers it started, composes with it and still runs
    stop = StopOnSignal(announce="torchgeo-dofa")
    command = list(sys.argv[1:] if args is None else args)[:1]
    if command and command[0] != "predict":
        stop.stage = command[0]  # the acknowledgement of a signal before the trainer exists

    class _SaveRunConfig(SaveConfigCallback):
        """Save the run's settings as ``config.yaml`` in the trainer's folder.

        Never over a file this package did not save there (a user's own ``config.yaml``,
        the ``--config`` given: ``predict`` without a logger saves in the working folder).
        """

        _log_dir: str | None = None

        def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
            # trainer.log_dir broadcasts: asked on every rank here, not in save_config, which
            # runs on rank 0 alone (a collective call there would wait for the others forever)
            self._log_dir = trainer.log_dir
            super().setup(trainer, pl_module, stage)

        def save_config(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str
        ) -> None:
            folder = Path(self._log_dir or ".")
            path = folder / self.config_filename
            if path.exists() and not _saved_here(path):
                warn(
                    f"{path} is not a config this package saved (your own, or the --config "
                    "given?): kept as it is, and this run's settings are not saved; give "
                    "--trainer.default_root_dir FOLDER (or a logger) to keep them there"
                )
                return
            name = getattr(stage, "value", stage)  # TrainerFn.PREDICTING: "predict"
            text = f"{_CONFIG_MARK} {name} run (LightningCLI's config: rerun with --config)\n"
            text += self.parser.dump(self.config, skip_none=False)
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: tmp.write_text(text))

    class _CLI(LightningCLI):
        def parse_arguments(self, parser: Any, args: Any) -> None:
            """Parse; check a ``ckpt_path`` file before Lightning's ``torch.load`` reads it."""
            super().parse_arguments(parser, args)
            sub = self.config.get("subcommand")
            section = self.config.get(sub) if sub else None
            ckpt = section.get("ckpt_path") if section is not None else None
            self._configured_model = None
            self._configured_args: dict[str, Any] = {}
            self._restoring: str | None = None
            if section is not None and ckpt and _a_local_path(ckpt) and not Path(ckpt).is_file():
                raise CheckpointError(
                    f"--ckpt_path {ckpt} "
                    + ("is a folder" if Path(ckpt).is_dir() else "does not exist")
                    + ": give a checkpoint file (a fit's are in logs/<name>/version_<n>/"
                    "checkpoints/), or 'last' / 'best' for those of this run's trainer"
                )
            if section is not None and ckpt and Path(ckpt).is_file():
                verify_checkpoint_file(ckpt, lightning=True)
                # a file named 'last' / 'best' is not what Lightning loads for that keyword
                self._restoring = ckpt if _a_local_path(ckpt) else None
                self._configured_model = section.get("model", {}).get("class_path")
                self._configured_args = _plain(section.get("model", {}).get("init_args"))

        def _parse_ckpt_path(self) -> None:
            """LightningCLI's, also for a checkpoint of a model built in Python.

            LightningCLI reads the model's class from the checkpoint's hyperparameters'
            ``_class_path``, which it records only for the models it builds itself: a
            checkpoint of a task trained in Python (``Trainer.fit`` in a notebook,
            ``trainer.save_checkpoint``) failed with "Parsing of ckpt_path hyperparameters
            failed" (Lightning-AI/pytorch-lightning#20801). Such a checkpoint takes the
            config's ``model.class_path``.
            """
            sub = self.config.get("subcommand")
            ckpt_path = self.config[sub].get("ckpt_path") if sub else None
            if not ckpt_path or not Path(ckpt_path).is_file():
                return
            class_path, hparams = _saved_task(
                ckpt_path, (self.config[sub].get("model") or {}).get("class_path")
            )
            if hparams is None:
                return
            if class_path is not None:
                hparams = {"class_path": class_path, "dict_kwargs": hparams}
            try:
                self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)
            except SystemExit:
                sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
                raise

        def before_instantiate_classes(self) -> None:
            """Refuse a ``ckpt_path`` of another task class than the config's model.

            LightningCLI replaces the config's model with the class recorded in the
            checkpoint's hyperparameters, so a classification checkpoint under a segmentation
            config built a classification task and failed on the first batch.
            """
            sub = self.config.get("subcommand")
            configured = getattr(self, "_configured_model", None)
            if not sub or not configured:
                return
            used = self.config[sub].get("model", {}).get("class_path")
            if used == configured:
                _warn_replaced_by_checkpoint(
                    self.config[sub].get("ckpt_path"),
                    self._configured_args,
                    _plain(self.config[sub].get("model", {}).get("init_args")),
                    configured,
                    sub,
                    given=given_settings(),
                )
            if used and used != configured:
                _refuse_other_task(self.config[sub].get("ckpt_path"), used, configured, sub)

        def instantiate_classes(self) -> None:
            """Build a task whose ``--ckpt_path`` fills it without reading its ``weights``.

            The checkpoint's hyperparameters name the encoder the task was fine-tuned from
            (``official``, a file path): reading it again only to overwrite it failed where
            that file is not (another machine, no network) and cost the random
            initialisation or the official file's read and hash.
            """
            ckpt = getattr(self, "_restoring", None)
            if ckpt is None:
                super().instantiate_classes()
                return
            from .tasks import restoring_from

            with restoring_from(ckpt):
                super().instantiate_classes()

        def _name_seeded_random_weights(self) -> None:
            """Name the model's random weights drawn after LightningCLI's seed, by that seed.

            LightningCLI seeds the random generators before it builds the model unless the
            config says ``seed_everything: false`` (``true``, the default, is the seed in
            ``PL_GLOBAL_SEED`` or 0: Lightning-AI/pytorch-lightning#18846, Lightning >= 2.2),
            so a model with ``weights: null`` and no seed of its own draws the same weights
            on every run: its prediction resumes. Its encoder's ``weights_id`` was
            ``"random"``, as for weights drawn without a seed, and a stopped run was told
            that its chips "cannot be resumed" (:class:`~torchgeo_dofa.jobs.StopOnSignal`);
            now ``"random (seed_everything N)"``, also in the outputs' ``weights`` tag.
            """
            seed = self._get(self.config, "seed_everything")  # an int once it seeded
            encoder: Any = getattr(self.model, "encoder", None)
            if type(seed) is int and getattr(encoder, "weights_id", None) == "random":
                encoder.weights_id = f"random (seed_everything {seed})"

        def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
            self._name_seeded_random_weights()  # (the model is built by now)
            try:
                trainer = super().instantiate_trainer(**kwargs)
            except Exception as err:  # devices: -1 on a CPU, FSDP on a CPU
                if not _trainer_settings_error(err):
                    raise
                settings = {**self._get(self.config_init, "trainer", default={}), **kwargs}
                raise InputError(
                    "the trainer settings (trainer: in the config, --trainer.* options): "
                    + (_no_gpu_problem(settings.get("accelerator"), err) or str(err))
                ) from None
            trainers.append(trainer)  # to clean up after a failure (LightningCLI raises in init)
            _workers_within_open_files(getattr(self, "datamodule", None))
            from .runtime import loaders_hand_over

            loaders_hand_over(getattr(self, "datamodule", None))  # a batch not sent raises
            _check_rendezvous(trainer)
            run_folders.append(_RunFolder.before(trainer))
            if self.subcommand:
                rebuilt = _check_ckpt_keyword(
                    trainer,
                    self.model,
                    self.subcommand,
                    self.config[self.subcommand],
                    given=given_settings(),
                )
                if rebuilt is not None:  # LightningCLI runs the subcommand on self.model
                    self.model = rebuilt
                    with contextlib.suppress(Exception):  # the model built first: freed
                        self.config_init[self.subcommand]["model"] = rebuilt
                    self._add_configure_optimizers_method_to_model(self.subcommand)
                    self._record_model_settings(trainer, rebuilt)
            if self.subcommand == "predict":
                _check_predictions_written(trainer, self.model, self.config["predict"])
            trainer.callbacks.append(stop)  # type: ignore[attr-defined]
            return trainer

        def _record_model_settings(self, trainer: pl.Trainer, model: Any) -> None:
            """Put ``model``'s settings in the config the run saves (``config.yaml``).

            As LightningCLI does for a ``--ckpt_path`` file given by name, whose settings
            replace the config's before the config is saved.
            """
            from lightning.pytorch.cli import SaveConfigCallback

            sub = self.subcommand
            model_config = {
                "class_path": f"{type(model).__module__}.{type(model).__qualname__}",
                "init_args": _accepted(type(model), _plain(model.hparams)),
            }
            try:
                self.config = self.parser.parse_object({sub: {"model": model_config}}, self.config)
            except (SystemExit, Exception):  # the saved config keeps the config's settings
                return
            for callback in trainer.callbacks:  # type: ignore[attr-defined]
                if isinstance(callback, SaveConfigCallback):
                    callback.config = self.config[sub]

    # the writers take their folders' locks when made, before the model loads
    with stop, lock_outputs_when_made():
        try:
            # in a copy of the context: jsonargparse leaves its parser in a context variable,
            # and through LightningCLI's instantiators the run's model, so a run in a Python
            # process kept its model (~450 MB for base) after it ended
            contextvars.copy_context().run(
                _CLI,
                pl.LightningModule,
                pl.LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                args=None if args is None else list(args),
                save_config_callback=_SaveRunConfig,
                save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
            )
        except BaseException as err:
            for trainer in trainers:  # the error line starts a line of its own
                _close_progress_bar(trainer)
            # a run refused before it wrote anything leaves nothing
            tasks = sys.modules.get("torchgeo_dofa.tasks")  # not loaded: not raised
            refused = (tasks.NoLabelledPixelError, tasks.NoTrainingBatchError) if tasks else ()
            no_labels = any(isinstance(e, refused) for e in exception_chain(err))
            saved = any(  # a checkpoint kept outside the run's folder: its metrics stay too
                os.path.isfile(path)
                for t in trainers
                for c in t.checkpoint_callbacks
                for path in (getattr(c, "best_model_path", ""), getattr(c, "last_model_path", ""))
                if path
            )
            for folder in run_folders:
                folder.remove_if_only_its_settings(metrics_too=no_labels and not saved)
            # a second Ctrl-C (Lightning exits 1) or Lightning's own stop on SIGTERM (exit
            # 0) ended the run: it is the job's interruption
            if stop.received is not None and isinstance(err, SystemExit | KeyboardInterrupt):
                if stop.interrupted is not None:  # Lightning's stop; the state was saved
                    raise stop.interrupted from None
                if stop.finished_anyway and isinstance(err, SIGTERMException):
                    return  # Lightning's stop came once fit's last epoch had trained: done
                fitting = any(t.state.fn == TrainerFn.FITTING for t in trainers)
                # a prediction's writers keep their parts; fit / validate / test save nothing
                # (a fit stopped before training has no checkpoint of its own to resume)
                stopped = "fit" if fitting else stop.stage or "predict"
                began = {"fit": fitting, "predict": stop.began}.get(stopped, True)
                advice = stop_advice(stopped, began=began, resumable=stop.resumable)
                raise JobInterrupted(stop.received, advice) from None
            raise
        else:  # a prediction says where it wrote (it ended without a word), as embed does
            note_job_finished()
            for trainer in trainers:
                if trainer.state.fn != TrainerFn.PREDICTING or not trainer.is_global_zero:
                    continue
                for callback in trainer.callbacks:  # type: ignore[attr-defined]
                    written = getattr(callback, "path", None)
                    if isinstance(callback, _PartsWriter) and written is not None:
                        print(f"torchgeo-dofa: wrote {written}", file=sys.stderr)
        finally:
            # close cached raster handles now, not during interpreter shutdown (where a failed
            # job's open handles printed "Error in sys.excepthook" after the error line)
            for trainer in trainers:
                dm = getattr(trainer, "datamodule", None)
                for name in ("train_dataset", "val_dataset", "test_dataset", "predict_dataset"):
                    close = getattr(getattr(dm, name, None), "close", None)
                    if callable(close):
                        close()
            trainers.clear()
            run_folders.clear()


@dataclass(frozen=True)
class _RunFolder:
    """A LightningCLI run's log folder as it was before the run.

    ``folder``: ``trainer.log_dir`` (e.g. ``logs/<name>/version_3``); ``had_config``:
    whether it held a ``config.yaml``; ``existed``: which of it and its parents existed;
    ``found``: what it held. LightningCLI saves the run's ``config.yaml`` there at the
    trainer's setup, before a checkpoint is restored and checked: a fit refused then (a
    diverged optimizer state, a checkpoint of another task) left a ``version_N`` folder
    holding only that file, to be taken for a run; one refused at its first batch or epoch
    end, that file and the logger's ``hparams.yaml``; one refused by its data module's setup
    (a dataset not found, settings checked there), an empty folder: the logger makes it
    just before. A prediction without a logger saves it in ``default_root_dir``, often its
    output folder (or the working folder): a ``predict --config`` refused late (a
    ``batch_size`` of 0, a writer's path refused at setup) left it there beside the
    folder's lock file.
    """

    folder: Path | None
    had_config: bool = False
    existed: frozenset[Path] = frozenset()
    found: frozenset[str] = frozenset()

    @classmethod
    def before(cls, trainer: pl.Trainer) -> _RunFolder:
        """The trainer's log folder now (before its run); no folder where it has none."""
        try:
            log_dir = trainer.log_dir
        except Exception:  # a logger without a local folder
            return cls(None)
        if not log_dir:
            return cls(None)
        folder = Path(log_dir).resolve()
        existed = frozenset(p for p in (folder, *folder.parents) if p.is_dir())
        try:
            found = frozenset(os.listdir(folder)) if folder in existed else frozenset()
        except OSError:  # unreadable: nothing of it is known to be the run's
            return cls(None)
        return cls(folder, (folder / "config.yaml").exists(), existed, found)

    def remove_if_only_its_settings(self, metrics_too: bool = False) -> None:
        """After a failed run: remove the run's settings and the folders made for it.

        Only where the run added nothing to its folder but its settings (LightningCLI's
        ``config.yaml``; the logger's ``hparams.yaml``, written as training starts, before
        the first batch: no checkpoint, no metric) and the folder held no ``config.yaml``
        before, or is empty and was made by this run (the logger made it before the data
        module's setup refused the run); what the folder held before the run and folders
        that existed are kept, and an output folder's lock file is left to its lock
        (:func:`~torchgeo_dofa.writers.lock_outputs_when_made` releases it after this).
        ``metrics_too``: its ``metrics.csv`` goes too (a first epoch refused for want of
        labels, no checkpoint saved: loss 0 and NaN, nothing to keep), where the run made
        the folder (an existing one keeps it).
        """
        from .locks import LOCK_NAME

        folder = self.folder
        if folder is None or self.had_config or not folder.is_dir():
            return
        new_folder = folder not in self.existed
        removable = {"config.yaml", "hparams.yaml"} | (
            {"metrics.csv"} if metrics_too and new_folder else set()
        )
        with contextlib.suppress(OSError):
            names = {p.name for p in folder.iterdir()} - self.found - {LOCK_NAME}
            empty = {n for n in names if (folder / n).is_dir() and not any((folder / n).iterdir())}
            if not ("config.yaml" in names or new_folder) or not names - empty <= removable:
                return
            for name in names:  # an empty folder the run made: ModelCheckpoint's, unused
                (folder / name).rmdir() if name in empty else (folder / name).unlink()
            for made in (folder, *folder.parents):
                if made in self.existed:
                    break
                made.rmdir()  # OSError (not empty: another run's) ends it


def _a_local_path(ckpt: Any) -> bool:
    """Whether a ``ckpt_path`` names a local file.

    Not Lightning's ``last`` / ``best`` / ``hpc`` / ``registry`` keywords, nor an fsspec URL
    such as ``s3://...``.
    """
    text = str(ckpt)
    return (
        text not in ("last", "best", "hpc", "registry")
        and not text.startswith("registry:")
        and "://" not in text
    )


def _check_ckpt_keyword(
    trainer: Any, model: Any, subcommand: str, section: Any, given: frozenset[str] = frozenset()
) -> Any | None:
    """Take a ``--ckpt_path`` keyword (``last``, ``best``, ``hpc``) as the file it names.

    Lightning resolves the keyword from the trainer's own callbacks when the subcommand runs:
    ``best`` is the best checkpoint of a fit in the same process (a new command has none) and
    raised a ``ValueError`` traceback; ``last`` found no last checkpoint in the folder of the
    trainer's ``ModelCheckpoint`` and only warned, so ``predict --ckpt_path last`` mapped
    with the task's untrained head and ``validate`` / ``test`` scored it. Where it found one,
    the file skipped what a checkpoint given by name gets (its check for damage, its class,
    its settings replacing the config's), so a truncated file or another task's settings
    ended in a traceback. Here the keyword is resolved with Lightning's own resolution before
    the trainer runs, and the file it names is said on stderr and taken as a file given by
    name is: checked, and the task rebuilt from its settings where they differ from the
    config's (said as for a named file), for that file to fill. ``fit --ckpt_path last``
    with no last checkpoint still starts anew (Lightning's "set it and forget it").

    Returns:
        The task rebuilt from the checkpoint's settings, or None where ``model`` stays.

    Raises:
        CheckpointError: the keyword names no checkpoint (saying where ``last`` looked), or
            the file it names is damaged, not a Lightning checkpoint, or another task's.
    """
    ckpt = section.get("ckpt_path") if section is not None else None
    if ckpt not in ("last", "best", "hpc"):
        return None
    import warnings

    from lightning.pytorch.trainer.states import TrainerFn

    from .locks import is_launcher
    from .weights import CheckpointError, verify_checkpoint_file

    connector = getattr(trainer, "_checkpoint_connector", None)
    parse = getattr(connector, "_parse_ckpt_path", None)
    if subcommand not in {f.value for f in TrainerFn} or not callable(parse):
        return None  # another Lightning decides alone
    fn = TrainerFn(subcommand)  # "fit", "validate", "test", "predict"
    try:
        with warnings.catch_warnings():  # Lightning's warning that "last" found nothing
            warnings.simplefilter("ignore")
            found = parse(fn, ckpt, model_provided=True, model_connected=False)
    except ValueError:
        found = None
    if found is None and ckpt == "last" and fn == TrainerFn.FITTING:
        return None  # a first fit may be given "last"
    if found is None:
        folders = ", ".join(_last_checkpoint_folders(trainer))
        looked = (
            f"no last checkpoint in {folders}, where the trainer's ModelCheckpoint looks"
            if folders
            else "the trainer has no ModelCheckpoint folder to look in"
        )
        reason = {
            "best": "'best' is the best checkpoint of a fit run earlier in the same process, "
            "and this command has run none",
            "hpc": "'hpc' is a SLURM requeue checkpoint, and none was found",
            "last": f"{looked}, so the {subcommand} would use the task's untrained head",
        }[ckpt]
        raise CheckpointError(
            f"--ckpt_path {ckpt} names no checkpoint here ({reason}): give the checkpoint file "
            "instead (a fit's are in logs/<name>/version_<n>/checkpoints/, e.g. last.ckpt)"
        )
    if is_launcher():
        print(f"torchgeo-dofa: --ckpt_path {ckpt} is {found}", file=sys.stderr)
    if not _a_local_path(found) or not Path(found).is_file():
        return None  # a remote checkpoint: Lightning's to read
    verify_checkpoint_file(found, lightning=True)
    configured = f"{type(model).__module__}.{type(model).__qualname__}"
    used, hparams = _saved_task(found, configured)
    if used and used != configured:
        _refuse_other_task(found, used, configured, subcommand)
    if not hparams:
        return None
    current = _plain(getattr(model, "hparams", None))
    if all(key in current and _setting(current[key]) == _setting(v) for key, v in hparams.items()):
        return None
    # the settings it was saved with, as LightningCLI takes a file given by name
    _warn_replaced_by_checkpoint(
        found,
        _plain((section.get("model") or {}).get("init_args")),
        hparams,
        configured,
        subcommand,
        given=given,
    )
    from .tasks import restoring_from

    cls = type(model)
    with restoring_from(found):
        return cls(**_accepted(cls, hparams))


def _accepted(cls: type, settings: dict[str, Any]) -> dict[str, Any]:
    """The ``settings`` ``cls.__init__`` takes (all of them where it takes ``**kwargs``)."""
    import inspect

    parameters = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return settings
    return {k: v for k, v in settings.items() if k in parameters}


def _last_checkpoint_folders(trainer: Any) -> list[str]:
    """The folders where ``--ckpt_path last`` looks: each ``ModelCheckpoint``'s of ``trainer``.

    A callback without ``dirpath`` writes under the logger's next ``version_<n>`` (a new
    run's, empty) or ``default_root_dir/checkpoints`` without a logger, as Lightning resolves
    it at set-up (its private resolution; a callback it cannot resolve is left out).
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    folders = []
    for callback in getattr(trainer, "checkpoint_callbacks", []):
        if not isinstance(callback, ModelCheckpoint):
            continue
        folder = callback.dirpath
        resolve = getattr(callback, "_ModelCheckpoint__resolve_ckpt_dir", None)
        if folder is None and callable(resolve):
            with contextlib.suppress(Exception):
                folder = resolve(trainer)
        if folder is not None:
            folders.append(str(folder))
    return folders


def _setting(value: Any) -> str:
    """A model setting as compared across a checkpoint and a config (tuples as lists)."""
    return json.dumps(value, sort_keys=True, default=str)


def _predict_command(config: Path, ckpt: Any) -> str:
    """The ``predict`` command line a message advises: that config, checkpoint, your rasters."""
    return (
        f"predict --config {config}"
        + (f" --ckpt_path {ckpt}" if ckpt else "")
        + " --data.init_args.paths YOUR_RASTERS"
    )


#: The shipped ``predict`` config of each of this package's tasks
_TASK_PREDICT_CONFIGS = {
    "DOFASegmentationTask": "predict_segmentation.yaml",
    "DOFAClassificationTask": "predict_classification.yaml",
}


def _refuse_other_task(ckpt: Any, used: str, configured: str, subcommand: str) -> None:
    """Refuse checkpoint ``ckpt`` of task class ``used`` under a config's ``configured`` model.

    Raises:
        CheckpointError: naming both classes and the fix (the embedder's weights, the class
            path, or the task's own predict config).
    """
    from .weights import CheckpointError

    if _is_embedder(configured):
        raise CheckpointError(
            f"{ckpt} is a checkpoint of {used.rsplit('.', 1)[-1]}, but the "
            f"config's model is {configured.rsplit('.', 1)[-1]}, which takes a "
            "fine-tuned task's encoder as its weights, not as --ckpt_path: give "
            f"--model.init_args.weights {ckpt} instead"
        )
    task = used.rsplit(".", 1)[-1]
    fix = f"set model.class_path to {used}"
    if subcommand == "predict" and task in _TASK_PREDICT_CONFIGS:
        # the config's writer is the other task's: its own config has the right one
        config = Path(__file__).resolve().parent / "configs"
        fix = "predict it with its own config: " + _predict_command(
            config / _TASK_PREDICT_CONFIGS[task], ckpt
        )
    raise CheckpointError(
        f"{ckpt} is a checkpoint of {task}, but the config's model is "
        f"{configured.rsplit('.', 1)[-1]}: give a checkpoint of that task, or {fix}"
    )


def _check_predictions_written(trainer: Any, model: Any, section: Any) -> None:
    """Refuse a ``predict`` that would write nothing, or a task's without its weights.

    ``Trainer.predict`` returns its results to the caller, which LightningCLI drops: a
    ``predict --config`` without a ``BasePredictionWriter`` in ``trainer.callbacks`` (a
    fine-tuning config, or a callbacks list given without the writer) computed every batch
    and exited 0 having written nothing; so did ``limit_predict_batches: 0`` (no batch). A
    fine-tuning task predicting without ``--ckpt_path`` would map with an untrained head.

    Raises:
        ValueError: naming the writers to add and the config that has them, or the missing
            ``--ckpt_path``.
    """
    from lightning.pytorch.callbacks import BasePredictionWriter

    from torchgeo_dofa.writers import TASK_WRITERS

    configs = Path(__file__).resolve().parent / "configs"
    name = type(model).__name__
    embedder = _is_embedder(f"{type(model).__module__}.{type(model).__qualname__}")
    ckpt = section.get("ckpt_path")
    task = "DOFASegmentationTask" if "Segmentation" in name else "DOFAClassificationTask"
    task_config = configs / _TASK_PREDICT_CONFIGS[task]
    if not embedder and not ckpt:
        raise ValueError(
            f"predict with {name} needs its fine-tuned weights: give --ckpt_path TASK.ckpt "
            "(a fit's are in logs/<name>/version_<n>/checkpoints/), as in "
            f"predict --config {task_config} --ckpt_path TASK.ckpt"
        )
    writers = [c for c in trainer.callbacks if isinstance(c, BasePredictionWriter)]
    for writer in writers:  # a writer of another kind of model: said before the model loads
        check = getattr(writer, "_check_module", None)
        if not callable(check):
            continue
        try:
            check(model)
        except TypeError as err:
            config = configs / "predict_grid.yaml" if embedder else task_config
            raise ValueError(
                f"{err}; the config for {name}: {_predict_command(config, ckpt)}"
            ) from err
    if writers and trainer.limit_predict_batches == 0:  # Lightning skips the loop silently
        raise ValueError(
            "predict would write nothing: trainer.limit_predict_batches is 0 (no batch); "
            "remove it (from the config, or --trainer.limit_predict_batches), or give a "
            "number of batches or a fraction > 0"
        )
    if writers:
        return
    if embedder:
        raise ValueError(
            "predict would write nothing: the config's trainer.callbacks has no prediction "
            "writer; add torchgeo_dofa.writers.GridWriter or PooledWriter there, as "
            f"{configs / 'predict_grid.yaml'} does"
        )
    raise ValueError(
        f"predict would write nothing: the config's trainer.callbacks has no prediction "
        f"writer; {name}'s class probabilities are written by "
        f"torchgeo_dofa.writers.{TASK_WRITERS[task]} over a DOFAPredictDataModule: "
        + _predict_command(task_config, ckpt)
    )


def _plain(init_args: Any) -> dict[str, Any]:
    """A config section's ``init_args`` as a plain dict (jsonargparse's Namespace or None)."""
    if init_args is None:
        return {}
    as_dict = getattr(init_args, "as_dict", None)
    return dict(as_dict() if callable(as_dict) else init_args)


def _warn_replaced_by_checkpoint(
    ckpt: Any,
    configured: dict[str, Any],
    used: dict[str, Any],
    class_path: str,
    subcommand: str,
    given: frozenset[str] = frozenset(),
) -> None:
    """Say once on stderr which model settings a ``--ckpt_path``'s hyperparameters replaced.

    LightningCLI puts the checkpoint's hyperparameters over the config's model (the task the
    checkpoint saved is the one resumed), so a ``--model.init_args.num_classes 6`` given with
    a 4-class checkpoint became 4 without a word, and the run then failed on its labels.
    Settings left at the class's defaults are not named (jsonargparse fills them in, so a
    predict config naming two settings was said to have set five) unless the command line
    or its config files name them (``given``: a config's ``mode: linear-probe`` over a
    checkpoint trained with ``mode: full`` went unsaid, as the class's default), nor
    ``weights`` (the
    checkpoint holds the encoder: :func:`torchgeo_dofa.tasks.restoring_from`). Only ``fit``
    is told how to start anew from the encoder instead: ``predict`` / ``validate`` / ``test``
    use the task the checkpoint saved, its own head (the shipped predict configs'
    ``num_classes`` is a placeholder that the checkpoint's replaces).
    """
    defaults = _init_defaults(class_path)
    changed = [
        f"{key}={used[key]!r} (the config said {value!r})"
        for key, value in configured.items()
        if key in used
        and used[key] != value
        and key != "weights"
        and not (key in defaults and defaults[key] == value and key not in given)
    ]
    from .locks import is_launcher

    if changed and is_launcher():  # once per job, not per DDP rank
        advice = (
            "; to start a new run with other settings from its encoder's weights (the head "
            f"starts anew), give --model.init_args.weights {ckpt} instead of --ckpt_path"
            if subcommand == "fit"
            else ""
        )
        print(
            f"torchgeo-dofa: warning: --ckpt_path {ckpt} restores the task it saved, so its "
            f"hyperparameters replace the config's: {', '.join(changed)}{advice}",
            file=sys.stderr,
        )


def _given_model_settings(args: Sequence[str]) -> frozenset[str]:
    """The model settings a LightningCLI command line names itself.

    ``--model.init_args.KEY`` / ``--model.KEY`` options (``=value`` or not) and the keys of
    the ``model`` section (its ``init_args``) of every ``--config`` / ``-c`` file; a file that
    cannot be read or parsed names none (LightningCLI reports it).

    Args:
        args: the command line after the program name.

    Returns:
        The settings' names.
    """
    import yaml

    given: set[str] = set()
    files: list[str] = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            files.append(args[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
        elif match := re.match(r"--model\.(?:init_args\.)?([A-Za-z_]\w*)(?:=|$)", arg):
            given.add(match.group(1))
    for name in files:
        try:
            config = yaml.safe_load(Path(name).read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError):
            continue
        model = config.get("model") if isinstance(config, dict) else None
        if isinstance(model, dict):
            settings = model.get("init_args", model)
            if isinstance(settings, dict):
                given.update(k for k in settings if isinstance(k, str) and k != "class_path")
    return frozenset(given)


def _saved_task(path: str | os.PathLike[str], configured: str | None) -> tuple[Any, Any]:
    """The task class a Lightning checkpoint file saved, and its settings.

    Args:
        path: the checkpoint (its tensors are not read where it is a zip: ``mmap``).
        configured: the config's ``model.class_path``, for a checkpoint without
            ``_class_path`` (:func:`_python_checkpoints_task`).

    Returns:
        ``(class_path, settings)``: the class its hyperparameters' ``_class_path`` records
        (else told by its state dict; None where neither tells), and its hyperparameters
        without LightningCLI's private keys (None where it saved none).
    """
    import zipfile

    import torch

    ckpt = torch.load(path, weights_only=True, map_location="cpu", mmap=zipfile.is_zipfile(path))
    hparams = dict(ckpt.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    saved = bool(hparams)
    class_path = hparams.pop("_class_path", None) or _python_checkpoints_task(
        ckpt.get("state_dict") or {}, configured
    )
    return class_path, hparams if saved else None


def _python_checkpoints_task(state: dict[str, Any], configured: str | None) -> str | None:
    """The task class of a checkpoint without ``_class_path`` (a task trained in Python).

    The config's ``model.class_path``, unless it is one of this package's tasks and the state
    dict is the other task's (``decoder.*`` for segmentation, ``head.*`` for classification):
    then the other task, which the config's model then refuses by name.
    """
    tasks = {
        "decoder.": "torchgeo_dofa.tasks.DOFASegmentationTask",
        "head.": "torchgeo_dofa.tasks.DOFAClassificationTask",
    }
    if configured not in tasks.values():
        return configured
    for prefix, task in tasks.items():
        if any(isinstance(k, str) and k.startswith(prefix) for k in state):
            return task
    return configured


def _config_class(class_path: str) -> type | None:
    """The class a config's ``class_path`` names, or None where it names none."""
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return cls if isinstance(cls, type) else None


def _init_defaults(class_path: str) -> dict[str, Any]:
    """The default values of a config's ``model.class_path``'s ``__init__`` (none if unknown)."""
    import inspect

    cls = _config_class(class_path)
    try:
        parameters = inspect.signature(cls).parameters.values() if cls else ()
    except (ValueError, TypeError):
        return {}
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def _is_embedder(class_path: str) -> bool:
    """Whether a config's ``model.class_path`` is :class:`DOFAEmbedder` or a subclass."""
    from .embedder import DOFAEmbedder

    cls = _config_class(class_path)
    return cls is not None and issubclass(cls, DOFAEmbedder)


def _free_the_job() -> None:
    """Free a finished job's model and data now, for callers running several in a process.

    The trainer, the module and the data module refer to each other, so only Python's
    cyclic collector frees them, and it runs by object count, not by memory: four demo
    embed jobs in a row held 1.7, 2.1, 2.5 and 2.9 GB (about 400 MB more each, DOFA base),
    1.7-2.0 GB with this collection after each (0.3-0.35 s). Not by emptying the module's
    tensors: a callback given to ``embed`` may keep the module (``pl_module``) and use it
    afterwards, as ``benchmarks/e2e_worker.py`` does. Skipped where the process ends with
    its command (the ``torchgeo-dofa`` command: see
    :func:`torchgeo_dofa.__main__.run_as_command`).
    """
    from .__main__ import process_ends_after_command

    if not process_ends_after_command():
        gc.collect()


def _run_lightning_cli(args: Sequence[str] | None) -> int:
    """Run a LightningCLI subcommand; bad input ends in one line, not a traceback.

    Bad input exits 2, as with ``embed``: this package's own errors (a refused resume,
    unnormalised input, a corrupt checkpoint, unknown bands, values that are not raw
    reflectance, a missing or unreadable input, an output path that cannot be the job's)
    and any ``ValueError`` raised by its code (an unknown variant, a stride off the output
    grid), also where jsonargparse wraps them, and Lightning's ``MisconfigurationException``
    (a setting it refuses as the run starts), and TorchGeo's own ``DatasetNotFoundError`` /
    ``DependencyNotFoundError`` (a data module's dataset finding no file, or missing a
    package); a failed output write exits 1, a DDP
    rendezvous port held by another process 1 (:class:`~torchgeo_dofa.jobs.RendezvousPortError`)
    and another job on the same output 75. Any other error keeps Lightning's traceback.
    """
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from .bands import BandError
    from .datasets import InputError
    from .embedder import NotNormalisedError
    from .jobs import (
        JobError,
        JobInterrupted,
        is_launcher,
        loader_worker_error,
        rendezvous_port_error,
    )
    from .transforms import ReflectanceError
    from .weights import CheckpointError
    from .writers import OutputPathError, OutputWriteError, PartsMismatchError

    ours = (
        JobError,
        OutputWriteError,
        OutputPathError,
        PartsMismatchError,
        NotNormalisedError,
        ReflectanceError,
        InputError,
        BandError,
        CheckpointError,
    )

    def bad_input(err: BaseException) -> bool:
        return (
            isinstance(err, ours)
            or (isinstance(err, ValueError) and _raised_here(err))
            # PyTorch's constructors refusing a config's value (--model.init_args.lr -1:
            # "Invalid learning rate: -1.0"; --data.init_args.batch_size 0)
            or (isinstance(err, ValueError) and _refused_by_torch_setting(err))
            # Lightning refusing the run's settings as it runs (a limit_predict_batches
            # fraction of no batch): its message names the setting
            or isinstance(err, MisconfigurationException)
            # TorchGeo's IntersectionDataset of datasets that share no place or time
            # (labels & image in a data module's setup: TorchGeo's own __and__)
            or _torchgeo_no_intersection(err)
            # TorchGeo's dataset of a folder that holds none of its files, or needing a
            # package that is not installed (a data module's setup)
            or _torchgeo_setup_error(err) is not None
            # TorchGeo's own class of that name (a data module's batch_size 0)
            or (
                type(err).__module__.startswith("torchgeo.")
                and type(err).__name__ == "MisconfigurationException"
            )
        )

    try:
        _lightning_cli(args)
    except Exception as raised:
        known = rendezvous_port_error(raised) or loader_worker_error(raised)
        if known is not None:
            given = list(sys.argv[1:] if args is None else args)
            line = config_hints(str(known), data=given[:1] == ["predict"])
            print(f"torchgeo-dofa: error: {line}", file=sys.stderr)
            return known.exit_status
        # the package's own error already names the full disk and its file or folder (the
        # writers' folder or final write); the generic line is for Lightning's own writes
        own = any(isinstance(e, ours) for e in exception_chain(raised))
        full = None if own else disk_full_line(raised)
        if full is not None:
            print(f"torchgeo-dofa: error: {full}", file=sys.stderr)
            return 1
        # jsonargparse wraps an error of the model's or data module's __init__ in its own
        # ValueError ("Does not validate against any of the Union subtypes ..."): look for
        # ours along the chain of causes
        err = next((e for e in exception_chain(raised) if bad_input(e)), None)
        if err is None:
            raise
        if is_launcher() or not isinstance(err, JobInterrupted):  # once per job, not rank
            given = list(sys.argv[1:] if args is None else args)
            text = _torchgeo_setup_error(err) or error_line(err)
            line = config_hints(text, data=given[:1] == ["predict"])
            print(f"torchgeo-dofa: error: {line}", file=sys.stderr)
        return int(getattr(err, "exit_status", 2))
    return 0


def disk_full_line(err: BaseException) -> str | None:
    """The one line for a full disk (or quota) met by Lightning's own writes, else None.

    Lightning saves a checkpoint to a temporary file and moves it into place; across file
    systems the move is a copy, and a full disk left the copy cut short under the final
    name (a ``last.ckpt`` of 184 of 445 MB) and the temporary file behind, with a
    traceback. Both are removed here: a cut checkpoint is no checkpoint.

    Args:
        err: the exception a LightningCLI run raised (its causes are searched too).

    Returns:
        The message naming the file, what was removed and the fix, or None.
    """
    import errno
    import tempfile

    found = next(
        (
            e
            for e in exception_chain(err)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
        ),
        None,
    )
    if found is None:
        return None
    source, target = found.filename, found.filename2
    written = Path(target if target else source) if (target or source) else None
    removed: list[str] = []
    if target and source:  # a move: the copy under the final name is cut short
        src, dst = Path(source), Path(target)
        with contextlib.suppress(OSError):
            if dst.is_file() and (not src.is_file() or dst.stat().st_size < src.stat().st_size):
                dst.unlink()
                removed.append(str(dst))
        with contextlib.suppress(OSError):  # the temporary file a save moves into place
            if src.is_file() and src.parent.resolve() == Path(tempfile.gettempdir()).resolve():
                src.unlink()
    gone = " (cut short: removed)" if removed else ""
    if written is None:  # no file named: Lightning stages checkpoints in the temporary folder
        where = tempfile.gettempdir()
        return (
            f"the disk is full ({found.strerror or found}) while writing; checkpoints are "
            f"saved to the temporary folder {where} first, then moved into place: free space "
            "there or set TMPDIR to a folder with room (and free the output's disk, or point "
            "the trainer's default_root_dir / the logger's save_dir elsewhere) and rerun"
        )
    return (
        f"the disk is full ({found.strerror or found}) writing {written}{gone}: free space "
        "there (or point the trainer's default_root_dir / the logger's save_dir elsewhere) "
        "and rerun"
    )


def _innermost(err: BaseException) -> TracebackType | None:
    """The innermost entry of ``err``'s traceback (where it was raised), or None."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb


def _raised_in(err: BaseException, folder: Path) -> bool:
    """Whether the innermost frame of ``err``'s traceback is code under ``folder``."""
    tb = _innermost(err)
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(folder)


def _refused_by_torch_setting(err: BaseException) -> bool:
    """Whether a PyTorch optimizer's or DataLoader's constructor raised ``err`` (a setting).

    Only their ``__init__``: an error while a DataLoader iterates (a dataset's bug) keeps
    its traceback.
    """
    import torch

    tb = _innermost(err)
    if tb is None or tb.tb_frame.f_code.co_name != "__init__":
        return False
    root = Path(torch.__file__).resolve().parent
    return _raised_in(err, root / "optim") or _raised_in(err, root / "utils" / "data")


def _torchgeo_no_intersection(err: BaseException) -> bool:
    """Whether ``err`` is TorchGeo's "Datasets have no spatial / temporal intersection".

    TorchGeo's ``IntersectionDataset`` raises it (``labels & image``, its own ``__and__``;
    this package's ``image & labels`` raises :class:`~torchgeo_dofa.datasets.NoOverlapError`,
    naming both extents): bad input, not a fault of the run.
    """
    import torchgeo

    return (
        type(err) is RuntimeError
        and str(err).startswith("Datasets have no ")
        and _raised_in(err, Path(torchgeo.__file__).resolve().parent / "datasets")
    )


def _torchgeo_setup_error(err: BaseException) -> str | None:
    """The line for TorchGeo's own "the data is not there" errors, else None.

    TorchGeo's ``DatasetNotFoundError`` (a dataset whose ``root`` or ``paths`` holds none of
    its files, e.g. a label folder mistyped in a data module's ``setup``; this package's
    :class:`~torchgeo_dofa.datasets.NoRasterFoundError` is one) and
    ``DependencyNotFoundError`` (a dataset needing a package that is not installed), and a
    TorchGeo dataset's download failing for want of the network (``URLError``), are bad
    input or set-up, not a fault of the run: their message names the fix, and
    ``DatasetNotFoundError``'s gets the dataset's class in front (TorchGeo's says only
    "Dataset not found in `paths='labels/'` ...", and a data module may read several).
    """
    import urllib.error

    import torchgeo
    from torch.utils.data import Dataset
    from torchgeo.datasets.errors import DatasetNotFoundError, DependencyNotFoundError

    if isinstance(err, DependencyNotFoundError):  # TorchGeo's text spans nine lines
        return " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    datasets: list[str] = []  # the datasets whose methods the error went through, outermost first
    tb = err.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, Dataset):
            datasets.append(type(owner).__name__)
        tb = tb.tb_next
    if isinstance(err, urllib.error.URLError) and _passed_through(
        err, Path(torchgeo.__file__).resolve().parent / "datasets"
    ):
        # a TorchGeo dataset's download=True without the network (its DatasetNotFoundError
        # advises it where the files are missing)
        who = f"{datasets[-1]}: " if datasets else ""
        return (
            f"{who}could not download the dataset ({type(err).__name__}: "
            f"{getattr(err, 'reason', err)}): run where its address is reachable, or put the "
            "dataset's files in its root yourself and set download: false"
        )
    if not isinstance(err, DatasetNotFoundError):
        return None
    if type(err).__module__.startswith(__package__ or "torchgeo_dofa"):
        return str(err)  # NoRasterFoundError (a DatasetNotFoundError) names its dataset
    # TorchGeo raises DatasetNotFoundError(self) in the dataset's own method
    return f"{datasets[-1]}: {err}" if datasets else str(err)


def _passed_through(err: BaseException, folder: Path) -> bool:
    """Whether any frame of ``err``'s traceback is code under ``folder``."""
    tb = err.__traceback__
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(folder):
            return True
        tb = tb.tb_next
    return False


def _raised_here(err: BaseException) -> bool:
    """Whether ``err`` was raised by this package's code (the innermost frame is ours)."""
    return _raised_in(err, _PACKAGE_DIR)


_PACKAGE_DIR = Path(__file__).resolve().parent


#: Lightning's names for embed's settings, told beside its messages.
_LIGHTNING_NAMES = {
    "accelerator": "--device (device= in Python)",
    "enable_progress_bar": "--no-progress (progress= in Python)",
}


def _no_gpu_problem(accelerator: Any, err: BaseException) -> str | None:
    """What is wrong with ``--trainer.accelerator`` naming a GPU PyTorch does not see here.

    Lightning's ``err`` says only "No supported gpu backend found!" (``gpu``) or that its
    accelerator class "can not run on your system" (``cuda``, ``mps``); this names the
    setting, what PyTorch sees and the fix, as ``embed --device gpu`` does. None for any
    other value or error.
    """
    from .runtime import resolve_accelerator

    said = str(err)
    if "No supported gpu backend" not in said and "can not run on your system" not in said:
        return None
    if not isinstance(accelerator, str) or accelerator.strip().lower() not in (
        "gpu",
        "cuda",
        "mps",
    ):
        return None
    try:
        resolve_accelerator(accelerator, option="--trainer.accelerator")
    except ValueError as problem:
        return str(problem)
    return None


def _trainer_settings_error(err: BaseException) -> bool:
    """Whether ``err``, raised while a ``Trainer`` was built, is Lightning refusing its settings.

    Lightning's ``MisconfigurationException`` (DeepSpeed not installed), or a ``ValueError`` /
    ``TypeError`` / ``ModuleNotFoundError`` that Lightning's own code raises with a ``raise``
    statement (an unknown strategy name, FSDP on a CPU, ``devices: -1`` on a CPU,
    ``accelerator: tpu`` without ``torch_xla``), or a ``TypeError`` of Lightning's strategy
    registry building the strategy named by ``strategy`` from its registered parameters
    (``single_xla`` needs a ``device``: no name alone builds it; a strategy the user
    registered with parameters its class does not take is named the same way). Not another
    error of Python's own in a call (``takes 1 positional argument but 2 were given``: a
    plugin of the user's with another signature), nor one raised in the user's code (a
    strategy's own ``__init__``).
    """
    import linecache

    import lightning
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    if isinstance(err, MisconfigurationException):
        return True
    if not isinstance(err, ValueError | TypeError | ModuleNotFoundError):
        return False
    tb = _innermost(err)
    if tb is None:
        return False
    code = tb.tb_frame.f_code
    where = Path(code.co_filename).resolve()
    if not where.is_relative_to(Path(lightning.__file__).resolve().parent):
        return False
    if isinstance(err, TypeError) and code.co_name == "get":  # StrategyRegistry.get(name)
        if where.name == "registry.py" and where.parent.name == "strategies":
            return True
    line = linecache.getline(code.co_filename, tb.tb_lineno)
    return line.lstrip().startswith("raise ")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torchgeo-dofa`` console script.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success (also when stdout can no longer take the summary
        line: it goes to stderr), 2 for bad input (one-line error, no traceback), 1 when
        stdout failed while the command ran (its reader gone, a full disk: the progress bar
        writes there), 130 for Ctrl-C where no job handler runs yet (while the libraries
        load) or after a second Ctrl-C, 143 for SIGTERM where no job handler runs (the
        command's process only: :func:`torchgeo_dofa.__main__.terminate_before_the_job`).
    """
    from .locks import note_job_finished  # free of PyTorch

    note_job_finished(False)  # (a command run before in this process)
    try:
        return _main(argv)
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM outside a job's handler (143)
        from .locks import report_ctrl_c  # free of PyTorch: the libraries may not be loaded

        return report_ctrl_c(argv, getattr(err, "signum", signal.SIGINT))
    except OSError as err:
        if not _stdout_unwritable():
            raise
        _to_devnull(sys.stdout)
        _report(
            f"torchgeo-dofa: error: could not write to stdout ({_stdout_reason(err)}) while "
            "the command ran (the progress bar writes there): rerun it with stdout open or "
            "without the progress bar (embed --no-progress; --trainer.enable_progress_bar "
            "false with --config); an embed or predict job resumes where it stopped"
        )
        return 1


def _stdout_unwritable() -> bool:
    """Whether stdout fails to take what was written to it (a reader gone, a full disk).

    A write that failed leaves its bytes in the stream's buffer, so flushing fails again.
    """
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except OSError:
        return True
    except ValueError:  # closed
        return False
    return _stdout_reader_gone()


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (``| head -c 0``).

    A write that raised ``BrokenPipeError`` may leave nothing in the buffer for
    :func:`_stdout_unwritable`'s flush to fail on; a pipe without a reader polls as an error.
    """
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no stdout, no fileno, no poll
        return False


def _stdout_reason(err: OSError) -> str:
    return "broken pipe: its reader is gone" if isinstance(err, BrokenPipeError) else str(err)


def _to_devnull(stream: Any) -> None:
    """Point ``stream``'s file descriptor at /dev/null.

    What it still buffers then cannot fail the process's exit (Python's flush of a broken
    stdout at exit makes the exit status 120).
    """
    with contextlib.suppress(AttributeError, OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


def _report(line: str) -> None:
    """Print ``line`` on stderr; where stderr cannot take it either, drop it quietly."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (AttributeError, OSError, ValueError):
        _to_devnull(sys.stderr)


def _print_result(line: str) -> None:
    """Print a finished command's result line on stdout.

    The command's work is done and verified by then: stdout being closed (``| head -c 10``,
    a reader that quit, ``>&-``) or unwritable (a full disk) is warned of on stderr, not a
    failure (it was a ``BrokenPipeError`` traceback with exit 1, or exit 120 from Python's
    exit); so is stderr failing as well.
    """
    if sys.stdout is None:  # started with file descriptor 1 closed
        reason = "it is closed"
    else:
        try:
            print(line, flush=True)
            return
        except OSError as err:
            _to_devnull(sys.stdout)
            reason = _stdout_reason(err)
    _report(
        f"torchgeo-dofa: warning: could not write to stdout ({reason}), so this line was "
        f"not printed there: {line}"
    )


#: Variables huggingface_hub reads with ``int()`` as it is imported (``constants.py``): any
#: other value, even ``2.5`` or an empty string, fails every job with its traceback, also
#: without a download (timm imports it).
_HUB_INT_VARIABLES = ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT")


def environment_problem(environ: Mapping[str, str]) -> str | None:
    """What is wrong with the environment for a job, before any library reads it, or None.

    Args:
        environ: the environment (``os.environ``).

    Returns:
        One line naming the variable, its value and the fix.
    """
    for name in _HUB_INT_VARIABLES:
        value = environ.get(name)
        if value is None:
            continue
        try:
            int(value)
        except ValueError:
            return (
                f"the environment's {name}={value!r} is not a whole number of seconds, which "
                f"huggingface_hub needs as it loads (it reads it with int()): set it to e.g. "
                f"{name}=10, or unset it"
            )
    return None


def _main(argv: Sequence[str] | None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = args_list[0] if args_list else ""
    # the commands that load huggingface_hub (LightningCLI's --help too; embed's does not)
    embed_job = command == "embed" and not {"-h", "--help"} & set(args_list)
    if embed_job or command in _LIGHTNING_COMMANDS:
        problem = environment_problem(os.environ)
        if problem is not None:
            print(f"torchgeo-dofa: error: {problem}", file=sys.stderr)
            return 2
    if command in _LIGHTNING_COMMANDS:
        # the config's options are --data.init_args.bands ..., not embed's --bands
        with _one_line_warnings(run=command):
            return _run_lightning_cli(None if argv is None else args_list)
    parser = _parser()
    args = parser.parse_args(args_list)  # --help and usage errors before torch loads
    if args.command == "embed":  # so are the errors that need no raster read
        args.weights = None if str(args.weights).lower() == "none" else args.weights
        problem = option_problem(
            args.inputs,
            output_dir=args.output_dir,
            stac=args.stac,
            bbox=args.bbox,
            datetime=args.datetime,
            output=args.output,
            points=args.points,
            weights=args.weights,
            seed=args.seed,
            chip_size=args.chip_size,
            devices=args.devices,
            bands=args.bands,
            mean=args.mean,
            std=args.std,
            stride=args.stride,
        )
        if problem is None and args.points is None:  # options of point jobs, given alone
            alone = [
                option
                for option, given in (
                    ("--buffer-m", args.buffer_m is not None),
                    ("--skip-outside", args.skip_outside),
                )
                if given
            ]
            if alone:
                one = len(alone) == 1
                problem = (
                    f"{' and '.join(alone)} appl{'ies' if one else 'y'} to --points only: add "
                    f"--points FILE, or leave {'it' if one else 'them'} out"
                )
        problem = problem or _strategy_problem(args.strategy)
        problem = problem or _rendezvous_problem(args.strategy, args.devices, args.device)
        if problem is not None:
            print(f"torchgeo-dofa: error: {problem}", file=sys.stderr)
            return 2
        from .locks import JobLockedError, OutputLock

        try:  # a second job on the folder is answered at once, not after the libraries load
            OutputLock(output_folder(args.output_dir)).check_free()
        except JobLockedError as err:
            print(f"torchgeo-dofa: error: {err}", file=sys.stderr)
            return err.exit_status
    if args.command == "preview":  # numpy, rasterio and Pillow only
        from .__main__ import end_import_pause
        from .preview import PreviewWriteError, render_preview

        end_import_pause()  # a Ctrl-C from here removes the picture's hidden temporary file
        try:
            with _one_line_warnings():
                out = render_preview(args.embedding, args.output)
        except PreviewWriteError as err:  # not the input: the disk (embed's write errors: 1)
            print(f"torchgeo-dofa: error: {err}", file=sys.stderr)
            return 1
        except (ValueError, OSError) as err:
            print(f"torchgeo-dofa: error: {err}", file=sys.stderr)
            return 2
        _print_result(f"wrote {out}")
        return 0
    from .bands import BandError
    from .datasets import InputError
    from .jobs import JobError, JobInterrupted, LoaderWorkerError, is_launcher
    from .weights import CheckpointError
    from .writers import OutputWriteError

    try:
        with _one_line_warnings():
            summary = _embed_args(args)
    except (JobError, OutputWriteError) as err:
        if is_launcher() or not isinstance(err, JobInterrupted):  # one line per job, not rank
            line = cli_hints(str(err)) if isinstance(err, LoaderWorkerError) else str(err)
            print(f"torchgeo-dofa: error: {_with_notes(line, err)}", file=sys.stderr)
        return int(getattr(err, "exit_status", 1))
    except (InputError, BandError, CheckpointError, ValueError, OSError) as err:
        if isinstance(err, OSError) and _stdout_unwritable():
            raise  # not the input: stdout failed (the progress bar's writes; see main)
        print(f"torchgeo-dofa: error: {cli_hints(error_line(err))}", file=sys.stderr)
        return 2
    except Warning as err:  # python -W error / PYTHONWARNINGS=error made a warning an error
        print(
            f"torchgeo-dofa: error: {error_line(err)} ({type(err).__name__}, an error under "
            "the -W / PYTHONWARNINGS filters)",
            file=sys.stderr,
        )
        return 2
    if is_launcher():
        _print_result(summary.line())
    return 0


def _embed_args(args: argparse.Namespace) -> EmbedSummary:
    """Run :func:`embed` with the parsed command line."""
    return embed(
        args.inputs,
        args.output_dir,
        variant=args.variant,
        output=args.output,
        input_prep=args.input_prep,
        weights=args.weights,
        seed=args.seed,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        devices=args.devices,
        strategy=args.strategy,
        precision=args.precision,
        bands=args.bands,
        file_bands=args.file_bands,
        wavelengths=args.wavelengths,
        nodata=args.nodata,
        crs=args.crs,
        res=args.res,
        offset=args.offset,
        mean=args.mean,
        std=args.std,
        chip_size=args.chip_size,
        stride=args.stride,
        points=args.points,
        buffer_m=2048.0 if args.buffer_m is None else args.buffer_m,
        bbox=args.bbox,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        skip_outside=args.skip_outside,
        stac=args.stac,
        collection=args.collection,
        datetime=args.datetime,
        max_cloud=args.max_cloud,
        composite=args.composite,
    )


def _workers_within_open_files(datamodule: Any) -> None:
    """Set a data module's ``num_workers`` to 0, with a warning, under a low open-file limit.

    See :func:`torchgeo_dofa.runtime.workers_open_file_problem`. For any data module of a
    config (TorchGeo's build their loaders from ``num_workers``), whose workers would
    otherwise fail or hang on their first batch.
    """
    from .runtime import workers_open_file_problem

    workers = getattr(datamodule, "num_workers", None)
    problem = workers_open_file_problem(workers) if isinstance(workers, int) else None
    if problem is not None:
        warn(problem)
        datamodule.num_workers = 0


@contextlib.contextmanager
def _one_line_warnings(run: str | None = None) -> Iterator[None]:
    """Show this package's warnings as one line (``torchgeo-dofa: warning: ...``), no source.

    Python's format adds the file, line and source line that issued the warning, noise on a
    terminal; warnings from other libraries keep it. Python keyword hints are rewritten as
    embed's options (:func:`cli_hints`), or, for ``run`` (a LightningCLI run's subcommand),
    as its overrides (:func:`config_hints`).
    """
    here = _warnings.PACKAGE_DIR  # as imported, and behind links
    package = (here, os.path.realpath(here) + os.sep)
    default = warnings.formatwarning

    def one_line(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        line: str | None = None,
    ) -> str:
        if filename.startswith(package):
            text = (
                cli_hints(str(message))
                if run is None
                else config_hints(str(message), data=run == "predict")
            )
            return f"torchgeo-dofa: warning: {text}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = one_line
    try:
        with _warnings.attributed_to_package():
            yield
    finally:
        warnings.formatwarning = default


#: Loggers of Lightning's start-up lines (lightning/pytorch/utilities/rank_zero.py for
#: ``rank_zero_info``, lightning/fabric/utilities/distributed.py, .../accelerators/cuda.py).
LIGHTNING_STARTUP_LOGGERS: tuple[str, ...] = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.distributed",
    "lightning.pytorch.accelerators.cuda",
)

#: The start-up lines an embed job hides (Lightning 2.6's wording): accelerators found,
#: mixed precision in use, its product adverts, DDP's process-group set-up, CUDA's visible
#: devices and its TF32 advice (the job prints device and precision itself).
LIGHTNING_STARTUP_LINE = re.compile(
    r"\s*(?:[GTHI]PU available:|Using (?:16bit|16-bit|bfloat16) Automatic Mixed Precision"
    r"|\N{ELECTRIC LIGHT BULB} Tip:|Initializing distributed:|-+\s*distributed_backend="
    r"|LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES:|You are using a CUDA device .* Tensor Cores)"
)

#: Warnings an embed job hides, as (message regex, category): torch 2.10+'s FutureWarning
#: about ``LeafSpec``, raised inside Lightning's ``_pytree``; Lightning's "Total length of
#: `DataLoader` across ranks is zero" (a ``UserWarning`` subclass), which in an embed job
#: only means that an earlier run wrote every chip (a region without chips is refused first).
JOB_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"`isinstance\(treespec, LeafSpec\)`", FutureWarning),
    (r"Total length of `DataLoader` across ranks is zero", UserWarning),
)


class _StartupLineFilter(logging.Filter):
    """Drop the log records of :data:`LIGHTNING_STARTUP_LINE`; keep every other record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return LIGHTNING_STARTUP_LINE.match(record.getMessage()) is None


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Hide Lightning's start-up lines and two warnings that mean nothing in a job, for a job.

    An embed job prints its own line (device, precision and why, batch size, loader workers);
    Lightning's start-up lines (:data:`LIGHTNING_STARTUP_LINE`: accelerator found, AMP in use,
    adverts for its cloud products, DDP set-up) say less and would be repeated for every
    region; of :data:`JOB_WARNINGS`, torch 2.10+'s ``FutureWarning`` about ``LeafSpec``, which
    Lightning's ``_pytree`` still uses, is one the user can do nothing about, and Lightning's
    empty-loader warning only means a resumed region had every chip written. Every other
    record of those loggers (e.g. "Detected KeyboardInterrupt") and every other warning is
    kept. On exit the log filter and the warning filters added are removed; filters added
    meanwhile stay.
    (Adding a warning filter makes Python forget which "default"/"once" warnings it has
    shown, as ``warnings.catch_warnings`` does; such a warning may be shown once more.)
    """
    line_filter = _StartupLineFilter()
    loggers = [logging.getLogger(name) for name in LIGHTNING_STARTUP_LOGGERS]
    for log in loggers:
        log.addFilter(line_filter)
    ours = []
    for message, category in JOB_WARNINGS:
        entry = ("ignore", re.compile(message, re.I), category, None, 0)
        if entry not in warnings.filters:  # the caller's own identical filter stays theirs
            warnings.filterwarnings("ignore", message=message, category=category)
            ours.append(entry)
    try:
        yield
    finally:
        for entry in ours:
            with contextlib.suppress(ValueError):  # someone reset the filters meanwhile
                warnings.filters.remove(entry)  # type: ignore[attr-defined]  # a list
        for log in loggers:
            log.removeFilter(line_filter)


def _job_counts(trainer: pl.Trainer, dm: Any, empty_here: int) -> tuple[int, int]:
    """This run's chips and, among them, the empty ones, over every process of the job.

    The data module's chip list is the whole job's (less the chips resumed); each process's
    writers count the empty chips it embedded, summed over the processes (a collective call:
    every process makes it, right after ``predict``). With fewer chips than processes the data
    module repeats chips, and Lightning's distributed sampler then gives process ``r`` exactly
    chip ``r``: the processes from ``len(chips)`` on only hold repeats and count nothing.
    """
    import torch

    done = len(dm.predict_sampler or []) - dm.skipped
    if trainer.world_size == 1:
        return done, empty_here
    if done < trainer.world_size and trainer.global_rank >= done:
        empty_here = 0
    total = torch.tensor([float(empty_here)], device=trainer.strategy.root_device)
    total = trainer.strategy.reduce(total, reduce_op="sum")
    return done, min(done, int(total.item()))


def _check_rendezvous(trainer: pl.Trainer) -> None:
    """Refuse a ``MASTER_PORT`` / ``MASTER_ADDR`` the trainer's processes cannot meet at.

    For a distributed strategy (DDP, FSDP, DeepSpeed: Lightning's ``ParallelStrategy``) of a
    config's trainer, whose process count is only known once Lightning has resolved
    ``devices`` and ``num_nodes``: see :func:`.locks.master_port_problem` and
    :func:`.locks.master_addr_problem` (an address of this machine where rank 0 runs here:
    :func:`.locks.rendezvous_here`).

    Raises:
        ValueError: naming the variable and the fix (one line, exit 2), before the run.
    """
    from lightning.pytorch.strategies import ParallelStrategy

    from .locks import master_addr_problem, master_port_problem, rendezvous_here

    if isinstance(trainer.strategy, ParallelStrategy):
        problem = master_port_problem(trainer.num_devices * trainer.num_nodes)
        problem = problem or master_addr_problem(here=rendezvous_here(trainer.num_nodes))
        if problem is not None:
            raise ValueError(problem)


def _device_count(devices: int | str, accelerator: str) -> int:
    """Processes the job runs on this machine.

    ``devices`` as Lightning reads it: a count; ``-1``, ``"-1"`` or ``"auto"`` for every GPU
    (one process on a CPU); or GPU indices ``"0,1"``. PyTorch counts the GPUs where needed.
    """
    known = _known_device_count(devices, accelerator)
    if known is not None:
        return known
    import torch

    return max(1, torch.cuda.device_count())


def _known_device_count(devices: int | str, accelerator: str) -> int | None:
    """:func:`_device_count` where it is known without PyTorch: None for every GPU.

    ``-1`` / ``auto`` devices are one process on the ``cpu`` / ``mps``, every GPU for
    ``cuda`` and for an accelerator not resolved yet (``auto``, ``gpu``: the command line's
    ``--device`` before the libraries load).
    """
    text = str(devices).strip().lower()
    if text in ("auto", "-1"):
        return 1 if accelerator in ("cpu", "mps") else None
    if "," in text or "[" in text:
        return max(1, len([d for d in text.strip("[]").split(",") if d.strip()]))
    return max(1, int(text)) if _DEVICE_COUNT.fullmatch(text) else 1


def _close_progress_bar(trainer: pl.Trainer) -> None:
    """Close the predict progress bar after a failure, so the error starts a line of its own.

    Lightning's TQDM bar (on stdout) is closed in ``on_predict_end`` only; after an error it was
    closed at exit, after the error line, leaving the error glued to the bar's last refresh.
    """
    bar = trainer.progress_bar_callback
    with contextlib.suppress(AttributeError, TypeError):  # no TQDM bar, or not started
        bar.predict_progress_bar.close()  # type: ignore[union-attr]
    sys.stdout.flush()


#: ``time=('2021-01-01', '2021-01-01 23:59:59')`` (a data module's dates) as ``--datetime``.
_TIME_HINT = re.compile(r"\btime=\('(\d{4}-\d{2}-\d{2})[^']*', '(\d{4}-\d{2}-\d{2})[^']*'\)")
#: ``time '2023-13-45/2023-12-01': bad datetime ...`` (the datasets' words) as ``--datetime``.
_TIME_TEXT = re.compile(r"\btime '([^']*)'")
_KWARG_HINT = re.compile(
    r"\b(file_bands|bands|wavelengths|crs|nodata|offset|mean|std|weights|num_workers|"
    r"batch_size|buffer_m|res)="
    r"(\[[^\]]*\]|<[^>]*>|[^\s,;)]*)"
)


def error_line(err: BaseException) -> str:
    """An error's message, without the traceback PyTorch puts in one from a loader worker.

    An error raised while a DataLoader worker reads a chip reaches the main process as the
    same exception type with the text ``Caught InputError in DataLoader worker process 0.
    Original Traceback ...``; its last line holds the original error and message.

    Args:
        err: the error.

    Returns:
        The message to print.
    """
    text = str(err)
    lines = text.strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        last = lines[-1]  # "torchgeo_dofa.datasets.InputError: cannot read ..."
        text = last.split(": ", 1)[1] if ": " in last else last
    return _with_notes(text, err)


def _with_notes(text: str, err: BaseException) -> str:
    """``text`` followed by the error's notes (``add_note``), each in parentheses.

    ``embed`` notes the outputs of the regions finished before a region that failed.

    Args:
        text: the error's message as shown.
        err: the error.

    Returns:
        The line to print.
    """
    return text + "".join(f" ({note})" for note in getattr(err, "__notes__", ()))


def _res_value(text: str) -> float:
    """``--res``: a positive, finite pixel size."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not RES_RANGE[0] <= value <= RES_RANGE[1]:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a pixel size: give a positive number from {RES_RANGE[0]:g} to "
            f"{RES_RANGE[1]:g} in the CRS's units (e.g. --res 10 for 10 m pixels)"
        )
    return value


#: ``--res`` bounds: beyond them the rasters' extent in pixels overflows a float (5e-324
#: gave an OverflowError traceback, 1e308 "cannot convert float NaN to integer").
RES_RANGE = (1e-12, 1e12)


def _offset_value(text: str) -> float | str:
    """``--offset``: a number, or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number or 'auto' (e.g. --offset 0 or --offset -1000)"
        ) from None
    problem = offset_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def _inside_call(message: str, pos: int) -> bool:
    """Whether ``pos`` lies inside the parentheses of a call (``SensorSpec(bands=...)``).

    Parentheses right after a name open a call; others are prose.
    """
    calls: list[bool] = []
    for i, char in enumerate(message[:pos]):
        if char == "(":
            calls.append(i > 0 and (message[i - 1].isalnum() or message[i - 1] == "_"))
        elif char == ")" and calls:
            calls.pop()
    return any(calls)


def cli_hints(message: str) -> str:
    """Rewrite the Python keyword hints of an error (``bands=[...]``) as CLI options.

    Keywords inside a Python call shown as an example (``DOFAPreprocess(bands=[...])``) stay
    as they are: that is Python code, for Python users.

    Args:
        message: an error message from the datasets, transforms or data module.

    Returns:
        The message naming ``--bands B4 B3``, ``--file-bands ...``, ``--wavelengths ...``,
        ``--nodata ...``, ``--offset ...`` instead.
    """

    def option(match: re.Match[str]) -> str:
        if _inside_call(message, match.start()):
            return match[0]
        value = match[2].strip("[]").replace(",", " ").replace("'", "").replace('"', "")
        value = " ".join(value.split())
        flag = "--" + match[1].replace("_", "-")
        return f"{flag} {value}" if value else flag

    message = _TIME_HINT.sub(lambda m: f"--datetime {m[1]}/{m[2]}", message)
    message = _TIME_TEXT.sub(lambda m: f"--datetime {m[1]}", message)
    return _KWARG_HINT.sub(option, message)


#: The keywords every run's hints rewrite: the model's weights, and the loader settings
#: Lightning / TorchGeo data modules share (``fit``'s included).
_ANY_RUNS = ("weights", "num_workers", "batch_size")


def config_hints(message: str, *, data: bool) -> str:
    """Rewrite the Python keyword hints of an error as a LightningCLI run's overrides.

    ``weights=PATH`` becomes ``--model.init_args.weights PATH`` (the tasks' and the
    embedder's argument); with ``data`` (a ``predict`` run, whose data module is
    :class:`~torchgeo_dofa.datamodules.DOFAPredictDataModule`) ``file_bands=[B1, B2]`` becomes
    ``--data.init_args.file_bands '[B1, B2]'`` (and ``bands``, ``wavelengths``, ``crs``,
    ``nodata``, ``offset``, ``mean``, ``std``, ``time``); ``num_workers`` and ``batch_size``,
    which every Lightning / TorchGeo data module takes, whatever the run. Keywords inside a
    Python call shown as an example stay as they are.

    Args:
        message: an error message from the datasets, transforms, data module or weights.
        data: whether the data module takes the datasets' arguments.

    Returns:
        The message naming the overrides.
    """

    def option(match: re.Match[str]) -> str:
        key, value = match[1], match[2]
        if _inside_call(message, match.start()) or (key not in _ANY_RUNS and not data):
            return match[0]
        flag = "--model.init_args.weights" if key == "weights" else f"--data.init_args.{key}"
        if value.startswith("["):  # a Python list's repr: ['B2']
            value = value.replace("'", "").replace('"', "")
        if not value:  # "leave out file_bands="
            return flag
        return f"{flag} '{value}'" if value.startswith("[") else f"{flag} {value}"

    if data:
        message = _TIME_HINT.sub(lambda m: f"--data.init_args.time {m[1]}/{m[2]}", message)
    return _KWARG_HINT.sub(option, message)


def __getattr__(name: str) -> Any:
    """``InputError`` (in ``__all__``), imported when asked for: the module loads no torch."""
    if name == "InputError":
        from .datasets import InputError

        return InputError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":  # python -m torchgeo_dofa.cli: as the torchgeo-dofa command
    from torchgeo_dofa.__main__ import main as command

    sys.exit(command())
