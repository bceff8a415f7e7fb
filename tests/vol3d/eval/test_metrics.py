"""Metrics against hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from preprocess.geometry import format_box
from vol3d.eval.metrics import (
    aggregate_segmentation,
    bleu4,
    dice_hd95_per_class,
    ehr_metrics,
    extract_findings,
    finding_f1,
    format_table,
    grounding_metrics,
    jsonable,
    match_boxes,
    normalise_answer,
    rouge_l,
    token_f1,
    vqa_metrics,
)

# With an axis of 999 voxels, text value v is voxel coordinate v - 0.5: boxes below are exact.
SHAPE = (999, 999, 999)


def vox(*ints):
    return np.array(ints, float) - 0.5


# ----------------------------------------------------------------------------- grounding


def m3d_enclosing_iou(a, b):
    """M3D-LaMed's grounding score: intersection over the box enclosing both (not IoU)."""
    inter = np.prod(np.clip(np.minimum(a[3:], b[3:]) - np.maximum(a[:3], b[:3]), 0, None))
    enclosing = np.prod(np.maximum(a[3:], b[3:]) - np.minimum(a[:3], b[:3]))
    return inter / enclosing


def test_grounding_true_iou_differs_from_m3d_enclosing_box_score():
    gt = vox(10, 10, 10, 30, 30, 30)  # 20^3 = 8000
    pred_text = "Here: " + format_box([20, 20, 20, 40, 40, 40])  # overlap 10^3 = 1000
    res = grounding_metrics([pred_text], [gt[None]], SHAPE)
    assert res["mean_iou"] == pytest.approx(1000 / 15000)  # union 8000 + 8000 - 1000
    m3d = m3d_enclosing_iou(vox(20, 20, 20, 40, 40, 40), gt)
    assert m3d == pytest.approx(1000 / 27000)  # enclosing box 30^3
    assert abs(res["mean_iou"] - m3d) > 0.02
    assert res["acc_iou25"] == 0.0 and res["unparseable_rate"] == 0.0


def test_grounding_accuracy_thresholds_and_rates():
    gt = vox(0, 0, 0, 100, 100, 100)
    texts = [
        format_box([0, 0, 0, 100, 100, 100]),  # IoU 1
        format_box([0, 0, 0, 100, 100, 40]),  # IoU 0.4
        format_box([0, 0, 0, 100, 100, 20]),  # IoU 0.2
        "It is in the liver at [0, 0, 0, 100, 100, 100].",  # no well-formed box
        "<box>[50,50,50,10,10,10]</box>",  # x0 > x1: malformed
    ]
    res = grounding_metrics(texts, [gt[None]] * 5, SHAPE)
    assert res["acc_iou50"] == pytest.approx(1 / 5)
    assert res["acc_iou25"] == pytest.approx(2 / 5)
    assert res["mean_iou"] == pytest.approx((1 + 0.4 + 0.2) / 5)
    assert res["unparseable_rate"] == pytest.approx(2 / 5)
    assert math.isnan(res["refusal_accuracy"])


def test_grounding_several_boxes_matched_one_to_one_and_refusals():
    a, b = vox(0, 0, 0, 10, 10, 10), vox(50, 50, 50, 60, 60, 60)
    swapped = format_box([50, 50, 50, 60, 60, 60]) + " " + format_box([0, 0, 0, 10, 10, 10])
    extra = swapped + " " + format_box([0, 0, 0, 10, 10, 10])  # a duplicate cannot match twice
    res = grounding_metrics(
        [swapped, extra, "There is no lung nodule.", format_box([1, 1, 1, 2, 2, 2])],
        [np.stack([a, b]), np.stack([a, b]), np.zeros((0, 6)), np.zeros((0, 6))],
        SHAPE,
    )
    assert res["acc_iou50"] == 1.0 and res["mean_iou"] == pytest.approx(1.0)
    assert res["n_pred_boxes"] == 6 and res["precision_iou50"] == pytest.approx(4 / 6)
    assert res["refusal_accuracy"] == 0.5
    gt_iou, pred_iou = match_boxes(np.stack([b, a]), np.stack([a, b]))
    np.testing.assert_allclose(gt_iou, [1, 1])


