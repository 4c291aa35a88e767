// A pipeline's config, checked once where it enters: the engine's keys (filter, event_id, retry)
// are compiled, the rest goes to the plugin's own schema. Workers start from the result, and
// `pg-tide check` runs the same code without connecting to anything.

import { ConfigError } from "./errors.ts";
import { compileFilter, type FilterFn, type FilterOptions } from "./filter.ts";
import type { PipelineRow } from "./forward.ts";
import { ENGINE_CONFIG_KEYS, type OutboxMessage, type PluginDefinition } from "./plugin.ts";
import { type PluginRegistry, validatePluginConfig } from "./plugins.ts";
import { compileTemplate } from "./template.ts";
import { type Formatter, wireFormatter } from "./wire_format.ts";
import { type LaneConfig, laneConfig } from "./lanes.ts";

export interface PreparedPipeline {
  definition: PluginDefinition;
  /** The plugin's config, validated by its schema (defaults applied). */
  pluginConfig: unknown;
  /** transform.filter, with transform.on_error as its errorPolicy. */
  filter?: FilterFn;
  /** Reverse pipelines: renders the inbox event_id. */
  eventId?: (message: OutboxMessage) => string;
  /** Forward pipelines: reshapes each message's body (wire_format). */
  format?: Formatter;
  /** Forward pipelines: how many lanes, and the key that picks a message's lane (lanes, lane_key). */
  lanes?: LaneConfig;
  /** Forward pipelines: isolate_poison, a failing message holds back only its own key. */
  isolatePoison?: boolean;
}

const TRANSFORM_KEYS = ["filter", "on_error"];

/** Keys of a reverse pipeline's config that the engine handles; the source never sees them. */
export const REVERSE_ENGINE_KEYS = ["source_type", "batch_size", "transform", "event_id", "retry"];

const RETRY_KEYS = ["initial_backoff_ms", "max_backoff_ms", "max_attempts"];

