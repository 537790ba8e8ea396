"""toy app."""
