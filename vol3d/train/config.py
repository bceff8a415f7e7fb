"""``TrainConfig``: every knob of ``vol3d train`` / ``vol3d finetune`` in one typed dataclass.

Its run fields (``run_dir``, ``max_steps``, ``precision``, ``optim`` ...) come from
:class:`RunConfig`, the base that :class:`vol3d.seg.config.SegConfig` shares, and
which :func:`vol3d.train.loop.fit` reads.

YAML presets in ``configs/train/`` and ``configs/finetune/`` only serialise it,
and every field is also a command-line flag (``--max-steps 100``,
``--optim.lr 1e-4``), through :mod:`preprocess.config_io`. The full config is
saved as ``RUN/config.yaml`` and reloaded by ``--resume RUN``. This module must
stay import-light (no torch) because the CLI builds its flags from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from preprocess.config_io import option as _f
from preprocess.errors import ConfigError
from vol3d.models.config import Vol3DConfig
from vol3d.tasks import AugmentConfig, TaskMix

#: How a perception crop's finding is drawn (``data.finding_patch_balance``; :class:`vol3d.train.objectives.VLMObjective`).
PATCH_BALANCE = ("case", "type")

#: What a run optimises. ``pretrain`` samples the text tasks by ``data.tasks`` weights;
#: the others fine-tune on a single task (``seg`` is provided by ``vol3d.seg``).
Task = Literal["pretrain", "report", "vqa", "ground", "ehr", "grpo", "seg"]

#: The task mix of each single-task fine-tune (the weights of ``vol3d.tasks.TaskMix``).
FINETUNE_MIX: dict[str, dict[str, float]] = {
    "report": {"report": 1.0, "vqa_closed": 0.0, "vqa_open": 0.0, "ground": 0.0, "ehr": 0.0},
    "vqa": {"report": 0.0, "vqa_closed": 1.0, "vqa_open": 0.5, "ground": 0.0, "ehr": 0.0},
    "ground": {"report": 0.0, "vqa_closed": 0.0, "vqa_open": 0.0, "ground": 1.0, "ehr": 0.0},
    "ehr": {"report": 0.0, "vqa_closed": 0.0, "vqa_open": 0.0, "ground": 0.0, "ehr": 1.0},
}

#: The model when a config names none: the tiny CPU demo model (a 2-layer Llama from a config).
TINY_LM: dict = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}


def _default_model() -> Vol3DConfig:
    return Vol3DConfig(lm_config=dict(TINY_LM))


def _positive(where: str, **values: float) -> None:
    """``where``: the config section (``""`` for top-level fields)."""
    for name, v in values.items():
        if v <= 0:
            raise ConfigError(f"{where + '.' if where else ''}{name} must be > 0, got {v}")


def _non_negative(where: str, **values: float) -> None:
    for name, v in values.items():
        if v < 0:
            raise ConfigError(f"{where + '.' if where else ''}{name} must be >= 0, got {v}")


@dataclass
class DataConfig:
    """Where the training cases come from and how they are batched."""

    cache_dir: str = _f("", "Preprocessed cache directory (`vol3d preprocess SRC --out CACHE`); required to train.")
    train_split: str = _f("train", "Manifest split used for training.")
    val_split: str = _f("val", "Manifest split for periodic validation ('' disables validation).")
    batch_size: int = _f(2, "Cases per process per micro-step (the global batch is batch_size * grad_accum * world size).")
    num_workers: int = _f(0, "DataLoader worker processes (0 = load in the training process; each worker opens its own HDF5 handles).")
    tasks: TaskMix = field(default_factory=TaskMix, metadata={"help": "Sampling weights of the instruction tasks for `task: pretrain` (a single-task fine-tune overrides them)."})
    augment: AugmentConfig | None = field(default_factory=AugmentConfig, metadata={"help": "Augmentation of training volumes, boxes moving with the image (null = none; validation is never augmented)."})
    max_length: int = _f(512, "Longest token sequence (prompt + volume tokens + answer); longer answers are truncated.")
    max_val_cases: int = _f(32, "Cap on validation cases (keeps periodic validation cheap); 0 = all of them.")
    val_task_cases: int = _f(8, "Validation cases whose answers are generated and scored at every validation (grounding, report F1, presence, count, EHR AUROC in metrics.csv and TensorBoard, `task/...`); 0 = losses only.")
    vocab: str = _f("", "Vocabulary file (JSON/YAML: findings, label names, finding labels; docs/tasks_and_metrics.md); '' = the cache's vocab.json.")
    perception_patch: list[int] = _f([32, 32, 32], "Perception models: the decoder learns on crops of this size (X Y Z) centred on findings; [] = on the whole volumes.")
    perception_patches_per_case: int = _f(2, "Perception crops per case and step.")
    finding_patch_probability: float = _f(0.7, "Share of perception crops centred on a finding (drawn as finding_patch_balance says), the rest anywhere.")
    finding_patch_balance: str = _f("case", "How a crop's finding is drawn: 'case' = each case's crops from its own findings, an instance uniformly; 'type' = a finding type uniformly among those in the batch, then one of its instances (rare types get their share early, as nnU-Net draws a foreground class: better at the demo's 440 steps, not at the benchmark's 2400; docs/benchmarks/quality.md, round 10).")

    def __post_init__(self) -> None:
        _positive("data", batch_size=self.batch_size)
        _positive("data", max_length=self.max_length, perception_patches_per_case=self.perception_patches_per_case)
        _non_negative("data", num_workers=self.num_workers, max_val_cases=self.max_val_cases,
                      val_task_cases=self.val_task_cases)
        if self.perception_patch and (len(self.perception_patch) != 3 or min(self.perception_patch) < 1):
            raise ConfigError(f"data.perception_patch must be 3 positive sizes (X Y Z) or [], got {self.perception_patch}")
        if not 0.0 <= self.finding_patch_probability <= 1.0:
            raise ConfigError(f"data.finding_patch_probability must be in [0, 1], got {self.finding_patch_probability}")
        if self.finding_patch_balance not in PATCH_BALANCE:
            raise ConfigError(f"data.finding_patch_balance must be one of {PATCH_BALANCE}, got "
                              f"{self.finding_patch_balance!r}")


#: What a later stage does with the parameters an earlier stage trained (``optim.stage_lr``).
STAGE_LR = ("restart", "keep", "freeze")


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay."""

    lr: float = _f(3e-4, "Peak learning rate, reached at the end of warmup.")
    weight_decay: float = _f(0.01, "Decoupled weight decay (not applied to biases and norm weights).")
    betas: tuple[float, float] = _f((0.9, 0.95), "AdamW (beta1, beta2).")
    warmup_steps: int = _f(20, "Linear warmup from 0 to `lr` over this many optimizer steps (capped at max_steps).")
    min_lr_ratio: float = _f(0.1, "The cosine decays to lr * min_lr_ratio at max_steps.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this value (0 disables clipping).")
    stage_lr: str = _f("restart", "A run in stages (perception_first), at a stage start, for the parameters an earlier stage trained: restart (they warm up and follow a new cosine with the parameters new to the stage), keep (they stay at lr * min_lr_ratio, where their stage's cosine ended) or freeze (they no longer train: a step of the stage skips their backward, about half of the demo's step with every task); the parameters new to the stage (the language model) warm up in each.")

    def __post_init__(self) -> None:
        _positive("optim", lr=self.lr)
        _non_negative("optim", weight_decay=self.weight_decay, warmup_steps=self.warmup_steps, grad_clip=self.grad_clip)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.stage_lr not in STAGE_LR:
            raise ConfigError(f"optim.stage_lr must be one of {STAGE_LR}, got {self.stage_lr!r}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must be in [0, 1), got {self.betas}")


