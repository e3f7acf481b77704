"""The refiner as `train` writes it and inference loads it: the cascade, its fine stage, the score and its
threshold, and the checkpoint."""
