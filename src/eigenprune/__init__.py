"""eigenprune: remove singular components of a causal LM's weights to help one task, and measure it.

The pipeline, one module per arrow (see README):

    models ─► targets ─► decompose ─► scoring ─► freeze ─► artifact
                  data/tasks ─► evaluate ─► report
"""

__version__ = "0.1.0"
