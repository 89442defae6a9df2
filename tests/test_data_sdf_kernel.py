"""data/sdf_kernel: the fused Triton distance + winding-number kernel against the float64 brute-force references
of data/mesh.py, in Triton's interpreter on CPU (as CI runs it) and compiled on a GPU where there is one.
The ICT case needs the converted file .data/ict.safetensors (skipped without it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]
ICT = REPO / ".data" / "ict.safetensors"


def _run(run_python, call: str) -> dict:
    # in a fresh interpreter: TRITON_INTERPRET is read when triton is imported
    script = ("import json, sys; sys.path.insert(0, 'tests'); "
              "from test_data_sdf_kernel import compare_ict, compare_synthetic; "
              f"print(json.dumps({call}))")
    return json.loads(run_python(script, TRITON_INTERPRET="1").strip().splitlines()[-1])


def _check_synthetic(out: dict, dist_tol: float) -> None:
    groups = out.pop("groups_1_2")
    assert groups["group0_nonzero"] == 0 and groups["sign_differs"] == 0 and groups["n_inside"] > 4, groups
    for name, r in out.items():
        assert r["n_inside"] > 10 and r["n_outside"] > 10, (name, r)      # both outcomes occur
        assert r["n_decided"] > 0.9 * r["n"], (name, r)
        assert r["dist_err"] < dist_tol, (name, r)
        assert r["group_sign_differs"] == 0 and r["total_sign_differs"] == 0, (name, r)
        assert r["wind_err_decided"] < 0.25, (name, r)
    forced = out["forced_retries"]
    assert forced["retries"][0] == forced["n"] and forced["retries"][1] > 0.9 * forced["n"], forced


def test_kernel_matches_float64_reference_on_synthetic_meshes(run_python):
    _check_synthetic(_run(run_python, "compare_synthetic('cpu')"), 2e-7)


def test_kernel_matches_float64_reference_on_an_ict_head(run_python):
    if not ICT.is_file():
        pytest.skip(f"{ICT} missing (python -m backend.data.ict converts ../shared's ICT-FaceKit)")
    r = _run(run_python, "compare_ict('cpu')")
    assert r["n_inside"] > 5 and r["n_outside"] > 5, r
    assert r["dist_err"] < 2e-7 and r["sign_differs"] == 0, r
    assert r["n_buried"] > 5 and r["n_exposed"] > 5, r
    assert r["exposed_differs_ref"] == 0 and r["exposed_differs_torch"] == 0, r


def test_sdf_impl_choice():
    import torch

    from backend.data import sdf_kernel
    from backend.data.sampler import resolve_sdf_impl

    cpu = torch.device("cpu")
    assert resolve_sdf_impl("torch", cpu) == "torch"
    assert resolve_sdf_impl("auto", cpu) == "torch"      # never the interpreter unless asked for
    if not sdf_kernel.available(cpu):
        with pytest.raises(ValueError, match="cannot run"):
            resolve_sdf_impl("triton", cpu)
    with pytest.raises(ValueError, match="sdf_impl"):
        resolve_sdf_impl("numpy", cpu)
    # a kernel failure falls back to the torch path (with a warning) only where the kernel was chosen automatically
    from backend.data.sampler import HeadSampler

    def broken() -> int:
        raise RuntimeError("no compile")

    s = HeadSampler.__new__(HeadSampler)
    s.sdf_impl, s._sdf_auto = "triton", True
    with pytest.warns(UserWarning, match="torch path"):
        assert s._with_fallback(broken, lambda: 5) == 5
    assert s.sdf_impl == "torch" and s._with_fallback(broken, lambda: 6) == 6
    s.sdf_impl, s._sdf_auto = "triton", False
    with pytest.raises(RuntimeError, match="no compile"):
        s._with_fallback(broken, lambda: 5)


def test_kernel_on_a_gpu_matches_float64_reference():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    # compiled: sqrt, division and contraction may round differently from the interpreter
    _check_synthetic(compare_synthetic("cuda"), 4e-7)
    if ICT.is_file():
        r = compare_ict("cuda", n_points=2048, n_eye=None)
        assert r["dist_err"] < 4e-7 and r["sign_differs"] <= 1, r
        assert r["exposed_differs_ref"] <= 1, r


def test_kernel_compiles_for_a_hopper_gpu():
    """Triton's own compiler and ptxas run without a GPU: catch what the interpreter cannot (types across
    branches, unsupported ops) for the sampler's configuration, distance and winding together."""
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from backend.data import sdf_kernel

    fn = sdf_kernel._query_kernel
    names = list(inspect.signature(fn.fn).parameters)
    types = {"perm_ptr": "*i32", "keep_ptr": "*i8", "valid_ptr": "*i8", "sup_start_ptr": "*i32",
             "grp_sup_ptr": "*i32", "stats_ptr": "*i32", "beta2": "fp32", "amb_tol": "fp32"}
    consts = {"S": 32, "SP": sdf_kernel.SUPER, "SCH": sdf_kernel.SUPER_CHUNK, "BLOCK_N": sdf_kernel.BLOCK,
              "CHUNK_C": sdf_kernel.CHUNK, "NEED_D": True, "NEED_W": True, "COUNT": False}
    sig = {n: "constexpr" if n in consts else types.get(n, "*fp32" if n.endswith("_ptr") else "i32") for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in consts.items()})
    try:
        out = compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": sdf_kernel.NUM_WARPS})
    except FileNotFoundError as e:     # a triton wheel without its bundled ptxas
        pytest.skip(str(e))
    assert len(out.asm["cubin"]) > 0


