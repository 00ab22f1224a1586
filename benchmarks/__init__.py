"""Benchmarks (run as modules, e.g. ``python -m benchmarks.inference_latency``)."""
