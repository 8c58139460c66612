# CPU (this 2-core machine): PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench_results/session9/adaptive/gil_probe.py
"""Does allocating the stream's landing buffers hold the GIL? A thread counts loop turns (each a
tiny torch op, as a launching thread would) while the main thread allocates 16 x 10.5 MB."""
import threading, time, numpy as np, torch
def run(alloc):
    stop = False; n = [0]; gaps = []
    def spin():
        x = torch.zeros(4); last = time.perf_counter()
        while not stop:
            x.add_(1); n[0] += 1
            t = time.perf_counter(); gaps.append(t - last); last = t
    th = threading.Thread(target=spin); th.start(); time.sleep(0.05)
    t = time.perf_counter(); bufs = alloc(); dt = time.perf_counter() - t
    time.sleep(0.01); stop = True; th.join()
    return dt, max(gaps)
for name, alloc in [("bytearray", lambda: [bytearray(10_543_000) for _ in range(16)]),
                    ("np.zeros", lambda: [np.zeros(10_543_000, np.uint8) for _ in range(16)])]:
    for _ in range(2):
        dt, gap = run(alloc)
        print(f"{name:10s} 16 x 10.5 MB: {dt*1e3:6.1f} ms; the other thread's longest stall {gap*1e3:6.1f} ms")