def synthetic_scene():
    """Three overlapping closed groups (sphere, small sphere, box) as one mesh; returns verts (V,3), faces,
    groups (float64 numpy)."""
    import numpy as np
    from test_data_sdf import box_mesh, icosphere

    v0, f0 = icosphere(3)
    v1, f1 = icosphere(1)
    v2, f2 = box_mesh(np.array([0.03, 0.02, 0.04]), 2)
    parts = [(v0 * 0.1, f0), (v1 * 0.04 + [0.09, 0.0, 0.0], f1), (v2 + [-0.05, 0.06, 0.0], f2)]
    verts, faces, groups, base = [], [], [], 0
    for g, (v, f) in enumerate(parts):
        verts.append(v)
        faces.append(f + base)
        groups.append(np.full(len(f), g))
        base += len(v)
    return np.concatenate(verts), np.concatenate(faces), np.concatenate(groups)


def _summary(dist, wind, d_ref, w_ref, retries) -> dict:
    import torch

    dist, wind = dist.double().cpu(), wind.double().cpu()
    decided = (w_ref - w_ref.round()).abs() < 1e-3      # off the surface (float32 could go either way on it)
    total = w_ref.sum(-1)
    decided_total = (total - total.round()).abs() < 1e-3
    return {"dist_err": float((dist - d_ref).abs().max()),
            "group_sign_differs": int(((wind > 0.5) != (w_ref > 0.5))[decided].sum()),
            "total_sign_differs": int(((wind.sum(-1) > 0.5) != (total > 0.5))[decided_total].sum()),
            "wind_err_decided": float(torch.where(decided, (wind - w_ref).abs(), 0).max()),
            "n_inside": int((total > 0.5).sum()), "n_outside": int((total < 0.5).sum()),
            "n_decided": int(decided_total.sum()), "n": total.numel(),
            "retries": [int(x) for x in retries]}


def compare_synthetic(device: str, n_points: int = 96) -> dict:
    """Per configuration: kernel on `device` vs float64 brute force on CPU, for two deformed copies of the scene
    with random face masks and points uniform in a box, near the surface (3 mm) and near edges."""
    import numpy as np
    import torch

    from backend.data import mesh, sdf_kernel

    v, f, groups = synthetic_scene()
    rng = np.random.default_rng(0)
    verts = np.stack([v, v * [1.1, 0.9, 1.0] + 0.02 * np.sin(7 * v[:, [1, 2, 0]])])
    faces = torch.as_tensor(f)
    tri = verts[:, f]                                                    # (2,F,3,3)
    half = n_points // 2
    pick = rng.integers(len(f), size=(2, half))
    bary = rng.dirichlet([1, 1, 1], size=(2, half))
    bary[:, ::4] = rng.dirichlet([1, 1, 0.05], size=(2, len(range(0, half, 4))))   # near edges and corners
    surf = np.einsum("bnk,bnkd->bnd", bary, tri[np.arange(2)[:, None], pick])
    near = surf + rng.normal(0, 0.003, surf.shape)
    pts = np.stack([near, rng.uniform(-0.15, 0.15, (2, half, 3))], 2).reshape(2, -1, 3)   # alternating
    p64, v64 = torch.as_tensor(pts), torch.as_tensor(verts)
    mask = torch.as_tensor(rng.random((2, len(f))) < 0.85)
    d_ref = mesh.distance_brute(p64, v64, faces, face_mask=mask)
    w_ref = torch.stack([mesh.winding_number_brute(p64, v64, faces[torch.as_tensor(groups == g)])
                         for g in range(3)], -1)
    p32, v32, m = p64.float().to(device), v64.float().to(device), mask.to(device)
    out = {}
    configs: list[tuple[str, int, int, dict]] = [
        ("leaf32", 32, n_points, {}), ("leaf24_unsorted", 24, 48, {"sort": False, "block": 32}),
        ("forced_retries", 32, 32, {"ambiguous": 0.0})]      # every point takes all three sweeps
    for name, leaf, n, kw in configs:
        cm = mesh.ClusteredMesh(v, f, groups, leaf=leaf, device=device)
        r = sdf_kernel.query(cm, p32[:, :n], v32, face_mask=m, **kw)
        out[name] = _summary(r["distance"], r["winding"], d_ref[:, :n], w_ref[:, :n], r["retries"].tolist())
    # winding numbers of groups 1 and 2 only (the exposure re-test's query); group 0 stays 0
    r = sdf_kernel.query(cm, p32, v32, need_distance=False, groups=(1, 3))
    w = r["winding"].double().cpu()
    out["groups_1_2"] = {"group0_nonzero": int((w[..., 0] != 0).sum()),
                         "sign_differs": int(((w[..., 1:] > 0.5) != (w_ref[..., 1:] > 0.5)).sum()),
                         "n_inside": int((w_ref[..., 1:] > 0.5).sum())}
    return out


