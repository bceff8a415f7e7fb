"""``SegModel``: a vol3d encoder plus a segmentation decoder, saved as safetensors + JSON.

A saved model is one directory (``RUN/model``)::

    model.safetensors   every weight (LoRA adapters under peft's names when tune=lora)
    seg_config.json     the SegModelConfig
    preprocess.json     the PreprocessConfig the training cache was made with, so that
                        ``vol3d predict`` prepares new images exactly the same way

Loading never unpickles anything.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preprocess.config_io import from_dict, to_dict
from preprocess.errors import ConfigError, InputError
from vol3d.models.decoders import build_decoder
from vol3d.models.layers import set_conv_padding
from vol3d.models.registry import create_encoder
from vol3d.rundir import PREPROCESS_NAME, VLM_CONFIG_NAME, WEIGHTS_NAME
from vol3d.rundir import SEG_CONFIG_NAME as CONFIG_NAME
from vol3d.seg.config import SegModelConfig


class SegModel(nn.Module):
    """Encoder -> ``forward_intermediates`` -> :class:`~vol3d.models.decoders.SegDecoder` -> logits.

    Args:
        config: architecture and tuning mode.
        encoder_state: encoder weights to start from (e.g. :func:`load_init_encoder`), loaded
            before LoRA adapters are added.
        preprocess: the preprocessing config (plain dict, as in the cache's ``params.json``).
    """

    def __init__(self, config: SegModelConfig, encoder_state: dict[str, torch.Tensor] | None = None,
                 preprocess: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = config
        self.preprocess = dict(preprocess or {})
        try:
            self.encoder = create_encoder(config.encoder, in_chans=config.in_chans, **config.encoder_overrides)
        except ValueError as exc:
            raise ConfigError(f"model.encoder {config.encoder!r}: {exc}") from None
        if encoder_state is not None:
            missing, unexpected = self.encoder.load_state_dict(encoder_state, strict=False)
            if missing or unexpected:
                raise InputError(f"the --init encoder weights do not fit encoder {config.encoder!r} "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.decoder, self.indices = build_decoder(
            self.encoder, config.decoder, config.in_chans, config.patch_size, config.feature_size,
            config.num_classes, config.intermediate_indices,
        )
        set_conv_padding(self, config.conv_padding)
        self._apply_tuning()

    # ------------------------------------------------------------------ tuning

    def _apply_tuning(self) -> None:
        cfg = self.config
        self.encoder.set_grad_checkpointing(cfg.grad_checkpointing)
        if cfg.tune == "frozen":
            self.encoder.requires_grad_(False)
        elif cfg.tune == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            targets = lora_targets(self.encoder)
            if not targets:
                raise ConfigError(f"encoder {cfg.encoder!r} has no linear or 1x1x1 layers for LoRA; "
                                  "use model.tune full or frozen")
            self.encoder.requires_grad_(False)
            # peft marks only the adapters trainable
            inject_adapter_in_model(LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                               lora_dropout=cfg.lora_dropout, target_modules=targets), self.encoder)

    def train(self, mode: bool = True) -> SegModel:
        super().train(mode)
        if self.config.tune != "full":
            self.encoder.eval()  # fixed encoder weights: batch-norm statistics and dropout stay fixed too
        return self

    def no_weight_decay(self) -> set[str]:
        """Parameter names the optimiser should not decay (the encoder's own list)."""
        names = self.encoder.no_weight_decay() if hasattr(self.encoder, "no_weight_decay") else set()
        return {f"encoder.{n}" for n in names}

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ------------------------------------------------------------------ forward

    @property
    def class_names(self) -> list[str]:
        return list(self.config.class_names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, X, Y, Z)`` -> logits ``(B, K, X, Y, Z)``; spatial size a multiple of the encoder stride."""
        frozen = self.config.tune == "frozen"
        with torch.no_grad() if frozen else contextlib.nullcontext():
            features = self.encoder.forward_intermediates(x, self.indices)
        return self.decoder(x, features)

    # ------------------------------------------------------------------ save / load

    def save_pretrained(self, directory: str | Path, state_dict: Mapping[str, torch.Tensor] | None = None) -> Path:
        """Write ``model.safetensors``, ``seg_config.json`` and ``preprocess.json`` (no pickles);
        ``state_dict``: the weights to write instead of the module's own (a sharded run's gathered ones)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or self.state_dict()).items()}
        save_file(state, str(directory / WEIGHTS_NAME))
        (directory / CONFIG_NAME).write_text(json.dumps(to_dict(self.config), indent=2))
        (directory / PREPROCESS_NAME).write_text(json.dumps(self.preprocess, indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device | None = None) -> SegModel:
        """Rebuild a model saved by :meth:`save_pretrained` (``RUN`` or ``RUN/model``), in eval mode."""
        from safetensors.torch import load_file

        directory = model_dir(directory)
        config = from_dict(SegModelConfig, json.loads((directory / CONFIG_NAME).read_text()), where=str(directory / CONFIG_NAME))
        pre_path = directory / PREPROCESS_NAME
        preprocess = json.loads(pre_path.read_text()) if pre_path.is_file() else {}
        model = cls(config, preprocess=preprocess)
        state = load_file(str(directory / WEIGHTS_NAME))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise InputError(f"{directory / WEIGHTS_NAME} does not match {CONFIG_NAME} (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}); it was saved by a different model definition")
        if device is not None:
            model.to(device)
        return model.eval()


def lora_targets(encoder: nn.Module) -> list[str]:
    """Names of the encoder layers LoRA can adapt: every ``Linear`` and every ``Conv3d`` that pads
    inside ``Conv3d`` itself (peft's adapter copies the layer's padding, so a layer that pads in
    its own ``forward``, like the ResNet's replicate-padded slice convolutions, is left out)."""
    out = []
    for name, m in encoder.named_modules():
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv3d) and getattr(m, "z_pad", 0) == 0):
            out.append(name)
    return out


