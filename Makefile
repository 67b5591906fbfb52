# The two entry points a newcomer needs (see README): `make bench` and `make test`.
# Both install the package first (idempotent): torch must be importable while setup.py builds the
# C++ extension, so torch is installed before the package and the package with --no-build-isolation.
PYTHON ?= python
PIP := $(PYTHON) -m pip

.PHONY: install bench test test-slow lint

install:
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q --no-build-isolation -e ".[test]"

bench: install
	vit-fast bench

test: install
	$(PYTHON) -m pytest -q -m "not slow"

test-slow: install
	$(PYTHON) -m pytest -q -m slow

lint:
	ruff check .
	ruff format --check .
