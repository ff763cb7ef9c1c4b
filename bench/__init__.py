"""Benchmarks of Paddler against real llama.cpp servers; ``python -m bench.overhead`` is the entry."""
