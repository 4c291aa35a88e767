import { describe, expect, it } from "bun:test";
import { DeliveryError } from "../../core/errors.ts";
import { createLogger, type LogFormat, type LogLevel } from "../../core/log.ts";

const TIME = new Date("2026-11-22T07:00:00.000Z");

function capture(format: LogFormat, level: LogLevel = "debug") {
  const lines: string[] = [];
  const logger = createLogger({ level, format, write: (line) => lines.push(line), now: () => TIME });
  return { logger, lines };
}

describe("text logs", () => {
  it("write time, padded level, message and fields on one line", () => {
    const { logger, lines } = capture("text");
    logger.info("batch delivered", { pipeline: "orders", count: 3, ok: true });
    logger.error("sink down");
    expect(lines).toEqual([
      "2026-11-22T07:00:00.000Z INFO  batch delivered pipeline=orders count=3 ok=true\n",
      "2026-11-22T07:00:00.000Z ERROR sink down\n",
    ]);
  });

  it("quote values a reader could misparse and print objects as JSON", () => {
    const { logger, lines } = capture("text");
    logger.warn("odd", { reason: "two words", empty: "", eq: "a=b", detail: { n: 1 }, none: null });
    expect(lines[0]).toBe('2026-11-22T07:00:00.000Z WARN  odd reason="two words" empty="" eq="a=b" detail={"n":1} none=null\n');
  });

  it("keep a multi-line message on one line", () => {
    const { logger, lines } = capture("text");
    logger.info("first\nsecond", { detail: "a\nb" });
    expect(lines).toEqual(['2026-11-22T07:00:00.000Z INFO  first\\nsecond detail="a\\nb"\n']);
  });

  it("render an Error as its message plus its code", () => {
    const { logger, lines } = capture("text");
    logger.error("publish failed", { error: new DeliveryError("answered 500") });
    expect(lines[0]).toBe('2026-11-22T07:00:00.000Z ERROR publish failed error="answered 500" error_code=delivery\n');
  });
});

describe("json logs", () => {
  it("write one object per line with level, time, message and the fields", () => {
    const { logger, lines } = capture("json");
    logger.info("started", { pipelines: 2, id: 7n, at: new Date(0), error: new Error("boom") });
    expect(lines).toHaveLength(1);
    expect(lines[0]!.endsWith("\n")).toBe(true);
    expect(JSON.parse(lines[0]!)).toEqual({
      level: "info",
      time: "2026-11-22T07:00:00.000Z",
      message: "started",
      pipelines: 2,
      id: "7",
      at: "1970-01-01T00:00:00.000Z",
      error: "boom",
    });
  });

  it("do not let a field overwrite level, time or message", () => {
    const { logger, lines } = capture("json");
    logger.info("real", { message: "fake", level: "error" });
    expect(JSON.parse(lines[0]!)).toMatchObject({ message: "real", level: "info" });
  });

  it("survive a cyclic field value", () => {
    const { logger, lines } = capture("json");
    const cyclic: Record<string, unknown> = { name: "loop" };
    cyclic.self = cyclic;
    logger.info("cyclic", { value: cyclic });
    expect(JSON.parse(lines[0]!).value.name).toBe("loop");
  });
});

describe("logger", () => {
  it("drops lines below its level", () => {
    const { logger, lines } = capture("json", "warn");
    logger.debug("d");
    logger.info("i");
    logger.warn("w");
    logger.error("e");
    expect(lines.map((line) => JSON.parse(line).message)).toEqual(["w", "e"]);
  });

  it("child loggers add their fields to every line; the call's own fields win", () => {
    const { logger, lines } = capture("json");
    const child = logger.child({ pipeline: "orders", batch: 1 }).child({ attempt: 2 });
    child.info("retry", { batch: 9 });
    expect(JSON.parse(lines[0]!)).toMatchObject({ pipeline: "orders", batch: 9, attempt: 2 });
  });

  it("masks URL passwords in messages and fields, and values under secret keys", () => {
    const { logger, lines } = capture("json");
    logger.error("cannot reach postgres://relay:s3cret@db/app", {
      url: "nats://u:pw@nats:4222",
      error: new Error("connect postgres://relay:s3cret@db/app refused"),
      config: { sasl: { username: "relay", password: "hunter2" } },
    });
    expect(lines[0]).not.toContain("s3cret");
    expect(lines[0]).not.toContain("hunter2");
    expect(JSON.parse(lines[0]!)).toMatchObject({
      message: "cannot reach postgres://relay:***@db/app",
      url: "nats://u:***@nats:4222",
      error: "connect postgres://relay:***@db/app refused",
      config: { sasl: { username: "relay", password: "***" } },
    });
  });

  it("masks secrets in text format too", () => {
    const { logger, lines } = capture("text");
    logger.info("using postgres://relay:s3cret@db/app", { token: "abc" });
    expect(lines[0]).toBe("2026-11-22T07:00:00.000Z INFO  using postgres://relay:***@db/app token=***\n");
  });
});
