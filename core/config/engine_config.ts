// The keys of a pipeline's config that belong to the engine, not the plugin: one zod schema per
// direction, parsed once where a pipeline enters (pipeline_config.ts) into a typed object that the
// workers read. Every other key goes to the plugin's own schema. Errors name the pipeline, the key,
// what is allowed and the value seen, like a plugin's config errors.

import { z } from "zod";
import type { BackoffPolicy } from "../engine/backoff.ts";
import { ConfigError } from "../errors.ts";
import { type LaneConfig, laneConfig } from "../engine/lanes.ts";

/** Backoff between attempts, and (forward) after how many failed attempts a message is dead-lettered. */
export interface RetryPolicy extends BackoffPolicy {
  /** 0: retry until delivered. */
  maxAttempts: number;
}

/** transform.filter and what happens to a message it cannot decide on. */
export interface TransformSettings {
  filter?: string;
  onError: "skip" | "dead_letter";
}

export interface ForwardEngineConfig {
  direction: "forward";
  retry: RetryPolicy;
  /** on_failure: "pause" stops the position before a message that cannot be delivered; "dlq" moves on. */
  onFailure: "dlq" | "pause";
  /** The longest idle wait; undefined: the relay's --poll-interval-ms. */
  pollIntervalMs?: number;
  /** The most a batch grows to while a backlog lasts; undefined: the sink's default. */
  maxBatchSize?: number;
  lanes: LaneConfig;
  isolatePoison: boolean;
  /** As configured; wire_format.ts builds (and checks) the formatter. */
  wireFormat?: unknown;
  transform?: TransformSettings;
}

export interface ReverseEngineConfig {
  direction: "reverse";
  retry: BackoffPolicy;
  transform?: TransformSettings;
  /** The inbox event_id template. */
  eventId?: string;
}

export type EngineConfig = ForwardEngineConfig | ReverseEngineConfig;

/** The default backoff of a pipeline's retries (retry.initial_backoff_ms, retry.max_backoff_ms). */
export const DEFAULT_INITIAL_BACKOFF_MS = 200;
export const DEFAULT_MAX_BACKOFF_MS = 30_000;
/** 0: retry a transiently failing message until it is delivered (webhooks: "until 2xx"). */
export const DEFAULT_MAX_ATTEMPTS = 0;
export const MAX_BATCH_SIZE_LIMIT = 100_000;

const wholeNumber = (min: number, max: number | undefined, message: string) => {
  const number = z.number({ error: message }).int({ error: message }).min(min, { error: message });
  return max === undefined ? number : number.max(max, { error: message });
};

const retryKeys = ["initial_backoff_ms", "max_backoff_ms", "max_attempts"] as const;
const retryValue = wholeNumber(0, undefined, "must be a whole number of 0 or more").optional();
const objectError = (shape: readonly string[], like: string) => (issue: { code: string }) =>
  issue.code === "unrecognized_keys" ? `unknown key (known: ${shape.join(", ")})` : `must be an object${like}`;

const retrySchema = z.strictObject(
  { initial_backoff_ms: retryValue, max_backoff_ms: retryValue, max_attempts: retryValue },
  { error: objectError(retryKeys, "") },
);

const transformSchema = z.strictObject(
  {
    filter: z.string({ error: "must be a CEL expression string" }).optional(),
    on_error: z.enum(["skip", "dead_letter"], { error: 'must be "skip" or "dead_letter"' }).optional(),
  },
  { error: objectError(["filter", "on_error"], ' like {"filter": "..."}') },
);

/** Read by the catalog when the pipeline is set (sql/004), not by the workers: any value passes here. */
const catalogKey = z.unknown().optional();

const forwardSchema = z.object({
  sink_type: catalogKey,
  source_type: catalogKey,
  consumer_group: catalogKey,
  batch_size: catalogKey,
  auto_offset_reset: catalogKey,
  max_batch_size: wholeNumber(1, MAX_BATCH_SIZE_LIMIT, `must be a whole number from 1 to ${MAX_BATCH_SIZE_LIMIT}`).optional(),
  poll_interval_ms: wholeNumber(1, undefined, "must be a whole number of milliseconds, at least 1").optional(),
  transform: transformSchema.optional(),
  retry: retrySchema.optional(),
  on_failure: z.enum(["dlq", "pause"], { error: 'must be "dlq" or "pause"' }).optional(),
  /** Checked by wireFormatter (wire_format.ts), which builds the formatter. */
  wire_format: z.unknown().optional(),
  /** Checked by laneConfig (lanes.ts). */
  lanes: z.unknown().optional(),
  lane_key: z.unknown().optional(),
  isolate_poison: z.boolean({ error: "must be true or false" }).optional(),
});

const reverseSchema = z.object({
  source_type: catalogKey,
  batch_size: catalogKey,
  transform: transformSchema.optional(),
  retry: retrySchema.optional(),
  event_id: z.string({ error: "must be a template string" }).optional(),
});

/** Keys of a forward pipeline's config that the engine handles; the sink never sees them. */
export const FORWARD_ENGINE_KEYS: readonly string[] = Object.keys(forwardSchema.shape);
/** Keys of a reverse pipeline's config that the engine handles; the source never sees them. */
export const REVERSE_ENGINE_KEYS: readonly string[] = Object.keys(reverseSchema.shape);

