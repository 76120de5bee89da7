"""Make the README figure: the recommended configuration trained on her2st sections C2, C4 and B4 predicts C3.

    python docs/_static/make_readme_figure.py --root ../shared/data/her2st [--method bleep_es --mpp 0.5 ...]

Writes ``docs/_static/predicted_vs_true_her2st.png``: measured and predicted expression of the two genes that the
model predicts best on the held-out section (Pearson r in the titles), on the H&E image. The default settings are
the README's recommended configuration: the 785-gene panel, Hist2ST normalisation, 224 px patches at 1 µm/px, the
weight-free ``hed-fast`` encoder and ``dual_knn`` (any registered method with ``--method``). A minute on a CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    """Train, predict, plot and write the PNG."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=HERE.parents[2] / "shared" / "data" / "her2st")
    p.add_argument("--train", default="C2,C4,B4")
    p.add_argument("--test", default="C3")
    p.add_argument("--out", type=Path, default=HERE / "predicted_vs_true_her2st.png")
    p.add_argument("--dpi", type=int, default=90)
    p.add_argument("--method", default="dual_knn", help="any registered method (default: dual_knn)")
    p.add_argument("--encoder", default="hed-fast")
    p.add_argument("--mpp", type=float, default=1.0)
    args = p.parse_args(argv)

    import io

    import matplotlib
    from PIL import Image

    matplotlib.use("Agg")
    import sthist as st

    train, test = args.train.split(","), args.test
    adata = st.datasets.her2st(args.root, sections=[*train, test], progress=False)
    adata = adata[:, adata.var["genes_785"].to_numpy()].copy()
    st.pp.normalize_expression(adata, flavor="hist2st")
    st.pp.extract_patches(adata, patch_size=224, mpp=args.mpp, library_key="section", progress=False)
    st.pp.embed_patches(adata, encoder=args.encoder, progress=False)

    ref = adata[adata.obs["section"].isin(train).to_numpy()].copy()
    query = adata[(adata.obs["section"] == test).to_numpy()].copy()
    from sthist.tl._registry import fit_predictor

    model = fit_predictor(
        ref,
        args.method,
        layer="targets",
        encoder=args.encoder,
        library_key="section",
        random_state=0,
        progress=False,
    )
    st.tl.predict_expression(query, model, library_key="section", progress=False)
    st.tl.score_prediction(query, true_layer="targets")

    r = query.var["predicted_scores_pearson"].dropna().sort_values(ascending=False)
    genes = list(r.index[:2])
    summary = query.uns["predicted_scores"]["summary"]
    print(f"mean r over {int(summary['n_genes'])} genes: {summary['pcc_all']:.3f}; shown: {dict(r.iloc[:2].round(3))}")

    fig = st.pl.predicted_vs_true(
        query, genes, true_layer="targets", library_key="section", library_id=test, ncols=1, return_fig=True
    )
    fig.suptitle(
        f"her2st section {test}, held out: {args.method} ({args.encoder}) trained on {', '.join(train)}\n"
        f"mean r over {int(summary['n_genes'])} genes = {summary['pcc_all']:.2f}; the two best-predicted genes shown",
        fontsize=11,
    )
    buf = io.BytesIO()
    fig.savefig(buf, dpi=args.dpi, format="png")
    # a 256-colour palette keeps the PNG small enough for the README
    Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
