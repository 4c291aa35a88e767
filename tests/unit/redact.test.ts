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

  it("leaves URLs without userinfo, and e-mail addresses, alone", () => {
    const text = "GET http://localhost:8080/a?x=1 from user@example.com via https://host/path@x";
    expect(redactText(text)).toBe(text);
  });

  it("masks URL userinfo without a colon: it is a token", () => {
    expect(redactText("cannot connect to NATS nats://s3cr3tT0ken@nats-1:4222")).toBe("cannot connect to NATS nats://***@nats-1:4222");
    expect(redactText("clone https://ghp_abc@github.com/acme/x.git")).toBe("clone https://***@github.com/acme/x.git");
  });

  it("masks Bearer and Basic credentials wherever they stand", () => {
    expect(redactText("sent Bearer eyJhbGciOi.J9-x_y~z to the target")).toBe("sent Bearer *** to the target");
    expect(redactText("header Basic dXNlcjpwYXNz== rejected")).toBe("header Basic *** rejected");
    expect(redactConfig({ headers: { "X-Upstream": "Bearer abc" } })).toEqual({ headers: { "X-Upstream": "Bearer ***" } });
  });

  it("masks Authorization and Cookie header lines, up to the end of the line", () => {
    expect(redactText("Authorization: Digest username=u, response=abc\nAccept: */*")).toBe("Authorization: ***\nAccept: */*");
    expect(redactText("cookie: sid=1; theme=dark")).toBe("cookie: ***");
  });

  it("masks JSON pairs under a secret-looking key, as a target that echoes the request writes them", () => {
    const body = '{"headers":{"Authorization":"Token t0k","X-Api-Key":["k1","k2"],"Accept":"*/*"},"password":"a\\"b","user":"u"}';
    expect(redactText(body)).toBe('{"headers":{"Authorization":"***","X-Api-Key":["***","k2"],"Accept":"*/*"},"password":"***","user":"u"}');
  });

  it("masks a quoted password without its closing quote to the end", () => {
    expect(redactText("host=db password='never closed")).toBe("host=db password=***");
  });

  it("gets through long hostile input: every pattern scans in linear time", () => {
    // Quadratic patterns need minutes for these (and block the event loop meanwhile); linear ones, milliseconds.
    const inputs = ["a".repeat(400_000), `?${"token".repeat(80_000)}`, `"${"secret".repeat(70_000)}`, "password='".repeat(40_000)];
    for (const input of inputs) expect(redactText(input).length).toBeGreaterThan(0);
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
    const once = redactText('postgres://relay:s3cret@db/app?token=t password=x nats://tok@h Bearer b {"token": "j"} Cookie: c');
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
