"""From a :class:`TrainConfig` to a finished run directory: the glue behind ``vol3d train/finetune``.

Builds the datasets from the cache, the model (from scratch, from ``init``'s
``model/``, or from the run's own ``model/`` when resuming), the objective, and
calls :func:`vol3d.train.loop.fit`. Run directory layout: docs/formats.md section 4.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from preprocess.config import read_config
from preprocess.config_io import dump_yaml, load_yaml, to_dict
from preprocess.errors import ConfigError, InputError
from vol3d.train import distributed as ddp
from vol3d.train.config import RunConfig, TrainConfig
from vol3d.train.loop import FitResult, fit

log = logging.getLogger(__name__)

C = TypeVar("C", bound=RunConfig)

CONFIG_NAME = "config.yaml"


def load_run_config(
    run_dir: str | Path, overrides: dict[str, Any] | None = None, cls: type[C] = TrainConfig  # type: ignore[assignment]
) -> C:
    """``RUN/config.yaml`` as a :class:`TrainConfig`, or as ``cls`` (e.g. ``SegConfig``)
    (``overrides``: dotted keys, e.g. from flags)."""
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise InputError(f"{run_dir} is not a vol3d run directory: {CONFIG_NAME} is missing")
    return load_yaml(cls, path, overrides)


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse to write into a non-empty run dir unless resuming it (nothing is ever overwritten silently)."""
    from vol3d.train.checkpoint import latest_checkpoint

    if resume:
        if latest_checkpoint(run_dir) is None:
            raise InputError(f"cannot resume {run_dir}: it has no checkpoints/step_N; start a new run instead")
        return
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise InputError(
            f"run directory {run_dir} is not empty; continue it with `--resume {run_dir}`, "
            "or pass a new --run-dir"
        )


def build_datasets(cfg: TrainConfig) -> tuple[Any, Any]:
    """Training and (possibly empty) validation :class:`~vol3d.data.cache.CacheDataset` of the cache."""
    from vol3d.data.cache import CacheDataset

    if not cfg.data.cache_dir:
        raise ConfigError("data.cache_dir is not set; pass --data.cache-dir CACHE (made by `vol3d preprocess`)")
    shape = cfg.model.input_shape
    train = CacheDataset(cfg.data.cache_dir, split=cfg.data.train_split, mode="volume", input_size=shape)
    if len(train) == 0:
        raise InputError(f"{cfg.data.cache_dir}: no ok case in split {cfg.data.train_split!r}; "
                         "check the manifest's split column or pass --data.train-split")
    val = None
    if cfg.data.val_split:
        val = CacheDataset(cfg.data.cache_dir, split=cfg.data.val_split, mode="volume", input_size=shape)
        if cfg.data.max_val_cases and len(val) > cfg.data.max_val_cases:
            val = torch.utils.data.Subset(val, range(cfg.data.max_val_cases))
    return train, val


