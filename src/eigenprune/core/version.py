"""The package version, in one place (saved edits and scores record it)."""

__version__ = "0.1.0"
