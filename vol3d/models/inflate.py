"""Inflate a 2D ResNet (torchvision layout) into :class:`vol3d.models.resnet3d.ResNet3D` weights.

I3D inflation: a 2D kernel ``(O, I, kx, ky)`` is repeated ``time_dim`` times along
the slice axis and divided by ``time_dim`` (or placed on the centre slice only with
``center=True``), so a volume made of identical slices gives the 2D network's
features at every depth. Batch-norm statistics and affine parameters carry over
unchanged; the classifier (``fc.*``) is dropped because the encoder has none.
"""

from __future__ import annotations

from pathlib import Path

import torch

from preprocess.errors import InputError


def inflate_conv_weight(w: torch.Tensor, time_dim: int, center: bool = False) -> torch.Tensor:
    """``(O, I, kx, ky) -> (O, I, kx, ky, t)``; 1x1 kernels give ``t = 1``."""
    t = 1 if w.shape[-2:] == (1, 1) else time_dim
    if t == 1:
        return w.unsqueeze(-1).clone()
    if center:
        out = w.new_zeros((*w.shape, t))
        out[..., t // 2] = w
        return out
    return w.unsqueeze(-1).repeat(1, 1, 1, 1, t) / t


def adapt_input_channels(w: torch.Tensor, in_chans: int) -> torch.Tensor:
    """First-conv weight ``(O, 3, ...)`` -> ``(O, in_chans, ...)`` keeping the response to grey input.

    The RGB filters are summed (a grey image has equal channels) and spread evenly over
    the new channels, so a CT volume replicated on ``in_chans`` channels sees the filter
    ImageNet learnt for luminance.
    """
    if w.shape[1] == in_chans:
        return w
    return w.sum(dim=1, keepdim=True).repeat(1, in_chans, *([1] * (w.ndim - 2))) / in_chans


def inflate_resnet_state_dict(
    state_dict_2d: dict[str, torch.Tensor], time_dim: int = 3, center: bool = False, in_chans: int | None = None
) -> dict[str, torch.Tensor]:
    """torchvision ResNet state dict -> :class:`ResNet3D` state dict.

    Args:
        state_dict_2d: e.g. ``torchvision.models.resnet152(weights=...).state_dict()`` saved to disk.
        time_dim: kernel size across slices, must equal the target model's ``z_kernel``.
        center: put the 2D kernel on the centre slice only instead of averaging over ``time_dim``.
        in_chans: channels of the 3D model's input; the first conv is adapted when it differs from 3.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict_2d.items():
        if name.startswith("fc."):
            continue
        if tensor.ndim == 4:  # convolution weights
            if name == "conv1.weight" and in_chans is not None:
                tensor = adapt_input_channels(tensor, in_chans)
            out[name] = inflate_conv_weight(tensor, time_dim, center)
        else:
            out[name] = tensor.clone()
    return out


def load_inflated_resnet(model: torch.nn.Module, path: str | Path, center: bool = False) -> None:
    """Load a local 2D torchvision ResNet checkpoint (``.safetensors`` or ``.pth``) into ``model``.

    ``.pth`` files are read with ``torch.load(weights_only=True)``: no arbitrary objects
    are unpickled. Raises :class:`InputError` naming the file when keys do not match.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"2D ResNet checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd2d = load_file(str(path))
    else:
        sd2d = torch.load(path, map_location="cpu", weights_only=True)
        sd2d = sd2d.get("state_dict", sd2d)
    sd3d = inflate_resnet_state_dict(sd2d, time_dim=model.z_kernel, center=center, in_chans=model.in_chans)
    target = model.state_dict()
    missing = sorted(set(target) - set(sd3d))
    unexpected = sorted(set(sd3d) - set(target))
    wrong = [k for k in set(target) & set(sd3d) if target[k].shape != sd3d[k].shape]
    if missing or unexpected or wrong:
        raise InputError(
            f"{path}: does not match {type(model).__name__} (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {sorted(wrong)[:3]}); pass a torchvision-layout ResNet of the same depth and width "
            "(e.g. resnet152 for resnet3d_152)"
        )
    model.load_state_dict(sd3d)


# ----------------------------------------------------------------------------- MONAI's ViT

#: MONAI ``monai.networks.nets.ViT`` parameter names -> :class:`~vol3d.models.vit3d.ViT3D` names, per block
#: (``{i}`` the block index). MONAI's qkv has no bias (ours starts at zero) and its cross-attention
#: norm is unused without cross-attention, so it is dropped.
MONAI_VIT_NAMES = {
    "patch_embedding.position_embeddings": "pos_embed",
    "patch_embedding.patch_embeddings.weight": "patch_embed.proj.weight",
    "patch_embedding.patch_embeddings.bias": "patch_embed.proj.bias",
    "blocks.{i}.norm1.weight": "blocks.{i}.norm1.weight",
    "blocks.{i}.norm1.bias": "blocks.{i}.norm1.bias",
    "blocks.{i}.attn.qkv.weight": "blocks.{i}.attn.qkv.weight",
    "blocks.{i}.attn.out_proj.weight": "blocks.{i}.attn.proj.weight",
    "blocks.{i}.attn.out_proj.bias": "blocks.{i}.attn.proj.bias",
    "blocks.{i}.norm2.weight": "blocks.{i}.norm2.weight",
    "blocks.{i}.norm2.bias": "blocks.{i}.norm2.bias",
    "blocks.{i}.mlp.linear1.weight": "blocks.{i}.mlp.fc1.weight",
    "blocks.{i}.mlp.linear1.bias": "blocks.{i}.mlp.fc1.bias",
    "blocks.{i}.mlp.linear2.weight": "blocks.{i}.mlp.fc2.weight",
    "blocks.{i}.mlp.linear2.bias": "blocks.{i}.mlp.fc2.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}


def vit_state_dict_from_monai(monai_sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """A ``monai.networks.nets.ViT`` state dict (e.g. the encoder of MONAI's UNETR/SwinUNETR bundles,
    or a self-supervised ViT saved by MONAI) as :class:`~vol3d.models.vit3d.ViT3D` weights.

    The architectures match (pre-norm blocks, GELU MLP, one token per patch, positional embedding
    in the same ``(X, Y, Z)`` token order); build the ``ViT3D`` with MONAI's ``img_size``,
    ``patch_size``, ``hidden_size``, ``num_layers`` and ``num_heads`` and load the result with
    ``strict=True``. The only difference left is LayerNorm's epsilon (MONAI 1e-5, ours 1e-6).
    Raises :class:`InputError` naming the missing parameters when ``monai_sd`` is not a MONAI ViT.
    """
    names = {}
    for monai_name, ours in MONAI_VIT_NAMES.items():
        for i in range(depth) if "{i}" in monai_name else [None]:
            names[monai_name.format(i=i)] = ours.format(i=i)
    missing = [n for n in names if n not in monai_sd]
    if missing:
        raise InputError(f"not a MONAI ViT state dict of depth {depth}: missing {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''}; pass the ViT's own state_dict() "
                         "(for UNETR: the keys under 'vit.', prefix removed)")
    out = {ours: monai_sd[name] for name, ours in names.items()}
    for i in range(depth):
        qkv = monai_sd[f"blocks.{i}.attn.qkv.weight"]
        out[f"blocks.{i}.attn.qkv.bias"] = monai_sd.get(f"blocks.{i}.attn.qkv.bias", qkv.new_zeros(qkv.shape[0]))
    return out
