"""``vol3d demo``: the whole pipeline end to end on synthetic data, resumable, on a 2-core CPU.

Six steps, each reusing what a previous run left in the demo folder ``OUT``:

1. ``OUT/export``: a synthetic hospital export (:func:`vol3d.synth.generate`);
   reused when complete (its ``.vol3dignore`` is written last).
2. ``OUT/cache``: the HDF5 cache (:func:`preprocess.runner.run_preprocess` with the
   ``tiny`` preset); the runner itself reuses unchanged cases and resumes after a kill.
3. ``OUT/run``: the ``tiny_cpu`` model (:func:`vol3d.train.run.train`), trained within the
   demo's time budget (``budget_min``; the clock stops it as Ctrl-C would); reused when its
   newest checkpoint is the last step, resumed from its checkpoint when interrupted or stopped.
4. ``OUT/eval.json``: metrics on the held-out (test) split, for the model and for the
   image-blind baseline (the same model with zeroed volumes); reused while the model
   weights and evaluation settings are unchanged.
5. ``OUT/answer.json``: a grounded question about a held-out case
   (``vol3d.load(run).ask(...)``), boxes in model voxels and world mm.
6. ``OUT/answer.png``: orthogonal slices through the answer's box with the true box
   (:func:`vol3d.viz.show_box_slices`).

``OUT/demo.json`` records the demo's parameters; a rerun with other ``--cases``/
``--seed``/``--steps`` is refused (``--fresh`` starts over) rather than mixing artefacts.
The notebooks and ``scripts/bench_quality.py`` call the same functions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from preprocess.errors import InputError

#: Id key used when ``VOL3D_ID_KEY`` is unset. Public, so only for synthetic data.
DEMO_ID_KEY = "passphrase:vol3d demo: a public key for synthetic data only"
#: Preprocessing preset (``configs/preprocess/``) per ``--modality`` and training preset (``configs/train/``).
PREPROCESS_PRESETS = {"ct": "tiny", "mr": "tiny_mr"}
TRAIN_PRESET = "tiny_cpu"
#: How the demo's perception crops draw their finding (``data.finding_patch_balance``): by type, so the
#: rarer cysts and nodules are seen early in its few hundred steps.
DEMO_PATCH_BALANCE = "type"
#: The preset's full-resolution perception stem is off in the demo: in its five minutes the stem's slower
#: perception steps stopped training at step 331 of 440 and broke the closed answers (round 12).
DEMO_PERCEPTION_STEM = False
#: The demo keeps MONAI's up path and zero padding (``model.perception_upsample`` / ``model.conv_padding``).
#: In its configuration the interpolating up path costs about 40% more per step (seed 0 stopped at step
#: 418 of 500, its findings found 0.548 -> 0.290); replicate padding alone costs 0-18% and measured mixed
#: on five demo draws (targets met 6 -> 7 of 12 on three CT seeds, findings found worse on both MR seeds;
#: docs/benchmarks/quality.md, round 22), so the preset's change (round 20) stays out of the demo.
DEMO_PERCEPTION_UPSAMPLE = "transposed"
DEMO_CONV_PADDING = "zeros"
#: Share of the demo's steps that train the perception alone (``perception_first``; the preset's 0.5 is for
#: its long runs). Every closed answer, location and report finding now comes from the regions, so the
#: demo's minutes go to the perception: 500 steps at 0.75 cost what 440 at 0.5 did and raised report F1
#: 0.55 -> 0.78, presence 0.85 -> 0.94, chains 0.75 -> 0.89 on 55 held-out series (round 14).
DEMO_PERCEPTION_FIRST = 0.75
#: Every finding instance weighs alike in the demo's finding loss (``loss.finding_instance_balance``): in its
#: few hundred steps the large liver lesions and tumours otherwise own the finding voxels, and the small ones
#: (white matter lesions, cysts) stay unlearned. On 43 held-out CT series report F1 0.710 -> 0.781, chains
#: 0.786 -> 0.893, grounding unchanged (liver lesion boxes 11 -> 10 of 14); on the MR demo at seed 1 report
#: 0.667 -> 0.857, EHR imaging 0.815 -> 0.979 (docs/benchmarks/quality.md, round 17).
DEMO_FINDING_INSTANCE_BALANCE = 1.0
#: The demo's finding BCE gives the finding voxels a tenth of it whatever their number
#: (``loss.finding_positive_share``; the preset averages every voxel): averaged over the crops, a nodule the
#: model calls background with confidence keeps too little gradient to be learned in its minutes. Targets met
#: on five demo draws 12 -> 16 of 20 (CT seed 0 all four: grounding 0.613 -> 0.677, EHR imaging 0.827 ->
#: 0.851; CT seed 2 0 -> 3), findings found the same or better on each; 0.25 met 15 (round 23).
DEMO_FINDING_POSITIVE_SHARE = 0.1
#: What the demo changes in the ``tiny_cpu`` preset for its five minutes (dotted TrainConfig keys); the benchmark
#: (``scripts/bench_quality.py``) trains the demo's configuration with the preset's own values of these.
FIVE_MINUTE_SWAPS: dict[str, Any] = {
    "model.perception_stem": DEMO_PERCEPTION_STEM,
    "model.perception_upsample": DEMO_PERCEPTION_UPSAMPLE,
    "model.conv_padding": DEMO_CONV_PADDING,
    "perception_first": DEMO_PERCEPTION_FIRST,
    # measured worse at the benchmark's budget (grounding 0.763 -> 0.742, CT MAE 2.79 -> 4.23 mm; round 23)
    "loss.finding_positive_share": DEMO_FINDING_POSITIVE_SHARE,
}

#: The demo's promise: end to end within five minutes on two CPU cores (docs/demo.md).
DEMO_BUDGET_MIN = 5.0
#: Seconds kept from the budget for what follows training: evaluation with the image-blind baseline
#: (16 s for the CT demo's 13 held-out series), asking, drawing, and the interpreter's start.
AFTER_TRAINING_S = 30.0
#: Training gets at least this many seconds, whatever the budget says (a model trained for less
#: answers nothing).
MIN_TRAINING_S = 30.0
#: The question asked in step 5 (``{text}`` is the finding's noun phrase, e.g. "liver lesion").
QUESTION = "Where is the {text}?"
#: The report request of step 5 (one of the training phrasings; ``{modality}`` CT or MR).
REPORT_QUESTION = "Write the findings for this {modality}."
#: Findings preferred for the question per ``--modality``, in order (the first the held-out case has).
PREFERRED = {"ct": ("liver_lesion", "kidney_cyst", "lung_nodule", "splenomegaly"),
             "mr": ("brain_tumour", "cerebellar_infarct", "white_matter_lesion", "hydrocephalus")}
#: What the synthetic export of each ``--modality`` holds (printed after step 1).
WHAT = {"ct": "CT chest/abdomen studies", "mr": "MR brain studies (T1, T2 and FLAIR each)"}
STATE_NAME = "demo.json"


@dataclasses.dataclass
class DemoOptions:
    """What ``vol3d demo`` builds (flags of the command map onto these fields)."""

    out: Path = Path("vol3d_demo")  # demo folder: export/, cache/, run/, eval.json, answer.png
    cases: int = 96  # synthetic studies (about 80% train, 10% val, 10% test by patient; ~15 s to make)
    steps: int = 500  # optimizer steps of the tiny_cpu model, at most (3/4 perception alone, then batch 4 x 4 questions; fewer where the time budget affords fewer)
    seed: int = 0  # seed of the synthetic data and of training
    modality: str = "ct"  # "ct": chest/abdomen CT; "mr": brain MR, T1/T2/FLAIR as three channels
    fresh: bool = False  # delete a previous demo in ``out`` first
    baseline: bool = True  # also evaluate the image-blind baseline (doubles the evaluation time)
    samples_per_case: int = 2  # VQA/grounding questions per held-out case in the evaluation
    max_new_tokens: int = 192  # longest generated answer (reports are the longest)
    progress: bool = True  # progress bars (tqdm, on stderr)
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train/val/test share of patients
    train_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # dotted TrainConfig keys
    # wall-clock minutes of the whole demo: training stops early (checkpointed; the same command resumes it)
    # when the steps left would not leave time to evaluate, ask and draw; 0: train every step
    budget_min: float = DEMO_BUDGET_MIN

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.cases < 4:
            raise InputError(f"--cases {self.cases}: the demo needs at least 4 cases (train, val and test splits)")
        if self.steps < 1:
            raise InputError(f"--steps {self.steps}: give at least 1 training step")
        if self.budget_min < 0:
            raise InputError(f"--budget-min {self.budget_min}: give the demo's minutes, or 0 for no time budget")
        if self.samples_per_case < 1:
            raise InputError(f"samples_per_case must be >= 1, got {self.samples_per_case}")
        if self.modality not in PREPROCESS_PRESETS:
            raise InputError(f"--modality {self.modality}: choose one of {sorted(PREPROCESS_PRESETS)}")

    def state(self) -> dict[str, Any]:
        """What the artefacts depend on (compared with ``OUT/demo.json`` on a rerun)."""
        return {"cases": self.cases, "seed": self.seed, "steps": self.steps,
                "split_fractions": list(self.split_fractions),
                "train_overrides": dict(sorted(self.train_overrides.items())),
                **({"modality": self.modality} if self.modality != "ct" else {})}  # CT demos made before stay valid


@dataclasses.dataclass(frozen=True)
class DemoPaths:
    """Where each artefact of a demo folder lives."""

    out: Path

    @property
    def export(self) -> Path:
        return self.out / "export"

    @property
    def cache(self) -> Path:
        return self.out / "cache"

    @property
    def run(self) -> Path:
        return self.out / "run"

    @property
    def eval_json(self) -> Path:
        return self.out / "eval.json"

    @property
    def answer_json(self) -> Path:
        return self.out / "answer.json"

    @property
    def answer_png(self) -> Path:
        return self.out / "answer.png"

    @property
    def state(self) -> Path:
        return self.out / STATE_NAME


@dataclasses.dataclass
class DemoResult:
    """What :func:`run_demo` made; ``reused`` names the steps that found their artefact in place."""

    paths: DemoPaths
    reused: list[str]
    eval: dict[str, Any] | None = None
    answer: Any = None  # vol3d.inference.Answer
    case: dict[str, Any] | None = None  # the held-out case asked about (CacheDataset item)
    finding: str | None = None
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    budget_stop: int | None = None  # the step at which the time budget stopped training (None: it did not)


# ----------------------------------------------------------------------------- small helpers


def _say(text: str = "") -> None:
    print(text, flush=True)


def _header(n: int, title: str) -> None:
    _say(f"\n== [{n}/6] {title} " + "=" * max(0, 60 - len(title)))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ensure_id_key() -> bool:
    """Set ``VOL3D_ID_KEY`` to :data:`DEMO_ID_KEY` when unset (returns True when it did)."""
    from preprocess.ids import ENV_VAR

    if os.environ.get(ENV_VAR):
        return False
    os.environ[ENV_VAR] = DEMO_ID_KEY
    return True


def _prepare_folder(opts: DemoOptions, paths: DemoPaths) -> None:
    """Create ``OUT`` (or empty it with ``fresh``); refuse a folder holding something else, or another demo."""
    out = paths.out
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder; pass another --out")
    mine = paths.state.is_file()
    if out.is_dir() and any(out.iterdir()) and not mine:
        raise InputError(f"{out} is not empty and holds no {STATE_NAME} (not a vol3d demo folder); "
                         "pass a new or empty --out")
    if opts.fresh and mine:
        _say(f"--fresh: deleting the previous demo in {out}")
        shutil.rmtree(out)
    elif mine:
        old = json.loads(paths.state.read_text())
        if old != opts.state():
            diff = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in opts.state().items() if old.get(k) != v)
            raise InputError(f"{out} holds a demo made with other parameters ({diff}); pass --fresh to "
                             "start over there, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    paths.state.write_text(json.dumps(opts.state(), indent=1) + "\n")


# ----------------------------------------------------------------------------- steps 1-3: data and model


def step_synth(opts: DemoOptions, paths: DemoPaths) -> bool:
    """Write the synthetic export unless a complete one exists; True when reused."""
    from preprocess.ingest.discover import IGNORE_FILE
    from vol3d.synth import SynthConfig, generate

    export = paths.export
    if (export / IGNORE_FILE).is_file() and (export / "truth.json").is_file():
        n = len(json.loads((export / "truth.json").read_text())["cases"])
        _say(f"reusing the export in {export} ({n} cases)")
        return True
    if export.exists():
        _say(f"{export} is incomplete (an interrupted run); writing it again")
        shutil.rmtree(export)
    export.mkdir(parents=True)
    cfg = SynthConfig(cases=opts.cases, seed=opts.seed, size="small", modality=opts.modality)  # type: ignore[arg-type]
    from tqdm.auto import tqdm

    with tqdm(total=cfg.cases, unit="case", desc="synth", disable=not opts.progress) as bar:
        truth = generate(export, cfg, progress=bar.update)
    cases = truth["cases"]
    n_find = sum(len(c["findings"]) for c in cases)
    _say(f"wrote {len(cases)} synthetic {WHAT[opts.modality]} ({n_find} findings; DICOM and NIfTI, with scouts, "
         f"masks, boxes, reports and ICD-10 codes) to {export}")
    return False


def step_preprocess(opts: DemoOptions, paths: DemoPaths) -> bool:
    """Preprocess the export into the cache (the runner reuses unchanged cases); True when all were reused."""
    from preprocess.runner import RunOptions, run_preprocess
    from preprocess.sidecars import SideTables

    export = paths.export
    cfg = preprocess_config(opts)
    side = SideTables.load(reports=export / "reports.csv", codes=export / "ehr_codes.csv",
                           boxes=export / "boxes.json", labels=export / "labels", lesions=export / "lesions",
                           vocab=export / "vocab.json")
    run_opts = RunOptions(progress=opts.progress, split_fractions=tuple(opts.split_fractions))
    summary = run_preprocess(export, paths.cache, cfg, side, run_opts)
    _say(summary.table())
    if summary.counts["failed"]:
        _say(f"note: {summary.counts['failed']} series failed; see {paths.cache / 'manifest.jsonl'} (reason, detail)")
    reused = summary.written == 0 and summary.reused > 0
    if reused:
        _say(f"reusing the cache in {paths.cache} ({summary.reused} cases unchanged)")
    return reused


def preprocess_config(opts: DemoOptions) -> Any:
    """The preprocessing preset of the demo's modality (``tiny`` or ``tiny_mr``)."""
    from preprocess.config import PreprocessConfig
    from preprocess.config_io import load_yaml
    from vol3d.presets import preset_path

    return load_yaml(PreprocessConfig, preset_path(PREPROCESS_PRESETS[opts.modality], kind="preprocess"))


