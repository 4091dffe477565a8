"""fastres benchmarks: shape tables, kernel and model benchmarks, kernel reports (see README.md)."""
