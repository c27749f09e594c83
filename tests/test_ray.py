"""Scale-out: a real local Ray cluster (head on 127.0.0.1, 2 CPUs) trains two tiny adapters."""

import json

import pytest
import torch

from dlplora.train import TrainConfig, train_library
from raycluster import local_ray_cluster

ray = pytest.importorskip("ray")


@pytest.fixture
def ray_cluster():
    with local_ray_cluster() as address:
        yield address


def test_train_two_adapters_on_local_ray_cluster(ray_cluster, tiny_model, tiny_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lib_dir = tmp_path / "lib"
    logs = []
    train_library("quiz,sums", tiny_data, lib_dir, model=str(tiny_model),
                  cfg=TrainConfig(steps=2, batch_size=4, max_len=64, rank=4, alpha=8), eval_limit=2,
                  ray_address=ray_cluster, log=logs.append)
    assert any("on Ray at 127.0.0.1" in l for l in logs)
    manifest = json.loads((lib_dir / "library.json").read_text())
    assert set(manifest["adapters"]) == {"quiz", "sums"}
    for name in ("quiz", "sums"):
        # the trained adapter changes the model: its logits differ from the base model's
        ids = torch.tensor([[5, 17, 42, 99, 7]])
        base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
        with torch.inference_mode():
            base_logits = base(input_ids=ids).logits
            model = PeftModel.from_pretrained(base, lib_dir / "adapters" / name).eval()
            tuned_logits = model(input_ids=ids).logits
        assert not torch.allclose(tuned_logits, base_logits, atol=1e-6), f"{name}: the adapter has no effect"
        assert manifest["adapters"][name]["steps"] == 2 and manifest["adapters"][name]["final_loss"] > 0
