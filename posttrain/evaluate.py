"""The evaluation table: vanilla; + weaver (prompt augmentation; prompt + inference augmentation;
with the learned trigger); + weaver after GRPO; + weaver + LTPO; + weaver + Correctness-LTPO; and
Correctness-LTPO with the head trained jointly during GRPO. Rows whose parts are not given are left out.

    python -m posttrain.evaluate --reasoner MODEL_DIR --weaver WEAVER_DIR [--grpo-weaver DIR] \\
        [--trigger CKPT] [--head HEAD_DIR] [--joint-head DIR] \\
        --data ../shared/data/gsm8k/test.jsonl [--limit 100] --output runs/eval_gsm8k
    python -m posttrain.evaluate --config configs/posttrain_grpo.yaml [section.key=value ...] \\
        [--grpo-weaver DIR ...] --output runs/eval

The settings come from a post-training config (`--config`: the `eval:` section, reasoner,
weaver.init_from (the weaver), trigger.init_from (a learned trigger), augment, data.eval,
data.max_eval, data.answer_pattern) and its overrides; each flag sets one config key (see --help).
Greedy batched decoding with a progress bar; answers are extracted with --answer-pattern (default the
number after ####), else the last number, commas/currency/units stripped, and compared with the
reference after ####. LTPO optimises the weaver's prompt latents (or, without a weaver, K copies of a
placeholder token's embedding) per problem with the confidence reward; Correctness-LTPO uses the
head's P(correct) of a greedy draft as reward and stops a problem once it exceeds --stop-at.
Columns: correct / total, accuracy with a 95% percentile-bootstrap interval over problems, mean
insertions, mean LTPO steps, seconds per problem. Writes results.json (the table) and outputs.json
(every problem's completion per row).
"""

import argparse
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from pretrain.data.errors import DataError
from runtime.cli import cli_main
from runtime.config import ConfigError

from .augment import AugmentConfig, delimiter_ids, generate, score_completions
from .config import ConfigArguments, EvalSection
from .correctness import completion_inputs, load_head
from .data import ANSWER_PATTERN, ProblemError, extract_prediction, load_problems
from .ltpo import LTPOConfig, confidence_reward, optimize
from .reasoner import ReasonerError, hidden_size, load_reasoner, load_tokenizer, prompt_embeds
from .trigger import FixedTrigger, LearnedTrigger
from .weaver import WeaverConfig, load_weaver


def correctness_reward(reasoner, weaver, head, prompts, augment, trigger, delims, draft_tokens, eos_id):
    """reward_fn for Correctness-LTPO: P(correct) of the greedy draft of `draft_tokens` tokens decoded
    with the candidate latents; with 0 the head reads prompt + latents and nothing is decoded."""
    def reward(latents):
        tokens, insertions = [[] for _ in prompts], [[] for _ in prompts]
        if draft_tokens:
            gen = generate(reasoner, weaver, prompts, augment, trigger, delims, draft_tokens, eos_id,
                           prompt_latents=latents)
            tokens, insertions = gen.tokens, gen.insertions
        hidden, stats = completion_inputs(reasoner, weaver, prompts, tokens, insertions, augment,
                                          prompt_latents=latents)
        return torch.sigmoid(head(hidden, stats))
    return reward


@dataclass
class Row:
    """One row of the table: which trained parts decode, and how the prompt latents are chosen."""
    key: str
    title: str
    weaver: object = None  # None = the plain reasoner
    trigger: object = field(default_factory=lambda: FixedTrigger("always"))
    prompt_augment: bool = True
    max_insertions: int = 0  # inference insertions per answer (at delimiters)
    ltpo: str | None = None  # None, "confidence" (LTPO) or "correctness" (Correctness-LTPO, needs head)
    head: object = None


