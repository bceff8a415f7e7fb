"""Instruction samples: templates, ground truth from boxes, balance, determinism, code vocabulary."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from preprocess.errors import ConfigError, InputError
from preprocess.geometry import box_iou, denormalise_boxes, parse_boxes
from vol3d.tasks import (
    DEFAULT_VOCAB,
    TASKS,
    CodeVocab,
    TaskMix,
    applicable_tasks,
    as_vocab,
    build_samples,
    corpus_texts,
    finding_truth,
    load_vocab,
    sample_one,
)

SHAPE = (40, 32, 24)


def make_case(**over):
    """Two liver lesions (given out of x order), one left kidney cyst, no lung nodule, no splenomegaly."""
    case = {
        "id": "c_test",
        "image": np.zeros((1, *SHAPE), np.float32),
        "boxes_vox": np.array(
            [
                [20.5, 4.5, 4.5, 25.5, 9.5, 9.5],  # liver lesion B (larger x0)
                [2.5, 2.5, 2.5, 5.5, 6.5, 7.5],  # liver lesion A
                [30.5, 20.5, 10.5, 35.5, 27.5, 17.5],  # kidney cyst
            ]
        ),
        "box_findings": ["liver_lesion", "liver_lesion", "kidney_cyst"],
        "box_organs": ["liver", "liver", "kidney_left"],
        "spacing": (1.0, 1.0, 2.0),
        "report": "Two liver lesions. Simple cyst in the left kidney. No splenomegaly.",
        "codes": ["K76.89", "n28.1"],
    }
    case.update(over)
    return case


def test_every_prompt_has_one_vol_placeholder_and_is_deterministic():
    case = make_case()
    for task in TASKS:
        for seed in range(30):
            s = sample_one(case, task, np.random.default_rng(seed))
            assert s.prompt.count("<vol>") == 1
            assert s.task == task
            again = sample_one(case, task, np.random.default_rng(seed))
            assert (s.prompt, s.answer) == (again.prompt, again.answer)
    prompts = {sample_one(case, "vqa_closed", seed).prompt for seed in range(30)}
    assert len(prompts) > 5  # several phrasings and question types


def test_grounding_boxes_sorted_by_x0_and_round_trip():
    case = make_case()
    for seed in range(40):
        s = sample_one(case, "ground", seed)
        if s.extras["finding"] == "liver_lesion":
            break
    else:
        pytest.fail("no liver lesion grounding sample drawn")
    boxes = parse_boxes(s.answer)
    assert len(boxes) == 2
    vox = denormalise_boxes(np.stack(boxes), SHAPE)
    assert vox[0, 0] < vox[1, 0]  # ordered by x0
    truth = case["boxes_vox"][[1, 0]]
    assert np.diag(box_iou(vox, truth)).min() > 0.95  # 0..999 quantisation only
    np.testing.assert_allclose(s.extras["boxes_vox"], truth)
    assert s.extras["shape"] == SHAPE


def test_token_box_format_writes_one_box_token_per_instance():
    """For a grounding head: the same questions and refusals, each box a bare <box> in x0 order."""
    case = make_case(boxes_visible=np.array([1.0, 1.0, 0.2]))
    seen = set()
    for seed in range(60):
        text = sample_one(case, "ground", seed)
        tok = sample_one(case, "ground", seed, box_format="token")
        assert tok.prompt == text.prompt and tok.extras["finding"] == text.extras["finding"]
        np.testing.assert_array_equal(tok.extras["boxes_vox"], text.extras["boxes_vox"])
        n = len(tok.extras["boxes_vox"])
        assert tok.answer.split(" ")[:n] == ["<box>"] * n and len(parse_boxes(text.answer)) == n
        assert tok.answer.count("<box>") == n and "[" not in tok.answer
        if n == 0:
            assert tok.answer == text.answer  # refusals and "mostly outside" notes are unchanged
        seen.add(n)
    assert seen == {0, 2}
    with pytest.raises(ConfigError, match="box_format"):
        sample_one(case, "ground", 0, box_format="digits")


def test_grounding_refusal_and_partly_visible_boxes():
    for seed in range(60):
        s = sample_one(make_case(), "ground", seed)
        if s.extras["finding"] == "lung_nodule":
            assert s.answer == "There is no lung nodule."
            assert s.extras["boxes_vox"].shape == (0, 6)
            break
    else:
        pytest.fail("no lung nodule grounding sample drawn")
    # the cyst was mostly cropped away: never boxed, and the answer says why
    case = make_case(boxes_visible=np.array([1.0, 0.3, 0.2]))
    truth = finding_truth(case)
    assert truth["liver_lesion"].n == 1 and truth["liver_lesion"].n_partial == 1
    for seed in range(60):
        s = sample_one(case, "ground", seed)
        if s.extras["finding"] == "kidney_cyst":
            assert parse_boxes(s.answer) == []
            assert "mostly outside" in s.answer
        if s.extras["finding"] == "liver_lesion":
            assert len(parse_boxes(s.answer)) == 1 and "One liver lesion lies mostly outside" in s.answer


def test_closed_answers_match_ground_truth_and_yes_no_is_balanced():
    case = make_case()
    answers = {"yes": 0, "no": 0}
    for seed in range(400):
        s = sample_one(case, "vqa_closed", seed)
        q, f = s.extras["qtype"], s.extras["finding"]
        n = case["box_findings"].count(f)
        if q == "presence":
            assert s.answer == ("yes" if n else "no")
            answers[s.answer] += 1
        elif q == "count":
            assert s.answer == str(n)
        elif q == "organ":
            assert s.answer == {"liver_lesion": "liver", "kidney_cyst": "kidney"}[f]
            assert s.answer in s.extras["choices"] and len(set(s.extras["choices"])) == len(
                s.extras["choices"]
            )
        else:  # size: the cyst is 5 x 7 x 14 mm (z spacing 2), the largest liver lesion 5 x 5 x 10 mm
            assert s.extras["largest_mm"] == {"liver_lesion": 10.0, "kidney_cyst": 14.0}[f]
            mm = int(s.prompt.split(" mm")[0].split()[-1])
            assert s.answer == ("yes" if s.extras["largest_mm"] > mm else "no")
    total = answers["yes"] + answers["no"]
    assert total > 50 and 0.35 < answers["yes"] / total < 0.65


def test_presence_is_balanced_per_finding_over_the_dataset_with_prevalence():
    """With per-case balance the question gives the answer away (the common finding is the "yes");
    with the dataset's prevalence every finding is answered yes and no equally often."""
    from vol3d.tasks.samples import prevalence

    with_lesion = make_case()
    normal = make_case(boxes_vox=np.zeros((0, 6)), box_findings=[], box_organs=[])
    cases = [with_lesion] * 2 + [normal] * 8  # liver lesions and kidney cysts in 20% of the cases
    prev = prevalence(cases)
    assert prev["liver_lesion"] == pytest.approx(0.2) and prev["splenomegaly"] == 0.0
    counts: dict[tuple[str, str], int] = {}
    rng = np.random.default_rng(0)
    from vol3d.tasks.samples import QuestionDropped

    for k in range(6000):
        try:
            s = sample_one(cases[k % len(cases)], "vqa_closed", rng, prevalence=prev)
        except QuestionDropped:  # build_samples then asks another task
            continue
        if s.extras["qtype"] == "presence":
            counts[(s.extras["finding"], s.answer)] = counts.get((s.extras["finding"], s.answer), 0) + 1
    for finding in ("liver_lesion", "kidney_cyst"):
        yes, no = counts[(finding, "yes")], counts[(finding, "no")]
        assert 0.4 < yes / (yes + no) < 0.6, (finding, yes, no)


