"""tandem: policies."""
