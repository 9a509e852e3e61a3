"""segrt.engine."""
