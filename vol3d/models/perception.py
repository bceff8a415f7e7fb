"""Perception on the encoder's fine maps, shared by every task of the vision-language model.

A dense decoder (:mod:`vol3d.models.decoders`, the family ``vol3d finetune --task seg`` uses)
turns the encoder's multi-scale maps into a full-resolution feature map, and 1x1x1 heads read it:

- **organs**: softmax over the organ classes of the export's label maps (finding voxels count as
  the organ around them), trained with MONAI's DiceCE;
- **findings**: per voxel, the probability of being a finding (any countable type: a lesion,
  a nodule, a cyst ...) and, given that, of each type. Each connected component is one finding,
  its box the component's extent (:func:`vol3d.tasks.regions.perceived_from_maps`): with a
  mask the box is exact, which a box regressed from a centre is not (docs/benchmarks/quality.md);
- **conditions** (findings that are a state of an organ, e.g. splenomegaly): a logit from the
  encoder features pooled over that organ and its volume (:meth:`Perception.read_regions`).

:meth:`Perception.region_tokens` pools the encoder's finest map over each region (finding
component or organ) and, with the region's descriptors (type, score, box, size, volume), makes
the token that fills its ``<reg>``/``<org>`` placeholder in the findings digest. It reads the
*encoder's* map, not the decoder's, so that training can run the decoder on lesion-centred
patches (:class:`vol3d.train.objectives.VLMObjective`) while the language model reads whole volumes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from preprocess.errors import ConfigError
from vol3d.models.decoders import build_decoder, probe_features
from vol3d.tasks.findings import FindingVocab, coarse_organ
from vol3d.tasks.regions import LabelSpec, region_feature_dim

#: Prior probability of a finding voxel at initialisation (RetinaNet's trick for rare positives).
FINDING_PRIOR = 0.01


class Perception(nn.Module):
    """Decoder and heads over ``encoder.forward_intermediates`` (see the module docstring).

    Args:
        encoder: the model's volume encoder (a multi-scale one: ResNet, ResUNet; or a ViT).
        in_chans: input channels.
        input_shape: model-input ``(X, Y, Z)`` (a multiple of the encoder's total stride).
        labels: what the label-map values mean.
        vocab: the finding vocabulary (countable findings are detected, conditions classified).
        feature_size: channels of the full-resolution feature map.
        hidden: width of the region tokens (the LM's hidden size).
        decoder: decoder style (``auto``: by the encoder, see :func:`build_decoder`).
        stem: a full-resolution stem on the input for a ``monai_unet`` decoder
            (:class:`~vol3d.models.decoders.SegDecoder`).
        upsample: a ``monai_unet`` decoder's up-sampling, ``transposed`` or ``linear``
            (:class:`~vol3d.models.decoders.MonaiUNetPath`).
    """

    def __init__(self, encoder: nn.Module, in_chans: int, input_shape: Sequence[int], labels: LabelSpec,
                 vocab: FindingVocab, feature_size: int, hidden: int, decoder: str = "auto",
                 stem: bool = False, upsample: str = "transposed") -> None:
        super().__init__()
        self.labels, self.vocab = labels, vocab
        self.countable = [n for n, s in vocab.items() if s.countable]
        self.conditions = [n for n, s in vocab.items() if not s.countable]
        if not self.countable and not self.conditions:
            raise ConfigError("perception needs a finding vocabulary with at least one finding")
        self.decoder, indices = build_decoder(encoder, decoder, in_chans, input_shape, feature_size, None,
                                              stem=stem, upsample=upsample)
        self.indices: list[int] | None = indices
        fine_dim = probe_features(encoder, self.indices)[0][0]  # the finest map the decoder reads
        n_organs = len(labels.organs)
        self.organ_head = nn.Conv3d(feature_size, n_organs, kernel_size=1)
        self.finding_head = nn.Conv3d(feature_size, 1 + len(self.countable), kernel_size=1)
        with torch.no_grad():
            self.finding_head.bias[0].fill_(float(torch.logit(torch.tensor(FINDING_PRIOR))))
        # condition c reads the organ it is a state of (its FindingSpec.organ, matched to a label name)
        self.condition_organ = [self._organ_class(vocab[c].organ) for c in self.conditions]
        self.condition_head = nn.ModuleList(nn.Linear(fine_dim + 1, 1) for _ in self.conditions)
        self.region_embed = nn.Sequential(
            nn.Linear(fine_dim + region_feature_dim(vocab, labels), hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def _organ_class(self, organ: str) -> int:
        organs = self.labels.organs
        matches = [k for k, name in enumerate(organs) if k > 0 and coarse_organ(name) == coarse_organ(organ)]
        if not matches:
            raise ConfigError(f"condition organ {organ!r} is not among the organ labels {list(organs[1:])}; "
                              "name the organ as the label map does")
        return matches[0]

    def forward(self, volume: torch.Tensor, maps: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``volume (B, C, X, Y, Z)`` and the encoder maps of :attr:`indices` -> ``features (B, F, X, Y, Z)``,
        ``organ_logits (B, K, X, Y, Z)`` and ``finding_logits (B, 1 + T, X, Y, Z)`` (channel 0: any
        finding, 1..T: the types)."""
        feats = self.decoder.forward_features(volume, maps)
        return {"features": feats, "organ_logits": self.organ_head(feats).float(),
                "finding_logits": self.finding_head(feats).float()}

    def read_regions(self, fine: torch.Tensor, finding_map: torch.Tensor, organ_map: torch.Tensor,
                     region_kind: torch.Tensor, region_index: torch.Tensor,
                     region_meta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Region tokens ``tokens (B, R, hidden)`` and ``condition_logits (B, C)`` of ``B`` volumes with up
        to ``R`` regions each.

        Args:
            fine: ``(B, F, x, y, z)`` the encoder's finest map (the first the decoder reads), at any
                stride: each region's voxel mask is average-pooled to its grid as weights.
            finding_map: ``(B, X, Y, Z)`` long, the finding region of each voxel (-1: none).
            organ_map: ``(B, X, Y, Z)`` long, the organ class of each voxel.
            region_kind: ``(B, R)`` long, 0 finding, 1 organ, -1 padding.
            region_index: ``(B, R)`` long, the finding's index in ``finding_map`` or the organ's class.
            region_meta: ``(B, R, M)`` :func:`vol3d.tasks.regions.region_features` rows.
        """
        f = fine.shape[1]
        grid = tuple(int(g) for g in fine.shape[2:])
        flat = fine.flatten(2).float()  # (B, F, n)
        n_find = max(int(finding_map.max().item()) + 1 if finding_map.numel() else 0, 1)
        n_org = len(self.labels.organs)
        pooled_f = _pool(flat, finding_map, n_find, grid)  # (B, n_find, F)
        pooled_o = _pool(flat, organ_map, n_org, grid)  # (B, K, F)
        idx = region_index.clamp(min=0)
        from_f = pooled_f.gather(1, idx.clamp(max=n_find - 1)[..., None].expand(-1, -1, f))
        from_o = pooled_o.gather(1, idx.clamp(max=n_org - 1)[..., None].expand(-1, -1, f))
        pooled = torch.where((region_kind == 0)[..., None], from_f, from_o)
        tokens = self.region_embed(torch.cat([pooled, region_meta.float()], dim=-1)) * (region_kind >= 0)[..., None]
        return {"tokens": tokens, "condition_logits": self._conditions(pooled_o, organ_map)}

    def condition_logits(self, fine: torch.Tensor, organ_map: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` condition logits from the encoder's finest map ``(B, F, x, y, z)`` and the organ
        map ``(B, X, Y, Z)`` (as :meth:`read_regions`, without the region tokens)."""
        grid = tuple(int(g) for g in fine.shape[2:])
        return self._conditions(_pool(fine.flatten(2).float(), organ_map, len(self.labels.organs), grid), organ_map)

    def _conditions(self, pooled_o: torch.Tensor, organ_map: torch.Tensor) -> torch.Tensor:
        """Each condition's logit from its organ's pooled features ``pooled_o (B, K, F)`` and volume."""
        n_org = pooled_o.shape[1]
        ids = organ_map.flatten(1).clamp(0, n_org - 1)
        voxels = ids.new_zeros(ids.shape[0], n_org).scatter_add_(1, ids, torch.ones_like(ids)).float()  # (B, K)
        cols = [head(torch.cat([pooled_o[:, k], torch.log1p(voxels[:, k : k + 1] / 1000.0)], dim=1))
                for head, k in zip(self.condition_head, self.condition_organ, strict=True)]
        return (torch.cat(cols, dim=1) if cols else pooled_o.new_zeros(pooled_o.shape[0], 0)).float()


def _pool(flat: torch.Tensor, ids: torch.Tensor, n: int, grid: tuple[int, ...]) -> torch.Tensor:
    """Mean of features ``flat (B, F, gx*gy*gz)`` over each id ``0..n-1`` of the full-resolution map
    ``ids (B, X, Y, Z)``, its mask pooled to the feature ``grid`` as weights -> ``(B, n, F)``."""
    weights = _pooled_masks(ids, n, grid).to(flat.dtype)  # (B, n, g)
    sums = torch.einsum("bfg,bkg->bkf", flat, weights)
    return sums / weights.sum(-1)[..., None].clamp(min=1e-6)


def _pooled_masks(ids: torch.Tensor, n: int, grid: tuple[int, ...]) -> torch.Tensor:
    """``(B, n, gx*gy*gz)``: the share of each cell of ``grid`` that each id ``0..n-1`` of ``ids (B, X, Y, Z)``
    covers (``adaptive_avg_pool3d`` of its one-hot mask; ids outside ``0..n-1`` cover nothing).

    When the grid divides the map (the encoder's strides do) each voxel lies in one cell, and the
    shares are counts per cell: one ``bincount`` instead of pooling an ``n``-channel one-hot copy of
    the map (7 ms against 28 for four 64 x 64 x 32 maps, the same values)."""
    b, shape = ids.shape[0], tuple(int(s) for s in ids.shape[1:])
    valid = (ids >= 0) & (ids < n)
    if any(s % g for s, g in zip(shape, grid, strict=True)):
        onehot = F.one_hot(ids.clamp(0, n - 1), n).float() * valid[..., None]  # (B, X, Y, Z, n)
        return F.adaptive_avg_pool3d(onehot.permute(0, 4, 1, 2, 3), grid).flatten(2)
    cells = math.prod(grid)
    cell = torch.zeros((), dtype=torch.long, device=ids.device)
    for axis, (s, g) in enumerate(zip(shape, grid, strict=True)):
        coord = torch.arange(s, device=ids.device) // (s // g)
        cell = cell * g + coord.view([-1 if a == axis else 1 for a in range(3)])
    key = (torch.arange(b, device=ids.device).view(b, 1, 1, 1) * n + ids.clamp(0, n - 1)) * cells + cell
    counts = torch.bincount(key[valid], minlength=b * n * cells).view(b, n, cells)
    return counts.float() / float(math.prod(shape) // cells)
