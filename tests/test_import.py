import subprocess
import sys

HEAVY = ["torch", "timm", "scanpy", "squidpy", "spatialdata", "sklearn", "matplotlib"]


def test_import_is_light():
    """`import sthist` must not pull in torch/timm or other heavy libraries (they load inside functions)."""
    code = f"import sys, sthist; print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import sthist imported heavy modules: {out}"


def test_importtime_has_no_torch():
    res = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import sthist"], capture_output=True, text=True, check=True
    )
    modules = {line.split("|")[-1].strip().split(".")[0] for line in res.stderr.splitlines() if "|" in line}
    assert "sthist" in modules
    assert not {"torch", "timm"} & modules


def test_public_api():
    import sthist

    for sub in ["pp", "tl", "pl", "datasets", "io"]:
        mod = getattr(sthist, sub)
        for name in mod.__all__:
            assert callable(getattr(mod, name)), f"sthist.{sub}.{name} is not callable"
    assert {"extract_patches", "normalize_expression", "select_genes"} <= set(sthist.pp.__all__)
    assert {"toy", "her2st"} <= set(sthist.datasets.__all__)
    assert {"read_visium", "from_spatialdata"} <= set(sthist.io.__all__)
