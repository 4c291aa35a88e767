// The nats sink and source against private nats-servers that control access: publish permissions
// (a refused publish is a failed message, never a silent loss) and authentication (token,
// user/password), with errors that name the problem and never the secret.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { jetstreamManager, type JetStreamManager } from "@nats-io/jetstream";
import type { OutboxMessage, PluginContext } from "../../core/plugin.ts";
import { natsSink, natsSource } from "../../plugins/nats/index.ts";
import { type PrivateNatsServer, requireNatsServerBinary, startNatsServer } from "../support/brokers.ts";
import { collectNats, parseConfig, pluginContext } from "../support/plugins.ts";

const context = (overrides: Partial<PluginContext> = {}) => pluginContext("nats-access", overrides);
const parse = parseConfig;

const available = requireNatsServerBinary();

function message(id: number, subject: string): OutboxMessage {
  return {
    id: BigInt(id),
    outbox: "orders",
    topic: null,
    payload: { subject },
    payloadText: JSON.stringify({ subject }),
    headers: {},
    dedupKey: `orders:${id}`,
    eventType: "order.created",
    op: "insert",
    createdAt: new Date(),
  };
}

describe.skipIf(!available)("nats sink on a server that denies publishing to secret.>", () => {
  const PERMISSIONS = `authorization {
    users = [
      { user: admin, password: admin-pass }
      { user: app, password: app-pass, permissions: { publish: { allow: ">", deny: "secret.>" } } }
    ]
  }`;
  let server: PrivateNatsServer;
  let admin: NatsConnection;
  let jsm: JetStreamManager;
  const app = () => ({ url: server.url, user: "app", password: "app-pass" });

  beforeAll(async () => {
    server = await startNatsServer(PERMISSIONS, { jetstream: true });
    admin = await connect({ servers: server.url, user: "admin", pass: "admin-pass" });
    jsm = await jetstreamManager(admin);
  });
  afterAll(async () => {
    await admin?.close();
    await server?.stop();
  });

  it("reports a core publish the server refused as a retriable failure naming the subject, and what follows it", async () => {
    const received = collectNats(admin, "open.>", 2);
    await admin.flush();
    const sink = natsSink.create(await parse(natsSink, { ...app(), subject_template: "{payload.subject}", allow_dots_in: ["payload.subject"] }), context());
    await sink.connect();
    try {
      const failures = await sink.publish([message(1, "open.a"), message(2, "secret.a"), message(3, "open.b")]);
      expect(failures.map((f) => [f.id, f.retriable])).toEqual([[2n, true], [3n, true]]);
      expect(failures[0]!.error.message).toContain(`publish to "secret.a" was refused: the NATS user has no permission`);
      expect(failures[1]!.error.message).toContain("message 2 before it failed");
      // A later batch without the denied subject goes through: nothing of the earlier denial lingers.
      expect(await sink.publish([message(4, "open.c")])).toEqual([]);
    } finally {
      await sink.close();
    }
    expect((await received).map((m) => m.subject)).toEqual(["open.a", "open.b"]);
  });

  it("reports a JetStream publish the server refused as a retriable failure, and the stream stores nothing", async () => {
    await jsm.streams.add({ name: "SECRETS", subjects: ["secret.js.>"] });
    const sink = natsSink.create(await parse(natsSink, { ...app(), subject: "secret.js.orders", mode: "jetstream", timeout_ms: 2_000 }), context());
    await sink.connect();
    try {
      const failures = await sink.publish([message(1, "secret.js.orders")]);
      expect(failures.map((f) => [f.id, f.retriable])).toEqual([[1n, true]]);
      expect(failures[0]!.error.message).toContain(`publish to "secret.js.orders" was refused: the NATS user has no permission`);
    } finally {
      await sink.close();
    }
    expect((await jsm.streams.info("SECRETS")).state.messages).toBe(0);
  });
});

