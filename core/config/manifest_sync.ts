// Pipelines declared in a manifest ([[pipelines]]) are upserted into the catalog when the relay
// starts. An unchanged pipeline is left alone, so restarting relays does not restart its workers.
// `pg-tide check` runs the same upserts in a transaction it rolls back, so that it refuses exactly
// what the relay would refuse (an outbox that does not exist, a type no relay registered), in the
// same words.

import type { Sql } from "../db.ts";
import { ConfigError, toError } from "../errors.ts";
import type { Logger } from "../log.ts";
import type { ManifestPipeline } from "./manifest.ts";
import type { PluginDefinition } from "../plugin.ts";
import { registerPluginTypes } from "../plugins.ts";

export async function syncManifestPipelines(sql: Sql, pipelines: ManifestPipeline[], logger: Logger): Promise<number> {
  let changed = 0;
  for (const p of pipelines) {
    try {
      if (await syncOne(sql, p, logger)) changed += 1;
    } catch (error) {
      throw manifestProblem(p, error);
    }
  }
  return changed;
}

/**
 * What syncManifestPipelines would refuse, without changing anything: each pipeline upserted in a
 * savepoint of a transaction that is rolled back. One message per refused pipeline.
 */
export async function manifestPipelineProblems(
  sql: Sql,
  pipelines: ManifestPipeline[],
  plugins: PluginDefinition[],
): Promise<Map<string, string>> {
  const problems = new Map<string, string>();
  const quiet: Logger = { debug() {}, info() {}, warn() {}, error() {}, child() { return quiet; } } as unknown as Logger;
  await sql.begin(async (tx) => {
    // As the relay does before it syncs: the catalog then knows the drop-ins' types.
    await registerPluginTypes(tx as unknown as Sql, plugins);
    for (const p of pipelines) {
      try {
        await tx.savepoint((sp) => syncOne(sp as unknown as Sql, p, quiet));
      } catch (error) {
        problems.set(p.name, manifestProblem(p, error).message);
      }
    }
    throw ROLLBACK;
  }).catch((error) => {
    if (error !== ROLLBACK) throw error;
  });
  return problems;
}

const ROLLBACK = Symbol("rollback");

function manifestProblem(p: ManifestPipeline, error: unknown): ConfigError {
  const named = `pipeline "${p.name}": `;
  const message = toError(error).message;
  const reason = message.startsWith(named) ? message.slice(named.length) : message;
  return new ConfigError(`pipeline "${p.name}" (manifest): the catalog refused it: ${reason}`, { cause: error });
}

/** Upserts one manifest pipeline; false when the catalog already holds it as declared. */
async function syncOne(sql: Sql, p: ManifestPipeline, logger: Logger): Promise<boolean> {
  const [current] = await sql`SELECT * FROM tide.relay_pipelines WHERE name = ${p.name}`;
  const config = p.direction === "forward"
    ? { ...p.config, sink_type: p.sink_type, ...(p.consumer_group ? { consumer_group: p.consumer_group } : {}) }
    : { ...p.config, source_type: p.source_type };
  const wanted = {
    direction: p.direction,
    plugin_type: p.direction === "forward" ? p.sink_type : p.source_type,
    outbox_name: p.outbox ?? null,
    inbox_name: p.inbox ?? null,
    enabled: p.enabled ?? true,
    config: JSON.stringify(sortKeys(config)),
  };
  if (
    current &&
    current.direction === wanted.direction && current.plugin_type === wanted.plugin_type &&
    current.outbox_name === wanted.outbox_name && current.inbox_name === wanted.inbox_name &&
    current.enabled === wanted.enabled && JSON.stringify(sortKeys(current.config)) === wanted.config &&
    (p.batch_size === undefined || current.batch_size === p.batch_size) &&
    (p.consumer_group === undefined || current.consumer_group === p.consumer_group)
  ) {
    return false;
  }
  if (p.direction === "forward") {
    await sql`SELECT tide.relay_set_outbox(${p.name}, ${p.outbox!}, ${sql.json(config as any)},
                                           p_batch_size := ${p.batch_size ?? null}, p_enabled := ${p.enabled ?? true})`;
  } else {
    await sql`SELECT tide.relay_set_inbox(${p.name}, ${p.inbox!}, ${sql.json(config as any)},
                                          p_batch_size := ${p.batch_size ?? null}, p_idempotent := ${p.idempotent ?? null},
                                          p_enabled := ${p.enabled ?? true})`;
  }
  logger.info(current ? "pipeline updated from the manifest" : "pipeline created from the manifest", { pipeline: p.name });
  return true;
}

function sortKeys(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(sortKeys);
  if (value === null || typeof value !== "object") return value;
  return Object.fromEntries(Object.keys(value).sort().map((k) => [k, sortKeys((value as any)[k])]));
}
