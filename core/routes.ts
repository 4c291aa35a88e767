// Routes that plugins add to the relay's HTTP server while their pipeline runs here (the webhook
// source's ingest endpoints), under /ingest/<path>.

import type { HttpRoutes } from "./plugin.ts";

export const INGEST_PREFIX = "/ingest/";

export class RouteTable implements HttpRoutes {
  readonly #handlers = new Map<string, (request: Request) => Promise<Response>>();

  route(path: string, handler: (request: Request) => Promise<Response>): () => void {
    const key = normalize(path);
    if (this.#handlers.has(key)) throw new Error(`the route ${INGEST_PREFIX}${key} is already taken by another pipeline`);
    this.#handlers.set(key, handler);
    return () => {
      if (this.#handlers.get(key) === handler) this.#handlers.delete(key);
    };
  }

  /** The handler for a request path under /ingest/, if a pipeline on this relay serves it. */
  find(pathname: string): ((request: Request) => Promise<Response>) | undefined {
    return this.#handlers.get(normalize(pathname.slice(INGEST_PREFIX.length)));
  }
}

function normalize(path: string): string {
  return path.replace(/^\/+/, "").replace(/^ingest\//, "").replace(/\/+$/, "");
}
