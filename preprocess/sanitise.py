"""Nothing that identifies a patient leaves ingest: the sanitiser of detail sentences and log
lines, keyed names for input paths, and the crosswalk that links case ids back to the files.

The crosswalk is the only place input paths are written (unless ``--keep-paths``): a file
OUTSIDE the cache (``<CACHE>.crosswalk.jsonl`` by default), mode 0600, documented as PHI.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from preprocess import ids
from preprocess.sidecars import CaseSide, base_key
from preprocess.types import Candidate, Identity

#: An absolute path (posix, or a Windows drive) not preceded by a word: ``/data/x.dcm``, ``C:\\x``.
#: A space belongs to the path when a later separator follows in the same word (``/data/DOE JOHN/x``).
_ABS_PATH_RE = re.compile(r"(?<![\w.~-])(?:/|[A-Za-z]:[\\/])(?:[^\s'\"(),;]| (?=[^\s'\"(),;/\\]+[/\\]))+")
#: Identifiers shorter than this are not searched for (they would match inside numbers and words).
_MIN_IDENTIFIER = 4
_HOLD = 0xE000  # private-use characters stand for text already rewritten (see Sanitiser.__call__)


@dataclasses.dataclass(frozen=True)
class Sanitiser:
    """Takes a candidate's identifiers and every absolute path out of a detail sentence or traceback.

    Built in the parent process (:func:`make_sanitiser`, which knows the id key) and plain
    data, so a worker applies the very same rewriting.
    """

    paths: tuple[tuple[str, str], ...] = ()  # (text, replacement), longest text first
    identifiers: tuple[str, ...] = ()  # key, UIDs, accession, PatientID; replaced by "<id>"

    def __call__(self, text: str) -> str:
        held: list[str] = []

        def hold(new: str) -> str:
            held.append(new)
            return chr(_HOLD + len(held) - 1)

        for old, new in self.paths:  # paths first: a relative path shown as is may contain the key
            if old in text:
                text = text.replace(old, hold(new))
        for ident in self.identifiers:
            text = text.replace(ident, "<id>")
        # what is left is not the series' own file: keep a code file's name, it helps a bug report
        text = _ABS_PATH_RE.sub(lambda m: "<path>/" + Path(m[0]).name if m[0].endswith(".py") else "<path>", text)
        return "".join(held[ord(ch) - _HOLD] if _HOLD <= ord(ch) < _HOLD + len(held) else ch for ch in text)


def make_sanitiser(c: Candidate, redact: Callable[[str], str], side: CaseSide | None = None) -> Sanitiser:
    """The :class:`Sanitiser` of candidate ``c``: its absolute source files become their relative
    paths (``redact``-ed), side-data files become "the label map"/"the lesion map", and its key,
    UIDs, accession and PatientID become ``<id>``."""
    paths: dict[str, str] = {}
    for rel in c.source:  # the series' folders too: a detail may name the folder, not a file
        parts = rel.split("/")
        for i in range(len(parts)):
            name = "/".join(parts[: i + 1])
            paths[name] = redact(name)
    for absolute, rel in zip(c.source_files, c.source, strict=False):
        for form in {str(absolute), os.path.abspath(absolute), str(Path(absolute).resolve())}:
            paths[form] = redact(rel)
    for file, what in ((side.label_path, "the label map"), (side.lesion_path, "the lesion map")) if side else ():
        if file:
            paths.update({str(file): what, str(Path(file).resolve()): what})
    ident = c.identity
    idents = {c.key, base_key(c.key), ident.patient_id, ident.study_uid, ident.series_uid, ident.accession}
    return Sanitiser(
        paths=tuple(sorted(paths.items(), key=lambda kv: len(kv[0]), reverse=True)),
        identifiers=tuple(sorted((i for i in idents if len(i) >= _MIN_IDENTIFIER), key=len, reverse=True)),
    )


def path_redactor(key: bytes, enabled: bool) -> Callable[[str], str]:
    """``path -> h_<keyed hash>`` when ``enabled`` (the same path always gives the same name), else identity."""
    def redact(path: str) -> str:
        return "h_" + ids.keyed_hash(key, "path", path)[:20] if enabled else path

    return redact


def crosswalk_path(out: str | Path) -> Path:
    """Where the crosswalk of cache ``out`` goes by default: ``<out>.crosswalk.jsonl`` beside it."""
    out = Path(out)
    return out.parent / f"{out.name}.crosswalk.jsonl"


def read_crosswalk(path: str | Path) -> dict[str, dict[str, Any]]:
    """``{id: row}`` of a crosswalk file (empty when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return {}
    rows = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["id"]] = row
    return rows


def write_crosswalk(path: str | Path, rows: dict[str, dict[str, Any]]) -> None:
    """Merge ``rows`` into the crosswalk at ``path`` (rows of other ids are kept), atomically and
    readable by the owner only (mode 0600): it links pseudonymous ids back to patients' files."""
    path = Path(path)
    merged = {**read_crosswalk(path), **rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for key in sorted(merged):
            f.write(json.dumps(merged[key], sort_keys=True) + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- report text


def _date_forms(da: str) -> list[str]:
    """The ways a DICOM date ``YYYYMMDD`` is written in report text (longest first)."""
    if not re.fullmatch(r"\d{8}", da):
        return []
    y, m, d = da[:4], da[4:6], da[6:]
    um, ud = str(int(m)), str(int(d))
    forms = {da, f"{y}-{m}-{d}", f"{y}/{m}/{d}", f"{d}.{m}.{y}", f"{d}/{m}/{y}", f"{m}/{d}/{y}", f"{d}-{m}-{y}",
             f"{ud}.{um}.{y}", f"{ud}/{um}/{y}", f"{um}/{ud}/{y}"}  # fmt: skip
    return sorted(forms, key=len, reverse=True)


def scrub_report(text: str, identity: Identity) -> str:
    """``text`` without the identifiers the same patient's headers carry: the patient's name
    parts (``<name>``), PatientID and AccessionNumber (``<id>``), birth and study dates in the
    usual spellings (``<date>``). What it cannot know (another person's name, a phone number,
    a date not in the headers) stays: scrub reports with a dedicated de-identification tool
    before export when they may hold such text."""
    if not text:
        return text
    for ident in (identity.patient_id, identity.accession):
        if len(ident) >= _MIN_IDENTIFIER:
            text = re.sub(re.escape(ident), "<id>", text, flags=re.IGNORECASE)
    parts = {p for p in re.split(r"[\^\s,]+", identity.patient_name) if len(p) >= 3}
    for part in sorted(parts, key=len, reverse=True):
        text = re.sub(rf"\b{re.escape(part)}\b", "<name>", text, flags=re.IGNORECASE)
    for da in (identity.birth_date, identity.study_date):
        for form in _date_forms(da):
            text = re.sub(rf"(?<!\d){re.escape(form)}(?!\d)", "<date>", text)
    return text
