"""Benchmarks, run by `make bench` and never by `make test`: they build a large organisation on
a real stack and print timings, asserting nothing."""
