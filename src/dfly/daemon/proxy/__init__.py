"""The daemon's HTTP edge on port 4001: OCI registry mirror, forward proxy and CONNECT (server.py)."""
