"""The plugin's dock widgets, one module each (each usable on its own)."""
