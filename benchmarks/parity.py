"""The observed distance to the official Ouro code (not a test: the tests in tests/looplm/test_fixture.py
assert tolerances; this records how far inside them we are), on an official-format fixture folder
that holds `expected.safetensors` (the official code's outputs on its `input_ids`).

    python benchmarks/parity.py ../shared/fixtures/ouro_tiny > benchmarks/results/parity_ouro_tiny.json

Prints JSON: the largest absolute difference per output (hidden states, logits and gates per pass,
the exit distribution, the final logits at q = 1.0 and 0.5, the weighted-exit logits, the labels
loss) and whether the exit steps and the greedy tokens (with and without the KV cache) are equal.
"""

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

from looplm import LoopLMForCausalLM


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@torch.no_grad()
def parity(folder: Path) -> dict:
    model = LoopLMForCausalLM.from_pretrained(folder).eval()
    exp = load_file(folder / "expected.safetensors")
    ids, T = exp["input_ids"], model.config.total_ut_steps
    out = model(ids, output_step_logits=True, output_hidden_states=True, use_cache=False)
    diffs = {}
    for t in range(T):
        diffs[f"hidden_step{t}"] = max_diff(out.hidden_states[t], exp[f"hidden_step{t}"])
        diffs[f"logits_step{t}"] = max_diff(out.step_logits[t], exp[f"logits_step{t}"])
        diffs[f"gate_step{t}"] = max_diff(out.gate_probs[..., t], exp[f"gate_step{t}"])
    diffs["exit_pdf"] = max_diff(out.exit_probs, exp["exit_pdf"])
    exact = {}
    for q, key in ((None, "1p0"), (0.5, "0p5")):  # None: the config's threshold (the official default 1.0)
        o = model(ids, use_cache=False, **({} if q is None else {"exit_threshold": q}))
        diffs[f"final_logits_threshold_{key}"] = max_diff(o.logits, exp["final_logits" + ("" if q is None else "_threshold_0p5")])
        exact[f"exit_steps_threshold_{key}"] = torch.equal(o.exit_steps, exp[f"exit_steps_threshold_{key}"])
    model.config.early_exit_threshold = None  # the official weighted branch is reachable only so
    o = model(ids, use_cache=False, use_weighted_exit=True)
    diffs["weighted_logits"] = max_diff(o.logits, exp["weighted_logits"])
    vocab = o.logits.shape[-1]
    ce = F.cross_entropy(o.logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
    diffs["labels_loss"] = abs(ce.item() - exp["labels_loss"][0].item())
    n_new = exp["generated_ids"].shape[1] - ids.shape[1]
    for cache in (True, False):
        got = model.generate(ids[:1], max_new_tokens=n_new, do_sample=False, use_cache=cache)
        exact[f"greedy_tokens_{'cache' if cache else 'no_cache'}"] = torch.equal(got, exp["generated_ids"])
    return {"fixture": folder.name, "max_abs_diff": diffs, "equal": exact,
            "date": datetime.date.today().isoformat(), "machine": platform.machine(),
            "torch": torch.__version__, "transformers": transformers.__version__}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("fixture", type=Path, help="an official-format folder with expected.safetensors")
    args = p.parse_args(argv)
    if not (args.fixture / "expected.safetensors").is_file():
        p.error(f"{args.fixture} has no expected.safetensors: give an official-format fixture folder "
                "(config.json, model.safetensors and the official outputs in expected.safetensors)")
    print(json.dumps(parity(args.fixture), indent=2))


if __name__ == "__main__":
    main()
