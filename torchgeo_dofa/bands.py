"""Band registry: Sentinel-2 wavelengths, DOFA normalisation statistics and presets.

Names are accepted in both spellings users meet: Earth Engine's ``B4`` and ESA's / TorchGeo's
``B04`` (and ``B8A``); they are canonicalised to Earth Engine's spelling, the one DOFA's
reference pipeline (rs-embed) uses.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

if TYPE_CHECKING:  # torch loads on first use: the preview and the CLI's checks need none
    from torch import Tensor


__all__ = [
    "DOFA_S2_BANDS",
    "NORMALISED_LIMIT",
    "PRESETS",
    "SENTINEL1_PLACEHOLDER_UM",
    "SENTINEL2_BANDS",
    "STAC_ANCILLARY_ASSETS",
    "STAC_ASSET_BANDS",
    "STAC_ITEM_ASSETS",
    "STATS_SCALE_MAX",
    "WAVELENGTH_HINT",
    "WAVELENGTH_TOLERANCE",
    "Band",
    "BandError",
    "BandSet",
    "canonical_band",
    "check_names_fit",
    "check_unique_bands",
    "date_copy_base",
    "infer_wavelengths",
    "is_known_band",
    "norm_stats",
    "offset_problem",
    "resolve_wavelengths",
    "same_band_names",
    "split_date_copy",
    "stac_asset_band",
    "validate_wavelengths",
]


class BandError(ValueError):
    """Raised for unknown band names, missing statistics or inconsistent wavelengths."""


@dataclass(frozen=True)
class Band:
    """One spectral band.

    Attributes:
        name: canonical name (Earth Engine spelling for Sentinel-2, e.g. ``B4``, ``B8A``).
        wavelength: centre wavelength in micrometres.
        mean: DOFA normalisation mean on the 0..255 scale, or None where DOFA has none.
        std: DOFA normalisation standard deviation on the 0..255 scale, or None.
    """

    name: str
    wavelength: float
    mean: float | None = None
    std: float | None = None


#: Sentinel-2 MSI bands with centre wavelengths (um) and DOFA statistics (0..255 scale).
#: B1, B8A, B9 and B10 (cirrus, L1C only) have wavelengths but no DOFA statistics.
SENTINEL2_BANDS: dict[str, Band] = {
    b.name: b
    for b in (
        Band("B1", 0.443),
        Band("B2", 0.490, 126.63977424, 67.42465279),
        Band("B3", 0.560, 114.81779093, 69.96844919),
        Band("B4", 0.665, 114.1099739, 77.84352553),
        Band("B5", 0.705, 84.33539309, 64.57022983),
        Band("B6", 0.740, 97.84789168, 61.72545487),
        Band("B7", 0.783, 103.94461911, 61.34187099),
        Band("B8", 0.842, 101.435633, 60.29744676),
        Band("B8A", 0.865),
        Band("B9", 0.945),
        Band("B10", 1.375),
        Band("B11", 1.610, 72.32804172, 47.88519516),
        Band("B12", 2.190, 56.66528851, 42.55886798),
    )
}

#: DOFA's default Sentinel-2 band order (rs-embed's default for ``S2_SR_HARMONIZED``).
DOFA_S2_BANDS: tuple[str, ...] = ("B4", "B3", "B2", "B5", "B6", "B7", "B8", "B11", "B12")

#: Placeholder wavelength DOFA v1 weights use for Sentinel-1 VV and VH (not a physical value).
SENTINEL1_PLACEHOLDER_UM = 3.75

_S2_NAME = re.compile(r"^B0*(\d{1,2}A?)$", re.IGNORECASE)


def canonical_band(name: str) -> str:
    """Return the canonical (Earth Engine) spelling of a Sentinel-2 band name.

    ``B04``, ``b4`` and ``B4`` all give ``B4``; ``B8A`` and ``B08A`` give ``B8A``. Names that
    are not Sentinel-2 bands are returned unchanged (stripped), so callers can look them up in
    other registries.

    Args:
        name: a band name as found in a file or given by a user.

    Returns:
        The canonical name.
    """
    stripped = name.strip()
    match = _S2_NAME.match(stripped)
    if match:
        candidate = "B" + match.group(1).upper()
        if candidate in SENTINEL2_BANDS:
            return candidate
    return stripped


#: Sentinel-2 band behind each asset key of Earth Search v1's ``sentinel-2-l2a`` /
#: ``sentinel-2-l1c`` STAC collections (Element 84, https://earth-search.aws.element84.com/v1;
#: the keys follow the STAC ``eo`` common names, as ``red.tif``, ``nir08.tif`` in item
#: downloads). The ``-jp2`` variants of those collections (``red-jp2``) name the same bands.
#: Earth Search v0 (``sentinel-s2-l2a-cogs``) used ``B01`` ... ``B12`` directly.
STAC_ASSET_BANDS: dict[str, str] = {
    "coastal": "B1",
    "blue": "B2",
    "green": "B3",
    "red": "B4",
    "rededge1": "B5",
    "rededge2": "B6",
    "rededge3": "B7",
    "nir": "B8",
    "nir08": "B8A",
    "nir09": "B9",
    "cirrus": "B10",
    "swir16": "B11",
    "swir22": "B12",
}

#: Every asset key a Sentinel-2 STAC item may carry, mapped to its band: Earth Search v1's
#: (:data:`STAC_ASSET_BANDS`, plus ``scl``) and Microsoft Planetary Computer's
#: ``sentinel-2-l2a`` (ESA names ``B01`` ... ``B12``, ``B8A``, ``SCL``). ``SCL`` is the scene
#: classification layer (not spectral: no wavelength).
STAC_ITEM_ASSETS: dict[str, str] = {
    **STAC_ASSET_BANDS,
    "scl": "SCL",
    **{f"B{n:02d}": f"B{n}" for n in range(1, 13)},
    "B8A": "B8A",
    "SCL": "SCL",
}

#: Asset keys of the same collections that are not spectral bands (skipped when reading item
#: folders): scene classification, aerosol optical thickness, water vapour, true-colour
#: previews and metadata.
STAC_ANCILLARY_ASSETS: tuple[str, ...] = (
    "scl",
    "aot",
    "wvp",
    "visual",
    "thumbnail",
    "preview",
    "granule_metadata",
    "tileinfo_metadata",
    "product_metadata",
)


def stac_asset_band(name: str) -> str | None:
    """Sentinel-2 band of an Earth Search asset key (``red`` -> ``B4``, ``nir08-jp2`` -> ``B8A``).

    Args:
        name: an asset key or file stem, any case.

    Returns:
        The canonical band name, or None when ``name`` is not a spectral asset key.
    """
    key = name.strip().lower()
    key = key.removesuffix("-jp2")
    return STAC_ASSET_BANDS.get(key)


_SUFFIXED = re.compile(r"^(?P<base>.+?)_(?P<n>\d+)$")


def split_date_copy(name: str) -> tuple[str, str | None]:
    """Canonical band and Earth Engine's date suffix (``B04_1`` -> ``("B4", "1")``).

    ``B4_1`` is Earth Engine's name for B4 of the second date of a multi-date stack.

    Args:
        name: a band name.

    Returns:
        ``(band, suffix)``; ``(band, None)`` for a plain Sentinel-2 name (``B04`` ->
        ``("B4", None)``), and the whole name canonicalised with no suffix for a name that
        is not a Sentinel-2 band, with or without a suffix.
    """
    canon = canonical_band(name)
    if canon in SENTINEL2_BANDS:
        return canon, None
    match = _SUFFIXED.match(name.strip())
    if match:
        base = canonical_band(match.group("base"))
        if base in SENTINEL2_BANDS:
            return base, match.group("n")
    return canon, None


def _band_key(name: str) -> str:
    """Identity of a band name for duplicate checks: canonical spelling, ``_N`` kept apart.

    ``B04`` and ``b4`` are the same band; ``B4_1`` (Earth Engine's copy of B4 from the next
    date of a multi-date stack) is another one; other names compare case-insensitively.
    """
    band, suffix = split_date_copy(name)
    if suffix is not None:
        return f"{band}_{suffix}"
    return band if band in SENTINEL2_BANDS else band.casefold()


def same_band_names(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether two band lists name the same bands in the same order.

    ``B04`` and ``b4`` are one band; ``B4_1`` (a later date's copy) is another; other names
    compare case-insensitively.
    """
    return [_band_key(x) for x in a] == [_band_key(y) for y in b]


