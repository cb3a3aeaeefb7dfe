"""Revisions of the usage ledger's schema."""
