"""Benchmarks (never imported by lb/ or api/); see bench/run.py."""
