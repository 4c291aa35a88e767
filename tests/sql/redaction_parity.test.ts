// Secrets are masked the same way in SQL (relay_get_config) and in TypeScript (logs, status, API).

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import { redactConfig, redactText } from "../../core/redact.ts";
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
  { url: "https://hookuser:pw-77@hooks.example.com/in?token=QueryTok77&page=2", callback: "https://app/cb?a=1&access_token=at-9#top" },
  {
    presigned: "https://s3.example.com/b/o?X-Amz-Credential=AKIA1%2F20260101&X-Amz-Expires=60&X-Amz-Signature=5ig9",
    maps: "https://maps.example.com/api?key=AIzaKey&monkey=banana&sig=sas5ig&ApiKey=K2ey&api_key=",
  },
  { note: 'failed: "POST http://h/?secret=qu0ted" answered 500', plain: "token=not-a-query key=kept", dsn: "postgres://h/db?sslpassword=ss1&sslmode=require" },
  { servers: ["nats://NatsTok3n@nats-1:4222", "tls://relay:pw-tls@nats-2"], repo: "https://ghp_G1tTok@github.com/acme/x.git" },
  { headers: { "X-Forward": "Bearer eyJ.be4rer-x_y", Via: "Basic dXNlcjpiYXNpYw==" }, note: "token type: Bearer (see docs)" },
  {
    echoed: 'POST https://h/in answered 401: {"error":"denied","headers":{"authorization":"Bearer Ech0ed","x-api-key":["K3yList"],"accept":"*/*"}}',
    lines: "Authorization: Digest username=dig3st\r\nAccept: */*\nCookie: sid=c00kie; theme=dark",
  },
  { text: '{"password": "with \\"quote\\" inside", "user": "kept", "client_secret":"cs-1"}', unterminated: "dsn password='open-quote" },
];

describe("redaction", () => {
  for (const [i, config] of CASES.entries()) {
    it(`masks case ${i + 1} identically in SQL and TypeScript`, async () => {
      const [{ redacted }] = await db.sql`SELECT tide.redact(${db.sql.json(config as any)}::jsonb) AS redacted`;
      expect(redacted).toEqual(redactConfig(config));
      expect(JSON.stringify(redacted)).not.toMatch(
        /s3cret|p@ss|kw-secret|two words|whsec_abc|Bearer x|MIIEv|pw-77|QueryTok77|at-9|AKIA1|5ig9|AIzaKey|sas5ig|K2ey|qu0ted|ss1|NatsTok3n|pw-tls|ghp_G1tTok|be4rer|dXNlcjpiYXNpYw|Ech0ed|K3yList|dig3st|c00kie|quote|cs-1|open-quote/,
      );
    });
  }
});

describe("query parameter redaction", () => {
  it("masks secret parameters and keeps the rest of the URL readable, in SQL and TypeScript", async () => {
    const config = { url: "https://hooks.example.com/in?page=2&token=QueryTok77&monkey=banana&sig=&X-Amz-Signature=5ig9#top" };
    const expected = { url: "https://hooks.example.com/in?page=2&token=***&monkey=banana&sig=&X-Amz-Signature=***#top" };
    const [{ redacted }] = await db.sql`SELECT tide.redact(${db.sql.json(config)}::jsonb) AS redacted`;
    expect(redacted).toEqual(expected);
    expect(redactConfig(config)).toEqual(expected);
  });
});

describe("text redaction in SQL and TypeScript", () => {
  it("keeps what is not a credential readable", async () => {
    const config = {
      note: 'POST https://hooks.example.com/in answered 401: {"error":"denied","user":"kept","Accept":"*/*"}',
      broker: "nats://nats-1:4222",
      mail: "ops@example.com",
    };
    const [{ redacted }] = await db.sql`SELECT tide.redact(${db.sql.json(config)}::jsonb) AS redacted`;
    expect(redacted).toEqual(config);
    expect(redactConfig(config)).toEqual(config);
  });

  it("masks the same shapes, one by one", async () => {
    const texts = [
      "nats://T0k@host:4222",
      "Authorization: Bearer abc\nnext: line",
      '{"authorization": ["Basic Zm9vOmJhcg=="], "n": 1}',
      "retry with Bearer abc.def~g or Basic Zm9v",
      "Set-Cookie: sid=1; Path=/",
      "password='unterminated",
    ];
    for (const text of texts) {
      const [{ redacted }] = await db.sql`SELECT tide.redact(to_jsonb(${text}::text)) #>> '{}' AS redacted`;
      expect(redacted).toBe(redactText(text));
    }
  });
});
