"""Helpers for ``benchmarks/run.py``: the machine, matmul peaks, model FLOPs, timing, scenes."""

from __future__ import annotations

import math
import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchgeo_dofa.model import DOFAEncoder, cpu_has_fast_bf16

REPO = Path(__file__).resolve().parents[1]
DEMO_SCENE = REPO / "demo" / "data" / "ftw_s2_l2a_33N.tif"
#: The demo scene's bands (B04, B03, B02, B08) as wavelengths in micrometres.
DEMO_WAVELENGTHS = [0.665, 0.56, 0.49, 0.842]
_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "amx_tile")


@dataclass
class Machine:
    """What the numbers were measured on."""

    cpu: str
    flags: dict[str, bool]
    logical_cpus: int
    torch_threads: int
    torch_version: str
    torchgeo_version: str
    fast_bf16: bool
    loadavg: tuple[float, float, float]

    def lines(self) -> list[str]:
        """Human-readable description."""
        flags = " ".join(f"{k}{'+' if v else '-'}" for k, v in self.flags.items())
        return [
            f"CPU: {self.cpu} ({self.logical_cpus} logical CPUs, torch threads "
            f"{self.torch_threads}); flags: {flags}",
            f"torch {self.torch_version}, torchgeo {self.torchgeo_version}, python "
            f"{platform.python_version()}; fast bf16 kernels (oneDNN): {self.fast_bf16}",
            "load average at start: " + ", ".join(f"{v:.2f}" for v in self.loadavg),
        ]


def machine() -> Machine:
    """Describe this machine from /proc/cpuinfo and torch."""
    import torchgeo

    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return Machine(
        cpu=cpu,
        flags={f: f in flags for f in _FLAGS},
        logical_cpus=os.cpu_count() or 1,
        torch_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        torchgeo_version=torchgeo.__version__,
        fast_bf16=cpu_has_fast_bf16(),
        loadavg=os.getloadavg(),
    )


def matmul_peak(dtype: torch.dtype, n: int, repeats: int, max_s: float = 4.0) -> tuple[float, str]:
    """Best matrix-multiply rate (GFLOP/s) for square ``n`` x ``n`` operands.

    Both layouts are timed, ``a @ b`` and ``a @ b.T`` (the one ``nn.Linear`` uses), since
    some bf16 CPU kernels differ by 10x between them; best-of-``repeats`` each, a layout
    stopping early once it has used ``max_s`` seconds.

    Returns:
        (GFLOP/s, the layout that gave it).
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    flops = 2.0 * n**3
    best: tuple[float, str] = (0.0, "")
    for name, fn in (("a@b", lambda: a @ b), ("a@b.T", lambda: a @ b.T)):
        spent, times = 0.0, []
        with torch.inference_mode():
            fn()  # warm-up
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
                spent += times[-1]
                if spent > max_s:
                    break
        rate = flops / min(times) / 1e9
        if rate > best[0]:
            best = (rate, name)
    return best


def attention_flops(tokens: int, dim: int, depth: int) -> float:
    """FLOPs of the attention products (QK^T and AV) per image, which FlopCounterMode misses.

    ``torch.utils.flop_counter`` has no formula for the CPU flash-attention kernel, so these
    2 x (2 N^2 D) FLOPs per block are added analytically.
    """
    return depth * 2 * (2.0 * tokens * tokens * dim)


def model_flops(
    encoder: DOFAEncoder, channels: int, wavelengths: Sequence[float]
) -> tuple[float, float]:
    """Model FLOPs of one encoder forward: (per image, per forward independent of batch).

    Counted with ``FlopCounterMode`` at batch 1 and 2 (linears, the patch conv, the
    wavelength weight generator), with the patch-weight cache off so the weight generator
    counts as model work, plus the attention products analytically.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    cache = encoder.cache_patch_weights
    encoder.cache_patch_weights = False
    try:
        for b in (1, 2):
            x = torch.randn(b, channels, 224, 224)
            with torch.inference_mode(), FlopCounterMode(display=False) as counter:
                encoder(x, wavelengths)
            counts.append(float(counter.get_total_flops()))
    finally:
        encoder.cache_patch_weights = cache
    cfg = encoder.config
    per_image = counts[1] - counts[0]
    fixed = counts[0] - per_image
    per_image += attention_flops(cfg.grid_size**2 + 1, cfg.embed_dim, cfg.depth)
    return per_image, fixed


#: The CLI's summary line (``cli.EmbedSummary.line``): "embedded 1 chip in 1.4 s (...)",
#: "embedded 246 more chips, 3 of them without valid pixels (10 already done) in 12.0 s (...)".
_JOB_LINE = re.compile(r"embedded \d+(?: more)? chips?\b[^\n]*? in ([\d.]+) s \(")


def cli_job_seconds(output: str) -> float:
    """The job's own time in seconds, from the ``torchgeo-dofa embed`` summary line.

    Args:
        output: the CLI's stdout and stderr.

    Returns:
        The seconds the line reports (Python's imports are not in them).

    Raises:
        ValueError: if ``output`` holds no summary line (its end is quoted).
    """
    said = _JOB_LINE.search(output)
    if said is None:
        raise ValueError(f"no 'embedded N chips in X s' line in the CLI output:\n{output[-3000:]}")
    return float(said.group(1))


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


