// `pg-tide run` (also plain `pg-tide --postgres-url ...`): the relay, until SIGTERM or SIGINT.

import { ConfigError, exitCodeOf, toError } from "../core/errors.ts";
import { createLogger, isLogLevel, type Logger } from "../core/log.ts";
import { HTTP_TOKEN_SCOPES, type HttpAuth, type HttpTokenScope, httpTokenProblem } from "../core/http/http_auth.ts";
import { DEFAULT_DRAIN_TIMEOUT_MS, Relay } from "../core/relay.ts";
import { DEFAULT_OWNERSHIP_LEASE_MS } from "../core/engine/coordinator.ts";
import { DEFAULT_MEMORY_TARGET_MIB, onSignal, setMemoryTarget, writeStdout } from "../core/runtime.ts";
import { formatHelp, HELP_FLAG, parseFlags, POSTGRES_URL_FLAG, requireUrl, sourceOf } from "./args.ts";
import { CONFIG_FLAG, loadConfig, relayFallback } from "./manifest_flags.ts";

export const RUN_FLAGS = {
  "postgres-url": POSTGRES_URL_FLAG,
  config: CONFIG_FLAG,
  "relay-group-id": {
    type: "string",
    env: "PG_TIDE_RELAY_GROUP_ID",
    default: "default",
    placeholder: "ID",
    help: "relays with the same id share the pipelines (one owner each); different ids deliver independently",
  },
  "max-pipelines": {
    type: "string",
    env: "PG_TIDE_MAX_PIPELINES",
    default: "1000",
    placeholder: "N",
    help: "most pipelines this relay owns at once",
  },
  "poll-interval-ms": {
    type: "string",
    env: "PG_TIDE_POLL_INTERVAL_MS",
    default: "250",
    placeholder: "MS",
    help: "how often an idle pipeline looks for new messages (NOTIFY wakes it sooner for outboxes created with p_notify)",
  },
  "reconcile-interval-ms": {
    type: "string",
    env: "PG_TIDE_RECONCILE_INTERVAL_MS",
    default: "2000",
    placeholder: "MS",
    help: "how often the catalog is re-read and dead relays' pipelines are taken over (NOTIFY and SIGHUP act at once)",
  },
  "ownership-lease-ms": {
    type: "string",
    env: "PG_TIDE_OWNERSHIP_LEASE_MS",
    default: String(DEFAULT_OWNERSHIP_LEASE_MS),
    placeholder: "MS",
    help: "a relay whose heartbeat is older than this (frozen, paused, cut off) loses its pipelines: " +
      "another relay ends its lock session and takes them over (at least 1000)",
  },
  "drain-timeout": {
    type: "string",
    env: "PG_TIDE_DRAIN_TIMEOUT",
    default: String(DEFAULT_DRAIN_TIMEOUT_MS / 1000),
    placeholder: "SECONDS",
    help: "on SIGTERM/SIGINT, how long in-flight batches may take to finish; " +
      "those still in flight then are left unacknowledged, for the next relay to deliver",
  },
  "memory-target-mib": {
    type: "string",
    env: "PG_TIDE_MEMORY_TARGET_MIB",
    default: String(DEFAULT_MEMORY_TARGET_MIB),
    placeholder: "MIB",
    help: "soft ceiling on the relay's resident memory: above it, garbage is collected every 16 MiB of payload " +
      "handled (a lower value holds memory down during a backlog drain at some CPU: 100 forces collections " +
      "throughout a drain, for 15-30% more CPU per message); below it, the runtime collects on its own",
  },
  "metrics-addr": {
    type: "string",
    env: "PG_TIDE_METRICS_ADDR",
    default: "0.0.0.0:9090",
    placeholder: "HOST:PORT",
    help: "serve /metrics, /livez, /readyz, /api/v1/pipelines, the status page and webhook sources' " +
      "/ingest/ routes here (\"off\" disables it); 0.0.0.0 listens on every interface",
  },
  "http-token": {
    type: "string",
    env: "PG_TIDE_HTTP_TOKEN",
    placeholder: "TOKEN",
    help: "protect the HTTP server with this token: /api/, the status page and unsigned /ingest/ routes answer 401 " +
      "without \"Authorization: Bearer TOKEN\" (browsers: any user name, the token as password); signed webhook " +
      "sources are checked by their signature instead. At least 16 characters, e.g. from: openssl rand -hex 32",
  },
  "http-token-scope": {
    type: "string",
    env: "PG_TIDE_HTTP_TOKEN_SCOPE",
    default: "api",
    placeholder: "api|all",
    help: "api: /livez, /readyz, /health and /metrics stay open for probes and Prometheus; all: they ask for the token too",
  },
  "otlp-endpoint": {
    type: "string",
    env: "PG_TIDE_OTLP_ENDPOINT",
    placeholder: "URL",
    help: "export one span per delivered batch to this OpenTelemetry collector (OTLP/HTTP JSON to URL/v1/traces, " +
      "e.g. http://localhost:4318), linked to each message's traceparent; unset: no spans",
  },
  "log-format": { type: "string", env: "PG_TIDE_LOG_FORMAT", default: "text", placeholder: "text|json", help: "log line format" },
  "log-level": {
    type: "string",
    env: "PG_TIDE_LOG_LEVEL",
    default: "info",
    placeholder: "LEVEL",
    help: "debug, info, warn or error",
  },
  help: HELP_FLAG,
} as const;

