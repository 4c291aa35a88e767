// The mqtt sink and source against a real broker (Mosquitto on 127.0.0.1:1883, and private ones for
// logins): what subscribers receive from the sink (QoS 1, user properties, topic templates), what the
// source hands out from its persistent session and acknowledges only after being asked to, errors
// that name the server and never the secret, and a cut connection that both resume from.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import mqtt, { type IPublishPacket, type MqttClient } from "mqtt";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { OutboxMessage, PluginContext, PluginDefinition, SourceInstance } from "../../core/plugin.ts";
import { mqttSink, mqttSource } from "../../plugins/mqtt/index.ts";
import { toJson } from "../../plugins/shared.ts";
import { parseConfig, pluginContext } from "../support/plugins.ts";
import { freePort } from "../support/postgres.ts";
import { waitFor } from "../support/relay.ts";
import { MQTT, reachable, requireBinary, requireService } from "../support/services.ts";
import { TcpProxy } from "../support/tcp_proxy.ts";

const context = (overrides: Partial<PluginContext> = {}) => pluginContext("mqtt-test", overrides);
const parse = parseConfig;
const URL = MQTT.url;
const up = await requireService(MQTT.name, MQTT.host, MQTT.port);
const mosquitto = requireBinary("mosquitto", "the MQTT login tests (a private mosquitto)");

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

/** A subscriber that keeps every packet it receives on `filter`. */
async function subscriber(filter: string, url = URL): Promise<{ packets: IPublishPacket[]; client: MqttClient }> {
  const client = await mqtt.connectAsync(url, { protocolVersion: 5, reconnectPeriod: 0 });
  const packets: IPublishPacket[] = [];
  client.on("message", (_topic, _payload, packet) => void packets.push(packet));
  await client.subscribeAsync(filter, { qos: 1 });
  return { packets, client };
}

/** A mosquitto of the test's own on a free port, started from a config text; stop() ends it and removes its files. */
async function startMosquitto(config: (dir: string) => Promise<string>): Promise<{ url: string; stop(): Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), "tide-mosquitto-"));
  const port = await freePort();
  // Started as root, mosquitto would switch to its own user, which cannot read this directory.
  const user = process.getuid?.() === 0 ? "user root\n" : "";
  await writeFile(join(dir, "mosquitto.conf"), `listener ${port} 127.0.0.1\n${user}log_dest file ${join(dir, "log")}\n${await config(dir)}\n`);
  const child = Bun.spawn(["mosquitto", "-c", join(dir, "mosquitto.conf")], { stdout: "ignore", stderr: "ignore" });
  const stop = async () => {
    child.kill();
    await child.exited;
    await rm(dir, { recursive: true, force: true });
  };
  try {
    await waitFor(`mosquitto on port ${port}`, async () => {
      if (child.exitCode !== null) throw new Error(`mosquitto exited with ${child.exitCode}: ${await readFile(join(dir, "log"), "utf8").catch(() => "")}`);
      return await reachable("127.0.0.1", port);
    }, 10_000);
  } catch (error) {
    await stop();
    throw error;
  }
  return { url: `mqtt://127.0.0.1:${port}`, stop };
}

