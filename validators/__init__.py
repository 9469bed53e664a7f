"""Checks that prove a retooled model: structure, numerical parity, latency, gates."""