#: The band names written together in one string (``"B4B3B2B8"``, ``"B4, B3"``).
_BAND_WORD = re.compile(r"B\d{1,2}A?(?:_\d+)?|[A-Za-z]+\d*(?:_\d+)?")


def band_words(text: str | bytes) -> list[str]:
    """The band names in one string given for a list (``"B4B3B2B8"`` -> B4, B3, B2, B8).

    Args:
        text: the string (bytes are decoded as ASCII, unknown bytes replaced).

    Returns:
        The names found, in order (for a message's example of the list meant).
    """
    if isinstance(text, bytes):
        text = text.decode("ascii", errors="replace")
    return _BAND_WORD.findall(text)


def refuse_one_string(bands: object, what: str = "bands") -> None:
    """Reject band names given as one string, which a list would split into letters.

    ``DOFAPreprocess(bands="B4")`` read the bands ``B`` and ``4`` (``B``: the ``rgb``
    preset's blue) and failed on ``4``; ``"RGB"`` would have been three bands. The
    datasets' ``bands=`` / ``file_bands=``, the transforms and the tasks refuse it here.

    Raises:
        BandError: naming the string and the list meant (:func:`band_words`).
    """
    if isinstance(bands, str | bytes):
        raise BandError(
            f"{what}={bands!r} is one string: give a list of band names, one per channel "
            f"({what}={band_words(bands) or ['B4', 'B3']!r})"
        )


