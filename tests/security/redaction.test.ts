// Secrets that are not under a secret-looking key still do not leave: a token in a URL's userinfo
// (`nats://TOKEN@host`) and a Bearer credential under an ordinary header name are masked by
// relay_get_config for a LOGIN role that holds only tide_reader; a TOML syntax error quotes the
// offending lines with their secrets masked; and a webhook target that echoes the request's
// Authorization header in its error response leaves no credential in tide.relay_dlq, in
// pipeline_status or in the relay's logs (a real HTTP server and a real relay, logged in as tide_relay).

import { afterAll, beforeAll, describe, expect, it, setDefaultTimeout } from "bun:test";
import { mkdtemp, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connect, type Sql } from "../../core/db.ts";
import { createTestDatabase, loginRole, type TestDatabase } from "../support/postgres.ts";
import { captureLogger, startRelay, waitFor } from "../support/relay.ts";

setDefaultTimeout(60_000);

const ROOT = join(import.meta.dir, "..", "..");

let db: TestDatabase;
let relayUrl: string;
let reader: Sql;

beforeAll(async () => {
  db = await createTestDatabase();
  relayUrl = (await loginRole(db, "tide_relay", "redact_relay")).url;
  reader = connect((await loginRole(db, "tide_reader", "redact_reader")).url, { max: 1 });
});

afterAll(async () => {
  await reader?.end();
  await db.drop();
});

describe("relay_get_config and relay_list_configs, read by tide_reader", () => {
  it("mask a token in a URL's userinfo and a Bearer credential under an ordinary key", async () => {
    await db.sql`SELECT tide.outbox_create('orders')`;
    await db.sql`SELECT tide.relay_set_outbox('to-nats', 'orders', 'nats',
      ${db.sql.json({ url: ["nats://NatsTok3nSecret@nats-1:4222", "nats://nats-2:4222"], subject: "orders" })})`;
    await db.sql`SELECT tide.relay_set_outbox('to-hook', 'orders', 'webhook',
      ${db.sql.json({ url: "https://hooks.example.com/in", headers: { "X-Upstream": "Bearer eyJBearerSecret.x-y", Accept: "application/json" } })})`;

    const [{ nats }] = await reader`SELECT tide.relay_get_config('to-nats') AS nats`;
    expect(nats.config.url).toEqual(["nats://***@nats-1:4222", "nats://nats-2:4222"]);
    const [{ hook }] = await reader`SELECT tide.relay_get_config('to-hook') AS hook`;
    expect(hook.config.headers).toEqual({ "X-Upstream": "Bearer ***", Accept: "application/json" });

    const listed = JSON.stringify(await reader`SELECT * FROM tide.relay_list_configs()`);
    expect(listed).not.toContain("NatsTok3nSecret");
    expect(listed).not.toContain("eyJBearerSecret");
    expect(listed).toContain("nats-1:4222");
  });
});

describe("a TOML syntax error", () => {
  it("names the file and the line without quoting a secret from it or its neighbours", async () => {
    const dir = await mkdtemp(join(tmpdir(), "tide-redaction-"));
    const cases = [
      // An unterminated string under a secret key: the error quotes the rest of the line.
      ['[[pipelines]]\nname = "a"\noutbox = "orders"\nsink_type = "kafka"\n[pipelines.config]\nbrokers = ["k:9092"]\nsasl = { mechanism = "plain", username = "u", password = "Tom1Secret',
        "Tom1Secret"],
      // A bare (invalid) value, with a token URL on the line before.
      ['[[pipelines]]\nname = "b"\noutbox = "orders"\nsink_type = "nats"\n[pipelines.config]\nurl = "nats://Tom2Tok3n@nats:4222"\nauth_token = Tom2Bare\nsubject = "x"',
        "Tom2Tok3n|Tom2Bare"],
      // A multi-line string left open: the error quotes its inside.
      ['[[pipelines]]\nname = "c"\noutbox = "orders"\nsink_type = "webhook"\n[pipelines.config]\nurl = "https://h/in"\nsigning = { scheme = "hmac-sha256", secret = """Tom3Multi\nTom3Second line',
        "Tom3Multi|Tom3Second"],
    ] as const;
    for (const [i, [text, secrets]] of cases.entries()) {
      const path = join(dir, `broken-${i}.toml`);
      await writeFile(path, text);
      const child = Bun.spawn([process.execPath, "main.ts", "check", "--config", path], { cwd: ROOT, stdout: "pipe", stderr: "pipe" });
      const [stdout, stderr, code] = await Promise.all([new Response(child.stdout).text(), new Response(child.stderr).text(), child.exited]);
      expect(code).toBe(2);
      expect(stderr).toContain(`${path}: line `);
      expect(stderr).toContain("invalid TOML");
      expect(stdout + stderr).not.toMatch(new RegExp(secrets));
    }
  });
});

describe("a webhook target that echoes the request in its error response", () => {
  it("leaves no credential in the dead-letter queue, pipeline_status or the logs", async () => {
    const token = "eyJEchoedBearer.s3cr3t-tok";
    const target = Bun.serve({
      hostname: "127.0.0.1",
      port: 0,
      async fetch(request) {
        const { style } = await request.json();
        const authorization = request.headers.get("authorization");
        // What echo servers and debugging proxies send back: the request's headers, as JSON or as text.
        const body = style === "json"
          ? JSON.stringify({ error: "forbidden", headers: { authorization, "x-request-id": "r-1" } })
          : `forbidden\nAuthorization: ${authorization}\nX-Request-Id: r-2`;
        return new Response(body, { status: 403 });
      },
    });
    const { logger, lines } = captureLogger();
    await db.sql`SELECT tide.outbox_create('echo')`;
    await db.sql`SELECT tide.relay_set_outbox('echo-hook', 'echo', 'webhook',
      ${db.sql.json({ url: `http://127.0.0.1:${target.port}/in`, headers: { Authorization: `Bearer ${token}` } })})`;
    await db.sql`SELECT tide.outbox_publish('echo', '{"style": "json"}'::jsonb)`;
    await db.sql`SELECT tide.outbox_publish('echo', '{"style": "text"}'::jsonb)`;
    const relay = await startRelay(relayUrl, { logger, relayGroupId: "echo" });
    try {
      const letters = await waitFor("both messages in the dead-letter queue", async () => {
        const rows = await reader`SELECT error FROM tide.relay_dlq_list('echo-hook') ORDER BY id`;
        return rows.length === 2 && rows;
      });
      expect(letters[0].error).toContain("answered 403");
      expect(letters[0].error).toContain('"authorization":"***"');
      expect(letters[0].error).toContain('"x-request-id":"r-1"');
      expect(letters[1].error).toContain("Authorization: ***");
      expect(letters[1].error).toContain("X-Request-Id: r-2");
      for (const letter of letters) expect(letter.error).not.toContain("s3cr3t-tok");

      await waitFor("the dead letters to be logged", () => lines.some((line) => line.includes("dead-letter")));
      expect(lines.filter((line) => line.includes("answered 403")).length).toBeGreaterThan(0);
      for (const line of lines) expect(line).not.toContain("s3cr3t-tok");
      const status = await reader`SELECT last_error FROM tide.pipeline_status WHERE pipeline = 'echo-hook'`;
      expect(JSON.stringify(status)).not.toContain("s3cr3t-tok");
    } finally {
      await relay.stop();
      target.stop(true);
    }
  });
});
