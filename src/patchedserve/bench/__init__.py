"""Benchmarks: commands that measure and write JSON (and plots); kept apart from tests."""
