# curate pipelines. `make demo` and `make test` are the two set-up commands.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CURATE := $(VENV)/bin/curate

SOURCE ?= danbooru
QUERY  ?= queries/baxl_v3_reg.toml
REG    ?= manifests/baxl_v3_reg.parquet

.PHONY: venv test bench reg clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,ml]'
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest

bench: venv
	$(PY) benchmarks/bench_select.py

$(REG): $(QUERY) | venv
	$(CURATE) build-reg $(QUERY) --source $(SOURCE) --out $@ --no-images

reg: $(REG)

clean:
	rm -rf $(VENV) build *.egg-info
