"""PyTorch Dataset over a ``vol3d preprocess`` cache (manifest.jsonl + one HDF5 file per case).

HDF5 files are opened lazily, in the process that reads them (each DataLoader worker
opens its own handles; open handles are dropped when the dataset is pickled or
forked), as HDF5 handles must not cross a fork.

Every sample carries its geometry: ``affine`` maps the returned array's index to RAS+
mm, ``origin`` is the index of its first voxel in the cached grid, and boxes are given
in the returned array's voxel frame, clipped, with the fraction that is still visible.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from preprocess import geometry, manifest
from preprocess.errors import InputError
from preprocess.store import CaseReader, grid_corners
from preprocess.transforms import centred_window

log = logging.getLogger(__name__)

Mode = Literal["volume", "patch"]
Sampler = Literal["random", "label", "grid", "foreground"]


def read_manifest(cache_dir: str | Path, split: str | Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The ``ok`` rows of ``cache_dir/manifest.jsonl`` (last row wins per id), optionally of some splits."""
    path = Path(cache_dir) / "manifest.jsonl"
    if not path.is_file():
        raise InputError(
            f"{path} not found; build the cache first with `vol3d preprocess SRC --out {cache_dir}`"
        )
    rows = manifest.latest_by_id(manifest.read_manifest(path))
    ok = [r.to_dict() for r in rows.values() if r.status == "ok"]
    if not ok:
        raise InputError(f"{path} lists no ok case; see the reason/detail columns of its rows")
    if split is not None:
        wanted = {split} if isinstance(split, str) else set(split)
        ok = [r for r in ok if r.get("split") in wanted]
        if not ok:
            log.warning("%s: no ok case in split(s) %s", path, sorted(wanted))
    return ok


