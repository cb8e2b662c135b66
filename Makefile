# The two commands of a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing and install the project into it.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pathgan-installed
# The machine's own pins (torch builds that lie on the CI disk); users install from pyproject.
PIP_INSTALL := $(PY) -m pip install --disable-pip-version-check -c constraints.txt

.PHONY: venv demo test lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) torch torchvision
	$(PIP_INSTALL) -e '.[tensorflow-cpu,inception,dev]'
	@touch $@

demo: $(STAMP)
	$(PY) -m pathgan demo --out demo

test: $(STAMP)
	$(PY) -m pytest
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash tests/slurm/run.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs demo shards/*/ .pytest_cache
