"""GPU memory and speed of the training step: one prepared script for one H100/H200 (<= 8 minutes).

    .venv/bin/python scripts/bench_gpu.py                       # on a CUDA machine: writes docs/benchmarks/gpu.md
    .venv/bin/python scripts/bench_gpu.py --tiny --out /tmp/g.md   # CPU smoke run of the same code path (the tests)

The model is the ``vit_b_qwen_lora`` preset's (3D ViT-B at 224 x 224 x 160, perceiver token
reducer, perception decoder) with a language model built from a config at a real size (no
weights can be downloaded, so the weights are random; memory and time do not depend on them),
bf16 weights with LoRA on q/k/v/o. Each setting runs in a fresh subprocess (clean peak memory),
takes 2 warm-up and ``--steps`` timed optimizer steps, and reports peak GPU memory
(``torch.cuda.max_memory_allocated``), step time, volumes/s and LM tokens/s. A setting that
runs out of memory is reported as such (never estimated).

Settings (the goals of docs/benchmarks/gpu.md): encoder checkpointing off/on; SDPA vs xformers
(when installed); the token reducer vs all 3,920 volume tokens; LMs of about 0.5B, 1.5B and 7B
parameters (Qwen2.5 shapes, the sizes M3D, Merlin and CT-CHAT use) at batch 1 and 4.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: Qwen2.5 shapes (config.json of the released checkpoints), vocabulary included.
LMS = {
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                         max_position_embeddings=4096, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                         max_position_embeddings=4096, tie_word_embeddings=True),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                       max_position_embeddings=4096, tie_word_embeddings=False),
    "tiny": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, max_position_embeddings=2048),
}  # fmt: skip

#: (name, lm, batch, encoder checkpointing, attention backend, reducer); the first rows answer the goals.
SETTINGS = [
    ("7B LoRA, batch 1", "qwen2.5-7b", 1, True, "sdpa", "perceiver"),
    ("1.5B LoRA, batch 4", "qwen2.5-1.5b", 4, True, "sdpa", "perceiver"),
    ("0.5B LoRA, batch 4", "qwen2.5-0.5b", 4, True, "sdpa", "perceiver"),
    ("1.5B, encoder ckpt off", "qwen2.5-1.5b", 1, False, "sdpa", "perceiver"),
    ("1.5B, encoder ckpt on", "qwen2.5-1.5b", 1, True, "sdpa", "perceiver"),
    ("1.5B, xformers", "qwen2.5-1.5b", 1, True, "xformers", "perceiver"),
    ("1.5B, no reducer (3,920 tokens)", "qwen2.5-1.5b", 1, True, "sdpa", "none"),
]
TINY_SETTINGS = [
    ("tiny, ckpt on", "tiny", 2, True, "sdpa", "perceiver"),
    ("tiny, ckpt off", "tiny", 2, False, "sdpa", "perceiver"),
    ("tiny, no reducer", "tiny", 1, True, "sdpa", "none"),
]
PROMPT = "<vol> Write the findings of this CT."
ANSWER = ("Findings: a 31 x 24 x 22 mm hypodense lesion in segment 7 of the liver. The spleen, kidneys and "
          "pancreas are unremarkable. No lymphadenopathy. Impression: liver lesion, likely a cyst.")  # fmt: skip


def _with_vocabulary(cfg):
    """The synthetic export's findings and organ labels (what the perception heads predict)."""
    import tempfile
    import types

    from vol3d.synth.phantom import LABELS
    from vol3d.synth.reports import vocabulary
    from vol3d.train.run import resolve_vocabulary

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab.json"
        path.write_text(json.dumps(vocabulary(LABELS)))
        return resolve_vocabulary(cfg, types.SimpleNamespace(vocab=str(path), cache_dir=tmp))


