// A pipeline as the catalog stores it (a row of tide.relay_pipelines): shared by the coordinator, the
// workers, config checks and the CLI, so that none of them imports another's module for it.

export interface PipelineRow {
  name: string;
  direction: "forward" | "reverse";
  outbox_name: string | null;
  consumer_group: string | null;
  inbox_name: string | null;
  plugin_type: string;
  /** As stored: parsed once by preparePipeline (pipeline_config.ts) before anything reads it. */
  config: Record<string, unknown>;
  batch_size: number;
  enabled: boolean;
  idempotent: boolean;
  /** Bumped by every catalog change to the row; the owner records the version it runs. */
  config_version: bigint;
  updated_at: Date;
}
