// The command line's former dead ends: each now says what was wrong and what to do instead.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { createServer, type Server } from "node:net";
import { mkdtemp, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { collectLines, waitFor } from "../support/relay.ts";

const ROOT = join(import.meta.dir, "..", "..");
let db: TestDatabase;
let dir: string;
beforeAll(async () => {
  db = await createTestDatabase();
  dir = await mkdtemp(join(tmpdir(), "tide-edges-"));
});
afterAll(() => db.drop());

const tideEnv = () => Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("PG_TIDE_")));

async function pgTide(...args: string[]) {
  const child = Bun.spawn([process.execPath, "main.ts", ...args], { cwd: ROOT, env: tideEnv(), stdout: "pipe", stderr: "pipe" });
  const [stdout, stderr, code] = await Promise.all([new Response(child.stdout).text(), new Response(child.stderr).text(), child.exited]);
  return { stdout, stderr, code };
}

describe("the command line", () => {
  it("install says where the schema can go, refuses both places at once, and names the command once", async () => {
    const none = await pgTide("install");
    expect(none.code).toBe(2);
    expect(none.stderr).toContain("--extension-dir DIR writes the files for CREATE EXTENSION pg_tide");
    expect(none.stderr.startsWith("pg-tide install: ")).toBe(true);
    const both = await pgTide("install", "--postgres-url", db.url, "--extension-dir", join(dir, "ext"));
    expect(both.code).toBe(2);
    expect(both.stderr).toContain("give either --postgres-url");
    expect(both.stderr).not.toContain("pg-tide: pg-tide");
  });

  it("names a database URL without its scheme, instead of logging in as role \"unknown\"", async () => {
    for (const command of ["status", "check", "install"]) {
      const result = await pgTide(command, "--postgres-url", "127.0.0.1:5432/app");
      expect(result.code).toBe(2);
      expect(result.stderr).toContain("the PostgreSQL URL must start with postgres:// or postgresql://");
      expect(result.stderr).toContain('(got "127.0.0.1:5432/app")');
      expect(result.stderr).not.toContain("unknown");
    }
  });

  it("status reads the database URL from the manifest", async () => {
    const manifest = join(dir, "status.toml");
    await writeFile(manifest, `[relay]\npostgres_url = "${db.url}"\n`);
    await db.sql`SELECT tide.outbox_create('edge_orders')`;
    await db.sql`SELECT tide.relay_set_outbox('edge-pipe', 'edge_orders', 'stdout', '{}'::jsonb)`;
    const result = await pgTide("status", "--config", manifest);
    expect(result.stderr).toBe("");
    expect(result.code).toBe(0);
    expect(result.stdout).toContain("edge-pipe");
  });

  it("plugins TYPE prints every config key of that type's sink and source, and names an unknown type", async () => {
    const kafka = await pgTide("plugins", "kafka");
    expect(kafka.code).toBe(0);
    expect(kafka.stdout).toContain("sink kafka");
    expect(kafka.stdout).toContain("source kafka");
    expect(kafka.stdout).toContain("    brokers: string | array of string, required");
    expect(kafka.stdout).toContain("    transactional: boolean, default false");
    expect(kafka.stdout).toContain("    group_id: string");
    const json = JSON.parse((await pgTide("plugins", "nats", "--output", "json")).stdout);
    expect(json.find((p: { kind: string }) => p.kind === "source").options.map((o: { key: string }) => o.key)).toContain("create_stream");
    const unknown = await pgTide("plugins", "kafak");
    expect(unknown.code).toBe(2);
    expect(unknown.stderr).toContain('no sink or source type "kafak" (known: ');
  });

  it("says to use --metrics-addr when the port is taken", async () => {
    const busy: Server = createServer();
    await new Promise<void>((resolve) => busy.listen(0, "127.0.0.1", resolve));
    const port = (busy.address() as { port: number }).port;
    try {
      const result = await pgTide("run", "--postgres-url", db.url, "--metrics-addr", `127.0.0.1:${port}`);
      expect(result.code).toBe(2);
      expect(result.stderr).toContain(`cannot serve metrics and the status page on 127.0.0.1:${port}`);
      expect(result.stderr).toContain("choose another address with --metrics-addr HOST:PORT");
    } finally {
      busy.close();
    }
  });

  it("dev runs its demo in a given database, as the compiled binary needs", async () => {
    const child = Bun.spawn([process.execPath, "main.ts", "dev", "--postgres-url", db.url, "--publish-every", "0", "--metrics-addr", "127.0.0.1:0"], {
      cwd: ROOT, env: tideEnv(), stdout: "pipe", stderr: "pipe",
    });
    const out = collectLines(child.stdout);
    try {
      const lines = await waitFor("three demo events delivered to stdout", () => {
        const delivered = out.lines.filter((l) => l.startsWith("{") && l.includes('"outbox":"orders"'));
        return delivered.length >= 3 && delivered;
      });
      expect(JSON.parse(lines[0]!).payload).toEqual({ order_id: 1, total: 10 });
    } finally {
      child.kill("SIGTERM");
    }
    expect(await child.exited).toBe(0);
    // The demo's outbox and pipeline stay in the user's database.
    expect((await db.sql`SELECT count(*)::int AS n FROM tide.relay_pipelines WHERE name = 'orders-to-stdout'`)[0].n).toBe(1);
  });
});
