"""Perception in the vision-language model: the digest before every question, region tokens,
a <box> that points at a region, patch-trained heads, saving and the generation guard."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from preprocess.errors import ConfigError, InputError
from preprocess.geometry import denormalise_boxes, parse_boxes
from vol3d.models import Vol3DConfig, Vol3DModel, build_tokenizer
from vol3d.models.heads import RegionPointer
from vol3d.models.vlm import NoRepeatNGram, box_token_index
from vol3d.tasks import TaskMix
from vol3d.tasks.regions import LabelSpec, digest_text, pack_regions, perceived_from_case
from vol3d.train.config import LossConfig
from vol3d.train.objectives import VLMObjective, class_balanced_bce, finding_weights

SHAPE = (32, 32, 16)
LABELS = ("background", "liver", "kidney_left", "spleen", "lesion")
VOCAB = {
    "liver_lesion": {"text": "liver lesion", "organ": "liver", "nouns": ["lesion"], "organ_words": ["liver"],
                     "code": "K76.89"},
    "kidney_cyst": {"text": "kidney cyst", "organ": "kidney", "nouns": ["cyst"], "organ_words": ["kidney"]},
    "splenomegaly": {"text": "splenomegaly", "organ": "spleen", "phrases": ["splenomegaly"], "countable": False},
}
TINY_LLAMA = dict(model_type="llama", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=64, max_position_embeddings=512)


def make_case(seed: int = 0, lesions: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    label = np.zeros(SHAPE, np.uint8)
    label[2:20, 4:24, 2:12] = 1
    label[22:30, 4:12, 2:10] = 2
    label[4:12, 26:31, 2:10] = 3
    boxes, names, organs = [], [], []
    for k in range(lesions):
        x, y = 4 + 7 * k + int(rng.integers(2)), 6 + int(rng.integers(8))
        label[x:x + 3, y:y + 3, 4:7] = 4
        boxes.append([x - 0.5, y - 0.5, 3.5, x + 2.5, y + 2.5, 6.5])
        names.append("liver_lesion")
        organs.append("liver")
    image = ((label > 0)[None] * 0.5 + (label == 4)[None] * 0.3).astype(np.float32)
    return {"id": f"c{seed}", "image": torch.from_numpy(image), "label": torch.from_numpy(label.astype(np.int64)),
            "has_label": True, "boxes_vox": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 6),
            "box_findings": names, "box_organs": organs, "boxes_visible": torch.ones(len(boxes)),
            "spacing": torch.tensor([2.0, 2.0, 4.0]), "report": "Two liver lesions.", "codes": ["K76.89"],
            "modality": "CT"}


@pytest.fixture(scope="module")
def model():
    texts = ["Findings: liver lesion x2: <reg> 6 x 6 x 12 mm, liver. No kidney cyst. Splenomegaly: no. "
             "Organs: liver <org> 100 mL; spleen <org> 10 mL, 32 mm.", "Where is the liver lesion? <box> <box>",
             "There is no kidney cyst.", "yes no 0 1 2 3"]
    tok = build_tokenizer(texts * 3, vocab_size=300)
    cfg = Vol3DConfig(encoder="resunet3d_tiny", encoder_overrides={"channels": [4, 8, 8, 8]}, in_chans=1,
                      input_shape=SHAPE, reducer="pool", reducer_params={"out_grid": [1, 1, 1]}, lm_config=TINY_LLAMA,
                      perception=True, perception_dim=4, label_names=list(LABELS), finding_labels=["lesion"],
                      findings=VOCAB, num_ehr_codes=1, ehr_codes=["K76.89"])
    torch.manual_seed(0)
    m = Vol3DModel(cfg, tokenizer=tok)
    m.preprocess = {"target_spacing": [2.0, 2.0, 4.0]}
    return m


def _objective(m: Vol3DModel, patch=(16, 16, 8), balance: str = "case") -> VLMObjective:
    weights = LossConfig(organ=1, finding=1, finding_type=1, condition=1, pointer=1, ehr=1)
    mix = TaskMix(report=1, vqa_closed=1, vqa_open=0, ground=4, ehr=0, samples_per_case=3)
    from vol3d.tasks import CodeVocab

    return VLMObjective(m.processor, mix, weights, CodeVocab(["K76.89"]), None, 400, 2, perception=(m.vocab, m.labels),
                        prevalence={"liver_lesion": 0.5}, patch_size=patch, patches_per_case=2, patch_balance=balance)


def test_batch_holds_digests_regions_patches_and_pointer_targets(model):
    obj = _objective(model)
    cases = [make_case(0), make_case(1, lesions=1)]
    batch = obj.make_batch(cases, [np.random.default_rng(i) for i in range(2)])
    ids = batch["input_ids"]
    placeholders = model._region_positions(ids).sum(1)
    # every sequence reads its case's digest: 2 lesions + 3 organs, or 1 lesion + 3 organs
    assert placeholders.tolist() == [5 if int(v) == 0 else 4 for v in batch["volume_index"]]
    regions = batch["regions"]
    assert regions["kind"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, 1, -1]]
    assert batch["patches"].shape == (4, 1, 16, 16, 8) and batch["organ_target"].shape == (4, 16, 16, 8)
    # each <box> of a grounding answer points at the lesions of its case, never at an organ
    rows = batch["box_index"][:, 0]
    target = batch["pointer_target"]
    assert len(target) == len(rows) > 0
    for row, t in zip(rows.tolist(), target, strict=True):
        n = 2 if int(batch["volume_index"][row]) == 0 else 1
        assert t[:n].tolist() == [1.0] * n and t[n:].sum() == 0


def test_perception_crops_give_a_rare_finding_type_its_share(model):
    """Three liver lesions in every case, one kidney cyst in one: drawn by type, half the finding crops
    are on the cyst (nnU-Net's class-balanced foreground); drawn per case, one in six."""
    common = make_case(0, lesions=3)
    rare = make_case(1, lesions=3)
    rare["box_findings"] = ["kidney_cyst", "liver_lesion", "liver_lesion"]
    found = [perceived_from_case(c, model.vocab, model.labels) for c in (common, rare)]
    cyst = next(k for k, r in enumerate(found[1][0].findings) if r.name == "kidney_cyst")
    shares = {}
    for balance in ("type", "case"):
        obj = _objective(model, balance=balance)
        draws = [d for i in range(300) for d in obj._patch_findings(found, [np.random.default_rng(i)] * 2)]
        assert len(draws) == 300 * 2 * 2  # patches_per_case crops per case
        on_finding = [(c, k) for c, k, _ in draws if k is not None]
        assert 0.6 < len(on_finding) / len(draws) < 0.8  # finding_probability 0.7, the rest anywhere
        assert all(k < len(found[c][0].findings) for c, k in on_finding)
        shares[balance] = sum((c, k) == (1, cyst) for c, k in on_finding) / len(on_finding)
    assert 0.4 < shares["type"] < 0.6 and 0.1 < shares["case"] < 0.25
    # the crops hold what was drawn: the cyst's voxels typed as a cyst in some of them
    batch = _objective(model, balance="type").make_batch([common, rare], [np.random.default_rng(i) for i in range(2)],
                                                          step=0)
    cyst_type = model.perception.countable.index("kidney_cyst")
    assert batch["patches"].shape[0] == 4 and (batch["finding_type"] == cyst_type).flatten(1).any(1).sum() >= 1
    with pytest.raises(ConfigError, match="patch_balance"):
        _objective(model, balance="voxel")


def test_training_steps_lower_every_loss_and_the_pointer_learns(model):
    obj = _objective(model)
    cases = [make_case(0), make_case(1, lesions=1)]
    batch = obj.make_batch(cases, [np.random.default_rng(i) for i in range(2)])
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    model.train()
    first = None
    for _ in range(25):
        loss, logs = obj.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or {k: float(v) for k, v in logs.items()}
    last = {k: float(v) for k, v in logs.items()}
    for term in ("lm", "organ", "finding", "pointer", "ehr"):
        assert last[term] < first[term], term
    assert last["pointer_acc"] == 1.0


def test_generate_answers_with_the_boxes_of_its_own_regions(model):
    case = make_case(2)
    volume = case["image"][None]
    answers, perceived = model.generate(volume.expand(2, -1, -1, -1, -1), ["Where is the liver lesion?",
                                        "Is there a kidney cyst?"], max_new_tokens=6, return_perceived=True)
    assert len(answers) == len(perceived) == 2 and perceived[0] is perceived[1]  # one volume, perceived once
    boxes = [r.box for r in perceived[0].regions]
    for text in answers:
        for ints in parse_boxes(text):  # every box written out is one of the digest's regions
            vox = denormalise_boxes(np.asarray(ints)[None], SHAPE)[0]
            assert min(np.abs(vox - b).max() for b in boxes) < 0.1


def test_placeholders_need_regions_and_counts_must_match(model):
    case = make_case(0)
    perceived, targets = perceived_from_case(case, model.vocab, model.labels)
    digest = digest_text(perceived, model.vocab)
    batch = model.processor(["<vol>\nWhere is the liver lesion?"], contexts=[digest])
    with pytest.raises(InputError, match="no regions"):
        model._merge_embeddings(batch["input_ids"], torch.zeros(1, model.num_vol_tokens, 32))
    packed = pack_regions([perceived], [targets.region_map], [targets.organ], SHAPE, model.vocab, model.labels)
    valid = torch.from_numpy(packed["kind"] >= 0)
    valid[0, 0] = False
    with pytest.raises(InputError, match="count mismatch"):
        model._merge_embeddings(batch["input_ids"], torch.zeros(1, model.num_vol_tokens, 32),
                                torch.zeros(1, valid.shape[1], 32), valid)


def test_save_and_reload_keeps_the_vocabulary_and_the_answers(model, tmp_path):
    model.eval()
    volume = make_case(3)["image"][None]
    before = model.generate(volume, ["Where is the liver lesion?"], max_new_tokens=5)
    model.save_pretrained(tmp_path / "m")
    again = Vol3DModel.from_pretrained(tmp_path / "m")
    assert again.config.findings == model.config.findings and again.labels == model.labels
    again.preprocess = model.preprocess
    assert again.generate(volume, ["Where is the liver lesion?"], max_new_tokens=5) == before


def test_config_checks():
    with pytest.raises(ConfigError, match="box_head"):
        Vol3DConfig(lm_config=TINY_LLAMA, perception=True, box_head=True)
    tok = build_tokenizer(["a b c"] * 3, vocab_size=280)
    cfg = Vol3DConfig(encoder="resunet3d_tiny", input_shape=SHAPE, lm_config=TINY_LLAMA, perception=True,
                      findings=VOCAB)
    with pytest.raises(ConfigError, match="label"):
        Vol3DModel(cfg, tokenizer=tok)
    assert LabelSpec(LABELS, ("lesion",)).organs[-1] == "spleen"


def test_pointer_decodes_without_repeating_a_region_within_an_answer():
    logits = torch.tensor([[5.0, 1.0, float("-inf")], [4.0, 3.0, float("-inf")], [4.0, 3.0, float("-inf")],
                           [0.0, 2.0, 1.0]])
    rows = torch.tensor([0, 0, 0, 1])
    # the second <box> of answer 0 takes its next best region; the third finds none left
    assert RegionPointer.decode(logits, rows).tolist() == [0, 1, -1, 1]


def test_no_repeat_ngram_blocks_loops_but_not_box_lists():
    box = 7
    proc = NoRepeatNGram(3, [box])
    scores = torch.zeros(2, 10)
    ids = torch.tensor([[1, 2, 3, 1, 2], [box, 5, box, 5, box]])
    out = proc(ids, scores.clone())
    assert out[0, 3] == float("-inf") and torch.isfinite(out[0, :3]).all()  # "1 2 3 1 2" may not go on with 3
    assert torch.isfinite(out[1]).all()  # a list of boxes may go on
    assert box_token_index(torch.tensor([[box, 1, box]]), box).tolist() == [[0, 0], [0, 2]]


def test_perceived_values_set_the_first_token_of_closed_answers():
    from vol3d.models.vlm import PerceivedValues

    yes, no, digits = 7, 8, list(range(20, 30))
    values = PerceivedValues([0, 2, 3, None, 1, 0], [True, True, True, True, False, True], [(yes, no), (17, 18)],
                             digits)
    scores = torch.zeros(6, 40)
    scores[0, yes] = scores[1, no] = scores[2, 21] = scores[3, yes] = scores[4, no] = scores[5, 17] = 5.0  # the LM's
    out = values(torch.zeros(6, 0, dtype=torch.long), scores.clone()).argmax(-1).tolist()
    # a finding seen 0 times: "no"; seen twice: "yes"; three times: "3"; no finding named: the LM's
    # own answer; a question with a number ("larger than 20 mm?"): a present finding keeps the LM's "no";
    # "Yes" spelled otherwise: "No" in the same spelling
    assert out == [no, yes, digits[3], yes, no, 18]
    later = values(torch.zeros(6, 1, dtype=torch.long), scores.clone())
    assert torch.equal(later, scores)  # only the first answer token

    from vol3d.tasks.findings import as_vocab, finding_named

    vocab = as_vocab(VOCAB)
    assert finding_named("Is there a liver lesion?", vocab) == "liver_lesion"
    assert finding_named("How many kidney cysts are there?", vocab) == "kidney_cyst"
    assert finding_named("Does this scan show splenomegaly?", vocab) == "splenomegaly"
    assert finding_named("Any liver lesion or kidney cyst?", vocab) is None  # two: no single value
    assert finding_named("Is the liver normal?", vocab) is None


def test_generated_yes_no_and_counts_agree_with_the_digest(model):
    """Whatever value the LM would give (here: pushed to "yes", "5", "yes"), a whether or how-many answer
    about a finding is the perceived one (vol3d.tasks.reasoning.closed_answer); with the option off, the
    LM's first token stays."""
    case = make_case(3)
    volume = case["image"][None].expand(3, -1, -1, -1, -1)
    questions = ["Is there a liver lesion?", "How many liver lesions are there?", "Is there a kidney cyst?"]
    tok = model.tokenizer
    push = [tok("yes", add_special_tokens=False)["input_ids"][0], tok("5", add_special_tokens=False)["input_ids"][0],
            tok("yes", add_special_tokens=False)["input_ids"][0]]

    def lm_says(input_ids, scores):  # the LM's own first choice, before the perception's values
        if input_ids.shape[1] == 0:
            scores[torch.arange(3), push] += 100.0
        return scores

    answers, perceived = model.generate(volume, questions, max_new_tokens=1, return_perceived=True,
                                        logits_processor=[lm_says])
    lesions, cysts = perceived[0].count("liver_lesion"), perceived[0].count("kidney_cyst")

    def first(word):  # the first token of a word, as decoded ("yes" may be "y" + "es" in a tiny tokenizer)
        return tok.decode(tok(word, add_special_tokens=False)["input_ids"][:1]).strip()

    assert [a.strip() for a in answers] == ["yes" if lesions else "no", str(lesions), "yes" if cysts else "no"]
    model.config.closed_answers_from_perception = False
    try:
        plain = model.generate(volume, questions, max_new_tokens=1, logits_processor=[lm_says])
    finally:
        model.config.closed_answers_from_perception = True
    assert [a.strip() for a in plain] == [first("yes"), "5", first("yes")]


def test_a_generated_report_asserts_exactly_what_was_perceived(model, monkeypatch):
    """Whatever the LM writes, the report it returns names the findings its perception found and no
    others (vol3d.tasks.reports); raw=True returns the LM's own text untouched."""
    from vol3d.tasks import reports
    from vol3d.tasks.mentions import extract_findings
    from vol3d.tasks.reports import perceived_present

    # only report requests are reconciled, with the regions of their own volume
    seen: list[tuple[str, int]] = []
    monkeypatch.setattr(reports, "reconcile_report", lambda t, p, v: seen.append((t, len(p.findings))) or "RECONCILED")
    volume = make_case(3)["image"][None].expand(2, -1, -1, -1, -1)
    out, found = model.generate(volume, ["Write the findings for this CT.", "Is there a liver lesion?"],
                                max_new_tokens=4, return_perceived=True)
    assert out[0] == "RECONCILED" and out[1] != "RECONCILED" and seen == [(seen[0][0], len(found[0].findings))]
    assert model.generate(volume[:1], ["Write the findings for this CT."], max_new_tokens=4, raw=True)[0] != "RECONCILED"
    monkeypatch.undo()

    for seed in (3, 4):
        case = make_case(seed)
        volume = case["image"][None]
        (report,), (found,) = model.generate(volume, ["Write the findings for this CT."], max_new_tokens=12,
                                             return_perceived=True)
        said = {k for k, v in extract_findings(report, model.vocab).items() if v}
        assert said == perceived_present(found)
        raw = model.generate(volume, ["Write the findings for this CT."], max_new_tokens=12, raw=True)[0]
        model.config.reports_from_perception = False
        try:
            assert model.generate(volume, ["Write the findings for this CT."], max_new_tokens=12)[0] == raw
        finally:
            model.config.reports_from_perception = True


def test_the_perception_stage_trains_the_perception_alone_then_every_task(model):
    """``perception_steps``: batches of the first steps hold crops and dense targets only; their loss
    reaches the encoder and the perception and leaves the language model without a gradient."""
    obj = VLMObjective(model.processor, TaskMix(report=1, ground=1, samples_per_case=2),
                       LossConfig(organ=1, finding=1, finding_type=1, condition=1, pointer=1),
                       perception=(model.vocab, model.labels), patch_size=(16, 16, 8), patches_per_case=2,
                       perception_steps=3)
    assert obj.stage_starts == (3,)
    cases = [make_case(0), make_case(1, lesions=1)]
    rngs = [np.random.default_rng(i) for i in range(2)]
    early = obj.make_batch(cases, rngs, step=2)
    assert early["perception_only"] and "input_ids" not in early and "volume" not in early
    assert early["patches"].shape == (4, 1, 16, 16, 8) and early["finding_target"].shape == (4, 16, 16, 8)
    model.train()
    model.zero_grad(set_to_none=True)
    loss, logs = obj.loss(model, early)
    loss.backward()
    assert set(logs) == {"organ", "finding", "finding_type"} and torch.isfinite(loss)
    assert all(p.grad is None for p in model.lm.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.perception.organ_head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    model.zero_grad(set_to_none=True)
    late = obj.make_batch(cases, rngs, step=3)  # the second stage: every task
    assert "input_ids" in late and not late.get("perception_only")
    assert "input_ids" in obj.make_batch(cases, rngs)  # no step (validation): every task
    with pytest.raises(ConfigError, match="perception on `patches` alone"):
        model(None, None)


def test_the_first_stage_parameters_of_a_perception_run_are_the_dense_path_alone(model):
    """What ``optim.stage_lr: keep`` or ``freeze`` holds after the first stage: the encoder, the decoder and the
    organ and finding heads; the language model, projector, pointer, condition heads and region embedding
    first train with every task, so they warm up then."""
    from vol3d.train.config import DataConfig, TrainConfig
    from vol3d.train.loop import first_stage_parameters

    obj = VLMObjective(model.processor, TaskMix(report=1, ground=1, samples_per_case=2),
                       LossConfig(organ=1, finding=1, finding_type=1, condition=1, pointer=1),
                       perception=(model.vocab, model.labels), patch_size=(16, 16, 8), patches_per_case=2,
                       perception_steps=3)
    cfg = TrainConfig(device="cpu", max_steps=6, data=DataConfig(batch_size=2))
    model.train()
    found = first_stage_parameters(model, obj, [make_case(0), make_case(1, lesions=1)], cfg, torch.device("cpu"))
    ids = {id(p): name for name, p in model.named_parameters()}  # a shared module's parameters: one name

    def names(*modules):
        return {ids[id(p)] for m in modules for p in m.parameters() if p.requires_grad}

    p = model.perception
    assert names(p.organ_head, p.finding_head, p.decoder) <= found
    assert any(name.startswith("encoder.") for name in found)
    later = names(model.lm, model.projector, p.condition_head, p.region_embed,
                  *([model.pointer] if model.pointer is not None else []))
    assert later and not later & found
    assert all(p.grad is None for p in model.parameters())


def test_a_perception_stage_needs_a_perception_model(model):
    with pytest.raises(ValueError, match="perception"):
        VLMObjective(model.processor, TaskMix(report=1), LossConfig(), perception_steps=2)


def _lesion_seer(model, monkeypatch, patch):
    """The perception replaced by one that sees only each lesion's centre voxel, faintly, at the first
    look (whole volume) and the whole lesion, surely, in a crop of ``patch`` (the size it learned on):
    the mean of the two views is the whole lesion. Returns the list of the crops' shapes it was given."""
    real = type(model.perception).forward
    crops: list[tuple[int, ...]] = []

    def seen(self, volume, maps):
        out = real(self, volume, maps)
        lesion, sure = (volume[:, :1] > 0.7).float(), 80.0
        if tuple(volume.shape[2:]) == patch:
            crops.extend([tuple(volume.shape[1:])] * volume.shape[0])
        else:  # the first look: each lesion's centre voxel (its 3 x 3 x 3 erosion)
            lesion, sure = -F.max_pool3d(-lesion, 3, stride=1, padding=1), 40.0
        logits = out["finding_logits"].clone()
        logits[:, 0] = lesion[:, 0] * sure - 20
        logits[:, 1] = 10.0  # every finding is a liver lesion
        return {**out, "finding_logits": logits}

    monkeypatch.setattr(type(model.perception), "forward", seen)
    monkeypatch.setattr(model, "config", dataclasses.replace(model.config, perception_patch=list(patch)))
    return crops


def test_each_finding_is_looked_at_again_on_a_crop_whose_maps_join_the_first(model, monkeypatch):
    """The first look sees only each lesion's centre, the crop the whole lesion (:func:`_lesion_seer`):
    the mean of the two views is the whole lesion, and every answer reads it."""
    patch = (16, 16, 8)
    crops = _lesion_seer(model, monkeypatch, patch)
    case = make_case(3)
    volume, truth = case["image"][None], case["boxes_vox"].numpy()
    assert model.looks_again
    first = model.perceive(volume, look_again=False)[0]
    assert not crops
    assert sorted(tuple(r.box) for r in first.findings) == sorted(tuple(b + [1, 1, 1, -1, -1, -1]) for b in truth)
    again = model.perceive(volume)[0]
    assert crops == [(1, *patch)] * 2  # one crop per lesion, of the size the decoder learned on
    assert sorted(tuple(r.box) for r in again.findings) == sorted(tuple(b) for b in truth)
    assert [r.volume_ml for r in again.findings] == pytest.approx([27 * 16 / 1000] * 2)  # 3 x 3 x 3 voxels of 16 mm3
    _, seen_by_answers = model.generate(volume, ["Where is the liver lesion?"], max_new_tokens=4, return_perceived=True)
    assert sorted(tuple(r.box) for r in seen_by_answers[0].findings) == sorted(tuple(b) for b in truth)
    # a model that learned on whole volumes, or told not to look again, looks once
    crops.clear()
    for options in ({"perception_patch": []}, {"look_again": False}):
        monkeypatch.setattr(model, "config", dataclasses.replace(model.config, **{"perception_patch": list(patch),
                                                                                  **options}))
        assert not model.looks_again
        assert [tuple(r.box) for r in model.perceive(volume)[0].findings] == [tuple(r.box) for r in first.findings]
        assert not crops


def test_reading_a_volume_encodes_and_perceives_it_once_for_every_question(model, monkeypatch):
    """Inside ``reading(vol)`` the answers, perceptions and EHR scores about ``vol`` are those computed
    without it, from one encoding and one second look; anything else is computed as usual."""
    crops = _lesion_seer(model, monkeypatch, (16, 16, 8))
    encoded: list[tuple[int, ...]] = []
    real_encode = model._encode
    monkeypatch.setattr(model, "_encode", lambda v, dense: encoded.append(tuple(v.shape)) or real_encode(v, dense))
    vol, other = make_case(3)["image"], make_case(5)["image"]
    questions = ["Where is the liver lesion?", "How many liver lesions are there?", "Is there a kidney cyst?"]
    enc = model.processor(["<vol> risk"])

    def ask_everything(v):
        batch = v[None].expand(len(questions), *v.shape)
        answers = model.generate(batch, questions, max_new_tokens=6)
        again, first = model.perceive(v[None])[0], model.perceive(v[None], look_again=False)[0]
        ehr = model(v[None], enc["input_ids"], enc["attention_mask"])["ehr_logits"]
        return answers, again, first, ehr

    def boxes(perceived):
        return sorted(tuple(r.box) for r in perceived.findings)

    model.eval()  # as a loaded model is (training never reuses: see below)
    with torch.inference_mode():
        plain = ask_everything(vol)
        # without a reading block every call encodes, and all but the first look look again at both lesions
        assert (len(encoded), len(crops)) == (4, 3 * 2)
        encoded.clear()
        crops.clear()
        with model.reading(vol):
            read = ask_everything(vol)
            assert len(encoded) == 1 and len(crops) == 2  # once, whatever was asked
            assert read[0] == plain[0]
            assert boxes(read[1]) == boxes(plain[1]) and boxes(read[2]) == boxes(plain[2])
            assert boxes(read[1]) != boxes(read[2])  # the first look stays the first look after the second
            assert torch.equal(read[3], plain[3])
            read[1].findings.clear()  # each caller owns its regions
            assert boxes(model.perceive(vol[None])[0]) == boxes(plain[1])
            assert len(encoded) == 1
            model.perceive(other[None])  # another volume: computed, not taken for the block's
            assert len(encoded) == 2
            with torch.enable_grad():  # something learning never reuses
                model.encode_volume(vol[None])
            assert len(encoded) == 3
            model.train()
            model(vol[None], enc["input_ids"], enc["attention_mask"])
            assert len(encoded) == 4
        encoded.clear()
        model.perceive(vol[None])  # the block has ended
        assert len(encoded) == 1
    with pytest.raises(InputError, match="one volume"), model.reading(vol[None].expand(2, *vol.shape)):
        pass


@pytest.mark.parametrize("shape, grid", [((16, 12, 8), (8, 6, 4)), ((16, 12, 8), (16, 12, 8)), ((10, 12, 9), (4, 5, 3))])
def test_region_masks_pooled_to_the_feature_grid_are_the_average_pooled_one_hot_masks(shape, grid):
    """Counting voxels per cell (the grid divides the map) and pooling a one-hot copy (it does not)
    both give adaptive_avg_pool3d of each id's mask; ids outside 0..n-1 (-1: none) cover nothing."""
    from vol3d.models.perception import _pooled_masks

    ids = torch.randint(-1, 6, (2, *shape), generator=torch.Generator().manual_seed(0))
    onehot = torch.stack([(ids == k).float() for k in range(5)], dim=1)  # id 5 is out of range here
    want = F.adaptive_avg_pool3d(onehot, grid).flatten(2)
    got = _pooled_masks(ids, 5, grid)
    assert got.shape == (2, 5, int(np.prod(grid)))
    torch.testing.assert_close(got, want)


def test_an_ehr_code_follows_its_findings_perceived_score_when_asked(model, tmp_path):
    """model.ehr_finding_prior: the liver lesion's code reads the lesion's score through a learned gain
    (4 logits between score 0 and 1 at the start); a code no finding names does not."""
    from vol3d.models.vlm import EHR_PRIOR_GAIN
    from vol3d.tasks.regions import summary_dim

    assert model.ehr_prior_gain is None  # off unless asked
    cfg = dataclasses.replace(model.config, num_ehr_codes=2, ehr_codes=["K76.89", "I10"], ehr_finding_prior=True)
    m = Vol3DModel(cfg, tokenizer=model.tokenizer).eval()
    assert m.ehr_prior_linked.tolist() == [1.0, 0.0]
    with torch.no_grad():
        m.ehr_head.fc.weight.zero_()  # the head alone says the same for both volumes
    pooled = torch.randn(1, m.encoder.embed_dim).expand(2, -1)
    summary = torch.zeros(2, summary_dim(m.vocab, m.labels))
    summary[0, 0] = 1.0  # a liver lesion seen for sure; none in the second volume
    logits = m.head_outputs(pooled, summary=summary)["ehr_logits"]
    assert (logits[0] - logits[1]).tolist() == pytest.approx([EHR_PRIOR_GAIN, 0.0])
    logits[0, 0].backward()
    assert m.ehr_prior_gain.grad[0] != 0  # learned
    with torch.no_grad():
        m.ehr_prior_gain.fill_(2.5)
    m.save_pretrained(tmp_path / "m")
    again = Vol3DModel.from_pretrained(tmp_path / "m")
    assert again.config.ehr_finding_prior and again.ehr_prior_gain.tolist() == [2.5, 2.5]


def test_ehr_codes_of_a_volume_read_what_the_model_perceives(model):
    """ehr_logits (what `vol3d ask --ehr` and `Vol3DPipeline.ehr` call): no text, the head on the pooled
    features and the regions' summary, the prior on the summary where a finding found nowhere keeps its
    strongest voxel. (The pipeline had passed no summary, which a perception model's head refuses.)"""
    from vol3d.models.vlm import EHR_PRIOR_GAIN
    from vol3d.tasks.regions import summary_dim

    headless = Vol3DModel(dataclasses.replace(model.config, num_ehr_codes=0, ehr_codes=[]), tokenizer=model.tokenizer)
    with pytest.raises(ConfigError, match="no EHR head"):
        headless.ehr_logits(make_case(4)["image"][None])
    cfg = dataclasses.replace(model.config, num_ehr_codes=2, ehr_codes=["K76.89", "I10"], ehr_finding_prior=True)
    torch.manual_seed(0)
    m = Vol3DModel(cfg, tokenizer=model.tokenizer).eval()
    volume = make_case(4)["image"][None]
    logits = m.ehr_logits(volume, spacing=(2.0, 2.0, 3.0))
    with torch.no_grad():
        enc = m.encode_volume(volume)
        regions = m._perceived(enc, (2.0, 2.0, 3.0), volume)[1]
        want = m.head_outputs(enc["pooled"], summary=regions["summary"], prior=regions["prior"])["ehr_logits"]
    assert logits.shape == (1, 2) and torch.equal(logits, want)
    # the prior reads `prior` where given: a lesion found nowhere with evidence 0.3 against none at all
    with torch.no_grad():
        m.ehr_head.fc.weight.zero_()
    pooled = torch.randn(1, m.encoder.embed_dim).expand(2, -1)
    summary = torch.zeros(2, summary_dim(m.vocab, m.labels))
    prior = summary.clone()
    prior[0, 0] = 0.3
    with torch.no_grad():
        logits = m.head_outputs(pooled, summary=summary, prior=prior)["ehr_logits"]
    assert (logits[0] - logits[1]).tolist() == pytest.approx([0.3 * EHR_PRIOR_GAIN, 0.0])


@pytest.mark.parametrize("change", [{"perception_stem": True}, {"perception_upsample": "linear"},
                                    {"conv_padding": "replicate"}])
def test_perception_decoder_options_are_built_saved_and_restored(model, tmp_path, change):
    from monai.networks.blocks import UpSample

    cfg = dataclasses.replace(model.config, **change)
    torch.manual_seed(1)
    m = Vol3DModel(cfg, tokenizer=model.tokenizer).eval()
    assert m.perception is not None and model.perception is not None
    decoder, plain = m.perception.decoder, model.perception.decoder
    if "perception_stem" in change:
        assert decoder.input_block is not None and plain.input_block is None
    elif "conv_padding" in change:
        modes = {c.padding_mode for c in m.modules() if isinstance(c, torch.nn.Conv3d) and any(c.padding)}
        assert modes == {"replicate"}
    else:
        assert isinstance(decoder.path.ups[0][0], UpSample) and not isinstance(plain.path.ups[0][0], UpSample)
    volume = make_case(4)["image"][None]
    with torch.no_grad():
        before = m.encode_volume(volume)["perception"]["finding_logits"]
    m.save_pretrained(tmp_path / "m")
    again = Vol3DModel.from_pretrained(tmp_path / "m").eval()
    assert all(getattr(again.config, k) == v for k, v in change.items())
    with torch.no_grad():
        assert torch.equal(again.encode_volume(volume)["perception"]["finding_logits"], before)


def test_replicate_padding_and_the_linear_up_path_read_a_featureless_volume_alike_everywhere(model):
    # With zero padding a zeroed volume's maps get borders unlike their inside and the instance norms scale
    # them up (the image-blind model then perceived findings, quality.md round 20); with the border voxel
    # repeated and interpolation in the up path, every voxel of a constant volume reads the same.
    torch.manual_seed(2)
    plain = Vol3DModel(dataclasses.replace(model.config, perception_upsample="linear"), tokenizer=model.tokenizer)
    torch.manual_seed(2)
    padded = Vol3DModel(dataclasses.replace(model.config, perception_upsample="linear", conv_padding="replicate"),
                        tokenizer=model.tokenizer)
    # the same weights: only the padding differs
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), padded.state_dict().values(), strict=True))
    spread = {}
    for name, m in (("zeros", plain.eval()), ("replicate", padded.eval())):
        with torch.no_grad():
            for value in (0.0, 0.7):
                maps = m.encode_volume(torch.full((1, 1, *SHAPE), value))["perception"]
                for key in ("finding_logits", "organ_logits"):
                    spread[name, value, key] = float(maps[key][0].flatten(1).std(1).max())
    assert all(spread["replicate", v, k] < 1e-4 for v in (0.0, 0.7) for k in ("finding_logits", "organ_logits"))
    assert max(spread["zeros", v, "finding_logits"] for v in (0.0, 0.7)) > 1e-2
    # an image still reads as an image
    with torch.no_grad():
        maps = padded.encode_volume(make_case(4)["image"][None])["perception"]
    assert float(maps["finding_logits"][0].flatten(1).std(1).max()) > 1e-2


