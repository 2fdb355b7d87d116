"""Run configs: overrides, types, unknown keys, batch arithmetic, the derived DeepSpeed config."""

import socket

import pytest

from pretrain.config import ConfigError, deepspeed_config, load_config, validate
from runtime.launch import runner_flags

CONFIGS = ["configs/smoke.yaml", "configs/ouro_1p4b.yaml", "configs/ouro_2p6b.yaml"]


@pytest.mark.parametrize("path", CONFIGS)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.train.global_batch % cfg.train.micro_batch == 0


def test_overrides_are_typed_from_yaml():
    cfg = load_config("configs/smoke.yaml", ["train.max_steps=7", "optim.lr=1e-3", "ouro.beta_schedule=[[0, 0.2]]",
                                             "model.overrides.total_ut_steps=2"])
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 0.001
    assert cfg.ouro.beta_schedule == [[0, 0.2]] and cfg.model.overrides["total_ut_steps"] == 2


@pytest.mark.parametrize("override,match", [
    ("train.max_stepz=3", "train.max_stepz"),
    ("trian.max_steps=3", "trian"),
    ("train.max_steps=many", "train.max_steps: expected int"),
    ("train.bf16=3", "train.bf16: expected bool"),
    ("train.zero_stage=5", "train.zero_stage"),
    ("optim.schedule=linear", "optim.schedule"),
    ("model.overrides.hidden_sise=8", "model.overrides.hidden_sise"),
    ("model.overrides.kv_sharing=first", "kv_sharing"),
    ("deepspeed.train_batch_size=4", "deepspeed.train_batch_size"),
    ("train.resume=/no/such/checkpoint", "train.resume"),
    ("train", "section.key=value"),
])
def test_bad_configs_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("configs/smoke.yaml", [override])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_batch_arithmetic_against_the_world_size():
    cfg = load_config("configs/smoke.yaml", ["train.global_batch=12", "train.micro_batch=4"])
    validate(cfg, world_size=3)
    with pytest.raises(ConfigError, match="train.global_batch"):
        validate(cfg, world_size=2)


def test_deepspeed_config_is_derived():
    cfg = load_config("configs/smoke.yaml", ["train.zero_stage=3", "train.micro_batch=4",
                                             "deepspeed.zero_optimization={overlap_comm: true}"])
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert deepspeed_config(cfg, 2, load_universal=True)["checkpoint"] == {"load_universal": True}


def test_runner_flags_from_config_and_environment(tmp_path):
    cfg = load_config("configs/smoke.yaml")
    first, second = runner_flags(cfg, env={}), runner_flags(cfg, env={})
    assert first[:3] == ["--num_gpus", "2", "--master_port"] and first[3] != second[3]  # free, so never shared
    for port in (first[3], second[3]):  # and really free: it can be bound
        with socket.socket() as s:
            s.bind(("127.0.0.1", int(port)))
    assert runner_flags(load_config("configs/smoke.yaml", ["launch.master_port=7000"]), env={})[3] == "7000"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    env = {"HOSTFILE": str(hostfile), "NUM_NODES": "2", "GPUS_PER_NODE": "8", "MASTER_ADDR": "node1",
           "MASTER_PORT": "6000"}
    assert runner_flags(cfg, env) == ["--hostfile", str(hostfile), "--num_nodes", "2", "--num_gpus", "8",
                                      "--master_addr", "node1", "--master_port", "6000"]
    del env["MASTER_PORT"]
    assert runner_flags(cfg, env)[-1] == "29500"  # across nodes every node must know the port
    with pytest.raises(ConfigError, match="hostfile"):
        runner_flags(cfg, {"HOSTFILE": str(tmp_path / "missing")})


def test_the_launcher_stops_on_a_config_error_before_any_rank_starts():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(["bash", "launch/pretrain.sh", "configs/smoke.yaml", "train.no_such_key=1"], cwd=repo,
                          capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin",
                                                                            "PYTHON": sys.executable})
    assert proc.returncode == 2
    assert proc.stderr.count("train.no_such_key") == 1 and "deepspeed" not in proc.stderr  # no runner started