def model_dir(path: str | Path) -> Path:
    """``RUN/model`` (or ``path`` itself) holding a saved SegModel; a clear error otherwise."""
    path = Path(path)
    for cand in (path / "model", path):
        if (cand / CONFIG_NAME).is_file() and (cand / WEIGHTS_NAME).is_file():
            return cand
    if (path / "model" / VLM_CONFIG_NAME).is_file() or (path / VLM_CONFIG_NAME).is_file():
        raise InputError(f"{path} is a vision-language run, not a segmentation run; fine-tune one with "
                         f"`vol3d finetune --task seg --init {path} ...` first")
    raise InputError(f"{path} is not a segmentation run: expected {path}/model/{CONFIG_NAME} and "
                     f"{WEIGHTS_NAME} (written by `vol3d finetune --task seg`)")


def load_init_encoder(run: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Encoder architecture and weights of a vol3d run (``vol3d train``/``finetune``, or a seg run).

    Returns ``({"encoder", "encoder_overrides", "in_chans", "conv_padding"}, state_dict)``. Only the
    ``encoder.*`` tensors are read from ``model.safetensors`` (no language model is built).
    """
    from safetensors import safe_open

    run = Path(run)
    src = next((d for d in (run / "model", run) if (d / WEIGHTS_NAME).is_file()), None)
    if src is None:
        raise InputError(f"--init {run}: no model/{WEIGHTS_NAME}; point it at a vol3d run directory")
    if (src / CONFIG_NAME).is_file():
        cfg = json.loads((src / CONFIG_NAME).read_text())
        if cfg.get("tune") == "lora":
            raise InputError(f"--init {run}: its encoder carries LoRA adapters; initialise from the run it was "
                             "tuned from, or retrain it with model.tune full")
    elif (src / VLM_CONFIG_NAME).is_file():
        cfg = json.loads((src / VLM_CONFIG_NAME).read_text())
    else:
        raise InputError(f"--init {run}: {src} has neither {CONFIG_NAME} nor {VLM_CONFIG_NAME}")
    arch = {"encoder": cfg["encoder"], "encoder_overrides": dict(cfg.get("encoder_overrides") or {}),
            "in_chans": int(cfg.get("in_chans", 1)), "conv_padding": str(cfg.get("conv_padding", "zeros"))}
    with safe_open(str(src / WEIGHTS_NAME), framework="pt") as f:
        state = {k[len("encoder."):]: f.get_tensor(k) for k in f.keys() if k.startswith("encoder.")}  # noqa: SIM118
    if not state:
        raise InputError(f"--init {run}: {src / WEIGHTS_NAME} holds no encoder.* weights")
    return arch, state
