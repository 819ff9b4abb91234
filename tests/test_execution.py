"""The execution options: one context selects attention implementation and fused norms, and the models obey it."""

from __future__ import annotations

import threading

import pytest
import torch

import mindhier_rt.kernels.fused_norm as fused_norm
import mindhier_rt.models.attention as attention_module
from mindhier_rt.errors import ConfigError
from mindhier_rt.execution import REFERENCE, ExecutionOptions, current, execution, exporting
from mindhier_rt.models.blocks import SwittiBlock, rope_tables


def test_options_nest_change_only_what_is_given_and_are_restored():
    assert current() == REFERENCE == ExecutionOptions(attention="sdpa", fused_norms=False)
    with execution(attention="triton") as outer:
        assert outer == current() == ExecutionOptions(attention="triton", fused_norms=False)
        with execution(fused_norms=True):
            assert current() == ExecutionOptions(attention="triton", fused_norms=True)
            with exporting():
                assert current() == ExecutionOptions(attention="math", fused_norms=False)
            assert current() == ExecutionOptions(attention="triton", fused_norms=True)
        with execution(ExecutionOptions(), fused_norms=True):  # explicit options, one field replaced
            assert current() == ExecutionOptions(attention="sdpa", fused_norms=True)
        assert current() == outer
    assert current() == REFERENCE


def test_options_are_restored_after_an_error():
    with pytest.raises(RuntimeError), execution(attention="math"):
        raise RuntimeError("inside")
    assert current() == REFERENCE


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"attention": "flash"}, "attention must be one of"), ({"fused_norms": 1}, "fused_norms must be a bool")],
)
def test_bad_options_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        ExecutionOptions(**fields)
    with pytest.raises(ConfigError, match=message), execution(**fields):
        pass
    assert current() == REFERENCE


def test_options_hold_per_thread():
    seen: list[ExecutionOptions] = []
    with execution(attention="math", fused_norms=True):
        worker = threading.Thread(target=lambda: seen.append(current()))
        worker.start()
        worker.join()
        assert current().attention == "math"
    assert seen == [REFERENCE]


def test_attention_follows_the_options(monkeypatch):
    calls: list[str] = []
    real = attention_module.attention_math
    monkeypatch.setattr(attention_module, "attention_math", lambda *a: calls.append("math") or real(*a))
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    sdpa = attention_module.attention(q, k, v)
    assert calls == []
    with exporting():
        math = attention_module.attention(q, k, v)
    assert calls == ["math"]
    assert torch.allclose(math, sdpa, atol=1e-6)


def test_fused_norms_route_the_block_through_the_kernels(monkeypatch):
    """With fused norms on, the block's norm chains, SwiGLU's gate and the q/k prologue call the kernel module's
    functions (replaced here by their references, so no Triton is needed); off, none of them is called."""
    called: list[str] = []

    def spy(name, fn):
        return lambda *a, **kw: called.append(name) or fn(*a, **kw)

    monkeypatch.setattr(fused_norm, "rms_norm_modulate", spy("modulate", fused_norm.rms_norm_modulate_ref))
    monkeypatch.setattr(fused_norm, "residual_rms_norm", spy("residual", fused_norm.residual_rms_norm_ref))
    monkeypatch.setattr(fused_norm, "silu_mul", spy("silu_mul", lambda a, b: torch.nn.functional.silu(a) * b))
    monkeypatch.setattr(fused_norm, "qk_norm_rope", spy("qk", fused_norm.qk_norm_rope_ref))
    torch.manual_seed(0)
    block = SwittiBlock(width=32, heads=2, context_dim=16, ffn_dim=40, eps=1e-6, crop_cond=False).eval()
    x = torch.randn(2, 4, 32)
    ada = block.modulation(torch.randn(2, 32), None)
    cos, sin = (t.float() for t in rope_tables(torch.rand(4, 8)))
    k, v = block.context_kv(torch.randn(2, 3, 16))
    with torch.no_grad():
        ref = block(x, ada, cos, sin, k, v)
        assert called == []
        with execution(fused_norms=True):
            got = block(x, ada, cos, sin, k, v)
    assert {"modulate", "residual", "silu_mul", "qk"} <= set(called)
    assert torch.allclose(got, ref, atol=1e-5)
