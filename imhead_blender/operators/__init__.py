"""Operators: each submits to the backend and returns at once; replies are applied by pump_backend()."""

from . import backend, expressions, fit, generate

CLASSES = (*backend.CLASSES, *generate.CLASSES, *expressions.CLASSES, *fit.CLASSES)
