# Two commands for a new user: `make run` (set up, then the whole study on the toy default)
# and `make test` (set up, then the test suite). Everything runs from the project venv.
SHELL := /bin/bash
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PYTHONPATH := $(CURDIR)

.PHONY: setup run test lint bench compare

setup:
	@bash tools/setup.sh

run: setup
	dvc repro

test: setup
	@bash slurm/local-cluster/install.sh
	ruff check pipeline stages tests bench
	python -m pytest -q --durations=40 tests

lint: setup
	ruff check pipeline stages tests bench

bench: setup
	python -m bench.loader
	python -m bench.loader_parts
	python -m bench.convert
	python -m bench.negatives
	python -m bench.pretrain_step
	python -m bench.lineval
	python -m bench.detection
	python -m bench.scaling
	python -m bench.resolution

compare: setup
	python -m pipeline.compare
