"""The GSM8K evaluation table: vanilla / + weaver / + weaver + LTPO / + weaver + Correctness-LTPO.

    python -m posttrain.evaluate --reasoner MODEL_DIR --weaver WEAVER_DIR --head HEAD_DIR \\
        --data ../shared/data/gsm8k/test.jsonl [--limit 100] --output runs/eval_gsm8k

Greedy batched decoding with a progress bar; answers are extracted with --answer-pattern (default the
number after ####), else the last number, commas/currency/units stripped, and compared with the
reference after ####. LTPO optimises the weaver's prompt latents (or, without a weaver, K copies of a
placeholder token's embedding) per problem with the confidence reward; Correctness-LTPO uses the
head's P(correct) of a greedy draft as reward and stops a problem once it exceeds --stop-at.
Writes results.json (the table) and outputs.json (every problem's completion per row).
"""

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from .augment import AugmentConfig, batch_splices, delimiter_ids, generate, splice
from .correctness import head_inputs, load_head
from .data import extract_prediction, is_correct, load_problems
from .ltpo import LTPOConfig, confidence_reward, optimize, prompt_embeds
from .reasoner import hidden_size, load_reasoner, load_tokenizer
from .trigger import FixedTrigger
from .weaver import load_weaver


def correctness_reward(reasoner, weaver, head, prompts, augment, trigger, delims, max_new_tokens, eos_id):
    """reward_fn for Correctness-LTPO: P(correct) of the greedy draft decoded with the candidate latents."""
    def reward(latents):
        gen = generate(reasoner, weaver, prompts, augment, trigger, delims, max_new_tokens, eos_id,
                       prompt_latents=latents)
        examples = [splice(reasoner, weaver, p, t, ins, augment, prompt_latents=latents[i:i + 1])
                    for i, (p, t, ins) in enumerate(zip(prompts, gen.tokens, gen.insertions))]
        hidden, stats = head_inputs(reasoner, *batch_splices(examples))
        return torch.sigmoid(head(hidden, stats))
    return reward


class Evaluator:
    def __init__(self, reasoner, tok, weaver=None, head=None, augment=None, max_new_tokens=256,
                 ltpo=None, stop_at=0.95, num_latents=8, pattern=r"####\s*([^\n]+)", draft_tokens=None):
        self.reasoner, self.tok, self.weaver, self.head = reasoner, tok, weaver, head
        self.augment = augment or AugmentConfig()
        self.delims = delimiter_ids(tok, self.augment.delimiters)
        self.trigger = FixedTrigger("always")
        self.max_new_tokens, self.pattern = max_new_tokens, pattern
        self.draft_tokens = draft_tokens or max_new_tokens
        self.ltpo = ltpo or LTPOConfig()
        self.stop_at = stop_at
        self.num_latents = weaver.config.num_latents if weaver is not None else num_latents

    def _initial_latents(self, embeds, mask):
        if self.weaver is not None:
            return self.weaver(embeds, mask, "prompt")
        placeholder = self.reasoner.get_input_embeddings().weight[self.tok.eos_id]
        return placeholder.expand(embeds.shape[0], self.num_latents, -1).clone()

    @torch.no_grad()
    def run_batch(self, problems, row: str):
        prompts = [self.tok.encode(p.prompt) for p in problems]
        latents, steps = None, [0] * len(problems)
        weaver = None if row == "vanilla" else self.weaver
        augment = self.augment if weaver is not None else replace(self.augment, prompt_augment=False)
        if row in ("ltpo", "correctness_ltpo"):
            embeds, mask = prompt_embeds(self.reasoner, prompts)
            start = self._initial_latents(embeds, mask)
            if row == "ltpo":
                reward = confidence_reward(self.reasoner, embeds, mask, self.ltpo.top_k, self.ltpo.confidence)
                cfg = self.ltpo
            else:
                reward = correctness_reward(self.reasoner, weaver, self.head, prompts, augment, self.trigger,
                                            self.delims, self.draft_tokens, self.tok.eos_id)
                cfg = replace(self.ltpo, stop_at=self.stop_at)
            result = optimize(start, reward, cfg, generator=torch.Generator().manual_seed(0))
            latents, steps = result.latents, result.steps.tolist()
        gen = generate(self.reasoner, weaver, prompts, augment, self.trigger, self.delims, self.max_new_tokens,
                       self.tok.eos_id, prompt_latents=latents)
        texts = [self.tok.decode(t) for t in gen.tokens]
        return [{"completion": text, "prediction": extract_prediction(text, self.pattern) if not p.one_word
                 else (text.split() or [""])[0], "reference": p.answer, "correct": is_correct(text, p, self.pattern),
                 "ltpo_steps": s} for text, p, s in zip(texts, problems, steps)]


