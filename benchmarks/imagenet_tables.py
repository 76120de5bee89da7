"""Print the README's tables of ``benchmarks/imagenet.py`` (frozen ImageNet features; fine-tuned recipes).

    python benchmarks/imagenet_tables.py                       # results/imagenet_frozen.json and imagenet_finetune*.json

Mean Pearson r per gene on the held-out section (mean ± sd over 3 seeds); Δ: the paired per-gene difference of r
against a method of the same run, with its 95 % two-level bootstrap interval and the folds x seeds won.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOCOLS = {"within_patient_C": "within C", "C_to_B": "C → B4"}
FEATURES = {"hed_fast": "`hed-fast`", "efficientnet_lite0": "EfficientNet-Lite0", "both": "both"}


def _cell(s: dict, metric: str) -> str:
    return f"{s[f'{metric}_mean']:.3f} ± {s[f'{metric}_std']:.3f}"


def _delta(d: dict | None) -> str:
    if d is None:
        return "—"
    text = f"{d['mean_diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] {d['wins']}"
    return f"**{text}**" if d["ci"][0] > 0 else text


def frozen_table(res: dict) -> str:
    head = "| µm/px | features | predictor | " + " | ".join(
        f"{p} all | {p} HEG | {p} Δ all vs kNN" for p in PROTOCOLS.values()
    )
    lines = [head + " |", "|" + "---|" * (3 + 3 * len(PROTOCOLS))]
    for mpp in ("0.5", "1"):
        for feat, label in FEATURES.items():
            for method in ("knn", "ridge_gcv", "dual_knn"):
                cells = []
                for proto in PROTOCOLS:
                    run = res[f"mpp={mpp} {feat} {proto}"]
                    s = run["summary"][method]
                    delta = run["vs_knn"].get(f"{method}/pcc_all")
                    cells += [_cell(s, "pcc_all"), _cell(s, "pcc_heg"), _delta(delta)]
                lines.append(f"| {mpp} | {label} | `{method}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def finetune_table(runs: list[dict], frozen: dict) -> str:
    head = "| predictor | " + " | ".join(
        f"{p} all | {p} HEG | {p} Δ all vs `dual_knn` | {p} Δ HEG vs `dual_knn`" for p in PROTOCOLS.values()
    )
    lines = [head + " |", "|" + "---|" * (1 + 4 * len(PROTOCOLS))]
    rows: dict[str, list[str]] = {}
    for run in runs:
        shortening = f", {run['max_epochs']} epochs" if run.get("max_epochs") else ""
        for method in [*run["methods"], "knn", "ridge_gcv", "dual_knn"]:
            label = (
                f"{method} fine-tuned from ImageNet{shortening}"
                if method in run["methods"]
                else f"`{method}`, EfficientNet-Lite0 frozen"
            )
            if label in rows:
                continue
            cells = []
            for proto in PROTOCOLS:
                r = run.get(proto)
                if r is None:
                    cells += ["not run"] * 4
                    continue
                s = r["summary"][method]
                cells += [_cell(s, "pcc_all"), _cell(s, "pcc_heg")]
                cells += [_delta(r["vs_dual_knn"].get(f"{method}/{m}")) for m in ("pcc_all", "pcc_heg")]
            rows[label] = cells
    cells = []
    for proto in PROTOCOLS:
        s = frozen[f"mpp=1 hed_fast {proto}"]["summary"]["dual_knn"]
        cells += [_cell(s, "pcc_all"), _cell(s, "pcc_heg"), "(another run)", "(another run)"]
    rows["**`dual_knn`, `hed-fast`** (recommended)"] = cells
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    frozen = json.loads((args.results / "imagenet_frozen.json").read_text())
    print("Frozen features (1 µm/px and 0.5 µm/px, 224 px):\n")
    print(frozen_table(frozen))
    runs = [json.loads(f.read_text()) for f in sorted(args.results.glob("imagenet_finetune*.json"))]
    if runs:
        print("\nFine-tuned from the ImageNet weights (1 µm/px, 224 px; Δ against `dual_knn` of the same run):\n")
        print(finetune_table(runs, frozen))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
