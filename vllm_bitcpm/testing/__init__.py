"""Support for the project's tests and benchmarks (not a user feature of the plugin)."""
