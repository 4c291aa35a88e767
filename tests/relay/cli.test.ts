// The command line as a user meets it: help everywhere, check against the catalog, manifests that
// declare pipelines (or are told to leave the catalog alone), and clear errors for bad flags.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { mkdtemp, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createTestDatabase, freePort, type TestDatabase } from "../support/postgres.ts";
import { collectLines, heldWebhook, spawnRelay, waitFor } from "../support/relay.ts";

const ROOT = join(import.meta.dir, "..", "..");
let db: TestDatabase;
let dir: string;
beforeAll(async () => {
  db = await createTestDatabase();
  dir = await mkdtemp(join(tmpdir(), "tide-cli-"));
});
afterAll(() => db.drop());

async function pgTide(...args: string[]) {
  return await pgTideWithEnv({}, ...args);
}

/** Runs pg-tide with these PG_TIDE_* variables and no others. */
async function pgTideWithEnv(env: Record<string, string>, ...args: string[]) {
  const child = Bun.spawn([process.execPath, "main.ts", ...args], { cwd: ROOT, env: tideEnv(env), stdout: "pipe", stderr: "pipe" });
  const [stdout, stderr, code] = await Promise.all([new Response(child.stdout).text(), new Response(child.stderr).text(), child.exited]);
  return { stdout, stderr, code };
}

function tideEnv(env: Record<string, string>): Record<string, string | undefined> {
  const inherited = Object.fromEntries(Object.entries(process.env).filter(([name]) => !name.startsWith("PG_TIDE_")));
  return { ...inherited, ...env };
}