export async function preparePipeline(
  row: Pick<PipelineRow, "name" | "direction" | "plugin_type" | "config">,
  registry: PluginRegistry,
  filterOptions: FilterOptions = {},
): Promise<PreparedPipeline> {
  const where = `pipeline "${row.name}"`;
  const kind = row.direction === "forward" ? "sink" : "source";
  let definition: PluginDefinition;
  try {
    definition = registry.get(kind, row.plugin_type);
  } catch (error) {
    throw new ConfigError(`${where}: ${(error as Error).message}`);
  }
  const engineKeys: readonly string[] = kind === "sink" ? ENGINE_CONFIG_KEYS : REVERSE_ENGINE_KEYS;
  const pluginInput = Object.fromEntries(Object.entries(row.config).filter(([key]) => !engineKeys.includes(key)));
  const pluginConfig = await validatePluginConfig(definition, pluginInput, where);
  const prepared: PreparedPipeline = { definition, pluginConfig };

  const transform = row.config.transform;
  if (transform !== undefined) {
    if (typeof transform !== "object" || transform === null || Array.isArray(transform)) {
      throw new ConfigError(`${where}: 'transform' must be an object like {"filter": "..."}`);
    }
    for (const key of Object.keys(transform)) {
      if (!TRANSFORM_KEYS.includes(key)) {
        throw new ConfigError(`${where}: 'transform.${key}': unknown key (known: ${TRANSFORM_KEYS.join(", ")})`);
      }
    }
    const onError = transform.on_error ?? "skip";
    if (onError !== "skip" && onError !== "dead_letter") {
      throw new ConfigError(`${where}: 'transform.on_error' must be "skip" or "dead_letter" (got ${JSON.stringify(onError)})`);
    }
    if (onError === "dead_letter" && kind !== "sink") {
      throw new ConfigError(`${where}: 'transform.on_error' "dead_letter" applies to forward pipelines only (reverse pipelines skip)`);
    }
    if (transform.on_error !== undefined && transform.filter === undefined) {
      throw new ConfigError(`${where}: 'transform.on_error' needs a 'transform.filter' to apply to`);
    }
    if (transform.filter !== undefined) {
      if (typeof transform.filter !== "string") throw new ConfigError(`${where}: 'transform.filter' must be a CEL expression string`);
      prepared.filter = compileFilter(transform.filter, `${where}: transform.filter`, { ...filterOptions, errorPolicy: onError });
    }
  }
  if (row.config.event_id !== undefined) {
    if (kind !== "source") throw new ConfigError(`${where}: 'event_id' applies to reverse pipelines only`);
    if (typeof row.config.event_id !== "string") throw new ConfigError(`${where}: 'event_id' must be a template string`);
    prepared.eventId = compileTemplate(row.config.event_id);
  }
  const retry = row.config.retry;
  if (retry !== undefined) {
    if (typeof retry !== "object" || retry === null || Array.isArray(retry)) throw new ConfigError(`${where}: 'retry' must be an object`);
    for (const [key, value] of Object.entries(retry)) {
      if (!RETRY_KEYS.includes(key)) throw new ConfigError(`${where}: 'retry.${key}': unknown key (known: ${RETRY_KEYS.join(", ")})`);
      if (!Number.isInteger(value) || (value as number) < 0) {
        throw new ConfigError(`${where}: 'retry.${key}' must be a whole number of 0 or more (got ${JSON.stringify(value)})`);
      }
    }
  }
  if (kind === "source" && retry?.max_attempts !== undefined) {
    throw new ConfigError(
      `${where}: 'retry.max_attempts' applies to forward pipelines only: a reverse pipeline retries a batch ` +
        "until the inbox accepts it (the source keeps it meanwhile); remove the key",
    );
  }
  const maxBatch = row.config.max_batch_size;
  if (maxBatch !== undefined) {
    if (kind !== "sink") throw new ConfigError(`${where}: 'max_batch_size' applies to forward pipelines only`);
    if (!Number.isInteger(maxBatch) || maxBatch < 1 || maxBatch > 100_000) {
      throw new ConfigError(`${where}: 'max_batch_size' must be a whole number from 1 to 100000 (got ${JSON.stringify(maxBatch)})`);
    }
  }
  const poll = row.config.poll_interval_ms;
  if (poll !== undefined && (!Number.isInteger(poll) || poll < 1)) {
    throw new ConfigError(`${where}: 'poll_interval_ms' must be a whole number of milliseconds, at least 1 (got ${JSON.stringify(poll)})`);
  }
  if (row.config.wire_format !== undefined) {
    if (kind !== "sink") throw new ConfigError(`${where}: 'wire_format' applies to forward pipelines only`);
    prepared.format = wireFormatter(row.config.wire_format, row.name);
  }
  if (kind === "sink") {
    prepared.lanes = laneConfig(row.config, where);
  } else if (row.config.lanes !== undefined || row.config.lane_key !== undefined) {
    throw new ConfigError(`${where}: 'lanes' and 'lane_key' apply to forward pipelines only`);
  }
  const isolate = row.config.isolate_poison;
  if (isolate !== undefined) {
    if (kind !== "sink") throw new ConfigError(`${where}: 'isolate_poison' applies to forward pipelines only`);
    if (typeof isolate !== "boolean") throw new ConfigError(`${where}: 'isolate_poison' must be true or false (got ${JSON.stringify(isolate)})`);
    if (isolate && row.config.on_failure === "pause") {
      throw new ConfigError(`${where}: 'isolate_poison' parks a failing message and goes on; it cannot be combined with on_failure "pause"`);
    }
    prepared.isolatePoison = isolate;
  }
  const onFailure = row.config.on_failure;
  if (onFailure !== undefined && onFailure !== "dlq" && onFailure !== "pause") {
    throw new ConfigError(`${where}: 'on_failure' must be "dlq" or "pause" (got ${JSON.stringify(onFailure)})`);
  }
  return prepared;
}
