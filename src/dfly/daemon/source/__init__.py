"""Back-to-source clients: how a (seed) peer reads a task from its origin. `http` covers http:// and https://."""