def table_rows(weaver=None, grpo_weaver=None, trigger=None, head=None, joint_head=None,
               max_insertions: int = 5) -> list[Row]:
    """Every row the given trained parts make possible, in table order. The LTPO rows start from the
    final weaver (after GRPO when there is one); the joint-head row uses the GRPO weaver and the head
    trained with it."""
    M, final = max_insertions, grpo_weaver or weaver
    rows = [Row("vanilla", "Vanilla")]
    if weaver is not None and weaver.config.latents != "woven":  # a LoRA SFT control: decoded as trained
        if any(part is not None for part in (grpo_weaver, trigger, head, joint_head)):
            raise ReasonerError(f"the weaver is a LoRA SFT control (latents: {weaver.config.latents}); it has only "
                                "its own row: give it without --grpo-weaver, --trigger, --head or --joint-head")
        inserted = "pause tokens" if weaver.config.latents == "pause" else "nothing inserted"
        return rows + [Row("weaver", f"LoRA SFT control ({inserted})", weaver, max_insertions=M)]
    if weaver is not None:
        rows += [Row("weaver_prompt", "+ Weaver (prompt augmentation)", weaver),
                 Row("weaver", f"+ Weaver (prompt + inference augmentation, <= {M})", weaver, max_insertions=M)]
    if weaver is not None and trigger is not None:
        rows.append(Row("trigger", "+ Weaver, learned trigger", weaver, trigger, max_insertions=M))
    if grpo_weaver is not None:
        rows.append(Row("grpo", "+ Weaver after GRPO", grpo_weaver, max_insertions=M))
    if final is not None:
        rows.append(Row("ltpo", "+ Weaver + LTPO", final, max_insertions=M, ltpo="confidence"))
    else:
        rows.append(Row("ltpo", "+ LTPO (placeholder latents)", ltpo="confidence"))
    if head is not None:
        rows.append(Row("correctness_ltpo", "+ Weaver + Correctness-LTPO" if final is not None else "+ Correctness-LTPO",
                        final, max_insertions=M if final is not None else 0, ltpo="correctness", head=head))
    if joint_head is not None and grpo_weaver is not None:
        rows.append(Row("joint_correctness_ltpo", "+ Weaver + Correctness-LTPO, head trained jointly in GRPO",
                        grpo_weaver, max_insertions=M, ltpo="correctness", head=joint_head))
    return rows


ROW_KEYS = ("vanilla", "weaver_prompt", "weaver", "trigger", "grpo", "ltpo", "correctness_ltpo",
            "joint_correctness_ltpo")


class Evaluator:
    """Decodes problems for a Row: greedy, batched, with the row's latents, trigger and LTPO."""

    def __init__(self, reasoner, tok, max_new_tokens=EvalSection.max_new_tokens, ltpo=None,
                 stop_at=EvalSection.stop_at, num_latents=WeaverConfig.num_latents, pattern=ANSWER_PATTERN,
                 draft_tokens=None, delimiters=None):
        self.reasoner, self.tok = reasoner, tok
        self.delimiters = delimiters or AugmentConfig().delimiters
        self.delims = delimiter_ids(tok, self.delimiters)
        self.max_new_tokens, self.pattern = max_new_tokens, pattern
        self.draft_tokens = draft_tokens  # None: the head's own draft length (its training), else all
        self.ltpo = ltpo or LTPOConfig()
        self.stop_at = stop_at
        self.num_latents = num_latents  # placeholder latents when LTPO runs without a weaver

    def _initial_latents(self, weaver, embeds, mask):
        if weaver is not None:
            return weaver(embeds, mask, "prompt")
        placeholder = self.reasoner.get_input_embeddings().weight[self.tok.eos_id]
        return placeholder.expand(embeds.shape[0], self.num_latents, -1).clone()

    @torch.no_grad()
    def run_batch(self, problems, row: Row):
        latents, steps = None, [0] * len(problems)
        augment = AugmentConfig(row.prompt_augment and row.weaver is not None, row.max_insertions, self.delimiters)
        if row.ltpo is not None:
            prompts = [self.tok.encode(p.prompt) for p in problems]
            embeds, mask = prompt_embeds(self.reasoner, prompts)
            start = self._initial_latents(row.weaver, embeds, mask)
            if row.ltpo == "confidence":
                reward = confidence_reward(self.reasoner, embeds, mask, self.ltpo.top_k, self.ltpo.confidence)
                cfg = self.ltpo
            else:
                draft = next(n for n in (self.draft_tokens, row.head.draft_tokens, self.max_new_tokens)
                             if n is not None)
                reward = correctness_reward(self.reasoner, row.weaver, row.head, prompts, augment, row.trigger,
                                            self.delims, draft, self.tok.eos_id)
                cfg = replace(self.ltpo, stop_at=self.stop_at)
            result = optimize(start, reward, cfg, generator=torch.Generator().manual_seed(0))
            latents, steps = result.latents, result.steps.tolist()
        done = score_completions(self.reasoner, row.weaver, self.tok, problems, augment, row.trigger, self.delims,
                                 self.max_new_tokens, self.pattern, prompt_latents=latents)
        return [{"completion": text, "prediction": extract_prediction(text, self.pattern) if not p.one_word
                 else (text.split() or [""])[0], "reference": p.answer, "correct": correct,
                 "ltpo_steps": s, "insertions": len(ins)}
                for text, correct, p, s, ins in zip(done.texts, done.correct, problems, steps,
                                                    done.generation.insertions)]


