// The compiled linux-x64 binary, used as a user would: install the schema, run with a manifest that
// loads drop-in plugins from disk (a .ts and a .js file) and declares pipelines, publish, and see
// the messages arrive; SIGTERM ends it with exit code 0.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { copyFile, mkdtemp, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { collectLines, readJsonl, waitFor } from "../support/relay.ts";
import { requireService } from "../support/services.ts";
import { connect } from "@nats-io/transport-node";

const ROOT = join(import.meta.dir, "..", "..");
const BINARY = join(ROOT, "dist", "pg-tide-linux-x64");
const ON_LINUX_X64 = process.platform === "linux" && process.arch === "x64";

let db: TestDatabase;
let dir: string;

beforeAll(async () => {
  if (!ON_LINUX_X64) return;
  const build = Bun.spawnSync(["bash", "compile.sh", "linux-x64"], { cwd: ROOT });
  if (build.exitCode !== 0) throw new Error(`compile.sh failed: ${build.stderr}`);
  db = await createTestDatabase({ install: false });
  dir = await mkdtemp(join(tmpdir(), "tide-e2e-"));
}, 120_000);
afterAll(async () => {
  await db?.drop();
});

describe.skipIf(!ON_LINUX_X64)("the compiled binary", () => {
  it("installs the schema", () => {
    const result = Bun.spawnSync([BINARY, "install", "--postgres-url", db.url]);
    expect(result.stdout.toString()).toContain("tide schema installed");
    expect(result.exitCode).toBe(0);
  });

  it("runs a manifest with drop-in plugins and delivers through them", async () => {
    const auditLog = join(dir, "audit.log");
    const shoutLog = join(dir, "shout.jsonl");
    const manifest = join(dir, "pg-tide.toml");
    await writeFile(manifest, `
[relay]
postgres_url = "\${env:E2E_DATABASE_URL}"
metrics_addr = "127.0.0.1:0"
poll_interval_ms = 50

[plugins]
audit = "${join(ROOT, "docs", "examples", "audit_sink.ts")}"
shout = "${join(ROOT, "tests", "fixtures", "plugins", "shout_sink.js")}"

[[pipelines]]
name = "orders-audit"
outbox = "orders"
sink_type = "audit"
[pipelines.config]
path = "${auditLog}"
prefix = "audit:"

[[pipelines]]
name = "orders-shout"
outbox = "orders"
sink_type = "shout"
[pipelines.config]
path = "${shoutLog}"
`);
    await db.sql`SELECT tide.outbox_create('orders')`;
    const check = Bun.spawnSync([BINARY, "check", "--config", manifest], { env: { ...process.env, E2E_DATABASE_URL: db.url } });
    expect(check.stdout.toString()).toContain("2 of 2 pipeline configs are valid");

    const relay = Bun.spawn([BINARY, "run", "--config", manifest], {
      env: { ...process.env, E2E_DATABASE_URL: db.url },
      stdout: "pipe",
      stderr: "pipe",
    });
    try {
      await waitFor("the manifest's pipelines in the catalog", async () =>
        (await db.sql`SELECT count(*)::int AS n FROM tide.relay_pipelines`)[0].n === 2);
      for (let i = 1; i <= 5; i++) {
        await db.sql`SELECT tide.outbox_publish('orders', ${db.sql.json({ order: i, item: "widget" })},
                                                '{"event_type": "order.created"}'::jsonb)`;
      }
      const shouted = await waitFor("five shouted lines", async () => {
        const lines = await readJsonl(shoutLog);
        return lines.length === 5 && lines;
      });
      expect(shouted[0].shout).toContain('"ITEM":"WIDGET"');
      const audit = await waitFor("five audit lines", async () => {
        const text = await Bun.file(auditLog).text().catch(() => "");
        const lines = text.split("\n").filter(Boolean);
        return lines.length === 5 && lines;
      });
      expect(audit[0]).toMatch(/^audit:orders:\d+ order\.created \{"item": "widget", "order": 1\}$/);
    } finally {
      relay.kill("SIGTERM");
    }
    expect(await relay.exited).toBe(0);
  }, 60_000);

  it("delivers to a real NATS server, with the broker plugins compiled in", async () => {
    if (!(await requireService("nats", "127.0.0.1", 4222))) return;
    const subject = `tide.e2e.${Math.random().toString(36).slice(2, 10)}`;
    const nc = await connect({ servers: "nats://127.0.0.1:4222" });
    const received: unknown[] = [];
    const subscription = nc.subscribe(subject, { callback: (_error, msg) => void received.push(msg.json()) });
    await nc.flush();
    const manifest = join(dir, "nats.toml");
    await writeFile(manifest, `
[[pipelines]]
name = "orders-to-nats"
outbox = "nats_orders"
sink_type = "nats"
[pipelines.config]
url = "nats://127.0.0.1:4222"
subject = "${subject}"
`);
    await db.sql`SELECT tide.outbox_create('nats_orders')`;
    const relay = Bun.spawn([BINARY, "run", "--config", manifest, "--postgres-url", db.url, "--metrics-addr", "127.0.0.1:0",
      "--poll-interval-ms", "50", "--relay-group-id", "nats-e2e"], { stdout: "pipe", stderr: "pipe" });
    try {
      await waitFor("the pipeline in the catalog", async () =>
        (await db.sql`SELECT 1 FROM tide.relay_pipelines WHERE name = 'orders-to-nats'`).length === 1);
      for (let i = 1; i <= 3; i++) await db.sql`SELECT tide.outbox_publish('nats_orders', ${db.sql.json({ order: i })})`;
      await waitFor("three messages on NATS", () => received.length === 3);
      expect(received).toEqual([{ order: 1 }, { order: 2 }, { order: 3 }]);
    } finally {
      relay.kill("SIGTERM");
      subscription.unsubscribe();
      await nc.close();
    }
    expect(await relay.exited).toBe(0);
  }, 60_000);

  it("loads a drop-in that sits alone in a folder with no node_modules, taking zod from the binary", async () => {
    const alone = await mkdtemp(join(tmpdir(), "tide-kit-"));
    await copyFile(join(ROOT, "tests", "fixtures", "plugins", "kit_sink.js"), join(alone, "kit_sink.js"));
    const out = join(alone, "out.jsonl");
    const manifest = join(alone, "pg-tide.toml");
    await writeFile(manifest, `
[relay]
postgres_url = "\${env:E2E_DATABASE_URL}"
metrics_addr = "127.0.0.1:0"

[plugins]
kit = "kit_sink.js"

[[pipelines]]
name = "kit-good"
outbox = "kit_orders"
sink_type = "kitsink"
[pipelines.config]
path = "${out}"

[[pipelines]]
name = "kit-bad"
outbox = "kit_orders"
sink_type = "kitsink"
[pipelines.config]
file = "${out}"
`);
    const env = { ...process.env, E2E_DATABASE_URL: db.url };
    await db.sql`SELECT tide.outbox_create('kit_orders')`;
    const listed = Bun.spawnSync([BINARY, "plugins", "--output", "json", "--config", manifest], { cwd: alone, env });
    expect(listed.exitCode).toBe(0);
    expect(JSON.parse(listed.stdout.toString()).map((p: { type: string }) => p.type)).toContain("kitsink");
    // The kit's zod validates the config: the good pipeline passes, the bad one is named with its key.
    const check = Bun.spawnSync([BINARY, "check", "--config", manifest], { cwd: alone, env });
    const checked = `${check.stdout}${check.stderr}`;
    expect(checked).toContain(`pipeline "kit-bad": kitsink sink config is invalid: 'path'`);
    expect(checked).toContain('Unrecognized key: "file"');
    expect(checked).not.toContain('pipeline "kit-good"');

    const relay = Bun.spawn([BINARY, "run", "--config", manifest], { cwd: alone, env, stdout: "pipe", stderr: "pipe" });
    const log = collectLines(relay.stderr);
    try {
      await waitFor("the plugin's load logged", () =>
        log.lines.some((l) => l.includes("loaded plugin") && l.includes("kitsink") && l.includes("1.2.3") && l.includes("kit_sink.js")));
    } finally {
      relay.kill("SIGTERM");
    }
    await relay.exited;
  }, 60_000);

  it("lists drop-in plugins next to the built-in ones", () => {
    const result = Bun.spawnSync([BINARY, "plugins", "--output", "json", "--config", join(ROOT, "tests", "fixtures", "manifests", "plugins-only.toml")]);
    const types = JSON.parse(result.stdout.toString()).map((p: { kind: string; type: string }) => `${p.kind}:${p.type}`);
    expect(types).toContain("sink:shout");
    expect(types).toContain("sink:webhook");
  });
});
