# Two commands: `make demo` (the main job, end to end) and `make test` (the
# whole suite). Both install what they need first (scripts/setup.sh).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup test test-unit test-bpf test-netns test-fleet demo bench soak insn-counts lint clean

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

# The reliability tests at full size (packet and policy fuzzing, faults under
# traffic, floods, security); `make test` runs the same tests smaller. Writes
# the figures to build/reliability/ and rewrites docs/reliability.md's block.
SOAK_DIR := build/reliability
SOAK_TESTS := tests/bpf/test_packet_fuzz.py tests/unit/test_policy_fuzz.py tests/bpf/test_policy_fuzz_apply.py \
	tests/bpf/test_conntrack_full.py tests/netns/test_faults.py tests/netns/test_flow_flood.py \
	tests/fleet/test_failsafe.py tests/fleet/test_security.py \
	tests/fleet/test_fleet.py::test_controller_killed_agents_enforce_and_resync \
	tests/fleet/test_etcd_ha.py::test_follower_refuses_writes_and_failover_on_leader_kill
SOAK_SIZES := DATAPLANE_FUZZ_PACKETS=1000000 DATAPLANE_FUZZ_POLICIES=50000 DATAPLANE_FUZZ_APPLY=2000 \
	DATAPLANE_FAULT_KILLS=30 DATAPLANE_FAULT_RESTARTS=10

soak: setup
	rm -rf $(SOAK_DIR)
	DATAPLANE_RELIABILITY_DIR=$(CURDIR)/$(SOAK_DIR) $(SOAK_SIZES) $(PY) -m pytest -o timeout=7200 $(SOAK_TESTS) $(PYTEST_ARGS)
	$(PY) scripts/reliability_report.py $(SOAK_DIR) --write docs/reliability.md

insn-counts: setup
	$(PY) scripts/insn_counts.py --write

clean:
	rm -rf .venv .pytest_cache build *.egg-info
