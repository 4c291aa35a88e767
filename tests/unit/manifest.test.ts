import { afterAll, describe, expect, it } from "bun:test";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { ConfigError } from "../../core/errors.ts";
import { loadManifest, type Manifest, manifestFormat, parseManifest } from "../../core/config/manifest.ts";

const FIXTURES = resolve(import.meta.dir, "../fixtures/manifests");
const ENV = { DATABASE_URL: "postgres://relay:pw@db:5432/app", KAFKA_PASSWORD: "kafka-secret" };

const tempDirs: string[] = [];
afterAll(() => {
  for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true });
});

function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), "tide-manifest-"));
  tempDirs.push(dir);
  return dir;
}

/** Parses TOML text as if it were ./pg-tide.toml, so messages start with "pg-tide.toml: ". */
function toml(text: string, env: Record<string, string | undefined> = ENV): Manifest {
  return parseManifest(text, "toml", "pg-tide.toml", env);
}

/** The ConfigError message `fn` throws; fails the test if it throws anything else or nothing. */
function configError(fn: () => unknown): string {
  try {
    fn();
  } catch (error) {
    expect(error).toBeInstanceOf(ConfigError);
    return (error as Error).message;
  }
  throw new Error("expected a ConfigError, nothing was thrown");
}

async function configErrorAsync(promise: Promise<unknown>): Promise<string> {
  try {
    await promise;
  } catch (error) {
    expect(error).toBeInstanceOf(ConfigError);
    return (error as Error).message;
  }
  throw new Error("expected a ConfigError, nothing was thrown");
}

const FORWARD = `[[pipelines]]\nname = "p"\noutbox = "orders"\nsink_type = "stdout"\n`;

describe("manifest files", () => {
  it("reads the full TOML manifest into typed relay settings, plugins and pipelines", async () => {
    const manifest = await loadManifest(join(FIXTURES, "pg-tide.toml"), ENV);
    expect(manifest.path).toBe(join(FIXTURES, "pg-tide.toml"));
    expect(manifest.relay).toEqual({
      postgres_url: "postgres://relay:pw@db:5432/app",
      relay_group_id: "blue",
      metrics_addr: "0.0.0.0:9090",
      max_pipelines: 50,
      poll_interval_ms: 100,
      drain_timeout: 20,
      memory_target_mib: 128,
      log_format: "json",
      log_level: "debug",
      pipelines_mode: "manifest",
    });
    expect(manifest.plugins).toEqual({ audit: join(FIXTURES, "plugins/audit_sink.ts") });
    expect(manifest.pipelines).toEqual([
      {
        name: "orders-to-kafka",
        direction: "forward",
        outbox: "orders",
        sink_type: "kafka",
        consumer_group: "kafka-relay",
        batch_size: 200,
        enabled: true,
        config: {
          brokers: "localhost:9092",
          topic: "order-events",
          acks: "all",
          compression: "snappy",
          key: "{event_type}",
          sasl: { mechanism: "plain", username: "relay", password: "kafka-secret" },
        },
      },
      {
        name: "nats-to-payments",
        direction: "reverse",
        inbox: "payments",
        source_type: "nats",
        batch_size: 50,
        idempotent: true,
        enabled: true,
        config: { url: "nats://localhost:4222", subject: "payments.confirmed", queue_group: "pg-tide-payments" },
      },
      {
        name: "orders_audit",
        direction: "forward",
        outbox: "orders",
        sink_type: "audit",
        enabled: false,
        config: { labels: ["eu", "prod"], retry: { max_attempts: 5, backoff_ms: 250 } },
      },
    ]);
  });

  it("reads the equivalent JSON manifest into the same Manifest", async () => {
    const fromToml = await loadManifest(join(FIXTURES, "pg-tide.toml"), ENV);
    const fromJson = await loadManifest(join(FIXTURES, "pg-tide.json"), ENV);
    expect(fromJson.path).toBe(join(FIXTURES, "pg-tide.json"));
    expect({ ...fromJson, path: "" }).toEqual({ ...fromToml, path: "" });
  });

  it("accepts an empty manifest: no relay settings, plugins or pipelines", () => {
    expect(toml("")).toEqual({ path: resolve("pg-tide.toml"), relay: {}, plugins: {}, overrides: [], pipelines: [] });
  });

  it("chooses the format by extension, case-insensitively", () => {
    expect(manifestFormat("/etc/pg-tide.toml")).toBe("toml");
    expect(manifestFormat("conf/PG-TIDE.JSON")).toBe("json");
  });

  it("rejects any other extension, naming it", async () => {
    expect(configError(() => manifestFormat("pg-tide.yaml"))).toBe(
      'pg-tide.yaml: unsupported manifest extension ".yaml" (use .toml or .json)',
    );
    expect(configError(() => manifestFormat("pg-tide"))).toContain(
      "pg-tide: unsupported manifest extension no extension",
    );
    expect(await configErrorAsync(loadManifest(join(tempDir(), "pg-tide.yml")))).toContain('".yml"');
  });

  it("names the file it cannot read", async () => {
    const path = join(tempDir(), "absent.toml");
    expect(await configErrorAsync(loadManifest(path))).toStartWith(`${path}: cannot read the manifest: `);
  });

  it("reports a TOML syntax error with the file and the line", () => {
    const message = configError(() => toml('[relay]\nrelay_group_id = "blue"\nmax_pipelines = \n'));
    expect(message).toStartWith("pg-tide.toml: line 3, column ");
    expect(message).toContain("invalid TOML");
    expect(message).toContain("3:  max_pipelines =");
  });

  it("reports a JSON syntax error with the file", () => {
    const message = configError(() => parseManifest('{"relay": {', "json", "pg-tide.json", ENV));
    expect(message).toStartWith("pg-tide.json: invalid JSON: ");
  });

  it("masks a URL password in the lines it quotes from a broken TOML file", () => {
    const message = configError(() => toml('[relay]\npostgres_url = "postgres://relay:hunter2@db/app"\nx = \n'));
    expect(message).toContain("postgres://relay:***@db/app");
    expect(message).not.toContain("hunter2");
  });

  it("requires the JSON document to be an object", () => {
    expect(configError(() => parseManifest("[]", "json", "pg-tide.json", ENV))).toBe(
      "pg-tide.json: the top level: expected an object (got an array)",
    );
  });

  it("turns TOML dates into their text, as jsonb has no date type", () => {
    const manifest = toml(`${FORWARD}[pipelines.config]\nsince = 2026-01-02\n`);
    expect(manifest.pipelines[0].config).toEqual({ since: "2026-01-02" });
  });
});

