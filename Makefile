# mini-PFI: two set-up commands (make run, make test); see README.md.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
CONFIG ?= engine/routes.yaml
DATA_DIR ?= data
TEST_ONLY := aiosmtpd|atheris|atpublic|h11|hypothesis|iniconfig|outcome|pluggy|pygments|pypdf|pysocks|pytest|pytest-timeout|selenium|sniffio|sortedcontainers|trio|trio-websocket|websocket-client|wsproto

.PHONY: install install-test run test fuzz bench bench-e2e bench-matrix bench-dmp bench-mss bench-quick bench-identity bench-reports check clean lock

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python requirements.lock pyproject.toml
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

$(TEST_STAMP): $(STAMP) requirements-test.lock
	$(BIN)/pip install --quiet -r requirements-test.lock
	touch $@

install: $(STAMP)            ## create .venv and install the pinned dependencies and the engine

install-test: $(TEST_STAMP)  ## also install the pinned test extras

run: install                 ## start the engine with the sample routes on SQLite (data/)
	$(BIN)/minipfi run --config $(CONFIG) --data-dir $(DATA_DIR)

check: install               ## validate the routes file
	$(BIN)/minipfi check $(CONFIG)

test: install-test           ## the whole suite (SQLite and PostgreSQL); installs headless Chromium for the console test
	@if { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; } && command -v apt-get >/dev/null; then \
	  apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; } || \
	  echo "chromium not installed: the console browser test will be skipped"; fi
	$(BIN)/python -m pytest -q

bench: install-test          ## durable ingest benchmark against python-hl7's MLLP server, 3 rounds (about 4 min)
	$(BIN)/python bench/ingest.py --connections 1,8,32 --backends sqlite,postgresql --peer --seconds 5 --repeat 3

bench-e2e: install-test      ## delivery end to end, destination down, backlog of 100,000 drained (SQLite), the floor of one send (about 10 min)
	$(BIN)/python bench/e2e.py --backends sqlite --connections 8 --seconds 5 --backlog 100000 $(E2E_ARGS)
	$(BIN)/python bench/send_floor.py

bench-matrix: install-test   ## every delivery scenario on SQLite and PostgreSQL at 1, 8 and 32 connections (backlog 20,000; about 15 min)
	for c in 1 8 32; do $(BIN)/python bench/e2e.py --backends sqlite,postgresql --connections $$c --seconds 5 --backlog 20000 --backlog-max-s 120 $(E2E_ARGS) || exit 1; done
	for c in 1 8 32; do $(BIN)/python bench/identity.py --backends sqlite,postgresql --connections $$c --seconds 8 || exit 1; done
	$(BIN)/python bench/reports.py --backends sqlite,postgresql --connections 1,8,32 --seconds 8

bench-identity: install-test ## identity feed ADT/s at 8 connections versus plain ingest
	$(BIN)/python bench/identity.py

bench-reports: install-test  ## report channel: 286 KB ORU with a 212 KB CDA, and schematron cost
	$(BIN)/python bench/reports.py

bench-dmp: install-test       ## DMP end to end: MDM reports over MLLP to the DMP simulator, versus ingest only
	$(BIN)/python bench/dmp.py --connections 8 --reports 400

bench-mss: install-test       ## MSSanté end to end: MDM reports over MLLP to a STARTTLS SMTP server (2 mails each)
	$(BIN)/python bench/mssante.py --connections 8 --reports 200 2>&1 | grep -v verify_mode

bench-quick: install-test
	$(BIN)/python bench/ingest.py --connections 8 --backends sqlite --peer --seconds 5

lock:                        ## re-pin the dependencies after changing pyproject.toml
	$(BIN)/pip freeze --exclude-editable > .freeze.tmp
	grep -v -i -E '^($(TEST_ONLY))==' .freeze.tmp > requirements.lock
	grep -i -E '^($(TEST_ONLY))==' .freeze.tmp > requirements-test.lock
	rm -f .freeze.tmp

clean:
	rm -rf $(VENV) data .pytest_cache

FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= framer msh ack ack_reader pamfr cisis cda_header cda_validation routes
FUZZ_STATS ?= fuzz-stats.jsonl

fuzz: install-test           ## coverage-guided fuzzing (atheris), FUZZ_SECONDS per target, one target at a time
	@rm -f $(FUZZ_STATS)
	@for t in $(FUZZ_TARGETS); do \
		$(BIN)/python -m tests.fuzz.run $$t --seconds $(FUZZ_SECONDS) --stats $(FUZZ_STATS) 2>&1 \
			| grep -E '^(NEW CRASH|\{)' || exit 1; \
	done
	@echo "figures in $(FUZZ_STATS); new crashers in tests/fuzz/crashers/ (commit them with the fix)"
