# marpipe: `make build` packages every example, `make test` runs the tests. `make help` lists targets.
PYTHON ?= python3
VENV   ?= .venv
# CPU build by default; GPU users: make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" EXTRAS=dev,hf,media,s3,gpu
TORCH  ?= torch==2.13.0
EXTRAS ?= dev,hf,media,s3
STORE  ?= model_store
# make test-gpu: the Python that has CUDA torch (not .venv, whose torch is the CPU build); DRY=1 rehearses it on a CPU
GPU_PYTHON ?= python3
PY     := $(VENV)/bin/python
MARPIPE := $(VENV)/bin/marpipe
STAMP  := $(VENV)/.installed
SPECS  := $(wildcard examples/*.yaml)
CKPTS  := examples/checkpoints/.done

.PHONY: help setup build release test test-gpu smoke serve lint bench clean distclean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv and install torch (TORCH=...) and marpipe with its dev extras

$(STAMP): pyproject.toml
	@java -version 2>&1 | grep -qE 'version "(1[1-9]|[2-9][0-9])' || { \
	  echo "TorchServe needs Java 11 or newer and none was found on PATH."; \
	  echo "Install it: apt-get install openjdk-17-jre-headless (Debian/Ubuntu), or set JAVA_HOME."; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@case ",$(EXTRAS)," in *,gpu,*) $(PY) -m pip uninstall -q -y onnxruntime; \
	  $(PY) -m pip install -q --force-reinstall --no-deps onnxruntime-gpu;; esac
	@touch $@

$(CKPTS): examples/make_checkpoints.py examples/make_bert.py $(wildcard examples/models/*.py) | $(STAMP)
	$(PY) examples/make_checkpoints.py
	$(PY) examples/make_bert.py
	@touch $@

build: $(STAMP) $(CKPTS) ## package every example spec in every format into $(STORE)/ (<name>_<format>.mar)
	$(MARPIPE) build $(SPECS) --format all --store $(STORE) --report build/report.json

release: $(STAMP) $(CKPTS) ## build every example in every format with 2 jobs; JUnit, summary and JSON into build/
	@mkdir -p build
	$(MARPIPE) build $(SPECS) --format all --store $(STORE) -j 2 --junit build/junit.xml --summary build/summary.md --report build/report.json

test: $(STAMP) ## run the whole test suite (starts real TorchServe instances on loopback)
	$(PY) -m pytest

test-gpu: ## on a GPU machine: install marpipe (no deps) in a temp folder, run tests/gpu/ against it (DRY=1: on the CPU)
	$(GPU_PYTHON) tests/gpu/run.py $(if $(DRY),--dry)

smoke: build ## serve $(STORE)/ with TorchServe and check each archive answers like eager
	$(MARPIPE) smoke --store $(STORE)

serve: build ## serve $(STORE)/ on 127.0.0.1:8080 with the safe configuration (Ctrl-C stops)
	$(MARPIPE) serve --store $(STORE)

lint: $(STAMP) ## ruff lint and format check
	$(VENV)/bin/ruff check pipeline handlers tests examples benchmarks
	$(VENV)/bin/ruff format --check pipeline handlers tests examples benchmarks

bench: $(STAMP) $(CKPTS) ## packaging, cold-start, throughput, release (-j, cache) and precision (int8 vs fp32) benchmarks (SIZE_GB=1 by default)
	$(PY) benchmarks/bench.py --size-gb $(or $(SIZE_GB),1)
	$(PY) benchmarks/release_bench.py
	$(PY) benchmarks/precision_bench.py

clean: ## remove built archives, reports and example checkpoints
	rm -rf $(STORE)/*.mar $(STORE)/*/ $(STORE)/index.json $(STORE)/.*.lock $(STORE)/.*.tmp build examples/checkpoints .pytest_cache .marpipe-serve

distclean: clean ## also remove the virtual environment
	rm -rf $(VENV) *.egg-info
