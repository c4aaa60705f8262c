"""listing-vision: check and index the images of an e-commerce catalogue."""

__version__ = "0.1.0"
