"""The model toolkit: `calibrate` and `compare` measured on the user's labelled listings."""
