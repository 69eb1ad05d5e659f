# The two commands of the README: `make demo` and `make test`. Each sets up .venv first.
# The `gpu` extra (triton) is installed on CPU machines too: its kernels are tested there with TRITON_INTERPRET=1.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# TorchRec (KeyedJaggedTensor inputs are tested) and what it imports, pinned in constraints.txt
TORCHREC := torchrec fbgemm-gpu-cpu tensordict pyvers cloudpickle pyre-extensions typing-inspect

.PHONY: setup demo test test-slow lint docs bench clean browser postgres

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,search,serve,bench,report,docs,gpu]'
	$(BIN)/pip install --quiet --no-deps -c constraints.txt $(TORCHREC)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

lint: $(STAMP)
	$(BIN)/ruff check codesign examples tests benchmarks docs/hooks.py
	$(BIN)/ruff format --check codesign examples tests benchmarks docs/hooks.py
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# The user guide and API reference; --strict turns every mkdocs/mkdocstrings warning into a failure.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --quiet --site-dir build/site

# The fast suite (budget: 6 min wall on 2 cores, lint and docs included). Its wall time and the slowest
# tests are printed, so CI logs show when it grows; heavy checks are marked slow and run by `make test-slow`.
# MAKE_START is read once, when make parses this file: the time printed covers the prerequisites too.
MAKE_START := $(shell date +%s)

# Headless Chromium for the report test (it renders the HTML report and checks every chart's pixels):
# Debian's chromium, installed when missing (as root, with apt-get). CODESIGN_SKIP_BROWSER=1 opts out.
browser:
	@if [ "$${CODESIGN_SKIP_BROWSER:-0}" = 1 ] || command -v chromium >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's chromium for the report test"; \
		apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
		{ apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; \
	else \
		echo "make test renders the report in headless Chromium: install it (apt-get install chromium)," \
			"or set CODESIGN_SKIP_BROWSER=1 to skip that test"; exit 1; \
	fi

test: lint docs browser
	@$(BIN)/python -m pytest -q -m "not slow and not gpu" --durations=15; \
	rc=$$?; echo "make test: $$(( $$(date +%s) - $(MAKE_START) )) s wall (lint + docs + pytest), exit $$rc"; exit $$rc

# Debian's postgresql server for tests/test_search_postgres.py (it starts a private cluster), when missing.
postgres:
	@if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's postgresql for the search storage test"; \
		apt-get install -y -qq postgresql >/dev/null 2>&1 || \
		{ apt-get update -qq >/dev/null && apt-get install -y -qq postgresql >/dev/null; }; \
	else echo "tests/test_search_postgres.py skips: install postgresql (apt-get install postgresql)"; fi

test-slow: $(STAMP) postgres
	@$(BIN)/python -m pytest -q -m "slow" --durations=15; \
	rc=$$?; echo "make test-slow: $$(( $$(date +%s) - $(MAKE_START) )) s wall, exit $$rc"; exit $$rc

bench: $(STAMP)
	$(BIN)/python benchmarks/costmodel.py
	$(BIN)/python benchmarks/request_scaling.py
	$(BIN)/python benchmarks/compile.py
	$(BIN)/python benchmarks/vs_compile.py
	$(BIN)/python benchmarks/decompositions.py
	$(BIN)/python benchmarks/gates.py
	$(BIN)/python benchmarks/search.py
	$(BIN)/python benchmarks/fp8.py
	$(BIN)/python benchmarks/sharding.py
	$(BIN)/python benchmarks/router.py
	$(BIN)/python benchmarks/serving.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
