#!/usr/bin/env bash
# `make deploy` / `make rollback-deploy`, run on the serving host (needs docker, curl and flock; the aws CLI when
# the reload token comes from Secrets Manager).
#
#   deploy.sh deploy     serve $IMAGE:$IMAGE_TAG (with GIT_REF: first check out that commit, then run its deploy.sh)
#   deploy.sh rollback   serve the image that served before the last switch (twice: back again)
#
# Everything happens under one lock ($STATE_DIR/lock), the checkout of GIT_REF included: two deploys never
# interleave, and the script that runs is the one of the commit being deployed (it is exec'd, the lock inherited).
#
# Port $HTTP_PORT belongs to an nginx container ($PROXY) whose one upstream is the live app container,
# housing-serve-blue or housing-serve-green, on the docker network $NETWORK. A release starts the other colour beside
# the live one, published on 127.0.0.1 only ($BLUE_PORT or $GREEN_PORT), waits for GET /ready and a smoke
# POST /predict, points nginx at it (`nginx -t`, then `nginx -s reload`: graceful, requests in flight finish on the
# old container), checks through port $HTTP_PORT that the new container answers, and only then stops the old one.
# Any failure before that point puts nginx back, removes the new container, leaves the old one serving untouched,
# prints the new container's last log lines and exits 1. A reload nginx refuses (non-zero exit) or does not apply
# (port $HTTP_PORT keeps answering from the old container) is such a failure.
#
# With ADMIN_PORT set the app answers /reload and /metrics only on its admin port (serving/admin.py), and nginx
# proxies host port $ADMIN_PORT to the live colour's admin port: a second `server` block in the same file, switched by
# the same reload, so both ports always name one colour. The app listens there on 0.0.0.0 (ADMIN_HOST): inside the
# container, 127.0.0.1 is the container's own loopback, which nginx cannot reach. The port is published on all the
# host's interfaces; the security group opens it to AdminIngressCidr only. After the switch, port $ADMIN_PORT must
# answer GET /metrics from the new container and port $HTTP_PORT must answer it 404, or the release fails as above.
#
# Every colour mounts $PREDICTION_LOG_HOST_DIR at its PREDICTION_LOG_DIR, so the prediction log of every release, a
# rolled-back one too, is in one directory on the host (serving/prediction_log.py shares and prunes it). nginx sends
# the client's address as X-Forwarded-For, replacing whatever the client sent, and the app takes the client from it
# (uvicorn's FORWARDED_ALLOW_IPS=*; its port is published on 127.0.0.1 only): the log's byte budget is per client.
#
# The live container is the one nginx serves now: the X-Served-By header of its answer on port $HTTP_PORT (set by
# the configuration nginx has loaded), not the configuration file, which a failed reload leaves out of step.
#
# Settings: the environment, else $DEPLOY_CONFIG (/etc/housing/deploy.env, KEY=VALUE lines), else these defaults.
#   IMAGE, IMAGE_TAG         what `deploy` serves, e.g. acme/housing-serve and a git SHA (required for deploy)
#   ENV_FILE                 /etc/housing/serve.env: the app's settings (MLFLOW_TRACKING_URI, MODEL_NAME, MODEL_ALIAS,
#                            AWS_DEFAULT_REGION, ...), passed with --env-file; none of it is in the image
#   RELOAD_TOKEN_SECRET_ARN  Secrets Manager secret whose value becomes the app's RELOAD_TOKEN (read with the
#                            instance role); unset: ENV_FILE may set RELOAD_TOKEN itself
#   ADMIN_PORT               the app's admin port (/reload, /metrics), also nginx's on the host (unset or 0: none,
#                            everything on $HTTP_PORT); the stack writes it into deploy.env and serve.env
#   HTTP_PORT=80  BLUE_PORT=8001  GREEN_PORT=8002  NETWORK=housing  PROXY=housing-proxy  PROXY_IMAGE=nginx:1.27-alpine
#   READY_TIMEOUT_S=180      time for the new container to answer /ready (it downloads and checks the model)
#   SWITCH_TIMEOUT_S=15      time for port $HTTP_PORT to answer from the new container after the switch
#   POLL_INTERVAL_S=2  STOP_TIMEOUT_S=30  LOG_LINES=40
#   STATE_DIR=/var/lib/housing-deploy   nginx's conf.d, the lock, and `state`: the CURRENT and PREVIOUS image
#   PREDICTION_LOG_HOST_DIR=/var/lib/housing-mlops/predictions   the prediction log, mounted at the container's
#                            PREDICTION_LOG_DIR for every colour: it outlives containers, deploys and rollbacks (made
#                            and given to the image's user, $APP_UID, when this runs as root)
#   GIT_REF                  a full commit SHA: fetch it from origin and check it out in this script's checkout
#                            (under the lock), then run that commit's deploy.sh
set -euo pipefail

