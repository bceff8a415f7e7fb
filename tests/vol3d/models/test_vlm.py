"""The vision-language model on a tiny Llama: training, generation, saving, freezing, LoRA."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from preprocess.errors import ConfigError, InputError
from vol3d.models import Vol3DConfig, Vol3DModel, Vol3DProcessor, build_tokenizer
from vol3d.models.tokenizer import BOX_START
from vol3d.models.vlm import box_token_index
from vol3d.tasks.samples import BOX_TOKEN

TEXTS = [
    "Findings: a hypodense liver lesion <box>[120,340,88,260,470,140]</box>.",
    "Findings: no acute abnormality. The lungs are clear.",
    "Impression: splenomegaly. Kidney cyst on the left.",
]
TINY_LLAMA = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TEXTS * 4, vocab_size=400)


def _config(**kw) -> Vol3DConfig:
    base = dict(encoder="vit3d_tiny", input_shape=(32, 32, 16), reducer="pool",
                reducer_params={"out_grid": [2, 2, 2]}, lm_config=TINY_LLAMA)
    return Vol3DConfig(**{**base, **kw})


def _model(tokenizer, **kw) -> Vol3DModel:
    torch.manual_seed(0)
    return Vol3DModel(_config(**kw), tokenizer=tokenizer)


def _batch(model: Vol3DModel):
    torch.manual_seed(1)
    volume = torch.rand(2, 1, 32, 32, 16)
    # the second prompt has no <vol>: the processor puts it first
    batch = model.processor(["<vol> Where is the lesion?", "Findings:"], ["liver lesion <box>[1,2,3,4,5,6]</box>", "normal"])
    return volume, batch


def _box_batch(model: Vol3DModel):
    """Two grounding answers: two ``<box>`` tokens in row 0, one in row 1 (plus a refusal-free prompt)."""
    torch.manual_seed(1)
    volume = torch.rand(2, 1, 32, 32, 16)
    batch = model.processor(["<vol> Where is the lesion?", "<vol> Locate the cyst."], ["<box> <box>", "<box>"])
    return volume, batch, box_token_index(batch["labels"], model.box_token_id)


def test_forward_outputs_and_heads(tokenizer):
    model = _model(tokenizer, num_ehr_codes=7, box_head=True)
    volume, batch, where = _box_batch(model)
    assert where[:, 0].tolist() == [0, 0, 1]  # <box> tokens of the answers, row-major
    assert BOX_TOKEN == BOX_START  # vol3d.tasks writes the token the model reads (kept torch-free)
    out = model(volume, **batch, box_index=where)
    assert model.num_vol_tokens == 8
    assert out["logits"].shape == (*batch["input_ids"].shape, len(tokenizer))
    assert out["vol_pooled"].shape == (2, model.encoder.embed_dim)
    assert out["ehr_logits"].shape == (2, 7)
    n_cells = out["box_anchors"].shape[0]
    assert n_cells == 4 * 4 * 4 and out["box_logits"].shape == (3, n_cells)  # vit3d_tiny: 8^3 patches
    box = out["box_pred"]
    assert box.shape == (3, 6) and (box >= 0).all() and (box <= 1).all() and (box[:, :3] <= box[:, 3:]).all()
    assert out["positions"].shape == (2, 8, 3)
    (out["loss"] + out["ehr_logits"].sigmoid().mean() + out["box_logits"].mean() + box.mean()).backward()
    for part in (model.encoder, model.projector, model.lm, model.ehr_head, model.box_head):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_box_query_is_its_tokens_hidden_state(tokenizer):
    """Each <box> token decodes its own box: the two queries of row 0 differ, and the head reads
    only that row's volume (changing row 1's volume leaves row 0's boxes alone)."""
    model = _model(tokenizer, box_head=True).eval()
    torch.nn.init.normal_(model.box_head.film.weight, std=0.1)  # zero at init: queries act once trained
    volume, batch, where = _box_batch(model)
    with torch.no_grad():
        a = model(volume, **batch, box_index=where)["box_logits"]
        other = volume.clone()
        other[1] = torch.rand_like(other[1])
        b = model(other, **batch, box_index=where)["box_logits"]
    assert not torch.allclose(a[0], a[1])
    torch.testing.assert_close(a[:2], b[:2])
    assert not torch.allclose(a[2], b[2])