def test_conv_padding_is_checked_and_set_on_padded_convolutions_only():
    from vol3d.models.layers import set_conv_padding

    with pytest.raises(ConfigError, match="conv_padding must be one of"):
        dataclasses.replace(Vol3DConfig(lm_config=TINY_LLAMA), conv_padding="reflect")
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.Conv3d(2, 2, 1),
                              torch.nn.ConvTranspose3d(2, 2, 3, stride=2, padding=1), torch.nn.Conv3d(2, 1, 3, padding="same"))
    with pytest.raises(ConfigError, match="conv_padding must be one of"):
        set_conv_padding(net, "circle")
    assert set_conv_padding(net, "replicate") == 2
    assert [m.padding_mode for m in net] == ["replicate", "zeros", "zeros", "replicate"]
    with torch.no_grad():
        y = net[0](torch.full((1, 1, 5, 5, 5), 3.0))
    assert float(y[0].flatten(1).std(1).max()) < 1e-5  # a constant stays constant up to the borders


def test_finding_weights_give_every_instance_the_same_share_when_balanced():
    from vol3d.train.objectives import finding_weights, instance_sizes

    region = np.full((6, 6, 6), -1, np.int64)
    region[:2, :2, :2] = 0  # 8 voxels
    region[4, 4, 4] = 1  # 1 voxel
    target = np.zeros(region.shape, np.float32)
    target[region >= 0] = 1.0
    target[5, 0, 0] = 1.0  # a finding voxel outside every instance (a cut lesion)
    sizes = instance_sizes(region)
    assert sizes[0, 0, 0] == 8 and sizes[4, 4, 4] == 1 and sizes[3, 3, 3] == 0
    size, tgt = torch.from_numpy(sizes)[None], torch.from_numpy(target)[None]
    plain = finding_weights(size, tgt, 0.0)
    assert torch.allclose(plain, torch.ones_like(plain))
    w = finding_weights(size, tgt, 1.0)
    assert torch.allclose(w[tgt == 0], torch.tensor(1.0))  # negatives untouched
    assert torch.isclose(w[tgt > 0].mean(), torch.tensor(1.0))  # the positives' total weight is kept
    big, small = w[0, :2, :2, :2].sum(), w[0, 4, 4, 4]
    assert torch.isclose(big, small)  # each instance weighs alike, 8 voxels or 1
    assert torch.isclose(w[0, 5, 0, 0], torch.tensor(1.0))  # the unassigned voxel: the finding voxels' average
    half = finding_weights(size, tgt, 0.5)
    assert torch.isclose(half[0, :2, :2, :2].sum() / half[0, 4, 4, 4], torch.tensor(8 ** 0.5))  # between 1 and 8
    no_findings = finding_weights(size, torch.zeros_like(tgt), 1.0)
    assert torch.equal(no_findings, torch.ones_like(no_findings))


