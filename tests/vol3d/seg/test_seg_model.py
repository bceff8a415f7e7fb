"""SegModel: decoder shapes for ViT and ResNet encoders (anisotropic patches), tuning modes,
gradient checkpointing, safetensors save/load and encoder init from a vol3d run."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from preprocess.errors import ConfigError, InputError
from vol3d.models.decoders import level_factors, vit_taps
from vol3d.seg.config import SegModelConfig
from vol3d.seg.model import SegModel, load_init_encoder, model_dir


def _model(encoder: str, patch, **kw) -> SegModel:
    torch.manual_seed(0)
    return SegModel(SegModelConfig(encoder=encoder, patch_size=patch, feature_size=4, class_names=["bg", "a", "b"], **kw))


@pytest.mark.parametrize(
    ("encoder", "patch", "style"),
    [
        ("vit3d_tiny", (32, 32, 16), "unetr"),  # patch 8x8x4: the Z axis has one level less
        ("vit3d_tiny", (16, 24, 8), "unetr"),  # non-cubic, not the ViT's own img_size
        ("resnet3d_tiny", (32, 32, 16), "unet"),
        ("resnet3d_tiny", (64, 32, 32), "unet"),
        ("resunet3d_tiny", (32, 32, 16), "monai_unet"),
        ("resunet3d_tiny", (48, 32, 24), "monai_unet"),  # non-cubic
    ],
)
def test_decoder_restores_the_input_resolution(encoder, patch, style):
    m = _model(encoder, patch)
    assert m.decoder.style == style
    x = torch.randn(2, 1, *patch)
    y = m(x)
    assert y.shape == (2, 3, *patch)
    y.logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_anisotropic_factors_skip_the_thin_axis_at_high_resolution():
    assert level_factors((8, 8, 4)) == [(2, 2, 1), (2, 2, 2), (2, 2, 2)]
    assert level_factors((16, 16, 16)) == [(2, 2, 2)] * 4
    assert level_factors((6, 6, 2)) == [(2, 2, 1), (3, 3, 2)]
    assert vit_taps(12, 4) == [2, 5, 8, 11]  # UNETR's blocks 3, 6, 9, 12


def test_patch_must_fit_the_encoder_stride():
    with pytest.raises(ConfigError, match="multiple of the encoder's total stride"):
        _model("vit3d_tiny", (30, 32, 16))
    with pytest.raises(ConfigError, match="single-scale"):
        _model("vit3d_tiny", (32, 32, 16), decoder="unet")
    with pytest.raises(ConfigError, match="bottom layer"):
        _model("resnet3d_tiny", (32, 32, 32), decoder="monai_unet")


def test_frozen_encoder_gets_no_gradient_and_keeps_batchnorm_statistics():
    m = _model("resnet3d_tiny", (32, 32, 16), tune="frozen")
    before = {k: v.clone() for k, v in m.encoder.state_dict().items()}
    m.train()
    m(torch.randn(2, 1, 32, 32, 16)).mean().backward()
    assert all(p.grad is None for p in m.encoder.parameters())
    assert all(p.grad is not None for p in m.decoder.parameters())
    assert all(torch.equal(before[k], v) for k, v in m.encoder.state_dict().items())  # running stats too


@pytest.mark.parametrize("encoder", ["vit3d_tiny", "resnet3d_tiny", "resunet3d_tiny"])
def test_lora_trains_adapters_only(encoder):
    m = _model(encoder, (32, 32, 16), tune="lora", lora_r=2)
    trainable = [n for n, p in m.encoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    m(torch.randn(2, 1, 32, 32, 16)).mean().backward()
    assert all(p.grad is not None for n, p in m.encoder.named_parameters() if p.requires_grad)
    full = _model(encoder, (32, 32, 16))
    assert m.num_parameters(trainable_only=True) < full.num_parameters(trainable_only=True)


def test_gradient_checkpointing_gives_the_same_gradients():
    plain, ckpt = _model("vit3d_tiny", (32, 32, 16)), _model("vit3d_tiny", (32, 32, 16), grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 32, 32, 16)
    for m in (plain, ckpt):
        m(x).square().mean().backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), n


@pytest.mark.parametrize("tune", ["full", "lora"])
def test_save_and_load_round_trip(tmp_path, tune):
    m = _model("vit3d_tiny", (32, 32, 16), tune=tune).eval()
    m.preprocess = {"target_spacing": [4.0, 4.0, 5.0]}
    m.save_pretrained(tmp_path / "run" / "model")
    assert {p.name for p in (tmp_path / "run" / "model").iterdir()} == {"model.safetensors", "seg_config.json",
                                                                          "preprocess.json"}
    again = SegModel.from_pretrained(tmp_path / "run")
    x = torch.randn(1, 1, 32, 32, 16)
    assert torch.allclose(m(x), again(x), atol=1e-5)
    assert again.config == m.config and again.preprocess == m.preprocess
    with pytest.raises(InputError, match="not a segmentation run"):
        model_dir(tmp_path)


def test_encoder_initialised_from_a_vision_language_run(tmp_path):
    from vol3d.models import Vol3DConfig, Vol3DModel, build_tokenizer

    lm = dict(model_type="llama", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, intermediate_size=64, max_position_embeddings=128)
    vlm = Vol3DModel(Vol3DConfig(encoder="vit3d_tiny", input_shape=(32, 32, 16), encoder_overrides={"depth": 3},
                                 lm_config=lm, conv_padding="replicate"),
                    tokenizer=build_tokenizer(["a liver lesion"] * 8, vocab_size=120))
    vlm.save_pretrained(tmp_path / "vlm" / "model")
    arch, state = load_init_encoder(tmp_path / "vlm")
    assert arch == {"encoder": "vit3d_tiny", "encoder_overrides": {"depth": 3}, "in_chans": 1,
                    "conv_padding": "replicate"}
    cfg = dataclasses.replace(SegModelConfig(patch_size=(32, 32, 16), feature_size=4), **arch)
    seg = SegModel(cfg, encoder_state=state)
    for k, v in vlm.encoder.state_dict().items():
        assert torch.equal(seg.encoder.state_dict()[k], v), k
    # the run's padding travels with its encoder, to the decoder's convolutions too
    padded = [c.padding_mode for c in seg.modules() if isinstance(c, torch.nn.Conv3d) and any(c.padding)]
    assert padded and set(padded) == {"replicate"}
    with pytest.raises(ConfigError, match="conv_padding"):
        SegModelConfig(conv_padding="wrap")
    with pytest.raises(InputError, match="not a segmentation run|vision-language run"):
        model_dir(tmp_path / "vlm")