def bootstrap_interval(correct: list, level: float = 0.95, resamples: int = 2000, seed: int = 0,
                       baseline: list | None = None) -> tuple:
    """Percentile bootstrap interval of the accuracy, resampling problems with replacement; with
    `baseline` (the same problems' results of another row), of the paired difference correct - baseline."""
    if not correct:
        return (0.0, 0.0)
    values = torch.tensor([float(c) for c in correct])
    if baseline is not None:
        values = values - torch.tensor([float(c) for c in baseline])
    idx = torch.randint(len(values), (resamples, len(values)), generator=torch.Generator().manual_seed(seed))
    means = values[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2])).tolist()
    return (lo, hi)


def evaluate(evaluator: Evaluator, problems, rows: list[Row], batch: int = 8, progress: bool = True):
    """(table, outputs): one table entry per row, and every problem's completion per row key."""
    table, outputs = [], {}
    for row in rows:
        start, results = time.perf_counter(), []
        for i in tqdm(range(0, len(problems), batch), desc=row.title, disable=not progress):
            results += evaluator.run_batch(problems[i:i + batch], row)
        seconds = time.perf_counter() - start
        n = max(len(results), 1)
        correct = [r["correct"] for r in results]
        table.append({"row": row.key, "setting": row.title, "correct": sum(correct), "total": len(results),
                      "accuracy": sum(correct) / n, "ci95": list(bootstrap_interval(correct)),
                      "avg_insertions": sum(r["insertions"] for r in results) / n,
                      "avg_ltpo_steps": sum(r["ltpo_steps"] for r in results) / n,
                      "seconds_per_problem": seconds / n})
        outputs[row.key] = [{"prompt": p.prompt, **r} for p, r in zip(problems, results)]
        if "vanilla" in outputs:  # the gain over the plain reasoner on the same problems
            base = [r["correct"] for r in outputs["vanilla"]]
            table[-1]["vs_vanilla"] = (sum(correct) - sum(base)) / n
            table[-1]["vs_vanilla_ci95"] = list(bootstrap_interval(correct, baseline=base))
    return table, outputs


def format_table(table) -> str:
    """Markdown; the paired gain over vanilla (same problems) where the table has a vanilla row."""
    paired = any("vs_vanilla" in r for r in table)
    lines = ["| setting | correct | accuracy [95% CI] |" + (" vs vanilla, paired [95% CI] |" if paired else "")
             + " mean insertions | mean LTPO steps | s / problem |", "|---|---|---|" + "---|" * paired + "---|---|---|"]
    for r in table:
        gain = (f" {100 * r['vs_vanilla']:+.1f} pt [{100 * r['vs_vanilla_ci95'][0]:+.1f}, "
                f"{100 * r['vs_vanilla_ci95'][1]:+.1f}] |" if "vs_vanilla" in r else " |" if paired else "")
        lines.append(f"| {r['setting']} | {r['correct']} / {r['total']} | {r['accuracy']:.1%} "
                     f"[{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}] |{gain} {r['avg_insertions']:.2f} | "
                     f"{r['avg_ltpo_steps']:.1f} | {r['seconds_per_problem']:.3f} |")
    return "\n".join(lines)


