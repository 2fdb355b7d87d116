# The two commands: `make smoke` (the main job) and `make test`. Both create and reuse .venv,
# installed from requirements.lock (the exact set we test). pyproject.toml holds the ranges.
#   make lock         regenerate requirements.lock from pyproject.toml's ranges (pip-tools)
#   make test-latest  the suite on the newest releases the ranges allow (.venv-latest)
#   make test-oldest  the suite on the ranges' lower bounds (.venv-oldest)
PYTHON ?= python3
# The torch the local set-up installs: where a CPU build of this version is on the pip index path
# (as on our CPU machines) pip prefers it (2.13.0+cpu sorts above 2.13.0); elsewhere the PyPI build.
TORCH_VERSION := 2.13.0
PIP_TOOLS := pip-tools==7.6.2
TEST_EXTRAS := test

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: smoke test test-lm-eval bench lock test-latest test-oldest clean-venv

$(STAMP): requirements.txt requirements.lock pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip check
	touch $(STAMP)

smoke: $(STAMP)
	$(PY) -m pretrain.smoke

test: $(STAMP)
	$(PY) -m pytest tests

# The lm-evaluation-harness test in its own environment: the lock plus the `eval` extra's tested
# release, which moves python-dateutil from the lock's 4.0.0 to 2.9 (so it is not in the lock).
# LOOPLM_REQUIRE_LM_EVAL makes the test fail instead of skipping when the harness is missing.
EVAL_VENV := .venv-eval
LM_EVAL := lm_eval[hf]==0.4.13
EVAL_STAMP := $(EVAL_VENV)/.installed-$(subst [hf]==,-,$(LM_EVAL))
$(EVAL_STAMP): requirements.txt requirements.lock pyproject.toml
	rm -rf $(EVAL_VENV)
	$(PYTHON) -m venv $(EVAL_VENV)
	$(EVAL_VENV)/bin/python -m pip install -q -r requirements.txt
	$(EVAL_VENV)/bin/python -m pip install -q '$(LM_EVAL)'
	$(EVAL_VENV)/bin/python -m pip check
	touch $@

test-lm-eval: $(EVAL_STAMP)
	LOOPLM_REQUIRE_LM_EVAL=1 $(EVAL_VENV)/bin/python -m pytest tests/pretrain/test_lm_eval.py

bench: $(STAMP)
	$(PY) benchmarks/model_throughput.py

# pip-compile resolves with this machine's ordinary pip configuration; no index URL, find-links or
# local path is written into the lock, and a local build label (torch's `+cpu`) is dropped so the
# same lock installs the CPU build where it is on the index path and the PyPI build elsewhere.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q $(PIP_TOOLS)
	.venv-lock/bin/pip-compile -q --rebuild --upgrade --allow-unsafe --strip-extras --no-emit-index-url \
		--no-emit-find-links --no-emit-trusted-host --extra $(TEST_EXTRAS) \
		--upgrade-package torch==$(TORCH_VERSION) --output-file requirements.lock pyproject.toml
	sed -i -E 's/^([A-Za-z0-9_.-]+==[^+ ]+)\+[A-Za-z0-9.]+/\1/' requirements.lock
	rm -rf .venv-lock

# A fresh environment per run, so that nothing of the last one hides a broken release.
# $(1): the folder; $(2): the extra pip arguments that choose the versions.
define check_env
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip setuptools
	$(1)/bin/python -m pip install -q $(2) -e '.[$(TEST_EXTRAS)]'
	$(1)/bin/python -m pip check
	$(1)/bin/python -m pip freeze --exclude-editable > $(1)/versions.txt
	grep -i -E '^(torch|transformers|deepspeed|peft|datasets|huggingface.hub|tokenizers|numpy)==' $(1)/versions.txt
	$(1)/bin/python -m pytest tests
endef

test-latest:
	$(call check_env,.venv-latest,--upgrade --upgrade-strategy eager)

test-oldest:
	mkdir -p .venv-oldest-constraints
	$(PYTHON) .ci/lower_bounds.py $(TEST_EXTRAS) > .venv-oldest-constraints/lower_bounds.txt
	$(call check_env,.venv-oldest,-c .venv-oldest-constraints/lower_bounds.txt)

clean-venv:
	rm -rf $(VENV) $(EVAL_VENV) .venv-latest .venv-oldest .venv-oldest-constraints .venv-lock
