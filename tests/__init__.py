"""Test suite for the MaaS monorepo."""
