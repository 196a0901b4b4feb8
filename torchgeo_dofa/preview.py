"""Preview of a grid embedding: its first three principal components as RGB, beside the input."""

from __future__ import annotations

import json
import os
import uuid
import warnings
from pathlib import Path

import numpy as np
import rasterio
import rasterio.errors
from PIL import Image
from rasterio.enums import Resampling
from rasterio.windows import from_bounds

from .bands import canonical_band

__all__ = ["PREVIEW_FORMATS", "pca_rgb", "render_preview", "rgb_of_raster"]

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
) -> np.ndarray:
    """An RGB rendering of a reflectance raster (B4, B3, B2 by description, else bands 1-3).

    Args:
        path: the input raster.
        height: output height in pixels.
        width: output width in pixels.
        bounds: (left, bottom, right, top) extent to render, in the raster's CRS (default:
            the whole raster); outside the raster is black.

    Returns:
        (height, width, 3) uint8 image, percentile-stretched.
    """
    # GDAL's default cache (5 % of the memory), not a one-row scan cache: this read is one
    # call (window, average resampling), and a pixel-interleaved file read in one call under
    # a smaller cache decodes every block once per band (6x slower measured)
    with rasterio.open(path) as src:
        names = [canonical_band(d) if d else "" for d in src.descriptions]
        if all(b in names for b in ("B4", "B3", "B2")):
            idx = [names.index(b) + 1 for b in ("B4", "B3", "B2")]
        else:
            idx = [1, 2, 3] if src.count >= 3 else [1, 1, 1]
        window = from_bounds(*bounds, transform=src.transform) if bounds else None
        data = src.read(
            idx,
            out_shape=(3, height, width),
            window=window,
            boundless=window is not None,
            fill_value=0,
            resampling=Resampling.average,
        )
        data = data.astype(np.float64)
        if src.nodata is not None:
            data[data == src.nodata] = np.nan
    flat = data.reshape(3, -1).T
    ok = np.isfinite(flat).all(axis=1) & (flat > 0).any(axis=1)
    rgb = np.zeros_like(flat, dtype=np.uint8)
    if ok.any():
        rgb[ok] = _stretch(flat[ok])
    return rgb.reshape(height, width, 3)


def render_preview(embedding_tif: str | Path, out_png: str | Path, cell_px: int = 8) -> Path:
    """Write a PNG: the input's RGB (left) beside the embedding's PCA colours (right).

    The input is found through the ``sources`` tag the grid writer stores; when it is missing
    or unreadable, only the PCA panel is drawn, with a ``UserWarning`` saying why (and one
    for a grid without any valid cell, whose PCA panel is black).

    Args:
        embedding_tif: a grid embedding GeoTIFF written by
            :class:`~torchgeo_dofa.writers.GridWriter`.
        out_png: output PNG path.
        cell_px: screen pixels per embedding cell.

    Returns:
        The PNG path.

    Raises:
        ValueError: (checked before anything is read or written) if ``out_png`` is not a
            PNG, JPEG or WebP file name or is the embedding itself; if ``embedding_tif``
            is a pooled table, cannot be read as a raster or is not a grid embedding (its
            bands are not named ``dofa_0000``, ``dofa_0001`` ..., as the grid writer names
            them); if its cells cannot be read (a truncated or corrupt file), after the
            checks above.
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
    sources = json.loads(tags["sources"]) if "sources" in tags else []
    problem = None if sources else f"{embedding_tif} does not name its input (no sources tag)"
    if sources and not Path(sources[0]).is_file():
        problem = f"the input of {embedding_tif}, {sources[0]}, is not found (moved or deleted?)"
    elif sources:
        try:
            rgb = rgb_of_raster(sources[0], h * cell_px, w * cell_px, bounds)
        except rasterio.errors.RasterioIOError as err:
            problem = f"the input of {embedding_tif}, {sources[0]}, cannot be read ({err})"
        else:
            panels.insert(0, Image.fromarray(rgb))
    if problem is not None:
        warnings.warn(
            f"{problem}: the preview shows the embedding's PCA colours only",
            UserWarning,
            stacklevel=2,
        )
    gap = 8
    canvas = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), h * cell_px))
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, 0))
        x += panel.width + gap
    out.parent.mkdir(parents=True, exist_ok=True)
    # through a hidden name, renamed: a Ctrl-C or error while Pillow writes leaves the
    # previous file (Pillow removes its partial file on an Exception only)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    try:
        canvas.save(tmp, format=Image.registered_extensions()[out.suffix.lower()])
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
