"""The eval command's table and model-card block (the metrics themselves are tested with the data code)."""

from backend.commands import eval as ev

SUMMARY = {"identities": 2, "expressions_per_identity": 1, "points": 10000, "steps": 60, "resolution": 96,
           "samples": 100000, "topk": 8, "device": "cpu", "seconds": 1.0, "cd_l1_mm": 0.25, "nc": 0.95,
           "f1mm": 0.96, "exp_cd_l1_mm": 0.5, "corr_mm": 1.2}


def test_table_marks_targets_met_and_missed():
    lines = ev.format_table(SUMMARY).splitlines()
    row = {ln.split("|")[1].strip(): ln.split("|")[4].strip()
           for ln in lines if ln.startswith("| ") and "---" not in ln}
    assert row["CD-L1 neutral (mm)"] == "yes"  # 0.25 <= 0.30
    assert row["normal consistency"] == "NO"  # 0.95 < 0.99
    assert row["F-score @1 mm"] == "yes"
    assert row["CD-L1 held-out expressions (mm)"] == "NO"
    assert row["correspondence error, neutral (mm)"] == "yes"
    assert row["locality: p95 movement outside 1 cm margin (mm)"] == "n/a"  # not measured


def test_card_block_is_replaced_not_duplicated(tmp_path):
    card = tmp_path / "card.md"
    card.write_text("# card\nintro\n")
    ev.write_card(card, "first table")
    ev.write_card(card, "second table")
    text = card.read_text()
    assert text.startswith("# card\nintro\n")
    assert "second table" in text and "first table" not in text
    assert text.count(ev.CARD_BEGIN) == 1 and text.count(ev.CARD_END) == 1
