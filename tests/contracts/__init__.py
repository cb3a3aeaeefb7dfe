"""Contract checks: buf lint and breaking, stub freshness, and other languages' use of the protos."""
