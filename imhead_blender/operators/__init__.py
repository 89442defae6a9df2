"""Operators: each submits to the backend and returns at once; replies are applied by pump_backend()."""

from . import backend, capture, expressions, fit, footage, generate, identity, regions

CLASSES = (*backend.CLASSES, *generate.CLASSES, *expressions.CLASSES, *regions.CLASSES, *fit.CLASSES,
           *identity.CLASSES, *footage.CLASSES, *capture.CLASSES)


def register_menus() -> None:
    for menu, fn in capture.MENUS:
        menu.append(fn)


def unregister_menus() -> None:
    for menu, fn in capture.MENUS:
        menu.remove(fn)
