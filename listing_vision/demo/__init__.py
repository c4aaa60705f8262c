"""The offline demo: a drawn toy catalogue, a toy model trained on it, and the demo run."""
