"""The agent's version, in a module of its own so any core module can read it without
importing the package (agent/__init__ imports the runtime)."""

__version__ = "0.1.0"