def test_grounding_per_sample_shapes():
    # the same text box means different voxels in different model inputs
    t = format_box([0, 0, 0, 499, 499, 499])
    res = grounding_metrics(
        [t, t],
        [vox(0, 0, 0, 499, 499, 499)[None], np.array([[-0.5, -0.5, -0.5, 4.5, 4.5, 4.5]])],
        [SHAPE, (10, 10, 10)],
    )
    assert res["acc_iou50"] == 1.0


# ----------------------------------------------------------------------------- reports


def test_bleu_and_rouge_of_identical_and_unrelated_text():
    refs = [
        "There is a 12 x 9 mm hypodense lesion in the right hepatic lobe.",
        "No splenomegaly. Kidneys are unremarkable.",
    ]
    assert bleu4(refs, refs) == pytest.approx(1.0)
    assert rouge_l(refs, refs) == pytest.approx(1.0)
    other = ["Osseous structures intact.", "The aorta is normal in caliber."]
    assert bleu4(other, refs) < 0.1 and rouge_l(other, refs) < 0.2
    with pytest.raises(ValueError):
        bleu4(refs, refs[:1])


@pytest.mark.parametrize(
    ("text", "present"),
    [
        ("No liver lesion.", set()),
        ("The kidneys are normal without renal cyst.", set()),
        ("The spleen is unremarkable.", set()),
        ("The spleen is not enlarged.", set()),
        ("No evidence of focal hepatic lesion, splenomegaly or renal cyst.", set()),
        ("Pulmonary nodule is not seen, kidneys unremarkable.", set()),
        ("A 2.1 cm hypodense lesion in the liver.", {"liver_lesion"}),
        ("No liver lesion and a 5 mm nodule in the right lower lobe.", {"lung_nodule"}),
        ("Liver: 3 cm mass. Simple cyst in the left kidney.", {"liver_lesion", "kidney_cyst"}),
        ("The spleen is enlarged, measuring 150 mm.", {"splenomegaly"}),
        ("Renal lesion and hepatic cyst.", set()),  # neither is in the vocabulary
        ("No change in the known liver lesion.", {"liver_lesion"}),  # pseudo-negation
        ("Two hypodense liver lesions; the lungs are clear.", {"liver_lesion"}),
    ],
)
def test_extract_findings_with_negations(text, present):
    got = extract_findings(text)
    assert set(got) == {"liver_lesion", "lung_nodule", "kidney_cyst", "splenomegaly"}
    assert {k for k, v in got.items() if v} == present


def test_extract_findings_reads_every_synthetic_report():
    from vol3d.synth.reports import FINDINGS, finding_sizes, write_report

    rng = np.random.default_rng(0)
    for _ in range(300):
        kinds = [k for k in FINDINGS if rng.random() < 0.5]
        findings = [
            {
                "finding": k,
                "organ": str(rng.choice(FINDINGS[k]["organs"])),
                "lobe": "right",
                "sizes": finding_sizes(k, rng.uniform(5, 40, 3)),
            }
            for k in kinds
        ]
        text, impression = write_report(findings, rng)
        assert {k for k, v in extract_findings(text).items() if v} == set(kinds), text
        assert {k for k, v in extract_findings(impression).items() if v} == set(kinds), impression


