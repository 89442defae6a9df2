"""engine/cell_test: the Triton cell test against the torch path of extract._may_change_sign, in Triton's
interpreter (TRITON_INTERPRET=1 is read when triton is imported, hence a subprocess)."""

import json

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import json, torch
from backend.engine import cell_test, extract
g = torch.Generator().manual_seed(0)
out = {}
for stride, err in ((2, 0.0), (4, 1e-4), (8, 3e-4)):
    side = stride * 0.0015
    # corner values of cells around a sphere (many near the certification margin) and random ones
    c = torch.rand(3000, 3, generator=g) * 0.3 - 0.15
    corners = c[:, None, :] + torch.as_tensor(extract.CORNERS, dtype=torch.float32) * side
    v = torch.cat([corners.norm(dim=-1) - 0.1, torch.randn(500, 8, generator=g) * 0.01])
    slopes = []
    keep_ref, bound_ref = extract._may_change_sign(v, side, stride, 1.5, slopes, err)
    dist = torch.as_tensor(extract._cover_table(stride), dtype=torch.float32) * side
    keep, bound, smax = cell_test.cell_test(v, dist, side, 1.5, extract.SLOPE_MARGIN, err)
    out[stride] = {"n": len(v), "kept": int(keep_ref.sum()), "keep_differs": int((keep != keep_ref).sum()),
                   "bound_rel": float(((bound - bound_ref).abs() / bound_ref).max()),
                   "slope_rel": abs(float(smax) / float(slopes[0]) - 1)}
print(json.dumps(out))
"""


def test_cell_test_kernel_matches_torch(run_python):
    out = json.loads(run_python(SCRIPT, TRITON_INTERPRET="1").strip().splitlines()[-1])
    for stride, r in out.items():
        assert 0 < r["kept"] < r["n"], (stride, r)  # both outcomes occur
        assert r["keep_differs"] == 0, (stride, r)
        assert r["bound_rel"] < 1e-6 and r["slope_rel"] < 1e-6, (stride, r)
