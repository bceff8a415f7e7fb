"""I3D inflation: a 2D ResNet in torchvision's layout -> ResNet3D gives the 2D features on
a volume of identical slices.

torchvision is not installed (it conflicts with this torch build), so the 2D reference
network is defined here with torchvision's structure and parameter names.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from preprocess.errors import InputError
from vol3d.models import create_encoder, inflate_resnet_state_dict, load_inflated_resnet
from vol3d.models.resnet3d import ResNet3D


class _Basic2d(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _down2d(cin, planes, stride)

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class _Bottle2d(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = _down2d(cin, planes * 4, stride)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(out)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


def _down2d(cin, cout, stride):
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet2D(nn.Module):
    """torchvision.models.ResNet, same module names, stage outputs exposed."""

    def __init__(self, layers, block="basic", width=64, num_classes=10):
        super().__init__()
        blk = _Basic2d if block == "basic" else _Bottle2d
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, stages = width, []
        for i, n in enumerate(layers):
            mods = []
            for j in range(n):
                mods.append(blk(cin, width * 2**i, (1 if i == 0 else 2) if j == 0 else 1))
                cin = width * 2**i * blk.expansion
            stages.append(nn.Sequential(*mods))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(cin, num_classes)

    def stages(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        outs = [x]
        x = self.maxpool(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outs.append(x)
        return outs


def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial batch-norm statistics, so inflation must carry them over to pass."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_identical_slices_give_the_2d_features(center, block):
    torch.manual_seed(0)
    net2d = ResNet2D((1, 1, 1, 1), block=block, width=8).eval()
    _randomise_bn(net2d)
    net3d = ResNet3D((1, 1, 1, 1), block=block, in_chans=3, width=8, z_kernel=3, z_strides=(2, 2, 2, 2, 2)).eval()
    net3d.load_state_dict(inflate_resnet_state_dict(net2d.state_dict(), time_dim=3, center=center), strict=True)

    image = torch.randn(2, 3, 64, 48)
    volume = image[..., None].expand(-1, -1, -1, -1, 12).contiguous()  # (B, C, X, Y, Z), 12 equal slices
    with torch.no_grad():
        maps2d = net2d.stages(image)
        maps3d = net3d.forward_intermediates(volume)
    for m2, m3 in zip(maps2d, maps3d, strict=True):
        # every depth of every stage equals the 2D map, edges included (replicate padding in Z)
        assert m3.shape[:4] == m2.shape
        torch.testing.assert_close(m3, m2[..., None].expand_as(m3), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(m3.mean(-1), m2, rtol=1e-4, atol=1e-4)


def test_grey_input_adapts_first_conv():
    torch.manual_seed(0)
    net2d = ResNet2D((1, 1, 1, 1), width=8).eval()
    net3d = ResNet3D((1, 1, 1, 1), in_chans=1, width=8, z_strides=(2, 2, 2, 2, 2)).eval()
    net3d.load_state_dict(inflate_resnet_state_dict(net2d.state_dict(), in_chans=1), strict=True)
    grey = torch.randn(1, 1, 64, 64)
    vol = grey[..., None].expand(-1, -1, -1, -1, 4).contiguous()
    with torch.no_grad():
        want = net2d.stages(grey.expand(-1, 3, -1, -1))[-1]
        got = net3d.forward_intermediates(vol, [4])[0]
    torch.testing.assert_close(got, want[..., None].expand_as(got), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("depth_layers, block, preset", [
    ((2, 2, 2, 2), "basic", "resnet3d_18"),
    ((3, 4, 6, 3), "bottleneck", "resnet3d_50"),
    ((3, 8, 36, 3), "bottleneck", "resnet3d_152"),
])
def test_full_presets_accept_torchvision_layout(depth_layers, block, preset):
    with torch.device("meta"):
        sd2d = ResNet2D(depth_layers, block=block).state_dict()
        model = create_encoder(preset)
    sd3d = inflate_resnet_state_dict(sd2d, time_dim=model.z_kernel, in_chans=1)
    target = model.state_dict()
    assert set(sd3d) == set(target)
    assert all(sd3d[k].shape == target[k].shape for k in target)


def test_load_from_safetensors_and_pth(tmp_path):
    from safetensors.torch import save_file

    net2d = ResNet2D((1, 1, 1, 1), width=8)
    sd = {k: v.contiguous() for k, v in net2d.state_dict().items()}
    save_file(sd, str(tmp_path / "r.safetensors"))
    torch.save(sd, tmp_path / "r.pth")
    for name in ("r.safetensors", "r.pth"):
        model = create_encoder("resnet3d_tiny")
        load_inflated_resnet(model, tmp_path / name)
        torch.testing.assert_close(model.layer1[0].conv1.weight.sum(-1), sd["layer1.0.conv1.weight"])
    wrong = create_encoder("resnet3d_18")
    with pytest.raises(InputError, match="r.pth"):
        load_inflated_resnet(wrong, tmp_path / "r.pth")


def test_monai_vit_weights_load_into_vit3d_and_give_the_same_features():
    from monai.networks.nets import ViT

    from vol3d.models.inflate import vit_state_dict_from_monai
    from vol3d.models.vit3d import ViT3D

    torch.manual_seed(0)
    monai_vit = ViT(in_channels=2, img_size=(32, 32, 16), patch_size=(8, 8, 4), hidden_size=48, mlp_dim=192,
                    num_layers=2, num_heads=4, classification=False).eval()
    ours = ViT3D(img_size=(32, 32, 16), patch_size=(8, 8, 4), in_chans=2, embed_dim=48, depth=2, num_heads=4).eval()
    ours.load_state_dict(vit_state_dict_from_monai(monai_vit.state_dict(), depth=2), strict=True)
    x = torch.randn(2, 2, 32, 32, 16)
    with torch.no_grad():
        expected, _ = monai_vit(x)
        got = ours.forward_features(x)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)  # LayerNorm eps 1e-6 vs 1e-5
    with pytest.raises(InputError, match="not a MONAI ViT"):
        vit_state_dict_from_monai({"norm.weight": torch.ones(48)}, depth=2)
