"""The smoke config through `bash launch/pretrain.sh` with tensor and with sequence parallelism, to
the end: rc 0, the final evaluation included (validation CE per pass and the tasks' accuracy per
exit pass, by greedy generation), and that evaluation equal to one of the exported final model in a
single process."""

import os
import subprocess
import sys

import pytest
import torch

from helpers.training import REPO, free_port, init_single_process, metrics

pytestmark = pytest.mark.slow
PROMPTS = 16


@pytest.mark.parametrize("parallel", ["train.tensor_parallel=2", "train.sequence_parallel=2"])
def test_a_parallel_smoke_job_runs_to_the_end_with_its_final_evaluation(corpus, tmp_path, parallel):
    out = tmp_path / "run"
    overrides = [parallel, "train.max_steps=6", "train.save_every=6", "train.eval_every=0",
                 f"train.eval_max_prompts={PROMPTS}", f"train.output_dir={out}", f"data.default_corpus_dir={corpus}"]
    env = {**os.environ, "GPUS_PER_NODE": "2", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "launch/pretrain.sh", "configs/smoke.yaml", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    final = [r for r in metrics(out) if "accuracy" in r]
    assert len(final) == 1 and final[0]["step"] == 6 and "valid_loss_per_pass" in final[0]

    subprocess.run([sys.executable, "-m", "pretrain.export", "--checkpoint", str(out), "--output", str(out / "hf")], cwd=REPO,
                   check=True, capture_output=True)
    from looplm import LoopLMForCausalLM
    from pretrain.config import load_config
    from pretrain.data import RankBatchSampler, build_loader
    from pretrain.validation import task_accuracy, validation_loss
    from pretrain.train import build_data

    init_single_process()
    model = LoopLMForCausalLM.from_pretrained(out / "hf").eval()
    cfg = load_config(REPO / "configs/smoke.yaml", overrides)
    _, valid, tokenizer, tasks = build_data(cfg, model.config, 0)
    accuracy = task_accuracy(model, tokenizer, tasks, PROMPTS, torch.device("cpu"), sync=False, rank=0, world=1)
    assert accuracy == final[0]["accuracy"]
    # the validation batches the job scored: one data-parallel rank (the model-parallel pair shares them)
    sampler = RankBatchSampler(cfg.train.micro_batch, cfg.train.micro_batch, 0, 1, 0, len(valid))
    chunk = [b for _, b in zip(range(cfg.train.eval_batches), iter(build_loader(valid, sampler)))]
    expected = validation_loss(model, chunk, torch.device("cpu"))
    assert final[0]["valid_loss_per_pass"] == pytest.approx(expected, rel=1e-4)