describe("pg-tide", () => {
  it("explains every command with --help", async () => {
    const main = await pgTide("--help");
    for (const command of ["run", "dev", "install", "check", "plugins", "status", "version"]) {
      expect(main.stdout).toContain(`  ${command}`);
      const help = await pgTide(command, "--help");
      expect(help.code).toBe(0);
      expect(help.stdout).toContain("Usage: ");
    }
  }, 60_000);

  it("explains the HTTP token in run --help: what it guards, how to send it, and the probes' scope", async () => {
    const help = (await pgTide("run", "--help")).stdout;
    expect(help).toMatch(/--http-token TOKEN +protect the HTTP server with this token: .*401 .*Authorization: Bearer TOKEN.*\(env PG_TIDE_HTTP_TOKEN\)/);
    expect(help).toContain("signed webhook sources are checked by their signature instead");
    expect(help).toMatch(/--http-token-scope api\|all +api: \/livez, \/readyz, \/health and \/metrics stay open.*all: they ask for the token too/);
    expect(help).toMatch(/--metrics-addr HOST:PORT .*0\.0\.0\.0 listens on every interface.*default 0\.0\.0\.0:9090/);
  });

  it("names an unknown command, an unknown flag and a bad value", async () => {
    const unknown = await pgTide("frobnicate");
    expect([unknown.code, unknown.stderr]).toEqual([2, expect.stringContaining('unknown command "frobnicate"')]);
    const flag = await pgTide("run", "--postgres-url", db.url, "--bogus");
    expect(flag.code).toBe(2);
    expect(flag.stderr).toContain("--bogus");
    const value = await pgTide("run", "--postgres-url", db.url, "--log-format", "xml");
    expect(value.stderr).toContain('--log-format must be "text" or "json" (got "xml")');
  });

  it("check finds a bad pipeline config in the catalog without connecting to its sink", async () => {
    await db.sql`SELECT tide.outbox_create('checked')`;
    await db.sql`SELECT tide.relay_set_outbox('good', 'checked', 'webhook', '{"url": "http://127.0.0.1:1/"}'::jsonb)`;
    await db.sql`SELECT tide.relay_set_outbox('bad', 'checked', 'webhook', '{"url": "http://127.0.0.1:1/", "timeout_ms": "soon"}'::jsonb)`;
    await db.sql`SELECT tide.relay_set_outbox('bad-filter', 'checked', 'stdout', '{"transform": {"filter": "payload.x =="}}'::jsonb)`;
    const result = await pgTide("check", "--postgres-url", db.url);
    expect(result.code).toBe(1);
    expect(result.stdout).toContain("1 of 3 pipeline configs are valid (catalog)");
    expect(result.stdout).toContain(`pipeline "bad": webhook sink config is invalid: 'timeout_ms'`);
    expect(result.stdout).toContain(`pipeline "bad-filter": transform.filter: invalid filter`);
    await db.sql`SELECT tide.relay_delete('bad')`;
    await db.sql`SELECT tide.relay_delete('bad-filter')`;
    expect((await pgTide("check", "--postgres-url", db.url)).code).toBe(0);
  });

  it("check without a database validates the manifest's pipelines and says the catalog was not checked", async () => {
    const path = join(dir, "bad-config.toml");
    await writeFile(path, `
[[pipelines]]
name = "orders-webhook"
outbox = "orders"
sink_type = "webhook"
[pipelines.config]
url = "http://127.0.0.1:1/"
timeout_ms = "soon"

[[pipelines]]
name = "orders-file"
outbox = "orders"
sink_type = "file"
[pipelines.config]
path = "${join(dir, "orders.jsonl")}"
`);
    const result = await pgTide("check", "--config", path);
    expect(result.code).toBe(1);
    expect(result.stdout).toContain(`manifest ${path}: ok`);
    expect(result.stdout).toContain("catalog not checked: no database URL (--postgres-url, PG_TIDE_POSTGRES_URL");
    expect(result.stdout).toContain("1 of 2 pipeline configs are valid (manifest only)");
    expect(result.stdout).toContain(`pipeline "orders-webhook": webhook sink config is invalid: 'timeout_ms'`);

    const empty = join(dir, "no-pipelines.toml");
    await writeFile(empty, `[relay]\nrelay_group_id = "blue"\n`);
    const nothing = await pgTide("check", "--config", empty);
    expect(nothing.code).toBe(0);
    expect(nothing.stdout).toContain("catalog not checked");
    expect(nothing.stdout).toContain("no pipeline configs to check (manifest only)");
    expect(nothing.stdout).not.toContain("0 of 0");
  });

  it("check names the file and the problem of a manifest it cannot use (exit 2)", async () => {
    const syntax = join(dir, "syntax.toml");
    await writeFile(syntax, `[relay]\nrelay_group_id =\n`);
    const broken = await pgTide("check", "--config", syntax);
    expect(broken.code).toBe(2);
    expect(broken.stderr).toContain(`${syntax}: line 2`);
    expect(broken.stderr).toContain("invalid TOML");

    const unknown = join(dir, "unknown-key.toml");
    await writeFile(unknown, `[relay]\nrelay_group = "blue"\n`);
    const misspelt = await pgTide("check", "--config", unknown);
    expect(misspelt.code).toBe(2);
    expect(misspelt.stderr).toContain(`${unknown}: relay.relay_group: unknown key`);

    const missing = await pgTide("check", "--config", join(dir, "missing.toml"));
    expect(missing.code).toBe(2);
    expect(missing.stderr).toContain(`${join(dir, "missing.toml")}: cannot read the manifest`);

    const neither = await pgTide("check");
    expect(neither.code).toBe(2);
    expect(neither.stderr).toContain("nothing to check");
  });

  it("upserts a manifest's pipelines at start, or leaves the catalog alone with catalog_only", async () => {
    await db.sql`SELECT tide.outbox_create('declared')`;
    const manifest = (mode: string) => `
[relay]
pipelines_mode = "${mode}"

[[pipelines]]
name = "declared-${mode}"
outbox = "declared"
sink_type = "file"
batch_size = 7
[pipelines.config]
path = "${join(dir, `${mode}.jsonl`)}"
`;
    for (const mode of ["catalog_only", "manifest"]) {
      const path = join(dir, `${mode}.toml`);
      await writeFile(path, manifest(mode));
      const relay = spawnRelay(db.url, ["--config", path, "--relay-group-id", mode]);
      try {
        await waitFor("the relay to own the pipelines it found", async () =>
          (await db.sql`SELECT 1 FROM tide.relay_pipeline_state WHERE relay_group_id = ${mode} AND pipeline = 'good'`).length > 0);
      } finally {
        relay.kill("SIGTERM");
        await relay.exited;
      }
    }
    const rows = await db.sql`SELECT name, batch_size, plugin_type FROM tide.relay_pipelines WHERE name LIKE 'declared-%'`;
    expect(rows.map((r) => [r.name, r.batch_size, r.plugin_type])).toEqual([["declared-manifest", 7, "file"]]);
  }, 60_000);
});

