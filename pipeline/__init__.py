"""refine: tight bounding boxes from HQ-SAM features (library; the CLI lives in `stages`)."""
