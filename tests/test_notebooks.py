"""The notebooks in colab/: each runs top to bottom (small sizes via JAXMODELS_NOTEBOOK_SMALL=1), from this
checkout; their first cell, the same in all, sets up a fresh runtime (clone + install, keeping the installed
jax), which one test runs in a throwaway virtual environment; README links each with an Open in Colab badge."""

import glob
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib

import jax
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))
BADGE = "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"


def setup_cell(path):
    return next(cell.source for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code")


def repository_url():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["urls"]["Repository"]


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("JAXMODELS_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0")
    nb = nbformat.read(path, as_version=4)
    # Started in colab/ as Jupyter would: the setup cell finds the checkout's root and installs nothing.
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(path)}}).execute()


def test_setup_cell_is_the_same_in_every_notebook():
    cells = {os.path.basename(path): setup_cell(path) for path in NOTEBOOKS}
    first = cells[os.path.basename(NOTEBOOKS[0])]
    assert [name for name, cell in cells.items() if cell != first] == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_setup_cell_clones_the_pyproject_repository(path):
    # A fresh runtime has no pyproject.toml to read the address from: the cell writes it, and must write this one.
    assert re.findall(r"https?://[^\s\"')]+", setup_cell(path)) == [repository_url()]


def test_readme_has_an_open_in_colab_badge_for_every_notebook():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    repo = repository_url().removeprefix("https://github.com/")
    missing = [os.path.basename(path) for path in NOTEBOOKS
               if f"{BADGE}(https://colab.research.google.com/github/{repo}/blob/main/colab/{os.path.basename(path)})"
               not in readme]
    assert missing == []


def _this_environments_jaxmodels():
    try:
        dist = importlib.metadata.distribution("jaxmodels")
    except importlib.metadata.PackageNotFoundError:
        return None
    return str(dist.locate_file("")), dist.read_text("direct_url.json")


def test_setup_cell_installs_a_clone_keeping_the_installed_jax(tmp_path):
    """The setup cell as on a fresh Colab runtime, cloning this checkout's HEAD (JAXMODELS_REPO) into a temporary
    JAXMODELS_DIR, run by a throwaway virtual environment. The venv sees this environment's packages (a .pth
    file adds its site-packages, their own .pth files included) behind its own, so jax is the one installed here
    and pip finds every dependency already there: nothing downloads (PIP_NO_INDEX), and the editable install of
    the clone lands in the venv, leaving this environment's jaxmodels (an editable install of another checkout)
    as it was. `--system-site-packages` would not do: in a venv it sees the base interpreter's packages."""
    venv, clone, runtime = tmp_path / "venv", tmp_path / "jaxmodels", tmp_path / "content"
    runtime.mkdir()  # the notebook's working directory: not a checkout, as /content on Colab
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    site_dirs = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")]
    with open(os.path.join(purelib, "suite_packages.pth"), "w") as f:
        f.write("import site; " + "; ".join(f"site.addsitedir({p!r})" for p in site_dirs) + "\n")
    report = """
import importlib.metadata, json, sysconfig
import experiments, jaxmodels
print(json.dumps({"jaxmodels": jaxmodels.__file__, "experiments": experiments.__file__, "cwd": os.getcwd(),
                  "jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib"),
                  "installed": sorted(d.metadata["Name"] for d in
                                      importlib.metadata.distributions(path=[sysconfig.get_path("purelib")]))}))
"""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(JAXMODELS_REPO=ROOT, JAXMODELS_DIR=str(clone), JAX_PLATFORMS="cpu", PIP_NO_INDEX="1",
               PIP_NO_BUILD_ISOLATION="0",  # i.e. --no-build-isolation: build with this setuptools, no download
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    before = _this_environments_jaxmodels()
    result = subprocess.run([python, "-c", setup_cell(NOTEBOOKS[0]) + "\n" + report], cwd=runtime, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "backend cpu: [CpuDevice(id=0)" in result.stdout  # the cell reports the accelerator it found
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["jaxmodels"] == str(clone / "jaxmodels" / "__init__.py")  # the clone, importable at once
    assert found["experiments"] == str(clone / "experiments" / "__init__.py")
    assert found["cwd"] == str(clone)
    assert (found["jax"], found["jaxlib"]) == (jax.__version__, importlib.metadata.version("jaxlib"))
    assert found["installed"] == ["jaxmodels"]  # only the package went into the venv: jax was not upgraded
    assert _this_environments_jaxmodels() == before
