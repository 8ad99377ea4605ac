"""Process groups and the collective operations that the math needs (vocab-parallel ops, global sums)."""
