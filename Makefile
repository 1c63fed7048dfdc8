# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# torch==2.13.0 is installed first: that pin takes the CPU build on local disk, where a plain
# `torch` requirement would pull a multi-GB CUDA build. The later `pip install -e` then finds it satisfied.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   ?= ../shared/data/glue
DEMO   ?= runs/demo

.PHONY: venv test lint browser demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The report's browser test drives Debian's chromium (Playwright downloads no browser here). Installed
# when missing and apt-get can; otherwise that one test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		{ apt-get install -y -qq chromium >/dev/null 2>&1 || \
		  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; }; }; } || \
		echo "chromium could not be installed: the browser test will be skipped"

test: lint browser
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
	$(PY) cli.py report $(DEMO)/sensitivity.json $(DEMO)/plan-4bit.json $(DEMO)/sst2-fp32 $(DEMO)/sst2-int-4bit \
		--out $(DEMO)/report.html --quiet
	@echo "demo: run $(DEMO)/sst2-fp32, sensitivity $(DEMO)/sensitivity.json, plan $(DEMO)/plan-4bit.json, integer run $(DEMO)/sst2-int-4bit"
	@echo "report: $(CURDIR)/$(DEMO)/report.html"

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
