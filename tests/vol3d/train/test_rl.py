"""GRPO (vol3d.train.rl): verifiable rewards, group-relative advantages, and a policy step that makes the
better-rewarded answer more likely; sampling reads the model's own digest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from preprocess.errors import ConfigError
from tests.vol3d.models.test_perception import LABELS, SHAPE, TINY_LLAMA, VOCAB, make_case
from vol3d.models import Vol3DConfig, Vol3DModel, build_tokenizer
from vol3d.tasks.regions import digest_text
from vol3d.tasks.samples import sample_one
from vol3d.train.config import RLConfig, TrainConfig
from vol3d.train.rl import GRPOObjective, group_advantages, reward, sequence_logprobs

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def model():
    texts = ["Findings: liver lesion x2: <reg> 6 x 6 x 12 mm, liver. No kidney cyst. Splenomegaly: no. "
             "Organs: liver <org> 100 mL; spleen <org> 10 mL, 32 mm.", "Two liver lesions. No kidney cyst.",
             "There is a liver lesion. The kidneys are normal. yes no 0 1 2 3"]
    cfg = Vol3DConfig(encoder="resunet3d_tiny", encoder_overrides={"channels": [4, 8, 8, 8]}, in_chans=1,
                      input_shape=SHAPE, reducer="pool", reducer_params={"out_grid": [1, 1, 1]}, lm_config=TINY_LLAMA,
                      perception=True, perception_dim=4, label_names=list(LABELS), finding_labels=["lesion"],
                      findings=VOCAB)
    torch.manual_seed(0)
    m = Vol3DModel(cfg, tokenizer=build_tokenizer(texts * 3, vocab_size=300))
    m.preprocess = {"target_spacing": [2.0, 2.0, 4.0]}
    return m


def _objective(m, **rl) -> GRPOObjective:
    cfg = TrainConfig(task="grpo", rl=RLConfig(**{"group_size": 3, "max_new_tokens": 6, **rl}))
    return GRPOObjective(m.processor, cfg.task_mix(), cfg.rl, m.vocab, max_length=256)


def test_rewards_are_checked_against_the_reference():
    case = make_case(0)
    report = sample_one(case, "report", 0, vocab=VOCAB)
    report = report._replace(answer="Two liver lesions. No kidney cyst. The spleen is normal.")
    assert reward("report", "Liver lesions, two of them. No kidney cyst.", report, VOCAB) == 1.0
    assert reward("report", "No liver lesion. A kidney cyst.", report, VOCAB) == 0.0
    assert reward("report", "Liver lesion. Kidney cyst.", report, VOCAB) == pytest.approx(2 / 3)
    normal = report._replace(answer="No focal liver lesion. Kidneys unremarkable.")
    assert reward("report", "Unremarkable study.", normal, VOCAB) == 1.0  # neither names a finding
    closed = sample_one(case, "vqa_closed", 1, vocab=VOCAB)
    assert reward("vqa_closed", closed.answer.upper() + ".", closed, VOCAB) == 1.0
    with pytest.raises(ValueError, match="no verifiable reward"):
        reward("ehr", "", closed, VOCAB)


def test_advantages_compare_within_a_group_and_ties_teach_nothing():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.5], [0.3, 0.3, 0.3]]))
    assert adv[0].argmax() == 0 and adv[0].argmin() == 1 and abs(float(adv[0].sum())) < 1e-5
    assert float(adv[0].std(unbiased=False)) == pytest.approx(1.0, rel=1e-3)
    assert torch.equal(adv[1], torch.zeros(3))


def test_a_policy_step_makes_the_rewarded_answer_more_likely(model):
    obj = _objective(model)
    batch = obj.make_batch([make_case(0)], [np.random.default_rng(0)])
    good, bad = "Two liver lesions.", "No kidney cyst."
    answers = [[good, bad, bad]]
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0]]))

    def gap() -> float:
        """log p(good) - log p(bad), each read after the model's own digest."""
        with torch.no_grad():
            found, regions = model._perceived(model.encode_volume(batch["volume"]), batch["spacing"].numpy())
            ctx = [digest_text(found[0], model.vocab)] * 2
            enc = obj.processor([batch["samples"][0].prompt] * 2, [good, bad], max_length=256, contexts=ctx)
            out = model(batch["volume"], enc["input_ids"], enc["attention_mask"],
                        volume_index=torch.zeros(2, dtype=torch.long), regions=regions)
            lp = sequence_logprobs(out["logits"], enc["labels"])
            return float(lp[0] - lp[1])

    model.eval()
    before = gap()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for _ in range(3):
        loss = obj.policy_loss(model, batch, answers, adv)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert gap() > before + 0.1


