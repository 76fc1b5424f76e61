#!/usr/bin/env bash
# Local stand-ins for the cloud services of the data path, on 127.0.0.1:
#   moto   S3 (data, DVC and MLflow buckets) and Secrets Manager (the GitHub token of dispatch_lambda.py)
#   mlflow tracking + registry (sqlite in the state dir), run artifacts in the moto bucket through the server's
#          artifact proxy: only the server holds S3 settings. MLflow's basic-auth app guards it: anonymous
#          requests get 401; `writer` (retraining: owns the model, may register and move aliases) and `reader`
#          (serving: READ only) get fresh random passwords at each `up`, written to $SERVICES_DIR/env (writer,
#          for `make retrain`) and $SERVICES_DIR/serving.env (reader, for `make serve`), mode 600, never printed.
#
#   scripts/services.sh up     start both (or say they are running); print the settings to export
#   scripts/services.sh down   stop both by their recorded process groups (safe to repeat)
#
# Settings (environment): MOTO_PORT=5500 MLFLOW_PORT=5050 SERVICES_DIR=.services DATA_BUCKET=housing-data
# S3_DVC_BUCKET=housing-dvc MLFLOW_BUCKET=housing-mlflow GITHUB_PAT_SECRET_NAME=housing-mlops/github-pat
# GITHUB_TOKEN (value stored in that secret, default a placeholder) SERVICES_TIMEOUT_S=90 (wait for health)
# AUTH_CACHE_TTL_S=300 (how long the MLflow server trusts a checked password).
# moto keeps everything in memory: each `up` starts with empty buckets and an empty MLflow store.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$root/.venv}
[ -d "$venv/bin" ] && PATH="$venv/bin:$PATH"

MOTO_PORT=${MOTO_PORT:-5500}
MLFLOW_PORT=${MLFLOW_PORT:-5050}
SERVICES_DIR=${SERVICES_DIR:-$root/.services}
DATA_BUCKET=${DATA_BUCKET:-housing-data}
S3_DVC_BUCKET=${S3_DVC_BUCKET:-housing-dvc}
MLFLOW_BUCKET=${MLFLOW_BUCKET:-housing-mlflow}
GITHUB_PAT_SECRET_NAME=${GITHUB_PAT_SECRET_NAME:-housing-mlops/github-pat}
SERVICES_TIMEOUT_S=${SERVICES_TIMEOUT_S:-90}
AUTH_CACHE_TTL_S=${AUTH_CACHE_TTL_S:-300}
REGION=${AWS_DEFAULT_REGION:-us-east-1}
MOTO_URL=http://127.0.0.1:$MOTO_PORT
MLFLOW_URL=http://127.0.0.1:$MLFLOW_PORT
SERVICES=(moto mlflow)

log() { echo "services: $*" >&2; }
die() { log "$*"; exit 1; }
# shellcheck source=scripts/process_group.sh
source "$root/scripts/process_group.sh"

require_tools() {
  local tool
  for tool in moto_server mlflow python curl; do
    command -v "$tool" >/dev/null || die "$tool not found: run \`make venv\` first (or set VENV to the virtualenv)"
  done
}

start_moto() {
  start_group "$SERVICES_DIR" moto moto_server -H 127.0.0.1 -p "$MOTO_PORT"
  wait_answering "$SERVICES_DIR" moto "$MOTO_URL/moto-api/" "$SERVICES_TIMEOUT_S"
  log "moto (S3, Secrets Manager) on $MOTO_URL"
}

new_secret() { python -c 'import secrets; print(secrets.token_urlsafe(24))'; }

# The auth app's settings file and the passwords (admin, writer, reader, Flask key): state dir, mode 600.
# auth_cache_ttl_seconds: without it the server hashes the password (scrypt, ~50 ms of CPU) on every request; with
# it a checked credential is trusted for that long (a changed or deleted account takes effect at once regardless).
write_auth_config() {
  (
    umask 077
    cat >"$SERVICES_DIR/basic_auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = sqlite:///$SERVICES_DIR/basic_auth.db
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = $AUTH_CACHE_TTL_S
EOF
    printf 'ADMIN_PASSWORD=%s\nWRITER_PASSWORD=%s\nREADER_PASSWORD=%s\nFLASK_SECRET=%s\n' \
      "$(new_secret)" "$(new_secret)" "$(new_secret)" "$(new_secret)" >"$SERVICES_DIR/credentials"
  )
}

start_mlflow() {
  rm -f "$SERVICES_DIR/mlflow.db" "$SERVICES_DIR/basic_auth.db"  # its artifacts lived in the previous moto's memory
  write_auth_config
  # shellcheck source=/dev/null
  source "$SERVICES_DIR/credentials"
  start_group "$SERVICES_DIR" mlflow env MLFLOW_S3_ENDPOINT_URL="$MOTO_URL" AWS_ENDPOINT_URL="$MOTO_URL" \
    AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION="$REGION" \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_AUTH_CONFIG_PATH="$SERVICES_DIR/basic_auth.ini" \
    MLFLOW_AUTH_ADMIN_PASSWORD="$ADMIN_PASSWORD" MLFLOW_FLASK_SERVER_SECRET_KEY="$FLASK_SECRET" \
    mlflow server --app-name basic-auth --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "sqlite:///$SERVICES_DIR/mlflow.db" \
    --artifacts-destination "s3://$MLFLOW_BUCKET/artifacts"
  wait_answering "$SERVICES_DIR" mlflow "$MLFLOW_URL/health" "$SERVICES_TIMEOUT_S"
  create_accounts
  log "mlflow server on $MLFLOW_URL with basic auth (artifacts in s3://$MLFLOW_BUCKET/artifacts)"
}

