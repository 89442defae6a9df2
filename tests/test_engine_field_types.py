"""Wrong-typed request fields (issue 17): every field of a valid generate/edit/fit/deform request, replaced by a
value of another type, gives invalid_input naming the field (or still works) — never another exception, which
the server would report as internal_error."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

from backend import errors
from backend.engine.session import Session

ODD: tuple[Any, ...] = ([], {}, "x", None, -1, 1.5, True, [[]], {"a": 1}, 2**70)
# a well-typed value that makes a valid request about something else: fit "units": 1.5 is a scale, and the
# atlas at 1.5x is refused as not a head (the fit's own check), which is the right answer, not a type error
VALID_REFUSALS = {"not_a_head"}


@pytest.fixture(scope="module")
def session():
    return Session(device="cpu")


def requests(session) -> dict[str, tuple[dict, dict]]:
    head = {"format": "imhead-head/1", "identity": session.sample_identity(3).tolist(),
            "region_overrides": {"nose tip": [0.0] * 32}, "expression": {session.expression_names[0]: 0.5}}
    rng = np.random.default_rng(0)
    canonical = rng.uniform(-0.05, 0.05, (20, 3)).astype(np.float32)
    return {
        "generate": ({"seed": 1, "resolution": 16}, {}),
        "edit": ({"head": head, "resolution": 16,
                  "ops": [{"op": "pca", "region": "chin", "values": [0.5, -0.5]},
                          {"op": "blend", "regions": ["chin"], "other": head, "t": 0.5},
                          {"op": "randomise", "regions": ["nose tip"], "seed": 2, "scale": 1.0}]}, {}),
        "fit": ({"units": "m", "resolution": 16, "steps": 0, "samples": 500, "seed": 0, "use_normals": False,
                 "fit_expression": True, "landmark_regions": ["chin", "nose tip", "forehead"]},
                {"points": session.atlas.vertices[::7].astype(np.float32),
                 "landmarks": session.atlas.anchors[[5, 2, 0]].astype(np.float32)}),
        "deform": ({"head": head, "exact_residual": False},
                   {"canonical": canonical, "expressions": np.zeros((1, 53), np.float32)}),
    }


def paths(node, prefix=()):
    """Every (path, key) inside params, up to three levels deep (long number lists: their first entry only)."""
    if len(prefix) >= 3:
        return
    items = node.items() if isinstance(node, dict) else enumerate(node[:1] if len(node) > 8 else node)
    for key, value in items:
        yield prefix + (key,)
        if isinstance(value, (dict, list)) and value:
            yield from paths(value, prefix + (key,))


def replaced(params: dict, path: tuple, value) -> dict:
    out = copy.deepcopy(params)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


class Quiet:
    cancelled = False

    def report(self, fraction, message):
        pass


@pytest.mark.parametrize("op", ["generate", "edit", "fit", "deform"])
def test_wrong_typed_fields_give_invalid_input_naming_the_field(session, op):
    params, arrays = requests(session)[op]
    getattr(session, op)(params, arrays, Quiet())  # the unmutated request is valid
    wrong = []
    for path in paths(params):
        for value in ODD:
            try:
                getattr(session, op)(replaced(params, path, value), arrays, Quiet())
            except errors.BackendError as exc:
                if exc.code in VALID_REFUSALS and isinstance(value, (int, float)) and not isinstance(value, bool):
                    continue
                key = next((k for k in reversed(path) if isinstance(k, str)), "")
                names = {key, key.rstrip("s"), key.split("_")[0]}  # "values" -> "pca value 0", ...
                if isinstance(path[-1], int):  # a list entry: naming the list or the bad entry will do
                    names.add(repr(value))
                if exc.code != "invalid_input" or not any(n in str(exc) for n in names):
                    wrong.append((path, value, exc.code, str(exc)[:120]))
            except Exception as exc:  # noqa: BLE001 - the point of the test
                wrong.append((path, value, type(exc).__name__, str(exc)[:120]))
    assert not wrong, "\n".join(map(repr, wrong))
