# Two commands: `make demo` (the main job, end to end) and `make test` (the
# whole suite). Both install what they need first (scripts/setup.sh).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup test test-unit test-bpf test-netns test-fleet demo bench insn-counts lint clean

setup:
	@scripts/setup.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

test-bpf: setup
	$(PY) -m pytest -m bpf $(PYTEST_ARGS)

test-netns: setup
	$(PY) -m pytest -m netns $(PYTEST_ARGS)

test-fleet: setup
	$(PY) -m pytest -m fleet $(PYTEST_ARGS)

demo: setup
	$(PY) -m dataplane.demo

bench: setup
	$(PY) bench/suite.py

insn-counts: setup
	$(PY) scripts/insn_counts.py --write

clean:
	rm -rf .venv .pytest_cache build *.egg-info
