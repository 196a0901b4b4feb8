"""GPU benchmark: encoder-only and end-to-end images/s for DOFA base and large, bf16 and fp32.

``python benchmarks/gpu.py`` on a machine with one CUDA GPU (about 3-4 minutes; stops
starting new measurements after ``--budget-s`` seconds, default 200) prints one table:

- encoder only: images/s of this package's encoder (``DOFAEncoder``, bf16 weight copies under
  bf16 autocast) beside TorchGeo's ``DOFA.forward_features`` on the same weights and inputs,
  at batch 32, 64, 128 and 256, fp32 and bf16 autocast, timed with CUDA events after a
  warm-up (best of ``--reps``);
- end to end: ``torchgeo_dofa.cli.embed`` (random weights, pooled output, the GPU) on a
  generated GeoTIFF of ``--chips`` chips (the demo scene mirror-tiled), with
  :mod:`torchgeo_dofa.runtime`'s default loader workers (``--workers 8,14`` tries others):
  **sustained** chips/s, all chips over the trainer's setup (before the loader's workers
  start) to the last batch's end (the GPU synchronised; the writers' assembly after it left
  out), a lower bound of the steady rate since it holds the job's start and the pipeline's
  fill; beside it the rate after the first batch, an upper bound (batches read ahead while
  the first was awaited count as if read in that span: 8 workers hold 16 batches ahead).
  The target, end to end >= 80 % of encoder-only at the best batch, is judged on the
  sustained rate. "waiting for batches" is the share of that span between the loop's start
  or a batch's end and the next batch's start (the loader and the transfer); the log adds
  the time in steps (``predict_step`` and the writers' batch-end hooks) and how long those
  waited for the writers' threads (their ``waited_s``): where the loop's time goes. The
  clock synchronises the GPU at each batch's start and end (``predict_step`` already waits
  for its outputs). A failed configuration (e.g. out of memory) is logged and left out.

``--loader`` adds a table: ``embed``'s prediction loader alone (made as the trainer makes
it, with the chips' preprocessing moved to the GPU as ``embed`` moves it, pinned memory),
iterated once with no model step and no writer, chips/s over the whole pass (its workers'
start included) and after the first batch; and again with each batch copied to the GPU and
preprocessed there. Beside the end-to-end rows it tells a loader-bound job from the rest.
``--compress zstd`` (or ``lzw``, ``none``; default ``deflate``) writes the scene with
another codec: where the loader bounds the job, decoding the input is most of a worker's
time (``benchmarks/run.py --sections read``, codec rows).

Without a GPU it prints ``not run: no GPU`` and exits 0; ``--smoke-cpu`` runs the same code
on the CPU with tiny settings (base only, batch 2, 9 chips) to check that it works.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch

from benchmarks.bench_utils import DEMO_WAVELENGTHS, write_scene
from torchgeo_dofa.model import build_encoder, canonical_variant
from torchgeo_dofa.runtime import default_num_workers

BATCHES = (32, 64, 128, 256)


def log(msg: str) -> None:
    """Progress on stderr."""
    print(f"[gpu-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def best_time(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Best-of-``reps`` seconds of ``fn`` after one warm-up call (CUDA events on a GPU)."""
    fn()
    best = math.inf
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
    return best


def encoder_only(
    variant: str,
    precisions: tuple[str, ...],
    batches: tuple[int, ...],
    device: torch.device,
    reps: int,
    deadline: float,
) -> dict[tuple[str, int], dict[str, float]]:
    """img/s of ours and TorchGeo's forward per (precision, batch)."""
    torch.manual_seed(0)
    enc = build_encoder(variant).eval().to(device)
    tg = enc.backbone
    wl = list(DEMO_WAVELENGTHS)
    out: dict[tuple[str, int], dict[str, float]] = {}
    with torch.inference_mode():
        for prec in precisions:
            for b in batches:
                if time.perf_counter() > deadline:
                    log(f"{variant} {prec} batch {b}: skipped (time budget)")
                    continue
                x = torch.randn(b, len(wl), 224, 224, device=device)
                cast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec == "bf16")

                def ours(x: torch.Tensor = x, cast: Any = cast) -> object:
                    with cast:
                        return enc(x, wl).pooled

                def theirs(x: torch.Tensor = x, cast: Any = cast) -> object:
                    with cast:
                        return tg.forward_features(x, wl)

                try:
                    t_ours = best_time(ours, device, reps)
                    t_tg = best_time(theirs, device, reps)
                except torch.OutOfMemoryError:
                    log(f"{variant} {prec} batch {b}: out of memory")
                    torch.cuda.empty_cache()
                    continue
                out[(prec, b)] = {"ours": b / t_ours, "torchgeo": b / t_tg}
                log(f"{variant} {prec} batch {b}: ours {b / t_ours:.1f}, TorchGeo {b / t_tg:.1f}")
    return out