@dataclass
class LossConfig:
    """Weights of the loss terms; a weight of 0 switches a term off."""

    lm: float = _f(1.0, "Language-model cross-entropy on answer tokens only.")
    lm_average: Literal["token", "sample"] = _f("token", "How the LM loss averages a batch: `token` (every answer token alike; long reports dominate) or `sample` (mean per sample, then over samples; short answers and boxes count as much as a report).")
    ehr: float = _f(0.0, "Multi-label BCE of the EHR-code head; > 0 with empty model.ehr_codes takes the training split's codes.")
    ehr_pos_weight: float | None = _f(None, "BCE pos_weight for EHR codes (positives are rare); null = unweighted.")
    box_centre: float = _f(0.0, "Grounding head: cross-entropy of its cell scores against a peak on every true box centre of the answer, for each <box> token of a grounding answer.")
    box_l1: float = _f(0.0, "Grounding head: L1 of the box regressed at each true centre's cell vs that box (0..1 model-input frame).")
    box_giou: float = _f(0.0, "Grounding head: 1 - generalised 3D IoU of the same box.")
    organ: float = _f(0.0, "Perception: DiceCE of the organ masks (cases with label maps).")
    finding: float = _f(0.0, "Perception: BCE + Dice of the finding masks (cases with boxes or finding labels).")
    finding_pos_weight: float = _f(10.0, "Perception: BCE pos_weight of finding voxels (a lesion is a few voxels of a volume).")
    finding_positive_share: float | None = _f(None, "Perception: null = the finding BCE averages every voxel of the batch (finding voxels weighted by finding_pos_weight, so their share of it follows how many there are); a share s in (0, 1) = s x the mean over the finding voxels (weighted as finding_instance_balance says) + (1 - s) x the mean over the others, whatever their number: a small lesion's loss is not diluted by the voxels around it, so one the model misses keeps its gradient (finding_pos_weight is then unused).")
    finding_instance_balance: float = _f(0.0, "Perception: exponent g of the finding voxels' weights in the finding BCE, Dice and type terms: a voxel of an instance of n voxels weighs n**-g, scaled so the batch's finding voxels average 1 (0 = every voxel alike, so large lesions dominate; 1 = every instance alike, as blob loss for many small lesions).")
    finding_type: float = _f(0.0, "Perception: cross-entropy of each finding voxel's type.")
    condition: float = _f(0.0, "Perception: BCE of the condition findings (e.g. splenomegaly) from their organ.")
    pointer: float = _f(0.0, "Perception: cross-entropy of each <box>'s pointer over the digest's regions.")
    contrastive: float = _f(0.0, "CLIP InfoNCE between pooled volume and report embeddings (needs batch_size >= 2).")
    temperature: float = _f(0.07, "Softmax temperature of the contrastive loss when the model does not learn its own logit_scale.")

    def __post_init__(self) -> None:
        _non_negative("loss", lm=self.lm, ehr=self.ehr, box_centre=self.box_centre, box_l1=self.box_l1, box_giou=self.box_giou,
                      organ=self.organ, finding=self.finding, finding_type=self.finding_type, condition=self.condition,
                      pointer=self.pointer, contrastive=self.contrastive)
        _positive("loss", finding_pos_weight=self.finding_pos_weight)
        if self.finding_positive_share is not None and not 0.0 < self.finding_positive_share < 1.0:
            raise ConfigError(f"loss.finding_positive_share must be null or in (0, 1), got {self.finding_positive_share}")
        if not 0.0 <= self.finding_instance_balance <= 1.0:
            raise ConfigError(f"loss.finding_instance_balance must be in [0, 1], got {self.finding_instance_balance}")
        _positive("loss", temperature=self.temperature)
        if self.ehr_pos_weight is not None:
            _positive("loss", ehr_pos_weight=self.ehr_pos_weight)