JITTER = 0.02
"""Per-pixel multiplicative noise (+-2 %) on every mirror-tiled copy of the demo scene.

Without it, a scene tiled from a 224 x 224 crop holds four distinct chips (the crop and its
mirror images), so every chip's embedding is one of four, and the grid GeoTIFF compresses
~10x better than real output does (256 chips, bf16: 3.6 MB instead of 35 MB), which hid
most of its write and read-back time. Real Sentinel-2 L2A varies by a few per cent from
pixel to pixel in homogeneous fields; the value range and no-data pixels are kept.
"""


def write_scene(
    path: Path,
    tiles: tuple[int, int],
    crop: tuple[int, int] | None = None,
    compress: str = "deflate",
) -> Path:
    """Write a larger synthetic scene by mirror-tiling the demo scene (see :func:`_demo_tiled`).

    Georeferencing, band descriptions, nodata and the GeoTIFF layout (tiled, 256-pixel
    blocks) are kept; ``compress`` is GDAL's codec (``deflate``, ``zstd``, ``lzw``, ...;
    ``none``: uncompressed), without a predictor.
    """
    import rasterio

    big, profile, descriptions = _demo_tiled(tiles, crop)
    profile["compress"] = compress
    with rasterio.open(DEMO_SCENE) as src:
        tags = src.tags()
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(big)
        for i, name in enumerate(descriptions, start=1):
            if name:
                dst.set_band_description(i, name)
        dst.update_tags(
            **tags,
            benchmark=f"demo scene mirror-tiled {tiles[0]}x{tiles[1]}, +-{JITTER:.0%} noise",
        )
    return path


def _demo_tiled(tiles: tuple[int, int], crop: tuple[int, int] | None) -> tuple[Any, Any, Any]:
    """The demo scene mirror-tiled: (array, profile, descriptions).

    The demo array (optionally cropped to ``crop`` = (rows, cols) first) is reflected
    (``np.pad`` "symmetric") to ``tiles`` = (rows, cols) times its size, so the scene stays
    real-looking reflectance without seams, then every valid pixel is scaled by a seeded
    factor in ``1 +- JITTER`` (rounded, kept within 1 .. the dtype's maximum) so that no two
    chips are identical (see :data:`JITTER`). No-data pixels stay no-data.
    """
    import rasterio

    with rasterio.open(DEMO_SCENE) as src:
        data = src.read()
        profile = src.profile
        descriptions = src.descriptions
    if crop is not None:
        data = data[:, : crop[0], : crop[1]]
    _, h, w = data.shape
    big = np.pad(data, ((0, 0), (0, h * (tiles[0] - 1)), (0, w * (tiles[1] - 1))), "symmetric")
    shape = tuple(int(n) for n in big.shape)
    noisy = np.random.default_rng(0).random(shape, dtype=np.float32)
    noisy *= 2 * JITTER  # in place: a 64x benchmark scene is ~0.9 GB as float32
    noisy += 1 - JITTER
    noisy *= big
    top = float(np.iinfo(big.dtype).max) if big.dtype.kind in "iu" else math.inf
    np.rint(noisy, out=noisy)
    np.clip(noisy, 1.0, top, out=noisy)
    nodata = profile.get("nodata")
    valid = big != nodata if nodata is not None else np.ones(big.shape, bool)
    big[valid] = noisy[valid]
    profile.update(height=big.shape[1], width=big.shape[2])
    return big, profile, descriptions


def write_band_files(
    folder: Path,
    size: int,
    driver: str = "JP2OpenJPEG",
    block: int = 1024,
) -> list[Path]:
    """Write the demo scene as ESA-style per-band files (one file a band), e.g. JPEG2000.

    The scene is mirror-tiled to at least ``size`` x ``size`` pixels and cropped to it, then
    each band is written as ``T33UXP_20210601T100559_<band>_10m.<ext>``, the layout of a
    Sentinel-2 ``.SAFE`` product's ``IMG_DATA`` (lossless JPEG2000 in ``block`` x ``block``
    code-stream tiles, as ESA ships it; or tiled deflate GeoTIFF).

    Returns:
        The files, in band order.
    """
    import rasterio

    with rasterio.open(DEMO_SCENE) as src:
        unit = (src.height, src.width)
    tiles = (math.ceil(size / unit[0]), math.ceil(size / unit[1]))
    big, profile, descriptions = _demo_tiled(tiles, None)
    big = big[:, :size, :size]
    folder.mkdir(parents=True, exist_ok=True)
    ext = "jp2" if driver == "JP2OpenJPEG" else "tif"
    options: dict[str, Any] = (
        {"reversible": "YES", "quality": 100, "blockxsize": block, "blockysize": block}
        if driver == "JP2OpenJPEG"
        else {"tiled": True, "blockxsize": min(block, 512), "blockysize": min(block, 512)}
    )
    out = []
    for i, name in enumerate(descriptions):
        band = str(name or f"B{i + 1}").upper()
        if len(band) == 2:  # ESA spells B4 as B04
            band = f"B0{band[1]}"
        path = folder / f"T33UXP_20210601T100559_{band}_10m.{ext}"
        single = {
            "driver": driver,
            "width": size,
            "height": size,
            "count": 1,
            "dtype": profile["dtype"],
            "crs": profile["crs"],
            "transform": profile["transform"],
            "nodata": profile.get("nodata"),
            **options,
        }
        if driver != "JP2OpenJPEG":
            single["compress"] = "deflate"
        with rasterio.open(path, "w", **single) as dst:
            dst.write(big[i], 1)
        out.append(path)
    return out