def cached_channels(cfg: Any) -> int:
    """Channels of the volumes a preprocessing config writes: one per CT window; per MR sequence (one
    without ``ingest.sequence_channels``)."""
    if cfg.modality_default == "CT" and "CT" in cfg.ingest.modalities:
        return len(cfg.ct_windows)
    return max(1, len(cfg.ingest.sequence_channels))


def train_config(opts: DemoOptions, paths: DemoPaths) -> Any:
    """The ``tiny_cpu`` preset with the demo's run dir, cache, steps, seed, channels and overrides."""
    from preprocess.config_io import load_yaml
    from vol3d.presets import preset_path
    from vol3d.train.config import TrainConfig

    # absolute: the run's config.yaml must find its cache from any working directory
    overrides = {"run_dir": str(paths.run), "data.cache_dir": str(paths.cache.resolve()), "max_steps": opts.steps,
                 "seed": opts.seed, "progress": opts.progress,
                 "model.in_chans": cached_channels(preprocess_config(opts)),
                 # at the demo's few hundred steps the rarer findings need their share of the crops early
                 # (CT demo: grounding 0.48 -> 0.65; docs/benchmarks/quality.md, round 10)
                 "data.finding_patch_balance": DEMO_PATCH_BALANCE,
                 "loss.finding_instance_balance": DEMO_FINDING_INSTANCE_BALANCE,
                 **FIVE_MINUTE_SWAPS,
                 **opts.train_overrides}
    return load_yaml(TrainConfig, preset_path(TRAIN_PRESET, kind="train"), overrides)