def check_unique_bands(bands: Sequence[str], what: str = "bands") -> None:
    """Reject a band list naming one band twice (after canonicalisation: ``B4`` == ``B04``).

    Two channels with one name would get one wavelength and one set of statistics for two
    different things, and a lookup by name would silently drop one of them. Earth Engine's
    multi-date copies (``B4`` and ``B4_1``) are different bands and pass.

    Args:
        bands: band names in channel order.
        what: what the list is (used in the message, e.g. ``"bands="``).

    Raises:
        BandError: naming every duplicated band and the positions it occupies.
    """
    positions: dict[str, list[int]] = {}
    for i, name in enumerate(bands):
        positions.setdefault(_band_key(str(name)), []).append(i)
    repeated = {k: v for k, v in positions.items() if len(v) > 1}
    if repeated:
        listing = ", ".join(f"{bands[v[0]]!s} at positions {v}" for v in repeated.values())
        raise BandError(
            f"{what} {list(bands)} name the same band more than once ({listing}; B4 and B04 "
            "are the same band): give each channel its own band name (drop the repeated "
            "channel, or name the bands of a multi-date stack B4, B4_1, B4_2)"
        )


#: How to pass wavelengths to the transforms and the API; a dataset's error gives its own.
WAVELENGTH_HINT = (
    "pass explicit wavelengths in micrometres, one per channel, e.g. "
    "DOFAPreprocess(bands=[...], wavelengths=[0.665, 0.56, 0.49]) or "
    "get_embedding(..., sensor=SensorSpec(bands=[...], wavelengths=[...]))"
)


def infer_wavelengths(bands: Sequence[str]) -> list[float]:
    """Infer centre wavelengths (um) from band names, any subset, any order.

    Known names: Sentinel-2's (``B4`` or ``B04`` spelling, :data:`SENTINEL2_BANDS`), Earth
    Engine's copies of them from other dates (``B4_1``), and the names of the
    :data:`PRESETS` (``R``, ``G``, ``B`` with B4/B3/B2's wavelengths; ``VV``, ``VH`` with DOFA
    v1's placeholder :data:`SENTINEL1_PLACEHOLDER_UM`).

    Args:
        bands: band names.

    Returns:
        One wavelength per band, in the given order.

    Raises:
        BandError: if a name is not known; the message says how to pass wavelengths
            explicitly.
    """
    found = [_lookup(b) or _lookup(date_copy_base(b)) for b in bands]
    unknown = [b for b, band in zip(bands, found, strict=True) if band is None]
    if unknown:
        raise BandError(
            f"cannot infer wavelengths for band(s) {unknown}: only Sentinel-2 bands "
            f"{list(SENTINEL2_BANDS)} (or their B0x spelling) and the presets' "
            f"{[b for b in _ALL_BANDS if b not in SENTINEL2_BANDS]} are known; {WAVELENGTH_HINT}"
        )
    return [band.wavelength for band in found if band is not None]


