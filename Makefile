# Two entry points: `make demo` and `make test`. Each creates .venv and installs on first use.
#   PYTHON=...       the interpreter for .venv; by default the first of PYTHONS on PATH that runs
#                    (a pyenv shim of a version not installed does not) and meets pyproject.toml's
#                    requires-python
#   TORCH_INDEX=...  a PyTorch wheel index for torch and torchvision, e.g.
#                    https://download.pytorch.org/whl/cpu; by default PyPI's (the CUDA build on Linux)
PYTHONS := python3 python3.13 python3.12 python3.11 python3.10
PY_MIN := $(shell sed -n 's/^requires-python = ">=\([0-9.]*\)"$$/\1/p' pyproject.toml)
PY_FITS := import sys, venv, ensurepip; sys.exit(sys.version_info < tuple(map(int, "$(PY_MIN)".split("."))))
CPU_INDEX := https://download.pytorch.org/whl/cpu
# PyPI takes no local version labels (`+cpu`) and PyTorch's indexes label every build, so a torch
# without one means pip fell back to another index (one added by pip.conf) when TORCH_INDEX failed.
TORCH_FROM_INDEX := import sys, importlib.metadata as m; v = m.version("torch"); "+" in v or sys.exit(\
	f"make: torch {v} is not from TORCH_INDEX=$(TORCH_INDEX) (unreachable? see the pip warnings above)")
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export DS_ACCELERATOR ?= cpu
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@for p in $(or $(PYTHON),$(PYTHONS)); do \
	  if $$p -c '$(PY_FITS)' 2>/dev/null; then echo "$$p -m venv $(VENV)"; exec $$p -m venv $(VENV); fi; \
	done; \
	echo "make: no Python >= $(PY_MIN) with venv and ensurepip among: $(or $(PYTHON),$(PYTHONS));" \
	  "install one, or name it: make PYTHON=/path/to/python3" >&2; exit 2
	@[ -n "$(TORCH_INDEX)" ] || command -v nvidia-smi >/dev/null || echo "make: no GPU here, but installing" \
	  "PyPI's torch: the CUDA build, about 5 GB with its nvidia and triton wheels (it runs on CPUs too)." \
	  "For the CPU build (0.7 GB): rm -rf $(VENV); make install TORCH_INDEX=$(CPU_INDEX) (README, Set-up)"
	$(if $(TORCH_INDEX),$(BIN)/pip install --quiet --no-deps --index-url $(TORCH_INDEX) -c constraints.txt torch torchvision)
	$(if $(TORCH_INDEX),@$(BIN)/python -c '$(TORCH_FROM_INDEX)')
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	bash scripts/ensure_slurm.sh
	$(BIN)/pytest -q -p no:cacheprovider $(if $(SSLFORGE_ALL_TESTS),,-m "not slow") $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_loaders.py
	$(BIN)/python benchmarks/bench_train_step.py
	$(BIN)/python benchmarks/bench_clustering.py

clean:
	rm -rf $(VENV) demo_runs
