"""flow app."""
