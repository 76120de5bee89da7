"""What a recipe change did to the numbers: a new ``her2st.py`` run against the stored one, fold by fold and seed by seed.

    python benchmarks/her2st.py --methods nh2st --baselines "" --part /tmp/nh2st.pkl --threads 1
    python benchmarks/her2st.py --merge /tmp/nh2st.pkl --out /tmp/nh2st.json
    python benchmarks/recipe_changes.py --new /tmp/nh2st.json --out benchmarks/results/recipe_changes.json

Both runs use the same folds, seeds and gene sets (chosen on the training sections of each fold), so each fold x
seed is a pair: the result gives, per protocol, method and metric, the old and new mean over the pairs, the mean of
the paired differences, their range and how many pairs the new recipe wins and loses by more than 1e-4. The stored run keeps only per-fold
scores, not per-gene ones, so there is no gene-level interval here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
METRICS = ("pcc_all", "pcc_heg")
TIE = 1e-4  # differences smaller than this are ties (the same epoch chosen, up to float noise)


def _scores(run: dict, protocol: str) -> dict:
    rows = run["protocols"][protocol]["table"]
    return {(r["method"], r["fold"], r["seed"], r["metric"]): r for r in rows if r["metric"] in METRICS}


def compare(old: dict, new: dict) -> dict:
    out = {}
    for protocol in new["protocols"]:
        before, after = _scores(old, protocol), _scores(new, protocol)
        for method in sorted({key[0] for key in after}):
            for metric in METRICS:
                pairs = [
                    (before[key]["value"], row["value"], key[1], key[2])
                    for key, row in after.items()
                    if key[0] == method and key[3] == metric and key in before
                ]
                if not pairs:
                    continue
                old_v, new_v = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
                diff = new_v - old_v
                one = after[next(k for k in after if k[0] == method)]
                out.setdefault(protocol, {}).setdefault(method, {})[metric] = {
                    "old_mean": float(old_v.mean()),
                    "new_mean": float(new_v.mean()),
                    "mean_diff": float(diff.mean()),
                    "diff_range": [float(diff.min()), float(diff.max())],
                    "new_wins": f"{int((diff > TIE).sum())}/{len(diff)}",
                    "new_loses": f"{int((diff < -TIE).sum())}/{len(diff)}",
                    "pairs": [{"fold": f, "seed": s, "old": float(o), "new": float(n)} for o, n, f, s in pairs],
                    "new_recipe": {k: one.get(k) for k in ("select_on", "epochs", "batch_size", "encoder", "mpp")},
                }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", type=Path, default=HERE / "results" / "her2st_benchmark.json")
    p.add_argument("--new", type=Path, required=True)
    p.add_argument("--out", type=Path, default=HERE / "results" / "recipe_changes.json")
    args = p.parse_args(argv)
    result = {
        "old": str(args.old.name),
        "new_command": json.loads(args.new.read_text()).get("command"),
        **compare(json.loads(args.old.read_text()), json.loads(args.new.read_text())),
    }
    args.out.write_text(json.dumps(result, indent=1))
    for protocol, methods in result.items():
        if isinstance(methods, dict):
            for method, metrics in methods.items():
                for metric, r in metrics.items():
                    print(
                        f"{protocol} {method} {metric}: {r['old_mean']:.3f} -> {r['new_mean']:.3f} "
                        f"(diff {r['mean_diff']:+.3f}, range {r['diff_range'][0]:+.3f}..{r['diff_range'][1]:+.3f}, "
                        f"new wins {r['new_wins']}, loses {r['new_loses']})"
                    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