def trained_step(run_dir: Path) -> int | None:
    """Step of the newest checkpoint of ``run_dir`` (None without one)."""
    from vol3d.train.run import checkpointed_step

    return checkpointed_step(Path(run_dir))


def step_train(opts: DemoOptions, paths: DemoPaths, seconds: float | None = None) -> tuple[bool, int | None]:
    """Train (or resume, or reuse) the tiny model, for at most ``seconds`` of wall clock (None: every
    step). Returns whether a finished run was reused and the step at which the clock stopped training
    (None: it did not; the checkpoint of that step is where the next run resumes)."""
    from vol3d.train.run import load_run_config, planned_steps, train, train_within

    run = paths.run
    step = trained_step(run)
    planned = load_run_config(run).max_steps if step is not None else opts.steps
    if step is not None and step >= planned and (run / "model" / "model.safetensors").is_file():
        _say(f"reusing the trained model in {run / 'model'} (step {step} of {planned})")
        return True, None
    resume = step is not None
    if resume:
        _say(f"resuming training from step {step} of {planned} ({run / 'checkpoints'})")
        # this folder's paths win over the recorded ones (the demo folder may have been moved)
        cfg = load_run_config(run, {"run_dir": str(run), "data.cache_dir": str(paths.cache.resolve()),
                                    "progress": opts.progress})
    else:
        if run.exists():
            shutil.rmtree(run)  # killed before its first checkpoint: nothing to resume
        cfg = train_config(opts, paths)
        _say(f"training {TRAIN_PRESET} for {cfg.max_steps} steps (batch {cfg.data.batch_size}, lr "
             f"{cfg.optim.lr:g}) on the train split; checkpoints every {cfg.ckpt_every} steps, "
             "so an interrupted demo resumes here")
    # the clock needs SIGALRM, which only the main thread of a POSIX process gets
    clocked = seconds is not None and hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    stopped = None
    if clocked:
        assert seconds is not None
        _say(f"time budget: {seconds:.0f} s of training (the demo's {opts.budget_min:g} minutes less what came "
             "before and what follows; --budget-min 0 trains every step)")
        reached, by_clock = train_within(cfg, seconds, resume=resume, plan=True)
        planned = planned_steps(cfg)
        if by_clock:
            stopped = reached
            _say(f"the time budget stopped training at step {reached} of {planned}; the figures below are "
                 "that model's. Run the same command again to train the remaining steps, or pass --budget-min 0")
        elif planned < opts.steps:
            _say(f"trained the {planned} of the {opts.steps} steps that the time budget affords on this machine "
                 f"(the perception's stage first; --fresh --budget-min 0 trains all {opts.steps})")
    else:
        if seconds is not None:
            _say("no time budget here (the clock needs the main thread of a POSIX process): training every step")
        train(cfg, resume=resume)
    _say(f"model saved in {run / 'model'}; training curves in {run / 'metrics.csv'}")
    return False, stopped


