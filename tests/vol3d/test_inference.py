"""``vol3d.inference``: answers' boxes land on the right patient anatomy, in every frame.

An oracle model answers with a box whose truth is known (the cache's finding box, or an
organ box from the label map), and the box the pipeline reports must match the truth of
``vol3d synth`` in world mm (boxes.json) and in the original image's voxel indices, for
axial head-first, axial feet-first, coronal and oblique DICOM series and NIfTI files.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from preprocess import geometry as g
from preprocess.config import PreprocessConfig
from preprocess.config_io import dump_yaml, load_yaml
from preprocess.errors import InputError
from preprocess.types import Image
from vol3d.inference import (
    Answer,
    ModelInput,
    Vol3DPipeline,
    boxes_from_text,
    find_preprocess_config,
    read_image,
    read_preprocess_config,
)

ROOT = Path(__file__).resolve().parents[2]
TINY_PRE = ROOT / "configs" / "preprocess" / "tiny.yaml"
INPUT = (64, 64, 32)  # tiny.yaml's fixed_size: the model input equals the cached grid
CHANS = len(load_yaml(PreprocessConfig, TINY_PRE).ct_windows)  # one channel per CT window of tiny.yaml


# ----------------------------------------------------------------------------- shared data (also used by the CLI tests)


def tiny_preprocess_config() -> PreprocessConfig:
    cfg = load_yaml(PreprocessConfig, TINY_PRE)
    # lesion maps are side data inside the export, not images
    return dataclasses.replace(cfg, ingest=dataclasses.replace(cfg.ingest, exclude=("lesions/*",)))


def build_export_and_cache(root: Path, cases: int = 6) -> dict[str, Any]:
    """``vol3d synth`` (small, seed 0) and its cache with the tiny preset and every side table."""
    from preprocess.runner import RunOptions, run_preprocess
    from preprocess.sidecars import SideTables
    from vol3d.synth import SynthConfig, generate

    src, cache = root / "src", root / "cache"
    truth = generate(src, SynthConfig(cases=cases, seed=0, size="small", workers=1))
    side = SideTables.load(src / "reports.csv", src / "ehr_codes.csv", src / "boxes.json", src / "labels")
    cfg = tiny_preprocess_config()
    run_preprocess(src, cache, cfg, side, RunOptions(workers=1, progress=False, split_fractions=(0.5, 0.0, 0.5)))
    rows = [json.loads(line) for line in (cache / "manifest.jsonl").read_text().splitlines()]
    from preprocess.sanitise import crosswalk_path, read_crosswalk

    links = read_crosswalk(crosswalk_path(cache))  # the manifest names no file; the crosswalk beside it does
    for r in rows:
        r["input_paths"] = links[r["id"]]["source"]
    return {"src": src, "cache": cache, "truth": truth, "cfg": cfg, "rows": [r for r in rows if r["status"] == "ok"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Any]:
    return build_export_and_cache(tmp_path_factory.mktemp("inference"))


class Oracle:
    """A stand-in model whose ``generate`` says ``answer`` (and records what it saw)."""

    def __init__(self, input_shape=INPUT, in_chans: int = CHANS) -> None:
        self.config = SimpleNamespace(input_shape=tuple(input_shape), in_chans=in_chans, ehr_codes=[])
        self.answer = ""
        self.seen: list[tuple[Any, list[str]]] = []

    def generate(self, volume, prompts, max_new_tokens=64, **kwargs):
        self.seen.append((volume, list(prompts)))
        return [self.answer] * len(prompts)


@pytest.fixture()
def oracle_pipe(data) -> tuple[Vol3DPipeline, Oracle]:
    oracle = Oracle()
    return Vol3DPipeline(oracle, data["cfg"]), oracle


def volume_series(data) -> list[dict[str, Any]]:
    """Every ok volume series of the export: truth entry, its cached row, and how to address it (memoised)."""
    from preprocess import ingest

    if "series" in data:
        return data["series"]
    out = []
    by_source = {frozenset(r["input_paths"]): r for r in data["rows"]}
    for case in data["truth"]["cases"]:
        for s in case["series"]:
            if s["role"] == "localizer":
                continue
            path = data["src"] / Path(s["files"][0]).parent if case["format"] == "dicom" else data["src"] / s["files"][0]
            cands = [c for c in ingest.scan(path, data["cfg"].ingest) if c.kind != "file"]
            base = path.relative_to(data["src"])

            def files(c, base=base, path=path, s=s):
                return {(base / f).as_posix() for f in c.source} if path.is_dir() else set(s["files"])

            idx = [i for i, c in enumerate(cands) if files(c) == set(s["files"])]
            assert len(idx) == 1, s["key"]
            n_ok = sum(c.status == "ok" for c in cands)
            out.append({"case": case, "series": s, "path": path, "index": idx[0] if n_ok > 1 else None,
                        "row": by_source[frozenset(s["files"])]})
    data["series"] = out
    return out


def aligned(data, rel: str, image: Image) -> np.ndarray:
    """A label/lesion map of the export on the image's original grid (as ingest loads it)."""
    from preprocess.transforms import align_label

    nii = nib.load(data["src"] / rel)
    return align_label(np.asarray(nii.dataobj), nii.affine, image)


