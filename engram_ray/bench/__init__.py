"""Benchmarks behind ``engram-ray bench ...``: each writes JSON, medians of interleaved
repetitions, and names the machine it ran on."""
