"""The vision-language model: 3D encoder -> token reducer -> projector -> any HF causal LM.

As in LLaVA, the processor expands one ``<vol>`` placeholder into ``num_vol_tokens``
image-token ids, and :meth:`Vol3DModel.forward` replaces their embeddings with the
projected volume tokens (``masked_scatter``) after checking that the counts match.
Heads beside the LM (EHR codes, box, contrastive) read the pooled encoder features.

A saved model is one directory::

    model.safetensors    every trained weight (encoder, reducer, projector, LM, heads)
    vol3d_config.json    the Vol3DConfig
    lm/                  the LM's HF config.json and tokenizer files (no weights)

Loading never unpickles anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preprocess.errors import ConfigError, InputError
from vol3d.models.config import Vol3DConfig
from vol3d.models.heads import BoxHead, ContrastiveHead, EHRHead, TextTower
from vol3d.models.layers import fourier_features
from vol3d.models.processor import Vol3DProcessor
from vol3d.models.reducers import create_reducer
from vol3d.models.registry import create_encoder
from vol3d.models.tokenizer import VOL_TOKEN, add_vol3d_tokens, load_tokenizer

CONFIG_NAME = "vol3d_config.json"
PREPROCESS_NAME = "preprocess.json"  # see preprocess.config.read_config
WEIGHTS_NAME = "model.safetensors"
LM_DIR = "lm"


def _projector(in_dim: int, out_dim: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


class Vol3DModel(nn.Module):
    """Volume encoder, reducer, projector, causal LM and optional heads.

    Args:
        config: the :class:`Vol3DConfig`.
        tokenizer: required with ``lm_config`` (e.g. ``build_tokenizer(texts)``); with
            ``lm_path`` the checkpoint's tokenizer is used unless one is given.
        lm: an already built LM (used by :meth:`from_pretrained`); overrides lm_path/lm_config.
    """

    def __init__(self, config: Vol3DConfig, tokenizer=None, lm: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        if lm is None and config.lm_path is not None and not (Path(config.lm_path) / "config.json").is_file():
            raise InputError(f"lm_path {config.lm_path} has no config.json; point it at a local HF causal-LM "
                             "checkpoint directory (config.json, weights, tokenizer files)")
        if tokenizer is None:
            if config.lm_path is None:
                raise ConfigError("a tiny lm_config needs a tokenizer: Vol3DModel(cfg, tokenizer=build_tokenizer(texts))")
            tokenizer = load_tokenizer(config.lm_path)
        add_vol3d_tokens(tokenizer)
        self.tokenizer = tokenizer
        # The preprocessing config (PreprocessConfig as a dict) the training volumes were made
        # with, saved beside the weights so a model dir alone can prepare new images.
        self.preprocess: dict | None = None
        self.vol_token_id = int(tokenizer.convert_tokens_to_ids(VOL_TOKEN))

        self.encoder = create_encoder(config.encoder, in_chans=config.in_chans, **config.encoder_overrides)
        self.reducer = create_reducer(config.reducer, self.encoder.embed_dim, **config.reducer_params)
        self.lm = lm if lm is not None else self._build_lm()
        hidden = int(self._base_lm().config.hidden_size)
        self.projector = _projector(self.reducer.out_dim, hidden, config.projector_depth)
        self.pos_embed = None
        if config.position_bands > 0:
            self.pos_embed = nn.Linear(6 * config.position_bands, hidden)
            # starts as a no-op so a pretrained LM first sees plain projected tokens
            nn.init.zeros_(self.pos_embed.weight)
            nn.init.zeros_(self.pos_embed.bias)

        dim = self.encoder.embed_dim
        self.ehr_head = EHRHead(dim, config.num_ehr_codes) if config.num_ehr_codes else None
        self.box_head = BoxHead(dim) if config.box_head else None
        self.text_tower = TextTower(config.text_tower) if config.contrastive else None
        self.contrastive_head = (
            ContrastiveHead(dim, self.text_tower.hidden_size, config.contrastive_dim) if self.text_tower else None
        )
        self._apply_training_options()

    # ------------------------------------------------------------------ construction

    def _build_lm(self) -> nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = self.config
        dtype = getattr(torch, cfg.lm_dtype)
        if cfg.lm_path is not None:
            lm = AutoModelForCausalLM.from_pretrained(cfg.lm_path, local_files_only=True, dtype=dtype)
        else:
            tok = self.tokenizer
            params = dict(cfg.lm_config or {})
            model_type = params.pop("model_type")
            params.setdefault("vocab_size", len(tok))
            for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
                params.setdefault(key, getattr(tok, key))
            lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **params), dtype=dtype)
        if lm.get_input_embeddings().num_embeddings < len(self.tokenizer):
            lm.resize_token_embeddings(len(self.tokenizer))
        return lm

    def _base_lm(self) -> nn.Module:
        """The HF model under any peft wrapper."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def _apply_training_options(self) -> None:
        cfg = self.config
        if cfg.lora and not hasattr(self.lm, "peft_config"):
            from peft import LoraConfig, get_peft_model

            targets: list[str] | str = cfg.lora_target_modules
            if targets == ["all-linear"]:
                targets = "all-linear"
            self.lm = get_peft_model(self.lm, LoraConfig(
                r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                target_modules=targets, task_type="CAUSAL_LM",
            ))
        if cfg.freeze_lm:
            self.lm.requires_grad_(False)
        if cfg.freeze_encoder:
            self.encoder.requires_grad_(False)
        self.encoder.set_grad_checkpointing(cfg.grad_checkpointing_encoder)
        if cfg.grad_checkpointing_lm:
            base = self._base_lm()
            # transformers 5 renamed the method; 4.x only has the old name
            if hasattr(base, "activation_checkpointing_enable"):
                base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def train(self, mode: bool = True) -> Vol3DModel:
        super().train(mode)
        if self.config.freeze_encoder:
            self.encoder.eval()  # frozen encoder: batch-norm statistics must not drift either
        return self

    # ------------------------------------------------------------------ properties

    @property
    def num_vol_tokens(self) -> int:
        """Volume tokens the LM receives for ``config.input_shape``."""
        return self.reducer.num_tokens(self.encoder.token_grid(self.config.input_shape))

    @property
    def processor(self) -> Vol3DProcessor:
        """A processor matching this model's tokenizer and token count (right padding)."""
        return Vol3DProcessor(self.tokenizer, self.num_vol_tokens)

    @property
    def device(self) -> torch.device:
        return self.projector[0].weight.device

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.config.bf16 and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ forward

    def encode_volume(self, volume: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, C, X, Y, Z)`` -> ``tokens (B, M, H)`` in LM space, ``positions (B, M, 3)`` in [0, 1],
        ``pooled (B, D)`` mean encoder features."""
        if volume.ndim != 5:
            raise InputError(f"volume must be (B, C, X, Y, Z), got shape {tuple(volume.shape)}")
        feats = self.encoder.forward_features(volume)  # (B, N, D)
        spatial = tuple(volume.shape[2:])
        grid = self.encoder.token_grid(spatial)
        positions = self.encoder.token_positions(spatial).to(volume.device)
        reduced, positions = self.reducer(feats, positions, grid, volume=volume)
        tokens = self.projector(reduced)
        if self.pos_embed is not None:
            tokens = tokens + self.pos_embed(fourier_features(positions.to(tokens.dtype), self.config.position_bands))
        return {"tokens": tokens, "positions": positions, "pooled": feats.mean(dim=1)}

    def _merge_embeddings(self, input_ids: torch.Tensor, vol_tokens: torch.Tensor) -> torch.Tensor:
        """LM input embeddings with ``<vol>`` positions filled by ``vol_tokens (B, M, H)``."""
        is_vol = input_ids == self.vol_token_id
        counts = is_vol.sum(dim=1)
        m = vol_tokens.shape[1]
        if input_ids.shape[0] != vol_tokens.shape[0] or bool((counts != m).any()):
            bad = [(i, int(c)) for i, c in enumerate(counts.tolist()) if c != m][:3]
            raise InputError(
                f"<vol> placeholder count mismatch: the volume gives {m} tokens per sample "
                f"({vol_tokens.shape[0]} volumes for {input_ids.shape[0]} sequences) but the input_ids hold "
                f"{', '.join(f'{c} in sample {i}' for i, c in bad) or 'a different batch size'}; build inputs with "
                f"model.processor (num_vol_tokens={m}) and the model's input_shape {self.config.input_shape}"
            )
        embeds = self.lm.get_input_embeddings()(input_ids)
        return embeds.masked_scatter(is_vol.unsqueeze(-1), vol_tokens.to(embeds.dtype))

    def forward(
        self,
        volume: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        texts: list[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One training/eval step's outputs.

        Args:
            volume: ``(B, C, X, Y, Z)``; input_ids / attention_mask / labels: ``(B, T)``
                from :attr:`processor` (labels ``-100`` where no loss is wanted).
            texts: reports for the contrastive text tower (optional).

        Returns a dict with ``loss`` (LM cross-entropy, when labels are given), ``logits
        (B, T, V)``, ``vol_pooled (B, D)``, ``positions (B, M, 3)``, and when the heads
        exist ``ehr_logits (B, K)``, ``box_pred (B, 6)``, ``vol_embed (B, E)``,
        ``text_embed (B, E)`` (if texts), ``logit_scale``.
        """
        with self._autocast(volume.device):
            enc = self.encode_volume(volume)
            embeds = self._merge_embeddings(input_ids, enc["tokens"])
            lm_out = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, use_cache=False)
            out: dict[str, torch.Tensor] = {"logits": lm_out.logits, "vol_pooled": enc["pooled"],
                                            "positions": enc["positions"]}
            if labels is not None:
                out["loss"] = lm_out.loss
            out.update(self.head_outputs(enc["pooled"], texts))
        return out

    def head_outputs(self, pooled: torch.Tensor, texts: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Outputs of the heads beside the LM for pooled features ``(B, D)``."""
        out: dict[str, torch.Tensor] = {}
        if self.ehr_head is not None:
            out["ehr_logits"] = self.ehr_head(pooled).float()
        if self.box_head is not None:
            out["box_pred"] = self.box_head(pooled)
        if self.contrastive_head is not None:
            out["vol_embed"] = self.contrastive_head.embed_volume(pooled)
            out["logit_scale"] = self.contrastive_head.logit_scale.exp()
            if texts is not None:
                out["text_embed"] = self.encode_text(texts)
        return out

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised contrastive text embeddings ``(B, E)`` (needs ``contrastive``)."""
        if self.text_tower is None or self.contrastive_head is None:
            raise ConfigError("encode_text needs a model built with contrastive: true")
        return self.contrastive_head.embed_text(self.text_tower(texts))

    @torch.no_grad()
    def generate(
        self,
        volume: torch.Tensor,
        prompts: list[str] | str | torch.Tensor,
        max_new_tokens: int = 64,
        attention_mask: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Answer each prompt about its volume; greedy unless ``do_sample=True`` etc. is passed.

        ``prompts`` are strings (left-padded by the processor) or already expanded,
        left-padded ``input_ids (B, T)``. Extra keyword arguments go to HF ``generate``
        (``num_beams``, ``temperature``, ``top_p``, ``repetition_penalty`` ...).
        """
        was_training = self.training
        self.eval()
        try:
            if isinstance(prompts, torch.Tensor):
                input_ids = prompts.to(volume.device)
                if attention_mask is None:
                    attention_mask = torch.ones_like(input_ids)
            else:
                batch = Vol3DProcessor(self.tokenizer, self.num_vol_tokens, padding_side="left")(prompts)
                input_ids, attention_mask = batch["input_ids"].to(volume.device), batch["attention_mask"]
            attention_mask = attention_mask.to(volume.device)
            kwargs = {"do_sample": False, "pad_token_id": self.tokenizer.pad_token_id,
                      "eos_token_id": self.tokenizer.eos_token_id, **generate_kwargs}
            with self._autocast(volume.device):
                embeds = self._merge_embeddings(input_ids, self.encode_volume(volume)["tokens"])
                ids = self.lm.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                       max_new_tokens=max_new_tokens, **kwargs)
        finally:
            self.train(was_training)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    # ------------------------------------------------------------------ LoRA

    def merge_lora(self) -> None:
        """Fold LoRA adapters into the LM weights (for deployment); config.lora becomes False."""
        if hasattr(self.lm, "merge_and_unload"):
            self.lm = self.lm.merge_and_unload()
            self.config = dataclasses.replace(self.config, lora=False)

    # ------------------------------------------------------------------ save / load

    def _weights_to_save(self) -> dict[str, torch.Tensor]:
        sd = self.state_dict()
        if self.text_tower is not None and self.text_tower.frozen:
            # a frozen packaged tower is rebuilt from its own files at load time
            sd = {k: v for k, v in sd.items() if not k.startswith("text_tower.")}
        return sd

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``model.safetensors``, ``vol3d_config.json`` and ``lm/`` (HF config + tokenizer).

        With LoRA, the adapters are saved inside ``model.safetensors`` under peft's names
        and rebuilt on load from the config; call :meth:`merge_lora` first to save a plain LM.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        (directory / LM_DIR).mkdir(parents=True, exist_ok=True)
        sd = self._weights_to_save()
        # tied tensors (e.g. LM input/output embeddings) are stored once; aliases are
        # recorded in the metadata and restored by from_pretrained
        seen: dict[tuple[int, tuple[int, ...]], str] = {}
        tensors: dict[str, torch.Tensor] = {}
        aliases: dict[str, str] = {}
        for name, t in sd.items():
            key = (t.data_ptr(), tuple(t.shape))
            if key in seen:
                aliases[name] = seen[key]
            else:
                seen[key] = name
                tensors[name] = t.detach().contiguous().cpu()
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"aliases": json.dumps(aliases)})
        (directory / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2))
        self._base_lm().config.save_pretrained(str(directory / LM_DIR))
        self.tokenizer.save_pretrained(str(directory / LM_DIR))
        if self.preprocess is not None:
            (directory / PREPROCESS_NAME).write_text(json.dumps(self.preprocess, indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device | None = None) -> Vol3DModel:
        """Rebuild a model saved by :meth:`save_pretrained` (safetensors only; nothing unpickled)."""
        from safetensors import safe_open
        from transformers import AutoConfig, AutoModelForCausalLM

        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME, f"{LM_DIR}/config.json"):
            if not (directory / name).is_file():
                raise InputError(f"{directory} is not a saved vol3d model: {name} is missing "
                                 "(expected the output of Vol3DModel.save_pretrained)")
        config = Vol3DConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
        tokenizer = load_tokenizer(directory / LM_DIR)
        lm_config = AutoConfig.from_pretrained(str(directory / LM_DIR), local_files_only=True)
        lm = AutoModelForCausalLM.from_config(lm_config, dtype=getattr(torch, config.lm_dtype))
        model = cls(config, tokenizer=tokenizer, lm=lm)
        with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
        state.update({alias: state[src] for alias, src in aliases.items()})
        expected = set(model._weights_to_save())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise InputError(f"{directory / WEIGHTS_NAME} does not match its config (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}); it was saved by a different model definition")
        model.load_state_dict(state, strict=False)
        if (directory / PREPROCESS_NAME).is_file():
            model.preprocess = json.loads((directory / PREPROCESS_NAME).read_text())
        if device is not None:
            model.to(device)
        return model.eval()
