"""Thin `ray job submit` entry points: `python -m jobs.<name>` takes the flags of `rdcd <name>`."""
