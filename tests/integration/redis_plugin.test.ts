// The redis sink and source against a real Redis (127.0.0.1:6379): what a stream receives from the
// sink (once per message, however often a batch is retried), what the source hands out through a
// consumer group, acknowledges, redelivers and reclaims from a crashed consumer, errors that name
// the server and never the secret, and a cut connection through a proxy that both resume from.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { Redis } from "ioredis";
import type { OutboxMessage, PluginContext, PluginDefinition, SourceInstance } from "../../core/plugin.ts";
import { redisSink, redisSource } from "../../plugins/redis/index.ts";
import { toJson } from "../../plugins/shared.ts";
import { parseConfig, pluginContext } from "../support/plugins.ts";
import { waitFor } from "../support/relay.ts";
import { REDIS, requireService } from "../support/services.ts";
import { TcpProxy } from "../support/tcp_proxy.ts";

const context = (overrides: Partial<PluginContext> = {}) => pluginContext("redis-test", overrides);
const parse = parseConfig;
const URL = REDIS.url;
const up = await requireService(REDIS.name, REDIS.host, REDIS.port);

function message(id: number, overrides: Partial<OutboxMessage> = {}): OutboxMessage {
  const fields = {
    id: BigInt(id),
    outbox: "orders",
    topic: null,
    payload: { order_id: id },
    headers: { event_type: "order.created", tenant: "acme", attempt: 2 },
    dedupKey: `orders:${id}`,
    eventType: "order.created",
    op: "insert",
    createdAt: new Date(),
    ...overrides,
  };
  return { ...fields, payloadText: overrides.payloadText ?? toJson(fields.payload) };
}

