// Sink "inbox": delivers outbox messages straight into an inbox table, in this database or another
// one with tide installed. The outbox dedup key becomes the inbox event_id, so a redelivered batch
// inserts nothing twice.

import postgres from "postgres";
import { z } from "zod";
import type { SinkDefinition } from "../../core/plugin.ts";
import { payloadBody, toJson } from "../shared.ts";

const configSchema = z.strictObject({
  /** Name of the target inbox (tide.inbox_create). */
  inbox: z.string().min(1),
  /** Database holding the inbox; default: the relay's own database. */
  postgres_url: z.string().url().optional(),
});

export type InboxSinkConfig = z.output<typeof configSchema>;

export const inboxSink: SinkDefinition<InboxSinkConfig> = {
  type: "inbox",
  kind: "sink",
  growBatches: true,
  summary: "Writes each message into an inbox table (same or another database), deduplicated by event_id",
  config: configSchema,
  example: { inbox: "shipping_triggers" },
  create(config, ctx) {
    let sql: postgres.Sql | undefined;
    return {
      async connect() {
        const url = config.postgres_url ?? ctx.postgresUrl;
        if (!url) throw ctx.errors.config(`inbox sink "${ctx.pipeline}": 'postgres_url' is required here`);
        sql ??= postgres(url, { max: 1, onnotice: () => {}, connection: { application_name: "pg-tide inbox sink" } });
        try {
          await sql`SELECT tide.inbox_table(${config.inbox})`;
        } catch (error) {
          const message = (error as Error).message;
          if (/does not exist/.test(message)) {
            throw ctx.errors.permanent(`inbox sink "${ctx.pipeline}": ${message}`, error);
          }
          throw ctx.errors.transient(`inbox sink "${ctx.pipeline}": cannot reach the inbox database: ${message}`, error);
        }
      },
      async publish(batch) {
        if (batch.length === 0) return [];
        const db = sql!;
        const headers = batch.map((m) => toJson({ ...m.headers, event_type: m.eventType, ...(m.topic ? { topic: m.topic } : {}) }));
        try {
          // Each payload's text goes in as PostgreSQL produced it, cast to jsonb, never re-serialized.
          await db`
            SELECT * FROM tide.inbox_insert_batch(${config.inbox}, (
              SELECT jsonb_agg(jsonb_build_object('event_id', e, 'source', s, 'payload', p::jsonb, 'headers', h::jsonb) ORDER BY n)
                FROM unnest(${db.array(batch.map((m) => m.dedupKey))}::text[], ${db.array(batch.map((m) => `outbox:${m.outbox}`))}::text[],
                            ${db.array(batch.map(payloadBody))}::text[], ${db.array(headers)}::text[])
                     WITH ORDINALITY AS m(e, s, p, h, n)))`;
        } catch (error) {
          throw ctx.errors.transient(`inbox sink "${ctx.pipeline}": writing to inbox "${config.inbox}" failed: ${(error as Error).message}`, error);
        }
        return [];
      },
      async close() {
        const current = sql;
        sql = undefined;
        await current?.end({ timeout: 5 });
      },
    };
  },
};

export default inboxSink;