def test_closed_questions_avoid_partly_visible_findings():
    case = make_case(boxes_visible=np.array([1.0, 1.0, 0.2]))
    for seed in range(200):
        assert sample_one(case, "vqa_closed", seed).extras["finding"] != "kidney_cyst"


def test_open_answer_describes_count_organ_and_size():
    case = make_case()
    texts = {sample_one(case, "vqa_open", seed).answer for seed in range(60)}
    assert "There are 2 liver lesions in the liver; the largest measures 5 x 5 x 10 mm." in texts
    assert "There is one kidney cyst in the left kidney, measuring 7 x 5 x 14 mm." in texts
    assert "There is no lung nodule." in texts
    no_spacing = make_case(spacing=None)
    assert "There is one kidney cyst in the left kidney." in {
        sample_one(no_spacing, "vqa_open", seed).answer for seed in range(60)
    }


def test_report_and_ehr_samples():
    vocab = CodeVocab.from_cases([make_case(), {"codes": ["R91.1"]}])
    s = sample_one(make_case(), "report", 0)
    assert s.answer == make_case()["report"] and "CT" in s.prompt
    e = sample_one(make_case(), "ehr", 0, code_vocab=vocab)
    assert e.answer == "" and e.prompt == "<vol>"
    assert e.extras["codes"] == ["K76.89", "N28.1"]
    np.testing.assert_array_equal(e.extras["target"], [1, 1, 0])  # sorted: K76.89, N28.1, R91.1


