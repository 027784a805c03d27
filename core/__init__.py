"""tandem.core — the leaf layer: shared types, errors, prompt files and protocols. Imports nothing else of tandem."""
