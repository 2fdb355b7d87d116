"""The packages form layers: runtime/ (shared run infrastructure) imports neither trainer; pretrain
never imports posttrain; posttrain imports from pretrain only what pretraining produces (the
tokenizer of an exported folder and the synthetic task definitions, in pretrain.data). Each check
imports every module of a package in a fresh interpreter and reads sys.modules."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import importlib, json, pkgutil, sys
package = importlib.import_module(sys.argv[1])
for info in pkgutil.walk_packages(package.__path__, sys.argv[1] + "."):
    if not info.name.endswith("__main__"):
        importlib.import_module(info.name)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("runtime", "pretrain", "posttrain", "looplm"))))
"""


def loaded_by(package: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, package], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.splitlines()[-1]))


@pytest.mark.parametrize("package, forbidden", [("runtime", ("pretrain", "posttrain", "looplm")),
                                                ("pretrain", ("posttrain",))])
def test_a_lower_layer_loads_no_module_of_a_higher_one(package, forbidden):
    modules = loaded_by(package)
    assert any(m.startswith(package + ".") for m in modules)  # the probe did import the package
    assert not [m for m in modules if m.split(".")[0] in forbidden]


def test_posttrain_reads_only_the_outputs_of_pretraining():
    modules = loaded_by("posttrain")
    assert "posttrain.train" in modules and "runtime.checkpoint" in modules
    from_pretrain = {m for m in modules if m.split(".")[0] == "pretrain"}
    assert from_pretrain and all(m in ("pretrain", "pretrain.data") or m.startswith("pretrain.data.")
                                 for m in from_pretrain), sorted(from_pretrain)
