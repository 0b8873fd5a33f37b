"""CpuDropout: nn.Dropout's behaviour (rate, scale, gradient, eval, seeding) with cheaper masks."""

import pytest
import torch

from alpaca_tune.cpu_dropout import CpuDropout, use_cpu_dropout


def test_drop_rate_and_scale_match_nn_dropout_in_every_lane():
    torch.manual_seed(0)
    dropout = CpuDropout(0.05)
    assert dropout.p == pytest.approx(0.05, abs=1 / 65536)
    out = dropout(torch.ones(1 << 20))
    kept = out != 0
    assert torch.all(out[kept] == 1 / (1 - dropout.p))  # survivors scaled exactly as nn.Dropout does
    sigma = (dropout.p * (1 - dropout.p) / out.numel()) ** 0.5
    assert (1 - kept.float().mean()).item() == pytest.approx(dropout.p, abs=5 * sigma)
    # each 64-bit draw serves 4 neighbouring elements: every one of those lanes drops at rate p
    lanes = (~kept).float().view(-1, 4).mean(0)
    assert torch.all((lanes - dropout.p).abs() < 5 * 2 * sigma), lanes
    # and no lane decides another's fate (adjacent drops as often as chance says)
    both = ((~kept[:-1]) & (~kept[1:])).float().mean().item()
    assert both == pytest.approx(dropout.p ** 2, rel=0.2)


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
