# The two commands that matter: `make demo` and `make test`.
# Both create .venv on first use and install the project into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint typecheck protocheck unit bench vectors protos clean

$(VENV)/.installed: pyproject.toml
	bash scripts/system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[signer,grpc,http,redis,postgres,dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) scripts/demo.py

test: lint typecheck protocheck unit

lint: $(VENV)/.installed
	$(PY) -m ruff check .

typecheck: $(VENV)/.installed
	$(PY) -m mypy verifier_sdk signer softhsm tests bench scripts

protocheck: $(VENV)/.installed
	$(PY) scripts/gen_protos.py --check

protos: $(VENV)/.installed
	$(PY) scripts/gen_protos.py

unit: $(VENV)/.installed
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) bench/verify.py
	$(PY) bench/delegate.py
	$(PY) bench/limits.py

vectors: $(VENV)/.installed
	$(PY) scripts/gen_vectors.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