def test_finding_f1_on_crafted_reports():
    refs = ["A liver lesion. No splenomegaly.", "Simple renal cyst.", "Splenomegaly. No liver lesion."]
    preds = ["Hepatic mass.", "No renal cyst. Lung nodule in the left lower lobe.", "The spleen is enlarged."]
    res = finding_f1(preds, refs)
    # TP: liver (case 1), spleen (case 3); FN: kidney (case 2); FP: lung (case 2)
    assert res["micro_precision"] == pytest.approx(2 / 3)
    assert res["micro_recall"] == pytest.approx(2 / 3)
    assert res["micro_f1"] == pytest.approx(2 / 3)
    # macro over findings that some reference has: liver 1, kidney 0, spleen 1
    assert res["macro_f1"] == pytest.approx(2 / 3)
    assert res["per_finding"]["lung_nodule"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert finding_f1(refs, refs)["micro_f1"] == 1.0


def test_finding_f1_with_a_user_vocabulary():
    vocab = {
        "pneumothorax": {
            "text": "pneumothorax",
            "organ": "lung",
            "phrases": ["pneumothorax"],
            "countable": False,
        }
    }
    res = finding_f1(
        ["Small left pneumothorax.", "No pneumothorax."], ["Left pneumothorax.", "Clear lungs."], vocab
    )
    assert res["micro_f1"] == 1.0 and list(res["per_finding"]) == ["pneumothorax"]


# ----------------------------------------------------------------------------- VQA


def test_vqa_normalisation_exact_match_and_token_f1():
    assert normalise_answer("Two.") == "2"
    assert normalise_answer("The Liver!") == "liver"
    assert normalise_answer("It measures 1.5 mm.") == "it measures 1.5 mm"
    assert token_f1("one liver lesion", "There is one liver lesion.") == pytest.approx(2 * 1 * 0.6 / 1.6)
    res = vqa_metrics(
        ["Yes", "no", "3", "lung"], ["yes", "yes", "three", "liver"], groups=["p", "p", "c", "o"]
    )
    assert res["exact_match"] == 0.5
    assert res["by_type"]["p"] == {"n": 2, "exact_match": 0.5}
    assert res["by_type"]["c"]["exact_match"] == 1.0


# ----------------------------------------------------------------------------- EHR


def test_ehr_auroc_on_known_scores():
    targets = np.array([[1, 0, 1], [1, 0, 0], [0, 0, 1], [0, 0, 0]])
    scores = np.array([[0.9, 0.1, 0.8], [0.8, 0.2, 0.2], [0.1, 0.3, 0.7], [0.85, 0.4, 0.3]])
    res = ehr_metrics(scores, targets, ["A", "B", "C"])
    # A: positives 0.9, 0.8 vs negatives 0.1, 0.85 -> 3 of 4 pairs ranked right
    assert res["per_code"]["A"] == {"auroc": 0.75, "positives": 2}
    assert math.isnan(res["per_code"]["B"]["auroc"])  # no positive: undefined, not averaged
    assert res["per_code"]["C"]["auroc"] == 1.0
    assert res["macro_auroc"] == pytest.approx((0.75 + 1.0) / 2) and res["n_codes_scored"] == 2
    from sklearn.metrics import roc_auc_score

    assert res["micro_auroc"] == pytest.approx(roc_auc_score(targets.ravel(), scores.ravel()))
    with pytest.raises(ValueError):
        ehr_metrics(scores[:, :2], targets)


# ----------------------------------------------------------------------------- segmentation


def test_dice_hd95_values_and_nan_rule():
    gt = np.zeros((10, 10, 10), np.uint8)
    pred = np.zeros_like(gt)
    gt[2:5, 2:5, 2:5] = 1
    pred[2:5, 2:5, 3:6] = 1  # shifted one slice: overlap 18 of 27 + 27
    pred[7:9, 7:9, 7:9] = 2  # predicted but absent in truth
    res = dice_hd95_per_class(pred, gt, {"liver": 1, "spleen": 2, "kidney": 3}, spacing=(1.0, 1.0, 2.0))
    assert res["dice"]["liver"] == pytest.approx(2 * 18 / 54)
    assert res["hd95"]["liver"] == pytest.approx(2.0)  # one slice of 2 mm
    assert res["dice"]["spleen"] == 0.0
    assert res["hd95"]["spleen"] == pytest.approx(np.linalg.norm([10, 10, 20]))  # the volume diagonal
    assert math.isnan(res["dice"]["kidney"]) and math.isnan(res["hd95"]["kidney"])  # empty in both
    assert res["mean_dice"] == pytest.approx((2 / 3 + 0.0) / 2)  # NaN skipped, as nnU-Net
    agg = aggregate_segmentation([res, dice_hd95_per_class(gt, gt, {"liver": 1, "spleen": 2, "kidney": 3})])
    assert agg["dice"]["liver"] == pytest.approx((2 / 3 + 1) / 2)
    assert agg["dice"]["spleen"] == 0.0 and math.isnan(agg["dice"]["kidney"])


# ----------------------------------------------------------------------------- output


def test_jsonable_and_table():
    res = {
        "ground": {"acc_iou50": 0.5, "refusal_accuracy": float("nan"), "n": np.int64(3)},
        "meta": {"image_blind": False},
    }
    text = json.dumps(jsonable(res), allow_nan=False)
    assert json.loads(text)["ground"]["refusal_accuracy"] is None
    table = format_table(res)
    assert (
        "ground.acc_iou50" in table and "0.5000" in table and "n/a" in table and "meta.image_blind" in table
    )