def to_orig_tolerance(inp: ModelInput, cached_voxels: float) -> np.ndarray:
    """``cached_voxels`` cached voxels expressed in original voxels along each original axis ``(6,)``."""
    scale = np.abs(inp.cached_to_orig[:3, :3]).sum(axis=1)  # original voxels per cached voxel
    return np.tile(scale * cached_voxels, 2) + 1e-6


QUANT = max(INPUT) / g.BOX_SCALE  # one step of the 0..999 text boxes, in model voxels (upper bound)


# ----------------------------------------------------------------------------- preprocessing = training's


def test_the_synthetic_export_covers_every_orientation(data):
    kinds = {(s["series"]["plane"], s["series"]["patient_position"], s["case"]["format"]) for s in volume_series(data)}
    assert {("axial", "HFS", "dicom"), ("axial", "FFS", "dicom"), ("coronal", "HFS", "dicom"),
            ("oblique", "HFS", "dicom"), ("axial", "HFS", "nifti")} <= kinds


def test_prepare_reproduces_the_training_cache_exactly(data, oracle_pipe):
    """A file read at inference gives the same model input and geometry as its cache entry."""
    from vol3d.data.cache import CacheDataset

    pipe, _ = oracle_pipe
    ds = CacheDataset(data["cache"], mode="volume", input_size=INPUT)
    index = {r["id"]: i for i, r in enumerate(ds.rows)}
    for s in volume_series(data):
        fresh = pipe.prepare(s["path"], series=s["index"])
        item = ds[index[s["row"]["id"]]]
        assert np.array_equal(fresh.volume, item["image"].numpy()), s["series"]["key"]
        assert np.allclose(fresh.affine, item["affine"].numpy(), atol=1e-9)
        assert np.array_equal(fresh.origin, item["origin"].numpy())
        cached = pipe.prepare(f"{data['cache']}::{s['row']['id']}")
        for name in ("affine", "cache_affine", "cached_to_orig", "orig_affine"):
            assert np.allclose(getattr(fresh, name), getattr(cached, name), atol=1e-9), name
        assert fresh.orig_shape == cached.orig_shape == tuple(s["series"]["shape"])


# ----------------------------------------------------------------------------- geometry of answers


