"""Tests of the maas-formats library: model packages, opaque model formats and datasets."""