describe.skipIf(!available)("nats connectors on a server that requires authentication", () => {
  const TOKEN = "s3cret-token-9f2c";
  const PASSWORD = "s3cret-pass-41d7";
  let tokenServer: PrivateNatsServer;
  let userServer: PrivateNatsServer;

  beforeAll(async () => {
    [tokenServer, userServer] = await Promise.all([
      startNatsServer(`authorization { token: "${TOKEN}" }`),
      startNatsServer(`authorization { users = [ { user: relay, password: "${PASSWORD}" } ] }`),
    ]);
  });
  afterAll(async () => {
    await Promise.all([tokenServer?.stop(), userServer?.stop()]);
  });

  /** Publishes one message through a sink with `auth`; resolves with what a subscriber on the server got. */
  async function roundTrip(server: PrivateNatsServer, auth: Record<string, string>, subscriber: NatsConnection): Promise<string[]> {
    const subject = `auth.${Math.random().toString(36).slice(2, 10)}`;
    const received = collectNats(subscriber, subject, 1);
    await subscriber.flush();
    const sink = natsSink.create(await parse(natsSink, { url: server.url, subject, ...auth }), context());
    await sink.connect();
    try {
      expect(await sink.publish([message(1, subject)])).toEqual([]);
    } finally {
      await sink.close();
    }
    return (await received).map((m) => m.subject);
  }

  /** The error of connect() with `auth`; the sink must not be usable. */
  async function connectError(server: PrivateNatsServer, auth: Record<string, string>): Promise<Error> {
    const sink = natsSink.create(await parse(natsSink, { url: server.url, subject: "auth.x", ...auth }), context());
    try {
      return await sink.connect().then(() => { throw new Error("connect() succeeded with wrong credentials"); }, (error: Error) => error);
    } finally {
      await sink.close();
    }
  }

  it("connects with the right token, and names an authorization failure without the token", async () => {
    const subscriber = await connect({ servers: tokenServer.url, token: TOKEN });
    try {
      expect(await roundTrip(tokenServer, { token: TOKEN }, subscriber)).toHaveLength(1);
    } finally {
      await subscriber.close();
    }
    const wrong = await connectError(tokenServer, { token: "wrong-token-value" });
    expect(wrong.message).toContain(`cannot connect to NATS ${tokenServer.url}: Authorization Violation; the server refused the 'token'`);
    expect(wrong.message).not.toContain("wrong-token-value");
    expect(wrong.message).not.toContain(TOKEN);
    const none = await connectError(tokenServer, {});
    expect(none.message).toContain("Authorization Violation; the server requires credentials: set 'token'");
  });

  it("connects with the right user and password, and names an authorization failure without the password", async () => {
    const subscriber = await connect({ servers: userServer.url, user: "relay", pass: PASSWORD });
    try {
      expect(await roundTrip(userServer, { user: "relay", password: PASSWORD }, subscriber)).toHaveLength(1);
    } finally {
      await subscriber.close();
    }
    const error = await connectError(userServer, { user: "relay", password: "wrong-pass-value" });
    expect(error.message).toContain(`Authorization Violation; the server refused 'user' "relay" with its 'password'`);
    expect(error.message).not.toContain("wrong-pass-value");
    expect(error.message).not.toContain(PASSWORD);
    // Credentials in the URL are hidden as well.
    const inUrl = natsSink.create(
      await parse(natsSink, { url: userServer.url.replace("//", "//relay:wrong-pass-value@"), subject: "auth.x" }),
      context(),
    );
    const urlError = await inUrl.connect().then(() => undefined, (e: Error) => e);
    await inUrl.close();
    expect(urlError?.message).toContain("the server refused the credentials in 'url'");
    expect(urlError?.message).not.toContain("wrong-pass-value");
  });

  it("reads with a source that has the right credentials, and fails its connect with wrong ones", async () => {
    const subject = "auth.source";
    const source = natsSource.create(await parse(natsSource, { url: userServer.url, subject, user: "relay", password: PASSWORD }), context());
    await source.connect();
    const publisher = await connect({ servers: userServer.url, user: "relay", pass: PASSWORD });
    try {
      publisher.publish(subject, JSON.stringify({ n: 1 }));
      await publisher.flush();
      expect((await source.read())!.messages.map((m) => JSON.parse(m.payloadText!))).toEqual([{ n: 1 }]);
    } finally {
      await publisher.close();
      await source.close();
    }
    const wrong = natsSource.create(await parse(natsSource, { url: userServer.url, subject, user: "relay", password: "wrong-pass-value" }), context());
    const error = await wrong.connect().then(() => undefined, (e: Error) => e);
    await wrong.close();
    expect(error?.message).toMatch(/nats source .*authorization violation/i);
    expect(error?.message).not.toContain("wrong-pass-value");
  });
});
