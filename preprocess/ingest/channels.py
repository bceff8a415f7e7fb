"""Multi-sequence MR studies as one multi-channel case (``ingest.sequence_channels``).

A brain study holds a T1, a T2 and a FLAIR series of one head, each on its own grid (a 3D
sagittal T1 at 1 mm, axial 2D T2/FLAIR at 0.5 x 0.5 x 5 mm ...). Models read them best as the
channels of one volume (BraTS, nnU-Net). :func:`combine` groups the scanned series of each study
by pattern, one per channel, into one candidate keyed by its first channel's series;
:func:`stack` resamples the other sequences onto the first one's grid through world coordinates
(the series of one study share the scanner's frame of reference) and stacks them as ``(C, X, Y, Z)``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from preprocess import reasons
from preprocess.types import Candidate, Image, SeriesError


def channel_of(c: Candidate, patterns: Sequence[str]) -> int | None:
    """Index of the first pattern any of the series' names (description, protocol, sequence) matches."""
    names = [n.lower() for n in c.names if n]
    for i, pattern in enumerate(patterns):
        if any(fnmatch.fnmatch(n, pattern.lower()) for n in names):
            return i
    return None


def _skipped(c: Candidate, reason: str, detail: str) -> Candidate:
    return dataclasses.replace(c, status="skipped", reason=reason, detail=detail)


def combine(rows: list[Candidate], patterns: Sequence[str]) -> list[Candidate]:
    """Rows with each study's sequences merged into one candidate per study (see the module docstring).

    Only ok image candidates take part; other rows pass unchanged. Details name series by their
    files, never by a description (it may hold an identifier).
    """
    out: list[Candidate] = []
    studies: dict[str, list[tuple[int, Candidate]]] = defaultdict(list)
    wanted = f"ingest.sequence_channels {list(patterns)}"
    for c in rows:
        if c.status != "ok" or c.kind == "file":
            out.append(c)
            continue
        ch = channel_of(c, patterns)
        where = c.source[0] if len(c.source) == 1 else f"series in {c.source[0].rsplit('/', 1)[0]}/"
        if ch is None:
            out.append(_skipped(c, reasons.NOT_SELECTED, f"{where}: its series description, protocol and sequence "
                                f"name match none of {wanted}; to use it, add a pattern that does."))  # fmt: skip
            continue
        # a study without a StudyInstanceUID (a bare NIfTI) is its own study
        studies[c.identity.study_uid or f"\0{c.source[0]}"].append((ch, c))
    for members in studies.values():
        by_channel: dict[int, list[Candidate]] = defaultdict(list)
        for ch, c in members:
            by_channel[ch].append(c)
        missing = [patterns[i] for i in range(len(patterns)) if i not in by_channel]
        several = [patterns[i] for i, cs in by_channel.items() if len(cs) > 1]
        files = sorted(f for _, c in members for f in c.source)
        if missing or several:
            if missing:
                reason = reasons.MISSING_CHANNEL
                why = (f"no series of this study matches {', '.join(repr(p) for p in missing)} of {wanted}; "
                       "add the missing sequence, or leave its pattern out")
            else:
                reason = reasons.AMBIGUOUS_CHANNEL
                why = (f"several series of this study match {', '.join(repr(p) for p in several)} of {wanted}; "
                       "narrow the pattern (e.g. '*t1*mprage*') so that one series matches each channel")
            for _, c in members:
                out.append(_skipped(c, reason, f"{c.source[0]} (one of {len(files)} files of its study): {why}."))
            continue
        first = by_channel[0][0]
        others = [by_channel[i][0] for i in range(1, len(patterns))]
        out.append(dataclasses.replace(
            first,
            source=[*first.source, *(f for c in others for f in c.source)],
            source_files=[*first.source_files, *(f for c in others for f in c.source_files)],
            label=f"{first.label} + {len(others)} sequence{'s' if len(others) != 1 else ''}",
            extra={**first.extra, "channels": others},
        ))  # fmt: skip
    return out


def stack(reference: Image, others: Sequence[Image], names: Sequence[str] = ()) -> Image:
    """``reference`` with each of ``others`` resampled onto its grid (trilinear, through world mm) as
    further channels: ``array`` ``(1 + len(others), X, Y, Z)``. Voxels a sequence does not cover are 0
    there; one that covers less than half of the reference's voxels fails (not the same head).
    """
    from scipy import ndimage

    ref = np.asarray(reference.array, dtype=np.float32)
    if ref.ndim != 3:
        raise SeriesError(reasons.PROCESSING_ERROR, "the first channel of a sequence set must be one 3D volume")
    channels = [ref]
    flags = list(reference.flags)
    for n, img in enumerate(others, start=1):
        arr = np.asarray(img.array, dtype=np.float32)
        if arr.ndim != 3:
            raise SeriesError(reasons.PROCESSING_ERROR, f"channel {n + 1} of a sequence set is not one 3D volume")
        m = np.linalg.inv(np.asarray(img.affine, float)) @ np.asarray(reference.affine, float)
        # anti-aliasing: smooth a finer sequence down to about the reference's coarsest voxel first
        step = np.abs(m[:3, :3]).max(axis=1)  # this sequence's voxels per reference voxel, per axis
        sigma = np.where(step > 1.5, (step - 1.0) / 2.0, 0.0)
        if sigma.any():
            arr = ndimage.gaussian_filter(arr, sigma)
        out = ndimage.affine_transform(arr, m[:3, :3], offset=m[:3, 3], output_shape=ref.shape, order=1,
                                       mode="constant", cval=np.nan)  # fmt: skip
        covered = np.isfinite(out)
        if covered.mean() < 0.5:
            name = names[n] if n < len(names) else f"channel {n + 1}"
            raise SeriesError(reasons.INCONSISTENT_POSITIONS,
                              f"{name} covers {covered.mean():.0%} of the first channel's volume: the sequences "
                              "do not image the same region; check that they belong to one study")  # fmt: skip
        np.nan_to_num(out, copy=False, nan=0.0)
        channels.append(out)
        flags.extend(f for f in img.flags if f not in flags)
    return Image(array=np.stack(channels), affine=np.asarray(reference.affine, float), modality=reference.modality,
                 flags=flags)


__all__ = ["channel_of", "combine", "stack"]
