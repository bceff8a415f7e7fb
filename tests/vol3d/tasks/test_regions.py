"""Regions and the findings digest: ground truth of a case, the same from perception maps, packing."""

from __future__ import annotations

import numpy as np
import pytest

from preprocess.errors import ConfigError, InputError
from preprocess.geometry import box_iou
from vol3d.protocol import ORGAN_TOKEN, REGION_TOKEN
from vol3d.tasks.regions import (
    CANDIDATE_MIN_EVIDENCE,
    LabelSpec,
    Perceived,
    candidate_regions,
    clean_organ_map,
    digest_text,
    look_again_windows,
    matching_regions,
    pack_regions,
    perceived_from_case,
    perceived_from_maps,
    perceived_summary,
    region_feature_dim,
    size_text,
    stitch_looks,
    summary_dim,
    summary_score_columns,
)

SHAPE = (24, 20, 12)
LABELS = LabelSpec(("background", "liver", "kidney_left", "spleen", "lesion"), ("lesion",))
VOCAB = {
    "liver_lesion": {"text": "liver lesion", "organ": "liver", "nouns": ["lesion"], "organ_words": ["liver"],
                     "code": "K76.89"},
    "kidney_cyst": {"text": "kidney cyst", "organ": "kidney", "nouns": ["cyst"], "organ_words": ["kidney"]},
    "splenomegaly": {"text": "splenomegaly", "organ": "spleen", "phrases": ["splenomegaly"], "countable": False},
}


def make_case(with_label: bool = True) -> dict:
    """A liver with two lesions (a big one and a small one), a left kidney with a cyst cut off at the
    border (10% visible), a spleen with splenomegaly."""
    label = np.zeros(SHAPE, np.uint8)
    label[2:14, 2:14, 2:10] = 1  # liver
    label[16:22, 2:8, 2:8] = 2  # kidney_left
    label[2:8, 15:19, 2:8] = 3  # spleen
    label[4:8, 4:7, 4:7] = 4  # the larger lesion: 4 x 3 x 3 voxels
    label[10:12, 10:12, 3:5] = 4  # the smaller one: 2 x 2 x 2
    boxes = np.array([[9.5, 9.5, 2.5, 11.5, 11.5, 4.5],  # small lesion first: the digest sorts by size
                      [3.5, 3.5, 3.5, 7.5, 6.5, 6.5],
                      [20.5, 6.5, 4.5, 22.5, 7.5, 5.5],  # kidney cyst, mostly outside
                      [1.5, 14.5, 1.5, 7.5, 18.5, 7.5]], float)
    case = {"id": "c_x", "image": np.zeros((1, *SHAPE), np.float32), "label": label if with_label else None,
            "has_label": with_label, "boxes_vox": boxes,
            "box_findings": ["liver_lesion", "liver_lesion", "kidney_cyst", "splenomegaly"],
            "box_organs": ["liver", "liver", "kidney_left", "spleen"], "boxes_visible": [1.0, 1.0, 0.1, 1.0],
            "spacing": (2.0, 2.0, 4.0)}
    return case


def test_label_spec_checks_and_organ_lookup():
    assert LABELS.organs == ("background", "liver", "kidney_left", "spleen")
    assert LABELS.organ_lut().tolist() == [0, 1, 2, 3, -1]
    with pytest.raises(ConfigError, match="not among the label names"):
        LabelSpec(("background", "liver"), ("lesion",))
    with pytest.raises(ConfigError, match="background"):
        LabelSpec(("background", "liver"), ("background",))


def test_ground_truth_regions_targets_and_digest():
    case = make_case()
    perceived, targets = perceived_from_case(case, VOCAB, LABELS)
    # findings in vocabulary order, the largest first; the cut-off cyst is no region but is reported
    assert [r.name for r in perceived.findings] == ["liver_lesion", "liver_lesion"]
    assert np.allclose(perceived.findings[0].box, case["boxes_vox"][1])
    assert perceived.partial == {"kidney_cyst": 1}
    assert perceived.conditions == {"splenomegaly": 1.0}
    assert [r.name for r in perceived.organs] == ["liver", "kidney_left", "spleen"]
    # a lesion belongs to the organ around it: the liver's volume counts its lesions
    liver = perceived.organs[0]
    assert liver.volume_ml == pytest.approx(12 * 12 * 8 * 16 / 1000)
    assert (targets.organ[case["label"] == 4] == 1).all()
    # region map: each lesion's voxels carry its index in the digest order; types on finding voxels only
    assert (targets.region_map[4:8, 4:7, 4:7] == 0).all() and (targets.region_map[10:12, 10:12, 3:5] == 1).all()
    assert int((targets.region_map >= 0).sum()) == 4 * 3 * 3 + 2 * 2 * 2
    assert set(np.unique(targets.finding_type)) == {-100, 0}
    assert targets.finding.sum() == (case["label"] == 4).sum()
    text = digest_text(perceived, VOCAB)
    assert text.count(REGION_TOKEN) == 2 and text.count(ORGAN_TOKEN) == 3
    assert "liver lesion x2: <reg> 8 x 6 x 12 mm, liver; <reg> 4 x 4 x 8 mm, liver." in text
    assert "kidney cyst: 1 partly outside the volume." in text and "Splenomegaly: yes." in text
    assert "spleen <org> " in text and "mm" in text.split("spleen <org>")[1].split(";")[0]  # spleen length given


