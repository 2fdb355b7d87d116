"""Train a correctness head on the reasoner's (+ weaver's) own completions and report its quality.

    python -m posttrain.head --reasoner runs/smoke/hf [--weaver DIR] --data synthetic:mano \\
        --problems 400 --samples 2 --output runs/head
    python -m posttrain.head --config configs/posttrain_grpo.yaml [section.key=value ...] --output runs/head

The settings come from a post-training config (`--config`: the `head:` section, reasoner,
weaver.init_from, augment, data.train, data.answer_pattern) and its overrides; each flag sets one
config key (see --help). Completions are generated (greedy, plus `--samples - 1` sampled ones per
problem), labelled by exact answer match, split 80/20 by problem, the head is trained with BCE and
its held-out AUROC and calibration error are printed and saved with it (head.safetensors, head.json,
report.json).
"""

import argparse
import json
import random
from pathlib import Path

import torch
from tqdm import tqdm

from pretrain.data.errors import DataError
from runtime.cli import cli_main
from runtime.config import ConfigError

from .augment import delimiter_ids, score_completions
from .config import ConfigArguments
from .correctness import CorrectnessHead, auroc, calibration_error, completion_inputs, train_head
from .data import ANSWER_PATTERN, ProblemError, load_problems
from .reasoner import ReasonerError, hidden_size, load_reasoner, load_tokenizer
from .trigger import FixedTrigger
from .weaver import load_weaver


def collect(reasoner, weaver, tok, problems, augment, trigger, delims, max_new_tokens, samples=1, batch=16,
            pattern=ANSWER_PATTERN, progress=True, draft_tokens=None):
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
            with torch.no_grad():
                done = score_completions(reasoner, weaver, tok, [problems[i] for i, _ in part], augment, trigger,
                                         delims, max_new_tokens, pattern, sample=sample)
                hidden, stats = completion_inputs(reasoner, weaver, done.prompts, done.generation.tokens,
                                                  done.generation.insertions, augment, draft_tokens)
            for (i, _), h, st, correct in zip(part, hidden, stats, done.correct):
                rows.append((h, st, int(correct), i))
    return rows


def evaluate_head(head, rows) -> dict:
    with torch.no_grad():
        probs = torch.sigmoid(head([r[0] for r in rows], [r[1] for r in rows]))
    labels = [r[2] for r in rows]
    return {"auroc": auroc(probs, labels), "ece": calibration_error(probs, labels), "n": len(rows),
            "positive_rate": sum(labels) / max(len(labels), 1)}


def arguments(argv=None):
    """(args, config) of the command line: each flag that sets a config key holds its config value."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config = ConfigArguments(p)
    config.add_models(weaver_help="a saved weaver folder")
    config.add("--data", "data.train", help="GSM8K-format jsonl or synthetic:<task>")
    config.add("--problems", "head.problems", type=int)
    config.add("--samples", "head.samples", type=int, help="completions per problem (1 greedy + sampled)")
    config.add("--max-new-tokens", "head.max_new_tokens", type=int)
    config.add("--steps", "head.steps", type=int,
               help="BCE steps; the weights with the best validation AUROC (every 50 steps) are kept")
    config.add("--draft-tokens", "head.draft_tokens", type=lambda v: None if v == "all" else int(v),
               help="the head reads only the first N completion tokens (0: prompt + latents only; 'all': the "
                    "whole completion) and still predicts the whole completion's correctness; Correctness-LTPO "
                    "then decodes only N tokens per step (README, Correctness-LTPO's cost)")
    config.add("--max-insertions", "augment.max_insertions", type=int)
    config.add("--delimiters", "augment.delimiters", type=json.loads, help="JSON list of delimiter strings")
    p.add_argument("--output", required=True)
    return config.parse(argv)


@cli_main(errors=(ConfigError, ReasonerError, ProblemError, DataError), code=2)
def main(argv=None):
    args, cfg = arguments(argv)
    torch.manual_seed(0)
    reasoner = load_reasoner(cfg.reasoner.path)
    tok = load_tokenizer(cfg.reasoner.path, cfg.reasoner.tokenizer)
    weaver = load_weaver(reasoner, cfg.weaver.init_from) if cfg.weaver.init_from else None
    h = cfg.head
    problems = load_problems(cfg.data.train, h.problems)
    rows = collect(reasoner, weaver, tok, problems, cfg.augment, FixedTrigger("always"),
                   delimiter_ids(tok, cfg.augment.delimiters), h.max_new_tokens, h.samples,
                   pattern=cfg.data.answer_pattern, draft_tokens=h.draft_tokens)
    held_out = set(random.Random(0).sample(range(len(problems)), len(problems) // 5))
    train = [r for r in rows if r[3] not in held_out]
    valid = [r for r in rows if r[3] in held_out]
    head = CorrectnessHead(hidden_size(reasoner), draft_tokens=h.draft_tokens)
    losses = train_head(head, train, steps=h.steps, valid=valid)
    # "valid" chose the kept weights (best AUROC over evaluations), so it is optimistic; the unbiased
    # figure is on problems the head never saw (experiments/posttrain_word.py evaluates on the test file)
    report = {"train": evaluate_head(head, train), "valid": evaluate_head(head, valid),
              "final_loss": losses[-1], "parameters": sum(p.numel() for p in head.parameters())}
    head.save(args.output)
    Path(args.output, "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
