"""One-command GPU benchmark: one table, under 10 minutes on an H100. Needs torch and transformers only
(no DeepSpeed: the training step is the model's forward + backward + AdamW on one device).

    python benchmarks/gpu_check.py                 # GPU: Ouro-1.4B (T = 4) at 4K tokens, bf16
    python benchmarks/gpu_check.py --tiny          # CPU: a tiny configuration, fp32 (what the tests run)
    python benchmarks/gpu_check.py --json out.json # also write the rows

Rows:
1. attention on packed documents (forward + backward): SDPA with the dense mask, FlashAttention
   varlen (when installed), FlexAttention with the document-causal block mask (compiled on a GPU):
   the largest difference of output and input gradients to SDPA, and milliseconds. (FlexAttention
   has no backward on CPU: --tiny compares its forward only.)
2. training step (forward + backward + AdamW, one sequence): loss_implementation chunked / fused /
   fused + compiled layers; tokens/s, TFLOP/s and MFU counted over all T passes
   (pretrain.metrics.flops_per_token), peak memory.
3. decoding, batch 1 and 8 ("last" KV sharing): full depth against early exit at a threshold that
   gives about half the passes, lock-step (generate) and pass-asynchronous (looplm.decode), decode
   tokens/s, speedups and the compute bound (benchmarks/decode_throughput.py's measurement), the
   static tick (captured as a CUDA graph on a GPU: "static_speedup"); and
   continuous batching of a queue of prompts on 8 rows (looplm.generate_continuous; its figures in
   the async columns).
"""

