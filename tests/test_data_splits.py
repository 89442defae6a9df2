"""Held-out split: fixed, seeded, disjoint from training; expression recipe covers the jaw."""

from __future__ import annotations

import numpy as np


def test_splits_are_disjoint_and_fixed():
    from backend.data import splits

    names = [f"s{i}_L" for i in range(25)] + [f"s{i}_R" for i in range(25)] + ["jawOpen", "a", "b"]
    train_id, held_id = splits.train_identities(), splits.heldout_identities()
    assert train_id.shape == (4096, 100) and held_id.shape == (50, 100)
    np.testing.assert_array_equal(held_id, splits.heldout_identities())
    assert np.abs(train_id[:, None, :8] - held_id[None, :, :8]).max(-1).min() > 1e-3
    train_w = splits.train_expressions(names, n=65536)
    held_w = splits.heldout_expressions(names)
    assert train_w.shape == (65536, 53) and (held_w[0] == 0).all()
    train_rows = {r.tobytes() for r in train_w}
    assert not any(r.tobytes() in train_rows for r in held_w[1:])        # no held-out combination is trained on
    assert (train_w.sum(1) > 0).all()                                      # the pool holds no neutral row
    jaw = train_w[:, names.index("jawOpen")]
    assert 0.4 < (jaw > 0).mean() < 0.7 and (jaw > 0.8).mean() > 0.08
