#!/usr/bin/env bash
# `make tools`: install the tools that only the distribution ships, when one is missing (`make test` and `make lint`
# call it; with everything present it does nothing). pip cannot install these; requirements-dev.txt has the rest.
#   prometheus   promtool for `make lint`, a real Prometheus for the monitoring tests and `make monitoring-up`
#   prometheus-pushgateway   where `make realized` pushes its figures, for the tests and `make monitoring-up`
#   jq           the deploy workflow's JSON step, which a deploy test runs as written
#   buildah, debootstrap, debian-archive-keyring   the daemonless image build of `make image` and its test
#   chromium, chromium-driver   the headless browser of the page tests, and the driver Selenium talks to
#   graphviz     `dot`, which draws the architecture picture
#   git, curl    the pipeline stories' origin repository and DVC, the image check and the reload step: a minimal
#                Debian image (a CI container) has neither
# As root (or with passwordless sudo): apt-get update once, then install with --no-install-recommends. Otherwise
# print the one command that does it and fail.
set -euo pipefail

# command that must be on PATH -> Debian package that provides it
declare -A package_of=(
  [promtool]=prometheus
  [prometheus]=prometheus
  [prometheus-pushgateway]=prometheus-pushgateway
  [jq]=jq
  [buildah]=buildah
  [debootstrap]=debootstrap
  [chromium]=chromium
  [chromedriver]=chromium-driver
  [dot]=graphviz
  [git]=git
  [curl]=curl
)
declare -A wanted=() # a set of packages: prometheus provides two of the commands
for command in "${!package_of[@]}"; do
  command -v "$command" >/dev/null || wanted[${package_of[$command]}]=1
done
missing=("${!wanted[@]}")
# debootstrap checks the signatures of what it downloads with Debian's keyring (Ubuntu does not install it).
[[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]] || missing+=(debian-archive-keyring)
((${#missing[@]})) || exit 0

if [[ $EUID == 0 ]]; then
  sudo=()
elif command -v sudo >/dev/null && sudo --non-interactive true 2>/dev/null; then
  sudo=(sudo --non-interactive)
else
  echo "tools: missing ${missing[*]}; install them with:" \
    "sudo sh -c 'apt-get update && apt-get install -y --no-install-recommends ${missing[*]}'" >&2
  exit 1
fi
echo "tools: installing ${missing[*]} (apt-get)"
# sudo drops the environment: the setting goes on the command line. The lock timeout waits for another apt-get.
apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=300)
"${apt[@]}" update
"${apt[@]}" install -y --no-install-recommends "${missing[@]}" >/dev/null
# The packages enable services on 0.0.0.0 (9090, 9091); the tests and `make monitoring-up` run their own.
for service in prometheus prometheus-pushgateway; do
  if [[ " ${missing[*]} " == *" $service "* ]] && command -v systemctl >/dev/null; then
    "${sudo[@]}" systemctl disable --now "$service" >/dev/null 2>&1 || true
  fi
done
