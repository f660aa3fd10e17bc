"""Helpers shared by the tests, the demo and the benchmarks: local servers and model data.

Nothing here is imported by the daemon. The servers listen on 127.0.0.1 only.
"""
