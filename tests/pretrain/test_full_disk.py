"""A save on a full disk: one error that says so (where, how much is free), the partial checkpoint
removed, `latest` still naming the last complete checkpoint. The output folder is a 2.5 MB tmpfs
mounted in a user namespace (`unshare -rm`), where one checkpoint of the tiny model fits and a
second does not."""

import os
import subprocess
import sys

import pytest

from helpers.training import REPO, base_overrides, free_port

SHELL = ('mkdir -p "$OUT" && mount -t tmpfs -o size=2500k tmpfs "$OUT" && "$@"; echo "rc=$?"; '
         'ls "$OUT/checkpoints"; echo "latest=$(cat "$OUT/checkpoints/latest")"')


def can_mount() -> bool:
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(sys.platform != "linux" or not can_mount(), reason="needs unshare -rm and tmpfs mounts (Linux)")
def test_a_save_on_a_full_disk_stops_with_the_cause_and_keeps_the_last_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    overrides = base_overrides(corpus, out, **{"train.max_steps": 6, "train.save_every": 2, "train.keep_last": 1})
    cmd = ["unshare", "-rm", "sh", "-c", SHELL, "sh", sys.executable, "-m", "pretrain.train", "--config",
           "configs/smoke.yaml", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())})
    assert "rc=2" in proc.stdout, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(error) == 1, proc.stderr[-3000:]
    assert error[0].startswith(f"error: no space left on the filesystem of {out / 'checkpoints'} while saving "
                               "checkpoint global_step4 (step 4)")
    assert f"`latest` still names {out / 'checkpoints' / 'global_step2'}" in error[0]
    listing = proc.stdout.split("rc=2", 1)[1]
    assert "global_step2" in listing and "global_step4" not in listing  # the partial save is gone
    assert "latest=global_step2" in listing
