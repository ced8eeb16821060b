"""The foundation every layer uses: errors, settings, model loading, token batches, hooks."""