export const RUN_HELP = formatHelp(
  "pg-tide [run] --postgres-url URL [options]",
  "Runs the relay: discovers the pipelines in the tide catalog (after upserting those a --config\n" +
    "manifest declares), takes ownership of each through an advisory lock, and delivers outbox\n" +
    "messages to their sinks and source messages to their inboxes. Catalog changes apply without a\n" +
    "restart (NOTIFY, SIGHUP, and a periodic check). SIGTERM or SIGINT drains in-flight batches (up\n" +
    "to --drain-timeout; a batch cut off then is not acknowledged and is delivered again by the next\n" +
    "relay), releases the pipelines and exits 0. Flags override environment variables, which\n" +
    "override the manifest's [relay] settings.",
  RUN_FLAGS,
);

export async function runCommand(args: string[]): Promise<number> {
  const first = parseFlags("run", RUN_FLAGS, args);
  if (first.help) {
    writeStdout(RUN_HELP);
    return 0;
  }
  const { manifest, registry } = await loadConfig(first.config);
  const flags = parseFlags("run", RUN_FLAGS, args, relayFallback(manifest));
  const logger = loggerFromFlags(flags["log-format"]!, flags["log-level"]!, {
    format: sourceOf(flags, "log-format"),
    level: sourceOf(flags, "log-level"),
  });
  try {
    const url = requireUrl("run", flags["postgres-url"]);
    const int = (flag: keyof typeof RUN_FLAGS) => positiveInt(sourceOf(flags, flag), flags[flag] as string);
    const metricsAddr = flags["metrics-addr"]!;
    if (metricsAddr !== "off" && !/^.+:\d+$/.test(metricsAddr)) {
      throw new ConfigError(`${sourceOf(flags, "metrics-addr")} must be host:port or "off" (got "${metricsAddr}")`);
    }
    const drainTimeoutMs = int("drain-timeout") * 1000;
    setMemoryTarget(int("memory-target-mib"));
    const otlpEndpoint = flags["otlp-endpoint"] || undefined;
    if (otlpEndpoint !== undefined && !/^https?:\/\/[^/]+/.test(otlpEndpoint)) {
      throw new ConfigError(`${sourceOf(flags, "otlp-endpoint")} must be an http(s) URL (got "${otlpEndpoint}")`);
    }
    const relay = new Relay({
      postgresUrl: url,
      relayGroupId: flags["relay-group-id"]!,
      logger,
      maxPipelines: int("max-pipelines"),
      pollIntervalMs: int("poll-interval-ms"),
      reconcileIntervalMs: int("reconcile-interval-ms"),
      ownershipLeaseMs: leaseMs(sourceOf(flags, "ownership-lease-ms"), flags["ownership-lease-ms"]!),
      drainTimeoutMs,
      metricsAddr: metricsAddr === "off" ? undefined : metricsAddr,
      httpAuth: httpAuthFromFlags(flags),
      otlpEndpoint,
      registry,
      pipelines: manifest?.relay.pipelines_mode === "catalog_only" ? [] : manifest?.pipelines,
    });
    const stopSignal = stopSignals(logger, () => relay);
    await relay.start();
    return await untilStopped(relay, logger, stopSignal, drainTimeoutMs);
  } catch (error) {
    if (flags["log-format"] !== "json") throw error;
    // A relay that logs JSON reports the error that ends it as one JSON line too (secrets masked).
    const err = toError(error);
    logger.error(`${err.message.startsWith("pg-tide ") ? "" : "pg-tide: "}${err.message}`, { error: err, exit_code: exitCodeOf(err) });
    return exitCodeOf(err);
  }
}

