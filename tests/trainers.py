"""A quiet CPU Lightning trainer for the tests that predict (no logger, bar or summary)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


def cpu_trainer(callbacks: list[pl.Callback] | None = None, **kwargs: Any) -> pl.Trainer:
    """A CPU trainer printing nothing of its own; ``kwargs`` go to ``pl.Trainer``."""
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )
