"""Preview of a grid embedding: its first three principal components as RGB, beside the input."""

from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.errors
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.transform import from_bounds as transform_from_bounds
from rasterio.vrt import WarpedVRT

from .bands import canonical_band, split_date_copy
from .locks import refuse_undecodable_name

__all__ = [
    "PREVIEW_FORMATS",
    "PreviewWriteError",
    "pca_rgb",
    "render_preview",
    "rgb_bands",
    "rgb_of_raster",
    "rgb_of_sources",
]

#: Height (px) of the caption strip under a preview of a grid made with random weights
#: (its ``weights`` tag ``random (seed N)``): its PCA panel shows the untrained model's
#: position-embedding patterns, which could be taken for a result.
CAPTION_PX = 14

#: The caption strip's colour.
CAPTION_RGB = (200, 0, 0)

#: Image files the preview writes, by extension (Pillow writes others too, e.g. a TIFF, which
#: a user could take for a GeoTIFF: it would have no georeferencing).
PREVIEW_FORMATS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")


def pca_rgb(embedding: np.ndarray) -> np.ndarray:
    """Project a (D, H, W) embedding onto its first three principal components, as uint8 RGB.

    NaN cells (no data) become black. Each component is stretched between its 2nd and 98th
    percentiles.

    Args:
        embedding: (D, H, W) array.

    Returns:
        (H, W, 3) uint8 image.
    """
    d, h, w = embedding.shape
    flat = embedding.reshape(d, -1).T.astype(np.float64)
    ok = np.isfinite(flat).all(axis=1)
    rgb = np.zeros((h * w, 3), np.uint8)
    if ok.sum() >= 2:
        x = flat[ok] - flat[ok].mean(axis=0)
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        comps = x @ vt[: min(3, vt.shape[0])].T
        if comps.shape[1] < 3:
            comps = np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))
        rgb[ok] = _stretch(comps)
    return rgb.reshape(h, w, 3)


