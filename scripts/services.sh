#!/usr/bin/env bash
# Makes sure the servers tide's tests talk to are up on this machine: PostgreSQL on 5432 (only
# checked: tests fall back to an embedded PostgreSQL 18 when DATABASE_URL is unset), NATS with
# JetStream on 4222 (started from nats-server if installed), Kafka on 9092 (scripts/kafka.sh),
# RabbitMQ on 5672, Redis on 6379 and MQTT (Mosquitto) on 1883. A server that does not answer is
# started (its system service where one is installed, else its binary with a state directory of its
# own); when that fails, `up` fails with a line naming the server. `down` stops only what `up` started.
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

# wait_for PORT TENTHS_OF_A_SECOND: 0 once 127.0.0.1:PORT answers.
wait_for() {
  for _ in $(seq 1 "$2"); do answers "$1" && return 0; sleep 0.1; done
  return 1
}

# via_service NAME PORT SERVICE TENTHS: starts an installed system service; 0 once PORT answers.
via_service() {
  [ -x "/etc/init.d/$3" ] || return 1
  service "$3" start >/dev/null 2>&1 || return 1
  wait_for "$2" "$4" || return 1
  mkdir -p "$state" && touch "$state/$1.service"
}

# via_binary NAME PORT TENTHS COMMAND...: runs COMMAND in the background; 0 once PORT answers.
via_binary() {
  local name="$1" port="$2" tenths="$3"
  shift 3
  mkdir -p "$state/$name"
  nohup "$@" >"$state/$name/$name.log" 2>&1 &
  echo $! >"$state/$name/$name.pid"
  wait_for "$port" "$tenths"
}

# ensure NAME PORT SERVICE BINARY TENTHS START_FUNCTION: the server answers, or is started, or `up` fails naming it.
ensure() {
  local name="$1" port="$2" service="$3" binary="$4" tenths="$5" start="$6"
  if answers "$port"; then echo "$name: already answers on 127.0.0.1:$port"; return; fi
  if via_service "$name" "$port" "$service" "$tenths"; then echo "$name: started (service $service)"; return; fi
  if ! command -v "$binary" >/dev/null; then
    echo "$name: nothing answers on 127.0.0.1:$port and $binary is not installed; install it (e.g. apt-get install $service)" >&2
    return 1
  fi
  if "$start"; then echo "$name: started ($binary)"; return; fi
  echo "$name: nothing answers on 127.0.0.1:$port and starting $binary failed; see $state/$name/$name.log" >&2
  return 1
}

start_redis() {
  via_binary redis 6379 50 redis-server --bind 127.0.0.1 --port 6379 --dir "$state/redis" --save "" --appendonly no
}

start_mosquitto() {
  mkdir -p "$state/mqtt"
  # Started as root, mosquitto switches to its own user: keep the one running this script.
  printf 'listener 1883 127.0.0.1\nallow_anonymous true\npersistence false\nuser %s\n' "$(id -un)" >"$state/mqtt/mosquitto.conf"
  via_binary mqtt 1883 50 mosquitto -c "$state/mqtt/mosquitto.conf"
}

start_rabbitmq() {
  # RabbitMQ (Erlang) takes a while to boot.
  via_binary rabbitmq 5672 900 rabbitmq-server
}

# stop NAME SERVICE: stops what `up` started for NAME, nothing else.
stop() {
  if [ -f "$state/$1.service" ]; then service "$2" stop >/dev/null 2>&1 || true; rm -f "$state/$1.service"; fi
  if [ -f "$state/$1/$1.pid" ]; then
    if [ "$1" = rabbitmq ]; then rabbitmqctl stop >/dev/null 2>&1 || true; fi
    kill "$(cat "$state/$1/$1.pid")" 2>/dev/null || true
    rm -f "$state/$1/$1.pid"
  fi
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
    ensure rabbitmq 5672 rabbitmq-server rabbitmq-server 900 start_rabbitmq
    ensure redis 6379 redis-server redis-server 50 start_redis
    ensure mqtt 1883 mosquitto mosquitto 50 start_mosquitto
    ;;
  down)
    stop mqtt mosquitto
    stop redis redis-server
    stop rabbitmq rabbitmq-server
    "$here/kafka.sh" stop
    if [ -f "$state/nats/nats.pid" ]; then kill "$(cat "$state/nats/nats.pid")" 2>/dev/null || true; rm -f "$state/nats/nats.pid"; fi
    ;;
  *)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
