// Routes that plugins add to the relay's HTTP server while their pipeline runs here (the webhook
// source's ingest endpoints), under /ingest/<path>.

import type { HttpRoutes, RouteOptions } from "../plugin.ts";

export const INGEST_PREFIX = "/ingest/";

export interface IngestRoute {
  handler: (request: Request) => Promise<Response>;
  /** The handler checks each request's own credentials (a signature); see RouteOptions. */
  authenticates: boolean;
}

export class RouteTable implements HttpRoutes {
  readonly #routes = new Map<string, IngestRoute>();

  route(path: string, handler: (request: Request) => Promise<Response>, options: RouteOptions = {}): () => void {
    const key = normalize(path);
    if (this.#routes.has(key)) throw new Error(`the route ${INGEST_PREFIX}${key} is already taken by another pipeline`);
    const entry = { handler, authenticates: options.authenticates === true };
    this.#routes.set(key, entry);
    return () => {
      if (this.#routes.get(key) === entry) this.#routes.delete(key);
    };
  }

  /** The route for a request path under /ingest/, if a pipeline on this relay serves it. */
  find(pathname: string): IngestRoute | undefined {
    return this.#routes.get(normalize(pathname.slice(INGEST_PREFIX.length)));
  }
}

function normalize(path: string): string {
  return path.replace(/^\/+/, "").replace(/^ingest\//, "").replace(/\/+$/, "");
}
