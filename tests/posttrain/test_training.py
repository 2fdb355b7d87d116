"""Weaver SFT/GRPO and trigger training: the reasoner stays frozen, losses behave, resume is exact."""

import json

import pytest
import torch

from posttrain.data import ProblemError, load_problems
from posttrain.grpo import group_advantages, grpo_loss, mixed_groups
from posttrain.reasoner import ReasonerError
from posttrain.train import run
from posttrain.config import load_config
from runtime.config import ConfigError

REPO_CONFIG = "configs/posttrain_sft.yaml"


def config(reasoner_dir, out, **extra):
    values = {"reasoner.path": str(reasoner_dir), "weaver.num_latents": 2, "weaver.lora_r": 4,
              "train.output_dir": str(out), "train.batch_size": 4, "train.max_steps": 3, "train.lr": 0.003,
              "train.save_every": 100, "train.log_every": 100, "train.max_new_tokens": 4, "augment.max_insertions": 1}
    values.update(extra)
    return load_config(REPO_CONFIG, [f"{k}={v}" for k, v in values.items()])


@pytest.mark.parametrize("latents", ["pause", "none"])
def test_the_lora_sft_controls_train_through_the_same_run(reasoner_dir, tmp_path, latents):
    """`weaver.latents=pause|none` (issue 28's controls): the same command and config but that key; the
    run trains the LoRA (and the pause tokens), never the input map, and the reasoner stays frozen."""
    from dataclasses import asdict

    from helpers.training import flatten
    from posttrain.train import System

    woven = flatten(asdict(config(reasoner_dir, tmp_path / "p")))
    cfg = config(reasoner_dir, tmp_path / "p", **{"weaver.latents": latents})
    control = flatten(asdict(cfg))
    assert {k for k in control if control[k] != woven[k]} == {"weaver.latents"}
    torch.manual_seed(cfg.train.seed)
    start = System(cfg)
    initial, reasoner = start.weaver.state_dict(), start.reasoner.state_dict()
    system = run(cfg)
    after = system.weaver.state_dict()
    changed = {k.split(".")[0] for k in after if not torch.equal(after[k], initial[k])}
    assert changed == ({"lm"} if latents == "none" else {"lm", "proj_out", "queries", "norms", "scales"})
    assert all(torch.equal(v, system.reasoner.state_dict()[k]) for k, v in reasoner.items())
    with pytest.raises(ConfigError, match="train.mode=sft only"):
        config(reasoner_dir, tmp_path / "g", **{"weaver.latents": latents, "train.mode": "grpo"})


def test_sft_trains_the_weaver_and_never_the_reasoner(reasoner_dir, tmp_path):
    from posttrain.train import System, sft_loss

    cfg = config(reasoner_dir, tmp_path / "a")
    system = System(cfg)
    before = {k: v.clone() for k, v in system.reasoner.state_dict().items()}
    params = [p for p in system.weaver.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    batch = load_problems("synthetic:mano", 4)
    losses = []
    for _ in range(8):  # the same small batch: the loss must go down
        loss = sft_loss(system, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    after = system.reasoner.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    reasoner_ids = {id(p) for p in system.reasoner.parameters()}
    assert not any(id(p) in reasoner_ids for p in opt.state)
    assert not any(p.requires_grad for p in system.reasoner.parameters())


def test_grpo_advantage_and_loss_match_a_hand_computation():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    adv = group_advantages(rewards, 4)
    # group 1: mean 0.5, sample std sqrt(1/3); group 2: mean 0.75, std 0.5
    s1, s2 = (1 / 3) ** 0.5, 0.5
    expected = [0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), 0.5 / (s1 + 1e-4),
                0.25 / (s2 + 1e-4), 0.25 / (s2 + 1e-4), -0.75 / (s2 + 1e-4), 0.25 / (s2 + 1e-4)]
    torch.testing.assert_close(adv, torch.tensor(expected))
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.4, 0.4, 0.1]]))
    old = torch.log(torch.tensor([[0.4, 0.2, 0.5], [0.5, 0.5, 0.1]]))
    a = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    total, n = 0.0, 0
    for i in range(2):
        for j in range(3):
            if mask[i, j]:
                r = float(torch.exp(logp[i, j] - old[i, j]))
                total += -min(r * float(a[i]), min(max(r, 0.8), 1.2) * float(a[i]))
                n += 1
    torch.testing.assert_close(grpo_loss(logp, old, a, mask, 0.2), torch.tensor(total / n))
    ref = logp - 0.3
    kl = (torch.exp(ref - logp) - (ref - logp) - 1)
    with_kl = grpo_loss(logp, old, a, mask, 0.2, kl_beta=0.1, logp_ref=ref)
    torch.testing.assert_close(with_kl, torch.tensor(total / n) + 0.1 * (kl * mask).sum() / 5)
    # the groups GRPO learns from: those whose answers differ (group 1 mixed, group 2 mixed, group 3 all right)
    assert mixed_groups(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]), 4) == 1.0
    assert mixed_groups(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]), 2) == pytest.approx(1 / 3)



