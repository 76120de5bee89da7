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
    sd = s[f"{metric}_std"]
    return f"{s[f'{metric}_mean']:.3f}" + ("" if sd != sd else f" ± {sd:.3f}")  # one seed: no sd


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


def finetune_table(runs: list[dict], frozen: dict, proto: str) -> str:
    cols = ("all", "HEG", "Δ all vs `knn`", "Δ HEG vs `knn`", "Δ all vs `dual_knn`", "Δ HEG vs `dual_knn`")
    lines = ["| predictor | " + " | ".join(cols) + " |", "|" + "---|" * (1 + len(cols))]
    rows: dict[str, list[str]] = {}
    for run in runs:
        if proto not in run:
            continue
        r = run[proto]
        shortening = f", {run['max_epochs']} epochs per stage" if run.get("max_epochs") else ""
        for method in [*run["methods"], "knn", "ridge_gcv", "dual_knn"]:
            tuned = method in run["methods"]
            label = (
                f"{method} fine-tuned from ImageNet{shortening}" if tuned else f"`{method}`, EfficientNet-Lite0 frozen"
            )
            if label in rows:
                continue
            s = r["summary"][method]
            rows[label] = [_cell(s, "pcc_all"), _cell(s, "pcc_heg")] + [
                _delta(r[f"vs_{ref}"].get(f"{method}/{m}"))
                for ref in ("knn", "dual_knn")
                for m in ("pcc_all", "pcc_heg")
            ]
    s = frozen[f"mpp=1 hed_fast {proto}"]["summary"]["dual_knn"]
    rows["**`dual_knn`, `hed-fast`** (recommended; another run, same folds and seeds)"] = [
        _cell(s, "pcc_all"),
        _cell(s, "pcc_heg"),
        *["—"] * 4,
    ]
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
        for proto, label in PROTOCOLS.items():
            print(f"\nFine-tuned from the ImageNet weights, {label} (1 µm/px, 224 px; Δ against the same run):\n")
            print(finetune_table(runs, frozen, proto))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
