// Oversized inbox event ids: an id longer than 512 UTF-8 bytes is stored as "sha256:<hex>" of those
// bytes, so one message with a 6000-character Idempotency-Key or Nats-Msg-Id (more than a unique
// btree entry can hold) never fails the other messages of its batch, and a redelivery of it still
// maps to its row. On every path: the relay's reverse worker (a JetStream batch, webhook requests)
// and direct tide.inbox_insert_batch calls. The relay and the direct calls log in as a LOGIN role
// that holds only tide_relay; real NATS with JetStream and real HTTP requests.

import { afterAll, beforeAll, describe, expect, it, setDefaultTimeout } from "bun:test";
import { createHash, createHmac, randomBytes } from "node:crypto";
import { connect as connectNats, headers as natsHeaders, type NatsConnection } from "@nats-io/transport-node";
import { jetstream, jetstreamManager, type JetStreamManager } from "@nats-io/jetstream";
import { connect, type Sql } from "../../core/db.ts";
import type { Relay } from "../../core/relay.ts";
import { createTestDatabase, loginRole, type TestDatabase } from "../support/postgres.ts";
import { startRelay, waitFor } from "../support/relay.ts";
import { requireService } from "../support/services.ts";

setDefaultTimeout(60_000);

const NATS_URL = "nats://127.0.0.1:4222";
const natsUp = await requireService("nats", "127.0.0.1", 4222);
const suffix = Math.random().toString(36).slice(2, 10);

let db: TestDatabase;
let relaySql: Sql;
let relayUrl: string;

/** Random text that does not compress: the row really is too large for the index. */
const longId = (chars = 6000) => randomBytes(chars).toString("base64").slice(0, chars);
const sha256Id = (id: string) => `sha256:${createHash("sha256").update(id, "utf8").digest("hex")}`;

async function eventIds(inbox: string): Promise<string[]> {
  return (await db.sql.unsafe(`SELECT event_id FROM tide."${inbox}_inbox" ORDER BY id`)).map((r) => r.event_id);
}

beforeAll(async () => {
  db = await createTestDatabase();
  relayUrl = (await loginRole(db, "tide_relay", "ids_relay")).url;
  relaySql = connect(relayUrl, { max: 1 });
});

afterAll(async () => {
  await relaySql?.end();
  await db.drop();
});

describe("tide.inbox_insert_batch", () => {
  it("stores a 6000-character event id as its sha256, with the rest of its batch", async () => {
    await db.sql`SELECT tide.inbox_create('direct')`;
    const long = longId();
    const batch = [
      { event_id: "before-1", source: "test", payload: { n: 1 } },
      { event_id: long, source: "test", payload: { n: 2 } },
      { event_id: "after-3", source: "test", payload: { n: 3 } },
    ];
    const [first] = await relaySql`SELECT * FROM tide.inbox_insert_batch('direct', ${relaySql.json(batch)})`;
    expect(first).toEqual({ inserted: 3, duplicates: 0 });
    expect(await eventIds("direct")).toEqual(["before-1", sha256Id(long), "after-3"]);
    // Delivered again, the long id maps to the same row.
    const [again] = await relaySql`SELECT * FROM tide.inbox_insert_batch('direct', ${relaySql.json(batch)})`;
    expect(again).toEqual({ inserted: 0, duplicates: 3 });
  });

  it("finds a message by its original long id in inbox_mark_processed, inbox_mark_failed and replay_inbox_messages", async () => {
    await db.sql`SELECT tide.inbox_create('lookups')`;
    const long = longId();
    await relaySql`SELECT * FROM tide.inbox_insert_batch('lookups', ${relaySql.json([{ event_id: long, source: "test", payload: {} }])})`;
    const [{ retries }] = await db.sql`SELECT tide.inbox_mark_failed('lookups', ${long}, 'not yet') AS retries`;
    expect(retries).toBe(1);
    const [{ done }] = await db.sql`SELECT tide.inbox_mark_processed('lookups', ${long}) AS done`;
    expect(done).toBe(true);
    const [{ replayed }] = await db.sql`SELECT tide.replay_inbox_messages('lookups', ${db.sql.array([long])}) AS replayed`;
    expect(replayed).toBe(1);
    // The stored id works too: bounding is idempotent.
    const [{ again }] = await db.sql`SELECT tide.inbox_mark_processed('lookups', ${sha256Id(long)}) AS again`;
    expect(again).toBe(true);
  });

  it("bounds by UTF-8 bytes, not characters, exactly as the relay does", async () => {
    await db.sql`SELECT tide.inbox_create('bytes')`;
    const fits = "é".repeat(256); // 512 bytes: kept
    const over = "é".repeat(257); // 514 bytes: hashed
    const batch = [fits, over].map((event_id) => ({ event_id, payload: {} }));
    await relaySql`SELECT * FROM tide.inbox_insert_batch('bytes', ${relaySql.json(batch)})`;
    expect(await eventIds("bytes")).toEqual([fits, sha256Id(over)]);
    const { boundEventId } = await import("../../core/config/event_id.ts");
    expect([boundEventId(fits), boundEventId(over)]).toEqual([fits, sha256Id(over)]);
  });
});

