"""Segmentation: decoders over vol3d encoders, the DiceCE objective, fine-tuning and prediction.

Typical use (see docs/segmentation.md)::

    vol3d finetune --task seg --config configs/finetune/seg_vit_tiny.yaml --data.cache-dir CACHE --run-dir RUN
    vol3d predict RUN INPUT --out DIR

    from vol3d.seg.model import SegModel
    model = SegModel.from_pretrained("RUN/model")      # (B, C, X, Y, Z) -> logits (B, K, X, Y, Z)

Submodules are imported where needed (torch, MONAI, highdicom are heavy):
``config`` (SegConfig), ``decoders``, ``model`` (SegModel), ``objective`` (SegObjective),
``inference`` (sliding window, back to the original grid), ``finetune``, ``predict``,
``dicom_seg``.
"""
