# shellcheck shell=bash
# Sourced by services.sh and monitoring.sh: run a long-lived command as its own process group, recorded in
# DIR/NAME.pgid with its output in DIR/NAME.log, and stop it by that group, never by name.
# The sourcing script defines log() and die().

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The process group recorded for $2 in $1, if that group still has a live process.
running_group() {
  local file=$1/$2.pgid pgid
  [ -f "$file" ] || return 1
  pgid=$(<"$file")
  kill -0 -- "-$pgid" 2>/dev/null && echo "$pgid"
}

# Start "${@:3}" as $2 in a new session. The session leader writes its own pid, which is the group id, whether or
# not setsid had to fork.
start_group() {
  local dir=$1 name=$2
  shift 2
  rm -f "$dir/$name.pgid"
  # shellcheck disable=SC2016 # $$, $0 and $@ are for the inner shell
  setsid bash -c 'echo $$ >"$0" && exec "$@"' "$dir/$name.pgid" "$@" >"$dir/$name.log" 2>&1 </dev/null &
  local deadline=$((SECONDS + 10))
  until [ -s "$dir/$name.pgid" ]; do
    ((SECONDS < deadline)) || die "$name did not start; see $dir/$name.log"
    sleep 0.05
  done
}

# Poll URL $3 until it answers 2xx, while $2 is alive, for at most $4 seconds.
wait_answering() {
  local dir=$1 name=$2 url=$3 timeout_s=$4
  local deadline=$((SECONDS + timeout_s))
  until curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null; do
    if ! running_group "$dir" "$name" >/dev/null; then
      tail -n 20 "$dir/$name.log" >&2
      die "$name exited during start-up; its log is $dir/$name.log"
    fi
    ((SECONDS < deadline)) || die "$name not answering $url after ${timeout_s}s; see $dir/$name.log"
    sleep 0.2
  done
}

# SIGTERM the group of $2, SIGKILL it after 15 s; safe to repeat.
stop_group() {
  local dir=$1 name=$2 pgid
  if pgid=$(running_group "$dir" "$name"); then
    kill -TERM -- "-$pgid"
    local deadline=$((SECONDS + 15))
    while kill -0 -- "-$pgid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    if kill -0 -- "-$pgid" 2>/dev/null; then kill -KILL -- "-$pgid"; fi
    log "stopped $name (process group $pgid)"
  fi
  rm -f "$dir/$name.pgid"
}
