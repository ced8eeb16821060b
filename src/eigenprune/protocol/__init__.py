"""How a method is run and chooses on dev: the harness, the dev-choice rules, the run settings."""
