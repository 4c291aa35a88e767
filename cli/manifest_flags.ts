// The --config flag shared by run, check and plugins: loads the manifest and the drop-in plugins it
// names into a plugin registry.

import { dirname } from "node:path";
import { loadManifest, type Manifest } from "../core/config/manifest.ts";
import { PluginRegistry } from "../core/plugins.ts";
import { builtinPlugins } from "../plugins/registry.ts";
import type { FlagSpec } from "./args.ts";

export const CONFIG_FLAG: FlagSpec = {
  type: "string",
  short: "c",
  env: "PG_TIDE_CONFIG",
  placeholder: "FILE",
  help: "manifest (pg-tide.toml or pg-tide.json): relay settings, drop-in [plugins], [[pipelines]]",
};

export interface Loaded {
  manifest?: Manifest;
  registry: PluginRegistry;
}

/**
 * Loads the manifest (if any) and registers its drop-in plugins next to the built-in ones. A drop-in
 * replaces a built-in type only when the manifest says `override = true` for it.
 */
export async function loadConfig(path: string | undefined): Promise<Loaded> {
  const registry = new PluginRegistry(builtinPlugins);
  if (!path) return { registry };
  const manifest = await loadManifest(path);
  for (const [name, file] of Object.entries(manifest.plugins)) {
    await registry.load(name, file, dirname(manifest.path), { override: manifest.overrides.includes(name) });
  }
  return { manifest, registry };
}

/** A manifest's [relay] settings as fallback values for the run flags. */
export function relayFallback(manifest: Manifest | undefined): Record<string, string | undefined> {
  const relay = manifest?.relay ?? {};
  const text = (value: unknown) => (value === undefined ? undefined : String(value));
  return {
    "postgres-url": relay.postgres_url,
    "relay-group-id": relay.relay_group_id,
    "metrics-addr": relay.metrics_addr,
    "max-pipelines": text(relay.max_pipelines),
    "poll-interval-ms": text(relay.poll_interval_ms),
    "drain-timeout": text(relay.drain_timeout),
    "memory-target-mib": text(relay.memory_target_mib),
    "ownership-lease-ms": text(relay.ownership_lease_ms),
    "log-format": relay.log_format,
    "log-level": relay.log_level,
    "http-token": relay.http_token,
    "http-token-scope": relay.http_token_scope,
    "otlp-endpoint": relay.otlp_endpoint,
  };
}