def test_finding_boxes_map_back_to_world_mm_and_original_voxels(data, oracle_pipe):
    """Oracle = the cache's box of each finding; the answer's world box is boxes.json's to one text step,
    its original-voxel box the lesion mask's (axis-aligned grids), or encloses it (oblique)."""
    from vol3d.data.cache import CacheDataset

    pipe, oracle = oracle_pipe
    ds = CacheDataset(data["cache"], mode="volume", input_size=INPUT)
    index = {r["id"]: i for i, r in enumerate(ds.rows)}
    truth_boxes = json.loads((data["src"] / "boxes.json").read_text())
    checked: set[str] = set()
    for s in volume_series(data):
        item = ds[index[s["row"]["id"]]]
        findings = [b for b in truth_boxes if b["key"] == s["series"]["key"]]
        assert len(findings) == len(item["boxes_vox"])
        if not findings:
            continue
        image = read_image(s["path"], data["cfg"], s["index"])
        lesions = aligned(data, s["series"]["lesions"], image)
        oblique = s["series"]["plane"] == "oblique"
        for k, truth in enumerate(findings):
            if item["boxes_visible"][k] < 0.999:
                continue
            oracle.answer = f"There is one: {g.format_box(g.normalise_boxes(item['boxes_vox'][k].numpy(), INPUT)[0])}."
            ans = pipe.ask(s["path"], f"<vol>\nWhere is the {truth['finding']}?", series=s["index"])
            assert len(ans.boxes) == 1 and ans.unparsed_boxes == 0
            box = ans.boxes[0]
            mask_box = g.mask_to_box(lesions == truth["instance"])
            quant = to_orig_tolerance(ans.input, QUANT)
            if not oblique:
                step = np.tile(ans.input.spacing * QUANT, 2) + 1e-3
                assert np.all(np.abs(box.world_mm - truth["box_world_ras_mm"]) <= step), (s["series"]["plane"], box)
                assert np.all(np.abs(box.orig_vox - mask_box) <= quant)
                assert np.allclose(box.size_mm, truth["size_mm"], atol=step.max())
            else:  # the cache keeps the box enclosing the rotated world box: it must enclose the lesion
                assert np.all(box.orig_vox[:3] <= mask_box[:3] + quant[:3])
                assert np.all(box.orig_vox[3:] >= mask_box[3:] - quant[3:])
            # world mm and original voxels describe the same place
            assert np.allclose(g.boxes_voxel_to_world(box.orig_vox[None], ans.input.orig_affine)[0] if not oblique
                               else box.world_mm, box.world_mm, atol=1e-6)
            checked.add(f"{s['series']['plane']}-{s['series']['patient_position']}")
    assert {"axial-HFS", "axial-FFS", "coronal-HFS", "oblique-HFS"} <= checked


def test_organ_boxes_round_trip_on_every_grid(data, oracle_pipe):
    """Oracle = an organ's box in the model input, found by preparing its mask like the image;
    the answer's original-voxel box must match the mask's box in the original grid (one cached voxel)."""
    from preprocess.store import read_window
    from preprocess.transforms import centred_window, prepare

    pipe, oracle = oracle_pipe
    done = []
    for s in volume_series(data):
        image = read_image(s["path"], data["cfg"], s["index"])
        labels = aligned(data, s["series"]["labels"], image)
        for value in (3, 4, 2, 1):  # kidneys, spleen, liver: the first wholly inside the input
            organ = (labels == value).astype(np.uint8)
            if not organ.any():
                continue
            p = prepare(image, data["cfg"], label=organ)
            window = read_window(p.label, centred_window(np.zeros(3), p.shape, INPUT), INPUT)
            vbox = g.mask_to_box(window)
            if vbox is None or (vbox[:3] < 0).any() or (vbox[3:] > np.array(INPUT) - 1).any():  # touches an edge
                continue
            oracle.answer = g.format_box(g.normalise_boxes(vbox, INPUT)[0])
            box = pipe.ask(s["path"], "Where is the organ?", series=s["index"]).boxes[0]
            inp = pipe.prepare(s["path"], series=s["index"])
            tol = to_orig_tolerance(inp, 1.0 + QUANT)
            assert np.all(np.abs(box.orig_vox - g.mask_to_box(organ)) <= tol), (s["series"]["plane"], value)
            truth_world = g.boxes_voxel_to_world(g.mask_to_box(organ)[None], image.affine)[0]
            if s["series"]["plane"] != "oblique":
                assert np.all(np.abs(box.world_mm - truth_world) <= np.tile(inp.spacing, 2) * (1 + QUANT) + 1e-3)
            done.append((s["series"]["plane"], s["series"]["patient_position"], s["case"]["format"]))
            break
    assert {("axial", "FFS", "dicom"), ("coronal", "HFS", "dicom"), ("oblique", "HFS", "dicom"),
            ("axial", "HFS", "nifti")} <= set(done)