DEPLOY_CONFIG=${DEPLOY_CONFIG:-/etc/housing/deploy.env}
if [[ -f $DEPLOY_CONFIG ]]; then
  while IFS='=' read -r key value || [[ -n $key ]]; do
    if [[ $key =~ ^[A-Z][A-Z0-9_]*$ && ! -v $key ]]; then printf -v "$key" '%s' "$value"; fi
  done <"$DEPLOY_CONFIG"
fi
ENV_FILE=${ENV_FILE:-/etc/housing/serve.env}
HTTP_PORT=${HTTP_PORT:-80}
ADMIN_PORT=${ADMIN_PORT:-}
if [[ $ADMIN_PORT == 0 ]]; then ADMIN_PORT=""; fi
BLUE_PORT=${BLUE_PORT:-8001}
GREEN_PORT=${GREEN_PORT:-8002}
NETWORK=${NETWORK:-housing}
PROXY=${PROXY:-housing-proxy}
PROXY_IMAGE=${PROXY_IMAGE:-nginx:1.27-alpine}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-180}
SWITCH_TIMEOUT_S=${SWITCH_TIMEOUT_S:-15}
POLL_INTERVAL_S=${POLL_INTERVAL_S:-2}
STOP_TIMEOUT_S=${STOP_TIMEOUT_S:-30}
LOG_LINES=${LOG_LINES:-40}
STATE_DIR=${STATE_DIR:-/var/lib/housing-deploy}
PREDICTION_LOG_HOST_DIR=${PREDICTION_LOG_HOST_DIR:-/var/lib/housing-mlops/predictions}

APP=housing-serve
CHECKOUT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
APP_PORT=8000 # inside the container
APP_UID=10001 # the image's user (the Dockerfile's USER): the prediction log directory must be its
APP_LOG_DIR=/app/logs # the container's PREDICTION_LOG_DIR
CONF=$STATE_DIR/nginx/default.conf
STATE=$STATE_DIR/state
# A known district (the first row of the California housing data): every model must price it.
SMOKE_RECORD='{"longitude": -122.23, "latitude": 37.88, "housing_median_age": 41.0, "total_rooms": 880.0,
  "total_bedrooms": 129.0, "population": 322.0, "households": 126.0, "median_income": 8.3252,
  "ocean_proximity": "NEAR BAY"}'

candidate=""     # the new container until it serves: removed on any failure
live=""          # the container port $HTTP_PORT served before this release
switching=""     # set once nginx's configuration names the candidate
proxy_started="" # set when this release started the nginx container

log() { echo "deploy: $*"; }

fail() {
  echo "deploy: $*" >&2
  if [[ -n $candidate ]]; then
    echo "deploy: last $LOG_LINES log lines of $candidate:" >&2
    docker logs --tail "$LOG_LINES" "$candidate" 2>&1 | sed 's/^/  | /' >&2 || true
  fi
  exit 1
}

