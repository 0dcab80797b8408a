# The two commands: `make demo` runs the offline demo end to end, `make test` runs the tests.
# Both create .venv and install what they need first. TORCH picks the torch build: the default
# is the CPU build on these machines; on a GPU machine use e.g.
#   make demo TORCH="torch --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/saeflow run

# The UI test drives Debian's chromium (installed with apt-get when missing and run as root).
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) \
	  || (echo "The Prefect UI test needs Chromium: install Debian's chromium package" >&2; exit 1)

test: $(VENV)/.installed chromium
	$(VENV)/bin/python -m pytest

.PHONY: install demo test chromium
