"""`python -m posttrain.head` end to end on a tiny reasoner: completions collected, an 80/20 split by
problem, the head trained, saved and reported; the report recomputed independently from the saved
head on the same completions."""

import json
import random

import torch

from posttrain.head import collect, main
from posttrain.correctness import load_head
from posttrain.augment import AugmentConfig, delimiter_ids
from posttrain.data import load_problems
from posttrain.reasoner import load_reasoner, load_tokenizer
from posttrain.trigger import FixedTrigger


def independent_auroc(probs, labels):
    pos = [p for p, y in zip(probs, labels) if y]
    neg = [p for p, y in zip(probs, labels) if not y]
    if not pos or not neg:
        return 0.5
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def test_the_head_command_trains_saves_and_reports_what_it_saved(reasoner_dir, tmp_path):
    out = tmp_path / "head"
    main(["--reasoner", str(reasoner_dir), "--data", "synthetic:mano", "--problems", "20", "--samples", "2",
          "--steps", "40", "--max-new-tokens", "6", "--output", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert (out / "head.safetensors").is_file() and (out / "head.json").is_file()
    assert report["train"]["n"] + report["valid"]["n"] == 20 * 2

    torch.manual_seed(0)  # the command's completions again, as it collected them
    reasoner, tok = load_reasoner(reasoner_dir), load_tokenizer(reasoner_dir, None)
    problems = load_problems("synthetic:mano", 20)
    augment = AugmentConfig()
    rows = collect(reasoner, None, tok, problems, augment, FixedTrigger("always"), delimiter_ids(tok, augment.delimiters),
                   6, 2, progress=False, draft_tokens=8)
    held_out = set(random.Random(0).sample(range(20), 4))
    head = load_head(out)
    for name, part in (("train", [r for r in rows if r[3] not in held_out]), ("valid", [r for r in rows if r[3] in held_out])):
        assert report[name]["n"] == len(part) == (32 if name == "train" else 8)  # whole problems on each side
        labels = [r[2] for r in part]
        with torch.no_grad():
            probs = torch.sigmoid(head([r[0] for r in part], [r[1] for r in part])).tolist()
        assert report[name]["positive_rate"] == sum(labels) / len(labels)
        assert abs(report[name]["auroc"] - independent_auroc(probs, labels)) < 1e-12
