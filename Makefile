# The two commands of a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing and install the project into it.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pathgan-installed
# The machine's own pins (torch builds that lie on the CI disk); users install from pyproject.
PIP_INSTALL := $(PY) -m pip install --disable-pip-version-check -c constraints.txt

.PHONY: venv demo test lint clean gpu-wheels gpu-check

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) torch torchvision
	$(PIP_INSTALL) -e '.[tensorflow-cpu,inception,parquet,dev]'
	@touch $@

demo: $(STAMP)
	$(PY) -m pathgan demo --out demo

test: $(STAMP)
	$(PY) -m pytest
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash tests/slurm/run.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs demo shards/*/ .pytest_cache gpu-check-out

# The GPU check (bench/gpu_check.sh): a bare GPU machine with no network gets the wheels it
# lacks from .whl/ (CPython 3.12, manylinux x86-64), and the commit from .whl/COMMIT when no .git
# comes along. Run gpu-wheels here, then gpu-check there with .whl beside the checkout.
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64

gpu-wheels:
	$(PYTHON) -m pip download --disable-pip-version-check --only-binary=:all: --no-deps \
		--python-version 3.12 --implementation cp $(GPU_PLATFORMS:%=--platform %) \
		-d .whl -r bench/gpu_wheels.txt
	echo "$$(git rev-parse HEAD)$$(git diff --quiet HEAD || echo ' with uncommitted changes')" \
		> .whl/COMMIT
	@du -ch .whl/*.whl | tail -n 1

gpu-check:
	bash bench/gpu_check.sh
