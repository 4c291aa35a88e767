// Which wire-protocol servers a test needs, and what happens when one is missing: skip with a
// one-line reason, or fail when TIDE_REQUIRE_SERVICES=1 (as in CI).

import { connect as tcpConnect } from "node:net";

export const REQUIRE_SERVICES = process.env.TIDE_REQUIRE_SERVICES === "1";

/** True when host:port accepts a TCP connection within a second. */
export function reachable(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = tcpConnect({ host, port });
    const done = (ok: boolean) => {
      socket.destroy();
      resolve(ok);
    };
    socket.setTimeout(1000, () => done(false));
    socket.once("connect", () => done(true));
    socket.once("error", () => done(false));
  });
}

/**
 * Resolves true when the service answers. When it does not: throws under TIDE_REQUIRE_SERVICES=1,
 * else prints why the suite is skipped and resolves false (use with describe.skipIf).
 */
export async function requireService(name: string, host: string, port: number): Promise<boolean> {
  if (await reachable(host, port)) return true;
  const reason = `${name} is not reachable at ${host}:${port}`;
  if (REQUIRE_SERVICES) throw new Error(`${reason} (TIDE_REQUIRE_SERVICES=1)`);
  console.warn(`skipping ${name} tests: ${reason}`);
  return false;
}

// The shared servers of the RabbitMQ, Redis and MQTT suites (scripts/services.sh starts them when
// they are installed and not running); check them with requireService like NATS and Kafka.
export const RABBITMQ = { name: "rabbitmq", host: "127.0.0.1", port: 5672, url: "amqp://127.0.0.1:5672" } as const;
export const REDIS = { name: "redis", host: "127.0.0.1", port: 6379, url: "redis://127.0.0.1:6379" } as const;
export const MQTT = { name: "mqtt", host: "127.0.0.1", port: 1883, url: "mqtt://127.0.0.1:1883" } as const;

/**
 * True when `binary` is on PATH. When it is not: throws under TIDE_REQUIRE_SERVICES=1, else says
 * why the tests that start their own server are skipped (use with describe.skipIf).
 */
export function requireBinary(binary: string, what: string): boolean {
  if (Bun.which(binary)) return true;
  const reason = `the ${binary} binary is not on PATH`;
  if (REQUIRE_SERVICES) throw new Error(`${reason} (TIDE_REQUIRE_SERVICES=1)`);
  console.warn(`skipping ${what}: ${reason}`);
  return false;
}