describe("the relay's reverse worker", () => {
  const SECRET = "ids-hmac-secret";
  let relay: Relay;
  let base: string;

  beforeAll(async () => {
    await db.sql`SELECT tide.inbox_create('hooks')`;
    await db.sql`SELECT tide.relay_set_inbox('hooks-in', 'hooks', ${db.sql.json({ source_type: "webhook", path: "hooks", allow_unsigned: true })})`;
    await db.sql`SELECT tide.inbox_create('signed')`;
    await db.sql`SELECT tide.relay_set_inbox('signed-in', 'signed',
      ${db.sql.json({ source_type: "webhook", path: "signed", signature: { scheme: "hmac-sha256", secret: SECRET } })})`;
    relay = await startRelay(relayUrl, { metricsAddr: "127.0.0.1:0" });
    base = `http://127.0.0.1:${relay.httpPort}`;
  });
  afterAll(async () => {
    await relay?.stop();
  });

  const route = (path: string) =>
    waitFor(`the route /ingest/${path}`, async () => (await fetch(`${base}/ingest/${path}`)).status === 405);

  it("answers 200 to an unsigned request with a 6000-character Idempotency-Key and to the requests next to it", async () => {
    await route("hooks");
    const long = longId();
    const send = (key: string, n: number) =>
      fetch(`${base}/ingest/hooks`, { method: "POST", headers: { "idempotency-key": key }, body: JSON.stringify({ n }) });
    const answers = await Promise.all([send("hook-1", 1), send(long, 2), send("hook-3", 3), send(long, 2)]);
    expect(answers.map((r) => r.status)).toEqual([200, 200, 200, 200]);
    expect((await eventIds("hooks")).sort()).toEqual(["hook-1", "hook-3", sha256Id(long)].sort());
  });

  it("answers 200 to a signed CloudEvent with a 6000-character id and to the requests next to it", async () => {
    await route("signed");
    const long = longId();
    const send = (id: string) => {
      const body = JSON.stringify({ specversion: "1.0", id, type: "reading", source: "/ids" });
      const signature = `sha256=${createHmac("sha256", SECRET).update(body).digest("hex")}`;
      return fetch(`${base}/ingest/signed`, { method: "POST", headers: { "x-tide-signature": signature }, body });
    };
    const answers = await Promise.all([send("ce-1"), send(long), send("ce-3")]);
    expect(answers.map((r) => r.status)).toEqual([200, 200, 200]);
    expect((await eventIds("signed")).sort()).toEqual(["ce-1", "ce-3", sha256Id(long)].sort());
  });

  describe.skipIf(!natsUp)("reading a JetStream batch", () => {
    const subject = `ids${suffix}.payments`;
    const stream = `TIDE_IDS_${suffix}`;
    let nc: NatsConnection;
    let jsm: JetStreamManager;

    beforeAll(async () => {
      nc = await connectNats({ servers: NATS_URL });
      jsm = await jetstreamManager(nc);
      await jsm.streams.add({ name: stream, subjects: [subject] });
    });
    afterAll(async () => {
      await jsm?.streams.delete(stream).catch(() => {});
      await nc?.close();
    });

    it("writes every message of a batch in which one carries a 6000-character Nats-Msg-Id", async () => {
      const long = longId();
      const js = jetstream(nc);
      // Stored before the pipeline exists, so that its first fetch takes all three at once.
      for (const [n, id] of [[1, "pay-1"], [2, long], [3, "pay-3"]] as const) {
        const h = natsHeaders();
        h.set("Nats-Msg-Id", id);
        await js.publish(subject, JSON.stringify({ n }), { headers: h });
      }
      await db.sql`SELECT tide.inbox_create('payments')`;
      await db.sql`SELECT tide.relay_set_inbox('payments-in', 'payments', ${db.sql.json({ source_type: "nats", url: NATS_URL, subject })})`;
      await waitFor("three rows in the inbox", async () => (await eventIds("payments")).length === 3);
      expect(await eventIds("payments")).toEqual(["pay-1", sha256Id(long), "pay-3"]);
    });
  });
});
