"""CpuDropout: nn.Dropout's behaviour (rate, independence, scale, gradient, eval, seeding), drawn as gaps."""

import math

import pytest
import torch

from alpaca_tune.training.cpu.dropout import (
    CpuDropout,
    dropped_positions,
    use_cpu_dropout,
)


def _drop_statistics(dropped: torch.Tensor, p: float, n: int):
    """Checks that `dropped` (bool, n elements) looks like n independent Bernoulli(p) trials."""
    sigma = (p * (1 - p) / n) ** 0.5
    assert dropped.float().mean().item() == pytest.approx(p, abs=5 * sigma)
    # no position decides its neighbour's fate: adjacent drops as often as chance says
    both = (dropped[:-1] & dropped[1:]).float().mean().item()
    assert both == pytest.approx(p ** 2, rel=0.2)
    # kept runs between drops are geometric: P(run >= k) = (1 - p)^k
    runs = torch.diff(torch.nonzero(dropped).squeeze(1)) - 1
    for k in (1, round(1 / p), round(3 / p)):
        assert (runs >= k).float().mean().item() == pytest.approx((1 - p) ** k, rel=0.1)


def test_drop_rate_scale_and_independence_match_nn_dropout():
    torch.manual_seed(0)
    dropout = CpuDropout(0.05)
    out = dropout(torch.ones(1 << 20))
    kept = out != 0
    assert torch.all(out[kept] == 1 / (1 - 0.05))  # survivors scaled exactly as nn.Dropout does
    _drop_statistics(~kept, 0.05, out.numel())
    # the first and the last elements are dropped too, at the same rate (no edge effects)
    torch.manual_seed(1)
    edges = torch.stack([dropout(torch.ones(50))[[0, -1]] == 0 for _ in range(4000)]).float().mean(0)
    assert torch.all((edges - 0.05).abs() < 5 * (0.05 * 0.95 / 4000) ** 0.5), edges


def test_positions_drawn_in_several_batches_keep_the_same_distribution():
    torch.manual_seed(2)
    n, p = 200_000, 0.3
    positions = dropped_positions(n, p, math.log1p(-p), batch=1000)  # ~60 batches
    assert torch.all(positions[1:] > positions[:-1]) and 0 <= positions[0] and positions[-1] < n
    dropped = torch.zeros(n, dtype=torch.bool)
    dropped[positions] = True
    _drop_statistics(dropped, p, n)


def test_gradient_is_the_same_mask_and_scale():
    torch.manual_seed(1)
    x = torch.randn(64, 33, requires_grad=True)
    out = CpuDropout(0.3)(x)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(x.grad * x.detach(), out.detach())


def test_eval_mode_zero_rate_and_seeding():
    x = torch.randn(10, 10)
    dropout = CpuDropout(0.5)
    assert torch.equal(dropout.eval()(x), x)
    assert torch.equal(CpuDropout(0.0).train()(x), x)
    dropout.train()
    torch.manual_seed(7)
    first, second = dropout(x), dropout(x)
    torch.manual_seed(7)
    assert torch.equal(dropout(x), first) and not torch.equal(first, second)


def test_lora_dropouts_are_swapped_and_the_model_still_learns(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    assert use_cpu_dropout(model) == 2 * base.config.num_hidden_layers
    assert not any(type(m) is torch.nn.Dropout for name, m in model.named_modules() if "lora_dropout" in name)
    model.train()
    ids = torch.randint(3, 300, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    unchanged = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                               LoraConfig(r=4, lora_dropout=0.0, target_modules=["q_proj"]))
    assert use_cpu_dropout(unchanged) == 0
