"""Extraction: `refine extract` runs the HQ-SAM image encoder once per image and writes the store."""
