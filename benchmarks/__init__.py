"""Performance benchmarks (``python -m benchmarks [--quick]``); never part of the test suite."""
