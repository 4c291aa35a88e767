// `pg-tide check` finds what the relay would refuse at start, template placeholders included, and
// names the pipeline in every message; a drop-in plugin cannot take over a built-in type (every
// pipeline of that type would run its code) unless the manifest says `override = true`. The real
// CLI runs as a user would; the catalog is read by a LOGIN role that holds only tide_relay.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { createTestDatabase, loginRole, type TestDatabase } from "../support/postgres.ts";

const ROOT = join(import.meta.dir, "..", "..");
const SHOUT_FIXTURE = join(ROOT, "tests", "fixtures", "plugins", "shout_sink.js");

let db: TestDatabase;
let dir: string;
let relayUrl: string;

beforeAll(async () => {
  db = await createTestDatabase();
  relayUrl = (await loginRole(db, "tide_relay", "check_relay")).url;
  dir = await mkdtemp(join(tmpdir(), "tide-check-plugins-"));
  // The shout fixture under a built-in type's name: a drop-in that would replace the stdout sink.
  await writeFile(join(dir, "loud_stdout.js"), `import shout from ${JSON.stringify(pathToFileURL(SHOUT_FIXTURE).href)};
export default { ...shout, type: "stdout", summary: "stdout, but shouting (test fixture)" };
`);
  await writeFile(join(dir, "shout_again.js"), `import shout from ${JSON.stringify(pathToFileURL(SHOUT_FIXTURE).href)};
export default { ...shout };
`);
});

afterAll(async () => {
  await db.drop();
  await rm(dir, { recursive: true, force: true });
});

/** Runs the real CLI with no PG_TIDE_* variables from the test's environment. */
async function pgTide(...args: string[]) {
  const env = Object.fromEntries(Object.entries(process.env).filter(([name]) => !name.startsWith("PG_TIDE_")));
  const child = Bun.spawn([process.execPath, "main.ts", ...args], { cwd: ROOT, env, stdout: "pipe", stderr: "pipe" });
  const [stdout, stderr, code] = await Promise.all([new Response(child.stdout).text(), new Response(child.stderr).text(), child.exited]);
  return { stdout, stderr, code };
}

async function manifest(name: string, text: string): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, text);
  return path;
}

describe("pg-tide check and templates", () => {
  it("reports an unknown placeholder in any sink's template or an event_id template, naming the pipeline", async () => {
    const path = await manifest("templates.toml", `
[[pipelines]]
name = "orders-hook"
outbox = "orders"
sink_type = "webhook"
[pipelines.config]
url_template = "http://127.0.0.1:1/orders/{payload.id}/{paylod.region}"

[[pipelines]]
name = "orders-nats"
outbox = "orders"
sink_type = "nats"
[pipelines.config]
url = "nats://127.0.0.1:1"
subject_template = "orders.{evnt_type}"

[[pipelines]]
name = "orders-kafka"
outbox = "orders"
sink_type = "kafka"
[pipelines.config]
brokers = "127.0.0.1:1"
topic = "orders"
key = "{payload.customer}-{idd}"

[[pipelines]]
name = "payments-in"
inbox = "payments"
source_type = "kafka"
[pipelines.config]
brokers = "127.0.0.1:1"
topic = "payments"
event_id = "{payload.payment_id}{bogus}"

[[pipelines]]
name = "orders-good"
outbox = "orders"
sink_type = "webhook"
[pipelines.config]
url_template = "http://127.0.0.1:1/orders/{event_type}/{payload.id}"
`);
    const result = await pgTide("check", "--config", path);
    expect(result.code).toBe(1);
    expect(result.stdout).toContain("1 of 5 pipeline configs are valid (manifest only)");
    const problems = result.stdout.split("\n").filter((line) => line.startsWith("  "));
    expect(problems).toHaveLength(4);
    const line = (pipeline: string) => problems.find((p) => p.startsWith(`  pipeline "${pipeline}": `)) ?? "";
    expect(line("orders-hook")).toContain("unknown placeholder {paylod.region}");
    expect(line("orders-nats")).toContain("unknown placeholder {evnt_type}");
    expect(line("orders-kafka")).toContain("unknown placeholder {idd}");
    expect(line("payments-in")).toContain("unknown placeholder {bogus}");
  });

  it("checks the catalog's templates too, read by a role that holds only tide_relay", async () => {
    await db.sql`SELECT tide.outbox_create('checked')`;
    await db.sql`SELECT tide.relay_set_outbox('checked-hook', 'checked', 'webhook',
      ${db.sql.json({ url_template: "http://127.0.0.1:1/{payload.id}/{nope}" })})`;
    const bad = await pgTide("check", "--postgres-url", relayUrl);
    expect(bad.code).toBe(1);
    expect(bad.stdout).toContain("0 of 1 pipeline configs are valid (catalog)");
    expect(bad.stdout).toContain(`pipeline "checked-hook": `);
    expect(bad.stdout).toContain("unknown placeholder {nope}");
    await db.sql`SELECT tide.relay_set_outbox('checked-hook', 'checked', 'webhook',
      ${db.sql.json({ url_template: "http://127.0.0.1:1/{payload.id}" })})`;
    const good = await pgTide("check", "--postgres-url", relayUrl);
    expect([good.code, good.stdout]).toEqual([0, expect.stringContaining("1 of 1 pipeline configs are valid (catalog)")]);
  });
});