def test_prediction_from_perfect_maps_reproduces_the_ground_truth():
    case = make_case()
    truth, targets = perceived_from_case(case, VOCAB, LABELS)
    types = np.zeros((2, *SHAPE))
    types[0] = targets.finding_type == 0
    pred, region_map = perceived_from_maps(targets.organ, targets.finding, types, [0.9], case["spacing"],
                                           VOCAB, LABELS)
    assert [r.name for r in pred.findings] == [r.name for r in truth.findings]
    for p, t in zip(pred.findings, truth.findings, strict=True):
        assert box_iou(p.box[None], t.box[None])[0, 0] == pytest.approx(1.0)
        assert p.organ == "liver" and p.score == pytest.approx(1.0)
    assert (region_map == targets.region_map).all()
    truth.partial = {}  # the perception cannot know what lies outside the volume
    assert digest_text(pred, VOCAB) == digest_text(truth, VOCAB)


def test_a_finding_lies_in_the_organ_its_type_lives_in_when_that_organ_is_beside_it():
    """A liver lesion at the liver's border with the spleen, mostly surrounded by spleen: the organ named is
    the liver (the type's home organ); a kidney cyst with no kidney near it keeps the commonest organ."""
    organ = np.zeros(SHAPE, np.int64)
    organ[2:14, 2:14, 2:10] = 1  # liver
    organ[14:22, 2:14, 2:10] = 3  # spleen, beside it along x
    organ[20:24, 15:20, 2:10] = 2  # left kidney, far from both findings
    prob = np.zeros(SHAPE)
    prob[13:17, 5:8, 4:7] = 0.9  # the lesion: 1 column in the liver, 3 in the spleen
    prob[4:7, 4:7, 4:7] = 0.9  # the cyst, inside the liver
    types = np.zeros((2, *SHAPE))
    types[0, 13:17] = 1.0  # liver lesion
    types[1, :7] = 1.0  # kidney cyst
    pred, _ = perceived_from_maps(organ, prob, types, [0.1], (1, 1, 1), VOCAB, LABELS)
    where = {r.name: r.organ for r in pred.findings}
    assert where == {"liver_lesion": "liver", "kidney_cyst": "liver"}
    organ[12:14] = 3  # no liver voxel under or next to the lesion any more
    pred, _ = perceived_from_maps(organ, prob, types, [0.1], (1, 1, 1), VOCAB, LABELS)
    assert {r.name: r.organ for r in pred.findings}["liver_lesion"] == "spleen"
    # an export that names the sides of its organs in its own words: "ren_sinister" is a side of "ren"
    foreign = LabelSpec(("background", "ren_sinister", "lien", "tumour"), ("tumour",))
    cyst = {"ren_cyst": {"text": "renal cyst", "organ": "ren", "phrases": ["renal cyst"]}}
    organ = np.zeros(SHAPE, np.int64)
    organ[2:14] = 1  # ren_sinister
    organ[14:22] = 2  # lien, beside it along x
    prob = np.zeros(SHAPE)
    prob[13:17, 5:8, 4:7] = 0.9  # 1 column in the kidney, 3 in the spleen
    pred, _ = perceived_from_maps(organ, prob, np.ones((1, *SHAPE)), [], (1, 1, 1), cyst, foreign)
    assert [r.organ for r in pred.findings] == ["ren_sinister"]


def test_prediction_keeps_the_most_confident_findings():
    prob = np.zeros(SHAPE)
    prob[2:4, 2:4, 2:4] = 0.6
    prob[10:12, 10:12, 6:8] = 0.95
    types = np.zeros((2, *SHAPE))
    types[1] = 1.0  # kidney cysts
    pred, region_map = perceived_from_maps(None, prob, types, [0.1], (1, 1, 1), VOCAB, None, max_findings=1)
    assert len(pred.findings) == 1 and pred.findings[0].name == "kidney_cyst"
    assert pred.findings[0].score == pytest.approx(0.95) and pred.organs == []
    assert (region_map[10:12, 10:12, 6:8] == 0).all() and (region_map[2:4, 2:4, 2:4] == -1).all()
    assert "Splenomegaly: no." in digest_text(pred, VOCAB)


