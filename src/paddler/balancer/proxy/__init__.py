"""The data plane: the proxy port, its HTTP layers on both sides, and what happens to one request."""
