"""Side tables that follow an image into the cache: reports, EHR codes, label masks, boxes.

Joins happen in the parent process, while the identifiers are still at hand
(:class:`preprocess.types.Identity`); each worker receives only the plain,
identifier-free :class:`CaseSide` of its case. Tables are read and validated before
any case is processed, so a missing file or column stops the run with exit code 2
before anything is written.

- reports CSV: ``AccessionNumber,Findings,Impression`` joined on the series' accession
  number (DICOM tag, or the BIDS-style JSON sidecar of a NIfTI file, read by ingest).
- EHR codes CSV: ``PatientID,Code[,Description]`` joined on the PatientID; only the codes
  are kept (descriptions are free text).
- labels DIR: ``<key>.nii.gz`` (or ``.nii``) per series, key = SeriesInstanceUID for DICOM,
  file stem for NIfTI.
- boxes JSON: a list of ``{"key", "finding", "organ", "box_world_ras_mm": [x0,y0,z0,x1,y1,z1]}``
  with an optional ``"instance": k`` (its value in the series' lesion instance map).
- lesions DIR: ``<key>.nii.gz`` (or ``.nii``) instance maps, value k = the box with ``"instance": k``;
  the cached box is then the box of the lesion's voxels (tight on oblique series too).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

from preprocess.errors import InputError
from preprocess.types import Candidate

REPORT_COLUMNS = ("AccessionNumber", "Findings", "Impression")
CODE_COLUMNS = ("PatientID", "Code")
LABEL_SUFFIXES = (".nii.gz", ".nii")
#: The suffix preprocess.ingest appends to a key: "#t" (volume t of a split 4D file), "#a-b" (the
#: dropped volumes of one) or "@n" (the n-th series with a repeated key).
_KEY_SUFFIX_RE = re.compile(r"(#\d+(-\d+)?|@\d+)$")


def base_key(key: str) -> str:
    """``key`` without the suffix ingest appends (:data:`_KEY_SUFFIX_RE`): the key of the file or
    series whose side data (labels, boxes) it shares."""
    return _KEY_SUFFIX_RE.sub("", key)


@dataclasses.dataclass
class CaseSide:
    """The side data of one case, identifier-free and picklable (sent to a worker)."""

    findings: str = ""
    impression: str = ""
    has_report: bool = False
    codes: list[str] = dataclasses.field(default_factory=list)
    boxes: list[dict] = dataclasses.field(default_factory=list)  # {"finding", "organ", "box_world_ras_mm"}
    label_path: str | None = None  # absolute path of the label map, if any
    label_hash: str = ""  # sha256 of the label file bytes (a changed mask means redo)
    lesion_path: str | None = None  # absolute path of the lesion instance map, if any
    lesion_hash: str = ""  # sha256 of the instance map bytes

    def digest(self) -> str:
        """sha256 over everything above: a case whose side data changed is redone."""
        data = dataclasses.asdict(self)
        # where the masks live does not change the output; their bytes do
        data.pop("label_path")
        data.pop("lesion_path")
        if not data["lesion_hash"]:  # caches made before --lesions existed keep their digests
            data.pop("lesion_hash")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _read_csv(path: Path, required: tuple[str, ...], what: str) -> list[dict[str, str]]:
    if not path.is_file():
        raise InputError(f"{what} file {path} does not exist; pass an existing CSV or drop the option")
    try:
        # utf-8-sig: spreadsheets often write a byte-order mark before the header.
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise InputError(
                    f"{what} file {path} has no column {missing[0]!r} (columns found: {header or 'none'}); "
                    f"the header must contain {', '.join(required)}"
                )
            reader.fieldnames = header
            rows = []
            for row in reader:
                if None in row:  # more fields than the header: an unquoted comma shifts the text
                    raise InputError(
                        f"{what} file {path}, line {reader.line_num}: more fields than the header's {len(header)}; "
                        "quote text that contains commas"
                    )
                rows.append({k: (v or "").strip() for k, v in row.items()})
            return rows
    except UnicodeDecodeError:
        raise InputError(f"{what} file {path} is not UTF-8 text; re-export it as UTF-8 CSV") from None
    except csv.Error as exc:
        raise InputError(f"{what} file {path} is not valid CSV ({exc})") from None


def load_reports(path: str | Path) -> dict[str, tuple[str, str]]:
    """AccessionNumber -> (findings, impression). Several rows for one accession are joined."""
    out: dict[str, tuple[str, str]] = {}
    for row in _read_csv(Path(path), REPORT_COLUMNS, "reports"):
        acc = row["AccessionNumber"]
        if not acc:
            continue
        old_f, old_i = out.get(acc, ("", ""))
        out[acc] = (_join(old_f, row["Findings"]), _join(old_i, row["Impression"]))
    return out


def _join(a: str, b: str) -> str:
    return f"{a}\n{b}" if a and b else a or b


def load_codes(path: str | Path) -> dict[str, list[str]]:
    """PatientID -> sorted unique codes."""
    out: dict[str, set[str]] = {}
    for row in _read_csv(Path(path), CODE_COLUMNS, "EHR codes"):
        if row["PatientID"] and row["Code"]:
            out.setdefault(row["PatientID"], set()).add(row["Code"])
    return {k: sorted(v) for k, v in out.items()}


#: The vocabulary file a cache carries (``CACHE/vocab.json``), written from ``vol3d preprocess --vocab``.
VOCAB_NAME = "vocab.json"


def cache_vocabulary(cache_dir: str | Path) -> dict[str, Any]:
    """A cache's ``vocab.json`` (what ``vol3d preprocess --vocab`` copied from the export), ``{}`` without one."""
    path = Path(cache_dir) / VOCAB_NAME
    return load_vocabulary(path) if path.is_file() else {}


