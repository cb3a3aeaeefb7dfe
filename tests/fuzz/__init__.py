"""Hostile-request tests against the whole suite running in process."""
