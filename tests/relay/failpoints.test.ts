// A relay that crashes at each point of a batch's life (TIDE_FAILPOINTS="<name>=crash"): after a
// restart every message is delivered, none is skipped, each key keeps its order, the lag is 0, and
// the only repeats are the batch that was in flight at the crash.

import { afterEach, beforeEach, describe, expect, it } from "bun:test";
import { jetstream } from "@nats-io/jetstream";
import { NATS_URL, NatsTestClient, unique } from "../support/brokers.ts";
import {
  committedMessages, lagOf, lockHolders, recordingWebhook, RelayProcess, verifyDelivery, type Verdict,
} from "../support/chaos.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { waitFor } from "../support/relay.ts";
import { requireService } from "../support/services.ts";

const BATCH = 10;
/** Published before the first relay starts: the crash comes in the middle of them. */
const BEFORE = 60;
/** Published after the restart, around a transaction that commits late with a lower id. */
const DURING = 15;
const KEYS = 3;

let db: TestDatabase;
let relays: RelayProcess[] = [];
let seq = 0;

function relay(failpoints?: string): RelayProcess {
  const child = new RelayProcess(db.url, ["--relay-group-id", "failpoints", "--reconcile-interval-ms", "300"],
    failpoints ? { TIDE_FAILPOINTS: failpoints } : {});
  relays.push(child);
  return child;
}

// A database per test: a relay runs every pipeline of its catalog, and a failpoint's count (@N)
// must see only this test's pipeline.
beforeEach(async () => {
  db = await createTestDatabase();
});
afterEach(async () => {
  await Promise.all(relays.map((r) => r.kill()));
  relays = [];
  await db.drop();
});

/** Messages keyed k0..k2 in turn, `seq` in publish order, one transaction each. */
async function publish(outbox: string, count: number): Promise<void> {
  for (let i = 0; i < count; i++) {
    seq += 1;
    await db.sql`SELECT tide.outbox_publish(${outbox}, ${db.sql.json({ key: `${outbox}-k${seq % KEYS}`, seq })})`;
  }
}

/**
 * Publishes one message in a transaction left open (an id lower than every later one), then
 * `others` messages; once those arrived, commits it: the late lower id must not be skipped.
 */
async function publishAroundLateCommit(outbox: string, others: number, sink: ReturnType<typeof recordingWebhook>): Promise<void> {
  const late = await db.sql.reserve();
  try {
    await late`BEGIN`;
    seq += 1;
    await late`SELECT tide.outbox_publish(${outbox}, ${db.sql.json({ key: `${outbox}-late`, seq })})`;
    await publish(outbox, others);
    await waitFor("the messages committed after the open transaction to arrive", () => allArrived(outbox, sink), 60_000);
    await late`COMMIT`;
  } finally {
    late.release();
  }
}

async function allArrived(outbox: string, sink: ReturnType<typeof recordingWebhook>): Promise<boolean> {
  const arrived = sink.distinct();
  return (await committedMessages(db.sql, [outbox])).every((m) => arrived.has(`${m.outbox}:${m.id}`));
}

async function webhookPipeline(name: string, url: string): Promise<void> {
  await db.sql`SELECT tide.outbox_create(${name})`;
  await db.sql`SELECT tide.relay_set_outbox(${name}, ${name}, 'webhook',
    ${db.sql.json({ url, timeout_ms: 30_000, retry: { initial_backoff_ms: 20, max_backoff_ms: 200 } })}, p_batch_size := ${BATCH})`;
}

/** Waits until every committed message arrived and the lag is 0, then checks what arrived. */
async function settle(outbox: string, sink: ReturnType<typeof recordingWebhook>): Promise<Verdict> {
  await waitFor(`every message of ${outbox} to arrive and its lag to be 0`, async () => {
    const { groups, lag } = await lagOf(db.sql, "failpoints", [outbox]);
    return groups === 1 && lag === 0n && (await allArrived(outbox, sink));
  }, 60_000);
  const verdict = verifyDelivery(await committedMessages(db.sql, [outbox]), sink.arrivals);
  expect(verdict.missing).toEqual([]);
  expect(verdict.unknown).toEqual([]);
  expect(verdict.altered).toEqual([]);
  expect(verdict.outOfOrder).toEqual([]);
  expect(verdict.sent).toBe(BEFORE + DURING);
  return verdict;
}

/** The repeated messages are consecutive in the outbox (one batch), and at most `limit` of them. */
function expectRepeatsFromOneBatch(verdict: Verdict, sentIds: string[], limit: number): void {
  expect(verdict.duplicated.length).toBeLessThanOrEqual(limit);
  if (verdict.duplicated.length === 0) return;
  const positions = verdict.duplicated.map((key) => sentIds.indexOf(key)).sort((a, b) => a - b);
  expect(positions[positions.length - 1]! - positions[0]!).toBe(positions.length - 1);
  expect(verdict.duplicates).toBe(verdict.duplicated.length); // each repeated once: one redelivery
}

