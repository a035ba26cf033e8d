"""Evaluation: scoring, prompt-format robustness, attacks, probes and side effects."""
