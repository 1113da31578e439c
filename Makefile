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

# torchao for the tests only: float8 training and its low-bit AdamW run on a CPU too (emulated),
# so their conversion, saving and exact resume are tested there. Not in the demo's environment:
# on a CPU-only torch it warns at every import that its CUDA extensions do not load.
$(VENV)/.torchao: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps "torchao>=0.18"
	touch $@

.PHONY: install demo test
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/lmforge demo

test: $(VENV)/.installed $(VENV)/.torchao
	$(PY) -m pytest -q -p no:cacheprovider tests
