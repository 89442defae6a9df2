"""Operators: each submits to the backend and returns at once; replies are applied by pump_backend()."""

from . import backend, expressions, fit, footage, generate, identity, regions

CLASSES = (*backend.CLASSES, *generate.CLASSES, *expressions.CLASSES, *regions.CLASSES, *fit.CLASSES,
           *identity.CLASSES, *footage.CLASSES)
