"""Training: `refine train` reads only the store and the annotation files (never an image, never the encoder)."""
