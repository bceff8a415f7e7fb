"""`vol3d demo` end to end at a tiny size, and the helpers it shares with the notebook and the benchmark."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from preprocess.errors import ConfigError, InputError
from preprocess.geometry import as_boxes, box_iou, boxes_voxel_to_world
from vol3d import demo, viz

# 2 training steps, 8-token answers, one question per task: the pipeline end to end, not its quality.
TINY = {"cases": 8, "steps": 2, "samples_per_case": 1, "max_new_tokens": 8, "progress": False,
        "train_overrides": {"data.num_workers": 0, "tensorboard": False, "val_every": 0, "ckpt_every": 1}}


def _run(opts: demo.DemoOptions) -> tuple[demo.DemoResult, str, list[tuple[str, bool]]]:
    steps: list[tuple[str, bool]] = []
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = demo.run_demo(opts, on_step=lambda name, reused: steps.append((name, reused)))
    return result, buf.getvalue(), steps


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory: pytest.TempPathFactory):
    """The tiny demo run twice in the same folder, the first time without an id key in the environment."""
    out = tmp_path_factory.mktemp("demo") / "vol3d_demo"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("VOL3D_ID_KEY", raising=False)
        first = _run(demo.DemoOptions(out=out, **TINY))
        key_after_first = __import__("os").environ.get("VOL3D_ID_KEY")
        model = out / "run" / "model" / "model.safetensors"
        stamps = {p: p.stat().st_mtime_ns for p in (model, out / "eval.json", out / "export" / "truth.json")}
        second = _run(demo.DemoOptions(out=out, **TINY))
    return {"out": out, "first": first, "second": second, "stamps": stamps, "key": key_after_first}


def test_first_run_writes_every_artefact(demo_runs):
    out = demo_runs["out"]
    result, text, steps = demo_runs["first"]
    assert [name for name, _ in steps] == ["synth", "preprocess", "train", "eval", "ask", "figure"]
    assert not result.reused
    for n in range(1, 7):
        assert f"[{n}/6]" in text
    truth = json.loads((out / "export" / "truth.json").read_text())
    assert len(truth["cases"]) == TINY["cases"]
    assert (out / "cache" / "manifest.jsonl").is_file()
    assert (out / "run" / "model" / "model.safetensors").is_file()
    assert demo.trained_step(out / "run") == TINY["steps"]
    # the summary names every artefact
    for path in (out / "export", out / "cache", out / "run" / "model", out / "eval.json", out / "answer.png"):
        assert str(path) in text


def test_without_a_key_the_demo_sets_its_public_key_and_says_so(demo_runs):
    assert demo_runs["key"] == demo.DEMO_ID_KEY
    assert "VOL3D_ID_KEY is not set" in demo_runs["first"][1]
    assert "VOL3D_ID_KEY is not set" not in demo_runs["second"][1]  # set by then


def test_png_is_a_real_image_with_content(demo_runs):
    from matplotlib.image import imread

    png = demo_runs["out"] / "answer.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(png)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    assert float(img[..., :3].std()) > 0.05  # slices, not a blank canvas


def test_evaluation_covers_held_out_cases_with_the_image_blind_baseline(demo_runs):
    out = demo_runs["out"]
    ev = json.loads((out / "eval.json").read_text())
    rows = [json.loads(line) for line in (out / "cache" / "manifest.jsonl").read_text().splitlines()]
    held = [r for r in rows if r["status"] == "ok" and r["split"] == ev["split"]]
    assert ev["split"] in ("test", "val") and held
    assert ev["model"]["meta"]["n_cases"] == len(held)
    assert ev["model"]["meta"]["image_blind"] is False and ev["image_blind"]["meta"]["image_blind"] is True
    assert {"report", "vqa_closed", "vqa_open", "ground"} <= set(ev["model"])
    assert ev["settings"]["model_sha256"] == demo.file_sha256(out / "run" / "model" / "model.safetensors")
    # every prediction is about a held-out case, never a training one
    assert {p["case"] for p in ev["model"]["predictions"]} <= {r["id"] for r in held}
    table = demo.headline_table(ev)
    assert "image-blind" in table and "grounding Acc@IoU0.5" in table


def test_answer_json_truth_boxes_are_the_cached_world_boxes(demo_runs):
    """The true box the figure draws (model-input voxels) maps back to the box stored in world mm."""
    result, _, _ = demo_runs["first"]
    ans = json.loads((demo_runs["out"] / "answer.json").read_text())
    assert ans["question"] == demo.question_for(ans["finding"])
    case = result.case
    assert ans["split"] in ("test", "val")
    stored = as_boxes(case["boxes_world"].numpy())[
        [i for i, f in enumerate(case["box_findings"]) if f == ans["finding"]]
    ]
    mapped = as_boxes(ans["true_world_mm"])
    assert len(mapped) >= 1
    # clipping to the model input can only shrink a box; a fully visible one is identical
    assert box_iou(mapped, stored).max(axis=1).min() > 0.5
    np.testing.assert_allclose(
        mapped, boxes_voxel_to_world(as_boxes(ans["true_model_vox"]), np.asarray(ans["input"]["input_affine"])),
        atol=1e-3,
    )


def test_the_figure_always_has_a_predicted_box(demo_runs):
    """The answer drawn has a box: the free answer's, or (told the finding is there) a located one,
    and answer.json says which; the free answer is kept either way."""
    result, text, _ = demo_runs["first"]
    ans = json.loads((demo_runs["out"] / "answer.json").read_text())
    assert result.answer.boxes
    assert isinstance(ans["free_answer"], str)  # may be empty after the 2 test steps
    if ans["located"]:
        assert ans["answer"].startswith("<box>[") and "Told that it is there" in text
        assert "<box>" not in ans["free_answer"]
    else:
        assert ans["free_answer"] == ans["answer"]
    assert len(ans["boxes"]) == len(result.answer.boxes) >= 1


def test_second_run_reuses_synth_train_and_eval(demo_runs):
    result, text, steps = demo_runs["second"]
    assert {"synth", "preprocess", "train", "eval"} <= set(result.reused)
    assert dict(steps)["ask"] is False
    assert text.count("reusing") >= 4
    for path, stamp in demo_runs["stamps"].items():
        assert path.stat().st_mtime_ns == stamp, f"{path} was rewritten"


def test_a_drawn_answer_box_lands_on_the_true_box(demo_runs):
    """Feed the reference answer through the inference geometry: the figure's predicted box is the true one."""
    from preprocess.geometry import format_box, normalise_boxes
    from vol3d.inference import Answer, boxes_from_text, load

    out = demo_runs["out"]
    result, _, _ = demo_runs["first"]
    pipe = load(out / "run", device="cpu", preprocess_config=out / "cache")
    inp = pipe.prepare(f"{out / 'cache'}::{result.case['id']}")
    truth = demo.true_boxes(result.case, result.finding)
    text = " ".join(format_box(b) for b in normalise_boxes(truth, inp.input_shape))
    boxes, bad = boxes_from_text(text, inp)
    answer = Answer(demo.question_for(result.finding), text, boxes, bad, inp)
    fig = demo.answer_figure(answer, truth, result.finding)
    gids = {p.get_gid() for ax in fig.axes for p in ax.patches}
    assert {"pred-0", "true-0"} <= gids
    pred = np.stack([b.model_vox for b in boxes])
    assert np.diag(box_iou(pred, viz.match_order(pred, truth))).min() > 0.9  # 0..999 text rounding only


