"""The Dockerfile's build steps, replayed without Docker: its COPY and RUN lines run in order in a
temporary WORKDIR, COPY keeping the files' mtimes as Docker does, with `pip` standing in for the
part that matters here (setuptools' build_py into build/lib, then copying build/lib to a fake
site-packages). The installed package must be the sources: the dependency layer's empty
placeholder __init__.py files, left in build/lib and newer than the copied sources, once were
what the image installed, so `python -m gateway` failed anywhere but in WORKDIR."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PIP = """\
import shutil, subprocess, sys, os
site = os.environ["FAKE_SITE"]
if sys.argv[1] == "install":
    subprocess.run([sys.executable, "-c", "import setuptools; setuptools.setup()", "-q", "build_py"],
                   check=True, stdout=subprocess.DEVNULL)
    shutil.copytree("build/lib", site, dirs_exist_ok=True)
elif sys.argv[1] == "uninstall":
    shutil.rmtree(site, ignore_errors=True)
"""


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = (line.strip() for line in text.splitlines())
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def copy(args: str, app: Path) -> None:
    *sources, dest = args.split()
    for source in sources:
        src, target = ROOT / source, app / dest
        if src.is_dir():
            shutil.copytree(
                src, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        else:
            shutil.copy2(src, target / src.name if dest.endswith("/") else target)


def test_the_image_installs_the_sources_not_the_dependency_layers_placeholders(tmp_path: Path) -> None:
    app, site, bin_dir = tmp_path / "app", tmp_path / "site", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pip").write_text(f"#!{sys.executable}\n{PIP}")
    (bin_dir / "useradd").write_text("#!/bin/sh\n")
    for shim in bin_dir.iterdir():
        shim.chmod(0o755)
    env = {**os.environ, "FAKE_SITE": str(site), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)

    steps = instructions()
    assert ("WORKDIR", "/app") in steps
    for op, args in steps[steps.index(("WORKDIR", "/app")) + 1 :]:
        if op == "COPY":
            app.mkdir(exist_ok=True)
            copy(args, app)
        elif op == "RUN":
            subprocess.run(["sh", "-ec", args], cwd=app, env=env, check=True, timeout=60)

    sources = sorted(
        p.relative_to(ROOT)
        for top in ("gateway", "intelligence", "migrations")
        for p in (ROOT / top).rglob("*")
        if p.suffix in (".py", ".sql") and "__pycache__" not in p.parts
    )
    assert sources
    differ = [
        str(p)
        for p in sources
        if not (site / p).is_file() or (site / p).read_bytes() != (ROOT / p).read_bytes()
    ]
    assert differ == []


def test_dockerignore_lets_every_copy_source_through() -> None:
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert "*" in ignore
    sources = [s for op, args in instructions() if op == "COPY" for s in args.split()[:-1]]
    assert sources
    assert [s for s in sources if f"!{s}" not in ignore] == []
