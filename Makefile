# Two entry points (README quickstart): `make run` and `make test`. Both create/refresh .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | cksum | cut -d' ' -f1)
HOST   ?= 127.0.0.1
PORT   ?= 8501

.PHONY: install run test lint browser postgres bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# Headless Chromium for the browser tests, from Debian's packages (Playwright's own download
# cannot work offline). Needs root or sudo once.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium chromium-driver; }

# PostgreSQL for the search storage test (tests/postgres_server.py starts a throwaway server from these
# binaries), from Debian's packages. Needs root or sudo once.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q postgresql; }

# No file watcher: watching .venv and runs/ overflowed inotify (MBs of warnings) and cost the
# server a third of a core while a run streams; restart the app after editing its code.
run: install
	$(PY) -m streamlit run app.py --server.address $(HOST) --server.port $(PORT) --server.fileWatcherType none

# Static checks: pyflakes-level errors (ruff) and the layer contracts in pyproject.toml (import-linter).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: install browser postgres lint
	$(PY) -m pytest -q

bench: install
	$(PY) bench/bench_pipeline.py

clean:
	rm -rf $(VENV) .pytest_cache
