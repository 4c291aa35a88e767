// `pg-tide plugins`: the sink and source types this relay knows (built-in and drop-in), with a
// summary and an example config for each.

import { redactConfig } from "../core/redact.ts";
import { writeStdout } from "../core/runtime.ts";
import { formatHelp, HELP_FLAG, parseFlags } from "./args.ts";
import { CONFIG_FLAG, loadConfig } from "./manifest_flags.ts";

const FLAGS = {
  config: CONFIG_FLAG,
  output: { type: "string", default: "text", placeholder: "text|json", help: "a list for people, or JSON" },
  help: HELP_FLAG,
} as const;

export const PLUGINS_HELP = formatHelp(
  "pg-tide plugins [--config FILE] [--output text|json]",
  "Lists the sink and source types: the built-in ones and the drop-ins a manifest names, each with\n" +
    "a one-line summary and an example config for tide.relay_set_outbox / tide.relay_set_inbox.",
  FLAGS,
);

export async function pluginsCommand(args: string[]): Promise<number> {
  const flags = parseFlags("plugins", FLAGS, args);
  if (flags.help) {
    writeStdout(PLUGINS_HELP);
    return 0;
  }
  const { registry } = await loadConfig(flags.config);
  const plugins = registry.all().sort((a, b) => a.kind.localeCompare(b.kind) || a.type.localeCompare(b.type));
  if (flags.output === "json") {
    writeStdout(JSON.stringify(plugins.map((p) => ({ type: p.type, kind: p.kind, summary: p.summary, example: p.example })), null, 2) + "\n");
    return 0;
  }
  for (const p of plugins) {
    writeStdout(`${p.kind} ${p.type}\n  ${p.summary}\n  example: ${JSON.stringify(redactConfig(p.example))}\n\n`);
  }
  return 0;
}
