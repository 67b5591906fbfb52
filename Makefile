# The two entry points a newcomer needs (see README): `make bench` and `make test`.
# Both install the package first. torch must be importable while setup.py builds the C++ extension,
# so torch is installed before the package and the package with --no-build-isolation.
# The install is done once: a stamp file records it, and it is redone only when setup.py,
# pyproject.toml or csrc/ change (or when the stamp is deleted: `make clean-install`).
PYTHON ?= python
PIP := $(PYTHON) -m pip
STAMP := build/.vit_fast-installed

.PHONY: install bench test test-slow lint clean-install

install: $(STAMP)

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
	@echo "vit_fast: installing torch 2.14.1 / torchvision 0.29.1 (nothing to do if already there)"
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	@echo "vit_fast: installing the package and building its C++ extension (csrc/, about 5 minutes on"
	@echo "          2 cores, done once; VIT_FAST_BUILD_EXT=0 skips the extension)"
	@start=$$(date +%s); \
	$(PIP) install -q --no-build-isolation -e ".[test]" && \
	echo "vit_fast: installed in $$(( $$(date +%s) - start )) s" && \
	$(PYTHON) -c "from vit_fast.ops.backend import cpu_extension; print('vit_fast: C++ extension', 'built' if cpu_extension() else 'not built (fallbacks in use)')"
	@mkdir -p $(dir $(STAMP)) && touch $(STAMP)

clean-install:
	rm -f $(STAMP)

bench: install
	vit-fast bench

test: install
	$(PYTHON) -m pytest -q -m "not slow"

test-slow: install
	$(PYTHON) -m pytest -q -m slow

lint:
	ruff check .
	ruff format --check .
