"""The job path: one job (plain or OpenAI dialect) into an engine request and a stream of outputs."""
