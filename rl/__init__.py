"""tandem: rl."""
