// What an idle relay costs the database: one relay owning 50 forward pipelines whose outboxes
// receive nothing consumes (almost) no transaction ids. Every xid is a write: it fills WAL, dirties
// pages and ages the cluster toward an anti-wraparound vacuum, so a poll that finds nothing must
// not write. The window is 10 s: what is measured is an amount of xids, not a duration.
//
// xids are counted cluster-wide, so the test runs its own PostgreSQL (autovacuum off: only the
// relay may write), where no other test's transactions are counted.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { connect, type Sql } from "../../core/db.ts";
import { installSchema } from "../../core/schema.ts";
import { lagOf, recordingWebhook, RelayProcess, startRestartablePostgres, type RestartablePostgres } from "../support/chaos.ts";
import { withDatabase } from "../support/postgres.ts";
import { waitFor } from "../support/relay.ts";

const PIPELINES = 50;
const WINDOW_MS = 10_000;
/** Heartbeats and the like may write a little; an empty poll that writes costs thousands here. */
const MAX_XIDS = 20;

const outboxes = Array.from({ length: PIPELINES }, (_, i) => `idle-${i}`);
let pg: RestartablePostgres;
let sql: Sql;
let url: string;
let relay: RelayProcess | undefined;
const sink = recordingWebhook();

beforeAll(async () => {
  pg = await startRestartablePostgres({ autovacuum: "off" });
  const admin = connect(pg.url, { max: 1 });
  await admin`CREATE DATABASE tide_idle`;
  await admin.end();
  url = withDatabase(pg.url, "tide_idle");
  sql = connect(url, { max: 2 });
  await installSchema(sql);
  for (const name of outboxes) {
    await sql`SELECT tide.outbox_create(${name})`;
    await sql`SELECT tide.relay_set_outbox(${name}, ${name}, 'webhook', ${sql.json({ url: sink.url })})`;
  }
}, 120_000);
afterAll(async () => {
  await relay?.kill();
  await sql?.end();
  sink.stop();
  await pg?.destroy();
});

/** The next transaction id to be assigned; reading it assigns none. */
async function nextXid(): Promise<bigint> {
  const [row] = await sql<{ next: bigint }[]>`SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS next`;
  return row!.next;
}

describe("an idle relay", () => {
  it(`owning ${PIPELINES} idle forward pipelines consumes fewer than ${MAX_XIDS} transaction ids in ${WINDOW_MS / 1000} s, and still delivers`, async () => {
    // The default reconcile interval and lease (heartbeats); test relays poll every 50 ms, so an
    // empty poll that writes would show here by the thousand.
    relay = new RelayProcess(url, ["--relay-group-id", "idle"]);
    await relay.started();
    await waitFor(`all ${PIPELINES} pipelines owned and reading`, async () => {
      const [{ owned }] = await sql`SELECT count(*)::int AS owned FROM tide.relay_pipeline_state
                                     WHERE relay_group_id = 'idle' AND owner_id IS NOT NULL`;
      return owned === PIPELINES && (await lagOf(sql, "idle", outboxes)).groups === PIPELINES;
    }, 60_000);

    const before = await nextXid();
    await Bun.sleep(WINDOW_MS); // the measurement window itself: nothing is awaited here
    const consumed = Number((await nextXid()) - before);
    console.log(`idle: one relay owning ${PIPELINES} idle pipelines consumed ${consumed} xids in ${WINDOW_MS / 1000} s`);
    expect(relay.exitCode).toBeNull();
    expect(consumed).toBeLessThan(MAX_XIDS);

    // Quiet, not dead: a message to every outbox is delivered.
    for (const name of outboxes) await sql`SELECT tide.outbox_publish(${name}, ${sql.json({ hello: name })})`;
    await waitFor("a message from every outbox at the webhook, and lag 0", async () =>
      sink.distinct().size === PIPELINES && (await lagOf(sql, "idle", outboxes)).lag === 0n, 60_000);
  }, 120_000);
});
