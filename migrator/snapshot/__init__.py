"""Snapshots: RAM images on disk, taken from a source or a raw file, restored lazily."""
