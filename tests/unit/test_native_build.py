"""The native helper is rebuilt when its source changes: a library built from other source is never
loaded, whether it is the installed extension or one in the build cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from vhostfs import native
from vhostfs._native_build import BUILD_ID

REPO = Path(__file__).resolve().parents[2]


def test_the_loaded_helper_is_built_from_this_source():
    assert native.ffi.string(native.lib.vhostfs_build_id()).decode() == BUILD_ID


def test_a_changed_source_is_compiled_again(tmp_path):
    tree = tmp_path / "src"
    # The package as it is, the installed extension included (built from the unchanged source).
    shutil.copytree(REPO / "vhostfs", tree / "vhostfs", ignore=shutil.ignore_patterns("__pycache__"))
    build = tree / "vhostfs" / "_native_build.py"
    text = build.read_text()
    marker = "\n_SOURCE = "  # the helper's whole source, whatever it is made of
    assert marker in text
    build.write_text(text.replace(marker, marker + '"/* changed */\\n" + ', 1))
    probe = ("from vhostfs import native; from vhostfs._native_build import BUILD_ID; "
             "print(BUILD_ID, native.ffi.string(native.lib.vhostfs_build_id()).decode(), "
             "native._mod.__file__)")
    env = dict(os.environ, PYTHONPATH=str(tree), XDG_CACHE_HOME=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    new_id, loaded_id, path = r.stdout.split()
    assert new_id != BUILD_ID
    assert loaded_id == new_id
    assert path.startswith(str(tmp_path / "cache")) and new_id in os.path.basename(path)
