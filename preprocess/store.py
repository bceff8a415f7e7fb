"""One HDF5 file per cached case (layout: docs/formats.md section 2).

Files are written to a temporary name in the target folder and renamed with
``os.replace``, so a killed run (even ``kill -9``) leaves either the old file, the
new file or a stray ``.*.tmp`` file, never a half-written ``<id>.h5``. Readers must
``import hdf5plugin`` before reading Blosc-compressed files; :class:`CaseReader` does.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin
import numpy as np

from preprocess.config import PreprocessConfig
from preprocess.transforms import CachedBoxes, Prepared, cached_boxes
from preprocess.types import Frames

#: Bumped when the layout changes incompatibly (attribute ``format_version``).
FORMAT_VERSION = 1

#: Attribute names that would smell of identifiers: refused by :func:`write_case`.
_FORBIDDEN_ATTR_WORDS = ("patient", "accession", "name", "birth", "description", "uid", "mrn")

_LIST_ATTRS = ("codes", "flags")


# ----------------------------------------------------------------------------- patch index


def grid_corners(
    shape: Sequence[int], patch_size: Sequence[int], stride: Sequence[int] | None = None
) -> np.ndarray:
    """Patch corners ``(M, 3)`` int64 tiling an array of spatial ``shape``.

    Along each axis: ``0, stride, 2*stride, ...`` plus a last corner flush with the end;
    an axis shorter than the patch gets one corner ``(n - p) // 2`` (negative: the patch is
    padded on both sides, centred).
    """
    stride = patch_size if stride is None else stride
    axes = []
    for n, p, s in zip(shape[-3:], patch_size, stride, strict=True):
        n, p, s = int(n), int(p), max(1, int(s))
        if n <= p:
            axes.append(np.array([(n - p) // 2]))
            continue
        c = list(range(0, n - p + 1, s))
        if c[-1] != n - p:
            c.append(n - p)
        axes.append(np.array(c))
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1).astype(np.int64)


def _window_sums(mask: np.ndarray, corners: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Number of true voxels of ``mask (X, Y, Z)`` inside each window (summed-volume table)."""
    sat = np.zeros(tuple(n + 1 for n in mask.shape), dtype=np.int64)
    sat[1:, 1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1).cumsum(2)
    n = np.asarray(mask.shape)
    lo = np.clip(corners, 0, n)
    hi = np.clip(corners + np.asarray(size), 0, n)
    total = np.zeros(len(corners), dtype=np.int64)
    for bits in range(8):
        pick = [(hi if (bits >> d) & 1 else lo)[:, d] for d in range(3)]
        sign = (-1) ** (3 - bin(bits).count("1"))
        total += sign * sat[pick[0], pick[1], pick[2]]
    return total


