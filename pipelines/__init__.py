"""Ray Data building blocks: sources, decoding, scorers, filters, writers and the one schema module."""