def test_generate_writes_head_boxes_as_text(tokenizer):
    """A generated <box> becomes <box>[x0,...,z1]</box> with the head's box for that token: the same
    box a teacher-forced forward pass decodes (left padding in generation, right in training)."""
    from preprocess.geometry import BOX_SCALE, parse_boxes

    model = _model(tokenizer, box_head=True).eval()
    volume, _, _ = _box_batch(model)
    with torch.no_grad():  # make the LM answer "<box>" then stop, whatever it sees
        bias = torch.full((len(tokenizer),), -1e4)
        bias[model.box_token_id] = 1e4
        model.lm.lm_head.bias = torch.nn.Parameter(bias)
    prompts = ["Where is the lesion?", "Where is the liver lesion in this scan?"]  # unequal: left padding
    texts = model.generate(volume, prompts, max_new_tokens=1)
    assert all(len(parse_boxes(t)) == 1 and t.startswith("<box>[") for t in texts)
    with torch.no_grad():
        batch = model.processor([f"<vol>{p}" for p in prompts], ["<box>", "<box>"])
        ref = model(volume, **batch, box_index=box_token_index(batch["labels"], model.box_token_id))["box_pred"]
    for text, box in zip(texts, ref, strict=True):
        np.testing.assert_array_equal(parse_boxes(text)[0], torch.round(box * BOX_SCALE).long().numpy())


def test_box_index_without_a_box_head_is_an_error(tokenizer):
    model = _model(tokenizer)
    volume, batch, where = _box_batch(model)
    with pytest.raises(ConfigError, match="box_head: true"):
        model(volume, **batch, box_index=where)
    with pytest.raises(ConfigError, match="box_head_level 9 is out of range"):
        _model(tokenizer, box_head=True, box_head_level=9)


def _fit_and_answer(tokenizer, steps: int, max_new_tokens: int) -> tuple[Vol3DModel, torch.Tensor, list[float], list[str]]:
    """A fresh tiny model fitted ``steps`` times on the two-sample batch, and its greedy answers to it."""
    model = _model(tokenizer)
    volume, batch = _batch(model)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(steps):
        loss = model(volume, **batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    answers = model.generate(volume, ["<vol> Where is the lesion?", "Findings:"], max_new_tokens=max_new_tokens)
    return model, volume, losses, answers


def test_loss_decreases_and_generate_answers_each_row_alone(tokenizer):
    model, volume, losses, answers = _fit_and_answer(tokenizer, 8, 4)
    assert losses[-1] < 0.7 * losses[0]
    # HF controls pass through (top_k=1 sampling is greedy), and a row answered alone gets the
    # answer it got inside the left-padded batch
    alone = model.generate(volume[1:], ["Findings:"], max_new_tokens=4, do_sample=True, top_k=1)
    assert alone == answers[1:]
    assert model.training  # generate reads in eval mode and gives the training mode back


@pytest.mark.slow
def test_generation_learns_each_answer(tokenizer):
    _, _, losses, answers = _fit_and_answer(tokenizer, 40, 20)
    assert losses[-1] < 0.2 * losses[0]
    # each volume/prompt gets its own answer back, and <box> tokens survive decoding
    assert answers[1] == "normal"
    assert answers[0].startswith("liver lesion <box>[") and answers[0].endswith("]</box>")


def test_placeholder_count_mismatch_is_a_clear_error(tokenizer):
    model = _model(tokenizer)
    volume, _ = _batch(model)
    wrong = Vol3DProcessor(tokenizer, num_vol_tokens=5)(["<vol> Where?", "Findings:"])
    with pytest.raises(InputError, match=r"gives 8 tokens.*5 in sample 0"):
        model(volume, **wrong)


def test_save_load_round_trip_identical_logits(tokenizer, tmp_path):
    model = _model(tokenizer, num_ehr_codes=3, ehr_codes=["A", "B", "C"], box_head=True).eval()
    volume, batch, where = _box_batch(model)
    with torch.no_grad():
        before = model(volume, **batch, box_index=where)
    model.save_pretrained(tmp_path / "run")
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"model.safetensors", "vol3d_config.json", "lm"}
    assert not list((tmp_path / "run").rglob("*.bin")) and not list((tmp_path / "run").rglob("*.pt*"))
    loaded = Vol3DModel.from_pretrained(tmp_path / "run")
    assert loaded.config == model.config and len(loaded.tokenizer) == len(tokenizer)
    with torch.no_grad():
        after = loaded(volume, **batch, box_index=where)
    for key in ("logits", "ehr_logits", "box_logits", "box_cells"):
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    with pytest.raises(InputError, match="not a saved vol3d model"):
        Vol3DModel.from_pretrained(tmp_path)


