"""Synthetic Sentinel-2-like chips whose classes differ spectrally, for offline fine-tuning runs.

Every class has a reflectance spectrum (water, forest, grassland, bare soil, urban, snow; more
classes are seeded mixtures of two of them), a smooth function of wavelength, so any band subset
(4, 9 or 13 bands, any order) sees the same classes. A pixel's raw reflectance (0..10000) is its
class spectrum times a per-chip brightness factor plus Gaussian noise; it is then normalised as
DOFA expects: clipped, mapped to 0..255 and standardised with DOFA's per-band statistics (bands
without statistics, B1, B8A, B9 and B10, borrow those of the nearest band in wavelength that has
them). Samples are generated on the fly from a seed, so the data are deterministic and cost no
disk.

Tasks: ``classification`` (one class per chip, ``label`` ()), ``multilabel`` (a chip made of
four quadrants, ``label`` (K,) 0/1 for the classes present) and ``segmentation`` (random
classes on a grid of ``cell_size`` squares, ``mask`` (H, W)). Every sample has ``image``
(C, H, W) float32 and ``wavelengths`` (C,) float32.

:class:`SpectralDataModule` is a TorchGeo :class:`~torchgeo.datamodules.NonGeoDataModule` over
:class:`SpectralChips`, used by ``torchgeo_dofa/configs/finetune_*.yaml``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torchgeo.datamodules import NonGeoDataModule
from torchgeo.datasets import NonGeoDataset

from .bands import SENTINEL2_BANDS, canonical_band
from .tasks import wavelengths_for_bands

__all__ = [
    "CLASS_NAMES",
    "EUROSAT_BANDS",
    "SPLITS",
    "SpectralChips",
    "SpectralDataModule",
    "class_spectra",
    "normalise_reflectance",
]

Sample = dict[str, Tensor]
SyntheticTask = Literal["classification", "multilabel", "segmentation"]

#: EuroSAT's 13 bands in TorchGeo's order (``torchgeo.datasets.EuroSAT.all_band_names``).
EUROSAT_BANDS: tuple[str, ...] = (
    "B01",
    "B02",
    "B03",
    "B04",
    "B05",
    "B06",
    "B07",
    "B08",
    "B09",
    "B10",
    "B11",
    "B12",
    "B8A",
)

#: Split names and their sizes relative to ``num_samples`` (train gets all of it).
SPLITS: dict[str, float] = {"train": 1.0, "val": 0.25, "test": 0.25}

#: Names of the prototype classes, in class-index order.
CLASS_NAMES: tuple[str, ...] = ("water", "forest", "grassland", "bare_soil", "urban", "snow")

# (wavelength um, reflectance x 10000) anchors, interpolated linearly in wavelength
_ANCHORS: dict[str, tuple[tuple[float, float], ...]] = {
    "water": (
        (0.40, 700), (0.49, 650), (0.56, 550), (0.665, 300), (0.705, 250), (0.74, 180),
        (0.842, 120), (0.945, 80), (1.375, 20), (1.61, 50), (2.19, 30),
    ),
    "forest": (
        (0.40, 250), (0.49, 300), (0.56, 550), (0.665, 300), (0.705, 900), (0.74, 2600),
        (0.783, 3200), (0.842, 3400), (0.945, 3200), (1.375, 400), (1.61, 1600), (2.19, 700),
    ),
    "grassland": (
        (0.40, 400), (0.49, 450), (0.56, 800), (0.665, 600), (0.705, 1400), (0.74, 2800),
        (0.783, 3600), (0.842, 4000), (0.945, 3800), (1.375, 500), (1.61, 2600), (2.19, 1500),
    ),
    "bare_soil": (
        (0.40, 900), (0.49, 1100), (0.56, 1500), (0.665, 2000), (0.705, 2200), (0.74, 2350),
        (0.842, 2600), (0.945, 2700), (1.375, 600), (1.61, 3400), (2.19, 3000),
    ),
    "urban": (
        (0.40, 1300), (0.49, 1350), (0.56, 1400), (0.665, 1500), (0.842, 1700), (1.375, 300),
        (1.61, 2000), (2.19, 1800),
    ),
    "snow": (
        (0.40, 8500), (0.49, 8600), (0.56, 8400), (0.665, 8000), (0.842, 7000), (0.945, 6000),
        (1.375, 500), (1.61, 800), (2.19, 500),
    ),
}  # fmt: skip


def _prototype(name: str, wavelengths: np.ndarray) -> np.ndarray:
    anchors = np.asarray(_ANCHORS[name], dtype=np.float64)
    return np.interp(wavelengths, anchors[:, 0], anchors[:, 1])


def class_spectra(num_classes: int, wavelengths: Sequence[float] | Tensor) -> Tensor:
    """Raw reflectance (x 10000) of each class at the given wavelengths.

    Classes 0..5 are :data:`CLASS_NAMES`; classes from 6 on are fixed (seeded by the class
    index) mixtures of two prototypes.

    Args:
        num_classes: number of classes K.
        wavelengths: C wavelengths in micrometres.

    Returns:
        (K, C) float32 spectra.
    """
    waves = np.asarray(
        wavelengths.tolist() if isinstance(wavelengths, Tensor) else list(wavelengths),
        dtype=np.float64,
    )
    protos = [_prototype(n, waves) for n in CLASS_NAMES]
    rows = []
    for k in range(num_classes):
        if k < len(protos):
            rows.append(protos[k])
            continue
        rng = np.random.default_rng(1000 + k)
        a, b = rng.choice(len(protos), size=2, replace=False)
        w = rng.uniform(0.25, 0.75)
        rows.append(w * protos[a] + (1 - w) * protos[b])
    return torch.tensor(np.stack(rows), dtype=torch.float32)


def _stats_for(bands: Sequence[str]) -> tuple[Tensor, Tensor]:
    """DOFA mean / std (0..255 scale) per band; nearest band in wavelength where missing."""
    with_stats = [b for b in SENTINEL2_BANDS.values() if b.mean is not None]
    waves = wavelengths_for_bands(bands)
    means, stds = [], []
    for name, wave in zip(bands, waves, strict=True):
        band = SENTINEL2_BANDS.get(canonical_band(name))
        if band is None or band.mean is None or band.std is None:
            band = min(with_stats, key=lambda b: abs(b.wavelength - wave))
        assert band.mean is not None and band.std is not None
        means.append(band.mean)
        stds.append(band.std)
    return torch.tensor(means), torch.tensor(stds)


def normalise_reflectance(image: Tensor, bands: Sequence[str]) -> Tensor:
    """DOFA's normalisation of raw reflectance, for any Sentinel-2 band.

    Clip to [0, 10000], map to 0..255 and standardise per band with DOFA's statistics; bands
    without statistics (B1, B8A, B9, B10) use those of the nearest band in wavelength that has
    them (an approximation, fine for synthetic data).

    Args:
        image: (C, H, W) or (B, C, H, W) raw reflectance.
        bands: the C band names.

    Returns:
        The normalised image, float32.
    """
    mean, std = _stats_for(bands)
    shape = (-1, 1, 1)
    scaled = image.float().clamp(0, 10000) / 10000 * 255
    return (scaled - mean.reshape(shape)) / std.reshape(shape)


def _check_settings(
    task: str,
    num_classes: int,
    bands: Sequence[str],
    size: int,
    num_samples: int,
    cell_size: int,
) -> None:
    """Refuse settings :class:`SpectralChips` cannot generate chips for.

    Shared by :class:`SpectralChips` and :class:`SpectralDataModule`, whose own check runs
    when it is built: a ``fit --config`` run refused only at the data module's setup had
    already made the logger's ``version_N`` folder.

    Args:
        task: ``classification``, ``multilabel`` or ``segmentation``.
        num_classes: number of classes (at least 2).
        bands: band names (at least one).
        size: chip side in pixels (at least 1).
        num_samples: number of training chips (at least 1).
        cell_size: side of segmentation mask squares (at least 1).

    Raises:
        ValueError: for an unknown task, or any of the others out of range (all named).
    """
    if task not in ("classification", "multilabel", "segmentation"):
        raise ValueError(
            f"unknown task {task!r}: choose classification, multilabel or segmentation"
        )
    wrong = [
        f"{name} {value!r} (needs {need})"
        for name, value, bad, need in (
            ("num_classes", num_classes, num_classes < 2, ">= 2"),
            ("bands", list(bands), len(bands) < 1, "at least one band"),
            ("size", size, size < 1, ">= 1 pixel"),
            ("num_samples", num_samples, num_samples < 1, ">= 1"),
            ("cell_size", cell_size, cell_size < 1, ">= 1 pixel"),
        )
        if bad
    ]
    if wrong:
        raise ValueError("synthetic chips cannot be made with " + ", ".join(wrong))


class SpectralChips(NonGeoDataset):
    """Synthetic chips whose classes differ by their reflectance spectrum.

    See the module docstring for the generative model. Sample ``i`` of a split is the same
    every time (generated from ``seed``, the split and ``i``).
    """

    def __init__(
        self,
        split: str = "train",
        task: SyntheticTask = "classification",
        num_classes: int = 4,
        bands: Sequence[str] = EUROSAT_BANDS,
        size: int = 64,
        num_samples: int = 256,
        noise: float = 300.0,
        brightness: float = 0.2,
        cell_size: int = 16,
        normalize: bool = True,
        seed: int = 0,
        transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        """Configure the dataset.

        Args:
            split: ``train``, ``val`` or ``test`` (val / test have ``num_samples // 4``).
            task: ``classification``, ``multilabel`` or ``segmentation``.
            num_classes: number of classes.
            bands: Sentinel-2 band names in channel order (``B4`` or ``B04`` spelling; B10
                included).
            size: chip side in pixels.
            num_samples: number of training chips.
            noise: standard deviation of the per-pixel noise (reflectance x 10000).
            brightness: per-chip brightness factors are drawn from ``1 +- brightness``.
            cell_size: side of the squares segmentation masks are made of.
            normalize: apply :func:`normalise_reflectance`; False returns raw reflectance
                (e.g. for :class:`torchgeo_dofa.transforms.DOFAPreprocess`).
            seed: base random seed.
            transforms: optional function applied to each sample.

        Raises:
            ValueError: for an unknown split or task, or bad sizes.
        """
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: choose one of {list(SPLITS)}")
        _check_settings(task, num_classes, bands, size, num_samples, cell_size)
        self.split = split
        self.task = task
        self.num_classes = num_classes
        self.bands: tuple[str, ...] = tuple(bands)
        self.wavelengths = torch.tensor(wavelengths_for_bands(self.bands), dtype=torch.float32)
        self.size = size
        self.length = max(1, int(num_samples * SPLITS[split]))
        self.noise = noise
        self.brightness = brightness
        self.cell_size = cell_size
        self.normalize = normalize
        self.seed = seed
        self.transforms = transforms
        self.spectra = class_spectra(num_classes, self.wavelengths)

    def __len__(self) -> int:
        """Number of chips in the split."""
        return self.length

    def _classes(self, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Per-pixel class map (H, W) and the sample's target."""
        s, k = self.size, self.num_classes
        if self.task == "classification":
            label = torch.randint(k, (), generator=gen)
            return label.expand(s, s), label
        if self.task == "multilabel":
            quads = torch.randint(k, (2, 2), generator=gen)
            half = (s + 1) // 2
            classes = quads.repeat_interleave(half, 0).repeat_interleave(half, 1)[:s, :s]
            target = torch.zeros(k, dtype=torch.long)
            target[quads.flatten()] = 1
            return classes, target
        cells = -(-s // self.cell_size)
        grid = torch.randint(k, (cells, cells), generator=gen)
        mask = grid.repeat_interleave(self.cell_size, 0).repeat_interleave(self.cell_size, 1)
        mask = mask[:s, :s].contiguous()
        return mask, mask

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Generate chip ``index`` of the split.

        Args:
            index: chip index.

        Returns:
            ``image`` (C, H, W), ``wavelengths`` (C,) and ``label`` or ``mask``.
        """
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} chips")
        split_id = list(SPLITS).index(self.split)
        gen = torch.Generator().manual_seed((self.seed * 3 + split_id) * 1_000_003 + index)
        classes, target = self._classes(gen)
        factor = 1 + self.brightness * (2 * torch.rand((), generator=gen) - 1)
        image = self.spectra[classes].permute(2, 0, 1) * factor
        image = image + self.noise * torch.randn(image.shape, generator=gen)
        if self.normalize:
            image = normalise_reflectance(image, self.bands)
        sample: dict[str, Any] = {"image": image, "wavelengths": self.wavelengths.clone()}
        sample["mask" if self.task == "segmentation" else "label"] = target
        if self.transforms is not None:
            sample = self.transforms(sample)
        return sample


def _identity(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


class SpectralDataModule(NonGeoDataModule):
    """TorchGeo datamodule over :class:`SpectralChips` (already normalised; no batch aug).

    Attributes:
        bands: band names in channel order.
        wavelengths: (C,) wavelengths (um), also in every sample.
    """

    def __init__(
        self,
        batch_size: int = 32,
        num_workers: int = 0,
        task: SyntheticTask = "classification",
        num_classes: int = 4,
        bands: list[str] | None = None,
        size: int = 64,
        num_samples: int = 256,
        noise: float = 300.0,
        brightness: float = 0.2,
        cell_size: int = 16,
        seed: int = 0,
    ) -> None:
        """Configure the datamodule.

        Args:
            batch_size: chips per batch.
            num_workers: DataLoader workers.
            task: ``classification``, ``multilabel`` or ``segmentation``.
            num_classes: number of classes.
            bands: Sentinel-2 band names (default: EuroSAT's 13 bands).
            size: chip side in pixels.
            num_samples: training chips (val and test get a quarter each).
            noise: per-pixel noise standard deviation (reflectance x 10000).
            brightness: per-chip brightness spread.
            cell_size: side of segmentation mask squares.
            seed: base random seed.

        Raises:
            ValueError: for an unknown task, fewer than 2 classes, no band, or a size,
                num_samples or cell_size below 1 (here, not at setup: before a ``fit``
                run's trainer makes its log folder).
        """
        chosen = tuple(bands) if bands is not None else EUROSAT_BANDS
        _check_settings(task, num_classes, chosen, size, num_samples, cell_size)
        super().__init__(
            SpectralChips,
            batch_size,
            num_workers,
            task=task,
            num_classes=num_classes,
            bands=chosen,
            size=size,
            num_samples=num_samples,
            noise=noise,
            brightness=brightness,
            cell_size=cell_size,
            seed=seed,
        )
        self.bands: tuple[str, ...] = chosen
        self.wavelengths = torch.tensor(wavelengths_for_bands(chosen), dtype=torch.float32)
        self.aug = _identity

    def setup(self, stage: str) -> None:
        """Create the split datasets (predict uses the test split).

        Args:
            stage: ``fit``, ``validate``, ``test`` or ``predict``.
        """
        super().setup(stage)
        if stage == "predict":
            self.predict_dataset = SpectralChips(split="test", **self.kwargs)
