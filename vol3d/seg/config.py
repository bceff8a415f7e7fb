"""``SegConfig``: every knob of ``vol3d finetune --task seg`` in one typed dataclass.

YAML presets in ``configs/finetune/seg_*.yaml`` only serialise it; every field is
also a flag (``--model.tune frozen``, ``--data.patch-size 64 64 32``). The fields
of the one training loop (``max_steps``, ``precision``, ``optim`` ...) come from
:class:`vol3d.train.config.RunConfig`, the base it shares with ``TrainConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from preprocess.config_io import option as _f
from preprocess.errors import ConfigError
from vol3d.models.config import CONV_PADDING
from vol3d.train.config import RunConfig

#: The synthetic phantom's organ labels (``vol3d.synth.LABELS``), the default classes.
DEFAULT_CLASSES: list[str] = [
    "background", "liver", "spleen", "kidney_left", "kidney_right",
    "lung_left", "lung_right", "spine", "aorta", "lesion",
]  # fmt: skip

#: How much of the encoder trains.
Tune = Literal["full", "frozen", "lora"]


@dataclass
class SegModelConfig:
    """Encoder + decoder architecture and what of it trains (saved as ``model/seg_config.json``)."""

    encoder: str = _f("vit3d_tiny", "encoder preset (vol3d.models.list_encoders()); --init RUN's encoder wins")
    encoder_overrides: dict[str, Any] = _f({}, "encoder constructor arguments replacing the preset's")
    in_chans: int = _f(1, "input channels (the cache's HU windows)")
    class_names: list[str] = _f(DEFAULT_CLASSES, "one name per output class; index = label value, 0 = background")
    patch_size: tuple[int, int, int] = _f((64, 64, 32), "training patch and sliding-window ROI (X, Y, Z) voxels")
    decoder: Literal["auto", "unetr", "unet", "monai_unet"] = _f(
        "auto", "unetr: project single-scale (ViT) features up; unet: skip connections of a multi-scale "
        "(ResNet) encoder; monai_unet: MONAI UNet's up path (resunet3d encoders); auto picks by the "
        "encoder's feature strides")
    feature_size: int = _f(16, "decoder channels at full resolution (doubling per level, as MONAI UNETR)")
    intermediate_indices: list[int] = _f([], "ViT blocks tapped by the UNETR decoder (empty: evenly spread)")
    tune: Tune = _f("full", "full: train everything; frozen: encoder fixed (decoder only); "
                    "lora: LoRA adapters on the encoder's linear/1x1 layers + decoder")
    lora_r: int = _f(8, "LoRA rank")
    lora_alpha: int = _f(16, "LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA branch")
    grad_checkpointing: bool = _f(False, "recompute encoder blocks in backward (less memory)")
    conv_padding: str = _f("zeros", "padding of every 3D convolution: zeros or replicate "
                           "(vol3d.models.layers.set_conv_padding); --init RUN's wins")

    def __post_init__(self) -> None:
        if self.conv_padding not in CONV_PADDING:
            raise ConfigError(f"model.conv_padding must be one of {CONV_PADDING}, got {self.conv_padding!r}")
        self.patch_size = tuple(int(v) for v in self.patch_size)  # type: ignore[assignment]
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ConfigError(f"model.patch_size must be 3 positive voxel counts, got {self.patch_size}")
        if len(self.class_names) < 2:
            raise ConfigError("model.class_names needs background plus at least one class")
        if len(set(self.class_names)) != len(self.class_names):
            raise ConfigError(f"model.class_names has duplicates: {self.class_names}")
        for name, v in (("in_chans", self.in_chans), ("feature_size", self.feature_size), ("lora_r", self.lora_r)):
            if v < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {v}")
        if self.tune not in ("full", "frozen", "lora"):
            raise ConfigError(f"model.tune must be full, frozen or lora, got {self.tune!r}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class SegDataConfig:
    """Patches from the preprocessed cache (label-balanced) and validation volumes."""

    cache_dir: str = _f("", "preprocessed cache directory (`vol3d preprocess ... --labels DIR`); required")
    train_split: str = _f("train", "manifest split used for training")
    val_split: str = _f("val", "manifest split for periodic validation (\"\" disables it)")
    batch_size: int = _f(2, "patches per process per micro-step")
    num_workers: int = _f(0, "DataLoader worker processes (each opens its own HDF5 handles)")
    label_probability: float = _f(0.67, "chance a patch is centred on a labelled voxel (else uniform), as nnU-Net's 1/3 forced foreground")
    samples_per_volume: int = _f(0, "distinct patches per case per pass; 0 = enough that no patch repeats in the run")
    max_val_cases: int = _f(8, "cap on validation volumes (0 = all)")

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0 or self.samples_per_volume < 0 or self.max_val_cases < 0:
            raise ConfigError("data.num_workers, data.samples_per_volume and data.max_val_cases must be >= 0")
        if not 0.0 <= self.label_probability <= 1.0:
            raise ConfigError(f"data.label_probability must be in [0, 1], got {self.label_probability}")


@dataclass
class SegLossConfig:
    """MONAI ``DiceCELoss`` weights."""

    dice: float = _f(1.0, "weight of the soft Dice term")
    ce: float = _f(1.0, "weight of the cross-entropy term")
    include_background: bool = _f(False, "count background in the Dice term (nnU-Net: no)")
    batch_dice: bool = _f(True, "Dice over the whole batch rather than per patch (nnU-Net's batch Dice): a small "
                                "organ absent from one patch no longer pulls its class towards zero there")

    def __post_init__(self) -> None:
        if self.dice < 0 or self.ce < 0 or self.dice + self.ce == 0:
            raise ConfigError(f"loss.dice and loss.ce must be >= 0 and not both 0, got {self.dice}, {self.ce}")


@dataclass
class InferConfig:
    """MONAI sliding-window inference (validation and ``vol3d predict``)."""

    overlap: float = _f(0.5, "fraction of the ROI shared by neighbouring windows")
    mode: Literal["gaussian", "constant"] = _f("gaussian", "blend of overlapping windows")
    sw_batch_size: int = _f(4, "windows per forward pass")

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"infer.overlap must be in [0, 1), got {self.overlap}")
        if self.sw_batch_size < 1:
            raise ConfigError(f"infer.sw_batch_size must be >= 1, got {self.sw_batch_size}")


@dataclass
class SegConfig(RunConfig):
    """One segmentation fine-tune (saved as ``RUN/config.yaml``)."""

    task: Literal["seg"] = _f("seg", "Always `seg` (so a run dir says what trained it).")
    max_steps: int = _f(500, "Number of optimizer steps.")
    model: SegModelConfig = field(default_factory=SegModelConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    loss: SegLossConfig = field(default_factory=SegLossConfig)
    infer: InferConfig = field(default_factory=InferConfig)
