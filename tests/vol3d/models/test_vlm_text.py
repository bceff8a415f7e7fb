"""Tokenizer, processor and the packaged MiniLM text tower."""

from __future__ import annotations

import pytest
import torch

from preprocess.errors import InputError
from vol3d.models import IGNORE_INDEX, Vol3DProcessor, build_tokenizer
from vol3d.models.heads import TextTower

TEXTS = ["Findings: a liver lesion <box>[120,340,88,260,470,140]</box>.", "No acute abnormality."] * 3


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TEXTS, vocab_size=320)


def test_tokenizer_splits_digits_and_keeps_box_tokens(tok):
    ids = tok("<box>[120,7]</box>", add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[0] == "<box>" and pieces[-1] == "</box>"
    assert pieces[2:5] == ["1", "2", "0"]  # digits one by one, whatever the corpus merged
    for t in ("<vol>", "<pad>", "<s>", "</s>"):
        assert tok.convert_tokens_to_ids(t) != tok.unk_token_id
    text = "unseen wörds 999 <box>[1,2,3,4,5,6]</box>"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_processor_expands_vol_and_masks_prompt(tok):
    proc = Vol3DProcessor(tok, num_vol_tokens=4)
    batch = proc(["<vol> Findings:", "Impression:"], ["liver lesion", "normal"])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ((ids == proc.vol_token_id).sum(1) == 4).all()
    assert ids[0, 0] == tok.bos_token_id and ids[0, 1] == proc.vol_token_id  # <vol> first, after BOS
    for r, answer in enumerate(["liver lesion", "normal"]):
        kept = labels[r][labels[r] != IGNORE_INDEX]
        assert tok.decode(kept, skip_special_tokens=True) == answer and kept[-1] == tok.eos_token_id
        n = int(mask[r].sum())
        assert (mask[r, :n] == 1).all() and (ids[r, n:] == tok.pad_token_id).all()  # right padding
        torch.testing.assert_close(labels[r, : n - len(kept)], torch.full((n - len(kept),), IGNORE_INDEX))


def test_processor_left_padding_and_truncation(tok):
    proc = Vol3DProcessor(tok, num_vol_tokens=3)
    left = proc(["<vol> a", "<vol> a much longer question here"], padding_side="left")
    assert (left["attention_mask"][:, -1] == 1).all() and left["attention_mask"][0, 0] == 0
    assert (left["labels"] == IGNORE_INDEX).all()
    full = proc(["<vol> Findings:"], ["a long answer that will be cut"])
    cut = proc(["<vol> Findings:"], ["a long answer that will be cut"], max_length=full["input_ids"].shape[1] - 2)
    torch.testing.assert_close(cut["input_ids"][0], full["input_ids"][0, :-2])
    with pytest.raises(InputError, match="max_length=4"):
        proc(["<vol> Findings:"], ["x"], max_length=4)
    with pytest.raises(InputError, match="one volume per sample"):
        proc(["<vol> and <vol>"])
    with pytest.raises(InputError, match="one answer per prompt"):
        proc(["<vol> a", "<vol> b"], ["x"])


def test_packaged_minilm_loads_offline_and_embeds_meaningfully():
    tower = TextTower("minilm").eval()
    with torch.no_grad():
        e = tower.sentence_embedding(["A lesion in the liver.", "A hepatic mass.", "The weather is sunny today."])
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.2  # a pretrained encoder: paraphrases are closer than unrelated text


def test_processor_wraps_prompts_in_the_chat_template_of_an_instruction_lm():
    tok = build_tokenizer(TEXTS, vocab_size=320)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")  # fmt: skip
    proc = Vol3DProcessor(tok, num_vol_tokens=4)
    batch = proc(["<vol> Findings:"], ["liver lesion"], contexts=["No kidney cyst."])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert int((ids == proc.vol_token_id).sum()) == 4
    prompt = tok.decode(ids[labels == IGNORE_INDEX], skip_special_tokens=True)
    assert prompt.startswith("<|user|>") and prompt.rstrip().endswith("<|assistant|>")
    assert "No kidney cyst." in prompt and "Findings:" in prompt
    assert tok.decode(ids[labels != IGNORE_INDEX], skip_special_tokens=True) == "liver lesion"
    plain = Vol3DProcessor(tok, num_vol_tokens=4, use_chat_template=False)(["<vol> Findings:"])
    assert "<|user|>" not in tok.decode(plain["input_ids"][0], skip_special_tokens=True)
