# Two entry points (README quickstart): `make run` and `make test`. Both create/refresh .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)
HOST   ?= 127.0.0.1
PORT   ?= 8501

.PHONY: install run test browser bench clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# Headless Chromium for the browser tests, from Debian's packages (Playwright's own download
# cannot work offline). Needs root or sudo once.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium chromium-driver; }

run: install
	$(PY) -m streamlit run app.py --server.address $(HOST) --server.port $(PORT)

test: install browser
	$(PY) -m pytest -q

bench: install
	$(PY) bench/bench_pipeline.py

clean:
	rm -rf $(VENV) .pytest_cache
