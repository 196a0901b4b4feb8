"""The ``torchgeo-dofa`` console script and ``python -m torchgeo_dofa``.

Both set :data:`OPENMP_DEFAULTS` in the environment, where the user has not set them, before
PyTorch is imported (its OpenMP runtime reads them once, when it is loaded), then run
:func:`torchgeo_dofa.cli.main`.

Why passive waiting: an embed job on the CPU runs the model's OpenMP threads (one per core)
beside DataLoader worker processes that read chips on the same cores. With OpenMP's default
active wait, a thread that finishes its share of an operation spins on its core until the
others are done, so a worker scheduled on any core stalls the whole model step while the
spinning thread keeps its core busy. Passive waiting yields the core instead. Measured on a
2-core Sapphire Rapids VM, ``benchmarks/e2e_worker.py``, 256 chips, bf16, batch 8, one loader
worker, three interleaved pairs: 18.9 / 17.6 / 18.6 chips/s passive vs 16.5 / 17.5 / 17.0
active (+8 % on average); the encoder alone, with no other work on the cores, is ~5 % slower
passive. Set ``OMP_WAIT_POLICY=ACTIVE`` (or any value) to choose otherwise; Python callers of
:func:`torchgeo_dofa.cli.embed` set it themselves, before importing torch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping, Sequence

#: Environment defaults the command line applies before PyTorch is loaded (see above).
OPENMP_DEFAULTS: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}


def apply_openmp_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set :data:`OPENMP_DEFAULTS` where ``environ`` lacks them, if torch is not loaded yet.

    Args:
        environ: the environment to change (default: ``os.environ``).

    Returns:
        The variables set (empty when the user set them all, or when ``torch`` is already
        imported in this process: its OpenMP runtime has read the environment then, so a
        change would have no effect).
    """
    env = os.environ if environ is None else environ
    if "torch" in sys.modules:
        return {}
    applied = {k: v for k, v in OPENMP_DEFAULTS.items() if k not in env}
    env.update(applied)
    return applied


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torchgeo-dofa`` console script.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status of :func:`torchgeo_dofa.cli.main`.
    """
    apply_openmp_defaults()
    if sys.argv and os.path.basename(sys.argv[0]) == "__main__.py":
        sys.argv[0] = "torchgeo-dofa"  # LightningCLI's usage lines name the program by it
    from .cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
