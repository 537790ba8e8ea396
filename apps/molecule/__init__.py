"""molecule app."""