def test_interrupted_training_resumes_to_the_same_weights(demo_runs, tmp_path, monkeypatch):
    """Kill after step 1 (drop the last checkpoint): a rerun resumes from step 1, and since resuming
    is exact the step-2 weights come out identical, so the evaluation is reused."""
    import shutil

    out = tmp_path / "demo"
    shutil.copytree(demo_runs["out"], out)
    sha = demo.file_sha256(out / "run" / "model" / "model.safetensors")
    shutil.rmtree(out / "run" / "checkpoints" / f"step_{TINY['steps']}")
    assert demo.trained_step(out / "run") == TINY["steps"] - 1
    monkeypatch.setenv("VOL3D_ID_KEY", demo.DEMO_ID_KEY)  # the key the fixture's cache was made with
    result, text, _ = _run(demo.DemoOptions(out=out, **TINY))
    assert f"resuming training from step {TINY['steps'] - 1}" in text
    assert "train" not in result.reused and demo.trained_step(out / "run") == TINY["steps"]
    assert demo.file_sha256(out / "run" / "model" / "model.safetensors") == sha
    assert "eval" in result.reused


def test_the_time_budget_stops_training_and_says_so(demo_runs, tmp_path, monkeypatch):
    """With training due, the demo trains within its minutes less what came before and what follows
    (the clock itself: vol3d.train.run.train_within's test); a stop is reported with its step, and
    --budget-min 0 trains every step without a clock."""
    import shutil

    out = tmp_path / "demo"
    shutil.copytree(demo_runs["out"], out)
    shutil.rmtree(out / "run" / "checkpoints" / f"step_{TINY['steps']}")  # one step left to train
    monkeypatch.setenv("VOL3D_ID_KEY", demo.DEMO_ID_KEY)
    given = []

    def clock(cfg, seconds, resume=False, plan=False):  # the clock ran out before the last step
        given.append((seconds, resume))
        assert plan  # a new run would fit its steps to the seconds
        return TINY["steps"] - 1, True

    monkeypatch.setattr("vol3d.train.run.train_within", clock)
    result, text, _ = _run(demo.DemoOptions(out=out, **TINY, budget_min=2.0))
    (seconds, resume), = given
    assert resume and demo.MIN_TRAINING_S <= seconds <= 120 - demo.AFTER_TRAINING_S
    assert result.budget_stop == TINY["steps"] - 1
    assert f"the time budget stopped training at step {TINY['steps'] - 1} of {TINY['steps']}" in text

    def no_clock(*args, **kwargs):
        raise AssertionError("--budget-min 0 needs no clock")

    monkeypatch.setattr("vol3d.train.run.train_within", no_clock)
    result, text, _ = _run(demo.DemoOptions(out=out, **TINY, budget_min=0))
    assert result.budget_stop is None and demo.trained_step(out / "run") == TINY["steps"]
    with pytest.raises(InputError, match="--budget-min"):
        demo.DemoOptions(budget_min=-1)