def arguments(argv=None):
    """(args, config) of the command line: each flag that sets a config key holds its config value."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config = ConfigArguments(p)
    config.add_models(weaver_help="the SFT weaver (a saved weaver folder)")
    p.add_argument("--grpo-weaver", default=None, help="the weaver after GRPO")
    config.add("--trigger", "trigger.init_from",
               help="a learned trigger: a posttrain checkpoint with trigger.safetensors")
    p.add_argument("--head", default=None, help="a correctness head trained by posttrain.head")
    p.add_argument("--joint-head", default=None, help="the head trained jointly during GRPO (train.joint_head)")
    config.add("--data", "data.eval", help="GSM8K-format jsonl, or synthetic:<task> (its held-out split)")
    config.add("--limit", "data.max_eval", type=int)
    config.add("--batch", "eval.batch", type=int)
    config.add("--max-new-tokens", "eval.max_new_tokens", type=int)
    config.add("--draft-tokens", "eval.draft_tokens", type=int,
               help="Correctness-LTPO draft length (unset: the head's own, set when it was trained with posttrain.head "
                    "--draft-tokens; else the whole answer); 0 = no draft")
    config.add("--max-insertions", "augment.max_insertions", type=int)
    config.add("--delimiters", "augment.delimiters", type=json.loads, help="JSON list of delimiter strings")
    config.add("--ltpo-steps", "eval.ltpo.steps", type=int)
    config.add("--ltpo-lr", "eval.ltpo.lr", type=float)
    config.add("--ltpo-sigma", "eval.ltpo.sigma", type=float)
    config.add("--stop-at", "eval.stop_at", type=float)
    config.add("--confidence", "eval.ltpo.confidence", choices=["neg_logprob", "probability"],
               help="LTPO reward: the paper's -mean log p of the top-k tokens, or their mean probability")
    config.add("--answer-pattern", "data.answer_pattern")
    p.add_argument("--rows", default=None, help="comma-separated row keys (default: every row the given parts allow)")
    p.add_argument("--output", required=True)
    return config.parse(argv)


@cli_main(errors=(ConfigError, ReasonerError, ProblemError, DataError), code=2)
def main(argv=None):
    args, cfg = arguments(argv)
    if not cfg.data.eval:
        raise ConfigError("the problems to evaluate are required: --data or config key data.eval")
    reasoner = load_reasoner(cfg.reasoner.path)
    tok = load_tokenizer(cfg.reasoner.path, cfg.reasoner.tokenizer)
    d = hidden_size(reasoner)
    trigger = None
    if cfg.trigger.init_from:
        trigger = LearnedTrigger(d, sample=False)  # greedy decisions at evaluation
        trigger.load_state_dict(load_file(Path(cfg.trigger.init_from) / "trigger.safetensors"))
    rows = table_rows(load_weaver(reasoner, cfg.weaver.init_from) if cfg.weaver.init_from else None,
                      load_weaver(reasoner, args.grpo_weaver) if args.grpo_weaver else None, trigger,
                      load_head(args.head, d) if args.head else None,
                      load_head(args.joint_head, d) if args.joint_head else None, cfg.augment.max_insertions)
    for part, needs in (("trigger", "weaver"), ("joint_head", "grpo_weaver")):  # args: flags or config values
        if getattr(args, part) and not getattr(args, needs):
            raise SystemExit(f"error: --{part.replace('_', '-')} is used with --{needs.replace('_', '-')}; give both")
    if args.rows:
        wanted = args.rows.split(",")
        unknown = [k for k in wanted if k not in ROW_KEYS]
        if unknown:
            raise SystemExit(f"error: unknown --rows {unknown}; choose from {list(ROW_KEYS)}")
        missing = [k for k in wanted if k not in {r.key for r in rows}]
        if missing:
            raise SystemExit(f"error: --rows {missing} need parts that were not given (rows possible with these "
                             f"arguments: {[r.key for r in rows]}; the weaver rows need --weaver, grpo --grpo-weaver, "
                             "trigger --trigger, correctness_ltpo --head, joint_correctness_ltpo --joint-head)")
        rows = [r for r in rows if r.key in wanted]
    split = "eval" if cfg.data.eval.startswith("synthetic:") else "train"
    problems = load_problems(cfg.data.eval, cfg.data.max_eval, split=split)
    weavers = [r.weaver for r in rows if r.weaver is not None]
    evaluator = Evaluator(reasoner, tok, cfg.eval.max_new_tokens, cfg.eval.ltpo, cfg.eval.stop_at,
                          weavers[0].config.num_latents if weavers else cfg.weaver.num_latents, cfg.data.answer_pattern,
                          cfg.eval.draft_tokens, cfg.augment.delimiters)
    torch.manual_seed(0)
    table, outputs = evaluate(evaluator, problems, rows, cfg.eval.batch)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**vars(args), "table": table}, indent=2))
    (out / "outputs.json").write_text(json.dumps(outputs, indent=1))
    print(format_table(table))


if __name__ == "__main__":
    main()
