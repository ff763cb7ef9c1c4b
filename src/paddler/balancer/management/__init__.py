"""The management port: the agents' socket, the fleet's API, autoscaling and the web dashboard."""
