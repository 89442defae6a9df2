"""Write docs/protocol.md's table of op params and replies from backend/payloads.py and backend/replies.py:
`python tools/protocol_table.py` (tests/test_payloads.py checks that the doc is up to date)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "protocol.md"
SECTION = re.compile(r"(<!-- payloads:begin -->\n).*?(<!-- payloads:end -->)", re.S)


def render(text: str, table: str) -> str:
    """`text` with the section between the payload markers replaced by `table`."""
    if not SECTION.search(text):
        raise ValueError("docs/protocol.md has no <!-- payloads:begin/end --> markers")
    return SECTION.sub(lambda m: m.group(1) + table + m.group(2), text, count=1)


def main() -> int:
    sys.path.insert(0, str(REPO))
    from backend.replies import markdown_table

    text = DOC.read_text(encoding="utf-8")
    new = render(text, markdown_table())
    if new != text:
        DOC.write_text(new, encoding="utf-8")
        print(f"updated {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
