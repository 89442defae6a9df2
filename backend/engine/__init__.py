"""Inference engine: mesh extraction, attributes, expression deform, region edit, fitting, session."""
