# The two commands of the README:
#   make pipeline   the whole pipeline (dvc repro) on Fashion-MNIST
#   make test       lint (ruff), then the test suite
# Each sets itself up: a virtual environment in .venv with the pinned stack, and (for the
# pipeline) the Debian package of Fashion-MNIST when apt can install it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: pipeline test install dataset lint bench team-up team-down team-status spark-up spark-down

pipeline: install dataset
	dvc repro

test: install java postgres browser
	ruff check . && ruff format --check .
	python -m pytest -n logical --durations=25

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		-c requirements.lock -e '.[pipeline,spark,team,dev]'
	touch $@

# The raw data is data.source in params.yaml (DVC hashes it; `vae ingest` copies it). Debian's
# packages ship Fashion-MNIST and MNIST offline: install the one data.source names when apt can
# (as root or with password-less sudo). Otherwise say what to do: `vae download` or another path.
dataset: install
	@for old in data/raw/fashion_mnist data/raw/mnist; do if [ -d "$$old" ]; then \
		echo "$$old: data/raw is now DVC's copy of data.source, and dvc repro replaces it."; \
		echo "  Move your copy out first (mv $$old ~/datasets/) and set data.source to it."; \
		exit 1; fi; done
	@set -- $$(python -c "from vae.params import load_params; from vae.data.raw import DEBIAN_SOURCES as D; \
		s = load_params().data.source; print(s, next((p for d, p in D.values() if d == s), '-'))"); \
	src=$$1; pkg=$$2; \
	if [ -e "$$src" ]; then :; \
	elif [ "$$pkg" != - ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq "$$pkg"; \
	elif [ "$$pkg" != - ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		sudo apt-get update -qq && sudo apt-get install -y -qq "$$pkg"; \
	else \
		echo "data.source: $$src not found. Install it (apt-get install $$pkg), or run"; \
		echo "  vae download --out $$HOME/datasets/fashion-mnist, and set data.source to that path"; \
		exit 1; \
	fi

# Spark (vae encode --engine spark, tests/e2e/test_spark.py) needs Java 17 or later. Like `dataset`,
# install Debian's JRE when apt can (as root or with password-less sudo); otherwise say what to do.
# (The mkdir: slim Debian images lack man1, and the JRE's postinst fails without it.)
.PHONY: java postgres browser
JAVA := $${JAVA_HOME:+$$JAVA_HOME/bin/}java
JRE := openjdk-17-jre-headless
java:
	@v=$$($(JAVA) -version 2>&1 | sed -n 's/.*version "\(1\.\)\{0,1\}\([0-9]*\).*/\2/p' | head -n 1); \
	if [ -n "$$v" ] && [ "$$v" -ge 17 ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		mkdir -p /usr/share/man/man1 && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(JRE); \
	elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		sudo mkdir -p /usr/share/man/man1 && sudo apt-get update -qq && \
		sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(JRE); \
	else \
		echo "Spark needs Java 17 or later (found: $${v:-no java}). Install it, e.g."; \
		echo "  apt-get install $(JRE)   (Debian/Ubuntu), or set JAVA_HOME to a Java 17+"; \
		exit 1; \
	fi

# The team's store (docs/team.md): PostgreSQL, the object store, MLflow and Prefect servers on
# 127.0.0.1, with their data and secrets in TEAM_STATE; clients source $(TEAM_STATE)/env/<role>.env.
# The team tests (pytest -m team) start a stack of their own. Like java, install Debian's
# PostgreSQL 15 when apt can.
TEAM_STATE ?= /tmp/vae-team
PG := postgresql-15
postgres:
	@if [ -x /usr/lib/postgresql/15/bin/initdb ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(PG); \
	elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(PG); \
	else \
		echo "The team tests need PostgreSQL 15: apt-get install $(PG)"; exit 1; \
	fi

# The browser test (tests/e2e/test_browser.py) drives Debian's Chromium through its ChromeDriver,
# so nothing is downloaded at test time. Like postgres, install them when apt can.
BROWSER := chromium chromium-driver
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BROWSER); \
	elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BROWSER); \
	else \
		echo "The browser test needs Chromium and its driver: apt-get install $(BROWSER)"; \
	fi

team-up: install postgres
	python -m vae.mlops.team up --state $(TEAM_STATE)

team-down: install
	python -m vae.mlops.team down --state $(TEAM_STATE)

team-status: install
	python -m vae.mlops.team status --state $(TEAM_STATE)

# A Spark standalone cluster on 127.0.0.1 (two one-core workers): vae encode --engine spark
# --master <the URL spark-up prints>.
spark-up: install java
	python -m vae.mlops.team spark-up --state $(TEAM_STATE)

spark-down: install
	python -m vae.mlops.team spark-down --state $(TEAM_STATE)

lint: install
	ruff check . && ruff format --check .

bench: install dataset
	dvc repro prepare
	python benchmarks/throughput.py
