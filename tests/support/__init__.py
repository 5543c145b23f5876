"""Model factories and drawings for the tests and bench/ (not shipped in the wheel)."""
