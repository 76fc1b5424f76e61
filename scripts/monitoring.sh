#!/usr/bin/env bash
# Prometheus on 127.0.0.1 for a running `make serve`, with the rules of prometheus/rules/, and a Pushgateway for the
# batch jobs (`make realized`), which Prometheus scrapes keeping the pushed labels (what this machine can run of
# docker-compose.yml: both from Debian, `apt-get install prometheus prometheus-pushgateway`; no Grafana).
#
#   scripts/monitoring.sh up     start them (or say they are running); print where to look
#   scripts/monitoring.sh down   stop them by their recorded process groups (safe to repeat)
#
# Settings (environment): PORT=8000 (the app's, as for `make serve`), MONITORING_TARGETS (the apps to scrape,
# space-separated host:port; default 127.0.0.1:$PORT), PROMETHEUS_PORT=9090, PUSHGATEWAY_PORT=9091,
# SCRAPE_INTERVAL=15s (also the rule evaluation interval), MONITORING_DIR=.monitoring (config, data and pushed
# figures kept across restarts, logs, pid files), MONITORING_TIMEOUT_S=30 (wait for ready).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$root/.venv}
[ -d "$venv/bin" ] && PATH="$venv/bin:$PATH"

PORT=${PORT:-8000}
MONITORING_TARGETS=${MONITORING_TARGETS:-127.0.0.1:$PORT}
PROMETHEUS_PORT=${PROMETHEUS_PORT:-9090}
PUSHGATEWAY_PORT=${PUSHGATEWAY_PORT:-9091}
SCRAPE_INTERVAL=${SCRAPE_INTERVAL:-15s}
MONITORING_DIR=${MONITORING_DIR:-$root/.monitoring}
MONITORING_TIMEOUT_S=${MONITORING_TIMEOUT_S:-30}
PROMETHEUS_URL=http://127.0.0.1:$PROMETHEUS_PORT
PUSHGATEWAY_URL=http://127.0.0.1:$PUSHGATEWAY_PORT

log() { echo "monitoring: $*" >&2; }
die() { log "$*"; exit 1; }
# shellcheck source=scripts/process_group.sh
source "$root/scripts/process_group.sh"

# prometheus.yml with absolute rule paths, the interval, and each job's targets file pointed at ours (file_sd: edit
# $MONITORING_DIR/targets.yml while it runs to change which apps it scrapes; pushgateway.yml names ours).
write_config() {
  local targets
  read -ra targets <<<"$MONITORING_TARGETS"
  python - "$root/prometheus.yml" "$MONITORING_DIR" "$SCRAPE_INTERVAL" "127.0.0.1:$PUSHGATEWAY_PORT" \
    "${targets[@]}" <<'EOF'
import sys
from pathlib import Path

import yaml

source, state, interval, pushgateway, *targets = sys.argv[1:]
source, state = Path(source), Path(state)
config = yaml.safe_load(source.read_text())
config["global"].update(scrape_interval=interval, evaluation_interval=interval)
config["rule_files"] = [str(source.parent / pattern) for pattern in config["rule_files"]]
jobs = {job["job_name"]: job for job in config["scrape_configs"]}
for name, file, listed in (("housing-serve", "targets.yml", targets), ("pushgateway", "pushgateway.yml", [pushgateway])):
    jobs[name]["file_sd_configs"] = [{"files": [str(state / file)]}]
    (state / file).write_text(yaml.safe_dump([{"targets": listed}]))
(state / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
EOF
}

up() {
  local pgid target
  if pgid=$(running_group "$MONITORING_DIR" prometheus) && running_group "$MONITORING_DIR" pushgateway >/dev/null; then
    log "already up (process group $pgid): $PROMETHEUS_URL"
    return
  fi
  down  # one of the two alone: start both afresh
  command -v prometheus >/dev/null || die "prometheus not found: \`sudo apt-get install prometheus\` (Debian/Ubuntu), or use docker compose"
  command -v prometheus-pushgateway >/dev/null ||
    die "prometheus-pushgateway not found: \`sudo apt-get install prometheus-pushgateway\` (make tools), or use docker compose"
  command -v python >/dev/null || die "python not found: run \`make venv\` first (or set VENV to the virtualenv)"
  port_in_use "$PROMETHEUS_PORT" && die "port $PROMETHEUS_PORT on 127.0.0.1 is taken: free it or choose PROMETHEUS_PORT"
  port_in_use "$PUSHGATEWAY_PORT" && die "port $PUSHGATEWAY_PORT on 127.0.0.1 is taken: free it or choose PUSHGATEWAY_PORT"
  mkdir -p "$MONITORING_DIR/data"
  write_config
  trap 'log "start-up failed; stopping what was started"; down' EXIT
  # Pushed figures are kept in a file across restarts: a batch job's last push stays visible until its next one.
  start_group "$MONITORING_DIR" pushgateway prometheus-pushgateway --web.listen-address="127.0.0.1:$PUSHGATEWAY_PORT" \
    --persistence.file="$MONITORING_DIR/pushgateway.data"
  wait_answering "$MONITORING_DIR" pushgateway "$PUSHGATEWAY_URL/-/ready" "$MONITORING_TIMEOUT_S"
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
pushgateway: $PUSHGATEWAY_URL  for batch jobs: export PUSHGATEWAY_URL=$PUSHGATEWAY_URL before \`make realized\`
  targets  $PROMETHEUS_URL/targets
  alerts   $PROMETHEUS_URL/alerts   (pending and firing; rules in prometheus/rules/)
  query    $PROMETHEUS_URL/graph    e.g. job_field:housing_drift_psi:max
  a picture   PROMETHEUS_URL=$PROMETHEUS_URL make dashboard-png   (each dashboard panel by panel, as a PNG)
Grafana needs Docker: docker compose up -d (see docker-compose.yml). Stop this one: make monitoring-down
EOF
}

down() {
  stop_group "$MONITORING_DIR" prometheus
  stop_group "$MONITORING_DIR" pushgateway
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) die "usage: $0 up|down" ;;
esac