def test_tied_embeddings_survive_save_load(tokenizer, tmp_path):
    qwen = dict(model_type="qwen2", hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True)
    model = _model(tokenizer, lm_config=qwen).eval()
    volume, batch = _batch(model)
    model.save_pretrained(tmp_path)
    loaded = Vol3DModel.from_pretrained(tmp_path)
    lm = loaded._base_lm()
    assert lm.get_output_embeddings().weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(loaded(volume, **batch)["logits"], model(volume, **batch)["logits"])


def test_freeze_flags(tokenizer):
    model = _model(tokenizer, freeze_encoder=True, freeze_lm=True)
    model.train()
    assert not model.encoder.training  # frozen encoder keeps its normalisation statistics
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert not any(p.requires_grad for p in model.lm.parameters())
    volume, batch = _batch(model)
    model(volume, **batch)["loss"].backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.projector.parameters())


@pytest.mark.parametrize("tied", [False, True])
def test_lora_trains_only_adapters_and_round_trips(tokenizer, tmp_path, tied):
    model = _model(tokenizer, lora=True, lora_r=4, lora_alpha=8, lm_config={**TINY_LLAMA, "tie_word_embeddings": tied})
    lm_trainable = [n for n, p in model.lm.named_parameters() if p.requires_grad]
    # adapters, plus the rows of the added <box> </box> tokens (the LM must learn to write them)
    assert lm_trainable and all("lora_" in n or "trainable_tokens" in n for n in lm_trainable)
    assert any("trainable_tokens" in n for n in lm_trainable)
    box_ids = [model.box_token_id, model.tokenizer.convert_tokens_to_ids("</box>")]
    emb_before = model.lm.get_input_embeddings()(torch.arange(len(tokenizer))).detach().clone()
    volume, batch = _batch(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # move the adapters away from their zero init
        opt.zero_grad()
        model(volume, **batch)["loss"].backward()
        opt.step()
    emb_after = model.lm.get_input_embeddings()(torch.arange(len(tokenizer))).detach()
    changed = (emb_after != emb_before).any(-1).nonzero().flatten().tolist()
    assert changed == sorted(box_ids)  # only the new tokens' rows moved
    model.eval()
    with torch.no_grad():
        ref = model(volume, **batch)["logits"]
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(Vol3DModel.from_pretrained(tmp_path / "adapter")(volume, **batch)["logits"], ref)
        # the adapter in PEFT's own format loads onto the base LM with peft alone
        from peft import PeftModel

        assert (tmp_path / "adapter/lm_adapter/adapter_model.safetensors").is_file()
        base = copy.deepcopy(model.lm).unload()  # the base LM, LoRA layers taken out unmerged
        ids = batch["input_ids"].clamp(max=len(model.tokenizer) - 1)
        peft_lm = PeftModel.from_pretrained(base, tmp_path / "adapter/lm_adapter").eval()
        torch.testing.assert_close(peft_lm(input_ids=ids).logits, model.lm(input_ids=ids).logits)
        model.merge_lora()
        assert not model.config.lora
        torch.testing.assert_close(model(volume, **batch)["logits"], ref, rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path / "merged")
    merged = Vol3DModel.from_pretrained(tmp_path / "merged")
    assert not any("lora_" in n for n, _ in merged.named_parameters())


def test_lm_gradient_checkpointing_gives_the_same_gradients(tokenizer):
    grads = []
    for ckpt in (False, True):
        model = _model(tokenizer, grad_checkpointing_lm=ckpt, grad_checkpointing_encoder=ckpt)
        volume, batch = _batch(model)
        model(volume, **batch)["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_local_lm_checkpoint_directory(tokenizer, tmp_path):
    """lm_path: a real HF checkpoint dir (here a tiny one written locally) without vol3d's tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    plain = build_tokenizer(TEXTS, vocab_size=300)
    ckpt = tmp_path / "my-llm"
    params = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=len(plain), **params)).save_pretrained(ckpt)
    plain.save_pretrained(ckpt)
    model = Vol3DModel(_config(lm_config=None, lm_path=str(ckpt)))
    assert model.lm.get_input_embeddings().num_embeddings >= len(model.tokenizer)
    volume, batch = _batch(model)
    assert torch.isfinite(model(volume, **batch)["loss"])
    with pytest.raises(InputError, match="no config.json"):
        Vol3DModel(_config(lm_config=None, lm_path=str(tmp_path / "missing")))


def test_config_checks(tokenizer):
    with pytest.raises(ConfigError, match="exactly one"):
        Vol3DConfig()
    with pytest.raises(ConfigError, match="ehr_codes"):
        _config(num_ehr_codes=3, ehr_codes=["a"])
    with pytest.raises(ConfigError, match="unknown encoder 'vit9'; choose one of"):  # when the model is built
        Vol3DModel(_config(encoder="vit9"), tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="unknown reducer"):
        Vol3DModel(_config(reducer="squash"), tokenizer=tokenizer)
    cfg = _config(ehr_codes=["a", "b"])
    assert cfg.num_ehr_codes == 2
    assert Vol3DConfig.from_dict(cfg.to_dict()) == cfg
    assert dataclasses.fields(cfg)[0].metadata["help"]


def test_contrastive_embeddings_with_packaged_minilm(tokenizer, tmp_path):
    model = _model(tokenizer, contrastive=True, contrastive_dim=32).eval()
    volume, batch = _batch(model)
    with torch.no_grad():
        out = model(volume, **batch, texts=["liver lesion", "normal chest"])
    for key in ("vol_embed", "text_embed"):
        assert out[key].shape == (2, 32)
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(2))
    assert not any(p.requires_grad for p in model.text_tower.parameters())
    model.save_pretrained(tmp_path)
    loaded = Vol3DModel.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(["liver lesion"]), model.encode_text(["liver lesion"]))


def test_questions_sharing_a_volume_match_one_volume_each(tokenizer):
    """volume_index runs the encoder once per volume; every output equals giving each question its own copy."""
    model = _model(tokenizer, box_head=True, num_ehr_codes=2).eval()
    volume, batch, where = _box_batch(model)
    one = volume[:1]
    with torch.no_grad():
        shared = model(one, **batch, box_index=where, volume_index=torch.tensor([0, 0]))
        copies = model(one.expand(2, -1, -1, -1, -1), **batch, box_index=where)
    for key in ("logits", "box_logits", "box_pred"):
        torch.testing.assert_close(shared[key], copies[key])
    assert shared["ehr_logits"].shape == (1, 2)  # heads on pooled features: one row per volume


def test_grounding_head_reads_the_configured_encoder_level(tokenizer):
    """On a ResNet the head's cells are those of box_head_level (layer1: stride 4), not the LM's tokens."""
    model = _model(tokenizer, encoder="resnet3d_tiny", box_head=True, box_head_level=1)
    volume, batch, where = _box_batch(model)
    out = model(volume, **batch, box_index=where)
    assert out["box_logits"].shape == (3, 8 * 8 * 4)  # layer1 at 32 x 32 x 16
    assert model.box_head.feat_proj[0].in_features == model.encoder.stage_dims[1]


def test_run_precision_decides_the_forward_autocast(tokenizer):
    """The model used to autocast to bf16 on CUDA whatever the run's ``precision`` said."""
    model = _model(tokenizer)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert model.autocast_dtype(cuda) is torch.bfloat16 and model.autocast_dtype(cpu) is None
    model.set_precision(None)  # precision: fp32
    assert model.autocast_dtype(cuda) is None and model.config.bf16 is False
    model.set_precision(torch.float16)
    assert model.autocast_dtype(cuda) is torch.float16
    model.set_precision(torch.bfloat16)
    assert model.autocast_dtype(cuda) is torch.bfloat16 and model.config.bf16 is True
    with pytest.raises(InputError):
        model.set_precision(torch.float64)


def test_lm_directories_never_run_their_own_code_or_unpickle(tmp_path):
    """A checkpoint whose config.json names custom code (auto_map) loads the standard class and never
    imports that code; a checkpoint with pickled weights only is refused (no torch.load of a .bin)."""
    import json
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    plain = build_tokenizer(TEXTS, vocab_size=300)
    ckpt = tmp_path / "remote-code-llm"
    params = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=len(plain), **params)).save_pretrained(ckpt)
    plain.save_pretrained(ckpt)
    marker = tmp_path / "code-ran"
    (ckpt / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    model = Vol3DModel(_config(lm_config=None, lm_path=str(ckpt)))
    assert type(model.lm).__name__ == "LlamaForCausalLM" and not marker.exists()
    pickled = tmp_path / "pickled-llm"
    shutil.copytree(ckpt, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(model.lm.state_dict(), pickled / "pytorch_model.bin")  # a pickle: loading it could run code
    with pytest.raises(InputError, match="no .safetensors weights"):
        Vol3DModel(_config(lm_config=None, lm_path=str(pickled)))
