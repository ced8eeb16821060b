"""Experiments: run, compare (one pipeline), study, and what they record."""
