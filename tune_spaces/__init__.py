"""Search spaces as data, one module per objective family (filled in by the tune stage)."""
