"""baim package."""
