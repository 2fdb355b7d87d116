"""The looped-depth driver: its comparisons vary only what they compare (parameters and FLOPs per token
asserted), its scorer is greedy decoding problem by problem, and its fixed-depth line interpolates."""

import pytest
import torch

from experiments.looped_depth import ARCHS, FULL, QUICK, K, T, interpolate, make_run, score
from helpers.models import tiny_model
from helpers.training import REPO, flatten
from looplm import LoopLMForCausalLM
from pretrain.config import load_config
from pretrain.data import Tokenizer
from pretrain.data.chains import prepare_chains
from pretrain.data.synthetic import read_eval
from pretrain.engine import model_config
from pretrain.metrics import flops_per_token


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("looped_depth")
    prepare_chains(root / "data", seed=0, modulus=7, max_depth=3, train=3000, valid=60, test=120)
    return root, root / "data"


def config(run):
    return load_config(REPO / run.config, run.override_list())


@pytest.mark.parametrize("scale", [QUICK, FULL])
def test_runs_differ_only_in_architecture_objective_lr_seed_and_variant(data, scale):
    root, folder = data
    runs = [make_run(root, folder, scale, arch, lr, seed) for arch in ARCHS for lr in (1e-3, 2e-3) for seed in (1, 2)]
    runs += [make_run(root, folder, scale, f"{K}x{T}", 2e-3, 1, variant) for variant in ("beta0", "stage2")]
    cfgs = [flatten(config(run).to_dict()) for run in runs]
    varied = {"model.overrides.num_hidden_layers", "model.overrides.total_ut_steps", "ouro.objective", "optim.lr",
              "train.seed", "train.output_dir"}
    base = cfgs[0]
    assert {k for cfg in cfgs[:-2] for k in base if cfg[k] != base[k]} <= varied
    beta0 = cfgs[-2]
    same_looped = flatten(config(make_run(root, folder, scale, f"{K}x{T}", 2e-3, 1)).to_dict())
    assert {k for k in beta0 if beta0[k] != same_looped[k]} == {"ouro.beta_schedule", "train.output_dir"}
    stage2 = cfgs[-1]  # gate-only training, initialised from the stage-I run of the same LR and seed
    assert stage2["model.init_from"] == same_looped["train.output_dir"] + "/hf"
    assert stage2["ouro.objective"] == "stage2" and stage2["train.max_steps"] == scale.stage2_steps
    assert len({c["train.output_dir"] for c in cfgs}) == len(cfgs)  # no run overwrites another


def test_iso_parameter_and_iso_flop_twins(data):
    root, folder = data
    models = {}
    for arch in ARCHS:
        with torch.device("meta"):
            models[arch] = LoopLMForCausalLM(model_config(config(make_run(root, folder, QUICK, arch, 2e-3, 1))))
    params = {a: sum(p.numel() for p in m.parameters()) for a, m in models.items()}
    looped, last, base, iso_flop = f"{K}x{T}", f"{K}x{T}_last", f"{K}x1", f"{K * T}x1"
    assert params[looped] == params[last] == params[base] < params[iso_flop]  # looping adds no parameters
    flops = {a: flops_per_token(m.config, 128) for a, m in models.items()}
    c = models[looped].config
    head_reads = 3 * 2 * (c.hidden_size * c.vocab_size + c.hidden_size) * (T - 1)  # LM head + gate after each pass
    assert flops[looped] == pytest.approx(flops[iso_flop] + head_reads)
    assert flops[looped] == pytest.approx(T * flops[base])


@torch.no_grad()
@pytest.mark.parametrize("policy", [{"exit_at_step": 0}, {"exit_at_step": 2}, {"exit_threshold": 0.5},
                                    {"num_steps": 5, "exit_at_step": 4}])
def test_score_is_greedy_decoding_problem_by_problem(data, policy):
    _, folder = data
    tok = Tokenizer(folder / "tokenizer.model")
    model = tiny_model(vocab_size=tok.vocab_size, total_ut_steps=3)
    items = read_eval(folder / "test_chains.jsonl")[:25]
    got = score(model, tok, items, batch=7, **policy)
    for i, (prompt, answer) in enumerate(items):
        ids = tok.encode(prompt)
        out = model(torch.tensor([ids]), use_cache=False, **policy)
        passes = out.exit_steps[0, -1].item() + 1
        for _ in range(4):  # token by token, the full sequence each time: no cache, no padding
            ids = ids + [model(torch.tensor([ids]), use_cache=False, **policy).logits[0, -1].argmax().item()]
        words = tok.decode(ids[len(tok.encode(prompt)):]).split()
        assert got["correct"][i] == int(bool(words) and words[0] == answer), prompt
        assert got["passes"][i] == passes
    if "exit_at_step" in policy:
        assert set(got["passes"]) == {policy["exit_at_step"] + 1}


def test_fixed_depth_line_interpolates_between_neighbouring_depths():
    fixed = [None] * 3
    assert interpolate(fixed, 1.0) == (1, 2, 0.0)
    assert interpolate(fixed, 1.25) == (1, 2, 0.25)
    assert interpolate(fixed, 2.5) == (2, 3, 0.5)
    assert interpolate(fixed, 3.0) == (3, 3, 0.0)


@torch.no_grad()
def test_gate_labels_are_the_stage2_targets_at_the_answer_problem_by_problem(data):
    from experiments.looped_depth import gate_labels
    from pretrain.data.chains import depth_of

    _, folder = data
    tok = Tokenizer(folder / "tokenizer.model")
    models = [(tiny_model(vocab_size=tok.vocab_size, total_ut_steps=3, seed=s), tok) for s in (0, 1)]
    items = read_eval(folder / "eval_chains.jsonl")[:20]
    depths = [depth_of(p) for p, _ in items]
    got = gate_labels(models, items, depths)
    want = {d: {"ce": [], "w": [], "lambda": []} for d in set(depths)}
    for model, _ in models:
        for (prompt, answer), d in zip(items, depths):  # one unpadded problem at a time, the formula of spec 2.3
            ids = tok.encode(f"{prompt} {answer}")
            at = len(tok.encode(prompt)) - 1
            out = model(torch.tensor([ids]), output_step_logits=True, use_cache=False)
            ce = [torch.nn.functional.cross_entropy(lg[0, at], torch.tensor(ids[at + 1])).item() for lg in out.step_logits]
            want[d]["ce"].append(ce)
            want[d]["w"].append([1 / (1 + torch.exp(torch.tensor(-50.0 * (max(a - b, 0) - 0.005))).item())
                                 for a, b in zip(ce, ce[1:])])
            want[d]["lambda"].append(out.gate_probs[0, at].tolist())
    for d, rows in want.items():
        for key, values in rows.items():
            assert got[d][key] == pytest.approx(torch.tensor(values).mean(0).tolist(), abs=1e-5), (d, key)
        assert got[d]["n"] == depths.count(d)