def build_model(cfg: TrainConfig, train: Any, resume: bool) -> tuple[Any, TrainConfig]:
    """The model to train and the config updated with what was resolved from the data.

    Resuming rebuilds the run's own ``model/`` (its weights are then replaced by the
    checkpoint's); ``init`` starts from another run's ``model/`` (its architecture
    wins over ``cfg.model``); otherwise the model is built from ``cfg.model``: a
    tokenizer trained on the cache's texts for a config-built LM, and the EHR codes
    of the training split when ``loss.ehr > 0`` and ``model.ehr_codes`` is empty.
    """
    from vol3d.models import Vol3DModel, build_tokenizer
    from vol3d.tasks import CodeVocab, corpus_texts

    run_dir = Path(cfg.run_dir)
    if resume or cfg.init:
        src = run_dir if resume else Path(cfg.init)
        if not (src / "model").is_dir():
            raise InputError(f"{src} has no model/ directory; is it a finished or checkpointed vol3d run?")
        model = Vol3DModel.from_pretrained(src / "model")
        if not resume and cfg.freeze:  # the init run's architecture; what this run keeps fixed is this run's
            model.config = dataclasses.replace(model.config, **{f"freeze_{part}": True for part in cfg.freeze})
            model._apply_training_options()
        if not resume and model.config.perception:  # the crops this run's decoder learns on
            model.config = dataclasses.replace(model.config, perception_patch=list(cfg.data.perception_patch))
        model.train()
        out = dataclasses.replace(cfg, model=model.config)
        return model, out if resume else dataclasses.replace(out, loss=grounding_loss_for(model.config, cfg.loss))
    mcfg = resolve_vocabulary(cfg.model, cfg.data)
    if mcfg.perception:  # the crops its decoder learns on: where it looks again at inference
        mcfg = dataclasses.replace(mcfg, perception_patch=list(cfg.data.perception_patch))
    if cfg.freeze:
        mcfg = dataclasses.replace(mcfg, **{f"freeze_{part}": True for part in cfg.freeze})
    # texts, boxes and codes only, read once: a big cache must not be read into memory for this
    cases = [train.item_without_pixels(i) for i in range(len(train))]
    if cfg.loss.ehr > 0 and not mcfg.ehr_codes:
        vocab = CodeVocab.from_cases([[str(c) for c in case["codes"]] for case in cases])
        if len(vocab) == 0:
            raise InputError(f"{cfg.data.cache_dir}: no case has EHR codes; set loss.ehr: 0 to train without them")
        mcfg = dataclasses.replace(mcfg, ehr_codes=list(vocab.codes), num_ehr_codes=len(vocab))
    tokenizer = None
    if mcfg.lm_path is None:
        texts = corpus_texts(cases, mcfg.findings or None)
        if mcfg.perception:
            texts += digest_corpus(cases, mcfg)
        tokenizer = build_tokenizer(texts)
    torch.manual_seed(cfg.seed)
    model = Vol3DModel(mcfg, tokenizer=tokenizer)
    return model, dataclasses.replace(cfg, model=mcfg)


def resolve_vocabulary(model: Any, data: Any) -> Any:
    """``model`` (a :class:`~vol3d.models.Vol3DConfig`) with the finding vocabulary and label names of
    the data: from ``data.vocab``, else the cache's ``vocab.json`` (``vol3d preprocess --vocab``).
    Fields already set in the config win. Models without perception need none."""
    from preprocess.sidecars import VOCAB_NAME, load_vocabulary

    if not model.perception or (model.findings and model.label_names):
        return model
    path = Path(data.vocab) if data.vocab else Path(data.cache_dir) / VOCAB_NAME
    if not path.is_file():
        raise ConfigError(f"perception needs the names of the findings and of the label values, and {path} does not "
                          "exist: preprocess with `vol3d preprocess ... --vocab FILE`, or pass --data.vocab FILE "
                          "(format: docs/tasks_and_metrics.md)")
    vocab = load_vocabulary(path)
    findings = model.findings or vocab["findings"]
    labels = model.label_names or vocab.get("labels", [])
    if not labels:
        raise ConfigError(f"perception needs the label names of the cache's label maps; {path} has no 'labels' "
                          "(list the name of each label value, 0 = background)")
    return dataclasses.replace(model, findings=findings, label_names=list(labels),
                               finding_labels=list(model.finding_labels or vocab.get("finding_labels", [])))


def digest_corpus(cases: list[Any], model: Any) -> list[str]:
    """Findings digests the tokenizer should know: each case's (from its boxes) and every organ's entry."""
    from vol3d.protocol import ORGAN_TOKEN
    from vol3d.tasks.regions import LabelSpec, digest_text, organ_text, perceived_from_case

    labels = LabelSpec(tuple(model.label_names), tuple(model.finding_labels))
    texts = [digest_text(perceived_from_case({**c, "label": None}, model.findings, None)[0], model.findings)
             for c in cases]
    texts.append("Organs: " + "; ".join(f"{organ_text(o)} {ORGAN_TOKEN} 1234 mL, 567 mm" for o in labels.organs[1:]))
    return texts


