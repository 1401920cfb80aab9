# curate pipelines. `make demo` and `make test` are the two set-up commands.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CURATE := $(VENV)/bin/curate

SOURCE ?= danbooru
QUERY  ?= queries/baxl_v3_reg.toml
REG    ?= manifests/baxl_v3_reg.parquet

DEMO   ?= demo

.PHONY: venv test bench reg demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,ml,onnx]'
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest

bench: venv
	$(PY) benchmarks/bench_select.py

$(REG): $(QUERY) | venv
	$(CURATE) build-reg $(QUERY) --source $(SOURCE) --out $@ --no-images

reg: $(REG)

# The main job on an embedded default, offline: a generated Danbooru-like corpus
# -> local store -> artist ranking -> the BAXL v3 reg set -> inspect.
demo: venv
	$(PY) -m curate.synthetic $(DEMO)/corpus --posts 20000
	$(CURATE) sync hakubooru:$(DEMO)/corpus/danbooru.db --store $(DEMO)/store --aliases $(DEMO)/corpus/tag_aliases.json
	$(CURATE) artists --source store:$(DEMO)/store --copyright blue_archive --min-posts 20 --top 25 --out $(DEMO)/celluloid.txt
	$(CURATE) build-reg $(QUERY) --source store:$(DEMO)/store --out $(DEMO)/manifests/baxl_v3_reg.parquet --no-images
	$(CURATE) inspect $(DEMO)/manifests/baxl_v3_reg.parquet

clean:
	rm -rf $(VENV) build *.egg-info
