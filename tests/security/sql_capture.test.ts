// Table capture cannot be turned into a way to run code as the schema owner, and its bookkeeping
// belongs to each table's owner. Every attack is made by a LOGIN role that holds only tide_publisher,
// connected with its own URL: a cast to json on a captured column type, a hand-made trigger on
// tide.capture_trigger() with a temporary view standing in for its transition table, forged capture
// events, and another publisher's capture and backfill bookkeeping. Trigger names of outboxes whose
// names share a long prefix never collide.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { connect, type Sql } from "../../core/db.ts";
import { createTestDatabase, loginRole, type TestDatabase } from "../support/postgres.ts";
import { expectError } from "../support/seeds.ts";

const SECRET = "whsec_capture_test_secret";
/** The LOGIN roles: three publishers, and a writer that holds no tide role at all. */
const GRANTS = { attacker: "tide_publisher", alice: "tide_publisher", bob: "tide_publisher", writer: null } as const;
type Name = keyof typeof GRANTS;

let db: TestDatabase;
const roles = {} as Record<Name, string>;
const sessions = {} as Record<Name, Sql>;

beforeAll(async () => {
  db = await createTestDatabase();
  await db.sql`SELECT tide.outbox_create('orders')`;
  await db.sql`SELECT tide.relay_set_outbox('orders-hook', 'orders', 'webhook',
    ${db.sql.json({ url: "https://hooks.example.com", signing: { secret: SECRET } })})`;
  for (const name of Object.keys(GRANTS) as Name[]) {
    const role = await loginRole(db, GRANTS[name], `cap_${name}`);
    roles[name] = role.name;
    // One connection each: temporary objects live in a session.
    sessions[name] = connect(role.url, { max: 1 });
  }
  await db.sql.unsafe(`
    CREATE TABLE alice_orders (id int PRIMARY KEY, total int);
    ALTER TABLE alice_orders OWNER TO ${roles.alice};
    GRANT INSERT ON alice_orders TO ${roles.writer};`);
});

afterAll(async () => {
  for (const session of Object.values(sessions)) await session.end();
  await db.drop();
});

/** The messages of outbox "orders" whose topic is LIKE `topic`. */
const messages = async (topic: string) =>
  await db.sql`SELECT payload, headers FROM tide.outbox_messages WHERE outbox = 'orders' AND topic LIKE ${topic} ORDER BY id`;

/** A temporary table `loot` and a function that records who runs it and tries to read every pipeline config. */
const LOOT = `
  CREATE TEMP TABLE IF NOT EXISTS loot (who text, secret text);
  CREATE OR REPLACE FUNCTION pg_temp.steal() RETURNS void LANGUAGE plpgsql AS $$
  BEGIN
    INSERT INTO pg_temp.loot VALUES (current_user::text, NULL);
    BEGIN
      UPDATE pg_temp.loot SET secret = (SELECT string_agg(config::text, ',') FROM tide.relay_pipelines);
    EXCEPTION WHEN insufficient_privilege THEN
      NULL;
    END;
  END $$;`;

async function loot(session: Sql) {
  return [...(await session`SELECT who, secret FROM pg_temp.loot`)];
}

