# Quickstart targets. `make demo` runs the main job, `make test` the test suite; both first build
# .venv with everything the project needs (only once; again when pyproject.toml changes).
#
# torch: with no torch in the venv, TORCH_SPEC is installed first. Its default pins the CPU build
# that pip finds locally on our CI machines; elsewhere bring your own, e.g.
#   make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
# or install the package into an environment that already has torch: pip install -e ".[test,examples]".

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.astra-installed

.PHONY: install data demo test test-oldest clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test,examples]"
	touch $@

# Main job: distributed ASTRA inference, 2 CPU processes (gloo), the trained GPT2 in checkpoints/, offline.
demo: $(STAMP)
	$(VENV)/bin/accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
		--dynamo_backend no examples/distributed_inference.py --task gpt2 --cpu

# Offline datasets from Debian (Fashion-MNIST, KJV Bible) for the examples and the tests that read them.
# Where apt is not available the tests that need them are skipped, saying which package is missing.
data:
	sh scripts/install-data.sh || echo "warning: could not install the Debian datasets; tests needing them will be skipped"

test: $(STAMP) data
	$(PY) -m pytest tests

# The same suite against the oldest supported transformers (CI runs both ends of the range).
OLDEST_VENV ?= .venv-oldest
$(OLDEST_VENV)/.astra-installed: pyproject.toml
	test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(OLDEST_VENV)/bin/python -c "import torch" 2>/dev/null || $(OLDEST_VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	$(OLDEST_VENV)/bin/python -m pip install -q -e ".[test,examples]" "transformers==5.9.0"
	touch $@

test-oldest: $(OLDEST_VENV)/.astra-installed data
	$(OLDEST_VENV)/bin/python -m pytest tests

clean:
	rm -rf $(VENV) $(OLDEST_VENV) build src/*.egg-info
