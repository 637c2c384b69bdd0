"""Development tools that need the repository: `python -m tools.reference` (the generated docs)."""
