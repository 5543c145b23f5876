"""A query to ranked results: query vectors, filters, exact/HNSW/Hamming ranking."""
