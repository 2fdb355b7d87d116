"""Model benchmarks (not tests): one run, ours vs a reference, ratios printed.

1. Training step (forward + backward of the stage-I loss): looplm's fused loss (the default:
   gradients of the per-pass CE computed chunk by chunk in the forward pass) and its chunked
   reference path (chunk logits recomputed in backward), against a plain reference that materialises
   all T logit tensors (same model, same weights, same batch). Tokens/s and peak memory (CUDA: max
   allocated; CPU: peak RSS growth of a fresh process); `--repeats` alternating rounds, min and median.
   `fused_compiled`: the fused loss with the N shared layers compiled (`looplm.compile_layers`),
   first step (compilation) not timed. `matmul_floor`: the fused path with the loss replaced by only
   the three LM-head matmuls per pass and chunk that any exact method computes (no softmax): the
   fastest any exact loss can make this step, so `matmul_floor` / `reference` is the ceiling of the
   fused loss's speed-up on this machine. Pick with `--variants`. Ratios: of the medians and mins,
   and `paired_*`: min / median over rounds of the ratio within a round (drift between rounds cancels).
Decoding is measured by benchmarks/decode_throughput.py.

    python benchmarks/model_throughput.py                       # CPU-sized defaults
    python benchmarks/model_throughput.py --vocab 49152 --hidden 256 --layers 4 --batch 4 --seq 512
    python benchmarks/model_throughput.py --variants fused fused_compiled --vocab 8192 --hidden 256 --layers 4
    python benchmarks/model_throughput.py --preset ouro-1.4b --seq 4096 --batch 1 --device cuda --dtype bfloat16
"""

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time

import torch
import torch.nn.functional as F

import looplm.model
from looplm import LoopLMForCausalLM, compile_layers, preset_config
from looplm.objectives import IGNORE_INDEX, shift_labels, stage1_loss


def benchmark_config(args, **extra):
    """`--preset` (tiny: sized by --vocab --hidden --layers --steps, heads of 32) with `extra` keys."""
    if args.preset == "tiny":
        return preset_config("tiny", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                             num_attention_heads=args.hidden // 32, num_key_value_heads=args.hidden // 32,
                             head_dim=32, num_hidden_layers=args.layers, total_ut_steps=args.steps, **extra)
    return preset_config(args.preset, **extra)


def build(args):
    config = benchmark_config(args, ce_chunk_size=args.ce_chunk)
    torch.manual_seed(0)
    return LoopLMForCausalLM(config).to(device=args.device, dtype=getattr(torch, args.dtype))


def reference_loss(model, ids):
    """The naive way: every pass's full (B, S, V) logits kept alive for backward."""
    out = model.model(input_ids=ids)
    targets = shift_labels(ids)
    step_logits = [model.lm_head(h) for h in out.hidden_states]
    ce = torch.stack([F.cross_entropy(lg.float().flatten(0, 1), targets.flatten(), reduction="none",
                                      ignore_index=IGNORE_INDEX).view_as(targets) for lg in step_logits], -1)
    return stage1_loss(ce, out.gate_logits, targets != IGNORE_INDEX, model.config.entropy_beta)


class _MatmulFloor(torch.autograd.Function):
    """The three LM-head matmuls per pass and chunk of the fused loss (logits, their product with the
    head, the head's gradient), stored as gradients as the fused loss does; no softmax, loss 0."""

    @staticmethod
    def forward(ctx, weight, p, chunk_size, *hiddens):
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_h = [torch.empty_like(h) for h in hiddens]
        block = torch.empty(min(chunk_size, hiddens[0].shape[0]), weight.shape[0], dtype=weight.dtype,
                            device=weight.device)  # one block for all chunks, as the fused loss does
        for h, gh in zip(hiddens, grad_h):
            for start in range(0, h.shape[0], chunk_size):
                hc = h[start:start + chunk_size]
                logits = torch.mm(hc, weight.t(), out=block[:hc.shape[0]])
                torch.mm(logits, weight, out=gh[start:start + chunk_size])
                grad_w.addmm_(logits.t().float(), hc.float())
        ctx.save_for_backward(grad_w, p, *grad_h)
        return p.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        grad_w, p, *grad_h = ctx.saved_tensors
        return (grad_w * grad).to(p.dtype), torch.zeros_like(p), None, *[g * grad.to(g.dtype) for g in grad_h]


def matmul_floor_exit_ce(hiddens, weight, targets, p, normalizer, chunk_size):
    """Stands in for looplm.objectives.fused_exit_ce in the `matmul_floor` variant (same signature)."""
    valid = targets != IGNORE_INDEX
    loss = _MatmulFloor.apply(weight, p[valid], chunk_size, *[h[valid] for h in hiddens])
    return loss, torch.zeros(*targets.shape, len(hiddens), device=targets.device)


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def train_worker(args, variant, queue):
    model = build(args).train()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=args.device)
    if variant == "reference":
        step = lambda: reference_loss(model, ids)  # noqa: E731
    elif variant == "matmul_floor":
        model.config.loss_implementation = "fused"
        looplm.model.fused_exit_ce = matmul_floor_exit_ce  # this spawned process only
        step = lambda: model(ids, labels=ids).loss  # noqa: E731
    else:
        model.config.loss_implementation = variant.removesuffix("_compiled")
        if variant.endswith("_compiled"):
            compile_layers(model)
        step = lambda: model(ids, labels=ids).loss  # noqa: E731
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = current_rss()
    first = time.perf_counter()
    step().backward()  # warm-up, compilation included (counts towards the peak: it is the same step)
    model.zero_grad(set_to_none=True)
    first = time.perf_counter() - first
    start = time.perf_counter()
    for _ in range(args.iters):
        step().backward()
        model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    queue.put({"tokens_per_s": args.iters * args.batch * args.seq / seconds, "peak_mib": (peak - base) / 2**20,
               "first_step_s": first})


def run_isolated(args, variant):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=train_worker, args=(args, variant, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="tiny (sized by the flags below), ouro-1.4b or ouro-2.6b")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="T, passes per token")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--ce-chunk", type=int, default=2048, help="tokens per chunk of the per-pass LM head + CE")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds of the training variants")
    p.add_argument("--variants", nargs="+", default=["fused", "chunked", "reference"],
                   choices=["fused", "chunked", "reference", "fused_compiled", "chunked_compiled", "matmul_floor"])
    args = p.parse_args()
    variants = args.variants
    runs = {v: [] for v in variants}
    for _ in range(args.repeats):  # alternating, each in a fresh process
        for v in variants:
            runs[v].append(run_isolated(args, v))
    summary = {v: {"tokens_per_s_min": min(r["tokens_per_s"] for r in rs),
                   "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in rs),
                   "peak_mib_median": statistics.median(r["peak_mib"] for r in rs), "runs": rs}
               for v, rs in runs.items()}
    ref = summary[variants[-1]]
    paired = {v: [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs[v], runs[variants[-1]])]
              for v in variants[:-1]}
    report = {"config": vars(args), "train": summary, f"ratios_vs_{variants[-1]}": {
        v: {"speed_median": summary[v]["tokens_per_s_median"] / ref["tokens_per_s_median"],
            "speed_min": summary[v]["tokens_per_s_min"] / ref["tokens_per_s_min"],
            "paired_speed_median": statistics.median(paired[v]), "paired_speed_min": min(paired[v]),
            "memory_median": summary[v]["peak_mib_median"] / ref["peak_mib_median"]} for v in variants[:-1]}}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
