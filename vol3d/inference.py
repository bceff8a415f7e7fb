"""Inference with a trained run: ``vol3d.load(run).ask(volume, question)``.

A :class:`Vol3DPipeline` reads a volume (NIfTI/NRRD/MHA file, DICOM series folder,
cache entry ``CACHE::id`` or an already loaded :class:`preprocess.types.Image`),
prepares it exactly as the run's training cache was prepared (the run's
``PreprocessConfig``: RAS+ reorientation, resampling, intensity windows, crop/pad,
then the Dataset's centred ``input_size`` pad/crop), asks the model and maps every
``<box>[...]</box>`` of the answer back to

- ``model_vox``: continuous voxels of the model input,
- ``cached_vox``: continuous voxels of the cached grid,
- ``world_mm``: RAS+ millimetres (the axis-aligned box; for an oblique series the box
  enclosing the rotated voxel box),
- ``orig_vox``: continuous voxels of the original image as ingest loaded it (DICOM:
  ``(column, row, slice)`` in slice-normal order; NIfTI: the file's own array order).

Every conversion goes through :mod:`preprocess.geometry` (conventions in its docstring).

Where the preprocessing config comes from, in order: the ``preprocess_config``
argument; ``RUN/model/preprocess.json`` or ``RUN/preprocess.json`` (a config dict, or
a cache's ``params.json``); the ``params.json`` of the cache named by
``data.cache_dir`` in ``RUN/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from preprocess import geometry
from preprocess.config import PreprocessConfig, read_config
from preprocess.errors import ConfigError, InputError
from preprocess.types import Candidate, Frames, Image, SeriesError
from vol3d.rundir import PREPROCESS_NAME

log = logging.getLogger(__name__)

#: Separator of a cache entry given as one string: ``CACHE_DIR::case_id``.
CACHE_SEP = "::"


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class ModelInput:
    """A volume prepared like the run's training data, with every matrix needed to map back.

    Frames: model input (``volume``) -> cached grid (``+ origin``) -> original grid
    (``cached_to_orig``) -> RAS+ mm (``orig_affine``); :attr:`frames` holds them as one
    :class:`preprocess.types.Frames`, as the cache's items do.
    """

    volume: np.ndarray  # float32 (C, X, Y, Z): what the model sees
    origin: np.ndarray  # (3,) int: cached index of model-input voxel 0 (negative where padded)
    cache_frames: Frames  # the cached grid's geometry (to world mm, back to the original grid)
    cache_shape: tuple[int, int, int]  # cached (X, Y, Z) before the model-input pad/crop
    modality: str
    flags: list[str]
    source: str  # what was read (the path as given, or CACHE::id); never an identifier

    @property
    def affine(self) -> np.ndarray:
        """``(4, 4)`` model-input index -> RAS+ mm."""
        return self.frames.affine

    @property
    def cache_affine(self) -> np.ndarray:
        """``(4, 4)`` cached index -> RAS+ mm."""
        return self.cache_frames.affine

    @property
    def cached_to_orig(self) -> np.ndarray:
        """``(4, 4)`` cached index -> original continuous index."""
        return self.cache_frames.to_orig

    @property
    def orig_affine(self) -> np.ndarray:
        """``(4, 4)`` original index -> RAS+ mm."""
        return self.cache_frames.orig_affine

    @property
    def orig_shape(self) -> tuple[int, int, int]:
        """Original ``(X, Y, Z)``."""
        return self.cache_frames.orig_shape

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(X, Y, Z)`` of the model input (the text-box frame)."""
        return tuple(int(n) for n in self.volume.shape[-3:])  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """mm per model-input voxel ``(3,)``."""
        return geometry.spacing_from_affine(self.affine)

    def model_to_cached(self) -> np.ndarray:
        """``(4, 4)`` model-input index -> cached index (a translation by ``origin``)."""
        from preprocess.transforms import translation

        return translation(self.origin)

    @property
    def frames(self) -> Frames:
        """The model input's geometry (:class:`preprocess.types.Frames`): to world mm and back to the
        original grid, as the cache's items carry it."""
        return self.cache_frames.shifted(self.origin)

    def geometry_dict(self) -> dict[str, Any]:
        """The frames as plain JSON data (shapes, spacings, matrices)."""
        return {
            "source": self.source,
            "modality": self.modality,
            "flags": list(self.flags),
            "input_shape": list(self.input_shape),
            "input_spacing_mm": _rounded(self.spacing, 6),
            "input_affine": _rounded(self.affine, 6),
            "origin_in_cache": [int(v) for v in self.origin],
            "cache_shape": list(self.cache_shape),
            "cache_affine": _rounded(self.cache_affine, 6),
            "cached_to_orig": _rounded(self.cached_to_orig, 6),
            "orig_shape": list(self.orig_shape),
            "orig_affine": _rounded(self.orig_affine, 6),
        }


