"""torchgeo-dofa: DOFA, the wavelength-conditioned ViT, on TorchGeo + Lightning."""

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
from .writers import GridWriter, PooledWriter

__all__ = [
    "DOFA_S2_BANDS",
    "PRESETS",
    "SENTINEL2_BANDS",
    "BBox",
    "BandError",
    "CheckpointError",
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
