"""Build: a compiled ``Variant``, its latency profile, and the bundle format (write, read, verify)."""
