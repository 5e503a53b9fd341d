"""The `baim` command line."""
