"""Train a correctness head on the reasoner's (+ weaver's) own completions and report its quality.

    python -m posttrain.head --reasoner runs/smoke/hf [--weaver DIR] --data synthetic:mano \\
        --problems 400 --samples 2 --output runs/head

Completions are generated (greedy, plus `--samples - 1` sampled ones per problem), labelled by exact
answer match, split 80/20 by problem, the head is trained with BCE and its held-out AUROC and
calibration error are printed and saved with it (head.safetensors, head.json, report.json).
"""

import argparse
import json
import random
from pathlib import Path

import torch
from tqdm import tqdm

from pretrain.data.errors import DataError
from runtime.cli import cli_main

from .augment import AugmentConfig, delimiter_ids, generate
from .correctness import CorrectnessHead, auroc, calibration_error, completion_inputs, train_head
from .data import ProblemError, is_correct, load_problems
from .reasoner import ReasonerError, hidden_size, load_reasoner, load_tokenizer
from .trigger import FixedTrigger
from .weaver import load_weaver


DEFAULT_DRAFT = 8  # measured: the accuracy of a whole-answer draft at 0.38x its cost (README)


def collect(reasoner, weaver, tok, problems, augment, trigger, delims, max_new_tokens, samples=1, batch=16,
            pattern=r"####\s*([^\n]+)", progress=True, draft_tokens=None):
    """(hidden, token_stats, label, problem index) for each completion; the label is the whole
    completion's correctness, the inputs read its first `draft_tokens` tokens (None: all)."""
    rows = []
    jobs = [(i, s > 0) for i in range(len(problems)) for s in range(samples)]
    for start in tqdm(range(0, len(jobs), batch), desc="completions", disable=not progress):
        chunk = jobs[start:start + batch]
        for sample in (False, True):
            part = [(i, s) for i, s in chunk if s == sample]
            if not part:
                continue
            prompts = [tok.encode(problems[i].prompt) for i, _ in part]
            with torch.no_grad():
                gen = generate(reasoner, weaver, prompts, augment, trigger, delims, max_new_tokens, tok.eos_id,
                               sample=sample)
                hidden, stats = completion_inputs(reasoner, weaver, prompts, gen.tokens, gen.insertions, augment,
                                                  draft_tokens)
            for (i, _), h, st, toks in zip(part, hidden, stats, gen.tokens):
                rows.append((h, st, int(is_correct(tok.decode(toks), problems[i], pattern)), i))
    return rows


def evaluate_head(head, rows) -> dict:
    with torch.no_grad():
        probs = torch.sigmoid(head([r[0] for r in rows], [r[1] for r in rows]))
    labels = [r[2] for r in rows]
    return {"auroc": auroc(probs, labels), "ece": calibration_error(probs, labels), "n": len(rows),
            "positive_rate": sum(labels) / max(len(labels), 1)}


@cli_main(errors=(ReasonerError, ProblemError, DataError), code=2)
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reasoner", required=True)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--weaver", default=None)
    p.add_argument("--data", required=True, help="GSM8K-format jsonl or synthetic:<task>")
    p.add_argument("--problems", type=int, default=400)
    p.add_argument("--samples", type=int, default=2, help="completions per problem (1 greedy + sampled)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=1000,
                   help="BCE steps; the weights with the best validation AUROC (every 50 steps) are kept")
    p.add_argument("--draft-tokens", type=lambda v: None if v == "all" else int(v), default=DEFAULT_DRAFT,
                   help="the head reads only the first N completion tokens (0: prompt + latents only; 'all': the "
                        "whole completion) and still predicts the whole completion's correctness; Correctness-LTPO "
                        f"then decodes only N tokens per step (default {DEFAULT_DRAFT}: README, Correctness-LTPO's cost)")
    p.add_argument("--max-insertions", type=int, default=5)
    p.add_argument("--delimiters", default=None, help='JSON list of delimiter strings (default [",", ".", "\\n"])')
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    reasoner = load_reasoner(args.reasoner)
    tok = load_tokenizer(args.reasoner, args.tokenizer)
    weaver = load_weaver(reasoner, args.weaver) if args.weaver else None
    augment = AugmentConfig(max_insertions=args.max_insertions)
    if args.delimiters:
        augment.delimiters = json.loads(args.delimiters)
    problems = load_problems(args.data, args.problems)
    rows = collect(reasoner, weaver, tok, problems, augment, FixedTrigger("always"),
                   delimiter_ids(tok, augment.delimiters), args.max_new_tokens, args.samples,
                   draft_tokens=args.draft_tokens)
    held_out = set(random.Random(0).sample(range(len(problems)), len(problems) // 5))
    train = [r for r in rows if r[3] not in held_out]
    valid = [r for r in rows if r[3] in held_out]
    head = CorrectnessHead(hidden_size(reasoner), draft_tokens=args.draft_tokens)
    losses = train_head(head, train, steps=args.steps, valid=valid)
    # "valid" chose the kept weights (best AUROC over evaluations), so it is optimistic; the unbiased
    # figure is on problems the head never saw (experiments/posttrain_word.py evaluates on the test file)
    report = {"train": evaluate_head(head, train), "valid": evaluate_head(head, valid),
              "final_loss": losses[-1], "parameters": sum(p.numel() for p in head.parameters())}
    head.save(args.output)
    Path(args.output, "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
