# Two commands that work on a fresh machine; each creates its own environment in .venv.
#   make demo   build a tiny chat model end to end on CPU (lmforge demo)
#   make test   run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; a bare `torch` would pull a multi-GB CUDA build. Override on a GPU
# machine, e.g. `make test TORCH=torch`.
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test]'
	# DeepSpeed for the seed command-line tests; its CUDA ops are not built (they JIT-compile
	# on first use, and on a CPU machine only the small CPU ops are used).
	DS_BUILD_OPS=0 $(PY) -m pip install -q deepspeed
	touch $@

.PHONY: install demo test
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/lmforge demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider tests