def training_seconds(opts: DemoOptions, elapsed: float) -> float | None:
    """Wall-clock seconds training may take when ``elapsed`` seconds of the demo have passed (None: no budget)."""
    if opts.budget_min <= 0:
        return None
    return max(MIN_TRAINING_S, opts.budget_min * 60.0 - elapsed - AFTER_TRAINING_S)


# ----------------------------------------------------------------------------- step 4: evaluation

#: Headline metrics: (dotted key in the results, name, target, what it means).
HEADLINE: tuple[tuple[str, str, str, str], ...] = (
    ("ground.acc_iou50", "grounding Acc@IoU0.5", ">= 0.7",
     "share of true finding boxes matched by an answer box with 3D IoU >= 0.5 (IoU = intersection volume / union volume)"),
    ("ground.acc_iou25", "grounding Acc@IoU0.25", "",
     "the same at IoU >= 0.25: the box is roughly on the finding"),
    ("ground.mean_iou", "grounding mean IoU", "", "mean IoU of each true box with its matched answer box"),
    ("ground.unparseable_rate", "no usable box", "", "grounding answers without a well-formed <box>[..]</box> where one was due (lower is better)"),
    ("ground.refusal_accuracy", "correct 'there is none'", "",
     "grounding questions about an absent finding answered without a box"),
    ("ground.located_acc_iou50", "located Acc@IoU0.5", "",
     "told the finding is there (the answer starts with a box): true boxes found at IoU >= 0.5"),
    ("report.findings.micro_f1", "report finding F1 (micro)", ">= 0.85",
     "findings read from the generated report (negation-aware) vs the reference report, pooled over findings"),
    ("report.findings.macro_f1", "report finding F1 (macro)", "", "the same, averaged over finding types"),
    ("report.rougeL", "report ROUGE-L", "", "longest-common-subsequence overlap of generated and reference report"),
    ("vqa_closed.exact_match", "closed VQA accuracy", "",
     "yes/no, organ, count and size questions answered exactly"),
    ("vqa_closed.by_type.presence.exact_match", "presence (balanced)", ">= 0.9",
     "'Is there X?', as many cases with X as without it, per finding: answering from the question alone gives 0.5"),
    ("vqa_closed.by_type.count.exact_match", "count exact (balanced)", ">= 0.8",
     "'How many X?', as many cases with X as without it, per finding"),
    ("vqa_open.token_f1", "open VQA token F1", "", "word overlap of descriptive answers with the reference"),
    ("ehr.imaging_macro_auroc", "EHR AUROC, imaging codes", ">= 0.9",
     "ranking of the patients' ICD-10 codes of findings an image shows, averaged over those codes (0.5 = chance)"),
    ("ehr.macro_auroc", "EHR macro AUROC, all codes", "",
     "the same over every code, hypertension and depression included (no image predicts those)"),
    ("measure.mae_mm", "measurement MAE (mm)", "<= blind / 2",
     "lesion diameters, organ lengths and distances between lesions, read from the perceived regions, mean "
     "absolute error in mm (lower is better; image-blind: the training split's median of each question)"),
    ("measure.lesions_ge10mm.within10", "lesions >= 10 mm within 10%", ">= 0.7",
     "diameters of findings of at least 10 mm measured within 10% of the true size"),
    ("measure.mae_ml", "volume MAE (mL)", "", "finding and organ volumes (lower is better)"),
    ("chain.conclusion_acc_present", "chain conclusion, finding present", ">= 0.9",
     "'Is there X?' chains (organ -> finding -> measurement -> conclusion) whose conclusion is right where X is "
     "present"),
    ("chain.conclusion_acc", "chain conclusion, all", "", "the same over present and absent findings"),
    ("chain.finding_iou", "chain finding box IoU", "",
     "IoU of the chain's largest-finding box with the true one, where the finding is present"),
    ("detect.acc_iou50", "perceived findings at IoU 0.5", "",
     "true finding instances matched by a perceived region of their type at IoU >= 0.5 (the perception alone)"),
    ("detect.first_look.acc_iou50", "perceived findings, first look", "",
     "the same before the second look at each finding on a crop (the gain of looking again, side by side)"),
    ("detect.small.acc_iou50", "perceived small findings at IoU 0.5", "",
     "the same for findings under 10 mm long axial diameter"),
    ("detect.first_look.small_acc_iou50", "perceived small, first look", "", "the same before the second look"),
)
#: The demo's own targets (the answers issue: five minutes on two cores), in place of :data:`HEADLINE`'s, which
#: are the 30-minute benchmark's (``scripts/bench_quality.py``); a metric not named here has none in the demo.
DEMO_TARGETS: dict[str, str] = {
    "ground.acc_iou50": ">= 0.6",
    "report.findings.micro_f1": ">= 0.7",
    "vqa_closed.by_type.presence.exact_match": ">= 0.85, blind <= 0.65",
    "ehr.imaging_macro_auroc": ">= 0.85",
}
#: Tasks whose model interval must lie above the image-blind one (the model reads the image).
SEPARATION = ("ground.acc_iou50", "report.findings.micro_f1", "vqa_closed.by_type.presence.exact_match",
              "vqa_closed.by_type.count.exact_match", "ehr.imaging_macro_auroc", "chain.conclusion_acc_present")
