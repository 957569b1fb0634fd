# One command surface for humans, CI and hooks.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install run lint typecheck system-packages test test-unit test-swarm chaos bench clean

$(PY):
	python3 -m venv $(VENV)

install: $(PY)
	$(PIP) install -c constraints.txt -e '.[all,dev]'

run: install
	$(VENV)/bin/sdswarm up $(ARGS)

lint: install
	$(VENV)/bin/ruff check .

typecheck: install
	$(VENV)/bin/mypy

# Real components from Debian that tests drive: Prometheus (the metrics test) and Chromium
# with its chromedriver (tests/browser). Installed once, as root, with one apt-get update;
# nothing to do once they are there, and nothing is downloaded when the tests run.
DEBIAN_PACKAGES := /usr/bin/prometheus:prometheus /usr/bin/chromium:chromium /usr/bin/chromedriver:chromium-driver
system-packages:
	@missing=""; for entry in $(DEBIAN_PACKAGES); do \
	  [ -x "$${entry%%:*}" ] || missing="$$missing $${entry#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "the tests need Debian's$$missing: run as root (or install them)" >&2; exit 1; \
	  fi; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

# pytest exits 5 when it collects nothing: the suite went missing, which is a failure.
test: lint typecheck system-packages
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# The stack on a live one-node Docker swarm (root): installs docker.io when missing, starts
# dockerd, builds the images from an imported Debian base and a wheelhouse, deploys
# deploy/stack.yml and drives it through its gateway (README "Docker Swarm").
test-swarm: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m swarm tests/swarm $(PYTEST_ARGS)

# The fault-injection suite at full size (CI runs it with 60 tasks per scenario).
chaos: install
	CHAOS_TASKS=$${CHAOS_TASKS:-500} HF_HUB_OFFLINE=1 $(PY) -m pytest tests/chaos $(PYTEST_ARGS)

bench: install
	HF_HUB_OFFLINE=1 $(PY) bench/throughput.py --slots 1,2
	HF_HUB_OFFLINE=1 $(PY) bench/system_overhead.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache build *.egg-info
