# make train   - train the tiny BAGEL-shaped model on the built-in synthetic data (CPU, minutes)
# make test    - the whole test suite (what CI runs through .ci/run)
# make bench   - GPU benchmark table of BENCHMARKS.md (scripts/bench_suite.sh; results in artifacts/bench)
# Extra Hydra overrides go in ARGS, e.g. `make train ARGS="train.max_steps=50 run_name=try2"`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODELS := $(or $(UMM_MODEL_CACHE),artifacts/models)
DATA := $(or $(UMM_DATA),artifacts/data)
OUTPUTS := $(or $(UMM_OUTPUTS),outputs)
TINY := train=tiny optim=tiny model=tiny
ARGS ?=

.PHONY: help install tiny-model synthetic-data train train-recA train-unicot train-irg test golden lint bench bench-app
help:
	@grep -E '^# make ' Makefile | sed 's/^# //'
	@echo "targets: install tiny-model synthetic-data train train-recA train-unicot train-irg test golden lint bench bench-app"

# venv + pinned dependencies; a no-op while requirements, constraints and setup.cfg are unchanged.
install: $(STAMP)
$(STAMP): requirements.txt constraints.txt setup.cfg
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Built once under artifacts/ (each script does nothing when its COMPLETE marker is there).
tiny-model: $(MODELS)/tiny/COMPLETE
$(MODELS)/tiny/COMPLETE: | $(STAMP)
	$(PY) scripts/make_tiny_model.py --out $(MODELS)/tiny

synthetic-data: $(DATA)/synthetic/COMPLETE
$(DATA)/synthetic/COMPLETE: | $(STAMP)
	$(PY) scripts/make_synthetic_data.py --out $(DATA)/synthetic

train: tiny-model synthetic-data
	$(PY) -m umm pipeline=bagel data=synthetic $(TINY) run_name=tiny_bagel $(ARGS)

train-recA: tiny-model synthetic-data
	$(PY) -m umm pipeline=recA data=synthetic_reca $(TINY) run_name=tiny_recA $(ARGS)

# The tiny Bagel is random (its image head starts at zero), so LoRA on its frozen base gets no gradient
# from image loss alone: the tiny run adds CE on the chain texts (upstream's UniCoT has none).
train-unicot: tiny-model synthetic-data
	$(PY) -m umm pipeline=unicot data=synthetic_unicot $(TINY) method.chain_text_loss=true run_name=tiny_unicot $(ARGS)

# IRG: stage 1 then stage 2 (one multirun; the trajectories are synthesized on first use), then
# two-turn inference on every synthetic prompt: first vs improved image prompt-match rates in
# $(OUTPUTS)/$(IRG_RUN)/stage2/irg_infer/results.json. No guidance at inference: IRG never drops
# the prompt or the reflection in training, so a tiny model trained from scratch has no
# unconditional branch to guide against (upstream starts from BAGEL, which has one).
IRG_RUN ?= tiny_irg
train-irg: tiny-model
	$(PY) -m umm pipeline=irg 'data=$${method}' $(TINY) run_name=$(IRG_RUN) $(ARGS)
	$(PY) scripts/irg_infer.py --run $(OUTPUTS)/$(IRG_RUN)/stage2 --synthetic --samples-per-prompt 3 \
		--cfg-text-1 1 --cfg-text-2 1 --cfg-img-2 1

test: install
	$(PY) -m pytest -q

# Regenerate the resolved-config snapshots (tests/toolkit/golden) after an intended config change.
golden: install
	UMM_UPDATE_GOLDEN=1 $(PY) -m pytest -q tests/toolkit/test_compose.py

# No linter is pinned: byte-compile everything and import every entry point.
lint: install
	$(PY) -m compileall -q umm scripts tests
	$(PY) -c "import umm.app, umm.train.worker, umm.launch, umm.pipelines, umm.config.validate"

bench: install
	bash scripts/bench_suite.sh

# The trainer against bench_train.py at the same settings (scripts/bench_app.py; one JSON line).
# e.g. make bench-app BENCH_APP_ARGS="--model-path artifacts/models/bagel_7b_shaped --layers 4"
BENCH_APP_ARGS ?= --tiny --no-compile --steps 4 --drop 1 --tokens 1024
bench-app: install tiny-model
	$(PY) scripts/bench_app.py $(BENCH_APP_ARGS)