describe("manifest references", () => {
  it("resolves ${env:VAR} and ${file:path} in every section, whole or embedded, and $${ as a literal ${", () => {
    const dir = tempDir();
    mkdirSync(join(dir, "secrets"));
    writeFileSync(join(dir, "secrets", "kafka_password"), "s3cret\n");
    writeFileSync(join(dir, "token"), "abs-token\r\n");
    writeFileSync(join(dir, "multi"), "line1\nline2\n\n");
    const text = [
      "[relay]",
      'postgres_url = "postgres://relay:${env:PGPASS}@${env:PGHOST}:5432/app"',
      'relay_group_id = "${env:GROUP}"',
      "[plugins]",
      'audit = "${env:PLUGIN_DIR}/audit.ts"',
      FORWARD,
      "[pipelines.config]",
      'password = "${file:secrets/kafka_password}"',
      `token = "Bearer \${file:${join(dir, "token")}}"`,
      'multi = "${file:./multi}"',
      'template = "literal $${env:NOT_A_REF} and $${file:x}"',
      'list = ["${env:GROUP}", "a$${b}"]',
      'nested = { deep = { value = "[${env:GROUP}]" } }',
    ].join("\n");
    const env = { PGPASS: "pw", PGHOST: "db", GROUP: "blue", PLUGIN_DIR: "/opt/tide" };
    const manifest = parseManifest(text, "toml", join(dir, "pg-tide.toml"), env);
    expect(manifest.relay).toEqual({ postgres_url: "postgres://relay:pw@db:5432/app", relay_group_id: "blue" });
    expect(manifest.plugins).toEqual({ audit: "/opt/tide/audit.ts" });
    expect(manifest.pipelines[0].config).toEqual({
      password: "s3cret",
      token: "Bearer abs-token",
      multi: "line1\nline2\n",
      template: "literal ${env:NOT_A_REF} and ${file:x}",
      list: ["blue", "a${b}"],
      nested: { deep: { value: "[blue]" } },
    });
  });

  it("resolves references in JSON manifests too", () => {
    const json = JSON.stringify({ relay: { postgres_url: "${env:DATABASE_URL}" } });
    expect(parseManifest(json, "json", "pg-tide.json", ENV).relay.postgres_url).toBe(ENV.DATABASE_URL);
  });

  it("reads the process environment when no env is given", () => {
    const name = `TIDE_MANIFEST_TEST_${crypto.randomUUID().replaceAll("-", "_")}`;
    process.env[name] = "from-process";
    try {
      const manifest = parseManifest(`[relay]\npostgres_url = "\${env:${name}}"`, "toml", "pg-tide.toml");
      expect(manifest.relay.postgres_url).toBe("from-process");
    } finally {
      delete process.env[name];
    }
  });

  it("names the key path of a missing environment variable", () => {
    const text = `${FORWARD}[pipelines.config]\nsasl = { mechanism = "plain", password = "\${env:KAFKA_PASSWORD}" }\n`;
    expect(configError(() => toml(text, {}))).toBe(
      "pg-tide.toml: pipelines[0].config.sasl.password: environment variable KAFKA_PASSWORD is not set",
    );
  });

  it("names the key path of an unreadable file, resolved against the manifest's directory", () => {
    const dir = tempDir();
    const text = `[relay]\npostgres_url = "\${file:secrets/pg_url}"\n`;
    const message = configError(() => parseManifest(text, "toml", join(dir, "pg-tide.toml"), ENV));
    expect(message).toStartWith(
      `${join(dir, "pg-tide.toml")}: relay.postgres_url: cannot read ${join(dir, "secrets/pg_url")}: `,
    );
    expect(message.split("\n")).toHaveLength(1);
  });

  it("lists every failed reference in one message", () => {
    const text = `[relay]\npostgres_url = "\${env:A}"\nrelay_group_id = "\${env:B}"\n`;
    expect(configError(() => toml(text, {})).split("\n")).toEqual([
      "pg-tide.toml: relay.postgres_url: environment variable A is not set",
      "pg-tide.toml: relay.relay_group_id: environment variable B is not set",
    ]);
  });

  it("rejects ${...} that is not an env or file reference, pointing at the $${ escape", () => {
    const message = configError(() => toml(`[relay]\nmetrics_addr = "\${HOST}:9090"\n`));
    expect(message).toStartWith('pg-tide.toml: relay.metrics_addr: "${HOST}" is not a reference');
    expect(message).toContain("$${ is a literal ${");
    expect(configError(() => toml(`[relay]\nmetrics_addr = "x\${"\n`))).toContain(
      'relay.metrics_addr: "${" is not a reference',
    );
  });

  it("quotes the reference, not the resolved secret, when the resolved value has the wrong type", () => {
    const message = configError(() => toml(`${FORWARD}batch_size = "\${env:KAFKA_PASSWORD}"\n`));
    expect(message).toBe('pg-tide.toml: pipelines[0].batch_size: expected a number (got "${env:KAFKA_PASSWORD}")');
    expect(message).not.toContain("kafka-secret");
  });
});