@dataclass
class RLConfig:
    """Reinforcement fine-tuning with verifiable rewards (``task: grpo``; vol3d.train.rl)."""

    tasks: tuple[str, ...] = _f(("report",), "Tasks whose answers are sampled and rewarded: report (finding F1 vs the reference) and/or vqa_closed (exact match).")
    group_size: int = _f(4, "Answers sampled per prompt; each one's advantage is its reward against its group's.")
    temperature: float = _f(1.0, "Sampling temperature of the answers.")
    max_new_tokens: int = _f(160, "Longest sampled answer in tokens.")

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        bad = sorted(set(self.tasks) - {"report", "vqa_closed"})
        if bad or not self.tasks:
            raise ConfigError(f"rl.tasks must be some of report, vqa_closed (rewards checkable against the "
                              f"reference), got {list(self.tasks)}")
        if self.group_size < 2:
            raise ConfigError(f"rl.group_size must be >= 2 (an advantage compares answers), got {self.group_size}")
        _positive("rl", temperature=self.temperature, max_new_tokens=self.max_new_tokens)


@dataclass
class RunConfig:
    """The fields and checks of every training run, whatever it trains (what :func:`vol3d.train.loop.fit` reads).

    Subclasses (:class:`TrainConfig`, :class:`vol3d.seg.config.SegConfig`) narrow ``task`` and
    add their ``model``, ``data`` (with ``batch_size`` and ``num_workers``, which ``fit`` reads
    too) and ``loss`` sections; a shared field has the same flag and meaning in all of them.
    """

    run_dir: str = _f("", "Output run directory (config.yaml, model/, checkpoints/, metrics.csv, tb/).")
    # declared here so it keeps its place near the top of config.yaml; each subclass lists its choices
    task: str = _f("", "What to optimise.")
    init: str | None = _f(None, "Run directory whose model/ initialises the weights (fine-tuning; `seg` takes its encoder); null = from scratch.")
    seed: int = _f(0, "Seed of weights, data order, task or patch sampling, and augmentation.")
    max_steps: int = _f(200, "Number of optimizer steps.")
    grad_accum: int = _f(1, "Micro-batches accumulated per optimizer step.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _f("auto", "auto: bf16 autocast on CUDA (if supported), fp32 on CPU. fp16 uses a GradScaler.")
    device: str = _f("auto", "Torch device: auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda.")
    log_every: int = _f(10, "Log training metrics every N steps (metrics.csv, TensorBoard, progress bar).")
    val_every: int = _f(100, "Validate every N steps and at the end (0 = only at the end; needs data.val_split).")
    ckpt_every: int = _f(100, "Save a resumable checkpoint every N steps (and at the end, and on Ctrl-C).")
    keep_last: int = _f(2, "Keep only the newest K checkpoints/step_N directories.")
    tensorboard: bool = _f(True, "Write TensorBoard events to RUN/tb (skipped with a note when tensorboard is not installed).")
    progress: bool = _f(True, "Show a tqdm progress bar with loss and samples/s.")
    ddp_find_unused: bool = _f(False, "DDP: tolerate parameters that get no gradient on some steps (slower; needed for some LoRA setups).")
    strategy: str = _f("ddp", "torchrun: `ddp` (every rank holds the model, gradients averaged) or `fsdp` (torch's FSDP2: parameters, gradients and optimizer state sharded over the ranks, for LMs that do not fit replicated); docs/training.md.")
    sync_batchnorm: bool = _f(False, "torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm), for the 3D ResNet at batch 1-2 per GPU.")
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        _positive("", max_steps=self.max_steps, grad_accum=self.grad_accum, log_every=self.log_every,
                  ckpt_every=self.ckpt_every, keep_last=self.keep_last)
        _non_negative("", val_every=self.val_every)
        if self.strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"strategy must be ddp or fsdp, got {self.strategy!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass
class TrainConfig(RunConfig):
    """One training or fine-tuning run of the vision-language model (saved as ``RUN/config.yaml``)."""

    task: Task = _f("pretrain", "What to optimise: `pretrain` (task mix), one text task, or `seg` (vol3d.seg).")
    model: Vol3DConfig = field(default_factory=_default_model, metadata={"help": "The model architecture (encoder, reducer, language model, heads); see vol3d.models."})
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    rl: RLConfig = field(default_factory=RLConfig, metadata={"help": "Reinforcement fine-tuning (task grpo)."})
    freeze: tuple[str, ...] = _f((), "Parts of the model this run keeps fixed: encoder (weights and batch-norm statistics; with perception, the regions every answer reads), lm. A fine-tune takes the architecture from --init and this from its own config.")
    perception_first: float = _f(0.0, "Perception models: share of max_steps at the start that trains the perception alone (organ and finding maps on the data.perception_patch crops; the language model is not run, so such a step costs about half), each stage with its own LR warmup and cosine; then every task. 0 = every task from the first step.")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.freeze = tuple(self.freeze)
        bad = sorted(set(self.freeze) - {"encoder", "lm"})
        if bad:
            raise ConfigError(f"freeze: {bad} is not a part of the model; choose from encoder, lm")
        if not 0.0 <= self.perception_first < 1.0:
            raise ConfigError(f"perception_first must be in [0, 1) (a share of max_steps), got {self.perception_first}")

    @property
    def perception_steps(self) -> int:
        """Optimizer steps of the perception-only stage (see ``perception_first``)."""
        return int(round(self.perception_first * self.max_steps))

    def task_mix(self) -> TaskMix:
        """Task mix actually sampled: ``data.tasks`` for ``pretrain``, ``rl.tasks`` for ``grpo``, else the
        one task's mix."""
        if self.task == "pretrain":
            return self.data.tasks
        if self.task == "grpo":
            return TaskMix(**{t: float(t in self.rl.tasks) for t in ("report", "vqa_closed", "vqa_open", "ground",
                                                                     "ehr")})
        if self.task not in FINETUNE_MIX:
            raise ConfigError(f"task {self.task!r} has no text-task mix (it is trained by its own module)")
        return TaskMix(**FINETUNE_MIX[self.task], samples_per_case=self.data.tasks.samples_per_case)
