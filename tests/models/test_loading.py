import json

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from conftest import tiny_vit
from vitq.errors import VitqError
from vitq.models import load_model
from vitq.models import loading


def _card(path, **extra):
    card = {"timm_model": "test_vit", "kwargs": {"img_size": 32, "patch_size": 8, "num_classes": 4},
            "data_config": {"input_size": [3, 32, 32], "mean": [0.1, 0.2, 0.3], "std": [1, 1, 1]}, **extra}
    path.with_suffix(".json").write_text(json.dumps(card))


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".npz"])
def test_checkpoint_formats_with_card(tmp_path, suffix):
    model = tiny_vit()
    path = tmp_path / f"m{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if suffix == ".pth":
        torch.save({"model": state}, path)  # a wrapped state_dict is unwrapped
    elif suffix == ".safetensors":
        save_file(state, str(path))
    else:
        np.savez(path, **{k: v.numpy() for k, v in state.items()})
    _card(path, classes=["a", "b", "c", "d"])
    loaded = load_model(path)
    assert _same_weights(loaded.model, model)
    assert loaded.arch == "test_vit" and loaded.classes == ["a", "b", "c", "d"]
    assert loaded.data_config["input_size"] == (3, 32, 32) and loaded.data_config["mean"] == (0.1, 0.2, 0.3)


def test_checkpoint_with_arch_instead_of_card(tmp_path):
    model = tiny_vit()
    path = tmp_path / "plain.pth"
    torch.save(model.state_dict(), path)
    loaded = load_model(path, arch="test_vit", model_kwargs={"img_size": 32, "patch_size": 8, "num_classes": 4})
    assert _same_weights(loaded.model, model)


def test_pickled_module_is_refused(tmp_path):
    path = tmp_path / "whole.pth"
    torch.save(tiny_vit(), path)  # a pickled module would need code execution to load
    _card(path)
    with pytest.raises(VitqError, match=r"pickled Python objects.*torch.save\(model.state_dict\(\)") as info:
        load_model(path)
    assert "weights_only" not in str(info.value) and "\x1b[" not in str(info.value)  # not torch's own text


def test_hub_failure_names_the_way_out(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(timm, "create_model", offline)
    monkeypatch.setattr(loading, "_check_reachable", lambda name: None)  # the host answers, the download fails
    with pytest.raises(VitqError, match="could not fetch pretrained weights.*local checkpoint"):
        load_model("deit_tiny_patch16_224")


def test_unreachable_hub_fails_before_the_download_retries(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("Name or service not known")

    calls = []

    def download(*args, **kwargs):  # offline, timm's download retries for about a minute
        calls.append(args)
        raise OSError("download failed")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(loading.socket, "create_connection", no_network)
    monkeypatch.setattr(loading, "_weights_source", lambda name: ("huggingface.co", False))
    monkeypatch.setattr(timm, "create_model", download)
    with pytest.raises(VitqError, match=r"not in the local cache and huggingface.co cannot be reached.*--random-weights"):
        load_model("deit_tiny_patch16_224")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VitqError, match="HF_HUB_OFFLINE is set"):
        load_model("deit_tiny_patch16_224")
    assert not calls
    monkeypatch.setattr(loading, "_weights_source", lambda name: (None, True))  # cached: timm loads it
    with pytest.raises(VitqError, match="could not fetch"):
        load_model("deit_tiny_patch16_224")
    assert len(calls) == 1


def test_weights_source_names_the_hub_host_of_a_timm_name():
    for name in ("deit_tiny_patch16_224", "test_vit"):  # both have weights on the Hugging Face hub
        host, cached = loading._weights_source(name)
        assert cached or host == "huggingface.co", (name, host, cached)


def test_random_weights_and_modules():
    assert load_model("test_vit", pretrained=False).arch == "test_vit"
    loaded = load_model(tiny_vit())
    assert loaded.data_config["input_size"] == (3, 32, 32)


def test_unknown_model_name_suggests_names():
    with pytest.raises(VitqError, match="unknown model 'deit_tinyy_patch16_224'.*Similar names: deit"):
        load_model("deit_tinyy_patch16_224")
    with pytest.raises(VitqError, match="Similar names: deit_tiny_patch16_224, "):  # the nearest first, not deit3
        load_model("deit_tinny")


def test_a_card_that_timm_rejects_is_a_clean_error(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({}, path)
    card = {"format": "vitq-model-card/1", "timm_model": "test_vit", "kwargs": {"embed_dim": 65, "num_heads": 2}}
    path.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(VitqError, match="timm cannot build 'test_vit'.*divisible by num_heads"):
        load_model(path)


def test_random_weights_are_seeded_and_checksummed():
    a, b, c = (load_model("test_vit", pretrained=False, seed=s) for s in (0, 0, 1))
    assert a.digest == b.digest != c.digest
    assert a.identity["random_weights_seed"] == 0 and a.identity["weights_sha256"] == a.digest
    assert "random_weights_seed" not in load_model(tiny_vit()).identity
