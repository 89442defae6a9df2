"""NPHM-style metrics on analytic cases with known answers.

Samples are independent and area-uniform, so the nearest-neighbour offset along a surface follows the
2-D Poisson law P(d > r) = exp(-pi rho r^2) (rho = samples per m^2 of the searched cloud): the expected
point-to-point distance between two surfaces a gap g apart is E sqrt(g^2 + d^2), computed here by quadrature.
"""

from __future__ import annotations

import numpy as np
import pytest

from backend.data import metrics
from test_data_sdf import icosphere


def expected_nn_mm(gap_m: float, density: float) -> float:
    r = np.linspace(0, 20 / np.sqrt(density), 200_001)
    pdf = 2 * np.pi * density * r * np.exp(-np.pi * density * r ** 2)
    return float(np.trapz(np.sqrt(gap_m ** 2 + r ** 2) * pdf, r) * 1e3)


def test_concentric_spheres():
    v, f = icosphere(6)                                     # 81,920 triangles; sagitta ~ 4 micrometres
    r1, r2, n = 0.100, 0.102, 100_000
    m = metrics.evaluate(v * r1, f, v * r2, f, n=n)
    # accuracy: points on r1 searched among r2 samples, whose density seen from r1 is n / (4 pi r1^2)
    # (radial projection); completeness the other way round
    acc = expected_nn_mm(r2 - r1, n / (4 * np.pi * r1 ** 2))
    comp = expected_nn_mm(r2 - r1, n / (4 * np.pi * r2 ** 2))
    assert m["accuracy"] == pytest.approx(acc, rel=0.01)
    assert m["completeness"] == pytest.approx(comp, rel=0.01)
    assert m["chamfer_l1"] == pytest.approx(0.5 * (acc + comp), rel=0.01)
    assert m["chamfer_l2"] > 4.0 and m["chamfer_l2"] == pytest.approx(0.5 * (acc ** 2 + comp ** 2), rel=0.03)
    assert m["f_score@1mm"] == 0.0                          # nothing is closer than the 2 mm gap
    assert m["f_score@2.5mm"] > 0.95 and m["f_score@5mm"] == 1.0
    assert m["normal_consistency"] > 0.999


def test_identical_surfaces_and_bad_input():
    v, f = icosphere(5)
    n = 100_000
    m = metrics.evaluate(v * 0.1, f, v * 0.1, f, n=n)
    # same surface, independent samples: E d = 0.5 / sqrt(rho)
    expected = 0.5 / np.sqrt(n / (4 * np.pi * 0.1 ** 2)) * 1e3
    assert m["chamfer_l1"] == pytest.approx(expected, rel=0.02)
    assert m["normal_consistency"] > 0.99
    with pytest.raises(ValueError):
        metrics.evaluate(v, f + len(v), v, f)
    with pytest.raises(ValueError):
        metrics.evaluate(v[:, :2], f, v, f)
