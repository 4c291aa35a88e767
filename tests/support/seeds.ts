// Helpers for the SQL contract suites (tests/sql): the relay's side of delivery done by hand, catalog
// snapshots for "changes nothing" checks, verbatim statement blocks, and awaited notifications.

import { expect } from "bun:test";
import type { Sql } from "../../core/db.ts";

/**
 * Does what the relay does after a sink acknowledged: reads batches of a consumer group and commits
 * them, until `count` messages are delivered (or, without `count`, until nothing is left).
 * Returns the delivered message ids in delivery order.
 */
export async function deliver(
  sql: Sql,
  outbox: string,
  group: string,
  options: { count?: number; batch?: number; relayGroupId?: string } = {},
): Promise<bigint[]> {
  const batch = options.batch ?? 100;
  const relayGroupId = options.relayGroupId ?? "default";
  const delivered: bigint[] = [];
  for (;;) {
    const remaining = options.count === undefined ? batch : Math.min(batch, options.count - delivered.length);
    if (remaining <= 0) return delivered;
    const rows = await sql<{ id: bigint }[]>`
      SELECT id FROM tide.consumer_next_batch(${outbox}, ${group}, ${remaining}, ${relayGroupId})`;
    if (rows.length === 0) return delivered;
    delivered.push(...rows.map((row) => row.id));
    await sql`SELECT tide.consumer_commit(${outbox}, ${group}, ${rows[rows.length - 1].id}, ${rows.length}, ${relayGroupId})`;
  }
}

/**
 * Runs a block of statements exactly as a user pastes it into psql (simple protocol, so several
 * statements and BEGIN/COMMIT are allowed), on a connection of its own.
 */
export async function runBlock(sql: Sql, text: string): Promise<unknown> {
  const conn = await sql.reserve();
  try {
    return await conn.unsafe(text);
  } finally {
    conn.release();
  }
}

/** Everything a failed API call must leave untouched. */
export async function catalogSnapshot(sql: Sql): Promise<unknown> {
  const [snapshot] = await sql`
    SELECT
      (SELECT coalesce(jsonb_agg(to_jsonb(o) ORDER BY o.name), '[]') FROM tide.outboxes o) AS outboxes,
      (SELECT coalesce(jsonb_agg(to_jsonb(i) ORDER BY i.name), '[]') FROM tide.inboxes i) AS inboxes,
      (SELECT coalesce(jsonb_agg(jsonb_build_object(
                'outbox', g.outbox_name, 'group', g.group_name, 'relay_group_id', g.relay_group_id,
                'low', g.low::text, 'high', g.high::text, 'cursor', g.cursor_id,
                'offset', g.committed_offset, 'updated_at', g.updated_at)
              ORDER BY g.outbox_name, g.group_name, g.relay_group_id), '[]')
         FROM tide.consumer_groups g) AS consumer_groups,
      (SELECT coalesce(jsonb_agg(to_jsonb(p) ORDER BY p.name), '[]') FROM tide.relay_pipelines p) AS pipelines,
      (SELECT coalesce(jsonb_agg(c.relname::text || ':' || c.relkind::text ORDER BY c.relname), '[]')
         FROM pg_class c WHERE c.relnamespace = 'tide'::regnamespace) AS relations,
      (SELECT count(*) FROM tide.outbox_messages) AS messages`;
  return snapshot;
}

/**
 * Expects `action` to fail with a message containing every one of `words` (case-sensitive), and
 * returns the error for further checks.
 */
export async function expectError(action: Promise<unknown>, ...words: string[]): Promise<Error & Record<string, unknown>> {
  let error: (Error & Record<string, unknown>) | undefined;
  try {
    await action;
  } catch (caught) {
    error = caught as Error & Record<string, unknown>;
  }
  if (!error) throw new Error(`expected an error mentioning ${JSON.stringify(words)}, but the call succeeded`);
  for (const word of words) expect(error.message).toContain(word);
  return error;
}

/** A LISTEN on one channel whose payloads can be awaited one at a time, in arrival order. */
export interface Listener {
  next(): Promise<string>;
  close(): Promise<void>;
}

export async function listen(sql: Sql, channel: string): Promise<Listener> {
  const queued: string[] = [];
  const waiting: ((payload: string) => void)[] = [];
  const { unlisten } = await sql.listen(channel, (payload) => {
    const waiter = waiting.shift();
    if (waiter) waiter(payload);
    else queued.push(payload);
  });
  return {
    next() {
      const payload = queued.shift();
      if (payload !== undefined) return Promise.resolve(payload);
      return new Promise((resolve) => waiting.push(resolve));
    },
    async close() {
      await unlisten();
    },
  };
}