const token = () => `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;

let redis: Redis;
const keys: string[] = [];

/** A stream key of its own, deleted (with its dedup markers) after the suite. */
function streamName(): string {
  const key = `tide-test:${token()}`;
  keys.push(key);
  return key;
}

/** The stream's entries as field objects, oldest first. */
async function entries(stream: string): Promise<{ id: string; fields: Record<string, string> }[]> {
  const raw = (await redis.xrange(stream, "-", "+")) as [string, string[]][];
  return raw.map(([id, list]) => {
    const fields: Record<string, string> = {};
    for (let i = 0; i < list.length; i += 2) fields[list[i]!] = list[i + 1]!;
    return { id, fields };
  });
}

describe.skipIf(!up)("redis", () => {
  beforeAll(() => {
    redis = new Redis({ host: REDIS.host, port: REDIS.port, protocol: 2 });
  });
  afterAll(async () => {
    for (const key of keys) {
      const markers = await redis.keys(`${key}*`);
      if (markers.length > 0) await redis.del(...markers);
    }
    redis?.disconnect();
  });

  describe("sink", () => {
    it("adds one entry per message: the JSON body as is, headers, dedup key and tide's fields", async () => {
      const stream = streamName();
      const sink = redisSink.create(await parse(redisSink, { url: URL, stream }), context());
      await sink.connect();
      try {
        const exact = message(2, { payloadText: '{"total": 1.50, "big": 12345678901234567890}' });
        expect(await sink.publish([message(1), exact])).toEqual([]);
      } finally {
        await sink.close();
        await sink.close();
      }
      const [first, second] = await entries(stream);
      expect(first!.fields).toEqual({
        payload: '{"order_id":1}',
        headers: '{"event_type":"order.created","tenant":"acme","attempt":"2"}',
        "tide-dedup-key": "orders:1",
        "tide-event-type": "order.created",
        "tide-outbox": "orders",
        "tide-message-id": "1",
      });
      expect(second!.fields.payload).toBe('{"total": 1.50, "big": 12345678901234567890}');
    });

    it("adds nothing twice when a batch is retried, even after the server forgot its scripts", async () => {
      const stream = streamName();
      const sink = redisSink.create(await parse(redisSink, { url: URL, stream }), context());
      await sink.connect();
      try {
        expect(await sink.publish([message(1), message(2)])).toEqual([]);
        expect(await sink.publish([message(1), message(2), message(3)])).toEqual([]);
        await redis.script("FLUSH");
        expect(await sink.publish([message(2), message(3), message(4)])).toEqual([]);
      } finally {
        await sink.close();
      }
      expect((await entries(stream)).map((e) => e.fields["tide-dedup-key"])).toEqual(["orders:1", "orders:2", "orders:3", "orders:4"]);
      expect(await redis.ttl(`${stream}:tide-dedup:orders:1`)).toBeGreaterThan(86_000);
    });

    it("caps the stream with MAXLEN ~ when maxlen is set", async () => {
      const stream = streamName();
      const sink = redisSink.create(await parse(redisSink, { url: URL, stream, maxlen: 10, dedup_window_s: 0 }), context());
      await sink.connect();
      try {
        for (let round = 0; round < 5; round++) {
          expect(await sink.publish(Array.from({ length: 100 }, (_, i) => message(round * 100 + i + 1)))).toEqual([]);
        }
      } finally {
        await sink.close();
      }
      const length = await redis.xlen(stream);
      // "~" trims whole macro nodes (100 entries each by default): far fewer than the 500 added.
      expect(length).toBeLessThan(500);
      expect(length).toBeGreaterThanOrEqual(10);
    });

    it("renders stream_template; a value with ':' is refused for good unless allow_colons_in names it", async () => {
      const prefix = streamName();
      const strict = redisSink.create(await parse(redisSink, { url: URL, stream_template: `${prefix}:{payload.tenant}` }), context());
      await strict.connect();
      try {
        const failures = await strict.publish([message(1, { payload: { tenant: "acme" } }), message(2, { payload: { tenant: "acme:secrets" } })]);
        expect(failures.map((f) => [f.id, f.retriable])).toEqual([[2n, false]]);
        expect(failures[0]!.error.message).toContain(`{payload.tenant} is "acme:secrets", whose ":" would add key parts`);
        expect(failures[0]!.error.message).toContain("allow_colons_in");
      } finally {
        await strict.close();
      }
      expect((await entries(`${prefix}:acme`)).map((e) => e.fields["tide-dedup-key"])).toEqual(["orders:1"]);
      expect(await redis.exists(`${prefix}:acme:secrets`)).toBe(0);
    });

    it("sends a message whose stream key holds another type to the DLQ and delivers the rest", async () => {
      const prefix = streamName();
      await redis.set(`${prefix}:taken`, "a string");
      const sink = redisSink.create(await parse(redisSink, { url: URL, stream_template: `${prefix}:{payload.to}` }), context());
      await sink.connect();
      try {
        const failures = await sink.publish([message(1, { payload: { to: "a" } }), message(2, { payload: { to: "taken" } }), message(3, { payload: { to: "a" } })]);
        expect(failures.map((f) => [f.id, f.retriable])).toEqual([[2n, false]]);
        expect(failures[0]!.error.message).toContain(`key "${prefix}:taken" holds something other than a stream`);
        expect(failures[0]!.error.message).toContain("WRONGTYPE");
      } finally {
        await sink.close();
      }
      expect((await entries(`${prefix}:a`)).map((e) => e.fields["tide-dedup-key"])).toEqual(["orders:1", "orders:3"]);
    });

    it("throws while the connection is cut (nothing lost), and delivers again by itself once it is back", async () => {
      const stream = streamName();
      const proxy = await TcpProxy.start(REDIS.host, REDIS.port);
      const sink = redisSink.create(await parse(redisSink, { url: `redis://127.0.0.1:${proxy.port}`, stream }), context());
      try {
        await sink.connect();
        expect(await sink.publish([message(1)])).toEqual([]);
        await proxy.cut();
        await expect(sink.publish([message(2)])).rejects.toThrow(`redis://127.0.0.1:${proxy.port}`);
        await proxy.restore();
        expect(await waitFor("a publish after the connection is back", () => sink.publish([message(2)]).then((f) => f.length === 0, () => false)))
          .toBe(true);
      } finally {
        await sink.close();
        await proxy.stop();
      }
      expect((await entries(stream)).map((e) => e.fields["tide-dedup-key"])).toEqual(["orders:1", "orders:2"]);
    });

    it("names the server and the refused username on a bad login, on one line and without the password", async () => {
      const secret = `wrong-${token()}`;
      const sink = redisSink.create(await parse(redisSink, { url: URL, username: "tide-nobody", password: secret, stream: "x" }), context());
      const error = await sink.connect().then(() => undefined, (e: Error) => e);
      await sink.close();
      expect(error?.message).toBe(
        `redis sink "redis-test": cannot connect to Redis redis://127.0.0.1:6379: ` +
          `the server refused 'username' "tide-nobody" with its 'password' (WRONGPASS)`,
      );
      const inUrl = redisSink.create(await parse(redisSink, { url: `redis://tide-nobody:${secret}@127.0.0.1:6379`, stream: "x" }), context());
      const urlError = await inUrl.connect().then(() => undefined, (e: Error) => e);
      await inUrl.close();
      expect(urlError?.message).toContain("the server refused the credentials in 'url'");
      expect(urlError?.message).not.toContain(secret);
    });

    it("fails connect() naming an unreachable server", async () => {
      const sink = redisSink.create(await parse(redisSink, { url: "redis://127.0.0.1:1", stream: "x" }), context());
      await expect(sink.connect()).rejects.toThrow(/cannot connect to Redis redis:\/\/127\.0\.0\.1:1: .*ECONNREFUSED/);
      await sink.close();
    });
  });

  describe("source", () => {
    async function openSource(config: Record<string, unknown>, overrides: Partial<PluginContext> = {}): Promise<SourceInstance> {
      const source = redisSource.create(await parse(redisSource, { url: URL, ...config }), context(overrides));
      await source.connect();
      return source;
    }

    it("reads through a consumer group it creates, and acks (XACK) only when asked to", async () => {
      const stream = streamName();
      const ids = [];
      for (let i = 1; i <= 3; i++) ids.push(await redis.xadd(stream, "*", "payload", JSON.stringify({ n: i }), "event_id", `e-${i}`));
      const source = await openSource({ stream, group: "relays" }, { batchSize: 2 });
      try {
        const first = (await source.read())!;
        expect(first.messages.map((m) => m.transportId)).toEqual([`redis:${ids[0]}`, `redis:${ids[1]}`]);
        expect(first.messages.map((m) => m.eventId)).toEqual(["e-1", "e-2"]);
        expect(first.messages.map((m) => m.payloadText)).toEqual(['{"n":1}', '{"n":2}']);
        expect(first.messages[0]!.headers).toEqual({ event_id: "e-1" });
        expect(first.messages[0]!.source).toBe(`redis:${stream}`);
        expect((await redis.xpending(stream, "relays"))[0]).toBe(2);
        await first.ack();
        const second = (await source.read())!;
        expect(second.messages.map((m) => m.eventId)).toEqual(["e-3"]);
        await second.ack();
      } finally {
        await source.close();
        await source.close();
      }
      expect((await redis.xpending(stream, "relays"))[0]).toBe(0);
    });

    it("reads what the redis sink wrote with the message's headers and dedup key as event id", async () => {
      const stream = streamName();
      const sink = redisSink.create(await parse(redisSink, { url: URL, stream }), context());
      await sink.connect();
      await sink.publish([message(7, { payloadText: '{"total": 1.50}' })]);
      await sink.close();
      const source = await openSource({ stream });
      try {
        const [got] = (await source.read())!.messages;
        expect(got!.payloadText).toBe('{"total": 1.50}');
        expect(got!.eventId).toBe("orders:7");
        expect(got!.headers).toMatchObject({ event_type: "order.created", tenant: "acme", "tide-dedup-key": "orders:7" });
      } finally {
        await source.close();
      }
    });

    it("hands over an entry without a payload field as an object of its fields, and a CloudEvents id", async () => {
      const stream = streamName();
      await redis.xadd(stream, "*", "id", "42", "total", "9.99");
      await redis.xadd(stream, "*", "payload", JSON.stringify({ specversion: "1.0", id: "ce-1", type: "t", source: "/s" }));
      await redis.xadd(stream, "*", "payload", "plain text");
      const source = await openSource({ stream });
      try {
        const got = (await source.read())!.messages;
        expect(got.map((m) => m.payloadText)).toEqual([
          '{"id":"42","total":"9.99"}', JSON.stringify({ specversion: "1.0", id: "ce-1", type: "t", source: "/s" }), '"plain text"',
        ]);
        // A field named "id" is data (an order's id), not the entry's own id.
        expect(got.map((m) => m.eventId)).toEqual([undefined, "ce-1", undefined]);
      } finally {
        await source.close();
      }
    });

    it("delivers a nacked batch again, and an unacked one to the next source of the same consumer", async () => {
      const stream = streamName();
      await redis.xadd(stream, "*", "payload", "1");
      await redis.xadd(stream, "*", "payload", "2");
      const source = await openSource({ stream, group: "g", consumer: "relay-a" });
      let ids: string[];
      try {
        const first = (await source.read())!;
        ids = first.messages.map((m) => m.transportId);
        await first.nack!(new Error("inbox write failed"));
        expect((await source.read())!.messages.map((m) => m.transportId)).toEqual(ids);
      } finally {
        await source.close(); // without an ack: a crash between the inbox commit and the ack
      }
      const restarted = await openSource({ stream, group: "g", consumer: "relay-a" });
      try {
        const again = (await restarted.read())!;
        expect(again.messages.map((m) => m.transportId)).toEqual(ids);
        await again.ack();
      } finally {
        await restarted.close();
      }
      expect((await redis.xpending(stream, "g"))[0]).toBe(0);
    });

    it("claims (XAUTOCLAIM) what a crashed consumer left pending once it has been idle for claim_idle_ms", async () => {
      const stream = streamName();
      await redis.xgroup("CREATE", stream, "g", "0", "MKSTREAM");
      await redis.xadd(stream, "*", "payload", '"left behind"');
      // Another consumer read it and died without acknowledging.
      await redis.xreadgroup("GROUP", "g", "crashed", "COUNT", "10", "STREAMS", stream, ">");
      const source = await openSource({ stream, group: "g", consumer: "relay-b", claim_idle_ms: 1_000 });
      try {
        const batch = (await source.read())!;
        expect(batch.messages.map((m) => m.payloadText)).toEqual(['"left behind"']);
        await batch.ack();
      } finally {
        await source.close();
      }
      const pending = (await redis.xpending(stream, "g")) as [number, ...unknown[]];
      expect(pending[0]).toBe(0);
    });

    it("starts a new group at new entries with from_beginning false, and refuses a missing group without create_group", async () => {
      const stream = streamName();
      await redis.xadd(stream, "*", "payload", '"old"');
      const stop = new AbortController();
      const source = await openSource({ stream, group: "fresh", from_beginning: false }, { signal: stop.signal });
      try {
        await redis.xadd(stream, "*", "payload", '"new"');
        const batch = (await source.read())!;
        expect(batch.messages.map((m) => m.payloadText)).toEqual(['"new"']);
        await batch.ack();
        const reading = source.read();
        stop.abort();
        expect(await reading).toBeNull();
      } finally {
        await source.close();
      }
      const strict = await openSource({ stream, group: "nobody-made-it", create_group: false });
      try {
        await expect(strict.read()).rejects.toThrow(/no consumer group "nobody-made-it" on stream "tide-test:\w+"/);
      } finally {
        await strict.close();
      }
    });

    it("fails a read while the connection is cut, and reads again by itself once it is back", async () => {
      const stream = streamName();
      const proxy = await TcpProxy.start(REDIS.host, REDIS.port);
      const source = await openSource({ url: `redis://127.0.0.1:${proxy.port}`, stream });
      try {
        await proxy.cut();
        await expect(source.read()).rejects.toThrow(`redis://127.0.0.1:${proxy.port}`);
        await redis.xadd(stream, "*", "payload", '"during the cut"');
        await proxy.restore();
        const batch = await waitFor("a read after the connection is back", () => source.read().catch(() => null));
        expect(batch.messages.map((m) => m.payloadText)).toEqual(['"during the cut"']);
        await batch.ack();
      } finally {
        await source.close();
        await proxy.stop();
      }
    });
  });
});

