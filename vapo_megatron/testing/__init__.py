"""Test support shipped with the package so that tests, benchmarks and users' own tests share it."""