def domain_profile(dataset: Any, model: Any, max_cases: int = 64) -> Any:
    """:func:`vol3d.domain.profile` of up to ``max_cases`` training cases (evenly spread), with their
    organ volumes from the label maps when the model perceives organs."""
    from vol3d.domain import profile

    idx = sorted({int(i) for i in np.linspace(0, len(dataset) - 1, min(max_cases, len(dataset)))})
    cases = [dataset[i] for i in idx]
    volumes = None
    if model.perception is not None and model.labels is not None:
        from vol3d.tasks.regions import perceived_from_case

        volumes = [{r.name: r.volume_ml for r in perceived_from_case(c, model.vocab, model.labels)[0].organs}
                   for c in cases if c.get("has_label")]
    return profile(cases, volumes)


def check_channels(dataset: Any, in_chans: int) -> None:
    """The cache's channel count (one per CT window) must be what the model takes."""
    channels = int(dataset.item_without_pixels(0)["image"].shape[0])
    if channels != in_chans:
        raise ConfigError(f"the cache's volumes have {channels} channel(s) but the model takes {in_chans}; "
                          f"set --model.in-chans {channels} (or init from a run trained on such a cache)")


def write_run_config(cfg: RunConfig, is_main: bool) -> None:
    """Create the run dir and write its full ``config.yaml`` (rank 0 only)."""
    if is_main:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, Path(cfg.run_dir) / CONFIG_NAME)


def grounding_loss_for(model: Any, loss: Any) -> Any:
    """``loss`` with its grounding terms for the model being fine-tuned: a perception model grounds each
    ``<box>`` by pointing at a region (``loss.pointer``), a model with a grounding head by regressing
    a box (``loss.box_*``). A fine-tuning preset written for one (``configs/finetune/ground.yaml``
    weights the box terms) then trains the other's: its largest box weight becomes the pointer's."""
    box = max(loss.box_centre, loss.box_l1, loss.box_giou)
    if model.perception and not model.box_head and box > 0:
        log.info("the model grounds through its perception: loss.box_* (%.3g) trains the region pointer", box)
        return dataclasses.replace(loss, pointer=max(loss.pointer, box), box_centre=0.0, box_l1=0.0, box_giou=0.0)
    if model.box_head and not model.perception and loss.pointer > 0:
        log.info("the model grounds through its box head: loss.pointer (%.3g) trains the box terms", loss.pointer)
        w = loss.pointer
        return dataclasses.replace(loss, pointer=0.0, box_centre=max(loss.box_centre, w), box_l1=max(loss.box_l1, w),
                                   box_giou=max(loss.box_giou, w))
    return loss


def check_heads(cfg: TrainConfig) -> None:
    """Every loss term with a weight needs the model head that feeds it."""
    m, w = cfg.model, cfg.loss
    perception_losses = w.organ > 0 or w.finding > 0 or w.finding_type > 0 or w.condition > 0 or w.pointer > 0
    need = [("loss.ehr", w.ehr > 0, m.num_ehr_codes > 0, "model.ehr_codes (or num_ehr_codes)"),
            ("loss.organ/finding/finding_type/condition/pointer", perception_losses, m.perception,
             "model.perception: true"),
            ("loss.box_centre/box_l1/box_giou", w.box_centre > 0 or w.box_l1 > 0 or w.box_giou > 0, m.box_head,
             "model.box_head: true"),
            ("loss.contrastive", w.contrastive > 0, m.contrastive, "model.contrastive: true")]
    for name, wanted, present, fix in need:
        if wanted and not present:
            raise ConfigError(f"{name} > 0 but the model has no such head; set {fix} or the weight to 0")
    if cfg.perception_first > 0 and not m.perception:
        raise ConfigError(f"perception_first {cfg.perception_first} trains the perception first, and the model has "
                          "none; set model.perception: true or perception_first: 0")
    if cfg.perception_first > 0 and cfg.task == "grpo":
        raise ConfigError("perception_first does not apply to reinforcement fine-tuning (task grpo); set it to 0")


