# The two commands a fresh machine needs: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $@

demo: setup
	$(PY) -m modelfs.testing.demo

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/streaming.py

clean:
	rm -rf $(VENV) build *.egg-info
