"""Benchmark harness: FLOP counting, metrics, throughput, sweeps and plots over every registered backbone."""
