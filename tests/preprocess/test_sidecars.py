"""Side tables: validation errors name the file and column; joins by accession, PatientID, key."""

from __future__ import annotations

import json

import pytest

from preprocess.errors import InputError
from preprocess.sidecars import SideTables, load_boxes, load_codes, load_reports
from preprocess.types import Candidate, Identity


def _cand(kind="dicom", key="1.2.3.4", acc="ACC1", pid="PAT1", files=()) -> Candidate:
    return Candidate(
        kind=kind, source=["x"], key=key, identity=Identity(pid, "1.2", key if kind == "dicom" else "", acc),
        source_files=list(files),
    )


def test_reports_and_codes(tmp_path):
    rep = tmp_path / "reports.csv"
    rep.write_text("\ufeffAccessionNumber,Findings,Impression\nACC1,liver lesion,benign\nACC1,more,\n,x,y\n")
    assert load_reports(rep) == {"ACC1": ("liver lesion\nmore", "benign")}
    codes = tmp_path / "codes.csv"
    codes.write_text("PatientID,Code,Description\nPAT1,K76.0,fatty liver\nPAT1,C22.0,x\nPAT1,K76.0,dup\n")
    assert load_codes(codes) == {"PAT1": ["C22.0", "K76.0"]}


def test_missing_file_and_column_are_named(tmp_path):
    with pytest.raises(InputError, match="reports file .*nope.csv does not exist"):
        load_reports(tmp_path / "nope.csv")
    bad = tmp_path / "r.csv"
    bad.write_text("Accession,Findings,Impression\n")
    with pytest.raises(InputError, match="r.csv has no column 'AccessionNumber'"):
        load_reports(bad)
    codes = tmp_path / "c.csv"
    codes.write_text("PatientID,Description\n")
    with pytest.raises(InputError, match="no column 'Code'"):
        load_codes(codes)
    codes.write_text("PatientID,Code\nP1,K76.0,extra text, with comma\n")
    with pytest.raises(InputError, match="line 2: more fields than the header"):
        load_codes(codes)
    with pytest.raises(InputError, match="labels directory"):
        SideTables.load(labels=tmp_path / "missing")


def test_boxes_validation(tmp_path):
    p = tmp_path / "boxes.json"
    p.write_text(json.dumps([{"key": "k", "finding": "f", "organ": "o", "box_world_ras_mm": [0, 0, 0, 1, 2, 3]}]))
    assert load_boxes(p) == {"k": [{"finding": "f", "organ": "o", "box_world_ras_mm": [0, 0, 0, 1, 2, 3]}]}
    p.write_text(json.dumps([{"key": "k", "box_world_ras_mm": [0, 0, 5, 1, 2, 3]}]))
    with pytest.raises(InputError, match="entry 0: field 'box_world_ras_mm'"):
        load_boxes(p)
    p.write_text(json.dumps([{"box_world_ras_mm": [0, 0, 0, 1, 2, 3]}]))
    with pytest.raises(InputError, match="field 'key'"):
        load_boxes(p)
    p.write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        load_boxes(p)


def test_join_dicom_and_nifti_sidecar(tmp_path):
    rep = tmp_path / "reports.csv"
    rep.write_text("AccessionNumber,Findings,Impression\nACC1,f1,i1\nACC9,f9,i9\n")
    codes = tmp_path / "codes.csv"
    codes.write_text("PatientID,Code\nPAT1,K76.0\n")
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps([{"key": "1.2.3.4", "box_world_ras_mm": [0, 0, 0, 1, 1, 1]}]))
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "1.2.3.4.nii.gz").write_bytes(b"mask")
    tables = SideTables.load(rep, codes, boxes, labels)
    side = tables.for_case(_cand())
    assert (side.findings, side.impression, side.has_report, side.codes) == ("f1", "i1", True, ["K76.0"])
    assert len(side.boxes) == 1 and side.label_path.endswith("1.2.3.4.nii.gz") and side.label_hash
    # no report for this accession: fine, empty text
    empty = tables.for_case(_cand(acc="ACC2", key="other", pid="PAT2"))
    assert not empty.has_report and empty.findings == "" and empty.codes == [] and empty.label_path is None
    # a changed side table changes the digest (the case is redone)
    assert empty.digest() != tables.for_case(_cand()).digest()


def test_vocabulary_file_is_checked_and_names_the_problem(tmp_path):
    from preprocess.sidecars import load_vocabulary

    good = tmp_path / "vocab.yaml"
    good.write_text("findings:\n  adrenal_mass: {text: adrenal mass, organ: adrenal, nouns: [mass], "
                    "organ_words: [adrenal]}\nlabels: [background, adrenal, mass]\nfinding_labels: [mass]\n")
    assert load_vocabulary(good)["findings"]["adrenal_mass"]["organ"] == "adrenal"
    for text, match in [("{}", "findings"), ('{"findings": {"x": {"text": "x"}}}', "'text' and 'organ'"),
                        ('{"findings": {"x": {"text": "x", "organ": "y"}}, "finding_labels": ["m"]}', "not in 'labels'"),
                        ('{"findings": {"x": {"text": "x", "organ": "y"}}, "colour": 1}', "unknown keys"),
                        ("{not json", "could not be parsed")]:
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(InputError, match=match) as err:
            load_vocabulary(bad)
        assert str(bad) in str(err.value)