# writer and reader accounts; the writer creates the registered model, so only it may change it (MANAGE).
create_accounts() {
  MLFLOW_TRACKING_URI=$MLFLOW_URL MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=$ADMIN_PASSWORD \
    WRITER_PASSWORD=$WRITER_PASSWORD READER_PASSWORD=$READER_PASSWORD \
    MODEL_NAME=${MODEL_NAME:-$(python "$root/names.py" MODEL_NAME)} python - <<'EOF'
import os

from mlflow.server import get_app_client
from mlflow.tracking import MlflowClient

uri = os.environ["MLFLOW_TRACKING_URI"]
accounts = get_app_client("basic-auth", tracking_uri=uri)
accounts.create_user("writer", os.environ["WRITER_PASSWORD"])
accounts.create_user("reader", os.environ["READER_PASSWORD"])
os.environ.update(MLFLOW_TRACKING_USERNAME="writer", MLFLOW_TRACKING_PASSWORD=os.environ["WRITER_PASSWORD"])
MlflowClient(uri).create_registered_model(os.environ["MODEL_NAME"])
EOF
}

# Buckets and the GitHub token secret; prints the secret's ARN.
create_resources() {
  AWS_ENDPOINT_URL=$MOTO_URL AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=$REGION \
    python - "$DATA_BUCKET" "$S3_DVC_BUCKET" "$MLFLOW_BUCKET" "$GITHUB_PAT_SECRET_NAME" <<'EOF'
import os
import sys

import boto3

*buckets, secret_name = sys.argv[1:]
s3 = boto3.client("s3")
for bucket in buckets:
    s3.create_bucket(Bucket=bucket)
token = os.environ.get("GITHUB_TOKEN") or "replace-me-with-a-github-token"
print(boto3.client("secretsmanager").create_secret(Name=secret_name, SecretString=token)["ARN"])
EOF
}

write_env() {
  local secret_arn=$1
  (
    umask 077
    cat >"$SERVICES_DIR/env" <<EOF
export AWS_ENDPOINT_URL=$MOTO_URL
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=$REGION
export MLFLOW_TRACKING_URI=$MLFLOW_URL
export MLFLOW_TRACKING_USERNAME=writer MLFLOW_TRACKING_PASSWORD=$WRITER_PASSWORD
export DVC_REMOTE=s3remote S3_DVC_BUCKET=$S3_DVC_BUCKET
export DATA_URL=s3://$DATA_BUCKET/data/housing.csv
export GITHUB_PAT_SECRET_ARN=$secret_arn
EOF
    cat >"$SERVICES_DIR/serving.env" <<EOF
export MLFLOW_TRACKING_URI=$MLFLOW_URL
export MLFLOW_TRACKING_USERNAME=reader MLFLOW_TRACKING_PASSWORD=$READER_PASSWORD
EOF
  )
}

print_usage() {
  cat <<EOF
moto:   $MOTO_URL   (buckets $DATA_BUCKET, $S3_DVC_BUCKET, $MLFLOW_BUCKET; secret $GITHUB_PAT_SECRET_NAME)
mlflow: $MLFLOW_URL

Settings for this shell, the registry's writer account (passwords not shown): \`source $SERVICES_DIR/env\`
$(sed 's/PASSWORD=.*/PASSWORD=<in the file>/' "$SERVICES_DIR/env")
For \`make serve\`, the read-only account: \`source $SERVICES_DIR/serving.env\`

Upload data, then retrain against these services:
  python -c "import boto3; boto3.client('s3').upload_file('housing.csv', '$DATA_BUCKET', 'data/housing.csv')"
  make retrain
Stop them: make services-down
EOF
}

up() {
  mkdir -p "$SERVICES_DIR"
  local name port secret_arn alive=()
  for name in "${SERVICES[@]}"; do
    running_group "$SERVICES_DIR" "$name" >/dev/null && alive+=("$name")
  done
  if [ ${#alive[@]} -eq ${#SERVICES[@]} ] && [ -f "$SERVICES_DIR/env" ]; then
    log "already up"
    print_usage
    return
  fi
  [ ${#alive[@]} -eq 0 ] || die "only ${alive[*]} is running: run \`make services-down\`, then \`make services-up\`"
  require_tools
  for port in "$MOTO_PORT" "$MLFLOW_PORT"; do
    port_in_use "$port" && die "port $port on 127.0.0.1 is taken: free it or choose MOTO_PORT / MLFLOW_PORT"
  done
  trap 'log "start-up failed; stopping what was started"; down' EXIT
  start_moto
  secret_arn=$(create_resources)
  start_mlflow
  write_env "$secret_arn"
  trap - EXIT
  print_usage
}

down() {
  local name
  for name in mlflow moto; do
    stop_group "$SERVICES_DIR" "$name"
  done
  rm -f "$SERVICES_DIR/env" "$SERVICES_DIR/serving.env" "$SERVICES_DIR/credentials"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) die "usage: $0 up|down" ;;
esac
