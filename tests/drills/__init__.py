"""Heavy drills run by `make drills` (and by CI after `make test`): images, replicas, streams."""
