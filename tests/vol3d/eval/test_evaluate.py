"""The evaluation pipeline end to end with fake models: an oracle scores 1, a blind model chance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from preprocess.errors import ConfigError
from vol3d.eval import eval_samples, evaluate, format_table, jsonable
from vol3d.tasks import CodeVocab

SHAPE = (16, 12, 10)
KINDS = ["liver_lesion", "lung_nodule", "kidney_cyst", "splenomegaly"]
REPORTS = {
    "liver_lesion": "A 12 mm hypodense lesion in the liver.",
    "lung_nodule": "A 6 mm nodule in the right lower lobe.",
    "kidney_cyst": "Simple cyst in the left kidney.",
    "splenomegaly": "The spleen is enlarged.",
}
NEGATIVE = "No focal liver lesion. The lungs are clear. Kidneys unremarkable. Spleen normal in size."


def make_cases(n=8):
    """Cases whose volume is filled with the case number (so a fake model can tell them apart)."""
    rng = np.random.default_rng(0)
    cases = []
    for i in range(n):
        kinds = [k for k in KINDS if rng.random() < 0.5]
        boxes = []
        for _ in kinds:
            lo = rng.integers(0, 5, 3)
            boxes.append(np.concatenate([lo - 0.5, lo + rng.integers(2, 5, 3) + 0.5]))
        cases.append(
            {
                "id": f"c{i}",
                "image": np.full((1, *SHAPE), float(i + 1), np.float32),
                "boxes_vox": np.array(boxes).reshape(-1, 6),
                "box_findings": kinds,
                "box_organs": [k.split("_")[0] if k != "splenomegaly" else "spleen" for k in kinds],
                "spacing": (2.0, 2.0, 3.0),
                "report": " ".join(REPORTS[k] for k in kinds) or NEGATIVE,
                "codes": ["K76.89"] if "liver_lesion" in kinds else ["I10"],
            }
        )
    return cases


class OracleModel:
    """Knows every reference answer; identifies the case from the volume's fill value."""

    def __init__(self, cases, code_vocab, **kw):
        self.answers = {}
        for items in eval_samples(cases, ["report", "vqa_closed", "vqa_open", "ground"], **kw).values():
            for it in items:
                self.answers[(it.case_index, it.sample.prompt)] = it.sample.answer
        self.targets = [code_vocab.encode(c["codes"]) for c in cases]
        self.seen_volumes = []

    def _case(self, volume):
        return int(round(float(volume.max()))) - 1  # -1 for a zeroed (image-blind) volume

    def generate(self, volume, prompts, max_new_tokens=64):
        self.seen_volumes.append(volume)
        return [self.answers.get((self._case(v), p), "") for v, p in zip(volume, prompts, strict=True)]

    def __call__(self, volume, input_ids, attention_mask):
        rows = [
            torch.from_numpy(self.targets[self._case(v)]) * 10 - 5 if self._case(v) >= 0 else torch.zeros(2)
            for v in volume
        ]
        return {"ehr_logits": torch.stack(rows)}


class BlindModel:
    """Answers without looking: always 'yes', never a box, a fixed report, constant EHR scores."""

    def generate(self, volume, prompts, max_new_tokens=64):
        return ["yes" if "?" in p else NEGATIVE for p in prompts]

    def __call__(self, volume, input_ids, attention_mask):
        return {"ehr_logits": torch.zeros(volume.shape[0], 2)}


TASKS = ("report", "vqa_closed", "vqa_open", "ground", "ehr")


@pytest.fixture(scope="module")
def cases():
    return make_cases()


@pytest.fixture(scope="module")
def code_vocab(cases):
    return CodeVocab.from_cases(cases)


