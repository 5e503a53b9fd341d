"""report.json (build) and report.md with plots (markdown)."""
