# curate pipelines. `make demo` and `make test` are the two set-up commands.
#
#   make reg       build-reg + download + caption of the reg set          (QUERY, SOURCE)
#   make cg        ingest + dedupe --against the reg set + crop + tag + caption of CG (CG, MODEL)
#   make dataset   both, then export for kohya sd-scripts                 (CONFIG, KOHYA)
#   make train     curate train CONFIG
#   make report    curate report -> REPORT
#   make review    curate review of CGM and REG: a local web app to triage them (REVIEW_ARGS)
#
# Every stage rewrites its manifest in place, so progress is tracked by stamp files in
# STAMPS (one per manifest and stage): re-running does only what is out of date, and a
# stage whose manifest was deleted runs again. Override any variable on the command
# line, e.g. make dataset SOURCE=hakubooru:danbooru2023.db CG=~/ba_cg MODEL=SmilingWolf/wd-eva02-large-tagger-v3
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CURATE := $(VENV)/bin/curate

SOURCE  ?= danbooru                               # danbooru | hakubooru:PATH | dump:PATH | store:PATH
QUERY   ?= queries/baxl_v3_reg.toml
REG     ?= manifests/$(basename $(notdir $(QUERY))).parquet
CG      ?= official_cg                            # the folder of official CGs / screenshots
CGM     ?= manifests/official_cg.parquet          # its manifest
MODEL   ?= SmilingWolf/wd-vit-tagger-v3           # tagger: hub id or local folder
CONFIG  ?= configs/baxl_v3.toml                   # train config; its [[datasets]] are CGM and REG
KOHYA   ?= manifests/kohya                        # sd-scripts export folder
REPORT  ?= manifests/report.html
STAMPS  ?= $(dir $(REG)).make
# extra options per stage, e.g. FETCH_ARGS="--tag-limit 6" TAG_ARGS="--device cuda"
FETCH_ARGS    ?=
DOWNLOAD_ARGS ?=
CROP_ARGS     ?= --max-pixels 2048x2048
TAG_ARGS      ?=
TRAIN_ARGS    ?=
# made before the CG folder is listed (the demo generates its folder here)
CG_READY ?=

SOURCE := $(strip $(SOURCE))
CG     := $(strip $(CG))
CGM    := $(strip $(CGM))
MODEL  := $(strip $(MODEL))
CONFIG := $(strip $(CONFIG))
KOHYA  := $(strip $(KOHYA))

stamp = $(STAMPS)/$(notdir $(1)).$(2)
again_if_missing = $(if $(wildcard $(1)),,FORCE)   # a deleted manifest makes its first stage run again

REG_SELECT   := $(call stamp,$(REG),select)
REG_DOWNLOAD := $(call stamp,$(REG),download)
REG_CAPTION  := $(call stamp,$(REG),caption)
CG_LIST      := $(call stamp,$(CGM),files)
CG_INGEST    := $(call stamp,$(CGM),ingest)
CG_DEDUPE    := $(call stamp,$(CGM),dedupe)
CG_CROP      := $(call stamp,$(CGM),crop)
CG_TAG       := $(call stamp,$(CGM),tag)
CG_CAPTION   := $(call stamp,$(CGM),caption)
EXPORTED     := $(KOHYA)/dataset_config.toml
TRAINED      := $(call stamp,$(CONFIG),train)

.PHONY: venv test bench reg cg dataset train report review demo demo-review clean clean-demo FORCE

# --- environment ------------------------------------------------------------------

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,ml,onnx,ray,review]'
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest

# every CPU benchmark (the GPU ones need a GPU: make bench BENCH=benchmarks/bench_train_gpu.py)
BENCH ?= $(filter-out %_gpu.py,$(sort $(wildcard benchmarks/bench_*.py)))
bench: venv
	$(PY) -m pip install -q -e '.[bench]'
	@for b in $(BENCH); do echo "== $$b"; $(PY) $$b || exit 1; done

# --- the reg set -------------------------------------------------------------------

