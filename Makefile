# housing-mlops: every job is a make target. `make help` lists them.
# Settings come from the environment or `make VAR=value`; the defaults below need no cloud account.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
export PATH := $(abspath $(VENV))/bin:$(PATH)

# Where housing.csv comes from: s3://bucket/key, http(s)://..., or a local path.
export DATA_URL ?= https://raw.githubusercontent.com/ageron/handson-ml2/master/datasets/housing/housing.csv
# MLflow tracking + registry; a local sqlite store (artifacts in ./mlruns) by default.
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db
export MODEL_NAME ?= California_Housing_Regression
# DVC remote for data versions: `local` (./dvcstore) or `s3remote` (s3://$(S3_DVC_BUCKET)/dvc,
# at $(AWS_ENDPOINT_URL) when set, for S3-compatible servers).
export DVC_REMOTE ?= local
export S3_DVC_BUCKET ?=
export DVC_NO_ANALYTICS := 1

.PHONY: help venv retrain promote reference rollback test lint dvc-remote serve bench services-up services-down image deploy rollback-deploy infra-deploy monitoring-up monitoring-down

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

venv: ## create $(VENV) with the pinned requirements (again only when they change)
	@cat requirements.txt requirements-serve.txt constraints.txt | cmp -s - $(VENV)/.requirements 2>/dev/null || { \
	  $(PYTHON) -m venv $(VENV) && $(VENV)/bin/pip install -q --upgrade pip && \
	  $(VENV)/bin/pip install -q -r requirements.txt && \
	  cat requirements.txt requirements-serve.txt constraints.txt > $(VENV)/.requirements; }

dvc-remote: venv
ifeq ($(DVC_REMOTE),s3remote)
	@test -n "$(S3_DVC_BUCKET)" || { echo "DVC_REMOTE=s3remote needs S3_DVC_BUCKET" >&2; exit 2; }
	@dvc remote add --local --force s3remote s3://$(S3_DVC_BUCKET)/dvc
	@if [ -n "$(AWS_ENDPOINT_URL)" ]; then dvc remote modify --local s3remote endpointurl "$(AWS_ENDPOINT_URL)"; fi
endif

retrain: venv dvc-remote ## fetch, validate, split, train, register + gated promotion; push data to DVC_REMOTE
	@scripts/retrain.sh

promote: venv ## a person approves a version the gate refused: make promote VERSION=n REASON="why"
	@python -m scripts.promote human "$(VERSION)" "$(REASON)"

reference: venv ## seed/refresh the gate's trusted reference set from a CSV you vouch for: make reference SOURCE=x.csv
	@python -m scripts.reference "$(SOURCE)"

rollback: venv ## point alias champion back to the previous champion
	@python -m scripts.rollback

lint: venv ## ruff, actionlint + workflow schema, shellcheck, hadolint, cfn-lint, promtool, compose schema
	ruff check .
	actionlint
	check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml
	shellcheck scripts/*.sh tests/fake_docker/docker .ci/run
	hadolint Dockerfile
	cfn-lint infra/*.yml
	promtool check config prometheus.yml
	promtool check rules prometheus/rules/*.yml
	promtool test rules prometheus/tests/*.yml

test: venv lint ## lint, then the whole test suite
	python -m pytest -q

serve: venv ## serve the champion on $(PORT) with uvicorn (see serve.py for its settings)
	python serve.py

bench: venv ## serve.py vs `mlflow models serve` on the current champion: req/s, p50, p99
	python -m scripts.bench

services-up: venv ## start moto (S3 + Secrets Manager) and an MLflow server with basic auth on 127.0.0.1; print what to export
	@scripts/services.sh up

services-down: ## stop what services-up started
	@scripts/services.sh down

monitoring-up: venv ## Prometheus (Debian package) on 127.0.0.1:9090 scraping `make serve`, with the alert rules
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

infra-deploy: ## create or update the AWS stack in infra/ (aws cloudformation deploy)
	@scripts/infra_deploy.sh