on_exit() { # after a failure: nginx back on the live container, the candidate removed
  local status=$?
  [[ -n $candidate ]] || exit "$status"
  if [[ -n $switching ]]; then
    if [[ -f $CONF.previous ]]; then mv "$CONF.previous" "$CONF"; else rm -f "$CONF"; fi
    if [[ -n $proxy_started ]]; then
      docker rm -f "$PROXY" >/dev/null 2>&1 || true
    else
      restore_proxy
    fi
  fi
  docker rm -f "$candidate" >/dev/null 2>&1 || true
  echo "deploy: removed $candidate; port $HTTP_PORT is served as before, by ${live:-nothing (first release)}" >&2
  exit "$status"
}

restore_proxy() { # the previous configuration is back in conf.d: make sure nginx serves it (it may never have left)
  local output deadline=$((SECONDS + SWITCH_TIMEOUT_S))
  output=$(docker exec "$PROXY" nginx -s reload 2>&1) ||
    echo "deploy: nginx -s reload of the previous configuration failed: $output" >&2
  [[ -n $live ]] || return 0
  until serves "$live"; do
    if ((SECONDS >= deadline)); then
      echo "deploy: ALERT: port $HTTP_PORT does not answer from $live after restoring its configuration;" \
        "check $PROXY by hand (docker logs $PROXY)" >&2
      return 0
    fi
    sleep "$POLL_INTERVAL_S"
  done
}

state_get() { sed -n "s/^$1=//p" "$STATE" 2>/dev/null || true; }

status_of() { docker inspect --type container --format '{{.State.Status}}' "$1" 2>/dev/null || echo missing; }

exists() { docker inspect --type container "$1" >/dev/null 2>&1; }

fetch_image() {
  if ! docker pull --quiet "$1" >/dev/null; then
    docker image inspect "$1" >/dev/null 2>&1 || fail "cannot pull $1 and it is not on this host; check the tag"
    log "cannot pull $1; using the copy on this host"
  fi
}

read_reload_token() { # RELOAD_TOKEN from Secrets Manager, exported for `docker run -e RELOAD_TOKEN`
  local region
  IFS=: read -r _ _ _ region _ <<<"$RELOAD_TOKEN_SECRET_ARN"
  RELOAD_TOKEN=$(aws secretsmanager get-secret-value --region "$region" --secret-id "$RELOAD_TOKEN_SECRET_ARN" \
    --query SecretString --output text) ||
    fail "cannot read $RELOAD_TOKEN_SECRET_ARN: the instance role needs secretsmanager:GetSecretValue on it"
  export RELOAD_TOKEN
}

wait_until_ready() { # $1 container, $2 its host port
  local deadline=$((SECONDS + READY_TIMEOUT_S)) status
  until curl -fsS --max-time 5 -o /dev/null "http://127.0.0.1:$2/ready" 2>/dev/null; do
    status=$(status_of "$1")
    [[ $status == running ]] || fail "$1 is $status, not running"
    ((SECONDS < deadline)) || fail "$1 did not answer GET /ready on 127.0.0.1:$2 within ${READY_TIMEOUT_S}s"
    sleep "$POLL_INTERVAL_S"
  done
}

smoke_test() { # $1 container, $2 its host port
  local answer pattern='"prediction": ?-?[0-9]'
  answer=$(curl -sS --fail-with-body --max-time 30 -H 'Content-Type: application/json' -d "$SMOKE_RECORD" \
    "http://127.0.0.1:$2/predict" 2>&1) || fail "$1 failed the smoke POST /predict: $answer"
  [[ $answer =~ $pattern ]] || fail "$1 answered the smoke POST /predict without a prediction: $answer"
}

