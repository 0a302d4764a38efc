"""Every Python package of the source tree is listed for setuptools: a plain (non-editable) install
would silently lack an unlisted subpackage."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed_with_its_folder():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, folders = set(config["packages"]), config["package-dir"]
    found = {}
    for top, name in (("edgeft", "edgeft"), ("export", "edgeft.export"), ("runtime", "edgeft.runtime")):
        for init in (ROOT / top).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / top)
            found[".".join([name, *relative.parts])] = init.parent.relative_to(ROOT).as_posix()
    assert set(found) <= listed, sorted(set(found) - listed)
    for package, folder in found.items():
        assert folders.get(package, folder) == folder, package


def _declared(config) -> set[str]:
    import re

    project = config["project"]
    lines = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    return {re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0].strip().lower() for line in lines}


def test_every_third_party_import_of_the_package_is_a_declared_dependency():
    """A fresh machine installs only what pyproject names: `cma` was imported lazily by the CMA
    optimizer and missing from the dependencies (the workstation had it installed by chance)."""
    import ast
    import sys

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = _declared(config)
    missing = {}
    for top in ("edgeft", "export", "runtime"):
        for source in (ROOT / top).rglob("*.py"):
            for node in ast.walk(ast.parse(source.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    root = name.split(".")[0]
                    if root in sys.stdlib_module_names or root in ("edgeft", "tomli"):
                        continue
                    if root.lower() not in declared:  # every import here is named as its distribution
                        missing.setdefault(root, source.relative_to(ROOT).as_posix())
    assert not missing, missing
