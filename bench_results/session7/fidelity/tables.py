"""Tables of the session-7 CPU exploration (issue 14): each result file of explore.py as
``chunkcache.bench.quality``'s table, over the questions every config of that file finished.

    .venv/bin/python bench_results/session7/fidelity/tables.py > bench_results/session7/fidelity/tables.txt
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from chunkcache.bench import quality

HERE = Path(__file__).parent


def main() -> None:
    for f in sorted(HERE.glob("explore_*_cpu.json")):
        data = json.loads(f.read_text())
        rows = data["rows"]
        per_q = Counter(r["q"] for r in rows)
        whole = {q for q, n in per_q.items() if n == max(per_q.values())}  # every config ran on it
        rows = [r for r in rows if r["q"] in whole]
        print(f"== {f.name}: questions {sorted(whole)}")
        print(f"   {data.get('command', '')}")
        print(quality.table(quality.summarize(rows)))
        print()


if __name__ == "__main__":
    main()
