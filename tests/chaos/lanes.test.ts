// Chaos for keyed lanes: one pipeline of 8 lanes (lane key: the payload's "key") shared by 3 relays,
// while two publishers write and a seeded driver SIGKILLs a relay and starts a new one, again and
// again. At the end the webhook's record is checked against the outbox: every committed message
// arrived, none that was not committed did, each key's first arrivals are in publish order
// (duplicates of a batch in flight at a kill are allowed and counted), and every lane's group has
// lag 0.
//
// Bounded by default (4,000 messages over 200 keys, 4 kills). The full run of the issue:
// TIDE_LANES_MESSAGES=20000 TIDE_LANES_KEYS=500 TIDE_LANES_KILLS=10; TIDE_CHAOS_SEED repeats the
// driver's choices.

import { afterAll, describe, expect, it } from "bun:test";
import { connect } from "../../core/db.ts";
import { committedMessages, lagOf, Random, recordingWebhook, RelayProcess, verifyDelivery } from "../support/chaos.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { waitFor } from "../support/relay.ts";

const MESSAGES = positive("TIDE_LANES_MESSAGES", 4_000);
const KEYS = positive("TIDE_LANES_KEYS", 200);
const KILLS = positive("TIDE_LANES_KILLS", 4);
const SEED = positive("TIDE_CHAOS_SEED", Math.floor(Math.random() * 2 ** 31));
const LANES = 8;
const RELAYS = 3;
const PUBLISHERS = 2;
const CHUNK = 50;
const BATCH = 20;
/** How far the publishers may run ahead of the sink. */
const BACKLOG = 300;
let published = 0;
const GROUP = "lanes-chaos";
const SETTLE_MS = 300_000;

let db: TestDatabase | undefined;
const everyRelay: RelayProcess[] = [];
const sink = recordingWebhook();

afterAll(async () => {
  await Promise.all(everyRelay.map((relay) => relay.kill()));
  sink.stop();
  await db?.drop();
});

describe("lanes under chaos", () => {
  it(`delivers ${MESSAGES} messages over ${KEYS} keys in per-key order through ${LANES} lanes while relays are killed`, async () => {
    console.log(`lanes chaos: seed ${SEED}, ${MESSAGES} messages, ${KEYS} keys, ${KILLS} kills`);
    const rng = new Random(SEED);
    db = await createTestDatabase();
    const sql = db.sql;
    await sql`SELECT tide.outbox_create('lanes')`;
    await sql`SELECT tide.relay_set_outbox('lanes', 'lanes', 'webhook',
      ${sql.json({
        url: sink.url, lanes: LANES, lane_key: "payload.key", max_batch_size: BATCH,
        retry: { initial_backoff_ms: 50, max_backoff_ms: 1_000 },
      })}, p_batch_size := ${BATCH})`;

    const spawn = () => {
      const relay = new RelayProcess(db!.url, ["--relay-group-id", GROUP, "--reconcile-interval-ms", "500", "--drain-timeout", "2"]);
      everyRelay.push(relay);
      return relay;
    };
    const live: RelayProcess[] = [];
    for (let i = 0; i < RELAYS; i++) live.push(spawn());
    await Promise.all(live.map((relay) => relay.started()));

    // Each publisher owns every PUBLISHERS-th key, so a key's publish order is its commit order.
    const publishing = Promise.all(Array.from({ length: PUBLISHERS }, (_, p) => publish(db!.url, p)));

    for (let kill = 0; kill < KILLS; kill++) {
      const arrived = sink.arrivals.length;
      const step = Math.max(50, Math.floor(MESSAGES / (KILLS + 2)));
      await waitFor(`${step} more arrivals before kill ${kill + 1}`, () => sink.arrivals.length >= Math.min(arrived + step, MESSAGES), 120_000)
        .catch(async (error) => {
          throw new Error(`${error.message}\n${await diagnosis(sql, live)}`);
        });
      const victim = live.splice(rng.int(0, live.length - 1), 1)[0]!;
      await victim.kill();
      const replacement = spawn();
      live.push(replacement);
      await replacement.started();
    }
    await publishing;

    await waitFor("every lane to be caught up", async () => {
      const { groups, lag } = await lagOf(sql, GROUP, ["lanes"]);
      return groups === LANES && lag === 0n;
    }, SETTLE_MS);
    const sent = await committedMessages(sql, ["lanes"]);
    expect(sent.length).toBe(MESSAGES);
    const verdict = verifyDelivery(sent, sink.arrivals);
    console.log(`lanes chaos: ${verdict.delivered} delivered, ${verdict.duplicates} duplicates`);
    expect(verdict.missing).toEqual([]);
    expect(verdict.unknown).toEqual([]);
    expect(verdict.altered).toEqual([]);
    expect(verdict.outOfOrder).toEqual([]);
    expect(verdict.delivered).toBe(MESSAGES);
    // Repeats only of batches in flight at a kill: at most one per lane the killed relay owned.
    expect(verdict.duplicates).toBeLessThanOrEqual(KILLS * LANES * BATCH);
    const lags = await sql<{ group_name: string; lag: bigint }[]>`
      SELECT group_name, lag FROM tide.consumer_lag WHERE outbox_name = 'lanes' AND relay_group_id = ${GROUP}`;
    expect(lags.length).toBe(LANES);
    expect(lags.every((row) => row.lag === 0n)).toBe(true);
    for (const relay of live) expect(relay.exitCode).toBeNull(); // none died by itself
  }, SETTLE_MS + 300_000);
});

/**
 * Publisher `index`: chunks of CHUNK messages, each one transaction, until its share of MESSAGES is
 * in; it keeps at most BACKLOG messages ahead of the sink, so that publishing lasts through the kills.
 */
async function publish(url: string, index: number): Promise<void> {
  const publisher = connect(url, { max: 1 });
  const keys = Math.ceil(KEYS / PUBLISHERS);
  try {
    const share = Math.floor(MESSAGES / PUBLISHERS) + (index < MESSAGES % PUBLISHERS ? 1 : 0);
    for (let done = 0; done < share; done += CHUNK) {
      await waitFor("the sink to catch up with the publishers", () => sink.arrivals.length >= published - BACKLOG, 120_000);
      const count = Math.min(CHUNK, share - done);
      // Message n of this publisher: key p<index>-<n % keys> (its own keys), seq n (rising per key).
      await publisher`
        INSERT INTO tide.outbox_messages (outbox, payload)
        SELECT 'lanes', jsonb_build_object('key', ${`p${index}-`} || (g % ${keys}), 'seq', g)
          FROM generate_series(${done}::int, ${done + count - 1}::int) g`;
      published += count;
    }
  } finally {
    await publisher.end();
  }
}

/** What the lanes and relays look like, for a failure message. */
async function diagnosis(sql: TestDatabase["sql"], live: RelayProcess[]): Promise<string> {
  const status = await sql`SELECT lane, consumer_group, owner_id, healthy, last_error, lag FROM tide.pipeline_status
                            WHERE relay_group_id = ${GROUP} ORDER BY lane`;
  return [
    `arrivals ${sink.arrivals.length}, published ${published}`,
    ...status.map((r) => JSON.stringify(r, (_, v) => (typeof v === "bigint" ? String(v) : v))),
    ...live.map((relay) => `relay ${relay.pid} (exit ${relay.exitCode}):\n${relay.tail(8)}`),
  ].join("\n");
}

function positive(name: string, fallback: number): number {
  const value = Number(process.env[name] ?? fallback);
  if (!Number.isInteger(value) || value <= 0) throw new Error(`${name} must be a positive whole number (got ${process.env[name]})`);
  return value;
}