def _untrained_copy(demo_runs, tmp_path, steps: int, monkeypatch) -> Path:
    """A copy of the shared demo without its run and evaluation, its recorded steps set to ``steps`` (the
    export and cache stay valid), and the demo's key set."""
    import shutil

    out = tmp_path / "demo"
    shutil.copytree(demo_runs["out"], out)
    shutil.rmtree(out / "run")
    (out / "eval.json").unlink()
    state = json.loads((out / demo.STATE_NAME).read_text())
    (out / demo.STATE_NAME).write_text(json.dumps({**state, "steps": steps}))
    monkeypatch.setenv("VOL3D_ID_KEY", demo.DEMO_ID_KEY)
    return out


def test_a_new_run_trains_the_steps_its_budget_affords_each_stage_its_share(demo_runs, tmp_path, monkeypatch):
    """Where the measured steps are slower than the budget allows, the demo trains fewer steps with the
    same stage shares (so its schedule anneals and the language model trains), records them in the run's
    config.yaml, says so, and a rerun reuses the run as finished."""
    from vol3d.train import loop
    from vol3d.train.run import PLAN_MARGIN, load_run_config

    steps = 40
    out = _untrained_copy(demo_runs, tmp_path, steps, monkeypatch)
    measured = []

    def stage_seconds(cfg, model, objective, items, steps=3):  # a machine where steps take 100 s and 200 s
        measured.append(objective.stage_starts)
        return [100.0, 200.0]

    monkeypatch.setattr(loop, "stage_seconds", stage_seconds)
    opts = demo.DemoOptions(out=out, **{**TINY, "steps": steps}, budget_min=30)
    result, text, _ = _run(opts)
    first = demo.DEMO_PERCEPTION_FIRST
    assert measured == [(round(first * steps),)]  # both stages measured, before the plan
    # 30 minutes less what follows training and what came before the plan (part of the training step's
    # seconds: building the model), in steps of 0.75 x 100 s + 0.25 x 200 s
    left = 30 * 60 - demo.AFTER_TRAINING_S - sum(result.seconds[k] for k in ("synth", "preprocess"))
    per_step = first * 100 + (1 - first) * 200
    cfg = load_run_config(out / "run")
    assert int(PLAN_MARGIN * (left - result.seconds["train"]) / per_step) <= cfg.max_steps <= int(PLAN_MARGIN * left / per_step)
    assert cfg.max_steps < steps
    assert cfg.perception_steps == round(first * cfg.max_steps) and demo.trained_step(out / "run") == cfg.max_steps
    assert result.budget_stop is None
    assert f"trained the {cfg.max_steps} of the {steps} steps that the time budget affords" in text
    result, text, _ = _run(opts)
    assert "train" in result.reused and f"(step {cfg.max_steps} of {cfg.max_steps})" in text


