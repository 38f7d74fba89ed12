"""Built-in problems with data that ships with installed packages (no downloads)."""
