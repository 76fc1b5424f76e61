#!/usr/bin/env bash
# `make image`: build the serving image from the Dockerfile without a Docker engine, start it, check it serves.
#
# The build is daemonless: buildah from Debian with chroot isolation (no daemon, no user namespaces; it needs
# root) and its configured storage driver (overlay here; STORAGE_DRIVER=vfs where overlay mounts are refused, e.g.
# in an unprivileged container; a storage directory keeps the driver it was first used with). No registry is
# reachable, so the Dockerfile's base image is made first: a Debian bookworm root filesystem from debootstrap (the
# mirror apt uses) with python3, pip and venv, committed under the FROM name (python:3.11-slim-bookworm) so that
# the Dockerfile builds unchanged. It differs from the official image where a pip-based Dockerfile does not look:
# Debian's python3 (3.11.2) in /usr/bin with `python` and `pip` beside it, instead of python.org's latest 3.11 in
# /usr/local, and pip's "externally managed" marker removed (the official image has none). CI builds with Docker
# and the official image.
#
# The check does what the EC2 host does: a registry (`mlflow server`, sqlite, artifacts proxied from a temporary
# directory) gets a small model trained in seconds on generated data, with alias champion; the image runs
# (buildah run, host network) with MLFLOW_TRACKING_URI, MODEL_NAME and MODEL_ALIAS pointing at it, and must answer
# GET /health, GET /ready and a POST /predict. `python` and `mlflow` come from the project's virtualenv (as under
# `make image`).
#
# Settings: IMAGE=housing-serve:local  READY_TIMEOUT_S=120  STORAGE_DRIVER
#           CACHE_DIR=/var/cache/housing-mlops: the base's root filesystem, made once (debootstrap: 45-95 s)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $EUID != 0 ]]; then # debootstrap and buildah's chroot isolation need root; keep the virtualenv on PATH
  command -v sudo >/dev/null || { echo "image: run as root: debootstrap and buildah need it" >&2; exit 1; }
  exec sudo --non-interactive --preserve-env=IMAGE,CACHE_DIR,READY_TIMEOUT_S,STORAGE_DRIVER \
    env "PATH=$PATH" "$0" "$@"
fi

IMAGE=${IMAGE:-housing-serve:local}
CACHE_DIR=${CACHE_DIR:-/var/cache/housing-mlops}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-120}
BASE_PACKAGES=python3,python3-pip,python3-venv,python-is-python3,ca-certificates
BASE_TARBALL=$CACHE_DIR/debian-bookworm-$(tr , - <<<"$BASE_PACKAGES").tar
export BUILDAH_ISOLATION=chroot BUILDAH_FORMAT=docker # docker format: HEALTHCHECK is kept
RECORD='{"longitude": -122.23, "latitude": 37.88, "housing_median_age": 41.0, "total_rooms": 880.0,
  "total_bedrooms": 129.0, "population": 322.0, "households": 126.0, "median_income": 8.3252,
  "ocean_proximity": "NEAR BAY"}'

MODEL_NAME=housing-image-check