@pytest.mark.parametrize("mode,kl", [("sft", 0.0), ("grpo", 0.0), ("grpo", 0.1)])
def test_resume_is_exact(reasoner_dir, tmp_path, mode, kl):
    extra = {"train.mode": mode, "train.group_size": 2, "train.batch_size": 2, "train.kl_beta": kl}
    straight = run(config(reasoner_dir, tmp_path / "straight", **{**extra, "train.max_steps": 4}))
    run(config(reasoner_dir, tmp_path / "split", **{**extra, "train.max_steps": 2}))
    resumed = run(config(reasoner_dir, tmp_path / "split", **{**extra, "train.max_steps": 4}))
    a, b = straight.weaver.trainable_state_dict(), resumed.weaver.trainable_state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").open()]
    if mode == "grpo":  # GRPO's diagnostics: the share of groups with a signal (2 groups of 2 per step), the KL
        assert all(r["mixed_groups"] in (0.0, 0.5, 1.0) for r in records)
        assert all(("kl" in r) == bool(kl) for r in records)
        assert records[0].get("kl", 0.0) == pytest.approx(0.0, abs=1e-6)  # the first step's policy is the reference
    saved = sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir())
    assert saved == ["latest", "step_2", "step_4"]
    files = {p.name for p in (tmp_path / "split" / "checkpoints" / "step_4").iterdir()}
    assert files == {"weaver.safetensors", "weaver.json", "optimizer.pt", "trainer_state.json", "rng_rank0.pt",
                     "manifest.json"}


def test_sigterm_saves_at_the_end_of_the_step_and_the_run_resumes_exactly(reasoner_dir, tmp_path):
    """Preemption (runtime.trainer.TrainLoop, shared with pretraining): SIGTERM during step 2 saves
    step 2 and stops; the resumed run ends where an uninterrupted one does."""
    import os
    import signal

    from posttrain.train import PostTrainer

    straight = run(config(reasoner_dir, tmp_path / "straight", **{"train.max_steps": 4}))
    trainer = PostTrainer(config(reasoner_dir, tmp_path / "split", **{"train.max_steps": 4}))
    step = trainer.train_step

    def step_with_sigterm():
        if trainer.state.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return step()

    trainer.train_step = step_with_sigterm
    try:
        assert trainer.train() is False  # stopped early
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert (tmp_path / "split" / "checkpoints" / "latest").read_text() == "step_2"
    resumed = run(config(reasoner_dir, tmp_path / "split", **{"train.max_steps": 4}))
    a, b = straight.weaver.trainable_state_dict(), resumed.weaver.trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_joint_correctness_head_on_grpo_rollouts_resumes_exactly(reasoner_dir, tmp_path):
    from posttrain.correctness import load_head

    extra = {"train.mode": "grpo", "train.group_size": 2, "train.batch_size": 2, "train.joint_head": True}
    straight = run(config(reasoner_dir, tmp_path / "straight", **{**extra, "train.max_steps": 3}))
    run(config(reasoner_dir, tmp_path / "split", **{**extra, "train.max_steps": 2}))
    resumed = run(config(reasoner_dir, tmp_path / "split", **{**extra, "train.max_steps": 3}))
    a, b = straight.head.state_dict(), resumed.head.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all("head_loss" in r and 0 <= r["head_auroc"] <= 1 for r in records)
    head = load_head(tmp_path / "split" / "checkpoints" / "step_3" / "head", 64)
    assert all(torch.equal(head.state_dict()[k], b[k]) for k in b)
    with pytest.raises(ConfigError, match="joint_head"):
        config(reasoner_dir, tmp_path / "x", **{"train.joint_head": True})


