"""Ingest policy: what to skip, what to fail, and how to treat imperfect series."""

from __future__ import annotations

import dataclasses
from typing import Literal

from preprocess.errors import ConfigError


@dataclasses.dataclass
class IngestConfig:
    # Modalities turned into volumes; other image series are skipped (UNSUPPORTED_MODALITY).
    modalities: tuple[str, ...] = ("CT", "MR")
    # Series with fewer slices than this are skipped (TOO_FEW_SLICES); 2D images are IMAGE_2D.
    min_slices: int = 8
    # Skip series whose ImageType says DERIVED or SECONDARY (MPRs, MIPs, secondary captures).
    skip_derived: bool = True
    # Gantry tilt (slices sheared along the stacking direction): fail, or resample onto a regular grid and flag.
    tilt_policy: Literal["fail", "resample"] = "fail"
    # Tilt below this many degrees is treated as none.
    tilt_tolerance_deg: float = 0.5
    # Uneven slice spacing / missing slices: fail, or resample onto a regular grid and flag.
    uneven_policy: Literal["fail", "resample"] = "fail"
    # Relative deviation of a slice gap from the median gap that counts as uneven.
    spacing_tolerance: float = 0.05
    # 4D NIfTI: one volume per time point, only the first, or fail the file.
    four_d_policy: Literal["split", "first", "reject"] = "first"
    # Glob patterns (matched against the path relative to the input root, or the file name) of files
    # ingest ignores without a row, e.g. ("labels/*", "*.csv") for side tables kept inside the export.
    exclude: tuple[str, ...] = ()
    # Archive limits (a zip over any of them is failed ARCHIVE_LIMIT, nothing of it unpacked beyond
    # the limit): total unpacked bytes, unpacked/packed ratio of a member, members, zips inside zips.
    max_archive_bytes: int = 64 << 30
    max_archive_ratio: float = 200.0
    max_archive_members: int = 500_000
    max_archive_depth: int = 3
    # Largest volume (voxels) a header may announce; bigger ones fail before any allocation.
    max_voxels: int = 1 << 30
    # Keep only the DICOM series whose SeriesDescription, ProtocolName or SequenceName matches one of these
    # case-insensitive glob patterns (e.g. ["*t1*", "*flair*"] for a T1/FLAIR cohort); others are skipped
    # NOT_SELECTED. Empty: every series.
    series_include: tuple[str, ...] = ()
    # Combine the MR sequences of one study into the channels of one case: one case-insensitive glob per
    # channel, in channel order (e.g. ["*t1*", "*t2*", "*flair*"]), matched like series_include; a series
    # counts for the first pattern it matches. Each study gives one case, keyed by its first channel's
    # series, with the other sequences resampled onto that series' grid (world coordinates). Studies
    # without exactly one series per pattern are skipped MISSING_CHANNEL / AMBIGUOUS_CHANNEL; series that
    # match no pattern NOT_SELECTED. Empty: every series is its own case.
    sequence_channels: tuple[str, ...] = ()
    # Philips PAR/REC intensities: "dv" the values the scanner console displays (nibabel's default), "fp"
    # the floating-point values (comparable across scans, e.g. for quantitative maps).
    parrec_scaling: Literal["dv", "fp"] = "dv"

    def __post_init__(self) -> None:
        if self.min_slices < 1:
            raise ConfigError(f"ingest.min_slices must be >= 1, got {self.min_slices}")
        if not 0 < self.spacing_tolerance < 1:
            raise ConfigError(f"ingest.spacing_tolerance must be in (0, 1), got {self.spacing_tolerance}")
        if self.tilt_tolerance_deg < 0:
            raise ConfigError("ingest.tilt_tolerance_deg must be >= 0")
        for name in ("max_archive_bytes", "max_archive_members", "max_voxels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ingest.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_archive_ratio <= 1 or self.max_archive_depth < 0:
            raise ConfigError("ingest.max_archive_ratio must be > 1 and ingest.max_archive_depth >= 0")
        if self.parrec_scaling not in ("dv", "fp"):
            raise ConfigError(f"ingest.parrec_scaling must be 'dv' or 'fp', got {self.parrec_scaling!r}")
        self.modalities = tuple(m.upper() for m in self.modalities)
        self.series_include = tuple(str(p) for p in self.series_include)
        self.sequence_channels = tuple(str(p) for p in self.sequence_channels)
        if len(set(p.lower() for p in self.sequence_channels)) != len(self.sequence_channels):
            raise ConfigError(f"ingest.sequence_channels has a pattern twice: {list(self.sequence_channels)}")
        self.exclude = tuple(self.exclude)
