# fqdnproxy developer entry points. Every target that runs code bootstraps first (a no-op in
# well under a second once done), so `make test` works on a fresh Debian 12 machine.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

VENV := .venv
PYTHON := $(VENV)/bin/python
ENV_FILE := $(VENV)/fqdnproxy.env
# Exports BCC_KERNEL_SOURCE (written by scripts/bootstrap.sh) into a recipe's shell.
WITH_ENV := set -a; . $(ENV_FILE); set +a;

.PHONY: bootstrap test demo bench fuzz clean distclean

bootstrap:
	scripts/bootstrap.sh

# pytest exits 5 when it collects nothing: say so, never pass quietly.
test: bootstrap
	@$(WITH_ENV) rc=0; $(VENV)/bin/pytest -q $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

demo: bootstrap
	$(WITH_ENV) $(PYTHON) -m fqdnproxy.lab.demo

# Coverage-guided fuzzing (atheris) of the wire parser and the whole query path; FUZZ_RUNS inputs.
FUZZ_RUNS ?= 1000000
fuzz: bootstrap
	$(VENV)/bin/pip install -q atheris
	mkdir -p .fuzz-corpus
	$(PYTHON) fuzz/fuzz_query_path.py -atheris_runs=$(FUZZ_RUNS) -timeout=5 .fuzz-corpus fuzz/seeds

bench: bootstrap
	$(WITH_ENV) $(PYTHON) benchmarks/run.py

# Caches and build leftovers; keeps the venv and the kernel-header tree (see distclean).
clean:
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -print0 | xargs -0r rm -rf
	rm -rf .pytest_cache .hypothesis build $(VENV)/.fqdnproxy-pip-stamp

# Also the venv and the merged kernel-header tree the bootstrap built.
distclean: clean
	rm -rf $(VENV) /var/cache/fqdnproxy/kernel-headers