def test_learned_trigger_trains_alone(reasoner_dir, tmp_path):
    system = run(config(reasoner_dir, tmp_path / "t", **{"train.mode": "trigger", "trigger.policy": "learned",
                                                          "train.group_size": 2, "train.max_steps": 2,
                                                          "augment.delimiters": "['0','1','2','3','4','5','6','7','8','9']"}))
    records = [json.loads(x) for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all("insertions" in r for r in records)
    assert any(r["insertions"] > 0 for r in records)  # decisions were taken
    assert (tmp_path / "t" / "checkpoints" / "step_2" / "trigger.safetensors").exists()


def test_bad_inputs_are_named(reasoner_dir, tmp_path):
    with pytest.raises(ConfigError, match="reasoner.path"):
        load_config(REPO_CONFIG, ["reasoner.path="])
    with pytest.raises(ConfigError, match="weaver.latents: 'paused'; use woven"):
        load_config(REPO_CONFIG, [f"reasoner.path={reasoner_dir}", "weaver.latents=paused"])
    with pytest.raises(ReasonerError, match="no config.json"):
        run(config(tmp_path, tmp_path / "x"))
    run(config(reasoner_dir, tmp_path / "r", **{"train.max_steps": 1}))
    state = tmp_path / "r" / "checkpoints" / "step_1" / "trainer_state.json"
    state.write_text(json.dumps({"step": 1, "reasoner": "/elsewhere/model"}))
    with pytest.raises(ReasonerError, match="/elsewhere/model"):
        run(config(reasoner_dir, tmp_path / "r", **{"train.max_steps": 2}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "2"}\n')
    with pytest.raises(ProblemError, match="bad.jsonl:1"):
        load_problems(str(bad))
    bad.write_text('{"question": "1+1?"}\n')
    with pytest.raises(ProblemError, match="'question' and 'answer'"):
        load_problems(str(bad))


@pytest.mark.slow
def test_two_ranks_under_the_deepspeed_runner(reasoner_dir, tmp_path):
    """`deepspeed --num_gpus 2 launch/posttrain.sh --config configs/posttrain_sft.yaml ...` trains and saves."""
    import subprocess

    from helpers.training import REPO, deepspeed_cmd

    out = tmp_path / "ddp"
    cmd = deepspeed_cmd(2) + ["launch/posttrain.sh", "--config", REPO_CONFIG, f"reasoner.path={reasoner_dir}",
                              f"train.output_dir={out}", "train.max_steps=2", "train.batch_size=2",
                              "weaver.num_latents=2", "weaver.lora_r=4"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world 2" in proc.stdout
    ckpt = out / "checkpoints" / "step_2"
    assert {"rng_rank0.pt", "rng_rank1.pt", "weaver.safetensors"} <= {p.name for p in ckpt.iterdir()}


@pytest.mark.parametrize("how", ["flipped", "truncated", "latest-missing"])
def test_a_damaged_checkpoint_stops_the_resume_naming_the_file(reasoner_dir, tmp_path, how):
    """The post-training checkpoints carry the same manifest as pretraining's, checked on resume."""
    from runtime.checkpoint import CheckpointError

    run(config(reasoner_dir, tmp_path / "r", **{"train.max_steps": 2, "train.save_every": 1}))
    ckpt = tmp_path / "r" / "checkpoints" / "step_2"
    victim = ckpt / "weaver.safetensors"
    if how == "flipped":
        data = bytearray(victim.read_bytes())
        data[-10] ^= 0x04
        victim.write_bytes(bytes(data))
    elif how == "truncated":
        victim.write_bytes(victim.read_bytes()[:-10])
    else:
        import shutil
        shutil.rmtree(ckpt)
        victim = ckpt
    with pytest.raises(CheckpointError) as err:
        run(config(reasoner_dir, tmp_path / "r", **{"train.max_steps": 3, "train.save_every": 1,
                                                    "train.resume": "auto"}))
    assert str(victim) in str(err.value) and "step_1" in str(err.value)


def test_unscaled_group_advantages_keep_a_small_cost_small():
    """The trigger's reward is exact match minus a cost per insertion: in a group where every answer is
    right, the cost difference must stay a cost, not become a full-size advantage (as std scaling does)."""
    rewards = torch.tensor([1 - 0.01 * 3, 1 - 0.01 * 1, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    unscaled = group_advantages(rewards, 4, scale=False)
    expected = torch.cat([g - g.mean() for g in rewards.view(2, 4)])
    torch.testing.assert_close(unscaled, expected)
    assert unscaled[:4].abs().max() < 0.03 and group_advantages(rewards, 4)[:4].abs().max() > 1.0
