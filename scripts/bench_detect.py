"""Finding detection side by side: vol3d's perception against MONAI's RetinaNet, at equal training time.

    .venv/bin/python scripts/bench_detect.py                                   # the demo's data and minutes
    .venv/bin/python scripts/bench_detect.py --cases 200 --seed 3 --out /tmp/vol3d_bench_detect_s3
    .venv/bin/python scripts/bench_detect.py --modality mr --out /tmp/vol3d_bench_detect_mr

The answers issue asked to look at MONAI's detection stack (``monai.apps.detection``: RetinaNet, anchor
generator, ATSS matcher, hard-negative sampler, box selector, COCO metric) before keeping vol3d's own
finding detection (a finding mask with a type per voxel, connected components as boxes; docs/models.md,
"Perception"). This script measures both on one synthetic export, in one run:

1. **vol3d**: the demo's model (``tiny_cpu`` with the demo's settings; ``--set`` overrides), trained for
   ``--steps`` steps or ``--seconds`` of wall clock, whichever comes first, on the train split. Its
   training also teaches the language model (the steps after the perception-only share): the
   comparison gives the detector no less than the whole model had.
2. **RetinaNet**: ``monai.apps.detection``'s ``RetinaNetDetector`` on a small 3D ResNet with an FPN
   (MONAI's ``ResNet`` and ``FeaturePyramidNetwork``; anchors from the train split's box sizes, ATSS
   matching and hard-negative sampling as in MONAI's LUNA16 tutorial), trained on the same train split
   for the wall-clock seconds the vol3d arm took, or ``--retinanet-time`` times them (whole volumes,
   random flips, AdamW with a warm-up and cosine decay over the steps that time affords; BCE or focal
   classification loss). Its score threshold is the one with the best F1 at IoU 0.5 on the validation
   split (vol3d's regions need none: its finding mask is cut at 0.5).

Both are scored on the held-out split by the same code: the eval JSON's ``detect`` section (each true
instance's best IoU among the detections of its type: Acc@IoU0.5 with a 95% bootstrap CI, Acc@IoU0.25,
findings under 10 mm, per finding), precision and detections per volume at the operating point, and
MONAI's COCO metric (AP at IoU 0.1 and 0.5, threshold-free, ranked by score). Writes ``OUT/detect.json``
and ``OUT/detect.md`` (the table, the machine and the command) and prints the table. Run it alone: the
arms share the two cores with nothing else, or their equal seconds are not equal compute.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_quality import overrides  # noqa: E402  (its --set KEY=VALUE parsing)

from vol3d import demo  # noqa: E402
from vol3d.eval.reasoning import detect_items, score_detect  # noqa: E402
from vol3d.tasks.regions import Perceived, Region  # noqa: E402

#: IoU at which a detection counts as finding its instance (precision, F1, the threshold's choice).
MATCH_IOU = 0.5
#: Score thresholds tried for RetinaNet's operating point on the validation split.
THRESHOLDS = tuple(np.round(np.arange(0.05, 0.96, 0.05), 2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/vol3d_bench_detect"), help="work folder")
    p.add_argument("--cases", type=int, default=demo.DemoOptions.cases,
                   help=f"synthetic studies (default {demo.DemoOptions.cases}, the demo's)")
    p.add_argument("--seed", type=int, default=0, help="seed of data and of both trainings")
    p.add_argument("--modality", choices=("ct", "mr"), default="ct", help="ct: chest/abdomen CT; mr: brain MR")
    p.add_argument("--steps", type=int, default=demo.DemoOptions.steps,
                   help=f"vol3d's training steps (default {demo.DemoOptions.steps}, the demo's)")
    p.add_argument("--seconds", type=float, default=226.0,
                   help="vol3d's wall-clock limit (default 226: what the demo's training gets); RetinaNet "
                        "then trains for the seconds vol3d actually took")
    p.add_argument("--split", type=float, nargs=3, default=(0.7, 0.1, 0.2), metavar=("TRAIN", "VAL", "TEST"),
                   help="share of patients per split (default 0.7 0.1 0.2; RetinaNet's threshold is chosen on val)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="TrainConfig override of the vol3d arm (dotted key, YAML value), repeatable")
    p.add_argument("--width", type=int, default=16, help="RetinaNet's first ResNet width (then x2 per layer)")
    p.add_argument("--fpn-channels", type=int, default=32, help="RetinaNet's FPN and head channels")
    p.add_argument("--lr", type=float, default=1e-3, help="RetinaNet's AdamW learning rate")
    p.add_argument("--batch-size", type=int, default=4, help="RetinaNet's volumes per step")
    p.add_argument("--cls-loss", choices=("bce", "focal"), default="bce",
                   help="RetinaNet's classification loss: MONAI's default BCE on the hard-negative sample, or "
                        "the focal loss of the RetinaNet paper (monai.losses.FocalLoss, gamma 2)")
    p.add_argument("--retinanet-time", type=float, default=1.0,
                   help="RetinaNet's training seconds as a multiple of vol3d's (default 1: equal time)")
    p.add_argument("--reuse-run", action="store_true",
                   help="score OUT/run as it is (no vol3d training); RetinaNet gets --seconds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- boxes and truth

def to_monai_box(box: np.ndarray) -> np.ndarray:
    """vol3d's continuous voxel box (voxel ``i`` spans ``[i - 0.5, i + 0.5]``) -> MONAI's StandardMode
    corners, in which the volume spans ``[0, n]``."""
    return np.asarray(box, np.float64) + 0.5


def from_monai_box(box: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_monai_box`."""
    return np.asarray(box, np.float64) - 0.5


