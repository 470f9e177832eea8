"""Alerts for hospital IT, the pure part: rule conditions and their state machine (``rules``),
the rate cap of a notifier (``ratecap``), the texts of a notice (``texts``). No I/O: the runner
(``engine.alerting``) gathers the snapshot, records and sends."""
