"""Conversion between megadiff checkpoints and Hugging Face folders (``megadiff convert``)."""
