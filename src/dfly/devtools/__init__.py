"""Tools for tests, demos and benchmarks (a real origin server, test data); never imported by the servers."""
