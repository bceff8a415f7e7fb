"""What the perception sees, in the form the language model reads it (numpy, torch-free).

A :class:`Region` is one finding instance or one organ in a volume: its box in model-input
voxels, its size in millimetres, its volume, the organ it lies in, and (when predicted) its
score and type probabilities. :class:`Perceived` holds a volume's regions plus the
probabilities of the *condition* findings (not countable, e.g. splenomegaly: a property of an
organ, not an object). The same structure comes from the ground truth of a cached case
(:func:`perceived_from_case`, for training) and from the perception heads' maps
(:func:`perceived_from_maps`, at inference), and :func:`digest_text` writes it as the
*findings digest* that precedes every question::

    Findings: liver lesion x2: <reg> 31 x 28 x 30 mm, liver; <reg> 12 x 10 x 9 mm, liver.
    No lung nodule. Splenomegaly: no. Organs: liver <org> 1520 mL, 160 mm; ...

Each ``<reg>``/``<org>`` placeholder is then filled with that region's token (pooled features,
type, score, box), and a grounding answer's ``<box>`` points at one of them
(:class:`vol3d.models.heads.RegionPointer`): *whether*, *how many*, *how big* and *where* are
all read from one list, so they agree by construction (VILA-M3 feeds expert outputs to the
LM; MedRegion-CT gives region tokens and segmentation-derived sizes as text; PromptMRG
prompts with the classifier's diagnoses).

Sizes follow the reports' convention (:func:`size_triple`): long and short axial extent, then
the craniocaudal extent, in whole millimetres.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from preprocess.errors import ConfigError, InputError
from preprocess.geometry import as_boxes
from vol3d.protocol import ORGAN_TOKEN, REGION_TOKEN
from vol3d.tasks.codes import normalise_code
from vol3d.tasks.findings import FindingSpec, FindingVocab, as_vocab, coarse_organ, organ_matches

#: Boxes less visible than this (cropped away) are no region (as :data:`vol3d.tasks.samples.MIN_VISIBLE`).
MIN_VISIBLE = 0.5


# ----------------------------------------------------------------------------- labels


@dataclasses.dataclass(frozen=True)
class LabelSpec:
    """What the values of a cache's label maps mean.

    Args:
        names: label value -> name (``names[0]`` is the background), e.g. ``("background",
            "liver", ..., "lesion")``.
        finding_labels: names whose voxels are findings (lesions) rather than an organ; they
            override the organ they sit in, as in the synthetic export and most lesion datasets.
    """

    names: tuple[str, ...]
    finding_labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        object.__setattr__(self, "finding_labels", tuple(str(n) for n in self.finding_labels))
        if len(self.names) < 2:
            raise ConfigError("label names need the background (value 0) and at least one class")
        unknown = sorted(set(self.finding_labels) - set(self.names))
        if unknown:
            raise ConfigError(f"finding labels {unknown} are not among the label names {list(self.names)}")
        if self.names[0] in self.finding_labels:
            raise ConfigError("label value 0 (background) cannot be a finding label")

    @property
    def organs(self) -> tuple[str, ...]:
        """Organ classes, background first: every name that is not a finding label."""
        return tuple(n for n in self.names if n not in self.finding_labels)

    def organ_lut(self) -> np.ndarray:
        """``(len(names),)`` int: organ class of each label value, ``-1`` for finding values."""
        organs = self.organs
        return np.array([organs.index(n) if n in organs else -1 for n in self.names], dtype=np.int64)

    @property
    def finding_values(self) -> list[int]:
        return [v for v, n in enumerate(self.names) if n in self.finding_labels]


def organ_text(organ: str) -> str:
    """``"kidney_left"`` -> ``"left kidney"`` (readable, keeps laterality)."""
    words = organ.lower().replace("_", " ").split()
    side = [w for w in words if w in ("left", "right")]
    return " ".join(side + [w for w in words if w not in ("left", "right")])


def size_triple(size_mm: Sequence[float]) -> tuple[int, int, int]:
    """``(dx, dy, dz)`` mm -> ``(long, short, craniocaudal)`` whole millimetres, as reports measure."""
    dx, dy, dz = (float(v) for v in size_mm)
    return int(round(max(dx, dy))), int(round(min(dx, dy))), int(round(dz))


def size_text(size_mm: Sequence[float]) -> str:
    """``"31 x 28 x 30 mm"``: long and short axial, then craniocaudal extent."""
    return " x ".join(str(v) for v in size_triple(size_mm)) + " mm"


# ----------------------------------------------------------------------------- regions


@dataclasses.dataclass(eq=False)  # compared by identity: regions are ordered and looked up in lists
class Region:
    """One finding instance or organ in a model-input volume."""

    kind: str  # "finding" or "organ"
    name: str  # finding name (a vocabulary key) or organ name (a label name)
    box: np.ndarray  # (6,) continuous model-input voxels
    size_mm: np.ndarray  # (3,) box extent (dx, dy, dz) in mm
    volume_ml: float  # voxels x voxel volume
    organ: str = ""  # organ a finding lies in (a label name, "" unknown); an organ: itself
    score: float = 1.0  # detection confidence (1 for ground truth)
    organ_class: int = 0  # organ regions: their class in LabelSpec.organs
    at_edge: bool = False  # it reaches the border of the volume: its extent is a lower bound

    def describe(self) -> str:
        return f"{self.name} {size_text(self.size_mm)}" + (f" in the {organ_text(self.organ)}" if self.organ else "")


@dataclasses.dataclass
class Perceived:
    """A volume's findings (in digest order), organs (label order) and condition probabilities."""

    findings: list[Region]
    organs: list[Region]
    conditions: dict[str, float]
    #: countable findings that exist but lie mostly outside the volume (ground truth only: the
    #: questions about them say so, and so does the digest)
    partial: dict[str, int] = dataclasses.field(default_factory=dict)
    #: the condition classifier's own probabilities, where :func:`vol3d.tasks.reasoning.call_conditions`
    #: replaced them in ``conditions`` by the vocabulary criterion's call
    classifier: dict[str, float] = dataclasses.field(default_factory=dict)
    #: perception only: per countable finding, its strongest voxel (finding x type probability), below
    #: the finding threshold too; what :func:`perceived_summary` scores a finding with no region by
    evidence: dict[str, float] = dataclasses.field(default_factory=dict)
    #: perception only: places below the finding threshold that are the likeliest further instances
    #: (:func:`candidate_regions`); never a finding, only what a measurement question that presumes
    #: one falls back on, saying so (:func:`vol3d.tasks.reasoning.measure`)
    candidates: list[Region] = dataclasses.field(default_factory=list)

    @property
    def regions(self) -> list[Region]:
        """Every region in the order of the digest's ``<reg>``/``<org>`` placeholders."""
        return [*self.findings, *self.organs]

    def count(self, finding: str) -> int:
        return sum(r.name == finding for r in self.findings)