def test_every_input_form_gives_the_same_answer(data, oracle_pipe):
    pipe, oracle = oracle_pipe
    s = next(x for x in volume_series(data) if x["series"]["plane"] == "coronal")
    oracle.answer = "<box>[100,200,300,400,500,600]</box>"
    image = read_image(s["path"], data["cfg"], s["index"])
    forms = [s["path"], str(s["path"]), image, f"{data['cache']}::{s['row']['id']}", (data["cache"], s["row"]["id"])]
    answers = [pipe.ask(v, "Where?", series=s["index"]) for v in forms]
    for a in answers[1:]:
        assert np.allclose(a.boxes[0].world_mm, answers[0].boxes[0].world_mm, atol=1e-6)
        assert np.allclose(a.boxes[0].orig_vox, answers[0].boxes[0].orig_vox, atol=1e-6)
    # the model saw the prepared volume (1, C, X, Y, Z) and the question as asked
    vol, prompts = oracle.seen[-1]
    assert tuple(vol.shape) == (1, CHANS, *INPUT) and prompts == ["Where?"]
    # a prepared input can be reused for several questions without re-reading
    inp = pipe.prepare(s["path"], series=s["index"])
    assert pipe.prepare(inp) is inp and np.array_equal(pipe.ask(inp, "again").volume, inp.volume)


def test_boxes_from_text_frames_are_consistent():
    """Synthetic geometry: flips, permutation, crop offset; each frame follows from the previous one."""
    from preprocess.transforms import translation

    c2o = np.array([[0, 0, -2.0, 90], [0.5, 0, 0, 3], [0, 1.0, 0, -4], [0, 0, 0, 1]])
    orig_affine = np.diag([-0.8, 0.8, 2.5, 1.0])
    origin = np.array([-3, 5, 2])
    from preprocess.types import Frames

    inp = ModelInput(volume=np.zeros((1, 20, 10, 8), np.float32), origin=origin, cache_frames=Frames(orig_affine @ c2o, c2o, orig_affine, (40, 30, 100)),
                     cache_shape=(17, 15, 10), modality="CT", flags=[], source="test")
    np.testing.assert_allclose(inp.affine, orig_affine @ c2o @ translation(origin))  # the cache's frames, shifted
    boxes, bad = boxes_from_text("a <box>[0,0,0,999,999,999]</box> b <box>[5,5]</box> <box>[9,9,9,1,1,1]</box>", inp)
    assert bad == 2 and len(boxes) == 1
    b = boxes[0]
    assert np.allclose(b.model_vox, [-0.5, -0.5, -0.5, 19.5, 9.5, 7.5])
    assert np.allclose(b.cached_vox, b.model_vox + np.tile(origin, 2))
    # cached x -> orig y (x0.5), cached y -> orig z, cached z -> orig x flipped (x-2)
    assert np.allclose(b.orig_vox, [90 - 2 * 9.5, 3 + 0.5 * -3.5, -4 + 4.5, 90 - 2 * 1.5, 3 + 0.5 * 16.5, -4 + 14.5])
    assert np.allclose(b.world_mm, g.boxes_voxel_to_world(b.orig_vox[None], orig_affine)[0])
    assert np.allclose(b.size_mm, [0.8 * 16, 0.8 * 10, 2.5 * 10])


def test_answer_is_json_safe_and_readable(data, oracle_pipe):
    pipe, oracle = oracle_pipe
    s = volume_series(data)[0]
    oracle.answer = "Lesion <box>[10,20,30,40,50,60]</box> and <box>[1,2]</box>"
    ans = pipe.ask(s["path"], "Where is the lesion?", series=s["index"])
    assert isinstance(ans, Answer) and ans.volume.shape == (CHANS, *INPUT) and ans.affine.shape == (4, 4)
    d = json.loads(json.dumps(ans.to_dict(), allow_nan=False))
    assert d["answer"] == oracle.answer and d["unparsed_boxes"] == 1
    assert set(d["boxes"][0]) == {"normalised", "model_vox", "cached_vox", "world_mm", "orig_vox", "size_mm", "centre_mm"}
    assert d["boxes"][0]["normalised"] == [10, 20, 30, 40, 50, 60]
    assert d["input"]["input_shape"] == list(INPUT) and d["input"]["orig_shape"] == s["series"]["shape"]
    text = str(ans)
    assert "Q: Where is the lesion?" in text and "world mm (RAS+)" in text and "original voxels" in text
    assert "1 malformed <box>" in text


# ----------------------------------------------------------------------------- inputs and errors


