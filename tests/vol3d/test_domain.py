"""Out-of-domain checks: a profile of the training volumes and what a new volume must match."""

from __future__ import annotations

import numpy as np
import pytest

from vol3d.domain import DomainProfile, profile


def _cases(n: int = 20, level: float = 0.4) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"image": (level + 0.02 * rng.standard_normal((2, 8, 8, 4))).astype(np.float32), "modality": "CT"}
            for _ in range(n)]


def _organs(n: int = 20) -> list[dict]:
    rng = np.random.default_rng(1)
    return [{"liver": float(rng.uniform(1200, 1800)), "spleen": float(rng.uniform(150, 400)),
             "lesion_free_organ": 0.0 if i % 3 else 50.0} for i in range(n)]


def test_a_training_like_volume_passes_and_each_misfit_is_named(tmp_path):
    prof = profile(_cases(), _organs())
    assert prof.modalities == ["CT"] and prof.n_cases == 20 and len(prof.channel_mean) == 2
    assert prof.organ_share["liver"] == 1.0 and prof.organ_share["lesion_free_organ"] < 0.5
    prof.save(tmp_path / "domain.json")
    prof = DomainProfile.load(tmp_path / "domain.json")
    like = _cases(1)[0]["image"]
    assert prof.check(like, "CT", [], {"liver": 1500, "spleen": 300}) == []
    # another modality, a non-HU flag, intensities far off, organs of another body region
    assert "modality MR" in prof.check(like, "MR")[0]
    assert "CT_NOT_HU" in prof.check(like, "CT", ["CT_NOT_HU", "OBLIQUE"])[0]
    bright = _cases(1, level=0.95)[0]["image"]
    assert any("standard deviations" in r for r in prof.check(bright, "CT"))
    brain = prof.check(like, "CT", [], {"liver": 0.0, "spleen": 2.0})
    assert len(brain) == 1 and "body region" in brain[0] and "liver 0 mL" in brain[0]
    # one organ a bit off is no reason (a large spleen is a finding, not another body region)
    assert prof.check(like, "CT", [], {"liver": 1500, "spleen": 2000}) == []


def test_profile_without_perception_and_without_cases():
    prof = profile(_cases(3))
    assert prof.organ_share == {} and prof.check(_cases(1)[0]["image"], "CT", [], {"liver": 0.0}) == []
    empty = profile([])
    assert empty.n_cases == 0 and empty.check(np.zeros((2, 4, 4, 4)), "CT") == []
    with pytest.raises(TypeError):
        DomainProfile.from_dict({"modalities": ["CT"]})  # required fields missing
