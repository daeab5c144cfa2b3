# The two commands: `make demo` (the main job on the built-in twin) and `make test` (everything).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
BASE   := $(VENV)/.installed-base
TESTS  := $(VENV)/.installed-test
# Every package pinned with hashes (`make lock` regenerates it): the image and install.sh install
# exactly these, and the development environment takes them as constraints.
LOCK   := deploy/requirements.txt
UV     := uv==0.13.10
# Debian packages the integration tests run for real (installed when missing; root or sudo).
SYSTEM_TOOLS := prometheus:prometheus promtool:prometheus slurmctld:slurm-wlm munge:munge systemd-analyze:systemd
# Alertmanager for the Notify integration test (agent/act/notify.py).
SYSTEM_TOOLS += prometheus-alertmanager:prometheus-alertmanager
# Headless Chromium opens the replay report in its test (driven through playwright's client).
SYSTEM_TOOLS += chromium:chromium
# The site: etcd for coordination and leader election, VictoriaMetrics as the long-term store.
SYSTEM_TOOLS += etcd:etcd-server victoria-metrics:victoria-metrics
# Slurm's job accounting for the meter's tests (sacct, sshare): slurmdbd on MariaDB.
SYSTEM_TOOLS += mariadbd:mariadb-server slurmdbd:slurmdbd

.PHONY: demo test test-gpu lint bench system-deps clean vendor-plotly lock lock-check

# The lock's pins as constraints (without its hashes: pip cannot hash the editable install).
$(BASE): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	sed -e '/--hash=/d' -e 's/ *\\$$//' $(LOCK) > $(VENV)/constraints.txt
	$(BIN)/pip install --quiet --disable-pip-version-check -c $(VENV)/constraints.txt -e .
	touch $@

$(TESTS): $(BASE)
	$(BIN)/pip install --quiet --disable-pip-version-check -c $(VENV)/constraints.txt -e '.[test]'
	touch $@

demo: $(BASE)
	$(BIN)/ooda demo

system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
	  tool=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$tool >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing from Debian:$$missing"; \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

lint: $(TESTS) lock-check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: system-deps lint
	$(BIN)/pytest

test-gpu: $(TESTS)  # on a GPU node: the NVML paths for real (they change no GPU setting)
	$(BIN)/pytest -m gpu -rs tests/hardware

bench: $(TESTS)
	@for script in bench/[!_]*.py; do $(BIN)/python $$script --json || exit 1; done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info

# The replay report's plotting bundle: plotly.js's basic partial bundle (MIT), at the version the
# installed plotly package was built for, from the npm registry (needs npm). Run after upgrading
# plotly; tests/replay/test_report.py fails until the two agree.
vendor-plotly: $(BASE)
	@version=$$($(BIN)/python -c 'from agent.replay.report import plotly_js_version as v; print(v())') && \
	tmp=$$(mktemp -d) && (cd $$tmp && npm pack --silent plotly.js-basic-dist-min@$$version >/dev/null && tar xzf *.tgz) && \
	cp $$tmp/package/plotly-basic.min.js agent/replay/assets/plotly-basic.min.js && \
	cp $$tmp/package/LICENSE agent/replay/assets/plotly-basic.LICENSE && rm -rf $$tmp && \
	echo "agent/replay/assets: plotly.js basic $$version"

# deploy/requirements.txt from pyproject.toml (uv pip compile: every platform, Python 3.11+).
lock: $(TESTS)
	$(BIN)/pip install --quiet --disable-pip-version-check $(UV)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python deploy/lock.py

lock-check: $(TESTS)
	$(BIN)/python deploy/lock.py --check
