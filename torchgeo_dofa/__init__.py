"""torchgeo-dofa: DOFA, the wavelength-conditioned ViT, on TorchGeo + Lightning."""

from .bands import DOFA_S2_BANDS, PRESETS, SENTINEL2_BANDS, BandError
from .model import DOFAEncoder, DOFAOutput, build_encoder
from .weights import CheckpointError, load_dofa

__all__ = [
    "DOFA_S2_BANDS",
    "PRESETS",
    "SENTINEL2_BANDS",
    "BandError",
    "CheckpointError",
    "DOFAEncoder",
    "DOFAOutput",
    "build_encoder",
    "load_dofa",
]

__version__ = "0.1.0"

# rs-embed style API (issue 6): get_embedding("dofa", spatial=..., temporal=..., ...)
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

__all__ += [
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
]
