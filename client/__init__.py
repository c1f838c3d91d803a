"""codecstream client: live calls, file encode/decode, token streaming and latency profiling.

Depends on `streaming` and audio/web libraries only; never on `models` or torch.
"""
