// Owners' liveness in tide.relay_pipeline_state: the heartbeat this relay writes for the units it
// owns (with each worker's health, for status and dashboards), and the fencing of another relay's
// units whose heartbeat is older than the lease: that owner is frozen or cut off, so its lock session
// is ended (tide.relay_fence_stale_owner) and the unit is free for the next reconcile. The
// coordinator decides when; its late acknowledgements are refused by tide.consumer_commit.

import type { Sql } from "../db.ts";
import { toError } from "../errors.ts";
import type { Logger } from "../log.ts";
import { redactText } from "../redact.ts";
import type { WorkerStatus } from "./worker_status.ts";

/** Which relay: its relay group and its own name. */
export interface RelayIdentity {
  relayGroupId: string;
  relayId: string;
}

/** Refreshes the heartbeat and health of every unit in `owned` that this relay still owns. */
export async function writeHeartbeat(sql: Sql, relay: RelayIdentity, owned: { name: string; lane?: number; status: WorkerStatus }[]): Promise<void> {
  if (owned.length === 0) return;
  const rows = owned.map((w) => ({
    pipeline: w.name,
    lane: w.lane ?? 0,
    healthy: w.status.healthy,
    // The catalog is read by tide_reader dashboards: no secret goes into it.
    last_error: w.status.lastError === null ? null : redactText(w.status.lastError),
    last_error_at: w.status.lastErrorAt?.toISOString() ?? null,
    last_success_at: w.status.lastSuccessAt?.toISOString() ?? null,
    retry_attempt: w.status.attempt,
    circuit: w.status.circuit,
  }));
  await sql`SELECT tide.relay_heartbeat(${relay.relayGroupId}, ${relay.relayId}, ${sql.json(rows)}::jsonb)`;
}

/**
 * Ends the lock session of every other owner of a unit this relay `wanted` (and does not own) whose
 * heartbeat is older than `leaseMs`, releasing the unit for the next reconcile.
 */
export async function fenceFrozenOwners(sql: Sql, relay: RelayIdentity, leaseMs: number, wanted: { has(key: string): boolean },
  owns: { has(key: string): boolean }, log: Logger): Promise<void> {
  const { relayGroupId, relayId } = relay;
  const stale = await sql<{ pipeline: string; lane: number }[]>`
    SELECT pipeline, lane FROM tide.relay_pipeline_state
     WHERE relay_group_id = ${relayGroupId} AND owner_id IS NOT NULL AND owner_id <> ${relayId}
       AND coalesce(heartbeat_at, acquired_at) < now() - make_interval(secs => ${leaseMs / 1000})`;
  for (const { pipeline, lane } of stale) {
    const key = wanted.has(pipeline) ? pipeline : `${pipeline}#${lane}`;
    if (!wanted.has(key) || owns.has(key)) continue;
    try {
      const [{ pid }] = await sql<{ pid: number | null }[]>`
        SELECT tide.relay_fence_stale_owner(${pipeline}, ${lane}::integer, ${relayGroupId}, ${leaseMs}::integer) AS pid`;
      if (pid !== null) {
        log.warn("ended the lock session of an owner whose heartbeat is older than the lease", {
          pipeline,
          lane,
          backend_pid: pid,
          lease_ms: leaseMs,
        });
      }
    } catch (error) {
      log.warn("cannot end a frozen owner's lock session", { pipeline, lane, error: toError(error) });
    }
  }
}