describe("capture runs caller-defined code with the caller's rights only", () => {
  it("a cast to json on a captured column type runs as the writer and cannot read pipeline secrets", async () => {
    const attacker = sessions.attacker;
    await attacker.unsafe(`${LOOT}
      CREATE TYPE pg_temp.mood AS ENUM ('happy');
      CREATE FUNCTION pg_temp.mood_json(pg_temp.mood) RETURNS json LANGUAGE plpgsql AS $$
      BEGIN
        PERFORM pg_temp.steal();
        RETURN to_json($1::text);
      END $$;
      CREATE CAST (pg_temp.mood AS json) WITH FUNCTION pg_temp.mood_json(pg_temp.mood);
      CREATE TEMP TABLE moods (id int PRIMARY KEY, m pg_temp.mood);
      SELECT tide.capture_table('pg_temp.moods', 'orders');
      INSERT INTO moods VALUES (1, 'happy');`);

    expect(await loot(attacker)).toEqual([{ who: roles.attacker, secret: null }]);
    // The change itself is captured as usual, through the writer's cast.
    const [captured] = await messages("%.moods");
    expect(captured.payload).toEqual({ action: "insert", record: { id: 1, m: "happy" }, changes: null });
  });

  it("a hand-made trigger without transition tables refuses to run, so a temporary view cannot stand in for one", async () => {
    const attacker = sessions.attacker;
    await attacker.unsafe(`${LOOT}
      DELETE FROM loot;
      CREATE FUNCTION pg_temp.grab() RETURNS int LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_temp.steal(); RETURN 1; END $$;
      CREATE TEMP TABLE victim (id int PRIMARY KEY);
      CREATE TEMP VIEW tide_new_rows AS SELECT 1 AS id, pg_temp.grab() AS g;
      CREATE TRIGGER grab AFTER INSERT ON victim FOR EACH STATEMENT EXECUTE FUNCTION tide.capture_trigger('orders');`);

    await expectError(attacker`INSERT INTO victim VALUES (1)`, "trigger grab on", "was not created by tide.capture_table");
    expect(await loot(attacker)).toEqual([]);
    expect(await messages("%.victim")).toHaveLength(0);
  });

  it("a hand-made trigger with the transition tables publishes nothing, and neither does a direct call", async () => {
    const attacker = sessions.attacker;
    await attacker.unsafe(`
      CREATE TEMP TABLE forged (id int PRIMARY KEY);
      CREATE TRIGGER forge AFTER INSERT ON forged REFERENCING NEW TABLE AS tide_new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION tide.capture_trigger('orders', '{id}');`);
    await expectError(attacker`INSERT INTO forged VALUES (1)`, "trigger forge is not a capture recorded by tide.capture_table");

    // Alice's capture is real; a direct call naming its trigger is not a trigger firing.
    await sessions.alice`SELECT tide.capture_table('alice_orders', 'orders', ARRAY['insert'])`;
    const [{ trigger_names: [trigger] }] = await db.sql`
      SELECT trigger_names FROM tide.captures WHERE table_oid = 'alice_orders'::regclass`;
    await expectError(
      attacker`SELECT tide.capture_publish('alice_orders'::regclass, ${trigger},
      ARRAY[ROW('insert', '{"id": 666}', NULL, '{"id": 666}')::tide.capture_change])`,
      "is not a capture recorded by tide.capture_table",
    );
    expect(await messages("%.forged")).toHaveLength(0);
    expect(await messages("public.alice_orders")).toHaveLength(0);
    await sessions.alice`SELECT tide.uncapture_table('alice_orders', 'orders')`;
  });

  it("a role that writes to a captured table without tide_publisher is told to get it, and nothing is written", async () => {
    await sessions.alice`SELECT tide.capture_table('alice_orders', 'orders')`;
    const error = await expectError(sessions.writer`INSERT INTO alice_orders VALUES (100, 1)`,
      `role ${roles.writer} writes to this captured table but may not publish its changes`);
    expect(error.hint).toBe(`GRANT tide_publisher TO ${roles.writer}`);
    expect(await db.sql`SELECT * FROM alice_orders`).toHaveLength(0);

    await sessions.alice`INSERT INTO alice_orders VALUES (1, 10)`;
    expect((await messages("public.alice_orders")).map((m) => m.payload.record)).toEqual([{ id: 1, total: 10 }]);
    await sessions.alice`SELECT tide.uncapture_table('alice_orders', 'orders')`;
  });
});

describe("capture bookkeeping belongs to the table's owner", () => {
  it("another publisher cannot record a capture of a table it does not own, which would block the owner's", async () => {
    const bob = sessions.bob;
    // The attack on the earlier three-argument form: a capture recorded with no operations and no trigger.
    await bob`SELECT tide.capture_register('alice_orders'::regclass, 'orders', '{}'::text[])`.catch(() => {});
    await bob`INSERT INTO tide.captures (table_oid, outbox_name, operations, trigger_names)
              VALUES ('alice_orders'::regclass, 'orders', '{insert}', '{t}')`.catch(() => {});
    expect(await db.sql`SELECT * FROM tide.captures WHERE table_oid = 'alice_orders'::regclass`).toHaveLength(0);

    await sessions.alice`SELECT tide.capture_table('alice_orders', 'orders')`;
    await sessions.alice`INSERT INTO alice_orders VALUES (2, 20)`;
    expect((await messages("public.alice_orders")).at(-1)!.payload.record).toEqual({ id: 2, total: 20 });

    await expectError(bob`SELECT tide.capture_register('alice_orders'::regclass, 'orders', '{insert}', '{t}')`,
      "only the table's owner can capture it", roles.bob);
    await expectError(bob`INSERT INTO tide.captures (table_oid, outbox_name, operations, trigger_names)
                          VALUES ('alice_orders'::regclass, 'orders', '{insert}', '{t}')`, "row-level security");
  });

  it("an empty operation list is refused, also to the table's owner", async () => {
    await expectError(sessions.alice`SELECT tide.capture_register('alice_orders'::regclass, 'orders', '{}', '{}')`,
      "operations must be a non-empty list of insert, update, delete", "an empty list");
    await expectError(sessions.alice`SELECT tide.capture_table('alice_orders', 'orders', '{}')`,
      "operations must be a non-empty list");
  });

  it("a finished backfill keeps the key of the last row it published", async () => {
    // Two rows in chunks of one: the third, empty chunk finishes the backfill.
    await sessions.alice`CALL tide.capture_backfill('alice_orders', 'orders', 1)`;
    const [progress] = await db.sql`SELECT last_key, rows_done, finished_at FROM tide.capture_backfills`;
    expect(progress).toMatchObject({ last_key: { id: 2 }, rows_done: 2n });
    expect(progress.finished_at).not.toBeNull();
  });

  it("another publisher cannot forge, reset or forget the owner's backfill and capture", async () => {
    const bob = sessions.bob;
    const progress = async () => [...(await db.sql`SELECT last_key, rows_done, finished_at FROM tide.capture_backfills`)];
    const before = await progress();
    expect(before).toHaveLength(1);
    const reads = async () => (await messages("public.alice_orders")).filter((m) => m.payload.action === "read").length;
    const readsBefore = await reads();

    // Each attempt first, then what it must not have changed, then the errors the API gives.
    const forge = () => bob`SELECT tide.capture_backfill_publish('alice_orders'::regclass, 'orders', '[{"id": 999, "total": 0}]'::jsonb, 1000)`;
    const reset = () => bob`SELECT tide.capture_backfill_reset('alice_orders'::regclass, 'orders')`;
    await forge().catch(() => {});
    await reset().catch(() => {});
    await bob`SELECT tide.capture_unregister('alice_orders'::regclass, 'orders')`.catch(() => {});
    await bob`SELECT tide.uncapture_table('alice_orders'::regclass, 'orders')`.catch(() => {});
    await bob`DELETE FROM tide.capture_backfills`.catch(() => {});
    await bob`DELETE FROM tide.captures`.catch(() => {});
    expect(await progress()).toEqual(before);
    expect(await reads()).toBe(readsBefore);
    expect(await db.sql`SELECT * FROM tide.captures WHERE table_oid = 'alice_orders'::regclass`).toHaveLength(1);

    await expectError(forge(), "only the table's owner can backfill it");
    await expectError(reset(), "only the table's owner can backfill it");
    await expectError(bob`SELECT tide.capture_unregister('alice_orders'::regclass, 'orders')`, "only the table's owner can uncapture it");
    await expectError(bob`SELECT tide.uncapture_table('alice_orders'::regclass, 'orders')`, "only the table's owner can uncapture it");
    await sessions.alice`SELECT tide.uncapture_table('alice_orders', 'orders')`;
    expect(await db.sql`SELECT * FROM tide.capture_backfills`).toHaveLength(0);
  });
});

