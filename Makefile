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

.PHONY: setup tutorial test selftest docs lab clean sglang-parser-env tools

$(BIN)/ktutorial: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	# --no-deps: skips kt-kernel's torch==2.9.1 pin; its runtime needs are in pyproject.
	$(BIN)/python -m pip install -q --no-deps "$(KT_KERNEL_SPEC)"
	$(BIN)/python -m pip install -q -e ".[docs,test,lab]"
	touch $@

setup: $(BIN)/ktutorial

# tools: notebook 05 runs one real Claude Code turn; sglang-parser-env: notebook 02 checks the
# rendered SGLang command with sglang-kt's own parser. Both are set-up, installed once.
tutorial: setup tools sglang-parser-env
	$(BIN)/ktutorial tutorial --profile $(PROFILE) --out $(OUT)

# The site only, from the notebooks `make tutorial` executed into $(OUT)/notebooks.
docs: setup
	$(BIN)/ktutorial docs --out $(OUT)

# The notebooks by hand: JupyterLab on 127.0.0.1 with notebooks/ as its folder, on their default
# parameters (the tiny profile); prints its URL with the token. Ctrl-C stops it and what it started.
lab: setup tools sglang-parser-env
	$(BIN)/ktutorial lab

selftest: setup
	$(BIN)/ktutorial selftest

test: setup tools sglang-parser-env
	$(BIN)/python -m pytest -q

# The Claude Code CLI, installed project-local from npm (owner: claude code section).
# Pinned: 2.1.197 is what Node 20 gets and the version the tests were run with; newer ones
# want Node 22. --save-exact keeps a later `npm install` in .tools from drifting past the pin.
CLAUDE_CODE_VERSION ?= 2.1.197
CLAUDE_STAMP := $(TOOLS)/.claude-code-$(CLAUDE_CODE_VERSION)

tools: $(CLAUDE_STAMP)

$(CLAUDE_STAMP):
	@command -v npm >/dev/null || { echo "tools: npm is missing: install Node.js 20+ (apt-get install nodejs npm)"; exit 1; }
	@echo "tools: installing @anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION) into $(TOOLS)/"
	@npm install --prefix $(TOOLS) --save-exact --no-audit --no-fund --loglevel=error \
		"@anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION)" >/dev/null
	@$(TOOLS)/node_modules/.bin/claude --version >/dev/null
	touch $@

# A second venv holding sglang-kt's argument parser, to validate rendered commands
# (owner: check-and-plan section). sglang-kt pins a CUDA torch and GPU kernels; its parser needs
# none of them, so the package and the modules `sglang.srt.server_args` imports go in --no-deps
# beside the CPU torch (FACTS.md). The stamp names the list's version: bump it when the list changes.
SGLANG_VENV ?= .venv-sglang
SGLANG_KT_SPEC ?= sglang-kt==0.7.2
# transformers-kt imports torchvision; this is the build made for TORCH_SPEC (change them together).
# Its ops library cannot load beside CPU torch: the parser check registers the two schemas it needs.
TORCHVISION_SPEC ?= torchvision==0.28.0
SGLANG_PARSER_DEPS := transformers-kt==5.6.0.post6 numpy tqdm pybase64 requests urllib3 idna \
	certifi IPython traitlets pygments pydantic pydantic-core typing-inspection annotated-types \
	aiohttp multidict attrs yarl propcache aiohappyeyeballs aiosignal frozenlist orjson packaging \
	regex "huggingface-hub<2" "tokenizers>=0.22,<=0.23.0" safetensors pyyaml httpx httpcore h11 anyio sniffio psutil \
	triton pyzmq pillow starlette jsonschema referencing rpds-py jsonschema-specifications \
	openai==2.6.1 distro partial-json-parser dill sentencepiece "$(TORCHVISION_SPEC)"
SGLANG_STAMP := $(SGLANG_VENV)/.ktutorial-parser-env-2

sglang-parser-env: $(SGLANG_STAMP)

$(SGLANG_STAMP):
	@echo "sglang-parser-env: installing sglang-kt's argument parser into $(SGLANG_VENV) (a few minutes, once)"
	@test -x $(SGLANG_VENV)/bin/python || $(PYTHON) -m venv $(SGLANG_VENV)
	@# pip's output goes to a log, shown only if it fails (this keeps `make test` readable)
	@$(SGLANG_VENV)/bin/python -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)" >$(SGLANG_VENV)/pip.log 2>&1 \
	  && $(SGLANG_VENV)/bin/python -m pip install -q --no-deps "$(SGLANG_KT_SPEC)" $(SGLANG_PARSER_DEPS) \
	  >>$(SGLANG_VENV)/pip.log 2>&1 || { cat $(SGLANG_VENV)/pip.log; exit 1; }
	@touch $@

clean:
	rm -rf $(OUT) site

# What travels to a GPU host with no network for results/gpu-host.sh (results/README.md): the
# committed tree, the offline sglang-kt bundle from shared/, and wheels for running the notebooks
# there (Python 3.12; the host's image has the rest). Versions pinned: the ones the tests ran with.
GPU_HOST_CARRY ?= .gpurun
GPU_HOST_BUNDLE ?= ../shared/sglang-gpu-host
NB_WHEELS := papermill==2.7.0 entrypoints==0.4.2 tenacity==9.2.1 nbclient==0.11.0 nbformat==5.11.1 \
	jupyter_client==8.10.0 jupyter_core==5.9.1 ipykernel==7.4.0 ipython==9.18.1 traitlets==5.16.1 tornado==6.6.1 \
	comm==0.2.3 debugpy==1.8.22 matplotlib-inline==0.2.2 nest-asyncio2==1.7.4 platformdirs==4.14.9 \
	fastjsonschema==2.22.3 ipython-pygments-lexers==1.1.1 jedi==0.20.1 parso==0.8.7 pexpect==4.9.0 ptyprocess==0.7.0 \
	prompt_toolkit==3.0.53 wcwidth==0.9.4 stack_data==0.6.3 executing==2.3.0 asttokens==3.0.2 pure_eval==0.2.4
.PHONY: gpu-host-carry
gpu-host-carry:
	rm -rf $(GPU_HOST_CARRY) && mkdir -p $(GPU_HOST_CARRY)
	git archive HEAD -o $(GPU_HOST_CARRY)/ktutorial.tar
	cp -r $(GPU_HOST_BUNDLE) $(GPU_HOST_CARRY)/bundle && chmod -R u+w $(GPU_HOST_CARRY)/bundle
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform any -d $(GPU_HOST_CARRY)/nbwheels $(NB_WHEELS)
	@echo "gpu-host-carry: $$(du -sh $(GPU_HOST_CARRY) | cut -f1) in $(GPU_HOST_CARRY)/ (commit $$(git rev-parse --short HEAD))"