class CacheDataset(Dataset):
    """Cached cases as dicts of tensors with geometry.

    Args:
        cache_dir: folder holding ``manifest.jsonl`` and the HDF5 files.
        split: keep only rows of this split (or these splits); None keeps all.
        mode: ``"volume"``: one item per case (optionally padded/cropped to ``input_size``);
            ``"patch"``: patches of ``patch_size``.
        patch_size: ``(X, Y, Z)`` voxels, required in patch mode.
        sampler: patch choice: ``"random"`` (uniform), ``"label"`` (a patch holding label with
            probability ``label_probability``, else uniform), ``"foreground"`` (patches weighted
            by body fraction), ``"grid"`` (every patch of a regular grid, in order: sliding window).
        samples_per_volume: random/label/foreground patches drawn per case per epoch.
        label_probability: chance that the label sampler picks a patch containing label.
        grid_stride: step of the grid sampler (default ``patch_size``: no overlap).
        input_size: volume mode: pad/crop every case to ``(X, Y, Z)`` centred; the crop is recorded.
        transform: called on each sample dict last (e.g. MONAI dict transforms on ``image``/``label``).
        seed: base of the per-item random generator; with :meth:`set_epoch` items are reproducible
            whatever the number of workers.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        split: str | Sequence[str] | None = None,
        mode: Mode = "volume",
        patch_size: Sequence[int] | None = None,
        sampler: Sampler = "random",
        *,
        samples_per_volume: int = 1,
        label_probability: float = 0.5,
        grid_stride: Sequence[int] | None = None,
        input_size: Sequence[int] | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        seed: int = 0,
        max_open_files: int = 64,
    ):
        if mode not in ("volume", "patch"):
            raise ValueError(f"mode must be 'volume' or 'patch', got {mode!r}")
        if sampler not in ("random", "label", "grid", "foreground"):
            raise ValueError(f"sampler must be random, label, grid or foreground, got {sampler!r}")
        if mode == "patch" and (patch_size is None or len(patch_size) != 3):
            raise ValueError("patch mode needs patch_size=(X, Y, Z)")
        self.cache_dir = Path(cache_dir)
        self.rows = read_manifest(cache_dir, split)
        self.mode = mode
        self.patch_size = tuple(int(p) for p in patch_size) if patch_size is not None else None
        self.sampler = sampler
        self.samples_per_volume = int(samples_per_volume)
        self.label_probability = float(label_probability)
        self.input_size = tuple(int(n) for n in input_size) if input_size is not None else None
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self.max_open_files = int(max_open_files)
        self._readers: OrderedDict[int, CaseReader] = OrderedDict()
        self._pid: int | None = None
        self._grid: list[tuple[int, np.ndarray]] = []
        if mode == "patch" and sampler == "grid":
            stride = grid_stride if grid_stride is not None else self.patch_size
            for ci in range(len(self.rows)):
                for corner in grid_corners(self._shape(ci), self.patch_size, stride):
                    self._grid.append((ci, corner))

    # -- handles: opened lazily per process, never pickled
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_readers"] = OrderedDict()
        state["_pid"] = None
        return state

    def _reader(self, ci: int) -> CaseReader:
        if self._pid != os.getpid():  # a forked copy: the parent's handles are not ours to use
            self._readers = OrderedDict()
            self._pid = os.getpid()
        r = self._readers.get(ci)
        if r is None:
            row = self.rows[ci]
            path = self.cache_dir / row["h5"]
            if not path.is_file():
                raise InputError(
                    f"{path} (case {row.get('id')}) is missing; rerun `vol3d preprocess` to rebuild it"
                )
            r = CaseReader(path, row.get("key"))
            self._readers[ci] = r
            if len(self._readers) > self.max_open_files:
                self._readers.popitem(last=False)[1].close()
        else:
            self._readers.move_to_end(ci)
        return r

    def close(self) -> None:
        """Close the HDF5 files this process opened."""
        while self._readers:
            self._readers.popitem()[1].close()

    def _shape(self, ci: int) -> tuple[int, int, int]:
        shape = self.rows[ci].get("shape")
        if shape is not None:
            return tuple(int(n) for n in shape[-3:])  # type: ignore[return-value]
        with CaseReader(self.cache_dir / self.rows[ci]["h5"], self.rows[ci].get("key")) as r:
            return r.shape

    def set_epoch(self, epoch: int) -> None:
        """Draw different random patches each epoch (call before creating the DataLoader iterator)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.mode == "volume":
            return len(self.rows)
        if self.sampler == "grid":
            return len(self._grid)
        return len(self.rows) * self.samples_per_volume

    # -- sampling
    def _window(self, index: int) -> tuple[int, np.ndarray, tuple[int, int, int]]:
        """(case index, origin (3,), size) of the item ``index``."""
        if self.mode == "volume":
            shape = self._shape(index)
            if self.input_size is None:
                return index, np.zeros(3, np.int64), shape
            return index, centred_window(np.zeros(3), shape, self.input_size), self.input_size
        assert self.patch_size is not None
        if self.sampler == "grid":
            ci, corner = self._grid[index]
            return ci, corner, self.patch_size
        ci = index // self.samples_per_volume
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return ci, self._sample_corner(ci, rng), self.patch_size

    def _sample_corner(self, ci: int, rng: np.random.Generator) -> np.ndarray:
        shape = np.asarray(self._shape(ci))
        size = np.asarray(self.patch_size)
        room = shape - size
        uniform = np.where(room >= 0, [rng.integers(0, max(r, 0) + 1) for r in room], room // 2)
        if self.sampler == "random":
            return uniform
        if self.sampler == "label" and rng.random() >= self.label_probability:
            return uniform
        reader = self._reader(ci)
        index = reader.patch_index()
        index_patch = np.asarray(reader.group["patch_index"].attrs["patch_size"], dtype=np.int64)
        weights = index[:, 4 if self.sampler == "label" else 3].astype(float)
        if weights.sum() <= 0:
            return uniform
        row = index[rng.choice(len(index), p=weights / weights.sum())]
        corner = row[:3].astype(np.int64)
        if self.sampler == "label":
            # like TorchIO's LabelSampler: a random labelled voxel, anywhere inside the patch
            hits = np.argwhere(reader.label(corner, index_patch) > 0)
            voxel = corner + hits[rng.integers(len(hits))]
            corner = voxel - np.array([rng.integers(0, s) for s in size])
        else:
            corner = (
                corner + (index_patch - size) // 2 + rng.integers(-(index_patch // 4), index_patch // 4 + 1)
            )
        return np.where(room >= 0, np.clip(corner, 0, np.maximum(room, 0)), room // 2)

    # -- items
    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._item(index, pixels=True)

    def item_without_pixels(self, index: int) -> dict[str, Any]:
        """Item ``index`` with everything but the voxels: ``image`` and ``label`` are zero-memory
        all-zero placeholders of the right shapes. For text-side work (tokenizer corpora,
        question building) over many cases without reading volumes; no ``transform``."""
        return self._item(index, pixels=False)

    def _item(self, index: int, pixels: bool) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        ci, origin, size = self._window(index)
        row = self.rows[ci]
        r = self._reader(ci)
        if pixels:
            image = r.image(origin, size)
            label = r.label(origin, size)
        else:
            image = np.broadcast_to(np.zeros((), np.float32), (r.group["image"].shape[0], *size))
            label = None
        if label is not None:
            label_t = torch.from_numpy(label.astype(np.int64))
        elif pixels:
            label_t = torch.zeros(size, dtype=torch.int64)  # writable: transforms may edit it
        else:
            label_t = torch.zeros((), dtype=torch.int64).expand(*size)  # zero-stride, like ``image``
        boxes = r.boxes()
        vox = geometry.as_boxes(boxes["vox"]) - np.tile(origin, 2)
        clipped, frac = geometry.clip_boxes(vox, size)
        visible = np.asarray(boxes["visible"], dtype=float) * frac
        frames = r.frames.shifted(origin)
        affine = frames.affine
        a = r.attrs
        findings, impression = a.get("report_findings", ""), a.get("report_impression", "")
        sample: dict[str, Any] = {
            "id": str(row.get("id")),
            "image": torch.from_numpy(image.astype(np.float32))  # (C, X, Y, Z)
            if pixels
            else torch.zeros(()).expand(image.shape),
            "label": label_t,
            "has_label": label is not None,
            "affine": torch.from_numpy(affine),  # (4, 4) index of this array -> RAS+ mm
            "frames": frames,  # this array's geometry, back to the original grid (preprocess.types.Frames)
            "origin": torch.from_numpy(
                np.asarray(origin, dtype=np.int64)
            ),  # (3,) first voxel in the cached grid
            "cache_shape": torch.tensor(r.shape, dtype=torch.int64),
            "spacing": torch.from_numpy(np.asarray(a["spacing"], dtype=np.float64)),
            "boxes_vox": torch.from_numpy(clipped.astype(np.float32)),  # (N, 6) in this array's voxels
            "boxes_visible": torch.from_numpy(visible.astype(np.float32)),  # (N,) 0 = outside this array
            "boxes_world": torch.from_numpy(np.asarray(boxes["world"], dtype=np.float32).reshape(-1, 6)),
            "box_findings": list(boxes["finding"]),
            "box_organs": list(boxes["organ"]),
            "report_findings": findings,
            "report_impression": impression,
            "report": "\n".join(t for t in (findings, impression) if t),
            "codes": list(a.get("codes", [])),
            "modality": str(a.get("modality", row.get("modality", ""))),
        }
        if not pixels:
            return sample
        return self.transform(sample) if self.transform is not None else sample


def collate_cases(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack same-shaped tensors (``image`` -> ``(B, C, X, Y, Z)``); keep everything else
    (boxes with different counts, strings, code lists) as per-sample lists."""
    out: dict[str, Any] = {}
    for key in batch[0]:
        vals = [b[key] for b in batch]
        if all(isinstance(v, torch.Tensor) for v in vals) and len({tuple(v.shape) for v in vals}) == 1:
            out[key] = torch.stack(vals)
        elif all(isinstance(v, bool) for v in vals):
            out[key] = torch.tensor(vals)
        else:
            out[key] = vals
    return out
