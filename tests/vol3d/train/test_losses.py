"""Loss functions against hand-computed values and the geometry contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from preprocess.geometry import box_iou
from vol3d.train.losses import (
    box_iou_3d,
    box_iou_giou_3d,
    box_losses,
    clip_infonce,
    ehr_bce,
    lm_cross_entropy,
)


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def test_giou_hand_values():
    a = t([[0, 0, 0, 2, 2, 2]])
    # shifted by 1 along x: inter 4, union 12, hull 12 -> giou = iou = 1/3
    iou, giou = box_iou_giou_3d(a, t([[1, 0, 0, 3, 2, 2]]))
    assert torch.allclose(iou, t([1 / 3])) and torch.allclose(giou, t([1 / 3]))
    # shifted by 1 along x and y: inter 2, union 14, hull 3*3*2 = 18 -> giou 1/7 - 4/18
    iou, giou = box_iou_giou_3d(a, t([[1, 1, 0, 3, 3, 2]]))
    assert torch.allclose(iou, t([1 / 7])) and torch.allclose(giou, t([1 / 7 - 4 / 18]))
    # disjoint unit cubes 1 apart along x: iou 0, hull 3, union 2 -> giou -1/3
    iou, giou = box_iou_giou_3d(t([[0, 0, 0, 1, 1, 1]]), t([[2, 0, 0, 3, 1, 1]]))
    assert iou.item() == 0 and torch.allclose(giou, t([-1 / 3]))
    # identical boxes: both 1; nested cube of half the side: iou = giou = 1/8
    iou, giou = box_iou_giou_3d(a, a)
    assert torch.allclose(iou, t([1.0])) and torch.allclose(giou, t([1.0]))
    iou, giou = box_iou_giou_3d(a, t([[0, 0, 0, 1, 1, 1]]))
    assert torch.allclose(iou, t([1 / 8])) and torch.allclose(giou, t([1 / 8]))


def test_inverted_corners_are_reordered():
    iou, _ = box_iou_giou_3d(t([[2, 2, 2, 0, 0, 0]]), t([[0, 0, 0, 2, 2, 2]]))
    assert torch.allclose(iou, t([1.0]))


def test_iou_agrees_with_preprocess_geometry():
    rng = np.random.default_rng(0)
    lo = rng.uniform(0, 10, size=(7, 3))
    a = np.concatenate([lo, lo + rng.uniform(0.5, 6, size=(7, 3))], axis=1)
    lo = rng.uniform(0, 10, size=(5, 3))
    b = np.concatenate([lo, lo + rng.uniform(0.5, 6, size=(5, 3))], axis=1)
    b[0] = a[0]  # one exact match
    ref = box_iou(a, b)
    ours = box_iou_3d(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)
    assert ref[0, 0] == 1.0 and (ref == 0).any() and ((ref > 0) & (ref < 1)).any()


def test_box_losses_mask_and_gradient():
    pred = torch.tensor([[0.1, 0.1, 0.1, 0.4, 0.4, 0.4], [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]], requires_grad=True)
    target = torch.tensor([[0.1, 0.1, 0.1, 0.4, 0.4, 0.4], [0.5, 0.5, 0.5, 0.6, 0.6, 0.6]])
    out = box_losses(pred, target, mask=torch.tensor([1.0, 0.0]))
    assert out["box_l1"].item() < 1e-6 and out["box_giou"].item() < 1e-5 and abs(out["box_iou"].item() - 1) < 1e-5
    (out["box_l1"] + out["box_giou"]).backward()
    assert torch.all(pred.grad[1] == 0)  # the masked sample contributes nothing
    far = box_losses(torch.tensor([[0.0, 0, 0, 0.1, 0.1, 0.1]], requires_grad=True), torch.tensor([[0.8, 0.8, 0.8, 0.9, 0.9, 0.9]]))
    assert far["box_giou"].item() > 1.0  # disjoint boxes: GIoU loss above 1, still a gradient


def test_ehr_bce_and_pos_weight():
    logits, target = torch.zeros(2, 3), torch.tensor([[1.0, 0, 0], [0, 1, 0]])
    assert torch.allclose(ehr_bce(logits, target), torch.tensor(np.log(2), dtype=torch.float32))
    # pos_weight w scales positive terms: mean of (2 positives * w + 4 negatives) * log 2 / 6
    assert torch.allclose(ehr_bce(logits, target, pos_weight=4.0), torch.tensor((2 * 4 + 4) * np.log(2) / 6, dtype=torch.float32))


def test_clip_infonce_prefers_matching_pairs():
    v = torch.eye(4)
    assert clip_infonce(v, v, logit_scale=100.0).item() < 1e-3
    assert clip_infonce(v, v.roll(1, dims=0), logit_scale=100.0).item() > 10
    assert torch.allclose(clip_infonce(v, v, logit_scale=1.0), torch.tensor(np.log(3 + np.e) - 1, dtype=torch.float32))


def test_lm_cross_entropy_counts_only_labelled_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), -100)
    assert lm_cross_entropy(logits, labels).item() == 0.0  # no answer tokens: 0, not NaN
    labels[0, 3], labels[1, 4] = 2, 6
    expected = (torch.nn.functional.cross_entropy(logits[0, 2:3], labels[0, 3:4])
                + torch.nn.functional.cross_entropy(logits[1, 3:4], labels[1, 4:5])) / 2
    assert torch.allclose(lm_cross_entropy(logits, labels), expected)


def test_lm_cross_entropy_sample_average_weights_every_sample_alike():
    """A long answer dominates the token average; the sample average gives each sample 1 / B."""
    torch.manual_seed(1)
    logits = torch.randn(3, 8, 11)
    labels = torch.full((3, 8), -100)
    labels[0, 1:8] = torch.arange(7)  # a 7-token "report"
    labels[1, 5] = 3  # a one-token "yes"
    # sample 2 has no answer token (an EHR sample) and is left out of the mean
    ce = torch.nn.functional.cross_entropy
    long_mean = ce(logits[0, 0:7], labels[0, 1:8])
    short = ce(logits[1, 4:5], labels[1, 5:6])
    assert torch.allclose(lm_cross_entropy(logits, labels, average="sample"), (long_mean + short) / 2)
    assert torch.allclose(lm_cross_entropy(logits, labels, average="token"), (7 * long_mean + short) / 8)
    assert lm_cross_entropy(logits, torch.full((3, 8), -100), average="sample").item() == 0.0
    with pytest.raises(ValueError, match="token"):
        lm_cross_entropy(logits, labels, average="batch")


def _gathered_infonce_worker(rank: int, port: int, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    v, t = torch.randn(6, 8), torch.randn(6, 8)
    v_local = v[3 * rank : 3 * rank + 3].clone().requires_grad_(True)
    t_local = t[3 * rank : 3 * rank + 3].clone().requires_grad_(True)
    loss = clip_infonce(v_local, t_local, logit_scale=5.0)
    loss.backward()
    torch.save({"loss": loss.detach(), "gv": v_local.grad, "gt": t_local.grad}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_clip_infonce_gathers_negatives_across_ranks(tmp_path):
    """Two ranks of 3 pairs each, gathered, equal one process with all 6 pairs: mean loss and
    (DDP-averaged) gradients; without gathering each rank would see only 2 negatives."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_gathered_infonce_worker, args=(port, str(tmp_path)), nprocs=2,
                                          join=True, start_method="fork")  # fmt: skip
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.manual_seed(0)
    v, t = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    full = clip_infonce(v, t, logit_scale=5.0)
    full.backward()
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, full.detach())
    # all_gather's backward sums the ranks' gradients; DDP then averages over the 2 ranks
    torch.testing.assert_close(torch.cat([r["gv"] for r in ranks]) / 2, v.grad)
    torch.testing.assert_close(torch.cat([r["gt"] for r in ranks]) / 2, t.grad)
    local = clip_infonce(v[:3], t[:3], logit_scale=5.0, gather=False)
    assert not torch.isclose(local, ranks[0]["loss"])