def test_stray_organ_fragments_are_dropped_before_the_organ_box_is_read():
    case = make_case()
    _, targets = perceived_from_case(case, VOCAB, LABELS)
    noisy = targets.organ.copy()
    noisy[12, 12, 8] = 3  # one voxel of "spleen" inside the liver, far from the spleen
    raw, _ = perceived_from_maps(noisy, np.zeros(SHAPE), np.zeros((2, *SHAPE)), [0.0], (1, 1, 1), VOCAB, LABELS)
    cleaned = clean_organ_map(noisy, 0.2)
    fixed, _ = perceived_from_maps(cleaned, np.zeros(SHAPE), np.zeros((2, *SHAPE)), [0.0], (1, 1, 1), VOCAB, LABELS)
    spleen = {r.name: r for r in fixed.organs}["spleen"]
    assert spleen.box.tolist() == [1.5, 14.5, 1.5, 7.5, 18.5, 7.5]  # the spleen alone
    assert {r.name: r for r in raw.organs}["spleen"].box[3] == 12.5  # the stray voxel stretched it
    assert cleaned[12, 12, 8] == 0 and (cleaned[noisy != 3] == noisy[noisy != 3]).all()
    assert (clean_organ_map(noisy, 0.0) == noisy).all()
    split = targets.organ.copy()
    split[10:12] = 0  # the liver cut in two halves of similar size: a class in two large parts keeps both
    assert (clean_organ_map(split, 0.2) == split).all()


def test_box_only_cases_get_an_inscribed_ellipsoid_whose_box_is_the_box():
    case = make_case(with_label=False)
    perceived, targets = perceived_from_case(case, VOCAB, LABELS)
    assert targets.organ is None and perceived.organs == []
    for i, region in enumerate(perceived.findings):
        idx = np.argwhere(targets.region_map == i)
        mask_box = np.concatenate([idx.min(0) - 0.5, idx.max(0) + 0.5])
        assert np.allclose(mask_box, region.box)


def test_unknown_findings_and_label_values_are_named():
    case = make_case()
    case["box_findings"] = ["liver_lesion", "liver_lesion", "kidney_cyst", "adrenal_mass"]
    with pytest.raises(InputError, match="adrenal_mass"):
        perceived_from_case(case, VOCAB, LABELS)
    case = make_case()
    case["label"] = case["label"].copy()
    case["label"][0, 0, 0] = 7
    with pytest.raises(InputError, match="value 7"):
        perceived_from_case(case, VOCAB, LABELS)


def test_packing_matching_and_summary():
    case = make_case()
    perceived, targets = perceived_from_case(case, VOCAB, LABELS)
    empty, _ = perceived_from_maps(None, np.zeros(SHAPE), np.zeros((2, *SHAPE)), [0.0], (1, 1, 1), VOCAB, None)
    packed = pack_regions([perceived, empty], [targets.region_map, np.full(SHAPE, -1)], [targets.organ, None],
                          SHAPE, VOCAB, LABELS)
    assert packed["kind"].tolist() == [[0, 0, 1, 1, 1], [-1] * 5]
    assert packed["index"][0].tolist() == [0, 1, 1, 2, 3]  # findings by region index, organs by class
    assert packed["meta"].shape == (2, 5, region_feature_dim(VOCAB, LABELS))
    assert packed["box"][0, 0].tolist() == pytest.approx([4 / 24, 4 / 20, 4 / 12, 8 / 24, 7 / 20, 7 / 12])
    assert packed["summary"].shape == (2, summary_dim(VOCAB, LABELS))
    s = perceived_summary(perceived, VOCAB, LABELS)
    assert s[:4].tolist() == pytest.approx([1.0, np.log1p(2), 0.0, 0.0]) and s[4] == 1.0
    # a grounding answer about both lesions points at regions 0 and 1; about the spleen, at its organ
    assert matching_regions(perceived, case["boxes_vox"][:2]) == [0, 1]
    assert matching_regions(perceived, case["boxes_vox"][3:]) == [4]


