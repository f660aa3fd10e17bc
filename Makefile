# Shorthands for machines that have make; the README's commands are `sh run.sh demo|test`
# (a bare Debian root has no make).
VENV ?= .venv

.PHONY: setup demo test serve bench clean

setup:
	sh scripts/setup.sh test $(VENV)

demo:
	sh run.sh demo

test:
	sh run.sh test

serve:
	sh run.sh serve

bench: setup
	$(VENV)/bin/python benchmarks/streaming.py

clean:
	rm -rf $(VENV) build dist *.egg-info
