"""The probe's share of GPU TTFT, read from the session-5 H100 stage breakdowns (no new GPU run).

    python bench_results/session6/probe_share.py > bench_results/session6/probe_share.txt

``probe`` is the fusion's probe stage on the GPU timeline (CUDA events), which includes any wait
for the layers' K/V to arrive. For a probe over only the first m of L layers the stage is
estimated as probe x m / L (both its compute and its wait for layers scale with the layers it
covers; the later layers' loads then overlap the recompute, whose span is far longer than the
whole load in every row below). That estimate is labelled as one: it is not a measurement.
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "session5"
for name, layers in (("ttft.json", 32), ("ttft_smollm2.json", 30)):
    d = json.loads((HERE / name).read_text())
    print(f"{d[0]['model']} on {d[0]['device']} ({name}); {d[0]['command']}")
    print(f"{'context':>8} {'codec':>6} {'TTFT ms':>8} {'probe ms':>9} {'share':>6} | est. probe over first half: {'TTFT ms':>8} {'saved':>6}")
    for row in d[0]["rows"]:
        for m in row["methods"]:
            if m["method"] != "qfast":
                continue
            ttft, probe = 1e3 * m["ttft_s"], 1e3 * m["stages_s"]["probe"]
            half = probe * (layers // 2) / layers
            print(
                f"{row['context']:>8} {m['codec']:>6} {ttft:>8.1f} {probe:>9.1f} {probe / ttft:>6.1%} |"
                f" {'':>28}{ttft - (probe - half):>8.1f} {(probe - half) / ttft:>6.1%}"
            )
    print()