def test_task_mix_weights_and_validation():
    only_report = TaskMix(report=1, vqa_closed=0, vqa_open=0, ground=0, ehr=0, samples_per_case=20)
    assert {s.task for s in build_samples(make_case(), 0, only_report)} == {"report"}
    mix = TaskMix(ehr=1.0, samples_per_case=200)
    counts = {t: 0 for t in TASKS}
    for s in build_samples(make_case(), 1, mix):
        counts[s.task] += 1
    assert all(counts[t] > 0 for t in TASKS)
    assert counts["vqa_open"] < counts["ground"]  # weight 0.5 vs 1.0
    with pytest.raises(ConfigError):
        TaskMix(report=-1)
    with pytest.raises(ConfigError):
        TaskMix(report=0, vqa_closed=0, vqa_open=0, ground=0, ehr=0)
    # a case with only codes cannot serve a mix without ehr: a clear error, not a silent skip
    bare = {"id": "c_bare", "image": np.zeros((1, 4, 4, 4)), "codes": ["I10"]}
    assert applicable_tasks(bare) == ["ehr"]
    with pytest.raises(InputError, match="c_bare"):
        build_samples(bare, 0, TaskMix())
    with pytest.raises(InputError, match="box annotations"):
        sample_one(bare, "ground", 0)


def test_cache_dataset_items_with_tensors_give_the_same_samples():
    torch = pytest.importorskip("torch")
    case = make_case(boxes_visible=np.array([1.0, 0.3, 1.0]))
    item = dict(case, boxes_visible=torch.tensor([1.0, 0.3, 1.0]), boxes_vox=torch.from_numpy(case["boxes_vox"]),
                spacing=torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64))
    for task in ("vqa_closed", "vqa_open", "ground"):
        for seed in range(20):
            a, b = sample_one(case, task, seed), sample_one(item, task, seed)
            assert (a.prompt, a.answer) == (b.prompt, b.answer)


def test_unknown_finding_is_a_clear_error():
    case = make_case(box_findings=["liver_lesion", "liver_lesion", "adrenal_nodule"])
    with pytest.raises(InputError, match="adrenal_nodule.*vocabulary"):
        sample_one(case, "ground", 0)


