"""Long runs over a library: indexing, checking and repairing."""
