"""The agent: watches one llama.cpp server (optionally running it) and reports it to a balancer.

``service.Agent`` wires the parts together; each part is a small module named after its concept.
"""
