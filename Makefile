# The two commands of the README: `make demo` and `make test`. Each sets up .venv first.
# The `gpu` extra (triton) is installed on CPU machines too: its kernels are tested there with TRITON_INTERPRET=1.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow lint docs bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,search,bench,report,docs,gpu]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

lint: $(STAMP)
	$(BIN)/ruff check codesign examples tests benchmarks docs/hooks.py
	$(BIN)/ruff format --check codesign examples tests benchmarks docs/hooks.py
	$(BIN)/mypy

# The user guide and API reference; --strict turns every mkdocs/mkdocstrings warning into a failure.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --quiet --site-dir build/site

test: lint docs
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/costmodel.py
	$(BIN)/python benchmarks/request_scaling.py
	$(BIN)/python benchmarks/compile.py
	$(BIN)/python benchmarks/search.py
	$(BIN)/python benchmarks/fp8.py
	$(BIN)/python benchmarks/sharding.py
	$(BIN)/python benchmarks/router.py
	$(BIN)/python benchmarks/serving.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
