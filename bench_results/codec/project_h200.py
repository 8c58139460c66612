"""PROJECTION (not a measurement): TTFT of the Llama-3-8B shape on the H200 behind a link of each
bandwidth, from rates measured there (bench_results/codec/h200_run2_ttft_8k.json: full prefill,
fused TTFT from the warm local store, entry bytes per codec) and chunkcache.adaptive.plan.

    fused over a link  = fused TTFT (local) + load time over the link
    plain fetch        : load = all entry bytes / link
    adaptive           : load = plan(...).estimate_s, fetch and recompute from token ids overlapped,
                         recompute rate = the 8K full prefill's tokens/s (conservative: a 512-token
                         chunk alone attends over less)
Conservative in that the loader's own overlap of loading with fusion compute is not counted.

    python bench_results/codec/project_h200.py
"""

import json
from pathlib import Path

from chunkcache.adaptive import plan

here = Path(__file__).parent
run = json.loads((here / "h200_run2_ttft_8k.json").read_text())[0]
row = run["rows"][0]
full = row["full_s"]
ctx, chunk = row["context"], run["chunk_tokens"]
n = ctx // chunk
fused = {(m["method"], m["codec"]): m["ttft_s"] for m in row["methods"]}
rate = row["prompt_tokens"] / full
sizes = run["entry_bytes"]
lines = [
    f"PROJECTION, Llama-3-8B shape on the H200, {ctx} tokens ({n} chunks of {chunk}), qfast 15%: "
    f"full prefill {full * 1e3:.1f} ms measured, recompute {rate:.0f} tokens/s",
    "",
    "| link | codec | plain fetch ms | x full | adaptive ms | x full | adaptive choice |",
    "|---|---|---|---|---|---|---|",
]
for gbit in (1, 10, 25):
    bw = gbit * 1e9 / 8
    for codec in ("int8", "int2"):
        base = fused[("qfast", codec)]
        plain_ms = base + n * sizes[codec] / bw
        p = plan([chunk] * n, [{codec: sizes[codec]}] * n, bw, rate)
        ad = base + p.estimate_s
        lines.append(
            f"| {gbit} Gb/s | {codec} | {plain_ms * 1e3:.0f} | {plain_ms / full:.2f} | {ad * 1e3:.0f} | "
            f"{ad / full:.2f} | fetch {n - p.stats()['recomputed']}, recompute {p.stats()['recomputed']} |"
        )
    both = plan([chunk] * n, [{"int8": sizes["int8"], "int2": sizes["int2"]}] * n, bw, rate)
    ad = fused[("qfast", "int2")] + both.estimate_s
    lines.append(f"| {gbit} Gb/s | int8+int2 stored | | | {ad * 1e3:.0f} | {ad / full:.2f} | {both.stats()['fetched']}, recompute {both.stats()['recomputed']} |")
out = "\n".join(lines)
print(out)
(here / "projection_h200_8k.md").write_text(out + "\n")
