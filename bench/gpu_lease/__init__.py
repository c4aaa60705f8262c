"""What a short lease of a GPU machine runs (README.md here)."""
