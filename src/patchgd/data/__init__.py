"""Digit sources, the UltraMNIST generator, CSV + folder datasets and slide preparation."""
