"""Quantization maths shared by the analysis and the engine: pure functions over tensors."""
