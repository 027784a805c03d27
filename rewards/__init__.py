"""tandem: rewards."""
