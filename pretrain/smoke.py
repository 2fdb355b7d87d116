"""The main job (`make smoke`): a tiny LoopLM end to end on this machine.

Builds a tiny model, fits it for a few steps to a small repeating sequence so the passes and the
exit gate have something to learn, prints the stage-I loss, the loss per pass and the exit
distribution, saves it in the Ouro Hugging Face format, reloads it, and generates with full depth
and with early exit (the number of layer applications shows what early exit saved).
"""

import argparse
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from looplm import LoopLMForCausalLM, preset_config


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--output-dir", default="runs/smoke")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threshold", type=float, default=0.5, help="early-exit CDF threshold q for the demo")
    args = p.parse_args(argv)
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    config = preset_config("tiny", vocab_size=64, total_ut_steps=4, entropy_beta=0.05)
    model = LoopLMForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny LoopLM: {n_params:,} parameters, N={config.num_hidden_layers} layers x T={config.total_ut_steps} passes")

    # A periodic sequence: learnable in a few dozen steps.
    period = torch.randint(3, config.vocab_size, (13,))
    data = period.repeat(8)[None, :96].repeat(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        out = model(data, labels=data)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 1 or step % 50 == 0 or step == args.steps:
            per_pass = " ".join(f"{x:.3f}" for x in out.step_losses.tolist())
            print(f"step {step:4d}  stage-I loss {out.loss.item():.4f}  CE per pass [{per_pass}]")
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f}s "
          f"({args.steps * data.numel() / (time.perf_counter() - start):.0f} tokens/s)")

    model.eval()
    with torch.no_grad():
        out = model(data[:1], use_cache=False)
    mean_exit = out.exit_probs[0].mean(0).tolist()
    print("mean exit distribution over passes: [" + " ".join(f"{x:.3f}" for x in mean_exit) + "]")

    folder = Path(args.output_dir) / "model"
    model.save_pretrained(folder)
    reloaded = LoopLMForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        same = torch.equal(reloaded(data[:1], use_cache=False).logits, out.logits)
    print(f"saved to {folder} (Ouro format) and reloaded: logits identical = {same}")

    prompt = data[:1, :20]
    for name, kw in (("full depth", {}), (f"early exit q={args.threshold}", {"exit_threshold": args.threshold})):
        reloaded.model.layer_token_applications = 0
        seq = reloaded.generate(prompt, max_new_tokens=26, do_sample=False, pad_token_id=0, **kw)
        correct = (seq[0, 20:] == data[0, 20:46]).float().mean().item()
        print(f"generate ({name}): {reloaded.model.layer_token_applications} token-layer applications, "
              f"next-token accuracy {correct:.2f}, tokens {seq[0, 20:32].tolist()}...")


if __name__ == "__main__":
    main()