def patch_index(
    foreground: np.ndarray,
    label: np.ndarray | None,
    patch_size: Sequence[int],
    stride: Sequence[int] | None = None,
) -> np.ndarray:
    """Rows ``(i, j, k, foreground fraction, label fraction)`` float32 ``(M, 5)`` for patches on a
    grid with half-patch stride (default); fractions are of the whole patch volume."""
    stride = stride if stride is not None else [max(1, p // 2) for p in patch_size]
    corners = grid_corners(foreground.shape, patch_size, stride)
    vol = float(np.prod(patch_size))
    fg = _window_sums(foreground, corners, patch_size) / vol
    lab = _window_sums(label > 0, corners, patch_size) / vol if label is not None else np.zeros(len(corners))
    return np.column_stack([corners, fg, lab]).astype(np.float32)


# ----------------------------------------------------------------------------- writing


def _codec(name: str) -> dict[str, Any]:
    """h5py dataset keywords for a codec name (see PreprocessConfig.compression)."""
    if name in ("lz4", "zstd"):
        # byte shuffle groups the float16 exponents: about 2x smaller at no speed cost
        return dict(hdf5plugin.Blosc(cname=name, clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
    if name == "lzf":
        return {"compression": "lzf", "shuffle": True}
    if name == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    return {}


def _check_attr_names(names: Iterable[str]) -> None:
    for name in names:
        low = name.lower()
        if any(w in low for w in _FORBIDDEN_ATTR_WORDS):
            raise ValueError(
                f"attribute {name!r} looks like an identifier; identifiers are never written to the cache"
            )


def _strings(values: Iterable[str]) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=h5py.string_dtype())


def write_case(
    path: str | Path,
    key: str,
    prepared: Prepared,
    *,
    boxes: Sequence[Mapping[str, Any]] | CachedBoxes | None = None,
    report: Mapping[str, str] | None = None,
    codes: Sequence[str] | None = None,
    attrs: Mapping[str, Any] | None = None,
    cfg: PreprocessConfig | None = None,
) -> Path:
    """Write one case atomically and return ``path``.

    Args:
        path: target ``.h5`` file (its folder is created).
        key: group name, the case's pseudonymous id.
        prepared: output of :func:`preprocess.transforms.prepare`.
        boxes: rows like ``boxes.json`` (``box_world_ras_mm`` or ``world``: 6 floats in RAS mm,
            ``finding``, ``organ``), converted from their world boxes, or the output of
            :func:`preprocess.transforms.cached_boxes` (boxes from lesion instance maps); stored in
            world mm and in cached voxels with the visible fraction and how each was computed.
            Their flags (``BOXES_ENCLOSING``) are added to ``prepared.flags``.
        report: ``{"findings": ..., "impression": ...}`` (free text of the report, no identifiers).
        codes: EHR codes (e.g. ICD-10) of the patient.
        attrs: extra group attributes, e.g. ``source_hash``; identifier-like names are refused.
        cfg: chunking, codec, patch size and ``params_hash`` (defaults: ``PreprocessConfig()``).
    """
    cfg = cfg or PreprocessConfig()
    attrs = dict(attrs or {})
    _check_attr_names(attrs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    codec = _codec(cfg.compression)
    chunk = cfg.effective_chunk(prepared.shape)
    if not isinstance(boxes, CachedBoxes):
        boxes = cached_boxes(list(boxes or []), prepared)
    prepared.flags.extend(f for f in boxes.flags if f not in prepared.flags)  # so the caller's row has them too
    try:
        with h5py.File(tmp, "w") as f:
            g = f.create_group(key)
            g.create_dataset("image", data=prepared.image, chunks=(1, *chunk), **codec)
            if prepared.label is not None:
                g.create_dataset("label", data=prepared.label, chunks=chunk, **codec)
            _write_boxes(g, boxes)
            idx = patch_index(prepared.foreground, prepared.label, cfg.patch_size)
            d = g.create_dataset("patch_index", data=idx)
            d.attrs["patch_size"] = np.asarray(cfg.patch_size, dtype=np.int64)
            d.attrs["columns"] = _strings(["i", "j", "k", "foreground_fraction", "label_fraction"])
            a = g.attrs
            a["format_version"] = FORMAT_VERSION
            a["affine"] = prepared.affine
            a["spacing"] = np.asarray(prepared.spacing)
            a["shape"] = np.asarray(prepared.shape, dtype=np.int64)
            a["orig_shape"] = np.asarray(prepared.orig_shape, dtype=np.int64)
            a["orig_affine"] = prepared.orig_affine
            a["cached_to_orig"] = prepared.cached_to_orig
            a["crop_box"] = np.asarray(prepared.crop_box, dtype=np.int64)
            a["resampled_shape"] = np.asarray(prepared.resampled_shape, dtype=np.int64)
            a["modality"] = prepared.modality
            a["windows"] = np.asarray(prepared.windows, dtype=float).reshape(-1, 2)
            a["report_findings"] = str((report or {}).get("findings", "") or "")
            a["report_impression"] = str((report or {}).get("impression", "") or "")
            a["codes"] = _strings(codes or [])
            a["flags"] = _strings(prepared.flags)
            a["source_hash"] = str(attrs.pop("source_hash", ""))
            a["params_hash"] = str(attrs.pop("params_hash", cfg.params_hash()))
            for name, value in attrs.items():
                a[name] = value
        with open(tmp, "rb") as fh:  # durable before it becomes visible under its real name
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _write_boxes(g: h5py.Group, boxes: CachedBoxes) -> None:
    bg = g.create_group("boxes")
    bg.create_dataset("world", data=boxes.world.astype(np.float32).reshape(-1, 6))
    bg.create_dataset("vox", data=boxes.vox.astype(np.float32).reshape(-1, 6))
    bg.create_dataset("visible", data=np.asarray(boxes.visible, dtype=np.float32).reshape(-1))
    bg.create_dataset("finding", data=_strings(boxes.finding))
    bg.create_dataset("organ", data=_strings(boxes.organ))
    bg.create_dataset("source", data=_strings(boxes.source))


def remove_temp_files(folder: str | Path) -> int:
    """Delete the ``.*.tmp`` files a killed writer left under ``folder``; returns how many.
    Call it only when no writer is running on that folder (e.g. when a run resumes)."""
    n = 0
    for tmp in Path(folder).rglob(".*.h5.*.tmp"):
        tmp.unlink(missing_ok=True)
        n += 1
    return n


# ----------------------------------------------------------------------------- reading


def read_window(
    dset: h5py.Dataset | np.ndarray, start: Sequence[int], size: Sequence[int], fill: float = 0
) -> np.ndarray:
    """The window ``[start, start + size)`` of the last three axes of ``dset`` (leading axes kept),
    with the part outside the array filled with ``fill``; reads only the chunks it needs."""
    spatial = np.asarray(dset.shape[-3:])
    lead = tuple(dset.shape[:-3])
    start = np.asarray(start, dtype=np.int64)
    stop = start + np.asarray(size, dtype=np.int64)
    lo, hi = np.clip(start, 0, spatial), np.clip(stop, 0, spatial)
    out = np.full(lead + tuple(int(s) for s in size), fill, dtype=dset.dtype)
    if (hi > lo).all():
        keep = (slice(None),) * len(lead)
        src = keep + tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        dst = keep + tuple(slice(int(a), int(b)) for a, b in zip(lo - start, hi - start, strict=True))
        out[dst] = dset[src]
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [v.decode() if isinstance(v, bytes) else str(v) for v in value]
    return value


class CaseReader:
    """Read-only view of one cached case: attributes up front, arrays read on demand.

    Open it where it is used (inside each DataLoader worker), never before a fork.
    """

    def __init__(self, path: str | Path, key: str | None = None):
        self.path = Path(path)
        self._file = h5py.File(self.path, "r")
        self.key = key if key is not None else next(iter(self._file))
        if self.key not in self._file:
            self._file.close()
            raise KeyError(f"{self.path}: no case {self.key!r} in this file")
        self.group = self._file[self.key]
        self.attrs: dict[str, Any] = {k: _plain(v) for k, v in self.group.attrs.items()}
        for k in _LIST_ATTRS:
            self.attrs[k] = list(self.attrs.get(k, []))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(X, Y, Z)``."""
        return tuple(int(n) for n in self.group["image"].shape[1:])  # type: ignore[return-value]

    @property
    def affine(self) -> np.ndarray:
        """``(4, 4)`` cached index -> RAS+ mm."""
        return np.asarray(self.attrs["affine"], dtype=float)

    @property
    def frames(self) -> Frames:
        """The cached grid's geometry: to world mm and back to the original image's grid."""
        a = self.attrs
        missing = [k for k in ("cached_to_orig", "orig_affine", "orig_shape") if k not in a]
        if missing:
            from preprocess.errors import InputError

            raise InputError(f"{self.path}: case {self.key} has no {', '.join(missing)} (docs/formats.md section 2); "
                             "it was not written by vol3d preprocess: rebuild the cache with it")
        return Frames(self.affine, np.asarray(a["cached_to_orig"], dtype=float),
                      np.asarray(a["orig_affine"], dtype=float), tuple(int(n) for n in a["orig_shape"]))  # type: ignore[arg-type]

    @property
    def has_label(self) -> bool:
        return "label" in self.group

    def image(self, start: Sequence[int] | None = None, size: Sequence[int] | None = None) -> np.ndarray:
        """float16 ``(C, x, y, z)``: the whole image, or a window padded with 0 outside."""
        d = self.group["image"]
        return d[()] if start is None else read_window(d, start, size if size is not None else d.shape[1:])

    def label(
        self, start: Sequence[int] | None = None, size: Sequence[int] | None = None
    ) -> np.ndarray | None:
        """uint8 ``(x, y, z)`` or None when the case has no label."""
        if not self.has_label:
            return None
        d = self.group["label"]
        return d[()] if start is None else read_window(d, start, size if size is not None else d.shape)

    def boxes(self) -> dict[str, Any]:
        """``vox`` and ``world`` ``(N, 6)``, ``visible`` ``(N,)``, ``finding``, ``organ`` and ``source``
        lists (``source``: "mask" or "world_box", see :func:`preprocess.transforms.cached_boxes`)."""
        b = self.group["boxes"]
        out: dict[str, Any] = {k: np.asarray(b[k][()]) for k in ("vox", "world", "visible")}
        for k in ("finding", "organ"):
            out[k] = _plain(np.asarray(b[k][()], dtype=object))
        # files written before boxes/source existed converted every box from its world box
        out["source"] = _plain(np.asarray(b["source"][()], dtype=object)) if "source" in b else ["world_box"] * len(out["vox"])
        return out

    def patch_index(self) -> np.ndarray:
        """float32 ``(M, 5)``: corner ``(i, j, k)``, foreground fraction, label fraction."""
        return self.group["patch_index"][()]

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> CaseReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_case(path: str | Path, key: str | None = None) -> dict[str, Any]:
    """Everything of one case in memory: ``image``, ``label`` (or None), ``boxes``, ``patch_index``,
    and every group attribute (``affine``, ``cached_to_orig``, ``report_findings`` ...)."""
    with CaseReader(path, key) as r:
        out = dict(r.attrs)
        out.update(key=r.key, image=r.image(), label=r.label(), boxes=r.boxes(), patch_index=r.patch_index())
    return out
