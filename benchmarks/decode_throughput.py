"""Early-exit decoding benchmark (not a test): decode tokens/s of `generate` at full depth vs early
exit with a CDF threshold that gives about half the passes, at several batch sizes, against the
compute bound of the passes actually skipped. Decoding only: the clock runs from the first new token
(which the prompt's prefill, identical in both, produces) to the last. Alternating repeats in one
process, min and median.

Compute bound: FLOPs per decoded token at full depth over FLOPs at the measured mean number of
passes, with the LM head, the embedding row and attention over the mean context counted, so the
best an implementation can do is `bound`; `share` = measured speedup / bound. The tokens of the
early-exit run are checked against `exit_skip=False` (the same result computed densely).
Speed-ups: of the medians, of the mins, and `paired_*` (the ratio within each round; min / median).
`fixed_batch_row_balance` = mean over rows of a row's passes in all / the most any row needs: what a
fixed batch decoded pass-asynchronously can reach at best, since finished rows idle until the last ends.

`--static`: also `generate_asynchronous(static=True)`, the fixed-shape tick, captured as a CUDA
graph on a GPU (`cuda_graph=True`). `--requests R`: continuous batching (`looplm.generate_continuous`): R prompts queued on each batch
size, full depth vs early exit on the same scheduler; the prompts' prefills (identical in both) are
timed and taken out, so this too is decoding only; `row_occupancy` = live rows per tick / batch
(below 1 once the queue has run dry and rows wait for the last requests). `weight_read_model`: the
speed-up if a tick cost only the weights it reads (the layers every tick, the LM head on ticks in
which some row emits; ticks and LM-head calls counted). At small batch decoding leans towards that
cost, and early exit spreads the emissions over more ticks, each reading the LM head; it is a model,
not a bound (weights that stay in cache cost less).

    python benchmarks/decode_throughput.py                                   # the issue-15 setting
    python benchmarks/decode_throughput.py --batch 1 8 --prompt 256 --new-tokens 128 --repeats 5
    python benchmarks/decode_throughput.py --model runs/smoke/hf --prompt 128   # a trained gate
    python benchmarks/decode_throughput.py --compile                          # compiled shared layers
    python benchmarks/decode_throughput.py --model runs/smoke/hf --prompt 128 --batch 8 --requests 32
    python benchmarks/decode_throughput.py --device cuda --dtype bfloat16 --static   # + CUDA-graph ticks
    python benchmarks/decode_throughput.py --preset ouro-1.4b --device cuda --dtype bfloat16
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.model_throughput import benchmark_config  # noqa: E402
from looplm import LoopCache, LoopLMForCausalLM, compile_layers  # noqa: E402
from looplm.compat import CACHE_NAME  # noqa: E402
from looplm import decode  # noqa: E402
from looplm.decode import generate_asynchronous, generate_continuous  # noqa: E402


def build(args):
    if args.model:
        model = LoopLMForCausalLM.from_pretrained(args.model)
        model.config.kv_sharing = args.kv_sharing
        return model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    config = benchmark_config(args, kv_sharing=args.kv_sharing)
    torch.manual_seed(0)
    model = LoopLMForCausalLM(config)
    # A freshly initialised gate gives almost the same logit to every token (every row would exit at
    # the same pass); a gate whose logits spread with std `gate_std` over tokens makes rows exit at
    # different passes, the case batched early exit has to handle (a trained gate does: --model).
    if args.gate_std is not None:
        torch.nn.init.normal_(model.model.early_exit_gate.weight, std=args.gate_std / config.hidden_size ** 0.5)
    return model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()


def half_depth_threshold(model, prompt) -> float:
    """CDF threshold q whose exit pass averages T/2 over the prompt's tokens (bisection)."""
    T = model.config.total_ut_steps
    cdf = torch.cumsum(model(prompt, use_cache=False).exit_probs.float(), -1)[..., :-1].flatten(0, 1)
    lo, hi = 0.0, 1.0
    for _ in range(30):
        q = (lo + hi) / 2
        passes = torch.where((cdf >= q).any(-1), (cdf >= q).float().argmax(-1) + 1, torch.full_like(cdf[:, 0], T))
        lo, hi = (q, hi) if passes.float().mean() < T / 2 else (lo, q)
    return q


