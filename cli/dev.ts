// `pg-tide dev`: the zero-setup start. An embedded PostgreSQL 18, the schema, a demo outbox with a
// pipeline to stdout, a few published events, and the relay delivering them until Ctrl-C.

import { createServer } from "node:net";
import { connect } from "../core/db.ts";
import { ConfigError, toError } from "../core/errors.ts";
import { startEmbeddedPostgres } from "../core/embedded.ts";
import { PluginRegistry } from "../core/plugins.ts";
import { Relay } from "../core/relay.ts";
import { installSchema } from "../core/schema.ts";
import { builtinPlugins } from "../plugins/registry.ts";
import { writeStdout } from "../core/runtime.ts";
import { formatHelp, HELP_FLAG, parseFlags } from "./args.ts";
import { loggerFromFlags, stopSignals, untilStopped } from "./run.ts";

const DEFAULT_METRICS_HOST = "127.0.0.1";
const DEFAULT_METRICS_PORT = 9090;

const FLAGS = {
  "postgres-url": {
    type: "string",
    placeholder: "URL",
    help: "run the demo in this database (the schema is installed, the outbox \"orders\" and the pipeline " +
      "\"orders-to-stdout\" created and left there) instead of an embedded PostgreSQL; what the compiled binary needs",
  },
  port: { type: "string", placeholder: "PORT", help: "port for the embedded PostgreSQL (default: a free one)" },
  "publish-every": {
    type: "string",
    default: "5",
    placeholder: "SECONDS",
    help: "publish a demo event this often (0: only the first three)",
  },
  "metrics-addr": {
    type: "string",
    placeholder: "HOST:PORT",
    help: `the status page, /metrics and /api/v1/pipelines (default: ${DEFAULT_METRICS_HOST}:${DEFAULT_METRICS_PORT}, or a free port when that one is taken)`,
  },
  "log-level": { type: "string", default: "info", placeholder: "LEVEL", help: "debug, info, warn or error" },
  help: HELP_FLAG,
} as const;

export const DEV_HELP = formatHelp(
  "pg-tide dev [--postgres-url URL] [--port PORT] [--publish-every SECONDS]",
  "Starts an embedded PostgreSQL 18 with the tide schema, creates the outbox \"orders\" and the\n" +
    "pipeline \"orders-to-stdout\", publishes demo events and runs the relay, which prints every\n" +
    "delivered message as a JSON line. Connect with the printed URL to publish your own. Ctrl-C stops\n" +
    "everything and removes the database. The embedded PostgreSQL comes with a source checkout (npm\n" +
    "install); the compiled binary has none: give it --postgres-url to run the demo in a database of yours.",
  FLAGS,
);

export async function devCommand(args: string[]): Promise<number> {
  const flags = parseFlags("dev", FLAGS, args);
  if (flags.help) {
    writeStdout(DEV_HELP);
    return 0;
  }
  const logger = loggerFromFlags("text", flags["log-level"]!);
  // Decided before PostgreSQL starts: a demo should not fail because something else has 9090.
  const defaultTaken = flags["metrics-addr"] === undefined && !(await portIsFree(DEFAULT_METRICS_HOST, DEFAULT_METRICS_PORT));
  const metricsAddr = flags["metrics-addr"] ?? `${DEFAULT_METRICS_HOST}:${defaultTaken ? 0 : DEFAULT_METRICS_PORT}`;
  // Handled from the start: a Ctrl-C while PostgreSQL starts still stops it (it runs detached).
  let relay: Relay | undefined;
  let signalled: string | undefined;
  const stopSignal = stopSignals(logger, () => relay).then((signal) => (signalled = signal));
  const given = flags["postgres-url"];
  if (given !== undefined && flags.port !== undefined) {
    throw new ConfigError("pg-tide dev: --port is the embedded PostgreSQL's; with --postgres-url there is none");
  }
  if (given === undefined) logger.info("starting embedded PostgreSQL 18");
  const server = given !== undefined ? { url: given, stop: async () => {} } : await startEmbeddedPostgres(flags.port ? Number(flags.port) : undefined).catch((error) => {
    if (signalled) return undefined; // Ctrl-C reached initdb too; nothing is left running
    throw new ConfigError(
      `pg-tide dev: cannot start an embedded PostgreSQL (${toError(error).message}); it comes with a source checkout ` +
        `(npm install), not with the compiled binary: give --postgres-url URL to run the demo in a database of yours`,
      { cause: error },
    );
  });
  if (server === undefined) return 0;
  const sql = connect(server.url, { max: 2, applicationName: "pg-tide dev" });
  let timer: ReturnType<typeof setInterval> | undefined;
  try {
    await installSchema(sql);
    await sql`SELECT tide.outbox_create_if_not_exists('orders')`;
    await sql`SELECT tide.relay_set_outbox('orders-to-stdout', 'orders', 'stdout', '{"format": "json"}'::jsonb)`;
    logger.info("demo ready", { postgres_url: server.url, outbox: "orders", pipeline: "orders-to-stdout" });
    writeStdout(
      `\nPublish your own event:\n  psql '${server.url}' -c ` +
        `"SELECT tide.outbox_publish('orders', '{\\"order_id\\": 42}'::jsonb, '{\\"event_type\\": \\"order.created\\"}'::jsonb)"\n\n`,
    );
    if (signalled) {
      logger.info(`${signalled}: stopping`);
      return 0;
    }
    relay = new Relay({ postgresUrl: server.url, relayGroupId: "default", logger, metricsAddr, registry: new PluginRegistry(builtinPlugins) });
    await relay.start();
    const address = `${metricsAddr.replace(/:\d+$/, "")}:${relay.httpPort}`;
    writeStdout(
      `Status page: http://${address}/   metrics: http://${address}/metrics` +
        (defaultTaken ? `   (${DEFAULT_METRICS_HOST}:${DEFAULT_METRICS_PORT} is taken; --metrics-addr picks another)` : "") +
        "\n\n",
    );
    let orderId = 0;
    const publish = () =>
      sql`SELECT tide.outbox_publish('orders', ${sql.json({ order_id: ++orderId, total: 10 * orderId })},
                                     '{"event_type": "order.created"}'::jsonb)`.catch((error) =>
        logger.warn("demo publish failed", { error })
      );
    for (let i = 0; i < 3; i++) await publish();
    const every = Number(flags["publish-every"]);
    if (every > 0) timer = setInterval(publish, every * 1000);
    return await untilStopped(relay, logger, stopSignal);
  } finally {
    clearInterval(timer);
    await sql.end({ timeout: 5 });
    await server.stop();
  }
}

/** True when nothing listens on host:port yet (the relay's server binds it right after). */
function portIsFree(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const probe = createServer();
    probe.once("error", () => resolve(false));
    probe.listen(port, host, () => probe.close(() => resolve(true)));
  });
}
