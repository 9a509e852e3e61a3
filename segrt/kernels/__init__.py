"""segrt.kernels."""
