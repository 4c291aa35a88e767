// The catalog's required keys (tide.plugin_types) come from the plugins' config schemas: the seed of
// the built-in types equals what their schemas require, and a relay registers what the schemas of
// the types it loads require, a drop-in's and a replaced built-in's included.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { z } from "zod";
import type { PluginDefinition } from "../../core/plugin.ts";
import { registerPluginTypes, requiredKeysOf } from "../../core/plugins.ts";
import { builtinPlugins } from "../../plugins/registry.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";
import { expectError } from "../support/seeds.ts";

let db: TestDatabase;

beforeAll(async () => {
  db = await createTestDatabase();
  await db.sql`SELECT tide.outbox_create('orders')`;
});
afterAll(() => db.drop());

/** Groups and the keys in each, sorted: neither order means anything to the catalog. */
const normalized = (groups: string[][]) => groups.map((group) => [...group].sort()).sort((a, b) => a.join().localeCompare(b.join()));

async function catalog(): Promise<Record<string, string[][]>> {
  const rows = await db.sql<{ kind: string; type: string; required_keys: string[][] }[]>`
    SELECT kind, type, required_keys FROM tide.plugin_types WHERE builtin ORDER BY kind, type`;
  return Object.fromEntries(rows.map((r) => [`${r.kind} ${r.type}`, normalized(r.required_keys)]));
}

const fromSchemas = () => Object.fromEntries(builtinPlugins.map((d) => [`${d.kind} ${d.type}`, normalized(requiredKeysOf(d))]));

function sink(type: string, config: z.ZodType): PluginDefinition {
  return {
    type, kind: "sink", summary: "test sink", config, example: {},
    create: () => ({ async connect() {}, async publish() { return []; }, async close() {} }),
  };
}

describe("plugin types in the catalog", () => {
  it("the seed of every built-in type holds the required keys its config schema states", async () => {
    const derived = fromSchemas();
    expect(derived["sink kafka"]).toEqual([["brokers"], ["topic", "topic_template"]]);
    expect(await catalog()).toEqual(derived);
  });

  it("registers a drop-in's required keys from its schema, alternatives included, and the catalog checks them", async () => {
    const pigeon = sink("pigeon", z.strictObject({ loft: z.string(), ring: z.string().optional(), ring_template: z.string().optional() })
      .meta({ anyOf: [{ required: ["ring"] }, { required: ["ring_template"] }] }));
    await registerPluginTypes(db.sql, [pigeon]);
    await expectError(db.sql`SELECT tide.relay_set_outbox('birds', 'orders', 'pigeon', '{"loft": "roof"}'::jsonb)`,
      `pipeline "birds": pigeon config needs 'ring' or 'ring_template'`);
    await expectError(db.sql`SELECT tide.relay_set_outbox('birds', 'orders', 'pigeon', '{"ring": "r1"}'::jsonb)`,
      `pipeline "birds": pigeon config needs 'loft'`);
    await db.sql`SELECT tide.relay_set_outbox('birds', 'orders', 'pigeon', '{"loft": "roof", "ring_template": "{op}"}'::jsonb)`;
  });

  it("a drop-in that replaces a built-in type brings its keys, and the built-in's come back with the built-in", async () => {
    const webhook = sink("webhook", z.strictObject({ endpoint: z.string() }));
    await registerPluginTypes(db.sql, [webhook]);
    await db.sql`SELECT tide.relay_set_outbox('own-hook', 'orders', 'webhook', '{"endpoint": "queue-7"}'::jsonb)`;
    await expectError(db.sql`SELECT tide.relay_set_outbox('own-hook-2', 'orders', 'webhook', '{"url": "https://x.example"}'::jsonb)`,
      `pipeline "own-hook-2": webhook config needs 'endpoint'`);

    await registerPluginTypes(db.sql, builtinPlugins);
    expect(await catalog()).toEqual(fromSchemas());
    await expectError(db.sql`SELECT tide.relay_set_outbox('own-hook-3', 'orders', 'webhook', '{"endpoint": "queue-7"}'::jsonb)`,
      `pipeline "own-hook-3": webhook config needs 'url' or 'url_template'`);
  });

  it("a schema that cannot say which keys it requires registers none: the catalog checks no keys it cannot know", async () => {
    const opaque: PluginDefinition = {
      ...sink("opaque", z.any()),
      config: { "~standard": { version: 1, vendor: "elsewhere", validate: (value: unknown) => ({ value }) } },
    };
    expect(requiredKeysOf(opaque)).toEqual([]);
    await registerPluginTypes(db.sql, [opaque]);
    await db.sql`SELECT tide.relay_set_outbox('opaque-1', 'orders', 'opaque', '{}'::jsonb)`;
  });
});
