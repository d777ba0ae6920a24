"""The console scripts of setup.py work from an installed copy of the package alone, as after
``pip install megatron-trillion`` from a wheel: no source checkout, no tools/ directory."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A non-editable pip install (offline) of a copy of setup.py and megatron_trillion/ only."""
    root = tmp_path_factory.mktemp("installed")
    source = root / "source"
    source.mkdir()
    shutil.copy(REPO / "setup.py", source)
    shutil.copytree(REPO / "megatron_trillion", source / "megatron_trillion",
                    ignore=shutil.ignore_patterns("__pycache__"))
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--no-build-isolation", "--target", str(site), str(source)],
                   check=True, cwd=root)
    (dist_info,) = site.glob("megatron_trillion-*.dist-info")
    entry_points = configparser.ConfigParser()
    entry_points.optionxform = str  # script names as written
    entry_points.read(dist_info / "entry_points.txt")
    scripts = dict(entry_points["console_scripts"])
    # The installed copy ahead of this checkout; run from outside the checkout.
    env = {**os.environ, "PYTHONPATH": str(site)}
    return {"root": root, "site": site, "scripts": scripts, "env": env}


def test_every_console_script_target_runs_from_the_installed_package(installed):
    assert len(installed["scripts"]) >= 8, installed["scripts"]
    # What a console script does (sys.exit(main())), in one process to import torch only once.
    probe = ("import contextlib, importlib, io, sys\n"
             "for target in sys.argv[2:]:\n"
             "    module, _, attr = target.partition(':')\n"
             "    loaded = importlib.import_module(module)\n"
             "    assert loaded.__file__.startswith(sys.argv[1]), (target, loaded.__file__)\n"
             "    out = io.StringIO()\n"
             "    try:\n"
             "        with contextlib.redirect_stdout(out):\n"
             "            sys.exit(getattr(loaded, attr)(['--help']))\n"
             "    except SystemExit as exc:\n"
             "        assert exc.code == 0, (target, exc.code)\n"
             "    assert out.getvalue().startswith('usage:'), (target, out.getvalue())\n")
    subprocess.run([sys.executable, "-c", probe, str(installed["site"]),
                    *installed["scripts"].values()],
                   check=True, cwd=installed["root"], env=installed["env"])


def test_console_scripts_of_the_tools_run_from_the_installed_package(installed):
    tools = {name: target for name, target in installed["scripts"].items()
             if target.startswith("megatron_trillion.cli.")}
    assert len(tools) >= 6, installed["scripts"]
    for name in tools:
        result = subprocess.run([str(installed["site"] / "bin" / name), "--help"],
                                capture_output=True, text=True, cwd=installed["root"],
                                env=installed["env"])
        assert result.returncode == 0, (name, result.stderr)
        assert result.stdout.startswith("usage:"), (name, result.stdout)
