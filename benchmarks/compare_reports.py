"""Compare two report.json files: print every JSON path whose value differs, exit 1 if any does.

    python benchmarks/compare_reports.py A/report.json B/report.json

Ignored, because they differ between any two runs of the same scenario: timings (keys ending in `seconds`,
event times `t` and `time`), run ids, and the run's own output folder inside paths (each report's
`registry` folder's parent is written as `<out>`). Lists whose order is the order things arrived in
(uploads, timeline and ledger events) are compared as sorted lists.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

IGNORED_KEYS = frozenset({"run_id", "t", "time"})
# Dotted paths (list indices dropped) of lists in arrival order.
ARRIVAL_ORDER_LISTS = frozenset(
    {
        "uploads",
        "events",
        "ledger.uploads",
        "ledger.events",
        "baselines.fedavg.events",
        "baselines.fedavg.ledger.uploads",
        "baselines.fedavg.ledger.events",
    }
)


def ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.endswith("seconds")


def normalise(value: Any, out_dir: str, path: str = "") -> Any:
    """The value without ignored keys, with `out_dir` written as `<out>`, arrival-order lists sorted."""
    if isinstance(value, dict):
        return {
            key: normalise(item, out_dir, f"{path}.{key}" if path else key)
            for key, item in value.items()
            if not ignored(key)
        }
    if isinstance(value, list):
        items = [normalise(item, out_dir, path) for item in value]
        if path in ARRIVAL_ORDER_LISTS:
            items.sort(key=lambda item: json.dumps(item, sort_keys=True))
        return items
    if isinstance(value, str) and out_dir:
        return value.replace(out_dir, "<out>")
    return value


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """One line per JSON path where `a` and `b` differ (a key on one side only, a type, a value)."""
    where = path or "(root)"
    if isinstance(a, dict) and isinstance(b, dict):
        lines = []
        for key in [*a, *(k for k in b if k not in a)]:
            sub = f"{path}.{key}" if path else key
            if key not in b:
                lines.append(f"{sub}: only in A")
            elif key not in a:
                lines.append(f"{sub}: only in B")
            else:
                lines += differences(a[key], b[key], sub)
        return lines
    if isinstance(a, list) and isinstance(b, list):
        lines = [] if len(a) == len(b) else [f"{where}: length {len(a)} in A, {len(b)} in B"]
        for index, (x, y) in enumerate(zip(a, b, strict=False)):
            lines += differences(x, y, f"{path}[{index}]")
        return lines
    if type(a) is not type(b) or a != b:
        return [f"{where}: {json.dumps(a)[:200]} in A, {json.dumps(b)[:200]} in B"]
    return []


def out_dir_of(report: dict[str, Any]) -> str:
    registry = report.get("registry")
    return str(Path(registry).parent) if isinstance(registry, str) and "://" not in registry else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="the first report.json")
    parser.add_argument("b", type=Path, help="the second report.json")
    args = parser.parse_args(argv)
    reports = [json.loads(path.read_text(encoding="utf-8")) for path in (args.a, args.b)]
    a, b = (normalise(report, out_dir_of(report)) for report in reports)
    lines = differences(a, b)
    for line in lines:
        print(line)
    print(f"{len(lines)} differing paths (timings, run ids and the output folder ignored)")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
