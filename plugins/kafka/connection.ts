// What the kafka sink and source share: the connection keys of their configs (brokers, client_id,
// TLS, SASL), the kafkajs client built from them with its log lines routed to the plugin logger,
// and a connect step bounded in time so that an unreachable cluster fails fast, naming the brokers.

import type { Kafka, KafkaConfig, LogEntry, SASLOptions } from "kafkajs";
import { z } from "zod";
import type { PluginContext } from "../../core/plugin.ts";
import { clampNegativeTimeouts } from "./timers.ts";

/** How long connect() may take, retries included, before it gives up. */
export const CONNECT_TIMEOUT_MS = 10_000;

const BROKER = /^[^\s,:/]+:\d{1,5}$/;

/** Legal Kafka topic names: what the broker would refuse with INVALID_TOPIC_EXCEPTION. */
export const TOPIC_NAME = /^[A-Za-z0-9._-]{1,249}$/;

/** `"a:9092,b:9092"` or `["a:9092", "b:9092"]`, normalized to a list. */
export const brokersSchema = z
  .union([z.string(), z.array(z.string())], { error: "must be a \"host:port\" string or a list of them" })
  .transform((value) => (Array.isArray(value) ? value : value.split(",")).map((b) => b.trim()).filter((b) => b !== ""))
  .check((ctx) => {
    if (ctx.value.length === 0) {
      ctx.issues.push({ code: "custom", input: ctx.value, message: "must name at least one broker (\"host:port\")" });
    }
    for (const broker of ctx.value) {
      if (!BROKER.test(broker)) {
        ctx.issues.push({ code: "custom", input: ctx.value, message: `"${broker}" is not a "host:port" broker address` });
      }
    }
  });

export const sslSchema = z
  .union([
    z.boolean(),
    z.strictObject({
      /** PEM text (use `${file:...}` in a manifest to read it from a file). */
      ca: z.string().min(1).optional(),
      cert: z.string().min(1).optional(),
      key: z.string().min(1).optional(),
      reject_unauthorized: z.boolean().default(true),
    }),
  ])
  .default(false);

export const saslSchema = z.strictObject({
  mechanism: z.enum(["plain", "scram-sha-256", "scram-sha-512"]),
  username: z.string().min(1),
  password: z.string(),
});

/** Keys that both the sink and the source accept, spread into their strictObject shapes. */
export const connectionShape = {
  brokers: brokersSchema,
  client_id: z.string().min(1).default("pg-tide"),
  ssl: sslSchema,
  sasl: saslSchema.optional(),
};

export interface ConnectionConfig {
  brokers: string[];
  client_id: string;
  ssl: z.output<typeof sslSchema>;
  sasl?: z.output<typeof saslSchema>;
}

/**
 * kafkajs, loaded when a Kafka pipeline first connects: a relay without one never holds it (the
 * other broker clients are loaded the same way).
 */
export const loadKafkajs = () => import("kafkajs");

/**
 * The kafkajs client, built at the first call (kafkajs loaded then); no I/O happens until a producer
 * or consumer connects.
 */
export function kafkaClient(config: ConnectionConfig, ctx: PluginContext, requestTimeoutMs = 30_000): () => Promise<Kafka> {
  let client: Promise<Kafka> | undefined;
  return () => (client ??= createKafkaClient(config, ctx, requestTimeoutMs));
}

async function createKafkaClient(config: ConnectionConfig, ctx: PluginContext, requestTimeoutMs: number): Promise<Kafka> {
  const { Kafka, logLevel } = await loadKafkajs();
  clampNegativeTimeouts();
  const options: KafkaConfig = {
    clientId: config.client_id,
    brokers: config.brokers,
    ssl: kafkaSsl(config.ssl),
    sasl: config.sasl ? ({ ...config.sasl } as SASLOptions) : undefined,
    connectionTimeout: 3_000,
    requestTimeout: requestTimeoutMs,
    // kafkajs retries inside one call; tide's own backoff takes over after that.
    retry: { retries: 5, initialRetryTime: 300, maxRetryTime: 3_000 },
    logLevel: logLevel.WARN,
    logCreator: () => {
      const repeats = new RepeatedLines();
      return (entry: LogEntry) => forwardLog(entry, ctx, repeats, logLevel.INFO);
    },
  };
  return new Kafka(options);
}

/**
 * Runs a kafkajs connect with a deadline. kafkajs keeps retrying an unreachable broker for a long
 * time; past the deadline `abandon` (a disconnect) stops it and the error names the brokers.
 */
