# The README's two commands: `make demo` and `make test`. Both build .venv when it is missing.
# jax 0.11.2 needs Python >= 3.12. PYTHON may name one; otherwise the first candidate that *runs* and
# reports >= 3.12 is used (pyenv's version shims exist on PATH but fail unless that version is selected,
# so `command -v` is not enough).
PYTHON ?= $(shell for p in python3.13 python3.12 python3 $$HOME/.pyenv/versions/3.1[2-9]*/bin/python3; do \
	  "$$p" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1 && { echo "$$p"; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
# What jax runs on: cpu (the default; what `make test` installs), cuda12 (NVIDIA GPUs) or tpu (a TPU VM). The
# accelerator's plugin comes from the pyproject extra of that name, pinned to the same jax version.
DEVICE ?= cpu
EXTRAS_cpu := test
EXTRAS_cuda12 := test,cuda12
EXTRAS_tpu := test,tpu
EXTRAS := $(EXTRAS_$(DEVICE))
STAMP := $(VENV)/.installed-$(DEVICE)
# Test workers: one per core, capped at 2 (each JAX process is itself multi-threaded).
TEST_WORKERS ?= 2

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@if [ -z "$(EXTRAS)" ]; then echo "DEVICE=$(DEVICE) is not one of cpu, cuda12, tpu" >&2; exit 2; fi
	@if ! { test -x $(PY) && $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))'; }; then \
	  if [ -z "$(PYTHON)" ]; then \
	    echo "attnlab needs Python >= 3.12 (jax 0.11.2): install one (e.g. 'pyenv install 3.12') or run 'make PYTHON=/path/to/python3.12'" >&2; \
	    exit 1; fi; \
	  rm -rf $(VENV); echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/attnlab demo configs/tiny/softmax.yaml

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=15

clean:
	rm -rf $(VENV) runs
