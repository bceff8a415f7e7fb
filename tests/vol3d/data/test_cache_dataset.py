import json
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from preprocess import geometry as g
from preprocess.config import PreprocessConfig
from preprocess.errors import InputError
from preprocess.store import read_case, write_case
from preprocess.transforms import prepare
from preprocess.types import Image
from vol3d.data import CacheDataset, collate_cases

PATCH = (16, 16, 8)


def build_cache(root, n=3):
    """n tiny CT cases with a small label blob, boxes, report and codes, plus a manifest."""
    cfg = PreprocessConfig(target_spacing=None, crop_foreground=False, patch_size=PATCH)
    rows = []
    for c in range(n):
        rng = np.random.default_rng(c)
        shape = (40 + 4 * c, 36, 24)
        arr = rng.normal(0, 300, shape).astype(np.float32)
        label = np.zeros(shape, np.uint8)
        label[30:34, 5:9, 3:6] = 1 + c % 2
        aff = np.diag([-1.5, 1.5, -3.0, 1.0])
        aff[:3, 3] = [40 + c, -25, 60]
        p = prepare(Image(arr, aff, "CT"), cfg, label=label)
        box_world = g.boxes_voxel_to_world(g.mask_to_box(p.label)[None], p.affine)[0]
        key = f"c_{c:03d}"
        h5 = f"cases/{key[:2]}/{key}.h5"
        write_case(
            root / h5,
            key,
            p,
            cfg=cfg,
            boxes=[{"box_world_ras_mm": box_world.tolist(), "finding": "f", "organ": "o"}],
            report={"findings": f"findings {c}", "impression": "ok"},
            codes=["A00"] * c,
        )
        rows.append(
            {
                "id": key,
                "status": "ok",
                "h5": h5,
                "key": key,
                "shape": list(p.shape),
                "spacing": list(p.spacing),
                "split": "val" if c == n - 1 else "train",
            }
        )
    rows.append({"id": "c_bad", "status": "failed", "reason": "UNREADABLE", "detail": "x"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return build_cache(tmp_path_factory.mktemp("cache"))


def test_volume_mode_returns_the_stored_case_with_geometry(cache):
    ds = CacheDataset(cache)
    assert len(ds) == 3 and len(CacheDataset(cache, split="train")) == 2
    for i in range(3):
        s = ds[i]
        d = read_case(cache / ds.rows[i]["h5"])
        assert torch.equal(s["image"], torch.from_numpy(d["image"].astype(np.float32)))
        assert torch.equal(s["label"], torch.from_numpy(d["label"].astype(np.int64)))
        assert np.allclose(s["affine"].numpy(), d["affine"]) and s["origin"].tolist() == [0, 0, 0]
        assert s["report"] == f"findings {i}\nok" and s["codes"] == ["A00"] * i
        assert g.box_iou(s["boxes_vox"].numpy(), g.mask_to_box(d["label"])[None])[0, 0] > 0.99


def test_patches_are_slices_of_the_stored_volume_with_their_own_affine(cache):
    ds = CacheDataset(cache, mode="patch", patch_size=(16, 16, 32), sampler="random", samples_per_volume=4)
    assert len(ds) == 12
    for i in range(len(ds)):
        s = ds[i]
        d = read_case(cache / ds.rows[i // 4]["h5"])
        o = s["origin"].numpy()
        assert o[2] == (24 - 32) // 2  # an axis shorter than the patch is padded, centred
        ref = np.zeros((1, 16, 16, 32), np.float16)
        ref[:, :, :, -o[2] : -o[2] + 24] = d["image"][:, o[0] : o[0] + 16, o[1] : o[1] + 16]
        assert torch.equal(s["image"], torch.from_numpy(ref.astype(np.float32)))
        v = np.array([3.0, 7.0, 11.0])  # a voxel of the patch is the same world point in the cache
        assert np.allclose(g.voxel_to_world(s["affine"].numpy(), v), g.voxel_to_world(d["affine"], v + o))


def test_label_sampler_hits_the_label_more_often_than_random(cache):
    def hit_rate(sampler, **kw):
        ds = CacheDataset(cache, mode="patch", patch_size=PATCH, sampler=sampler, samples_per_volume=60, **kw)
        return np.mean([ds[i]["label"].any().item() for i in range(len(ds))])

    rand, lab = hit_rate("random"), hit_rate("label")  # label_probability 0.5: about 0.5 + rand / 2
    assert rand < 0.2 and lab > rand + 0.3
    assert hit_rate("label", label_probability=1.0) == 1.0


def test_grid_mode_tiles_every_voxel(cache):
    ds = CacheDataset(cache, split="val", mode="patch", patch_size=PATCH, sampler="grid")
    shape = tuple(ds.rows[0]["shape"])
    cover = np.zeros(shape, int)
    for i in range(len(ds)):
        o = ds[i]["origin"].numpy()
        cover[o[0] : o[0] + 16, o[1] : o[1] + 16, o[2] : o[2] + 8] += 1
    assert (cover >= 1).all()


def test_input_size_crop_is_recorded_and_boxes_are_clipped_not_wrong(cache):
    ds = CacheDataset(cache, input_size=(32, 48, 16))
    s = ds[0]
    d = read_case(cache / ds.rows[0]["h5"])
    o = s["origin"].numpy()
    assert s["image"].shape == (1, 32, 48, 16) and o.tolist() == [4, -6, 4]
    assert torch.equal(
        s["image"][:, :, 6:42], torch.from_numpy(d["image"][:, 4:36, :, 4:20].astype(np.float32))
    )
    assert not s["image"][:, :, :6].any()  # padding
    full = d["boxes"]["vox"][0] - np.tile(o, 2)
    clipped, vis = g.clip_boxes(full, (32, 48, 16))
    assert np.allclose(s["boxes_vox"].numpy(), clipped) and np.isclose(s["boxes_visible"][0].item(), vis[0])
    assert np.isclose(vis[0], 2 / 3)  # the label (cached z 18..20) is cut by the crop (z 4..19)
    world = g.boxes_voxel_to_world(s["boxes_vox"].numpy(), s["affine"].numpy())
    assert np.allclose(g.boxes_world_to_voxel(world, d["affine"]), clipped + np.tile(o, 2), atol=1e-5)


def test_dataloader_with_two_workers_gives_the_same_batches(cache):
    ds = CacheDataset(cache, mode="patch", patch_size=PATCH, sampler="label", samples_per_volume=4)
    ds[0]  # open a handle in the parent: workers must not reuse it
    pickle.dumps(ds)  # handles are dropped when pickled

    def batches(workers):
        dl = DataLoader(ds, batch_size=3, num_workers=workers, collate_fn=collate_cases)
        return list(dl)

    b0, b2 = batches(0), batches(2)
    assert len(b0) == len(b2) == 4
    for x, y in zip(b0, b2, strict=True):
        assert x["image"].shape == (3, 1, 16, 16, 8)
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["origin"], y["origin"])
        assert x["id"] == y["id"] and x["codes"] == y["codes"]
    ds.set_epoch(1)
    assert not all(torch.equal(a["origin"], b["origin"]) for a, b in zip(batches(0), b0, strict=True))


def test_missing_manifest_is_a_clear_input_error(tmp_path):
    with pytest.raises(InputError, match="manifest.jsonl not found"):
        CacheDataset(tmp_path)


def test_item_without_pixels_matches_the_item_except_voxels(cache):
    ds = CacheDataset(cache, mode="volume", input_size=(12, 10, 8))
    for i in range(len(ds)):
        full, meta = ds[i], ds.item_without_pixels(i)
        assert set(full) == set(meta)
        assert meta["image"].shape == full["image"].shape and not meta["image"].any()
        assert meta["image"].untyped_storage().nbytes() <= 4  # a zero-stride view, nothing read
        assert meta["label"].shape == full["label"].shape and not meta["label"].any()
        assert meta["label"].untyped_storage().nbytes() <= 8
        for key in full:
            if key not in ("image", "label", "has_label"):
                a, b = full[key], meta[key]
                assert (a == b).all() if isinstance(a, torch.Tensor) else a == b, key


def test_a_model_with_the_wrong_channel_count_is_refused_naming_the_flag(cache):
    from preprocess.errors import ConfigError
    from vol3d.train.run import check_channels

    ds = CacheDataset(cache, mode="volume")
    channels = ds[0]["image"].shape[0]
    check_channels(ds, channels)  # the cache's own count passes
    with pytest.raises(ConfigError, match=f"--model.in-chans {channels}"):
        check_channels(ds, channels + 1)


def test_every_item_carries_its_frames_back_to_the_original_grid(cache):
    """Patches, padded input windows and whole volumes each carry a preprocess.types.Frames: its affine is
    the item's, and a voxel of the item lands on the same original voxel as the original affine says."""
    from preprocess.types import Frames

    for ds in (CacheDataset(cache), CacheDataset(cache, mode="patch", sampler="grid", patch_size=PATCH),
               CacheDataset(cache, input_size=(48, 32, 20))):
        for i in (0, len(ds) - 1):
            s = ds[i]
            f = s["frames"]
            assert isinstance(f, Frames)
            np.testing.assert_allclose(f.affine, s["affine"].numpy())
            vox = np.array([[1.0, 2.0, 3.0], [5.0, 0.0, 7.0]])
            orig = g.apply_affine(f.to_orig, vox)
            np.testing.assert_allclose(g.apply_affine(f.orig_affine, orig), g.apply_affine(f.affine, vox), atol=1e-6)
            boxes = s["boxes_vox"].numpy()
            assert np.allclose(f.boxes_to_world(boxes), g.boxes_voxel_to_world(boxes, f.affine))
            assert Frames.from_dict(json.loads(json.dumps(f.to_dict()))).orig_shape == f.orig_shape
    batch = collate_cases([CacheDataset(cache)[i] for i in range(2)])
    assert len(batch["frames"]) == 2 and isinstance(batch["frames"][0], Frames)
    item = CacheDataset(cache)[0]
    shifted = item["frames"].shifted((2, -3, 1))
    np.testing.assert_allclose(g.apply_affine(shifted.affine, np.zeros(3)),
                               g.apply_affine(item["frames"].affine, np.array([2.0, -3.0, 1.0])))
