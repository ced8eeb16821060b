"""Methods: eigenprune and everything it is judged against, one file each, found through the registry.

Each method module registers itself (`registry.register`) with its settings dataclass; `experiments`
runs them in the same harness (same splits, eval mode, statistics) and names none of them. `base`,
`registry`, `strength`, `training` and `roll_pairing` are the shared parts.
"""