/**
 * Installs the signal handlers before the relay starts, so that no signal slips through (SIGHUP's
 * default action would end the process): SIGHUP reconciles the catalog at once, and the promise
 * resolves with the first SIGTERM or SIGINT. `relay` is undefined while there is none yet.
 */
export function stopSignals(logger: Logger, relay: () => Relay | undefined): Promise<string> {
  onSignal("SIGHUP", () => {
    logger.info("SIGHUP: reloading pipelines");
    // Before the coordinator starts, its first reconcile will read the catalog anyway.
    const coordinator = relay()?.coordinator;
    if (coordinator?.started) void coordinator.reconcile();
  });
  return new Promise<string>((resolve) => {
    onSignal("SIGTERM", () => resolve("SIGTERM"));
    onSignal("SIGINT", () => resolve("SIGINT"));
  });
}

/**
 * Waits for SIGTERM/SIGINT, then drains in-flight batches and stops. Exit code 0 even when the
 * drain timed out: nothing is lost, the cut-off batches are simply not acknowledged.
 */
export async function untilStopped(
  relay: Relay,
  logger: Logger,
  stopSignal: Promise<string>,
  drainTimeoutMs = DEFAULT_DRAIN_TIMEOUT_MS,
): Promise<number> {
  const signal = await stopSignal;
  logger.info(`${signal}: draining in-flight batches`);
  // The workers abort their sinks at the same moment; this says what that means, once.
  const timer = setTimeout(() =>
    logger.warn("drain timeout reached: batches not finished by now stay unacknowledged; the next relay delivers them", {
      drain_timeout_s: drainTimeoutMs / 1000,
    }), drainTimeoutMs);
  try {
    await relay.stop();
  } finally {
    clearTimeout(timer);
  }
  return 0;
}

/** `names` say where the values came from (a flag or an environment variable; see sourceOf). */
export function loggerFromFlags(
  format: string,
  level: string,
  names = { format: "--log-format", level: "--log-level" },
): Logger {
  if (format !== "text" && format !== "json") {
    throw new ConfigError(`${names.format} must be "text" or "json" (got "${format}")`);
  }
  if (!isLogLevel(level)) throw new ConfigError(`${names.level} must be debug, info, warn or error (got "${level}")`);
  return createLogger({ format, level });
}

/** The HTTP token settings; the token is never quoted in a message. */
function httpAuthFromFlags(flags: { "http-token"?: string; "http-token-scope"?: string }): HttpAuth | undefined {
  const token = flags["http-token"];
  const scope = flags["http-token-scope"] ?? "api";
  if (!HTTP_TOKEN_SCOPES.includes(scope as HttpTokenScope)) {
    throw new ConfigError(`${sourceOf(flags, "http-token-scope")} must be "api" or "all" (got "${scope}")`);
  }
  if (token === undefined) {
    if (scope === "all") {
      throw new ConfigError(`${sourceOf(flags, "http-token-scope")} "all" needs a token: set --http-token (or PG_TIDE_HTTP_TOKEN)`);
    }
    return undefined;
  }
  const problem = httpTokenProblem(token);
  if (problem) throw new ConfigError(`${sourceOf(flags, "http-token")} ${problem}`);
  return { token, scope: scope as HttpTokenScope };
}

function positiveInt(source: string, value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n <= 0) throw new ConfigError(`${source} must be a positive integer (got "${value}")`);
  return n;
}

function leaseMs(source: string, value: string): number {
  const n = positiveInt(source, value);
  if (n < 1000) throw new ConfigError(`${source} must be at least 1000 ms (got ${n}): a shorter lease fences relays that are merely busy`);
  return n;
}
