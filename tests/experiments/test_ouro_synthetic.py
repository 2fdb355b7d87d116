"""The Ouro reproduction driver: its comparisons vary only what they compare, evaluation problems
never reach the training stream, and its scorer is the mean of the per-problem greedy scorer
(tested against token-by-token greedy decoding in test_looped_depth.py)."""

import dataclasses

import pytest
import torch

from experiments.ouro_synthetic import K, LOOPS, QUICK, plan, prepare_data, score, score_problems
from helpers.training import REPO, flatten
from looplm import LoopLMForCausalLM
from pretrain.config import load_config
from pretrain.data import IndexedDataset, Tokenizer
from pretrain.data.synthetic import read_eval
from pretrain.engine import model_config
from pretrain.metrics import flops_per_token


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ouro")
    return root, prepare_data(root, dataclasses.replace(QUICK, mano_train=3000))


def configs(suite, root, data):
    return {run.name: load_config(REPO / run.config, run.override_list()) for run in plan(suite, QUICK, root, data)}


@pytest.mark.parametrize("suite,varied", [
    ("mano", {"model.overrides.num_hidden_layers", "model.overrides.total_ut_steps", "optim.lr", "train.seed"}),
    ("multihop", {"model.overrides.total_ut_steps", "train.seed"}),
    ("entropy", {"ouro.beta_schedule"}),
])
def test_runs_of_a_comparison_differ_only_in_what_it_compares(data, suite, varied):
    cfgs = {name: flatten(cfg.to_dict()) for name, cfg in configs(suite, *data).items()}
    first = next(iter(cfgs.values()))
    differing = {key for cfg in cfgs.values() for key in first if cfg[key] != first[key]}
    assert differing - {"train.output_dir"} <= varied
    assert len({c["train.output_dir"] for c in cfgs.values()}) == len(cfgs)  # no run overwrites another


def test_iso_parameter_and_iso_flop_baselines(data):
    cfgs = configs("mano", *data)
    arch = {name.split("_")[0]: cfg for name, cfg in cfgs.items()}
    models = {}
    for name, cfg in arch.items():
        with torch.device("meta"):
            models[name] = LoopLMForCausalLM(model_config(cfg))
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    looped, base, iso_flop = f"{K}x{LOOPS}", f"{K}x1", f"{K * LOOPS}x1"
    assert params[looped] == params[base] < params[iso_flop]  # looping adds no parameters
    c = models[looped].config
    d, V = c.hidden_size, c.vocab_size
    flops = {name: flops_per_token(m.config, 128) for name, m in models.items()}
    # Same layer applications per token; the looped model reads the LM head and gate after every pass.
    head_reads = 3 * 2 * (d * V + d) * (LOOPS - 1)
    assert flops[looped] == pytest.approx(flops[iso_flop] + head_reads)
    assert flops[looped] == pytest.approx(LOOPS * flops[base])


def test_evaluation_problems_never_occur_in_the_training_stream(data):
    _, corpora = data
    for task, folder in corpora.items():
        tok = Tokenizer(folder / "tokenizer.model")
        indexed = IndexedDataset(folder / "train")
        documents = {tok.decode(indexed.doc(i).tolist()) for i in range(len(indexed))}
        prompts = {d.rsplit(" ", 1)[0] for d in documents}
        held_out = read_eval(folder / f"eval_{task}.jsonl")
        assert len(held_out) > 50
        assert not [p for p, _ in held_out if p in prompts], task


def test_score_is_the_mean_of_the_per_problem_scores(data):
    from helpers.models import tiny_model

    _, corpora = data
    tok = Tokenizer(corpora["mano"] / "tokenizer.model")
    model = tiny_model(vocab_size=tok.vocab_size)
    items = read_eval(corpora["mano"] / "eval_mano.jsonl")[:30]
    for policy in ({"exit_at_step": 1}, {"exit_threshold": 0.5}):
        per = score_problems(model, tok, items, batch=7, **policy)
        got = score(model, tok, items, batch=11, **policy)
        assert got == {"accuracy": sum(per["correct"]) / 30, "passes": pytest.approx(sum(per["passes"]) / 30), "n": 30}


def test_thinned_curves_keep_the_window_means_and_the_last_step():
    from experiments.ouro_synthetic import thin

    n, passes = 1003, 3
    g = torch.Generator().manual_seed(0)
    loss = torch.rand(n, passes, generator=g, dtype=torch.float64)
    c = {"step": list(range(1, n + 1)), "tokens": [100 * s for s in range(1, n + 1)], "loss_per_pass": loss.tolist(),
         "exit_entropy": loss[:, 0].tolist(), "mean_depth": loss[:, 1].tolist(), "eval_step": [500, 1000],
         "eval_tokens": [1, 2], "eval_accuracy": [{"a": 0.1}, {"a": 0.2}]}
    t = thin(c, points=50)
    assert len(t["step"]) == 50 and t["step"][-1] == n and t["tokens"][-1] == 100 * n
    assert t["eval_accuracy"] == c["eval_accuracy"]
    # the windows tile the steps: each window's mean weighted by its length gives the overall mean
    sizes = torch.tensor([t["step"][0]] + [b - a for a, b in zip(t["step"], t["step"][1:])], dtype=torch.float64)
    assert sizes.sum() == n
    total = (torch.tensor(t["loss_per_pass"], dtype=torch.float64) * sizes[:, None]).sum(0) / n
    torch.testing.assert_close(total, loss.mean(0))
    assert thin(t, points=50) == t  # idempotent
    assert thin(c, points=n) == c
