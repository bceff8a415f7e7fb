"""The CLI on an export whose findings, organ labels and codes have names the synthetic world does not know.

A `vol3d synth` export is rewritten into another hospital's vocabulary: other finding keys and
phrases (``hepatic_mass`` "hepatic mass" ...), other label names (``hepar``, ``lien``, ``tumour`` ...),
other diagnosis codes. `vol3d preprocess --vocab`, `vol3d train` (the CPU preset, a few steps),
`vol3d eval` and `vol3d ask` must then speak that vocabulary: the model's findings, labels and codes
come from the export, the questions and the findings digest use its names, and the synthetic names
appear nowhere in what the model was asked or read.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from vol3d.cli import main

ROOT = Path(__file__).resolve().parents[1]
FINDINGS = {  # synthetic key -> (foreign key, its vocabulary entry)
    "liver_lesion": ("hepatic_mass", {"text": "hepatic mass", "organ": "hepar", "nouns": ["lesion", "mass"],
                                      "organ_words": ["liver", "hepatic"], "code": "XH1.0"}),
    "lung_nodule": ("pulmonary_opacity", {"text": "pulmonary opacity", "organ": "pulmo",
                                          "nouns": ["nodule", "opacity"], "organ_words": ["lung", "pulmonary", "lobe"],
                                          "code": "XP2.0"}),
    "kidney_cyst": ("renal_cyst", {"text": "renal cyst", "organ": "ren", "nouns": ["cyst"],
                                   "organ_words": ["kidney", "renal"], "code": "XR3.0"}),
    "splenomegaly": ("enlarged_lien", {"text": "enlarged lien", "organ": "lien", "nouns": ["enlarged", "enlargement"],
                                       "organ_words": ["spleen", "splenic"], "phrases": ["splenomegaly"],
                                       "countable": False, "code": "XS4.0"}),
}
LABELS = {"background": "background", "liver": "hepar", "spleen": "lien", "kidney_left": "ren_sinister",
          "kidney_right": "ren_dexter", "lung_left": "pulmo_sinister", "lung_right": "pulmo_dexter",
          "spine": "columna", "aorta": "arteria_magna", "lesion": "tumour"}
SYNTHETIC_WORDS = ("liver lesion", "lung nodule", "kidney cyst", "liver_lesion", "kidney_left", "K76.89", "R91.1")


def foreign_export(src: Path) -> dict[str, str]:
    """Rewrite a `vol3d synth` export in place into the foreign vocabulary; returns old -> new codes."""
    old = json.loads((src / "vocab.json").read_text())
    codes = {spec["code"]: FINDINGS[name][1]["code"] for name, spec in old["findings"].items()}
    codes.update({c: f"Z{i:02d}.9" for i, c in enumerate(sorted(set(old["codes"]) - set(codes)))})
    vocab = {"findings": {new: spec for new, spec in FINDINGS.values()},
             "labels": [LABELS[n] for n in old["labels"]], "finding_labels": [LABELS[n] for n in old["finding_labels"]],
             "codes": {codes[c]: f"local diagnosis {codes[c]}" for c in old["codes"]}}
    (src / "vocab.json").write_text(json.dumps(vocab))
    boxes = json.loads((src / "boxes.json").read_text())
    for b in boxes:
        b["finding"] = FINDINGS[b["finding"]][0]
        b["organ"] = LABELS.get(b["organ"], b["organ"])
    (src / "boxes.json").write_text(json.dumps(boxes))
    with open(src / "ehr_codes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(src / "ehr_codes.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["PatientID", "Code", "Description"])
        w.writeheader()
        for r in rows:
            w.writerow({"PatientID": r["PatientID"], "Code": codes[r["Code"]], "Description": "local diagnosis"})
    (src / "truth.json").unlink(missing_ok=True)  # the synthetic ground truth speaks the synthetic vocabulary
    return codes


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    from vol3d.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("foreign")
    src, cache, run = root / "src", root / "cache", root / "run"
    generate(src, SynthConfig(cases=6, seed=0, size="small", workers=1))
    foreign_export(src)
    with pytest.MonkeyPatch.context() as env:  # the id key for this run only
        env.setenv("VOL3D_ID_KEY", "0123456789abcdef" * 4)
        assert main(["preprocess", str(src), "--out", str(cache), "--config", "tiny", "--reports",
                     str(src / "reports.csv"), "--codes", str(src / "ehr_codes.csv"), "--labels", str(src / "labels"),
                     "--boxes", str(src / "boxes.json"), "--vocab", str(src / "vocab.json"), "--no-progress",
                     "--ingest.exclude", "labels/*", "lesions/*", "--split-fractions", "0.5", "0.0", "0.5"]) in (0, 3)
    assert main(["train", "--config", "tiny_cpu", "--run-dir", str(run), "--data.cache-dir", str(cache),
                 "--max-steps", "2", "--data.val-split", "", "--data.num-workers", "0", "--no-progress",
                 "--no-tensorboard", "--val-every", "0"]) == 0
    return {"src": src, "cache": cache, "run": run, "root": root}


def test_the_model_takes_findings_labels_and_codes_from_the_export(world):
    from vol3d.models import Vol3DModel

    cached = json.loads((world["cache"] / "vocab.json").read_text())
    assert sorted(cached["findings"]) == sorted(new for new, _ in FINDINGS.values())
    model = Vol3DModel.from_pretrained(world["run"] / "model")
    assert sorted(model.vocab) == sorted(cached["findings"])
    assert tuple(model.labels.names) == tuple(cached["labels"]) and model.labels.finding_labels == ("tumour",)
    assert model.config.ehr_codes and set(model.config.ehr_codes) <= set(cached["codes"])


def test_eval_and_ask_speak_the_exports_vocabulary(world, capsys):
    out = world["root"] / "eval.json"
    assert main(["eval", str(world["run"]), "--cache", str(world["cache"]), "--split", "all", "--limit", "3",
                 "--samples-per-case", "4", "--max-new-tokens", "4", "--predictions", "--device", "cpu",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    preds = res["predictions"] if "predictions" in res else res["model"]["predictions"]
    questions = " ".join(p["prompt"] for p in preds if p["task"] != "report")
    assert any(f[1]["text"] in questions for f in FINDINGS.values())
    assert not [w for w in SYNTHETIC_WORDS if w in questions]
    assert set(res.get("ehr", res.get("model", {}).get("ehr", {})).get("per_code", {})) <= set(
        json.loads((world["cache"] / "vocab.json").read_text())["codes"])
    capsys.readouterr()

    case = json.loads((world["cache"] / "manifest.jsonl").read_text().splitlines()[0])["id"]
    assert main(["ask", str(world["run"]), f"{world['cache']}::{case}", "Where is the hepatic mass?", "--json",
                 "--max-new-tokens", "4", "--device", "cpu"]) == 0
    answer = json.loads(capsys.readouterr().out)
    digest = answer["findings"]
    assert "hepatic mass" in digest and "pulmonary opacity" in digest and "Enlarged lien" in digest
    # the organs a two-step model finds vary (the liver among them or not); they are named as the export names them
    organs = json.loads((world["cache"] / "vocab.json").read_text())["labels"][1:]
    assert any(name.replace("_", " ") in digest.split("Organs:")[1] for name in organs)
    assert not [w for w in SYNTHETIC_WORDS if w in digest]
