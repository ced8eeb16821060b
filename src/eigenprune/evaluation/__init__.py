"""Tasks, splits, evaluation, statistics and side effects: how a model is judged."""
