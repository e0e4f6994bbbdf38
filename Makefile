# Two commands do everything on a fresh machine:
#   make demo      -> creates .venv if missing, installs orthofx, runs the main job
#   make test      -> creates .venv if missing, runs the fast suite: every test not marked slow,
#                     on TEST_WORKERS=2 pytest-xdist workers (under 5 minutes on 2 idle cores)
# The full suite:
#   make test-all  -> every test, the slow ones too (DDP, FSDP, Lightning, HF, the demo, the
#                     end-to-end runs, the heavy corpora, the full Hypothesis examples); CI runs this
#   make test-slow -> make test-all under the long Hypothesis profile (500 examples a property)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.orthofx-installed
# torch 2.14.1 + torchvision 0.29.1 is the pair that installs from local files here.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
OUT ?= out/demo
# xdist workers of `make test` (each uses one torch thread, see tests/conftest.py)
TEST_WORKERS ?= 2

.PHONY: venv test test-all test-slow demo data bench docs clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS) || $(BIN)/python -m pip install -q torch torchvision
	$(BIN)/python -m pip install -q -e '.[all]'
	touch $(STAMP)

# Fashion-MNIST for the demo: Debian's package when we may install it, else torchvision's download.
data:
	@test -d /usr/share/datasets/fashion-mnist || \
	  ( (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	     (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	      (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1))) || \
	    echo "note: could not install dataset-fashion-mnist; orthofx will try torchvision's download" )

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -n $(TEST_WORKERS) --dist loadfile

# every test: the README's `make test` (the fast set, on xdist workers), then the slow set serially
test-all: test
	$(BIN)/python -m pytest -m slow

test-slow: $(STAMP)
	HYPOTHESIS_PROFILE=slow $(BIN)/python -m pytest

demo: $(STAMP) data
	$(BIN)/python -m orthofx demo --out $(OUT)

bench: $(STAMP)
	$(BIN)/python benchmarks/linalg_bench.py --quick --json out/bench/linalg.json

# API reference (HTML from the docstrings, pdoc) in out/docs/api; fails on import/render errors.
docs: $(STAMP)
	$(BIN)/python docs/build_api.py --out out/docs/api

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