describe("a relay crashing at a failpoint", () => {
  // Crash while the third batch is at that point: two batches went through before it. What the sink
  // took of that batch before its acknowledgement was committed is delivered again, nothing else.
  const forward = [
    { failpoint: "forward.after-read@3", repeats: 0 },
    { failpoint: "forward.after-partial-publish@3", repeats: Math.ceil(BATCH / 2) },
    { failpoint: "forward.after-publish@3", repeats: BATCH },
    { failpoint: "forward.before-commit@3", repeats: BATCH },
    { failpoint: "forward.after-commit@3", repeats: 0 },
    { failpoint: "coordinator.holding-locks", repeats: 0 },
  ];

  for (const { failpoint, repeats } of forward) {
    const name = failpoint.replace(/@\d+$/, "");
    it(`${name}: a restarted relay delivers everything in order, repeating ${repeats ? `the ${repeats} messages in flight` : "nothing"}`, async () => {
      const outbox = `fp-${name.replaceAll(".", "-")}`;
      const sink = recordingWebhook();
      try {
        await webhookPipeline(outbox, sink.url);
        await publish(outbox, BEFORE);

        const crashing = relay(`${failpoint}=crash`);
        const code = await crashing.ended(`the relay to crash at ${failpoint}`);
        expect(code).not.toBe(0);
        expect(sink.distinct().size).toBeLessThan(BEFORE); // it crashed in the middle of the stream

        await relay().started();
        await publishAroundLateCommit(outbox, DURING - 1, sink);
        const verdict = await settle(outbox, sink);
        const sentIds = (await committedMessages(db.sql, [outbox])).map((m) => `${m.outbox}:${m.id}`);
        expectRepeatsFromOneBatch(verdict, sentIds, repeats);
        expect(verdict.duplicated.length).toBe(repeats);
      } finally {
        sink.stop();
      }
    }, 120_000);
  }

  it("coordinator.reacquiring: after its lock session is terminated and it crashes replacing it, a new relay delivers everything", async () => {
    const outbox = "fp-coordinator-reacquiring";
    const sink = recordingWebhook();
    try {
      await webhookPipeline(outbox, sink.url);
      await publish(outbox, BEFORE);
      const crashing = relay("coordinator.reacquiring=crash");
      await crashing.started();
      const holders = await waitFor("the pipeline's ownership lock to be held", async () => (await lockHolders(db.sql, "failpoints", [outbox])).get(outbox));
      await waitFor("the first messages to arrive", () => sink.arrivals.length > 0);
      await db.sql`SELECT pg_terminate_backend(${holders[0]!})`;
      expect(await crashing.ended("the relay to crash while replacing its ownership connection")).not.toBe(0);

      await relay().started();
      await publishAroundLateCommit(outbox, DURING - 1, sink);
      const verdict = await settle(outbox, sink);
      const sentIds = (await committedMessages(db.sql, [outbox])).map((m) => `${m.outbox}:${m.id}`);
      expectRepeatsFromOneBatch(verdict, sentIds, BATCH);
    } finally {
      sink.stop();
    }
  }, 120_000);
});

const natsUp = await requireService("nats", "127.0.0.1", 4222);

describe.skipIf(!natsUp)("a reverse relay crashing at a failpoint", () => {
  it("reverse.after-inbox-commit: the source delivers the batch again and the inbox keeps each message once", async () => {
    const run = unique();
    const subject = `tide.failpoints.${run}`;
    const stream = `TIDE_FAILPOINTS_${run}`;
    const count = 20;
    const nats = await NatsTestClient.connect();
    try {
      await nats.createStream(stream, [subject]);
      const js = jetstream(nats.nc);
      for (let n = 1; n <= count; n++) await js.publish(subject, JSON.stringify({ n }));
      await db.sql`SELECT tide.inbox_create('fp_received')`;
      await db.sql`SELECT tide.relay_set_inbox('fp-nats-in', 'fp_received',
        ${db.sql.json({ source_type: "nats", url: NATS_URL, subject, durable_name: "failpoints", mode: "jetstream", ack_wait_ms: 2_000 })},
        p_batch_size := 5)`;

      // Crash on the second batch: its rows are committed, the broker has not been told.
      const crashing = relay("reverse.after-inbox-commit@2=crash");
      expect(await crashing.ended("the relay to crash after the inbox commit")).not.toBe(0);
      const [{ n: stored }] = await db.sql`SELECT count(*)::int AS n FROM tide.fp_received_inbox`;
      expect(stored).toBeLessThan(count);

      const restarted = relay();
      await restarted.started();
      await waitFor("the JetStream consumer to acknowledge every message", async () => {
        const info = await nats.jsm.consumers.info(stream, "failpoints");
        return info.ack_floor.stream_seq === count && info.num_ack_pending === 0 && info.num_pending === 0;
      }, 60_000);
      const rows = await db.sql`SELECT event_id, payload FROM tide.fp_received_inbox ORDER BY id`;
      expect(rows.map((r) => r.payload.n).sort((a: number, b: number) => a - b)).toEqual(Array.from({ length: count }, (_, i) => i + 1));
      expect(new Set(rows.map((r) => r.event_id)).size).toBe(count);
      // The unacknowledged batch came again, and its rows were recognised as already stored.
      expect(await restarted.metric("dedup_skipped_total")).toBeGreaterThan(0);
    } finally {
      await nats.close();
    }
  }, 120_000);
});
