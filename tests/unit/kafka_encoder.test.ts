// The records tide sends to Kafka go through kafkajs's encoder as scripts/patch-deps.mjs changes it
// (one buffer per record, varints written in place; it was ~38 % of the relay's CPU). The bytes on
// the wire must be what unpatched kafkajs 2.2.4 writes: tests/fixtures/kafka/record_digests.json
// holds the SHA-256 of each case's encoding as the unpatched library produced it, and kafkajs's own
// decoder must read back every field.

import { describe, expect, it } from "bun:test";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";

const require = createRequire(import.meta.url);
const Record = require("kafkajs/src/protocol/recordBatch/record/v0/index.js");
const { RecordBatch } = require("kafkajs/src/protocol/recordBatch/v0/index.js");
const Decoder = require("kafkajs/src/protocol/decoder.js");
const decodeRecordBatch = require("kafkajs/src/protocol/recordBatch/v0/decoder.js");
const groupMessagesPerPartition = require("kafkajs/src/producer/groupMessagesPerPartition.js");
const produceRequest = require("kafkajs/src/protocol/requests/produce/v7/request.js");
const encodeRequest = require("kafkajs/src/protocol/request.js");

const digests = JSON.parse(readFileSync(join(import.meta.dir, "../fixtures/kafka/record_digests.json"), "utf8")).sha256_of_hex;

type Case = { name: string; key: string | Buffer | null; value: string | null; headers: Record<string, string | (string | Buffer)[]>; offsetDelta: number; timestampDelta: number };
const long = "x".repeat(1000) + "é€😀";
const cases: Case[] = [
  { name: "tide record: null key, 1 KiB value, five headers", key: null, value: JSON.stringify({ id: 9007199254740993, body: long }), headers: { "content-type": "application/json", "tide-dedup-key": "order-1", "tide-event-type": "order.created", "tide-outbox": "orders", "tide-message-id": "12345" }, offsetDelta: 0, timestampDelta: 0 },
  { name: "key buffer, tombstone value", key: Buffer.from([0, 1, 2, 255]), value: null, headers: {}, offsetDelta: 1, timestampDelta: 1 },
  { name: "null and array header values, unicode names", key: "ключ", value: "ünïcödé \u2028", headers: { a: "", multi: ["one", "two", Buffer.from("three")], "名前": "値" }, offsetDelta: 127, timestampDelta: 127 },
  { name: "varint boundaries 128", key: "k".repeat(128), value: "v".repeat(16383), headers: { h: "x".repeat(16384) }, offsetDelta: 128, timestampDelta: 128 },
  { name: "negative delta", key: "", value: "", headers: { e: "" }, offsetDelta: 300, timestampDelta: -1 },
  { name: "delta 2^30-1", key: "a", value: "b", headers: {}, offsetDelta: 20000, timestampDelta: 1073741823 },
  { name: "delta 2^30", key: "a", value: "b", headers: {}, offsetDelta: 2097152, timestampDelta: 1073741824 },
  { name: "delta -2^30", key: "a", value: "b", headers: {}, offsetDelta: 0, timestampDelta: -1073741824 },
  { name: "delta -2^30-1", key: "a", value: "b", headers: {}, offsetDelta: 0, timestampDelta: -1073741825 },
  { name: "delta 2^40 (Long path)", key: "a", value: "b", headers: {}, offsetDelta: 0, timestampDelta: 1099511627776 },
  { name: "value of 70,000 bytes", key: "big", value: "z".repeat(70000), headers: { n: "1" }, offsetDelta: 5, timestampDelta: 3 },
];

const sha256 = (buffer: Buffer) => createHash("sha256").update(buffer.toString("hex")).digest("hex");
const bytes = (value: string | Buffer | null) => (value === null ? null : Buffer.from(value));

