"""Tokenizers without hub downloads: a small byte-level BPE trained on the cache's texts,
or any local Hugging Face tokenizer directory, both with vol3d's special tokens
(:mod:`vol3d.protocol`): the placeholders ``<vol>``, ``<reg>``, ``<org>`` (special: dropped
when decoding), ``<box>``/``</box>`` (*not* special, so decoding keeps them for box parsing),
and ``<pad>``, ``<s>``, ``</s>``.

Digits are split one by one, so a box coordinate such as ``120`` is three tokens
whatever the corpus, and every integer 0..999 can be written.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from transformers import AddedToken, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from preprocess.errors import InputError
from vol3d.protocol import (
    BOS_TOKEN,
    BOX_END,
    BOX_START,
    EOS_TOKEN,
    ORGAN_TOKEN,
    PAD_TOKEN,
    PLACEHOLDERS,
    REGION_TOKEN,
    VOL_TOKEN,
)

__all__ = ["BOS_TOKEN", "BOX_END", "BOX_START", "EOS_TOKEN", "ORGAN_TOKEN", "PAD_TOKEN", "REGION_TOKEN",
           "VOL_TOKEN", "add_vol3d_tokens", "build_tokenizer", "load_tokenizer"]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    ``vocab_size`` is an upper bound (a tiny corpus yields fewer merges); the 256 byte
    symbols are always present, so any text, including text unseen in training, encodes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *PLACEHOLDERS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN)
    add_vol3d_tokens(fast)
    return fast


def add_vol3d_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add vol3d's tokens (and a pad token if missing) to any tokenizer; returns how many were new.

    After this, resize the LM's embeddings to ``len(tokenizer)`` (the model does it).
    """
    n = 0
    if tokenizer.pad_token is None:
        # reuse EOS when the LM has one (common for Llama/Qwen checkpoints): no new embedding
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            n += tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    vocab = tokenizer.get_vocab()
    new_placeholders = [AddedToken(t, special=True, normalized=False) for t in PLACEHOLDERS if t not in vocab]
    if new_placeholders:
        n += tokenizer.add_tokens(new_placeholders, special_tokens=True)
    new_box = [AddedToken(t, special=False, normalized=False) for t in (BOX_START, BOX_END) if t not in vocab]
    if new_box:
        n += tokenizer.add_tokens(new_box)
    return n


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A local tokenizer directory (e.g. a real LM checkpoint, or a saved model's ``lm/``)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"tokenizer directory {path} does not exist; pass the local directory of the LM checkpoint")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: no usable tokenizer files ({exc}); the directory needs tokenizer.json "
                         "or the tokenizer files of the LM") from None
    add_vol3d_tokens(tok)
    return tok
