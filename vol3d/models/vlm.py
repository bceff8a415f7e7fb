"""The vision-language model: 3D encoder -> token reducer -> projector -> any HF causal LM.

As in LLaVA, the processor expands one ``<vol>`` placeholder into ``num_vol_tokens``
image-token ids, and :meth:`Vol3DModel.forward` replaces their embeddings with the
projected volume tokens (``masked_scatter``) after checking that the counts match.
Heads beside the LM (EHR codes, contrastive) read the pooled encoder features; the grounding
head turns each ``<box>`` token the LM writes into box coordinates (:class:`GroundingHead`).

A saved model is one directory::

    model.safetensors    every trained weight (encoder, reducer, projector, LM, heads)
    vol3d_config.json    the Vol3DConfig
    lm/                  the LM's HF config.json and tokenizer files (no weights)

Loading never unpickles anything.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from preprocess.errors import ConfigError, InputError
from vol3d.models.config import Vol3DConfig
from vol3d.models.heads import ContrastiveHead, EHRHead, GroundingHead, RegionPointer, TextTower
from vol3d.models.layers import fourier_features, grid_to_tokens, set_conv_padding
from vol3d.models.processor import Vol3DProcessor
from vol3d.models.reducers import create_reducer
from vol3d.models.registry import create_encoder
from vol3d.models.tokenizer import add_vol3d_tokens, load_tokenizer
from vol3d.protocol import BOX_END, BOX_START, ORGAN_TOKEN, REGION_TOKEN, VOL_TOKEN
from vol3d.rundir import ADAPTER_DIR, DOMAIN_NAME, LM_DIR, PREPROCESS_NAME, WEIGHTS_NAME
from vol3d.rundir import VLM_CONFIG_NAME as CONFIG_NAME

#: Initial gain of ``model.ehr_finding_prior``: a code's logit moves by this much between its finding
#: perceived with score 0 and score 1 (a probability of 0.12 against 0.88 for a head that says 0).
EHR_PRIOR_GAIN = 4.0
#: Crops the perception looks at again per forward pass (:meth:`Vol3DModel._look_again`).
LOOK_AGAIN_BATCH = 8


class _Reading:
    """One volume a :meth:`Vol3DModel.reading` block is about, and what was computed from it."""

    def __init__(self, volume: torch.Tensor) -> None:
        self.volume = volume  # a strong reference: its memory cannot be reused by another tensor meanwhile
        self.memo: dict[tuple[Any, ...], Any] = {}

    def holds(self, volume: torch.Tensor | None) -> bool:
        """Whether ``volume`` is the block's volume ``(1, C, X, Y, Z)``: the same memory, shape, dtype and
        device (a view of it, as ``volume[:1]`` of an expanded batch is)."""
        v = self.volume
        return (volume is not None and volume.shape == v.shape and volume.dtype == v.dtype
                and volume.device == v.device and volume.data_ptr() == v.data_ptr()
                and volume.stride()[1:] == v.stride()[1:])


def _projector(in_dim: int, out_dim: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)




class NoRepeatNGram:
    """Generation never repeats an ``n``-gram of its own answer, except n-grams holding a ``<box>``
    (an answer lists one ``<box>`` per instance). A tiny LM otherwise loops ("No free fluid. No free
    fluid. ..."); HF's ``no_repeat_ngram_size`` would also forbid the fourth ``<box>`` of a list.
    An HF ``LogitsProcessor``: ``(input_ids (B, t), scores (B, V)) -> scores``."""

    def __init__(self, n: int, exempt: Sequence[int]) -> None:
        self.n, self.exempt = int(n), set(int(t) for t in exempt)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n = self.n
        for b, row in enumerate(input_ids.tolist()):
            if len(row) < n:
                continue
            prefix = tuple(row[len(row) - n + 1:])
            if self.exempt.intersection(prefix):
                continue
            banned = {row[i + n - 1] for i in range(len(row) - n + 1) if tuple(row[i:i + n - 1]) == prefix}
            if banned:
                scores[b, sorted(banned - self.exempt)] = float("-inf")
        return scores


class PerceivedValues:
    """The first token of a closed answer about a finding agrees with the perception: the LM decides
    *what kind* of answer to give (yes/no, a number, a box, a sentence), the perception's regions
    give its *value*, as a ``<box>`` gets its box from the region it points at.

    Per row, ``counts[b]`` is the perceived count of the one finding the question names (a condition:
    1 or 0), None for no constraint. When the LM's most likely first token is "yes" or "no", the
    answer becomes "no" for a count of 0 and "yes" otherwise, unless ``yes_allowed[b]`` is False
    (the question holds a number, e.g. "larger than 20 mm?": a present finding does not make it
    "yes", an absent one still makes it "no"). When it is a digit, the answer becomes the count.
    Later tokens are the LM's. An HF ``LogitsProcessor``."""

    def __init__(self, counts: Sequence[int | None], yes_allowed: Sequence[bool],
                 yes_no: Sequence[tuple[int, int]], digit_ids: Sequence[int]) -> None:
        self.counts, self.yes_allowed = list(counts), list(yes_allowed)
        # (yes, no) token pairs of one spelling ("yes"/"no", "Yes"/"No", with a leading space ...)
        self.pair = {int(t): (int(y), int(n)) for y, n in yes_no for t in (y, n)}
        self.digit_ids = [int(d) for d in digit_ids]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] != 0:  # generation from embeddings: the first step has no token yet
            return scores
        top = scores.argmax(dim=-1).tolist()
        for b, count in enumerate(self.counts):
            if count is None:
                continue
            want = None
            if top[b] in self.pair:
                yes, no = self.pair[top[b]]
                want = no if count == 0 else yes if self.yes_allowed[b] else None
            elif top[b] in self.digit_ids and count < len(self.digit_ids):
                want = self.digit_ids[count]
            if want is not None:
                scores[b] = torch.where(torch.arange(scores.shape[1], device=scores.device) == want,
                                        scores[b].max(), torch.full_like(scores[b], float("-inf")))
        return scores


