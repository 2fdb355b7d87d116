"""Checkpoints are verified before they are loaded: a manifest of every file (size + SHA-256), checked
on resume and export; a damaged checkpoint or a `latest` naming a missing one stops with an error
that names the file and the complete checkpoints to use instead, and changes nothing on disk."""

import hashlib
import json
import shutil

import pytest

from helpers.training import base_overrides, run_in_process
from runtime.checkpoint import MANIFEST, STATE_FILE, CheckpointError


@pytest.fixture(scope="module")
def saved(corpus, tmp_path_factory):
    """A 2-step run with a checkpoint after each step (global_step1, global_step2 = latest)."""
    out = tmp_path_factory.mktemp("saved") / "run"
    run_in_process(base_overrides(corpus, out, **{"train.max_steps": 2, "train.save_every": 1, "train.keep_last": 5}))
    return out


@pytest.fixture
def run_dir(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "run")
    return tmp_path / "run"


def tree_digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def resume(corpus, run_dir, steps=3):
    return run_in_process(base_overrides(corpus, run_dir, **{"train.max_steps": steps, "train.save_every": 1,
                                                             "train.keep_last": 5}))


def test_the_manifest_lists_every_file_with_its_digest(saved):
    ckpt = saved / "checkpoints" / "global_step2"
    files = json.loads((ckpt / MANIFEST).read_text())["files"]
    on_disk = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()} - {MANIFEST, STATE_FILE}
    assert set(files) == on_disk and any("optim_states" in f for f in files) and "rng_rank0.pt" in files
    for name, entry in files.items():
        data = (ckpt / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize("damage,says", [(_flip, "checksum"), (_truncate, "bytes"), (lambda p: p.unlink(), "missing")])
@pytest.mark.parametrize("shard", ["model_states", "optim_states", "rng_rank0"])
def test_a_damaged_shard_stops_the_resume_naming_the_file(corpus, run_dir, damage, says, shard):
    ckpt = run_dir / "checkpoints" / "global_step2"
    victim = next(p for p in ckpt.rglob("*") if shard in p.name)
    damage(victim)
    before = tree_digest(run_dir)
    with pytest.raises(CheckpointError) as err:
        resume(corpus, run_dir)
    message = str(err.value)
    assert str(victim) in message and says in message
    assert str(run_dir / "checkpoints" / "global_step1") in message  # the alternative to resume from
    assert tree_digest(run_dir) == before  # nothing written, nothing removed


def test_latest_naming_a_missing_checkpoint_stops_instead_of_falling_back(corpus, run_dir):
    shutil.rmtree(run_dir / "checkpoints" / "global_step2")
    before = tree_digest(run_dir)
    with pytest.raises(CheckpointError, match="global_step2, which is missing") as err:
        resume(corpus, run_dir)
    assert "train.resume=PATH" in str(err.value) and "global_step1" in str(err.value)
    assert tree_digest(run_dir) == before


def test_a_corrupt_trainer_state_is_named(corpus, run_dir):
    state = run_dir / "checkpoints" / "global_step2" / STATE_FILE
    state.write_text(state.read_text()[:20])
    with pytest.raises(CheckpointError, match=str(state)):
        resume(corpus, run_dir)


def test_a_checkpoint_from_before_manifests_still_resumes_with_a_warning(corpus, run_dir, capsys):
    (run_dir / "checkpoints" / "global_step2" / MANIFEST).unlink()
    resume(corpus, run_dir)
    assert "has no manifest.json" in capsys.readouterr().err
    assert (run_dir / "checkpoints" / "global_step3" / MANIFEST).exists()  # new saves have one


def test_export_of_a_damaged_checkpoint_fails_naming_the_file(run_dir, tmp_path, capsys):
    from pretrain.export import main as export_main

    victim = next((run_dir / "checkpoints" / "global_step2").rglob("*model_states.pt"))
    _flip(victim)
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--checkpoint", str(run_dir), "--output", str(tmp_path / "hf")])
    assert exit_info.value.code == 2 and str(victim) in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
