"""Pixels and text to vectors: model presets, loading, the ONNX text tower."""