ROWS = {"vanilla": "Vanilla", "weaver": "+ Weaver", "ltpo": "+ Weaver + LTPO",
        "correctness_ltpo": "+ Weaver + Correctness-LTPO"}


def evaluate(evaluator: Evaluator, problems, rows, batch: int = 8, progress: bool = True) -> tuple[list, dict]:
    table, outputs = [], {}
    for row in rows:
        start, results = time.perf_counter(), []
        for i in tqdm(range(0, len(problems), batch), desc=ROWS[row], disable=not progress):
            results += evaluator.run_batch(problems[i:i + batch], row)
        seconds = time.perf_counter() - start
        correct = sum(r["correct"] for r in results)
        name = ROWS[row] if evaluator.weaver is not None else ROWS[row].replace("+ Weaver + ", "+ ")
        table.append({"setting": name, "correct": correct, "total": len(results),
                      "accuracy": correct / max(len(results), 1),
                      "avg_ltpo_steps": sum(r["ltpo_steps"] for r in results) / max(len(results), 1),
                      "seconds_per_problem": seconds / max(len(results), 1)})
        outputs[row] = [{"prompt": p.prompt, **r} for p, r in zip(problems, results)]
    return table, outputs


def format_table(table) -> str:
    lines = ["| setting | correct | accuracy | avg LTPO steps | s / problem |", "|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['correct']} / {r['total']} | {r['accuracy']:.2%} | {r['avg_ltpo_steps']:.1f} | "
              f"{r['seconds_per_problem']:.3f} |" for r in table]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reasoner", required=True)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--weaver", default=None)
    p.add_argument("--head", default=None)
    p.add_argument("--data", required=True, help="GSM8K-format jsonl, or synthetic:<task> (its held-out split)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--draft-tokens", type=int, default=None, help="Correctness-LTPO draft length (default: all)")
    p.add_argument("--max-insertions", type=int, default=5)
    p.add_argument("--ltpo-steps", type=int, default=10)
    p.add_argument("--ltpo-lr", type=float, default=0.03)
    p.add_argument("--ltpo-sigma", type=float, default=0.1)
    p.add_argument("--stop-at", type=float, default=0.95)
    p.add_argument("--confidence", default="neg_logprob", choices=["neg_logprob", "probability"],
                   help="LTPO reward: the paper's -mean log p of the top-k tokens, or their mean probability")
    p.add_argument("--answer-pattern", default=r"####\s*([^\n]+)")
    p.add_argument("--rows", default="vanilla,weaver,ltpo,correctness_ltpo")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"error: unknown --rows {unknown}; choose from {list(ROWS)}")
    reasoner = load_reasoner(args.reasoner)
    tok = load_tokenizer(args.reasoner, args.tokenizer)
    weaver = load_weaver(reasoner, args.weaver) if args.weaver else None
    head = load_head(args.head, hidden_size(reasoner)) if args.head else None
    if "weaver" in rows and weaver is None:
        print("note: no --weaver given: the + Weaver row is left out; LTPO starts from placeholder latents",
              flush=True)
        rows.remove("weaver")
    if "correctness_ltpo" in rows and head is None:
        print("note: no --head given: the Correctness-LTPO row is left out", flush=True)
        rows.remove("correctness_ltpo")
    split = "eval" if args.data.startswith("synthetic:") else "train"
    problems = load_problems(args.data, args.limit, split=split)
    evaluator = Evaluator(reasoner, tok, weaver, head, AugmentConfig(max_insertions=args.max_insertions),
                          args.max_new_tokens, LTPOConfig(lr=args.ltpo_lr, sigma=args.ltpo_sigma, steps=args.ltpo_steps,
                                     confidence=args.confidence),
                          args.stop_at, pattern=args.answer_pattern, draft_tokens=args.draft_tokens)
    torch.manual_seed(0)
    table, outputs = evaluate(evaluator, problems, rows, args.batch)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"data": args.data, "reasoner": args.reasoner, "weaver": args.weaver,
                                                  "head": args.head, "table": table}, indent=2))
    (out / "outputs.json").write_text(json.dumps(outputs, indent=1))
    print(format_table(table))


if __name__ == "__main__":
    main()
