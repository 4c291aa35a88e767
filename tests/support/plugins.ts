// Calling plugins directly in tests: a quiet plugin context, config parsing through the plugin's
// own schema, and collecting what a core NATS subscription receives.

import type { Msg, NatsConnection } from "@nats-io/transport-node";
import { pluginErrors } from "../../core/errors.ts";
import type { PluginContext, PluginDefinition } from "../../core/plugin.ts";
import { renderTemplate } from "../../core/config/template.ts";

/** What the relay hands a plugin, with a logger that prints nothing. */
export function pluginContext(pipeline: string, overrides: Partial<PluginContext> = {}): PluginContext {
  const quiet = () => {};
  return {
    pipeline,
    logger: { debug: quiet, info: quiet, warn: quiet, error: quiet },
    errors: pluginErrors,
    signal: new AbortController().signal,
    batchSize: 100,
    render: renderTemplate,
    ...overrides,
  };
}

export async function validateConfig(definition: PluginDefinition, input: unknown) {
  return await definition.config["~standard"].validate(input);
}

/** The config as the plugin's schema outputs it; throws with the issues when it is invalid. */
export async function parseConfig(definition: PluginDefinition, input: unknown) {
  const result = await validateConfig(definition, input);
  if (result.issues) throw new Error(`invalid config: ${JSON.stringify(result.issues)}`);
  return result.value;
}

/** Collects `count` messages of a core NATS subscription (rejects after 10 s with how many came). */
export function collectNats(nc: NatsConnection, subject: string, count: number): Promise<Msg[]> {
  const got: Msg[] = [];
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`got ${got.length} of ${count} messages`)), 10_000);
    nc.subscribe(subject, {
      max: count,
      callback: (_err, msg) => {
        got.push(msg);
        if (got.length === count) {
          clearTimeout(timer);
          resolve(got);
        }
      },
    });
  });
}
