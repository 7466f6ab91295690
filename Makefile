# parallel_nn — `make train` and `make test` are all a new user needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
ARGS   ?=

.PHONY: install datasets train test bench clean

# The virtual environment is rebuilt whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

datasets: install
	$(PY) -m parallel_nn download

train: datasets
	$(PY) -m parallel_nn $(ARGS)

test: install
	$(PY) -m pytest

bench: datasets
	$(PY) -m pytest --benchmark-only --benchmark-group-by=group --benchmark-columns=min,median,mean,rounds
	$(PY) -m bench.scaling

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
