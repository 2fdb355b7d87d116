"""A battery of malformed inputs through the real command-line entry points (config, data,
checkpoint, export, training, post-training). Each case asserts the exit code, that the message
names the problem, and that no input or earlier output changed (checksums before and after)."""

import hashlib
import shutil
from pathlib import Path

import pytest

from helpers.data import corpus as texts, sp_tokenizer, write_jsonl
from helpers.training import REPO, base_overrides, run_in_process
from pretrain.data import ingest


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(corpus, tmp_path_factory):
    """Inputs and earlier outputs the cases misuse: a config, a data set, a tokenizer, a trained run
    with checkpoints at steps 1 and 2, and its export."""
    root = tmp_path_factory.mktemp("world")
    tok = sp_tokenizer(root)
    write_jsonl(root / "docs.jsonl", texts(40))
    ingest([str(root / "docs.jsonl")], tok, root / "ds", progress=False)
    run_in_process(base_overrides(corpus, root / "run", **{"train.max_steps": 2, "train.save_every": 1,
                                                           "train.keep_last": 5}))
    from pretrain.export import export
    export(root / "run", root / "hf")
    (root / "bad.yaml").write_text("train: [unclosed\n")
    (root / "unknown_section.yaml").write_text("trian:\n  max_steps: 3\n")
    return root


def cli(module: str):
    import importlib
    return importlib.import_module(module).main


CFG = str(REPO / "configs" / "smoke.yaml")
FLAGS = "runtime.launch"  # load_config + validate, exactly what the launcher checks before any rank starts
PRE = ["flags", "pretrain"]

# (id, entry point, argv with {w} = the world folder, exit code, words the message must contain)
CASES = [
    ("unknown-key", FLAGS, [*PRE, CFG, "train.bogus=1"], 2, ["train.bogus"]),
    ("wrong-type", FLAGS, [*PRE, CFG, "train.max_steps=abc"], 2, ["train.max_steps", "int"]),
    ("empty-key", FLAGS, [*PRE, CFG, "=5"], 2, ["empty key", "'=5'"]),
    ("empty-key-part", FLAGS, [*PRE, CFG, "train..max_steps=5"], 2, ["empty key"]),
    ("no-equals", FLAGS, [*PRE, CFG, "train.max_steps"], 2, ["section.key=value"]),
    ("bad-yaml-value", FLAGS, [*PRE, CFG, "train.max_steps=[1"], 2, ["train.max_steps", "YAML"]),
    ("zero-stage", FLAGS, [*PRE, CFG, "train.zero_stage=5"], 2, ["train.zero_stage"]),
    ("schedule", FLAGS, [*PRE, CFG, "optim.schedule=linear"], 2, ["optim.schedule", "linear"]),
    ("seq-len-over-positions", FLAGS, [*PRE, CFG, "data.seq_len=100000"], 2, ["data.seq_len", "max_position_embeddings"]),
    ("verify-mode", FLAGS, [*PRE, CFG, "data.verify=maybe"], 2, ["data.verify", "maybe"]),
    ("verify-blocks", FLAGS, [*PRE, CFG, "data.verify_blocks=1"], 2, ["data.verify_blocks"]),
    ("valid-blend-and-fraction", FLAGS, [*PRE, CFG, "data.blend=data/x/train", "data.valid_blend=data/x/valid"], 2,
     ["data.valid_fraction", "data.valid_blend", "set data.valid_fraction: 0"]),
    ("valid-blend-no-blend", FLAGS, [*PRE, CFG, "data.valid_blend=data/x/valid", "data.valid_fraction=0"], 2,
     ["data.valid_blend", "needs data.blend"]),
    ("missing-config", FLAGS, [*PRE, "{w}/nope.yaml"], 2, ["nope.yaml", "does not exist"]),
    ("invalid-yaml-file", FLAGS, [*PRE, "{w}/bad.yaml"], 2, ["bad.yaml", "YAML"]),
    ("unknown-section", FLAGS, [*PRE, "{w}/unknown_section.yaml"], 2, ["trian"]),
    ("resume-missing", FLAGS, [*PRE, CFG, "train.resume={w}/none_here"], 2, ["train.resume", "none_here"]),
    ("beta-schedule", FLAGS, [*PRE, CFG, "ouro.beta_schedule=[[0]]"], 2, ["ouro.beta_schedule"]),
    ("model-override", FLAGS, [*PRE, CFG, "model.overrides={bogus_width: 3}"], 2, ["model.overrides.bogus_width"]),
    ("derived-deepspeed-key", FLAGS, [*PRE, CFG, "deepspeed.train_batch_size=4"], 2, ["deepspeed.train_batch_size"]),
    ("betas", FLAGS, [*PRE, CFG, "optim.betas=[0.9]"], 2, ["optim.betas"]),
    ("hostfile", FLAGS, [*PRE, CFG, "launch.hostfile={w}/hosts"], 2, ["hosts", "does not exist"]),
    ("negative-steps", FLAGS, [*PRE, CFG, "train.max_steps=-3"], 2, ["train.max_steps"]),
    ("ingest-missing-input", "pretrain.data.ingest", ["--input", "{w}/missing.jsonl", "--tokenizer", "{w}/sp.model",
                                                      "--output", "{w}/new"], 1, ["missing.jsonl"]),
    ("ingest-existing-output", "pretrain.data.ingest", ["--input", "{w}/docs.jsonl", "--tokenizer", "{w}/sp.model",
                                                        "--output", "{w}/ds"], 1, ["ds.bin", "--overwrite"]),
    ("ingest-missing-tokenizer", "pretrain.data.ingest", ["--input", "{w}/docs.jsonl", "--tokenizer",
                                                          "{w}/no_tok.model", "--output", "{w}/new"], 1, ["no_tok"]),
    ("inspect-missing", "pretrain.data.indexed", ["{w}/absent"], 1, ["absent", "does not exist"]),
    ("export-no-checkpoint", "pretrain.export", ["--checkpoint", "{w}", "--output", "{w}/hf_new"], 2,
     ["no complete checkpoint"]),
    ("export-into-existing", "pretrain.export", ["--checkpoint", "{w}/run", "--output", "{w}/hf"], 2,
     ["hf", "--overwrite"]),
    ("evaluate-unknown-row", "posttrain.evaluate", ["--reasoner", "{w}/hf", "--data", "synthetic:mano", "--rows",
                                                    "nonsense", "--output", "{w}/eval"], 1, ["nonsense"]),
    ("evaluate-not-a-model", "posttrain.evaluate", ["--reasoner", "{w}/run", "--data", "synthetic:mano",
                                                    "--output", "{w}/eval"], 2, ["config.json"]),
]