describe("drop-in plugins that declare a built-in type", () => {
  const pipeline = `
[[pipelines]]
name = "loud-out"
outbox = "orders"
sink_type = "stdout"
[pipelines.config]
path = "/dev/null"
`;

  it("are refused without override = true, by check, plugins and run alike, with the fix in the message", async () => {
    const path = await manifest("no-override.toml", `[plugins]\nloud = "./loud_stdout.js"\n${pipeline}`);
    for (const args of [["check", "--config", path], ["plugins", "--config", path], ["run", "--config", path, "--postgres-url", relayUrl]]) {
      const result = await pgTide(...args);
      expect(result.code).toBe(2);
      expect(result.stderr).toContain(`plugin "loud" (${join(dir, "loud_stdout.js")}) declares the sink type "stdout", which is built in`);
      expect(result.stderr).toContain(`loud = { path = ${JSON.stringify(join(dir, "loud_stdout.js"))}, override = true }`);
    }
  });

  it("replace the built-in with override = true (TOML or JSON manifest), and check says so", async () => {
    const toml = await manifest("override.toml", `[plugins]\nloud = { path = "./loud_stdout.js", override = true }\n${pipeline}`);
    const json = await manifest("override.json", JSON.stringify({
      plugins: { loud: { path: "./loud_stdout.js", override: true } },
      pipelines: [{ name: "loud-out", outbox: "orders", sink_type: "stdout", config: { path: "/dev/null" } }],
    }));
    for (const path of [toml, json]) {
      const result = await pgTide("check", "--config", path);
      expect(result.stderr).toBe("");
      expect(result.code).toBe(0);
      expect(result.stdout).toContain(`plugin "loud" replaces the built-in sink "stdout" (override = true)`);
      // The config only the drop-in accepts ({"path": ...}) is valid: the drop-in took the type.
      expect(result.stdout).toContain("1 of 1 pipeline configs are valid (manifest only)");
    }
    const listed = await pgTide("plugins", "--config", toml, "--output", "json");
    const stdout = JSON.parse(listed.stdout).find((p: { kind: string; type: string }) => p.kind === "sink" && p.type === "stdout");
    expect(stdout.summary).toBe("stdout, but shouting (test fixture)");
  });

  it("are refused when two drop-ins declare the same type, override or not", async () => {
    const path = await manifest("twice.toml", `[plugins]
shout = "${SHOUT_FIXTURE}"
again = { path = "./shout_again.js", override = true }
`);
    const result = await pgTide("check", "--config", path);
    expect(result.code).toBe(2);
    expect(result.stderr).toContain(`plugin "again" (${join(dir, "shout_again.js")}) declares the sink type "shout", which plugin "shout"`);
    expect(result.stderr).toContain("give one of them another type");
  });

  it("name the key when an entry is neither a path nor a { path, override } table", async () => {
    const typo = await pgTide("check", "--config", await manifest("typo.toml", `[plugins]\nloud = { path = "./loud_stdout.js", overide = true }\n`));
    expect([typo.code, typo.stderr]).toEqual([2, expect.stringContaining(`plugins.loud.overide: unknown key (did you mean "override"?)`)]);
    const number = await pgTide("check", "--config", await manifest("number.toml", `[plugins]\nloud = 5\n`));
    expect(number.code).toBe(2);
    expect(number.stderr).toContain(`plugins.loud: must be a file path, or a table like { path = "./my_sink.ts", override = true } (got 5)`);
  });
});
