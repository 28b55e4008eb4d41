"""rayeff."""
