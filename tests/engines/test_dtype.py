"""`model.dtype = "auto"` picks bf16 only where the hardware computes it; an explicit bf16 on a CPU that
would run it in software is kept, with a warning that names the fix."""

from __future__ import annotations

import logging

import pytest
import torch

from fedpit import model as model_mod

CPU = torch.device("cpu")


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [
    (True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, torch.float32)])
def test_auto_on_cpu_follows_the_hardware(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert model_mod.resolve_dtype("auto", CPU) is expected


@pytest.mark.parametrize("fast", [True, False])
def test_explicit_bf16_is_kept_and_warned_about_only_without_hardware_bf16(monkeypatch, caplog, fast):
    monkeypatch.setattr(model_mod, "cpu_has_fast_bf16", lambda: fast)
    with caplog.at_level(logging.WARNING, logger="fedpit.model"):
        assert model_mod.resolve_dtype("bf16", CPU) is torch.bfloat16
    warned = [r.getMessage() for r in caplog.records if "model.dtype" in r.getMessage()]
    assert (warned == []) if fast else ("'auto'" in warned[0] and "'fp32'" in warned[0])


def test_explicit_fp32_and_the_default():
    assert model_mod.resolve_dtype("fp32", CPU) is torch.float32
    from fedpit.config import ModelConfig

    assert ModelConfig().dtype == "auto"
