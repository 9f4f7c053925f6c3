# Two commands for a newcomer on a fresh machine; each creates the virtual environment and installs what is missing.
#   make quickstart   train, export and reload small models on the embedded data (hf-vl quickstart)
#   make test         the whole test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hf_vl_installed

.PHONY: quickstart test install bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first, pinned: these builds are the ones this project is tested with
	$(PY) -m pip install "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/hf-vl quickstart

test: $(STAMP)
	# two pytest workers with one thread each: two threads each would oversubscribe a 2-core machine
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 TQDM_DISABLE=1 OMP_NUM_THREADS=1 \
		$(PY) -m pytest -n 2 --durations=25 -q

bench: $(STAMP)
	$(PY) benchmarks/bench_vit.py

clean:
	rm -rf $(VENV) hf_vl_quickstart .pytest_cache