#: Error metrics whose model interval must lie *below* the image-blind one.
SEPARATION_BELOW = ("measure.mae_mm",)


def interval(results: Mapping[str, Any], key: str) -> tuple[float, float]:
    """The ``<key>_ci`` bootstrap interval of a results dict (NaNs when absent)."""
    node: Any = results
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.get(part, {}) if isinstance(node, Mapping) else {}
    ci = node.get(f"{leaf}_ci") if isinstance(node, Mapping) else None
    if not ci or ci[0] is None:
        return math.nan, math.nan
    return float(ci[0]), float(ci[1])


def separation(evaluation: Mapping[str, Any]) -> dict[str, bool]:
    """Per :data:`SEPARATION` metric: does the model's interval lie above the image-blind model's (below it for
    the errors of :data:`SEPARATION_BELOW`)?"""
    model, blind = evaluation.get("model", {}), evaluation.get("image_blind", {})
    return ({key: interval(model, key)[0] > interval(blind, key)[1] for key in SEPARATION}
            | {key: interval(model, key)[1] < interval(blind, key)[0] for key in SEPARATION_BELOW})


def metric(results: Mapping[str, Any], key: str) -> float:
    """A dotted key of a results dict (``"ground.acc_iou50"``), NaN when absent."""
    node: Any = results
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return math.nan
        node = node[part]
    try:
        return float(node) if node is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _fmt(v: float, ci: tuple[float, float] = (math.nan, math.nan)) -> str:
    if not math.isfinite(v):
        return "n/a"
    return f"{v:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if math.isfinite(ci[0]) else "")


