"""layout app."""
