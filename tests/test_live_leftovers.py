"""Issue 16's leftovers on a live server: unloading the last adapter (the base model is served then), a runtime
retrain written to the plugin directory the server loaded (--plugin DIR), and adapter files copied from under the
adapter root without following a symbolic link swapped in after the path was checked."""

from __future__ import annotations

import json
import os
import shutil

import httpx
import pytest

from dlplora.engine import DLPLoRA
from dlplora.errors import DLPLoRAError
from dlplora.library import Library, stage_adapter
from dlplora.paths import copy_tree_under, read_under
from dlplora.serve import ServeConfig, ServerThread, create_app
from dlplora.testing import random_peft_adapter, random_peft_library
from wordplugin import train_word_plugin

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = {"alpha": ("add", "sum", "plus", "number"), "beta": ("bonjour", "maison", "voiture", "pomme")}


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_model):
    """A library with routing prompts, its router in a directory of its own (--plugin DIR), and an adapter root."""
    top = tmp_path_factory.mktemp("leftovers")
    lib_dir = random_peft_library(top / "lib", tiny_model, {n: (4, 8, ["q_proj"]) for n in WORDS}, std=0.5, seed=4)
    lib = Library.open(lib_dir)
    for name, bag in WORDS.items():
        lib.save_routing_prompts(name, [{"input": f"{w} {v} {i}"} for i, (w, v) in enumerate(zip(bag * 5, bag[::-1] * 5))])
    train_word_plugin(top, WORDS)  # top/plugin: not LIB/plugin
    root = top / "root"
    random_peft_adapter(tiny_model, root / "gamma", rank=4, targets=("v_proj",), seed=7, std=0.5)
    engine = DLPLoRA.from_library(lib_dir, plugin_dir=top / "plugin")
    cfg = ServeConfig(max_tokens_limit=8, request_timeout=60, allow_runtime_adapters=True, adapter_root=str(root))
    app = create_app(engine, cfg)
    with ServerThread(app) as srv:
        srv.top, srv.lib, srv.live, srv.root = top, lib_dir, app.state.dlp.live, root
        with httpx.Client(base_url=srv.url, timeout=120) as http:
            srv.http = http
            yield srv


def _chat(http, model="dlp-lora", content="add sum plus number"):
    return http.post("/v1/chat/completions", json={"model": model, "max_tokens": 2,
                                                   "messages": [{"role": "user", "content": content}]})


def test_a_runtime_retrain_writes_the_plugin_directory_the_server_loaded(live):
    before = (live.top / "plugin" / "plugin.json").read_text()
    r = live.http.post("/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": "gamma",
                                                      "examples": ["red green blue", "yellow ball table"] * 5})
    assert r.status_code == 200, r.text
    assert live.live.wait_trained(120)
    assert [c for c in live.live.changes if c["op"] == "retrain"][-1]["ok"]
    written = json.loads((live.top / "plugin" / "plugin.json").read_text())
    assert written["labels"] == ["alpha", "beta", "gamma"] and json.dumps(written) != before
    assert not (live.lib / "plugin").exists()  # nothing written to LIB/plugin


def test_unloading_the_last_adapter_serves_the_base_model(live):
    for name in [m["id"] for m in live.http.get("/v1/models").json()["data"] if "routing" in m]:
        r = live.http.post("/v1/unload_lora_adapter", json={"lora_name": name})
        assert r.status_code == 200, r.text
    models = live.http.get("/v1/models").json()["data"]
    assert [m["id"] for m in models if "routing" in m] == [] and models[0]["id"] == live.live.state.base_name
    assert Library.open(live.lib).names == []
    r = _chat(live.http)
    assert r.status_code == 200, r.text
    assert r.json()["routing"]["adapters"] == [] and r.json()["routing"]["base_reason"]
    assert _chat(live.http, model="alpha").status_code == 404
    r = live.http.post("/v1/load_lora_adapter", json={"lora_name": "again", "lora_path": "gamma"})
    assert r.status_code == 200, r.text  # and it takes adapters again
    assert _chat(live.http, model="again").status_code == 200


def test_the_copy_opens_every_file_under_the_root_without_following_a_swapped_link(tmp_path, tiny_model):
    root, outside = tmp_path / "root", tmp_path / "outside"
    random_peft_adapter(tiny_model, root / "ad", rank=4, seed=1)
    random_peft_adapter(tiny_model, outside / "evil", rank=4, seed=2)
    copy_tree_under(root, root / "ad", tmp_path / "copy")
    assert sorted(os.listdir(tmp_path / "copy")) == sorted(os.listdir(root / "ad"))
    # a link inside the root to a file inside the root is copied as that file
    shutil.copy(root / "ad" / "adapter_config.json", root / "config-copy.json")
    os.symlink(root / "config-copy.json", root / "ad" / "linked.json")
    copy_tree_under(root, root / "ad", tmp_path / "copy2")
    assert (tmp_path / "copy2" / "linked.json").read_bytes() == (root / "config-copy.json").read_bytes()
    os.unlink(root / "ad" / "linked.json")
    # the race: the checks saw a regular file, then it became a link out of the root before the copy
    weights = root / "ad" / "adapter_model.safetensors"
    weights.unlink()
    os.symlink(outside / "evil" / "adapter_model.safetensors", weights)
    with pytest.raises(DLPLoRAError, match="leads outside"):
        copy_tree_under(root, root / "ad", tmp_path / "copy3")
    # ... or a directory on the path became a link (a component opened with O_NOFOLLOW fails)
    shutil.rmtree(root / "ad")
    os.symlink(outside / "evil", root / "ad")
    with pytest.raises(DLPLoRAError, match="without following a symbolic link"):
        copy_tree_under(root, root / "ad", tmp_path / "copy4")
    with pytest.raises(DLPLoRAError, match="leads outside"):
        read_under(root, root / "ad" / "adapter_config.json")