def _countable(vocab: FindingVocab) -> list[str]:
    return [n for n, s in vocab.items() if s.countable]


def _conditions(vocab: FindingVocab) -> list[str]:
    return [n for n, s in vocab.items() if not s.countable]


def _order(findings: list[Region], vocab: FindingVocab) -> list[Region]:
    """Vocabulary order, then largest first (so "the largest" is the first of its kind)."""
    names = list(vocab)
    return sorted(findings, key=lambda r: (names.index(r.name), -float(np.prod(r.size_mm)), tuple(r.box[:3])))


def _box_of(mask: np.ndarray) -> np.ndarray:
    """The voxel box ``(6,)`` of a non-empty mask (from its projections on each axis: no index list)."""
    lo, hi = [], []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        lo.append(hit[0] - 0.5)
        hi.append(hit[-1] + 0.5)
    return np.asarray(lo + hi, dtype=np.float64)


def touches_border(box: np.ndarray, shape: Sequence[int]) -> bool:
    """Whether a voxel box ``(6,)`` reaches the border of a volume of ``shape`` (what lies beyond is unseen)."""
    return bool((box[:3] <= -0.5 + 1e-6).any() or (box[3:] >= np.asarray(shape, float) - 0.5 - 1e-6).any())


def _organ_regions(organ_map: np.ndarray, labels: LabelSpec, spacing: np.ndarray,
                   scores: np.ndarray | None = None) -> list[Region]:
    from scipy import ndimage

    voxel_ml = float(np.prod(spacing)) / 1000.0
    out = []
    counts = np.bincount(organ_map.reshape(-1), minlength=len(labels.organs))
    spans = ndimage.find_objects(organ_map)  # every organ's bounding slices in one pass
    for k, name in enumerate(labels.organs):
        if k == 0 or counts[k] == 0:
            continue
        box = np.array([s.start - 0.5 for s in spans[k - 1]] + [s.stop - 0.5 for s in spans[k - 1]], np.float64)
        out.append(Region("organ", name, box, (box[3:] - box[:3]) * spacing, counts[k] * voxel_ml, name,
                          float(scores[k]) if scores is not None else 1.0, k, touches_border(box, organ_map.shape)))
    return out


# ----------------------------------------------------------------------------- ground truth


@dataclasses.dataclass
class DenseTargets:
    """Per-voxel training targets of one case (model-input grid ``(X, Y, Z)``)."""

    organ: np.ndarray | None  # int64: organ class, finding voxels filled by the nearest organ; None: no label map
    finding: np.ndarray | None  # float32 0/1: any finding; None: the case has no finding annotation
    finding_type: np.ndarray | None  # int64: countable type index on finding voxels, -100 elsewhere
    region_map: np.ndarray  # int64: index of the finding region (digest order) per voxel, -1 elsewhere
    conditions: np.ndarray | None  # float32 (C,): condition findings present (None: unknown)