def test_a_folder_with_several_series_lists_them_without_identifiers(data, oracle_pipe):
    pipe, oracle = oracle_pipe
    s = next(x for x in volume_series(data) if x["series"]["role"] == "second_recon")
    study = data["src"] / Path(s["series"]["files"][0]).parts[0] / Path(s["series"]["files"][0]).parts[1]
    with pytest.raises(InputError) as err:
        pipe.prepare(study)
    msg = str(err.value)
    assert "usable series" in msg and "--series N" in msg and "[0]" in msg and "[1]" in msg
    for phi in data["truth"]["phi_strings"]:
        assert phi not in msg
    assert s["series"]["series_uid"] not in msg
    oracle.answer = "ok"
    assert pipe.ask(study, "q", series=0).input.orig_shape  # choosing one works


def test_unreadable_volume_names_the_file_and_the_reason(tmp_path, data, oracle_pipe):
    pipe, _ = oracle_pipe
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(InputError, match=r"broken.nii.gz.*(UNREADABLE|cannot)"):
        pipe.prepare(bad)
    with pytest.raises(InputError, match="does not exist"):
        pipe.prepare(tmp_path / "missing.nii")
    with pytest.raises(InputError, match="no ok case 'c_nope'"):
        pipe.prepare(f"{data['cache']}::c_nope")
    with pytest.raises(InputError, match="manifest.jsonl not found"):
        pipe.prepare(f"{tmp_path}::c_nope")
    with pytest.raises(InputError, match="cannot read a volume"):
        pipe.prepare(42)


def test_channel_mismatch_is_a_clear_error(data):
    pipe = Vol3DPipeline(Oracle(in_chans=CHANS + 1), data["cfg"])
    s = volume_series(data)[0]
    with pytest.raises(InputError, match=f"{CHANS} channel"):
        pipe.prepare(s["path"], series=s["index"])


def test_preprocess_config_is_found_in_the_run(tmp_path, data):
    params = read_preprocess_config(data["cache"] / "params.json")
    assert params.params_hash() == data["cfg"].params_hash()
    assert read_preprocess_config(data["cache"]).params_hash() == params.params_hash()
    assert read_preprocess_config(TINY_PRE).target_spacing == (5.5, 4.5, 6.0)
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    with pytest.raises(InputError, match="--preprocess-config"):
        find_preprocess_config(run)
    # through RUN/config.yaml's data.cache_dir (absolute, or relative to the run's parent)
    (run / "config.yaml").write_text(f"data:\n  cache_dir: {data['cache']}\n")
    assert find_preprocess_config(run).params_hash() == params.params_hash()
    # a recorded model/preprocess.json wins
    other = dataclasses.replace(params, crop_margin_mm=7.0)
    (run / "model" / "preprocess.json").write_text(json.dumps(other.public_dict()))
    assert find_preprocess_config(run).crop_margin_mm == 7.0
    dump_yaml(other, tmp_path / "p.yaml")
    assert read_preprocess_config(tmp_path / "p.yaml").params_hash() == other.params_hash()


def test_ehr_needs_an_ehr_head(data, oracle_pipe):
    from preprocess.errors import ConfigError

    pipe, _ = oracle_pipe
    with pytest.raises(ConfigError, match="no EHR head"):
        pipe.ehr(volume_series(data)[0]["path"])


def test_an_out_of_domain_volume_gets_warnings_and_no_box(data, oracle_pipe):
    from vol3d.domain import DomainProfile

    pipe, oracle = oracle_pipe
    s = next(x for x in volume_series(data) if x["series"]["plane"] == "axial")
    inp = pipe.prepare(s["path"], series=s["index"])
    means = inp.volume.reshape(inp.volume.shape[0], -1).mean(axis=1).tolist()
    oracle.answer = "<box>[100,200,300,400,500,600]</box>"
    try:
        oracle.domain = DomainProfile(["CT"], 10, means, [0.01] * len(means)).to_dict()
        assert pipe.ask(inp, "Where?").warnings == [] and len(pipe.ask(inp, "Where?").boxes) == 1
        oracle.domain = DomainProfile(["MR"], 10, means, [0.01] * len(means)).to_dict()  # trained on MR only
        refused = pipe.ask(inp, "Where is the liver lesion?")
        assert refused.boxes == [] and "modality CT, but the run was trained on MR" in refused.warnings[0]
        assert "no box is given" in refused.text and "WARNING: modality CT" in str(refused)
        kept = pipe.ask(inp, "Where is the liver lesion?", out_of_domain="answer")
        assert len(kept.boxes) == 1 and kept.warnings == refused.warnings
        assert kept.to_dict()["warnings"] == kept.warnings
    finally:
        oracle.domain = None


