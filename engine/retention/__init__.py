"""Data retention (pruning in small batches, optional archive) and the portability export.

``bundle`` writes the one documented layout (JSON Lines, raw HL7, CDA and PDF files, manifest)
used by both the export and the archive; ``prune`` decides what is due and deletes it through
the store's writer; ``export`` streams a time range into a folder. SQL lives in
``engine.store.retention``.
"""
