"""The configuration of :class:`vol3d.models.vlm.Vol3DModel` (torch-free).

The command line builds its flags from this dataclass, so importing it must stay
instant: no torch, no transformers here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from preprocess.config_io import from_dict, to_dict
from preprocess.config_io import option as _f
from preprocess.errors import ConfigError

#: How the 3D convolutions of the encoder and the perception pad a volume's borders (``conv_padding``).
CONV_PADDING = ("zeros", "replicate")


@dataclass
class Vol3DConfig:
    """Everything needed to rebuild a :class:`Vol3DModel` (weights aside)."""

    # --- vision
    encoder: str = _f("vit3d_tiny", "encoder preset (see vol3d.models.list_encoders())")
    encoder_overrides: dict[str, Any] = _f({}, "constructor arguments replacing the preset's, e.g. {depth: 6}")
    in_chans: int = _f(1, "channels of the input volume (the cache's HU windows)")
    input_shape: tuple[int, int, int] = _f((32, 32, 16), "model-input spatial shape (X, Y, Z) in voxels")
    reducer: str = _f("pool", "token reducer: none | pool | perceiver | prune")
    reducer_params: dict[str, Any] = _f({}, "reducer arguments, e.g. {out_grid: [8, 8, 4]} or {num_tokens: 256}")
    projector_depth: int = _f(2, "linear layers in the projector to the LM width (1 = linear, 2 = LLaVA MLP)")
    position_bands: int = _f(6, "Fourier bands of token positions added to the LM tokens (0 = none)")
    # --- language model: exactly one of lm_path / lm_config
    lm_path: str | None = _f(None, "local directory of a HF causal LM checkpoint (config, weights, tokenizer)")
    lm_config: dict[str, Any] | None = _f(None, "HF config dict with model_type for a freshly initialised LM (tests/demo)")
    lm_dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "dtype of the LM weights")
    # --- what trains
    freeze_encoder: bool = _f(False, "keep encoder weights (and batch-norm statistics) fixed")
    freeze_lm: bool = _f(False, "keep every LM weight fixed (projector and heads still train)")
    lora: bool = _f(False, "train LoRA adapters on the LM instead of its weights (peft)")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = _f(0.05, "dropout on the LoRA branch")
    lora_target_modules: list[str] = _f(["q_proj", "k_proj", "v_proj", "o_proj"],
                                        "LM module names to adapt (Llama/Qwen names; ['all-linear'] for all)")
    grad_checkpointing_encoder: bool = _f(False, "recompute encoder blocks in backward (less memory)")
    grad_checkpointing_lm: bool = _f(False, "recompute LM layers in backward (less memory)")
    bf16: bool = _f(True, "bf16 autocast when running on CUDA (ignored on CPU)")
    # --- heads
    num_ehr_codes: int = _f(0, "EHR-code logits on pooled features (0 = no head)")
    ehr_codes: list[str] = _f([], "names of the EHR codes, in logit order")
    ehr_finding_prior: bool = _f(False, "perception models: an EHR code that is a vocabulary finding's `code` "
                                 "also reads that finding's perceived score through a learned gain (starting at "
                                 "EHR_PRIOR_GAIN: a finding seen for sure adds 4 to the code's logit over one not "
                                 "seen), so the codes an image shows follow the perception from the first step "
                                 "(docs/models.md, 'EHR codes')")
    box_head: bool = _f(False, "grounding head: the LM writes <box> per instance and the head regresses "
                        "its coordinates (false: the LM spells <box>[x0,...,z1]</box> digits, as M3D does)")
    box_head_level: int = _f(-1, "encoder level whose dense map the grounding head reads (-1 = last; "
                                 "ResNet: 0 stem .. 4 layer4, ViT: block index)")
    box_head_dim: int = _f(128, "width of the grounding head")
    # --- perception: what the image shows, read by every answer
    perception: bool = _f(False, "dense perception on the encoder (organ masks, finding masks with types, conditions); "
                          "every question is preceded by the findings digest with one region token per finding and "
                          "organ, and a <box> in an answer points at one of them (docs/models.md)")
    label_names: list[str] = _f([], "label value -> name in the training cache's label maps (0: background); "
                                "filled from the cache's vocab.json when empty")
    finding_labels: list[str] = _f([], "label names whose voxels are findings (lesions) rather than organs")
    findings: dict[str, dict[str, Any]] = _f({}, "finding vocabulary: name -> FindingSpec fields "
                                            "(docs/tasks_and_metrics.md); filled from the cache's vocab.json when empty")
    perception_dim: int = _f(16, "channels of the perception decoder's full-resolution feature map")
    perception_decoder: str = _f("auto", "perception decoder style: auto | unetr | unet | monai_unet")
    perception_stem: bool = _f(False, "monai_unet perception decoders: a full-resolution stem on the input volume "
                               "that the decoder's top unit reads beside the up-sampled features "
                               "(vol3d.models.decoders.SegDecoder)")
    perception_upsample: str = _f("transposed", "monai_unet and unet perception decoders (resunet3d_*, resnet3d_* "
                                  "encoders): how the up path up-samples, transposed (MONAI's: a transposed "
                                  "convolution) or linear (trilinear interpolation and a convolution: a constant map "
                                  "stays constant; vol3d.models.decoders.MonaiUNetPath, InterpolatingUpBlock)")
    conv_padding: str = _f("zeros", "padding of every 3D convolution of the encoder, the perception and the heads: "
                           "zeros (MONAI's and nnU-Net's) or replicate (the border voxel repeated: a constant "
                           "volume gives constant maps at every layer, so with perception_upsample: linear an "
                           "empty volume reads the same everywhere; vol3d.models.layers.set_conv_padding)")
    perception_patch: list[int] = _f([], "perception models: the crop size (X Y Z) the perception decoder learned "
                                     "on (filled by training from data.perception_patch); [] = whole volumes")
    look_again: bool = _f(True, "perception models that learned on crops (perception_patch): each finding the "
                          "first look at the whole volume finds is looked at again on a crop of that size centred "
                          "on it, as in training, and the finding maps are the mean of the two views there "
                          "(vol3d.tasks.regions.look_again_windows; docs/models.md)")
    max_findings: int = _f(8, "most findings (connected components) one volume's digest lists")
    finding_threshold: float = _f(0.5, "a voxel whose finding probability exceeds this is a finding voxel")
    closed_answers_from_perception: bool = _f(True, "perception models: the first token of a yes/no or count "
                                              "answer about the one finding a question names agrees with the "
                                              "perceived regions (the LM picks the kind of answer, the regions its "
                                              "value, as boxes come from the region a <box> points at); a \"how "
                                              "many\", \"is there\" or \"larger than N mm\" question about it is "
                                              "answered by the regions outright (vol3d.tasks.reasoning.closed_answer)")
    locations_from_perception: bool = _f(True, "perception models: a \"where is it?\" answer about the one finding "
                                         "a question names gives the box of every region the perception found of "
                                         "it, or says there is none (vol3d.tasks.reasoning.location_answer)")
    reports_from_perception: bool = _f(True, "perception models: a generated report keeps the sentences that agree "
                                       "with the perceived regions, drops those asserting a finding not found or "
                                       "denying one found, and gets a sentence for each found finding it leaves "
                                       "out (vol3d.tasks.reports)")
    organ_keep_fraction: float = _f(0.2, "predicted organ maps keep, per organ, its largest connected component and "
                                    "those at least this fraction of it (nnU-Net's post-processing; stray voxels "
                                    "elsewhere would stretch the organ's box); 0 keeps every voxel")
    contrastive: bool = _f(False, "volume/report embeddings for contrastive alignment")
    text_tower: str = _f("minilm", "text encoder for contrastive: 'minilm' (packaged) or a local HF dir")
    contrastive_dim: int = _f(256, "width of the shared contrastive embedding")

    def __post_init__(self) -> None:
        if (self.lm_path is None) == (self.lm_config is None):
            raise ConfigError("set exactly one of lm_path (a local LM checkpoint dir) or lm_config (a tiny HF config)")
        if self.lm_config is not None and "model_type" not in self.lm_config:
            raise ConfigError("lm_config needs a model_type, e.g. {model_type: llama, hidden_size: 64, ...}")
        # Encoder and reducer names are checked when the model is built (create_encoder /
        # create_reducer list the valid ones): their registries need torch, this module must not.
        if self.ehr_codes and self.num_ehr_codes == 0:
            self.num_ehr_codes = len(self.ehr_codes)
        if self.ehr_codes and len(self.ehr_codes) != self.num_ehr_codes:
            raise ConfigError(f"ehr_codes lists {len(self.ehr_codes)} codes but num_ehr_codes is {self.num_ehr_codes}")
        if self.lora and self.freeze_lm:
            raise ConfigError("lora already freezes the LM's own weights; set freeze_lm: false (adapters train)")
        if self.perception and self.box_head:
            raise ConfigError("perception grounds every <box> through its regions; set box_head: false "
                              "(the grounding head is for models without perception)")
        if not 0.0 < self.finding_threshold < 1.0:
            raise ConfigError(f"finding_threshold must be in (0, 1), got {self.finding_threshold}")
        if not 0.0 <= self.organ_keep_fraction <= 1.0:
            raise ConfigError(f"organ_keep_fraction must be in [0, 1], got {self.organ_keep_fraction}")
        if self.perception_patch and (len(self.perception_patch) != 3 or min(self.perception_patch) < 1):
            raise ConfigError(f"perception_patch must be 3 positive sizes (X Y Z) or [], got {self.perception_patch}")
        if self.conv_padding not in CONV_PADDING:
            raise ConfigError(f"conv_padding must be one of {CONV_PADDING}, got {self.conv_padding!r}")
        if self.max_findings < 1 or self.perception_dim < 1:
            raise ConfigError("max_findings and perception_dim must be >= 1")
        if self.box_head_dim < 1:
            raise ConfigError(f"box_head_dim must be >= 1, got {self.box_head_dim}")
        if self.projector_depth < 1:
            raise ConfigError("projector_depth must be >= 1")
        self.input_shape = tuple(int(v) for v in self.input_shape)  # type: ignore[assignment]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vol3DConfig:
        return from_dict(cls, data, where="Vol3DConfig")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)