def test_custom_vocabulary_from_plain_dicts_and_files(tmp_path):
    plain = {
        "adrenal_nodule": {
            "text": "adrenal nodule",
            "organ": "adrenal",
            "nouns": ["nodule"],
            "organ_words": ["adrenal"],
        }
    }
    vocab = as_vocab(plain)
    case = make_case(
        boxes_vox=np.array([[2.5, 2.5, 2.5, 6.5, 6.5, 6.5]]),
        box_findings=["adrenal_nodule"],
        box_organs=["adrenal_left"],
    )
    s = sample_one(case, "ground", 0, vocab=vocab)
    assert "adrenal nodule" in s.prompt and len(parse_boxes(s.answer)) == 1
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(plain))
    assert load_vocab(path) == vocab
    (tmp_path / "v.yaml").write_text(
        "adrenal_nodule: {text: adrenal nodule, organ: adrenal, phrases: [adrenal nodule]}\n"
    )
    assert load_vocab(tmp_path / "v.yaml")["adrenal_nodule"].phrases == ("adrenal nodule",)
    with pytest.raises(ConfigError, match="colour"):
        as_vocab({"x": {"text": "x", "organ": "y", "phrases": ["x"], "colour": "red"}})
    with pytest.raises(ConfigError, match="phrases"):
        as_vocab({"x": {"text": "x", "organ": "y"}})


def test_default_vocabulary_matches_the_synthetic_report_writer():
    from vol3d.synth.reports import FINDINGS

    assert set(FINDINGS) == set(DEFAULT_VOCAB)
    for name, spec in DEFAULT_VOCAB.items():
        assert (spec.text, spec.organ, spec.code) == (
            FINDINGS[name]["text"],
            FINDINGS[name]["organ"],
            FINDINGS[name]["code"],
        )


def test_code_vocab_counts_min_count_and_json_round_trip(tmp_path):
    cases = [{"codes": ["K76.89", "I10"]}, {"codes": ["k76.89 "]}, ["R16.1", "R16.1"]]
    vocab = CodeVocab.from_cases(cases, min_count=1)
    assert vocab.codes == ["I10", "K76.89", "R16.1"] and vocab.counts == [1, 2, 1]
    assert CodeVocab.from_cases(cases, min_count=2).codes == ["K76.89"]
    np.testing.assert_array_equal(vocab.encode(["r16.1", "UNKNOWN"]), [0, 0, 1])
    assert vocab.decode(np.array([0.9, 0.1, 0.5])) == ["I10", "R16.1"]
    vocab.save(tmp_path / "codes.json")
    back = CodeVocab.load(tmp_path / "codes.json")
    assert back == vocab and back.counts == vocab.counts
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="bad.json"):
        CodeVocab.load(tmp_path / "bad.json")


def test_corpus_covers_every_sampled_text():
    cases = [make_case(), make_case(id="c2", modality="MR", boxes_visible=np.array([1.0, 0.3, 1.0]))]
    corpus = set(corpus_texts(cases))

    def tokens(text):
        return set(re.findall(r"\w+|[^\w\s]", text))

    vocab = set().union(*(tokens(t) for t in corpus))
    for case in cases:
        for seed in range(50):
            for s in build_samples(case, seed, TaskMix(samples_per_case=3)):
                # every word and punctuation mark is covered (multiple-choice orders vary)
                assert tokens(s.prompt) <= vocab
                assert tokens(s.answer) <= vocab
    assert "There is no lung nodule." in corpus and cases[0]["report"] in corpus


def test_organ_questions_map_any_sided_label_to_the_vocabulary_organ():
    from vol3d.tasks.findings import organ_in

    assert organ_in("kidney_left", {"kidney", "liver"}) == "kidney"
    assert organ_in("ren_sinister", {"ren", "hepar", "pulmo"}) == "ren"  # sides named in another language
    assert organ_in("lobus hepatis dexter", {"hepatis", "lobus hepatis"}) == "lobus hepatis"  # the longest match
    assert organ_in("pancreas", {"ren"}) == "pancreas" and organ_in("lung_right", set()) == "lung"
