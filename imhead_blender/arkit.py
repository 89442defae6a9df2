"""The 52 ARKit blendshape names and how they map onto the model's 53 ICT-FaceKit expressions. Blender-free.

ICT-FaceKit names its shapes after ARKit's, with "Left"/"Right" written "_L"/"_R" (both the face's own side,
as in ARKit), and splits two ARKit shapes per side: browInnerUp and cheekPuff. So:
- 49 ARKit shapes are one ICT expression each (eyeBlinkLeft = eyeBlink_L, jawOpen = jawOpen, ...);
- browInnerUp and cheekPuff are both ICT sides at once (weight w on the ARKit shape = w on each side);
- tongueOut has no ICT expression: its shape key exists and is empty (equal to the Basis).
"""

from __future__ import annotations

import numpy as np

from .expressions import EXPRESSION_NAMES

# In the order of Live Link Face's CSV columns (also ARKit's documentation groups: eyes, jaw, mouth, brows,
# cheeks, nose, tongue).
ARKIT_NAMES: tuple[str, ...] = (
    "eyeBlinkLeft", "eyeLookDownLeft", "eyeLookInLeft", "eyeLookOutLeft", "eyeLookUpLeft", "eyeSquintLeft",
    "eyeWideLeft", "eyeBlinkRight", "eyeLookDownRight", "eyeLookInRight", "eyeLookOutRight", "eyeLookUpRight",
    "eyeSquintRight", "eyeWideRight",
    "jawForward", "jawRight", "jawLeft", "jawOpen",
    "mouthClose", "mouthFunnel", "mouthPucker", "mouthRight", "mouthLeft", "mouthSmileLeft", "mouthSmileRight",
    "mouthFrownLeft", "mouthFrownRight", "mouthDimpleLeft", "mouthDimpleRight", "mouthStretchLeft",
    "mouthStretchRight", "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper",
    "mouthPressLeft", "mouthPressRight", "mouthLowerDownLeft", "mouthLowerDownRight", "mouthUpperUpLeft",
    "mouthUpperUpRight",
    "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight",
    "cheekPuff", "cheekSquintLeft", "cheekSquintRight",
    "noseSneerLeft", "noseSneerRight",
    "tongueOut",
)
EMPTY = ("tongueOut",)  # no such expression in the model: the shape key equals the Basis


def _ict_names(arkit: str) -> tuple[str, ...]:
    if arkit in EMPTY:
        return ()
    if arkit in EXPRESSION_NAMES:  # jawLeft, mouthRight, ...: the side is the direction, not a split
        return (arkit,)
    for side, suffix in (("Left", "_L"), ("Right", "_R")):
        if arkit.endswith(side):
            return (arkit[: -len(side)] + suffix,)
    return (arkit + "_L", arkit + "_R")  # browInnerUp, cheekPuff: split per side in ICT


ARKIT_TO_ICT: dict[str, tuple[str, ...]] = {name: _ict_names(name) for name in ARKIT_NAMES}


def _check_mapping() -> None:
    used = [ict for icts in ARKIT_TO_ICT.values() for ict in icts]
    if sorted(used) != sorted(EXPRESSION_NAMES):
        raise RuntimeError("the ARKit -> ICT mapping does not cover every ICT expression exactly once")


_check_mapping()

# (52, 53): row a holds the ICT weights of ARKit shape a at weight 1 (the pose its shape key stores).
KEY_WEIGHTS = np.zeros((len(ARKIT_NAMES), len(EXPRESSION_NAMES)), dtype=np.float32)
for _a, _name in enumerate(ARKIT_NAMES):
    for _ict in ARKIT_TO_ICT[_name]:
        KEY_WEIGHTS[_a, EXPRESSION_NAMES.index(_ict)] = 1.0


def ict_from_arkit(weights: np.ndarray) -> np.ndarray:
    """(T,52) ARKit weights -> (T,53) ICT weights (tongueOut has none and is dropped)."""
    weights = np.asarray(weights, dtype=np.float32)
    if weights.ndim != 2 or weights.shape[1] != len(ARKIT_NAMES):
        raise ValueError(f"ARKit weights must be (T,{len(ARKIT_NAMES)}), got {weights.shape}")
    return weights @ KEY_WEIGHTS


def arkit_from_ict(weights: np.ndarray) -> np.ndarray:
    """(T,53) ICT weights -> (T,52) ARKit weights: a split shape is the mean of its two sides; tongueOut 0."""
    weights = np.asarray(weights, dtype=np.float32)
    if weights.ndim != 2 or weights.shape[1] != len(EXPRESSION_NAMES):
        raise ValueError(f"ICT weights must be (T,{len(EXPRESSION_NAMES)}), got {weights.shape}")
    counts = np.maximum(KEY_WEIGHTS.sum(1), 1.0)
    return (weights @ KEY_WEIGHTS.T) / counts
