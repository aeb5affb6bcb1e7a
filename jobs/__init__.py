"""Ray Job entrypoints, runtime environment and nightly schedule examples."""
