// Secrets are masked the same way in SQL (relay_get_config) and in TypeScript (logs, status, API).

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { redactConfig } from "../../core/redact.ts";
import { createTestDatabase, type TestDatabase } from "../support/postgres.ts";

let db: TestDatabase;
beforeAll(async () => void (db = await createTestDatabase()));
afterAll(() => db.drop());

const CASES: Record<string, unknown>[] = [
  { url: "nats://relay:s3cret@nats:4222", subject: "a.b" },
  { url: "nats://relay:p@ss@nats:4222" },
  { dsn: "host=db user=app password=kw-secret dbname=x", other: "password='two words' port=5" },
  { token: "t", api_key: "k", apiKey: "k2", client_secret: "c", Authorization: "Bearer x", cookie: "c=1" },
  { sasl: { mechanism: "plain", username: "u", password: "p" }, ssl: { passphrase: "pp", ca: "CA" } },
  { credentials: { username: "u", region: "eu" }, tokens: ["a", "b"], hosts: ["h1", "h2"] },
  { token: 12345, secret: true, password: null, headers: { "X-Api-Key": "k", Accept: "json" } },
  { signing: { scheme: "hmac-sha256", secret: "whsec_abc" }, brokers: ["kafka:9092"] },
  { ssl: { key: "-----BEGIN PRIVATE KEY-----\nMIIEv\n-----END PRIVATE KEY-----", cert: "-----BEGIN CERTIFICATE-----" }, key: "{event_type}" },
];

describe("redaction", () => {
  for (const [i, config] of CASES.entries()) {
    it(`masks case ${i + 1} identically in SQL and TypeScript`, async () => {
      const [{ redacted }] = await db.sql`SELECT tide.redact(${db.sql.json(config as any)}::jsonb) AS redacted`;
      expect(redacted).toEqual(redactConfig(config));
      expect(JSON.stringify(redacted)).not.toMatch(/s3cret|p@ss|kw-secret|two words|whsec_abc|Bearer x|MIIEv/);
    });
  }
});