proxy_server() { # $1 upstream name, $2 container, $3 its port, $4 the port nginx listens on, $5 largest body (optional)
  cat <<EOF
upstream $1 { server $2:$3; }
server {
  listen $4;${5:+
  client_max_body_size $5;}
  location / {
    proxy_pass http://$1;
    proxy_set_header Host \$host;
    proxy_set_header X-Forwarded-For \$remote_addr;
    add_header X-Served-By $2 always;
  }
}
EOF
}

write_conf() { # $1 upstream container. nginx reads conf.d/*.conf only: the .new file is inert until renamed
  {
    echo "# Written by scripts/deploy.sh: port $HTTP_PORT -> $1${ADMIN_PORT:+, port $ADMIN_PORT -> its admin port}"
    proxy_server app "$1" "$APP_PORT" 80 8m
    if [[ -n $ADMIN_PORT ]]; then
      echo "# port $ADMIN_PORT (private: the security group) -> the admin port of $1: /reload, /metrics"
      proxy_server admin "$1" "$ADMIN_PORT" "$ADMIN_PORT"
    fi
  } >"$CONF.new"
  if [[ -f $CONF ]]; then cp "$CONF" "$CONF.previous"; fi
  switching=1
  mv "$CONF.new" "$CONF"
}

serves() { # $1 container: port $HTTP_PORT answers GET /ready, through nginx, from it
  curl -fsS --max-time 5 -D - -o /dev/null "http://127.0.0.1:$HTTP_PORT/ready" 2>/dev/null |
    tr -d '\r' | grep -qix "x-served-by: $1"
}

