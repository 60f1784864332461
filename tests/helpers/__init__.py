"""Helpers for the end-to-end tests: processes, /proc evidence, a seccomp wrapper."""
