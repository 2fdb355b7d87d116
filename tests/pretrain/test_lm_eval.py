"""Standard evaluation: an export runs under lm-evaluation-harness (`lm_eval --model hf`, the optional
`eval` extra) on a local held-out task, and the harness scores what the model itself generates."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lm_eval_tasks.make_task import TASKS_DIR, write_task
from helpers.training import base_overrides, run_in_process
from pretrain.data.synthetic import exact_match, first_word, read_eval
from pretrain.data.tokenizer import Tokenizer
from pretrain.export import export
from runtime.config import ConfigError

LIMIT = 20

# `make test-lm-eval` (which CI runs) sets LOOPLM_REQUIRE_LM_EVAL: there a missing harness fails the test
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None and not os.environ.get("LOOPLM_REQUIRE_LM_EVAL"),
                                   reason="lm_eval is not installed: it is the optional extra `pip install -e .[eval]`")


def write_jsonl(path: Path, items) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in items))
    return path


@torch.no_grad()
def greedy_completions(folder: Path, prompts: list[str], max_new_tokens: int = 4) -> list[str]:
    """The export's own greedy completions, tokenized and decoded with the run's sentencepiece model
    (not the Hugging Face tokenizer lm_eval uses), stopped at EOS as the harness stops. <unk> is left
    out as the harness's decoding (skip_special_tokens) leaves it out; a trained model never emits it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tok = Tokenizer(folder / "tokenizer.model")
    out = []
    for prompt in prompts:
        ids = torch.tensor([tok.encode(prompt)])
        gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_id,
                             pad_token_id=tok.eos_id)[0, ids.shape[1]:].tolist()
        gen = gen[:gen.index(tok.eos_id)] if tok.eos_id in gen else gen
        out.append(tok.decode([i for i in gen if i != tok._sp.unk_id()]))
    return out


@pytest.fixture(scope="module")
def exported(corpus, tmp_path_factory):
    """A one-step run's export: a model whose greedy completions still vary (two steps already answer
    "0 0 0 0" to every Mano prompt)."""
    root = tmp_path_factory.mktemp("lm_eval_export")
    run_in_process(base_overrides(corpus, root / "run", **{"train.max_steps": 1}))
    return export(root / "run", root / "hf")


def test_auto_tokenizer_reads_the_export_as_its_sentencepiece_model(corpus, exported):
    """What lm_eval's `hf` model loads: AutoTokenizer on the folder (no tokenizer.json: transformers
    converts tokenizer.model) encodes every training document and held-out prompt as sentencepiece does."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(exported)
    sp = Tokenizer(exported / "tokenizer.model")
    texts = [json.loads(line)["text"] for line in (corpus / "train.jsonl").read_text().splitlines()]
    for task in ("mano", "multihop"):
        texts += [f"{p} {a}" for p, a in read_eval(corpus / f"eval_{task}.jsonl")]
    texts = sorted(set(texts))
    assert [hf.encode(t, add_special_tokens=False) for t in texts] == [sp.encode(t) for t in texts]
    assert hf.encode("mano 1 : + 2 3 =") == sp.encode("mano 1 : + 2 3 =")  # no BOS/EOS added by default
    assert hf.eos_token_id == sp.eos_id
    ids = sp.encode(texts[0])
    assert [hf.decode(ids[i:]) for i in range(len(ids))] == [sp.decode(ids[i:]) for i in range(len(ids))]


@needs_lm_eval
def test_lm_eval_scores_an_export_on_a_held_out_task_as_its_own_greedy_generation(corpus, exported, tmp_path):
    folder = exported
    items = read_eval(corpus / "eval_multihop.jsonl")[:LIMIT]
    completions = greedy_completions(folder, [p for p, _ in items])
    words = [first_word(c) for c in completions]
    assert len(set(words)) > 1 and any(len(c.split()) > 1 for c in completions), completions  # a check with teeth
    # A second task on the same prompts whose even answers are the model's own first words: the harness
    # must find those hits too (an untrained model rarely answers right, and 0 == 0 would prove little).
    mixed = [(p, w if i % 2 == 0 else a) for i, (w, (p, a)) in enumerate(zip(words, items))]
    selfcheck = write_jsonl(tmp_path / "data" / "eval_selfcheck.jsonl", mixed)
    tasks = tmp_path / "tasks"
    names = [write_task(f, tasks).stem for f in (corpus / "eval_multihop.jsonl", selfcheck)]
    assert names == ["looplm_multihop", "looplm_selfcheck"]

    cmd = [str(Path(sys.executable).with_name("lm_eval")), "--model", "hf",
           "--model_args", f"pretrained={folder},trust_remote_code=True", "--tasks", ",".join(names),
           "--include_path", str(tasks), "--device", "cpu", "--batch_size", "1", "--limit", str(LIMIT),
           "--output_path", str(tmp_path / "lm_eval_out"), "--log_samples"]
    # a process of its own, as a user runs it: not a rank of this process's group (run_in_process set
    # RANK, MASTER_PORT, ... here), no looplm imported (the folder's remote code is what loads), offline
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "datasets_cache"))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    [results] = (tmp_path / "lm_eval_out").rglob("results_*.json")
    scores = json.loads(results.read_text())["results"]

    for name, task_items in zip(names, (items, mixed)):
        score = scores[name]["exact_match,first_word"]
        assert 0.0 <= score <= 1.0
        [samples] = (tmp_path / "lm_eval_out").rglob(f"samples_{name}_*.jsonl")
        rows = sorted(map(json.loads, samples.read_text().splitlines()), key=lambda r: r["doc_id"])
        assert [r["arguments"]["gen_args_0"]["arg_0"] for r in rows] == [p for p, _ in task_items]  # the bare prompts
        assert [r["filtered_resps"][0] for r in rows] == words  # the same first words as direct generation
        assert score == pytest.approx(exact_match(words, [a for _, a in task_items]), abs=1e-12)
    assert scores["looplm_selfcheck"]["exact_match,first_word"] >= 0.5


def test_make_task_refuses_training_data(corpus, tmp_path):
    with pytest.raises(ConfigError, match="not a held-out record"):
        write_task(corpus / "train.jsonl", tmp_path)
    doc = json.loads((corpus / "train.jsonl").read_text().splitlines()[0])["text"]
    prompt, answer = doc.rsplit(" ", 1)
    leaked = write_jsonl(tmp_path / "corpus" / "eval_leak.jsonl", [(prompt, answer)])
    (tmp_path / "corpus" / "train.jsonl").write_text(json.dumps({"text": doc}) + "\n")
    with pytest.raises(ConfigError, match="training documents"):
        write_task(leaked, tmp_path / "tasks")
    assert not (tmp_path / "tasks").exists()


def test_make_task_writes_a_task_that_includes_the_template(corpus, tmp_path):
    import yaml

    assert (TASKS_DIR / "_looplm_template_yaml").is_file()
    path = write_task(corpus / "eval_multihop.jsonl", tmp_path)
    cfg = yaml.safe_load(path.read_text())
    assert cfg["task"] == "looplm_multihop" and Path(cfg["include"]).resolve() == TASKS_DIR / "_looplm_template_yaml"
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str((corpus / "eval_multihop.jsonl").resolve())