def child(spec: dict) -> dict:
    """One setting: build, run warm-up + timed steps, return the figures (runs in its own process)."""
    import torch

    from preprocess.config_io import load_yaml
    from vol3d.models import Vol3DConfig, Vol3DModel, build_tokenizer
    from vol3d.presets import preset_path
    from vol3d.train.config import TrainConfig

    tiny = spec["lm"] == "tiny"
    device = torch.device("cpu" if tiny else "cuda")
    mcfg = load_yaml(TrainConfig, preset_path("vit_b_qwen_lora", "train")).model
    fields = dict(mcfg.__dict__)
    fields.update(lm_path=None, lm_config=LMS[spec["lm"]], grad_checkpointing_encoder=spec["ckpt"],
                  grad_checkpointing_lm=True, reducer=spec["reducer"],
                  reducer_params=mcfg.reducer_params if spec["reducer"] != "none" else {})  # fmt: skip
    if tiny:
        fields.update(encoder="vit3d_tiny", input_shape=(32, 32, 16), lm_dtype="float32")
        if spec["reducer"] == "perceiver":  # 64 volume tokens at this size: 16 queries, as 3,920 -> 256
            fields["reducer_params"] = {**mcfg.reducer_params, "num_queries": 16}
    cfg = _with_vocabulary(Vol3DConfig(**fields))
    tokenizer = build_tokenizer([PROMPT, ANSWER] * 8, vocab_size=512)
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(device):
        model = Vol3DModel(cfg, tokenizer=tokenizer)
    model.to(device).train()
    if hasattr(model.encoder, "set_attention_backend"):
        model.encoder.set_attention_backend(spec["attention"])
    build_s = time.perf_counter() - start
    params = model.num_parameters()
    trainable = model.num_parameters(trainable_only=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = model.processor([PROMPT] * spec["batch"], [ANSWER] * spec["batch"])
    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    volume = torch.randn(spec["batch"], cfg.in_chans, *cfg.input_shape, device=device)
    lm_tokens = int(batch["attention_mask"].sum()) + spec["batch"] * model.num_vol_tokens
    extra = {}
    if model.perception is not None:  # regions are data in training (the cache's): perceive them once, untimed
        model.preprocess = {**(model.preprocess or {}), "target_spacing": [1.5, 1.5, 3.0]}
        with torch.no_grad():
            extra["regions"] = model._perceived(model.encode_volume(volume), None)[1]

    def step() -> None:
        out = model(volume, **batch, **extra)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    try:
        for _ in range(2):
            step()
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(spec["steps"]):
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        return {**spec, "status": "out of memory", "params": params, "trainable": trainable}
    times.sort()
    step_s = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {**spec, "status": "ok", "params": params, "trainable": trainable, "vol_tokens": model.num_vol_tokens,
            "build_s": round(build_s, 1), "step_s": step_s, "peak_gib": peak,
            "volumes_per_s": spec["batch"] / step_s, "tokens_per_s": lm_tokens / step_s}  # fmt: skip


def run_setting(spec: dict, timeout: float) -> dict:
    """:func:`child` in a fresh interpreter (its peak memory is its own)."""
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {**spec, "status": f"over its {timeout:.0f} s share of the budget"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {**spec, "status": f"error: {tail}"}
    return json.loads(lines[-1])


def table(rows: list[dict]) -> str:
    head = ("| setting | LM | batch | enc. ckpt | attention | reducer | volume tokens | parameters (trainable) "
            "| peak GPU memory | step | volumes/s | LM tokens/s |\n|" + "---|" * 12)  # fmt: skip
    out = [head]
    for r in rows:
        if r.get("status") != "ok":
            out.append(f"| {r['name']} | {r['lm']} | {r['batch']} | {'on' if r['ckpt'] else 'off'} | {r['attention']} "
                       f"| {r['reducer']} | | | not measured: {r['status']} | | | |")  # fmt: skip
            continue
        peak = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "n/a (CPU)"
        out.append(f"| {r['name']} | {r['lm']} | {r['batch']} | {'on' if r['ckpt'] else 'off'} | {r['attention']} "
                   f"| {r['reducer']} | {r['vol_tokens']} | {r['params'] / 1e9:.2f}B ({r['trainable'] / 1e6:.1f}M) "
                   f"| {peak} | {r['step_s']:.3f} s | {r['volumes_per_s']:.2f} | {r['tokens_per_s']:.0f} |")  # fmt: skip
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs/benchmarks/gpu.md", help="page to write")
    parser.add_argument("--json", type=Path, help="also write every figure as JSON")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per setting (median reported)")
    parser.add_argument("--budget-s", type=float, default=450, help="wall-clock budget of all settings")
    parser.add_argument("--tiny", action="store_true", help="tiny CPU settings (tests the script, not the GPU)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("bench_gpu needs a CUDA device (use --tiny for the CPU smoke run)", file=sys.stderr)
        return 2
    settings = TINY_SETTINGS if args.tiny else SETTINGS
    t0, rows = time.monotonic(), []
    for i, (name, lm, batch, ckpt, attention, reducer) in enumerate(settings):
        left = args.budget_s - (time.monotonic() - t0)
        spec = dict(name=name, lm=lm, batch=batch, ckpt=ckpt, attention=attention, reducer=reducer, steps=args.steps)
        if attention == "xformers" and not args.tiny:
            from vol3d.attention import _xformers_ops

            if _xformers_ops() is None:
                rows.append({**spec, "status": "xformers is not installed"})
                continue
        share = left / (len(settings) - i)
        rows.append(run_setting(spec, timeout=max(30.0, 1.5 * share)) if left > 20 else
                    {**spec, "status": "budget spent"})  # fmt: skip
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86-64'})"
    cuda = torch.version.cuda or "none"
    page = (f"# GPU memory and speed of the training step\n\nMeasured by `scripts/bench_gpu.py{' --tiny' if args.tiny else ''}` "
            f"on {device}, torch {torch.__version__}, CUDA {cuda}, {time.strftime('%Y-%m-%d')}, "
            f"{time.monotonic() - t0:.0f} s in all. Random weights from config (nothing downloaded); bf16 "
            "weights, LoRA r=16 on q/k/v/o, LM gradient checkpointing on; median of "
            f"{args.steps} timed steps after 2 warm-up steps, each setting in a fresh process.\n\n"
            f"{table(rows)}\n")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page)
    if args.json:
        args.json.write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