$(REG_SELECT): $(QUERY) $(wildcard $(dir $(QUERY))artists/*.txt) $(call again_if_missing,$(REG)) | venv
	@mkdir -p $(@D)
	$(CURATE) build-reg $(QUERY) --source $(SOURCE) --out $(REG) --no-images $(FETCH_ARGS)
	@touch $@

$(REG_DOWNLOAD): $(REG_SELECT)
	$(CURATE) download $(REG) $(DOWNLOAD_ARGS)
	@touch $@

$(REG_CAPTION): $(REG_DOWNLOAD)
	$(CURATE) caption $(REG)
	@touch $@

reg: $(REG_CAPTION)

# --- the official CG set --------------------------------------------------------------

# The folder's listing (name, size, mtime of every file), rewritten only when it changed:
# a new, removed or edited file makes ingest run again; names may hold spaces.
$(CG_LIST): FORCE $(CG_READY)
	@mkdir -p $(@D)
	@test -d "$(CG)" || { echo "error: CG folder '$(CG)' not found (make cg CG=path/to/folder)" >&2; exit 2; }
	@find "$(CG)" -type f -printf '%P\t%s\t%T@\n' | LC_ALL=C sort > $@.new
	@if cmp -s $@.new $@; then rm $@.new; else mv $@.new $@; fi

$(CG_INGEST): $(CG_LIST) $(call again_if_missing,$(CGM)) | venv
	$(CURATE) ingest "$(CG)" --out $(CGM) --name $(basename $(notdir $(CGM)))
	@touch $@

$(CG_DEDUPE): $(CG_INGEST) $(REG_DOWNLOAD)
	$(CURATE) dedupe $(CGM) --against $(REG)
	@touch $@

$(CG_CROP): $(CG_DEDUPE)
	$(CURATE) crop $(CGM) $(CROP_ARGS)
	@touch $@

$(CG_TAG): $(CG_CROP) $(wildcard $(MODEL)/*)   # a local model folder that changed re-tags
	$(CURATE) tag $(CGM) --model $(MODEL) $(TAG_ARGS)
	@touch $@

$(CG_CAPTION): $(CG_TAG)
	$(CURATE) caption $(CGM)
	@touch $@

cg: $(CG_CAPTION)

# --- export, train, report ----------------------------------------------------------------

$(EXPORTED): $(REG_CAPTION) $(CG_CAPTION) $(CONFIG)
	$(CURATE) export $(CGM) $(REG) --kohya $(KOHYA) --config $(CONFIG)

dataset: $(EXPORTED)

# out of date = the data or the config changed: a new run (`curate train CONFIG --resume` continues one)
$(TRAINED): $(REG_CAPTION) $(CG_CAPTION) $(CONFIG)
	$(CURATE) train $(CONFIG) --overwrite $(TRAIN_ARGS)
	@touch $@

train: $(TRAINED)

$(REPORT): $(REG_CAPTION) $(CG_CAPTION)
	$(CURATE) report $(CGM) $(REG) --out $(REPORT)

report: $(REPORT)

# a person's decisions (<manifest>.decisions.jsonl) are obeyed by every stage above
REVIEW_ARGS ?=
review: | venv
	$(CURATE) review $(CGM) $(REG) $(REVIEW_ARGS)

# --- the offline demo ----------------------------------------------------------------------
# The main job on an embedded default: a generated corpus served by a Danbooru look-alike
# on 127.0.0.1 (so the live source and the downloader run over real HTTP), a generated CG
# folder, a tiny tagger and tiny-random SDXL; the pipeline targets above do the rest.
DEMO ?= demo
DEMO_POSTS ?= 1500
DEMO_TARGETS ?= dataset train report
DEMO_VARS = SOURCE=danbooru QUERY=queries/demo_reg.toml REG=$(DEMO)/manifests/demo_reg.parquet \
	CG=$(DEMO)/cg CGM=$(DEMO)/manifests/official_cg.parquet CG_READY=$(DEMO)/.cg.complete \
	MODEL=$(DEMO)/tagger CONFIG=$(DEMO)/train.toml KOHYA=$(DEMO)/kohya REPORT=$(DEMO)/report.html \
	STAMPS=$(DEMO)/.make FETCH_ARGS="--rate 50" CROP_ARGS="--max-pixels 384x384" \
	TAG_ARGS="--device cpu --batch-size 8" TRAIN_ARGS=--quiet

demo: venv
	$(PY) -m curate.demo prepare $(DEMO) --posts $(DEMO_POSTS)
	OMP_NUM_THREADS=1 $(PY) -m curate.demo serve $(DEMO)/corpus -- \
		$(MAKE) --no-print-directory $(DEMO_TARGETS) $(DEMO_VARS)
	@$(PY) -m curate.demo summary $(DEMO)

# demo only: the CG folder is made after the reg set, so it can hold a repost of a reg image
$(DEMO)/.cg.complete: $(call stamp,$(DEMO)/manifests/demo_reg.parquet,download)
	$(PY) -m curate.demo cg $(DEMO)/cg --reg $(DEMO)/manifests/demo_reg.parquet

demo-review:
	@$(MAKE) --no-print-directory review $(DEMO_VARS)

clean-demo:
	rm -rf $(DEMO)

clean:
	rm -rf $(VENV) build *.egg-info
