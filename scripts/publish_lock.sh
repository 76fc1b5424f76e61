#!/usr/bin/env bash
# The retrain workflow's git side: one writer, on the newest branch tip, no merge conflicts on dvc.lock.
#
#   scripts/publish_lock.sh sync BRANCH
#       Check out the newest tip of origin/BRANCH, whatever commit the job was dispatched at: a run that waited in
#       the concurrency group must not retrain on, or commit onto, a dvc.lock that is behind the branch.
#       Records the tip's dvc.lock so that `publish` knows whether this run changed it.
#   scripts/publish_lock.sh publish BRANCH MESSAGE...
#       If this run changed dvc.lock (make retrain leaves it describing the data behind the champion), commit
#       exactly that file on top of the newest origin/BRANCH and push; if the branch moved meanwhile, build the
#       commit again on the new tip (bounded attempts). Nothing is rebased or merged, so there is nothing to
#       conflict: the commit replaces dvc.lock and keeps every other file of the tip.
#
# Settings: PUBLISH_REMOTE=origin PUBLISH_ATTEMPTS=3. Git identity from the environment or git config.
# GIT_PUSH_TOKEN: the workflow's token, given to this script's steps only (the checkout persists none). It goes to the
# fetch and the push as the header actions/checkout would write into .git/config, through git's environment
# (GIT_CONFIG_*): never written to disk, never on a command line.
set -euo pipefail

remote=${PUBLISH_REMOTE:-origin}
attempts=${PUBLISH_ATTEMPTS:-3}

say() { echo "publish_lock: $*" >&2; }
die() { say "$*"; exit 1; }

# The dvc.lock blob `sync` started from; inside .git, so `git status` stays clean.
base_path() { echo "$(git rev-parse --git-dir)/publish-lock-base"; }

with_token() {  # run "$@" with GIT_PUSH_TOKEN's authorization header for the server's https remotes, when it is set
  if [ -z "${GIT_PUSH_TOKEN:-}" ]; then
    "$@"
    return
  fi
  local basic
  basic=$(printf 'x-access-token:%s' "$GIT_PUSH_TOKEN" | base64 -w0)
  GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0="http.${GITHUB_SERVER_URL:-https://github.com}/.extraheader" \
    GIT_CONFIG_VALUE_0="AUTHORIZATION: basic $basic" "$@"
}

lock_blob() {  # the blob id of dvc.lock in commit $1, or "none"
  git rev-parse --verify --quiet "$1:dvc.lock" || echo none
}

sync() {
  local branch=$1 dispatched
  dispatched=$(git rev-parse HEAD)
  with_token timeout 120 git fetch --quiet "$remote" "$branch" ||
    die "cannot fetch $remote/$branch: check the remote and the token's contents:read permission"
  git checkout --quiet --force -B "$branch" "$remote/$branch"
  lock_blob HEAD >"$(base_path)"
  if [ "$dispatched" = "$(git rev-parse HEAD)" ]; then
    say "on $branch at $(git rev-parse --short HEAD), the dispatched commit"
  else
    say "on $branch at $(git rev-parse --short HEAD), the newest tip ($(git rev-list --count "$dispatched..HEAD")" \
      "commit(s) after the dispatched $(git rev-parse --short "$dispatched"))"
  fi
}

publish() {
  local branch=$1 message=$2 base ours tree commit attempt index
  [ -f "$(base_path)" ] || die "run \`$0 sync $branch\` before the retrain: publish needs the dvc.lock it started from"
  base=$(cat "$(base_path)")
  [ -f dvc.lock ] || { say "no dvc.lock: nothing to publish"; return 0; }
  ours=$(git hash-object -w dvc.lock)
  if [ "$ours" = "$base" ]; then
    say "dvc.lock unchanged"
    return 0
  fi
  index=$(mktemp)
  trap 'rm -f "$index"' RETURN
  for attempt in $(seq 1 "$attempts"); do
    with_token timeout 120 git fetch --quiet "$remote" "$branch" || die "cannot fetch $remote/$branch"
    if [ "$(lock_blob "$remote/$branch")" != "$base" ]; then
      say "warning: dvc.lock on $remote/$branch changed during this run (a \`make promote\`?); this run moved the" \
        "alias last, so its dvc.lock is the one that describes the champion"
    fi
    GIT_INDEX_FILE=$index git read-tree "$remote/$branch"
    GIT_INDEX_FILE=$index git update-index --add --cacheinfo "100644,$ours,dvc.lock"
    tree=$(GIT_INDEX_FILE=$index git write-tree)
    commit=$(git commit-tree "$tree" -p "$remote/$branch" -m "$message")
    if with_token timeout 120 git push --quiet "$remote" "$commit:refs/heads/$branch"; then
      git checkout --quiet --force -B "$branch" "$commit"
      echo "$ours" >"$(base_path)"
      say "pushed $(git rev-parse --short "$commit") to $remote/$branch: $message"
      return 0
    fi
    say "push attempt $attempt/$attempts refused ($remote/$branch moved); building the commit again on the new tip"
  done
  die "could not push dvc.lock after $attempts attempts: the alias already points at the new champion, so" \
    "commit this run's dvc.lock by hand (it is in the job's workspace) or rerun the workflow"
}

case "${1:-}" in
  sync) [ $# -eq 2 ] || die "usage: $0 sync BRANCH"; sync "$2" ;;
  publish) [ $# -ge 3 ] || die "usage: $0 publish BRANCH MESSAGE..."; branch=$2; shift 2; publish "$branch" "$*" ;;
  *) die "usage: $0 sync BRANCH | publish BRANCH MESSAGE..." ;;
esac