def load_vocabulary(path: str | Path) -> dict[str, Any]:
    """A vocabulary file (JSON or YAML): what the export's findings, label values and codes are called.

    ``{"findings": {name: {"text", "organ", ...}}, "labels": [name of value 0, 1, ...],
    "finding_labels": [label names marking finding voxels]}`` (docs/tasks_and_metrics.md). Checked
    here for shape only (the finding fields are checked where they are used, by ``vol3d train``).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"vocabulary file {path} does not exist; pass a JSON or YAML file (docs/tasks_and_metrics.md)")
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except (ValueError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InputError(f"vocabulary file {path} could not be parsed ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("findings"), dict) or not data["findings"]:
        raise InputError(f"vocabulary file {path}: expected an object with a non-empty 'findings' mapping "
                         "(name -> {text, organ, ...}); see docs/tasks_and_metrics.md")
    for name, spec in data["findings"].items():
        if not isinstance(spec, dict) or not spec.get("text") or not spec.get("organ"):
            raise InputError(f"vocabulary file {path}: finding {name!r} needs at least 'text' and 'organ'")
    for key in ("labels", "finding_labels"):
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise InputError(f"vocabulary file {path}: '{key}' must be a list of names")
    unknown = sorted(set(data.get("finding_labels", [])) - set(data.get("labels", [])))
    if unknown:
        raise InputError(f"vocabulary file {path}: finding_labels {unknown} are not in 'labels'")
    unexpected = sorted(set(data) - {"findings", "labels", "finding_labels", "codes"})
    if unexpected:
        raise InputError(f"vocabulary file {path}: unknown keys {unexpected}; allowed: findings, labels, "
                         "finding_labels, codes")
    return data


def load_boxes(path: str | Path) -> dict[str, list[dict]]:
    """Series key -> boxes ``{"finding", "organ", "box_world_ras_mm": [6 floats]}``, validated."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"boxes file {path} does not exist; pass an existing JSON file or drop --boxes")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"boxes file {path} is not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise InputError(f"boxes file {path}: expected a JSON list of box objects, got {type(data).__name__}")
    out: dict[str, list[dict]] = {}
    for n, item in enumerate(data):
        where = f"boxes file {path}, entry {n}"
        if not isinstance(item, dict):
            raise InputError(f"{where}: expected an object with 'key' and 'box_world_ras_mm'")
        key = item.get("key")
        if not isinstance(key, str) or not key:
            raise InputError(f"{where}: field 'key' (SeriesInstanceUID or NIfTI file stem) is missing or empty")
        box = item.get("box_world_ras_mm")
        ok = isinstance(box, list) and len(box) == 6
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
        if not ok or any(box[i] > box[i + 3] for i in range(3)):
            raise InputError(
                f"{where}: field 'box_world_ras_mm' must be 6 finite numbers [x0,y0,z0,x1,y1,z1] in RAS+ mm "
                f"with x0<=x1, y0<=y1, z0<=z1; got {box!r}"
            )
        instance = item.get("instance")
        if instance is not None and (isinstance(instance, bool) or not isinstance(instance, int) or instance < 1):
            raise InputError(f"{where}: field 'instance' must be a positive integer (the lesion's value in its "
                             f"instance map), got {instance!r}")  # fmt: skip
        row = {
            "finding": str(item.get("finding", "")),
            "organ": str(item.get("organ", "")),
            "box_world_ras_mm": [float(v) for v in box],
        }
        if instance is not None:
            row["instance"] = instance
        out.setdefault(key, []).append(row)
    return out


