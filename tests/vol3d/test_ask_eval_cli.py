"""`vol3d ask` and `vol3d eval`: exit codes, JSON output, and end to end with a saved tiny model.

The fast tests save an untrained tiny Vol3DModel as a run (the real load, preprocessing,
generate and box mapping path, only the weights are random); the slow test trains one
with `vol3d train --config configs/train/tiny_cpu.yaml` first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from preprocess import geometry as g
from tests.vol3d.test_inference import CHANS, INPUT, build_export_and_cache, volume_series
from vol3d.cli import main

ROOT = Path(__file__).resolve().parents[2]
CODES = ["K76.89", "R91.1", "I10"]
TINY_LLAMA = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)


def save_tiny_run(run: Path, preprocess: Any, ehr_codes: list[str] | None = None, box_head: bool = False) -> Path:
    """A run directory holding an untrained tiny model (64 x 64 x 32 input) and its preprocessing."""
    from vol3d.models import Vol3DConfig, Vol3DModel, build_tokenizer

    texts = ["Findings: a liver lesion <box>[120,340,88,260,470,140]</box>.", "No lung nodule. Yes. No. 2."]
    torch.manual_seed(0)
    cfg = Vol3DConfig(encoder="vit3d_tiny", encoder_overrides={"img_size": list(INPUT), "patch_size": [16, 16, 8]},
                      in_chans=CHANS, input_shape=INPUT, reducer="pool", reducer_params={"out_grid": [2, 2, 2]},
                      lm_config=TINY_LLAMA, ehr_codes=list(ehr_codes or []), box_head=box_head)
    model = Vol3DModel(cfg, tokenizer=build_tokenizer(texts * 3, vocab_size=300))
    model.save_pretrained(run / "model")
    (run / "model" / "preprocess.json").write_text(json.dumps(preprocess.public_dict()))
    return run


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Any]:
    return build_export_and_cache(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    return save_tiny_run(tmp_path_factory.mktemp("run") / "run", data["cfg"], CODES)


def _series(data, plane: str, fmt: str = "dicom", with_findings: bool = False) -> dict[str, Any]:
    """A volume series of ``plane`` alone in its folder (optionally one with findings)."""
    return next(s for s in volume_series(data) if s["series"]["plane"] == plane and s["case"]["format"] == fmt
                and s["index"] is None and (s["case"]["findings"] or not with_findings))


# ----------------------------------------------------------------------------- vol3d ask


def test_ask_errors_exit_2_with_the_reason(tmp_path, data, run, capsys):
    vol = str(_series(data, "axial", "nifti")["path"])
    assert main(["ask", str(tmp_path / "nope"), vol, "q"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty_run").mkdir()
    assert main(["ask", str(tmp_path / "empty_run"), vol, "q"]) == 2
    assert "has no trained model" in capsys.readouterr().err
    bad = tmp_path / "scan.nii"
    bad.write_bytes(b"not an image at all")
    assert main(["ask", str(run), str(bad), "q"]) == 2
    err = capsys.readouterr().err
    assert "scan.nii" in err and "UNREADABLE" in err and "Traceback" not in err
    assert main(["ask", str(run), vol, "q", "--max-new-tokens", "0"]) == 2
    capsys.readouterr()
    if not torch.cuda.is_available():
        assert main(["ask", str(run), vol, "q", "--device", "cuda"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
    # a study folder with a volume and a second reconstruction: both are listed, no identifiers
    s = next(x for x in volume_series(data) if x["series"]["role"] == "second_recon")
    study = s["path"].parent
    assert main(["ask", str(run), str(study), "q"]) == 2
    err = capsys.readouterr().err
    assert "--series N" in err and "[0]" in err and "[1]" in err
    assert not any(p in err for p in data["truth"]["phi_strings"]) and s["series"]["series_uid"] not in err


def test_ask_json_gives_each_box_in_every_frame(data, run, capsys, monkeypatch):
    """The printed boxes are the truth box of the finding: boxes.json within one 0..999 step."""
    from vol3d.data.cache import CacheDataset
    from vol3d.models import Vol3DModel

    s = _series(data, "axial", with_findings=True)
    truth = next(b for b in json.loads((data["src"] / "boxes.json").read_text()) if b["key"] == s["series"]["key"])
    ds = CacheDataset(data["cache"], mode="volume", input_size=INPUT)
    item = ds[[r["id"] for r in ds.rows].index(s["row"]["id"])]
    k = item["box_findings"].index(truth["finding"])
    said = f"Here: {g.format_box(g.normalise_boxes(item['boxes_vox'][k].numpy(), INPUT)[0])}"
    monkeypatch.setattr(Vol3DModel, "generate", lambda self, volume, prompts, **kw: [said] * len(prompts))

    assert main(["ask", str(run), str(s["path"]), "Where is it?", "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["answer"] == said and out["question"] == "Where is it?" and len(out["boxes"]) == 1
    box = out["boxes"][0]
    spacing = np.asarray(out["input"]["input_spacing_mm"])
    step = np.tile(spacing * max(INPUT) / g.BOX_SCALE, 2) + 2e-3
    if item["boxes_visible"][k] > 0.999:
        assert np.all(np.abs(np.asarray(box["world_mm"]) - truth["box_world_ras_mm"]) <= step)
    orig_affine = np.asarray(out["input"]["orig_affine"])
    assert np.allclose(g.boxes_voxel_to_world(np.asarray(box["orig_vox"])[None], orig_affine)[0], box["world_mm"],
                       atol=1e-2)
    assert out["input"]["orig_shape"] == s["series"]["shape"]

    # the readable form: the answer, then one row per frame
    assert main(["ask", str(run), str(s["path"]), "Where is it?"]) == 0
    text = capsys.readouterr().out
    for row in ("A: Here:", "normalised 0-999", "model voxels", "cached voxels", "original voxels",
                "world mm (RAS+)", "size mm", "input: "):
        assert row in text


def test_ask_end_to_end_on_nifti_dicom_and_cache_entry(data, run, capsys):
    """The real model answers (random weights: any text); every input form works, EHR probabilities too."""
    inputs = [_series(data, "axial", "nifti")["path"], _series(data, "coronal")["path"],
              f"{data['cache']}::{data['rows'][0]['id']}"]
    for vol in inputs:
        assert main(["ask", str(run), str(vol), "Write the findings for this CT.", "--json",
                     "--max-new-tokens", "6", "--ehr"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert isinstance(out["answer"], str) and out["input"]["input_shape"] == list(INPUT)
        assert set(out["ehr"]) == set(CODES) and all(0 <= p <= 1 for p in out["ehr"].values())


def test_ask_locate_always_answers_with_a_box(data, run, tmp_path, capsys):
    """--locate starts the answer with a box: the grounding head fills in exactly one parseable box
    whatever the (untrained) LM says next; a text-mode model is made to start spelling one."""
    cached = f"{data['cache']}::{data['rows'][0]['id']}"
    head_run = save_tiny_run(tmp_path / "head", data["cfg"], box_head=True)
    assert main(["ask", str(head_run), cached, "Where is the liver lesion?", "--json", "--locate",
                 "--max-new-tokens", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["answer"].startswith("<box>[") and len(out["boxes"]) == 1
    box = out["boxes"][0]
    assert out["unparsed_boxes"] == 0 and len(box["world_mm"]) == 6 and min(box["size_mm"]) > 0
    assert out["answer"].startswith("<box>[" + ",".join(str(v) for v in box["normalised"]) + "]</box>")
    assert main(["ask", str(run), cached, "Where is the liver lesion?", "--json", "--locate",
                 "--max-new-tokens", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["answer"].startswith("<box>[")


def test_python_api_loads_the_run(data, run):
    import vol3d

    pipe = vol3d.load(run, device="cpu")
    assert pipe.input_shape == INPUT and pipe.code_vocab.codes == CODES
    assert pipe.preprocess.params_hash() == data["cfg"].params_hash()
    ans = pipe.ask(_series(data, "oblique")["path"], "Where is the liver lesion?", max_new_tokens=4)
    assert ans.volume.shape == (CHANS, *INPUT) and "OBLIQUE" in ans.input.flags
    probs = pipe.ehr(ans.input)
    assert list(probs) == CODES


# ----------------------------------------------------------------------------- vol3d eval


def test_eval_writes_json_and_prints_the_table(data, run, capsys):
    args = ["eval", str(run), "--cache", str(data["cache"]), "--split", "all", "--limit", "2",
            "--tasks", "report", "ground", "vqa_closed", "ehr", "--max-new-tokens", "4", "--samples-per-case", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    res = json.loads((run / "eval.json").read_text())
    assert set(res) >= {"report", "ground", "vqa_closed", "ehr", "meta"}
    assert res["meta"]["n_cases"] == 2 and res["meta"]["image_blind"] is False
    assert res["meta"]["preprocess_matches_run"] is True and res["meta"]["split"] is None
    assert 0 <= res["ground"]["unparseable_rate"] <= 1 and "acc_iou50" in res["ground"]
    assert "bleu4" in res["report"] and "rougeL" in res["report"] and "micro_f1" in res["report"]["findings"]
    for row in ("ground.acc_iou25", "ground.acc_iou50", "report.bleu4", "ehr.macro_auroc", "meta.n_cases"):
        assert row in printed
    assert main(["eval", str(run), "--cache", str(data["cache"]), "--split", "all", "--limit", "1", "--tasks", "ground",
                 "--max-new-tokens", "4", "--samples-per-case", "1", "--blind", "--predictions"]) == 0
    blind = json.loads((run / "eval_blind.json").read_text())
    assert blind["meta"]["image_blind"] is True and blind["predictions"]
    assert json.loads((run / "eval.json").read_text())["meta"]["image_blind"] is False  # not overwritten


def test_eval_errors_exit_2(tmp_path, data, run, capsys):
    assert main(["eval", str(run), "--cache", str(tmp_path)]) == 2
    assert "no manifest.jsonl" in capsys.readouterr().err
    assert main(["eval", str(run), "--cache", str(data["cache"]), "--split", "val"]) == 2
    err = capsys.readouterr().err
    assert "no ok case in split 'val'" in err and "test:" in err and "train:" in err
    plain = save_tiny_run(tmp_path / "plain", data["cfg"])
    assert main(["eval", str(plain), "--cache", str(data["cache"]), "--tasks", "ehr"]) == 2
    assert "EHR head" in capsys.readouterr().err


# ----------------------------------------------------------------------------- with a trained run


@pytest.mark.slow
def test_ask_and_eval_on_a_trained_tiny_run(data, tmp_path, capsys):
    """`vol3d train` (tiny_cpu preset, 3 steps) -> `vol3d ask` on a NIfTI file and a DICOM folder -> `vol3d eval`.

    The run records no preprocess.json of its own: the config is found through config.yaml's cache_dir.
    """
    run = tmp_path / "trained"
    assert main(["train", "--config", str(ROOT / "configs/train/tiny_cpu.yaml"), "--run-dir", str(run),
                 "--data.cache-dir", str(data["cache"]), "--data.val-split", "", "--data.num-workers", "0",
                 "--max-steps", "3", "--no-progress", "--ckpt-every", "3", "--data.batch-size", "2",
                 "--data.vocab", str(data["src"] / "vocab.json")]) == 0
    capsys.readouterr()
    for vol in (_series(data, "axial", "nifti")["path"], _series(data, "axial")["path"]):
        assert main(["ask", str(run), str(vol), "Where is the liver lesion?", "--json", "--max-new-tokens", "8"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["input"]["input_shape"] == list(INPUT)
    assert main(["eval", str(run), "--cache", str(data["cache"]), "--split", "all", "--limit", "1",
                 "--max-new-tokens", "8", "--samples-per-case", "1"]) == 0
    assert json.loads((run / "eval.json").read_text())["meta"]["n_cases"] == 1
