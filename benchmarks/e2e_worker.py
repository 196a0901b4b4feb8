"""One end-to-end embed job in a fresh process: timings and peak RSS as a JSON line.

``python benchmarks/e2e_worker.py SCENE OUT_DIR --batch-size 8 --precision 32
--wavelengths 0.665 0.56 0.49 0.842 [--num-workers N] [--encoder-reps 2]`` runs
:func:`torchgeo_dofa.cli.embed` (random weights, grid output, CPU) and prints
``RESULT {...}`` with:

- ``chips``, ``job_s`` (the ``embed`` call: indexing, predict, finalize; the model is built
  before it, see below);
- the predict loop split up: ``loop_s`` (epoch start to epoch end, writers' finalize
  included), ``compute_s`` (sum of ``predict_step``), ``load_s`` (waiting for the
  DataLoader), ``write_s`` (per-batch writer callbacks), ``finalize_s``;
- ``steady_chips_per_s``: chips after the first batch over the time after it (warm-up
  excluded, as in the encoder-only numbers); ``loop_chips_per_s``: all chips over the loop;
- ``encoder_only_img_per_s``: the job's own encoder on random input of the same batch size,
  precision and band set, ``--encoder-reps`` batches timed just before the job and as many
  just after it (their mean brackets the job in time, so load changes on a shared machine
  mostly cancel); ``encoder_only_before`` / ``encoder_only_after`` separately;
- ``rss_start_mb`` (after imports), ``vm_hwm_mb`` (peak RSS of the job: the peak is reset
  through ``/proc/self/clear_refs`` after the "before" timing and read before the "after"
  one) and ``ru_maxrss_mb`` (peak of the whole process, not resettable);
- ``output_mb``: size of the grid GeoTIFF; ``grid_array_mb``: what holding the whole output
  grid in memory as float32 would take.

``--stub-encoder`` swaps the encoder's forward for a near-free stub with the same output
shapes, so regions large enough to show how the data path and the writers scale with
region size can be run in seconds (the model's own memory does not depend on the region).

The embedder is built before the job (so the "before" timing can use it) and handed to
``embed`` in place of the one it would build; everything else is ``embed`` as users run it,
with Python's cyclic collector as the ``torchgeo-dofa`` command sets it (paused while the
libraries load, their objects then frozen), and its OpenMP and allocator settings
(``torchgeo_dofa.__main__``).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _stub(encoder: Any) -> None:
    """Make ``encoder`` return right-shaped outputs derived from the input, at no cost."""
    import torch

    from torchgeo_dofa.model import DOFAOutput, grid_side

    d = encoder.embed_dim

    def forward(x: torch.Tensor, wavelengths: Any, pooled_norm: str | None = None) -> Any:
        h, w = grid_side(x.shape[-2]), grid_side(x.shape[-1])
        cells = torch.nn.functional.adaptive_avg_pool2d(x.mean(1, keepdim=True), (h, w))
        grid = cells.expand(-1, d, -1, -1) + torch.linspace(0, 1, d).view(1, d, 1, 1)
        return DOFAOutput(grid.mean((2, 3)), grid.contiguous(), pooled_norm or "trained")

    encoder.forward = forward


def _encoder_only(encoder: Any, args: argparse.Namespace, reps: int) -> float:
    """Images/s of ``reps`` encoder forwards at the job's batch size, precision, band set."""
    import torch

    if reps <= 0:
        return float("nan")

    waves = torch.tensor(args.wavelengths)
    x = torch.randn(args.batch_size, len(args.wavelengths), 224, 224)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision != "32")
    with torch.inference_mode(), bf16:
        t = time.perf_counter()
        for _ in range(reps):
            encoder(x, waves)
        return reps * args.batch_size / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("scene")
    parser.add_argument("out_dir")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="32")
    parser.add_argument("--variant", default="base")
    parser.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="DataLoader workers (default: the embed job's, runtime.default_num_workers())",
    )
    parser.add_argument("--wavelengths", type=float, nargs="+", required=True)
    parser.add_argument("--encoder-reps", type=int, default=2)
    parser.add_argument(
        "--stub-encoder",
        action="store_true",
        help="replace the encoder's forward by a cheap stub (data path and writers only)",
    )
    args = parser.parse_args()

    from torchgeo_dofa.__main__ import apply_malloc_defaults, apply_openmp_defaults

    apply_openmp_defaults()  # the torchgeo-dofa command's OpenMP settings, before torch loads
    apply_malloc_defaults()  # and its allocator's (TORCHGEO_DOFA_MALLOPT=0: glibc's own)
    gc.disable()  # as the command loads its libraries (torchgeo_dofa.__main__.run_as_command)
    import lightning.pytorch as pl
    import rasterio
    import torch

    import torchgeo_dofa.cli as cli
    import torchgeo_dofa.embedder as embedder_module
    from torchgeo_dofa.embedder import DOFAEmbedder

    gc.freeze()  # and then runs its job with their objects frozen (end_import_pause)
    gc.enable()

    rss_start = _status_mb("VmRSS")
    module = DOFAEmbedder(variant=args.variant, weights=None, output="grid")
    if args.stub_encoder:
        _stub(module.encoder)
        args.encoder_reps = 0

    def prebuilt(**kwargs: Any) -> DOFAEmbedder:
        assert kwargs.get("weights") is None and kwargs.get("output") == "grid", kwargs
        return module

    embedder_module.DOFAEmbedder = prebuilt  # type: ignore[assignment,misc]  # embed() imports it

    stamps: dict[str, Any] = {"steps": [], "batch_start": [], "batch_end": [], "sizes": []}
    original_step = DOFAEmbedder.predict_step

    def timed_step(self: DOFAEmbedder, batch: dict[str, torch.Tensor], batch_idx: int) -> Any:
        t = time.perf_counter()
        out = original_step(self, batch, batch_idx)
        stamps["steps"].append((t, time.perf_counter()))
        stamps["sizes"].append(int(batch["image"].shape[0]))
        return out

    DOFAEmbedder.predict_step = timed_step  # type: ignore[method-assign]

    class Clock(pl.Callback):
        """Timestamps around the predict loop (runs after the writers' hooks)."""

        def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            stamps["epoch_start"] = time.perf_counter()

        def on_predict_batch_start(self, *a: Any, **k: Any) -> None:
            stamps["batch_start"].append(time.perf_counter())

        def on_predict_batch_end(self, *a: Any, **k: Any) -> None:
            stamps["batch_end"].append(time.perf_counter())

        def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
            stamps["epoch_end"] = time.perf_counter()

    # encoder-only just before the job (after a batch-1 warm-up)
    module.eval()
    warm = argparse.Namespace(**{**vars(args), "batch_size": 1})
    _encoder_only(module.encoder, warm, 1)
    before = _encoder_only(module.encoder, args, args.encoder_reps)
    reset = _reset_peak_rss()

    if args.num_workers is None:
        from torchgeo_dofa.runtime import default_num_workers

        args.num_workers = default_num_workers()
    out_dir = Path(args.out_dir)
    summary = cli.embed(
        [args.scene],
        out_dir,
        variant=args.variant,
        output="grid",
        weights=None,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device="cpu",
        precision=args.precision,
        progress=False,
        callbacks=[Clock()],
    )
    vm_hwm = _status_mb("VmHWM")
    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    after = _encoder_only(module.encoder, args, args.encoder_reps)

    starts, ends, steps = stamps["batch_start"], stamps["batch_end"], stamps["steps"]
    compute = sum(b - a for a, b in steps)
    write = sum(e - s[1] for e, s in zip(ends, steps, strict=True))
    load = sum(s - e for s, e in zip(starts, [stamps["epoch_start"], *ends[:-1]], strict=True))
    later = sum(stamps["sizes"][1:])
    steady = later / (stamps["epoch_end"] - ends[0]) if later else float("nan")
    loop = stamps["epoch_end"] - stamps["epoch_start"]
    grid = out_dir / f"{Path(args.scene).stem}_grid.tif"
    with rasterio.open(grid) as src:
        grid_array_mb = src.count * src.height * src.width * 4 / 2**20
    result = {
        "chips": summary.chips,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "num_workers": args.num_workers,
        "stub_encoder": args.stub_encoder,
        "job_s": summary.seconds,
        "loop_s": loop,
        "compute_s": compute,
        "load_s": load,
        "write_s": write,
        "finalize_s": stamps["epoch_end"] - ends[-1],
        "steady_chips_per_s": steady,
        "loop_chips_per_s": summary.chips / loop,
        "compute_chips_per_s": summary.chips / compute,
        "encoder_only_before": before,
        "encoder_only_after": after,
        "encoder_only_img_per_s": 2 / (1 / before + 1 / after) if before == before else before,
        "rss_start_mb": rss_start,
        "vm_hwm_mb": vm_hwm,
        "peak_reset": reset,
        "ru_maxrss_mb": ru_maxrss,
        "output_mb": grid.stat().st_size / 2**20,
        "grid_array_mb": grid_array_mb,
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
