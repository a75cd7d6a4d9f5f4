"""Post-training corrections applied around calibration (cross-layer equalization, ...)."""
