"""Tests of the shared maas-runtime library."""
