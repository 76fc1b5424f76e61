# housing-mlops: every job is a make target. `make help` lists them.
# Settings come from the environment or `make VAR=value`; the defaults below need no cloud account.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
SCAN_VENV ?= $(VENV)/scan
export PATH := $(abspath $(VENV))/bin:$(PATH)

# DATA_URL: where housing.csv comes from: s3://bucket/key, http(s)://... or a local path (.gz is decompressed).
# Unset, `make retrain` uses the copy shipped in the repository (scripts/fetch.py: DEFAULT_DATA_URL), no network.
# MLflow tracking + registry; a local sqlite store (artifacts in ./mlruns) by default.
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db
# MODEL_NAME: the registered model; unset or empty, names.py's default (the one home of the names make, the scripts and
# serving share).
ifeq ($(MODEL_NAME),)
MODEL_NAME := $(shell $(PYTHON) names.py MODEL_NAME)
endif
export MODEL_NAME
# MODEL_VERIFY_KEYS: the public keys serving (and the gate, for the champion) trust; by default the public half of
# the local promotion key that `make retrain` creates on first use (names.py VERIFY_KEY; docs/security.md).
export MODEL_VERIFY_KEYS ?= $(wildcard $(abspath $(shell $(PYTHON) names.py VERIFY_KEY)))
# DVC remote for data versions: `local` (./dvcstore) or `s3remote` (s3://$(S3_DVC_BUCKET)/dvc,
# at $(AWS_ENDPOINT_URL) when set, for S3-compatible servers).
export DVC_REMOTE ?= local
export S3_DVC_BUCKET ?=
export DVC_NO_ANALYTICS := 1

