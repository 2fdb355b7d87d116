"""Loss benchmark (not a test): the stage-I CE term sum_t p_t CE_t alone, forward + backward, for T
passes of `--tokens` hidden states through a (V, d) LM head. Three ways, alternating repeats in one
process, seconds min / median:

* fused: `looplm.objectives.fused_exit_ce` (gradients computed chunk by chunk in the forward pass);
* all_logits: the plain formula under autograd, every pass's (tokens, V) logits kept for backward;
* matmuls: only the three LM-head matmuls per pass that any exact method computes (logits, the
  hidden-state gradient, the head gradient): the floor the fused loss is measured against.

    python benchmarks/loss_throughput.py                                   # vocab 49152, d 256, 2048 x 4
    python benchmarks/loss_throughput.py --chunk 512 --repeats 5
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from looplm.objectives import fused_exit_ce  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--steps", type=int, default=4, help="T, passes")
    p.add_argument("--chunk", type=int, default=1024, help="tokens per chunk of the fused loss")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    n, T = args.tokens, args.steps
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * 0.02).requires_grad_()
    hiddens = [torch.randn(1, n, args.hidden, generator=g).requires_grad_() for _ in range(T)]
    targets = torch.randint(0, args.vocab, (1, n), generator=g)
    p_exit = torch.softmax(torch.randn(1, n, T, generator=g), -1).requires_grad_()

    def fused():
        loss, _ = fused_exit_ce(hiddens, weight, targets, p_exit, n, args.chunk)
        loss.backward()

    def all_logits():
        ce = [F.cross_entropy(F.linear(h[0], weight), targets[0], reduction="none") for h in hiddens]
        ((p_exit[0] * torch.stack(ce, -1)).sum() / n).backward()

    def matmuls():  # into buffers allocated once per call, as the fused loss does
        block, grad_h, grad_w = torch.empty(n, args.vocab), torch.empty(n, args.hidden), torch.empty_like(weight)
        with torch.no_grad():
            for h in hiddens:
                torch.mm(h[0], weight.t(), out=block)
                torch.mm(block, weight, out=grad_h), torch.mm(block.t(), h[0], out=grad_w)

    ways = {"fused": fused, "all_logits": all_logits, "matmuls": matmuls}
    for fn in ways.values():
        fn()  # warm-up
    seconds = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, fn in ways.items():
            weight.grad = p_exit.grad = None
            for h in hiddens:
                h.grad = None
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    report = {"config": vars(args), "seconds": {k: {"min": min(v), "median": statistics.median(v), "runs": v}
                                                for k, v in seconds.items()},
              "fused_over_matmuls_median": statistics.median(seconds["fused"]) / statistics.median(seconds["matmuls"]),
              "all_logits_over_fused_median": (statistics.median(seconds["all_logits"])
                                               / statistics.median(seconds["fused"]))}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