@dataclasses.dataclass
class AnswerBox:
    """One ``<box>`` of an answer in every frame; boxes are ``(x0, y0, z0, x1, y1, z1)``."""

    normalised: list[int]  # the 0..999 integers of the text (model-input frame)
    model_vox: np.ndarray  # (6,) continuous model-input voxels
    cached_vox: np.ndarray  # (6,) continuous cached voxels
    world_mm: np.ndarray  # (6,) RAS+ mm, axis-aligned
    orig_vox: np.ndarray  # (6,) continuous voxels of the original image

    @property
    def size_mm(self) -> np.ndarray:
        """Extent ``(dx, dy, dz)`` of the world box in mm."""
        return self.world_mm[3:] - self.world_mm[:3]

    @property
    def centre_mm(self) -> np.ndarray:
        """Centre ``(x, y, z)`` of the world box in RAS+ mm."""
        return (self.world_mm[3:] + self.world_mm[:3]) / 2

    def to_dict(self, decimals: int = 3) -> dict[str, Any]:
        return {
            "normalised": [int(v) for v in self.normalised],
            "model_vox": _rounded(self.model_vox, decimals),
            "cached_vox": _rounded(self.cached_vox, decimals),
            "world_mm": _rounded(self.world_mm, decimals),
            "orig_vox": _rounded(self.orig_vox, decimals),
            "size_mm": _rounded(self.size_mm, decimals),
            "centre_mm": _rounded(self.centre_mm, decimals),
        }


@dataclasses.dataclass
class AnswerStep:
    """One step of an answer's reasoning chain (:class:`vol3d.tasks.reasoning.Step`), its box in every frame."""

    kind: str  # "organ", "finding", "measure", "expert" or "conclusion"
    text: str
    box: AnswerBox | None
    value: float | None
    unit: str
    name: str  # the organ label or finding it is about
    call: dict[str, Any] | None = None  # an expert step: what was asked of which model

    def to_dict(self) -> dict[str, Any]:
        out = {"kind": self.kind, "text": self.text, "name": self.name,
               "value": None if self.value is None else round(float(self.value), 3), "unit": self.unit,
               "box": None if self.box is None else self.box.to_dict()}
        if self.call is not None:
            out["call"] = self.call
        return out

    def __str__(self) -> str:
        where = ""
        if self.box is not None:
            lo, hi = self.box.world_mm[:3], self.box.world_mm[3:]
            where = f"  [box RAS+ mm ({lo[0]:.0f}, {lo[1]:.0f}, {lo[2]:.0f})-({hi[0]:.0f}, {hi[1]:.0f}, {hi[2]:.0f})]"
        return f"{self.kind:<10} {self.text}{where}"


