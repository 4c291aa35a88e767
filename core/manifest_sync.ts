// Pipelines declared in a manifest ([[pipelines]]) are upserted into the catalog when the relay
// starts. An unchanged pipeline is left alone, so restarting relays does not restart its workers.

import type { Sql } from "./db.ts";
import type { Logger } from "./log.ts";
import type { ManifestPipeline } from "./manifest.ts";

export async function syncManifestPipelines(sql: Sql, pipelines: ManifestPipeline[], logger: Logger): Promise<number> {
  let changed = 0;
  for (const p of pipelines) {
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
      continue;
    }
    if (p.direction === "forward") {
      await sql`SELECT tide.relay_set_outbox(${p.name}, ${p.outbox!}, ${sql.json(config as any)},
                                             p_batch_size := ${p.batch_size ?? null}, p_enabled := ${p.enabled ?? true})`;
    } else {
      await sql`SELECT tide.relay_set_inbox(${p.name}, ${p.inbox!}, ${sql.json(config as any)},
                                            p_batch_size := ${p.batch_size ?? null}, p_idempotent := ${p.idempotent ?? null},
                                            p_enabled := ${p.enabled ?? true})`;
    }
    changed += 1;
    logger.info(current ? "pipeline updated from the manifest" : "pipeline created from the manifest", { pipeline: p.name });
  }
  return changed;
}

function sortKeys(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(sortKeys);
  if (value === null || typeof value !== "object") return value;
  return Object.fromEntries(Object.keys(value).sort().map((k) => [k, sortKeys((value as any)[k])]));
}
