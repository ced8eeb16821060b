"""Evaluation: how edited models are judged against their base (tests, intervals, power, choices)."""
