"""Manifest rows: durable appends, torn-tail repair, compaction."""

from __future__ import annotations

import json

import pytest

from preprocess.errors import InputError
from preprocess.manifest import ManifestRow, ManifestWriter, compact, read_manifest, write_manifest


def _row(i: int, status: str = "ok", **kw) -> ManifestRow:
    reason = "" if status == "ok" else "LOCALIZER"
    return ManifestRow(id=f"c_{i:02d}", status=status, reason=reason, **kw)


def test_append_read_roundtrip_and_latest_wins(tmp_path):
    path = tmp_path / "manifest.jsonl"
    with ManifestWriter(path) as w:
        w.append(_row(1, shape=[4, 5, 6]))
        w.append(_row(2, "skipped"))
        w.append(_row(1, shape=[7, 8, 9]))  # redone case
    rows = read_manifest(path)
    assert [r.id for r in rows] == ["c_01", "c_02", "c_01"]
    comp = compact(rows)
    assert [r.id for r in comp] == ["c_01", "c_02"] and comp[0].shape == [7, 8, 9]
    write_manifest(path, comp)
    assert len(path.read_text().splitlines()) == 2
    assert all(set(json.loads(line)) >= {"id", "status", "reason", "detail", "source"} for line in path.open())


def test_torn_last_line_is_ignored_then_repaired(tmp_path):
    path = tmp_path / "manifest.jsonl"
    with ManifestWriter(path) as w:
        w.append(_row(1))
    with open(path, "a") as fh:
        fh.write('{"id": "c_02", "sta')  # a writer killed mid-line
    assert [r.id for r in read_manifest(path)] == ["c_01"]
    with ManifestWriter(path) as w:  # reopening truncates the torn tail
        w.append(_row(3))
    assert [r.id for r in read_manifest(path)] == ["c_01", "c_03"]


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"id": "c_01", "status": "ok"}\nnot json\n')
    with pytest.raises(InputError, match=r"manifest.jsonl, line 2"):
        read_manifest(path)


def test_row_validation():
    with pytest.raises(ValueError):
        ManifestRow(id="c", status="done")
    with pytest.raises(ValueError):
        ManifestRow(id="c", status="failed", reason="")
    assert ManifestRow.from_dict({"id": "c", "status": "ok", "future_field": 1}).id == "c"