@dataclasses.dataclass
class Case:
    """One cached series: its volume, spacing and true finding instances."""

    id: str
    image: np.ndarray  # (C, X, Y, Z) float32
    spacing: np.ndarray  # (3,) mm
    truth: Perceived


def load_cases(cache: Path, split: str, input_shape: Sequence[int], vocab: Any, labels: Any) -> list[Case]:
    """The series of ``split`` at the model's input size, with their ground truth (the evaluation's)."""
    from vol3d.data.cache import CacheDataset
    from vol3d.tasks.regions import perceived_from_case

    ds = CacheDataset(cache, split=split, mode="volume", input_size=tuple(input_shape))
    out = []
    for i in range(len(ds)):
        item = ds[i]
        truth, _ = perceived_from_case(item, vocab, labels)
        out.append(Case(str(item.get("id", i)), np.asarray(item["image"], np.float32),
                        np.asarray(item["spacing"], np.float64), truth))
    return out


def finding_classes(vocab: Mapping[str, Any], cases: Sequence[Case]) -> list[str]:
    """The countable findings (those with boxes), in vocabulary order, that the training split holds."""
    seen = {r.name for c in cases for r in c.truth.findings}
    return [name for name in vocab if name in seen]


def regions(boxes: np.ndarray, names: Sequence[str], scores: np.ndarray, spacing: np.ndarray) -> Perceived:
    """Detections as the :class:`Perceived` findings the evaluation reads (vol3d voxel boxes)."""
    found = [Region("finding", n, b, (b[3:] - b[:3]) * spacing, float(np.prod(b[3:] - b[:3]) * np.prod(spacing)) / 1000,
                    score=float(s)) for b, n, s in zip(boxes, names, scores, strict=True)]
    return Perceived(found, [], {})


# ----------------------------------------------------------------------------- RetinaNet

def anchor_shapes(cases: Sequence[Case]) -> list[list[int]]:
    """Three base anchor shapes (voxels, at the finest level; each coarser level doubles them) from the
    train split's box sizes: the 15th, 50th and 85th percentiles of each axis (MONAI's LUNA16 tutorial
    sets its shapes from its data too)."""
    sizes = [r.box[3:] - r.box[:3] for c in cases for r in c.truth.findings]
    if not sizes:
        raise SystemExit("the train split holds no finding box: nothing to train a detector on")
    return [[max(1, int(round(v))) for v in np.percentile(np.array(sizes), q, axis=0)] for q in (15, 50, 85)]


