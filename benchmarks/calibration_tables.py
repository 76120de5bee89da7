"""Markdown tables of ``results/calibration.json`` (the docs page "What to believe" and the README quote them).

python benchmarks/calibration_tables.py [--json benchmarks/results/calibration.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPLITS = {
    "within_C": "held-out C section, trained on the other two (design split)",
    "within_C_with_B4": "held-out C section, B4 also in training (confirmation)",
}


def _pct(v: float) -> str:
    return f"{100 * v:.0f} %"


def intervals(res: dict) -> str:
    lines = [
        "| split | model | test | coverage, all genes | coverage, top-50 HEG | width / range, HEG | adaptivity | flagged | warning |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for split, label in SPLITS.items():
        for method, tests in res["splits"][split].items():
            for test, r in tests.items():
                rows.append((label, f"`{method}`", test, r))
    for name, r in res["splits"]["half_section"]["dual_knn"].items():
        rows.append(("one section: blocks of its left half, tested on its right half", "`dual_knn`", name, r))
    for name, r in res["splits"]["across_patients"]["dual_knn"].items():
        train, test = name.split("_to_")
        rows.append((f"a new patient: trained on {train}", "`dual_knn`", test, r))
    for label, method, test, r in rows:
        lines.append(
            f"| {label} | {method} | {test} | {r['coverage_all']:.3f} | {r['coverage_heg']:.3f} | "
            f"{r['width_rel_heg']:.2f} | {r['adaptivity_heg']:.2f} | {_pct(r['fraction_flagged'])} | "
            f"{'yes' if r['slide_warning'] else 'no'} |"
        )
    return "\n".join(lines)


def genes(res: dict) -> str:
    lines = [
        "| split | model | test | reliable genes | of them with held-out r >= 0.2 | genes with held-out r >= 0.2 |",
        "|---|---|---|---|---|---|",
    ]
    for split, label in SPLITS.items():
        for method, tests in res["splits"][split].items():
            for test, r in tests.items():
                prec = r["reliable_with_held_out_r_ge_0.2"]
                lines.append(
                    f"| {label} | `{method}` | {test} | {r['n_reliable']} | {'-' if prec is None else _pct(prec)} | "
                    f"{r['genes_with_held_out_r_ge_0.2']} |"
                )
    for name, r in res["splits"]["across_patients"]["dual_knn"].items():
        prec = r["reliable_with_held_out_r_ge_0.2"]
        lines.append(
            f"| a new patient ({name.replace('_to_', ' → ')}) | `dual_knn` | {name.split('_to_')[1]} | "
            f"{r['n_reliable']} | {'-' if prec is None else _pct(prec)} | {r['genes_with_held_out_r_ge_0.2']} |"
        )
    return "\n".join(lines)


def shift(res: dict) -> str:
    names = {
        "background": "glass (pseudo-spots with at most 5 % tissue on the four slides)",
        "other_organ_ihc": "another organ and stain (scikit-image's colon IHC sample, 224 px tiles)",
        "toy": "synthetic tissue (`sthist.datasets.toy`)",
    }
    lines = ["| spots | n | flagged | slide warning |", "|---|---|---|---|"]
    for key, label in names.items():
        r = res["shift"][key]
        lines.append(
            f"| {label} | {r['n_spots']} | {_pct(r['fraction_flagged'])} | {'yes' if r['slide_warning'] else 'no'} |"
        )
    return "\n".join(lines)


def recommended(res: dict) -> str:
    lines = [
        "| protocol | `recommended` | `dual_knn` | `knn` | `ridge_gcv` | Δ vs knn (all; HEG) | Δ vs ridge_gcv (all; HEG) |",
        "|---|---|---|---|---|---|---|",
    ]
    label = {"within_C": "within patient C", "C_to_B4": "C → B4", "B4_to_C": "B4 → C"}
    for name, r in res["recommended"].items():
        s = r["summary"]
        cells = [
            f"{s[m]['pcc_all']:.3f} / {s[m]['pcc_heg']:.3f}" for m in ("recommended", "dual_knn", "knn", "ridge_gcv")
        ]
        deltas = []
        for ref in ("knn", "ridge_gcv"):
            d = r["recommended_vs"][ref]
            deltas.append(
                "; ".join(
                    f"{d[m]['mean_diff']:+.3f} [{d[m]['ci'][0]:+.3f}, {d[m]['ci'][1]:+.3f}]"
                    for m in ("pcc_all", "pcc_heg")
                )
            )
        lines.append(f"| {label[name]} | " + " | ".join(cells) + " | " + " | ".join(deltas) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=HERE / "results" / "calibration.json")
    args = p.parse_args(argv)
    res = json.loads(args.json.read_text())
    for title, table in (
        ("Intervals (90 %)", intervals(res)),
        ("Reliable genes", genes(res)),
        ("Shift", shift(res)),
        ("The recommended call", recommended(res)),
    ):
        print(f"### {title}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
