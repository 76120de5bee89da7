"""The reference no-model baseline of ``../shared/baselines`` on both her2st protocols, next to a harness result.

    python benchmarks/handcrafted_baseline.py --root ../shared/data/her2st \
        --against benchmarks/results/her2st_recommended.json --method dual_knn

Runs ``../shared/baselines/no_model_baseline.py`` (handcrafted colour / stain / gradient statistics, PCA(64) +
RidgeCV and kNN-50; it does not import sthist, so it does not move when sthist does) on every split of the two
protocols of ``benchmarks/her2st.py``: each of C2, C3, C4 held out from the other two (within patient C, averaged
as the harness averages the folds) and C2, C3, C4 -> B4. Then reads ``--method``'s mean Pearson r (all genes and
top-50 HEG, mean over folds and seeds) from the harness JSON ``--against`` and reports its ratio to the better of
the two handcrafted predictors per protocol. Result: ``results/handcrafted_baseline.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPLITS = {
    "within_patient_C": [("C3,C4", "C2"), ("C2,C4", "C3"), ("C2,C3", "C4")],
    "C_to_B": [("C2,C3,C4", "B4")],
}


def run_split(script: Path, root: Path, train: str, test: str) -> list[dict]:
    cmd = [sys.executable, str(script), "--root", str(root), "--train", train, "--test", test]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("[") :])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=HERE.parents[1] / "shared" / "data" / "her2st")
    p.add_argument("--script", type=Path, default=HERE.parents[1] / "shared" / "baselines" / "no_model_baseline.py")
    p.add_argument("--against", type=Path, default=HERE / "results" / "her2st_recommended.json")
    p.add_argument("--method", default="dual_knn")
    p.add_argument("--out", type=Path, default=HERE / "results" / "handcrafted_baseline.json")
    args = p.parse_args(argv)
    if not args.script.is_file():
        p.error(f"the baseline script {args.script} does not exist; pass --script")
    harness = json.loads(args.against.read_text())
    t0 = time.perf_counter()
    doc: dict = {"script": str(args.script), "against": str(args.against), "method": args.method, "protocols": {}}
    for proto, splits in SPLITS.items():
        rows = [r for train, test in splits for r in run_split(args.script, args.root, train, test)]
        per = {}
        for predictor in ("ridge", "knn50"):
            mine = [r for r in rows if r["predictor"] == predictor]
            per[predictor] = {m: round(sum(r[m] for r in mine) / len(mine), 4) for m in ("pcc_all", "pcc_heg")}
        summary = {r["method"]: r for r in harness["protocols"][proto]["summary"] if r["fold"] == "all"}
        method = summary[args.method]
        entry = {"splits": rows, "handcrafted": per, args.method: {}}
        for m in ("pcc_all", "pcc_heg"):
            best = max(per["ridge"][m], per["knn50"][m])
            ours = round(method[f"{m}_mean"], 4)
            entry[args.method][m] = {"value": ours, "best_handcrafted": best, "ratio": round(ours / best, 3)}
        doc["protocols"][proto] = entry
        print(proto, json.dumps({k: v for k, v in entry.items() if k != "splits"}), flush=True)
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.out} in {doc['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