def _resnet_fpn(in_chans: int, width: int, fpn_channels: int) -> Any:
    """The stem and first two stages of MONAI's 3D ``ResNet`` (basic blocks, ``width`` then ``2 width``)
    under MONAI's ``FeaturePyramidNetwork`` with its extra max-pool level: maps at strides 2, 4 and 8.
    (MONAI's ``BackboneWithFPN`` does the same through torchvision, which vol3d does not install.)"""
    from collections import OrderedDict

    from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
    from monai.networks.nets.resnet import ResNet
    from torch import nn

    class Extractor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            net = ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[width * 2 ** i for i in range(4)],
                         spatial_dims=3, n_input_channels=in_chans, conv1_t_size=3, conv1_t_stride=1)
            self.stem = nn.Sequential(net.conv1, net.bn1, net.act, net.maxpool)
            self.layer1, self.layer2 = net.layer1, net.layer2  # the deeper stages are not used
            self.fpn = FeaturePyramidNetwork(3, [width, 2 * width], fpn_channels, LastLevelMaxPool(3))
            self.out_channels = fpn_channels

        def forward(self, x: Any) -> Any:
            c1 = self.layer1(self.stem(x))
            return self.fpn(OrderedDict([("0", c1), ("1", self.layer2(c1))]))

    return Extractor()


def build_retinanet(in_chans: int, classes: int, anchors: Sequence[Sequence[int]], width: int = 16,
                    fpn_channels: int = 32, cls_loss: str = "bce") -> Any:
    """A ``RetinaNetDetector`` on :func:`_resnet_fpn` (strides 2, 4, 8), anchors of ``anchors`` doubled at
    each coarser level, ATSS matching, a hard-negative sampler and the box selector of MONAI's LUNA16
    tutorial."""
    from monai.apps.detection.networks import retinanet_detector
    from monai.apps.detection.networks.retinanet_network import RetinaNet
    from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
    from monai.utils import optional_import

    if not optional_import("torchvision")[1]:
        # The detector tests ``isinstance(matcher, torchvision's Matcher)`` before it tries MONAI's own ATSS
        # matcher (and likewise for the sampler); without torchvision (vol3d does not install it) that
        # placeholder raises. Nothing is an instance of this class, so MONAI's own branches run.
        class _Absent:
            pass

        retinanet_detector.Matcher = retinanet_detector.BalancedPositiveNegativeSampler = _Absent
    generator = AnchorGeneratorWithAnchorShape(feature_map_scales=[1, 2, 4],
                                               base_anchor_shapes=[list(a) for a in anchors])
    network = RetinaNet(spatial_dims=3, num_classes=classes, num_anchors=generator.num_anchors_per_location()[0],
                        feature_extractor=_resnet_fpn(in_chans, width, fpn_channels), size_divisible=[8, 8, 8])
    detector = retinanet_detector.RetinaNetDetector(network, generator)
    detector.set_target_keys(box_key="box", label_key="label")
    if cls_loss == "focal":
        from monai.losses import FocalLoss

        detector.set_cls_loss(FocalLoss(gamma=2.0, reduction="mean"))
    detector.set_atss_matcher(num_candidates=4, center_in_gt=False)
    detector.set_hard_negative_sampler(batch_size_per_image=64, positive_fraction=0.3, pool_size=20, min_neg=16)
    detector.set_box_selector_parameters(score_thresh=0.02, topk_candidates_per_level=1000, nms_thresh=0.22,
                                         detections_per_img=100)
    return detector


def _targets(case: Case, classes: Sequence[str], flips: Sequence[int]) -> tuple[np.ndarray, dict[str, Any]]:
    """The volume flipped along ``flips`` and its boxes (MONAI corners) and labels, flipped alike."""
    import torch

    image = case.image
    keep = [r for r in case.truth.findings if r.name in classes]
    boxes = np.array([to_monai_box(r.box) for r in keep], np.float64).reshape(-1, 6)
    shape = np.asarray(image.shape[1:], np.float64)
    for axis in flips:
        image = np.flip(image, axis=1 + axis)
        lo, hi = boxes[:, axis].copy(), boxes[:, axis + 3].copy()
        boxes[:, axis], boxes[:, axis + 3] = shape[axis] - hi, shape[axis] - lo
    return (np.ascontiguousarray(image),
            {"box": torch.as_tensor(boxes, dtype=torch.float32),
             "label": torch.as_tensor([classes.index(r.name) for r in keep], dtype=torch.long)})


