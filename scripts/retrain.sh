#!/usr/bin/env bash
# `make retrain`, in the safe order (docs/promotion.md):
#   1. check the registry against dvc.lock: an empty or different registry forces a retrain (scripts/lineage.py)
#   2. dvc repro: fetch, validate, split, train, register + score + tag + log the gate's decision (no alias moves)
#   3. dvc push the data version
#   4. only then move alias `champion` (scripts/promote.py gate)
#   5. the summary table; exit non-zero unless the champion's lineage matches dvc.lock
# A failure before step 4, or a rejection, puts the last good dvc.lock and data back: dvc.lock always describes
# the data behind the champion.
set -euo pipefail

# Bounded retries for every call to the registry (MLflow's client would otherwise retry a dead server for minutes).
export MLFLOW_HTTP_REQUEST_MAX_RETRIES=${MLFLOW_HTTP_REQUEST_MAX_RETRIES:-3}
export MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=${MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR:-1}
export MLFLOW_HTTP_REQUEST_TIMEOUT=${MLFLOW_HTTP_REQUEST_TIMEOUT:-60}

say() { echo "retrain: $*" >&2; }
good_lock=.dvc/tmp/dvc.lock.good
mkdir -p .dvc/tmp

# restore WHY [STAGE...]: the last good dvc.lock, and the outputs of STAGE... (default: the data) from the cache.
restore() {
  local why=$1 stages=(fetch split)
  shift
  [ $# -eq 0 ] || stages=("$@")
  if [ -f "$good_lock" ]; then
    cp "$good_lock" dvc.lock
    dvc checkout --force --quiet "${stages[@]}" || say "some outputs of the restored dvc.lock are not in the cache"
    say "$why; dvc.lock and data/ restored to the last good version"
  else
    rm -f dvc.lock
    say "$why; no earlier data version to restore"
  fi
}

if [ -f dvc.lock ]; then
  cp dvc.lock "$good_lock"
  # A fresh clone (a CI runner) has dvc.lock but no outputs: fetch them, or every stage would re-run.
  if [ ! -e data/train.csv ]; then
    say "fetching the outputs of dvc.lock from remote '$DVC_REMOTE'"
    dvc pull --remote "$DVC_REMOTE" --allow-missing --quiet || true
  fi
else
  rm -f "$good_lock"
fi

say "1/5 checking the registry against dvc.lock"
force=()
lineage=0
python -m scripts.lineage check || lineage=$?
case $lineage in
  0) ;;
  3) force=(--force) ;;
  *) exit "$lineage" ;;
esac

# reports/decision.* belong to this run only: a skipped register stage must not replay an old decision.
rm -f reports/decision.json reports/decision.md
say "2/5 dvc repro: fetch, validate, split, train, register + gate"
# --no-run-cache: a stage whose inputs changed really runs (training logs to MLflow, the gate consults the
# registry as it is now) instead of restoring outputs of an earlier identical run.
if ! dvc repro --no-run-cache "${force[@]}"; then
  restore "failed"
  exit 1
fi
[ ! -f reports/decision.json ] || python -m scripts.promote record-lock

say "3/5 dvc push to remote '$DVC_REMOTE'"
if ! dvc push --remote "$DVC_REMOTE"; then
  restore "dvc push to remote '$DVC_REMOTE' failed (see above), so nothing was promoted and the champion is unchanged"
  say "fix the remote (credentials, bucket, network: dvc push --remote $DVC_REMOTE -v), then run make retrain again"
  exit 1
fi

decision=none
[ ! -f reports/decision.json ] || decision=$(python -c 'import json; print(json.load(open("reports/decision.json"))["decision"])')
say "4/5 promotion (gate decision: $decision)"
case $decision in
  passed)
    if ! python -m scripts.promote gate; then
      restore "promotion failed, champion unchanged"
      exit 1
    fi ;;
  rejected)
    restore "the gate rejected the challenger (reports/decision.md), champion unchanged" fetch split train ;;
  none) say "nothing retrained: the champion and dvc.lock stay" ;;
esac

say "5/5 summary"
python -m scripts.lineage report