MODEL_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "total_ut_steps", "kv_sharing")
SIZE_FLAGS = ("preset", "gate_std", "vocab", "hidden", "layers", "steps")  # what sizes a random model only


def measured_config(args, model) -> dict:
    """The run's settings and the measured model's own dimensions (a saved model's, not the flags'
    defaults, which size only the random model)."""
    flags = {k: v for k, v in vars(args).items() if k != "output" and not (args.model and k in SIZE_FLAGS)}
    return {**flags, "measured_model": {k: getattr(model.config, k) for k in MODEL_KEYS}}


def token_flops(config, passes: float, context: float) -> float:
    """Forward FLOPs of one decoded token: `passes` x N layers (matmuls + attention over `context`
    keys), the LM head, and the embedding row (read, counted as d)."""
    d, f, h = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * h, config.num_key_value_heads * h
    layer = 2 * (d * q + 2 * d * kv + q * d + 3 * d * f) + 4 * context * q
    return passes * config.num_hidden_layers * layer + 2 * d * config.vocab_size + d


def speedup(rates: list[float], reference: list[float]) -> dict[str, float]:
    """Speed-up over `reference` from alternating rounds: the ratio of the medians and of the mins,
    and the min / median over rounds of the ratio within a round (`paired_*`: drift between rounds,
    which moved this CPU's speed by up to 20%, cancels)."""
    paired = [a / b for a, b in zip(rates, reference)]
    return {"median": statistics.median(rates) / statistics.median(reference), "min": min(rates) / min(reference),
            "paired_median": statistics.median(paired), "paired_min": min(paired)}


class Clock(BaseStreamer):
    """A streamer that timestamps what it receives: the prompt, each new token, the end."""

    def __init__(self, device):
        self.device, self.times = device, []

    def put(self, value):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self):
        self.put(None)


def timed_generate(model, prompt, new_tokens, device, asynchronous=False, **kw):
    """Greedy generation -> (tokens, seconds from the first new token to the last): decoding only,
    the prompt's prefill (identical in every variant) is not timed."""
    model.model.layer_token_applications = 0
    clock = Clock(device)
    if asynchronous:
        out = generate_asynchronous(model, prompt, new_tokens, streamer=clock, **kw)
    else:
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0, streamer=clock, **kw)
    return out, clock.times[-1] - clock.times[1]


