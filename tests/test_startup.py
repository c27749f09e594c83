"""Start-up: `dlp-lora --help` and argument errors answer without importing torch or transformers, and `route`
loads the plugin only (no backbone, no transformers). Checked in a fresh interpreter (sys.modules)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
PROBE = """
import json, sys
from dlplora.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "loaded": sorted(m for m in ("torch", "transformers", "numpy", "fastapi")
                                                   if m in sys.modules)}))
"""


def _run(*argv: str) -> dict:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1]) | {"stderr": out.stderr}


def test_help_and_argument_errors_do_not_import_torch_or_transformers():
    for argv in (["--help"], ["serve", "--help"], ["generate", "--help"], ["bench", "--help"],
                 ["serve"], ["route", "--p"], ["no-such-command"]):
        res = _run(*argv)
        assert res["code"] in (0, 2), (argv, res)
        assert res["loaded"] == [], (argv, res["loaded"])
    assert "--library" in _run("serve")["stderr"]  # the argument error itself is still reported


def test_route_loads_the_plugin_but_neither_torch_nor_transformers(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from wordplugin import train_word_plugin

    train_word_plugin(tmp_path, {"a": ("add", "sum", "plus"), "b": ("red", "blue", "green")})
    res = _run("route", "--plugin", str(tmp_path / "plugin"), "add sum plus")
    assert res["code"] == 0, res
    assert "transformers" not in res["loaded"] and "torch" not in res["loaded"], res  # NumPy forward (numpy_net.py)


def test_model_info_reads_the_facts_without_loading_and_they_match_a_load(tiny_model):
    from dlplora.backbone import load_backbone

    res = _run("model", "info", "--model", str(tiny_model), "--json")
    assert res["code"] == 0 and res["loaded"] == [], res
    read = subprocess.run([sys.executable, "-m", "dlplora.cli", "model", "info", "--model", str(tiny_model), "--json"],
                          capture_output=True, text=True, check=True,
                          env=dict(os.environ, PYTHONPATH=SRC)).stdout.strip().splitlines()[-1]
    assert json.loads(read) == load_backbone(str(tiny_model))[2].to_dict()
