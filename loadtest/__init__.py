"""Load generator for OpenAI-compatible servers (`packserve loadtest`); metric definitions follow vLLM's
`bench serve`. Modules: workload (prompts), arrivals (send schedule), client (one streamed request),
runner (dispatch, bounds, Ctrl-C), metrics (aggregates, Prometheus deltas), report (JSON schema, tables),
plots (PNGs); its command line is packserve.commands.loadtest."""
