"""HQ-SAM as the package builds it: the encoder, its weights and fingerprint, fused attention (extraction
encodes with it; snap runs its prompt encoder and mask decoder)."""