def train_retinanet(detector: Any, cases: Sequence[Case], classes: Sequence[str], seconds: float, *, lr: float,
                    batch_size: int, seed: int, progress: bool = True) -> dict[str, Any]:
    """Train ``detector.network`` for ``seconds`` of wall clock on ``cases`` (random batches, random flips).
    The learning-rate schedule (5% warm-up, cosine to a tenth) spans the steps the time affords, counted
    from the mean time of the first ten steps. Returns the steps taken, the seconds and the last losses."""
    import torch
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(detector.network.parameters(), lr=lr, weight_decay=1e-4)
    detector.train()
    t0 = time.perf_counter()
    planned, step, logs = None, 0, {}
    bar = tqdm(desc="RetinaNet", total=None, disable=not progress, unit="step")
    while time.perf_counter() - t0 < seconds:
        if step == 10:
            planned = max(11, int(seconds / ((time.perf_counter() - t0) / 10)))
        total = planned or max(11, int(seconds))
        warm = max(1, int(0.05 * total))
        scale = (step + 1) / warm if step < warm else 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        pick = rng.choice(len(cases), size=batch_size, replace=len(cases) < batch_size)
        images, targets = [], []
        for i in pick:
            flips = [a for a in range(3) if rng.random() < 0.5]
            image, target = _targets(cases[int(i)], classes, flips)
            images.append(torch.as_tensor(image))
            targets.append(target)
        losses = detector(torch.stack(images), targets)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(detector.network.parameters(), 1.0)
        opt.step()
        step += 1
        logs = {k: round(float(v.detach()), 4) for k, v in losses.items()}
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    bar.close()
    return {"steps": step, "seconds": round(time.perf_counter() - t0, 1), "last_losses": logs}


def retinanet_detections(detector: Any, cases: Sequence[Case], classes: Sequence[str],
                         ) -> list[tuple[np.ndarray, list[str], np.ndarray]]:
    """Every detection of each case (vol3d voxel boxes, names, scores), highest score first."""
    import torch

    detector.eval()
    out = []
    with torch.inference_mode():
        for case in cases:
            pred = detector(torch.as_tensor(case.image)[None], use_inferer=False)[0]
            scores = pred["label_scores"].float().numpy()
            order = np.argsort(-scores)
            boxes = from_monai_box(pred["box"].float().numpy()[order].reshape(-1, 6))
            out.append((boxes, [classes[int(k)] for k in pred["label"].numpy()[order]], scores[order]))
    return out


# ----------------------------------------------------------------------------- scoring

def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from preprocess.geometry import box_iou

    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    return np.asarray(box_iou(np.asarray(a, np.float64), np.asarray(b, np.float64)))


def match_counts(truth: Perceived, found: Perceived, iou: float = MATCH_IOU) -> tuple[int, int, int]:
    """``(true instances, detections, matched)`` of one case: per finding type, detections taken by
    score matched greedily to the unmatched true instance of highest IoU (at least ``iou``), as COCO does."""
    n_true = len(truth.findings)
    n_found, matched = len(found.findings), 0
    for name in {r.name for r in truth.findings} | {r.name for r in found.findings}:
        g = np.array([r.box for r in truth.findings if r.name == name]).reshape(-1, 6)
        d = sorted((r for r in found.findings if r.name == name), key=lambda r: -r.score)
        used = np.zeros(len(g), bool)
        m = _iou_matrix(np.array([r.box for r in d]).reshape(-1, 6), g)
        for row in m:
            row = np.where(used, -1.0, row)
            if len(row) and row.max() >= iou:
                used[int(row.argmax())] = True
                matched += 1
    return n_true, n_found, matched