def validate_wavelengths(wavelengths: Sequence[float] | Tensor, num_channels: int | None) -> None:
    """Check a wavelength vector: finite, positive, in micrometres, one per channel.

    Args:
        wavelengths: the vector to check.
        num_channels: the channel count it must match, or None to skip that check.

    Raises:
        BandError: naming the problem and the fix.
    """
    values = (
        wavelengths.detach().flatten().tolist()
        if _is_tensor(wavelengths)
        else [float(v) for v in wavelengths]
    )
    if num_channels is not None and len(values) != num_channels:
        raise BandError(
            f"got {len(values)} wavelengths for {num_channels} channels: give exactly one "
            "wavelength (um) per input channel, in channel order"
        )
    if not values:
        raise BandError("wavelengths are empty: give one wavelength (um) per input channel")
    bad = [v for v in values if not math.isfinite(v) or v <= 0]
    if bad:
        raise BandError(f"wavelengths must be finite and positive (micrometres); got {bad}")
    if max(values) > 100:
        raise BandError(
            f"wavelengths {values} look like nanometres: DOFA expects micrometres "
            "(e.g. 0.665 for Sentinel-2 B4, not 665); divide by 1000"
        )


def resolve_wavelengths(
    bands: Sequence[str] | None,
    wavelengths: Sequence[float] | Tensor | None = None,
    num_channels: int | None = None,
) -> Tensor:
    """Return the wavelength vector (float32 tensor) for a band list or an explicit vector.

    Explicit wavelengths win; otherwise they are inferred from Sentinel-2 band names.

    Args:
        bands: band names in channel order, or None.
        wavelengths: explicit wavelengths (um), or None to infer them from ``bands``.
        num_channels: channel count the vector must match, or None.

    Returns:
        A float32 tensor of shape (C,).

    Raises:
        BandError: if wavelengths cannot be inferred or do not fit.
    """
    if wavelengths is None:
        if bands is None:
            raise BandError(f"neither band names nor wavelengths were given; {WAVELENGTH_HINT}")
        values: Sequence[float] | Tensor = infer_wavelengths(bands)
    else:
        values = wavelengths
        if bands is not None and len(bands) != len(values):
            raise BandError(
                f"{len(bands)} band names but {len(values)} wavelengths: give one per band"
            )
    validate_wavelengths(values, num_channels)
    import torch

    if _is_tensor(values):
        return values.detach().to(dtype=torch.float32).flatten().clone()
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


#: Largest difference (um) between two wavelengths that still name the same band: above the
#: spread of one band's centre between sources (B12 is 2.2024 um on Sentinel-2A, 2.1857 on
#: 2B, 2.19 in DOFA's table), below the closest pair of distinct Sentinel-2 bands (B8 0.842 /
#: B8A 0.865 um).
WAVELENGTH_TOLERANCE = 0.02


def check_names_fit(bands: Sequence[str], wavelengths: Sequence[float] | Tensor) -> None:
    """Refuse wavelengths that contradict the band names DOFA's statistics are taken by.

    Where statistics are looked up by name (:func:`norm_stats` without ``mean``/``std``),
    a name and a wavelength of two different bands would normalise a channel as one band and
    embed it as another. Names without statistics (another sensor's) are not checked; nor
    is anything when statistics are given, as names are then labels only.

    Args:
        bands: band names in channel order.
        wavelengths: their wavelengths (um), already validated.

    Raises:
        BandError: naming each band whose wavelength is more than
            :data:`WAVELENGTH_TOLERANCE` from its name's.
    """
    wrong = []
    for name, value in zip(bands, [float(v) for v in wavelengths], strict=True):
        band = _lookup(str(name)) or _lookup(date_copy_base(str(name)))
        if band is None or band.mean is None:
            continue
        if abs(band.wavelength - value) > WAVELENGTH_TOLERANCE:
            wrong.append(f"{name} is {band.wavelength} um, not {value:g}")
    if wrong:
        raise BandError(
            f"wavelengths contradict the band names DOFA's statistics are looked up by "
            f"({'; '.join(wrong)}): a channel would be normalised as one band and embedded as "
            "another; give the names and wavelengths of the channels in their order (or the "
            "names alone: their wavelengths are inferred), or the bands' own mean= and std="
        )


