"""Stable reason codes for manifest rows (``status`` skipped/failed).

Codes are part of the public contract: scripts filter on them. Add new ones at
the end of a section; never rename one.
"""

from __future__ import annotations

# --- skipped by policy (exit code 0)
NOT_IMAGE = "NOT_IMAGE"  # SR, RTSTRUCT, presentation state, DICOMDIR, other non-image object
LOCALIZER = "LOCALIZER"  # scout / topogram / localizer series
IMAGE_2D = "IMAGE_2D"  # a single 2D image (CR, DX, secondary capture ...)
TOO_FEW_SLICES = "TOO_FEW_SLICES"  # fewer slices than config.min_slices
DERIVED = "DERIVED"  # ImageType DERIVED/SECONDARY, skipped when config.skip_derived
UNSUPPORTED_MODALITY = "UNSUPPORTED_MODALITY"  # modality not in config.modalities
NOT_MEDICAL_FILE = "NOT_MEDICAL_FILE"  # a file that is neither DICOM nor a known image format
EXTRA_VOLUME_4D = "EXTRA_VOLUME_4D"  # 4D input, volumes dropped by the 'first' policy
NOT_REGULAR_FILE = "NOT_REGULAR_FILE"  # named pipe, socket, device, or a symlink out of the input / in a loop
NOT_SELECTED = "NOT_SELECTED"  # a series whose description/protocol/sequence matches none of ingest.series_include
MISSING_CHANNEL = "MISSING_CHANNEL"  # ingest.sequence_channels: the study lacks a series for one channel
AMBIGUOUS_CHANNEL = "AMBIGUOUS_CHANNEL"  # ingest.sequence_channels: several series of a study match one channel

# --- failed (exit code 3)
UNREADABLE = "UNREADABLE"  # truncated / corrupt file, header cannot be parsed
NO_DECODER = "NO_DECODER"  # compressed transfer syntax without an installed decoder
INCONSISTENT_ORIENTATION = "INCONSISTENT_ORIENTATION"
INCONSISTENT_SPACING = "INCONSISTENT_SPACING"  # PixelSpacing differs within a series
INCONSISTENT_SHAPE = "INCONSISTENT_SHAPE"  # Rows/Columns differ within a series
MISSING_SLICES = "MISSING_SLICES"  # a gap in slice positions (one or more slices absent)
UNEVEN_SLICE_SPACING = "UNEVEN_SLICE_SPACING"  # slice spacing varies (no missing slice)
GANTRY_TILT = "GANTRY_TILT"  # slice normal not parallel to the stacking direction
DUPLICATE_SLICES = "DUPLICATE_SLICES"  # same position, different pixels
MISSING_GEOMETRY = "MISSING_GEOMETRY"  # no ImagePositionPatient/Orientation/PixelSpacing
MULTIFRAME_UNSUPPORTED = "MULTIFRAME_UNSUPPORTED"  # enhanced multi-frame without usable per-frame geometry
REJECTED_4D = "REJECTED_4D"  # 4D input under the 'reject' policy
LABEL_MISMATCH = "LABEL_MISMATCH"  # label mask geometry does not match its image
PROCESSING_ERROR = "PROCESSING_ERROR"  # unexpected error while transforming/writing (a bug)
INCONSISTENT_POSITIONS = "INCONSISTENT_POSITIONS"  # slice positions do not lie on one line
NO_ORIENTATION = "NO_ORIENTATION"  # NIfTI with sform_code == qform_code == 0: world position unknown
ARCHIVE_LIMIT = "ARCHIVE_LIMIT"  # zip over the size / ratio / member-count / nesting limits (a zip bomb?)
TOO_LARGE = "TOO_LARGE"  # a header announces more voxels than ingest.max_voxels (checked before allocating)

FAIL_REASONS = frozenset(
    {
        UNREADABLE,
        NO_DECODER,
        INCONSISTENT_ORIENTATION,
        INCONSISTENT_SPACING,
        INCONSISTENT_SHAPE,
        MISSING_SLICES,
        UNEVEN_SLICE_SPACING,
        GANTRY_TILT,
        DUPLICATE_SLICES,
        MISSING_GEOMETRY,
        MULTIFRAME_UNSUPPORTED,
        REJECTED_4D,
        LABEL_MISMATCH,
        PROCESSING_ERROR,
        INCONSISTENT_POSITIONS,
        NO_ORIENTATION,
        ARCHIVE_LIMIT,
        TOO_LARGE,
    }
)