def operating_point(truths: Sequence[Perceived], founds: Sequence[Perceived]) -> dict[str, float]:
    """Recall, precision, F1 at IoU 0.5 and detections per volume, pooled over cases."""
    counts = np.array([match_counts(t, f) for t, f in zip(truths, founds, strict=True)]).reshape(-1, 3).sum(axis=0)
    n_true, n_found, matched = (int(v) for v in counts)
    recall = matched / n_true if n_true else math.nan
    precision = matched / n_found if n_found else math.nan
    f1 = 2 * matched / (n_true + n_found) if n_true + n_found else math.nan
    return {"recall_iou50": recall, "precision_iou50": precision, "f1_iou50": f1,
            "detections_per_volume": n_found / max(1, len(founds)), "true_per_volume": n_true / max(1, len(truths))}


def above(dets: Sequence[tuple[np.ndarray, list[str], np.ndarray]], cases: Sequence[Case],
          threshold: float) -> list[Perceived]:
    """Each case's detections scoring at least ``threshold``, as :class:`Perceived`."""
    out = []
    for (boxes, names, scores), case in zip(dets, cases, strict=True):
        keep = scores >= threshold
        out.append(regions(boxes[keep], [n for n, k in zip(names, keep, strict=True) if k], scores[keep], case.spacing))
    return out


def best_threshold(dets: Sequence[tuple[np.ndarray, list[str], np.ndarray]], cases: Sequence[Case],
                   thresholds: Sequence[float] = THRESHOLDS) -> tuple[float, dict[float, float]]:
    """The score threshold with the best F1 at IoU 0.5 on ``cases`` (the higher one on a tie), and every
    threshold's F1."""
    f1 = {float(t): operating_point([c.truth for c in cases], above(dets, cases, t))["f1_iou50"] for t in thresholds}
    valid = {t: v for t, v in f1.items() if not math.isnan(v)}
    best = max(valid, key=lambda t: (valid[t], t)) if valid else float(thresholds[0])
    return best, f1


def coco_ap(truths: Sequence[Perceived], ranked: Sequence[Perceived], classes: Sequence[str]) -> dict[str, float]:
    """MONAI's COCO metric (``monai.apps.detection.metrics``) of ranked detections: AP at IoU 0.1 and 0.5
    over the classes, at most 100 detections per volume."""
    from monai.apps.detection.metrics.coco import COCOMetric
    from monai.apps.detection.metrics.matching import matching_batch
    from monai.data.box_utils import box_iou

    def arrays(per: Perceived) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keep = [r for r in per.findings if r.name in classes]
        return (np.array([to_monai_box(r.box) for r in keep], np.float32).reshape(-1, 6),
                np.array([classes.index(r.name) for r in keep], np.int64),
                np.array([r.score for r in keep], np.float32))

    metric = COCOMetric(classes=list(classes), iou_list=[0.1, 0.5], max_detection=[100], verbose=False)
    gts, preds = [arrays(t) for t in truths], [arrays(p) for p in ranked]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the metric logs a warning for each class without a box (its AP is -1)
    try:
        results = matching_batch(iou_fn=box_iou, iou_thresholds=metric.iou_thresholds,
                                 pred_boxes=[p[0] for p in preds], pred_classes=[p[1] for p in preds],
                                 pred_scores=[p[2] for p in preds], gt_boxes=[g[0] for g in gts],
                                 gt_classes=[g[1] for g in gts], max_detections=100)
        scores = metric(results)[0]
    finally:
        root.setLevel(level)
    return {"ap_iou10": float(scores.get("AP_IoU_0.10_MaxDet_100", math.nan)),
            "ap_iou50": float(scores.get("AP_IoU_0.50_MaxDet_100", math.nan)),
            "by_finding_ap_iou10": {c: float(scores.get(f"{c}_AP_IoU_0.10_MaxDet_100", math.nan)) for c in classes}}