work=""
registry="" # process group of the MLflow server
registry_uri=""
server=""   # process group of the app in the container
container=""
stop() { kill -TERM -- "-$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
cleanup() {
  if [[ -n $server ]]; then stop "$server"; fi
  if [[ -n $registry ]]; then stop "$registry"; fi
  if [[ -n $container ]]; then buildah rm "$container" >/dev/null 2>&1 || true; fi
  if [[ -n $work ]]; then rm -rf "$work"; fi
}
trap cleanup EXIT

buildah() { command buildah ${STORAGE_DRIVER:+--storage-driver "$STORAGE_DRIVER"} "$@"; }
log() { echo "image: $*"; }
die() { echo "image: $*" >&2; exit 1; }

install_tools() { # from the distribution (Debian; Ubuntu needs Debian's archive keyring as well)
  local missing=()
  command -v buildah >/dev/null || missing+=(buildah)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  [[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]] || missing+=(debian-archive-keyring)
  ((${#missing[@]})) || return 0
  log "installing ${missing[*]} (apt-get)"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

debian_mirror() { # the Debian mirror apt uses for bookworm
  local mirror
  mirror=$(awk '/^URIs:/ {uri = $2} /^$/ {uri = ""} /^Suites:/ && / bookworm( |$)/ && uri {print uri; exit}' \
    /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [[ -n $mirror ]] ||
    mirror=$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  echo "${mirror:-http://deb.debian.org/debian}"
}

make_base_tarball() {
  local root
  root=$(mktemp -d)
  log "debootstrap bookworm + $BASE_PACKAGES from $(debian_mirror) (once; cached in $CACHE_DIR)"
  debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$root" "$(debian_mirror)" >"$root.log" 2>&1 ||
    { tail -20 "$root.log" >&2; rm -rf "$root" "$root.log"; die "debootstrap failed (log above)"; }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/{doc,man,locale}/* \
    "$root"/usr/lib/python3.*/EXTERNALLY-MANAGED
  mkdir -p "$CACHE_DIR"
  tar -C "$root" -cf "$BASE_TARBALL.tmp" .
  mv "$BASE_TARBALL.tmp" "$BASE_TARBALL"
  rm -rf "$root" "$root.log"
}

make_base_image() { # $1 the FROM reference
  [[ $1 =~ ^(docker\.io/(library/)?)?python:3\.11(\.[0-9]+)?-slim-bookworm$ ]] ||
    die "FROM $1: only python:3.11-slim-bookworm can be made locally (no registry is reachable here)"
  [[ -f $BASE_TARBALL ]] || make_base_tarball
  local base
  base=$(buildah from scratch)
  buildah add "$base" "$BASE_TARBALL" / >/dev/null
  buildah config --env LANG=C.UTF-8 --env PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd python3 "$base"
  buildah commit --rm --quiet "$base" "$1" >/dev/null
  log "made the base image $1 locally"
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_for() { # $1 URL, $2 process group that serves it, $3 its log
  local deadline=$((SECONDS + READY_TIMEOUT_S))
  until curl -fsS -o /dev/null "$1" 2>/dev/null; do
    kill -0 "$2" 2>/dev/null || { tail -30 "$3" >&2; die "the process serving $1 exited (log above)"; }
    ((SECONDS < deadline)) || { tail -30 "$3" >&2; die "no answer from $1 within ${READY_TIMEOUT_S}s (log above)"; }
    sleep 1
  done
}

start_registry() { # sets $registry and $registry_uri
  local port
  port=$(free_port)
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid mlflow server --host 127.0.0.1 --port "$port" --workers 1 \
    --backend-store-uri "sqlite:///$work/mlflow.db" --artifacts-destination "$work/artifacts" \
    >"$work/mlflow.log" 2>&1 &
  registry=$!
  wait_for "http://127.0.0.1:$port/health" "$registry" "$work/mlflow.log"
  registry_uri=http://127.0.0.1:$port
}

register_model() { # $1 registry URI: version 1 of $MODEL_NAME, alias champion, signed with a key made for this check
  log "registering a small model trained on generated data as $MODEL_NAME@champion"
  MLFLOW_TRACKING_URI=$1 PYTHONDONTWRITEBYTECODE=1 python - "$MODEL_NAME" "$work" <<'EOF'
import base64
import sys
from pathlib import Path

import mlflow
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from scripts.sign import sign_version

from tests.conftest import synthetic_housing
from train import build_pipeline, log_pipeline

data = synthetic_housing(1500)
X, y = data.drop(columns="median_house_value"), data["median_house_value"]
spec = {"model": "hist_gradient_boosting", "features": {"neighbours": [4], "folds": 3, "encoding": "ordinal"},
        "params": {"max_iter": 50, "random_state": 0}}
mlflow.set_experiment("image-check")
with mlflow.start_run():
    info = log_pipeline(build_pipeline(spec).fit(X, y), X.dropna().head(3))
# serving loads only what the gate signed (serving/signature.py): signed and tagged as a promotion does it, with a
# key that lives as long as this check
version = mlflow.register_model(info.model_uri, sys.argv[1], tags={"promotion": "gate"}).version
key = ec.generate_private_key(ec.SECP256R1())
private = Path(sys.argv[2], "promotion.key")
private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
sign_version(mlflow.MlflowClient(), sys.argv[1], str(version), {"decision": "gate"}, key=private)
Path(sys.argv[2], "verify-key").write_text(base64.b64encode(key.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode())
mlflow.MlflowClient().set_registered_model_alias(sys.argv[1], "champion", version)
EOF
}

check_image() { # $1 registry URI. Run the image's command against it; /health, /ready, /predict must answer
  local port command answer
  port=$(free_port)
  mapfile -t command < <(buildah inspect --type image "$IMAGE" |
    jq -r '.OCIv1.config | (.Entrypoint // []) + (.Cmd // []) | .[]')
  ((${#command[@]})) || die "$IMAGE has neither ENTRYPOINT nor CMD"
  container=$(buildah from --pull=never "$IMAGE")
  log "starting ${command[*]} on port $port, serving $MODEL_NAME@champion from $1"
  setsid buildah run --network host --env "PORT=$port" --env "MLFLOW_TRACKING_URI=$1" \
    --env "MODEL_NAME=$MODEL_NAME" --env MODEL_ALIAS=champion --env "MODEL_VERIFY_KEYS=$(<"$work/verify-key")" \
    "$container" -- "${command[@]}" >"$work/serve.log" 2>&1 &
  server=$!
  wait_for "http://127.0.0.1:$port/ready" "$server" "$work/serve.log"
  curl -fsS "http://127.0.0.1:$port/health" >/dev/null || die "GET /health failed"
  answer=$(curl -fsS -H 'Content-Type: application/json' -d "$RECORD" "http://127.0.0.1:$port/predict") ||
    die "POST /predict failed"
  [[ $answer =~ \"prediction\":\ ?[0-9] ]] || die "POST /predict answered without a prediction: $answer"
  log "GET /health, GET /ready and POST /predict answered: $answer"
  # The Dockerfile deletes the Swagger UI files the page does not load: every file it does load must still answer.
  local page assets asset
  page=$(curl -fsS "http://127.0.0.1:$port/docs") || die "GET /docs failed"
  mapfile -t assets < <(grep -oE '(href|src)="docs/[^"]+"' <<<"$page" | sed -E 's/^(href|src)="//; s/"$//')
  ((${#assets[@]} >= 3)) || die "GET /docs references ${#assets[@]} files, expected Swagger UI's script, style and icon"
  for asset in "${assets[@]}"; do
    curl -fsS -o /dev/null "http://127.0.0.1:$port/$asset" || die "GET /$asset, which /docs loads, failed"
  done
  log "GET /docs and the ${#assets[@]} files it loads answered"
}

main() {
  [[ -f Dockerfile ]] || die "no Dockerfile in $PWD"
  local started=$SECONDS from bundle
  work=$(mktemp -d)
  install_tools
  # The Dockerfile pins its base by digest; the local stand-in has another digest, so the build here uses a copy of
  # the Dockerfile with the digests dropped (FROM name:tag), and the stand-in is committed under that tag.
  sed -E 's/^(FROM[[:space:]]+[^[:space:]]+)@sha256:[0-9a-f]{64}/\1/I' Dockerfile >"$work/Dockerfile"
  while read -r from; do # each FROM image that is not an earlier stage and not in the local store yet
    buildah inspect --type image "$from" >/dev/null 2>&1 || grep -qiE "^FROM .* AS $from\$" "$work/Dockerfile" ||
      make_base_image "$from"
  done < <(awk 'toupper($1) == "FROM" {for (i = 2; i <= NF; i++) if ($i !~ /^--/) {print $i; break}}' \
    "$work/Dockerfile" | sort -u)
  log "building $IMAGE ($(buildah --version))"
  # RUN steps trust what this host trusts (it may reach PyPI through a TLS-inspecting proxy): the CA bundle is
  # mounted read-only while they run, never copied into the image.
  bundle=/etc/ssl/certs/ca-certificates.crt
  buildah bud --pull=never --layers --force-rm --volume "$bundle:$bundle:ro" --file "$work/Dockerfile" --tag "$IMAGE" . \
    >"$work/build.log" 2>&1 ||
    { tail -30 "$work/build.log" >&2; die "buildah bud failed (log above)"; }
  log "built $IMAGE in $((SECONDS - started))s"

  start_registry
  register_model "$registry_uri"
  check_image "$registry_uri"
  log "$IMAGE: $(buildah images --format '{{.Size}}' "$IMAGE"); all done in $((SECONDS - started))s"
}

main "$@"
