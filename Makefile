# The two commands of a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test system-packages fuzz lint typecheck bench bench-quick bench-users bench-groups bench-audit bench-rebuild bench-feeds bench-extensions clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Debian packages the suite drives: Chromium (the audit page's browser test, through Playwright;
# no browser download) and wrk (the benchmark's load client). Installed only when missing.
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
system-packages:
	@missing=""; \
	[ -x /usr/bin/chromium ] || missing="chromium"; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

run: $(STAMP)
	$(BIN)/scimledger serve

test: $(STAMP) system-packages
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

# The long fuzz run: 10,000+ generated and mutated SCIM requests against a live app and the
# parsers; prints requests tried, failures found and the slowest request (a request over
# SCIMLEDGER_FUZZ_MAX_CPU seconds of CPU is a failure). (`make test` runs a short pass.)
fuzz: $(STAMP)
	SCIMLEDGER_FUZZ_EXAMPLES=$${SCIMLEDGER_FUZZ_EXAMPLES:-10000} \
	SCIMLEDGER_FUZZ_MAX_CPU=$${SCIMLEDGER_FUZZ_MAX_CPU:-1} \
	SCIMLEDGER_FUZZ_PARSER_EXAMPLES=$${SCIMLEDGER_FUZZ_PARSER_EXAMPLES:-5000} \
	$(BIN)/python -m pytest tests/test_fuzz.py -q -s -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The whole table (bench/results/latest.md; about 40 minutes on 2 cores) and a few-minute
# version (bench/results/quick.md). The load client is Debian's wrk, installed here if missing.
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) system-packages
	$(BIN)/python -m bench.suite

bench-quick: $(BENCH_STAMP) system-packages
	$(BIN)/python -m bench.suite --quick

# One row of the table (or two) at full size, written to bench/results/latest-<rows>.md.
bench-users: $(BENCH_STAMP) system-packages
	$(BIN)/python -m bench.suite --only post,lookups

bench-groups: $(BENCH_STAMP) system-packages
	$(BIN)/python -m bench.suite --only groups

bench-audit: $(BENCH_STAMP) system-packages
	$(BIN)/python -m bench.suite --only audit

bench-rebuild: $(BENCH_STAMP) system-packages
	$(BIN)/python -m bench.suite --only rebuild

bench-feeds: $(BENCH_STAMP) system-packages
	$(BIN)/python -m bench.suite --only feeds

# A user with 20 declared extension attributes against a plain one (issue 15: at most 1.2x).
bench-extensions: $(BENCH_STAMP) system-packages
	$(BIN)/python -m bench.suite --only extensions

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
