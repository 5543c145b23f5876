"""What is on disk: the SQLite database, the HNSW graph and its file, the write lock."""