def score_arm(cases: Sequence[Case], found: Sequence[Perceived], ranked: Sequence[Perceived],
              classes: Sequence[str]) -> dict[str, Any]:
    """The figures of one arm on the held-out ``cases``: ``detect`` (the eval JSON's section), the
    operating point and COCO AP."""
    items = [it for ci, (c, f) in enumerate(zip(cases, found, strict=True)) for it in detect_items(ci, c.truth, f, None)]
    return {"detect": score_detect(items), **operating_point([c.truth for c in cases], found),
            **coco_ap([c.truth for c in cases], ranked, classes)}


# ----------------------------------------------------------------------------- the run

def train_vol3d(opts: demo.DemoOptions, paths: demo.DemoPaths, seconds: float) -> dict[str, Any]:
    """The demo's model trained afresh for ``opts.steps`` steps or ``seconds``: steps reached, seconds taken."""
    import shutil

    from vol3d.train.run import train_within

    if paths.run.exists():
        shutil.rmtree(paths.run)
    cfg = demo.train_config(opts, paths)
    cfg.val_every = 0  # no validation inside the timed window (RetinaNet validates nothing either)
    t0 = time.perf_counter()
    step, stopped = train_within(cfg, seconds)
    return {"steps": step, "stopped_by_clock": stopped, "seconds": round(time.perf_counter() - t0, 1)}


def vol3d_perceived(model: Any, cases: Sequence[Case]) -> list[Perceived]:
    import torch

    out = []
    with torch.inference_mode():
        for case in cases:
            out.append(model.perceive(torch.as_tensor(case.image)[None], spacing=case.spacing)[0])
    return out


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return fn(), time.perf_counter() - t0


