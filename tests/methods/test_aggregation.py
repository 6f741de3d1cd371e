import pytest
import torch

from fedpit.methods.aggregation import mix, weighted_average
from fedpit.types import ClientUpload


def _upload(client, value, n):
    return ClientUpload(client=client, tensors={"w": torch.tensor([value, 2 * value])}, num_examples=n)


def test_weighted_average_matches_hand_computed_mean():
    uploads = [_upload("a", 1.0, 10), _upload("b", 4.0, 30), _upload("c", -2.0, 20)]
    # (10*1 + 30*4 + 20*(-2)) / 60 = 90 / 60 = 1.5
    result = weighted_average(uploads)
    assert torch.allclose(result["w"], torch.tensor([1.5, 3.0]))


def test_weighted_average_rejects_empty_round():
    with pytest.raises(ValueError):
        weighted_average([])


def test_mix_is_elementwise_convex_combination():
    first, second = {"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([5.0, -1.0])}
    assert torch.allclose(mix(first, second, 0.25)["w"], torch.tensor([4.0, 0.0]))
    assert torch.equal(mix(first, second, 1.0)["w"], first["w"])
    assert torch.equal(mix(first, second, 0.0)["w"], second["w"])


def test_upload_metrics_must_be_numbers():
    with pytest.raises(TypeError):
        ClientUpload(client="a", tensors={}, num_examples=1, metrics={"leak": "private text"})