def test_a_run_slower_than_its_plan_ends_before_the_clock_annealed_and_says_where(demo_runs, tmp_path, monkeypatch):
    """Steps measured faster than they run (here: a deadline already passed): the run ends once its last
    stage's first steps are timed, annealed and saved, not cut by the clock; config.yaml records where
    it ended, the demo says so, and a rerun reuses the run as finished."""
    from vol3d.train import loop, run
    from vol3d.train.run import load_run_config

    steps = 40
    out = _untrained_copy(demo_runs, tmp_path, steps, monkeypatch)
    monkeypatch.setattr(loop, "stage_seconds", lambda *args, **kwargs: [1e-3, 1e-3])  # all 40 steps planned
    monkeypatch.setattr(run, "DEADLINE_RESERVE_S", 1e6)  # ... and the deadline already passed
    opts = demo.DemoOptions(out=out, **{**TINY, "steps": steps}, budget_min=30)
    result, text, _ = _run(opts)
    end = round(demo.DEMO_PERCEPTION_FIRST * steps) + 1 + loop.GUARD_STEPS
    cfg = load_run_config(out / "run")
    assert cfg.max_steps == end and demo.trained_step(out / "run") == end and result.budget_stop is None
    assert cfg.perception_steps == round(demo.DEMO_PERCEPTION_FIRST * steps)  # the stage ended where it did
    assert f"trained the {end} of the {steps} steps that the time budget affords" in text
    result, text, _ = _run(opts)
    assert "train" in result.reused and f"(step {end} of {end})" in text


def test_training_gets_the_budget_left_after_what_follows_it():
    opts = demo.DemoOptions(budget_min=5)
    assert demo.training_seconds(opts, 100.0) == 300 - 100 - demo.AFTER_TRAINING_S
    assert demo.training_seconds(opts, 290.0) == demo.MIN_TRAINING_S  # late: still some training
    assert demo.training_seconds(demo.DemoOptions(budget_min=0), 100.0) is None


def test_other_parameters_in_the_same_folder_are_refused(demo_runs):
    with pytest.raises(InputError, match="--fresh"):
        demo.run_demo(demo.DemoOptions(out=demo_runs["out"], **{**TINY, "cases": 9}))


