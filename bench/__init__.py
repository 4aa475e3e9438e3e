"""Benchmarks of dcproto beside the tools a user would pick instead (not tests)."""
