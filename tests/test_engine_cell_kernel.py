"""engine/cell_kernel: the Triton cell test against the torch path of extract_sparse._may_change_sign, in Triton's
interpreter on CPU (as CI runs it) and compiled on a GPU where there is one."""

import json

import pytest

pytest.importorskip("triton")

# in a fresh interpreter: TRITON_INTERPRET is read when triton is imported
SCRIPT = ("import json, sys; sys.path.insert(0, 'tests'); from test_engine_cell_kernel import compare; "
          "print(json.dumps(compare('cpu')))")


def test_cell_test_kernel_matches_torch(run_python):
    out = json.loads(run_python(SCRIPT, TRITON_INTERPRET="1").strip().splitlines()[-1])
    for stride, r in out.items():
        assert 0 < r["kept"] < r["n"], (stride, r)  # both outcomes occur
        assert r["keep_differs"] == 0, (stride, r)
        assert r["bound_rel"] < 1e-6 and r["slope_rel"] < 1e-6, (stride, r)


def compare(device: str) -> dict:
    """Per stride: the kernel's decisions (on `device`) against the torch path's (on CPU), on corner values of
    cells around a sphere (many near the certification margin) and random ones."""
    import torch

    from backend.engine import cell_kernel, extract_sparse

    g = torch.Generator().manual_seed(0)
    out = {}
    for stride, err in ((2, 0.0), (4, 1e-4), (8, 3e-4)):
        side = stride * 0.0015
        c = torch.rand(3000, 3, generator=g) * 0.3 - 0.15
        corners = c[:, None, :] + torch.as_tensor(extract_sparse.CORNERS, dtype=torch.float32) * side
        v = torch.cat([corners.norm(dim=-1) - 0.1, torch.randn(500, 8, generator=g) * 0.01])
        slopes: list = []
        keep_ref, bound_ref = extract_sparse._may_change_sign(v, side, stride, 1.5, slopes, err)
        dist = torch.as_tensor(extract_sparse._cover_table(stride), dtype=torch.float32) * side
        keep, bound, smax = cell_kernel.cell_test(v.to(device), dist.to(device), side, 1.5,
                                                  extract_sparse.SLOPE_MARGIN, err)
        out[stride] = {"n": len(v), "kept": int(keep_ref.sum()), "keep_differs": int((keep.cpu() != keep_ref).sum()),
                       "bound_rel": float(((bound.cpu() - bound_ref).abs() / bound_ref).max()),
                       "slope_rel": abs(float(smax) / float(slopes[0]) - 1)}
    return out


def test_cell_test_kernel_on_a_gpu_matches_torch():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for stride, r in compare("cuda").items():
        assert 0 < r["kept"] < r["n"], (stride, r)
        # compiled: sqrt and division may round differently from the CPU's; a decision may flip only at a tie
        assert r["keep_differs"] <= 2, (stride, r)
        assert r["bound_rel"] < 1e-5 and r["slope_rel"] < 1e-5, (stride, r)