def _embed(
    scene: Path,
    out: Path,
    variant: str,
    prec: str,
    batch: int,
    workers: int,
    device: str,
    callback: pl.Callback,
) -> None:
    """``cli.embed`` as the benchmark runs it: random weights, pooled output, no bar."""
    from torchgeo_dofa import cli

    cli.embed(
        [scene],
        out,
        variant=variant,
        output="pooled",
        weights=None,
        batch_size=batch,
        num_workers=workers,
        device=device,
        precision="bf16" if prec == "bf16" else "32",
        progress=False,
        callbacks=[callback],
    )


class _Clock(pl.Callback):
    """Times of the predict loop (the GPU synchronised at each mark).

    ``start``: the trainer's setup, before the loader's workers start (Lightning forks them
    before the ``on_predict_start`` hooks, where the writers take the weights' checksum, so
    they read ahead of any later mark); ``end``: the last batch's end, before the writers
    assemble their outputs. ``waiting``: from the loop's start or a batch's end to the next
    batch's start (the loader's next batch and its transfer to the device); ``stepping``: from
    a batch's start to its end (``predict_step`` and the writers' ``write_on_batch_end``, which
    run before this callback's end hook in ``embed``'s trainer); ``writers``: the part of
    ``stepping`` the writers waited for their part-writing threads (their ``waited_s``).
    """

    def __init__(self) -> None:
        self.start = self.first = self.end = self._mark = math.nan
        self.chips = self.first_chips = 0
        self.waiting = self.stepping = self.writers = 0.0

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.start = self._now()

    def on_predict_epoch_start(self, trainer: Any, module: Any) -> None:
        self._mark = self._now()

    def on_predict_batch_start(self, trainer: Any, module: Any, batch: Any, *a: Any) -> None:
        now = self._now()
        self.waiting += now - self._mark
        self._mark = now

    def on_predict_batch_end(
        self, trainer: Any, module: Any, outputs: Any, batch: Any, *a: Any
    ) -> None:
        now = self._now()
        self.stepping += now - self._mark
        self._mark = self.end = now
        self.chips += int(batch["image"].shape[0])
        if self.first != self.first:
            self.first, self.first_chips = now, self.chips

    def on_predict_epoch_end(self, trainer: Any, module: Any) -> None:
        self.writers = sum(float(getattr(cb, "waited_s", 0.0)) for cb in trainer.callbacks)

    def rates(self) -> tuple[float, float]:
        """(sustained, after the first batch) chips/s; NaN where not measurable.

        Sustained: every chip over setup -> last batch's end, a lower bound of the steady
        rate (it holds the job's start); after the first batch: the later chips over the first
        batch's end -> the last's, an upper bound (batches read ahead while the first was
        awaited count as if read in that span). NaN for a job of one batch.
        """
        loop = self.end - self.start
        sustained = self.chips / loop if loop > 0 else math.nan
        span = self.end - self.first
        later = self.chips - self.first_chips
        after = later / span if later > 0 and span > 0 else math.nan
        return sustained, after

    def waiting_share(self) -> float:
        """Share of setup -> last batch's end spent waiting for batches (class docstring)."""
        loop = self.end - self.start
        return self.waiting / loop if loop > 0 else math.nan


