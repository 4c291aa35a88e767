#!/usr/bin/env bash
# Start, stop or check a single-node Apache Kafka broker (KRaft, combined
# broker+controller) for CI and local development, with no Docker: the jars come
# from Maven Central through scripts/kafka/pom.xml. Needs Java 17 and Maven.
#
#   scripts/kafka.sh start    # PLAINTEXT on 127.0.0.1:9092, SASL_PLAINTEXT on :9094, controller on :9093
#   scripts/kafka.sh stop
#   scripts/kafka.sh status   # exit 0 if running, 1 if not
#
# State lives in ${TIDE_KAFKA_HOME:-<repo>/.tide/kafka}: lib/ (jars), data/,
# server.properties, *log4j.properties, kafka.log, kafka.pid. Remove data/ for a
# fresh cluster; remove lib/ to fetch the jars again.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOME_DIR="${TIDE_KAFKA_HOME:-$REPO/.tide/kafka}"
POM="$REPO/scripts/kafka/pom.xml"
LIB="$HOME_DIR/lib" DATA="$HOME_DIR/data" CONF="$HOME_DIR/server.properties"
LOG="$HOME_DIR/kafka.log" PID_FILE="$HOME_DIR/kafka.pid"
HOST=127.0.0.1 PORT=9092 CONTROLLER_PORT=9093 READY_TIMEOUT=90
# A second listener with SASL (PLAIN, user tide-test), for the tests of the plugins' SASL options.
SASL_PORT=9094 SASL_USER=tide-test SASL_PASSWORD=tide-test-secret
JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"
# Kafka's command-line tools: warnings only, to stderr.
TOOL=("$JAVA" -Dlog4j.configuration="file:$HOME_DIR/tools-log4j.properties" -cp "$LIB/*")

port_open() { (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; }
pid() { [[ -f $PID_FILE ]] && cat "$PID_FILE"; }
running() { local p; p="$(pid)" && [[ -n $p ]] && kill -0 "$p" 2>/dev/null; }

fetch_jars() {
  # (Re)copy when lib/ is missing or the pom changed since the last copy.
  [[ -f $LIB/.done && ! $POM -nt $LIB/.done ]] && return
  echo "kafka: copying jars from Maven Central into $LIB"
  rm -rf "$LIB" "$LIB.tmp"
  local out
  if ! out="$(mvn -q -B -f "$POM" dependency:copy-dependencies -DoutputDirectory="$LIB.tmp" 2>&1)"; then
    echo "$out" >&2; exit 1
  fi
  touch "$LIB.tmp/.done" && mv "$LIB.tmp" "$LIB"
}

write_config() {
  cat >"$CONF" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT,SASL_PLAINTEXT://$HOST:$SASL_PORT
advertised.listeners=PLAINTEXT://$HOST:$PORT,SASL_PLAINTEXT://$HOST:$SASL_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT
sasl.enabled.mechanisms=PLAIN
# ACLs apply to the SASL user only: the PLAINTEXT and controller listeners are ANONYMOUS, a super
# user. tide-test may do nothing the tests do not grant it (to test a topic it may not write).
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:ANONYMOUS
allow.everyone.if.no.acl.found=false
listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_$SASL_USER="$SASL_PASSWORD";
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
num.partitions=1
auto.create.topics.enable=true
log.dirs=$DATA
EOF
  cat >"$HOME_DIR/log4j.properties" <<'EOF'
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
EOF
  cat >"$HOME_DIR/tools-log4j.properties" <<'EOF'
log4j.rootLogger=WARN, stderr
log4j.appender.stderr=org.apache.log4j.ConsoleAppender
log4j.appender.stderr.Target=System.err
log4j.appender.stderr.layout=org.apache.log4j.PatternLayout
log4j.appender.stderr.layout.ConversionPattern=[%d] %p %m (%c)%n
EOF
}

fail() {
  echo "kafka: $1; last lines of $LOG:" >&2
  tail -n 50 "$LOG" >&2 || true
  exit 1
}

start() {
  if port_open; then echo "kafka: a broker already answers on $HOST:$PORT"; return; fi
  mkdir -p "$HOME_DIR"
  fetch_jars
  write_config
  if [[ ! -f $DATA/meta.properties ]]; then
    local cluster_id
    cluster_id="$("${TOOL[@]}" kafka.tools.StorageTool random-uuid)"
    "${TOOL[@]}" kafka.tools.StorageTool format -t "$cluster_id" -c "$CONF" >/dev/null
    echo "kafka: formatted $DATA (cluster id $cluster_id)"
  fi
  nohup "$JAVA" -Xmx512m -Djava.awt.headless=true \
    -Dlog4j.configuration="file:$HOME_DIR/log4j.properties" \
    -cp "$LIB/*" kafka.Kafka "$CONF" >"$LOG" 2>&1 </dev/null &
  echo $! >"$PID_FILE"
  # The port accepts TCP connections before the broker serves requests, so
  # wait for a real request (ApiVersions + Metadata) to be answered.
  local deadline=$((SECONDS + READY_TIMEOUT))
  until port_open && timeout 20 "${TOOL[@]}" kafka.admin.BrokerApiVersionsCommand \
      --bootstrap-server "$HOST:$PORT" >/dev/null 2>&1; do
    running || { rm -f "$PID_FILE"; fail "broker exited during startup"; }
    ((SECONDS < deadline)) || { stop >/dev/null; fail "broker not ready after ${READY_TIMEOUT}s, stopped it"; }
    sleep 1
  done
  echo "kafka: broker ready on $HOST:$PORT (pid $(pid), log $LOG)"
}

stop() {
  if ! running; then rm -f "$PID_FILE"; echo "kafka: not running"; return; fi
  local p i
  p="$(pid)"
  kill -TERM "$p"
  for ((i = 0; i < 30; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 1; done
  if kill -0 "$p" 2>/dev/null; then echo "kafka: pid $p still alive after 30s, killing"; kill -KILL "$p"; fi
  rm -f "$PID_FILE"
  echo "kafka: stopped (pid $p)"
}

status() {
  if running; then echo "kafka: running (pid $(pid))"; else echo "kafka: not running"; return 1; fi
}

case "${1:-}" in
  start | stop | status) "$1" ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
