"""Benchmarks that print figures (ratios measured in one run); never timing assertions."""
