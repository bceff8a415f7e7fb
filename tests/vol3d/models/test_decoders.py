"""The perception decoder's full-resolution stem (``model.perception_stem``) and up-sampling
(``model.perception_upsample``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from preprocess.errors import ConfigError
from vol3d.models.decoders import MonaiUNetPath, build_decoder
from vol3d.models.layers import set_conv_padding
from vol3d.models.registry import create_encoder
from vol3d.models.unet3d import ResUNetEncoder


def _tiny_unet(in_chans: int = 1) -> ResUNetEncoder:
    return ResUNetEncoder(channels=(4, 8, 8), strides=(2, 2, 1), in_chans=in_chans, num_res_units=1)


def _copy_loss(stem: bool, steps: int = 80) -> float:
    """BCE after ``steps`` of Adam on one task: give back a random binary volume voxel by voxel."""
    torch.manual_seed(0)
    enc = _tiny_unet()
    dec, idx = build_decoder(enc, "monai_unet", 1, (16, 16, 16), 4, 1, stem=stem)
    x = (torch.rand(2, 1, 16, 16, 16) > 0.5).float()
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-2)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(dec(x, enc.forward_intermediates(x, idx)), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def test_the_stem_lets_the_decoder_decide_single_voxels():
    # MONAI's UNet path reaches full resolution only through a transposed convolution of
    # half-resolution features: a voxel-by-voxel pattern is what it learns worst
    with_stem, without = _copy_loss(True), _copy_loss(False)
    assert with_stem < 0.5 * without


def test_the_stem_keeps_the_shape_trains_and_leaves_a_stemless_decoder_as_it_was():
    enc = _tiny_unet(in_chans=2)
    plain, _ = build_decoder(enc, "monai_unet", 2, (16, 16, 8), 4, None)
    stemmed, idx = build_decoder(enc, "monai_unet", 2, (16, 16, 8), 4, None, stem=True)
    x = torch.randn(2, 2, 16, 16, 8)
    y = stemmed.forward_features(x, enc.forward_intermediates(x, idx))
    assert y.shape == (2, 4, 16, 16, 8)
    y.square().mean().backward()
    assert stemmed.input_block is not None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stemmed.input_block.parameters())
    # checkpoints of decoders without a stem keep their keys (MONAI UNet's up path: transposed conv, unit)
    assert plain.input_block is None
    assert all(k.startswith("path.ups.") and k.split(".")[3] in ("0", "1") for k in plain.state_dict())


def test_a_stem_is_for_monai_unet_decoders_only():
    enc = create_encoder("resnet3d_tiny", in_chans=1)
    with pytest.raises(ConfigError, match="stem"):
        build_decoder(enc, "unet", 1, (32, 32, 32), 8, None, stem=True)


def _constant_response(upsample: str) -> torch.Tensor:
    """MONAI UNet's up path over constant encoder maps (a 128^3 input): the full-resolution features."""
    torch.manual_seed(0)
    path = MonaiUNetPath([8, 16, 16], [(2, 2, 2), (2, 2, 2)], 4, 0, upsample).eval()
    maps = [torch.ones(1, c, 128 // s, 128 // s, 128 // s) for c, s in zip([8, 16, 16], [2, 4, 4], strict=True)]
    with torch.no_grad():
        return path(maps)[0]


def test_linear_up_sampling_keeps_a_constant_map_constant_where_the_transposed_convolution_ripples():
    # an empty volume's encoder maps are constant away from the borders; a 3x3x3 transposed
    # convolution at stride 2 overlaps every other voxel twice, so its output alternates, and the
    # instance norms after it scale that up into a pattern the heads can read as findings
    interior = (slice(None), slice(32, -32), slice(32, -32), slice(32, -32))
    rippled = _constant_response("transposed")[interior]
    flat = _constant_response("linear")[interior]
    assert rippled.std(dim=(1, 2, 3)).mean() > 0.1
    assert flat.std(dim=(1, 2, 3)).max() < 1e-4
    # the borders still differ from the interior: a constant map is not all the decoder can give
    assert _constant_response("linear").std(dim=(1, 2, 3)).mean() > 0.1


def test_linear_up_sampling_keeps_the_shape_and_passes_gradients():
    enc = _tiny_unet(in_chans=2)
    dec, idx = build_decoder(enc, "monai_unet", 2, (16, 16, 8), 4, 3, stem=True, upsample="linear")
    x = torch.randn(2, 2, 16, 16, 8)
    y = dec(x, enc.forward_intermediates(x, idx))
    assert y.shape == (2, 3, 16, 16, 8)
    y.square().mean().backward()
    assert all(p.grad is not None for p in dec.path.parameters())


def test_up_sampling_is_checked_and_not_for_unetr_decoders():
    with pytest.raises(ConfigError, match="up-sampling"):
        build_decoder(_tiny_unet(), "monai_unet", 1, (16, 16, 16), 4, None, upsample="cubic")
    with pytest.raises(ConfigError, match="up-sampling"):
        build_decoder(create_encoder("resnet3d_tiny", in_chans=1), "unet", 1, (32, 32, 32), 8, None, upsample="cubic")
    with pytest.raises(ConfigError, match="unetr"):
        build_decoder(create_encoder("vit3d_tiny", in_chans=1), "unetr", 1, (32, 32, 16), 8, None,
                      upsample="linear")


def test_a_resnet_unet_decoder_with_linear_up_sampling_reads_a_constant_volume_alike_everywhere():
    # the GPU preset's encoder family (resnet3d_*, batch norm, a "unet" decoder): with replicate padding and
    # interpolation in the up path a featureless volume gives the same features at every voxel, where the
    # decoder's transposed convolutions (kernel = stride: every 2x2x2 block gets the kernel's pattern) do not
    spread = {}
    for upsample in ("transposed", "linear"):
        torch.manual_seed(0)
        enc = create_encoder("resnet3d_tiny", in_chans=1)
        dec, idx = build_decoder(enc, "unet", 1, (32, 32, 32), 8, None, upsample=upsample)
        assert set_conv_padding(enc, "replicate") > 0 and set_conv_padding(dec, "replicate") > 0
        enc.eval()
        dec.eval()
        x = torch.full((1, 1, 32, 32, 32), 0.4)
        with torch.no_grad():
            spread[upsample] = float(dec.forward_features(x, enc.forward_intermediates(x, idx))[0].flatten(1).std(1).max())
    assert spread["linear"] < 1e-4 and spread["transposed"] > 1e-2
    # and it learns: the shape holds and every parameter of the path gets a gradient
    x = torch.randn(2, 1, 32, 32, 32)
    dec.train()
    y = dec.forward_features(x, enc.forward_intermediates(x, idx))
    assert y.shape == (2, 8, 32, 32, 32)
    y.square().mean().backward()
    assert all(p.grad is not None for p in dec.path.parameters())


def test_channels_last_convolutions_compute_the_same_and_save_plainly(tmp_path):
    """``use_channels_last`` (what the training loop does on CPU) keeps the parameters, their values and
    the outputs and gradients (to float rounding); a second call changes nothing; weights save as usual."""
    import copy

    from safetensors.torch import load_file, save_file

    from vol3d.models.layers import use_channels_last

    torch.manual_seed(0)
    enc = _tiny_unet(2)
    dec, idx = build_decoder(enc, "monai_unet", 2, (16, 16, 16), 4, 3, stem=True)
    plain = torch.nn.ModuleList([enc, dec])
    fast = copy.deepcopy(plain)
    params = list(fast.parameters())
    n = use_channels_last(fast)
    assert n > 0 and use_channels_last(fast) == n and list(fast.parameters()) == params  # same objects
    conv = next(m for m in fast.modules() if isinstance(m, torch.nn.Conv3d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d) and len(conv._forward_pre_hooks) == 1
    x = torch.randn(2, 2, 16, 16, 16)
    outs = []
    for model in (plain, fast):
        y = model[1](x, model[0].forward_intermediates(x, idx))
        y.square().mean().backward()
        outs.append((y, [p.grad for p in model.parameters()]))
    (y0, g0), (y1, g1) = outs
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    save_file({k: v.contiguous() for k, v in fast.state_dict().items()}, str(tmp_path / "w.safetensors"))
    plain.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    torch.testing.assert_close(plain[1](x, plain[0].forward_intermediates(x, idx)), y1, rtol=1e-4, atol=1e-5)
