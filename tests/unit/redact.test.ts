import { describe, expect, it } from "bun:test";
import { REDACTED, SECRET_KEY_PATTERN, redactConfig, redactText } from "../../core/redact.ts";

describe("config redaction", () => {
  it("masks values under secret-looking keys, whatever their case or affixes", () => {
    const config = {
      password: "p1",
      PASSWD: "p2",
      client_secret: "s",
      authToken: "t",
      api_key: "k1",
      apiKey: "k2",
      "api-key": "k3",
      credential: "c",
      private_key: "pk",
      Authorization: "Bearer x",
      signing_key: "sk",
      sasl_password: "sp",
      brokers: ["kafka:9092"],
      timeout_ms: 5000,
    };
    expect(redactConfig(config)).toEqual({
      password: REDACTED,
      PASSWD: REDACTED,
      client_secret: REDACTED,
      authToken: REDACTED,
      api_key: REDACTED,
      apiKey: REDACTED,
      "api-key": REDACTED,
      credential: REDACTED,
      private_key: REDACTED,
      Authorization: REDACTED,
      signing_key: REDACTED,
      sasl_password: REDACTED,
      brokers: ["kafka:9092"],
      timeout_ms: 5000,
    });
  });

  it("walks into ordinary objects, and masks everything inside an object under a secret key", () => {
    const config = {
      sasl: { mechanism: "scram-sha-512", username: "relay", password: "hunter2" },
      credentials: { username: "u", token: "t", region: "eu" },
    };
    expect(redactConfig(config)).toEqual({
      sasl: { mechanism: "scram-sha-512", username: "relay", password: REDACTED },
      credentials: { username: REDACTED, token: REDACTED, region: REDACTED },
    });
  });

  it("masks every element of a list under a secret key", () => {
    expect(redactConfig({ tokens: ["a", "b"], hosts: ["a", "b"] })).toEqual({ tokens: [REDACTED, REDACTED], hosts: ["a", "b"] });
  });

  it("masks non-string secrets but keeps null so that 'not set' stays visible", () => {
    expect(redactConfig({ token: 12345, secret: true, password: null })).toEqual({
      token: REDACTED,
      secret: REDACTED,
      password: null,
    });
  });

  it("masks URL passwords in any string value, at any depth", () => {
    const config = {
      postgres_url: "postgres://relay:s3cret@db.internal:5432/app",
      sinks: [{ url: "https://hook:pw@hooks.example.com/in", brokers: "nats://nats:4222" }],
    };
    expect(redactConfig(config)).toEqual({
      postgres_url: "postgres://relay:***@db.internal:5432/app",
      sinks: [{ url: "https://hook:***@hooks.example.com/in", brokers: "nats://nats:4222" }],
    });
  });

  it("returns a copy and leaves the input untouched", () => {
    const config = { nested: { password: "p" } };
    const copy = redactConfig(config);
    expect(config.nested.password).toBe("p");
    expect(copy).not.toBe(config);
  });

  it("keeps a JSON key named __proto__ as plain data", () => {
    const config = JSON.parse('{"__proto__": {"password": "p"}, "a": 1}');
    const copy = redactConfig(config) as Record<string, unknown>;
    expect(Object.getPrototypeOf(copy)).toBe(Object.prototype);
    expect(JSON.stringify(copy)).toBe('{"__proto__":{"password":"***"},"a":1}');
  });
});

describe("text redaction", () => {
  it("masks the password of URLs in free text and keeps the user and host", () => {
    expect(redactText("connect to postgres://relay:s3cret@db:5432/app failed")).toBe(
      "connect to postgres://relay:***@db:5432/app failed",
    );
  });

  it("masks a password containing @ up to the host", () => {
    expect(redactText("postgres://relay:p@ss@db/app")).toBe("postgres://relay:***@db/app");
  });

  it("masks an empty user and several URLs on one line", () => {
    expect(redactText('redis://:pw@cache and "amqp://u:x@mq"')).toBe('redis://:***@cache and "amqp://u:***@mq"');
  });

  it("leaves URLs without a password alone", () => {
    const text = "GET http://localhost:8080/a?x=1 from user@example.com via https://user@host/";
    expect(redactText(text)).toBe(text);
  });

  it("masks password=... pairs of connection strings", () => {
    expect(redactText("host=db password=s3cret user=relay")).toBe("host=db password=*** user=relay");
    expect(redactText("host=db password='a b' user=relay")).toBe("host=db password=*** user=relay");
    expect(redactText("postgres://db/app?sslpassword=k&user=relay")).toBe("postgres://db/app?sslpassword=***&user=relay");
  });

  it("masks query parameters with a secret name and keeps the others", () => {
    expect(redactText("POST https://hooks.example.com/in?page=2&token=QueryTok77&monkey=banana#top failed")).toBe(
      "POST https://hooks.example.com/in?page=2&token=***&monkey=banana#top failed",
    );
    expect(redactText("GET /cb?access_token=a1&ApiKey=k2&client_secret=c3&X-Amz-Credential=AKIA&X-Amz-Signature=s4")).toBe(
      "GET /cb?access_token=***&ApiKey=***&client_secret=***&X-Amz-Credential=***&X-Amz-Signature=***",
    );
    expect(redactText('{"url":"https://maps.example.com/api?key=AIza&sig=sas&keyword=x"}')).toBe(
      '{"url":"https://maps.example.com/api?key=***&sig=***&keyword=x"}',
    );
  });

  it("leaves empty query values and secret-looking words outside a query alone", () => {
    const text = "GET /in?token=&page=1 with token=abc and key=orders";
    expect(redactText(text)).toBe(text);
  });

  it("is idempotent", () => {
    const once = redactText("postgres://relay:s3cret@db/app?token=t password=x");
    expect(redactText(once)).toBe(once);
  });
});

describe("SECRET_KEY_PATTERN", () => {
  it("is usable as a PostgreSQL regular expression: no lookarounds, no \\b", () => {
    expect(SECRET_KEY_PATTERN.flags).toBe("i");
    expect(SECRET_KEY_PATTERN.source).not.toMatch(/\(\?|\\b/);
  });

  it("does not match ordinary keys", () => {
    for (const key of ["url", "brokers", "topic", "username", "mechanism", "timeout_ms", "subject"]) {
      expect(SECRET_KEY_PATTERN.test(key)).toBe(false);
    }
  });
});
