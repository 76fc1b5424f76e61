#!/usr/bin/env bash
# Prometheus on 127.0.0.1 for a running `make serve`, with the rules of prometheus/rules/ (what this machine can run
# of docker-compose.yml: Prometheus from the Debian package, `apt-get install prometheus`; no Grafana).
#
#   scripts/monitoring.sh up     start it (or say it is running); print where to look
#   scripts/monitoring.sh down   stop it by its recorded process group (safe to repeat)
#
# Settings (environment): PORT=8000 (the app's, as for `make serve`), MONITORING_TARGETS (the apps to scrape,
# space-separated host:port; default 127.0.0.1:$PORT), PROMETHEUS_PORT=9090, SCRAPE_INTERVAL=15s (also the rule
# evaluation interval), MONITORING_DIR=.monitoring (config, data kept across restarts, log, pid file),
# MONITORING_TIMEOUT_S=30 (wait for ready).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$root/.venv}
[ -d "$venv/bin" ] && PATH="$venv/bin:$PATH"

PORT=${PORT:-8000}
MONITORING_TARGETS=${MONITORING_TARGETS:-127.0.0.1:$PORT}
PROMETHEUS_PORT=${PROMETHEUS_PORT:-9090}
SCRAPE_INTERVAL=${SCRAPE_INTERVAL:-15s}
MONITORING_DIR=${MONITORING_DIR:-$root/.monitoring}
MONITORING_TIMEOUT_S=${MONITORING_TIMEOUT_S:-30}
PROMETHEUS_URL=http://127.0.0.1:$PROMETHEUS_PORT

log() { echo "monitoring: $*" >&2; }
die() { log "$*"; exit 1; }
# shellcheck source=scripts/process_group.sh
source "$root/scripts/process_group.sh"

# prometheus.yml with absolute rule paths, the interval, and its targets file pointed at ours (file_sd: edit
# $MONITORING_DIR/targets.yml while it runs to change what it scrapes).
write_config() {
  local targets
  read -ra targets <<<"$MONITORING_TARGETS"
  python - "$root/prometheus.yml" "$MONITORING_DIR" "$SCRAPE_INTERVAL" "${targets[@]}" <<'EOF'
import sys
from pathlib import Path

import yaml

source, state, interval, *targets = sys.argv[1:]
source, state = Path(source), Path(state)
config = yaml.safe_load(source.read_text())
config["global"].update(scrape_interval=interval, evaluation_interval=interval)
config["rule_files"] = [str(source.parent / pattern) for pattern in config["rule_files"]]
(job,) = config["scrape_configs"]
job["file_sd_configs"] = [{"files": [str(state / "targets.yml")]}]
(state / "targets.yml").write_text(yaml.safe_dump([{"targets": targets}]))
(state / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
EOF
}

up() {
  local pgid target
  if pgid=$(running_group "$MONITORING_DIR" prometheus); then
    log "already up (process group $pgid): $PROMETHEUS_URL"
    return
  fi
  command -v prometheus >/dev/null || die "prometheus not found: \`sudo apt-get install prometheus\` (Debian/Ubuntu), or use docker compose"
  command -v python >/dev/null || die "python not found: run \`make venv\` first (or set VENV to the virtualenv)"
  port_in_use "$PROMETHEUS_PORT" && die "port $PROMETHEUS_PORT on 127.0.0.1 is taken: free it or choose PROMETHEUS_PORT"
  mkdir -p "$MONITORING_DIR/data"
  write_config
  trap 'log "start-up failed; stopping prometheus"; down' EXIT
  start_group "$MONITORING_DIR" prometheus prometheus \
    --config.file="$MONITORING_DIR/prometheus.yml" --storage.tsdb.path="$MONITORING_DIR/data" \
    --web.listen-address="127.0.0.1:$PROMETHEUS_PORT"
  wait_answering "$MONITORING_DIR" prometheus "$PROMETHEUS_URL/-/ready" "$MONITORING_TIMEOUT_S"
  trap - EXIT
  for target in $MONITORING_TARGETS; do
    curl -fsS -o /dev/null --max-time 2 "http://$target/health" 2>/dev/null ||
      log "nothing answers on $target yet (start it with \`make serve\`): HousingServeTargetDown until it does"
  done
  cat <<EOF
prometheus: $PROMETHEUS_URL  scraping $MONITORING_TARGETS every $SCRAPE_INTERVAL
  targets  $PROMETHEUS_URL/targets
  alerts   $PROMETHEUS_URL/alerts   (pending and firing; rules in prometheus/rules/)
  query    $PROMETHEUS_URL/graph    e.g. job_field:housing_drift_psi:max
  a picture   PROMETHEUS_URL=$PROMETHEUS_URL make dashboard-png   (each dashboard panel by panel, as a PNG)
Grafana needs Docker: docker compose up -d (see docker-compose.yml). Stop this one: make monitoring-down
EOF
}

down() { stop_group "$MONITORING_DIR" prometheus; }

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) die "usage: $0 up|down" ;;
esac
