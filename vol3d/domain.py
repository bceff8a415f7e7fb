"""Is a volume like the ones a run was trained on? A profile of the training data and a check.

A model answers confidently about anything it is shown: asked "Where is the liver lesion?" about
a brain MRI, a CT-trained model still draws a box. :func:`profile` summarises the training cases
(modalities, per-channel intensity statistics of the model input, and, for a model with
perception, which organs the training volumes have and how large); :meth:`DomainProfile.check`
compares one prepared volume (and what the perception found in it) with that profile and
returns the reasons it does not fit. ``vol3d ask``, :meth:`vol3d.inference.Vol3DPipeline.ask` and
the notebooks print them, and a grounded answer about an out-of-domain volume gives no box.

Saved beside the weights as ``RUN/model/domain.json`` (:data:`vol3d.rundir.DOMAIN_NAME`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: Flags of ``preprocess.transforms`` that say the intensities are not what the modality promises.
BAD_FLAGS = ("CT_NOT_HU", "NO_FOREGROUND")
#: How far (in training standard deviations) a channel's mean may lie from the training mean.
MAX_INTENSITY_Z = 6.0
#: An organ present in at least this share of training volumes is expected; missing or far off in
#: size (outside ``[lo / ORGAN_FACTOR, hi * ORGAN_FACTOR]`` of the training range) it is a misfit.
EXPECTED_ORGAN_SHARE = 0.9
ORGAN_FACTOR = 3.0


@dataclasses.dataclass
class DomainProfile:
    """What the training volumes looked like (plain JSON data)."""

    modalities: list[str]
    n_cases: int
    channel_mean: list[float]  # mean over training cases of each model-input channel's mean
    channel_std: list[float]  # their standard deviation across cases
    organ_share: dict[str, float] = dataclasses.field(default_factory=dict)  # share of cases with the organ
    organ_ml: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # [p5, p95] volume (mL)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DomainProfile:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> DomainProfile:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def check(self, volume: np.ndarray, modality: str, flags: Sequence[str] = (),
              organs_ml: Mapping[str, float] | None = None) -> list[str]:
        """Why a prepared volume ``(C, X, Y, Z)`` does not look like the training data ([] when it does).

        ``organs_ml``: organ volumes the perception found in it (mL), for a model with perception.
        """
        reasons = []
        if self.modalities and modality and modality not in self.modalities:
            reasons.append(f"modality {modality}, but the run was trained on {', '.join(self.modalities)}")
        for flag in flags:
            if flag in BAD_FLAGS:
                reasons.append(f"ingest flag {flag} (the intensities do not look like the modality's)")
        vol = np.asarray(volume, dtype=np.float32)
        if vol.ndim == 4 and len(self.channel_mean) == vol.shape[0]:
            means = vol.reshape(vol.shape[0], -1).mean(axis=1)
            for c, (m, mu, sd) in enumerate(zip(means, self.channel_mean, self.channel_std, strict=True)):
                z = abs(float(m) - mu) / max(sd, 1e-3)
                if z > MAX_INTENSITY_Z:
                    reasons.append(f"channel {c} mean {m:.3f} is {z:.0f} standard deviations from the training "
                                   f"volumes' {mu:.3f}")
        if organs_ml is not None:
            off = []
            for organ, share in self.organ_share.items():
                if share < EXPECTED_ORGAN_SHARE or organ not in self.organ_ml:
                    continue
                lo, hi = self.organ_ml[organ]
                ml = float(organs_ml.get(organ, 0.0))
                if not lo / ORGAN_FACTOR <= ml <= hi * ORGAN_FACTOR:
                    off.append(f"{organ} {ml:.0f} mL (training {lo:.0f}-{hi:.0f})")
            expected = [o for o, s in self.organ_share.items() if s >= EXPECTED_ORGAN_SHARE]
            if expected and len(off) * 2 > len(expected):  # most expected organs off: not one large spleen
                reasons.append("the organs found do not match the training body region: " + "; ".join(off))
        return reasons


def profile(cases: Iterable[Mapping[str, Any]], organ_volumes: Iterable[Mapping[str, float]] | None = None,
            ) -> DomainProfile:
    """The profile of training cases (CacheDataset items: ``image (C, X, Y, Z)`` and ``modality``),
    with their organ volumes in mL (``organ_volumes``, one mapping per case) when the model perceives organs."""
    modalities: set[str] = set()
    means = []
    for case in cases:
        img = np.asarray(case["image"], dtype=np.float32)
        means.append(img.reshape(img.shape[0], -1).mean(axis=1))
        if case.get("modality"):
            modalities.add(str(case["modality"]))
    arr = np.stack(means) if means else np.zeros((0, 1))
    out = DomainProfile(sorted(modalities), len(means), arr.mean(axis=0).tolist() if len(arr) else [],
                        arr.std(axis=0).tolist() if len(arr) else [])
    if organ_volumes is not None:
        rows = list(organ_volumes)
        names = sorted({k for r in rows for k in r})
        for name in names:
            vals = np.array([r.get(name, 0.0) for r in rows], dtype=float)
            present = vals[vals > 0]
            out.organ_share[name] = float((vals > 0).mean()) if len(vals) else 0.0
            if len(present):
                out.organ_ml[name] = [float(np.percentile(present, 5)), float(np.percentile(present, 95))]
    return out
