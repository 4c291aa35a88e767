// An embedded PostgreSQL 18 with wal_level=logical and one database with the tide schema, for the WAL
// capture suites (the machine's shared server is not reconfigured for them).

import { connect, type Sql } from "../../core/db.ts";
import { startEmbeddedPostgres } from "../../core/embedded.ts";
import { installSchema } from "../../core/schema.ts";
import { withDatabase } from "./postgres.ts";

export interface LogicalPostgres {
  /** The database's URL (superuser). */
  url: string;
  sql: Sql;
  stop(): Promise<void>;
}

export async function startLogicalPostgres(database: string): Promise<LogicalPostgres> {
  const server = await startEmbeddedPostgres(undefined, ["-c", "wal_level=logical"]);
  const admin = connect(server.url, { max: 1 });
  await admin.unsafe(`CREATE DATABASE ${database}`);
  await admin.end();
  const url = withDatabase(server.url, database);
  const sql = connect(url, { max: 4 });
  await installSchema(sql);
  return {
    url,
    sql,
    async stop() {
      await sql.end({ timeout: 5 });
      await server.stop();
    },
  };
}