describe("kafkajs's record encoder as tide patches it", () => {
  it("is patched (npm install ran scripts/patch-deps.mjs)", () => {
    const encoder = readFileSync(require.resolve("kafkajs/src/protocol/encoder.js"), "utf8");
    const record = readFileSync(require.resolve("kafkajs/src/protocol/recordBatch/record/v0/index.js"), "utf8");
    for (const mark of ["tide: buffers from a slab", "tide: unfilled buffers", "tide: unfilled growth", "tide: varint in place", "tide: small varlong"]) {
      expect(encoder).toContain(mark);
    }
    expect(record).toContain("tide: one buffer per record");
    const batch = readFileSync(require.resolve("kafkajs/src/protocol/recordBatch/v0/index.js"), "utf8");
    expect(batch).toContain("tide: one buffer per batch");
    expect(batch).toContain("tide: length and CRC in place");
    const crc = readFileSync(require.resolve("kafkajs/src/protocol/recordBatch/crc32C/index.js"), "utf8");
    expect(crc).toContain("tide: crc32c by slices");
    const produce = readFileSync(require.resolve("kafkajs/src/protocol/requests/produce/v3/request.js"), "utf8");
    for (const mark of ["tide: one buffer per produce request", "tide: topic as pieces", "tide: partition as pieces"]) {
      expect(produce).toContain(mark);
    }
    const request = readFileSync(require.resolve("kafkajs/src/protocol/request.js"), "utf8");
    expect(request).toContain("tide: one buffer per request");
    const grouping = readFileSync(require.resolve("kafkajs/src/producer/groupMessagesPerPartition.js"), "utf8");
    expect(grouping).toContain("tide: group in place");
  });

  it("groups a batch's messages by partition keeping their order", () => {
    const messages = Array.from({ length: 9 }, (_, i) => ({ key: `k${i % 3}`, value: String(i) }));
    const partitioner = ({ message }: { message: { key: string } }) => Number(message.key.slice(1));
    const grouped = groupMessagesPerPartition({ topic: "t", partitionMetadata: [{}, {}, {}], messages, partitioner });
    expect(Object.keys(grouped)).toEqual(["0", "1", "2"]);
    expect(grouped[0].map((m: { value: string }) => m.value)).toEqual(["0", "3", "6"]);
    expect(grouped[2].map((m: { value: string }) => m.value)).toEqual(["2", "5", "8"]);
    expect(groupMessagesPerPartition({ topic: "t", partitionMetadata: [], messages, partitioner })).toEqual({});
  });

  for (const c of cases) {
    it(`writes the bytes unpatched kafkajs writes: ${c.name}`, () => {
      expect(digests.records[c.name]).toBeString();
      expect(sha256(Record(c).buffer)).toBe(digests.records[c.name]);
    });
  }

  it("writes a record batch byte for byte as before, and kafkajs's decoder reads every field back", async () => {
    const batch = await RecordBatch({
      records: cases.map((c) => Record(c)),
      firstTimestamp: 1700000000000,
      maxTimestamp: 1700000000123,
      lastOffsetDelta: cases.length - 1,
    });
    expect(sha256(batch.buffer)).toBe(digests.batch);

    const decoded = await decodeRecordBatch(new Decoder(batch.buffer));
    expect(decoded.records).toHaveLength(cases.length);
    decoded.records.forEach((record: { key: Buffer | null; value: Buffer | null; headers: Record<string, unknown>; offset: string; timestamp: string }, i: number) => {
      const c = cases[i];
      expect(record.offset).toBe(String(c.offsetDelta));
      expect(record.timestamp).toBe(String(1700000000000 + c.timestampDelta));
      expect(record.key).toEqual(bytes(c.key));
      expect(record.value).toEqual(bytes(c.value));
      const headers = Object.fromEntries(
        Object.entries(c.headers).map(([name, value]) => [name, Array.isArray(value) ? value.map(bytes) : bytes(value)]),
      );
      expect(record.headers).toEqual(headers);
    });
  });

  it("writes a compressed, transactional batch as before, and it decodes", async () => {
    const batch = await RecordBatch({
      compression: 1, // gzip
      records: cases.map((c) => Record(c)),
      firstTimestamp: 1700000000000,
      maxTimestamp: 1700000000123,
      lastOffsetDelta: cases.length - 1,
      transactional: true,
      producerId: 42,
      producerEpoch: 3,
      firstSequence: 7,
    });
    expect(sha256(batch.buffer)).toBe(digests.gzipTransactionalBatch);
    const decoded = await decodeRecordBatch(new Decoder(batch.buffer));
    expect(decoded.inTransaction).toBe(true);
    expect(decoded.producerId).toBe("42");
    expect(decoded.records.map((r: { value: Buffer | null }) => r.value)).toEqual(cases.map((c) => bytes(c.value)));
  });

  it("writes whole produce requests (two topics, three partitions, with and without a transaction) as before", async () => {
    const messages = (n: number, t: number) => cases.slice(0, n).map((c, i) => ({ key: c.key, value: c.value, headers: c.headers, timestamp: t + i }));
    const topicData = [
      { topic: "orders", partitions: [{ partition: 0, firstSequence: 0, messages: messages(11, 1700000000000) }, { partition: 3, firstSequence: 5, messages: messages(2, 1700000000500) }] },
      { topic: "payments.v1", partitions: [{ partition: 1, firstSequence: 9, messages: messages(1, 1700000000900) }] },
    ];
    const plain = await encodeRequest({ correlationId: 77, clientId: "tide-relay", request: produceRequest({ acks: -1, timeout: 30000, topicData }) });
    expect(sha256(plain.buffer)).toBe(digests.produceRequest);
    const transactional = await encodeRequest({
      correlationId: 78, clientId: "tide-relay",
      request: produceRequest({ acks: -1, timeout: 5000, transactionalId: "tide-tx-1", producerId: 12, producerEpoch: 2, topicData }),
    });
    expect(sha256(transactional.buffer)).toBe(digests.transactionalProduceRequest);
  });
});
