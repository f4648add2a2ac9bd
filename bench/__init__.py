"""Benchmark harness for the data stages (`make bench`); see bench/README.md."""
