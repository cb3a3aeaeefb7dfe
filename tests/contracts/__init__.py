"""Contract checks: buf lint and breaking, stub freshness, use of the protos by other languages."""