serves_admin() { # $1 container: port $ADMIN_PORT answers GET /metrics from it, port $HTTP_PORT answers it 404
  local public
  curl -fsS --max-time 5 -D - -o /dev/null "http://127.0.0.1:$ADMIN_PORT/metrics" 2>/dev/null |
    tr -d '\r' | grep -qix "x-served-by: $1" || return 1
  public=$(curl -sS --max-time 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$HTTP_PORT/metrics" 2>/dev/null)
  [[ $public == 404 ]]
}

served_by() { # the container nginx's loaded configuration sends port $HTTP_PORT to ("" when no proxy runs)
  local headers name
  [[ $(status_of "$PROXY") == running ]] || return 0
  # `always`: nginx adds the header to its own 502 too, so a live container that stopped answering is still named.
  headers=$(curl -sS --max-time 5 -D - -o /dev/null "http://127.0.0.1:$HTTP_PORT/health" 2>&1) ||
    fail "cannot ask $PROXY on port $HTTP_PORT which container it serves: $headers"
  name=$(tr -d '\r' <<<"$headers" | sed -n 's/^[Xx]-[Ss]erved-[Bb]y: *//p' | head -1)
  [[ $name == "$APP-blue" || $name == "$APP-green" ]] ||
    fail "$PROXY on port $HTTP_PORT names no $APP-blue/green container (X-Served-By: '${name}'); fix it by hand"
  echo "$name"
}

switch_to() { # $1 container
  local output deadline=$((SECONDS + SWITCH_TIMEOUT_S)) publish=(-p "$HTTP_PORT:80")
  if [[ -n $ADMIN_PORT ]]; then publish+=(-p "$ADMIN_PORT:$ADMIN_PORT"); fi
  write_conf "$1"
  if [[ $(status_of "$PROXY") == running ]]; then
    output=$(docker exec "$PROXY" nginx -t 2>&1) || fail "nginx refused the new configuration: $output"
    output=$(docker exec "$PROXY" nginx -s reload 2>&1) || fail "nginx -s reload failed in $PROXY: $output"
  else
    ! exists "$PROXY" || docker rm -f "$PROXY" >/dev/null
    proxy_started=1
    docker run -d --name "$PROXY" --restart unless-stopped --network "$NETWORK" "${publish[@]}" \
      -v "$STATE_DIR/nginx:/etc/nginx/conf.d:ro" --log-opt max-size=10m --log-opt max-file=3 \
      "$PROXY_IMAGE" >/dev/null || fail "could not start $PROXY on port $HTTP_PORT"
  fi
  until serves "$1"; do
    ((SECONDS < deadline)) || fail "port $HTTP_PORT did not answer from $1 within ${SWITCH_TIMEOUT_S}s" \
      "(nginx did not apply the new configuration: see docker logs $PROXY)"
    sleep "$POLL_INTERVAL_S"
  done
  if [[ -n $ADMIN_PORT ]]; then
    until serves_admin "$1"; do
      ((SECONDS < deadline)) || fail "port $ADMIN_PORT did not answer GET /metrics from $1, or port $HTTP_PORT" \
        "did not answer it 404, within ${SWITCH_TIMEOUT_S}s: does $1's image predate ADMIN_PORT (serving/admin.py)?"
      sleep "$POLL_INTERVAL_S"
    done
  fi
  rm -f "$CONF.previous"
}

release() { # $1 image reference
  local image=$1 colour port current token_args=() admin_args=()
  [[ -f $ENV_FILE ]] || fail "$ENV_FILE is missing: write the app's settings in it (MLFLOW_TRACKING_URI=..., README)"
  if [[ -z $ADMIN_PORT ]] && grep -qE '^ADMIN_PORT=0*[1-9]' "$ENV_FILE"; then # the app would hide /metrics from nginx
    fail "$ENV_FILE sets ADMIN_PORT but this deploy has none: set the same ADMIN_PORT in $DEPLOY_CONFIG, so that" \
      "nginx routes it (or remove it from $ENV_FILE)"
  fi
  fetch_image "$image"
  if [[ -n ${RELOAD_TOKEN_SECRET_ARN:-} ]]; then
    read_reload_token
    token_args=(-e RELOAD_TOKEN) # the name only: docker copies the value, which stays off the command line
  fi
  live=$(served_by) || exit 1
  if [[ -n $ADMIN_PORT && -n $live ]] && ! docker port "$PROXY" "$ADMIN_PORT" >/dev/null 2>&1; then
    fail "$PROXY does not publish port $ADMIN_PORT: it started before ADMIN_PORT was set. Recreate it:" \
      "docker rm -f $PROXY, then deploy again (port $HTTP_PORT answers nothing until that deploy switches)"
  fi
  if [[ -n $ADMIN_PORT ]]; then # 0.0.0.0 inside the container: nginx reaches it over $NETWORK, not its loopback
    admin_args=(-e "ADMIN_PORT=$ADMIN_PORT" -e ADMIN_HOST=0.0.0.0)
  fi
  if [[ -z $live ]]; then # no proxy runs, so nothing is served: the file names the colour to replace last
    live=$(sed -n "s/^upstream app { server \($APP-[a-z]*\):.*/\1/p" "$CONF" 2>/dev/null || true)
  fi
  if [[ $live == "$APP-blue" ]]; then colour=green port=$GREEN_PORT; else colour=blue port=$BLUE_PORT; fi
  docker network inspect "$NETWORK" >/dev/null 2>&1 || docker network create "$NETWORK" >/dev/null
  mkdir -p "$PREDICTION_LOG_HOST_DIR" || fail "cannot make $PREDICTION_LOG_HOST_DIR (PREDICTION_LOG_HOST_DIR)"
  if [[ $(id -u) == 0 ]]; then
    chown "$APP_UID:$APP_UID" "$PREDICTION_LOG_HOST_DIR" || fail "cannot give $PREDICTION_LOG_HOST_DIR to uid $APP_UID"
  fi
  ! exists "$APP-$colour" || docker rm -f "$APP-$colour" >/dev/null # left by an interrupted release; not live

  log "starting $image as $APP-$colour on 127.0.0.1:$port"
  candidate=$APP-$colour
  docker run -d --name "$candidate" --restart unless-stopped --network "$NETWORK" -p "127.0.0.1:$port:$APP_PORT" \
    --env-file "$ENV_FILE" "${token_args[@]}" -e PORT=$APP_PORT "${admin_args[@]}" \
    -v "$PREDICTION_LOG_HOST_DIR:$APP_LOG_DIR" -e PREDICTION_LOG_DIR=$APP_LOG_DIR -e 'FORWARDED_ALLOW_IPS=*' \
    --log-opt max-size=10m --log-opt max-file=3 \
    "$image" >/dev/null || fail "could not start $candidate"
  wait_until_ready "$candidate" "$port"
  smoke_test "$candidate" "$port"
  log "$candidate is ready; switching port $HTTP_PORT to it"
  switch_to "$candidate"
  candidate=""

  current=$(state_get CURRENT)
  if [[ $image != "$current" ]]; then
    printf 'CURRENT=%s\nPREVIOUS=%s\n' "$image" "$current" >"$STATE.new"
    mv "$STATE.new" "$STATE"
  fi
  if [[ -n $live ]] && exists "$live"; then
    { docker stop -t "$STOP_TIMEOUT_S" "$live" >/dev/null && docker rm "$live" >/dev/null; } ||
      log "warning: could not remove the old container $live; remove it by hand"
  fi
  log "port $HTTP_PORT serves $image ($APP-$colour)"
}

check_out() { # $1 a commit SHA: fetch and check it out, then run its deploy.sh, which inherits the lock (fd 9)
  [[ $1 =~ ^[0-9a-f]{40}$ ]] || fail "GIT_REF must be a full 40-character commit SHA, not '$1'"
  local output
  output=$(git -C "$CHECKOUT" fetch --quiet --depth 1 origin "$1" 2>&1) || fail "git fetch of $1 failed: $output"
  output=$(git -C "$CHECKOUT" checkout --quiet --force "$1" 2>&1) || fail "git checkout of $1 failed: $output"
  log "checked out $1 in $CHECKOUT"
  shift
  DEPLOY_LOCK_FD=9 GIT_REF="" exec bash "$CHECKOUT/scripts/deploy.sh" "$@"
}

main() {
  mkdir -p "$STATE_DIR/nginx"
  if [[ ${DEPLOY_LOCK_FD:-} != 9 ]]; then exec 9>"$STATE_DIR/lock"; fi
  flock -n 9 || fail "another deploy holds $STATE_DIR/lock; wait for it to finish"
  if [[ -n $ADMIN_PORT ]] && ! [[ $ADMIN_PORT =~ ^[1-9][0-9]{0,4}$ && $ADMIN_PORT -le 65535 &&
    $ADMIN_PORT != 80 && $ADMIN_PORT != "$APP_PORT" && $ADMIN_PORT != "$HTTP_PORT" ]]; then
    fail "ADMIN_PORT must be a port number other than 80 and $APP_PORT (nginx's and the app's public ports" \
      "inside their containers) and HTTP_PORT, not '$ADMIN_PORT'; unset it to serve everything on port $HTTP_PORT"
  fi
  case ${1:-} in
    deploy)
      [[ -n ${IMAGE:-} && -n ${IMAGE_TAG:-} ]] ||
        fail "set IMAGE and IMAGE_TAG, e.g. make deploy IMAGE=acme/housing-serve IMAGE_TAG=\$(git rev-parse HEAD)"
      if [[ -n ${GIT_REF:-} ]]; then check_out "$GIT_REF" "$@"; fi
      trap on_exit EXIT
      release "$IMAGE:$IMAGE_TAG"
      ;;
    rollback)
      local previous
      previous=$(state_get PREVIOUS)
      [[ -n $previous ]] || fail "$STATE records no previous image: nothing to roll back to"
      trap on_exit EXIT
      log "rolling back from $(state_get CURRENT) to $previous"
      release "$previous"
      ;;
    *) fail "usage: $0 deploy|rollback" ;;
  esac
}

main "$@"