describe("redis configs", () => {
  async function problems(definition: PluginDefinition, input: unknown): Promise<string[]> {
    const result = await definition.config["~standard"].validate(input);
    return (result.issues ?? []).map((i) => `${(i.path ?? []).map((p) => (typeof p === "object" ? p.key : p)).join(".")}: ${i.message}`);
  }

  it("accepts the examples and the usual shapes", async () => {
    expect(await problems(redisSink, redisSink.example)).toEqual([]);
    expect(await problems(redisSource, redisSource.example)).toEqual([]);
    expect(await problems(redisSink, { url: "rediss://:secret@cache.example.com:6380/2", stream: "orders", tls: { ca: "PEM" } })).toEqual([]);
    expect(await problems(redisSource, { url: URL, stream: "s", consumer_group: "g", transform: { filter: "true" } })).toEqual([]);
  });

  it("rejects invalid configs, naming the key", async () => {
    expect(await problems(redisSink, { stream: "s" })).toEqual([expect.stringMatching(/^url: /)]);
    expect(await problems(redisSink, { url: "redis://h/db", stream: "s" })).toEqual([expect.stringMatching(/^url: its path must be a database number/)]);
    expect(await problems(redisSink, { url: URL })).toEqual([expect.stringMatching(/^stream: required/)]);
    expect(await problems(redisSink, { url: URL, stream: "a:{op}" })).toEqual([expect.stringMatching(/^stream: has a placeholder/)]);
    expect(await problems(redisSink, { url: URL, stream: "s", allow_colons_in: ["op"] })).toEqual([expect.stringMatching(/^allow_colons_in: /)]);
    expect(await problems(redisSink, { url: URL, stream: "s", maxlen: 0 })).toEqual([expect.stringMatching(/^maxlen: /)]);
    expect(await problems(redisSink, { url: "redis://:p@h", stream: "s", password: "q" })).toEqual([expect.stringMatching(/^password: /)]);
    expect(await problems(redisSink, { url: URL, stream: "s", tls: {} })).toEqual([expect.stringMatching(/^tls: needs a rediss/)]);
    expect(await problems(redisSource, { url: URL, stream: "s", group: "a", consumer_group: "b" })).toEqual([expect.stringMatching(/^consumer_group: /)]);
    expect(await problems(redisSource, { url: URL, stream: "s", claim_idle_ms: 10 })).toEqual([expect.stringMatching(/^claim_idle_ms: /)]);
  });

  it("create() does no I/O and reports an unknown placeholder as a config error", async () => {
    const sink = redisSink.create(await parse(redisSink, { url: "redis://127.0.0.1:1", stream: "x" }), context());
    await sink.close();
    const source = redisSource.create(await parse(redisSource, { url: "redis://127.0.0.1:1", stream: "x" }), context());
    await source.close();
    const templated = await parse(redisSink, { url: URL, stream_template: "a:{nope}" });
    expect(() => redisSink.create(templated, context())).toThrow(/nope/);
  });
});
