"""Saved folders load without looplm: `modeling_looplm.py` + `auto_map` (looplm/remote_code.py)."""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers.models import tiny_model
from looplm import LoopLMForCausalLM
from looplm.remote_code import AUTO_MAP, MODULE_FILE, BundleError, build_bundle

REPO = Path(__file__).resolve().parents[2]
BLOCKED = ("looplm", "pretrain", "posttrain", "runtime")  # the repo's packages (installed editable in the venv)

# Runs in a fresh interpreter: cwd is the test's tmp folder, PYTHONPATH unset, the repo's packages
# made unimportable before anything else is imported.
CLEAN_LOAD = textwrap.dedent("""
    import os
    import sys
    for name in {blocked!r}:
        sys.modules[name] = None  # `import name` now raises ImportError
    # No search path leads into the repo (the venv, which may live there, holds torch and transformers).
    paths = [os.path.abspath(p or ".") for p in sys.path]
    assert not [p for p in paths if (p + "/").startswith({repo!r} + "/") and not p.startswith(sys.prefix)], sys.path

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads({threads})
    inputs = torch.load("inputs.pt")
    model = AutoModelForCausalLM.from_pretrained("folder", trust_remote_code=True).eval()
    out = {{"model_module": type(model).__module__, "config_module": type(model.config).__module__}}
    with torch.no_grad():
        out["full"] = model(inputs["ids"]).logits
        thr = model(inputs["ids"], exit_threshold=0.5)
        out["threshold"], out["threshold_exit_steps"] = thr.logits, thr.exit_steps
        before = model.model.layer_token_applications
        out["generated"] = model.generate(inputs["prompt"], max_new_tokens=8, do_sample=False,
                                          exit_threshold=0.5, pad_token_id=0)
        out["generate_layer_applications"] = model.model.layer_token_applications - before
    out["imported"] = sorted(name for name, module in sys.modules.items() if module is not None
                             and name.split(".")[0] in {blocked!r} + ("deepspeed",))
    torch.save(out, "outputs.pt")
""")


@torch.no_grad()
def greedy(model, prompt, **exit_policy):
    """Greedy tokens and the token-layer applications generate() ran (what early exit saves)."""
    before = model.model.layer_token_applications
    tokens = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, **exit_policy)
    return tokens, model.model.layer_token_applications - before


@torch.no_grad()
def reference(model, ids, prompt):
    thr = model(ids, exit_threshold=0.5)
    generated, applications = greedy(model, prompt, exit_threshold=0.5)
    return {"full": model(ids).logits, "threshold": thr.logits, "threshold_exit_steps": thr.exit_steps,
            "generated": generated, "generate_layer_applications": applications}


@pytest.fixture
def saved(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "folder")
    return model, tmp_path / "folder"


def test_folder_loads_with_only_torch_and_transformers(saved, tmp_path):
    model, folder = saved
    inputs = {"ids": torch.randint(0, 256, (2, 9)), "prompt": torch.randint(1, 256, (2, 5))}
    torch.save(inputs, tmp_path / "inputs.pt")
    ref = reference(model, inputs["ids"], inputs["prompt"])
    # The early-exit cases exercise early exit: tokens leave before the last pass, decoding skips work.
    T = model.config.total_ut_steps
    assert (ref["threshold_exit_steps"] < T - 1).any()
    assert not torch.allclose(ref["threshold"], ref["full"])
    assert ref["generate_layer_applications"] < greedy(model, inputs["prompt"])[1]

    script = tmp_path / "load.py"
    script.write_text(CLEAN_LOAD.format(blocked=BLOCKED, repo=str(REPO), threads=torch.get_num_threads()))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LOOPLM_SHARED")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    got = torch.load(tmp_path / "outputs.pt")

    assert got["imported"] == []  # nothing of looplm (or the training stack) was needed
    assert got["model_module"].endswith(".modeling_looplm") and got["config_module"].endswith(".modeling_looplm")
    for key in ("full", "threshold"):
        torch.testing.assert_close(got[key], ref[key], atol=1e-6, rtol=0)
    assert torch.equal(got["threshold_exit_steps"], ref["threshold_exit_steps"])
    assert torch.equal(got["generated"], ref["generated"])
    assert got["generate_layer_applications"] == ref["generate_layer_applications"]


def test_looplm_still_loads_its_folders_with_its_own_classes(saved):
    model, folder = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    assert config["model_type"] == "ouro" and config["architectures"] == ["OuroForCausalLM"]
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        expected = model(ids, exit_threshold=0.5).logits
        for loaded in (LoopLMForCausalLM.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)):
            assert type(loaded) is LoopLMForCausalLM  # looplm's class, not the bundled copy
            assert torch.equal(loaded.eval()(ids, exit_threshold=0.5).logits, expected)


def test_only_the_main_process_writes_the_modeling_file(tmp_path):
    tiny_model().save_pretrained(tmp_path / "other_rank", is_main_process=False)
    assert not (tmp_path / "other_rank" / MODULE_FILE).exists()


def test_bundled_file_imports_nothing_of_the_repo(saved):
    _, folder = saved
    text = (folder / MODULE_FILE).read_text()
    assert text.startswith('"""Generated from looplm version ') and "do not edit" in text.splitlines()[0]
    tree = ast.parse(text)
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import at line {node.lineno}"
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
    assert {"torch", "transformers"} <= imported
    assert not imported & {"looplm", "pretrain", "posttrain", "runtime", "deepspeed", "einops"}
    # The classes auto_map names are defined at the file's top level; __init__'s registration is not copied.
    defined = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert {target.split(".")[1] for target in AUTO_MAP.values()} <= defined
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)]
    assert not [c for c in calls if c.func.attr == "register" and getattr(c.func.value, "id", "").startswith("Auto")]


def write_package(root: Path, files: dict) -> Path:
    root.mkdir()
    for name, text in files.items():
        (root / f"{name}.py").write_text(textwrap.dedent(text))
    return root


def test_bundle_joins_modules_and_keeps_aliases(tmp_path):
    pkg = write_package(tmp_path / "pkg", {
        "base": '"""Base."""\nfrom __future__ import annotations\nimport math\nSCALE = 2\n',
        "model": """
            import math
            from .base import (
                SCALE as FACTOR,
            )

            def double(x):
                return FACTOR * math.sqrt(x)
        """,
    })
    text = build_bundle(pkg)
    assert text.index("from __future__ import annotations") < text.index("# ---- looplm/base.py")
    namespace = {}
    exec(compile(text, "bundle", "exec"), namespace)
    assert namespace["double"](9.0) == 6.0


@pytest.mark.parametrize("files,problem", [
    ({"a": "def helper():\n    return 1\n", "b": "def helper():\n    return 2\n",
      "model": "from .a import helper\nfrom .b import helper as other\n"}, "name clash"),
    ({"a": "X = 1\n", "model": "def f():\n    from .a import X\n    return X\n"}, "inside a block or function"),
    ({"a": "import pretrain\n", "model": "from .a import pretrain\n"}, "imports pretrain"),
    ({"a": "X = 1\n", "model": "from .a import Y\n"}, "does not define it"),
])
def test_bundle_refuses_what_would_break_the_file(tmp_path, files, problem):
    with pytest.raises(BundleError, match=problem):
        build_bundle(write_package(tmp_path / "pkg", files))