def test_a_link_swapped_in_after_the_check_is_not_followed(tmp_path, tiny_model, monkeypatch):
    """The check (realpath) sees the path as it was; the open, later, meets the link: O_NOFOLLOW refuses it."""
    import dlplora.paths

    root, outside = tmp_path / "root", tmp_path / "outside"
    random_peft_adapter(tiny_model, root / "ad", rank=4, seed=1)
    random_peft_adapter(tiny_model, outside / "evil", rank=4, seed=2)
    weights = root / "ad" / "adapter_model.safetensors"
    weights.unlink()
    os.symlink(outside / "evil" / "adapter_model.safetensors", weights)
    monkeypatch.setattr(dlplora.paths.os.path, "realpath", lambda p: str(p))  # the check ran before the swap
    with pytest.raises(DLPLoRAError, match="without following a symbolic link"):
        read_under(root, weights)
    with pytest.raises(DLPLoRAError, match="without following a symbolic link"):
        copy_tree_under(root, root / "ad", tmp_path / "copy")


def test_stage_adapter_under_a_root_serves_what_it_copied(tmp_path, tiny_model):
    lib_dir = random_peft_library(tmp_path / "lib", tiny_model, {"a": (4, 8, ["q_proj"])}, seed=3)
    lib = Library.open(lib_dir)
    root, outside = tmp_path / "root", tmp_path / "outside"
    random_peft_adapter(tiny_model, root / "ad", rank=4, seed=1)
    random_peft_adapter(tiny_model, outside / "evil", rank=4, seed=2)
    entry = stage_adapter(lib, "b", root / "ad", model=str(tiny_model), root=str(root))
    assert entry["path"] == "adapters/b" and (lib_dir / "adapters" / "b" / "adapter_model.safetensors").is_file()
    (root / "ad" / "adapter_model.safetensors").unlink()
    os.symlink(outside / "evil" / "adapter_model.safetensors", root / "ad" / "adapter_model.safetensors")
    with pytest.raises(DLPLoRAError, match="leads outside"):
        stage_adapter(lib, "c", root / "ad", model=str(tiny_model), root=str(root))
    assert not (lib_dir / "adapters" / "c").exists() and not list((lib_dir / "adapters").glob(".*"))


def test_a_retrained_router_carries_the_library_version_its_adapters_were_read_at(monkeypatch):
    """On Ray Serve replicas a router is published with the library version of the adapter list it trained on, not the
    version reached when it finishes: else a retraining that started before a load, finishing after the load's own
    retraining, replaced the newer router and the new adapter was never routed."""
    import threading
    from types import SimpleNamespace as NS

    import dlplora.plugin as plugin_mod
    from dlplora.serve.live import ROUTABLE, LiveLibrary

    class Replica(LiveLibrary):
        version = 1
        published: list = []

        def library_version(self):
            return self.version

        def adopt_router(self, plugin, seq, waiting):
            self.published.append(seq)
            return True

    def train(library, names, like=None, max_per_adapter=None):
        lib.version = 2  # a load lands on this replica while it trains
        return NS(labels=names), {"train_seconds": 0.0, "train_examples": 0}

    monkeypatch.setattr(plugin_mod, "train_plugin_from_library", train)
    state = NS(engine=NS(router=None, names=["a", "b"], library=object()), config=NS(retrain_max_prompts=10),
               router_lock=threading.Lock())
    lib = Replica(state)
    lib.routing = {"a": ROUTABLE, "b": ROUTABLE}
    lib._dirty = True
    lib._train_loop()
    assert Replica.published == [1]


def test_the_hub_stops_waiting_for_a_replica_that_died_while_applying_a_change(tmp_path, tiny_model, monkeypatch):
    """A replica sent a change but silent since is waited for while it may still be applying it, not forever (it
    used to make every later load or unload wait its full timeout)."""
    from dlplora.serve import library_actor
    from dlplora.testing import random_peft_library

    lib = random_peft_library(tmp_path / "lib", tiny_model, {"a": (4, 8, ["q_proj"])}, seed=1)
    hub = library_actor.LibraryHub.__ray_actor_class__(str(lib))
    now = [1000.0]
    monkeypatch.setattr(library_actor.time, "monotonic", lambda: now[0])
    hub.seen = {"r1": 1000.0, "r2": 1000.0}
    hub.sent, hub.acked = {"r1": 3, "r2": 3}, {"r1": 3, "r2": 2}  # r2 got change 3 and has not applied it
    assert sorted(hub._live()) == ["r1", "r2"]
    now[0] += library_actor.DEAD_S + 1
    assert hub._live() == ["r2"]  # r1 is silent with nothing to apply; r2 may still be applying
    now[0] += library_actor.LEASE_S
    assert hub._live() == []