describe("pg-tide run configured through the environment", () => {
  // A database of its own: PG_TIDE_MAX_PIPELINES=1 makes the relay own the first pipeline by name.
  let envDb: TestDatabase;
  beforeAll(async () => {
    envDb = await createTestDatabase();
  });
  afterAll(() => envDb.drop());

  it("takes every PG_TIDE_* setting from the environment", async () => {
    const hook = heldWebhook();
    const port = await freePort();
    const path = join(dir, "from-env.toml");
    await envDb.sql`SELECT tide.outbox_create('env_held')`;
    await envDb.sql`SELECT tide.outbox_create('env_idle')`;
    // Reconciled in name order: with PG_TIDE_MAX_PIPELINES=1 the relay owns "env-a", never "env-b".
    await writeFile(path, `
[[pipelines]]
name = "env-a"
outbox = "env_held"
sink_type = "webhook"
[pipelines.config]
url = "${hook.url}"

[[pipelines]]
name = "env-b"
outbox = "env_idle"
sink_type = "file"
[pipelines.config]
path = "${join(dir, "env-b.jsonl")}"
`);
    const relay = Bun.spawn([process.execPath, "main.ts", "run"], {
      cwd: ROOT,
      env: tideEnv({
        PG_TIDE_POSTGRES_URL: envDb.url,
        PG_TIDE_CONFIG: path,
        PG_TIDE_RELAY_GROUP_ID: "from-env",
        PG_TIDE_METRICS_ADDR: `127.0.0.1:${port}`,
        PG_TIDE_LOG_FORMAT: "json",
        PG_TIDE_LOG_LEVEL: "warn",
        PG_TIDE_DRAIN_TIMEOUT: "1",
        PG_TIDE_MAX_PIPELINES: "1",
      }),
      stdout: "pipe",
      stderr: "pipe",
    });
    const logs = collectLines(relay.stderr);
    try {
      await envDb.sql`SELECT tide.outbox_publish('env_held', '{"n": 1}'::jsonb)`;
      // A delivery in flight, held until the relay gives up on it.
      await Promise.race([hook.arrived, relay.exited.then((code) => Promise.reject(new Error(`the relay exited with ${code}`)))]);
      expect((await fetch(`http://127.0.0.1:${port}/metrics`)).status).toBe(200);
      const owned = await envDb.sql`SELECT pipeline FROM tide.relay_pipeline_state
                                     WHERE relay_group_id = 'from-env' AND owner_id IS NOT NULL`;
      expect(owned.map((row) => row.pipeline)).toEqual(["env-a"]);
      const declared = await envDb.sql`SELECT name FROM tide.relay_pipelines WHERE name LIKE 'env-%' ORDER BY name`;
      expect(declared.map((row) => row.name)).toEqual(["env-a", "env-b"]);

      relay.kill("SIGTERM");
      expect(await relay.exited).toBe(0);
      await logs.done;
      const lines = logs.lines.map((line) => JSON.parse(line));
      expect(lines.filter((line) => line.level === "info" || line.level === "debug")).toEqual([]);
      expect(lines.find((line) => line.message.startsWith("drain timeout reached"))).toMatchObject({ level: "warn", drain_timeout_s: 1 });
      const [lag] = await envDb.sql`SELECT lag FROM tide.consumer_lag WHERE group_name = 'env-a' AND relay_group_id = 'from-env'`;
      expect(lag.lag).toBe(1n);
    } finally {
      relay.kill("SIGKILL");
      hook.stop();
    }
  }, 60_000);

  it("names the environment variable a bad value came from", async () => {
    const url = { PG_TIDE_POSTGRES_URL: db.url };
    const cases: [Record<string, string>, string][] = [
      [{ PG_TIDE_DRAIN_TIMEOUT: "soon" }, 'PG_TIDE_DRAIN_TIMEOUT must be a positive integer (got "soon")'],
      [{ PG_TIDE_MAX_PIPELINES: "0" }, 'PG_TIDE_MAX_PIPELINES must be a positive integer (got "0")'],
      [{ PG_TIDE_MEMORY_TARGET_MIB: "lots" }, 'PG_TIDE_MEMORY_TARGET_MIB must be a positive integer (got "lots")'],
      [{ PG_TIDE_POLL_INTERVAL_MS: "fast" }, 'PG_TIDE_POLL_INTERVAL_MS must be a positive integer (got "fast")'],
      [{ PG_TIDE_LOG_FORMAT: "xml" }, 'PG_TIDE_LOG_FORMAT must be "text" or "json" (got "xml")'],
      [{ PG_TIDE_LOG_LEVEL: "loud" }, 'PG_TIDE_LOG_LEVEL must be debug, info, warn or error (got "loud")'],
      [{ PG_TIDE_METRICS_ADDR: "9090" }, 'PG_TIDE_METRICS_ADDR must be host:port or "off" (got "9090")'],
    ];
    for (const [env, message] of cases) {
      const result = await pgTideWithEnv({ ...url, ...env }, "run");
      expect([result.code, result.stderr]).toEqual([2, `pg-tide: ${message}\n`]);
    }
    // The flag wins over the variable, and is then the one named.
    const flag = await pgTideWithEnv({ ...url, PG_TIDE_DRAIN_TIMEOUT: "5" }, "run", "--drain-timeout", "0");
    expect(flag.stderr).toContain('--drain-timeout must be a positive integer (got "0")');
  }, 60_000);
});
