# The two commands a fresh machine needs: `make demo` and `make test`.
# Everything installs into ./.venv from PyPI; the router is compiled on install.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py pushsvc/_router.pyx pushsvc/_router.pxd | cksum | cut -d' ' -f1)

.PHONY: install demo test bench lint clean wheel browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python
	@echo ">>> installing pushsvc and its test tools into $(VENV) (compiles the router)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/pushsvc demo

# tests/browser drive Debian's chromium with chromedriver. Installed here when
# missing and we are root with apt (quietly, once); otherwise those tests skip.
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo ">>> installing chromium and chromium-driver (apt) for tests/browser"; \
			{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
				chromium chromium-driver; } >/dev/null 2>&1 \
				|| echo ">>> could not install chromium: tests/browser will skip"; \
		else \
			echo ">>> no chromium and no root apt: tests/browser will skip"; \
		fi; \
	fi

test: install browser
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m pytest benchmarks --benchmark-disable-gc
	$(BIN)/python -m benchmarks.load --server both --rounds 3 --connections 5000 \
		--assessments 1000 --rate 5000 --market-rate 3 --duration 10 \
		--json docs/bench/spread.json --plot docs/bench/spread.png
	$(BIN)/python -m benchmarks.load --server both --rounds 3 --connections 250 \
		--assessments 50 --rate 500 --market-rate 1000 --duration 10 \
		--json docs/bench/hot.json --plot docs/bench/hot.png

# The one command that builds the distributable wheel (router compiled in);
# the Dockerfile's build stage runs the same command with WHEEL_DIR=/wheels.
WHEEL_DIR ?= dist
wheel: $(BIN)/python
	$(BIN)/python -m pip wheel --no-deps --wheel-dir $(WHEEL_DIR) .

clean:
	rm -rf build *.egg-info pushsvc/*.so pushsvc/_router.c pushsvc/_router.html
