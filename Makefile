# llmopt: two commands on a fresh clone: `make demo` (install, prepare SmolLM2, export, run) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LLMOPT := $(VENV)/bin/llmopt
MODEL := models/SmolLM2-135M-Instruct
PROMPT ?= Write a haiku about compilers.
# Test selection: everything (slow end-to-end tests included) unless overridden, e.g. make test PYTEST_ARGS='-m "not slow"'.
PYTEST_ARGS ?=

.PHONY: install model demo test test-fast bench install-peer clean install-neuron install-tensorrt install-gpu

install: $(VENV)/.installed

# The CPU set is pinned in constraints-cpu.txt (see README: why these versions).
$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[onnx,openvino,modelopt,adapters,hub,bench,serve,ray,dev]'
	touch $@

model: $(MODEL)/config.json

$(MODEL)/config.json: | install
	$(PY) scripts/prepare_model.py --out $(MODEL)

demo: install model
	$(LLMOPT) export --config configs/smollm2-onnx.yaml -o out/smol-onnx --force
	$(LLMOPT) export --config configs/smollm2-openvino.yaml -o out/smol-ov --force
	$(LLMOPT) run out/smol-onnx "$(PROMPT)"
	$(LLMOPT) run out/smol-ov "$(PROMPT)"

test: install model
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install model
	$(PY) bench/run_all.py

# llama.cpp (llama-cpp-python): the bench's peer (bench/llamacpp_peer.py) and the tokenizer reference of
# tests/test_gguf_tokenizer.py. Compiles llama.cpp from source (CI runs it while `make model` does);
# no multimodal (llava/mtmd) library and no curl, which it needs for neither.
PEER_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
install-peer: install
	CMAKE_ARGS="$(PEER_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q llama-cpp-python==0.3.36

# Separate environments: these stacks pin their own optimum/transformers and cannot share the CPU set.
# optimum-neuron 0.4.5 takes Python 3.10 or 3.11.
NEURON_PYTHON ?= python3.10
install-neuron:
	@echo "Needs an Inferentia2/Trainium host (or a CPU host for compile_only) and the AWS Neuron pip repository."
	$(NEURON_PYTHON) -m venv .venv-neuron
	.venv-neuron/bin/pip install -q --upgrade pip
	.venv-neuron/bin/pip install --extra-index-url https://pip.repos.neuron.amazonaws.com -e '.[neuron,dev]'

# TensorRT-LLM 1.2.1 publishes cp310 and cp312 wheels, on NVIDIA's index only.
TENSORRT_PYTHON ?= python3.12
install-tensorrt:
	$(TENSORRT_PYTHON) -m venv .venv-tensorrt
	.venv-tensorrt/bin/pip install -q --upgrade pip
	.venv-tensorrt/bin/pip install --extra-index-url https://pypi.nvidia.com -e '.[tensorrt,dev]'

install-gpu:
	$(PYTHON) -m venv .venv-gpu
	.venv-gpu/bin/pip install -q --upgrade pip
	.venv-gpu/bin/pip install -e '.[gpu,dev]'

clean:
	rm -rf out .pytest_cache