def test_oracle_scores_one_everywhere(cases, code_vocab):
    oracle = OracleModel(cases, code_vocab, samples_per_case=3, seed=5)
    res = evaluate(oracle, cases, TASKS, code_vocab=code_vocab, samples_per_case=3, seed=5, batch_size=2)
    assert res["report"]["bleu4"] == pytest.approx(1.0) and res["report"]["rougeL"] == pytest.approx(1.0)
    assert res["report"]["findings"]["micro_f1"] == 1.0
    assert res["vqa_closed"]["exact_match"] == 1.0 and res["vqa_closed"]["n"] == 3 * len(cases)
    assert res["vqa_open"]["exact_match"] == 1.0 and res["vqa_open"]["token_f1"] == 1.0
    g = res["ground"]
    assert g["acc_iou50"] == 1.0 and g["unparseable_rate"] == 0.0 and g["mean_iou"] > 0.97  # 0..999 rounding
    assert g["refusal_accuracy"] == 1.0  # absent findings answered without a box
    assert res["ehr"]["macro_auroc"] == 1.0
    assert res["meta"]["n_cases"] == len(cases) and not res["meta"]["image_blind"]
    assert all(v.shape[0] <= 2 and v.shape[1:] == (1, *SHAPE) for v in oracle.seen_volumes)
    json.dumps(jsonable(res), allow_nan=False)
    assert "ground.acc_iou50" in format_table(res)


def test_blind_model_scores_chance(cases, code_vocab):
    res = evaluate(BlindModel(), cases, TASKS, code_vocab=code_vocab, samples_per_case=6, seed=5)
    closed = res["vqa_closed"]
    # "yes" is right exactly for the presence/size questions whose answer is yes
    items = eval_samples(cases, ["vqa_closed"], samples_per_case=6, seed=5)["vqa_closed"]
    share_yes = np.mean([it.sample.answer == "yes" for it in items])
    assert closed["exact_match"] == pytest.approx(share_yes) and 0.1 < share_yes < 0.6
    assert res["ground"]["acc_iou25"] == 0.0 and res["ground"]["unparseable_rate"] == 1.0
    assert res["ehr"]["macro_auroc"] == 0.5
    assert res["report"]["findings"]["micro_f1"] == 0.0


def test_image_blind_baseline_zeroes_the_volume(cases, code_vocab):
    oracle = OracleModel(cases, code_vocab, samples_per_case=2, seed=0)
    res = evaluate(
        oracle, cases, ("vqa_closed", "ground"), samples_per_case=2, image_blind=True, keep_predictions=True
    )
    assert all(float(v.abs().max()) == 0.0 for v in oracle.seen_volumes)
    assert res["meta"]["image_blind"] and res["vqa_closed"]["exact_match"] == 0.0
    assert {p["task"] for p in res["predictions"]} == {"vqa_closed", "ground"}
    assert len(res["predictions"]) == res["vqa_closed"]["n"] + res["ground"]["n"]


def test_eval_set_is_deterministic_and_independent_of_the_task_list(cases):
    a = eval_samples(cases, ["ground"], seed=1)["ground"]
    b = eval_samples(cases, ["report", "vqa_closed", "ground"], seed=1)["ground"]
    assert [(x.sample.prompt, x.sample.answer) for x in a] == [(x.sample.prompt, x.sample.answer) for x in b]
    c = eval_samples(cases, ["ground"], seed=2)["ground"]
    assert [x.sample.prompt for x in a] != [x.sample.prompt for x in c]


def test_clear_errors(cases):
    with pytest.raises(ConfigError, match="unknown task"):
        evaluate(BlindModel(), cases, ("captioning",))
    with pytest.raises(ConfigError, match="code_vocab"):
        evaluate(BlindModel(), cases, ("ehr",))
    with pytest.raises(ConfigError, match="vocabulary has 3"):
        evaluate(BlindModel(), cases, ("ehr",), code_vocab=CodeVocab(["A", "B", "C"]))


class LocatingModel(BlindModel):
    """Never sees a finding on its own (refuses), but given the locate prefix it answers with one
    fixed box: the located metrics must score that box, the free ones the refusals."""

    BOX = "<box>[0,0,0,999,999,999]</box>"

    def __init__(self):
        self.prefixes = []

    def generate(self, volume, prompts, max_new_tokens=64, answer_prefix=None):
        self.prefixes.append(answer_prefix)
        if answer_prefix is None:
            return ["There is none." for _ in prompts]
        assert answer_prefix == "<box>"
        return [self.BOX for _ in prompts]


