"""Command-line entry points: ``python -m infer.generate`` (and, as they land, convert / eval / demo)."""
