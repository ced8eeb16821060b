"""Tasks, splits, evaluation, statistics, significance and side effects: how a model is judged."""
