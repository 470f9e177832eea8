"""Alerts for hospital IT, the I/O part: the runner that gathers the engine's snapshot on a timer
and sends what the pure evaluator (``engine.alerts``) decides, by mail and webhook."""