def table(res: Mapping[str, Any]) -> str:
    arms = res["arms"]
    rows = [("training seconds (steps)", lambda a: f"{a['train']['seconds']:.0f} ({a['train']['steps']})"),
            ("parameters", lambda a: f"{a['parameters'] / 1e6:.2f} M"),
            ("Acc@IoU0.5 [95% CI]", lambda a: f"{a['detect']['acc_iou50']:.3f} "
             + "[{:.2f}, {:.2f}]".format(*a["detect"].get("acc_iou50_ci", (math.nan, math.nan)))),
            ("Acc@IoU0.25", lambda a: f"{a['detect']['acc_iou25']:.3f}"),
            ("findings < 10 mm, Acc@IoU0.5", lambda a: f"{a['detect']['small']['acc_iou50']:.3f} (n {a['detect']['small']['n']})"),
            ("precision / F1 at IoU 0.5", lambda a: f"{a['precision_iou50']:.3f} / {a['f1_iou50']:.3f}"),
            ("detections per volume (true)", lambda a: f"{a['detections_per_volume']:.2f} ({a['true_per_volume']:.2f})"),
            ("COCO AP@0.1 / AP@0.5", lambda a: f"{a['ap_iou10']:.3f} / {a['ap_iou50']:.3f}"),
            ("seconds per volume (inference)", lambda a: f"{a['seconds_per_volume']:.3f}")]
    names = list(arms)
    lines = ["| " + f"{res['n_test']} held-out series ({res['n_instances']} instances) | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    lines += ["| " + label + " | " + " | ".join(fmt(arms[n]) for n in names) + " |" for label, fmt in rows]
    for finding in res["classes"]:
        cells = []
        for n in names:
            f = arms[n]["detect"]["by_finding"].get(finding)
            cells.append(f"{f['acc_iou50']:.3f} (n {f['n']})" if f else "-")
        lines.append(f"| {finding}, Acc@IoU0.5 | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from vol3d.inference import load, write_json

    t_start = time.perf_counter()
    opts = demo.DemoOptions(out=args.out, cases=args.cases, steps=args.steps, seed=args.seed, modality=args.modality,
                            progress=not args.no_progress, split_fractions=tuple(args.split),
                            train_overrides=overrides(args.set), budget_min=0)
    paths = demo.DemoPaths(args.out)
    demo.ensure_id_key()
    args.out.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                            "load_avg_start": [round(v, 2) for v in os.getloadavg()],
                            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "torch": torch.__version__}
    stamp = args.out / "bench_data.json"
    key = {"cases": args.cases, "seed": args.seed, "split": list(opts.split_fractions), "modality": args.modality}
    if stamp.is_file() and json.loads(stamp.read_text()) != key:
        import shutil

        shutil.rmtree(paths.export, ignore_errors=True)
        shutil.rmtree(paths.cache, ignore_errors=True)
    demo.step_synth(opts, paths)
    demo.step_preprocess(opts, paths)
    stamp.write_text(json.dumps(key))

    arms: dict[str, Any] = {}
    if args.reuse_run:
        vol3d_train = {"steps": demo.trained_step(paths.run) or 0, "seconds": args.seconds, "reused": True}
    else:
        vol3d_train = train_vol3d(opts, paths, args.seconds)
    pipe = load(paths.run, device="cpu", preprocess_config=paths.cache)
    model = pipe.model
    if not pipe.perceives:
        raise SystemExit(f"{paths.run} has no perception: nothing to compare")
    shape = pipe.input_shape
    train_cases = load_cases(paths.cache, "train", shape, model.vocab, model.labels)
    val_cases = load_cases(paths.cache, "val", shape, model.vocab, model.labels)
    test_cases = load_cases(paths.cache, "test", shape, model.vocab, model.labels)
    if not test_cases or not val_cases:
        raise SystemExit(f"{paths.cache} needs val and test series: give more --cases (e.g. 96)")
    classes = finding_classes(model.vocab, train_cases)

    found, secs = timed(lambda: vol3d_perceived(model, test_cases))
    arms["vol3d"] = {"train": vol3d_train, "parameters": sum(p.numel() for p in model.parameters()),
                     "seconds_per_volume": secs / len(test_cases), **score_arm(test_cases, found, found, classes)}

    torch.manual_seed(args.seed)
    anchors = anchor_shapes(train_cases)
    detector = build_retinanet(int(train_cases[0].image.shape[0]), len(classes), anchors, args.width,
                               args.fpn_channels, args.cls_loss)
    budget = float(vol3d_train["seconds"]) * args.retinanet_time
    rtrain = train_retinanet(detector, train_cases, classes, budget, lr=args.lr, batch_size=args.batch_size,
                             seed=args.seed, progress=not args.no_progress)
    threshold, f1_by_threshold = best_threshold(retinanet_detections(detector, val_cases, classes), val_cases)
    dets, secs = timed(lambda: retinanet_detections(detector, test_cases, classes))
    arms["retinanet"] = {"train": rtrain, "parameters": sum(p.numel() for p in detector.network.parameters()),
                         "anchor_shapes": anchors, "score_threshold": threshold, "val_f1_by_threshold": f1_by_threshold,
                         "seconds_per_volume": secs / len(test_cases),
                         **score_arm(test_cases, above(dets, test_cases, threshold), above(dets, test_cases, 0.0),
                                     classes)}

    res = {"bench": {**info, "total_minutes": round((time.perf_counter() - t_start) / 60, 1),
                     "load_avg_end": [round(v, 2) for v in os.getloadavg()],
                     "cases_by_split": {"train": len(train_cases), "val": len(val_cases), "test": len(test_cases)}},
           "classes": classes, "n_test": len(test_cases), "n_instances": sum(len(c.truth.findings) for c in test_cases),
           "arms": arms}
    text = table(res)
    b = res["bench"]
    header = (f"command: {b['command']}\nmachine: {b['cpu_cores']} cores, torch {b['torch']} ({b['torch_threads']} "
              f"threads), load average {b['load_avg_start']} at start, {b['load_avg_end']} at end; "
              f"{b['total_minutes']} min in all\nseries per split: {b['cases_by_split']}; RetinaNet's score "
              f"threshold (best F1 on val): {threshold:g}\n")
    print(header + "\n" + text)
    write_json(res, args.out / "detect.json")
    (args.out / "detect.md").write_text(header + "\n" + text + "\n")
    print(f"wrote {args.out / 'detect.json'} and {args.out / 'detect.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
