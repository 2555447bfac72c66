# Two commands do everything on a fresh machine (see README.md):
#   make demo   set up .venv and run the main job on a local, in-process Ray
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test setup clean

setup: $(VENV)/.installed

# Reinstall when the dependency list changes.
$(VENV)/.installed: pyproject.toml scripts/setup_env.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup_env.sh
	touch $@

demo: setup
	$(BIN)/engram-ray demo

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
