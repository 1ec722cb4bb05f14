"""Small helpers below every layer (file I/O)."""
