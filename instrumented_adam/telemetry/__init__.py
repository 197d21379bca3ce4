"""The telemetry layer: per-step capture of the optimizer's statistics, the SQLite run store,
checkpoints, resume and branching, export. `telemetry.store` and `telemetry.export` import without
torch; the recorder and checkpoints need it."""
