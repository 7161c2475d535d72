"""The one weights loader (scripts/common/weights.py): unwrap, prefix, strict vs tolerant, one provenance record."""

from __future__ import annotations

import hashlib
import logging

import pytest
import torch

from scripts.common.errors import CheckpointError
from scripts.common.weights import (
    atomic_torch_save,
    load_network_weights,
    network_state_dict,
    provenance,
    strip_module_prefix,
    unwrap,
)
from scripts.evaluation.weights import load_eval_weights
from scripts.inference.model import load_weights
from scripts.networks.unipet import UniPET, match_checkpoint_san_variant

TINY = dict(channels=4, num_blocks=2, latent_dim=8, san_channels=(4, 4))


def _trained(**kw) -> UniPET:
    torch.manual_seed(0)
    net = UniPET(**{**TINY, **kw})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net


def test_unwrap_reaches_the_network_inside_any_wrapper():
    net = UniPET(**TINY)
    assert unwrap(net) is net
    assert unwrap(torch.nn.DataParallel(torch.nn.DataParallel(net))) is net
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    opt.module = "not a network"  # only modules are unwrapped
    assert unwrap(opt) is opt


def test_state_saved_from_a_wrapped_network_loads_into_a_plain_one(tmp_path):
    src = _trained()
    wrapped = torch.nn.DataParallel(src).state_dict()
    assert all(k.startswith("module.") for k in wrapped)
    assert set(strip_module_prefix(wrapped)) == set(src.state_dict())
    for name, saved in {"plain": wrapped, "generator": {"generator": wrapped, "trainer": {"iteration": 3}}}.items():
        path = atomic_torch_save(saved, tmp_path / f"{name}.pt")
        net, info = load_network_weights(UniPET(**TINY), path, strict=True)
        assert torch.equal(net.output_conv.weight, src.output_conv.weight)
        assert info == provenance(path.resolve(), hashlib.sha256(path.read_bytes()).hexdigest(), "trained weights")
    assert network_state_dict({"trainer": {"iteration": 3}}) is None
    with pytest.raises(CheckpointError, match="holds no network weights"):
        load_network_weights(UniPET(**TINY), atomic_torch_save({"x": 1}, tmp_path / "none.pt"), strict=False)


def test_strict_refuses_a_stage1_checkpoint_that_tolerant_loading_accepts(tmp_path, caplog):
    stage1 = _trained(use_san=False)
    path = atomic_torch_save(stage1.state_dict(), tmp_path / "stage1.pt")
    with pytest.raises(CheckpointError, match="does not fit the network"):
        load_network_weights(UniPET(**TINY), path, strict=True)
    with caplog.at_level(logging.WARNING):
        net, info = load_network_weights(UniPET(**TINY), path, strict=False)
    assert "no SAN weights" in caplog.text and "stage-1" in info["note"] and info["trained"] is True
    assert torch.equal(net.output_conv.weight, stage1.output_conv.weight)


def test_adapt_rebuilds_the_network_before_loading(tmp_path):
    v1 = _trained(san_variant="v1")
    path = atomic_torch_save(v1.state_dict(), tmp_path / "v1.pt")
    template = UniPET(**TINY, san_variant="v2")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_network_weights(template, path, strict=True)
    net, _ = load_network_weights(template, path, strict=True, adapt=match_checkpoint_san_variant)
    assert net is not template and net.san_variant == "v1"
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), v1.state_dict().values()))


def test_inference_and_evaluation_record_the_same_provenance(tmp_path):
    path = atomic_torch_save(_trained().state_dict(), tmp_path / "model.pt")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    inference = load_weights(UniPET(**TINY), path, False, digest)
    evaluation = load_eval_weights(UniPET(**TINY), path, digest)
    assert inference == evaluation == provenance(path.resolve(), digest, "trained weights")
    untrained = [load_weights(UniPET(**TINY), "", True), load_eval_weights(UniPET(**TINY), "", None, True)]
    assert untrained[0] == untrained[1] and untrained[0]["trained"] is False and untrained[0]["checkpoint"] is None
    assert set(untrained[0]) == set(inference) == {"checkpoint", "trained", "checkpoint_sha256", "note"}
