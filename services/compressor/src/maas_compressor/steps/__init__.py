"""Compression steps: each takes the model under compression and returns a changed one."""