def test_a_balanced_finding_loss_weighs_a_missed_small_lesion_like_a_missed_large_one(model):
    """Predicting the large lesion and missing the small one costs more with the instance balance than
    without; the reverse costs less. The batch crops carry each voxel's instance size."""
    shape = (1, 12, 12, 12)
    target = torch.zeros(shape)
    target[0, :4, :4, :4] = 1.0  # 64 voxels
    target[0, 9, 9, 9] = 1.0  # 1 voxel
    size = torch.zeros(shape)
    size[0, :4, :4, :4], size[0, 9, 9, 9] = 64.0, 1.0

    def loss(balance: float, found_big: bool, target: torch.Tensor = target, size: torch.Tensor = size) -> float:
        logits = torch.full((1, 2, 12, 12, 12), -4.0)
        logits[:, 1] = 0.0
        if found_big:
            logits[0, 0, :4, :4, :4] = 4.0
        else:
            logits[0, 0, 9, 9, 9] = 4.0
        obj = VLMObjective(model.processor, TaskMix(report=1), LossConfig(finding=1, finding_instance_balance=balance),
                           perception=(model.vocab, model.labels))
        batch = {"organ_mask": torch.tensor([False]), "finding_mask": torch.tensor([True]), "finding_target": target,
                 "finding_type": torch.where(target > 0, 0, -100), "organ_target": torch.zeros(shape, dtype=torch.long)}
        if balance:
            batch["finding_size"] = size
        out = {"organ_logits": torch.zeros(1, 3, 12, 12, 12), "finding_logits": logits}
        return float(obj.dense_losses(out, batch)["finding"])

    assert loss(1.0, found_big=True) > 2 * loss(0.0, found_big=True)
    assert loss(1.0, found_big=False) < loss(0.0, found_big=False)
    alike = size.clone()
    alike[0, 9, 9, 9] = 64.0  # instances of one size: the balance changes nothing
    assert loss(1.0, True, size=alike) == pytest.approx(loss(0.0, True), rel=1e-5)
    obj = VLMObjective(model.processor, TaskMix(report=1, ground=1, samples_per_case=2),
                       LossConfig(organ=1, finding=1, finding_type=1, finding_instance_balance=1.0),
                       perception=(model.vocab, model.labels), patch_size=(16, 16, 8), patches_per_case=2,
                       perception_steps=1)
    batch = obj.make_batch([make_case(0), make_case(1, lesions=1)], [np.random.default_rng(i) for i in range(2)],
                           step=0)
    sized = batch["finding_size"] > 0
    assert sized.any() and torch.equal(sized, batch["finding_target"] > 0)
    assert set(batch["finding_size"][sized].unique().tolist()) <= {27.0}  # every lesion of make_case is 3 x 3 x 3
    with pytest.raises(ConfigError, match="finding_instance_balance"):
        LossConfig(finding_instance_balance=1.5)


