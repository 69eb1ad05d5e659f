"""Serving: the variant router and its policies, the runtime (batching), the wire format, HTTP front and metrics."""
