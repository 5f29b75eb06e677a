"""The daemon's HTTP edge on port 4001: OCI registry mirror (and, later, forward proxy)."""
