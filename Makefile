# The README's two commands: `make demo` and `make test`. Both build .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Test workers: one per core, capped at 2 (each JAX process is itself multi-threaded).
TEST_WORKERS ?= 2

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/attnlab demo configs/tiny/softmax.yaml

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=15

clean:
	rm -rf $(VENV) runs
