"""The 53 ICT-FaceKit expression names (ARKit-style, in the model's order) and their panel groups.

Blender-free. The properties must exist at register time, before any backend is running, so the list
lives here; the handshake's list is checked against it (backend_service) so a mismatch is an error,
not a silent reordering.
"""

EXPRESSION_NAMES: tuple[str, ...] = (
    "browDown_L", "browDown_R", "browInnerUp_L", "browInnerUp_R", "browOuterUp_L", "browOuterUp_R",
    "cheekPuff_L", "cheekPuff_R", "cheekSquint_L", "cheekSquint_R",
    "eyeBlink_L", "eyeBlink_R", "eyeLookDown_L", "eyeLookDown_R", "eyeLookIn_L", "eyeLookIn_R",
    "eyeLookOut_L", "eyeLookOut_R", "eyeLookUp_L", "eyeLookUp_R", "eyeSquint_L", "eyeSquint_R",
    "eyeWide_L", "eyeWide_R",
    "jawForward", "jawLeft", "jawOpen", "jawRight",
    "mouthClose", "mouthDimple_L", "mouthDimple_R", "mouthFrown_L", "mouthFrown_R", "mouthFunnel",
    "mouthLeft", "mouthLowerDown_L", "mouthLowerDown_R", "mouthPress_L", "mouthPress_R", "mouthPucker",
    "mouthRight", "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper",
    "mouthSmile_L", "mouthSmile_R", "mouthStretch_L", "mouthStretch_R", "mouthUpperUp_L",
    "mouthUpperUp_R",
    "noseSneer_L", "noseSneer_R",
)

# Panel groups, in display order, keyed by the name prefix.
GROUPS: tuple[tuple[str, str], ...] = (
    ("Brows", "brow"), ("Eyes", "eye"), ("Cheeks", "cheek"),
    ("Nose", "nose"), ("Jaw", "jaw"), ("Mouth", "mouth"),
)


def group_members(prefix: str) -> list[str]:
    return [n for n in EXPRESSION_NAMES if n.startswith(prefix)]


def pretty(name: str) -> str:
    """'mouthSmile_L' -> 'Mouth Smile L' for labels."""
    out: list[str] = []
    for ch in name.replace("_", " "):
        if ch.isupper() and out and out[-1] != " ":
            out.append(" ")
        out.append(ch)
    return "".join(out).title()