def train_within(cfg: TrainConfig, seconds: float, resume: bool = False, plan: bool = False) -> tuple[int, bool]:
    """:func:`train` (or resume) until ``cfg.max_steps`` or until ``seconds`` of wall clock pass, whichever
    is first (then as after Ctrl-C: the last step is checkpointed and the model saved, so a later
    ``resume`` continues). ``plan``: a new run first fits its steps to ``seconds`` (:func:`train`'s
    ``budget_s``), so the clock stops it only where the steps run slower than measured. Returns the
    step reached and whether the clock stopped it; a real Ctrl-C still raises
    :class:`~vol3d.train.loop.TrainingInterrupted`. Main thread only (SIGALRM)."""
    import signal

    from vol3d.train.loop import TrainingInterrupted

    fired = False

    def stop(signum: int, frame: Any) -> None:  # the loop turns KeyboardInterrupt into a checkpoint
        nonlocal fired
        fired = True
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        return train(cfg, resume=resume, budget_s=seconds if plan else None).step, False
    except TrainingInterrupted as exc:
        if not fired:
            raise
        return exc.step, exc.step < planned_steps(cfg)
    except KeyboardInterrupt:  # the clock rang outside the loop (setting up, or closing after the last step)
        if not fired:
            raise
        step = checkpointed_step(Path(cfg.run_dir))
        if step is None:
            raise TrainingInterrupted(Path(cfg.run_dir), 0) from None
        return step, step < planned_steps(cfg)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


#: Share of a time budget's seconds that :func:`steps_within` fills with steps: the rest is for the periodic
#: validations and checkpoints, the final save and the measurement's noise. At 0.95, eight of fifteen planned
#: demo runs on a 2-core CPU overran their plan by 1-10% (round 25); the deadline then ends such a run
#: annealed, but only by cutting the language model's stage, the last.
PLAN_MARGIN = 0.9
#: A run of at most this many steps trains them all without measuring (the measurement takes 12 steps).
PLAN_FLOOR = 12
#: With fewer seconds left than this after building the model, the run is not planned (the clock stops it).
PLAN_MIN_S = 30.0
#: A planned run's last step ends this many seconds before its budget: the final checkpoint, the model's
#: save and the last validation follow it (:func:`vol3d.train.loop.fit`'s ``deadline``).
DEADLINE_RESERVE_S = 5.0


def steps_within(seconds: float, stage_seconds: Sequence[float], shares: Sequence[float], most: int,
                 margin: float = PLAN_MARGIN) -> int:
    """Optimizer steps that fit ``margin`` x ``seconds`` when a step of stage ``k`` takes ``stage_seconds[k]``
    and stage ``k`` is ``shares[k]`` of the steps; at least 1, at most ``most``."""
    if len(stage_seconds) != len(shares):
        raise ValueError(f"{len(stage_seconds)} stage times for {len(shares)} stage shares")
    per_step = sum(float(s) * float(t) for s, t in zip(shares, stage_seconds, strict=True))
    if per_step <= 0:
        return most
    return max(1, min(most, int(margin * max(seconds, 0.0) / per_step)))


#: Where a time budget cuts a run whose perception stage comes first, the stage with every task keeps this
#: share of its steps and the perception stage takes the rest of the seconds.
LAST_STAGE_KEPT = 0.5


def perception_kept(seconds: float, stage_seconds: Sequence[float], stage_steps: Sequence[int], proportional: int,
                    margin: float = PLAN_MARGIN, kept: float = LAST_STAGE_KEPT) -> list[int] | None:
    """The steps of the two stages of a cut plan that favours the first (the perception, which every answer
    reads): the last keeps ``kept`` of its ``stage_steps``, the first takes what is left of ``margin`` x
    ``seconds`` (at most its own; where it gets them all, the seconds still left go back to the last
    stage). None where that gives the first stage fewer steps than ``proportional`` (its steps when both
    stages shrink alike, :func:`steps_within`)."""
    if len(stage_seconds) != 2 or len(stage_steps) != 2:
        raise ValueError(f"two stages, got {len(stage_seconds)} times and {len(stage_steps)} step counts")
    budget = margin * seconds
    last = max(1, math.ceil(kept * stage_steps[1]))
    first = min(int(stage_steps[0]), int((budget - last * stage_seconds[1]) / max(stage_seconds[0], 1e-9)))
    if first < proportional:
        return None
    if first == int(stage_steps[0]):
        left = int((budget - first * stage_seconds[0]) / max(stage_seconds[1], 1e-9))
        last = max(last, min(int(stage_steps[1]), left))
    return [first, last]


