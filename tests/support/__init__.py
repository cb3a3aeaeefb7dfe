"""Helpers shared by the test suites: stand-ins for external systems."""
