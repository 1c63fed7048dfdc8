# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# torch==2.13.0 is installed first: that pin takes the CPU build on local disk, where a plain
# `torch` requirement would pull a multi-GB CUDA build. The later `pip install -e` then finds it satisfied.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   ?= ../shared/data/glue
DEMO   ?= runs/demo

.PHONY: venv test lint demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest

# The main job end to end at small scale on the packaged model and real GLUE data.
demo: $(STAMP)
	$(PY) cli.py finetune minilm-l6 --task sst2 --data $(DATA) --max-train-examples 2000 \
		--max-eval-examples 872 --epochs 1 --max-length 64 --out $(DEMO)/sst2-fp32 --overwrite
	$(PY) cli.py evaluate $(DEMO)/sst2-fp32
	$(PY) cli.py analyze $(DEMO)/sst2-fp32 --task sst2 --data $(DATA) --max-train-examples 2000 \
		--batches 2 --batch-size 16 --max-length 64 --trace-probes 16 --overwrite --out $(DEMO)/sensitivity.json
	$(PY) cli.py plan $(DEMO)/sst2-fp32 --budget 4bit --sensitivity $(DEMO)/sensitivity.json \
		--out $(DEMO)/plan-4bit.json --baselines --overwrite
	$(PY) cli.py train $(DEMO)/sst2-fp32 --plan $(DEMO)/plan-4bit.json --mode int --task sst2 --data $(DATA) \
		--max-train-examples 2000 --max-eval-examples 872 --epochs 1 --max-length 64 --lr 2e-5 \
		--out $(DEMO)/sst2-int-4bit --overwrite
	$(PY) cli.py evaluate $(DEMO)/sst2-int-4bit
	@echo "demo: run $(DEMO)/sst2-fp32, sensitivity $(DEMO)/sensitivity.json, plan $(DEMO)/plan-4bit.json, integer run $(DEMO)/sst2-int-4bit"

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
