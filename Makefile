# make train [ARGS="--epochs 3 ..."]   train with CPU TensorFlow in .venv: --preset quick (about two minutes)
#                                     unless ARGS names a preset, e.g. ARGS="--preset default" (the full recipe)
# make install                        .venv with CPU TensorFlow and the [local] extra (deploy.vertex --local, docs/local-jobs.md)
# make test                           the whole test suite (what CI runs)
# Every target is idempotent: the virtual environment is built once and rebuilt when setup.py changes.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install install-test data train test clean

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
	$(PY) -m pytest -q --durations=15 tests

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
