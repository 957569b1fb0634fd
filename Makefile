# One command surface for humans, CI and hooks.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install run lint typecheck test test-unit browser chaos bench clean

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

# The browser tests (tests/browser) drive Debian's chromium through its chromedriver:
# installed once, as root, through apt; nothing is downloaded when the tests run.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "browser tests need Debian's chromium and chromium-driver: run as root" >&2; exit 1; \
	  fi; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	fi

# pytest exits 5 when it collects nothing: the suite went missing, which is a failure.
test: lint typecheck browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# The fault-injection suite at full size (CI runs it with 60 tasks per scenario).
chaos: install
	CHAOS_TASKS=$${CHAOS_TASKS:-500} HF_HUB_OFFLINE=1 $(PY) -m pytest tests/chaos $(PYTEST_ARGS)

bench: install
	$(PY) bench/system_overhead.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache build *.egg-info
