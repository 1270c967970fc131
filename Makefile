# `make demo` and `make test` work on a fresh machine with only Python and pip:
# each creates .venv when missing and installs vlkit with what it needs.
# constraints.txt pins the CPU torch that lies on this machine's disk; the package itself
# accepts newer torch (see pyproject.toml) for GPU users who install it their own way.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vlkit-installed

.PHONY: install demo test clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vlkit demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
