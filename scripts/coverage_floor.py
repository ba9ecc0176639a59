"""Fail when a module of qmpfd/ has less line coverage from the unit tests than the floor.

    python scripts/coverage_floor.py COVERAGE.json 85

COVERAGE.json is pytest-cov's JSON report (``--cov-report=json:PATH``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def below(report: dict[str, Any], floor: float) -> list[str]:
    return [f"{name}: {data['summary']['percent_covered']:.0f}%"
            for name, data in sorted(report["files"].items())
            if data["summary"]["percent_covered"] < floor]


def main() -> int:
    report = json.loads(Path(sys.argv[1]).read_text())
    floor = float(sys.argv[2])
    low = below(report, floor)
    if low:
        print(f"unit-test line coverage below {floor:g}%:", *low, sep="\n  ", file=sys.stderr)
        return 1
    print(f"every module of qmpfd/ has at least {floor:g}% line coverage from tests/unit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
