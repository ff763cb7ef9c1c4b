"""Where a request goes: the routing policies, the prefix index and what they read from a request."""
