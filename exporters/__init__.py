"""podmeter's built-in exporters: one folder per component type, registered through entry points."""
