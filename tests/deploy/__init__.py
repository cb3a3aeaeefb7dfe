"""Deploy tests: the Helm charts under deploy/helm, linted, rendered and schema-validated offline."""