def _case_boxes(case: Mapping[str, Any]) -> tuple[np.ndarray, list[str], list[str], np.ndarray] | None:
    from vol3d.tasks.samples import BOX_FINDINGS, BOX_ORGANS, has_boxes, visible_fractions

    if not has_boxes(case):
        return None
    boxes = as_boxes(np.asarray(case["boxes_vox"], dtype=np.float64))
    findings = [str(f) for f in case[BOX_FINDINGS]]
    organs = [str(o) for o in case.get(BOX_ORGANS) or []] or [""] * len(findings)
    return boxes, findings, organs, visible_fractions(case, len(boxes))


def _ellipsoid(box: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Voxels whose centre lies in the ellipsoid inscribed in ``box``: a pseudo-mask for box-only data."""
    lo, hi = np.maximum(np.ceil(box[:3]).astype(int), 0), np.minimum(np.floor(box[3:]).astype(int) + 1, shape)
    mask = np.zeros(tuple(int(s) for s in shape), bool)
    if (hi <= lo).any():
        return mask
    centre, radius = (box[:3] + box[3:]) / 2, np.maximum((box[3:] - box[:3]) / 2, 0.5)
    grid = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij")
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radius, strict=True)) <= 1.0
    mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = inside
    return mask


def _fill_from_nearest(organ: np.ndarray, holes: np.ndarray) -> np.ndarray:
    """``organ`` with each voxel of ``holes`` given the value of its nearest voxel outside them (Euclidean
    distance transform), computed on the holes' bounding box plus a two-voxel margin: the nearest
    voxel outside a hole is never further out than that (the same result as over the whole volume,
    in a fraction of the time: a cached case's ground truth 11 -> 2 ms)."""
    from scipy import ndimage

    lo, hi = _box_of(holes).reshape(2, -1)
    lo = np.maximum(lo + 0.5 - 2, 0).astype(int)
    hi = np.minimum(hi + 0.5 + 2, holes.shape).astype(int)
    window = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    nearest = ndimage.distance_transform_edt(holes[window], return_distances=False, return_indices=True)
    out = organ.copy()
    out[window] = organ[window][tuple(nearest)]
    return out


def perceived_from_case(case: Mapping[str, Any], vocab: Mapping[str, Any] | None, labels: LabelSpec | None,
                        ) -> tuple[Perceived, DenseTargets]:
    """The ground truth of a cached case (a :class:`vol3d.data.cache.CacheDataset` item) as regions
    and per-voxel targets.

    Findings are the case's boxes of countable findings that are at least half visible; their voxels
    are the label map's finding voxels inside the box (an inscribed ellipsoid when the export gave a
    box but no mask). Conditions are present when any visible box names them. Organs come from the
    label map, finding voxels counted with the organ around them.
    """
    vocab = as_vocab(vocab)
    spacing = np.asarray(case.get("spacing", (1.0, 1.0, 1.0)), dtype=np.float64)
    shape = tuple(int(s) for s in np.shape(case["image"])[-3:])
    label = case.get("label")
    has_label = bool(case.get("has_label", label is not None)) and labels is not None and label is not None
    lab = np.asarray(label, dtype=np.int64) if has_label else None
    organ = finding_vox = None
    if lab is not None:
        assert labels is not None
        if lab.size and int(lab.max()) >= len(labels.names):
            raise InputError(f"case {case.get('id', '?')}: its label map has value {int(lab.max())} but the label "
                             f"names are {list(labels.names)}; give every label value a name")
        lut = labels.organ_lut()
        organ = lut[lab]
        finding_vox = organ < 0
        if finding_vox.any():  # a lesion belongs to the organ around it
            organ = _fill_from_nearest(organ, finding_vox)
    boxed = _case_boxes(case)
    countable, conditions = _countable(vocab), _conditions(vocab)
    findings: list[Region] = []
    masks: list[np.ndarray] = []
    partial: dict[str, int] = {}
    cond = None
    if boxed is not None:
        boxes, names, box_organs, visible = boxed
        unknown = sorted(set(names) - set(vocab))
        if unknown:
            raise InputError(f"case {case.get('id', '?')}: findings {unknown} are not in the finding vocabulary "
                             f"({sorted(vocab)}); add them (docs/tasks_and_metrics.md)")
        voxel_ml = float(np.prod(spacing)) / 1000.0
        cond = np.array([float(any(n == c and v >= MIN_VISIBLE for n, v in zip(names, visible, strict=True)))
                         for c in conditions], np.float32)
        for j, name in enumerate(names):
            if name in countable and 0 < visible[j] < MIN_VISIBLE:
                partial[name] = partial.get(name, 0) + 1
            if name not in countable or visible[j] < MIN_VISIBLE:
                continue
            box = boxes[j]
            lo = np.maximum(np.ceil(box[:3]).astype(int), 0)
            hi = np.minimum(np.floor(box[3:]).astype(int) + 1, shape)
            mask = np.zeros(shape, bool)
            if finding_vox is not None and (hi > lo).all():
                sub = finding_vox[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
                mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = sub
            if not mask.any():
                mask = _ellipsoid(box, shape)
            spec: FindingSpec = vocab[name]
            findings.append(Region("finding", name, box.copy(), (box[3:] - box[:3]) * spacing,
                                   float(mask.sum()) * voxel_ml, box_organs[j] or spec.organ,
                                   at_edge=bool(visible[j] < 0.999) or touches_border(box, shape)))
            masks.append(mask)
    ordered = _order(findings, vocab)
    masks = [masks[findings.index(r)] for r in ordered]
    findings = ordered
    region_map = np.full(shape, -1, np.int64)
    finding_type = np.full(shape, -100, np.int64)
    for i, (r, m) in enumerate(zip(findings, masks, strict=True)):
        region_map[m] = i
        finding_type[m] = countable.index(r.name)
    if boxed is not None:
        any_finding = region_map >= 0
        if finding_vox is not None:  # finding voxels outside every usable box stay findings (e.g. cut lesions)
            any_finding |= finding_vox
        finding = any_finding.astype(np.float32)
    else:
        finding = finding_vox.astype(np.float32) if finding_vox is not None else None
    organs = _organ_regions(organ, labels, spacing) if organ is not None and labels is not None else []
    perceived = Perceived(findings, organs, dict(zip(conditions, cond.tolist(), strict=True)) if cond is not None else {},
                          partial)
    targets = DenseTargets(organ, finding, finding_type if boxed is not None else None, region_map, cond)
    return perceived, targets


# ----------------------------------------------------------------------------- predictions


def clean_organ_map(organ_map: np.ndarray, keep_fraction: float = 0.2) -> np.ndarray:
    """A predicted organ map with each organ's stray fragments set to background (0).

    Per organ class, the largest connected component stays, and so does every other component of at
    least ``keep_fraction`` of its size (a class that covers two organs, e.g. "kidneys", keeps both);
    nnU-Net's largest-component post-processing. A few voxels of spleen predicted inside the liver
    would otherwise stretch the spleen's box over both organs. ``keep_fraction`` 0 returns the map
    unchanged.
    """
    from scipy import ndimage

    organ_map = np.asarray(organ_map)
    if keep_fraction <= 0:
        return organ_map
    out = organ_map.copy()
    for k in np.unique(organ_map):
        if k == 0:
            continue
        comps, n = ndimage.label(organ_map == k)
        if n < 2:
            continue
        sizes = np.bincount(comps.reshape(-1), minlength=n + 1)[1:]
        drop = np.flatnonzero(sizes < keep_fraction * sizes.max()) + 1
        out[np.isin(comps, drop)] = 0
    return out


def perceived_from_maps(organ_map: np.ndarray | None, finding_prob: np.ndarray, type_prob: np.ndarray,
                        condition_prob: Sequence[float], spacing: Sequence[float], vocab: Mapping[str, Any] | None,
                        labels: LabelSpec | None, threshold: float = 0.5, max_findings: int = 8,
                        organ_scores: np.ndarray | None = None) -> tuple[Perceived, np.ndarray]:
    """Regions of one volume from the perception heads (see :class:`vol3d.models.perception.Perception`).

    Args:
        organ_map: ``(X, Y, Z)`` organ class per voxel (argmax), or None without an organ head.
        finding_prob: ``(X, Y, Z)`` probability that a voxel is a finding.
        type_prob: ``(T, X, Y, Z)`` probability of each countable type, given a finding.
        condition_prob: probability of each condition finding (vocabulary order).
        threshold: voxels above it are finding voxels; each connected component is one finding.
        max_findings: the most confident components kept.

    Returns the :class:`Perceived` and the finding region map ``(X, Y, Z)`` (index in
    ``perceived.findings`` per voxel, -1 elsewhere), which pools each region's features.
    """
    from scipy import ndimage

    vocab = as_vocab(vocab)
    spacing = np.asarray(spacing, dtype=np.float64)
    countable, conditions = _countable(vocab), _conditions(vocab)
    comps, n = ndimage.label(finding_prob > threshold)
    homes = ([np.array([k > 0 and organ_matches(o, vocab[name].organ) for k, o in enumerate(labels.organs)])
              for name in countable] if labels is not None else [])
    cands = []
    for k, sl in enumerate(ndimage.find_objects(comps), start=1):
        if sl is None:
            continue
        local = comps[sl] == k
        score = float(finding_prob[sl][local].mean())
        types = type_prob[(slice(None), *sl)][:, local].mean(axis=1)
        t = int(np.argmax(types))
        region = _finding_region(comps, k, sl, countable[t], score, spacing, organ_map, labels,
                                 homes[t] if homes else None)
        cands.append((score * float(types[t]), k, region))
    cands.sort(key=lambda c: -c[0])
    kept = cands[:max_findings]
    findings = _order([r for _, _, r in kept], vocab)
    region_map = np.full(finding_prob.shape, -1, np.int64)
    for _, k, r in kept:
        region_map[comps == k] = findings.index(r)
    organs = _organ_regions(organ_map, labels, spacing, organ_scores) if organ_map is not None and labels else []
    evidence: dict[str, float] = {}
    below: list[Region] = []
    taken = comps > 0
    for t, name in enumerate(countable):  # each type's finding x type map, read for both
        product = finding_prob * type_prob[t]
        evidence[name] = float(product.max()) if product.size else 0.0
        below += _type_candidates(product, finding_prob, taken, name, spacing, organ_map, labels,
                                  homes[t] if homes else None)
    perceived = Perceived(findings, organs, {c: float(p) for c, p in zip(conditions, condition_prob, strict=True)},
                          evidence=evidence, candidates=below)
    return perceived, region_map


def _finding_region(comps: np.ndarray, k: int, sl: tuple[slice, ...], name: str, score: float,
                    spacing: np.ndarray, organ_map: np.ndarray | None, labels: LabelSpec | None,
                    home: np.ndarray | None) -> Region:
    """The :class:`Region` of component ``k`` of ``comps`` (its bounding slices ``sl``), typed ``name``.

    Its organ is the commonest organ class under and next to it, among the organs its type lives in
    (``home``: a mask over the organ classes) when any is there (a tumour at the cortex lies in the
    white matter)."""
    from scipy import ndimage

    local = comps[sl] == k
    box = np.array([s.start - 0.5 for s in sl] + [s.stop - 0.5 for s in sl], np.float64)
    where = ""
    if organ_map is not None and labels is not None:
        near = tuple(slice(max(a.start - 1, 0), a.stop + 1) for a in sl)  # the box and one voxel around it
        ring = ndimage.binary_dilation(comps[near] == k, iterations=1)
        classes = np.bincount(organ_map[near][ring].reshape(-1), minlength=len(labels.organs))
        classes[0] = 0
        mine = classes * home if home is not None else classes
        where = labels.organs[int(np.argmax(mine if mine.any() else classes))] if classes.any() else ""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return Region("finding", name, box, (box[3:] - box[:3]) * spacing, float(local.sum()) * voxel_ml, where, score,
                  at_edge=touches_border(box, comps.shape))


#: A place below the finding threshold is a candidate (:func:`candidate_regions`) when its finding x
#: type probability reaches this; below it the perception has seen nothing there to speak of.
CANDIDATE_MIN_EVIDENCE = 0.05

#: ... and stands this many times above the volume's median finding x type probability: a peak, not a
#: level (an untrained or unsure model's flat map has no candidates).
CANDIDATE_CONTRAST = 4.0

#: Candidates kept per countable finding: a distance question needs two instances.
CANDIDATES_PER_FINDING = 2

#: Places looked at per countable finding before giving up (rims of found regions are passed over).
CANDIDATE_TRIES = 8


def candidate_regions(finding_prob: np.ndarray, type_prob: np.ndarray, taken: np.ndarray, spacing: np.ndarray,
                      countable: Sequence[str], organ_map: np.ndarray | None = None,
                      labels: LabelSpec | None = None, homes: Sequence[np.ndarray] = (),
                      min_evidence: float = CANDIDATE_MIN_EVIDENCE,
                      per_finding: int = CANDIDATES_PER_FINDING) -> list[Region]:
    """The likeliest further instances of each countable finding, below the finding threshold.

    For each type, the strongest voxel of ``finding_prob x type_prob[t]`` outside the found regions
    (``taken``) that reaches ``min_evidence`` and :data:`CANDIDATE_CONTRAST` times the volume's
    median seeds a candidate: the connected voxels at least half as probable as it (its extent at
    half maximum). Where that extent reaches a found region the place is the region's rim, not an
    instance of its own, and is passed over. Then the next strongest place, up to ``per_finding``
    candidates (and :data:`CANDIDATE_TRIES` places) per type. A candidate's ``score`` is its mean
    finding probability. Strongest first per type, types in ``countable`` order."""
    taken = np.asarray(taken, dtype=bool)
    return [r for t, name in enumerate(countable)
            for r in _type_candidates(finding_prob * type_prob[t], finding_prob, taken, name, spacing, organ_map,
                                      labels, homes[t] if len(homes) else None, min_evidence, per_finding)]


def _type_candidates(evidence: np.ndarray, finding_prob: np.ndarray, taken: np.ndarray, name: str,
                     spacing: np.ndarray, organ_map: np.ndarray | None, labels: LabelSpec | None,
                     home: np.ndarray | None, min_evidence: float = CANDIDATE_MIN_EVIDENCE,
                     per_finding: int = CANDIDATES_PER_FINDING) -> list[Region]:
    """:func:`candidate_regions` of one type, whose finding x type probability is ``evidence``."""
    from scipy import ndimage

    if not evidence.size:
        return []
    out: list[Region] = []
    marks = np.zeros(evidence.shape, np.int32)  # one place at a time, in the frame the regions read
    floor = max(min_evidence, CANDIDATE_CONTRAST * float(np.median(evidence)))
    linked = np.where(taken, np.inf, evidence)  # a found region joins every extent that reaches it
    free = np.where(taken, 0.0, evidence)
    # every extent at half a peak >= floor lies inside one component of this: label only its box after
    support, _ = ndimage.label(linked >= floor / 2)
    windows = ndimage.find_objects(support)
    for _ in range(CANDIDATE_TRIES):
        peak_at = np.unravel_index(int(np.argmax(free)), free.shape)
        peak = float(free[peak_at])
        if peak < floor or len(out) == per_finding:
            break
        win = windows[int(support[peak_at]) - 1]
        local, _ = ndimage.label(linked[win] >= peak / 2)
        marks[win] = local == local[tuple(p - w.start for p, w in zip(peak_at, win, strict=True))]
        sl = ndimage.find_objects(marks[win])[0]
        sl = tuple(slice(w.start + a.start, w.start + a.stop) for w, a in zip(win, sl, strict=True))
        if not taken[sl][marks[sl] > 0].any():
            score = float(finding_prob[sl][marks[sl] > 0].mean())
            out.append(_finding_region(marks, 1, sl, name, score, spacing, organ_map, labels, home))
        near = tuple(slice(max(a.start - 1, 0), a.stop + 1) for a in sl)
        free[near][ndimage.binary_dilation(marks[near] > 0, iterations=1)] = 0.0
        marks[win] = 0
    return out


def look_again_windows(boxes: Sequence[np.ndarray], shape: Sequence[int], patch: Sequence[int],
                       ) -> list[tuple[slice, ...]]:
    """Crops of ``patch`` voxels (at most ``shape``) centred on each box ``(6,)`` and kept inside the
    volume: where the perception looks again (:func:`stitch_looks`). Boxes whose crop another box
    already gave are looked at once."""
    dims = np.asarray(shape, dtype=np.int64)
    size = np.minimum(np.asarray(patch, dtype=np.int64), dims)
    out: list[tuple[slice, ...]] = []
    for box in boxes:
        centre = np.floor((np.asarray(box[:3], float) + np.asarray(box[3:], float)) / 2 + 0.5).astype(np.int64)
        lo = np.clip(centre - size // 2, 0, dims - size)
        window = tuple(slice(int(a), int(a + s)) for a, s in zip(lo, size, strict=True))
        if window not in out:
            out.append(window)
    return out


def stitch_looks(first: np.ndarray, looks: Sequence[np.ndarray], windows: Sequence[tuple[slice, ...]]) -> np.ndarray:
    """The mean, per voxel, of the first look ``first (..., X, Y, Z)`` and of every look ``(..., x, y, z)``
    whose window covers the voxel (the maps of the crops of :func:`look_again_windows`): an ensemble of
    the views, so a voxel no crop covers keeps the first look's value."""
    if len(looks) != len(windows):
        raise ValueError(f"{len(looks)} looks for {len(windows)} windows")
    lead = (slice(None),) * (first.ndim - 3)
    total = first.astype(np.float64)
    count = np.ones(first.shape[-3:], dtype=np.float64)
    for look, window in zip(looks, windows, strict=True):
        total[lead + window] += look
        count[window] += 1
    return (total / count).astype(first.dtype)


# ----------------------------------------------------------------------------- the digest


def perceived_present(perceived: Perceived, threshold: float = 0.5) -> set[str]:
    """The findings the perception calls present: countable ones with a region, conditions at ``threshold``."""
    return {r.name for r in perceived.findings} | {c for c, p in perceived.conditions.items() if p >= threshold}


def digest_text(perceived: Perceived, vocab: Mapping[str, Any] | None, condition_threshold: float = 0.5) -> str:
    """The findings digest: every countable finding (count, then each instance's ``<reg>``, size and
    organ, largest first) or its absence, each condition yes/no, then each organ's ``<org>``,
    volume and craniocaudal extent. One ``<reg>``/``<org>`` per region, in ``perceived.regions`` order."""
    vocab = as_vocab(vocab)
    parts = []
    for name, spec in vocab.items():
        if not spec.countable:
            continue
        mine = [r for r in perceived.findings if r.name == name]
        cut = perceived.partial.get(name, 0)
        outside = f"{cut} partly outside the volume" if cut else ""
        if not mine:
            parts.append(f"{spec.text}: {outside}." if cut else f"No {spec.text}.")
            continue
        items = "; ".join(f"{REGION_TOKEN} {size_text(r.size_mm)}" + (f", {organ_text(r.organ)}" if r.organ else "")
                          for r in mine)
        parts.append(f"{spec.text} x{len(mine)}: {items}" + (f"; +{outside}." if cut else "."))
    for name, p in perceived.conditions.items():
        parts.append(f"{vocab[name].text.capitalize()}: {'yes' if p >= condition_threshold else 'no'}.")
    text = "Findings: " + " ".join(parts)
    if perceived.organs:
        # the craniocaudal extent only for organs a condition is a state of (a report gives the length
        # of an enlarged spleen): every digit is a token the LM reads for every question
        measured = {coarse_organ(vocab[c].organ) for c in perceived.conditions}
        organs = "; ".join(f"{organ_text(r.name)} {ORGAN_TOKEN} {r.volume_ml:.0f} mL"
                           + (f", {size_triple(r.size_mm)[2]} mm" if coarse_organ(r.name) in measured else "")
                           for r in perceived.organs)
        text += f" Organs: {organs}."
    return text


def region_features(perceived: Perceived, shape: Sequence[int], vocab: Mapping[str, Any] | None,
                    labels: LabelSpec | None) -> np.ndarray:
    """``(R, M)`` float32 descriptors of each region (:data:`REGION_FEATURES` columns), the part of a
    region token that is not pooled from the decoder's features."""
    vocab = as_vocab(vocab)
    countable = _countable(vocab)
    n_types, n_organs = len(countable), len(labels.organs) if labels is not None else 1
    shape_arr = np.asarray(shape, dtype=np.float64)
    rows = []
    for r in perceived.regions:
        kind = [1.0, 0.0] if r.kind == "finding" else [0.0, 1.0]
        typ = np.zeros(n_types)
        if r.kind == "finding":
            typ[countable.index(r.name)] = 1.0
        org = np.zeros(n_organs)
        if labels is not None and r.organ in labels.organs:
            org[labels.organs.index(r.organ)] = 1.0
        centre = ((r.box[:3] + r.box[3:]) / 2 + 0.5) / shape_arr  # 0..1, as normalised boxes
        extent = (r.box[3:] - r.box[:3]) / shape_arr
        rows.append(np.concatenate([kind, typ, org, [r.score], centre, extent,
                                    np.log1p(np.asarray(r.size_mm)) / 5.0, [np.log1p(r.volume_ml) / 8.0]]))
    return np.asarray(rows, np.float32).reshape(-1, region_feature_dim(vocab, labels))


def region_feature_dim(vocab: Mapping[str, Any] | None, labels: LabelSpec | None) -> int:
    """Width ``M`` of :func:`region_features`: kind (2), type one-hot, organ one-hot, score, centre (3),
    extent (3), log size in mm (3), log volume."""
    return 2 + len(_countable(as_vocab(vocab))) + (len(labels.organs) if labels is not None else 1) + 11


def summary_dim(vocab: Mapping[str, Any] | None, labels: LabelSpec | None) -> int:
    """Width of :func:`perceived_summary`."""
    vocab = as_vocab(vocab)
    return 2 * len(_countable(vocab)) + len(_conditions(vocab)) + (len(labels.organs) - 1 if labels is not None else 0)


def summary_score_columns(vocab: Mapping[str, Any] | None, codes: Sequence[str]) -> list[int]:
    """For each EHR code, the column of :func:`perceived_summary` holding the score of the vocabulary
    finding whose ``code`` it is (a countable finding's most confident instance, a condition's
    probability), or -1 when no finding names it (codes compared as :func:`vol3d.tasks.codes.normalise_code`)."""
    vocab = as_vocab(vocab)
    column = _score_columns(vocab)
    by_code: dict[str, int] = {}
    for name, spec in vocab.items():
        if spec.code:
            by_code.setdefault(normalise_code(spec.code), column[name])
    return [by_code.get(normalise_code(c), -1) for c in codes]


def _score_columns(vocab: FindingVocab) -> dict[str, int]:
    """The layout of :func:`perceived_summary`: each finding's score column (a countable finding's is
    followed by its count's); the organ volumes come after the last."""
    countable, conditions = _countable(vocab), _conditions(vocab)
    return {**{n: 2 * i for i, n in enumerate(countable)},
            **{n: 2 * len(countable) + j for j, n in enumerate(conditions)}}


def perceived_summary(perceived: Perceived, vocab: Mapping[str, Any] | None, labels: LabelSpec | None,
                      evidence: bool = False) -> np.ndarray:
    """``(S,)`` float32 what a volume shows, for the EHR head: per countable finding the score of its
    most confident instance and ``log(1 + count)``, each condition's probability, each organ's
    ``log(1 + mL / 100)``. From ground truth in training and from the perception at inference,
    as the digest is.

    ``evidence``: a countable finding the perception found no region of scores its strongest voxel
    (:attr:`Perceived.evidence`) up to 0.5, where the EHR prior is neutral, instead of 0 (a found one
    scores its voxels' mean, above the finding threshold). The EHR prior reads this version
    (``pack_regions(...)["prior"]``): a 0 says nothing about which volumes came closest, and a code's
    AUROC ranks exactly that. The EHR head's input keeps 0, the value it learned from."""
    vocab = as_vocab(vocab)
    row = np.zeros(summary_dim(vocab, labels), np.float32)
    columns = _score_columns(vocab)
    for name, col in columns.items():
        if vocab[name].countable:
            mine = [r.score for r in perceived.findings if r.name == name]
            hint = min(perceived.evidence.get(name, 0.0), 0.5) if evidence else 0.0
            row[col : col + 2] = max(mine, default=hint), np.log1p(len(mine))
        else:
            row[col] = perceived.conditions.get(name, 0.0)
    if labels is not None:
        volumes = {r.name: r.volume_ml for r in perceived.organs}
        start = 2 * len(_countable(vocab)) + len(_conditions(vocab))
        row[start:] = [np.log1p(volumes.get(o, 0.0) / 100.0) for o in labels.organs[1:]]
    return row


def pack_regions(perceived: Sequence[Perceived], finding_maps: Sequence[np.ndarray],
                 organ_maps: Sequence[np.ndarray | None], shape: Sequence[int], vocab: Mapping[str, Any] | None,
                 labels: LabelSpec | None) -> dict[str, np.ndarray]:
    """The regions of ``B`` volumes as padded arrays, what the model's region tokens are made of.

    Returns ``kind (B, R)`` (0 finding, 1 organ, -1 padding), ``index (B, R)`` (the finding's value in
    ``finding_map`` or the organ's class), ``meta (B, R, M)`` (:func:`region_features`), ``box (B, R, 6)``
    (0..1 model-input frame, :func:`preprocess.geometry.unit_boxes`), ``finding_map (B, X, Y, Z)`` and
    ``organ_map (B, X, Y, Z)`` (zeros for a volume without one), ``summary (B, S)``
    (:func:`perceived_summary`) and ``prior (B, S)`` (the same with each finding found nowhere scored by its
    evidence, what the EHR prior reads). ``R >= 1``.
    """
    from preprocess.geometry import unit_boxes

    b = len(perceived)
    r = max([len(p.regions) for p in perceived] + [1])
    width = region_feature_dim(vocab, labels)
    out = {"kind": np.full((b, r), -1, np.int64), "index": np.zeros((b, r), np.int64),
           "meta": np.zeros((b, r, width), np.float32), "box": np.zeros((b, r, 6), np.float32),
           "finding_map": np.stack([np.asarray(m, np.int64) for m in finding_maps]) if b else np.zeros((0, *shape)),
           "organ_map": np.stack([np.zeros(tuple(shape), np.int64) if m is None else np.asarray(m, np.int64)
                                  for m in organ_maps]) if b else np.zeros((0, *shape)),
           "summary": np.stack([perceived_summary(p, vocab, labels) for p in perceived]).reshape(
               b, summary_dim(vocab, labels)),
           "prior": np.stack([perceived_summary(p, vocab, labels, evidence=True) for p in perceived]).reshape(
               b, summary_dim(vocab, labels))}
    for i, p in enumerate(perceived):
        regions = p.regions
        if not regions:
            continue
        n = len(regions)
        out["kind"][i, :n] = [0 if reg.kind == "finding" else 1 for reg in regions]
        out["index"][i, :n] = [j if reg.kind == "finding" else reg.organ_class for j, reg in enumerate(regions)]
        out["meta"][i, :n] = region_features(p, shape, vocab, labels)
        out["box"][i, :n] = unit_boxes(np.stack([reg.box for reg in regions]), shape)
    return out


def matching_regions(perceived: Perceived, boxes_vox: np.ndarray, min_iou: float = 0.5) -> list[int]:
    """Indices (in ``perceived.regions``) of the regions whose box overlaps one of ``boxes_vox (N, 6)``
    by at least ``min_iou``: the regions a grounding answer about those boxes should point at."""
    from preprocess.geometry import box_iou

    regions = perceived.regions
    if not regions or not len(boxes_vox):
        return []
    iou = box_iou(np.stack([r.box for r in regions]), as_boxes(boxes_vox))  # (R, N)
    return [i for i in range(len(regions)) if iou[i].max() >= min_iou]


__all__ = [
    "DenseTargets", "LabelSpec", "Perceived", "Region", "clean_organ_map", "coarse_organ", "digest_text",
    "look_again_windows", "matching_regions", "organ_text", "pack_regions", "perceived_from_case",
    "perceived_from_maps", "perceived_present", "perceived_summary", "region_feature_dim", "region_features", "size_text", "size_triple",
    "stitch_looks", "summary_dim", "summary_score_columns", "touches_border",
]
