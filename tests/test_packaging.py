"""Install layout: one top-level name (``autopar``); the JAX-free folders map into it."""
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_install_adds_only_autopar_names():
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(p == "autopar" or p.startswith("autopar.") for p in conf["packages"]), conf["packages"]
    assert "examples" not in conf["packages"]
    for package, folder in conf["package-dir"].items():
        assert package.startswith("autopar.") and (ROOT / folder / "__init__.py").is_file(), (package, folder)
    assert {"autopar.cost", "autopar.solvers", "autopar.cluster_specs"} <= set(conf["package-dir"])


def test_namespace_imports_keep_jax_out():
    code = ("import sys, autopar.cost, autopar.solvers, autopar.solvers.stage_dp; "
            "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if m.startswith('jax')); "
            "assert autopar.cost.load_cluster('cpu-8').devices_per_node == 8")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_public_names_resolve():
    import autopar
    for name in autopar.__all__:
        assert getattr(autopar, name) is not None, name
    assert "plan_training" in dir(autopar)


def test_lazy_functions_are_not_shadowed_by_submodules():
    import autopar
    import autopar.pipeline.boundary  # noqa: F401
    import autopar.plan_types  # noqa: F401
    import autopar.planner  # noqa: F401
    assert callable(autopar.plan) and autopar.plan.__module__ == "autopar.planner"
    assert callable(autopar.stage_boundary) and callable(autopar.plan_training)
