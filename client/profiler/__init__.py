"""Latency profiling: simulated clients against a server, the mouth-to-ear stage budget,
and its reports (table, JSON, PNG plots, self-contained HTML).  See docs/client.md."""
