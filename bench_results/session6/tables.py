"""Print the session-6 fidelity tables from the result files (run from the repository root):

    .venv/bin/python bench_results/session6/tables.py > bench_results/session6/tables.txt
"""

import json
from pathlib import Path

from chunkcache.bench.quality import summarize, table

HERE = Path(__file__).resolve().parent
# each factual split ran as two processes (cases 0.. with the bf16 noise floor on the first 20,
# and cases 30..); their rows are pooled here (same code, same CPU)
for name, parts in (
    ("musique", ["quality_musique_qfast_cpu"]),
    ("factual dev", ["quality_factual_dev_cpu", "quality_factual_dev_from30_cpu"]),
    ("factual heldout", ["quality_factual_heldout_cpu", "quality_factual_heldout_from30_cpu"]),
    ("exploration, factual dev", ["explore_factual_dev20"]),
    ("exploration, musique q0", ["explore_musique_q0-9"]),
):
    files = [json.loads((HERE / f"{p}.json").read_text()) for p in parts if (HERE / f"{p}.json").exists()]
    rows = [r for d in files for r in d["rows"]]
    qs = sorted({r["q"] for r in rows})
    print(f"## {name}: {len(qs)} questions ({', '.join(str(q) for q in qs)})")
    for d in files:
        print(d.get("command"))
    print()
    print(table(summarize(rows)))
    print()
