"""One job per output folder (runtime/lock.py): a live holder refuses a second job, a killed job's
lock is taken over on its host and refused (with the way out) from another, and the lock goes away
on every exit path a process lives through. End to end: a second training job on a live job's folder
stops at once and changes nothing of the first."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers.training import REPO, base_overrides, free_port, metrics
from runtime import lock
from runtime.lock import LOCK_FILE, OutputLockError

HOLD = "import sys, time; from runtime import lock; lock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)"


def holder(folder):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_refuses_and_a_killed_ones_lock_is_taken_over(tmp_path, capsys):
    proc = holder(tmp_path)
    try:
        with pytest.raises(OutputLockError) as err:
            lock.acquire(tmp_path)
        assert str(tmp_path) in str(err.value) and f"pid {proc.pid}" in str(err.value)
        assert socket.gethostname() in str(err.value)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == proc.pid  # left behind by SIGKILL
    try:
        lock.acquire(tmp_path)
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert f"pid {proc.pid}" in capsys.readouterr().err  # the take-over is reported
    finally:
        lock.release(tmp_path)
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_lock_left_on_another_host_is_refused_with_the_way_out(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "started": "x", "command": "y"}))
    with pytest.raises(OutputLockError, match="node-elsewhere") as err:
        lock.acquire(tmp_path)
    assert f"delete {tmp_path / LOCK_FILE}" in str(err.value)
    assert (tmp_path / LOCK_FILE).exists()  # not ours to remove


@pytest.mark.parametrize("ending", [
    "pass",                                                     # the normal end
    "raise SystemExit(2)",                                      # an input error's exit
    "import os, signal, time; os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)",  # terminated
    "from runtime.distributed import rank_errors\nwith rank_errors():\n    raise RuntimeError('boom')",  # os._exit
])
def test_the_lock_goes_away_on_every_exit_path(tmp_path, ending):
    code = f"import sys\nfrom runtime import lock\nlock.acquire(sys.argv[1])\n{ending}\n"
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, timeout=60)
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_second_job_on_a_live_jobs_folder_stops_at_once(corpus, tmp_path):
    out = tmp_path / "run"
    # the first job runs until it is told to stop: a short one could end (and free the folder) while the
    # second is still starting up on a loaded machine
    args = ["--config", "configs/smoke.yaml", *base_overrides(corpus, out, **{"train.max_steps": 100000})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    first = subprocess.Popen([sys.executable, "-m", "pretrain.train", *args], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while not metrics(out) and first.poll() is None and time.time() < deadline:  # the first job is training
            time.sleep(0.2)
        assert metrics(out) and first.poll() is None, "the first job did not start: " + first.stderr.read()[-2000:]
        config_before = (out / "config.yaml").read_bytes()
        start = time.time()
        second = subprocess.run([sys.executable, "-m", "pretrain.train", *args], cwd=REPO,
                                env={**env, "MASTER_PORT": str(free_port())},
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"train.output_dir {out} is in use by another job" in second.stderr
        assert f"pid {first.pid}" in second.stderr
        assert time.time() - start < 60 and first.poll() is None  # refused while the first still runs
        first.terminate()  # preemption: the first saves at the end of its step and stops
        stdout, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, stderr[-2000:]
    steps = [r["step"] for r in metrics(out) if "loss" in r]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 1  # one job's records, each step once
    assert (out / "config.yaml").read_bytes() == config_before
    assert not (out / LOCK_FILE).exists()
