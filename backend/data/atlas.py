"""The 39-region head atlas that ships with the weights (`weights/atlas.safetensors`).

    atlas = load_atlas()            # default: <backend package>/../weights/atlas.safetensors
    atlas.vertices (V,3) f32        mean neutral ICT head surface (metres, +Y up, face +Z), V = 15602
    atlas.faces (F,3) i32           closed surface: head + neck cap + scleras (see backend.data.ict)
    atlas.uv (F,3,2) f32            per-corner UVs in the ICT layout
    atlas.region (V,) i32           region id per vertex; a triangle's region is its first vertex's
    atlas.mirror_vertex (V,) i32    vertex at (-x, y, z) (an involution; midline vertices map to themselves)
    atlas.anchor_vertex (39,) i32   one vertex per region; atlas.anchors (39,3) f32 their positions
    atlas.names [39], atlas.mirror [39] (mirror region id or None), atlas.expressions [53], atlas.licence

Rebuild (needs the converted ICT file; scipy is used only here, at build time):
    python -m backend.data.atlas --ict .data/ict.safetensors --out weights/atlas.safetensors

Construction: named seed vertices from the Multi-PIE landmarks and head geometry; geodesic Voronoi
(multi-source Dijkstra over mesh edges, edge length = Euclidean) on the subject's left half, mirrored to the
right through the exact vertex mirror map. The mouth socket is the "mouth interior" region and each sclera
is its eyeball region (the sclera is its own closed mesh, so it is contiguous on its own).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..constants import N_REGIONS

ICT_LICENCE = """ICT-FaceKit (https://github.com/ICT-VGL/ICT-FaceKit), MIT License
Copyright (c) 2020 USC Institute for Creative Technologies
Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated \
documentation files (the "Software"), to deal in the Software without restriction, including without limitation \
the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and \
to permit persons to whom the Software is furnished to do so, subject to the following conditions:
The above copyright notice and this permission notice shall be included in all copies or substantial portions \
of the Software.
THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED \
TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL \
THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF \
CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER \
DEALINGS IN THE SOFTWARE."""

# Region order is part of the weights format: never reorder, only append in a new format version.
MIDLINE = ["forehead", "nose bridge", "nose tip", "upper lip", "lower lip", "chin", "mouth interior",
           "crown", "occiput", "throat", "nape"]
PAIRED = ["eyebrow", "upper eyelid", "lower eyelid", "eyeball", "nostril", "cheek", "cheekbone", "nasolabial",
          "mouth corner", "jaw", "temple", "ear", "parietal scalp", "side neck"]


def region_names() -> tuple[list[str], list[int | None]]:
    """Names and mirror ids: 11 midline regions, then (left, right) for each of the 14 pairs."""
    names = list(MIDLINE)
    mirror: list[int | None] = [None] * len(MIDLINE)
    for p in PAIRED:
        i = len(names)
        names += [f"left {p}", f"right {p}"]
        mirror += [i + 1, i]
    assert len(names) == N_REGIONS
    return names, mirror


@dataclass
class Atlas:
    vertices: np.ndarray
    faces: np.ndarray
    uv: np.ndarray
    region: np.ndarray
    mirror_vertex: np.ndarray
    anchor_vertex: np.ndarray
    anchors: np.ndarray
    names: list[str]
    mirror: list[int | None]
    expressions: list[str]
    licence: str

    def face_region(self) -> np.ndarray:
        """Region id per triangle (its first vertex's region)."""
        return self.region[self.faces[:, 0]]

    def regions_json(self) -> list[dict]:
        return [{"id": i, "name": n, "mirror": self.mirror[i], "anchor": [round(float(x), 6) for x in self.anchors[i]]}
                for i, n in enumerate(self.names)]


def labelled_surface_samples(verts: np.ndarray, faces: np.ndarray, region: np.ndarray, n: int, seed: int = 0
                             ) -> tuple[np.ndarray, np.ndarray]:
    """n area-uniform points (n,3) on a mesh and each one's region: that of its triangle's corner with the
    largest barycentric weight, as the training sampler labels its surface points. A region's samples stand for
    its surface where its vertices cannot: inside a large triangle (the neck cap's are 16 cm across, the
    scalp's 8 mm) a point can be centimetres from every vertex of the region it lies in."""
    v, f = np.asarray(verts, np.float64), np.asarray(faces, np.int64)
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    rng = np.random.default_rng(seed)
    face = rng.choice(len(f), n, p=area / area.sum())
    u = rng.random((n, 2))
    su = np.sqrt(u[:, 0])
    bary = np.stack([1 - su, su * (1 - u[:, 1]), su * u[:, 1]], 1)
    points = (v[f[face]] * bary[..., None]).sum(1)
    return points, np.asarray(region)[f[face, bary.argmax(1)]]


def default_path() -> Path:
    import backend

    return Path(backend.__file__).resolve().parent.parent / "weights" / "atlas.safetensors"


def load_atlas(path: str | Path | None = None) -> Atlas:
    """Load and validate the atlas. The bytes are checked against `<path>.sha256` (written by save_atlas)
    before parsing; safetensors + JSON metadata only, nothing is unpickled."""
    import hashlib

    from safetensors.numpy import load

    from ..errors import WeightsError

    path = Path(path) if path is not None else default_path()
    side = path.with_name(path.name + ".sha256")
    if not path.is_file():
        raise WeightsError(f"atlas not found: {path}")
    if not side.is_file():
        raise WeightsError(f"{side} is missing: cannot verify {path}")
    data = path.read_bytes()
    expected = (side.read_text().split() or [""])[0].lower()
    if hashlib.sha256(data).hexdigest() != expected:
        raise WeightsError(f"{path} is corrupt or was modified (SHA-256 does not match {side})")
    try:
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(json.loads(data[8:8 + header_len])["__metadata__"]["atlas"])
        a = load(data)
        atlas = Atlas(**a, names=meta["names"], mirror=meta["mirror"], expressions=meta["expressions"],
                      licence=meta["licence"])
    except (KeyError, ValueError, TypeError) as exc:
        raise WeightsError(f"cannot read atlas {path}: {exc}") from exc
    nv = len(atlas.vertices)
    if (len(atlas.names) != N_REGIONS or atlas.region.shape != (nv,) or atlas.mirror_vertex.shape != (nv,)
            or atlas.anchors.shape != (N_REGIONS, 3) or atlas.region.min() < 0 or atlas.region.max() >= N_REGIONS
            or atlas.faces.max() >= nv or atlas.uv.shape != (len(atlas.faces), 3, 2)):
        raise WeightsError(f"atlas {path} is inconsistent (shapes or ids out of range)")
    return atlas


# ----------------------------------------------------------------------------------------------- building
def _seeds(v: np.ndarray, lm: np.ndarray, outer: np.ndarray) -> dict[str, tuple[int, float]]:
    """(seed vertex, additive bias in metres) per midline and left region; a larger bias grows the region.
    Positions come from the Multi-PIE landmarks (face) or rays from the head / neck centre (scalp, neck)."""
    idx = np.flatnonzero(outer)
    mid = idx[np.abs(v[idx, 0]) < 1e-6]

    def snap(p, midline: bool = False) -> int:
        cand = mid if midline else idx
        return int(cand[np.argmin(np.linalg.norm(v[cand] - np.asarray(p), axis=1))])

    def ray(centre, direction, midline: bool = False) -> int:
        cand = mid if midline else idx
        d = v[cand] - np.asarray(centre)
        return int(cand[np.argmax(d @ np.asarray(direction) / np.linalg.norm(d, axis=1))])

    L = v[lm]
    head_c, neck_c = (0.0, 0.03, -0.005), (0.0, -0.13, -0.01)
    return {
        "forehead": (snap((0.0, 0.10, 0.10), True), 0.012),
        "nose bridge": (int(lm[28]), 0.0),
        "nose tip": (int(lm[30]), 0.0),
        "upper lip": (snap((L[51] * 0.7 + L[33] * 0.3), True), 0.0),
        "lower lip": (int(lm[57]), 0.0),
        "chin": (snap(L[8] * 0.7 + L[57] * 0.3, True), 0.005),
        "crown": (ray(head_c, (0, 1, -0.1), True), 0.025),
        "occiput": (ray(head_c, (0, -0.05, -1), True), 0.02),
        "throat": (ray(neck_c, (0, 0, 1), True), 0.0),
        "nape": (ray(neck_c, (0, 0.1, -1), True), 0.01),
        "left eyebrow": (int(lm[24]), -0.004),
        "left upper eyelid": (snap((L[43] + L[44]) / 2 + (0, 0.004, 0)), 0.0),
        "left lower eyelid": (snap((L[46] + L[47]) / 2 + (0, -0.006, 0)), 0.0),
        "left nostril": (snap(L[35] + (0.008, 0.004, -0.006)), 0.0),
        "left cheek": (snap((0.05, -0.02, 0.08)), 0.006),
        "left cheekbone": (snap(L[45] + (0.014, -0.024, -0.01)), 0.004),
        "left nasolabial": (snap((L[35] + L[54]) / 2 + (0.01, 0, 0)), 0.0),
        "left mouth corner": (snap(L[54] + (0.004, 0, -0.002)), -0.002),
        "left jaw": (int(lm[12]), 0.0),
        "left temple": (snap((0.068, 0.055, 0.05)), 0.0),
        "left parietal scalp": (ray(head_c, (0.75, 0.65, -0.15)), 0.02),
        "left side neck": (ray(neck_c, (1, 0.1, -0.2)), 0.01),
    }


def _ear_mask(v: np.ndarray, outer: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Left ear: outer vertices standing > 4 mm off a quadratic fit x = f(y, z) of the skull around the ear,
    the connected piece holding the ear tip, plus the pockets it encloses (concha, ear canal)."""
    from . import topology

    band = outer & (v[:, 0] > 0.04) & (v[:, 1] > -0.03) & (v[:, 1] < 0.06) & (v[:, 2] < 0.03) & (v[:, 2] > -0.05)
    tip = np.flatnonzero(band)[np.argmax(v[band, 0])]
    d = np.linalg.norm(v - v[tip] + (0.017, 0.0, 0.0), axis=1)   # ~ ear centre, on the skull
    ball = outer & (v[:, 0] > 0) & (d < 0.05)
    ring = ball & (d > 0.04)

    def basis(p: np.ndarray) -> np.ndarray:
        y, z = p[:, 1], p[:, 2]
        return np.stack([np.ones_like(y), y, z, y * y, z * z, y * z], 1)

    coef = np.linalg.lstsq(basis(v[ring]), v[ring, 0], rcond=None)[0]
    raised = ball & (v[:, 0] - basis(v) @ coef > 0.004)
    lab = topology.connected_components(len(v), edges[raised[edges[:, 0]] & raised[edges[:, 1]]])
    ear = raised & (lab == lab[tip])
    rest = ball & ~ear
    pockets = topology.connected_components(len(v), edges[rest[edges[:, 0]] & rest[edges[:, 1]]])
    return ear | (rest & (pockets != np.argmax(np.bincount(pockets[rest]))))   # all but the outside piece


def build_atlas(ict) -> Atlas:
    """Build the atlas from a converted ICT model (backend.data.ict.IctModel)."""
    from scipy.spatial import cKDTree

    from . import topology

    v = ict.neutral.astype(np.float64)
    nv = len(v)
    names, mirror = region_names()
    rid = {n: i for i, n in enumerate(names)}

    dist, mv = cKDTree(v).query(v * (-1.0, 1.0, 1.0))
    if dist.max() > 1e-4 or not np.array_equal(mv[mv], np.arange(nv)):
        raise ValueError(f"mean head is not mirror symmetric (max mirror error {dist.max():.2e} m)")
    mv = mv.astype(np.int64)

    part = {k: np.arange(*ict.parts[k]) for k in ict.parts}
    region = np.full(nv, -1, np.int64)
    region[part["mouth_socket"]] = rid["mouth interior"]
    region[part["eyeball_left"]] = rid["left eyeball"]
    region[part["eyeball_right"]] = rid["right eyeball"]

    outer = np.zeros(nv, bool)
    outer[part["face"]] = outer[part["head_neck"]] = True
    e = topology.edges(ict.faces)
    ear = _ear_mask(v, outer, e)
    region[ear] = rid["left ear"]
    region[mv[ear]] = rid["right ear"]

    free = region < 0   # face, head/neck and eye sockets: labelled by geodesic Voronoi
    seeds = _seeds(v, ict.landmarks, outer & free)
    seed_v, seed_r, bias = [], [], []
    for n, (s, b) in seeds.items():
        members = [(s, rid[n])]
        if n.startswith("left "):
            if v[s, 0] <= 0:
                raise ValueError(f"atlas seed for {n} is not on the left (+x)")
            partner = mirror[rid[n]]
            assert partner is not None  # every left region has its right mirror
            members.append((int(mv[s]), partner))
        for vertex, r in members:
            seed_v.append(vertex)
            seed_r.append(r)
            bias.append(b)
    if len(set(seed_v)) != len(seed_v):
        raise ValueError("two atlas seeds snapped to the same vertex")
    vor = _voronoi(v, e[free[e[:, 0]] & free[e[:, 1]]], seed_v, seed_r, bias)

    # symmetrise: the left half (x >= 0) keeps its labels, the right half is their mirror image
    mirror_of = np.array([m if m is not None else i for i, m in enumerate(mirror)])
    left = free & (v[:, 0] >= 0)
    region[left] = vor[left]
    right = free & (v[:, 0] < 0)
    region[right] = mirror_of[vor[mv[right]]]
    if (region < 0).any():
        raise ValueError(f"{(region < 0).sum()} vertices unreachable from any seed")

    anchor_vertex = _anchors(v, region, mv, mirror)
    return Atlas(vertices=ict.neutral.astype(np.float32), faces=ict.faces.astype(np.int32),
                 uv=ict.uv.astype(np.float32), region=region.astype(np.int32), mirror_vertex=mv.astype(np.int32),
                 anchor_vertex=anchor_vertex.astype(np.int32), anchors=ict.neutral[anchor_vertex].astype(np.float32),
                 names=names, mirror=mirror, expressions=list(ict.expressions), licence=ICT_LICENCE)


def _voronoi(v: np.ndarray, edges: np.ndarray, seeds: list[int], labels: list[int], bias: list[float]) -> np.ndarray:
    """Additively weighted geodesic Voronoi: multi-source Dijkstra over mesh edges starting seed i at
    distance -bias[i]. Every region is the union of shortest-path trees of one seed, hence connected."""
    import heapq

    n = len(v)
    w = np.linalg.norm(v[edges[:, 0]] - v[edges[:, 1]], axis=1)
    order = np.argsort(np.concatenate([edges[:, 0], edges[:, 1]]), kind="stable")
    dst = np.concatenate([edges[:, 1], edges[:, 0]])[order]
    wt = np.concatenate([w, w])[order]
    start = np.searchsorted(np.concatenate([edges[:, 0], edges[:, 1]])[order], np.arange(n + 1))
    dist = np.full(n, np.inf)
    lab = np.full(n, -1, np.int64)
    heap = [(-b, s, r) for s, r, b in zip(seeds, labels, bias)]
    heapq.heapify(heap)
    while heap:
        d, x, r = heapq.heappop(heap)
        if lab[x] >= 0:
            continue
        lab[x], dist[x] = r, d
        for k in range(start[x], start[x + 1]):
            y = dst[k]
            if lab[y] < 0 and d + wt[k] < dist[y]:
                dist[y] = d + wt[k]
                heapq.heappush(heap, (d + wt[k], int(y), r))
    return lab


def _anchors(v: np.ndarray, region: np.ndarray, mv: np.ndarray, mirror: list[int | None]) -> np.ndarray:
    """Region vertex nearest the region's vertex centroid; midline regions prefer midline vertices; the right
    member of a pair takes the mirror of the left anchor so anchors mirror exactly."""
    out = np.zeros(len(mirror), np.int64)
    for r, m in enumerate(mirror):
        if m is not None and m < r:
            out[r] = mv[out[m]]
            continue
        idx = np.flatnonzero(region == r)
        if m is None and (np.abs(v[idx, 0]) < 1e-6).any():
            cand = idx[np.abs(v[idx, 0]) < 1e-6]
        else:
            cand = idx
        out[r] = cand[np.argmin(np.linalg.norm(v[cand] - v[idx].mean(0), axis=1))]
    return out


def problems(atlas: Atlas, mirror_tol: float = 1e-4) -> list[str]:
    """Invariant violations (empty when the atlas is sound): 39 named regions, every vertex labelled, each
    region one connected piece of the mesh graph, mirror pairs consistent (vertex map is an involution that
    sends x -> -x within `mirror_tol` metres and sends each region onto its mirror region), anchors inside
    their regions and mirrored."""
    from . import topology

    out = []
    v, reg, mv = atlas.vertices.astype(np.float64), atlas.region, atlas.mirror_vertex
    if len(atlas.names) != N_REGIONS or len(set(atlas.names)) != N_REGIONS:
        out.append("need 39 distinct region names")
    counts = np.bincount(reg, minlength=N_REGIONS)
    out += [f"region {atlas.names[r]} is empty" for r in np.flatnonzero(counts == 0)]
    e = topology.edges(atlas.faces)
    e = e[reg[e[:, 0]] == reg[e[:, 1]]]
    lab = topology.connected_components(len(v), e)
    for r in range(N_REGIONS):
        if len(np.unique(lab[reg == r])) > 1:
            out.append(f"region {atlas.names[r]} has {len(np.unique(lab[reg == r]))} pieces")
    if not np.array_equal(mv[mv], np.arange(len(v))):
        out.append("vertex mirror map is not an involution")
    err = np.abs(v[mv] * (-1, 1, 1) - v).max()
    if err > mirror_tol:
        out.append(f"vertex mirror map is off by {err:.2e} m")
    mirror_of = np.array([m if m is not None else i for i, m in enumerate(atlas.mirror)])
    for r, m in enumerate(atlas.mirror):
        if m is not None and atlas.mirror[m] != r:
            out.append(f"mirror of {atlas.names[r]} does not point back")
    bad = np.flatnonzero(reg[mv] != mirror_of[reg])
    if len(bad):
        out.append(f"{len(bad)} vertices whose mirror vertex is not in the mirror region")
    if not np.array_equal(reg[atlas.anchor_vertex], np.arange(N_REGIONS)):
        out.append("an anchor vertex lies outside its region")
    if not np.array_equal(mv[atlas.anchor_vertex], atlas.anchor_vertex[mirror_of]):
        out.append("anchors of mirror pairs are not mirror vertices")
    if not np.allclose(atlas.anchors, atlas.vertices[atlas.anchor_vertex]):
        out.append("anchor positions differ from their vertices")
    return out


def save_atlas(atlas: Atlas, path: Path) -> None:
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(getattr(atlas, k)) for k in
              ("vertices", "faces", "uv", "region", "mirror_vertex", "anchor_vertex", "anchors")}
    meta = {"format": "imhead-atlas/1", "names": atlas.names, "mirror": atlas.mirror,
            "expressions": atlas.expressions, "licence": atlas.licence,
            "units": "metres, +Y up, face toward +Z; left = subject's left = +x"}
    import hashlib

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(path), metadata={"atlas": json.dumps(meta)})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")


def main(argv: list[str] | None = None) -> int:
    from .ict import load_ict

    p = argparse.ArgumentParser(description="build weights/atlas.safetensors from the converted ICT file")
    p.add_argument("--ict", type=Path, default=Path(".data/ict.safetensors"))
    p.add_argument("--out", type=Path, default=default_path())
    args = p.parse_args(argv)
    atlas = build_atlas(load_ict(args.ict))
    issues = problems(atlas)
    if issues:
        raise SystemExit("atlas invariants fail: " + "; ".join(issues))
    save_atlas(atlas, args.out)
    counts = np.bincount(atlas.region, minlength=N_REGIONS)
    for i, n in enumerate(atlas.names):
        print(f"{i:2d} {n:24s} {counts[i]:6d} vertices")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