# ----------------------------------------------------------------------------- measurements and chains


class PerceivingOracle(Oracle):
    """An oracle with perception: it perceives the ground truth of the cached case it is told about."""

    def __init__(self, data) -> None:
        from preprocess.sidecars import VOCAB_NAME, load_vocabulary
        from vol3d.tasks.findings import as_vocab
        from vol3d.tasks.regions import LabelSpec

        super().__init__()
        meta = load_vocabulary(data["src"] / VOCAB_NAME)  # the export's: findings, label names, criteria
        self.vocab = as_vocab(meta["findings"])
        self.labels = LabelSpec(tuple(meta["labels"]), tuple(meta["finding_labels"]))
        self.perception, self.item = object(), None

    def perceive(self, volume, spacing=None):
        from vol3d.tasks.regions import perceived_from_case

        return [perceived_from_case(self.item, self.vocab, self.labels)[0]]

    def generate(self, volume, prompts, max_new_tokens=64, return_perceived=False, spacing=None, **kwargs):
        texts = super().generate(volume, prompts, max_new_tokens)
        return (texts, self.perceive(volume) * len(prompts)) if return_perceived else texts


def test_measurements_and_chain_steps_are_in_the_patients_millimetres(data):
    """Asked about an original DICOM/NIfTI series, a measurement comes from the perceived regions and
    agrees with the export's truth in world mm (boxes.json); the chain's boxes map to every frame."""
    from vol3d.data.cache import CacheDataset

    oracle = PerceivingOracle(data)
    pipe = Vol3DPipeline(oracle, data["cfg"])
    ds = CacheDataset(data["cache"], mode="volume", input_size=INPUT)
    index = {r["id"]: i for i, r in enumerate(ds.rows)}
    truth_boxes = json.loads((data["src"] / "boxes.json").read_text())
    kinds_seen: set[str] = set()
    for s in volume_series(data):
        oracle.item = item = ds[index[s["row"]["id"]]]
        truths = [b for b in truth_boxes if b["key"] == s["series"]["key"]]
        step = np.tile(np.asarray(item["spacing"], float), 2) + 1e-3  # one cached voxel
        whole = [b for k, b in enumerate(truths) if b["finding"] != "splenomegaly" and item["boxes_visible"][k] > 0.999]
        if whole and s["series"]["plane"] != "oblique":  # (an oblique series' cached box encloses the rotated one)
            name = whole[0]["finding"]
            big = max((b for b in whole if b["finding"] == name), key=lambda b: np.prod(b["size_mm"]))
            text = oracle.vocab[name].text
            ans = pipe.ask(s["path"], f"What is the diameter of the largest {text}?", series=s["index"])
            assert not any("diameter" in q for _, qs in oracle.seen for q in qs)  # not asked of the LM
            assert ans.text.startswith(f"The largest {text} measures {round(max(big['size_mm'][:2]))} mm")
            found = [st for st in ans.steps if st.kind == "finding"]
            assert np.all(np.abs(found[0].box.world_mm - big["box_world_ras_mm"]) <= step)
            assert [st.kind for st in ans.steps][-2:] == ["measure", "conclusion"]
            kinds_seen.add("finding")
        spleen = [b for b in truths if b["finding"] == "splenomegaly"]
        if spleen:
            ans = pipe.ask(s["path"], "Is there splenomegaly?", series=s["index"])
            measured = next(st for st in ans.steps if st.kind == "measure")
            if "at least" in measured.text:  # the spleen runs past the tiny preset's 32 slices: a lower bound
                assert measured.box.normalised[5] == 999 or measured.box.normalised[2] == 0
                assert measured.value <= spleen[0]["size_mm"][2] + step[2]
            else:
                assert abs(measured.value - spleen[0]["size_mm"][2]) <= step[2]  # the label map's extent
            assert "> 120 mm -> splenomegaly: yes" in ans.steps[-1].text  # the vocabulary's criterion, stated
            d = json.loads(json.dumps(ans.to_dict(), allow_nan=False))
            assert [st["kind"] for st in d["steps"]] == ["organ", "measure", "conclusion"]
            assert set(d["steps"][0]["box"]) >= {"world_mm", "orig_vox", "model_vox"} and d["steps"][-1]["box"] is None
            assert "steps:" in str(ans) and "box RAS+ mm" in str(ans)
            kinds_seen.add("spleen")
    assert kinds_seen == {"finding", "spleen"}


