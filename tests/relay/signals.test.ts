// Stopping the relay as supervisors do: SIGTERM through the npm bin shim reaches the relay, and
// SIGTERM or SIGINT in the middle of a delivery finishes and acknowledges it, unless it outlasts
// --drain-timeout, in which case it stays pending for the next relay. A stop after the database
// stopped answering does not wait on the connections it left hanging.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { collectLines, heldWebhook, spawnRelay, waitFor } from "../support/relay.ts";
import { TcpProxy } from "../support/tcp_proxy.ts";

const ROOT = join(import.meta.dir, "..", "..");
const NODE = Bun.which("node") ?? "node";
let db: TestDatabase;
let dir: string;

beforeAll(async () => {
  db = await createTestDatabase();
  dir = await mkdtemp(join(tmpdir(), "tide-signals-"));
});
afterAll(() => db.drop());

async function lagOf(group: string, relayGroup: string): Promise<bigint | undefined> {
  const [row] = await db.sql`SELECT lag FROM tide.consumer_lag WHERE group_name = ${group} AND relay_group_id = ${relayGroup}`;
  return row?.lag;
}

/** A pipeline to `url` with one message published; returns the message's dedup key. */
async function pipelineWithOneMessage(name: string, url: string): Promise<string> {
  await db.sql`SELECT tide.outbox_create(${name})`;
  await db.sql`SELECT tide.relay_set_outbox(${name}, ${name}, 'webhook', ${db.sql.json({ url })})`;
  const [{ id }] = await db.sql`SELECT tide.outbox_publish(${name}, '{"order_id": 1}'::jsonb) AS id`;
  return `${name}:${id}`;
}

/** True while a process with this id exists. */
function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

async function ownerOf(pipeline: string, relayGroup: string): Promise<string | null | undefined> {
  const [row] = await db.sql`SELECT owner_id FROM tide.relay_pipeline_state WHERE pipeline = ${pipeline} AND relay_group_id = ${relayGroup}`;
  return row?.owner_id;
}

describe("the npm bin shim (bin/pg-tide.js)", () => {
  it("passes the command's exit code through", async () => {
    const shim = Bun.spawn([NODE, "bin/pg-tide.js", "frobnicate"], { cwd: ROOT, stdout: "pipe", stderr: "pipe" });
    expect(await shim.exited).toBe(2);
    expect(await new Response(shim.stderr).text()).toContain('unknown command "frobnicate"');
  });

  it("forwards SIGTERM to the relay, which drains, and exits 0 once the relay is gone", async () => {
    await db.sql`SELECT tide.outbox_create('shim')`;
    await db.sql`SELECT tide.relay_set_outbox('shim', 'shim', 'file', ${db.sql.json({ path: join(dir, "shim.jsonl") })})`;
    const shim = Bun.spawn(
      [NODE, "bin/pg-tide.js", "run", "--postgres-url", db.url, "--relay-group-id", "shim", "--metrics-addr", "127.0.0.1:0"],
      { cwd: ROOT, stdout: "pipe", stderr: "pipe" },
    );
    const owner = await waitFor("the relay to own the pipeline", () => ownerOf("shim", "shim"));
    const relayPid = Number(owner.split(":").pop());
    expect(relayPid).not.toBe(shim.pid); // the relay is the shim's child process
    try {
      shim.kill("SIGTERM");
      expect(await shim.exited).toBe(0);
      expect(alive(relayPid)).toBe(false);
      expect(await ownerOf("shim", "shim")).toBeNull(); // released on the way out, not left to expire
    } finally {
      if (alive(relayPid)) process.kill(relayPid, "SIGKILL");
    }
  }, 60_000);
});

