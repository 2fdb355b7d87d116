"""The launch paths no other test takes: `launch/pretrain.sbatch` as SLURM runs it (ranks started by
srun from environment variables, no DeepSpeed runner; stand-ins for `srun` and `scontrol` start the
tasks on this host), and `make smoke`'s driver on a shortened run."""

import json
import os
import stat
import subprocess
import sys

import pytest

from helpers.training import REPO, base_overrides, free_port, metrics, run_in_process, step_losses

pytestmark = pytest.mark.slow

SRUN = """#!/usr/bin/env bash
# srun's part here: SLURM_NTASKS tasks on this host, task i with SLURM_PROCID=i and SLURM_LOCALID=i
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
exit $rc
"""
SCONTROL = "#!/usr/bin/env bash\necho 127.0.0.1\n"  # `scontrol show hostnames LIST`: the first node


def shim(folder, name, text):
    path = folder / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_the_sbatch_script_trains_like_one_process(corpus, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim(bin_dir, "srun", SRUN)
    shim(bin_dir, "scontrol", SCONTROL)
    shim(bin_dir, "python", f'#!/usr/bin/env bash\nexec {sys.executable} "$@"\n')  # the job's python: this one
    steps = {"train.max_steps": 4, "train.save_every": 4}
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NTASKS": "2",
           "SLURM_JOB_NODELIST": "node[001]", "SLURM_SUBMIT_DIR": str(REPO), "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR"):
        env.pop(key, None)
    out = tmp_path / "slurm"
    proc = subprocess.run(["bash", "launch/pretrain.sbatch", "configs/smoke.yaml",
                           *base_overrides(corpus, out, **steps)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "world 2" in proc.stdout  # two ranks joined one process group
    run_in_process(base_overrides(corpus, tmp_path / "single", **steps))
    single, slurm = step_losses(tmp_path / "single"), step_losses(out)
    assert sorted(slurm) == sorted(single) == [1, 2, 3, 4]
    for step, value in single.items():
        assert slurm[step] == pytest.approx(value, rel=2e-5), step
    assert json.loads((out / "checkpoints" / "global_step4" / "trainer_state.json").read_text())["world_size"] == 2


def test_the_smoke_driver_runs_its_workflow_shortened(tmp_path):
    out, corpus = tmp_path / "smoke", tmp_path / "corpus"
    overrides = ["train.max_steps=6", "train.save_every=100", "train.eval_every=0", "train.eval_max_prompts=8",
                 f"train.output_dir={out}", f"data.default_corpus_dir={corpus}"]
    env = {**os.environ, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pretrain.smoke", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "train.exit_at_step=3" in proc.stdout  # stopped half-way ...
    records = metrics(out)
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # ... and resumed: every step once
    assert (out / "checkpoints" / "global_step3").is_dir() and (out / "checkpoints" / "global_step6").is_dir()
    assert (out / "hf" / "model.safetensors").is_file() and (out / "hf" / "tokenizer.model").is_file()
    last = [r for r in records if "loss" in r][-1]
    summary = proc.stdout.split("== summary", 1)[1]
    assert f"final loss {last['loss']:.4f}" in summary  # the summary reports the run's own records
    assert "generate (full depth)" in summary and "generate (early exit q=0.6)" in summary
    kept = json.loads((out / "summary.json").read_text())  # the same summary as a file (a result file's source)
    assert kept["steps"] == 6 and kept["final_loss"] == last["loss"] and kept["ce_per_pass"] == last["loss_per_pass"]
    assert [row["policy"] for row in kept["generate"]] == ["full depth", "early exit q=0.6"]
    assert kept["generate"][0]["share_of_full_depth"] == 1.0
