"""Model memory/speed benchmark: gradient checkpointing and token reducers, side by side.

    .venv/bin/python scripts/bench_model.py --encoder vit3d_base --shape 112 112 80
    .venv/bin/python scripts/bench_model.py --encoder vit3d_base --shape 224 224 160   # GPU

Part 1, encoder: parameters; forward+backward step time and activation memory with
checkpointing off and on, each setting in a fresh subprocess. Activation memory is the
size of the tensors autograd keeps for backward (parameters excluded), measured with
saved-tensor hooks on any device; on CUDA the allocator's peak growth minus gradients is
reported too. (Process RSS is useless for this on CPU: the allocator keeps freed pages.)

Part 2, language model: prefill tokens and time (reducer + LM forward on the volume
tokens plus a 32-token prompt) for every reducer against ``none``, at the token grid of
``--lm-shape`` (default 224x224x160), reducers configured for ``--factor`` (8x) fewer tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import torch


def encoder_child(args: argparse.Namespace) -> dict:
    """One checkpointing setting, in its own process so peak memory is not polluted."""
    from vol3d.models import create_encoder

    device = torch.device(args.device)
    torch.manual_seed(0)
    enc = create_encoder(args.encoder).to(device).train()
    enc.set_grad_checkpointing(bool(args.ckpt))
    x = torch.randn(args.batch, enc.in_chans, *args.shape, device=device)
    grad_bytes = sum(p.numel() * p.element_size() for p in enc.parameters())

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            y = enc.forward_features(x)
        y.float().square().mean().backward()
        enc.zero_grad(set_to_none=True)

    # Activation memory = bytes of the distinct storages autograd keeps for backward at the
    # end of the forward pass (parameters excluded). Inside a checkpointed block the
    # checkpoint's own hooks take over, so what it drops is (correctly) not counted; the
    # one block recomputed at a time in backward adds a little on top.
    param_ptrs = {p.untyped_storage().data_ptr() for p in enc.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    peak = sum(saved.values())
    cuda_peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        cuda_peak = torch.cuda.max_memory_allocated() - base - grad_bytes
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"peak_act_bytes": peak, "cuda_peak_bytes": cuda_peak, "step_s": statistics.median(times),
            "tokens": math.prod(enc.token_grid(args.shape))}


def bench_encoder(args: argparse.Namespace) -> dict:
    from vol3d.models import create_encoder

    with torch.device("meta"):
        n_params = sum(p.numel() for p in create_encoder(args.encoder).parameters())
    res = {"params": n_params}
    for ckpt in (0, 1):
        cmd = [sys.executable, __file__, "--child", "--ckpt", str(ckpt), "--encoder", args.encoder,
               "--shape", *map(str, args.shape), "--batch", str(args.batch), "--repeats", str(args.repeats),
               "--device", args.device]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        res["ckpt" if ckpt else "plain"] = json.loads(out)
    return res


def reducer_params(name: str, grid: tuple[int, int, int], factor: int) -> dict:
    n = math.prod(grid)
    if name == "pool":  # pool each axis by the cube root of the factor, rounding the grid up
        k = round(factor ** (1 / 3))
        return {"out_grid": [math.ceil(g / k) for g in grid]}
    if name == "perceiver":
        return {"num_queries": n // factor}
    if name == "prune":
        return {"num_tokens": n // factor}
    return {}


@torch.no_grad()
def bench_prefill(args: argparse.Namespace) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from vol3d.models import create_encoder, create_reducer, list_reducers

    device = torch.device(args.device)
    with torch.device("meta"):  # only the encoder's grid geometry is needed
        enc = create_encoder(args.encoder)
    grid = enc.token_grid(args.lm_shape)
    positions = enc.token_positions(args.lm_shape).to(device)
    lm_cfg = AutoConfig.for_model("llama", hidden_size=args.lm_hidden, num_hidden_layers=args.lm_layers,
                                  num_attention_heads=8, num_key_value_heads=8,
                                  intermediate_size=4 * args.lm_hidden, vocab_size=1000,
                                  max_position_embeddings=8192)
    lm = AutoModelForCausalLM.from_config(lm_cfg).to(device).eval()
    feats = torch.randn(1, math.prod(grid), enc.embed_dim, device=device)
    volume = torch.rand(1, enc.in_chans, *args.lm_shape, device=device)
    proj = torch.nn.Linear(enc.embed_dim, args.lm_hidden).to(device)
    prompt = torch.randn(1, 32, args.lm_hidden, device=device)
    out = {}
    for name in list_reducers():
        red = create_reducer(name, enc.embed_dim, **reducer_params(name, grid, args.factor)).to(device).eval()
        times = []
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            tokens, _ = red(feats, positions, grid, volume=volume)
            embeds = torch.cat([proj(tokens), prompt], dim=1)
            lm(inputs_embeds=embeds, use_cache=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[name] = {"vol_tokens": tokens.shape[1], "prefill_tokens": embeds.shape[1],
                     "prefill_s": statistics.median(times[1:])}
    return {"grid": grid, "reducers": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="vit3d_base")
    p.add_argument("--shape", type=int, nargs=3, default=[112, 112, 80], help="encoder input (X Y Z)")
    p.add_argument("--lm-shape", type=int, nargs=3, default=[224, 224, 160], help="input whose grid feeds the LM")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--factor", type=int, default=8, help="token reduction the reducers are configured for")
    p.add_argument("--lm-hidden", type=int, default=512)
    p.add_argument("--lm-layers", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-encoder", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(encoder_child(args)))
        return

    print(f"# torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    print(f"# {' '.join(sys.argv)}")
    if not args.skip_encoder:
        r = bench_encoder(args)
        a, b = r["plain"], r["ckpt"]
        print(f"\nencoder {args.encoder}: {r['params'] / 1e6:.1f}M parameters, input {args.batch}x{'x'.join(map(str, args.shape))}, "
              f"{a['tokens']} tokens")
        print("| checkpointing | step (fwd+bwd) s | activations kept for backward MiB | CUDA peak MiB |")
        print("|---|---|---|---|")
        for label, x in (("off", a), ("on", b)):
            cuda = "-" if x["cuda_peak_bytes"] is None else f"{x['cuda_peak_bytes'] / 2**20:.0f}"
            print(f"| {label} | {x['step_s']:.2f} | {x['peak_act_bytes'] / 2**20:.0f} | {cuda} |")
        print(f"ratios: activation memory on/off = {b['peak_act_bytes'] / a['peak_act_bytes']:.2f}, "
              f"step time on/off = {b['step_s'] / a['step_s']:.2f}")
    r = bench_prefill(args)
    base = r["reducers"]["none"]
    print(f"\nLM prefill (llama {args.lm_hidden}-d x {args.lm_layers} layers), grid {r['grid']} of input "
          f"{'x'.join(map(str, args.lm_shape))}, + 32 prompt tokens")
    print("| reducer | volume tokens | reduction | prefill tokens | reducer+prefill s | speed-up |")
    print("|---|---|---|---|---|---|")
    for name, x in r["reducers"].items():
        print(f"| {name} | {x['vol_tokens']} | {base['vol_tokens'] / x['vol_tokens']:.1f}x | {x['prefill_tokens']} | "
              f"{x['prefill_s']:.3f} | {base['prefill_s'] / x['prefill_s']:.1f}x |")


if __name__ == "__main__":
    main()
