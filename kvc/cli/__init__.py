"""Command-line interface: ``main`` parses and delegates; each command lives in its own module."""
