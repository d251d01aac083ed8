"""difflower.validate: parity metrics, gates, the validate report and benchmarks."""
