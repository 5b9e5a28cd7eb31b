"""dspark: lossless DSpark speculative decoding (placeholder; filled in below)."""
