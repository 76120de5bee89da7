"""Markdown tables from ``benchmarks/results/her2st_benchmark.json`` (written by ``benchmarks/her2st.py``).

    python benchmarks/her2st_tables.py                      # the README's accuracy tables, both protocols
    python benchmarks/her2st_tables.py --fidelity nh2st     # the fidelity table of one method page
    python benchmarks/her2st_tables.py --json benchmarks/results/her2st_recommended.json --controls
                                                            # the recommended configuration against the controls

Every figure is read from the JSON; nothing is typed by hand.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LABELS = {
    "bleep": "BLEEP",
    "mclstexp": "mclSTExp",
    "nh2st": "NH2ST",
    "stgchb": "ST-GCHB",
    "cmrcnet": "CMRCNet",
    "ridge": "ridge (HEST probe)",
    "knn": "raw-feature kNN",
    "ridge_gcv": "ridge, GCV penalty",
    "dual_knn": "**`dual_knn`** (recommended)",
}
PROTOCOLS = {
    "within_patient_C": "Within patient C (leave one of C2, C3, C4 out)",
    "C_to_B": "Patient C → patient B (train on C2, C3, C4, test on B4)",
}
PROTOCOL_SHORT = {"within_patient_C": "within patient C", "C_to_B": "C → B"}
METRICS = {
    "pcc_all": "PCC all",
    "pcc_heg": "PCC top-50 HEG",
    "pcc_hvg": "PCC top-50 HVG",
    "gene_corr": "gene-gene corr.",
}


def label(method: str) -> str:
    return LABELS.get(method, f"`{method}`")


def delta(row: dict | None, *, both_sides: bool = False) -> str:
    """``+0.012 [+0.001, +0.024] 7/9``, bold when the interval lies above 0 (or, ``both_sides``, excludes 0)."""
    if row is None:
        return "—"
    text = f"{row['mean_diff']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}] {row['wins']}/{row['n']}"
    bold = row["ci_low"] > 0 or (both_sides and row["ci_high"] < 0)
    return f"**{text}**" if bold else text


def find(rows: list[dict], method: str, metric: str, **extra) -> dict | None:
    for r in rows:
        if r["method"] == method and r["metric"] == metric and all(r.get(k) == v for k, v in extra.items()):
            return r
    return None


def overall(proto: dict) -> dict[str, dict]:
    return {r["method"]: r for r in proto["summary"] if r["fold"] == "all"}


def mean_sd(row: dict, metric: str) -> str:
    sd = row.get(f"{metric}_std")
    if sd is None or sd != sd:  # one seed: no spread
        return f"{row[f'{metric}_mean']:.3f} (1 seed)"
    return f"{row[f'{metric}_mean']:.3f} ± {sd:.3f}"


def accuracy_table(proto: dict, methods: list[str] | None = None) -> str:
    summary = overall(proto)
    names = methods or list(summary)
    lines = [
        "| method | " + " | ".join(METRICS.values()) + " | Δ all vs ridge | Δ all vs kNN | Δ HEG vs kNN |",
        "|---" * (len(METRICS) + 4) + "|",
    ]
    for m in names:
        if m not in summary:
            continue
        cells = [mean_sd(summary[m], k) for k in METRICS]
        cells += [
            delta(find(proto["comparison"], m, "pcc_all")),
            delta(find(proto.get("comparison_vs_knn", []), m, "pcc_all")),
            delta(find(proto.get("comparison_vs_knn", []), m, "pcc_heg")),
        ]
        lines.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def controls_table(proto: dict, methods: list[str] | None = None) -> str:
    """Accuracy and the paired differences against both no-training controls (GCV ridge and raw kNN)."""
    summary = overall(proto)
    names = methods or list(summary)
    lines = [
        "| method | PCC all | PCC top-50 HEG | gene-gene corr. | Δ all vs ridge (GCV) | Δ HEG vs ridge (GCV) "
        "| Δ all vs kNN | Δ HEG vs kNN |",
        "|---" * 8 + "|",
    ]
    for m in names:
        if m not in summary:
            continue
        cells = [mean_sd(summary[m], k) for k in ("pcc_all", "pcc_heg", "gene_corr")]
        for control in ("ridge_gcv", "knn"):
            rows = proto.get(f"comparison_vs_{control}", [])
            cells += [delta(find(rows, m, "pcc_all")), delta(find(rows, m, "pcc_heg"))]
        lines.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fidelity_table(doc: dict, method: str) -> str:
    """The published recipe and its variants, each protocol: accuracy and the paired difference to the recipe."""
    lines = [
        "| protocol | method | PCC all | PCC top-50 HEG | gene-gene corr. | Δ all vs recipe | Δ HEG vs recipe |",
        "|---|---|---|---|---|---|---|",
    ]
    for pname, proto in doc["protocols"].items():
        summary = overall(proto)
        variants = sorted({r["method"] for r in proto.get("fidelity", []) if r["recipe"] == method})
        for m in [method, *variants]:
            if m not in summary:
                continue
            s = summary[m]
            d_all = find(proto["fidelity"], m, "pcc_all", recipe=method) if m != method else None
            d_heg = find(proto["fidelity"], m, "pcc_heg", recipe=method) if m != method else None
            cells = [mean_sd(s, "pcc_all"), mean_sd(s, "pcc_heg"), mean_sd(s, "gene_corr")]
            cells += [delta(d_all, both_sides=True), delta(d_heg, both_sides=True)]
            lines.append(f"| {PROTOCOL_SHORT.get(pname, pname)} | {label(m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/her2st_benchmark.json"))
    p.add_argument("--fidelity", default=None, help="a published method name: its fidelity table")
    p.add_argument("--methods", default=None, help="comma-separated methods of the accuracy tables (default: all)")
    p.add_argument("--controls", action="store_true", help="Δ against ridge_gcv and kNN instead of ridge and kNN")
    args = p.parse_args(argv)
    doc = json.loads(args.json.read_text())
    if args.fidelity:
        print(fidelity_table(doc, args.fidelity))
        return 0
    methods = args.methods.split(",") if args.methods else None
    for name, proto in doc["protocols"].items():
        print(f"*{PROTOCOLS.get(name, name)}*, {proto['seconds']:.0f} s:\n")
        table = controls_table if args.controls else accuracy_table
        print(table(proto, methods) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
