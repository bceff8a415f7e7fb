"""The ``vol3d preprocess`` config: ingest policy + transforms + storage.

Loaded from YAML with :func:`preprocess.config_io.load_yaml` (presets live in
``configs/preprocess/``); every field is also a command-line flag. The output of a
case depends only on the fields hashed by :meth:`PreprocessConfig.params_hash`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from preprocess.config_io import from_dict, load_yaml, to_dict
from preprocess.errors import ConfigError, InputError
from preprocess.ingest.config import IngestConfig

#: Codecs accepted by ``compression`` (lz4/zstd go through hdf5plugin's Blosc filter).
COMPRESSIONS = ("lz4", "zstd", "lzf", "gzip", "none")

#: Fields that do not change what is written for a case (excluded from ``params_hash``).
_UNHASHED = frozenset({"workers", "id_key"})
#: Ingest fields that bound resources only: a case either fails on them or is written the same.
_UNHASHED_INGEST = frozenset({"max_archive_bytes", "max_archive_ratio", "max_archive_members",
                              "max_archive_depth", "max_voxels"})
#: Fields added after caches existed, with their default: hashed only when set otherwise, so a cache
#: made before the field existed keeps its hash (and is not prepared again).
_HASHED_WHEN_SET = {"mr_normalisation": "percentile", "mr_zscore_clip": 5.0, "mr_bias_correction": False,
                    "mr_bias_convergence": 0.001}
_HASHED_WHEN_SET_INGEST: dict[str, Any] = {"parrec_scaling": "dv", "series_include": [],
                                           "sequence_channels": []}


@dataclasses.dataclass
class PreprocessConfig:
    # Which series to accept and how to treat imperfect ones (see preprocess/ingest/config.py).
    ingest: IngestConfig = dataclasses.field(default_factory=IngestConfig)
    # Voxel spacing (sx, sy, sz) in mm of the cached RAS+ grid; null keeps each image's own spacing.
    target_spacing: tuple[float, float, float] | None = (1.5, 1.5, 3.0)
    # CT: HU windows (lo, hi); each becomes one channel, lo -> 0 and hi -> 1, clipped (Merlin: -1000..1000).
    ct_windows: list[tuple[float, float]] = dataclasses.field(default_factory=lambda: [(-1000.0, 1000.0)])
    # MR: intensity percentiles (lo, hi) of the foreground mapped to 0 and 1, clipped (robust to outliers).
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    # MR intensity normalisation per volume and channel: "percentile" (mr_percentiles -> 0..1) or "zscore"
    # (nnU-Net's: foreground mean and standard deviation; mean -/+ mr_zscore_clip SD -> 0..1, clipped).
    mr_normalisation: Literal["percentile", "zscore"] = "percentile"
    # Standard deviations either side of the mean kept by "zscore" (0.5 is the mean, each SD 0.5 / clip).
    mr_zscore_clip: float = 5.0
    # MR: remove the coil's smooth intensity bias first (SimpleITK N4 on the resampled volume, fitted on a
    # 2x shrunk copy inside the foreground): the same tissue then has one intensity across the field.
    mr_bias_correction: bool = False
    # N4's convergence threshold per fitting level (ANTs' 0.001; 0.01 is about 6x faster, e.g. for a CPU demo).
    mr_bias_convergence: float = 0.001
    # Crop to the body (threshold, largest connected component) plus margin; the crop box is recorded.
    crop_foreground: bool = True
    # Margin (mm) kept around the body when cropping.
    crop_margin_mm: float = 10.0
    # CT body threshold (HU): voxels above it count as foreground (air is about -1000 HU).
    ct_foreground_hu: float = -500.0
    # MR foreground: above this fraction of the way from the lo to the hi whole-volume percentile.
    mr_foreground_fraction: float = 0.05
    # Pad/crop the cached array to exactly (X, Y, Z) voxels, centred on the foreground; null keeps the size.
    fixed_size: tuple[int, int, int] | None = None
    # Gaussian smoothing along an axis before downsampling it by more than antialias_factor (avoids aliasing).
    antialias: bool = True
    # Downsampling factor (new/old spacing) above which an axis is smoothed first.
    antialias_factor: float = 1.5
    # Training patch (X, Y, Z) in cached voxels: sizes the patch index and the HDF5 chunks.
    patch_size: tuple[int, int, int] = (64, 64, 32)
    # HDF5 chunk (X, Y, Z) of the image and label; null derives it from patch_size (about 16-128 KiB).
    chunk: tuple[int, int, int] | None = None
    # HDF5 codec: lz4/zstd (Blosc via hdf5plugin; readers `import hdf5plugin`), lzf, gzip or none.
    compression: Literal["lz4", "zstd", "lzf", "gzip", "none"] = "lz4"
    # Modality assumed for files that do not say (NIfTI without sidecar, NRRD, MHA): CT or MR.
    modality_default: Literal["CT", "MR"] = "CT"
    # Key for the pseudonymous ids (HMAC); null reads env VOL3D_ID_KEY (preferred: a flag shows in `ps`
    # and shell history). Never written, never hashed.
    id_key: str | None = None
    # Worker processes for the runner (0 = min(4, CPU cores)). Does not change the output.
    workers: int = 0

    def __post_init__(self) -> None:
        if self.target_spacing is not None:
            self.target_spacing = tuple(float(s) for s in self.target_spacing)
            if len(self.target_spacing) != 3 or min(self.target_spacing) <= 0:
                raise ConfigError(f"target_spacing must be 3 positive mm values, got {self.target_spacing}")
        self.ct_windows = [(float(lo), float(hi)) for lo, hi in self.ct_windows]
        if not self.ct_windows:
            raise ConfigError("ct_windows needs at least one (lo, hi) HU window, e.g. [[-1000, 1000]]")
        for lo, hi in self.ct_windows:
            if not hi > lo:
                raise ConfigError(f"ct_windows: window ({lo}, {hi}) must have hi > lo")
        lo, hi = self.mr_percentiles
        if not 0 <= lo < hi <= 100:
            raise ConfigError(f"mr_percentiles must satisfy 0 <= lo < hi <= 100, got {self.mr_percentiles}")
        if self.mr_normalisation not in ("percentile", "zscore"):
            raise ConfigError(f"mr_normalisation must be 'percentile' or 'zscore', got {self.mr_normalisation!r}")
        if not self.mr_zscore_clip > 0:
            raise ConfigError(f"mr_zscore_clip must be > 0 standard deviations, got {self.mr_zscore_clip}")
        if not 0 < self.mr_bias_convergence < 1:
            raise ConfigError(f"mr_bias_convergence must be in (0, 1), got {self.mr_bias_convergence}")
        if self.crop_margin_mm < 0:
            raise ConfigError(f"crop_margin_mm must be >= 0, got {self.crop_margin_mm}")
        if not 0 <= self.mr_foreground_fraction < 1:
            raise ConfigError(f"mr_foreground_fraction must be in [0, 1), got {self.mr_foreground_fraction}")
        for name in ("fixed_size", "patch_size", "chunk"):
            val = getattr(self, name)
            if val is not None and (len(val) != 3 or min(val) < 1):
                raise ConfigError(f"{name} must be 3 positive voxel counts (X, Y, Z), got {val}")
        if self.antialias_factor < 1:
            raise ConfigError(f"antialias_factor must be >= 1, got {self.antialias_factor}")
        if self.compression not in COMPRESSIONS:
            raise ConfigError(f"compression must be one of {list(COMPRESSIONS)}, got {self.compression!r}")
        self.modality_default = self.modality_default.upper()  # type: ignore[assignment]
        if self.modality_default not in ("CT", "MR"):
            raise ConfigError(f"modality_default must be CT or MR, got {self.modality_default!r}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0 (0 = min(4, CPU cores)), got {self.workers}")

    def hashed_fields(self) -> dict[str, Any]:
        """The fields that change what is written for a case, as plain JSON data."""
        data = {k: v for k, v in to_dict(self).items()
                if k not in _UNHASHED and not (k in _HASHED_WHEN_SET and v == _HASHED_WHEN_SET[k])}
        data["ingest"] = {k: v for k, v in data["ingest"].items() if k not in _UNHASHED_INGEST
                          and not (k in _HASHED_WHEN_SET_INGEST and v == _HASHED_WHEN_SET_INGEST[k])}
        return data

    def params_hash(self) -> str:
        """sha256 (hex) of the canonical JSON of :meth:`hashed_fields`: equal hash, equal output."""
        text = json.dumps(self.hashed_fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def public_dict(self) -> dict[str, Any]:
        """Everything, for ``params.json``, with ``id_key`` blanked (a secret never leaves the config)."""
        data = to_dict(self)
        data["id_key"] = None if self.id_key is None else "<set>"
        return data

    def effective_chunk(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """HDF5 chunk ``(X, Y, Z)`` for a cached array of spatial ``shape`` (see :func:`derive_chunk`)."""
        return derive_chunk(shape, self.patch_size, self.chunk)


def derive_chunk(
    shape: tuple[int, ...],
    patch_size: tuple[int, int, int],
    chunk: tuple[int, int, int] | None = None,
    itemsize: int = 2,
    max_bytes: int = 128 * 1024,
) -> tuple[int, int, int]:
    """Chunk ``(X, Y, Z)`` for one channel: ``chunk`` if given, else ``patch_size`` halved along its
    longest axis until one chunk is at most ``max_bytes``; never larger than ``shape``.

    Chunks no bigger than the patch mean a random patch read decompresses little
    that it does not use (nnU-Net sizes its blosc2 chunks from the patch too).
    """
    c = list(chunk if chunk is not None else patch_size)
    if chunk is None:
        while itemsize * c[0] * c[1] * c[2] > max_bytes and max(c) > 1:
            a = c.index(max(c))
            c[a] = (c[a] + 1) // 2
    return tuple(max(1, min(int(ci), int(n))) for ci, n in zip(c, shape[-3:], strict=True))  # type: ignore[return-value]


def read_config(path: str | Path) -> PreprocessConfig:
    """A :class:`PreprocessConfig` from a YAML preset, a ``preprocess.json`` or a cache's ``params.json``."""
    path = Path(path)
    if path.is_dir() and (path / "params.json").is_file():  # a cache directory
        path = path / "params.json"
    if not path.is_file():
        raise InputError(f"preprocessing config {path} not found; pass a configs/preprocess/*.yaml preset, "
                         "a cache's params.json or the cache directory")
    if path.suffix.lower() in (".yaml", ".yml"):
        return load_yaml(PreprocessConfig, path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not a readable JSON file ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict):  # a cache's params.json
        data = data["config"]
    if not isinstance(data, dict):
        raise InputError(f"{path} does not hold a preprocessing config (a JSON mapping of PreprocessConfig fields)")
    # the id key is a secret never written anywhere; the worker count does not change the output
    return from_dict(PreprocessConfig, {**data, "id_key": None, "workers": 0}, where=str(path))