@torch.no_grad()
def bench_batch(model, args, batch):
    config, T, N = model.config, model.config.total_ut_steps, model.config.num_hidden_layers
    g = torch.Generator().manual_seed(batch)
    # Token 0 is generate()'s pad id: a prompt without it is not masked anywhere.
    prompt = torch.randint(1, config.vocab_size, (batch, args.prompt), generator=g).to(args.device)
    q = half_depth_threshold(model, prompt)
    variants = {"full_depth": {"exit_threshold": 1.0}, "early_exit": {"exit_threshold": q}}
    if config.kv_sharing == "last":  # pass-asynchronous decoding (looplm/decode.py) needs the "last" cache
        variants["early_exit_async"] = {"exit_threshold": q, "asynchronous": True}
        if getattr(args, "static", False):  # fixed-shape ticks; captured as a CUDA graph on a GPU
            graph = "cuda_graph" if args.device.startswith("cuda") else "static"
            variants["early_exit_async_static"] = {"exit_threshold": q, "asynchronous": True, graph: True}
    for kw in variants.values():
        timed_generate(model, prompt, 4, args.device, **kw)  # warm-up
    seconds = {name: [] for name in variants}
    outputs = {}
    for _ in range(args.repeats):
        for name, kw in variants.items():
            outputs[name], s = timed_generate(model, prompt, args.new_tokens, args.device, **kw)
            seconds[name].append(s)
            if name == "early_exit":
                applications = model.model.layer_token_applications
    new = batch * (args.new_tokens - 1)  # timed: every new token after the first (which the prefill gives)
    prefill = prompt.numel() * T * N
    passes = (applications - prefill) / N / new
    cache = LoopCache(N, config.kv_sharing)
    dense, _ = timed_generate(model, prompt, args.new_tokens, args.device, exit_threshold=q, exit_skip=False,
                              **{CACHE_NAME: cache})
    exits = cache.exit_steps[:, args.prompt + 1:]  # the timed tokens' exit passes
    context = args.prompt + args.new_tokens / 2
    bound = token_flops(config, T, context) / token_flops(config, passes, context)
    # Every row of a step waits for the deepest row of that step: the bound of lock-step decoding when
    # a pass costs the same for any number of live rows (small batches are weight-bandwidth bound).
    deepest = float((exits.max(0).values + 1).float().mean())
    lockstep = token_flops(config, T, context) / token_flops(config, deepest, context)
    rate = {name: [new / s for s in ss] for name, ss in seconds.items()}
    full = rate.pop("full_depth")
    speedups = {name: speedup(r, full) for name, r in rate.items()}
    return {
        "batch": batch, "kv_sharing": config.kv_sharing, "threshold": q, "mean_passes": passes,
        "tokens_per_s": {name: {"min": min(r), "median": statistics.median(r)} for name, r in
                         {"full_depth": full, **rate}.items()},
        "speedup": speedups, "compute_bound": bound,
        "share_of_bound_median": {name: x["median"] / bound for name, x in speedups.items()},
        "share_of_bound_paired_median": {name: x["paired_median"] / bound for name, x in speedups.items()},
        "mean_deepest_passes_per_step": deepest, "lockstep_bound": lockstep,
        "tokens_equal_dense": bool(torch.equal(dense, outputs["early_exit"])),
        "async_tokens_equal_lockstep": (bool(torch.equal(outputs["early_exit_async"], outputs["early_exit"]))
                                        if "early_exit_async" in outputs else None),
        "static_tokens_equal_lockstep": (bool(torch.equal(outputs["early_exit_async_static"], outputs["early_exit"]))
                                         if "early_exit_async_static" in outputs else None),
        "exit_pass_histogram": torch.bincount(exits.flatten(), minlength=T).tolist(),
        "steps_with_rows_at_different_passes": float((exits.max(0).values != exits.min(0).values).float().mean()),
        "fixed_batch_row_balance": float((exits + 1).sum(1).float().mean() / (exits + 1).sum(1).max()),
    }


def timed_continuous(model, prompts, new_tokens, device, **kw):
    """generate_continuous -> (outputs, decode seconds, decode layer applications, ticks, LM-head
    calls): the prompts' prefills (model.forward calls, the same in every variant) are timed and
    their counts subtracted."""
    core, sync = model.model, (torch.cuda.synchronize if device.startswith("cuda") else lambda: None)
    prefill = {"seconds": 0.0, "applications": 0, "heads": 0}
    forward, heads = model.forward, [0]
    hook = model.lm_head.register_forward_hook(lambda *_: heads.__setitem__(0, heads[0] + 1))

    def timed_forward(*a, **k):
        sync()
        start, applications, head_calls = time.perf_counter(), core.layer_token_applications, heads[0]
        out = forward(*a, **k)
        sync()
        prefill["seconds"] += time.perf_counter() - start
        prefill["applications"] += core.layer_token_applications - applications
        prefill["heads"] += heads[0] - head_calls
        return out

    ticks, tick = [0], decode._Rows.tick

    def counted_tick(rows, *args, **kwargs):
        ticks[0] += 1
        return tick(rows, *args, **kwargs)

    model.forward, core.layer_token_applications, decode._Rows.tick = timed_forward, 0, counted_tick
    try:
        sync()
        start = time.perf_counter()
        out = generate_continuous(model, prompts, new_tokens, **kw)
        sync()
        seconds = time.perf_counter() - start
    finally:
        del model.forward
        decode._Rows.tick = tick
        hook.remove()
    return (out, seconds - prefill["seconds"], core.layer_token_applications - prefill["applications"], ticks[0],
            heads[0] - prefill["heads"])


def weight_bytes(model) -> tuple[int, int]:
    """Bytes of the weights a tick reads: everything but the embedding and the LM head (read once per
    tick for all rows), and the LM head (read on the ticks in which some row emits)."""
    head = model.lm_head.weight
    pass_weights = sum(p.numel() * p.element_size() for n, p in model.model.named_parameters()
                       if not n.startswith("embed_tokens"))
    return pass_weights, head.numel() * head.element_size()