def box_token_index(labels: torch.Tensor, box_token_id: int) -> torch.Tensor:
    """``(Q, 2)`` ``(row, position)`` of every ``<box>`` token in the *answers* of ``labels (B, T)``,
    row-major: the ``k``-th of a row is that row's ``k``-th box (prompts carry labels -100)."""
    return (labels == box_token_id).nonzero()


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
        if lm is None and config.lm_path is not None and not any(Path(config.lm_path).glob("*.safetensors")):
            raise InputError(f"lm_path {config.lm_path} has no .safetensors weights; vol3d never unpickles weights "
                             "(a .bin can run code): convert it once with transformers' save_pretrained"
                             "(dir, safe_serialization=True) in a trusted environment")
        if tokenizer is None:
            if config.lm_path is None:
                raise ConfigError("a tiny lm_config needs a tokenizer: Vol3DModel(cfg, tokenizer=build_tokenizer(texts))")
            tokenizer = load_tokenizer(config.lm_path)
        add_vol3d_tokens(tokenizer)
        self.tokenizer = tokenizer
        # The preprocessing config (PreprocessConfig as a dict) the training volumes were made
        # with, saved beside the weights so a model dir alone can prepare new images.
        self.preprocess: dict | None = None
        self._reading: _Reading | None = None  # the volume of an open reading() block
        # What the training volumes looked like (vol3d.domain.DomainProfile as a dict): a volume that
        # does not fit gets a warning, and no box, at inference.
        self.domain: dict | None = None
        self.vol_token_id = int(tokenizer.convert_tokens_to_ids(VOL_TOKEN))
        self.box_token_id = int(tokenizer.convert_tokens_to_ids(BOX_START))
        self.region_token_ids = tuple(int(tokenizer.convert_tokens_to_ids(t)) for t in (REGION_TOKEN, ORGAN_TOKEN))

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
        self.perception = None
        self.pointer = None
        if config.perception:
            from vol3d.models.perception import Perception

            if self.labels is None:
                raise ConfigError("perception needs the names of the label maps' values (model.label_names, or "
                                  "'labels' in the cache's vocab.json); a cache without label maps cannot train it yet")
            self.perception = Perception(self.encoder, config.in_chans, config.input_shape, self.labels, self.vocab,
                                         config.perception_dim, hidden, config.perception_decoder,
                                         config.perception_stem, config.perception_upsample)
            self.pointer = RegionPointer(hidden)
        summary = 0
        if self.perception is not None:
            from vol3d.tasks.regions import summary_dim

            summary = summary_dim(self.vocab, self.labels)
        self.ehr_head = EHRHead(dim + summary, config.num_ehr_codes) if config.num_ehr_codes else None
        self.ehr_prior_gain = None
        if config.ehr_finding_prior and config.ehr_codes and self.ehr_head is not None and self.perception is not None:
            from vol3d.tasks.regions import summary_score_columns

            column = torch.tensor(summary_score_columns(self.vocab, config.ehr_codes), dtype=torch.long)
            self.register_buffer("ehr_prior_column", column.clamp(min=0), persistent=False)
            self.register_buffer("ehr_prior_linked", (column >= 0).float(), persistent=False)
            self.ehr_prior_gain = nn.Parameter(torch.full((len(column),), EHR_PRIOR_GAIN))
        self.box_head = (GroundingHead(self._level_dim(config.box_head_level), hidden, config.box_head_dim)
                         if config.box_head else None)
        self.text_tower = TextTower(config.text_tower) if config.contrastive else None
        self.contrastive_head = (
            ContrastiveHead(dim, self.text_tower.hidden_size, config.contrastive_dim) if self.text_tower else None
        )
        set_conv_padding(self, config.conv_padding)
        self._apply_training_options()

    # ------------------------------------------------------------------ construction

    def _build_lm(self) -> nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = self.config
        dtype = getattr(torch, cfg.lm_dtype)
        if cfg.lm_path is not None:
            lm = AutoModelForCausalLM.from_pretrained(cfg.lm_path, local_files_only=True, dtype=dtype,
                                                      trust_remote_code=False, use_safetensors=True)
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

    def _level_dim(self, level: int) -> int:
        """Channels of encoder level ``level`` (see ``Vol3DConfig.box_head_level``)."""
        dims = getattr(self.encoder, "stage_dims", None)
        n = len(dims) if dims is not None else int(getattr(self.encoder, "depth", 1))
        if not -n <= level < n:
            raise ConfigError(f"box_head_level {level} is out of range for encoder {self.config.encoder} "
                              f"({n} levels: use {-n}..{n - 1}, -1 = the last)")
        return int(dims[level]) if dims is not None else int(self.encoder.embed_dim)

    def _new_token_rows(self) -> dict[str, list[int]]:
        """Embedding rows LoRA must train besides its adapters: the ``<box>``/``</box>`` tokens the LM
        writes were added to a pretrained vocabulary and would otherwise stay at their random init
        (``<vol>`` needs none: its embeddings are replaced by volume tokens)."""
        ids = [int(self.tokenizer.convert_tokens_to_ids(t)) for t in (BOX_START, BOX_END)]
        names = {id(m): n.rsplit(".", 1)[-1] for n, m in self.lm.named_modules()}
        emb_in, emb_out = self.lm.get_input_embeddings(), self.lm.get_output_embeddings()
        rows = {names[id(emb_in)]: ids}
        if emb_out is not None and emb_out.weight is not emb_in.weight:  # untied: the output rows too
            rows[names[id(emb_out)]] = ids
        return rows

    def _apply_training_options(self) -> None:
        cfg = self.config
        if cfg.lora and not hasattr(self.lm, "peft_config"):
            from peft import LoraConfig, get_peft_model

            targets: list[str] | str = cfg.lora_target_modules
            if targets == ["all-linear"]:
                targets = "all-linear"
            self.lm = get_peft_model(self.lm, LoraConfig(
                r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                target_modules=targets, task_type="CAUSAL_LM", trainable_token_indices=self._new_token_rows(),
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
    def vocab(self) -> dict:
        """The finding vocabulary the model was trained with (``config.findings``; empty without perception)."""
        from vol3d.tasks.findings import as_vocab

        if not self.config.findings:
            if self.config.perception:
                raise ConfigError("perception needs a finding vocabulary: set model.findings, or give the cache a "
                                  "vocab.json (vol3d preprocess --vocab FILE; docs/tasks_and_metrics.md)")
            return {}
        return as_vocab(self.config.findings, where="model.findings")

    @property
    def labels(self) -> Any:
        """The :class:`~vol3d.tasks.regions.LabelSpec` of the training cache's label maps (None without)."""
        from vol3d.tasks.regions import LabelSpec

        if not self.config.label_names:
            return None
        return LabelSpec(tuple(self.config.label_names), tuple(self.config.finding_labels))

    @property
    def num_vol_tokens(self) -> int:
        """Volume tokens the LM receives for ``config.input_shape``."""
        return self.reducer.num_tokens(self.encoder.token_grid(self.config.input_shape))

    @property
    def processor(self) -> Vol3DProcessor:
        """A processor matching this model's tokenizer and token count (right padding)."""
        return Vol3DProcessor(self.tokenizer, self.num_vol_tokens)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def set_precision(self, dtype: torch.dtype | None) -> None:
        """Run the forward passes under ``dtype`` autocast on CUDA (``None``: fp32), whatever
        ``config.bf16`` said. The training loop calls it with the run's ``precision`` so the model
        never autocasts to another dtype than the one the run asked for; the saved config records
        whether bf16 was used, so inference runs as training did."""
        if dtype not in (None, torch.bfloat16, torch.float16):
            raise InputError(f"precision must be None, bfloat16 or float16, got {dtype}")
        self._amp_dtype = dtype
        self.config = dataclasses.replace(self.config, bf16=dtype == torch.bfloat16)

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """The dtype the forward passes autocast to on ``device`` (None: no autocast):
        :meth:`set_precision`'s dtype, else bf16 when ``config.bf16``; never on CPU."""
        if device.type != "cuda":
            return None
        return getattr(self, "_amp_dtype", torch.bfloat16 if self.config.bf16 else None)

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        dtype = self.autocast_dtype(device)
        return contextlib.nullcontext() if dtype is None else torch.autocast("cuda", dtype=dtype)

    # ------------------------------------------------------------------ forward

    def encode_volume(self, volume: torch.Tensor, dense: bool = True) -> dict[str, Any]:
        """``(B, C, X, Y, Z)`` -> ``tokens (B, M, H)`` in LM space, ``positions (B, M, 3)`` in [0, 1],
        ``pooled (B, D)`` mean encoder features; with a grounding head its cell features
        ``dense (B, N, D')`` on the grid ``dense_grid`` (:meth:`GroundingHead.cells`); with perception
        ``fine`` (the encoder's finest map, which region tokens pool) and, unless ``dense=False``,
        the perception's outputs ``perception`` (:meth:`Perception.forward`)."""
        if volume.ndim != 5:
            raise InputError(f"volume must be (B, C, X, Y, Z), got shape {tuple(volume.shape)}")
        memo = self._memo(volume)
        if memo is not None:  # inside reading(volume): encoded once, with the perception's outputs
            if ("enc",) not in memo:
                memo[("enc",)] = self._encode(volume, dense=True)
            return dict(memo[("enc",)])  # a caller may replace entries of its copy (generate does)
        return self._encode(volume, dense)

    def _encode(self, volume: torch.Tensor, dense: bool) -> dict[str, Any]:
        cells = None
        percept: dict[str, torch.Tensor] | None = None
        if self.perception is not None:  # one pass gives the decoder's maps and the LM's tokens
            # every decoder style's maps end with the encoder's deepest one, the LM's tokens
            maps = self.encoder.forward_intermediates(volume, self.perception.indices)
            feats = grid_to_tokens(maps[-1])
            percept = self.perception(volume, maps) if dense else {}
            fine = maps[0]
        elif self.box_head is not None:  # one pass gives the head's map and the LM's tokens
            fmap, last = self.encoder.forward_intermediates(volume, [self.config.box_head_level, -1])
            cells = self.box_head.cells(fmap)
            feats = grid_to_tokens(last)  # (B, N, D)
        else:
            feats = self.encoder.forward_features(volume)  # (B, N, D)
        spatial = tuple(volume.shape[2:])
        grid = self.encoder.token_grid(spatial)
        positions = self.encoder.token_positions(spatial).to(volume.device)
        reduced, positions = self.reducer(feats, positions, grid, volume=volume)
        tokens = self.projector(reduced)
        if self.pos_embed is not None:
            tokens = tokens + self.pos_embed(fourier_features(positions.to(tokens.dtype), self.config.position_bands))
        out = {"tokens": tokens, "positions": positions, "pooled": feats.mean(dim=1)}
        if cells is not None:
            out["dense"], out["dense_grid"] = cells
        if percept is not None:
            out["fine"] = fine
            if percept:
                out["perception"] = percept
        return out

    def _merge_embeddings(self, input_ids: torch.Tensor, vol_tokens: torch.Tensor,
                          region_tokens: torch.Tensor | None = None, region_valid: torch.Tensor | None = None,
                          ) -> torch.Tensor:
        """LM input embeddings with ``<vol>`` positions filled by ``vol_tokens (B, M, H)`` and the
        ``<reg>``/``<org>`` positions, in order, by the valid rows of ``region_tokens (B, R, H)``
        (``region_valid (B, R)``)."""
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
        embeds = embeds.masked_scatter(is_vol.unsqueeze(-1), vol_tokens.to(embeds.dtype))
        is_reg = self._region_positions(input_ids)
        if region_tokens is None or region_valid is None:
            if bool(is_reg.any()):
                raise InputError("the inputs hold <reg>/<org> placeholders but no regions were given; build prompts "
                                 "with the model's own findings digest (Vol3DModel.generate does)")
            return embeds
        have, want = is_reg.sum(dim=1), region_valid.sum(dim=1)
        if bool((have != want).any()):
            raise InputError(f"region placeholder count mismatch: the digests hold {have.tolist()} <reg>/<org> tokens "
                             f"but the volumes have {want.tolist()} regions")
        return embeds.masked_scatter(is_reg.unsqueeze(-1), region_tokens[region_valid].to(embeds.dtype))

    def _region_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` bool: where the ``<reg>``/``<org>`` placeholders are."""
        reg, org = self.region_token_ids
        return (input_ids == reg) | (input_ids == org)

    def forward(
        self,
        volume: torch.Tensor | None,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        texts: list[str] | None = None,
        box_index: torch.Tensor | None = None,
        volume_index: torch.Tensor | None = None,
        regions: dict[str, torch.Tensor] | None = None,
        patches: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One training/eval step's outputs.

        Args:
            volume: ``(B, C, X, Y, Z)``; input_ids / attention_mask / labels: ``(B, T)``
                from :attr:`processor` (labels ``-100`` where no loss is wanted).
            texts: reports for the contrastive text tower (optional).
            box_index: ``(Q, 2)`` ``(row, position)`` of ``<box>`` tokens whose boxes the
                grounding head should decode (e.g. :func:`box_token_index` of the labels).
            volume_index: ``(B_text,)`` which volume each sequence is about, when several
                questions share one volume (``volume`` is then ``(B_vol, ...)``): the encoder
                runs once per volume. None: sequence ``i`` is about volume ``i``.
            regions: with perception, the regions of each volume the digests in ``input_ids`` list,
                as :func:`vol3d.tasks.regions.pack_regions` arrays (tensors, ``B_vol`` rows); None: the
                model perceives the volumes itself (inference).
            patches: ``(P, C, x, y, z)`` crops whose dense perception outputs are returned instead of
                the whole volumes' (training: the decoder runs on lesion-centred patches only).
                With ``volume`` and ``input_ids`` None, only those (``organ_logits``, ``finding_logits``):
                the perception-only training stage.

        Returns a dict with ``loss`` (LM cross-entropy, when labels are given), ``logits
        (B, T, V)``, ``vol_pooled (B_vol, D)`` (and the heads on it: one row per volume), ``positions (B, M, 3)``, and when the heads
        exist ``ehr_logits (B, K)``, ``vol_embed (B, E)``, ``text_embed (B, E)`` (if texts),
        ``logit_scale``, and with ``box_index`` the grounding head's ``box_logits (Q, N)``,
        ``box_cells (Q, N, 6)``, ``box_anchors (N, 3)``, ``box_cell (3,)`` (see
        :class:`GroundingHead`) and ``box_pred (Q, 6)``, the box each query answers
        (:meth:`GroundingHead.decode`: the best cell not repeating an earlier box of its answer).
        """
        if volume is None or input_ids is None:
            if self.perception is None or patches is None or volume is not None or input_ids is not None:
                raise ConfigError("forward without a volume and text runs the perception on `patches` alone: pass "
                                  "both volume and input_ids, or neither (then patches, with a perception model)")
            with self._autocast(patches.device):
                p = self.perception(patches, self.encoder.forward_intermediates(patches, self.perception.indices))
            return {"organ_logits": p["organ_logits"], "finding_logits": p["finding_logits"]}
        want_boxes = box_index is not None
        if want_boxes and self.box_head is None and self.pointer is None:
            raise ConfigError("box_index needs a model built with box_head: true or perception: true")
        with self._autocast(volume.device):
            enc = self.encode_volume(volume, dense=patches is None)
            vi = volume_index if volume_index is not None else torch.arange(volume.shape[0], device=volume.device)
            tokens = enc["tokens"][vi]
            region_tokens = region_valid = None
            read: dict[str, torch.Tensor] = {}
            if self.perception is not None:
                if regions is None:  # inference: the model's own regions
                    regions = self._perceived(enc, None, volume)[1]
                read = self._read_regions(enc, regions)
                if bool(self._region_positions(input_ids).any()):
                    region_tokens, region_valid = read["tokens"][vi], regions["kind"][vi] >= 0
            embeds = self._merge_embeddings(input_ids, tokens, region_tokens, region_valid)
            lm_out = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, use_cache=False,
                             output_hidden_states=want_boxes)
            out: dict[str, torch.Tensor] = {"logits": lm_out.logits, "vol_pooled": enc["pooled"],
                                            "positions": enc["positions"]}
            if labels is not None:
                out["loss"] = lm_out.loss
            if self.perception is not None:
                if patches is not None:
                    p = self.perception(patches, self.encoder.forward_intermediates(patches, self.perception.indices))
                else:
                    p = enc["perception"]
                out.update({k: p[k] for k in ("organ_logits", "finding_logits")})
                out["condition_logits"] = read["condition_logits"]
            out.update(self.head_outputs(enc["pooled"], texts, regions["summary"] if regions is not None else None,
                                         regions.get("prior") if regions is not None else None))
            if want_boxes and self.pointer is not None:
                assert regions is not None and region_valid is not None
                out.update(self._point(lm_out.hidden_states[-1], input_ids, box_index, region_valid,
                                       regions["box"][vi]))
            elif want_boxes:
                dense = enc["dense"][vi]
                out.update(self._ground(dense, enc["dense_grid"], lm_out.hidden_states[-1], box_index))
        return out

    def _read_regions(self, enc: dict[str, Any], regions: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:meth:`Perception.read_regions` of the encoded volumes' regions."""
        assert self.perception is not None
        return self.perception.read_regions(enc["fine"], regions["finding_map"], regions["organ_map"],
                                            regions["kind"], regions["index"], regions["meta"])

    def _point(self, hidden: torch.Tensor, input_ids: torch.Tensor, box_index: torch.Tensor,
               region_valid: torch.Tensor, region_box: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pointer outputs for the ``<box>`` tokens at ``box_index (Q, 2)`` of ``hidden (B, T, H)``:
        ``pointer_logits (Q, R)`` over the regions of each query's sequence, ``pointer_pick (Q,)`` (the
        region each decodes to, no repeats within an answer; -1: none) and ``box_pred (Q, 6)`` its box (0..1)."""
        assert self.pointer is not None
        is_reg = self._region_positions(input_ids)
        r = region_valid.shape[1]
        slot = is_reg.long().cumsum(dim=1) - 1
        rows, cols = is_reg.nonzero(as_tuple=True)
        pos = torch.zeros(input_ids.shape[0], r, dtype=torch.long, device=input_ids.device)
        pos[rows, slot[rows, cols]] = cols
        rq, cq = box_index[:, 0].long(), box_index[:, 1].long()
        candidates = hidden[rq[:, None], pos[rq]]  # (Q, R, H)
        logits = self.pointer(hidden[rq, cq], candidates, region_valid[rq])
        pick = RegionPointer.decode(logits.detach(), rq)
        box = region_box[rq, pick.clamp(min=0)] * (pick >= 0)[:, None]
        return {"pointer_logits": logits, "pointer_pick": pick, "box_pred": box}

    def _ground(self, dense: torch.Tensor, grid: tuple[int, int, int], hidden: torch.Tensor,
                box_index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Grounding-head outputs for the ``<box>`` tokens at ``box_index (Q, 2)`` of ``hidden (B, T, H)``."""
        assert self.box_head is not None
        rows, cols = box_index[:, 0].long(), box_index[:, 1].long()
        head = self.box_head(dense[rows], grid, hidden[rows, cols])
        return {"box_logits": head["logits"], "box_cells": head["boxes"], "box_anchors": head["anchors"],
                "box_cell": head["cell"], "box_pred": GroundingHead.decode(head, rows)}

    def head_outputs(self, pooled: torch.Tensor, texts: list[str] | None = None,
                     summary: torch.Tensor | None = None, prior: torch.Tensor | None = None,
                     ) -> dict[str, torch.Tensor]:
        """Outputs of the heads beside the LM for pooled features ``(B, D)`` (and, with perception, the
        regions' ``summary (B, S)``, :func:`vol3d.tasks.regions.perceived_summary`: the EHR head reads
        what the perception found). ``model.ehr_finding_prior`` reads each code's finding score from
        ``prior`` (the same layout, where a finding found nowhere scores its strongest voxel up to 0.5;
        ``pack_regions(...)["prior"]``) when given, else from ``summary``."""
        out: dict[str, torch.Tensor] = {}
        if self.ehr_head is not None:
            if self.perception is not None:
                if summary is None:
                    raise ConfigError("the EHR head of a perception model reads the regions' summary: pass "
                                      "pack_regions(...)['summary'] (forward does)")
                pooled = torch.cat([pooled, summary.to(pooled.dtype)], dim=1)
            out["ehr_logits"] = self.ehr_head(pooled).float()
            if self.ehr_prior_gain is not None and summary is not None:
                scores = prior if prior is not None else summary
                score = scores.float()[:, self.ehr_prior_column]  # (B, K): each code's finding score
                out["ehr_logits"] = out["ehr_logits"] + self.ehr_prior_gain * self.ehr_prior_linked * (score - 0.5)
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
    def ehr_logits(self, volume: torch.Tensor, spacing: Any = None) -> torch.Tensor:
        """EHR code logits ``(B, K)`` of volumes ``(B, C, X, Y, Z)``: the EHR head on the pooled features and,
        with perception, on what the model perceives (``spacing`` as :meth:`perceive`); no text is read."""
        if self.ehr_head is None:
            raise ConfigError("this model has no EHR head (model.ehr_codes is empty); train with loss.ehr > 0")
        with self._evaluating():
            with self._autocast(volume.device):
                enc = self.encode_volume(volume)
            if self.perception is None:
                return self.head_outputs(enc["pooled"])["ehr_logits"]
            regions = self._perceived(enc, spacing, volume)[1]
            return self.head_outputs(enc["pooled"], summary=regions["summary"], prior=regions["prior"])["ehr_logits"]

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        """Eval mode inside the block, the mode before it after."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    @torch.no_grad()
    def perceive(self, volume: torch.Tensor, spacing: Any = None, look_again: bool | None = None) -> list[Any]:
        """What the perception sees in each volume ``(B, C, X, Y, Z)``: one
        :class:`~vol3d.tasks.regions.Perceived` (findings, organs, conditions) per volume.

        ``spacing``: mm per voxel ``(3,)`` or ``(B, 3)``; default the training cache's target spacing.
        ``look_again``: look at each finding again on a crop (:meth:`looks_again`); default the config's.
        """
        if self.perception is None:
            raise ConfigError("perceive needs a model built with perception: true")
        with self._evaluating():
            with self._autocast(volume.device):
                enc = self.encode_volume(volume)
            return self._perceived(enc, spacing, volume, look_again)[0]

    @contextlib.contextmanager
    def reading(self, volume: torch.Tensor) -> Iterator[None]:
        """Read one volume once for several questions about it.

        Inside the block, :meth:`generate`, :meth:`perceive`, :meth:`encode_volume` and inference
        :meth:`forward` calls about ``volume`` (``(C, X, Y, Z)`` or ``(1, C, X, Y, Z)``; also its batch
        ``volume.expand(B, ...)``, as :func:`vol3d.eval.evaluate` passes one volume with several
        prompts) encode and perceive it once (per spacing and look-again setting) and reuse that,
        instead of running the encoder, the perception and the second look at every call. Only
        without gradients and in eval mode (training never reuses); any other volume is computed as
        usual. Change neither the volume nor the weights inside the block. Blocks do not nest: an inner
        one holds until it ends, then the outer one again.

        Example::

            with torch.inference_mode(), model.reading(vol):
                report = model.generate(vol[None], ["Write the findings."], spacing=sp)
                found = model.perceive(vol[None], spacing=sp)   # no second encoding
        """
        if volume.ndim == 4:
            volume = volume[None]
        if volume.ndim != 5 or volume.shape[0] != 1:
            raise InputError(f"reading() takes one volume (C, X, Y, Z) or (1, C, X, Y, Z), got shape "
                             f"{tuple(volume.shape)}")
        outer, self._reading = self._reading, _Reading(volume)
        try:
            yield
        finally:
            self._reading = outer

    def _memo(self, volume: torch.Tensor | None) -> dict[tuple[Any, ...], Any] | None:
        """The open :meth:`reading` block's results when ``volume`` is its volume and nothing learns."""
        r = self._reading
        if r is None or self.training or torch.is_grad_enabled() or not r.holds(volume):
            return None
        return r.memo

    @property
    def looks_again(self) -> bool:
        """Whether :meth:`perceive` and :meth:`generate` look at each finding a second time, on a crop of
        ``config.perception_patch`` centred on it (the crops the decoder learned on; ``config.look_again``)."""
        return self.perception is not None and self.config.look_again and bool(self.config.perception_patch)

    def _look_again(self, volume: torch.Tensor, finding_logits: torch.Tensor, first: list[Any]) -> torch.Tensor:
        """``finding_logits (B, 1 + T, X, Y, Z)`` with each volume's finding regions of the first look
        ``first`` seen again: the perception run on a crop of ``config.perception_patch`` centred on each
        (:func:`~vol3d.tasks.regions.look_again_windows`), each voxel's logits the mean of the whole
        volume's and of the crops over it (:func:`~vol3d.tasks.regions.stitch_looks`).

        The decoder learns on finding-centred crops (nnU-Net's oversampling), so a crop is what it
        knows best: instance norms see a crop's statistics, borders are where training had them."""
        from vol3d.tasks.regions import look_again_windows, stitch_looks

        assert self.perception is not None
        shape = tuple(int(v) for v in volume.shape[2:])
        jobs = [(b, w) for b, per in enumerate(first)
                for w in look_again_windows([r.box for r in per.findings], shape, self.config.perception_patch)]
        if not jobs:
            return finding_logits
        looks: list[torch.Tensor] = []
        for start in range(0, len(jobs), LOOK_AGAIN_BATCH):
            crops = torch.stack([volume[b][(slice(None), *w)] for b, w in jobs[start : start + LOOK_AGAIN_BATCH]])
            with self._autocast(volume.device):
                p = self.perception(crops, self.encoder.forward_intermediates(crops, self.perception.indices))
            looks += list(p["finding_logits"].detach().float().cpu().numpy())
        out = finding_logits.detach().float().cpu().numpy().copy()  # a copy: on CPU .numpy() shares the first look
        for b in range(len(first)):
            mine = [(look, w) for look, (owner, w) in zip(looks, jobs, strict=True) if owner == b]
            if mine:
                out[b] = stitch_looks(out[b], [lk for lk, _ in mine], [w for _, w in mine])
        return torch.from_numpy(out)

    def _spacings(self, spacing: Any, n: int) -> list[Any]:
        """``n`` spacings (mm per model-input voxel): the given ones, else the preprocessing's target spacing."""
        if spacing is None:
            target = (self.preprocess or {}).get("target_spacing")
            if target is None:
                raise ConfigError("perception reports sizes in mm: pass the volume's spacing= (mm per voxel); this "
                                  "model does not record a fixed target spacing")
            spacing = target
        arr = np.asarray(spacing.detach().cpu() if isinstance(spacing, torch.Tensor) else spacing, dtype=float)
        return [arr] * n if arr.ndim == 1 else list(arr)

    def _perceived(self, enc: dict[str, Any], spacing: Any, volume: torch.Tensor | None = None,
                   look_again: bool | None = None) -> tuple[list[Any], dict[str, torch.Tensor]]:
        """Regions of each encoded volume, and their packed tensors (:func:`~vol3d.tasks.regions.pack_regions`).

        Organs and findings come from the dense maps; the conditions from the encoder features
        pooled over the organs found (:meth:`Perception.read_regions`), or from the vocabulary's
        criterion on the organ found where there is one (:func:`~vol3d.tasks.reasoning.call_conditions`).
        Given the encoded ``volume``, the findings are looked at again on crops (:meth:`_look_again`)
        when :attr:`looks_again` (or ``look_again``) says so."""
        assert self.perception is not None
        again = (self.looks_again if look_again is None else look_again and bool(self.config.perception_patch)) \
            and volume is not None
        memo = self._memo(volume)
        if memo is None or ("enc",) not in memo or enc["tokens"] is not memo[("enc",)]["tokens"]:
            return self._read_maps(enc, spacing, volume, again)
        key = ("perceived", tuple(float(v) for v in self._spacings(spacing, 1)[0]), again)
        if key not in memo:  # inside reading(volume): perceived once per spacing and look-again setting
            memo[key] = self._read_maps(enc, spacing, volume, again)
        found, packed = memo[key]
        return copy.deepcopy(found), dict(packed)  # callers own their regions

    def _read_maps(self, enc: dict[str, Any], spacing: Any, volume: torch.Tensor | None,
                   again: bool) -> tuple[list[Any], dict[str, torch.Tensor]]:
        """:meth:`_perceived` computed: the regions of the maps, seen again on crops of ``volume`` when ``again``."""
        from vol3d.tasks.reasoning import call_conditions
        from vol3d.tasks.regions import clean_organ_map, pack_regions, perceived_from_maps

        assert self.perception is not None
        cfg = self.config
        p = enc["perception"]
        device = p["features"].device
        # regions are decisions: no gradient flows back; each organ's stray fragments are dropped
        organ_np = np.stack([clean_organ_map(m, cfg.organ_keep_fraction)
                             for m in p["organ_logits"].detach().argmax(dim=1).cpu().numpy()])
        organ_map = torch.from_numpy(organ_np).to(device)
        with torch.no_grad():
            cond = torch.sigmoid(self.perception.condition_logits(enc["fine"], organ_map).float()).cpu().numpy()
        spacings = self._spacings(spacing, len(organ_np))

        def regions(finding_logits: torch.Tensor) -> tuple[list[Any], list[np.ndarray]]:
            finding_prob = torch.sigmoid(finding_logits[:, 0].detach().float()).cpu().numpy()
            type_prob = finding_logits[:, 1:].detach().float().softmax(dim=1).cpu().numpy()
            found = [perceived_from_maps(organ_np[b], finding_prob[b], type_prob[b], cond[b], spacings[b], self.vocab,
                                         self.labels, cfg.finding_threshold, cfg.max_findings)
                     for b in range(len(organ_np))]
            return [per for per, _ in found], [fmap for _, fmap in found]

        perceived, maps = regions(p["finding_logits"])
        if again and volume is not None:
            with torch.no_grad():
                perceived, maps = regions(self._look_again(volume, p["finding_logits"], perceived))
        perceived = [call_conditions(per, self.vocab, self.labels) for per in perceived]
        packed = pack_regions(perceived, maps, list(organ_np), organ_np.shape[1:], self.vocab, self.labels)
        return perceived, {k: torch.from_numpy(v).to(device) for k, v in packed.items()}

    @torch.no_grad()
    def generate(
        self,
        volume: torch.Tensor,
        prompts: list[str] | str | torch.Tensor,
        max_new_tokens: int = 64,
        attention_mask: torch.Tensor | None = None,
        answer_prefix: str | None = None,
        spacing: Any = None,
        return_perceived: bool = False,
        no_repeat_ngram: int = 4,
        raw: bool = False,
        **generate_kwargs: Any,
    ) -> Any:
        """Answer each prompt about its volume; greedy unless ``do_sample=True`` etc. is passed.

        ``prompts`` are strings (left-padded by the processor) or already expanded,
        left-padded ``input_ids (B, T)``. ``answer_prefix`` starts every answer with that
        text and lets the model go on from there (e.g. ``"<box>"``: say where, not whether;
        :data:`LOCATE_PREFIX`); it is part of the returned answer. Extra keyword arguments
        go to HF ``generate`` (``num_beams``, ``temperature``, ``top_p``, ``repetition_penalty`` ...);
        ``no_repeat_ngram`` forbids repeating an n-gram of the answer (:class:`NoRepeatNGram`; 0: off).
        With a grounding head or perception, every ``<box>`` token of an answer is returned written
        out as ``<box>[x0,y0,z0,x1,y1,z1]</box>`` (0..999 of the model input), as text-mode models spell it.

        With perception, each prompt is preceded by its volume's findings digest (the perception's
        regions, ``spacing`` mm per voxel as in :meth:`perceive`); a batch of one volume repeated
        (``volume.expand(B, ...)``) is perceived once. ``return_perceived=True`` returns
        ``(answers, perceived)``, one :class:`~vol3d.tasks.regions.Perceived` per prompt. The answers
        then agree with the regions (``closed_answers_from_perception``, ``locations_from_perception``,
        ``reports_from_perception``);
        ``raw=True`` returns the language model's own tokens instead (what reinforcement samples).
        """
        perceived: list[Any] = []
        with self._evaluating():
            shared = self.perception is not None and volume.shape[0] > 1 and volume.stride(0) == 0
            vol = volume[:1] if shared else volume
            vi = torch.zeros(volume.shape[0], dtype=torch.long, device=volume.device) if shared else \
                torch.arange(volume.shape[0], device=volume.device)
            with self._autocast(volume.device):
                enc = self.encode_volume(vol)
            regions = None
            contexts = None
            if self.perception is not None:
                from vol3d.tasks.regions import digest_text

                if isinstance(prompts, torch.Tensor):
                    raise ConfigError("a perception model puts its findings digest before every question: pass the "
                                      "prompts as strings")
                found, packed = self._perceived(enc, spacing, vol)
                perceived = [found[i] for i in vi.tolist()]
                contexts = [digest_text(p, self.vocab) for p in perceived]
                regions = {"valid": packed["kind"][vi] >= 0, "box": packed["box"][vi]}
            if isinstance(prompts, torch.Tensor):
                input_ids = prompts.to(volume.device)
                if attention_mask is None:
                    attention_mask = torch.ones_like(input_ids)
            else:
                batch = self.processor(prompts, padding_side="left", contexts=contexts)
                input_ids, attention_mask = batch["input_ids"].to(volume.device), batch["attention_mask"]
            attention_mask = attention_mask.to(volume.device)
            kwargs = {"do_sample": False, "pad_token_id": self.tokenizer.pad_token_id,
                      "eos_token_id": self.tokenizer.eos_token_id, **generate_kwargs}
            extra: list[Any] = []
            if no_repeat_ngram:
                extra.append(NoRepeatNGram(no_repeat_ngram, [self.box_token_id]))
            if contexts is not None and self.config.closed_answers_from_perception and not answer_prefix and not raw:
                texts = [prompts] * len(perceived) if isinstance(prompts, str) else list(prompts)  # type: ignore[arg-type]
                values = self._perceived_values(texts, perceived)
                if values is not None:
                    extra.append(values)
            if extra:
                from transformers import LogitsProcessorList

                processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
                processors.extend(extra)
                kwargs["logits_processor"] = processors
            prefix = torch.tensor(self.tokenizer(answer_prefix, add_special_tokens=False)["input_ids"]
                                  if answer_prefix else [], dtype=torch.long, device=volume.device)
            prefix = prefix[None].expand(input_ids.shape[0], -1)
            with self._autocast(volume.device):
                region_tokens = None
                if regions is not None:
                    region_tokens = self._read_regions(enc, packed)["tokens"][vi]
                embeds = self._merge_embeddings(input_ids, enc["tokens"][vi], region_tokens,
                                                regions["valid"] if regions is not None else None)
                forced = torch.cat([embeds, self.lm.get_input_embeddings()(prefix).to(embeds.dtype)], dim=1)
                ids = self.lm.generate(inputs_embeds=forced, attention_mask=torch.cat(
                    [attention_mask, torch.ones_like(prefix)], dim=1), max_new_tokens=max_new_tokens, **kwargs)
                ids = torch.cat([prefix, ids], dim=1)  # generate returns the new tokens only
                if "dense" in enc:
                    enc["dense"] = enc["dense"][vi]
                boxes = self._generated_boxes(enc, embeds, attention_mask, input_ids, ids, regions)
        if boxes is None:
            texts = self.processor.batch_decode(ids)
        else:
            texts = [self._decode_with_boxes(row, row_boxes) for row, row_boxes in zip(ids.tolist(), boxes, strict=True)]
        if perceived and not raw and not isinstance(prompts, torch.Tensor):
            texts = self._answers_from_regions(texts, perceived, prompts, tuple(int(v) for v in volume.shape[2:]),
                                               bool(answer_prefix))
        if perceived and self.config.reports_from_perception and not raw and not isinstance(prompts, torch.Tensor):
            from vol3d.tasks.reports import is_report_request, reconcile_report

            asked, vocab = [prompts] * len(texts) if isinstance(prompts, str) else list(prompts), self.vocab
            texts = [reconcile_report(t, p, vocab) if is_report_request(q) else t
                     for t, p, q in zip(texts, perceived, asked, strict=True)]
        return (texts, perceived) if return_perceived else texts

    def _answers_from_regions(self, texts: list[str], perceived: list[Any], prompts: list[str] | str,
                              shape: tuple[int, ...], forced: bool) -> list[str]:
        """"How many X?", "Is there X?", "Is the largest X larger than N mm?" (``closed_answers_from_perception``,
        :func:`~vol3d.tasks.reasoning.closed_answer`) and "where is X?" answers (``locations_from_perception``)
        about a named finding, taken from the regions; others unchanged."""
        from vol3d.tasks.reasoning import closed_answer, location_answer

        asked = [prompts] * len(texts) if isinstance(prompts, str) else list(prompts)
        out = []
        for text, per, question in zip(texts, perceived, asked, strict=True):
            new = None
            if self.config.closed_answers_from_perception and not forced:
                new = closed_answer(question, per, self.vocab)
            if new is None and self.config.locations_from_perception:
                new = location_answer(question, text, per, self.vocab, shape, keep_refusal=forced)
            out.append(text if new is None else new)
        return out

    @functools.cached_property
    def _closed_answer_tokens(self) -> tuple[list[tuple[int, int]], list[int]] | None:
        """First tokens of "yes"/"no" (each spelling that tells them apart) and of the digits 0-9;
        None when the tokenizer has no such pair or no distinct first token per digit."""
        def first(text: str) -> int | None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return int(ids[0]) if ids else None

        pairs = [(first(y), first(n)) for y, n in (("yes", "no"), ("Yes", "No"), (" yes", " no"), (" Yes", " No"))]
        yes_no = list(dict.fromkeys((y, n) for y, n in pairs if y is not None and n is not None and y != n))
        digits = [first(str(d)) for d in range(10)]
        if not yes_no or None in digits or len(set(digits)) != 10:
            return None
        return yes_no, digits  # type: ignore[return-value]

    def _perceived_values(self, prompts: list[str], perceived: list[Any]) -> PerceivedValues | None:
        """:class:`PerceivedValues` for these prompts and their volumes' regions (None without
        :attr:`_closed_answer_tokens`)."""
        import re

        from vol3d.tasks.findings import finding_named
        from vol3d.tasks.regions import perceived_present

        tokens = self._closed_answer_tokens
        if tokens is None:
            return None
        yes_no, digits = tokens
        vocab = self.vocab
        counts: list[int | None] = []
        for prompt, per in zip(prompts, perceived, strict=True):
            name = finding_named(prompt, vocab)
            if name is None:
                counts.append(None)
            elif vocab[name].countable:
                counts.append(per.count(name))
            else:
                counts.append(int(name in perceived_present(per)))
        yes_allowed = [re.search(r"\d", p.split("<vol>")[-1]) is None for p in prompts]
        return PerceivedValues(counts, yes_allowed, yes_no, digits)  # type: ignore[arg-type]

    def _generated_boxes(self, enc: dict[str, Any], embeds: torch.Tensor, attention_mask: torch.Tensor,
                         input_ids: torch.Tensor, ids: torch.Tensor,
                         regions: dict[str, torch.Tensor] | None = None) -> list[list[list[int] | None]] | None:
        """Box (integers 0..999) of every generated ``<box>`` token, per row; None without any.

        Runs the prompt plus the generated answer once more, teacher-forced, for the hidden
        state *at* each ``<box>`` token (generation only computes it when the token is fed
        back, which never happens for a last token); positions follow the left padding as
        in generation. With perception the box is the one of the region the token points at
        (None when the answer has more boxes than the digest has regions).
        """
        where = box_token_index(ids, self.box_token_id)
        if (self.box_head is None and regions is None) or not len(where):
            return None
        from vol3d.protocol import BOX_SCALE

        full = torch.cat([embeds, self.lm.get_input_embeddings()(ids).to(embeds.dtype)], dim=1)
        mask = torch.cat([attention_mask, torch.ones_like(ids)], dim=1)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.lm(inputs_embeds=full, attention_mask=mask, position_ids=position_ids, use_cache=False,
                         output_hidden_states=True).hidden_states[-1]
        where[:, 1] += embeds.shape[1]
        if regions is not None:
            point = self._point(hidden, torch.cat([input_ids, ids], dim=1), where, regions["valid"], regions["box"])
            pred, found = point["box_pred"], (point["pointer_pick"] >= 0).tolist()
        else:
            pred = self._ground(enc["dense"], enc["dense_grid"], hidden, where)["box_pred"]
            found = [True] * len(where)
        ints = torch.round(pred.float() * BOX_SCALE).long().clamp(0, BOX_SCALE).tolist()
        out: list[list[list[int] | None]] = [[] for _ in range(ids.shape[0])]
        for (row, _), box, ok in zip(where.tolist(), ints, found, strict=True):
            out[row].append(box if ok else None)
        return out

    def _decode_with_boxes(self, ids: list[int], boxes: list[list[int] | None]) -> str:
        """Decoded text with each ``<box>`` token written out as ``<box>[x0,y0,z0,x1,y1,z1]</box>``
        (a box without a region is left out)."""
        from vol3d.protocol import format_box

        parts, start, k = [], 0, 0
        for i, tok in enumerate(ids + [self.box_token_id]):
            if tok != self.box_token_id:
                continue
            parts.append(self.tokenizer.decode(ids[start:i], skip_special_tokens=True))
            if i < len(ids):
                box = boxes[k]
                if box is not None:
                    parts.append(format_box(box))
                k += 1
            start = i + 1
        return " ".join(p.strip() for p in parts if p.strip())

    # ------------------------------------------------------------------ LoRA

    def merge_lora(self) -> None:
        """Fold LoRA adapters into the LM weights (for deployment); config.lora becomes False."""
        if hasattr(self.lm, "merge_and_unload"):
            self.lm = self.lm.merge_and_unload()
            self.config = dataclasses.replace(self.config, lora=False)

    # ------------------------------------------------------------------ save / load

    def _weights_to_save(self, state_dict: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        sd = dict(self.state_dict() if state_dict is None else state_dict)
        if self.text_tower is not None and self.text_tower.frozen:
            # a frozen packaged tower is rebuilt from its own files at load time
            sd = {k: v for k, v in sd.items() if not k.startswith("text_tower.")}
        return sd

    def save_pretrained(self, directory: str | Path, state_dict: Mapping[str, torch.Tensor] | None = None) -> Path:
        """Write ``model.safetensors``, ``vol3d_config.json`` and ``lm/`` (HF config + tokenizer).

        With LoRA, the adapters are saved inside ``model.safetensors`` under peft's names
        and rebuilt on load from the config, and also as a PEFT adapter in ``lm_adapter/``
        (``adapter_config.json`` + ``adapter_model.safetensors``: ``PeftModel.from_pretrained(base_lm,
        "RUN/model/lm_adapter")`` loads it onto the base LM); call :meth:`merge_lora` first to
        save a plain LM. ``state_dict``: the weights to write instead of the module's own (the full
        weights a sharded training run gathered).
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        (directory / LM_DIR).mkdir(parents=True, exist_ok=True)
        sd = self._weights_to_save(state_dict)
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
        if hasattr(self.lm, "peft_config"):  # the ecosystem's format too (peft, vLLM, TGI read it)
            lm_sd = None if state_dict is None else {k[len("lm."):]: v for k, v in sd.items() if k.startswith("lm.")}
            self.lm.save_pretrained(str(directory / ADAPTER_DIR), safe_serialization=True,
                                    **({} if lm_sd is None else {"state_dict": lm_sd}))
        if self.preprocess is not None:
            (directory / PREPROCESS_NAME).write_text(json.dumps(self.preprocess, indent=2))
        if self.domain is not None:
            (directory / DOMAIN_NAME).write_text(json.dumps(self.domain, indent=1))
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
        lm_config = AutoConfig.from_pretrained(str(directory / LM_DIR), local_files_only=True, trust_remote_code=False)
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
        if (directory / DOMAIN_NAME).is_file():
            model.domain = json.loads((directory / DOMAIN_NAME).read_text())
        if device is not None:
            model.to(device)
        return model.eval()
