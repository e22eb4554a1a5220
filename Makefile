# kovicap: `make demo` (the main job on the synthetic corpus, CPU) and `make test` (what CI runs).
# Both create .venv and install the pinned requirements on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# pip's user configuration on these machines adds a find-links folder holding a CPU-only torch wheel
# that breaks torchvision; bypass every config file and pip env override so the registry build is used.
PIP    := env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u PIP_NO_INDEX \
          PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 $(VENV)/bin/python -m pip
RUN    := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY)

.PHONY: venv test test-tiers test-fast lint format demo demo-control bench gpu-wheels clean

venv: $(STAMP)

# uv installs the same pins as pip would, with parallel downloads: 39-46 s for this 6 GB stack from a fresh
# clone with an empty cache, against pip's 4-5 min (2 cores; 2026-12-01). It reads none of pip's
# configuration; UV_NO_CONFIG and the unset UV_* overrides keep its own out too. requirements.lock fixes
# every transitive version. --compile-bytecode as pip does (+25 s): this machine's environment sets
# PYTHONDONTWRITEBYTECODE=1, so without .pyc files every process compiled the stack it imports again
# (30 s to import the training stack against 16 s; the fresh-clone make test took 19 min 29 s so).
UV     := env -u UV_INDEX_URL -u UV_EXTRA_INDEX_URL -u UV_DEFAULT_INDEX -u UV_INDEX -u UV_FIND_LINKS \
          -u UV_NO_INDEX -u UV_CONSTRAINT -u UV_OVERRIDE UV_NO_CONFIG=1 $(VENV)/bin/uv

$(STAMP): requirements.txt requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q uv==0.13.9
	$(UV) pip install -q --compile-bytecode --python $(PY) -r requirements.txt -c requirements.lock
	$(UV) pip install -q --python $(PY) --no-deps -e .
	touch $@

# Two pytest workers: most tests keep one core busy (imports, subprocesses, small ops), so two run
# side by side; each worker and its subprocesses use one OpenMP thread (tests/conftest.py). Whole files
# per worker (module fixtures built once), in the order conftest gives: the real-shape tier file, then
# files with slow tests.
XDIST  := -n 2 --dist loadfile --no-loadscope-reorder

test: $(STAMP)
	$(RUN) -m pytest -q $(XDIST) --durations=15

# The four real-shape tiers alone (make test runs them too), one after another, each printing its report.
test-tiers: $(STAMP)
	$(RUN) -m pytest -q -s tests/vlm/test_real_tiers.py

test-fast: $(STAMP)
	$(RUN) -m pytest -q $(XDIST) -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: $(STAMP)
	$(RUN) -m vlm.demo

demo-control: $(STAMP)
	$(RUN) -m vlm.demo control=true

bench: $(STAMP)
	$(RUN) -m bench.decode
	$(RUN) -m bench.train_step
	$(RUN) -m bench.caption
	$(RUN) -m bench.moe
	$(RUN) -m bench.plan
	$(RUN) -m bench.cache

# The wheels bench/gpu/run.sh installs on the GPU machine (no network there): cp312 manylinux, into
# .gpu-wheels/ (ignored; carried with the device call), checked against the 64 MiB per-call limit.
gpu-wheels: $(STAMP)
	env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u PIP_NO_INDEX \
	  PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 $(PY) -m bench.gpu.wheels

clean:
	rm -rf outputs .pytest_cache .ruff_cache