def plan_within(cfg: RunConfig, model: Any, objective: Any, train_items: Any, seconds: float, info: Any) -> None:
    """Set ``cfg.max_steps`` to the steps ``seconds`` afford on this machine (at most the configured ones):
    the steps of each stage are measured first (:func:`vol3d.train.loop.stage_seconds`). A cut run whose
    perception stage comes first keeps half the steps of the stage with every task and gives the
    perception the rest (:func:`perception_kept`; ``perception_first`` is set to match); else every
    stage shrinks alike (:func:`steps_within`). A run of several processes, of at most :data:`PLAN_FLOOR`
    steps or with less than :data:`PLAN_MIN_S` seconds left keeps its steps (the clock still stops it)."""
    from vol3d.train.loop import stage_seconds

    if cfg.max_steps <= PLAN_FLOOR or seconds < PLAN_MIN_S:
        return  # measuring would cost more than the run, or could take the seconds left
    if info.enabled:
        log.warning("a time budget plans the steps of a single-process run; %d processes train max_steps=%d",
                    info.world_size, cfg.max_steps)
        return
    t0 = time.perf_counter()
    per = stage_seconds(cfg, model, objective, train_items)
    seconds -= time.perf_counter() - t0
    first = float(getattr(cfg, "perception_first", 0.0)) if len(per) == 2 else 0.0
    shares = [first, 1.0 - first] if len(per) == 2 else [1.0]
    steps = steps_within(seconds, per, shares, cfg.max_steps)
    timing = " and ".join(f"{t:.2f} s" for t in per)
    if steps < cfg.max_steps and len(per) == 2:
        kept = perception_kept(seconds, per, [cfg.perception_steps, cfg.max_steps - cfg.perception_steps],
                               round(first * steps))
        if kept is not None:
            steps = sum(kept)
            cfg.perception_first = kept[0] / steps
    log.info("the time budget (%.0f s left) affords %d of the %d steps on this machine (a step takes %s%s)",
             seconds, steps, cfg.max_steps, timing, " in the perception stage and with every task" if len(per) == 2 else "")
    cfg.max_steps = steps
    if len(per) == 2:  # the staged objective's stage boundary follows the plan
        objective.perception_steps = cfg.perception_steps


def planned_steps(cfg: TrainConfig) -> int:
    """The steps of ``cfg``'s run as its ``config.yaml`` records them (a time budget may have planned fewer
    than ``cfg.max_steps``); ``cfg.max_steps`` before the run has written one."""
    path = Path(cfg.run_dir) / CONFIG_NAME
    return load_run_config(cfg.run_dir).max_steps if cfg.run_dir and path.is_file() else cfg.max_steps


def checkpointed_step(run_dir: Path) -> int | None:
    """The step of ``run_dir``'s newest checkpoint (None without one)."""
    import json

    from vol3d.train.checkpoint import latest_checkpoint

    last = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    return int(json.loads((last / "trainer.json").read_text())["step"]) if last is not None else None


