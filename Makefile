# parallel_nn — `make train` and `make test` are all a new user needs.
#
# The interpreter: `make ... PYTHON=python3.12` chooses one; without PYTHON, the venv is built with
# the fastest that works here (tools/pythons: PyPy, then the newest CPython >= 3.12, then python3),
# and rebuilt when that choice, pyproject.toml or EXTRAS change. EXTRAS=dev,ray adds the Ray backend
# (CPython only: Ray has no PyPy build).
PYTHON ?=
VENV   ?= .venv
EXTRAS ?= dev
PY     := $(VENV)/bin/python
ARGS   ?=
# PyPy before 7.3.16 (Debian 12's is 7.3.11) now and then dies of a segmentation fault while pytest
# rewrites a test file's asserts: a bug in its incremental garbage collector, which marking in one
# step avoids (parallel_nn/__main__.py sets the same for the trainer). CPython ignores it.
PYTEST := PYPY_GC_INCREMENT_STEP=$${PYPY_GC_INCREMENT_STEP:-64GB} $(PY) -m pytest

.PHONY: install datasets train record test bench bench-interpreters clean

install:
	@tools/venv $(VENV) $(EXTRAS) $(PYTHON)

datasets: install
	$(PY) -m parallel_nn download

train: datasets
	$(PY) -m parallel_nn $(ARGS)

# The best recipe found for 784-32-32-10 in <= 20 epochs (docs/accuracy.md): 98.03% (seed 0).
record: datasets
	$(PY) -m parallel_nn --epochs 20 --lr-schedule onecycle --lr 0.4 --rotate 10 $(ARGS)

test: install
	$(PYTEST)

bench: datasets
	$(PYTEST) --benchmark-only --benchmark-group-by=group --benchmark-columns=min,median,mean,rounds
	$(PY) -m bench.ceiling
	$(PY) -m bench.speedup
	$(PY) -m bench.scaling --plot docs/scaling.png

# Every supported interpreter found here, side by side (each gets its own venv, .venv-<name>).
bench-interpreters: datasets
	$(PY) -m bench.interpreters

clean:
	rm -rf $(VENV) $(VENV).old .venv-* .pytest_cache .benchmarks *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
