// What a forward worker's reads hand to a sink (core/engine/consumer_group.ts): the driver's raw
// rows decoded into messages whose payload stays the bytes PostgreSQL sent (payloadBytes), with
// payloadText their decoding; every column as the driver would have read it; the fence on the first
// row; a read that finds nothing, and a refused acknowledgement, told apart from a batch. And the
// driver itself, patched to put together only the message that spans two network chunks
// (scripts/patch-deps.mjs): rows of every size, and one of megabytes, arrive whole.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { ConsumerGroup } from "../../core/engine/consumer_group.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";

let db: TestDatabase;

beforeAll(async () => {
  db = await createTestDatabase();
});
afterAll(async () => {
  await db.drop();
});

const PAYLOADS = [
  '{"id": 9007199254740993, "amount": 12345678901234567890.12, "big": 1e400}',
  '{"name": "Zoë \\u00e9 ☃ 𝄞", "quote": "say \\"hi\\"\\n"}',
  '{"a": 1}',
];

async function groupOn(outbox: string): Promise<{ group: ConsumerGroup; epoch: bigint }> {
  await db.sql`SELECT tide.outbox_create(${outbox})`;
  await db.sql`SELECT tide.create_consumer_group('g', ${outbox})`;
  const group = new ConsumerGroup(db.sql, outbox, "g", "default");
  return { group, epoch: await group.claim() };
}

async function publish(outbox: string, payload: string, headers: string | null, topic: string | null): Promise<void> {
  await db.sql`SELECT tide.outbox_publish(${outbox}, ${topic}::text, ${payload}::text::jsonb, coalesce(${headers}::text::jsonb, '{}'))`;
}

describe("a forward worker's raw reads", () => {
  it("carry each payload as the bytes of PostgreSQL's text, and every other column as the driver reads it", async () => {
    const { group, epoch } = await groupOn("raw_cols");
    await publish("raw_cols", PAYLOADS[0]!, '{"event_type": "order.paid", "n": 18446744073709551617}', "orders");
    await publish("raw_cols", PAYLOADS[1]!, null, null);
    await publish("raw_cols", PAYLOADS[2]!, '{"event_type": "order.paid", "n": 18446744073709551617}', null);
    const expected = await db.sql<{ id: bigint; payload: string; topic: string | null; created_at: Date }[]>`
      SELECT id, payload::text AS payload, topic, created_at FROM tide.outbox_messages WHERE outbox = 'raw_cols' ORDER BY id`;

    const batch = (await group.read(10, epoch))!;
    expect(batch.messages.map((m) => m.id)).toEqual(expected.map((r) => r.id));
    for (const [i, message] of batch.messages.entries()) {
      expect(Buffer.from(message.payloadBytes!).equals(Buffer.from(expected[i]!.payload, "utf8"))).toBe(true);
      expect(message.payloadText).toBe(expected[i]!.payload);
      expect(message.topic).toBe(expected[i]!.topic);
      expect(message.createdAt.getTime()).toBe(expected[i]!.created_at.getTime());
      expect(message.dedupKey).toBe(`raw_cols:${message.id}`);
    }
    expect(String((batch.messages[1]!.payload as { name: string }).name)).toBe("Zoë é ☃ 𝄞");
    // Headers parsed losslessly; the same text is one object, read-only.
    expect(batch.messages[0]!.headers.n).toBe(18446744073709551617n);
    expect(batch.messages[0]!.eventType).toBe("order.paid");
    expect(batch.messages[1]!.headers).toEqual({});
    expect(Object.isFrozen(batch.messages[2]!.headers)).toBe(true);
    expect(() => {
      (batch.messages[2]!.headers as Record<string, unknown>).event_type = "changed";
    }).toThrow();

    const [fence] = await db.sql<{ interval_seq: bigint; read_cursor: bigint; generation: bigint }[]>`
      SELECT interval_seq, read_cursor, generation FROM tide.consumer_read_batch('raw_cols', 'g', 1)`;
    expect(batch.fence).toEqual({ ownerEpoch: epoch, intervalSeq: fence!.interval_seq, readCursor: fence!.read_cursor, generation: fence!.generation });
  });

  it("tell a read that found nothing and a refused acknowledgement from a batch", async () => {
    const { group, epoch } = await groupOn("raw_empty");
    expect(await group.read(10, epoch)).toBeUndefined();
    await publish("raw_empty", PAYLOADS[2]!, null, null);
    await publish("raw_empty", '{"n": 2}', null, null);
    const first = (await group.read(1, epoch))!;
    expect(first.messages).toHaveLength(1);
    const ahead = (await group.readAhead(first, 5, epoch))!;
    expect(ahead.messages.map((m) => m.payloadText)).toEqual(['{"n": 2}']);
    expect(ahead.fence.readCursor).toBe(first.messages[0]!.id);

    const last = first.messages[0]!.id;
    const next = await group.commitAndRead(last, 1, first.fence, 5, epoch);
    expect(next!.messages.map((m) => m.payloadText)).toEqual(['{"n": 2}']);
    expect(next!.fence.readCursor).toBe(last);
    // The same acknowledgement again: its fence moved, so it is refused (undefined), not "nothing next" (null).
    expect(await group.commitAndRead(last, 1, first.fence, 5, epoch)).toBeUndefined();
    expect(await group.commitAndRead(next!.messages[0]!.id, 1, next!.fence, 5, epoch)).toBeNull();
  });
});

describe("the driver across network chunks", () => {
  const md5 = (bytes: Uint8Array) => createHash("md5").update(bytes).digest("hex");
  // Rows of 1 to 4,000 bytes (two-byte characters among them), so that rows end everywhere in a chunk.
  const ROWS = `SELECT n, md5(convert_to(t, 'UTF8')) AS digest, t
                  FROM (SELECT n, repeat('aé' || n::text, 1 + n / 4) AS t FROM generate_series(1, 3000) n) s ORDER BY n`;

  it("is patched to join only the message that spans two chunks", () => {
    const source = readFileSync(join(import.meta.dir, "../../node_modules/postgres/src/connection.js"), "utf8");
    expect(source).toContain("tide: join only the message across chunks");
  });

  it("hands on every row whole, as text and as raw bytes", async () => {
    const rows = await db.sql<{ n: number; digest: string; t: string }[]>`${db.sql.unsafe(ROWS)}`;
    expect(rows).toHaveLength(3000);
    expect(rows.filter((r, i) => r.n !== i + 1 || md5(Buffer.from(r.t, "utf8")) !== r.digest)).toEqual([]);
    const raw = await db.sql`${db.sql.unsafe(ROWS)}`.raw();
    expect(raw).toHaveLength(3000);
    expect(raw.filter((r, i) => Number(String(r[0])) !== i + 1 || md5(r[2] as Buffer) !== String(r[1]))).toEqual([]);
  });

  it("hands on a row of megabytes whole, with the rows around it", async () => {
    const rows = await db.sql<{ n: number; digest: string; t: string }[]>`
      SELECT n, md5(convert_to(t, 'UTF8')) AS digest, t
        FROM (SELECT n, CASE WHEN n = 2 THEN repeat('☃x', 1500000) ELSE 'small ' || n END AS t FROM generate_series(1, 3) n) s
       ORDER BY n`;
    expect(rows.map((r) => r.n)).toEqual([1, 2, 3]);
    expect(rows[1]!.t.length).toBe(3_000_000);
    expect(rows.every((r) => md5(Buffer.from(r.t, "utf8")) === r.digest)).toBe(true);
  });
});