export async function connectWithin(
  what: string,
  brokers: string[],
  connect: () => Promise<void>,
  abandon: () => Promise<void>,
  ctx: PluginContext,
): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const attempt = connect();
  const deadline = new Promise<"timeout">((resolve) => {
    timer = setTimeout(() => resolve("timeout"), CONNECT_TIMEOUT_MS);
  });
  let outcome: "connected" | "timeout";
  try {
    outcome = await Promise.race([attempt.then(() => "connected" as const), deadline]);
  } catch (error) {
    await abandon().catch(() => {});
    throw ctx.errors.transient(`${what}: cannot connect to Kafka brokers ${brokers.join(",")}: ${describeKafkaError(error)}`, error);
  } finally {
    clearTimeout(timer);
  }
  if (outcome === "timeout") {
    attempt.catch(() => {});
    await abandon().catch(() => {});
    throw ctx.errors.transient(
      `${what}: cannot connect to Kafka brokers ${brokers.join(",")} within ${CONNECT_TIMEOUT_MS / 1000} s`,
    );
  }
}

/** The innermost useful message of a kafkajs error chain (retries wrap the original error). */
export function describeKafkaError(error: unknown): string {
  const messages: string[] = [];
  for (let e: unknown = error, depth = 0; e instanceof Error && depth < 5; e = e.cause, depth += 1) {
    if (!messages.includes(e.message)) messages.push(e.message);
  }
  return messages.length ? messages.join(": ") : String(error);
}

/** The kafkajs protocol error types found along an error's cause chain, e.g. MESSAGE_TOO_LARGE. */
export function kafkaErrorTypes(error: unknown): string[] {
  const types: string[] = [];
  for (let e: unknown = error, depth = 0; e instanceof Error && depth < 5; e = e.cause, depth += 1) {
    const type = (e as { type?: unknown }).type;
    if (typeof type === "string") types.push(type);
  }
  return types;
}

function kafkaSsl(ssl: ConnectionConfig["ssl"]): KafkaConfig["ssl"] {
  if (typeof ssl === "boolean") return ssl;
  return { ca: ssl.ca, cert: ssl.cert, key: ssl.key, rejectUnauthorized: ssl.reject_unauthorized };
}

/**
 * kafkajs log lines, one level down: every failure that matters also reaches the engine as a thrown
 * error, which it logs with the pipeline's context. Connection-level errors (a refused connection,
 * the metadata answer while a topic is being auto-created) and the warning about the idempotent
 * producer's bounded retries (tide retries, and consumers deduplicate on tide-dedup-key) are debug.
 */
function forwardLog({ namespace, level, log }: LogEntry, ctx: PluginContext, repeats: RepeatedLines, infoLevel: number): void {
  const { message, timestamp: _timestamp, logger: _logger, ...fields } = log as unknown as Record<string, unknown>;
  const text = `kafkajs ${namespace}: ${String(message)}`;
  const noise = namespace === "Connection" || String(message).startsWith("Limiting retries for the idempotent producer");
  if (noise || level >= infoLevel) return ctx.logger.debug(text, fields);
  // kafkajs retries inside each call and logs every retry: during an outage that is the same line
  // many times a second. Each line goes out at warn once a minute, with how often it came meanwhile.
  const suppressed = repeats.note(text);
  if (suppressed === undefined) ctx.logger.debug(text, fields);
  else ctx.logger.warn(text, suppressed > 0 ? { ...fields, repeated: suppressed } : fields);
}

/**
 * Which warnings were logged lately: a line (its text with numbers taken out: ports, retry counts
 * and times vary) is let through once per `windowMs`; note() returns undefined for a repeat inside
 * the window, else how many repeats were held back since the line last went out.
 */
export class RepeatedLines {
  readonly #seen = new Map<string, { at: number; suppressed: number }>();

  constructor(readonly windowMs = 60_000, readonly now: () => number = Date.now) {}

  note(text: string): number | undefined {
    const key = text.replace(/\d+/g, "#");
    const now = this.now();
    const seen = this.#seen.get(key);
    if (seen && now - seen.at < this.windowMs) {
      seen.suppressed++;
      return undefined;
    }
    if (this.#seen.size >= 100) this.#seen.clear(); // bounded; a cleared line just goes out once more
    this.#seen.set(key, { at: now, suppressed: 0 });
    return seen?.suppressed ?? 0;
  }
}