describe("manifest validation", () => {
  it("names unknown keys at the top level, in [relay] and in a pipeline, with near-miss suggestions", () => {
    const text = [
      "[relays]",
      "[relay]",
      'postgress_url = "postgres://x"',
      'colour = "blue"',
      FORWARD,
      "batchsize = 10",
    ].join("\n");
    expect(configError(() => toml(text)).split("\n").sort()).toEqual([
      'pg-tide.toml: pipelines[0].batchsize: unknown key (did you mean "batch_size"?)',
      'pg-tide.toml: relays: unknown key (did you mean "relay"?)',
      'pg-tide.toml: relay.postgress_url: unknown key (did you mean "postgres_url"?)',
      "pg-tide.toml: relay.colour: unknown key",
    ].sort());
  });

  it("leaves keys inside a pipeline's config to the plugin's schema", () => {
    const manifest = toml(`${FORWARD}[pipelines.config]\nanything = { goes = [1, "two"] }\n`);
    expect(manifest.pipelines[0].config).toEqual({ anything: { goes: [1, "two"] } });
  });

  it("names the path, the value seen and what is expected for wrong types and values", () => {
    const text = [
      "[relay]",
      'max_pipelines = "ten"',
      "poll_interval_ms = 0",
      "drain_timeout = 1.5",
      'log_format = "yaml"',
      'metrics_addr = "localhost"',
      FORWARD,
      "batch_size = 100001",
      'enabled = "yes"',
      'config = "brokers=localhost"',
    ].join("\n");
    // One message lists every problem; their order follows the schema, so compare as sets.
    expect(configError(() => toml(text)).split("\n").sort()).toEqual([
      'pg-tide.toml: relay.max_pipelines: expected a number (got "ten")',
      "pg-tide.toml: relay.poll_interval_ms: must be at least 1 (got 0)",
      "pg-tide.toml: relay.drain_timeout: expected an integer (got 1.5)",
      'pg-tide.toml: relay.log_format: expected one of "text", "json" (got "yaml")',
      'pg-tide.toml: relay.metrics_addr: must be "host:port" or "off" (got "localhost")',
      "pg-tide.toml: pipelines[0].batch_size: must be at most 100000 (got 100001)",
      'pg-tide.toml: pipelines[0].enabled: expected a boolean (got "yes")',
      'pg-tide.toml: pipelines[0].config: expected a table (got "brokers=localhost")',
    ].sort());
  });

  it("says object rather than table in JSON manifests, and rejects an array as config", () => {
    const json = JSON.stringify({
      pipelines: [{ name: "p", outbox: "o", sink_type: "stdout", config: [1] }],
      relay: [],
    });
    expect(configError(() => parseManifest(json, "json", "pg-tide.json", ENV)).split("\n")).toEqual([
      "pg-tide.json: relay: expected an object (got an array)",
      "pg-tide.json: pipelines[0].config: expected an object (got an array)",
    ]);
  });

  it("requires [[pipelines]] to be an array of tables with a valid name", () => {
    expect(configError(() => toml('[pipelines]\nname = "p"\n'))).toBe(
      "pg-tide.toml: pipelines: expected an array (got a table)",
    );
    expect(configError(() => toml('[[pipelines]]\noutbox = "o"\nsink_type = "stdout"\n'))).toBe(
      "pg-tide.toml: pipelines[0].name: required, expected a string",
    );
    expect(configError(() => toml('[[pipelines]]\nname = "9 lives"\noutbox = "o"\nsink_type = "stdout"\n')))
      .toStartWith(
        'pg-tide.toml: pipelines[0].name: must use letters, digits, "_" and "-", start with a letter or "_"',
      );
  });

  it("rejects duplicate pipeline names, pointing at both", () => {
    expect(configError(() => toml(FORWARD + FORWARD))).toBe(
      'pg-tide.toml: pipelines[1].name: duplicate pipeline name "p" (also pipelines[0])',
    );
  });
});

