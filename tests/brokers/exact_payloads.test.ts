// Payloads travel exactly. On the way out, every sink sends the payload's text as PostgreSQL
// produced it (`payload::text`), wire formats embed it unchanged, and headers keep their numbers;
// filters and templates read fields without rounding them. On the way in, a body is stored as the
// broker delivered it, up to the jsonb cast (which sorts keys, expands 1e400 and decodes \u00e9).
// The payloads carry what a JavaScript number would change: integers beyond 2^53, decimals beyond
// double precision, trailing zeros, 1e400-style exponents, and unicode escapes.

import { afterAll, beforeAll, describe, expect, it, setDefaultTimeout } from "bun:test";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Msg } from "@nats-io/transport-node";
import type { Relay } from "../../core/relay.ts";
import { KAFKA_BROKER, KafkaReader, NATS_URL, NatsTestClient, produceKafka, unique } from "../support/brokers.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { startRelay, waitFor } from "../support/relay.ts";
import { requireService } from "../support/services.ts";

const kafkaUp = await requireService("kafka", "127.0.0.1", 9092);
const natsUp = await requireService("nats", "127.0.0.1", 4222);

setDefaultTimeout(60_000);

const RUN = unique();

/** What JSON.parse would change: every number here but `count`, and the escapes PostgreSQL decodes. */
const PAYLOAD = String.raw`{"id": 9007199254740993, "amount": 12345678901234567890.12, "price": 1.50,
  "huge": 1e400, "negative": -18446744073709551617, "tiny": 0.1000000000000000055511151231257827,
  "name": "caf\u00e9 \ud83d\ude00", "nested": {"ids": [9007199254740993, 123456789012345678901234567890]}, "count": 3}`;
const HEADERS = `{"event_type": "order.created", "trace": 9007199254740993, "ratio": 1.10}`;

/** A body as another service sends it, with the same kinds of numbers. */
const BODY = String.raw`{"id": 9007199254740993, "amount": 12345678901234567890.12, "huge": 1e400, "price": 1.50,
  "name": "caf\u00e9", "list": [1E+2, 123456789012345678901234567890], "count": 3}`;

let db: TestDatabase;
let relay: Relay;
let nats: NatsTestClient;
let dir: string;
let server: ReturnType<typeof Bun.serve>;
const received = new Map<string, { body: string; headers: Headers }[]>();
/** payload::text and headers::text of the message published to outbox "exact". */
let stored: { payload: string; headers: string };

function arrivals(path: string) {
  return received.get(path) ?? [];
}

async function lagOf(group: string): Promise<bigint | undefined> {
  const [row] = await db.sql`SELECT lag FROM tide.consumer_lag WHERE group_name = ${group}`;
  return row?.lag;
}

async function inboxRows(inbox: string): Promise<{ payload: string; type: string; headers: string }[]> {
  return (await db.sql.unsafe(
    `SELECT payload::text AS payload, jsonb_typeof(payload) AS type, headers::text AS headers FROM tide."${inbox}_inbox" ORDER BY id`,
  )) as never;
}

/** What the jsonb cast makes of a text: the most "exact" can mean on the way in. */
async function asJsonb(text: string): Promise<string> {
  const [{ normalized }] = await db.sql`SELECT ${text}::text::jsonb::text AS normalized`;
  return normalized;
}

