"""Packed tensor formats: one ``QuantizedTensor`` class per (codec x packing)."""