@dataclasses.dataclass
class Answer:
    """The model's answer to one question, its boxes in every frame, and the prepared input."""

    question: str
    text: str
    boxes: list[AnswerBox]
    unparsed_boxes: int  # ``<box>`` tags whose content is not six ordered integers 0..999
    input: ModelInput
    findings: str = ""  # the findings digest the model read before the question (perception models)
    warnings: list[str] = dataclasses.field(default_factory=list)  # why the volume is out of domain
    steps: list[AnswerStep] = dataclasses.field(default_factory=list)  # the reasoning chain (perception models)

    @property
    def volume(self) -> np.ndarray:
        """The model input ``(C, X, Y, Z)`` (e.g. to plot the boxes with ``model_vox``)."""
        return self.input.volume

    @property
    def affine(self) -> np.ndarray:
        """``(4, 4)`` model-input index -> RAS+ mm."""
        return self.input.affine

    @property
    def model_boxes(self) -> np.ndarray:
        """The answer's boxes ``(N, 6)`` in model-input voxels (``(0, 6)`` without a box)."""
        return np.stack([b.model_vox for b in self.boxes]) if self.boxes else np.zeros((0, 6))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (lists and plain numbers only)."""
        return {
            "question": self.question,
            "answer": self.text,
            "boxes": [b.to_dict() for b in self.boxes],
            "unparsed_boxes": int(self.unparsed_boxes),
            "findings": self.findings,
            "steps": [st.to_dict() for st in self.steps],
            "warnings": list(self.warnings),
            "input": self.input.geometry_dict(),
        }

    def __str__(self) -> str:
        lines = [f"WARNING: {w}" for w in self.warnings]
        if self.findings:
            lines.append(f"perceived: {self.findings}")
        lines += [f"Q: {self.question}", f"A: {self.text}"]
        if self.steps:
            lines += ["", "steps:"] + [f"  {i}. {st}" for i, st in enumerate(self.steps, start=1)]
        if self.boxes:
            lines += ["", format_boxes(self.boxes)]
        if self.unparsed_boxes:
            lines.append(f"({self.unparsed_boxes} malformed <box> tag(s) ignored)")
        return "\n".join(lines)


def _rounded(arr: Any, decimals: int) -> Any:
    return np.round(np.asarray(arr, dtype=float), decimals).tolist()


def format_boxes(boxes: Sequence[AnswerBox]) -> str:
    """A readable table: one block per box, one row per frame."""
    head = f"{'box':<4} {'frame':<16}" + "".join(f"{c:>9}" for c in ("x0", "y0", "z0", "x1", "y1", "z1"))
    lines = [head]
    for i, b in enumerate(boxes, start=1):
        rows = [
            ("normalised 0-999", b.normalised),
            ("model voxels", b.model_vox),
            ("cached voxels", b.cached_vox),
            ("original voxels", b.orig_vox),
            ("world mm (RAS+)", b.world_mm),
        ]
        for j, (name, vals) in enumerate(rows):
            fmt = "{:>9d}" if name.startswith("normalised") else "{:>9.1f}"
            cells = "".join(fmt.format(int(v) if name.startswith("normalised") else float(v)) for v in vals)
            lines.append(f"{str(i) if j == 0 else '':<4} {name:<16}{cells}")
        sx, sy, sz = (float(v) for v in b.size_mm)
        lines.append(f"{'':<4} {'size mm':<16}{sx:>9.1f}{sy:>9.1f}{sz:>9.1f}")
    return "\n".join(lines)


def boxes_from_text(text: str, inp: ModelInput) -> tuple[list[AnswerBox], int]:
    """Every well-formed ``<box>`` of ``text`` in every frame of ``inp``, and the count of malformed ones."""
    ints = geometry.parse_boxes(text)
    unparsed = max(0, text.count("<box>") - len(ints))
    if not ints:
        return [], unparsed
    norm = np.stack(ints)  # (N, 6)
    return boxes_in_frames(geometry.denormalise_boxes(norm, inp.input_shape), inp, norm), unparsed


def boxes_in_frames(model_vox: np.ndarray, inp: ModelInput, norm: np.ndarray | None = None) -> list[AnswerBox]:
    """Model-input voxel boxes ``(N, 6)`` in every frame of ``inp`` (``norm``: their 0..999 integers,
    computed when not given)."""
    model_vox = geometry.as_boxes(model_vox)
    if not len(model_vox):
        return []
    norm = geometry.normalise_boxes(model_vox, inp.input_shape) if norm is None else norm
    cached_vox = geometry.transform_boxes(model_vox, inp.model_to_cached())
    frames = inp.frames
    world, orig = frames.boxes_to_world(model_vox), frames.boxes_to_orig(model_vox)
    return [AnswerBox([int(v) for v in norm[i]], model_vox[i], cached_vox[i], world[i], orig[i])
            for i in range(len(norm))]


# ----------------------------------------------------------------------------- preprocessing config


read_preprocess_config = read_config  # the one reader lives in preprocess.config


def cache_of_run(run_dir: str | Path) -> Path | None:
    """The training cache named by ``RUN/config.yaml`` (as given, or relative to the run's parent)."""
    import yaml

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        return None
    try:
        data = yaml.safe_load(cfg_path.read_text()) or {}
    except yaml.YAMLError:
        return None
    cache = str((data.get("data") or {}).get("cache_dir") or "")
    if not cache:
        return None
    for cand in (Path(cache), run_dir.parent / cache, run_dir / cache):
        if (cand / "params.json").is_file():
            return cand
    return None


def find_preprocess_config(run_dir: str | Path) -> PreprocessConfig:
    """The preprocessing config a run was trained with (see the module docstring for the search order)."""
    run_dir = Path(run_dir)
    for path in (run_dir / "model" / PREPROCESS_NAME, run_dir / PREPROCESS_NAME):
        if path.is_file():
            return read_preprocess_config(path)
    cache = cache_of_run(run_dir)
    if cache is not None:
        return read_preprocess_config(cache / "params.json")
    raise InputError(
        f"{run_dir} does not say how its training volumes were preprocessed: no model/{PREPROCESS_NAME}, and "
        "the cache named in config.yaml (data.cache_dir) is not found; pass the training cache's config with "
        "--preprocess-config CACHE/params.json (or preprocess_config= in Python)"
    )


# ----------------------------------------------------------------------------- reading volumes


def _describe(i: int, c: Candidate) -> str:
    """One line about a candidate series: number, kind, size, status, where (no identifiers)."""
    what = c.label or c.modality or c.kind
    where = c.source[0] if c.source else "?"
    n = f", {len(c.source)} files" if len(c.source) > 1 else ""
    status = "ok" if c.status == "ok" else f"{c.status} {c.reason}"
    return f"  [{i}] {c.kind} {what} ({status}) {where}{n}"


def read_image(path: str | Path, cfg: PreprocessConfig, series: int | None = None) -> Image:
    """Load one volume from a NIfTI/NRRD/MHA file or a DICOM series folder, in its original grid.

    A folder holding several usable series needs ``series`` (the number shown in the error).
    Raises :class:`InputError` naming the file and the ingest reason when it cannot be used.
    """
    from preprocess import ingest

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist; give a NIfTI file, a DICOM series folder or CACHE{CACHE_SEP}ID")
    with tempfile.TemporaryDirectory(prefix="vol3d-ask-") as work:
        cands = [c for c in ingest.scan(path, cfg.ingest, workdir=Path(work)) if c.kind != "file"]
        if not cands:
            raise InputError(f"{path}: no DICOM series or NIfTI/NRRD/MHA volume found; give a NIfTI file or "
                             "a DICOM series folder")
        listing = "\n".join(_describe(i, c) for i, c in enumerate(cands))
        ok = [i for i, c in enumerate(cands) if c.status == "ok"]
        if series is not None:
            if not 0 <= series < len(cands):
                raise InputError(f"{path}: series {series} does not exist; it holds:\n{listing}")
            chosen = cands[series]
        elif len(ok) == 1:
            chosen = cands[ok[0]]
        elif not ok:
            details = "\n".join(f"  {c.reason}: {c.detail}" for c in cands)
            raise InputError(f"{path}: no usable volume:\n{details}")
        else:
            raise InputError(f"{path} holds {len(ok)} usable series; choose one with --series N "
                             f"(series= in Python) or give its own folder:\n{listing}")
        if chosen.status != "ok":
            raise InputError(f"{path}: series {series} cannot be used: {chosen.reason}: {chosen.detail}")
        try:
            return ingest.load(chosen, cfg.ingest)
        except SeriesError as exc:
            raise InputError(f"{path}: cannot read the volume: {exc.reason}: {exc.detail}") from None


def parse_cache_ref(volume: Any) -> tuple[Path, str] | None:
    """``(cache_dir, case_id)`` when ``volume`` names a cache entry (``"CACHE::id"`` or a 2-tuple), else None."""
    if isinstance(volume, tuple) and len(volume) == 2:
        return Path(volume[0]), str(volume[1])
    if isinstance(volume, str) and CACHE_SEP in volume:
        cache, _, case = volume.rpartition(CACHE_SEP)
        return Path(cache), case
    return None


# ----------------------------------------------------------------------------- the pipeline


def resolve_device(device: str | None) -> str:
    """``None``/``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA GPU is visible to torch; use --device cpu (or auto)")
    return str(device)


class Vol3DPipeline:
    """A trained model plus the preprocessing of its training data.

    Args:
        model: a :class:`vol3d.models.Vol3DModel` (or any object with ``config.input_shape``,
            ``config.in_chans`` and ``generate(volume (B, C, X, Y, Z), prompts, max_new_tokens)``).
        preprocess: the :class:`PreprocessConfig` the training cache was made with.
        run_dir: where the model came from (for messages and ``evaluate``'s default output).
        device: torch device of the model.
    """

    def __init__(self, model: Any, preprocess: PreprocessConfig, run_dir: str | Path | None = None,
                 device: str = "cpu", expert: Any = None) -> None:
        self.model = model
        self.preprocess = preprocess
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.device = device
        #: a :class:`vol3d.seg.expert.SegExpert` the measurement questions of volumes and lengths consult
        self.expert = expert

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Model-input spatial shape ``(X, Y, Z)`` (the Dataset's ``input_size`` in training)."""
        return tuple(int(n) for n in self.model.config.input_shape)  # type: ignore[return-value]

    @property
    def code_vocab(self) -> Any:
        """The EHR head's :class:`~vol3d.tasks.CodeVocab`, or None without a head."""
        from vol3d.tasks import CodeVocab

        codes = list(getattr(self.model.config, "ehr_codes", []) or [])
        return CodeVocab(codes) if codes else None

    @property
    def default_tasks(self) -> list[str]:
        """Tasks evaluated by default: :data:`vol3d.eval.TEXT_TASKS`, plus ``ehr`` when the model has an EHR
        head, plus ``measure``, ``chain`` and ``detect`` when it has perception."""
        from vol3d.eval.evaluate import TEXT_TASKS
        from vol3d.eval.reasoning import PERCEPTION_TASKS

        return [*TEXT_TASKS, *(["ehr"] if self.code_vocab is not None else []),
                *(PERCEPTION_TASKS if self.perceives else ())]

    # -- preparing volumes
    def prepare(self, volume: Any, series: int | None = None) -> ModelInput:
        """Read and prepare a volume like the training data.

        Args:
            volume: a path (NIfTI/NRRD/MHA file or DICOM series folder), ``"CACHE::id"`` or
                ``(cache_dir, id)``, a loaded :class:`preprocess.types.Image`, or a
                :class:`ModelInput` (returned as is).
            series: which series of a folder holding several (the number in the error message).
        """
        if isinstance(volume, ModelInput):
            return volume
        ref = parse_cache_ref(volume)
        if ref is not None:
            return self._from_cache(*ref)
        if isinstance(volume, Image):
            return self._from_image(volume, "<Image>")
        if isinstance(volume, (str, os.PathLike)):
            return self._from_image(read_image(volume, self.preprocess, series), str(volume))
        raise InputError(f"cannot read a volume from {type(volume).__name__}; give a path, CACHE{CACHE_SEP}ID "
                         "or a preprocess.types.Image")

    def _from_image(self, image: Image, source: str) -> ModelInput:
        from preprocess.store import read_window
        from preprocess.transforms import centred_window, prepare

        try:
            p = prepare(image, self.preprocess)
        except SeriesError as exc:
            raise InputError(f"{source}: cannot prepare the volume: {exc.reason}: {exc.detail}") from None
        # the model-input window exactly as CacheDataset(input_size=...) takes it in volume mode
        origin = centred_window(np.zeros(3), p.shape, self.input_shape)
        vol = read_window(p.image, origin, self.input_shape).astype(np.float32)
        return self._checked(ModelInput(
            volume=vol, origin=np.asarray(origin, dtype=np.int64),
            cache_frames=p.frames, cache_shape=p.shape, modality=p.modality, flags=list(p.flags), source=source,
        ))

    def _from_cache(self, cache_dir: Path, case: str) -> ModelInput:
        from preprocess.store import CaseReader
        from vol3d.data.cache import CacheDataset

        ds = CacheDataset(cache_dir, mode="volume", input_size=self.input_shape)
        idx = [i for i, r in enumerate(ds.rows) if case in (r.get("id"), r.get("key"))]
        if not idx:
            raise InputError(f"{cache_dir}/manifest.jsonl has no ok case {case!r}; use an id from its 'id' column")
        self._check_cache_params(cache_dir)
        s = ds[idx[0]]
        row = ds.rows[idx[0]]
        with CaseReader(Path(cache_dir) / row["h5"], row.get("key")) as r:
            frames = r.frames
            flags = [str(f) for f in r.attrs.get("flags", [])]
        return self._checked(ModelInput(
            volume=s["image"].numpy(), origin=s["origin"].numpy(),
            cache_frames=frames, cache_shape=tuple(int(n) for n in s["cache_shape"]),
            modality=s["modality"], flags=flags, source=f"{cache_dir}{CACHE_SEP}{case}",
        ))

    def _check_cache_params(self, cache_dir: Path) -> bool:
        """Warn when a cache was made with other parameters than the run's training cache."""
        try:
            cache_hash = json.loads((Path(cache_dir) / "params.json").read_text()).get("params_hash")
        except (OSError, json.JSONDecodeError):
            return False
        same = cache_hash == self.preprocess.params_hash()
        if not same:
            log.warning("%s was preprocessed with other parameters than this run's training data; "
                        "answers may be worse", cache_dir)
        return same

    def _checked(self, inp: ModelInput) -> ModelInput:
        want = int(getattr(self.model.config, "in_chans", inp.volume.shape[0]))
        if inp.volume.shape[0] != want:
            raise InputError(f"{inp.source}: prepared volume has {inp.volume.shape[0]} channel(s) but the model "
                             f"takes {want}; the run's preprocessing config does not match its model")
        return inp

    # -- asking
    def _tensor(self, inp: ModelInput) -> Any:
        import torch

        return torch.from_numpy(np.ascontiguousarray(inp.volume))[None].to(self.device)  # (1, C, X, Y, Z)

    @property
    def locate_prefix(self) -> str | None:
        """How this model's answers start when it is told to say where (``ask(..., locate=True)``);
        None for a model that is not a :class:`vol3d.models.Vol3DModel`."""
        from vol3d.models.vlm import Vol3DModel
        from vol3d.protocol import LOCATE_PREFIX

        if not isinstance(self.model, Vol3DModel):
            return None
        return LOCATE_PREFIX[self.model.box_head is not None]

    def ask(self, volume: Any, question: str, max_new_tokens: int = 128, series: int | None = None,
            locate: bool = False, out_of_domain: str = "refuse", **generate_kwargs: Any) -> Answer:
        """Answer ``question`` about ``volume`` (anything :meth:`prepare` takes).

        The question is used as is (a ``<vol>`` placeholder is put first when it has none,
        as in training). ``locate=True`` makes the answer start with a box: the model says
        *where* the finding would be, taking for granted that it is there (its own judgement
        of *whether* is skipped; use it for a finding you know is present).
        ``generate_kwargs`` go to HF ``generate`` (``num_beams``, ``do_sample`` ...).

        A volume unlike the training data (:mod:`vol3d.domain`: modality, intensity flags and
        statistics, the organs found) gets ``Answer.warnings``; with ``out_of_domain="refuse"``
        (the default) its answer gives no box and says why, with ``"answer"`` it is kept as is.

        With a perception model, a measurement question ("What is the diameter of the largest liver
        lesion?", "What is the craniocaudal length of the spleen?", "How far apart are the two largest
        kidney cysts?"; :func:`vol3d.tasks.reasoning.parse_question`) is answered from the perceived
        regions, in mm or mL; and an answer about a finding, organ or measurement lists its reasoning
        chain in ``Answer.steps`` (organ -> finding -> measurement -> conclusion with its threshold,
        each box in every frame).
        """
        if locate and self.locate_prefix is None:
            raise ConfigError(f"locate=True needs a vol3d.models.Vol3DModel, not a {type(self.model).__name__} "
                              "(its generate must take answer_prefix); ask without locate")
        if out_of_domain not in ("refuse", "answer"):
            raise ConfigError(f"out_of_domain must be 'refuse' or 'answer', got {out_of_domain!r}")
        inp = self.prepare(volume, series=series)
        if locate:
            generate_kwargs["answer_prefix"] = self.locate_prefix
        perceived = chain = None
        query = self.measurement(question) if not locate else None
        if query is not None:  # a number read from the perception, not written by the LM
            perceived = self.model.perceive(self._tensor(inp), spacing=inp.spacing)[0]
            chain = self.reason(question, perceived, inp)
            text = chain.answer
        elif self.perceives:
            generate_kwargs.update(spacing=inp.spacing, return_perceived=True)
            texts, found = self.model.generate(self._tensor(inp), [question], max_new_tokens=max_new_tokens,
                                               **generate_kwargs)
            text, perceived = str(texts[0]), found[0]
            chain = self.reason(question, perceived, inp)
        else:
            text = str(self.model.generate(self._tensor(inp), [question], max_new_tokens=max_new_tokens,
                                           **generate_kwargs)[0])
        warnings = self.check_domain(inp, perceived)
        boxes, unparsed = boxes_from_text(text, inp)
        refused = bool(warnings) and out_of_domain == "refuse" and (bool(boxes) or query is not None)
        if refused:
            text = ("This volume does not look like the data this model was trained on, so no "
                    + ("measurement" if query is not None else "box") + " is given (" + "; ".join(warnings) + ").")
            boxes, unparsed, chain = [], 0, None
        findings = ""
        if perceived is not None:
            from vol3d.tasks.regions import digest_text

            findings = digest_text(perceived, self.model.vocab).replace("<reg> ", "").replace(" <org>", "")
        if query is not None and chain is not None and self.expert is not None and not refused:
            text = self._consult_expert(query, chain, volume, series, inp)
        steps = [] if chain is None else [
            AnswerStep(st.kind, st.text, None if st.box is None else boxes_in_frames(st.box[None], inp)[0],
                       st.value, st.unit, st.name, st.call) for st in chain.steps]
        return Answer(question, text, boxes, unparsed, inp, findings, warnings, steps)

    def _consult_expert(self, query: Any, chain: Any, volume: Any, series: int | None, inp: ModelInput) -> str:
        """Ask the segmentation expert for the query's number; its step goes before the conclusion (or last)
        and, when it has a number, the answer gives it beside the perception's."""
        from vol3d.seg.expert import describe
        from vol3d.tasks.reasoning import Step

        measured = [st for st in chain.steps if st.kind == "measure" and st.unit == query.unit]
        finding_box = None
        if query.finding is not None and measured and measured[-1].box is not None:
            finding_box = geometry.boxes_voxel_to_world(measured[-1].box[None], inp.affine)[0]
        labels = self.model.labels
        # the expert prepares the volume its own way: from what was given, or from where a prepared input came from
        source = inp.source if isinstance(volume, ModelInput) else volume
        if source == "<Image>":
            raise ConfigError("the expert reads the volume itself: pass the file, folder, cache entry or Image to ask, "
                              "not a ModelInput prepared from an Image")
        reading = self.expert.read(query, source, series, finding_box, labels.finding_labels if labels else ())
        if reading is None:
            return chain.answer
        at = len(chain.steps) - 1 if chain.steps and chain.steps[-1].kind == "conclusion" else len(chain.steps)
        chain.steps.insert(at, Step("expert", reading.text, None, reading.value, reading.unit,
                                    query.finding or query.organ or "", reading.call))
        if reading.value is None:
            return f"{chain.answer} ({reading.text}.)"
        own = f"; the model's perception reads {measured[-1].value:.0f} {query.unit}" if measured else ""
        return (f"{describe(query, self.model.vocab).capitalize()}: {reading.value:.0f} {reading.unit}, measured by "
                f"the segmentation expert {self.expert.name}{own}.")

    def measurement(self, question: str) -> Any:
        """The measurement a question asks for (:func:`vol3d.tasks.reasoning.parse_question`), None when it
        asks for none or the model has no perception to measure with."""
        from vol3d.tasks.reasoning import parse_question

        if not self.perceives:
            return None
        labels = self.model.labels
        return parse_question(question, self.model.vocab, list(labels.organs[1:]) if labels is not None else [])

    def reason(self, question: str, perceived: Any, inp: ModelInput) -> Any:
        """The reasoning chain of a question about ``perceived`` (:func:`vol3d.tasks.reasoning.reason`),
        None when the question names no finding, organ or measurement."""
        from vol3d.tasks.reasoning import reason

        return reason(question, perceived, self.model.vocab, self.model.labels, inp.spacing)

    @property
    def perceives(self) -> bool:
        """Whether the model has perception (a findings digest before every question)."""
        return getattr(self.model, "perception", None) is not None

    def check_domain(self, inp: ModelInput, perceived: Any = None) -> list[str]:
        """Why ``inp`` does not look like the run's training data (:mod:`vol3d.domain`); [] when it does
        or when the run has no profile (trained before profiles existed)."""
        from vol3d.domain import DomainProfile

        data = getattr(self.model, "domain", None)
        if not data:
            return []
        organs = {r.name: r.volume_ml for r in perceived.organs} if perceived is not None else None
        reasons = DomainProfile.from_dict(data).check(inp.volume, inp.modality, inp.flags, organs)
        for r in reasons:
            log.warning("%s: out of domain: %s", inp.source, r)
        return reasons

    def ehr(self, volume: Any, series: int | None = None) -> dict[str, float]:
        """Probability of each EHR code ``{code: p}`` from the run's EHR head (sorted by code order)."""
        import torch

        vocab = self.code_vocab
        if vocab is None:
            raise ConfigError(f"{self.run_dir or 'this model'} has no EHR head (model.ehr_codes is empty); "
                              "train with loss.ehr > 0")
        inp = self.prepare(volume, series=series)
        with torch.inference_mode():
            logits = self.model.ehr_logits(self._tensor(inp), spacing=inp.spacing)
        probs = torch.sigmoid(logits.float())[0].cpu().numpy()
        return {c: float(p) for c, p in zip(vocab.codes, probs, strict=True)}

    # -- evaluation
    @property
    def vocab(self) -> dict | None:
        """The model's finding vocabulary (None: the model does not record one; evaluation then uses the
        synthetic default)."""
        findings = getattr(self.model.config, "findings", None)
        return self.model.vocab if findings else None

    def presence_set(self, cases: Any, n: int | None = None, seed: int = 0) -> dict[int, list[str]]:
        """Presence questions balanced per finding over the first ``n`` cases of a CacheDataset
        (:func:`vol3d.tasks.samples.balanced_presence`), reading boxes only."""
        from vol3d.tasks.samples import balanced_presence

        n = len(cases) if n is None else n
        scan = getattr(cases, "item_without_pixels", cases.__getitem__)
        return balanced_presence((scan(i) for i in range(n)), self.vocab, seed)

    def measure_priors(self, cache_dir: str | Path, split: str = "train", limit: int = 100) -> dict[str, float] | None:
        """The image-blind answers of the ``measure`` and ``chain`` tasks from the first ``limit`` cases of
        a cache split (:func:`vol3d.eval.reasoning.measure_priors`); None without perception or cases."""
        from vol3d.data.cache import CacheDataset
        from vol3d.eval.reasoning import measure_priors

        if not self.perceives:
            return None
        ds = CacheDataset(cache_dir, split=split, mode="volume", input_size=self.input_shape)
        if len(ds) == 0:
            return None
        return measure_priors((ds[i] for i in range(min(limit, len(ds)))), self.model.vocab, self.model.labels)

    def evaluate(self, cache_dir: str | Path, split: str | None = "test", tasks: Sequence[str] | None = None,
                 limit: int | None = None, image_blind: bool = False, *, samples_per_case: int = 2,
                 max_new_tokens: int = 256, batch_size: int = 8, seed: int = 0,
                 keep_predictions: bool = False) -> dict[str, Any]:
        """Metrics of every task on a cache split (:func:`vol3d.eval.evaluate`), with ``meta`` about the run.

        ``tasks`` defaults to the text tasks plus ``ehr`` when the model has an EHR head;
        ``limit`` keeps the first N cases; the other arguments are :func:`vol3d.eval.evaluate`'s.
        """
        from vol3d.data.cache import CacheDataset, read_manifest
        from vol3d.eval import evaluate

        vocab = self.code_vocab
        tasks = list(tasks) if tasks else self.default_tasks
        if "ehr" in tasks and vocab is None:
            raise ConfigError("task ehr needs a model with an EHR head; this run has none (drop ehr from --tasks)")
        ds = CacheDataset(cache_dir, split=split, mode="volume", input_size=self.input_shape)
        if len(ds) == 0:
            counts: dict[str, int] = {}
            for r in read_manifest(cache_dir):
                counts[str(r.get("split"))] = counts.get(str(r.get("split")), 0) + 1
            raise InputError(f"{cache_dir}: no ok case in split {split!r}; the cache has "
                             + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + " (choose with --split)")
        n = len(ds) if limit is None else min(int(limit), len(ds))
        same = self._check_cache_params(Path(cache_dir))
        from vol3d.eval.reasoning import PERCEPTION_TASKS

        priors = self.measure_priors(cache_dir) if image_blind and set(tasks) & set(PERCEPTION_TASKS) else None
        results = evaluate(self.model, (ds[i] for i in range(n)), tasks, vocab=self.vocab, code_vocab=vocab,
                           priors=priors,
                           image_blind=image_blind, samples_per_case=samples_per_case,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                           keep_predictions=keep_predictions, locate_prefix=self.locate_prefix,
                           presence=self.presence_set(ds, n, seed))
        results["meta"].update({
            "run": str(self.run_dir) if self.run_dir is not None else None,
            "cache": str(cache_dir),
            "split": split,
            "limit": limit,
            "preprocess_matches_run": same,
        })
        return results


def load(run_dir: str | Path, device: str | None = None,
         preprocess_config: str | Path | PreprocessConfig | None = None,
         expert: str | Path | None = None) -> Vol3DPipeline:
    """Load ``RUN/model`` for inference, with the preprocessing of its training data.

    Args:
        run_dir: a ``vol3d train``/``finetune`` run directory (or its ``model/`` folder).
        device: ``cpu``, ``cuda``, ``cuda:N``; None picks a GPU when there is one.
        preprocess_config: overrides the run's own record: a :class:`PreprocessConfig`, a YAML
            preset, a ``preprocess.json`` or a cache's ``params.json``/directory.
        expert: a ``vol3d finetune --task seg`` run that measurement questions about volumes and
            organ lengths consult (:mod:`vol3d.seg.expert`).
    """
    from vol3d.models import Vol3DModel

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"run directory {run_dir} does not exist; "
                         "pass the RUN directory that `vol3d train --run-dir RUN` wrote")
    model_dir = run_dir if (run_dir / "vol3d_config.json").is_file() else run_dir / "model"
    if model_dir == run_dir and run_dir.name == "model":
        run_dir = run_dir.parent
    if (model_dir / "seg_config.json").is_file():
        raise InputError(f"{run_dir} is a segmentation run; use `vol3d predict {run_dir} INPUT --out OUT`")
    if not (model_dir / "vol3d_config.json").is_file():
        raise InputError(f"{run_dir} has no trained model ({model_dir}/vol3d_config.json is missing); "
                         "wait for `vol3d train` to finish, or pass the run directory it wrote")
    if isinstance(preprocess_config, PreprocessConfig):
        pcfg = preprocess_config
    elif preprocess_config is not None:
        pcfg = read_preprocess_config(preprocess_config)
    else:
        pcfg = find_preprocess_config(run_dir)
    dev = resolve_device(device)
    model = Vol3DModel.from_pretrained(model_dir, device=dev)
    consult = None
    if expert is not None:
        from vol3d.seg.expert import SegExpert

        consult = SegExpert.from_run(expert, device=dev)
    return Vol3DPipeline(model, pcfg, run_dir=run_dir, device=dev, expert=consult)


def write_json(data: Any, path: str | Path) -> Path:
    """Write strict JSON (NaN -> null) atomically: a temp file in the same folder, then ``os.replace``."""
    from vol3d.eval import jsonable

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


__all__ = [
    "Answer",
    "AnswerBox",
    "ModelInput",
    "Vol3DPipeline",
    "boxes_from_text",
    "cache_of_run",
    "find_preprocess_config",
    "format_boxes",
    "load",
    "read_image",
    "read_preprocess_config",
    "write_json",
]