describe.skipIf(!kafkaUp || !natsUp)("exact payloads", () => {
  beforeAll(async () => {
    db = await createTestDatabase();
    nats = await NatsTestClient.connect();
    dir = await mkdtemp(join(tmpdir(), "tide-exact-"));
    server = Bun.serve({
      port: 0,
      async fetch(request) {
        const path = new URL(request.url).pathname;
        received.set(path, [...arrivals(path), { body: await request.text(), headers: request.headers }]);
        return new Response("ok");
      },
    });
    relay = await startRelay(db.url, { metricsAddr: "127.0.0.1:0" });
    await db.sql`SELECT tide.outbox_create('exact')`;
    await db.sql`SELECT tide.outbox_publish('exact', ${PAYLOAD}::text::jsonb, ${HEADERS}::text::jsonb)`;
    [stored] = await db.sql`SELECT payload::text AS payload, headers::text AS headers FROM tide.outbox_messages WHERE outbox = 'exact'`;
  });
  afterAll(async () => {
    await relay?.stop();
    server?.stop(true);
    await nats?.close();
    await db?.drop();
    await rm(dir, { recursive: true, force: true });
  });

  describe("outbox → sinks", () => {
    const webhook = (path: string) => `http://127.0.0.1:${server.port}${path}`;

    it("sends the webhook body byte for byte as PostgreSQL produced the payload", async () => {
      await db.sql`SELECT tide.relay_set_outbox('exact-webhook', 'exact', 'webhook', ${db.sql.json({ url: webhook("/single") })})`;
      const [arrival] = await waitFor("the webhook request", () => arrivals("/single").length === 1 && arrivals("/single"));
      expect(arrival!.body).toBe(stored.payload);
      expect(arrival!.body).toContain(`"id": 9007199254740993`);
      expect(arrival!.body).toContain(`"amount": 12345678901234567890.12`);
      expect(arrival!.body).toContain(`"price": 1.50`);
    });

    it("embeds the payload text unchanged in batch bodies, envelopes and CloudEvents, with exact header numbers", async () => {
      await db.sql`SELECT tide.relay_set_outbox('exact-batch', 'exact', 'webhook', ${db.sql.json({ url: webhook("/batch"), mode: "batch" })})`;
      await db.sql`SELECT tide.relay_set_outbox('exact-envelope', 'exact', 'webhook',
                     ${db.sql.json({ url: webhook("/envelope"), wire_format: "envelope" })})`;
      await db.sql`SELECT tide.relay_set_outbox('exact-cloudevents', 'exact', 'webhook',
                     ${db.sql.json({ url: webhook("/cloudevents"), wire_format: "cloudevents" })})`;
      const [batch] = await waitFor("the batch request", () => arrivals("/batch").length === 1 && arrivals("/batch"));
      const [envelope] = await waitFor("the envelope", () => arrivals("/envelope").length === 1 && arrivals("/envelope"));
      const [cloudEvent] = await waitFor("the CloudEvent", () => arrivals("/cloudevents").length === 1 && arrivals("/cloudevents"));

      expect(batch!.body).toContain(`"payload":${stored.payload}}`);
      expect(batch!.body).toContain(`"trace":9007199254740993`);
      expect(batch!.body).toContain(`"ratio":1.10`);
      expect(envelope!.body).toContain(`"payload":${stored.payload},`);
      expect(envelope!.body).toContain(`"trace":9007199254740993`);
      expect(cloudEvent!.body).toContain(`"data":${stored.payload}}`);
      // Still JSON around it.
      for (const { body } of [batch!, envelope!, cloudEvent!]) expect(() => JSON.parse(body)).not.toThrow();
    });

    it("publishes the exact text to NATS, with exact header numbers and a subject rendered from a big integer", async () => {
      const seen: Msg[] = [];
      nats.nc.subscribe(`exact.${RUN}.out.>`, { callback: (_error, msg) => void seen.push(msg) });
      await nats.nc.flush();
      await db.sql`SELECT tide.relay_set_outbox('exact-nats', 'exact', 'nats', ${db.sql.json({ url: NATS_URL, subject: `exact.${RUN}.out.plain` })})`;
      await db.sql`SELECT tide.relay_set_outbox('exact-nats-template', 'exact', 'nats',
                     ${db.sql.json({ url: NATS_URL, subject_template: `exact.${RUN}.out.id.{payload.id}` })})`;
      await waitFor("both NATS messages", () => seen.length === 2);

      const plain = seen.find((m) => m.subject === `exact.${RUN}.out.plain`)!;
      expect(plain.string()).toBe(stored.payload);
      expect(plain.headers?.get("trace")).toBe("9007199254740993");
      expect(plain.headers?.get("ratio")).toBe("1.10");
      const templated = seen.find((m) => m.subject !== `exact.${RUN}.out.plain`)!;
      expect(templated.subject).toBe(`exact.${RUN}.out.id.9007199254740993`);
      expect(templated.string()).toBe(stored.payload);
    });

    it("produces the exact text to Kafka, with exact header numbers and a key rendered from a big integer", async () => {
      const topic = `exact-${RUN}`;
      const kafka = await KafkaReader.start([topic]);
      try {
        await db.sql`SELECT tide.relay_set_outbox('exact-kafka', 'exact', 'kafka',
                       ${db.sql.json({ brokers: KAFKA_BROKER, topic, key: "{payload.id}" })})`;
        const [record] = await kafka.waitForCount(1);
        expect(record!.value).toBe(stored.payload);
        expect(record!.key).toBe("9007199254740993");
        expect(record!.headers.trace).toBe("9007199254740993");
        expect(record!.headers.ratio).toBe("1.10");
      } finally {
        await kafka.stop();
      }
    });

    it("writes the exact text to a file, alone or inside the JSON line", async () => {
      const payloadPath = join(dir, "payload.jsonl");
      const jsonPath = join(dir, "json.jsonl");
      await db.sql`SELECT tide.relay_set_outbox('exact-file', 'exact', 'file', ${db.sql.json({ path: payloadPath, format: "payload" })})`;
      await db.sql`SELECT tide.relay_set_outbox('exact-file-json', 'exact', 'file', ${db.sql.json({ path: jsonPath, format: "json" })})`;
      const read = (path: string) => readFile(path, "utf8").catch(() => "");
      await waitFor("both files", async () => (await read(payloadPath)).endsWith("\n") && (await read(jsonPath)).endsWith("\n"));

      expect(await read(payloadPath)).toBe(`${stored.payload}\n`);
      const line = await read(jsonPath);
      expect(line.endsWith(`"payload":${stored.payload}}\n`)).toBe(true);
      expect(line).toContain(`"trace":9007199254740993`);
    });

    it("copies the exact payload and headers into an inbox", async () => {
      await db.sql`SELECT tide.inbox_create('exact_copy')`;
      await db.sql`SELECT tide.relay_set_outbox('exact-inbox', 'exact', 'inbox', ${db.sql.json({ inbox: "exact_copy" })})`;
      const [row] = await waitFor("the inbox row", async () => {
        const rows = await inboxRows("exact_copy");
        return rows.length === 1 && rows;
      });
      expect(row!.payload).toBe(stored.payload);
      expect(row!.headers).toBe(await asJsonb(HEADERS));
    });

    it("compares integers beyond 2^53 exactly in a filter", async () => {
      await db.sql`SELECT tide.outbox_create('exact_filter')`;
      await db.sql`SELECT tide.outbox_publish('exact_filter', '{"id": 9007199254740992}'::jsonb)`;
      await db.sql`SELECT tide.outbox_publish('exact_filter', '{"id": 9007199254740993}'::jsonb)`;
      await db.sql`SELECT tide.relay_set_outbox('exact-filter', 'exact_filter', 'webhook',
                     ${db.sql.json({ url: webhook("/filter"), transform: { filter: "payload.id == 9007199254740993" } })})`;
      await waitFor("exact-filter at lag 0", async () => (await lagOf("exact-filter")) === 0n);
      expect(arrivals("/filter").map((a) => a.body)).toEqual([`{"id": 9007199254740993}`]);
    });
  });

  describe("sources → inbox", () => {
    it("stores a NATS body as it came, up to the jsonb cast", async () => {
      const subject = `exact.${RUN}.in`;
      await nats.createStream(`TIDE_EXACT_${RUN}`, [subject]);
      await db.sql`SELECT tide.inbox_create('from_nats')`;
      await db.sql`SELECT tide.relay_set_inbox('exact-from-nats', 'from_nats', ${db.sql.json({ source_type: "nats", url: NATS_URL, subject })})`;
      await nats.publish(subject, BODY);
      const [row] = await waitFor("the inbox row", async () => {
        const rows = await inboxRows("from_nats");
        return rows.length === 1 && rows;
      });
      expect(row!.payload).toBe(await asJsonb(BODY));
      expect(row!.payload).toContain(`"id": 9007199254740993`);
      expect(row!.payload).toContain(`"amount": 12345678901234567890.12`);
    });

    it("stores a Kafka value as it came, up to the jsonb cast", async () => {
      const topic = `exact-in-${RUN}`;
      await produceKafka(topic, [{ value: BODY }]);
      await db.sql`SELECT tide.inbox_create('from_kafka')`;
      await db.sql`SELECT tide.relay_set_inbox('exact-from-kafka', 'from_kafka', ${db.sql.json({ source_type: "kafka", brokers: KAFKA_BROKER, topic })})`;
      const [row] = await waitFor("the inbox row", async () => {
        const rows = await inboxRows("from_kafka");
        return rows.length === 1 && rows;
      }, 45_000);
      expect(row!.payload).toBe(await asJsonb(BODY));
    });

    it("stores a webhook body as it came, up to the jsonb cast", async () => {
      await db.sql`SELECT tide.inbox_create('from_webhook')`;
      await db.sql`SELECT tide.relay_set_inbox('exact-from-webhook', 'from_webhook',
                     ${db.sql.json({ source_type: "webhook", path: `exact-${RUN}`, allow_unsigned: true })})`;
      const url = `http://127.0.0.1:${relay.httpPort}/ingest/exact-${RUN}`;
      await waitFor("the ingest route", async () => (await fetch(url)).status === 405);
      const response = await fetch(url, { method: "POST", headers: { "content-type": "application/json" }, body: BODY });
      expect(response.status).toBe(200);
      const [row] = await inboxRows("from_webhook");
      expect(row!.payload).toBe(await asJsonb(BODY));
    });

    it("keeps a JSON body that jsonb refuses as a JSON string of its text, and the next message still arrives", async () => {
      const subject = `exact.${RUN}.refused`;
      await nats.createStream(`TIDE_EXACT_REFUSED_${RUN}`, [subject]);
      await db.sql`SELECT tide.inbox_create('refused')`;
      await db.sql`SELECT tide.relay_set_inbox('exact-refused', 'refused', ${db.sql.json({ source_type: "nats", url: NATS_URL, subject })})`;
      const loneSurrogate = String.raw`{"s": "\ud800"}`;
      const overflow = `{"n": 1e1000000}`;
      await nats.publish(subject, loneSurrogate);
      await nats.publish(subject, overflow);
      await nats.publish(subject, `{"valid": 9007199254740993}`);
      const rows = await waitFor("three rows", async () => {
        const rows = await inboxRows("refused");
        return rows.length === 3 && rows;
      });
      expect(rows.map((r) => [r.type, r.payload])).toEqual([
        ["string", JSON.stringify(loneSurrogate)],
        ["string", JSON.stringify(overflow)],
        ["object", `{"valid": 9007199254740993}`],
      ]);
    });

    it("compares integers beyond 2^53 exactly in a reverse filter", async () => {
      const subject = `exact.${RUN}.filtered`;
      await nats.createStream(`TIDE_EXACT_FILTERED_${RUN}`, [subject]);
      await db.sql`SELECT tide.inbox_create('filtered')`;
      await db.sql`SELECT tide.relay_set_inbox('exact-filtered', 'filtered',
                     ${db.sql.json({ source_type: "nats", url: NATS_URL, subject, transform: { filter: "payload.id == 9007199254740993" } })})`;
      await nats.publish(subject, `{"id": 9007199254740992}`);
      await nats.publish(subject, `{"id": 9007199254740993}`);
      await nats.publish(subject, `{"id": 9007199254740994}`);
      await waitFor("the matching message", async () => (await inboxRows("filtered")).length === 1);
      // The durable consumer has all three acknowledged once each was decided.
      await waitFor("all three decided", async () =>
        (await nats.jsm.consumers.info(`TIDE_EXACT_FILTERED_${RUN}`, "pg-tide-exact-filtered")).ack_floor.stream_seq === 3);
      expect((await inboxRows("filtered")).map((r) => r.payload)).toEqual([`{"id": 9007199254740993}`]);
    });
  });
});
