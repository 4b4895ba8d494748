# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA := data/demo
PYTEST_ARGS ?=

.PHONY: demo test venv clean lint

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

$(DEMO_DATA)/.complete: $(STAMP)
	$(BIN)/vlnflow demo-data $(DEMO_DATA)

demo: $(STAMP) $(DEMO_DATA)/.complete
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake -c 2 all
	$(BIN)/vlnflow predict --model results/export/demo --samples results/index/samples.parquet --cache results/cache/manifest.json --held-out --n 0 --show 12 --max-new-tokens 8
	@echo "benchmark report: $(abspath results/benchmark/report.md) (table: report.csv, plot: timing.png)"
	@echo "exported model: $(abspath results/export/demo) (vlnflow predict --model results/export/demo)"

test: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --lint

clean:
	rm -rf results .snakemake
