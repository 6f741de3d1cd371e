"""Server-side building blocks shared by methods."""

from __future__ import annotations

import torch

from fedpit.types import AdapterState, ClientUpload


def weighted_average(uploads: list[ClientUpload]) -> AdapterState:
    """FedAvg (McMahan et al. 2017): mean of the uploads weighted by each client's example count."""
    if not uploads:
        raise ValueError("cannot aggregate zero uploads")
    total = sum(u.num_examples for u in uploads)
    if total <= 0:
        raise ValueError("uploads carry no examples to weight by")
    keys = uploads[0].tensors.keys()
    return {
        key: sum((u.tensors[key].double() * (u.num_examples / total) for u in uploads),
                 torch.zeros_like(uploads[0].tensors[key], dtype=torch.float64)).float()
        for key in keys
    }


def mix(first: AdapterState, second: AdapterState, weight: float) -> AdapterState:
    """weight * first + (1 - weight) * second, element-wise over every tensor."""
    return {k: weight * first[k] + (1.0 - weight) * second[k] for k in first}
