#!/usr/bin/env bash
# Makes sure the servers tide's tests talk to are up on this machine: PostgreSQL on 5432 (only
# checked: tests fall back to an embedded PostgreSQL 18 when DATABASE_URL is unset), NATS with
# JetStream on 4222 (started from nats-server if installed), Kafka on 9092 (scripts/kafka.sh).
# Usage: scripts/services.sh up | down
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
state="${TIDE_STATE_DIR:-$here/../.tide}"

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

nats_up() {
  if answers 4222; then echo "nats: already answers on 127.0.0.1:4222"; return; fi
  local bin
  bin="$(command -v nats-server || true)"
  [ -n "$bin" ] || bin=/usr/sbin/nats-server
  if [ ! -x "$bin" ]; then echo "nats: nats-server is not installed and nothing answers on 4222" >&2; return 1; fi
  mkdir -p "$state/nats"
  nohup "$bin" -a 127.0.0.1 -p 4222 -js -sd "$state/nats" >"$state/nats/nats.log" 2>&1 &
  echo $! >"$state/nats/nats.pid"
  for _ in $(seq 1 50); do answers 4222 && { echo "nats: started"; return; }; sleep 0.2; done
  echo "nats: did not start; see $state/nats/nats.log" >&2
  return 1
}

postgres_check() {
  if answers 5432; then echo "postgres: answers on 127.0.0.1:5432"; return; fi
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
  answers 5432 && echo "postgres: started" || echo "postgres: nothing on 5432 (tests use the embedded server)"
}

case "${1:-}" in
  up)
    postgres_check
    nats_up
    "$here/kafka.sh" start
    ;;
  down)
    "$here/kafka.sh" stop
    if [ -f "$state/nats/nats.pid" ]; then kill "$(cat "$state/nats/nats.pid")" 2>/dev/null || true; rm -f "$state/nats/nats.pid"; fi
    ;;
  *)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
