"""``manifest.jsonl``: one JSON object per series or file found (schema: docs/formats.md section 3).

During a run rows are appended, flushed and fsynced one finished case at a time, so a
killed run keeps every row it reported. A case redone in a later run appends a new row
for the same ``id``; readers keep the last row per id (:func:`latest_by_id`) and the
runner rewrites the file compacted, one row per id sorted by id, when it finishes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from preprocess.errors import InputError

MANIFEST_NAME = "manifest.jsonl"
STATUSES = ("ok", "skipped", "failed")


@dataclasses.dataclass
class ManifestRow:
    """One manifest row. Fields after ``split`` are set for ``ok`` rows only (``None`` otherwise)."""

    id: str  # pseudonymous case id, c_<hex> (preprocess.ids)
    status: str  # ok | skipped | failed
    reason: str = ""  # UPPER_SNAKE code from preprocess.reasons, empty when ok
    detail: str = ""  # one sentence; names the source path, never an identifier
    modality: str = ""
    kind: str = ""  # dicom | nifti | nrrd | mha | other
    source: list[str] = dataclasses.field(default_factory=list)  # relative input paths (or their hashes)
    patient: str = ""  # p_<hex> keyed hash
    study: str = ""  # s_<hex> keyed hash
    split: str = ""  # train | val | test, from the patient hash
    h5: str | None = None  # case file relative to the cache dir
    key: str | None = None  # HDF5 group inside it (== id)
    shape: list[int] | None = None  # cached (X, Y, Z)
    spacing: list[float] | None = None  # cached (sx, sy, sz) mm
    flags: list[str] | None = None  # e.g. RESAMPLED_UNEVEN_SPACING
    has_label: bool | None = None
    has_report: bool | None = None
    n_boxes: int | None = None
    n_codes: int | None = None
    source_hash: str | None = None  # keyed hash (HMAC) of the sha256 of the source bytes: a change means redo
    source_stat: str | None = None  # keyed hash of the source files' sizes and mtimes: unchanged = not re-read
    side_hash: str | None = None  # keyed hash of the joined side data (report, codes, boxes, label)
    params_hash: str | None = None  # hash of the preprocessing config
    stats: dict[str, Any] | None = None  # per-case summary used by the dataset fingerprint

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"manifest status must be one of {STATUSES}, got {self.status!r}")
        if (self.status == "ok") != (self.reason == ""):
            raise ValueError(f"row {self.id}: status {self.status!r} with reason {self.reason!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ManifestRow:
        """Build from a parsed JSON object; unknown keys (from newer versions) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _dumps(row: ManifestRow | dict[str, Any]) -> str:
    data = row.to_dict() if isinstance(row, ManifestRow) else row
    return json.dumps(data, ensure_ascii=True, separators=(", ", ": "))


def _fsync_dir(path: Path) -> None:
    # Make a rename durable: the directory entry must reach the disk too (no-op on Windows).
    if os.name == "posix":
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _repair_torn_tail(path: Path) -> None:
    """Drop an incomplete last line left by a process killed mid-write."""
    if not path.exists():
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        if not data or data.endswith(b"\n"):
            return
        fh.truncate(data.rfind(b"\n") + 1)
        fh.flush()
        os.fsync(fh.fileno())


class ManifestWriter:
    """Append rows durably: each :meth:`append` is flushed and fsynced before it returns."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        _repair_torn_tail(self.path)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()/__exit__

    def append(self, row: ManifestRow) -> None:
        self._fh.write(_dumps(row) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """All rows in file order. A torn last line (killed writer) is ignored; any other bad
    line is an :class:`InputError` naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    # The text after the last newline is empty unless a write was cut short: skip it.
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(ManifestRow.from_dict(json.loads(line)))
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise InputError(
                f"{path}, line {n}: not a valid manifest row ({exc}); "
                "restore the file or rerun with --overwrite to rebuild the cache"
            ) from None
    return rows


def latest_by_id(rows: Iterable[ManifestRow]) -> dict[str, ManifestRow]:
    """The last row of each id (a redone case appends a newer row)."""
    out: dict[str, ManifestRow] = {}
    for row in rows:
        out[row.id] = row
    return out


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically and durably: ``path.tmp``, fsync, rename, fsync the folder.

    A reader sees the old file or the new one, never half of one, even after a crash.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_manifest(path: str | Path, rows: Iterable[ManifestRow]) -> None:
    """Atomically replace ``path`` with ``rows`` (:func:`atomic_write_text`)."""
    atomic_write_text(path, "".join(_dumps(row) + "\n" for row in rows))


def compact(rows: Iterable[ManifestRow]) -> list[ManifestRow]:
    """One row per id (the latest), sorted by id: the canonical form written at the end of a run."""
    return [r for _, r in sorted(latest_by_id(rows).items())]
