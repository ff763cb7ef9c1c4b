"""Proxy hops with no Paddler logic, measured beside Paddler to find the floor (issue 10)."""