def headline_table(evaluation: Mapping[str, Any], explain: bool = True,
                   targets: Mapping[str, str] | None = None, target_name: str = "target") -> str:
    """Markdown-style table of :data:`HEADLINE` for ``{"model": results, "image_blind": results?}``; its last
    column (``target_name``) holds ``targets`` per key, or :data:`HEADLINE`'s (the benchmark's) when None."""
    model, blind = evaluation.get("model", {}), evaluation.get("image_blind")
    cols = ["metric", "model"] + (["image-blind"] if blind else []) + [target_name]
    rows = []
    for key, name, target, _ in HEADLINE:
        row = [name, _fmt(metric(model, key), interval(model, key))]
        row += [_fmt(metric(blind, key), interval(blind, key))] if blind else []
        rows.append(row + [target if targets is None else targets.get(key, "")])
    widths = [max(len(str(r[i])) for r in [cols, *rows]) for i in range(len(cols))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    out = [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)]
    if blind:
        sep = separation(evaluation)
        out.append("")
        out.append("model above image-blind (95% intervals apart): "
                   + ", ".join(f"{dict((k, n) for k, n, _, _ in HEADLINE)[k]} {'yes' if ok else 'NO'}"
                               for k, ok in sep.items()))
    if explain:
        out += ["", "What the numbers mean:"]
        out += [f"  {name}: {meaning}" for _, name, _, meaning in HEADLINE]
        out.append("  [lo, hi]: 95% bootstrap interval over cases")
        if blind:
            out.append("  image-blind: the same model with every volume zeroed; it answers from the question "
                       "alone, so the gap to it is what the model reads from the images")
    return "\n".join(out)


def held_out(cache: Path, input_shape: Sequence[int]) -> tuple[Any, str]:
    """The held-out cases of a cache as a CacheDataset: the test split, else val (small demos)."""
    from vol3d.data.cache import CacheDataset, read_manifest

    splits = {str(r.get("split")) for r in read_manifest(cache)}
    for split in ("test", "val"):
        if split in splits:
            return CacheDataset(cache, split=split, mode="volume", input_size=tuple(input_shape)), split
    raise InputError(f"{cache} has no test or val case; run the demo with more --cases (e.g. 24)")


