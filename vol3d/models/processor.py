"""Turns prompts (and answers) into LM inputs with a fixed number of volume tokens.

Layout of one sequence: ``[<s>] prompt-before-<vol> <vol> x N [context] prompt-after-<vol> answer </s>``,
where the optional *context* is the findings digest of the volume (``vol3d.tasks.regions.digest_text``),
its ``<reg>``/``<org>`` placeholders one token each.
``labels`` are ``-100`` everywhere except on the answer and its ``</s>``, so the loss
trains only what the model must say. A prompt without ``<vol>`` gets ``"<vol>\\n"``
prepended; more than one ``<vol>`` is an error (one volume per sample).

An instruction-tuned LM's tokenizer that has a chat template gets its prompts wrapped in it
(one user turn holding the prompt, the volume tokens and the context, then the template's
generation prompt); the answer follows as the assistant's text, ended by EOS.

Padding: ``right`` for training (the default), ``left`` for generation, where every
row's last token must be the last prompt token. :meth:`Vol3DModel.generate` asks for
left padding itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from preprocess.errors import InputError
from vol3d.models.tokenizer import VOL_TOKEN, add_vol3d_tokens

IGNORE_INDEX = -100
Side = Literal["left", "right"]


class Vol3DProcessor:
    """Expands ``<vol>`` into exactly ``num_vol_tokens`` image-token ids.

    Args:
        tokenizer: any HF tokenizer; vol3d's special tokens are added if missing.
        num_vol_tokens: tokens the model's reducer produces per volume.
        padding_side: default side for padding, ``right`` (training) or ``left`` (generation).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, num_vol_tokens: int, padding_side: Side = "right",
                 use_chat_template: bool = True) -> None:
        add_vol3d_tokens(tokenizer)
        self.tokenizer = tokenizer
        self.chat = bool(use_chat_template and getattr(tokenizer, "chat_template", None))
        self.num_vol_tokens = int(num_vol_tokens)
        self.padding_side: Side = padding_side
        self.vol_token_id = int(tokenizer.convert_tokens_to_ids(VOL_TOKEN))
        self.pad_token_id = int(tokenizer.pad_token_id)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def encode_prompt(self, prompt: str, context: str = "") -> list[int]:
        """Token ids of one prompt with ``<vol>`` expanded, ``context`` right after the volume tokens
        (on a line of its own), and BOS when the tokenizer has one."""
        n = prompt.count(VOL_TOKEN)
        if n > 1:
            raise InputError(f"prompt has {n} {VOL_TOKEN} placeholders; vol3d takes one volume per sample: {prompt[:80]!r}")
        if n == 0:
            prompt = f"{VOL_TOKEN}\n{prompt}"
        before, after = prompt.split(VOL_TOKEN)
        if self.chat:  # the template decides BOS, roles and the generation prompt
            content = before + VOL_TOKEN + ("\n" + context if context else "") + after
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                      add_generation_prompt=True)
            pre, post = text.split(VOL_TOKEN)
            return self._ids(pre) + [self.vol_token_id] * self.num_vol_tokens + self._ids(post)
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        ctx = self._ids("\n" + context) if context else []
        return bos + self._ids(before) + [self.vol_token_id] * self.num_vol_tokens + ctx + self._ids(after)

    def __call__(
        self,
        prompts: Sequence[str] | str,
        answers: Sequence[str] | str | None = None,
        max_length: int | None = None,
        padding_side: Side | None = None,
        contexts: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Batch of ``input_ids``, ``attention_mask``, ``labels``, each ``(B, T)`` long tensors.

        ``max_length`` truncates the *answer* (never the volume tokens, the context or the
        prompt); a prompt that alone exceeds it is an error. ``contexts``: one per prompt.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if contexts is not None and len(contexts) != len(prompts):
            raise InputError(f"got {len(prompts)} prompts but {len(contexts)} contexts; pass one context per prompt")
        if isinstance(answers, str):
            answers = [answers]
        if answers is not None and len(answers) != len(prompts):
            raise InputError(f"got {len(prompts)} prompts but {len(answers)} answers; pass one answer per prompt")
        rows: list[tuple[list[int], list[int]]] = []
        for i, prompt in enumerate(prompts):
            ids = self.encode_prompt(prompt, contexts[i] if contexts is not None else "")
            labels = [IGNORE_INDEX] * len(ids)
            if answers is not None:
                ans = self._ids(answers[i])
                if self.tokenizer.eos_token_id is not None:
                    ans.append(self.tokenizer.eos_token_id)
                ids, labels = ids + ans, labels + ans
            if max_length is not None and len(ids) > max_length:
                if labels[max_length - 1] == IGNORE_INDEX:  # the prompt itself does not fit
                    raise InputError(
                        f"prompt {i} needs {sum(1 for x in labels if x == IGNORE_INDEX)} tokens including "
                        f"{self.num_vol_tokens} volume tokens and its context, more than max_length={max_length}; "
                        "raise max_length or use a reducer with fewer tokens"
                    )
                ids, labels = ids[:max_length], labels[:max_length]
            rows.append((ids, labels))
        return self.pad(rows, padding_side or self.padding_side)

    def pad(self, rows: list[tuple[list[int], list[int]]], side: Side) -> dict[str, torch.Tensor]:
        """Pad ``(ids, labels)`` rows to the longest: pad id / attention 0 / label -100."""
        width = max(len(ids) for ids, _ in rows)
        out = {k: torch.empty(len(rows), width, dtype=torch.long) for k in ("input_ids", "attention_mask", "labels")}
        for r, (ids, labels) in enumerate(rows):
            n = width - len(ids)
            fill = (
                (ids, [self.pad_token_id] * n),
                ([1] * len(ids), [0] * n),
                (labels, [IGNORE_INDEX] * n),
            )
            for key, (vals, pad) in zip(out, fill, strict=True):
                out[key][r] = torch.tensor(pad + vals if side == "left" else vals + pad, dtype=torch.long)
        return out

    def batch_decode(self, ids: torch.Tensor | list[list[int]]) -> list[str]:
        """Generated ids -> text; keeps ``<box>``/``</box>``, drops pad/eos/``<vol>``."""
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