class CachedLabels:
    """A segmentation "model" that answers with the cached label map of the volume it is given (one-hot
    logits), so what an expert test checks is the call, the reading and the geometry, not learning."""

    def __init__(self, ds, n_classes: int) -> None:
        import torch

        self.n, self.cases = n_classes, [(ds[i]["image"], ds[i]["label"].long()) for i in range(len(ds))]
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def parameters(self):
        return iter([self.anchor])

    def __call__(self, x):
        import torch

        out = []
        for vol in x:
            label = next(lab for img, lab in self.cases if img.shape == vol.shape and torch.equal(img, vol))
            out.append(torch.nn.functional.one_hot(label, self.n).permute(3, 0, 1, 2).float() * 10)
        return torch.stack(out)


def test_a_segmentation_expert_measures_volumes_and_its_call_is_a_step(data):
    from vol3d.data.cache import CacheDataset
    from vol3d.seg.config import InferConfig
    from vol3d.seg.expert import SegExpert
    from vol3d.seg.predict import Predictor

    oracle = PerceivingOracle(data)
    ds = CacheDataset(data["cache"], split=None, mode="volume")
    names = list(oracle.labels.names)
    expert = SegExpert(Predictor(CachedLabels(ds, len(names)), names, INPUT, data["cfg"], InferConfig(overlap=0.0)),
                       "seg_run")
    pipe = Vol3DPipeline(oracle, data["cfg"], expert=expert)
    k = next(i for i in range(len(ds)) if "liver_lesion" in list(ds[i]["box_findings"]))
    oracle.item = item = ds[k]
    ref = f"{data['cache']}::{item['id']}"
    voxel_ml = float(np.prod(item["spacing"].numpy())) / 1000
    ans = pipe.ask(ref, "What is the volume of the liver?")
    step = next(st for st in ans.steps if st.kind == "expert")
    liver = names.index("liver")
    assert step.value == pytest.approx(float((item["label"] == liver).sum()) * voxel_ml)
    assert step.call["model"] == "segmentation" and step.call["run"] == "seg_run" and step.call["class"] == "liver"
    assert "measured by the segmentation expert seg_run" in ans.text and f"{step.value:.0f} mL" in ans.text
    d = json.loads(json.dumps(ans.to_dict(), allow_nan=False))
    assert next(st for st in d["steps"] if st["kind"] == "expert")["call"]["result"] == pytest.approx(step.value, abs=1e-3)
    # an input prepared once and asked again: the expert reads the volume it came from
    again = pipe.ask(pipe.prepare(ref), "What is the volume of the liver?")
    assert next(st for st in again.steps if st.kind == "expert").value == step.value
    # a finding's volume: the expert's lesion component under the box the perception found
    ans = pipe.ask(ref, "What is the volume of the largest liver lesion?")
    step = next(st for st in ans.steps if st.kind == "expert")
    own = next(st for st in ans.steps if st.kind == "measure" and st.unit == "mL")
    assert step.call["overlap_iou"] > 0.5 and step.value == pytest.approx(own.value, rel=1e-6)  # both read the truth
    # a diameter is not the expert's to answer; a cache prepared otherwise is refused with the fix
    assert all(st.kind != "expert" for st in pipe.ask(ref, "What is the diameter of the largest liver lesion?").steps)
    other = dataclasses.replace(data["cfg"], target_spacing=(3.0, 3.0, 3.0))
    pipe.expert = SegExpert(Predictor(expert.predictor.model, names, INPUT, other, InferConfig()), "seg_run")
    with pytest.raises(InputError, match="give the original file or DICOM folder"):
        pipe.ask(ref, "What is the volume of the liver?")