describe.skipIf(!up)("mqtt", () => {
  describe("sink", () => {
    it("publishes at QoS 1 with the JSON body as is and the headers as user properties", async () => {
      const prefix = `tide-test/${token()}`;
      const { packets, client } = await subscriber(`${prefix}/#`);
      const sink = mqttSink.create(await parse(mqttSink, { url: URL, topic_template: `${prefix}/{op}` }), context());
      await sink.connect();
      try {
        const exact = message(2, { op: "delete", payloadText: '{"total": 1.50, "big": 12345678901234567890}' });
        expect(await sink.publish([message(1), exact])).toEqual([]);
        await waitFor("2 messages", () => packets.length >= 2);
      } finally {
        await sink.close();
        await sink.close();
        await client.endAsync();
      }
      expect(packets.map((p) => [p.topic, p.qos, p.payload.toString()])).toEqual([
        [`${prefix}/insert`, 1, '{"order_id":1}'],
        [`${prefix}/delete`, 1, '{"total": 1.50, "big": 12345678901234567890}'],
      ]);
      expect(packets[0]!.properties?.userProperties).toMatchObject({
        tenant: "acme",
        attempt: "2",
        "tide-dedup-key": "orders:1",
        "tide-event-type": "order.created",
        "tide-outbox": "orders",
        "tide-message-id": "1",
      });
      expect(packets[0]!.properties?.contentType).toBe("application/json");
    });

    it("publishes with MQTT 3.1.1 too (no user properties there)", async () => {
      const topic = `tide-test/${token()}/v311`;
      const { packets, client } = await subscriber(topic);
      const sink = mqttSink.create(await parse(mqttSink, { url: URL, topic, protocol_version: "3.1.1" }), context());
      await sink.connect();
      try {
        expect(await sink.publish([message(1)])).toEqual([]);
        await waitFor("1 message", () => packets.length >= 1);
      } finally {
        await sink.close();
        await client.endAsync();
      }
      expect(packets[0]!.payload.toString()).toBe('{"order_id":1}');
    });

    it("refuses a value with '/', '+', '#' or a lead into '$' topics for good, naming it, and delivers the rest", async () => {
      const prefix = `tide-test/${token()}`;
      const { packets, client } = await subscriber(`${prefix}/#`);
      const sink = mqttSink.create(await parse(mqttSink, { url: URL, topic_template: `${prefix}/{payload.room}` }), context());
      const lead = mqttSink.create(await parse(mqttSink, { url: URL, topic_template: "{payload.room}/x" }), context());
      await sink.connect();
      await lead.connect();
      try {
        const failures = await sink.publish([
          message(1, { payload: { room: "kitchen" } }),
          message(2, { payload: { room: "kitchen/secret" } }),
          message(3, { payload: { room: "+" } }),
          message(4, { payload: { room: "hall" } }),
        ]);
        expect(failures.map((f) => [f.id, f.retriable])).toEqual([[2n, false], [3n, false]]);
        expect(failures[0]!.error.message).toContain(`{payload.room} is "kitchen/secret", whose "/" would add topic levels`);
        expect(failures[0]!.error.message).toContain("allow_slashes_in");
        expect(failures[1]!.error.message).toContain("wildcards");
        const led = await lead.publish([message(5, { payload: { room: "$SYS" } })]);
        expect(led.map((f) => [f.id, f.retriable])).toEqual([[5n, false]]);
        expect(led[0]!.error.message).toContain(`topics starting with "$"`);
        await waitFor("2 messages", () => packets.length >= 2);
      } finally {
        await sink.close();
        await lead.close();
        await client.endAsync();
      }
      expect(packets.map((p) => p.topic)).toEqual([`${prefix}/kitchen`, `${prefix}/hall`]);
    });

    it("throws while the connection is cut (nothing lost), and delivers again by itself once it is back", async () => {
      const topic = `tide-test/${token()}/outage`;
      const { packets, client } = await subscriber(topic);
      const proxy = await TcpProxy.start(MQTT.host, MQTT.port);
      const sink = mqttSink.create(await parse(mqttSink, { url: `mqtt://127.0.0.1:${proxy.port}`, topic }), context());
      try {
        await sink.connect();
        expect(await sink.publish([message(1)])).toEqual([]);
        await proxy.cut();
        await expect(sink.publish([message(2)])).rejects.toThrow(`mqtt://127.0.0.1:${proxy.port}`);
        await proxy.restore();
        expect(await waitFor("a publish after the connection is back", () => sink.publish([message(2)]).then((f) => f.length === 0, () => false)))
          .toBe(true);
        await waitFor("2 messages", () => packets.length >= 2);
      } finally {
        await sink.close();
        await proxy.stop();
        await client.endAsync();
      }
      // At least once, in order: a publish cut off may arrive again after the reconnect (same dedup key).
      const keys = packets.map((p) => p.properties?.userProperties?.["tide-dedup-key"]);
      expect([...new Set(keys)]).toEqual(["orders:1", "orders:2"]);
    });

    it("fails connect() naming an unreachable server", async () => {
      const sink = mqttSink.create(await parse(mqttSink, { url: "mqtt://127.0.0.1:1", topic: "x" }), context());
      await expect(sink.connect()).rejects.toThrow(/cannot connect to MQTT mqtt:\/\/127\.0\.0\.1:1: .*ECONNREFUSED/);
      await sink.close();
    });
  });

  describe("source", () => {
    async function openSource(config: Record<string, unknown>, overrides: Partial<PluginContext> = {}): Promise<SourceInstance> {
      const source = mqttSource.create(await parse(mqttSource, { url: URL, ...config }), context(overrides));
      await source.connect();
      return source;
    }

    let publisher: MqttClient;
    beforeAll(async () => {
      publisher = await mqtt.connectAsync(URL, { protocolVersion: 5, reconnectPeriod: 0 });
    });
    afterAll(async () => {
      await publisher?.endAsync();
    });

    it("hands out each message with its body as it came, user properties as headers and their event id", async () => {
      const prefix = `tide-test/${token()}`;
      const source = await openSource({ topic: `${prefix}/+`, client_id: `tide-test-${token()}`, session_expiry_s: 60 });
      try {
        await publisher.publishAsync(`${prefix}/a`, '{"amount": 1.50}', { qos: 1, properties: { userProperties: { event_id: "pay-1", tenant: "acme" } } });
        await publisher.publishAsync(`${prefix}/b`, "not json", { qos: 1 });
        await publisher.publishAsync(`${prefix}/c`, JSON.stringify({ specversion: "1.0", id: "ce-3", type: "t", source: "/s" }), { qos: 1 });
        const got = [];
        while (got.length < 3) {
          const batch = (await source.read())!;
          got.push(...batch.messages);
          await batch.ack();
        }
        expect(got.map((m) => m.payloadText)).toEqual(['{"amount": 1.50}', '"not json"', JSON.stringify({ specversion: "1.0", id: "ce-3", type: "t", source: "/s" })]);
        expect(got.map((m) => m.eventId)).toEqual(["pay-1", undefined, "ce-3"]);
        expect(got.map((m) => m.source)).toEqual([`mqtt:${prefix}/a`, `mqtt:${prefix}/b`, `mqtt:${prefix}/c`]);
        expect(got[0]!.headers).toEqual({ event_id: "pay-1", tenant: "acme" });
        expect(got[1]!.transportId).toMatch(/^mqtt:[0-9a-f]{8}-\d+$/);
      } finally {
        await source.close();
        await source.close();
      }
    });

    it("keeps its session: what is published while it is away, or left unacknowledged, comes after it reconnects", async () => {
      const prefix = `tide-test/${token()}`;
      const config = { topic: `${prefix}/#`, client_id: `tide-test-${token()}`, session_expiry_s: 60 };
      const first = await openSource(config);
      await publisher.publishAsync(`${prefix}/x`, '"one"', { qos: 1 });
      try {
        const batch = (await first.read())!;
        expect(batch.messages.map((m) => m.payloadText)).toEqual(['"one"']);
        await batch.nack!(new Error("inbox write failed"));
        const again = (await first.read())!;
        expect(again.messages.map((m) => m.payloadText)).toEqual(['"one"']);
        // Not acknowledged before the source goes away: the broker keeps it in the session.
      } finally {
        await first.close();
      }
      await publisher.publishAsync(`${prefix}/x`, '"two"', { qos: 1 });
      const second = await openSource(config);
      try {
        const got: string[] = [];
        while (got.length < 2) {
          const batch = (await second.read())!;
          got.push(...batch.messages.map((m) => m.payloadText!));
          await batch.ack();
        }
        expect(got).toEqual(['"one"', '"two"']);
      } finally {
        await second.close();
      }
      // Everything was acknowledged: a third connection of the session finds nothing.
      const stop = new AbortController();
      const third = await openSource(config, { signal: stop.signal });
      try {
        const reading = third.read();
        await publisher.publishAsync(`${prefix}/x`, '"three"', { qos: 1 });
        const batch = (await reading)!;
        expect(batch.messages.map((m) => m.payloadText)).toEqual(['"three"']);
        await batch.ack();
        const idle = third.read();
        stop.abort();
        expect(await idle).toBeNull();
      } finally {
        await third.close();
      }
    });

    it("fails the ack of a message whose connection was cut, and gets the message again once it is back", async () => {
      const topic = `tide-test/${token()}/cut`;
      const proxy = await TcpProxy.start(MQTT.host, MQTT.port);
      const source = await openSource({ url: `mqtt://127.0.0.1:${proxy.port}`, topic, client_id: `tide-test-${token()}`, session_expiry_s: 60 });
      try {
        await publisher.publishAsync(topic, '"before the cut"', { qos: 1 });
        const batch = (await source.read())!;
        await proxy.cut();
        await waitFor("the source to notice the cut", async () => !(await source.health!()).ok);
        await expect(batch.ack()).rejects.toThrow("sends the message again");
        await publisher.publishAsync(topic, '"during the cut"', { qos: 1 });
        await proxy.restore();
        const seen: string[] = [];
        await waitFor("both messages after the connection is back", async () => {
          const next = await source.read().catch(() => null);
          if (next) {
            seen.push(...next.messages.map((m) => m.payloadText!));
            await next.ack();
          }
          return seen.includes('"before the cut"') && seen.includes('"during the cut"');
        });
      } finally {
        await source.close();
        await proxy.stop();
      }
    });
  });

  describe.skipIf(!mosquitto)("logins", () => {
    let broker: { url: string; stop(): Promise<void> };
    beforeAll(async () => {
      broker = await startMosquitto(async (dir) => {
        const passwords = join(dir, "passwords");
        const made = Bun.spawnSync(["mosquitto_passwd", "-b", "-c", passwords, "tide", "right-password"]);
        if (made.exitCode !== 0) throw new Error(`mosquitto_passwd failed: ${made.stderr}`);
        return `allow_anonymous false\npassword_file ${passwords}`;
      });
    });
    afterAll(async () => {
      await broker?.stop();
    });

    it("names the server and the refused username on a bad login, on one line and without the password", async () => {
      const secret = `wrong-${token()}`;
      for (const protocol_version of ["5", "3.1.1"]) {
        const sink = mqttSink.create(await parse(mqttSink, { url: broker.url, username: "tide", password: secret, topic: "x", protocol_version }), context());
        const error = await sink.connect().then(() => undefined, (e: Error) => e);
        await sink.close();
        expect(error?.message).toBe(
          `mqtt sink "mqtt-test": cannot connect to MQTT ${broker.url}: the server refused 'username' "tide" with its 'password' ` +
            "(Connection refused: Not authorized)",
        );
      }
      const anonymous = mqttSource.create(await parse(mqttSource, { url: broker.url, topic: "x" }), context());
      const error = await anonymous.connect().then(() => undefined, (e: Error) => e);
      await anonymous.close();
      expect(error?.message).toContain("the server requires credentials: set 'username' and 'password'");
      const inUrl = mqttSink.create(await parse(mqttSink, { url: broker.url.replace("//", `//tide:${secret}@`), topic: "x" }), context());
      const urlError = await inUrl.connect().then(() => undefined, (e: Error) => e);
      await inUrl.close();
      expect(urlError?.message).toContain("the server refused the credentials in 'url'");
      expect(urlError?.message).not.toContain(secret);
    });

    it("connects with the right password", async () => {
      const sink = mqttSink.create(await parse(mqttSink, { url: broker.url, username: "tide", password: "right-password", topic: "x" }), context());
      await sink.connect();
      try {
        expect(await sink.publish([message(1)])).toEqual([]);
      } finally {
        await sink.close();
      }
    });
  });
});

