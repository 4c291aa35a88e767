// Asking for durability and not getting it is an error: a nats source with a durable consumer
// (durable_name / consumer_group) whose subject no JetStream stream stores refuses to start, rather than
// reading core NATS and losing what is published while the relay is down. With `create_stream` the
// pipeline creates the stream itself, on sources and sinks. Real NATS server with JetStream.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { jetstream, jetstreamManager, type JetStreamManager } from "@nats-io/jetstream";
import type { OutboxMessage } from "../../core/plugin.ts";
import { natsSink, natsSource } from "../../plugins/nats/index.ts";
import { requireService } from "../support/services.ts";
import { parseConfig, pluginContext, validateConfig } from "../support/plugins.ts";

const URL = "nats://127.0.0.1:4222";
const up = await requireService("nats", "127.0.0.1", 4222);
const token = () => `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;

let nc: NatsConnection;
let jsm: JetStreamManager;
const streams: string[] = [];

function message(id: number): OutboxMessage {
  const payloadText = `{"order_id": ${id}}`;
  return {
    id: BigInt(id), outbox: "orders", topic: null, payload: JSON.parse(payloadText), payloadText, headers: {},
    dedupKey: `orders:${id}`, eventType: "order.created", op: "publish", createdAt: new Date(),
  };
}

describe.skipIf(!up)("nats durability", () => {
  beforeAll(async () => {
    nc = await connect({ servers: URL });
    jsm = await jetstreamManager(nc);
  });
  afterAll(async () => {
    for (const name of streams) await jsm.streams.delete(name).catch(() => {});
    await nc.drain();
  });

  it("refuses a durable consumer on a subject no stream stores, saying how to get one", async () => {
    const subject = `tide.durable.${token()}`;
    for (const asked of ["durable_name", "consumer_group"]) {
      const source = natsSource.create(await parseConfig(natsSource, { url: URL, subject, [asked]: "payments" }), pluginContext("pay"));
      const refused = await source.connect().then(() => undefined, (error: Error) => error);
      await source.close();
      expect(refused?.message).toContain(`'${asked}' asks for a durable JetStream consumer, but no JetStream stream covers subject "${subject}"`);
      expect(refused?.message).toContain(`'create_stream'`);
    }
    // Without a durable name, auto mode still reads core NATS (documented as at-most-once).
    const core = natsSource.create(await parseConfig(natsSource, { url: URL, subject }), pluginContext("pay"));
    await core.connect();
    await core.close();
  });

  it("creates the stream a source asks for, so that what is published while the relay is down is read afterwards", async () => {
    const subject = `tide.created.${token()}`;
    const name = `TIDE_CREATED_${token()}`;
    streams.push(name);
    const config = await parseConfig(natsSource, { url: URL, subject, durable_name: "payments", create_stream: { name } });
    const first = natsSource.create(config, pluginContext("pay"));
    await first.connect();
    await first.close();
    expect((await jsm.streams.info(name)).config.subjects).toEqual([subject]);

    // The relay is down: the message waits in the stream for the durable consumer.
    await jetstream(nc).publish(subject, '{"payment_id": "pay-001"}');
    const second = natsSource.create(config, pluginContext("pay"));
    await second.connect();
    try {
      const batch = (await second.read())!;
      expect(batch.messages.map((m) => m.payloadText)).toEqual(['{"payment_id": "pay-001"}']);
      await batch.ack();
    } finally {
      await second.close();
    }
  });

  it("creates the stream a sink asks for at connect, and publishes into it", async () => {
    const prefix = `tide.sinkcreated.${token()}`;
    const name = `TIDE_SINK_CREATED_${token()}`;
    streams.push(name);
    const sink = natsSink.create(
      await parseConfig(natsSink, { url: URL, subject_template: `${prefix}.{op}`, mode: "jetstream", create_stream: { name, subjects: [`${prefix}.>`] } }),
      pluginContext("orders"),
    );
    await sink.connect();
    try {
      expect(await sink.publish([message(1), message(2)])).toEqual([]);
    } finally {
      await sink.close();
    }
    expect((await jsm.streams.info(name)).state.messages).toBe(2);
  });

  it("names what is wrong with create_stream", async () => {
    const issues = async (input: unknown, definition: typeof natsSink | typeof natsSource) =>
      JSON.stringify((await validateConfig(definition, input)).issues ?? []);
    expect(await issues({ url: URL, subject: "a.b", mode: "core", create_stream: { name: "S" } }, natsSource)).toContain("applies to JetStream only");
    expect(await issues({ url: URL, subject: "a.b", stream: "X", create_stream: { name: "S" } }, natsSource)).toContain("cannot be combined with 'stream'");
    expect(await issues({ url: URL, subject_template: "a.{op}", create_stream: { name: "S" } }, natsSink)).toContain("needs 'subjects' with 'subject_template'");
    expect(await issues({ url: URL, subject: "a.b", create_stream: { name: "has.dot" } }, natsSink)).toContain("must be a stream name");
  });
});
