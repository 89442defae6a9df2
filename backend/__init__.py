"""imhead backend: Blender-free model, data, inference engine, stdio server and CLI."""

__version__ = "0.1.0"