@torch.no_grad()
def bench_continuous(model, args, batch):
    config, T, N = model.config, model.config.total_ut_steps, model.config.num_hidden_layers
    g = torch.Generator().manual_seed(1000 + batch)
    prompts = torch.randint(1, config.vocab_size, (args.requests, args.prompt), generator=g).to(args.device)
    q = half_depth_threshold(model, prompts[:batch])
    variants = {"full_depth": {"exit_at_step": T - 1}, "early_exit": {"exit_threshold": q}}
    for kw in variants.values():
        timed_continuous(model, list(prompts[:batch]), 4, args.device, batch_size=batch, **kw)  # warm-up
    seconds, outputs, counts = {name: [] for name in variants}, {}, {}
    for _ in range(args.repeats):
        for name, kw in variants.items():
            outputs[name], s, *counts[name] = timed_continuous(model, list(prompts), args.new_tokens, args.device,
                                                               batch_size=batch, **kw)
            seconds[name].append(s)
    applications, ticks, _ = counts["early_exit"]
    new = sum(len(o) - 1 for o in outputs["early_exit"])  # timed: every token after the prefill's
    passes = applications / N / new
    context = args.prompt + args.new_tokens / 2
    bound = token_flops(config, T, context) / token_flops(config, passes, context)
    rate = {name: [new / s for s in ss] for name, ss in seconds.items()}
    full, early = rate["full_depth"], rate["early_exit"]
    ratio = speedup(early, full)
    # At small batch a tick costs the weights it reads more than its FLOPs: the layers once per tick,
    # the LM head once per tick in which some row emits (early exit spreads emissions over more ticks).
    layers, head = weight_bytes(model)
    read = {name: ticks_ * layers + heads * head for name, (_, ticks_, heads) in counts.items()}
    fixed = generate_asynchronous(model, prompts[:batch], args.new_tokens, exit_threshold=q)[:, args.prompt:]
    return {
        "batch": batch, "requests": args.requests, "threshold": q, "mean_passes": passes,
        "tokens_per_s": {name: {"min": min(r), "median": statistics.median(r)} for name, r in rate.items()},
        "speedup": ratio, "compute_bound": bound, "share_of_bound_median": ratio["median"] / bound,
        "share_of_bound_paired_median": ratio["paired_median"] / bound,
        "ticks": {name: c[1] for name, c in counts.items()}, "lm_head_calls": {name: c[2] for name, c in counts.items()},
        "weight_read_model": read["full_depth"] / read["early_exit"],
        "share_of_weight_read_model_paired_median": ratio["paired_median"] * read["early_exit"] / read["full_depth"],
        # live rows per tick / batch: below 1 when rows idle (the queue's tail, when it has run dry)
        "row_occupancy": applications / N / (ticks * min(batch, args.requests)),
        "tokens_equal_fixed_batch_async": all(torch.equal(a, b) for a, b in zip(outputs["early_exit"], fixed)),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a saved model folder (e.g. runs/smoke/hf) instead of a random one")
    p.add_argument("--preset", default="tiny", help="tiny (sized by the flags below), ouro-1.4b or ouro-2.6b")
    p.add_argument("--gate-std", type=float, help="spread of the random gate's logits over tokens "
                   "(default: as initialised, nearly the same exit pass for every token)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=4, help="T, passes per token")
    p.add_argument("--kv-sharing", default="last", choices=("none", "last", "mean"),
                   help="the cache of every variant; pass-asynchronous decoding runs with 'last' only")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds of full depth and early exit")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--static", action="store_true", help="also the pass-asynchronous decoder's static tick "
                   "(generate_asynchronous(static=True); captured as a CUDA graph on a GPU)")
    p.add_argument("--requests", type=int, default=0,
                   help="also measure continuous batching of this many queued prompts at each batch size")
    p.add_argument("--compile", action="store_true", help="compile the shared layers (looplm.compile_layers)")
    p.add_argument("--output", help="also write the report to this JSON file")
    args = p.parse_args()
    model = build(args)
    if args.compile:
        compile_layers(model, dynamic=True)
    report = {"config": measured_config(args, model), "results": [bench_batch(model, args, b) for b in args.batch]}
    if args.requests:
        report["continuous"] = [bench_continuous(model, args, b) for b in args.batch]
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