import argparse
import json
import statistics
import sys
import time
from argparse import Namespace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode_throughput import bench_batch, bench_continuous, build  # noqa: E402
from looplm import LoopLMForCausalLM, compile_layers, preset_config  # noqa: E402
from looplm.attention import attention, build_attention_mask, flash_attn_func, flex_attention  # noqa: E402
from pretrain.metrics import flops_per_token  # noqa: E402

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, total_ut_steps=4)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> tuple[float, object]:
    """Median seconds of `fn()` over `repeats` calls after one warm-up, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def reference_attention(q, k, v, positions):
    """Naive attention in fp64, the independent reference: a token attends to the tokens of its own
    document (a document starts where the position restarts at 0) up to itself; grouped KV heads
    repeated. q (1, H, S, h), k/v (1, Hkv, S, h), positions (1, S) -> (1, S, H, h)."""
    q, k, v = (x.double() for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    doc = (positions[0] == 0).cumsum(0)
    i = torch.arange(q.shape[2], device=q.device)
    allowed = (doc[:, None] == doc[None, :]) & (i[None, :] <= i[:, None])
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
    return (weights @ v).transpose(1, 2)


def attention_rows(args, device, dtype) -> list[dict]:
    """Packed documents in one row: each backend, forward (+ backward on GPU), against the naive fp64
    reference; outputs and gradients compared in fp64."""
    S, heads, kv_heads, head_dim = (256, 4, 2, 16) if args.tiny else (args.seq, 16, 16, 128)
    lengths = [S // 8] * 7 + [S - 7 * (S // 8)]
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    torch.manual_seed(0)
    q = torch.randn(1, heads, S, head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(1, kv_heads, S, head_dim, device=device, dtype=dtype) for _ in range(2))
    grad_out = torch.randn(1, S, heads, head_dim, device=device, dtype=dtype)
    backward = device.type == "cuda"  # flex has no CPU backward

    def run(backend):
        mask = build_attention_mask(S, 0, None, positions)
        inputs = [x.detach().requires_grad_(backward) for x in (q, k, v)]

        def step():
            out = attention(*inputs, mask, backend)
            if backward:
                grads = torch.autograd.grad(out, inputs, grad_out)
                return out, grads
            return out, ()
        return timed(step, device, args.repeats)

    backends = ["sdpa"] + (["flash"] if flash_attn_func is not None and device.type == "cuda" else []) + \
        (["flex"] if flex_attention is not None else [])
    results = {b: run(b) for b in backends}
    ref_inputs = [x.detach().double().requires_grad_(backward) for x in (q, k, v)]
    ref_out = reference_attention(*ref_inputs, positions)
    ref_grads = torch.autograd.grad(ref_out, ref_inputs, grad_out.double()) if backward else ()
    rows = []
    for b, (seconds, (out, grads)) in results.items():
        grad_diff = max((float((g.double() - r).abs().max()) for g, r in zip(grads, ref_grads)), default=None)
        rows.append({"section": "attention", "name": b, "ms_fwd_bwd" if backward else "ms_fwd": 1e3 * seconds,
                     "max_abs_diff_out": float((out.double() - ref_out).abs().max()), "max_abs_diff_grads": grad_diff})
    return rows


def model_config(args):
    if args.tiny:
        return preset_config("tiny", **TINY)
    return preset_config(args.preset)


def training_rows(args, device, dtype) -> list[dict]:
    config = model_config(args)
    seq = 128 if args.tiny else args.seq
    flops = flops_per_token(config, seq)
    rows = []
    variants = [("chunked", False), ("fused", False)] + ([] if args.no_compile else [("fused", True)])
    for impl, compiled in variants:
        torch.manual_seed(0)
        model = LoopLMForCausalLM(model_config(args)).to(device=device, dtype=dtype).train()
        model.config.loss_implementation = impl
        if compiled:
            compile_layers(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        ids = torch.randint(0, config.vocab_size, (1, seq), device=device)

        def step():
            loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        start = time.perf_counter()
        step()  # warm-up (compilation happens here)
        sync(device)
        warmup = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds, loss = timed(step, device, args.repeats)
        tokens_per_s = seq / seconds
        tflops = flops * tokens_per_s / 1e12
        rows.append({"section": "training", "name": impl + (" + compiled layers" if compiled else ""),
                     "tokens_per_s": tokens_per_s, "tflops": tflops, "mfu": tflops / args.peak_tflops,
                     "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
                     "first_step_s": warmup, "loss": float(loss)})
        if device.type == "cuda":
            model = optimizer = None  # free this variant before the next
            torch.cuda.empty_cache()
    return rows


def decode_rows(args, device, dtype) -> list[dict]:
    ns = Namespace(model=None, preset="tiny" if args.tiny else args.preset, vocab=TINY["vocab_size"],
                   hidden=TINY["hidden_size"] * 2, layers=2, steps=4, kv_sharing="last", gate_std=None,
                   prompt=32 if args.tiny else 512, new_tokens=16 if args.tiny else 128, repeats=1,
                   requests=16 if args.tiny else 64, static=True, device=str(device), dtype=str(dtype).removeprefix("torch."))
    model = build(ns)
    rows = []
    for batch in (1, 8):
        r = bench_batch(model, ns, batch)
        rate = r["tokens_per_s"]
        rows.append({"section": "decode", "name": f"batch {batch}", "full_depth_tokens_per_s": rate["full_depth"]["median"],
                     "early_exit_tokens_per_s": rate["early_exit"]["median"],
                     "async_tokens_per_s": rate["early_exit_async"]["median"], "mean_passes": r["mean_passes"],
                     "speedup": r["speedup"]["early_exit"]["median"],
                     "async_speedup": r["speedup"]["early_exit_async"]["median"],
                     "static_speedup": r["speedup"]["early_exit_async_static"]["median"], "compute_bound": r["compute_bound"],
                     "tokens_equal": (r["tokens_equal_dense"] and r["async_tokens_equal_lockstep"]
                                      and r["static_tokens_equal_lockstep"])})
    r = bench_continuous(model, ns, 8)  # a queue of prompts on 8 rows: the async columns are its figures
    rows.append({"section": "decode", "name": f"continuous batch 8, {ns.requests} requests",
                 "full_depth_tokens_per_s": r["tokens_per_s"]["full_depth"]["median"], "early_exit_tokens_per_s": None,
                 "async_tokens_per_s": r["tokens_per_s"]["early_exit"]["median"], "mean_passes": r["mean_passes"],
                 "speedup": None, "async_speedup": r["speedup"]["median"], "static_speedup": None,
                 "compute_bound": r["compute_bound"],
                 "tokens_equal": r["tokens_equal_fixed_batch_async"]})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = []
    for section in ("attention", "training", "decode"):
        part = [r for r in rows if r["section"] == section]
        if not part:
            continue
        keys = [k for k in part[0] if k != "section"]
        lines += [f"\n{section}", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in part:
            lines.append("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny configuration in fp32 (runs on CPU)")
    p.add_argument("--preset", default="ouro-1.4b")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the device (H100 SXM: 989)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled-layers row")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"gpu_check: {name}, torch {torch.__version__}, {'tiny fp32' if args.tiny else f'{args.preset} bf16'}",
          flush=True)
    rows = attention_rows(args, device, dtype) + training_rows(args, device, dtype) + decode_rows(args, device, dtype)
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "args": vars(args) | {
            "json": args.json.name}, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
