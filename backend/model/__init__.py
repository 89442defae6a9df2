"""The imHead network (torch): region-decomposed SDF, expression warp, correspondence head."""

from .imhead import ImHead, ImHeadConfig

__all__ = ["ImHead", "ImHeadConfig"]