describe("capture trigger names", () => {
  // 13 + 7 + 50 characters: "tide_capture_insert_" and the outbox name are longer than 63 together.
  const prefix = "shipments_".repeat(5);
  const [first, second] = [`${prefix}_eu`, `${prefix}_us`];

  it("two outboxes whose names share a long prefix capture the same table, and uncapturing one keeps the other", async () => {
    const alice = sessions.alice;
    await db.sql`SELECT tide.outbox_create(${first})`;
    await db.sql`SELECT tide.outbox_create(${second})`;
    await db.sql.unsafe(`CREATE TABLE shipments (id int PRIMARY KEY, state text); ALTER TABLE shipments OWNER TO ${roles.alice}`);
    await alice`SELECT tide.capture_table('shipments', ${first})`;
    await alice`SELECT tide.capture_table('shipments', ${second})`;
    const triggers = await db.sql`SELECT tgname FROM pg_trigger WHERE tgrelid = 'shipments'::regclass`;
    expect(triggers).toHaveLength(6);
    expect(triggers.every((t) => t.tgname.length <= 63)).toBe(true);

    const count = async (outbox: string) =>
      (await db.sql`SELECT count(*)::int AS n FROM tide.outbox_messages WHERE outbox = ${outbox}`)[0].n;
    await alice`INSERT INTO shipments VALUES (1, 'packed')`;
    await alice`UPDATE shipments SET state = 'sent'`;
    await alice`DELETE FROM shipments`;
    expect([await count(first), await count(second)]).toEqual([3, 3]);

    await alice`SELECT tide.uncapture_table('shipments', ${first})`;
    await alice`INSERT INTO shipments VALUES (2, 'packed')`;
    await alice`UPDATE shipments SET state = 'sent'`;
    await alice`DELETE FROM shipments`;
    expect([await count(first), await count(second)]).toEqual([3, 6]);
    expect(await db.sql`SELECT tgname FROM pg_trigger WHERE tgrelid = 'shipments'::regclass`).toHaveLength(3);
    await alice`SELECT tide.uncapture_table('shipments', ${second})`;
    expect(await db.sql`SELECT tgname FROM pg_trigger WHERE tgrelid = 'shipments'::regclass`).toHaveLength(0);
  });

  it("a trigger of the table's own that has the name capture would pick does not stop or confuse capture", async () => {
    const alice = sessions.alice;
    await db.sql`CREATE FUNCTION audit_noop() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$`;
    await alice.unsafe(`
      CREATE TRIGGER tide_capture_insert_orders AFTER INSERT ON shipments FOR EACH STATEMENT EXECUTE FUNCTION audit_noop();`);
    await alice`SELECT tide.capture_table('shipments', 'orders', ARRAY['insert'])`;
    await alice`INSERT INTO shipments VALUES (3, 'packed')`;
    expect((await messages("public.shipments")).map((m) => m.payload.record)).toEqual([{ id: 3, state: "packed" }]);
    await alice`SELECT tide.uncapture_table('shipments', 'orders')`;
    expect((await db.sql`SELECT tgname FROM pg_trigger WHERE tgrelid = 'shipments'::regclass`).map((t) => t.tgname))
      .toEqual(["tide_capture_insert_orders"]);
  });
});
