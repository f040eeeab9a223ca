"""podmeter's built-in processors: one folder per component type, registered through entry points."""