def test_a_class_balanced_finding_bce_keeps_a_missed_lesions_gradient_whatever_the_crop(model):
    """With ``finding_positive_share`` the gradient at a missed lesion does not shrink with the voxels around
    it (averaged over every voxel it does, 1000-fold here); each side keeps its share, and each instance its
    part of the finding side."""
    def grad_at_lesion(n: int, share: float | None) -> float:
        logit = torch.full((1, n, 10, 10), -8.0)  # every voxel called background with confidence
        logit.requires_grad_(True)
        target = torch.zeros_like(logit)
        target[0, 0, 0, 0] = 1.0  # a one-voxel lesion, missed
        if share is None:
            loss = F.binary_cross_entropy_with_logits(logit, target, pos_weight=torch.tensor(10.0))
        else:
            loss = class_balanced_bce(logit, target, None, share)
        loss.backward()
        return float(logit.grad[0, 0, 0, 0])

    assert grad_at_lesion(1, 0.1) == pytest.approx(grad_at_lesion(1000, 0.1), rel=1e-4)
    assert grad_at_lesion(1, 0.1) == pytest.approx(-0.1, rel=1e-3)  # share x (sigmoid(-8) - 1)
    assert grad_at_lesion(1, None) / grad_at_lesion(1000, None) == pytest.approx(1000, rel=1e-4)

    target = torch.zeros(1, 8, 8, 8)
    target[0, :2, :2, :2] = 1.0  # 8 voxels
    target[0, 6, 6, 6] = 1.0  # 1 voxel
    size = torch.where(target > 0, 8.0, 0.0)
    size[0, 6, 6, 6] = 1.0
    weight = finding_weights(size, target, 1.0)
    logit = torch.zeros_like(target)
    logit[0, 6, 6, 6] = 20.0  # the small one found, the large one at 0.5
    on_big = 0.5 * F.softplus(torch.tensor(0.0))  # half the finding side, at the BCE of p = 0.5
    off = F.softplus(torch.tensor(0.0))  # every background voxel at p = 0.5
    expected = 0.3 * on_big + 0.7 * off
    assert float(class_balanced_bce(logit, target, weight, 0.3)) == pytest.approx(float(expected), rel=1e-4)
    assert float(class_balanced_bce(torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 4), None, 0.3)) == pytest.approx(
        0.7 * float(off), rel=1e-5)  # no finding in the batch: the background side alone, finite
    # the objective uses it when the share is set, and pos_weight no longer matters
    obj = VLMObjective(model.processor, TaskMix(report=1), LossConfig(finding=1, finding_positive_share=0.3),
                       perception=(model.vocab, model.labels))
    batch = {"organ_mask": torch.tensor([False]), "finding_mask": torch.tensor([True]), "finding_target": target,
             "finding_type": torch.where(target > 0, 0, -100), "organ_target": torch.zeros(target.shape, dtype=torch.long)}
    out = {"organ_logits": torch.zeros(1, 3, 8, 8, 8), "finding_logits": torch.stack([logit, torch.zeros_like(logit)], 1)}
    p = torch.sigmoid(logit)
    dice = 1.0 - (2.0 * (p * target).sum() + 1.0) / (p.sum() + target.sum() + 1.0)
    unweighted = class_balanced_bce(logit, target, None, 0.3) + dice
    assert float(obj.dense_losses(out, batch)["finding"]) == pytest.approx(float(unweighted), rel=1e-5)
    obj.weights = LossConfig(finding=1, finding_positive_share=0.3, finding_pos_weight=99.0)
    assert float(obj.dense_losses(out, batch)["finding"]) == pytest.approx(float(unweighted), rel=1e-5)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match="finding_positive_share"):
            LossConfig(finding_positive_share=bad)


def test_a_resnet_perception_reads_a_featureless_volume_alike_everywhere(model, tmp_path):
    # the GPU preset's encoder family (resnet3d_*: batch norm, a "unet" decoder) takes the interpolating up
    # path too; with replicate padding a constant volume's perception maps are constant, and the choice is
    # saved with the model
    cfg = dataclasses.replace(model.config, encoder="resnet3d_tiny", encoder_overrides={}, input_shape=(32, 32, 32),
                              perception_upsample="linear", conv_padding="replicate")
    torch.manual_seed(3)
    m = Vol3DModel(cfg, tokenizer=model.tokenizer).eval()
    assert m.perception is not None and m.perception.decoder.style == "unet"
    with torch.no_grad():
        maps = m.encode_volume(torch.full((1, 1, 32, 32, 32), 0.3))["perception"]
    assert all(float(maps[k][0].flatten(1).std(1).max()) < 1e-4 for k in ("finding_logits", "organ_logits"))
    m.save_pretrained(tmp_path / "m")
    again = Vol3DModel.from_pretrained(tmp_path / "m")
    assert (again.config.perception_upsample, again.config.conv_padding) == ("linear", "replicate")