.PHONY: help venv lock scan-venv tools retrain rollback check lint test test-fast dvc-remote serve bench services-up services-down image deploy rollback-deploy reload infra-deploy monitoring-up monitoring-down soak hostile bench-shadow tune promote bake revoke reference

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# Python dependencies are hash-locked. You edit requirements*.in (direct dependencies, exact pins); `make lock`
# compiles each X.in into X.txt with pip-tools: every transitive dependency pinned, with the sha256 of each file PyPI
# (and this machine's pip indexes) offers for it. Installs take only those files: pip --require-hashes --no-deps.
LOCK_VENV ?= $(VENV)/lock
PIP_COMPILE = $(LOCK_VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
  --no-emit-index-url --no-emit-find-links --no-emit-trusted-host
PIP_INSTALL_LOCKED = pip install -q --require-hashes --no-deps -r
# LOCK_ARGS: extra pip-compile options, e.g. `make lock LOCK_ARGS="--upgrade-package urllib3"` to move a transitive pin.
LOCK_ARGS ?=
# What `make venv` installs, and compares with the copy it installed last time.
REQUIREMENTS := requirements-dev.txt requirements-aws.txt

venv: ## create .venv: pipeline, test and lint tools, aws CLI, hash-locked (again only when a lock file changes)
	@cat $(REQUIREMENTS) | cmp -s - $(VENV)/.requirements 2>/dev/null || { \
	  $(PYTHON) -m venv $(VENV) && $(VENV)/bin/$(PIP_INSTALL_LOCKED) requirements-dev.txt && \
	  $(PYTHON) -m venv $(VENV)/aws && $(VENV)/aws/bin/$(PIP_INSTALL_LOCKED) requirements-aws.txt && \
	  ln -sf ../aws/bin/aws $(VENV)/bin/aws && \
	  cat $(REQUIREMENTS) > $(VENV)/.requirements; }

# The dev lock is compiled under the serving lock (--constraint), so the image runs the versions the tests ran. The
# constraint is on the command line, not in requirements-dev.in: Dependabot's pip-compile support skips `-c` lines.
lock: ## compile the hash-locked requirements-*.txt from the requirements*.in you edit (pip-tools: ~3 min, ~8 with a cold cache)
	@cmp -s requirements-lock.txt $(LOCK_VENV)/.requirements 2>/dev/null || { \
	  $(PYTHON) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/$(PIP_INSTALL_LOCKED) requirements-lock.txt && \
	  cp requirements-lock.txt $(LOCK_VENV)/.requirements; }
	$(PIP_COMPILE) $(LOCK_ARGS) --output-file=requirements-lock.txt requirements-lock.in
	$(PIP_COMPILE) $(LOCK_ARGS) --output-file=requirements-serve.txt requirements-serve.in
	$(PIP_COMPILE) $(LOCK_ARGS) --constraint=requirements-serve.txt --output-file=requirements-dev.txt requirements-dev.in
	$(PIP_COMPILE) $(LOCK_ARGS) --output-file=requirements-aws.txt requirements-aws.in
	$(PIP_COMPILE) $(LOCK_ARGS) --output-file=requirements-scan.txt requirements-scan.in

tools: ## install what only Debian ships, when missing (the table in scripts/system_tools.sh: prometheus, buildah, chromium + driver, ...)
	@scripts/system_tools.sh

scan-venv: ## the scanners' own virtualenv: zizmor, checkov, bandit (requirements-scan.txt, apart from the app's pins)
	@cmp -s requirements-scan.txt $(SCAN_VENV)/.requirements 2>/dev/null || { \
	  $(PYTHON) -m venv $(SCAN_VENV) && $(SCAN_VENV)/bin/$(PIP_INSTALL_LOCKED) requirements-scan.txt && \
	  cp requirements-scan.txt $(SCAN_VENV)/.requirements; }

dvc-remote: venv ## point the DVC remote `s3remote` at S3_DVC_BUCKET when DVC_REMOTE=s3remote
ifeq ($(DVC_REMOTE),s3remote)
	@test -n "$(S3_DVC_BUCKET)" || { echo "DVC_REMOTE=s3remote needs S3_DVC_BUCKET" >&2; exit 2; }
	@dvc remote add --local --force s3remote s3://$(S3_DVC_BUCKET)/dvc
	@if [ -n "$(AWS_ENDPOINT_URL)" ]; then dvc remote modify --local s3remote endpointurl "$(AWS_ENDPOINT_URL)"; fi
endif

retrain: venv dvc-remote ## fetch, validate, split, train, register + gated promotion; push data to DVC_REMOTE (scripts/retrain.py)
	@python -m scripts.retrain

# `make tune`: time budget of one run in minutes; APPLY=1 writes the stored study's proposal into params.yaml.
TUNE_MINUTES ?= 10
APPLY ?=

tune: venv ## Optuna study (k-fold CV on the training split) in MLflow; proposes params.yaml changes (APPLY=1 applies)
	TUNE_MINUTES=$(TUNE_MINUTES) python -m scripts.tune $(if $(filter 1,$(APPLY)),--apply)

promote: venv ## a person approves a version the gate refused: make promote VERSION=n REASON="why"
	@python -m scripts.promote "$(VERSION)" "$(REASON)"

reference: venv ## seed/refresh the gate's trusted reference set from a CSV you vouch for: make reference SOURCE=x.csv
	@python -m scripts.reference "$(SOURCE)"

bake: venv ## decide on the candidate in shadow: promote it to champion after a clean bake, or refuse it (BAKE_S)
	@python -m scripts.bake

revoke: venv ## take a version out of service, recording who and why: make revoke VERSION=n REASON="why"
	@python -m scripts.revoke "$(VERSION)" "$(REASON)"

rollback: venv ## point alias champion back to the previous champion
	@python -m scripts.rollback

check: lint ## linters only (the same as `make lint`)

lint: venv tools scan-venv ## ruff, mypy, actionlint + workflow schema, shellcheck, hadolint, cfn-lint, promtool, compose schema, zizmor, checkov, bandit
	ruff check .
	mypy
	actionlint
	check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml
	shellcheck scripts/*.sh tests/fake_docker/docker .ci/run
	hadolint Dockerfile
	cfn-lint infra/*.yml
	promtool check config prometheus.yml
	promtool check rules prometheus/rules/*.yml
	promtool test rules prometheus/tests/*.yml
	check-jsonschema --builtin-schema vendor.dependabot .github/dependabot.yml
	$(SCAN_VENV)/bin/zizmor --offline .github/workflows/
	$(SCAN_VENV)/bin/checkov --quiet --compact --skip-download --framework cloudformation -d infra
	$(SCAN_VENV)/bin/bandit -q -c pyproject.toml -r .

# The full suite on every core (pytest-xdist): each worker takes whole files, so a module's fixtures (a story, a
# server) live in one worker; TEST_WORKERS=0 runs everything in this process. Files go out in collection order, which
# puts the `long` modules first (tests/conftest.py); xdist's default reorders them by test count, which started the
# pipeline stories last and left one worker running them alone at the end.
TEST_WORKERS ?= auto

test: venv tools check ## the README's and CI's command: linters, then every test tier (in random order, on every core)
	python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: venv ## unit tests in-process: no servers, no subprocesses (under a minute)
	python -m pytest -q -m "not integration"

serve: venv ## serve the champion with uvicorn on 127.0.0.1:8000 (HOST, PORT: see serve.py)
	python serve.py

bench: venv ## serve.py vs `mlflow models serve` on the current champion: req/s, p50, p99
	python -m scripts.bench

hostile: venv ## every prediction door under hostile bodies on the current champion: slowest refusal, /health, memory
	python -m scripts.hostile

bench-shadow: venv ## what a candidate in shadow costs clients: serve.py on two workers with and without one, p50/p99
	python -m scripts.bench_shadow

soak: venv ## 60 s at concurrency 32 on two workers with three champion changes: failures, p50/p99, worker RSS
	python -m scripts.soak

# `make realized`: LABELS is a CSV (id,median_house_value[,observed_at]), a directory of them, or an s3:// prefix. The
# prediction log is PREDICTION_LOG_DIR's (and PREDICTION_LOG_S3's shipped segments); figures go to PUSHGATEWAY_URL.
LABELS ?=
.PHONY: realized realized-bench

realized: venv ## join true prices with the prediction log (LABELS=path or s3://...): RMSE, MAE, bias per version and day
	@python -m scripts.realized "$(LABELS)"

realized-bench: venv ## how long `make realized` takes to join 1 million logged predictions with 100,000 labels
	python -m scripts.realized_bench

services-up: venv ## start moto (S3 + Secrets Manager) and an MLflow server with basic auth on 127.0.0.1; print what to export
	@scripts/services.sh up

services-down: ## stop what services-up started
	@scripts/services.sh down

monitoring-up: venv ## Prometheus (Debian package) on 127.0.0.1:9090 scraping `make serve`, with the alert rules; a Pushgateway on :9091
	@scripts/monitoring.sh up

monitoring-down: ## stop what monitoring-up started
	@scripts/monitoring.sh down

image: venv ## build the serving image without a Docker engine (buildah) and smoke-test it
	@scripts/build_image.sh

# On the EC2 host (docker, make, curl, flock; the aws CLI for a Secrets Manager token): no virtualenv needed.
deploy: ## on the host: start IMAGE:IMAGE_TAG beside the old container, switch port 80 only once healthy
	@scripts/deploy.sh deploy

rollback-deploy: ## on the host: go back to the previously deployed image tag
	@scripts/deploy.sh rollback

# SERVE_URL: the app's base URL as this machine reaches it, e.g. http://127.0.0.1:9100 through an SSM port forward.
reload: ## POST SERVE_URL/reload with RELOAD_TOKEN; https://, or http:// to a loopback/private address only
	@$(PYTHON) scripts/reload_serving.py reload

infra-deploy: ## create or update the AWS stack in infra/ (aws cloudformation deploy)
	@scripts/infra_deploy.sh

# The pictures in docs/: drawn from sources in the repository, never by hand.
PICTURE_DIR ?= docs
DASHBOARD_PNG_DIR ?= .monitoring/dashboards
.PHONY: docs-picture dashboard-png

docs-picture: ## docs/architecture.svg and .png from docs/architecture.dot (Graphviz `dot`)
	@command -v dot >/dev/null || { echo "dot not found: install Graphviz (sudo apt-get install graphviz)" >&2; exit 1; }
	dot -Tsvg docs/architecture.dot -o $(PICTURE_DIR)/architecture.svg
	dot -Tpng -Gdpi=96 docs/architecture.dot -o $(PICTURE_DIR)/architecture.png

dashboard-png: venv ## each Grafana dashboard, panel by panel, as a PNG from Prometheus (`make monitoring-up`)
	@python -m scripts.render_dashboard --out-dir $(DASHBOARD_PNG_DIR)
