# Two commands do everything on a fresh machine (see README.md):
#   make demo   set up .venv and run the main job on a local, in-process Ray
#   make test   set up .venv and run the test suite
#   make lint   ruff and mypy (CI runs it before the tests)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint setup clean bench

setup: $(VENV)/.installed

# Reinstall when the dependency list changes.
$(VENV)/.installed: pyproject.toml scripts/setup_env.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup_env.sh
	touch $@

demo: setup
	$(BIN)/engram-ray demo

test: setup
	$(BIN)/python -m pytest -q

# Lint, import order and types (configured in pyproject.toml); .ci/run runs it before the tests.
lint: setup
	$(BIN)/ruff check engram_ray tests examples scripts
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# Regenerate every benchmark (results/*.json + *.png) and the results page docs/RESULTS.md.
bench: setup
	$(BIN)/engram-ray bench hash --out results/hash.json
	$(BIN)/engram-ray bench lookup --out results/lookup.json
	$(BIN)/engram-ray bench latency-vs-size --out results/latency.json
	$(BIN)/engram-ray bench latency-vs-size --storage mmap --sizes 0.25 0.5 1 2 --calls 30 --out results/latency_mmap.json
	$(BIN)/engram-ray bench offload --repeats 100 --out results/offload.json
	$(BIN)/engram-ray bench offload --cache-gib 0.25 --out results/offload_cache.json
	$(BIN)/engram-ray bench interference --out results/interference.json
	$(BIN)/engram-ray bench overlap --iterations 400 --out results/overlap.json
	$(BIN)/engram-ray bench cache --out results/cache.json
	$(BIN)/engram-ray experiment allocation --out results/allocation.json
	$(BIN)/engram-ray experiment iso --out results/iso.json
	$(BIN)/engram-ray analyze --out results/analyze.json
	$(BIN)/engram-ray bench agent-hop --out results/agent_hop.json
	$(BIN)/engram-ray bench agent-hop --agent-cores worker --out results/agent_hop_own_core.json
	$(BIN)/engram-ray bench load --out results/load.json
	$(BIN)/engram-ray bench recovery --out results/recovery.json
	$(BIN)/engram-ray bench report --results results --out docs/RESULTS.md