def test_located_grounding_scores_where_apart_from_whether(cases, code_vocab):
    model = LocatingModel()
    res = evaluate(model, cases, ["ground"], samples_per_case=6, seed=5, locate_prefix="<box>")
    g = res["ground"]
    assert g["acc_iou25"] == 0.0 and g["unparseable_rate"] == 1.0 and g["refusal_accuracy"] == 1.0
    # the whole-volume box overlaps every true box, a little: IoU = box volume / volume
    items = [it for it in eval_samples(cases, ["ground"], samples_per_case=6, seed=5)["ground"]
             if len(it.sample.extras["boxes_vox"])]
    frac = [np.prod(b[3:] - b[:3]) / np.prod(SHAPE) for it in items for b in it.sample.extras["boxes_vox"][:1]]
    assert 0 < g["located_mean_iou"] <= max(frac) + 1e-6 and g["located_acc_iou50"] == 0.0
    assert model.prefixes.count("<box>") >= 1 and None in model.prefixes
    without = evaluate(LocatingModel(), cases, ["ground"], samples_per_case=6, seed=5)
    assert "located_mean_iou" not in without["ground"]  # no prefix: no second pass


def test_balanced_presence_sets_a_question_only_model_at_one_half():
    from vol3d.tasks.samples import balanced_presence

    cases = make_cases(30)
    presence = balanced_presence(cases, seed=3)
    res = evaluate(BlindModel(), cases, ["vqa_closed"], samples_per_case=2, seed=3, presence=presence)
    by = res["vqa_closed"]["by_type"]
    # "yes" to every presence question is right exactly half the time, finding by finding
    assert by["presence"]["exact_match"] == 0.5
    asked = [(ci, q, f) for ci, qs in presence.items() for q, f in qs]
    for qtype in ("presence", "count"):
        for kind in KINDS:
            answers = [kind in cases[ci]["box_findings"] for ci, q, f in asked if f == kind and q == qtype]
            assert answers.count(True) == answers.count(False) > 0 or (qtype, kind) == ("count", "splenomegaly")
    # no count question about a condition; the other closed questions still come, none unbalanced
    assert not [a for a in asked if a[1:] == ("count", "splenomegaly")]
    assert "organ" in by and by["presence"]["n"] + by["count"]["n"] == len(asked)


def test_every_headline_metric_has_a_bootstrap_interval_around_it(cases, code_vocab):
    oracle = OracleModel(cases, code_vocab, samples_per_case=2, seed=1)
    res = evaluate(oracle, cases, TASKS, code_vocab=code_vocab, samples_per_case=2, seed=1, bootstrap=200)
    assert res["ground"]["acc_iou50_ci"] == [1.0, 1.0] and res["report"]["findings"]["micro_f1_ci"] == [1.0, 1.0]
    assert res["ehr"]["macro_auroc_ci"] == [1.0, 1.0]
    blind = evaluate(BlindModel(), make_cases(20), ["vqa_closed"], samples_per_case=3, seed=1, bootstrap=300)
    lo, hi = blind["vqa_closed"]["exact_match_ci"]
    assert lo < blind["vqa_closed"]["exact_match"] < hi and hi - lo < 0.5
    for qtype, v in blind["vqa_closed"]["by_type"].items():
        assert len(v["exact_match_ci"]) == 2, qtype


def test_bootstrap_ci_resamples_cases_not_items():
    from vol3d.eval.metrics import bootstrap_ci

    # one case holds all the errors: resampling cases makes the interval wide
    groups = [[1] * 10 for _ in range(9)] + [[0] * 10]
    lo, hi = bootstrap_ci(groups, lambda items: float(np.mean(items)), reps=500, seed=0)
    assert lo < 0.9 < hi <= 1.0 and lo <= 0.8
    assert bootstrap_ci([], lambda items: 1.0) == [None, None]


def test_ehr_reports_imaging_codes_apart():
    from vol3d.eval.metrics import ehr_metrics

    targets = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    scores = np.array([[0.9, 0.5], [0.1, 0.5], [0.8, 0.5], [0.2, 0.5]])
    res = ehr_metrics(scores, targets, ["K76.89", "I10"], imaging_codes=["k76.89"])
    assert res["imaging_macro_auroc"] == 1.0 and res["other_macro_auroc"] == 0.5
    assert res["imaging_codes"] == ["K76.89"]
