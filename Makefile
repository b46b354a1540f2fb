# vitq — make setup | demo | test | test-slow | bench
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
VITQ_ASSETS ?= ../shared/assets
export VITQ_ASSETS
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test test-slow bench bench-foundation bench-data-free bench-search bench-mptq bench-mixed bench-deploy bench-accuracy clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet -e '.[test,plots,deploy]' $(TORCH_PINS)
	touch $@

# Quantize the bundled CIFAR-10 reference ViT to W4A8 with the default (recommended) recipe; print the table.
demo: setup
	$(BIN)/vitq quantize $(VITQ_ASSETS)/models/vit_cifar10_d6.pth --w-bits 4 --a-bits 8 \
		--calib $(VITQ_ASSETS)/cifar10/train --num-calib 256 \
		--eval $(VITQ_ASSETS)/cifar10/test --num-eval 2000 --device cpu --out runs/demo-w4a8 --overwrite

test: setup
	$(BIN)/python -m pytest -q --doctest-modules --durations=25 vitq tests

# End-to-end checks on the real models and images of $(VITQ_ASSETS)
test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# All benchmarks on the real assets (hours on 2 CPU cores); each also runs alone.
bench: bench-foundation bench-data-free bench-search bench-mptq bench-mixed bench-deploy bench-accuracy

bench-foundation: setup
	$(BIN)/python benchmarks/foundation.py --assets $(VITQ_ASSETS)

bench-data-free: setup
	$(BIN)/python benchmarks/data_free.py --assets $(VITQ_ASSETS)

bench-search: setup
	$(BIN)/python benchmarks/search.py --assets $(VITQ_ASSETS)

bench-mptq: setup
	$(BIN)/python benchmarks/mptq.py --assets $(VITQ_ASSETS)

bench-mixed: setup
	$(BIN)/python benchmarks/mixed.py --assets $(VITQ_ASSETS)

bench-deploy: setup
	$(BIN)/python benchmarks/deploy.py --assets $(VITQ_ASSETS)

bench-accuracy: setup
	$(BIN)/python benchmarks/accuracy.py --assets $(VITQ_ASSETS)

clean:
	rm -rf $(VENV) runs .pytest_cache
