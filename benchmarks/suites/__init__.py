"""Benchmark suites: each module has ``run(runner)`` adding records to the runner."""
