"""llama.cpp's llama-server as the peer of `dlp-lora bench serve --llama-server PATH` (issue 27, item 3).

The library's PEFT adapters are converted to GGUF LoRAs with the llama.cpp source's ``convert_lora_to_gguf.py``
(``--base``: the backbone's Hugging Face directory, ``--outtype f32``); llama-server runs on the embedded Q4_1 GGUF
(or ``--gguf``) with every adapter loaded at scale 0 (``--lora ... --lora-init-without-apply``), the benchmark's
thread count and one slot per concurrent request (``-np``), a unified KV cache big enough for every slot's longest
request. Each request then carries its set as per-request scales (:func:`dlplora.bench.loadgen.lora_scales`).
llama-server batches only requests with the same LoRA configuration, so distinct mixes decode one after another.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..errors import DLPLoRAError

CONVERTER = "convert_lora_to_gguf.py"


def llama_source(server: str, src: str | None = None) -> Path:
    """The llama.cpp source directory that holds the converter: `src`, else the build's source tree
    (``<src>/build/bin/llama-server``, as ``build_llama_cpp.sh`` lays it out)."""
    cands = [Path(src)] if src else [Path(server).resolve().parents[k] for k in (2, 1)
                                     if len(Path(server).resolve().parents) > k]
    for c in cands:
        if (c / CONVERTER).is_file():
            return c
    where = src or f"the source tree above {server}"
    raise DLPLoRAError(f"no {CONVERTER} in {where}; give the llama.cpp source directory with --llama-src "
                       f"(build_llama_cpp.sh prints it as LLAMA_SRC)")


# runs the converter once per adapter in one interpreter (its imports, torch and transformers, load once)
_DRIVER = """
import json, runpy, sys
conv, jobs = sys.argv[1], json.loads(sys.argv[2])
for base, out, src in jobs:
    sys.argv = [conv, "--base", base, "--outtype", "f32", "--outfile", out, src]
    try:
        runpy.run_path(conv, run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise SystemExit(f"{src}: the converter exited with {exc.code}")
"""


def convert_adapters(src: Path, base: str, adapter_dirs: dict[str, Path], out_dir: Path, log=print) -> dict[str, Path]:
    """Convert each PEFT adapter ({name: dir}) to ``out_dir/<name>.gguf``; returns {name: gguf path}."""
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src / "gguf-py"), str(src)]
                                                       + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    out = {name: out_dir / f"{name}.gguf" for name in adapter_dirs}
    jobs = [[str(base), str(out[name]), str(d)] for name, d in adapter_dirs.items()]
    res = subprocess.run([sys.executable, "-c", _DRIVER, str(src / CONVERTER), json.dumps(jobs)], capture_output=True,
                         text=True, env=env)
    missing = [n for n, g in out.items() if not g.is_file()]
    if res.returncode != 0 or missing:
        tail = (res.stderr or res.stdout).strip()[-800:]
        hint = f" (the converter needs the gguf package: pip install {src / 'gguf-py'})" \
            if "No module named 'gguf'" in tail else ""
        raise DLPLoRAError(f"converting the adapters to GGUF failed{hint}: {tail}")
    log(f"converted {len(out)} adapters to GGUF LoRAs with {src / CONVERTER}")
    return out


def server_command(server: str, gguf: str, loras: list[Path], threads: int, slots: int, ctx: int, port: int
                   ) -> list[str]:
    """llama-server on `gguf` with the `loras` (ids 0.. in this order) at scale 0, `slots` parallel slots sharing a
    unified KV cache of `ctx` tokens."""
    cmd = [server, "-m", str(gguf)]
    for g in loras:
        cmd += ["--lora", str(g)]
    return cmd + ["--lora-init-without-apply", "-t", str(threads), "-np", str(slots), "-c", str(ctx), "-kvu",
                  "--host", "127.0.0.1", "--port", str(port), "--no-webui"]
