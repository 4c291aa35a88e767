// One contract for every connector: each built-in plugin, and the documented drop-in example, has an
// example config that validates, builds without network I/O, closes twice without error, and
// rejects an unknown key with a message naming it.

import { afterAll, beforeAll, describe, expect, it } from "bun:test";
import net from "node:net";
import tls from "node:tls";
import { createLogger } from "../../core/log.ts";
import type { PluginDefinition } from "../../core/plugin.ts";
import { pluginContext, PluginRegistry, validatePluginConfig } from "../../core/plugins.ts";
import { builtinPlugins } from "../../plugins/registry.ts";

const registry = new PluginRegistry(builtinPlugins);
await registry.load("audit", "docs/examples/audit_sink.ts", `${import.meta.dir}/../..`);

/**
 * Connection attempts other than to 127.0.0.1:1, the address other suites use for "unreachable":
 * a client they stopped may still have a reconnect timer pending when this suite runs in the same
 * process, and that attempt is not this plugin's.
 */
function ownAttempts(): string[] {
  return attempts.filter((attempt) => !/"port":1,"host":"127\.0\.0\.1"|127\.0\.0\.1:1\b/.test(attempt));
}

/** Counts attempts to open a network connection while a block runs. */
const attempts: string[] = [];
const originals = { connect: net.Socket.prototype.connect, tlsConnect: tls.connect, fetch: globalThis.fetch };
beforeAll(() => {
  net.Socket.prototype.connect = function (this: net.Socket, ...args: any[]) {
    attempts.push(`net ${JSON.stringify(args[0])}`);
    return originals.connect.apply(this, args as any);
  } as any;
  (tls as any).connect = (...args: any[]) => {
    attempts.push("tls");
    return (originals.tlsConnect as any)(...args);
  };
  globalThis.fetch = ((...args: any[]) => {
    attempts.push(`fetch ${String(args[0])}`);
    return (originals.fetch as any)(...args);
  }) as typeof fetch;
});
afterAll(() => {
  net.Socket.prototype.connect = originals.connect;
  (tls as any).connect = originals.tlsConnect;
  globalThis.fetch = originals.fetch;
});

function ctx(definition: PluginDefinition) {
  const logger = createLogger({ level: "error", format: "json", write: () => {} });
  return pluginContext(`contract-${definition.type}`, logger, new AbortController().signal, 10, "postgres://127.0.0.1:1/x");
}

describe("plugin contract", () => {
  for (const definition of registry.all()) {
    describe(`${definition.kind} "${definition.type}"`, () => {
      it("has a summary and an example config that validates", async () => {
        expect(definition.summary.length).toBeGreaterThan(10);
        await validatePluginConfig(definition, definition.example, "contract");
      });

      it("builds without network I/O and closes twice without error", async () => {
        const config = await validatePluginConfig(definition, definition.example, "contract");
        attempts.length = 0;
        const instance = definition.create(config as any, ctx(definition));
        await Bun.sleep(0);
        expect(ownAttempts()).toEqual([]);
        await instance.close();
        await instance.close();
        expect(ownAttempts()).toEqual([]);
      });

      it("rejects an unknown key, naming it", async () => {
        const bad = { ...definition.example, definitely_not_an_option: 1 };
        await expect(validatePluginConfig(definition, bad, `pipeline "p"`)).rejects.toThrow("definitely_not_an_option");
      });
    });
  }

  it("notices a connection attempt (the spy works)", async () => {
    attempts.length = 0;
    const socket = net.connect({ host: "127.0.0.1", port: 1 });
    socket.on("error", () => {});
    await fetch("http://127.0.0.1:1/").catch(() => {});
    socket.destroy();
    expect(attempts.some((a) => a.startsWith("net"))).toBe(true);
    expect(attempts.some((a) => a.startsWith("fetch"))).toBe(true);
  });

  it("covers the documented drop-in plugin", () => {
    expect(registry.get("sink", "audit").summary).toContain("audit line");
  });
});
