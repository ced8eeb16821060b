"""Reports: words, tables and plots from an experiment's numbers."""
