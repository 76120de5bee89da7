"""sthist's progress bars: a widget in a Jupyter kernel with ipywidgets, tqdm's text bar everywhere else, no warning."""

from __future__ import annotations

import os
import sys
import types
import warnings

import pytest
import tqdm.notebook
import tqdm.std

from sthist._engine._utils import progress_bar

IPython = pytest.importorskip("IPython")


class ZMQInteractiveShell:
    """Stands in for ipykernel's shell: the helper recognises a kernel by the shell's class name."""


class TerminalInteractiveShell:
    """The IPython terminal: no widgets."""


class NotebookBar(tqdm.std.tqdm):
    """Stands in for ``tqdm.notebook.tqdm``, which cannot draw outside a real kernel."""


@pytest.fixture
def kernel(monkeypatch):
    """A Jupyter kernel (faked): ``IPython.get_ipython()`` returns a ZMQInteractiveShell."""
    monkeypatch.setitem(sys.modules, "IPython", IPython)
    monkeypatch.setattr(IPython, "get_ipython", lambda: ZMQInteractiveShell())
    for key in [k for k in os.environ if k == "QT_API" or k.startswith("SPYDER")]:
        monkeypatch.delenv(key)


@pytest.fixture
def widgets(monkeypatch):
    """ipywidgets importable (faked if not installed), and tqdm.notebook's widget found."""
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        monkeypatch.setitem(sys.modules, "ipywidgets", types.ModuleType("ipywidgets"))
    monkeypatch.setattr(tqdm.notebook, "IProgress", object)
    monkeypatch.setattr(tqdm.notebook, "tqdm", NotebookBar)


@pytest.fixture
def no_widgets(monkeypatch):
    """ipywidgets not installed: its import raises ImportError."""
    monkeypatch.setitem(sys.modules, "ipywidgets", None)


def _std_only(bar) -> bool:
    return type(bar) is tqdm.std.tqdm


def test_progress_bar_outside_a_kernel_is_the_text_bar(monkeypatch, widgets):
    # plain python: IPython never imported (the helper must not import it)
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    with progress_bar(total=3, file=sys.stderr) as bar:
        assert _std_only(bar)
    assert "IPython" not in sys.modules
    # the IPython terminal, or IPython imported without a shell
    for shell in (None, TerminalInteractiveShell()):
        monkeypatch.setitem(sys.modules, "IPython", IPython)
        monkeypatch.setattr(IPython, "get_ipython", lambda shell=shell: shell)
        with progress_bar(total=3) as bar:
            assert _std_only(bar)


def test_progress_bar_in_a_kernel_with_ipywidgets_is_the_widget(kernel, widgets, monkeypatch):
    bar = progress_bar(range(4), desc="spots")
    assert isinstance(bar, NotebookBar)
    assert list(bar) == [0, 1, 2, 3]
    # a shell subclassing ZMQInteractiveShell (e.g. Colab's) is a kernel as well
    sub = type("Shell", (ZMQInteractiveShell,), {})
    monkeypatch.setattr(IPython, "get_ipython", lambda: sub())
    with progress_bar(total=2) as bar:
        assert isinstance(bar, NotebookBar)
        bar.update(2)


def test_progress_bar_in_qtconsole_is_the_text_bar(kernel, widgets, monkeypatch):
    monkeypatch.setenv("QT_API", "pyqt5")  # jupyter-qtconsole / Spyder cannot show widgets
    with progress_bar(total=1) as bar:
        assert _std_only(bar)


def test_progress_bar_in_a_kernel_without_ipywidgets_does_not_warn(kernel, no_widgets, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with progress_bar(total=5, desc="patches", mininterval=0) as bar:
            assert _std_only(bar)
            bar.update(5)
        for _ in progress_bar(range(3), desc="her2st", mininterval=0):
            pass
    assert not [w for w in caught if issubclass(w.category, tqdm.std.TqdmWarning)]
    assert not caught
    out = capsys.readouterr()
    assert "patches" in out.out and "5/5" in out.out  # the text bar, on stdout (no red stderr block)
    assert "IProgress" not in out.out + out.err


@pytest.mark.parametrize("where", ["terminal", "kernel"])
def test_progress_bar_disabled_shows_nothing(where, request, capsys):
    if where == "kernel":
        request.getfixturevalue("kernel")
        request.getfixturevalue("widgets")
    with progress_bar(total=10, enabled=False, desc="hidden", file=sys.stderr) as bar:
        assert bar.disable
        bar.update(10)
    assert list(progress_bar(range(3), enabled=False, desc="hidden")) == [0, 1, 2]
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_progress_bar_both_usage_styles(capsys):
    # wrapping an iterable: yields its items, length as total
    bar = progress_bar(["a", "b", "c"], desc="wrap", file=sys.stderr, mininterval=0)
    assert bar.total == 3
    assert list(bar) == ["a", "b", "c"]
    assert bar.n == 3
    # a bar driven by hand, as a context manager
    with progress_bar(total=10, desc="manual", unit="spot", file=sys.stderr, mininterval=0) as bar:
        bar.update(4)
        bar.set_postfix_str("library A")
        bar.update(6)
        assert bar.n == 10
    err = capsys.readouterr().err
    assert "wrap" in err and "3/3" in err
    assert "manual" in err and "10/10" in err and "spot" in err


@pytest.mark.slow
def test_progress_bar_in_a_real_kernel():
    """In a real Jupyter kernel: the widget with ipywidgets, else the text bar on stdout, and never a TqdmWarning."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from sthist._engine._utils import progress_bar\n"
        "    with progress_bar(total=3, desc='ctx', mininterval=0) as bar:\n"
        "        bar.update(3)\n"
        "    items = list(progress_bar(range(2), desc='iter'))\n"
        "print('RESULT', type(bar).__module__, items, [str(w.message) for w in caught])\n"
    )
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    try:
        nbclient.NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    except nbclient.exceptions.CellExecutionError as err:
        if "No module named 'sthist'" in str(err):
            pytest.skip("the python3 Jupyter kernel cannot import sthist")
        raise
    except Exception as err:  # no kernel spec, or the kernel does not start
        pytest.skip(f"no Jupyter kernel here: {err!r}")
    outputs = nb.cells[0].outputs
    stdout = "".join(o.get("text", "") for o in outputs if o.get("name") == "stdout")
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    result = next(line for line in stdout.splitlines() if line.startswith("RESULT"))
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        assert result == "RESULT tqdm.std [0, 1] []"
        assert "ctx: 100%" in stdout and "3/3" in stdout  # the text bar, on stdout
    else:
        assert result == "RESULT tqdm.notebook [0, 1] []"
    assert "IProgress" not in stdout + stderr and "TqdmWarning" not in stderr
