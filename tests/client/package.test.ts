// `import { publish, work } from "pg-tide/client"` in an application that depends on this package:
// installed from the packed tarball (what npm installs from a registry or a git URL) and linked as
// a file: dependency, run on Bun, Deno and Node against a real database, and type-checked.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { mkdir, mkdtemp, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";

const ROOT = join(import.meta.dir, "..", "..");
const BIN = join(ROOT, "node_modules", ".bin");

// The application: publishes in a transaction, then works one inbox message, and prints what it saw.
const APP = `
import postgres from "postgres";
import { publish, work } from "pg-tide/client";

const [url, inbox] = [process.env.APP_DATABASE_URL, process.env.APP_INBOX];
const sql = postgres(url, { max: 3, onnotice: () => {} });
const id = await sql.begin((tx) => publish(tx, "app_orders", { order: 1 }, { event_type: "order.created" }));
await sql\`SELECT * FROM tide.inbox_insert_batch(\${inbox}, '[{"event_id": "app-1", "payload": {"paid": true}}]')\`;
const seen = await new Promise((resolve) => {
  const worker = work(sql, inbox, (message) => {
    resolve(message.payloadText);
    void worker.stop();
  });
});
await sql.end();
console.log(JSON.stringify({ published: id, worked: seen }));
`;

// A typed use of the client, checked with strict settings and no allowImportingTsExtensions.
const TYPED = `
import postgres from "postgres";
import { publish, rawJson, work, ClaimLostError, type InboxMessage, type Worker } from "pg-tide/client";

const sql = postgres("postgres://localhost/app");
export async function run(): Promise<string> {
  return await sql.begin((tx) => publish(tx, "orders", rawJson('{"n": 1}'), { a: 1 }, { topic: "t" }));
}
export const worker: Worker = work<{ paid: boolean }>(sql, "payments", async (message: InboxMessage<{ paid: boolean }>, tx) => {
  const paid: boolean = message.payload.paid;
  await tx\`SELECT \${paid}\`;
  await message.extendClaim(1000);
}, { concurrency: 2, orderingKey: ["headers", "key"], onError: (error) => error instanceof ClaimLostError });
`;

let db: TestDatabase;
let dir: string;
let tarball: string;
beforeAll(async () => {
  db = await createTestDatabase();
  await db.sql`SELECT tide.outbox_create('app_orders')`;
  dir = await mkdtemp(join(tmpdir(), "tide-client-"));
  const pack = Bun.spawnSync(["npm", "pack", "--silent", "--pack-destination", dir], { cwd: ROOT });
  if (pack.exitCode !== 0) throw new Error(`npm pack failed: ${pack.stderr.toString()}`);
  tarball = join(dir, pack.stdout.toString().trim().split("\n").at(-1)!);
}, 60_000);
afterAll(async () => {
  await db.drop();
  await rm(dir, { recursive: true, force: true });
});

/** A scratch application whose node_modules holds pg-tide (installed or linked) and postgres. */
async function application(name: string, install: "tarball" | "link"): Promise<string> {
  const app = join(dir, name);
  await mkdir(join(app, "node_modules"), { recursive: true });
  await writeFile(join(app, "package.json"), JSON.stringify({ name, type: "module", dependencies: { "pg-tide": "*", postgres: "*" } }));
  await writeFile(join(app, "app.mjs"), APP);
  await writeFile(join(app, "typed.ts"), TYPED);
  await writeFile(join(app, "tsconfig.json"), JSON.stringify({
    compilerOptions: { strict: true, noEmit: true, target: "ES2022", module: "NodeNext", moduleResolution: "NodeNext", skipLibCheck: true, types: ["node"] },
    files: ["typed.ts"],
  }));
  if (install === "link") {
    await symlink(ROOT, join(app, "node_modules", "pg-tide"));
  } else {
    await mkdir(join(app, "node_modules", "pg-tide"));
    const untar = Bun.spawnSync(["tar", "-xzf", tarball, "-C", join(app, "node_modules", "pg-tide"), "--strip-components=1"]);
    if (untar.exitCode !== 0) throw new Error(`tar failed: ${untar.stderr.toString()}`);
  }
  await symlink(join(ROOT, "node_modules", "postgres"), join(app, "node_modules", "postgres"));
  await mkdir(join(app, "node_modules", "@types"));
  await symlink(join(ROOT, "node_modules", "@types", "node"), join(app, "node_modules", "@types", "node"));
  return app;
}

let inboxes = 0;
async function runApp(app: string, command: string[]): Promise<{ published: string; worked: string }> {
  const inbox = `app_payments_${++inboxes}`;
  await db.sql`SELECT tide.inbox_create(${inbox})`;
  const run = Bun.spawnSync(command, {
    cwd: app,
    env: { ...process.env, APP_DATABASE_URL: db.url, APP_INBOX: inbox, DENO_NO_UPDATE_CHECK: "1" },
  });
  const stdout = run.stdout.toString();
  if (run.exitCode !== 0) throw new Error(`${command.join(" ")} exited ${run.exitCode}: ${stdout}${run.stderr.toString()}`);
  const [processed] = await db.sql.unsafe(`SELECT count(*)::int AS n FROM tide.${inbox}_inbox WHERE processed_at IS NOT NULL`);
  expect(processed.n).toBe(1);
  return JSON.parse(stdout.trim().split("\n").at(-1)!);
}

const RUNTIMES: [string, (app: string) => string[]][] = [
  ["Bun", () => [process.execPath, "app.mjs"]],
  ["Deno", () => [join(BIN, "deno"), "run", "-A", "app.mjs"]],
  ["Node", () => ["node", "app.mjs"]],
];

describe("pg-tide/client from an application", () => {
  for (const install of ["tarball", "link"] as const) {
    for (const [runtime, command] of RUNTIMES) {
      it(`imports publish and work on ${runtime}, installed as ${install === "tarball" ? "the packed tarball" : "a file: link"}`, async () => {
        const app = await application(`${runtime.toLowerCase()}_${install}`, install);
        const result = await runApp(app, command(app));
        expect(result.published).toMatch(/^\d+$/);
        expect(result.worked).toBe('{"paid": true}');
      }, 60_000);
    }
  }

  it("type-checks an application's use of the client from the installed declarations", async () => {
    const app = await application("typed", "tarball");
    const check = Bun.spawnSync([join(BIN, "tsc"), "-p", app]);
    expect(check.stdout.toString() + check.stderr.toString()).toBe("");
    expect(check.exitCode).toBe(0);
  }, 60_000);
});