def compare_ict(device: str, n_points: int = 32, n_eye: int | None = 32) -> dict:
    """One ICT head with the left eye closed and a random expression mixed in: signed distances of sampler
    space points (kernel vs float64 brute force) and the exposure re-test at eye-area triangle centroids
    (kernel vs float64 brute-force winding numbers and vs the torch path), `n_eye` of them (None: all)."""
    import torch

    from backend.data import mesh
    from backend.data.sampler import HeadSampler

    s = HeadSampler(ICT, device=device, sdf_impl="torch")
    w = s.train_exps[5:6].clone()
    w[0, s.expressions.index("eyeBlink_L")] = 1.0
    posed, _ = s.meshes(s.train_ids[3:4], w)
    exposed_torch = s.exposed_faces(posed)
    g = torch.Generator(device=device).manual_seed(0)
    pts = s._space_points(posed, exposed_torch.float(), n_points, g)
    s.sdf_impl = "triton"
    sdf = s.signed_distance(pts, posed, exposed_torch)
    p, v = pts.double().cpu(), posed.double().cpu()
    faces = s.faces.cpu()
    w_ref = mesh.winding_number_brute(p, v, faces, chunk=16)
    d_ref = mesh.distance_brute(p, v, faces, chunk=16, face_mask=exposed_torch.cpu())
    ref = torch.where(w_ref > 0.5, -d_ref, d_ref)
    out = {"dist_err": float((sdf.double().cpu().abs() - d_ref).abs().max()),
           "sign_differs": int(((sdf.cpu() < 0) != (ref < 0)).sum()),
           "n_inside": int((ref < 0).sum()), "n_outside": int((ref > 0).sum())}
    # exposure: half of the picked eye faces are ones the closed lid buries
    eye = s.eye_faces.cpu()
    changed = (~exposed_torch[0, s.eye_faces]).cpu()
    if n_eye is None:
        pick = torch.arange(len(eye))
    else:
        pick = torch.cat([torch.nonzero(changed).flatten()[::7][:n_eye // 2],
                          torch.nonzero(~changed).flatten()[::17][:n_eye - n_eye // 2]])
    is_sclera = s.eye_is_sclera.cpu()[pick]
    # the sampler's own path, on the picked faces only (the interpreter is slow)
    s.eye_faces, s.eye_is_sclera = s.eye_faces[pick.to(device)], s.eye_is_sclera[pick.to(device)]
    s.eye_sclera_idx, s.eye_head_idx = (torch.nonzero(x).flatten() for x in (s.eye_is_sclera, ~s.eye_is_sclera))
    exposed_kernel = s.exposed_faces(posed)[0, s.eye_faces].cpu()
    head = faces[torch.as_tensor(s.accel.cluster_faces[:s.accel.group_bounds[1]].flatten().unique().cpu())]
    sclera = faces[torch.as_tensor(s.accel.cluster_faces[s.accel.group_bounds[1]:].flatten().unique().cpu())]
    c64 = v[0][faces[eye[pick]]].mean(1)[None]
    w_head = mesh.winding_number_brute(c64, v, head, chunk=64)[0]
    w_sclera = mesh.winding_number_brute(c64, v, sclera, chunk=64)[0]
    exposed_ref = torch.where(is_sclera, w_head, w_sclera) < 0.5
    out.update({"exposed_differs_ref": int((exposed_kernel != exposed_ref).sum()),
                "exposed_differs_torch": int((exposed_kernel != exposed_torch[0, s.eye_faces].cpu()).sum()),
                "n_buried": int((~exposed_ref).sum()), "n_exposed": int(exposed_ref.sum())})
    return out
