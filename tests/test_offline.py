"""A local run asks no server. Adding, saving and loading an adapter on a local model opens no connection and
emits no warning, also when the adapter names its base by a name rather than a path (the default model's
adapters do: 'smollm2-135m-instruct'). PEFT's save_pretrained, left to save_embedding_layers="auto", asks the Hub
for the config.json of any base that is not a local directory, and on a machine without the Hub warns twice (the
host is unreachable; no config file, so the vocabulary is assumed unchanged) after the connection times out."""

from __future__ import annotations

import socket
import warnings

import pytest

import qlorakit
from qlorakit.adapters import save_adapter
from qlorakit.config import TrainConfig


@pytest.fixture
def connections(monkeypatch):
    """Every attempt to resolve a host or open a connection, each refused at once."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("tests reach no network")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # offline mode would skip PEFT's lookup, and hide it
    return attempts


@pytest.mark.parametrize("base", [qlorakit.DEFAULT_MODEL, "some-org/some-model"])
def test_adding_saving_and_loading_an_adapter_asks_no_server(base, tiny_model_dir, tmp_path, connections):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = qlorakit.load(tiny_model_dir, quant="none", dtype="fp32", device="cpu")
        model = qlorakit.add_lora(model, rank=2, alpha=4)
        out = save_adapter(model, tmp_path / "adapter", TrainConfig(model=base), qlorakit.precision_of(model))
        fresh, _ = qlorakit.load(tiny_model_dir, quant="none", dtype="fp32", device="cpu")
        qlorakit.load_adapter(fresh, out)
    assert connections == []
    # (warnings for users; libraries' deprecation notices about each other's code are not this test's business)
    assert [f"{w.category.__name__}: {w.message}" for w in caught if issubclass(w.category, UserWarning)] == []
    assert qlorakit.adapters.read_adapter_info(out)["peft"]["base_model_name_or_path"] == base
