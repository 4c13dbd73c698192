"""End-to-end parity: first-step logprobs of one model, FlagGems on vs off.

Reads the two full-vocab logprob matrices bench_engine.py --logits-out wrote
(same prompts, same seeded weights) and reports max |delta| over the vocab,
the mean, and top-1 agreement.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for provenance.py
from provenance import provenance  # noqa: E402


def main(stock: str, gems: str, out: str) -> int:
    a, b = np.load(stock), np.load(gems)
    fin = np.isfinite(a) & np.isfinite(b)
    d = np.abs(a - b)[fin]
    top1 = (a.argmax(-1) == b.argmax(-1))
    # margin of stock's top-1 over its runner-up: disagreements only where it is tiny
    srt = np.sort(a, axis=-1)
    margin = srt[:, -1] - srt[:, -2]
    res = {**provenance(), "prompts": int(a.shape[0]), "vocab": int(a.shape[1]),
           "max_abs_diff_logprob": float(d.max()), "mean_abs_diff_logprob": float(d.mean()),
           "top1_agreement": float(top1.mean()), "top1_disagree_margins": [float(m) for m in margin[~top1]],
           "logprob_std_stock": float(a[np.isfinite(a)].std()), "finite_fraction": float(fin.mean())}
    json.dump(res, open(out, "w"), indent=1)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
