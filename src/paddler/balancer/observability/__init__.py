"""What the balancer tells about itself: the observers of each request, the request log, traces, Prometheus, StatsD and the dashboard's history."""