def test_each_code_finds_the_summary_column_of_its_findings_score():
    vocab = {**VOCAB, "splenomegaly": {**VOCAB["splenomegaly"], "code": "R16.1"}}
    case = make_case()
    perceived, _ = perceived_from_case(case, vocab, LABELS)
    columns = summary_score_columns(vocab, [" k76.89", "R16.1", "I10"])
    assert columns == [0, 4, -1]  # liver lesion's best score; splenomegaly's probability; no finding's code
    s = perceived_summary(perceived, vocab, LABELS)
    assert s[columns[0]] == 1.0 and s[columns[1]] == 1.0  # both present in this case's truth


def test_a_finding_found_nowhere_keeps_its_strongest_voxel_as_evidence_for_the_ehr_prior():
    """Below the finding threshold there is no region, but the strongest voxel of each type is kept: the
    EHR prior's version of the summary scores a missed finding by it (up to 0.5), the head's keeps 0."""
    finding = np.zeros(SHAPE)
    finding[5, 5, 5] = 0.3  # a faint liver lesion: under the threshold
    types = np.zeros((2, *SHAPE))
    types[0] = 1.0
    faint, _ = perceived_from_maps(None, finding, types, [0.0], (1, 1, 1), VOCAB, None)
    assert faint.findings == [] and faint.evidence == pytest.approx({"liver_lesion": 0.3, "kidney_cyst": 0.0})
    finding[5, 5, 5] = 0.45
    stronger, _ = perceived_from_maps(None, finding, types, [0.0], (1, 1, 1), VOCAB, None)
    packed = pack_regions([faint, stronger], [np.full(SHAPE, -1)] * 2, [None, None], SHAPE, VOCAB, LABELS)
    assert packed["summary"][:, 0].tolist() == [0.0, 0.0]  # what the EHR head learned from: nothing found
    assert packed["prior"][:, 0].tolist() == pytest.approx([0.3, 0.45])  # ranked by how close each came
    assert (packed["prior"][:, 1:] == packed["summary"][:, 1:]).all()
    finding[5, 5, 5] = 0.9  # found: the region's own score, evidence capped where the prior is neutral
    found, _ = perceived_from_maps(None, finding, types, [0.0], (1, 1, 1), VOCAB, None)
    assert perceived_summary(found, VOCAB, LABELS, evidence=True)[0] == pytest.approx(0.9)
    capped = Perceived([], [], {}, evidence={"liver_lesion": 0.8})
    assert perceived_summary(capped, VOCAB, LABELS, evidence=True)[0] == 0.5
    assert perceived_summary(capped, VOCAB, LABELS)[0] == 0.0


def test_candidates_below_the_threshold_are_the_likeliest_further_instances_at_half_maximum():
    """Below the finding threshold nothing is a finding, but each type keeps its likeliest places as
    candidates: the voxels connected to its strongest one that are at least half as probable, then the
    next place; never the rim of a found region (an extent at half maximum that reaches it), none where
    the evidence is negligible."""
    organ = np.zeros(SHAPE, np.int64)
    organ[:12] = 1  # liver
    prob = np.zeros(SHAPE)
    prob[3:6, 3:5, 3:5] = 0.9  # found: a liver lesion
    prob[6, 3:5, 3:5] = 0.4  # its below-threshold rim, two voxels deep: part of the lesion, no candidate
    prob[7, 3:5, 3:5] = 0.35
    prob[9:11, 10:13, 6:8] = 0.3  # a faint one: 2 x 3 x 2 voxels at half its peak ...
    prob[10, 11, 7] = 0.4  # ... peaking here
    prob[8, 10:13, 6:8] = 0.1  # its tail, under half the peak: not part of it
    prob[2, 16, 9] = 0.2  # a weaker one elsewhere: the second candidate
    prob[20, 2, 2] = 0.02  # negligible
    types = np.zeros((2, *SHAPE))
    types[0] = 1.0  # every voxel is a liver lesion if anything
    pred, region_map = perceived_from_maps(organ, prob, types, [0.0], (2, 2, 4), VOCAB, LABELS)
    assert [r.name for r in pred.findings] == ["liver_lesion"]
    first, second = pred.candidates
    assert first.name == second.name == "liver_lesion" and first.organ == "liver"
    assert first.box.tolist() == [8.5, 9.5, 5.5, 10.5, 12.5, 7.5]  # 2 x 3 x 2 voxels
    assert first.size_mm.tolist() == [4.0, 6.0, 8.0] and first.volume_ml == pytest.approx(12 * 16 / 1000)
    assert first.score == pytest.approx((11 * 0.3 + 0.4) / 12)
    assert second.box.tolist() == [1.5, 15.5, 8.5, 2.5, 16.5, 9.5] and second.organ == "liver"
    assert (region_map[9:11, 10:13, 6:8] == -1).all()  # a candidate is no region the LM reads
    assert digest_text(pred, VOCAB).count("<reg>") == 1
    # an unsure map, the same everywhere: a level, not a place
    flat, _ = perceived_from_maps(organ, np.full(SHAPE, 0.3), types, [0.0], (2, 2, 4), VOCAB, LABELS)
    assert flat.findings == [] and flat.candidates == []
    # one candidate per finding kept when asked; none where nothing reaches the floor
    prob[prob < 0.5] = 0.0
    prob[4, 12, 4] = CANDIDATE_MIN_EVIDENCE / 2
    assert perceived_from_maps(organ, prob, types, [0.0], (2, 2, 4), VOCAB, LABELS)[0].candidates == []
    prob[4, 12, 4] = 0.3
    taken = prob > 0.5
    assert len(candidate_regions(prob, types, taken, np.ones(3), ["liver_lesion", "kidney_cyst"], per_finding=1)) == 1
    # the kidney cyst type has no evidence at all (its type probability is 0 everywhere)
    assert [r.name for r in candidate_regions(prob, types, taken, np.ones(3), ["liver_lesion", "kidney_cyst"])] \
        == ["liver_lesion"]