describe("stopping the relay in the middle of a delivery", () => {
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    it(`finishes and acknowledges the batch in flight on ${signal}, then exits 0`, async () => {
      const name = `drain-${signal.toLowerCase()}`;
      const hook = heldWebhook();
      try {
        const key = await pipelineWithOneMessage(name, hook.url);
        const relay = spawnRelay(db.url, ["--relay-group-id", name, "--log-format", "json"]);
        const logs = collectLines(relay.stderr);
        await hook.arrived;
        relay.kill(signal);
        await waitFor("the relay to start draining", () =>
          logs.lines.some((line) => JSON.parse(line).message === `${signal}: draining in-flight batches`));
        expect(relay.exitCode).toBeNull(); // still waiting for the webhook's answer
        expect(await lagOf(name, name)).toBe(1n);
        hook.release();
        expect(await relay.exited).toBe(0);
        expect(await lagOf(name, name)).toBe(0n);
        expect(hook.keys).toEqual([key]);
      } finally {
        hook.stop();
      }
    }, 60_000);
  }

  it("gives up on a delivery that outlasts --drain-timeout, leaving it to the next relay", async () => {
    const name = "drain-timeout";
    const hook = heldWebhook();
    try {
      const key = await pipelineWithOneMessage(name, hook.url);
      const first = spawnRelay(db.url, ["--relay-group-id", name, "--drain-timeout", "1", "--log-format", "json"]);
      const logs = collectLines(first.stderr);
      await hook.arrived;
      first.kill("SIGTERM");
      expect(await first.exited).toBe(0); // as documented: a timed-out drain still exits 0
      await logs.done;
      const messages: string[] = logs.lines.map((line) => JSON.parse(line).message);
      expect(messages.filter((message) => message.startsWith("drain timeout reached"))).toHaveLength(1);
      expect(await lagOf(name, name)).toBe(1n); // not acknowledged: still pending

      hook.release();
      const second = spawnRelay(db.url, ["--relay-group-id", name]);
      try {
        await waitFor("the next relay to deliver it", async () => (await lagOf(name, name)) === 0n);
      } finally {
        second.kill("SIGTERM");
        await second.exited;
      }
      expect(hook.keys).toEqual([key, key]); // the same message, with the same dedup key
    } finally {
      hook.stop();
    }
  }, 60_000);

  it("does not hang on a sink that ignores the abort: its batch is left for the next relay", async () => {
    const name = "stuck";
    const marker = join(dir, "stuck.log");
    const manifest = join(dir, "stuck.toml");
    await Bun.write(manifest, [
      "[plugins]",
      `stuck = ${JSON.stringify(join(ROOT, "tests/fixtures/plugins/stuck_sink.js"))}`,
      "[[pipelines]]",
      `name = "${name}"`,
      `outbox = "${name}"`,
      `sink_type = "stuck"`,
      `config = { marker = ${JSON.stringify(marker)} }`,
      "",
    ].join("\n"));
    await db.sql`SELECT tide.outbox_create(${name})`;
    await db.sql`SELECT tide.outbox_publish(${name}, '{"order_id": 1}'::jsonb)`;
    const relay = spawnRelay(db.url, ["--config", manifest, "--relay-group-id", name, "--drain-timeout", "1", "--log-format", "json"]);
    const logs = collectLines(relay.stderr);
    await waitFor("the delivery to be in flight", async () => (await Bun.file(marker).exists()));
    relay.kill("SIGTERM");
    expect(await relay.exited).toBe(0);
    await logs.done;
    const messages: string[] = logs.lines.map((line) => JSON.parse(line).message);
    expect(messages).toContain("the sink did not stop when aborted; its batch is left unacknowledged");
    expect(await lagOf(name, name)).toBe(1n);
  }, 60_000);

  it("stops without waiting on connections the database left hanging", async () => {
    const name = "db-gone";
    await db.sql`SELECT tide.outbox_create(${name})`;
    await db.sql`SELECT tide.relay_set_outbox(${name}, ${name}, 'stdout', '{}'::jsonb)`;
    const target = new URL(db.url);
    const proxy = await TcpProxy.start(target.hostname, Number(target.port || 5432));
    try {
      const through = new URL(db.url);
      through.port = String(proxy.port);
      const relay = spawnRelay(through.toString(), ["--relay-group-id", name, "--log-format", "json"]);
      try {
        const logs = collectLines(relay.stderr);
        const messages = () => logs.lines.map((line) => JSON.parse(line).message as string);
        await waitFor("the relay to start and own the pipeline", () => messages().includes("relay started") && messages().includes("pipeline started"));
        // The server stops answering: the relay's queries hang until it notices and fences its pipelines.
        proxy.freeze();
        await waitFor("the relay to notice", () => messages().some((m) => m.startsWith("lost pipeline ownership")));
        relay.kill("SIGTERM");
        expect(await relay.exited).toBe(0);
        await logs.done;
        expect(messages()).toContain("relay stopped");
        // It said it did not wait for the hanging connections (before: it waited out postgres.js's end timeout).
        expect(messages().filter((m) => m.startsWith("database connections did not close"))).toHaveLength(1);
      } finally {
        relay.kill("SIGKILL");
      }
    } finally {
      await proxy.stop();
    }
  }, 60_000);
});
