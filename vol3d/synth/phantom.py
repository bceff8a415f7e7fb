"""Analytic phantoms (a chest/abdomen and, in :mod:`vol3d.synth.brain`, a head) in world RAS+
millimetres, rendered on any voxel grid.

An anatomy is a list of quadrics (ellipsoids and capped elliptic cylinders), each
tagged with a tissue of its :class:`Atlas`; later tissues override earlier ones. Findings
are small ellipsoids inside their organ (or, for conditions such as splenomegaly, the
enlarged organ itself). Because the phantom lives in world coordinates, rendering it at
the voxel centres of any acquisition (axial head-first or feet-first, coronal, sagittal,
oblique) gives exact, mutually consistent label maps for every geometry. Each tissue and
finding has a mean intensity per *contrast*: ``"CT"`` (HU) and the MR sequences
(``"T1"``, ``"T2"``, ``"FLAIR"``, arbitrary units 0..1000).

Rendering is vectorised: a quadric's local coordinates are affine in the voxel
index ``(i, j, k)``, so each is a broadcast sum of 1D ramps, and each shape is only
evaluated inside its voxel bounding box.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from preprocess.geometry import apply_affine, box_corners
from vol3d.synth.reports import FINDINGS, VOCAB_FINDINGS

#: Organ label values of ``labels/<key>.nii.gz`` (index = value), see docs/formats.md section 1.
LABELS: tuple[str, ...] = (
    "background",
    "liver",
    "spleen",
    "kidney_left",
    "kidney_right",
    "lung_left",
    "lung_right",
    "spine",
    "aorta",
    "lesion",
)
LABEL_VALUE: dict[str, int] = {name: value for value, name in enumerate(LABELS)}
LESION_LABEL = LABEL_VALUE["lesion"]

# "Infinite" cylinders (body, spine) are capped far outside any field of view.
_LONG_MM = 5000.0


@dataclasses.dataclass(frozen=True)
class Tissue:
    """A tissue class: its organ label and mean intensity per contrast (``{"CT": HU, "T1": ...}``)."""

    name: str
    label: int  # value in the organ label map (0: not labelled)
    means: Mapping[str, float]  # contrast -> mean intensity (HU for "CT", 0..1000 for MR sequences)

    def mean(self, contrast: str) -> float:
        return float(self.means[contrast])


#: Tissue table; the index in this tuple is the value of the rendered tissue map. MR: T1-weighted
#: post-contrast-like signal (the abdomen is exported with one MR sequence).
TISSUES: tuple[Tissue, ...] = (
    Tissue("air", 0, {"CT": -1000.0, "T1": 0.0}),
    Tissue("fat", 0, {"CT": -100.0, "T1": 850.0}),
    Tissue("soft_tissue", 0, {"CT": 40.0, "T1": 300.0}),
    Tissue("lung_left", LABEL_VALUE["lung_left"], {"CT": -850.0, "T1": 40.0}),
    Tissue("lung_right", LABEL_VALUE["lung_right"], {"CT": -850.0, "T1": 40.0}),
    Tissue("heart", 0, {"CT": 140.0, "T1": 450.0}),
    Tissue("liver", LABEL_VALUE["liver"], {"CT": 105.0, "T1": 550.0}),
    Tissue("spleen", LABEL_VALUE["spleen"], {"CT": 115.0, "T1": 450.0}),
    Tissue("kidney_left", LABEL_VALUE["kidney_left"], {"CT": 160.0, "T1": 600.0}),
    Tissue("kidney_right", LABEL_VALUE["kidney_right"], {"CT": 160.0, "T1": 600.0}),
    Tissue("spine", LABEL_VALUE["spine"], {"CT": 380.0, "T1": 350.0}),
    Tissue("aorta", LABEL_VALUE["aorta"], {"CT": 180.0, "T1": 700.0}),
)
TISSUE_INDEX: dict[str, int] = {t.name: i for i, t in enumerate(TISSUES)}

#: Plausible diameter ranges (mm) and intensity ranges per contrast of each lesion type of the abdomen.
#: The organ tissues a lesion may lie in are ``vol3d.synth.reports.FINDINGS[kind]["organs"]``.
LESION_TYPES: dict[str, tuple[float, float, Mapping[str, tuple[float, float]]]] = {
    "liver_lesion": (8.0, 40.0, {"CT": (0.0, 20.0), "T1": (150.0, 250.0)}),
    "lung_nodule": (5.0, 25.0, {"CT": (30.0, 60.0), "T1": (400.0, 500.0)}),
    "kidney_cyst": (8.0, 35.0, {"CT": (0.0, 10.0), "T1": (80.0, 150.0)}),
}


@dataclasses.dataclass(frozen=True)
class Atlas:
    """One synthetic anatomy's tables: what :func:`render` paints and what reports and vocabularies say.

    ``shell`` tissues (skin, fat, skull ...) are painted everywhere their shape is; every other tissue
    only where an earlier tissue at or after ``inner`` is (organs stay inside the body wall or skull).
    """

    name: str
    labels: tuple[str, ...]  # organ label map values (index = value); "lesion" marks finding voxels
    tissues: tuple[Tissue, ...]
    shell: frozenset[str]
    inner: str
    lesion_types: Mapping[str, tuple[float, float, Mapping[str, tuple[float, float]]]]
    findings: Mapping[str, dict]  # report vocabulary: organs, code, measure ... per finding kind
    vocab_findings: Mapping[str, dict]  # the export's vocab.json findings (vol3d.tasks.FindingSpec fields)
    contrasts: tuple[str, ...]  # "CT" and the MR sequences this anatomy is exported with

    @property
    def tissue_index(self) -> dict[str, int]:
        return {t.name: i for i, t in enumerate(self.tissues)}

    @property
    def lesion_label(self) -> int:
        return self.labels.index("lesion")


ABDOMEN = Atlas(
    name="abdomen",
    labels=LABELS,
    tissues=TISSUES,
    shell=frozenset({"fat", "soft_tissue"}),
    inner="soft_tissue",
    lesion_types=LESION_TYPES,
    findings=FINDINGS,
    vocab_findings=VOCAB_FINDINGS,
    contrasts=("CT", "T1"),
)


def rotation(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation matrix ``(3, 3)`` from Euler angles (degrees) about x, then y, then z."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclasses.dataclass(frozen=True)
class Quadric:
    """An ellipsoid, or an elliptic cylinder along its local axis 2 capped at ``|u2| <= 1``.

    Local coordinates are ``u = diag(1 / radii) @ R.T @ (p - center)`` for a world RAS
    point ``p``; the shape is ``|u|^2 <= 1`` (ellipsoid) or ``u0^2 + u1^2 <= 1 and
    |u2| <= 1`` (cylinder).
    """

    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    rot: tuple[tuple[float, ...], ...] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    cylinder: bool = False

    @classmethod
    def make(
        cls,
        center: Sequence[float],
        radii: Sequence[float],
        angles_deg: Sequence[float] = (0.0, 0.0, 0.0),
        cylinder: bool = False,
    ) -> Quadric:
        r = rotation(angles_deg)
        return cls(
            tuple(float(v) for v in center),
            tuple(float(v) for v in radii),
            tuple(tuple(float(v) for v in row) for row in r),
            cylinder,
        )

    @property
    def matrix(self) -> np.ndarray:
        """World -> local scaled coordinates ``(3, 3)``: ``diag(1/radii) @ R.T``."""
        return np.asarray(self.rot).T / np.asarray(self.radii)[:, None]

    def scaled(self, factor: float | Sequence[float]) -> Quadric:
        """The same shape with radii ``radii * factor`` (cylinders keep their length)."""
        r = np.asarray(self.radii) * np.asarray(factor, float)
        if self.cylinder:
            r[2] = self.radii[2]
        return dataclasses.replace(self, radii=tuple(float(v) for v in np.maximum(r, 1e-3)))

    def world_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned world box ``(lo (3,), hi (3,))`` enclosing the shape."""
        r = np.asarray(self.rot) * np.asarray(self.radii)[None, :]  # columns: scaled local axes
        if self.cylinder:
            half = np.sqrt((r[:, :2] ** 2).sum(axis=1)) + np.abs(r[:, 2])
        else:
            half = np.sqrt((r**2).sum(axis=1))
        c = np.asarray(self.center)
        return c - half, c + half

    def level(self, points: np.ndarray) -> np.ndarray:
        """Shape function at world points ``(..., 3)``: ``<= 1`` inside."""
        u = (np.asarray(points, float) - np.asarray(self.center)) @ self.matrix.T
        if self.cylinder:
            return np.maximum(u[..., 0] ** 2 + u[..., 1] ** 2, u[..., 2] ** 2)
        return (u**2).sum(axis=-1)

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Boolean ``(...)``: which world points ``(..., 3)`` lie inside."""
        return self.level(points) <= 1.0


@dataclasses.dataclass(frozen=True)
class Finding:
    """One finding placed in the phantom.

    ``kind`` is a key of its atlas's ``findings``; ``tissue`` the organ tissue it lies in (its
    voxels are the shape intersected with that organ); ``means`` its intensity per contrast.
    Conditions (splenomegaly, hydrocephalus) have no shape of their own: their voxels are the organ's.
    """

    kind: str
    tissue: str
    shape: Quadric | None
    means: Mapping[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """A patient: ordered ``(tissue name, shape)`` pairs plus landmarks used to plan scans."""

    parts: tuple[tuple[str, Quadric], ...]
    body: Quadric  # outer skin surface (elliptic cylinder along z, or the head's ellipsoid)
    z_cover: tuple[float, float]  # z range (mm) every acquisition must cover (all findings lie in it)
    z_top: float  # lung apices or vertex (mm): acquisitions may extend up to here
    intensity_jitter: tuple[float, ...] = ()  # per-tissue additive offset (HU), same length as the tissues
    atlas: Atlas = ABDOMEN

    def shape_of(self, tissue: str) -> Quadric:
        return next(q for name, q in self.parts if name == tissue)


def sample_anatomy(rng: np.random.Generator, spleen_scale: float = 1.0) -> Anatomy:
    """Draw a plausible adult chest/abdomen. ``spleen_scale`` > 1 makes splenomegaly."""
    u = rng.uniform
    a, b = u(130, 170), u(95, 125)  # body semi-axes: left-right, antero-posterior (mm)
    fat = u(10, 28)
    x0, y0 = u(-12, 12), u(-15, 5)
    ai, bi = a - fat, b - fat  # inside the subcutaneous fat
    body = Quadric.make((x0, y0, 0.0), (a, b, _LONG_MM), cylinder=True)
    inner = Quadric.make((x0, y0, 0.0), (ai, bi, _LONG_MM), cylinder=True)
    spine_r = u(15, 19)
    ys = y0 - bi + spine_r + u(12, 20)  # vertebral body centre, just in front of the back muscles
    spine = Quadric.make((x0, ys, 0.0), (spine_r * 1.15, spine_r, _LONG_MM), cylinder=True)
    ao_r = u(10, 13)
    aorta = Quadric.make(
        (x0 - spine_r * 0.5, ys + spine_r + ao_r + 3, 20.0), (ao_r, ao_r, 170.0), cylinder=True
    )
    lung_c = u(95, 115)
    lungs = {
        "lung_right": Quadric.make(
            (x0 + 0.47 * ai, y0 - 0.08 * bi, lung_c - 5),
            (0.40 * ai, 0.74 * bi, lung_c),
            (u(-4, 4), 0, u(-5, 5)),
        ),
        "lung_left": Quadric.make(
            (x0 - 0.49 * ai, y0 - 0.08 * bi, lung_c - 18),
            (0.38 * ai, 0.72 * bi, lung_c),
            (u(-4, 4), 0, u(-5, 5)),
        ),
    }
    heart = Quadric.make(
        (x0 - 0.12 * ai, y0 + 0.3 * bi, 55.0), (0.34 * ai, 0.42 * bi, 55.0), (0, 0, u(-25, -10))
    )
    liver = Quadric.make(
        (x0 + 0.33 * ai, y0 + 0.08 * bi, -50.0 + u(-8, 8)),
        (0.56 * ai, 0.68 * bi, u(72, 85)),
        (u(-8, 8), u(-10, 0), u(-15, 5)),
    )
    sr = np.array([u(20, 26), u(40, 48), u(45, 55)]) * spleen_scale
    spleen = Quadric.make(
        (x0 - 0.62 * ai + 0.35 * (sr[0] - 23), y0 - 0.30 * bi, -45.0 + u(-8, 8)),
        sr,
        (u(-10, 10), 0, u(25, 45)),
    )
    kz_r, kz_l = -128.0 + u(-8, 8), -115.0 + u(-8, 8)  # the right kidney sits lower
    ky = ys + u(0, 10)
    kr = (u(24, 30), u(20, 25), u(48, 58))
    kidneys = {
        "kidney_right": Quadric.make((x0 + spine_r + 0.22 * ai, ky, kz_r), kr, (u(-15, -5), 0, u(-25, -10))),
        "kidney_left": Quadric.make((x0 - spine_r - 0.22 * ai, ky, kz_l), kr, (u(-15, -5), 0, u(10, 25))),
    }
    parts = (
        ("fat", body),
        ("soft_tissue", inner),
        ("lung_left", lungs["lung_left"]),
        ("lung_right", lungs["lung_right"]),
        ("heart", heart),
        ("liver", liver),
        ("spleen", spleen),
        ("kidney_left", kidneys["kidney_left"]),
        ("kidney_right", kidneys["kidney_right"]),
        ("spine", spine),
        ("aorta", aorta),
    )
    z_low = min(q.world_bounds()[0][2] for q in (*kidneys.values(), liver, spleen)) - 12.0
    z_top = max(q.world_bounds()[1][2] for q in lungs.values()) + 10.0
    jitter = tuple(float(v) for v in rng.normal(0.0, 6.0, len(TISSUES)))
    return Anatomy(parts, body, (float(z_low), 60.0), float(z_top), jitter)


# ----------------------------------------------------------------------------- rendering


def _voxel_window(q: Quadric, inv_affine: np.ndarray, shape: Sequence[int]) -> tuple[slice, ...] | None:
    """Index slices of the voxel box that contains ``q`` on a grid, or None if outside it."""
    lo, hi = q.world_bounds()
    vox = apply_affine(inv_affine, box_corners(np.concatenate([lo, hi]))[0])
    start = np.maximum(np.floor(vox.min(axis=0)).astype(int), 0)
    stop = np.minimum(np.ceil(vox.max(axis=0)).astype(int) + 1, np.asarray(shape[:3]))
    if (stop <= start).any():
        return None
    return tuple(slice(int(s0), int(s1)) for s0, s1 in zip(start, stop, strict=True))


def _inside(q: Quadric, affine: np.ndarray, window: tuple[slice, ...]) -> np.ndarray:
    """Boolean mask of ``q`` at the voxel centres of ``window`` (broadcastable to the window's shape).

    Local coordinates are affine in the index: ``u_m = G[m, 0] i + G[m, 1] j + G[m, 2] k + o_m``;
    index axes that a coordinate does not depend on stay length-1 (broadcast), which makes
    axis-aligned shapes on axis-aligned grids nearly free.
    """
    m = q.matrix
    g = m @ affine[:3, :3]
    o = m @ (affine[:3, 3] - np.asarray(q.center))
    ramps = []
    for axis, sl in enumerate(window):
        r = np.arange(sl.start, sl.stop, dtype=np.float32)
        ramps.append(r.reshape([-1 if a == axis else 1 for a in range(3)]))
    scale = np.abs(g).max()
    comps = []
    for row in range(3):
        u = np.float32(o[row])
        for axis in range(3):
            if abs(g[row, axis]) > 1e-9 * scale:
                u = u + np.float32(g[row, axis]) * ramps[axis]
        comps.append(np.asarray(u, dtype=np.float32))
    if q.cylinder:
        return (comps[0] * comps[0] + comps[1] * comps[1] <= 1.0) & (np.abs(comps[2]) <= 1.0)
    return comps[0] * comps[0] + comps[1] * comps[1] + comps[2] * comps[2] <= 1.0


Window = tuple[slice, slice, slice]


def render(
    anatomy: Anatomy, findings: Sequence[Finding], affine: np.ndarray, shape: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, dict[int, Window]]:
    """Tissue and finding-instance maps at the voxel centres of a grid.

    Args:
        affine: ``(4, 4)`` index -> RAS+ mm of the grid.
        shape: ``(X, Y, Z)``.

    Returns:
        ``tissue`` uint8 ``(X, Y, Z)`` (index into the atlas's tissues); ``instances`` uint8
        ``(X, Y, Z)`` (``k`` where finding ``k`` (1-based) is, 0 elsewhere), both
        Fortran-ordered so that each slice ``[:, :, k]`` is contiguous; and the voxel
        window that contains each finding present on the grid (``{k: window}``).
    """
    shape = tuple(int(s) for s in shape)
    inv = np.linalg.inv(affine)
    atlas = anatomy.atlas
    index = atlas.tissue_index
    inner = index[atlas.inner]
    tissue = np.zeros(shape, dtype=np.uint8, order="F")
    for name, q in anatomy.parts:
        win = _voxel_window(q, inv, shape)
        if win is None:
            continue
        inside = _inside(q, affine, win)
        view = tissue[win]
        if name not in atlas.shell:
            inside = inside & (view >= inner)  # organs stay inside the body wall (or the skull)
        np.copyto(view, np.uint8(index[name]), where=inside)
    instances = np.zeros(shape, dtype=np.uint8, order="F")
    windows: dict[int, Window] = {}
    for k, f in enumerate(findings, start=1):
        organ = np.uint8(index[f.tissue])
        if f.shape is not None:
            win = _voxel_window(f.shape, inv, shape)
            if win is None:
                continue
            inside = _inside(f.shape, affine, win) & (tissue[win] == organ) & (instances[win] == 0)
        else:  # a condition is its whole organ, which may be several shapes (both lateral ventricles)
            parts = [w for name, q in anatomy.parts if name == f.tissue
                     if (w := _voxel_window(q, inv, shape)) is not None]
            if not parts:
                continue
            win = tuple(slice(min(w[a].start for w in parts), max(w[a].stop for w in parts)) for a in range(3))
            inside = (tissue[win] == organ) & (instances[win] == 0)
        if inside.any():
            np.copyto(instances[win], np.uint8(k), where=inside)
            windows[k] = win
    return tissue, instances, windows


def label_map(
    tissue: np.ndarray,
    instances: np.ndarray,
    findings: Sequence[Finding],
    windows: dict[int, Window],
    atlas: Atlas = ABDOMEN,
) -> np.ndarray:
    """Organ label map uint8 ``(X, Y, Z)`` (values of ``atlas.labels``); lesion voxels are ``lesion``."""
    lut = np.array([t.label for t in atlas.tissues], dtype=np.uint8)
    labels = lut[tissue]  # fancy indexing keeps the Fortran layout (np.take would not)
    for k, win in windows.items():
        if findings[k - 1].shape is not None:  # conditions (splenomegaly) keep their organ's label
            np.copyto(labels[win], np.uint8(atlas.lesion_label), where=instances[win] == k)
    return labels


def intensity_luts(
    anatomy: Anatomy, findings: Sequence[Finding], contrast: str
) -> tuple[np.ndarray, np.ndarray]:
    """Mean intensity per tissue ``(T,)`` and per finding instance ``(K + 1,)`` (NaN: keep the organ's).

    ``contrast`` is ``"CT"`` (HU) or an MR sequence of the atlas (arbitrary units); the anatomy's
    jitter varies contrast between patients.
    """
    ct = contrast == "CT"
    tissues = anatomy.atlas.tissues
    jitter = np.asarray(anatomy.intensity_jitter or (0.0,) * len(tissues), np.float32) * (1.0 if ct else 4.0)
    base = np.array([t.mean(contrast) for t in tissues], dtype=np.float32)
    base[1:] += jitter[1:]  # air stays air
    lesion = np.array(
        [np.nan] + [float(f.means[contrast]) if f.shape is not None else np.nan for f in findings]
    )
    return base, lesion.astype(np.float32)


def intensity_slice(
    k: int,
    tissue: np.ndarray,
    instances: np.ndarray,
    windows: dict[int, Window],
    luts: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """Noise-free intensity float32 ``(X, Y)`` of slice ``k``: tissue means with lesions painted in."""
    base, lesion = luts
    plane = base[tissue[:, :, k]]
    for inst, (wi, wj, wk) in windows.items():
        if wk.start <= k < wk.stop and not np.isnan(lesion[inst]):
            sub = plane[wi, wj]
            sub[instances[wi, wj, k] == inst] = lesion[inst]
    return plane


# ----------------------------------------------------------------------------- findings

def tissue_at(anatomy: Anatomy, points: np.ndarray) -> np.ndarray:
    """Tissue index ``(...)`` of world points ``(..., 3)`` (same painting rules as :func:`render`)."""
    pts = np.asarray(points, float)
    atlas = anatomy.atlas
    index = atlas.tissue_index
    out = np.zeros(pts.shape[:-1], dtype=np.uint8)
    for name, q in anatomy.parts:
        inside = q.contains(pts)
        if name not in atlas.shell:
            inside &= out >= index[atlas.inner]
        out[inside] = index[name]
    return out


def _probe_points(center: np.ndarray, radius: float) -> np.ndarray:
    """The centre and 14 points on a sphere around it ``(15, 3)``: a lesion fits if all are in its organ."""
    dirs = [np.eye(3)[i] * s for i in range(3) for s in (-1, 1)]
    dirs += [np.array([a, b, c]) / np.sqrt(3) for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)]
    return np.concatenate([center[None], center[None] + radius * np.asarray(dirs)])


def sample_lesion(
    rng: np.random.Generator,
    anatomy: Anatomy,
    kind: str,
    min_diameter: float,
    avoid: Sequence[Finding] = (),
    tries: int = 200,
) -> Finding | None:
    """Place one lesion of ``kind`` fully inside its organ and the covered z range, away from ``avoid``."""
    atlas = anatomy.atlas
    organs = atlas.findings[kind]["organs"]
    d_lo, d_hi, ranges = atlas.lesion_types[kind]
    z_lo, z_hi = anatomy.z_cover
    for _ in range(tries):
        organ = organs[int(rng.integers(len(organs)))]
        d = rng.uniform(max(d_lo, min_diameter), max(d_hi, min_diameter * 1.5))
        r = d / 2.0
        oq = anatomy.shape_of(organ)
        # A point drawn uniformly in the organ's local unit ball, then mapped to the world.
        v = rng.normal(size=3)
        v *= rng.uniform() ** (1 / 3) / np.linalg.norm(v)
        center = np.asarray(oq.center) + np.asarray(oq.rot) @ (np.asarray(oq.radii) * v * 0.85)
        if not (z_lo + r + 2 <= center[2] <= z_hi - r - 2):
            continue
        if not (tissue_at(anatomy, _probe_points(center, r * 1.15)) == atlas.tissue_index[organ]).all():
            continue
        if any(
            f.shape is not None
            and np.linalg.norm(center - np.asarray(f.shape.center)) < r + max(f.shape.radii) + 4
            for f in avoid
        ):
            continue
        shape = Quadric.make(
            center, (r, r * rng.uniform(0.8, 1.0), r * rng.uniform(0.8, 1.0)), rng.uniform(0, 180, 3)
        )
        return Finding(kind, organ, shape, {c: float(rng.uniform(*span)) for c, span in ranges.items()})
    return None


def grow(finding: Finding, factor: float) -> Finding:
    """The same finding at a later time point, ``factor`` times larger (splenomegaly unchanged)."""
    if finding.shape is None:
        return finding
    return dataclasses.replace(finding, shape=finding.shape.scaled(factor))
