"""Time batched prefills of SmolLM2-135M on one thread, n prompts × L tokens, and fit the time
as affine in the padded tokens (a fixed part per forward plus a part per token):

    python docs/bench/goodput-light-checks/prefill_fit.py

Prints one line per (n, L): the median of the last three of four forwards, and seconds per token;
then the least-squares fits. The base model alone (no LoRA layers), as the replica's engine runs
a prefill: ``use_cache=True``, logits of the last position only.
"""

import time

import numpy as np
import torch

from collm_fl.models import load_base_model

torch.set_num_threads(1)  # a replica's engine runs on one core of two
model = load_base_model("smollm2-135m").model
rows = []
for L in (32, 64, 128):
    for n in (1, 2, 3, 4, 6, 8, 12):
        ids = torch.randint(100, 1000, (n, L))
        times = []
        for _ in range(4):
            t = time.perf_counter()
            with torch.no_grad():
                model(input_ids=ids, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - t)
        s = sorted(times[1:])[1]
        rows.append((n, L, s))
        print(f"{n:2d} x {L:3d}: {s * 1000:7.1f} ms  {s / (n * L) * 1e6:6.1f} us/token", flush=True)
y = np.array([s for *_, s in rows])
a, b = np.linalg.lstsq(np.array([[1, n * L] for n, L, _ in rows]), y, rcond=None)[0]
print(f"affine: {a * 1000:.1f} ms per forward + {b * 1e6:.1f} us per token")
c = np.linalg.lstsq(np.array([[1, n, n * L] for n, L, _ in rows]), y, rcond=None)[0]
print(
    f"with a part per prompt: {c[0] * 1000:.1f} ms + {c[1] * 1000:.2f} ms/prompt + "
    f"{c[2] * 1e6:.1f} us/token"
)
