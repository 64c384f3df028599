# The two commands a reader needs: `make tutorial` and `make test`. Everything else supports them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch: kt-kernel's extension links no libtorch, so its torch==2.9.1 pin
# (a multi-GB CUDA build) is not needed on machines without a GPU. Readers off this
# network can add TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
KT_KERNEL_SPEC ?= kt-kernel==0.7.2
PROFILE ?= tiny
OUT ?= build

TOOLS ?= .tools
export PATH := $(CURDIR)/$(TOOLS)/node_modules/.bin:$(PATH)

.PHONY: setup tutorial test selftest docs clean sglang-parser-env tools

$(BIN)/ktutorial: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	# --no-deps: skips kt-kernel's torch==2.9.1 pin; its runtime needs are in pyproject.
	$(BIN)/python -m pip install -q --no-deps "$(KT_KERNEL_SPEC)"
	$(BIN)/python -m pip install -q -e ".[docs,test]"
	touch $@

setup: $(BIN)/ktutorial

tutorial: setup
	$(BIN)/ktutorial tutorial --profile $(PROFILE) --out $(OUT)

selftest: setup
	$(BIN)/ktutorial selftest

test: setup tools sglang-parser-env
	$(BIN)/python -m pytest -q

# The Claude Code CLI, installed project-local from npm (owner: claude code section).
tools:
	@echo "tools: nothing yet"

# A second venv holding sglang-kt's argument parser, to validate rendered commands
# (owner: check-and-plan section).
sglang-parser-env:
	@echo "sglang-parser-env: nothing yet"

clean:
	rm -rf $(OUT) site
