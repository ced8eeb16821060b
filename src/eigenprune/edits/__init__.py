"""Linear algebra and the edits it makes: targets, SVD, scores, freezing, saved edits, export."""
