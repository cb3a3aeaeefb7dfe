"""The implementation of the MaaS Python SDK; users import it as `maas` (`maas.Client`)."""
