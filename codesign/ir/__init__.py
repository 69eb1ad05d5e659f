"""The IR layer: a captured ranking model (``Program``), its request interface and the workloads that feed it."""
