"""Speed and quality benchmarks against the reference pipeline."""
