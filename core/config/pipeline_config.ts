// A pipeline's config, checked once where it enters: the engine's keys (engine_config.ts) are parsed
// and the filter and event_id template compiled; the rest goes to the plugin's own schema. Workers
// start from the result, and `pg-tide check` runs the same code without connecting to anything.

import { ConfigError } from "../errors.ts";
import { type EngineConfig, FORWARD_ENGINE_KEYS, parseEngineConfig, REVERSE_ENGINE_KEYS } from "./engine_config.ts";
import { compileFilter, type FilterFn, type FilterOptions } from "./filter.ts";
import type { PipelineRow } from "../pipeline.ts";
import type { OutboxMessage, PluginDefinition } from "../plugin.ts";
import { type PluginRegistry, validatePluginConfig } from "../plugins.ts";
import { compileTemplate } from "./template.ts";
import { type Formatter, wireFormatter } from "./wire_format.ts";

export interface PreparedPipeline {
  definition: PluginDefinition;
  /** The plugin's config, validated by its schema (defaults applied). */
  pluginConfig: unknown;
  /** The engine's keys (retry, on_failure, lanes, ...), checked and typed. */
  engine: EngineConfig;
  /** transform.filter, with transform.on_error as its errorPolicy. */
  filter?: FilterFn;
  /** Reverse pipelines: renders the inbox event_id. */
  eventId?: (message: OutboxMessage) => string;
  /** Forward pipelines: reshapes each message's body (wire_format). */
  format?: Formatter;
}

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
  // The engine's keys first: a key of the other direction, or one the engine refuses, is named as
  // such rather than as a key the plugin does not know.
  const engine = parseEngineConfig(row.direction, row.config, where);
  const engineKeys = kind === "sink" ? FORWARD_ENGINE_KEYS : REVERSE_ENGINE_KEYS;
  const pluginInput = Object.fromEntries(Object.entries(row.config).filter(([key]) => !engineKeys.includes(key)));
  const pluginConfig = await validatePluginConfig(definition, pluginInput, where);
  const prepared: PreparedPipeline = { definition, pluginConfig, engine };
  const filter = engine.transform?.filter;
  if (filter !== undefined) {
    prepared.filter = compileFilter(filter, `${where}: transform.filter`, { ...filterOptions, errorPolicy: engine.transform!.onError });
  }
  if (engine.direction === "reverse" && engine.eventId !== undefined) prepared.eventId = compileTemplate(engine.eventId);
  if (engine.direction === "forward" && engine.wireFormat !== undefined) prepared.format = wireFormatter(engine.wireFormat, row.name);
  return prepared;
}
