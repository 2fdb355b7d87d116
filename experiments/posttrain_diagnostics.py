"""The validation diagnostics and the figures of experiments/posttrain_word.py: does each correctness
head (per draft length, and the one trained jointly in GRPO) predict correctness on validation
completions, does the LTPO confidence reward, and does either merely track the completion's length;
the test table with its intervals and trivial baselines."""

import math
from pathlib import Path

import torch


def _pearson(x, y) -> float:
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = (x.norm() * y.norm()).item()
    return (x @ y).item() / denominator if denominator else 0.0


@torch.no_grad()
def validation_diagnostics(reasoner_dir, weaver_dir, heads: dict, valid_file, png: Path) -> dict:
    """{name: head folder} scored on the weaver's validation completions (greedy + 1 sampled per
    problem, the same completions for every head, cut to each head's draft): AUROC, calibration error,
    and the correlation of P(correct) with the completion's length; the same AUROC for the completion
    length itself and for the LTPO confidence reward of the prompt latents (greedy completions)."""
    from posttrain.augment import AugmentConfig, delimiter_ids, score_completions
    from posttrain.correctness import auroc, load_head
    from posttrain.data import load_problems
    from posttrain.head import collect, evaluate_head
    from posttrain.ltpo import LTPOConfig, confidence_reward
    from posttrain.reasoner import hidden_size, load_reasoner, load_tokenizer, prompt_embeds
    from posttrain.trigger import FixedTrigger
    from posttrain.weaver import load_weaver
    from experiments.ouro_plots import _plt, _save

    reasoner, tok = load_reasoner(reasoner_dir), load_tokenizer(reasoner_dir)
    weaver = load_weaver(reasoner, weaver_dir)
    augment, trigger = AugmentConfig(max_insertions=5, delimiters=["\n"]), FixedTrigger("always")
    delims = delimiter_ids(tok, augment.delimiters)
    problems = load_problems(str(valid_file))
    loaded = {name: load_head(folder, hidden_size(reasoner)) for name, folder in heads.items()}
    inputs = {}
    for draft in {None} | {h.draft_tokens for h in loaded.values()}:
        torch.manual_seed(0)  # the same sampled completions for every draft length
        inputs[draft] = collect(reasoner, weaver, tok, problems, augment, trigger, delims, 48, samples=2,
                                draft_tokens=draft, progress=False)
    lengths = [r[1].shape[0] for r in inputs[None]]  # completion tokens (the whole answer's statistics)
    labels = [r[2] for r in inputs[None]]
    report = {"problems": len(problems), "completions": len(labels), "positive_rate": sum(labels) / len(labels),
              "auroc_of_length": auroc(lengths, labels), "heads": {}}
    plt = _plt()
    fig = plt.figure(figsize=(5, 5))
    plt.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
    plt.axhline(report["positive_rate"], color="gray", ls="--", lw=1, label="constant: the positive rate")
    for name, head in loaded.items():
        rows = inputs[head.draft_tokens]
        probs = torch.sigmoid(head([r[0] for r in rows], [r[1] for r in rows]))
        report["heads"][name] = {**evaluate_head(head, rows), "draft_tokens": head.draft_tokens,
                                 "corr_with_length": _pearson(probs, lengths)}
        bins = torch.clamp((probs * 10).long(), max=9)
        label = torch.tensor([float(r[2]) for r in rows])
        xs = [float(probs[bins == b].mean()) for b in range(10) if (bins == b).any()]
        ys = [float(label[bins == b].mean()) for b in range(10) if (bins == b).any()]
        plt.plot(xs, ys, "o-", label=f"{name} (AUROC {report['heads'][name]['auroc']:.2f})")
    plt.xlabel("predicted P(correct)")
    plt.ylabel("fraction correct")
    plt.title(f"correctness heads, {len(problems)} validation problems")
    plt.legend(fontsize=7)
    _save(fig, png)
    # LTPO's reward: the confidence at the prompt latents, against the greedy completion's correctness
    prompts = [tok.encode(p.prompt) for p in problems]
    scores, correct = [], []
    for i in range(0, len(problems), 16):
        embeds, mask = prompt_embeds(reasoner, prompts[i:i + 16])
        cfg = LTPOConfig()
        reward = confidence_reward(reasoner, embeds, mask, cfg.top_k, cfg.confidence)
        scores += reward(weaver(embeds, mask, "prompt")).tolist()
        correct += score_completions(reasoner, weaver, tok, problems[i:i + 16], augment, trigger, delims, 48).correct
    report["ltpo_confidence_auroc"] = auroc(scores, correct)
    return report


def plot_table(results: dict, png: Path) -> None:
    """Test accuracy per row with its interval over seeds and problems, the trivial baselines as lines."""
    test = results.get("test")
    if not test:
        return
    from experiments.ouro_plots import _plt, _save

    plt = _plt()
    rows = [r for r in test["rows"] if "ci95" in r]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    ys = range(len(rows))[::-1]
    for y, r in zip(ys, rows):
        color = "C1" if r["row"] in ("lora", "pause", "more_training") else "C0"
        ax.errorbar(100 * r["accuracy"], y, xerr=[[100 * (r["accuracy"] - r["ci95"][0])],
                                                  [100 * (r["ci95"][1] - r["accuracy"])]], fmt="o", color=color,
                    capsize=3)
    for r, style in zip((r for r in test["rows"] if "ci95" not in r), (":", "--")):
        ax.axvline(100 * r["accuracy"], color="gray", ls=style, lw=1, label=r["setting"])
    ax.set_yticks(list(ys), [r["setting"] for r in rows], fontsize=7)
    ax.set_xlabel(f"test accuracy, % ({test['n_test']} problems, {len(test['seeds'])} seeds; 95% intervals)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_xlim(0, max(5, math.ceil(max(100 * r["ci95"][1] for r in rows) / 10) * 10))
    _save(fig, png)
