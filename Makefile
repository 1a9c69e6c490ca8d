# make train [ARGS="--epochs 3 ..."]   train with CPU TensorFlow in .venv: --preset quick (about two minutes)
#                                     unless ARGS names a preset, e.g. ARGS="--preset default" (the full recipe)
# make install                        .venv with CPU TensorFlow and the [local] extra (deploy.vertex --local, docs/local-jobs.md)
# make test                           the fast tier: every test not marked slow (a few minutes; before a commit)
# make test-all                       lint, then every test (what CI runs)
# make lint                           ruff and mypy under pyproject.toml's configuration
# make test-colab                     core tests and the Colab notebook under Colab's pinned TensorFlow stack
# Every target is idempotent: the virtual environment is built once and rebuilt when setup.py changes.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install install-test data train test test-all lint test-colab clean

$(VENV)/.installed: setup.py
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cpu,local]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[cpu,local,test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# Real Fashion-MNIST for the offline tests and runs: Debian's dataset-fashion-mnist, where apt exists.
data:
	@if [ -f $(FASHION_MNIST)/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null; then \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	else echo "not a Debian machine: the Fashion-MNIST tests need $(FASHION_MNIST) (IDX files)" >&2; fi

# The quick preset unless ARGS chooses one (--preset NAME or --preset=NAME).
TRAIN_PRESET := $(if $(filter --preset --preset=%,$(ARGS)),,--preset quick)

train: install
	$(PY) -m trainer.task $(TRAIN_PRESET) $(ARGS)

test: install-test data
	$(PY) -m pytest -q -m "not slow" --durations=10 tests

test-all: lint data
	$(PY) -m pytest -q --durations=15 tests

lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Colab's TensorFlow stack (deploy/colab/constraints.txt) in a second environment: the package must install
# there without moving any pin, and the core tests and the notebook must pass on it.
COLAB_VENV ?= .venv-colab
COLAB_PY := $(COLAB_VENV)/bin/python
COLAB_PINS := deploy/colab/constraints.txt
COLAB_TESTS ?= tests/test_config.py tests/test_data.py tests/test_recipe.py tests/test_training.py \
	tests/test_loop_pieces.py tests/test_predict.py tests/test_xla.py tests/test_tpu_setup.py

$(COLAB_VENV)/.installed-test: setup.py $(COLAB_PINS)
	[ -x $(COLAB_PY) ] || $(PYTHON) -m venv $(COLAB_VENV)
	$(COLAB_PY) -m pip install --quiet --upgrade pip
	$(COLAB_PY) -m pip install --quiet -r $(COLAB_PINS)
	$(COLAB_PY) -m pip install --quiet -c $(COLAB_PINS) -e '.[cpu,test]'
	touch $@

test-colab: $(COLAB_VENV)/.installed-test data
	@$(COLAB_PY) -m pip list --format=freeze | tr 'A-Z_' 'a-z-' > $(COLAB_VENV)/installed.txt
	@moved=0; for pin in $$(grep -v '^#' $(COLAB_PINS)); do \
	  grep -qx "$$pin" $(COLAB_VENV)/installed.txt || { moved=1; echo "test-colab: $$pin is not what \
	$(COLAB_VENV) has: $$(grep "^$${pin%%==*}==" $(COLAB_VENV)/installed.txt || echo 'not installed')" >&2; }; \
	done; exit $$moved
	$(COLAB_PY) -m pytest -q -m 'not slow' $(COLAB_TESTS)
	$(COLAB_PY) -m pytest -q tests/test_deploy.py::test_colab_notebook_runs_top_to_bottom_on_cpu

clean:
	rm -rf $(VENV) $(COLAB_VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