def train(cfg: TrainConfig, resume: bool = False, budget_s: float | None = None) -> FitResult:
    """Run (or resume) training as configured; returns the final step and metrics.

    ``budget_s``: wall-clock seconds from this call that training may take. A new single-process
    run then measures a few steps of each stage and trains the steps that fit, at most
    ``cfg.max_steps`` (:func:`plan_within`), so its learning-rate schedule anneals and its later stage
    is reached on a slower machine too; ``config.yaml`` records the steps planned. Where the run's own
    steps turn out slower than measured, ``fit`` ends it earlier, annealed (its ``deadline``), and
    ``config.yaml`` records where it ended. Stopping at the budget is the caller's (:func:`train_within`)."""
    from vol3d.tasks import CodeVocab
    from vol3d.train.objectives import VLMObjective

    started = time.perf_counter()

    if cfg.task == "seg":
        raise ConfigError("task seg is trained by `vol3d finetune --task seg`")
    if not cfg.run_dir:
        raise ConfigError("run_dir is not set; pass --run-dir RUN")
    run_dir = Path(cfg.run_dir)
    info = ddp.setup(cfg.device)
    check_run_dir(run_dir, resume)
    ddp.barrier(info)  # every rank has checked before rank 0 creates anything

    train_ds, val_ds = build_datasets(cfg)
    model, cfg = build_model(cfg, train_ds, resume)
    # The run dir alone must be enough to prepare new images exactly as the training ones.
    model.preprocess = to_dict(read_config(cfg.data.cache_dir))  # read_config drops the id key (a secret)
    if not resume and model.domain is None:
        model.domain = domain_profile(train_ds, model).to_dict()
    check_heads(cfg)
    check_channels(train_ds, cfg.model.in_chans)
    codes = CodeVocab(cfg.model.ehr_codes) if cfg.model.ehr_codes and cfg.loss.ehr > 0 else None
    perception, prevalence = None, None
    if cfg.model.perception:
        from vol3d.tasks.samples import prevalence as finding_prevalence

        perception = (model.vocab, model.labels)
        prevalence = finding_prevalence((train_ds.item_without_pixels(i) for i in range(len(train_ds))), model.vocab)
    augment = cfg.data.augment
    if augment is not None and model.config.label_names:  # left/right pairs and finding label by name
        from vol3d.tasks.augment import for_labels

        augment = for_labels(augment, model.config.label_names, model.config.finding_labels)
    if cfg.task == "grpo":
        from vol3d.train.rl import GRPOObjective

        objective: Any = GRPOObjective(model.processor, cfg.task_mix(), cfg.rl, model.vocab or None, cfg.data.max_length)
        log.info("reinforcement fine-tuning %s (GRPO, %s, %d answers per prompt): %d train cases", run_dir,
                 "+".join(cfg.rl.tasks), cfg.rl.group_size, len(train_ds))
    else:
        objective = VLMObjective(model.processor, cfg.task_mix(), cfg.loss, codes, augment,
                                 cfg.data.max_length, cfg.data.batch_size, box_tokens=cfg.model.box_head,
                                 perception=perception, prevalence=prevalence,
                                 patch_size=cfg.data.perception_patch or None,
                                 patches_per_case=cfg.data.perception_patches_per_case,
                                 finding_probability=cfg.data.finding_patch_probability,
                                 perception_steps=cfg.perception_steps, patch_balance=cfg.data.finding_patch_balance)
        objective.task_metric_cases = cfg.data.val_task_cases
        log.info("training %s: %d train / %d val cases, %.2fM trainable parameters, %d volume tokens",
                 run_dir, len(train_ds), len(val_ds) if val_ds is not None else 0,
                 model.num_parameters(trainable_only=True) / 1e6, model.num_vol_tokens)
    if budget_s is not None and not resume:
        plan_within(cfg, model, objective, train_ds, budget_s - (time.perf_counter() - started), info)
    write_run_config(cfg, info.is_main)
    planned = cfg.max_steps
    # one process: ranks that cut at different steps would wait on each other's gradients for ever
    deadline = started + budget_s - DEADLINE_RESERVE_S if budget_s is not None and not resume and not info.enabled else None
    result = fit(cfg, model, objective, train_ds, val_ds, run_dir=run_dir, resume=resume, deadline=deadline)
    if cfg.max_steps != planned:  # the deadline cut the run: its config says where it ends, its stages where they were
        if getattr(objective, "perception_steps", 0):
            cfg.perception_first = objective.perception_steps / cfg.max_steps
        write_run_config(cfg, info.is_main)
    return result
