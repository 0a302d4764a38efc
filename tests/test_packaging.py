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
