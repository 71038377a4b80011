"""Kernel families; one folder per op."""
