"""Small C helpers built with gcc at setup (see build.py)."""
