"""The Flower codec: what travels, exactly, and at what size."""

from __future__ import annotations

import pytest
import torch

from fedpit.runtimes.flower import codec
from fedpit.types import ClientUpload


def _adapter():
    torch.manual_seed(0)
    return {f"layers.{i}.q_proj.lora_A.weight": torch.randn(16, 576) for i in range(4)} | {
        f"layers.{i}.q_proj.lora_B.weight": torch.randn(576, 16) for i in range(4)}


def test_request_round_trips_exactly_in_fp32():
    adapter, c = _adapter(), {"c": {"x": torch.ones(3)}}
    request = codec.decode_request(codec.encode_request(3, 1e-3, "client-01", "seed = 1\n", adapter, c, "fp32"))
    assert (request.round_num, request.learning_rate, request.client, request.config_toml) == \
        (3, 1e-3, "client-01", "seed = 1\n")
    assert all(torch.equal(request.global_adapter[k], adapter[k]) for k in adapter)
    assert torch.equal(request.broadcast["c"]["x"], torch.ones(3))


@pytest.mark.parametrize("transport, ratio", [("fp32", 1.0), ("bf16", 0.5)])
def test_reply_round_trip_and_size(transport, ratio):
    adapter = _adapter()
    upload = ClientUpload(client="client-00", tensors=adapter, num_examples=12, metrics={"train_loss_private": 1.5},
                          extras={"delta": {"x": torch.full((2,), 0.25)}})
    content = codec.encode_reply(upload, {"train_private": 2.0}, transport)
    report = codec.decode_reply(content)
    assert report.upload.client == "client-00" and report.upload.num_examples == 12
    assert report.upload.metrics == {"train_loss_private": 1.5} and report.phase_seconds == {"train_private": 2.0}
    for key, tensor in adapter.items():
        expected = tensor if transport == "fp32" else tensor.to(torch.bfloat16).float()
        assert report.upload.tensors[key].dtype == torch.float32
        assert torch.equal(report.upload.tensors[key], expected)
    fp32 = sum(t.numel() * 4 for t in adapter.values())
    assert codec.wire_bytes(content) == pytest.approx(fp32 * ratio, rel=0.01)


def test_a_reply_with_extra_records_is_refused():
    from flwr.app import ConfigRecord

    upload = ClientUpload(client="c", tensors=_adapter(), num_examples=1)
    content = codec.encode_reply(upload, {}, "fp32")
    content["private"] = ConfigRecord({"text": "patient notes"})
    with pytest.raises(ValueError, match="unexpected records"):
        codec.decode_reply(content)