def end_to_end(
    variant: str,
    scene: Path,
    configs: list[tuple[str, int, int]],
    device: str,
    tmp: Path,
    deadline: float,
) -> dict[tuple[str, int, int], tuple[float, float, float]]:
    """(sustained chips/s, after-first-batch chips/s, share of the loop waiting for batches)
    of ``cli.embed`` per (precision, batch, workers)."""
    out: dict[tuple[str, int, int], tuple[float, float, float]] = {}
    for prec, b, w in configs:
        if time.perf_counter() > deadline:
            log(f"e2e {variant} {prec} batch {b} workers {w}: skipped (time budget)")
            continue
        clock = _Clock()
        try:
            _embed(scene, tmp / f"e2e_{variant}_{prec}_{b}_{w}", variant, prec, b, w, device, clock)
        except Exception as err:  # e.g. out of memory: the other rows still print
            log(f"e2e {variant} {prec} batch {b} workers {w}: failed: {type(err).__name__}: {err}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        out[(prec, b, w)] = (*clock.rates(), clock.waiting_share())
        log(
            f"e2e {variant} {prec} batch {b} workers {w}: {clock.chips} chips in "
            f"{clock.end - clock.start:.2f} s (setup to last batch), "
            f"sustained {out[(prec, b, w)][0]:.1f} chips/s, "
            f"after the first batch {out[(prec, b, w)][1]:.1f}; waiting for batches "
            f"{clock.waiting:.2f} s, in steps (predict_step + writers) {clock.stepping:.2f} s, "
            f"of which waiting for the writers' threads {clock.writers:.2f} s"
        )
    return out


class _Probed(Exception):
    """Ends a loader probe's job after its measurement (nothing is predicted)."""


class _LoaderProbe(pl.Callback):
    """Times ``embed``'s prediction loader without the model (see :func:`loader_only`).

    At the trainer's setup (the data module set up, the chips' transforms already moved to
    the model's on-device ``preprocess`` on a GPU, no loader made yet) it makes the loader
    as the trainer would (pinned memory on a GPU), iterates it once and raises
    :class:`_Probed`. ``transfer``: each batch is also copied to the model's device
    (``non_blocking``) and preprocessed there, as ``predict_step`` would.
    """

    def __init__(self, transfer: bool) -> None:
        self.transfer = transfer
        self.rates = (math.nan, math.nan)
        self.chips = 0

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        device = pl_module.device if self.transfer else None
        prep = getattr(pl_module, "preprocess", None)
        start = time.perf_counter()
        first = math.nan
        chips = first_chips = 0
        with torch.inference_mode():
            for batch in trainer.datamodule.predict_dataloader():
                if device is not None:
                    batch = {
                        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                        for k, v in batch.items()
                    }
                    if prep is not None:
                        batch = prep(batch)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                chips += int(batch["image"].shape[0])
                if first != first:
                    first, first_chips = time.perf_counter(), chips
        end = time.perf_counter()
        self.chips = chips
        later = chips - first_chips
        self.rates = (
            chips / (end - start),
            later / (end - first) if later > 0 and end > first else math.nan,
        )
        raise _Probed


def loader_only(
    scene: Path, configs: list[tuple[int, int]], device: str, tmp: Path, deadline: float
) -> dict[tuple[int, int, bool], tuple[float, float, int]]:
    """(whole pass, after the first batch) chips/s of ``embed``'s loader, and the chips
    read, per (batch, workers, with the transfer + on-device preprocessing); no model
    step, no writer, nothing written under ``tmp``."""
    out: dict[tuple[int, int, bool], tuple[float, float, int]] = {}
    for b, w in configs:
        for transfer in (False, True):
            if time.perf_counter() > deadline:
                log(f"loader batch {b} workers {w}: skipped (time budget)")
                continue
            probe = _LoaderProbe(transfer)
            try:
                prec = "bf16" if device == "gpu" else "fp32"
                _embed(scene, tmp / f"loader_{b}_{w}_{transfer}", "base", prec, b, w, device, probe)
            except _Probed:
                pass
            except Exception as err:
                log(f"loader batch {b} workers {w}: failed: {type(err).__name__}: {err}")
                continue
            out[(b, w, transfer)] = (*probe.rates, probe.chips)
            log(
                f"loader batch {b} workers {w}{' + transfer + preprocess' if transfer else ''}: "
                f"{probe.rates[0]:.1f} chips/s over the pass, {probe.rates[1]:.1f} after the "
                "first batch"
            )
    return out


def _values(parser: argparse.ArgumentParser, name: str, text: str, least: int) -> tuple[int, ...]:
    """Distinct integers >= ``least`` from a comma-separated option, else a usage error."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        parser.error(f"--{name} takes comma-separated integers, got {text!r}")
    if any(v < least for v in values) or len(set(values)) != len(values):
        parser.error(f"--{name} takes distinct integers >= {least}, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke-cpu", action="store_true", help="tiny run on the CPU")
    parser.add_argument("--variants", default="base,large")
    parser.add_argument("--precisions", default="bf16,fp32", help="bf16 and / or fp32")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (>= 1)")
    parser.add_argument(
        "--chips",
        type=int,
        default=1600,
        help="chips of the e2e scene, rounded to a square of at least 2 x 2",
    )
    parser.add_argument("--workers", default="", help="loader workers, e.g. 8,14 (runtime's)")
    parser.add_argument(
        "--compress",
        default="deflate",
        choices=("deflate", "zstd", "lzw", "none"),
        help="the e2e scene's GeoTIFF compression (no predictor); the loader decodes it",
    )
    parser.add_argument("--budget-s", type=float, default=200.0)
    parser.add_argument(
        "--loader",
        action="store_true",
        help="also time embed's loader alone, and with the transfer + on-device preprocessing",
    )
    args = parser.parse_args(argv)
    precisions = tuple(v.strip() for v in args.precisions.split(","))  # never empty
    if any(p not in ("bf16", "fp32") for p in precisions) or len(set(precisions)) < len(precisions):
        parser.error(f"--precisions takes bf16 and / or fp32, got {args.precisions!r}")
    variants = tuple(v.strip() for v in args.variants.split(","))
    for variant in variants:
        try:
            canonical_variant(variant)
        except ValueError as err:
            parser.error(f"--variants: {err}")
    given_batches = _values(parser, "batches", args.batches, 1)
    given_workers = _values(parser, "workers", args.workers, 0)
    if args.reps < 1:
        parser.error(f"--reps takes an integer >= 1, got {args.reps}")

    if not torch.cuda.is_available() and not args.smoke_cpu:
        print("not run: no GPU (torch.cuda.is_available() is False); --smoke-cpu checks the code")
        return 0
    smoke = args.smoke_cpu
    device = torch.device("cpu" if smoke else "cuda")
    default_workers = default_num_workers(accelerator=device.type)  # embed's default there
    workers = given_workers or (default_workers,)
    variants = ("base",) if smoke else variants
    batches = (2,) if smoke else given_batches
    chips = 8 if smoke else args.chips
    reps = 1 if smoke else args.reps
    side = max(2, round(math.sqrt(chips)))  # the scene is side x side chips
    start = time.perf_counter()
    deadline = start + args.budget_s
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 matmuls mean fp32
        name = torch.cuda.get_device_name()
    else:
        name = "CPU (smoke run)"
    lines = [
        f"# torchgeo-dofa GPU benchmark{' (CPU smoke run)' if smoke else ''}",
        "",
        f"- device: {name}; torch {torch.__version__}; {os.cpu_count()} CPUs, "
        f"default {default_workers} loader worker(s); 4 bands, random weights; end to end: "
        f"{side**2} chips of a tiled {args.compress} GeoTIFF (sustained: all chips over the "
        "loop; after 1st: an upper bound)",
        "",
        "| variant | prec | batch | encoder img/s | TorchGeo img/s | ours/TorchGeo | "
        "workers | e2e sustained chips/s | after 1st batch | waiting for batches | "
        "e2e/encoder |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="dofa-gpu-bench-") as tmp_name:
        tmp = Path(tmp_name)
        scene = write_scene(tmp / "scene.tif", (side, side), (224, 224), args.compress)
        configs = [(p, b, w) for p in precisions for b in batches for w in workers]
        loader: dict[tuple[int, int, bool], tuple[float, float, int]] = {}
        if args.loader:
            log(f"loader only ({side**2} chips)")
            pairs = [(b, w) for b in batches for w in workers]
            loader = loader_only(scene, pairs, "cpu" if smoke else "gpu", tmp, deadline)
        verdicts = []
        for variant in variants:
            log(f"{variant}: encoder only")
            enc = encoder_only(variant, precisions, batches, device, reps, deadline)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the encoder-only model is gone
            log(f"{variant}: end to end ({side**2} chips)")
            e2e = end_to_end(variant, scene, configs, "cpu" if smoke else "gpu", tmp, deadline)
            for prec in precisions:
                best_ratio = math.nan
                for b in batches:
                    e = enc.get((prec, b), {})
                    ours, theirs = e.get("ours", math.nan), e.get("torchgeo", math.nan)
                    for w in workers:
                        nan3 = (math.nan, math.nan, math.nan)
                        chips_s, after, waiting = e2e.get((prec, b, w), nan3)
                        ratio = chips_s / ours if ours == ours else math.nan
                        if ratio == ratio:
                            best_ratio = (
                                ratio if best_ratio != best_ratio else max(best_ratio, ratio)
                            )
                        lines.append(
                            f"| {variant} | {prec} | {b} | {ours:.1f} | {theirs:.1f} | "
                            f"{ours / theirs:.2f} | {w} | {chips_s:.1f} | {after:.1f} | "
                            f"{waiting:.0%} | {ratio:.0%} |"
                        )
                verdicts.append(
                    ("MET" if best_ratio >= 0.8 else "NOT MET")
                    + f": {variant} {prec} end to end >= 80% of encoder-only at the best batch: "
                    f"{best_ratio:.0%}"
                )
    if args.loader:
        nan2 = (math.nan, math.nan, 0)
        lines += [
            "",
            "Loader only (`embed`'s prediction loader, no model, no writer; chips/s over the "
            "whole pass, from its workers' start / after the first batch):",
            "",
            "| batch | workers | loader | after 1st | + transfer + preprocess | after 1st |",
            "|---|---|---|---|---|---|",
            *(
                f"| {b} | {w} | {loader.get((b, w, False), nan2)[0]:.1f} | "
                f"{loader.get((b, w, False), nan2)[1]:.1f} | "
                f"{loader.get((b, w, True), nan2)[0]:.1f} | "
                f"{loader.get((b, w, True), nan2)[1]:.1f} |"
                for b in batches
                for w in workers
            ),
        ]
    lines += ["", "Targets:", *(f"- {v}" for v in verdicts)]
    lines.append(f"\ntotal {time.perf_counter() - start:.0f} s")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
