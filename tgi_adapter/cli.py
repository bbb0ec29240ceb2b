"""The ``tgi-adapter`` command (placeholder until the CLI lands)."""

from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    return 0