def _stretch(values: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(values, [2, 98], axis=0)
    scaled = (values - lo) / np.where(hi > lo, hi - lo, 1.0)
    return np.asarray(np.clip(scaled * 255, 0, 255).astype(np.uint8))


def rgb_of_raster(
    path: str | Path,
    height: int,
    width: int,
    bounds: tuple[float, float, float, float] | None = None,
    crs: CRS | None = None,
) -> np.ndarray:
    """An RGB rendering of a reflectance raster (B4, B3, B2 by description, else bands 1-3).

    Args:
        path: the input raster.
        height: output height in pixels.
        width: output width in pixels.
        bounds: (left, bottom, right, top) extent to render, in ``crs`` (default: the whole
            raster); outside the raster is black.
        crs: the CRS of ``bounds`` (default: the raster's; another is warped to).

    Returns:
        (height, width, 3) uint8 image, percentile-stretched (:func:`rgb_of_sources`).
    """
    with rasterio.open(path) as src:
        names = [canonical_band(d) if d else "" for d in src.descriptions]
        if all(b in names for b in ("B4", "B3", "B2")):
            idx = [names.index(b) + 1 for b in ("B4", "B3", "B2")]
        else:
            idx = [1, 2, 3] if src.count >= 3 else [1, 1, 1]
        extent = bounds if bounds is not None else tuple(src.bounds)
    return rgb_of_sources([str(path)], [idx], [0, 1, 2], height, width, extent, crs)


def rgb_bands(bands: list[str]) -> list[int]:
    """Which of the embedded ``bands`` the input panel shows as red, green and blue.

    Args:
        bands: the grid's ``bands`` tag (``B4``, ``B4_1`` for Earth Engine's second date ...).

    Returns:
        Three positions in ``bands``: B4, B3 and B2 of the first date holding all three (in
        the order of ``bands``: ``B4_1``, ``B3_1``, ``B2_1`` where only the second date was
        embedded), else the first three bands (false colour; the first band as grey where
        there are fewer than three).
    """
    split = [split_date_copy(b) for b in bands]
    for _, suffix in split:
        want = [(name, suffix) for name in ("B4", "B3", "B2")]
        if all(w in split for w in want):
            return [split.index(w) for w in want]
    if len(bands) < 3:
        return [0, 0, 0]
    return [0, 1, 2]


def rgb_of_sources(
    sources: list[str],
    source_bands: list[list[int]],
    positions: list[int],
    height: int,
    width: int,
    bounds: tuple[float, float, float, float],
    crs: CRS | None,
) -> np.ndarray:
    """An RGB rendering of the bands a grid embedded, from the files its job read.

    Each of the three bands is read from every source that holds it (``source_bands``, as
    :meth:`~torchgeo_dofa.datamodules.DOFAPredictDataModule.output_tags` records them), the
    first source's valid pixels first and the gaps filled from the next (TorchGeo's mosaic
    order): per-band files, the tiles of a region, one date of a multi-date stack.

    Args:
        sources: the files (the grid's ``sources`` tag).
        source_bands: per source, its band (from 1; 0: not there) for each embedded band.
        positions: the embedded bands to show as red, green, blue (:func:`rgb_bands`).
        height: output height in pixels.
        width: output width in pixels.
        bounds: (left, bottom, right, top) of the grid, in ``crs``.
        crs: the grid's CRS (files in another CRS are warped to it); None: the files'.

    Returns:
        (height, width, 3) uint8 image, percentile-stretched; black where no source has a
        valid pixel (no data, 0, or outside every file).

    Raises:
        rasterio.errors.RasterioIOError: if a source cannot be read.
    """
    data = np.full((3, height, width), np.nan)
    for path, reads in zip(sources, source_bands, strict=True):
        wanted = [(k, reads[p]) for k, p in enumerate(positions) if reads[p] > 0]
        if not wanted:
            continue
        with rasterio.open(path) as src:
            # warped onto the panel's pixels (the grid's bounds and CRS): a file in another
            # CRS, or covering part of the grid, lands where it lies
            with WarpedVRT(
                src,
                crs=crs or src.crs,
                transform=transform_from_bounds(*bounds, width, height),
                width=width,
                height=height,
                resampling=Resampling.average,
            ) as view:
                got = view.read([band for _, band in wanted]).astype(np.float64)
                if src.nodata is not None:
                    got[got == src.nodata] = np.nan
        got[got == 0] = np.nan  # Sentinel-2's fill (and outside the file)
        for (k, _), values in zip(wanted, got, strict=True):
            gap = np.isnan(data[k])
            data[k][gap] = values[gap]
    flat = data.reshape(3, -1).T
    ok = np.isfinite(flat).all(axis=1)
    rgb = np.zeros_like(flat, dtype=np.uint8)
    if ok.any():
        rgb[ok] = _stretch(flat[ok])
    return rgb.reshape(height, width, 3)


def _source_bands(tags: dict[str, str], sources: list[str]) -> list[list[int]] | None:
    """The grid's ``source_bands`` tag, where it matches ``sources`` and ``bands``."""
    try:
        reads = json.loads(tags["source_bands"])
        count = len(json.loads(tags["bands"]))
    except (KeyError, ValueError):  # a grid of an earlier release: no such tag
        return None
    shaped = isinstance(reads, list) and len(reads) == len(sources)
    if not shaped or not all(
        isinstance(r, list) and len(r) == count and all(isinstance(b, int) for b in r)
        for r in reads
    ):
        return None
    return reads


def _source_stats(tags: dict[str, str], sources: list[str]) -> list[list[int] | None]:
    """The grid's ``source_stats`` tag (``[size, mtime_ns]`` per source), else Nones."""
    unknown: list[list[int] | None] = [None] * len(sources)
    try:
        stats = json.loads(tags["source_stats"])
    except (KeyError, ValueError):  # a grid of an earlier release: no such tag
        return unknown
    if not isinstance(stats, list) or len(stats) != len(sources):
        return unknown
    return [
        s if isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) for v in s) else None
        for s in stats
    ]