def test_a_folder_that_is_not_a_demo_is_never_touched(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a vol3d demo folder"):
        demo.run_demo(demo.DemoOptions(out=tmp_path, **TINY))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_fresh_deletes_only_a_demo_folder(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / demo.STATE_NAME).write_text(json.dumps({"cases": 1}))
    (out / "stale").write_text("x")
    opts = demo.DemoOptions(out=out, fresh=True, **TINY)
    demo._prepare_folder(opts, demo.DemoPaths(out))
    assert not (out / "stale").exists()
    assert json.loads((out / demo.STATE_NAME).read_text()) == opts.state()


def test_bad_options_name_the_fix():
    with pytest.raises(InputError, match="--cases"):
        demo.DemoOptions(cases=2)
    with pytest.raises(InputError, match="--steps"):
        demo.DemoOptions(steps=0)


def test_metric_reads_dotted_keys_and_nan_when_absent():
    res = {"ground": {"acc_iou50": 0.5}, "ehr": {"macro_auroc": None}}
    assert demo.metric(res, "ground.acc_iou50") == 0.5
    assert math.isnan(demo.metric(res, "ehr.macro_auroc"))
    assert math.isnan(demo.metric(res, "report.findings.micro_f1"))


def test_headline_table_rows_and_columns():
    table = demo.headline_table({"model": {"ground": {"acc_iou50": 0.75, "acc_iou50_ci": [0.6, 0.85]}}},
                                explain=False)
    lines = table.splitlines()
    assert len(lines) == 2 + len(demo.HEADLINE)
    assert "image-blind" not in table
    row = next(line for line in lines if "grounding Acc@IoU0.5" in line)
    assert "0.750 [0.60, 0.85]" in row and ">= 0.7" in row
    assert "n/a" in next(line for line in lines if "EHR macro AUROC" in line)


def test_demo_table_shows_the_demos_own_targets():
    ev = {"model": {"ground": {"acc_iou50": 0.75}, "measure": {"lesions_ge10mm": {"within10": 0.5}}}}
    table = demo.demo_table(ev, explain=False)
    lines = table.splitlines()
    assert "demo target" in lines[0]
    assert ">= 0.6" in next(line for line in lines if "grounding Acc@IoU0.5" in line)
    assert "blind <= 0.65" in next(line for line in lines if "presence (balanced)" in line)
    # the benchmark's targets that the demo does not have are left out, not shown as the demo's
    assert next(line for line in lines if "within 10%" in line).split("|")[-2].strip() == ""
    assert "<= blind / 2" not in table
    assert set(demo.DEMO_TARGETS) <= {key for key, *_ in demo.HEADLINE}


def test_separation_needs_the_intervals_apart():
    model = {"ground": {"acc_iou50": 0.7, "acc_iou50_ci": [0.6, 0.8]},
             "report": {"findings": {"micro_f1": 0.5, "micro_f1_ci": [0.3, 0.6]}}}
    blind = {"ground": {"acc_iou50": 0.0, "acc_iou50_ci": [0.0, 0.0]},
             "report": {"findings": {"micro_f1": 0.4, "micro_f1_ci": [0.2, 0.5]}}}
    sep = demo.separation({"model": model, "image_blind": blind})
    assert sep["ground.acc_iou50"] is True and sep["report.findings.micro_f1"] is False
    assert sep["ehr.imaging_macro_auroc"] is False  # no interval: not shown to be apart
    # an error must lie below the blind one's
    low = {"measure": {"mae_mm": 3.0, "mae_mm_ci": [2.5, 3.5]}}
    assert demo.separation({"model": low, "image_blind": {"measure": {"mae_mm_ci": [9.0, 11.0]}}})["measure.mae_mm"]
    assert not demo.separation({"model": low, "image_blind": {"measure": {"mae_mm_ci": [3.0, 4.0]}}})["measure.mae_mm"]
    assert "model above image-blind" in demo.headline_table({"model": model, "image_blind": blind}, explain=False)


def test_match_order_pairs_true_boxes_with_their_predictions():
    true = np.array([[0, 0, 0, 4, 4, 4], [10, 10, 10, 14, 14, 14], [20, 20, 20, 22, 22, 22]], float)
    pred = np.array([[10, 10, 10, 14, 14, 15], [0, 0, 0, 4, 4, 5]], float)
    ordered = viz.match_order(pred, true)
    np.testing.assert_array_equal(ordered, true[[1, 0, 2]])
    assert len(viz.match_order(np.zeros((0, 6)), true)) == 3


def test_pick_case_prefers_a_liver_lesion_then_other_findings():
    def case(i, findings):
        return {"id": f"c{i}", "image": np.zeros((1, 8, 8, 8)), "box_findings": findings,
                "boxes_vox": np.tile(np.array([[1, 1, 1, 3, 3, 3]], float), (len(findings), 1)).reshape(-1, 6),
                "report": "x", "codes": []}

    cases = [case(0, []), case(1, ["kidney_cyst"]), case(2, ["liver_lesion", "kidney_cyst"])]
    picked, name = demo.pick_case(cases)
    assert (picked["id"], name) == ("c2", "liver_lesion")
    picked, name = demo.pick_case(cases[:2])
    assert (picked["id"], name) == ("c1", "kidney_cyst")
    picked, name = demo.pick_case(cases[:1])  # no finding anywhere: ask anyway, the answer is a refusal
    assert picked["id"] == "c0" and name == "liver_lesion"
    assert demo.question_for("liver_lesion") == "Where is the liver lesion?"


# The default demo (96 cases, 500 steps): about 5 minutes end to end on 2 idle cores (docs/demo.md), more under load.
@pytest.mark.slow
def test_default_demo_trains_and_evaluates_every_task(tmp_path):
    import csv

    opts = demo.DemoOptions(out=tmp_path / "demo", progress=False)
    result, text, _ = _run(opts)
    ev = result.eval
    assert Path(result.paths.answer_png).is_file()
    assert ev["split"] == "test" and ev["model"]["meta"]["n_cases"] >= 2
    assert {"report", "vqa_closed", "vqa_open", "ground", "ehr"} <= set(ev["model"])
    with open(result.paths.run / "metrics.csv") as fh:
        loss = {int(r["step"]): float(r["value"]) for r in csv.DictReader(fh) if r["name"] == "train/loss"}
    # each stage learned (their losses differ in kind: the second adds the language model's); the run's own
    # config has the stages as trained (a slower machine trains fewer steps than asked, the perception first)
    from vol3d.train.run import load_run_config

    first = load_run_config(result.paths.run).perception_steps
    alone = [v for k, v in sorted(loss.items()) if k <= first]
    every = [v for k, v in sorted(loss.items()) if k > first]
    assert np.mean(alone[-3:]) < 0.5 * alone[0]
    assert len(every) >= 6 and np.mean(every[-3:]) < 0.75 * np.mean(every[:3])
    # (whether it reads the images: see docs/benchmarks/quality.md, model vs image-blind)


def test_the_mr_demo_runs_end_to_end_on_three_channel_brains(tmp_path):
    """`vol3d demo --modality mr` at the tiny size: a head export, the tiny_mr preset's three channels, a model
    that takes them, the evaluation and a question about a brain finding."""
    result, text, _ = _run(demo.DemoOptions(out=tmp_path / "mr", modality="mr", **TINY))
    assert "MR brain studies (T1, T2 and FLAIR each)" in text
    params = json.loads((result.paths.cache / "params.json").read_text())
    assert params["config"]["ingest"]["sequence_channels"] == ["t1*", "t2*", "flair*"]
    assert demo.train_config(demo.DemoOptions(out=tmp_path / "mr", modality="mr", **TINY),
                             result.paths).model.in_chans == 3
    assert result.finding in demo.PREFERRED["mr"]
    assert "Write the findings for this MR." in text
    assert {"report", "vqa_closed", "ground"} <= set(result.eval["model"])
    with pytest.raises(InputError, match="other parameters|--fresh"):  # a CT demo in an MR folder is refused
        demo.run_demo(demo.DemoOptions(out=tmp_path / "mr", **TINY))
    with pytest.raises(InputError, match="--modality"):
        demo.DemoOptions(modality="pet")


def test_the_demo_draws_its_crops_by_finding_type_unless_told_otherwise(tmp_path):
    """The demo's few hundred steps draw perception crops by finding type; the library default (the
    benchmark's long runs) stays per case, and the demo's own overrides win."""
    from vol3d.train.config import DataConfig

    paths = demo.DemoPaths(tmp_path / "d")
    assert DataConfig().finding_patch_balance == "case"
    assert demo.train_config(demo.DemoOptions(out=paths.out), paths).data.finding_patch_balance == "type"
    told = demo.DemoOptions(out=paths.out, train_overrides={"data.finding_patch_balance": "case"})
    assert demo.train_config(told, paths).data.finding_patch_balance == "case"
    with pytest.raises(ConfigError, match="finding_patch_balance"):
        DataConfig(finding_patch_balance="voxel")


def test_the_size_probe_reads_a_demo_folder(demo_runs, monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("probe_sizes", Path(__file__).resolve().parents[2]
                                                  / "scripts" / "probe_sizes.py")
    assert spec is not None and spec.loader is not None
    probe_sizes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe_sizes)
    monkeypatch.setenv("VOL3D_ID_KEY", demo.DEMO_ID_KEY)
    out = demo_runs["out"]
    assert probe_sizes.main([str(out), "--no-progress"]) == 0
    res = json.loads((out / "probe_sizes.json").read_text())
    assert res["n"] == len(res["lesions"]) > 0 and "intensity oracle: within 10%" in capsys.readouterr().out
    for row in res["lesions"]:
        assert row["first"]["truth_mm"] == row["second"]["truth_mm"] >= probe_sizes.MIN_MM
        for look in ("first", "second"):  # each answer sorted by what it measured
            got, kind = row[look], row[look]["kind"]
            assert (got["pred_mm"] is None) == (kind == "missed")
            if got["pred_mm"] is not None:
                assert probe_sizes.within10(got["pred_mm"], got["truth_mm"]) == (kind == "within")
        assert row["oracle_mm"] is None or row["oracle_mm"] > 0
    for look in ("first", "second"):
        share = sum(r[look]["kind"] == "within" for r in res["lesions"]) / res["n"]
        assert res["summary"][look]["within10"] == share


def test_the_demo_turns_the_presets_perception_stem_off_unless_told_otherwise(tmp_path):
    """tiny_cpu (the benchmark's preset) perceives with a full-resolution stem, replicate padding and an
    interpolating up path, and trains the perception alone for half its steps; the demo's five minutes
    train without the stem, with MONAI's padding and up path, and give the perception alone three
    quarters, and the demo's own overrides win."""
    from preprocess.config_io import load_yaml
    from vol3d.presets import preset_path
    from vol3d.train.config import TrainConfig

    preset = load_yaml(TrainConfig, preset_path("tiny_cpu", kind="train"))
    assert preset.model.perception_stem and preset.perception_first == 0.5 and preset.model.ehr_finding_prior
    assert (preset.model.perception_upsample, preset.model.conv_padding) == ("linear", "replicate")
    paths = demo.DemoPaths(tmp_path / "d")
    mine = demo.train_config(demo.DemoOptions(out=paths.out), paths)
    assert not mine.model.perception_stem and mine.perception_first == demo.DEMO_PERCEPTION_FIRST == 0.75
    assert mine.perception_steps == 375  # of the default 500
    assert mine.loss.finding_instance_balance == demo.DEMO_FINDING_INSTANCE_BALANCE == 1.0  # every lesion alike
    assert preset.loss.finding_positive_share is None  # the preset averages every voxel
    assert mine.loss.finding_positive_share == demo.DEMO_FINDING_POSITIVE_SHARE == 0.1  # a tenth to the findings
    assert (mine.model.perception_upsample, mine.model.conv_padding) == ("transposed", "zeros")
    told = demo.DemoOptions(out=paths.out, train_overrides={"model.perception_stem": True, "perception_first": 0.5})
    assert demo.train_config(told, paths).model.perception_stem and demo.train_config(told, paths).perception_first == 0.5