def run_case(world, capsys, entry, argv, code, words):
    argv = [a.replace("{w}", str(world)) for a in argv]
    before = digest(world)
    with pytest.raises(SystemExit) as exit_info:
        cli(entry)(argv)
    got = exit_info.value.code
    message = capsys.readouterr().err + (got if isinstance(got, str) else "")
    assert (1 if isinstance(got, str) else got) == code, message
    for word in words:
        assert word.replace("{w}", str(world)) in message, (word, message)
    assert digest(world) == before  # nothing the command was given, nor any earlier output, changed
    return message


@pytest.mark.parametrize("name,entry,argv,code,words", CASES, ids=[c[0] for c in CASES])
def test_malformed_input(world, capsys, name, entry, argv, code, words):
    run_case(world, capsys, entry, argv, code, words)


def _damage(world, tmp_path, how):
    """A copy of the trained run, damaged; returns (run folder, the file or key to be named)."""
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    ckpt = run / "checkpoints" / "global_step2"
    if how == "truncated-shard":
        victim = next(ckpt.glob("*optim_states.pt"))
        victim.write_bytes(victim.read_bytes()[:-64])
    elif how == "flipped-shard":
        victim = next(ckpt.glob("*model_states.pt"))
        data = bytearray(victim.read_bytes())
        data[len(data) // 3] ^= 0x10
        victim.write_bytes(bytes(data))
    elif how == "latest-missing":
        shutil.rmtree(ckpt)
        victim = ckpt
    elif how == "state-json":
        victim = ckpt / "trainer_state.json"
        victim.write_text("{not json")
    return run, victim


@pytest.mark.parametrize("how", ["truncated-shard", "flipped-shard", "latest-missing", "state-json"])
@pytest.mark.parametrize("entry", ["pretrain.train", "pretrain.export"])
def test_damaged_checkpoint(world, corpus, tmp_path, capsys, how, entry):
    run, victim = _damage(world, tmp_path, how)
    if entry == "pretrain.train":
        argv = ["--config", CFG, *base_overrides(corpus, run, **{"train.max_steps": 3})]
    else:
        argv = ["--checkpoint", str(run), "--output", str(tmp_path / "hf")]
    before = digest(run)
    with pytest.raises(SystemExit) as exit_info:
        cli(entry)(argv)
    message = capsys.readouterr().err
    assert exit_info.value.code == 2 and str(victim) in message, message
    assert "global_step1" in message or how == "state-json" and entry == "pretrain.export"
    assert digest(run) == before and not (tmp_path / "hf").exists()


def test_training_on_a_missing_or_mismatched_data_set(world, corpus, tmp_path, capsys):
    cases = [({"data.blend": f"'1.0 {world}/absent'"}, ["absent", "does not exist"]),
             ({"data.blend": f"'1.0 {world}/ds'", "data.tokenizer": str(corpus / "tokenizer.model")}, ["tokenizer"])]
    for extra, words in cases:
        before = digest(world)
        with pytest.raises(SystemExit) as exit_info:
            cli("pretrain.train")(["--config", CFG, *base_overrides(corpus, tmp_path / "out", **extra)])
        message = capsys.readouterr().err
        assert exit_info.value.code == 2 and all(w in message for w in words), message
        assert digest(world) == before