describe("mqtt configs", () => {
  async function problems(definition: PluginDefinition, input: unknown): Promise<string[]> {
    const result = await definition.config["~standard"].validate(input);
    return (result.issues ?? []).map((i) => `${(i.path ?? []).map((p) => (typeof p === "object" ? p.key : p)).join(".")}: ${i.message}`);
  }

  it("accepts the examples and the usual shapes", async () => {
    expect(await problems(mqttSink, mqttSink.example)).toEqual([]);
    expect(await problems(mqttSource, mqttSource.example)).toEqual([]);
    expect(await problems(mqttSink, { url: "mqtts://broker.example.com:8883", topic: "a/b", qos: 2, retain: true, tls: { ca: "PEM" } })).toEqual([]);
    expect(await problems(mqttSource, { url: URL, topics: ["a/#", "$share/relays/b/+"], protocol_version: "3.1.1" })).toEqual([]);
  });

  it("rejects invalid configs, naming the key", async () => {
    expect(await problems(mqttSink, { topic: "x" })).toEqual([expect.stringMatching(/^url: /)]);
    expect(await problems(mqttSink, { url: "amqp://h", topic: "x" })).toEqual([expect.stringMatching(/^url: must start with mqtt/)]);
    expect(await problems(mqttSink, { url: URL })).toEqual([expect.stringMatching(/^topic: required/)]);
    expect(await problems(mqttSink, { url: URL, topic: "a/+" })).toEqual([expect.stringMatching(/^topic: is not an MQTT topic name: .*wildcards/)]);
    expect(await problems(mqttSink, { url: URL, topic: "a/{op}" })).toEqual([expect.stringMatching(/^topic: has a placeholder/)]);
    expect(await problems(mqttSink, { url: URL, topic: "x", qos: 0 })).toEqual([expect.stringMatching(/^qos: must be 1 or 2/)]);
    expect(await problems(mqttSink, { url: URL, topic: "x", allow_slashes_in: ["op"] })).toEqual([expect.stringMatching(/^allow_slashes_in: /)]);
    expect(await problems(mqttSink, { url: URL, topic: "x", protocol_version: "4" })).toEqual([expect.stringMatching(/^protocol_version: /)]);
    expect(await problems(mqttSink, { url: URL, topic: "x", password: "p" })).toEqual([expect.stringMatching(/^password: needs/)]);
    expect(await problems(mqttSink, { url: URL, topic: "x", tls: {} })).toEqual([expect.stringMatching(/^tls: needs an mqtts/)]);
    expect(await problems(mqttSource, { url: URL, topic: "a/b#" })).toEqual([expect.stringMatching(/^topic: must be an MQTT topic filter/)]);
    expect(await problems(mqttSource, { url: URL, topic: "a", topics: ["b"] })).toEqual([expect.stringMatching(/^topics: /)]);
  });

  it("create() does no I/O and reports an unknown placeholder as a config error", async () => {
    const sink = mqttSink.create(await parse(mqttSink, { url: "mqtt://127.0.0.1:1", topic: "x" }), context());
    await sink.close();
    const source = mqttSource.create(await parse(mqttSource, { url: "mqtt://127.0.0.1:1", topic: "x" }), context());
    await source.close();
    const templated = await parse(mqttSink, { url: URL, topic_template: "a/{nope}" });
    expect(() => mqttSink.create(templated, context())).toThrow(/nope/);
  });
});
