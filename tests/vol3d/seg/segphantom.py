"""Analytic organ phantom in WORLD coordinates, DICOM/NIfTI writers in any orientation, oracle models.

The truth is a function of RAS+ world millimetres (:func:`label_at`), so a label map on
any grid is computed from that grid's affine alone: a mask that lands back on the
original grid can be checked without trusting any of vol3d's own index bookkeeping.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from preprocess import geometry
from preprocess.config import PreprocessConfig
from preprocess.store import write_case
from preprocess.transforms import prepare
from preprocess.types import Image
from vol3d.synth.dicom_writer import slice_positions, write_series

CLASSES = ["background", "liver", "spleen", "kidney"]
BODY = (np.zeros(3), np.array([70.0, 55.0, 60.0]))  # centre, radii (mm)
ORGANS = [  # label, centre (RAS mm), radii (mm)
    (1, np.array([-22.0, 8.0, 5.0]), np.array([24.0, 18.0, 20.0])),
    (2, np.array([30.0, -10.0, 12.0]), np.array([12.0, 10.0, 16.0])),
    (3, np.array([5.0, -30.0, -22.0]), np.array([10.0, 9.0, 12.0])),
]
HU_AIR = -1000.0


def _inside(points: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return (((points - centre) / radii) ** 2).sum(-1) <= 1.0


def label_at(points_ras: np.ndarray, shift: Sequence[float] = (0, 0, 0)) -> np.ndarray:
    """Organ label (uint8) at RAS mm points ``(..., 3)``; ``shift`` moves the organs (case variety)."""
    out = np.zeros(points_ras.shape[:-1], np.uint8)
    for value, centre, radii in ORGANS:
        out[_inside(points_ras, centre + np.asarray(shift), radii)] = value
    return out


def hu_at(points_ras: np.ndarray, shift: Sequence[float] = (0, 0, 0)) -> np.ndarray:
    """CT value: air outside the body, 0 HU inside, 100 HU per organ label (an image an oracle can read)."""
    hu = np.where(_inside(points_ras, *BODY), 0.0, HU_AIR)
    lab = label_at(points_ras, shift)
    return np.where(lab > 0, 100.0 * lab, hu).astype(np.float32)


def dice_by_class(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice of every foreground class of :data:`CLASSES` between two label maps (``vol3d.seg.objective.score``)."""
    from vol3d.seg.objective import score

    return score(pred, truth, CLASSES, (1.0, 1.0, 1.0))["dice"]