/**
 * Keys refused outright, with the reason and what to use instead. visibility_timeout_ms comes from
 * queue-style relays, where a message is leased to a consumer for a while; here a pipeline is owned
 * (a lock), not its messages, so such a timeout would have nothing to time.
 */
const NO_MEANING: Record<string, string> = {
  visibility_timeout_ms:
    "has no meaning for a relay pipeline: the relay owns a whole pipeline (an advisory lock and a heartbeat), " +
    "not single messages, and a batch in flight when its owner dies is delivered again by the next owner. " +
    "Remove the key; how soon another relay takes over is --ownership-lease-ms, and inbox consumers set how long " +
    "they hold a message with tide.inbox_claim's p_visibility_timeout",
};
const FORWARD_ONLY = ["max_batch_size", "wire_format", "lanes", "lane_key", "isolate_poison"];
const REVERSE_ONLY = ["event_id"];

/** The engine's keys of a pipeline config, checked and typed; `where` names the pipeline in errors. */
export function parseEngineConfig(direction: "forward" | "reverse", config: Record<string, unknown>, where: string): EngineConfig {
  for (const [key, reason] of Object.entries(NO_MEANING)) {
    if (config[key] !== undefined) throw new ConfigError(`${where}: '${key}' ${reason}`);
  }
  const other = direction === "forward" ? REVERSE_ONLY : FORWARD_ONLY;
  const misplaced = other.filter((key) => config[key] !== undefined);
  if (misplaced.length > 0) {
    const these = misplaced.map((key) => `'${key}'`).join(" and ");
    throw new ConfigError(`${where}: ${these} ${misplaced.length > 1 ? "apply" : "applies"} to ${direction === "forward" ? "reverse" : "forward"} pipelines only`);
  }
  const transform = (input: z.infer<typeof transformSchema> | undefined): TransformSettings | undefined => {
    if (input === undefined) return undefined;
    const onError = input.on_error ?? "skip";
    if (input.on_error !== undefined && input.filter === undefined) {
      throw new ConfigError(`${where}: 'transform.on_error' needs a 'transform.filter' to apply to`);
    }
    if (onError === "dead_letter" && direction !== "forward") {
      throw new ConfigError(`${where}: 'transform.on_error' "dead_letter" applies to forward pipelines only (reverse pipelines skip)`);
    }
    return { filter: input.filter, onError };
  };
  if (direction === "reverse") {
    const parsed = parse(reverseSchema, config, where);
    if (parsed.retry?.max_attempts !== undefined) {
      throw new ConfigError(
        `${where}: 'retry.max_attempts' applies to forward pipelines only: a reverse pipeline retries a batch ` +
          "until the inbox accepts it (the source keeps it meanwhile); remove the key",
      );
    }
    return { direction, retry: backoff(parsed.retry), transform: transform(parsed.transform), eventId: parsed.event_id };
  }
  const parsed = parse(forwardSchema, config, where);
  const onFailure = parsed.on_failure ?? "dlq";
  if (parsed.isolate_poison && onFailure === "pause") {
    throw new ConfigError(`${where}: 'isolate_poison' parks a failing message and goes on; it cannot be combined with on_failure "pause"`);
  }
  return {
    direction,
    retry: { ...backoff(parsed.retry), maxAttempts: parsed.retry?.max_attempts ?? DEFAULT_MAX_ATTEMPTS },
    onFailure,
    pollIntervalMs: parsed.poll_interval_ms,
    maxBatchSize: parsed.max_batch_size,
    lanes: laneConfig(config, where),
    isolatePoison: parsed.isolate_poison ?? false,
    wireFormat: parsed.wire_format,
    transform: transform(parsed.transform),
  };
}

function backoff(retry: { initial_backoff_ms?: number; max_backoff_ms?: number } | undefined): BackoffPolicy {
  return { initialMs: retry?.initial_backoff_ms ?? DEFAULT_INITIAL_BACKOFF_MS, maxMs: retry?.max_backoff_ms ?? DEFAULT_MAX_BACKOFF_MS };
}

/** Parses with `schema`; every problem is named by its key, with the value seen: `'retry.max_attempts' must be ... (got "x")`. */
function parse<T extends z.ZodType>(schema: T, config: Record<string, unknown>, where: string): z.infer<T> {
  const result = schema.safeParse(config);
  if (result.success) return result.data;
  const problems = result.error.issues.flatMap((issue) => {
    const path = issue.path.map(String).join(".");
    if (issue.code === "unrecognized_keys") return issue.keys.map((key) => `'${path}.${key}': ${issue.message}`);
    return [`'${path}' ${issue.message} (got ${JSON.stringify(valueAt(config, issue.path))})`];
  });
  throw new ConfigError(`${where}: ${problems.join("; ")}`);
}

function valueAt(value: unknown, path: readonly PropertyKey[]): unknown {
  for (const key of path) value = (value as Record<PropertyKey, unknown> | null | undefined)?.[key];
  return value;
}
