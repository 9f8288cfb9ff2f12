"""Calibration: token batches, layer-by-layer capture, Hessian statistics."""