def _utc(mtime_ns: int) -> str:
    """A modification time as ISO 8601 UTC, to the second."""
    moment = datetime.fromtimestamp(mtime_ns / 1e9, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _rewritten(sources: list[str], stats: list[list[int] | None]) -> str | None:
    """What differs of the first source whose size or mtime is not the recorded one."""
    changed = []
    for path, recorded in zip(sources, stats, strict=True):
        if recorded is None:
            continue
        stat = os.stat(path)
        if [stat.st_size, stat.st_mtime_ns] != recorded:
            changed.append((path, recorded, stat))
    if not changed:
        return None
    path, (size, mtime_ns), stat = changed[0]
    more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
    return (
        f"{path}{more}, changed since the embedding was made (now {stat.st_size} bytes, "
        f"modified {_utc(stat.st_mtime_ns)}; it was {size} bytes, modified {_utc(mtime_ns)})"
    )


def render_preview(embedding_tif: str | Path, out_png: str | Path, cell_px: int = 8) -> Path:
    """Write a PNG: the input's RGB (left) beside the embedding's PCA colours (right).

    The input panel shows the bands the grid embedded (its ``bands`` tag: B4, B3, B2 of the
    date embedded, else the first three), read from the files its ``sources`` and
    ``source_bands`` tags name (:func:`rgb_of_sources`; a grid of an earlier release, without
    ``source_bands``: the first source's B4, B3, B2 by description, else its bands 1-3). Where
    a source is missing or unreadable, only the PCA panel is drawn, with a ``UserWarning``
    saying why (and one for a grid without any valid cell, whose PCA panel is black); a
    source whose size or modification time is not the one its ``source_stats`` tag recorded
    (the file was rewritten after the job) is drawn with a ``UserWarning`` saying so.

    A grid made with random weights (its ``weights`` tag ``random (seed N)``, as ``make demo``
    offline writes) gets a red caption strip under the panels saying so
    (:data:`CAPTION_PX` high). A PNG carries the grid's provenance as text chunks:
    ``Software``, ``Source`` (the grid), ``weights`` (its tag) and ``Description``.

    Args:
        embedding_tif: a grid embedding GeoTIFF written by
            :class:`~torchgeo_dofa.writers.GridWriter`.
        out_png: output PNG path.
        cell_px: screen pixels per embedding cell.

    Returns:
        The PNG path.

    Raises:
        ValueError: (checked before anything is read or written) if ``out_png`` is not a
            PNG, JPEG or WebP file name or is the embedding itself; if either path is not
            valid UTF-8; if ``embedding_tif``
            is a pooled table, cannot be read as a raster or is not a grid embedding (its
            bands are not named ``dofa_0000``, ``dofa_0001`` ..., as the grid writer names
            them); if its cells cannot be read (a truncated or corrupt file), after the
            checks above.
        PreviewWriteError: (an ``OSError``) if the image cannot be written, naming ``out_png``.
    """
    out = Path(out_png)
    if not str(out_png).strip() or out.suffix.lower() not in PREVIEW_FORMATS:
        example = out.with_suffix(".png") if out.name else Path("preview.png")
        raise ValueError(
            f"-o {str(out_png)!r}: give an image file name ending in "
            f"{' / '.join(PREVIEW_FORMATS)}, e.g. {example}"
        )
    if not str(embedding_tif).strip():
        raise ValueError("the embedding is an empty string: give a *_grid.tif")
    for path, what in ((embedding_tif, "the embedding"), (out, "-o")):
        refuse_undecodable_name(path, what)
    if Path(embedding_tif).resolve() == out.resolve():
        raise ValueError(f"-o {out} is the embedding itself: give another file name")
    hint = "give a *_grid.tif written by torchgeo-dofa embed --output grid or both"
    if Path(embedding_tif).suffix.lower() in (".parquet", ".geoparquet"):
        raise ValueError(
            f"{embedding_tif} is a pooled table (one vector per chip, no map to draw): {hint}"
        )
    try:
        with warnings.catch_warnings():  # a plain image: refused below, no warning first
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            src = rasterio.open(embedding_tif)
    except rasterio.errors.RasterioIOError as err:
        raise ValueError(f"cannot read {embedding_tif} as a raster ({err}): {hint}") from None
    with src:
        if src.descriptions != tuple(f"dofa_{i:04d}" for i in range(src.count)):
            raise ValueError(
                f"{embedding_tif} is not a grid embedding, or a damaged one (its bands are not "
                f"named dofa_0000 ...): {hint}"
            )
        try:
            emb = src.read()
        except rasterio.errors.RasterioIOError as err:  # GDAL's text alone: "Read failed."
            cause = f": {err.__cause__}" if err.__cause__ else ""
            raise ValueError(
                f"{embedding_tif} is damaged: its cells cannot be read (truncated or corrupt "
                f"file?{cause}): run the embed job again to write it (--overwrite)"
            ) from None
        tags = src.tags()
        bounds = tuple(src.bounds)
        grid_crs = src.crs
    h, w = emb.shape[1:]
    if not np.isfinite(emb).any():
        warnings.warn(
            f"every cell of {embedding_tif} is no data (NaN: no valid input pixel), so its "
            "PCA panel is black",
            UserWarning,
            stacklevel=2,
        )
    panels = [
        Image.fromarray(pca_rgb(emb)).resize((w * cell_px, h * cell_px), Image.Resampling.NEAREST)
    ]
    try:
        sources = json.loads(tags["sources"]) if "sources" in tags else []
    except ValueError:
        sources = None
    if not isinstance(sources, list) or not all(isinstance(p, str) for p in sources):
        sources = []  # damaged: drawn as a grid that names no input
    reads = _source_bands(tags, sources)
    stats = _source_stats(tags, sources)
    positions = rgb_bands(json.loads(tags["bands"])) if reads is not None else []
    if reads is not None:  # only the files holding a band drawn are read
        keep = [i for i, r in enumerate(reads) if any(r[p] for p in positions)]
        sources, reads = [sources[i] for i in keep], [reads[i] for i in keep]
        stats = [stats[i] for i in keep]
    else:
        sources, stats = sources[:1], stats[:1]
    problem = None if sources else f"{embedding_tif} does not name its input (no sources tag)"
    for path in sources:
        if not Path(path).is_file():
            problem = f"the input of {embedding_tif}, {path}, is not found (moved or deleted?)"
            break
        try:
            with rasterio.open(path):
                pass
        except rasterio.errors.RasterioIOError as err:
            problem = f"the input of {embedding_tif}, {path}, cannot be read ({err})"
            break
    rewritten = None if problem is not None else _rewritten(sources, stats)
    if rewritten is not None:  # drawn as it is now, which may not be what was embedded
        warnings.warn(
            f"the input of {embedding_tif}, {rewritten}: its RGB panel shows the file as it "
            "is now, which may not be the pixels embedded (embed it again to match)",
            UserWarning,
            stacklevel=2,
        )
    if problem is None:
        size = (h * cell_px, w * cell_px)
        try:
            if reads is None:  # a grid of an earlier release: in the grid's CRS too
                rgb = rgb_of_raster(sources[0], *size, bounds, grid_crs)
            else:
                rgb = rgb_of_sources(sources, reads, positions, *size, bounds, grid_crs)
        except (rasterio.errors.RasterioIOError, IndexError) as err:  # a damaged block; a
            # source_bands tag naming a band the file has not (edited, or the file replaced)
            problem = f"the input of {embedding_tif} cannot be read ({err})"
        else:
            panels.insert(0, Image.fromarray(rgb))
    if problem is not None:
        warnings.warn(
            f"{problem}: the preview shows the embedding's PCA colours only",
            UserWarning,
            stacklevel=2,
        )
    gap = 8
    weights = tags.get("weights", "")
    random_weights = weights.startswith("random")
    caption = CAPTION_PX if random_weights else 0
    said = f"{weights} weights: not a trained model"
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    if random_weights:  # a narrow preview is widened for the whole caption
        width = max(width, math.ceil(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(said)) + 8)
    canvas = Image.new("RGB", (width, h * cell_px + caption))
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, 0))
        x += panel.width + gap
    if random_weights:  # its PCA panel shows the random model's patterns, not the scene's
        draw = ImageDraw.Draw(canvas)
        draw.rectangle((0, h * cell_px, width, h * cell_px + caption), fill=CAPTION_RGB)
        draw.text((4, h * cell_px + 2), said, fill="white")
    fmt = Image.registered_extensions()[out.suffix.lower()]
    extra: dict[str, Any] = {}
    if fmt == "PNG":  # what was drawn, as the grid's tags say (JPEG / WebP: no text chunks)
        info = PngInfo()
        info.add_text("Software", f"torchgeo-dofa {_version()}")
        info.add_text("Source", str(embedding_tif))
        info.add_text("weights", weights)
        info.add_text("Description", _description(len(panels) == 2, tags))
        extra["pnginfo"] = info
    # through a hidden name, renamed: a Ctrl-C or error while Pillow writes leaves the
    # previous file (Pillow removes its partial file on an Exception only)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        canvas.save(tmp, format=fmt, **extra)
        os.replace(tmp, out)
    except OSError as err:  # it named the hidden file: "Read-only file system: '.p.png.9f...'"
        raise PreviewWriteError(
            f"cannot write {out} ({err.strerror or err}): give -o a file in a folder you can "
            "write to, with free space"
        ) from err
    finally:
        with contextlib.suppress(OSError):  # no folder to remove it from: the error above
            tmp.unlink(missing_ok=True)
    return out


def _version() -> str:
    from . import __version__

    return __version__


def _description(with_input: bool, tags: dict[str, str]) -> str:
    """The PNG's ``Description``: what each panel shows."""
    pca = f"the first 3 principal components of the DOFA {tags.get('variant', '')} embedding"
    pca = " ".join(pca.split())
    if not with_input:
        return f"{pca} (as RGB)"
    return f"left: the input's RGB bands; right: {pca} (as RGB)"


class PreviewWriteError(OSError):
    """The preview could not be written (a read-only or full disk, a folder that is a file).

    The previous file of that name, if any, is kept.
    """
