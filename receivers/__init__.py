"""podmeter's built-in receivers: one folder per component type, registered through entry points."""
