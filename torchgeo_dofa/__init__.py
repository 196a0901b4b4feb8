"""torchgeo-dofa: DOFA, the wavelength-conditioned ViT, on TorchGeo + Lightning.

The public names below are imported on first use (PEP 562), so ``import torchgeo_dofa`` is
instant and a job pays only for the modules it uses: ``torchgeo_dofa.DOFAEncoder`` loads
torch, TorchGeo's models and the encoder; ``torchgeo_dofa.get_embedding`` the rs-embed style
API with its datasets. ``from torchgeo_dofa import X`` works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .api import (
        BBox,
        Embedding,
        ExportModelRequest,
        ModelError,
        OutputSpec,
        PointBuffer,
        SensorSpec,
        TemporalSpec,
        export_batch,
        get_embedding,
        get_embeddings_batch,
        get_embeddings_batch_from_inputs,
    )
    from .bands import DOFA_S2_BANDS, PRESETS, SENTINEL2_BANDS, BandError
    from .datamodules import DOFAPredictDataModule
    from .datasets import EarthEngineS2, Sentinel2SR, stack_dofa_samples
    from .embedder import DOFAEmbedder
    from .model import DOFAEncoder, DOFAOutput, build_encoder
    from .transforms import DOFAPreprocess
    from .weights import CheckpointError, load_dofa
    from .writers import ClassificationWriter, GridWriter, PooledWriter, SegmentationWriter

#: Public name -> the submodule defining it.
_LAZY: dict[str, str] = {
    **dict.fromkeys(
        (
            "BBox",
            "Embedding",
            "ExportModelRequest",
            "ModelError",
            "OutputSpec",
            "PointBuffer",
            "SensorSpec",
            "TemporalSpec",
            "export_batch",
            "get_embedding",
            "get_embeddings_batch",
            "get_embeddings_batch_from_inputs",
        ),
        "api",
    ),
    **dict.fromkeys(("DOFA_S2_BANDS", "PRESETS", "SENTINEL2_BANDS", "BandError"), "bands"),
    "DOFAPredictDataModule": "datamodules",
    **dict.fromkeys(("EarthEngineS2", "Sentinel2SR", "stack_dofa_samples"), "datasets"),
    "DOFAEmbedder": "embedder",
    **dict.fromkeys(("DOFAEncoder", "DOFAOutput", "build_encoder"), "model"),
    "DOFAPreprocess": "transforms",
    **dict.fromkeys(("CheckpointError", "load_dofa"), "weights"),
    **dict.fromkeys(
        ("ClassificationWriter", "GridWriter", "PooledWriter", "SegmentationWriter"), "writers"
    ),
}

__all__ = [
    "DOFA_S2_BANDS",
    "PRESETS",
    "SENTINEL2_BANDS",
    "BBox",
    "BandError",
    "CheckpointError",
    "ClassificationWriter",
    "DOFAEmbedder",
    "DOFAEncoder",
    "DOFAOutput",
    "DOFAPredictDataModule",
    "DOFAPreprocess",
    "EarthEngineS2",
    "Embedding",
    "ExportModelRequest",
    "GridWriter",
    "ModelError",
    "OutputSpec",
    "PointBuffer",
    "PooledWriter",
    "SegmentationWriter",
    "SensorSpec",
    "Sentinel2SR",
    "TemporalSpec",
    "build_encoder",
    "export_batch",
    "get_embedding",
    "get_embeddings_batch",
    "get_embeddings_batch_from_inputs",
    "load_dofa",
    "stack_dofa_samples",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import the submodule defining ``name`` on first access (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'torchgeo_dofa' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    """Public names, including those not imported yet."""
    return sorted({*globals(), *_LAZY})