def _is_tensor(value: Any) -> TypeGuard[Tensor]:
    """Whether ``value`` is a torch tensor, without importing torch (none exists before)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def date_copy_base(name: str) -> str:
    """The Sentinel-2 band behind Earth Engine's name for another date (``B4_1`` -> ``B4``).

    Args:
        name: a band name.

    Returns:
        The canonical band (see :func:`split_date_copy`).
    """
    return split_date_copy(name)[0]


#: Largest value of DOFA's statistics scale (reflectance / 10000 x 255): given statistics above
#: it were computed on raw reflectance (0..10000) instead.
STATS_SCALE_MAX = 255.0

#: Largest magnitude a normalised input may hold: beyond it the model's input check
#: (:func:`torchgeo_dofa.embedder.check_normalised`) takes a batch for raw reflectance. DOFA's
#: Sentinel-2 statistics (:data:`SENTINEL2_BANDS`, on the 0..255 scale of reflectance / 10000
#: x 255) turn reflectance 0..10000 into -1.88..4.66 and even a saturated 65535 into < 38; raw
#: reflectance reaches the thousands wherever there is land or cloud.
NORMALISED_LIMIT = 1000.0


def norm_stats(
    bands: Sequence[str],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[list[float], list[float]]:
    """DOFA's per-band mean and std (0..255 scale): looked up by band name, or as given.

    DOFA's pre-training statistics exist for Sentinel-2's B2-B8, B11, B12 (and the ``rgb``
    preset's names): see :data:`SENTINEL2_BANDS`. Bands of other sensors need their own,
    on the same scale (reflectance x 10000 clipped to 0..10000, / 10000 x 255).

    Args:
        bands: band names, any subset and order of the DOFA 9 bands (or preset names); a
            band of another date (``B4_1``) takes its band's statistics.
        mean: one mean per band on the 0..255 scale, replacing the looked-up ones, or None.
        std: one standard deviation per band on the same scale (given with ``mean``), or
            None.

    Returns:
        (means, stds), one value per band.

    Raises:
        BandError: naming every band without statistics when none are given, or what is
            wrong with the given ones (only one of the two, count, non-finite, std <= 0,
            a negative mean, values beyond the 0..255 scale or all <= 1, as on a 0..1
            scale).
    """
    if mean is not None or std is not None:
        return _given_stats(bands, mean, std)
    means: list[float] = []
    stds: list[float] = []
    missing: list[str] = []
    for name in bands:
        band = _lookup(name) or _lookup(date_copy_base(name))
        if band is None or band.mean is None or band.std is None:
            missing.append(name)
            continue
        means.append(band.mean)
        stds.append(band.std)
    if missing:
        known = [b.name for b in _ALL_BANDS.values() if b.mean is not None]
        raise BandError(
            f"no DOFA normalisation statistics for band(s) {missing}; statistics exist for "
            f"{sorted(set(known))}: drop those bands, or give every band's statistics, "
            "mean=[...] and std=[...] (one per band, in band order, on DOFA's 0..255 scale: "
            "the raw reflectance statistics x 0.0255)"
        )
    return means, stds


def _given_stats(
    bands: Sequence[str], mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[list[float], list[float]]:
    """Check statistics given for ``bands`` (see :func:`norm_stats`)."""
    if mean is None or std is None:
        raise BandError("give both mean=[...] and std=[...] (one per band), or neither")
    means, stds = [float(v) for v in mean], [float(v) for v in std]
    if len(means) != len(bands) or len(stds) != len(bands):
        raise BandError(
            f"{len(means)} means and {len(stds)} stds for {len(bands)} bands {list(bands)}: "
            "give one mean and one std per band, in band order"
        )
    if not all(math.isfinite(v) for v in means + stds) or min(stds) <= 0:
        raise BandError(f"statistics must be finite with std > 0; got mean={means}, std={stds}")
    if max(abs(v) for v in means + stds) > STATS_SCALE_MAX:
        raise BandError(
            f"statistics mean={means}, std={stds} exceed DOFA's 0..255 scale: they look "
            "computed on raw reflectance (0..10000); multiply them by 0.0255 (255 / 10000)"
        )
    if max(means + stds) <= 1.0:
        raise BandError(
            f"statistics mean={means}, std={stds} are all <= 1: they look computed on "
            "reflectance scaled to 0..1, not on DOFA's 0..255 scale; multiply them by 255"
        )
    if min(means) < 0:
        raise BandError(
            f"statistics mean={means} hold a negative mean: reflectance clipped to 0..10000 "
            "cannot have one; give the means on DOFA's 0..255 scale"
        )
    # reflectance 0..10000 is 0..255 on this scale: its farthest value from the mean, in stds
    reach = [max(m, STATS_SCALE_MAX - m) / s for m, s in zip(means, stds, strict=True)]
    if max(reach) > NORMALISED_LIMIT:
        i = reach.index(max(reach))
        raise BandError(
            f"std {stds[i]:g} for band {bands[i]} would scale reflectance 0..10000 to values "
            f"up to {max(reach):.3g}, beyond the +-{NORMALISED_LIMIT:g} the model takes "
            "(normalised input spans about +-5): give the band's standard deviation on DOFA's "
            "0..255 scale (DOFA's Sentinel-2 ones are 43-78)"
        )
    return means, stds


@dataclass(frozen=True)
class BandSet:
    """A named band preset: band names, wavelengths (um) and a description.

    Attributes:
        name: preset name.
        bands: band names in channel order.
        wavelengths: one wavelength (um) per band.
        description: what the preset is for.
    """

    name: str
    bands: tuple[str, ...]
    wavelengths: tuple[float, ...]
    description: str = ""


_SAR_BANDS = {
    "VV": Band("VV", SENTINEL1_PLACEHOLDER_UM),
    "VH": Band("VH", SENTINEL1_PLACEHOLDER_UM),
}
_RGB_BANDS = {
    "R": Band("R", 0.665, SENTINEL2_BANDS["B4"].mean, SENTINEL2_BANDS["B4"].std),
    "G": Band("G", 0.560, SENTINEL2_BANDS["B3"].mean, SENTINEL2_BANDS["B3"].std),
    "B": Band("B", 0.490, SENTINEL2_BANDS["B2"].mean, SENTINEL2_BANDS["B2"].std),
}
_ALL_BANDS: dict[str, Band] = {**SENTINEL2_BANDS, **_SAR_BANDS, **_RGB_BANDS}


def _lookup(name: str) -> Band | None:
    canon = canonical_band(name)
    return _ALL_BANDS.get(canon) or _ALL_BANDS.get(canon.upper())


def is_known_band(name: str) -> bool:
    """Whether ``name`` is a band this package knows by name.

    Sentinel-2's bands in either spelling (``B4``, ``B04``, ``B8A``), Earth Engine's copies
    of them from a stack's later dates (``B4_1``), Sentinel-1's ``VV`` / ``VH`` and the
    ``rgb`` preset's ``R``, ``G``, ``B``: the names whose wavelength the package infers.

    Args:
        name: a band name as a user or a file gives it.

    Returns:
        True for those names, False for any other (``X``, ``nir``, ``B13``).
    """
    return split_date_copy(name)[0] in SENTINEL2_BANDS or _lookup(name) is not None


#: Presets. ``sentinel1``: VV/VH with DOFA v1's placeholder wavelength 3.75 um (a modality
#: token, not the physical C-band wavelength of ~55,500 um, and not 5.405); ``rgb``: plain
#: red/green/blue with Sentinel-2 B4/B3/B2 wavelengths and statistics.
PRESETS: dict[str, BandSet] = {
    "sentinel2": BandSet(
        "sentinel2",
        DOFA_S2_BANDS,
        tuple(SENTINEL2_BANDS[b].wavelength for b in DOFA_S2_BANDS),
        "Sentinel-2 surface reflectance in DOFA's 9-band order",
    ),
    "sentinel1": BandSet(
        "sentinel1",
        ("VV", "VH"),
        (SENTINEL1_PLACEHOLDER_UM, SENTINEL1_PLACEHOLDER_UM),
        "Sentinel-1 VV/VH; DOFA v1 uses the placeholder wavelength 3.75 um for both",
    ),
    "rgb": BandSet(
        "rgb",
        ("R", "G", "B"),
        (0.665, 0.560, 0.490),
        "plain RGB, with Sentinel-2 B4/B3/B2 wavelengths and statistics",
    ),
}


def offset_problem(value: float) -> str | None:
    """What is wrong with ``value`` as a radiometric offset of reflectance x 10000, or None.

    An offset is added to the digital numbers: a whole number from -10000 to 0 (ESA's -1000
    removes the +1000 that processing baseline 04.00 adds; 0 reads the values as they are).
    A positive one (the sign slipped), a fraction (an offset in reflectance units, -0.1) or
    a huge one would shift every pixel out of the reflectance range without an error (1e9:
    every pixel clipped to 10000; -20000: every pixel no data).

    Args:
        value: the offset given (digital numbers).

    Returns:
        The problem (``"1000 cannot be an offset ..."``), naming the accepted values, or None
        for a plausible offset.
    """
    if math.isfinite(value) and value == round(value) and -10000 <= value <= 0:
        return None
    return (
        f"{value:g} cannot be an offset of reflectance x 10000: a whole number from "
        "-10000 to 0 is added to the digital numbers (-1000 removes the +1000 of Sentinel-2's "
        "processing baseline 04.00; 0 reads the values as they are)"
    )
