// A drop-in sink for pg-tide: appends "<dedup key> <event type> <payload>" lines to a file.
// It imports nothing from pg-tide; the types below are only for the editor and can be dropped.
import { appendFile } from "node:fs/promises";

interface AuditConfig {
  path: string;
  prefix: string;
}

/** A Standard Schema validator written by hand (zod, valibot or arktype work too). */
const config = {
  "~standard": {
    version: 1 as const,
    vendor: "audit-sink",
    validate(value: unknown) {
      const issues: { message: string; path: string[] }[] = [];
      const input = (value ?? {}) as Record<string, unknown>;
      for (const key of Object.keys(input)) {
        if (key !== "path" && key !== "prefix") issues.push({ message: "unknown key", path: [key] });
      }
      if (typeof input.path !== "string" || input.path === "") {
        issues.push({ message: "must be a file path", path: ["path"] });
      }
      if (input.prefix !== undefined && typeof input.prefix !== "string") {
        issues.push({ message: "must be a string", path: ["prefix"] });
      }
      if (issues.length > 0) return { issues };
      return { value: { path: input.path as string, prefix: (input.prefix as string | undefined) ?? "" } };
    },
  },
};

export default {
  type: "audit",
  kind: "sink",
  summary: "Appends one audit line per message to a file",
  config,
  example: { path: "/var/log/orders-audit.log", prefix: "orders" },
  create(cfg: AuditConfig, ctx: any) {
    return {
      async connect() {},
      async publish(batch: any[]) {
        const lines = batch.map((m) => `${cfg.prefix}${m.dedupKey} ${m.eventType} ${m.payloadText}\n`);
        try {
          await appendFile(cfg.path, lines.join(""));
        } catch (error) {
          throw ctx.errors.transient(`audit sink "${ctx.pipeline}": cannot write ${cfg.path}`, error);
        }
        return []; // every message acknowledged
      },
      async close() {},
    };
  },
};