describe("pipeline direction", () => {
  it("is forward with outbox + sink_type and reverse with inbox + source_type", () => {
    const manifest = toml(`${FORWARD}[[pipelines]]\nname = "r"\ninbox = "payments"\nsource_type = "nats"\n`);
    expect(manifest.pipelines.map((p) => [p.name, p.direction])).toEqual([["p", "forward"], ["r", "reverse"]]);
  });

  it("is an error naming the pipeline when both, neither or a mix are given", () => {
    const cases: [string, string][] = [
      ['outbox = "o"\nsink_type = "kafka"\ninbox = "i"\nsource_type = "nats"', "outbox, sink_type, inbox, source_type"],
      ["", "none of them"],
      ['outbox = "o"\nsource_type = "nats"', "outbox, source_type"],
      ['outbox = "o"', "outbox"],
    ];
    for (const [body, given] of cases) {
      expect(configError(() => toml(`[[pipelines]]\nname = "mixed"\n${body}\n`))).toBe(
        'pg-tide.toml: pipelines[0] ("mixed"): cannot tell the direction: a forward pipeline sets outbox and sink_type, ' +
          `a reverse one inbox and source_type (got ${given})`,
      );
    }
  });

  it("rejects settings that belong to the other direction", () => {
    const reverse = '[[pipelines]]\nname = "r"\ninbox = "i"\nsource_type = "nats"\nconsumer_group = "g"\n';
    expect(configError(() => toml(reverse))).toBe(
      "pg-tide.toml: pipelines[0].consumer_group: only forward pipelines have a consumer group",
    );
    expect(configError(() => toml(`${FORWARD}idempotent = true\n`))).toBe(
      "pg-tide.toml: pipelines[0].idempotent: only reverse pipelines take idempotent",
    );
  });

  it("rejects a config.sink_type that disagrees with the pipeline's sink_type", () => {
    expect(configError(() => toml(`${FORWARD}[pipelines.config]\nsink_type = "kafka"\n`))).toBe(
      'pg-tide.toml: pipelines[0].config.sink_type: "kafka" disagrees with sink_type "stdout"',
    );
  });
});

describe("manifest plugins", () => {
  it("resolves plugin paths against the manifest's directory and keeps absolute ones", () => {
    const text =
      '[plugins]\naudit = "./plugins/audit.ts"\nup = "../shared/up.mjs"\nabs = "/opt/tide/abs.js"\nm = "m.mts"\n';
    const manifest = parseManifest(text, "toml", "/etc/tide/pg-tide.toml", ENV);
    expect(manifest.plugins).toEqual({
      audit: "/etc/tide/plugins/audit.ts",
      up: "/etc/shared/up.mjs",
      abs: "/opt/tide/abs.js",
      m: "/etc/tide/m.mts",
    });
  });

  it("resolves a relative manifest path against the working directory", () => {
    const manifest = parseManifest('[plugins]\naudit = "audit.ts"\n', "toml", "conf/pg-tide.toml", ENV);
    expect(manifest.plugins.audit).toBe(resolve("conf/audit.ts"));
  });

  it("rejects a plugin path with another extension, and a non-string path", () => {
    expect(configError(() => toml('[plugins]\naudit = "./audit.py"\n'))).toBe(
      'pg-tide.toml: plugins.audit: a plugin path must end in .ts, .js, .mjs or .mts (got "./audit.py")',
    );
    expect(configError(() => toml("[plugins]\naudit = 3\n"))).toBe(
      'pg-tide.toml: plugins.audit: must be a file path, or a table like { path = "./my_sink.ts", override = true } (got 3)',
    );
  });
});