def evaluate_pipeline(pipe: Any, cases: Any, *, baseline: bool = True, samples_per_case: int = 2,
                      max_new_tokens: int = 192, seed: int = 0, progress: bool = True,
                      label: str = "eval") -> dict[str, Any]:
    """``{"model": results, "image_blind": results}`` of :func:`vol3d.eval.evaluate` on ``cases``.

    ``pipe`` is a :class:`vol3d.inference.Vol3DPipeline`; tasks: the text tasks plus ``ehr``
    when the model has an EHR head. ``image_blind`` (zeroed volumes) is skipped unless ``baseline``.
    """
    from tqdm.auto import tqdm

    from vol3d.eval import evaluate

    codes, tasks = pipe.code_vocab, pipe.default_tasks
    presence = pipe.presence_set(cases, seed=seed)
    out: dict[str, Any] = {}
    for name, blind in (("model", False), ("image_blind", True)):
        if blind and not baseline:
            continue
        priors = pipe.measure_priors(cases.cache_dir) if blind else None
        t0 = time.perf_counter()
        items = tqdm(cases, desc=f"{label} ({name.replace('_', '-')})", unit="case", disable=not progress)
        out[name] = evaluate(pipe.model, items, tasks, vocab=pipe.vocab, code_vocab=codes,
                             samples_per_case=samples_per_case, max_new_tokens=max_new_tokens, seed=seed,
                             image_blind=blind, keep_predictions=True, locate_prefix=pipe.locate_prefix,
                             presence=presence, priors=priors)
        out[name]["meta"]["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def demo_table(evaluation: Mapping[str, Any], explain: bool = True) -> str:
    """:func:`headline_table` against the demo's own targets (:data:`DEMO_TARGETS`)."""
    return headline_table(evaluation, explain, targets=DEMO_TARGETS, target_name="demo target")


def step_eval(opts: DemoOptions, paths: DemoPaths, pipe: Any) -> tuple[dict[str, Any], bool]:
    """Evaluate on the held-out split (or reuse ``eval.json`` for the same weights and settings)."""
    from vol3d.eval import jsonable
    from vol3d.inference import write_json

    settings = {"model_sha256": file_sha256(paths.run / "model" / "model.safetensors"),
                "samples_per_case": opts.samples_per_case, "max_new_tokens": opts.max_new_tokens,
                "baseline": opts.baseline}
    if paths.eval_json.is_file():
        old = json.loads(paths.eval_json.read_text())
        if old.get("settings") == settings:
            _say(f"reusing the evaluation in {paths.eval_json} (same model weights and settings)")
            _say(demo_table(old))
            return old, True
    ds, split = held_out(paths.cache, pipe.input_shape)
    _say(f"evaluating on the {len(ds)} held-out '{split}' cases (never seen in training): reports, closed and "
         f"open VQA, grounding{', EHR codes' if pipe.code_vocab is not None else ''}"
         + ("; then the image-blind baseline" if opts.baseline else ""))
    res = evaluate_pipeline(pipe, ds, baseline=opts.baseline, samples_per_case=opts.samples_per_case,
                            max_new_tokens=opts.max_new_tokens, seed=opts.seed, progress=opts.progress)
    res["settings"] = settings
    res["split"] = split
    write_json(res, paths.eval_json)
    _say(demo_table(res))
    return jsonable(res), False  # what eval.json holds


# ----------------------------------------------------------------------------- steps 5-6: ask and draw


def pick_case(cases: Any, finding: str | None = None, vocab: Any = None) -> tuple[dict[str, Any], str]:
    """The first case (by id) with a visible box of ``finding`` (default: :data:`PREFERRED`'s findings
    of the cache's vocabulary in order, then its other findings).

    Returns the CacheDataset item and the finding name; falls back to the first case and
    its first finding (then the answer should say there is none).
    """
    from vol3d.tasks import finding_truth

    order = sorted(range(len(cases)), key=lambda i: str(cases.rows[i]["id"]) if hasattr(cases, "rows") else i)
    # boxes and findings only: a CacheDataset skips the voxels; only the chosen case is read whole
    scan = getattr(cases, "item_without_pixels", cases.__getitem__)
    truths = [finding_truth(scan(i), vocab) for i in order]
    known = [n for names in PREFERRED.values() for n in names if n in truths[0]]
    wanted = (finding,) if finding else (*known, *(n for n in truths[0] if n not in known))
    for name in wanted:
        for i, truth in zip(order, truths, strict=True):
            if name in truth and truth[name].n > 0:
                return cases[i], name
    if finding and finding not in truths[0]:
        raise InputError(f"finding {finding!r} is not in the finding vocabulary ({sorted(truths[0])})")
    return cases[order[0]], wanted[0]


def true_boxes(case: Mapping[str, Any], finding: str, vocab: Any = None) -> np.ndarray:
    """The visible true boxes ``(N, 6)`` of ``finding`` in the case's model-input voxels."""
    from vol3d.tasks import finding_truth

    return finding_truth(case, vocab)[finding].boxes


def question_for(finding: str, vocab: Any = None) -> str:
    """The grounding question about ``finding`` ("Where is the liver lesion?"); ``vocab`` (a cache's finding
    vocabulary) defaults to the synthetic abdomen's."""
    from vol3d.tasks import as_vocab

    return QUESTION.format(text=as_vocab(vocab)[finding].text)


def answer_figure(answer: Any, truth: np.ndarray | None, finding: str | None = None,
                  center: Sequence[float] | None = None) -> Any:
    """:func:`vol3d.viz.answer_slices` of an :class:`~vol3d.inference.Answer` with the question and answer
    as title: predicted boxes (solid) and true boxes ``(N, 6)`` in model-input voxels (dashed)."""
    from vol3d.tasks import DEFAULT_VOCAB
    from vol3d.viz import answer_slices

    name = DEFAULT_VOCAB[finding].text if finding in DEFAULT_VOCAB else (finding or "finding").replace("_", " ")
    title = f"Q: {answer.question}   A: {answer.text if len(answer.text) < 90 else answer.text[:87] + '...'}"
    if not len(answer.model_boxes):
        title += "\n(no box in the answer: the true box is shown alone)"
    return answer_slices(answer, truth, name, center=center, title=title)


def describe_answer(answer: Any, truth: np.ndarray) -> list[str]:
    """Lines about each answer box (world mm, size, IoU with its matched true box), then each true box."""
    from vol3d.eval.metrics import match_boxes
    from vol3d.viz import describe_boxes

    pred = answer.model_boxes
    _, pred_iou = match_boxes(pred, truth)
    spacing, affine = answer.input.spacing, answer.affine
    lines = [f"  {line}; IoU with its true box {iou:.2f}"
             for line, iou in zip(describe_boxes(pred, spacing, affine, prefix="answer box"), pred_iou, strict=True)]
    return lines + [f"  {line}" for line in describe_boxes(truth, spacing, affine, prefix="true box")]


def step_ask(paths: DemoPaths, pipe: Any, finding: str | None = None,
             max_new_tokens: int = 128) -> tuple[Any, dict[str, Any], str, np.ndarray]:
    """Ask the grounding question about a held-out case; write ``answer.json``.

    Returns the answer, the case, the finding and its true boxes (model-input voxels)."""
    from vol3d.inference import CACHE_SEP, write_json

    ds, split = held_out(paths.cache, pipe.input_shape)
    case, name = pick_case(ds, finding, pipe.vocab)
    question = question_for(name, pipe.vocab)
    truth = true_boxes(case, name, pipe.vocab)
    _say(f"held-out case {case['id'][:14]}... ({split} split), which has "
         f"{len(truth)} {name.replace('_', ' ')} box(es) in its ground truth")
    inp = pipe.prepare(f"{paths.cache}{CACHE_SEP}{case['id']}")  # read once, asked several questions
    answer = pipe.ask(inp, question, max_new_tokens=max_new_tokens)
    free_text, located = answer.text, False
    if answer.findings:
        _say(f"what the model perceived: {answer.findings}")
    _say(f"Q: {question}\nA: {answer.text}")
    if not answer.boxes:
        _say(f"  (no box: the model did not see the {name.replace('_', ' ')}.) Told that it is there "
             "(the answer must start with a box), it says where it would be:")
        answer, located = pipe.ask(inp, question, max_new_tokens=max_new_tokens, locate=True), True
        _say(f"A: {answer.text}")
    if answer.boxes:
        _say("\n".join(describe_answer(answer, truth)))
    else:
        _say("  (no box in the answer)")
    request = REPORT_QUESTION.format(modality=case.get("modality") or "CT")
    report = pipe.ask(inp, request, max_new_tokens=max_new_tokens)
    _say(f"Q: {request}\nA: {report.text}\nreference report: {case.get('report', '')}")
    write_json({**answer.to_dict(), "finding": name, "split": split, "free_answer": free_text, "located": located,
                "true_model_vox": truth, "true_world_mm": _world(truth, answer.affine), "report": report.text,
                "reference_report": case.get("report", "")}, paths.answer_json)
    return answer, case, name, truth


def _world(boxes: np.ndarray, affine: np.ndarray) -> np.ndarray:
    from preprocess.geometry import boxes_voxel_to_world

    return boxes_voxel_to_world(boxes, affine) if len(boxes) else np.zeros((0, 6))


def step_figure(paths: DemoPaths, answer: Any, case: Mapping[str, Any], finding: str,
                truth: np.ndarray | None = None) -> Path:
    """Draw the answer's boxes and the true boxes (default: the case's) on orthogonal slices into ``answer.png``."""
    from vol3d.viz import save_figure

    fig = answer_figure(answer, true_boxes(case, finding) if truth is None else truth, finding)
    save_figure(fig, paths.answer_png)
    _say(f"wrote {paths.answer_png}: axial, coronal and sagittal slices through the answer's box "
         "(solid: predicted, dashed: true; radiological view, patient right on the image left)")
    return paths.answer_png


# ----------------------------------------------------------------------------- the whole demo


def run_demo(opts: DemoOptions, finding: str | None = None,
             on_step: Callable[[str, bool], None] | None = None) -> DemoResult:
    """Run (or resume) the six demo steps in ``opts.out``; see the module docstring.

    ``on_step(name, reused)`` is called after each step (tests, notebooks).
    """
    from vol3d.inference import load

    started = time.perf_counter()
    paths = DemoPaths(opts.out)
    result = DemoResult(paths=paths, reused=[])
    _prepare_folder(opts, paths)
    if ensure_id_key():
        _say("note: VOL3D_ID_KEY is not set, so the demo uses its fixed public key for the pseudonymous ids "
             "(fine for synthetic data; set your own secret key for real exports: docs/preprocess.md)")

    def timed(name: str, fn: Callable[[], Any], reused: Callable[[Any], bool] = bool) -> Any:
        t0 = time.perf_counter()
        value = fn()
        result.seconds[name] = round(time.perf_counter() - t0, 1)
        if reused(value):
            result.reused.append(name)
        if on_step is not None:
            on_step(name, reused(value))
        return value

    never = lambda _: False  # noqa: E731 (asking and drawing are cheap: always redone)
    _header(1, "synthesise a small hospital export")
    timed("synth", lambda: step_synth(opts, paths))
    _header(2, "preprocess it into the HDF5 cache")
    timed("preprocess", lambda: step_preprocess(opts, paths))
    _header(3, f"train the {TRAIN_PRESET} vision-language model")
    _, result.budget_stop = timed("train", lambda: step_train(
        opts, paths, training_seconds(opts, time.perf_counter() - started)), reused=lambda v: v[0])
    pipe = load(paths.run, device="cpu", preprocess_config=paths.cache)
    _header(4, "evaluate on held-out cases")
    result.eval, _ = timed("eval", lambda: step_eval(opts, paths, pipe), reused=lambda v: v[1])
    _header(5, "ask a grounded question about a held-out case")
    result.answer, result.case, result.finding, truth = timed(
        "ask", lambda: step_ask(paths, pipe, finding, opts.max_new_tokens), reused=never
    )
    _header(6, "draw the answer's box next to the truth")
    timed("figure", lambda: step_figure(paths, result.answer, result.case, result.finding, truth), reused=never)
    _summary(paths, result)
    return result


def _summary(paths: DemoPaths, result: DemoResult) -> None:
    total = sum(result.seconds.values())
    reused = f"; reused: {', '.join(result.reused)}" if result.reused else ""
    _say(f"\n== done in {total:.0f} s{reused} " + "=" * 40)
    if result.budget_stop is not None:
        _say(f"  (the time budget stopped training at step {result.budget_stop}: run the same command again to "
             "train the remaining steps and evaluate the finished model)")
    rows = [
        ("synthetic export", paths.export, "DICOM/NIfTI + labels, boxes.json, reports.csv, ehr_codes.csv, truth.json"),
        ("cache", paths.cache, "manifest.jsonl + one HDF5 file per series (docs/formats.md)"),
        ("trained model", paths.run / "model", "reload with vol3d.load(RUN); curves in run/metrics.csv"),
        ("evaluation", paths.eval_json, "all metrics, model and image-blind baseline, with every prediction"),
        ("answer", paths.answer_json, "question, answer text, boxes in model voxels / world mm / original voxels"),
        ("figure", paths.answer_png, "predicted (solid) vs true (dashed) box on three slices"),
    ]
    for name, path, what in rows:
        _say(f"  {name:<17} {path}\n  {'':<17} {what}")
    case = result.case["id"] if result.case else "CASE_ID"
    _say("next:\n"
         f"  vol3d ask {paths.run} '{paths.cache}::{case}' \"Is there a {(result.finding or 'lesion').replace('_', ' ')}?\"\n"
         f"  vol3d eval {paths.run} --cache {paths.cache}\n"
         "  jupyter lab notebooks/explore_grounded_answers.ipynb")


def main_exit_code(opts: DemoOptions, finding: str | None = None) -> int:
    """Run the demo for the CLI; Ctrl-C during training says how to resume (exit 130)."""
    from vol3d.train.loop import TrainingInterrupted

    try:
        run_demo(opts, finding)
    except TrainingInterrupted as exc:
        print(f"vol3d demo: interrupted at step {exc.step}; run the same command again to resume",
              file=sys.stderr)
        return 130
    return 0
