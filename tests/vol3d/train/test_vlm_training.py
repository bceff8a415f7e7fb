"""The tiny vision-language model trained by the one loop on in-memory synthetic cases, then reloaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from preprocess.geometry import unit_boxes
from vol3d.models import Vol3DConfig, Vol3DModel, build_tokenizer
from vol3d.tasks import CodeVocab, TaskMix, corpus_texts
from vol3d.train.config import TINY_LM, DataConfig, LossConfig, OptimConfig, TrainConfig
from vol3d.train.loop import fit
from vol3d.train.objectives import VLMObjective, centre_targets, grounding_losses

SHAPE = (32, 32, 16)


def fake_case(i: int) -> dict:
    """A CacheDataset-like item: a bright cube (the lesion) in noise, with its box, report and codes."""
    rng = np.random.default_rng(i)
    image = rng.normal(0.2, 0.05, size=(1, *SHAPE)).astype(np.float32)
    lo = rng.integers(2, 20, size=3) * np.array([1, 1, 0.5])
    lo = lo.astype(int)
    size = np.array([8, 8, 4])
    image[0, lo[0]:lo[0] + size[0], lo[1]:lo[1] + size[1], lo[2]:lo[2] + size[2]] = 1.0
    box = np.concatenate([lo - 0.5, lo + size - 0.5]).astype(np.float32)
    has = i % 2 == 0
    return {
        "id": f"c{i}", "image": torch.from_numpy(image), "label": torch.zeros(SHAPE, dtype=torch.int64),
        "affine": torch.eye(4, dtype=torch.float64), "spacing": torch.ones(3, dtype=torch.float64),
        "boxes_vox": torch.from_numpy(box[None] if has else np.zeros((0, 6), np.float32)),
        "boxes_visible": torch.ones(1 if has else 0),
        "box_findings": ["liver_lesion"] if has else [], "box_organs": ["liver"] if has else [],
        "report": "Liver lesion present." if has else "No focal lesion.",
        "codes": ["K76.89"] if has else ["Z00.0"], "modality": "CT",
    }


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    return [fake_case(i) for i in range(8)]


def tiny_model(cases: list[dict]) -> tuple[Vol3DModel, CodeVocab]:
    codes = CodeVocab.from_cases(cases)
    cfg = Vol3DConfig(encoder="vit3d_tiny", input_shape=SHAPE, reducer="pool", reducer_params={"out_grid": [2, 2, 2]},
                      lm_config=dict(TINY_LM), box_head=True, ehr_codes=list(codes.codes))
    torch.manual_seed(0)
    return Vol3DModel(cfg, tokenizer=build_tokenizer(corpus_texts(cases))), codes


def test_centre_targets_peak_at_every_true_centre():
    from vol3d.models.heads import GroundingHead

    anchors, cell = GroundingHead.anchors((4, 4, 2))
    one = torch.tensor([[[0.5, 0.0, 0.5, 0.75, 0.25, 1.0], [0, 0, 0, 0, 0, 0]]])  # centre (0.625, 0.125, 0.75)
    soft = centre_targets(one, torch.tensor([[1.0, 0.0]]), anchors, cell)  # the padding row is ignored
    assert soft.shape == (1, 32) and torch.isclose(soft.sum(), torch.tensor(1.0))
    assert torch.allclose(anchors[soft.argmax()], torch.tensor([0.625, 0.125, 0.75]))
    idx = lambda i, j, k: (i * 4 + j) * 2 + k  # noqa: E731
    assert soft[0, idx(2, 0, 1)] > soft[0, idx(1, 0, 1)] > soft[0, idx(0, 0, 1)]  # falls off with distance
    # two instances: a peak of equal height on each, whichever is listed first
    two = torch.tensor([[[0.5, 0.0, 0.5, 0.75, 0.25, 1.0], [0.0, 0.5, 0.0, 0.25, 0.75, 0.5]]])
    both = centre_targets(two, torch.ones(1, 2), anchors, cell)
    swapped = centre_targets(two.flip(1), torch.ones(1, 2), anchors, cell)
    torch.testing.assert_close(both, swapped)
    assert torch.isclose(both[0, idx(2, 0, 1)], both[0, idx(0, 2, 0)])
    assert set(both[0].topk(2).indices.tolist()) == {idx(2, 0, 1), idx(0, 2, 0)}


def _head_out(anchors, cell, cells, logits, rows=None):
    rows = torch.arange(len(logits)) if rows is None else rows
    from vol3d.models.heads import GroundingHead

    out = {"box_anchors": anchors, "box_cell": cell, "box_cells": cells, "box_logits": logits}
    out["box_pred"] = GroundingHead.decode({"logits": logits, "boxes": cells}, rows)
    return out


def test_grounding_losses_reward_the_right_cells():
    """Scores peaked on the true centres and the truth regressed there: no box loss and an exact
    decoded box; scores elsewhere raise the centre loss and lose the IoU."""
    from vol3d.models.heads import GroundingHead

    anchors, cell = GroundingHead.anchors((4, 4, 2))
    target = torch.tensor([[[0.5, 0.0, 0.5, 0.75, 0.25, 1.0], [0.0, 0.5, 0.0, 0.25, 0.75, 0.5]]]).expand(2, -1, -1)
    mask = torch.ones(2, 2, dtype=torch.bool)
    soft = centre_targets(target, mask.float(), anchors, cell)
    cells = torch.rand(2, 32, 6).sort(-1).values  # any boxes elsewhere ...
    for k in range(2):  # ... and each truth at its centre's cell
        mid = (target[0, k, :3] + target[0, k, 3:]) / 2
        cells[:, ((anchors - mid) ** 2).sum(-1).argmin()] = target[0, k]
    good = _head_out(anchors, cell, cells, 10 * soft.log(), rows=torch.tensor([0, 0]))
    loss = grounding_losses(good, target, mask)
    assert loss["box_l1"] == 0 and loss["box_giou"].abs() < 1e-4 and loss["box_iou"] > 0.999
    # two <box> tokens of one answer name the two lesions, not one lesion twice
    assert pairwise_iou_max(good["box_pred"]) < 0.1
    bad = _head_out(anchors, cell, cells, torch.roll(good["box_logits"], 7, dims=1))
    worse = grounding_losses(bad, target, mask)
    assert worse["box_centre"] > loss["box_centre"] + 1 and worse["box_iou"] < 0.5
    empty = grounding_losses(_head_out(anchors, cell, torch.zeros(0, 32, 6), torch.zeros(0, 32, requires_grad=True)),
                             torch.zeros(0, 1, 6), torch.zeros(0, 1, dtype=torch.bool))
    assert float(empty["box_centre"].detach()) == 0 and empty["box_centre"].requires_grad


def pairwise_iou_max(boxes: torch.Tensor) -> float:
    from vol3d.train.losses import box_iou_3d

    iou = box_iou_3d(boxes, boxes)
    return float((iou - torch.eye(len(boxes))).max())


def test_make_batch_pairs_box_tokens_with_their_boxes(cases):
    """Grounding answers are bare <box> tokens; box_index points at them and box_target holds each
    one's true box in the head's frame; other tasks add no query."""
    model, codes = tiny_model(cases)
    mix = TaskMix(report=0.0, vqa_closed=0.0, vqa_open=0.0, ground=1.0, ehr=0.0)
    obj = VLMObjective(model.processor, mix, LossConfig(box_centre=1.0), codes, None, 128, box_tokens=True)
    rngs = [np.random.default_rng([3, i]) for i in range(8)]
    batch = obj.make_batch(cases, rngs)
    where, target, mask = batch["box_index"], batch["box_target"], batch["box_target_mask"]
    has = [i for i, c in enumerate(cases) if len(c["boxes_vox"])]
    assert set(where[:, 0].tolist()) <= set(has) and len(where) == len(target) == len(mask) > 0
    for (row, pos), boxes, real in zip(where.tolist(), target, mask, strict=True):
        assert batch["input_ids"][row, pos] == model.box_token_id
        truth = unit_boxes(cases[row]["boxes_vox"].numpy(), SHAPE)
        np.testing.assert_allclose(boxes[real].numpy(), truth, rtol=1e-6)
    text = VLMObjective(model.processor, mix, LossConfig(), codes, None, 128, box_tokens=False).make_batch(cases, rngs)
    assert "box_index" not in text  # without a head the LM spells the coordinates
    answers = model.tokenizer.batch_decode(torch.where(text["labels"] < 0, 0, text["labels"]), skip_special_tokens=True)
    assert any("<box>[" in a for a in answers)


def test_tiny_vlm_learns_and_run_dir_reloads(cases, tmp_path):
    model, codes = tiny_model(cases)
    losses = LossConfig(lm=1.0, ehr=1.0, box_centre=1.0, box_l1=1.0, box_giou=1.0)
    cfg = TrainConfig(run_dir=str(tmp_path), max_steps=24, log_every=4, val_every=0, ckpt_every=12, progress=False,
                      tensorboard=False, device="cpu", model=model.config,
                      data=DataConfig(batch_size=4, augment=None, max_length=128),
                      optim=OptimConfig(lr=3e-3, warmup_steps=2))
    mix = TaskMix(report=1.0, vqa_closed=1.0, vqa_open=0.0, ground=1.0, ehr=0.5)
    objective = VLMObjective(model.processor, mix, losses, codes, None, 128, val_batch_size=4, box_tokens=True)
    before = objective.validate(model.eval(), cases)
    result = fit(cfg, model.train(), objective, cases, val_items=cases, run_dir=tmp_path)
    after = {k.removeprefix("val/"): v for k, v in result.val.items()}
    assert after["lm"] < 0.7 * before["lm"]
    assert after["ehr"] < before["ehr"] and after["box_centre"] < before["box_centre"]
    assert {"train/lm", "train/ehr", "train/box_centre", "train/box_l1", "train/box_giou",
            "train/box_iou"} <= set(result.train)

    # task metrics beside the losses at validation (what metrics.csv and TensorBoard show as val/task/...)
    objective.task_metric_cases = 4
    with torch.no_grad():
        metrics = objective.validate(model.eval(), cases)
    assert {"task/ground_acc_iou50", "task/report_finding_f1", "task/vqa_closed_acc"} <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in metrics if k.startswith("task/"))

    # the run dir alone rebuilds the trained model: same weights, tokenizer, code list and outputs
    again = Vol3DModel.from_pretrained(tmp_path / "model")
    assert again.config.ehr_codes == codes.codes
    batch = objective.make_batch(cases[:2], [np.random.default_rng(0)] * 2)
    model.eval()
    with torch.no_grad():
        a = model(batch["volume"], batch["input_ids"], batch["attention_mask"], box_index=batch["box_index"])
        b = again(batch["volume"], batch["input_ids"], batch["attention_mask"], box_index=batch["box_index"])
    for key in ("logits", "ehr_logits", "box_logits", "box_pred"):
        torch.testing.assert_close(a[key], b[key])


def test_tiny_vlm_resume_with_augmentation_is_exact(cases, tmp_path):
    """Augmentation (TorchIO), task sampling and head dropout all replay identically after a resume."""
    from vol3d.tasks import AugmentConfig
    from vol3d.train.loop import TrainingInterrupted

    aug = AugmentConfig(affine_prob=0.5, gamma_prob=0.5, noise_prob=0.5)

    def run(run_dir, interrupt_at=None, resume=False):
        model, codes = tiny_model(cases)
        if resume:
            torch.nn.init.zeros_(model.projector[0].weight)  # must be overwritten by the checkpoint
        cfg = TrainConfig(run_dir=str(run_dir), max_steps=4, log_every=1, val_every=0, ckpt_every=2, progress=False,
                          tensorboard=False, device="cpu", model=model.config,
                          data=DataConfig(batch_size=2, augment=aug, max_length=128),
                          optim=OptimConfig(lr=3e-3, warmup_steps=1))
        obj = VLMObjective(model.processor, TaskMix(), LossConfig(ehr=1.0, box_centre=1.0, box_l1=1.0, box_giou=1.0),
                           codes, aug, 128, box_tokens=True)
        if interrupt_at is not None:
            real_loss, calls = obj.loss, []

            def loss(m, b):
                calls.append(1)
                if len(calls) == interrupt_at:
                    raise KeyboardInterrupt
                return real_loss(m, b)

            obj.loss = loss
        fit(cfg, model, obj, cases, run_dir=run_dir, resume=resume)
        return model

    full = run(tmp_path / "full")
    with pytest.raises(TrainingInterrupted):
        run(tmp_path / "cut", interrupt_at=4)  # during step 4: checkpoint of step 3 is saved on Ctrl-C
    resumed = run(tmp_path / "cut", resume=True)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_objective_lm_average_follows_the_loss_config(cases):
    """``loss.lm_average`` reaches the objective: on a batch mixing a report with short answers the
    two averages differ, and each equals lm_cross_entropy with that averaging."""
    from vol3d.train.losses import lm_cross_entropy

    model, codes = tiny_model(cases)
    mix = TaskMix(report=1.0, vqa_closed=1.0, vqa_open=0.0, ground=1.0, ehr=0.0)
    rngs = [np.random.default_rng([0, i]) for i in range(4)]
    obj = VLMObjective(model.processor, mix, LossConfig(lm_average="token"), codes, None, 128)
    batch = obj.make_batch(cases[:4], rngs)
    with torch.no_grad():
        logits = model(batch["volume"], batch["input_ids"], batch["attention_mask"])["logits"]
        got = {}
        for avg in ("token", "sample"):
            obj.weights = LossConfig(lm_average=avg)
            got[avg] = obj.loss(model, batch)[1]["lm"]
            assert torch.allclose(got[avg], lm_cross_entropy(logits, batch["labels"], average=avg), atol=1e-5)
    answer_lengths = (batch["labels"] != -100).sum(dim=1)
    assert answer_lengths.max() > answer_lengths.min()  # a mixed batch, where the averages can differ
    assert not torch.allclose(got["token"], got["sample"])


def _fsdp_vlm_worker(rank: int, port: int, run: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from vol3d.train import distributed

    cases = [fake_case(i) for i in range(8)]
    model, codes = tiny_model(cases)
    cfg = TrainConfig(run_dir=run, max_steps=3, log_every=1, val_every=0, ckpt_every=3, progress=False,
                      tensorboard=False, device="cpu", model=model.config, strategy="fsdp",
                      data=DataConfig(batch_size=2, augment=None, max_length=128),
                      optim=OptimConfig(lr=3e-3, warmup_steps=1))
    losses = LossConfig(lm=1.0, ehr=1.0, box_centre=1.0, box_l1=1.0, box_giou=1.0)
    objective = VLMObjective(model.processor, TaskMix(report=1.0, vqa_closed=1.0, ground=1.0, ehr=0.5), losses,
                             codes, None, 128, val_batch_size=4, box_tokens=True)
    from pathlib import Path

    result = fit(cfg, model.train(), objective, cases, val_items=cases[:3], run_dir=Path(run))
    assert distributed.is_sharded(model) and np.isfinite(result.train["train/loss"])
    assert np.isfinite(result.val["val/lm"]) if rank == 0 else True
    distributed.cleanup()


def test_tiny_vlm_trains_sharded_with_fsdp_and_saves_full_weights(cases, tmp_path):
    """Two gloo processes with --strategy fsdp (the VLM's LM layers and ViT blocks as units): the run
    completes, and RUN/model holds the full trained weights that load in one process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_fsdp_vlm_worker, args=(port, str(tmp_path)), nprocs=2, join=True,
                                          start_method="fork")
    trained = Vol3DModel.from_pretrained(tmp_path / "model")
    init, _ = tiny_model(cases)
    changed = [k for k, v in init.state_dict().items() if not torch.equal(v, trained.state_dict()[k])]
    assert any(k.startswith("lm.") for k in changed) and any(k.startswith("encoder.") for k in changed)
    batch = VLMObjective(trained.processor, TaskMix(report=1.0), LossConfig(), None, None, 128).make_batch(
        cases[:2], [np.random.default_rng(0)] * 2)
    with torch.no_grad():
        out = trained.eval()(batch["volume"], batch["input_ids"], batch["attention_mask"])
    assert torch.isfinite(out["logits"]).all()