def test_a_grpo_step_samples_groups_scores_them_and_logs(model):
    obj = _objective(model)
    batch = obj.make_batch([make_case(0), make_case(1, lesions=1)], [np.random.default_rng(i) for i in range(2)])
    assert [s.task for s in batch["samples"]] == ["report", "report"]
    answers = obj.sample(model, batch)
    assert [len(g) for g in answers] == [3, 3]
    model.train()
    loss, logs = obj.loss(model, batch)
    assert torch.isfinite(loss) and 0.0 <= logs["reward"] <= 1.0 and 0.0 <= logs["active_groups"] <= 1.0
    loss.backward()  # a graph even when every group tied
    val = obj.validate(model, [make_case(2)])
    assert 0.0 <= val["reward"] <= 1.0


def test_rl_config_checks():
    with pytest.raises(ConfigError, match="rl.tasks"):
        RLConfig(tasks=("ground",))
    with pytest.raises(ConfigError, match="group_size"):
        RLConfig(group_size=1)
    assert TrainConfig(task="grpo", rl=RLConfig(tasks=("report", "vqa_closed"))).task_mix().vqa_closed == 1.0
    with pytest.raises(ConfigError, match="choose from encoder, lm"):
        TrainConfig(freeze=("decoder",))


def test_a_finetune_keeps_the_init_architecture_and_switches_on_its_own_freezing(model, tmp_path):
    """configs/finetune/{grpo,report}.yaml freeze the encoder: trained on text alone it drifted, and the
    perception that reads it with it (docs/benchmarks/quality.md, round 6)."""
    import dataclasses

    from preprocess.config_io import load_yaml
    from vol3d.train.run import build_model

    model.save_pretrained(tmp_path / "init" / "model")
    for preset in ("grpo", "report"):
        cfg = load_yaml(TrainConfig, ROOT / "configs" / "finetune" / f"{preset}.yaml")
        cfg = dataclasses.replace(cfg, init=str(tmp_path / "init"), run_dir=str(tmp_path / preset))
        tuned, out = build_model(cfg, None, resume=False)
        assert out.model.freeze_encoder and out.model.perception  # the init's architecture, this run's freezing
        assert not any(p.requires_grad for p in tuned.encoder.parameters())
        assert any(p.requires_grad for p in tuned.lm.parameters())
        tuned.train()
        assert not tuned.encoder.training  # batch-norm statistics stay too


def test_train_within_stops_on_the_clock_like_ctrl_c(monkeypatch, tmp_path):
    """The clock stops training as Ctrl-C does (a checkpoint of the last step); a real Ctrl-C still
    propagates; the clock ringing after the last step is no stop; ``resume`` reaches the training."""
    import time
    from types import SimpleNamespace

    from vol3d.train import run as run_module
    from vol3d.train.loop import TrainingInterrupted

    resumed = []

    def slow(cfg, resume=False, budget_s=None):  # a training that would go on: the loop turns Ctrl-C into a checkpoint at step 7
        resumed.append(resume)
        try:
            time.sleep(30)
        except KeyboardInterrupt:
            raise TrainingInterrupted(tmp_path, 7) from None
        return SimpleNamespace(step=100)

    monkeypatch.setattr(run_module, "train", slow)
    t0 = time.perf_counter()
    assert run_module.train_within(TrainConfig(), 1.0, resume=True) == (7, True) and time.perf_counter() - t0 < 10
    assert resumed == [True]
    budgets = []
    monkeypatch.setattr(run_module, "train",
                        lambda cfg, resume=False, budget_s=None: budgets.append(budget_s) or SimpleNamespace(step=3))
    assert run_module.train_within(TrainConfig(), 5.0) == (3, False)
    assert run_module.train_within(TrainConfig(), 5.0, plan=True) == (3, False)
    assert budgets == [None, 5.0]  # only a planned run fits its steps to the clock's seconds

    def interrupted(cfg, resume=False, budget_s=None):  # the user's Ctrl-C, long before the clock
        raise TrainingInterrupted(tmp_path, 2)

    monkeypatch.setattr(run_module, "train", interrupted)
    with pytest.raises(TrainingInterrupted):
        run_module.train_within(TrainConfig(), 30.0)

    def closing(cfg, resume=False, budget_s=None):  # the clock rings after the loop, while the run closes
        time.sleep(30)

    monkeypatch.setattr(run_module, "train", closing)
    (tmp_path / "checkpoints" / "step_40").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_40" / "trainer.json").write_text('{"step": 40}')
    cfg = TrainConfig(run_dir=str(tmp_path), max_steps=40)
    assert run_module.train_within(cfg, 1.0) == (40, False)  # the last step was done: not a stop
    import signal

    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # the clock is off again