def grid_points(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """RAS mm of every voxel centre of a grid: ``(X, Y, Z, 3)``."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(float)
    return geometry.voxel_to_world(affine, idx)


def rotation(axis: Sequence[float], degrees: float) -> np.ndarray:
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.deg2rad(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


#: (row cosine, column cosine, slice direction) in LPS, per acquisition.
ORIENTATIONS = {
    "axial": ([1, 0, 0], [0, 1, 0], [0, 0, 1]),
    "feet_first": ([-1, 0, 0], [0, 1, 0], [0, 0, -1]),  # mirrored rows, stacked from head to feet
    "sagittal": ([0, 1, 0], [0, 0, -1], [-1, 0, 0]),
    "oblique": tuple((rotation([1, 0.3, 0], 17.0) @ np.array(v, float)).tolist()
                     for v in ([1, 0, 0], [0, 1, 0], [0, 0, 1])),
}


def write_dicom_series(folder: Path, orientation: str, spacing: Sequence[float] = (4.0, 4.0, 5.0),
                       shape: Sequence[int] = (40, 34, 28), index: int = 0) -> str:
    """Write a phantom CT series (``shape`` = columns, rows, slices) centred on the body; returns its UID."""
    row_cos, col_cos, normal = (np.asarray(v, float) for v in ORIENTATIONS[orientation])
    spacing = np.asarray(spacing, float)
    n = np.asarray(shape)
    centre_lps = np.zeros(3)
    first = centre_lps - row_cos * spacing[0] * (n[0] - 1) / 2 - col_cos * spacing[1] * (n[1] - 1) / 2 \
        - normal * spacing[2] * (n[2] - 1) / 2
    positions = slice_positions(first, normal * spacing[2], int(n[2]))
    affine = geometry.affine_from_dicom(first, [*row_cos, *col_cos], (spacing[1], spacing[0]), normal * spacing[2])
    volume = hu_at(grid_points(affine, shape))
    uid = f"1.2.826.0.1.3680043.8.498.{9000 + index}"
    write_series(folder, volume, orientation=[*row_cos, *col_cos], pixel_spacing=(spacing[1], spacing[0]),
                 positions_lps=positions, patient={"PatientName": "Doe^Jane", "PatientID": f"PID{index}"},
                 study={"StudyInstanceUID": f"1.2.826.0.1.3680043.8.498.{8000 + index}", "AccessionNumber": "ACC1"},
                 series_uid=uid, slice_thickness=spacing[2], uid_entropy=[orientation, str(index)])
    return uid


def write_nifti(path: Path, spacing: Sequence[float] = (4.0, 4.0, 5.0), shape: Sequence[int] = (40, 34, 28)) -> np.ndarray:
    """Phantom as a LAS-stored NIfTI (x flipped, as many converters write); returns its affine."""
    import nibabel as nib

    affine = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    nib.save(nib.Nifti1Image(hu_at(grid_points(affine, shape)), affine), path)
    return affine


# ----------------------------------------------------------------------------- caches


def build_cache(root: Path, n_cases: int = 4, cfg: PreprocessConfig | None = None, seed: int = 0) -> Path:
    """A cache of ``n_cases`` phantom CTs with labels (organs shifted per case), manifest and params.json.

    The last case is the ``val`` split; the others ``train``.
    """
    cfg = cfg or PreprocessConfig(target_spacing=(4.0, 4.0, 5.0), patch_size=(32, 32, 16), fixed_size=(48, 40, 32),
                                  crop_margin_mm=4.0)
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_cases):
        shift = rng.uniform(-6, 6, size=3)
        shape = (44, 36, 28)
        affine = np.diag([-3.5, 3.5, 4.5, 1.0])
        affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
        pts = grid_points(affine, shape)
        noisy = hu_at(pts, shift) + rng.normal(0, 20, shape).astype(np.float32)
        p = prepare(Image(noisy, affine, "CT"), cfg, label=label_at(pts, shift))
        key = f"c_{c:032x}"
        h5 = f"cases/{key[2:4]}/{key}.h5"
        write_case(root / h5, key, p, cfg=cfg)
        rows.append({"id": key, "status": "ok", "h5": h5, "key": key, "shape": list(p.shape), "has_label": True,
                     "spacing": list(p.spacing), "split": "val" if c == n_cases - 1 else "train"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "params.json").write_text(json.dumps({"config": cfg.public_dict(), "params_hash": cfg.params_hash()}))
    return root


# ----------------------------------------------------------------------------- oracles


class LookupOracle(nn.Module):
    """A "model" that returns the stored cached label of the volume it is given, as logits.

    Register each prepared case with :meth:`add`; with a sliding-window ROI equal to the
    cached shape, MONAI hands over the whole volume, which is matched to a stored one.
    Geometry, not learning, is then what a prediction test checks.
    """

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device
        self.cases: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, image: np.ndarray, label: np.ndarray) -> None:
        self.cases.append((torch.as_tensor(np.asarray(image, np.float32)), torch.as_tensor(label.astype(np.int64))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for vol in x:
            match = [lab for img, lab in self.cases if img.shape == vol.shape and torch.equal(img, vol.cpu())]
            assert match, "the oracle was given a volume it does not know: prepare() differs between test and predict"
            onehot = torch.nn.functional.one_hot(match[0], self.num_classes).permute(3, 0, 1, 2).float()
            out.append(onehot * 10.0)
        return torch.stack(out).to(x.device) + self.anchor