def test_size_text_follows_the_reports():
    assert size_text((22.4, 31.0, 8.6)) == "31 x 22 x 9 mm"  # long, short axial, then craniocaudal


def test_look_again_windows_are_centred_on_each_box_and_stay_inside():
    shape = (40, 30, 12)
    boxes = [np.array([9.5, 9.5, 4.5, 12.5, 12.5, 6.5]),   # centre (11, 11, 5.5): crop [3, 19) [3, 19) [2, 10)
             np.array([37.5, 0.5, 9.5, 39.5, 2.5, 11.5]),  # at the corner: pushed inside
             np.array([10.5, 10.5, 4.5, 11.5, 11.5, 6.5])]  # the first one's crop again: looked at once
    windows = look_again_windows(boxes, shape, (16, 16, 8))
    assert windows == [(slice(3, 19), slice(3, 19), slice(2, 10)), (slice(24, 40), slice(0, 16), slice(4, 12))]
    # a patch larger than the volume along an axis takes the whole axis
    assert look_again_windows(boxes[:1], shape, (16, 64, 64)) == [(slice(3, 19), slice(0, 30), slice(0, 12))]
    assert look_again_windows([], shape, (16, 16, 8)) == []


def test_stitched_looks_average_the_first_look_with_every_crop_over_it():
    first = np.full((2, 8, 8, 4), 3.0, np.float32)  # two channels, as the finding logits
    a = (slice(0, 4), slice(0, 4), slice(0, 4))
    b = (slice(2, 6), slice(0, 4), slice(0, 4))
    out = stitch_looks(first, [np.full((2, 4, 4, 4), 1.0), np.full((2, 4, 4, 4), 8.0)], [a, b])
    assert out.dtype == first.dtype and out.shape == first.shape
    # (3 + 1) / 2 under a alone, (3 + 1 + 8) / 3 where a and b overlap, (3 + 8) / 2 under b alone
    assert (out[:, 0:2, 0:4] == 2).all() and (out[:, 2:4, 0:4] == 4).all() and (out[:, 4:6, 0:4] == 5.5).all()
    untouched = np.ones(first.shape, bool)
    untouched[:, 0:6, 0:4] = False
    assert (out[untouched] == 3).all()
    with pytest.raises(ValueError, match="2 looks for 1 windows"):
        stitch_looks(first, [first[:, :4, :4], first[:, :4, :4]], [a])


def test_finding_voxels_take_the_organ_of_their_nearest_voxel_as_over_the_whole_volume():
    """The fill runs its distance transform on the findings' box plus a margin; it must equal the
    transform over the whole volume, also for findings at the border and far apart."""
    from scipy import ndimage

    from vol3d.tasks.regions import _fill_from_nearest

    rng = np.random.default_rng(0)
    for _ in range(20):
        organ = rng.integers(0, 5, (16, 14, 10))
        holes = np.zeros(organ.shape, bool)
        for _ in range(int(rng.integers(1, 4))):  # blobs, some cut by the border
            lo = rng.integers(-2, organ.shape, 3)
            hi = lo + rng.integers(1, 6, 3)
            holes[tuple(slice(max(a, 0), max(b, 0)) for a, b in zip(lo, hi, strict=True))] = True
        if not holes.any():
            continue
        nearest = ndimage.distance_transform_edt(holes, return_distances=False, return_indices=True)
        np.testing.assert_array_equal(_fill_from_nearest(organ, holes), organ[tuple(nearest)])
