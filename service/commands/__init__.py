"""Command modules of the registry-migrator command line."""
