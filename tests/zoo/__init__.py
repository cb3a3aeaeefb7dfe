"""Tests of the maas-zoo architecture catalogue."""