@dataclasses.dataclass
class SideTables:
    """All side tables of a run, loaded and validated up front."""

    reports: dict[str, tuple[str, str]] | None = None
    codes: dict[str, list[str]] | None = None
    boxes: dict[str, list[dict]] | None = None
    labels_dir: Path | None = None
    lesions_dir: Path | None = None
    vocab: dict[str, Any] | None = None  # findings / label names (load_vocabulary), copied to CACHE/vocab.json
    paths: tuple[Path, ...] = ()  # every table file/folder given (kept out of the image scan)
    scrub_reports: bool = True  # report text without the patient's name, ids and dates (sanitise.scrub_report)

    @classmethod
    def load(
        cls,
        reports: str | Path | None = None,
        codes: str | Path | None = None,
        boxes: str | Path | None = None,
        labels: str | Path | None = None,
        lesions: str | Path | None = None,
        vocab: str | Path | None = None,
    ) -> SideTables:
        """Read every given table; raise :class:`InputError` naming the file/column on any problem."""
        for folder, flag, what in ((labels, "--labels", "masks"), (lesions, "--lesions", "lesion instance maps")):
            if folder is not None and not Path(folder).is_dir():
                raise InputError(f"{flag} directory {folder} does not exist; pass the folder of <key>.nii.gz {what}")
        return cls(
            reports=load_reports(reports) if reports is not None else None,
            codes=load_codes(codes) if codes is not None else None,
            boxes=load_boxes(boxes) if boxes is not None else None,
            labels_dir=Path(labels) if labels is not None else None,
            lesions_dir=Path(lesions) if lesions is not None else None,
            vocab=load_vocabulary(vocab) if vocab is not None else None,
            paths=tuple(Path(p) for p in (reports, codes, boxes, labels, lesions, vocab) if p is not None),
        )

    def label_file(self, key: str, folder: Path | None = None) -> Path | None:
        """``<key>.nii.gz`` (or ``.nii``) in ``folder`` (default: the labels folder), if it exists."""
        folder = self.labels_dir if folder is None else folder
        if folder is None or not key:
            return None
        for suffix in LABEL_SUFFIXES:
            p = folder / f"{key}{suffix}"
            if p.is_file():
                return p
        return None

    def for_case(self, candidate: Candidate) -> CaseSide:
        """Join every table to ``candidate`` (by accession, PatientID and series key)."""
        side = CaseSide()
        ident = candidate.identity
        # ingest fills the accession from DICOM tags or the NIfTI's JSON sidecar
        if self.reports is not None and ident.accession in self.reports:
            side.findings, side.impression = self.reports[ident.accession]
            if self.scrub_reports:
                from preprocess.sanitise import scrub_report

                side.findings, side.impression = scrub_report(side.findings, ident), scrub_report(side.impression, ident)
            side.has_report = True
        if self.codes is not None and ident.patient_id:
            side.codes = list(self.codes.get(ident.patient_id, []))
        # a split 4D file's volumes and a repeated key share the side data of the file / series
        base = base_key(candidate.key)
        if self.boxes is not None:
            side.boxes = [dict(b) for b in self.boxes.get(candidate.key, self.boxes.get(base, []))]
        label = self.label_file(candidate.key) or self.label_file(base)
        if label is not None:
            side.label_path = str(label)
            side.label_hash = hashlib.sha256(label.read_bytes()).hexdigest()
        if self.lesions_dir is not None:
            lesion = self.label_file(candidate.key, self.lesions_dir) or self.label_file(base, self.lesions_dir)
            if lesion is not None:
                side.lesion_path = str(lesion)
                side.lesion_hash = hashlib.sha256(lesion.read_bytes()).hexdigest()
        return side
