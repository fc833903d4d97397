import pytest
import torch
from torch import nn

from doctune.lora_dropout import SharedDropout, keep_mask, share_lora_dropout
from doctune.model_settings import TrainSettings
from doctune.training.model import initial_plan, load_model


def lora_dropouts(model) -> dict[str, nn.Module]:
    return {name: m.lora_dropout["default"] for name, m in model.named_modules()
            if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)}


def settings(tiny_model, **kw) -> TrainSettings:
    return TrainSettings(**{**dict(base_model=tiny_model, device="cpu", lora_r=8, lora_alpha=16,
                                      lora_dropout=0.2, save_every_steps=0), **kw})


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5])
def test_keep_mask_keeps_one_minus_p(p):
    torch.manual_seed(0)
    mask = keep_mask(torch.Size([1000, 1001]), p, torch.device("cpu"))  # odd size: the last word is cut
    assert mask.shape == (1000, 1001) and mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - (1 - p)) < 0.002
    # neighbouring elements (halves of one random word) are independent
    pairs = mask.flatten()[: 1000 * 1000].view(-1, 2).float()
    assert abs((pairs[:, 0] * pairs[:, 1]).mean().item() - (1 - p) ** 2) < 0.003


def test_dropout_keeps_the_expectation_and_is_off_in_eval():
    d = SharedDropout(0.3)
    x = torch.randn(200, 300)
    out = d(x)
    zeros = (out == 0).float().mean().item()
    assert abs(zeros - 0.3) < 0.01
    kept = out != 0
    assert torch.allclose(out[kept], x[kept] / (1 - round(0.3 * 65536) / 65536))
    assert d.eval()(x) is x


def test_consumers_share_one_mask_then_the_next_input_gets_a_fresh_one():
    d = SharedDropout(0.5, consumers=3)
    x = torch.randn(64, 64, requires_grad=True)
    a, b, c = d(x), d(x), d(x)
    assert a is b is c and d.draws == 1
    again = d(x)  # all three served: the same tensor in the next forward is a new draw
    assert d.draws == 2 and not torch.equal(again, a)
    y = x.detach().clone()
    first = d(y)
    y.add_(1)  # changed in place: the kept output no longer belongs to it
    assert d(y) is not first and d.draws == 4
    other = torch.randn(64, 64)
    d(other)
    assert d(torch.randn(64, 64)) is not None and d.draws == 6  # another tensor never hits


def test_siblings_reading_one_input_share_a_dropout(tiny_model):
    s = settings(tiny_model)
    model = load_model(tiny_model, initial_plan(s), s)
    drops = lora_dropouts(model)
    assert len(drops) == 2 * 7 and all(isinstance(d, SharedDropout) for d in drops.values())
    for layer in range(2):
        attn = f"layers.{layer}.self_attn"
        mlp = f"layers.{layer}.mlp"
        q, k, v, o = (next(d for n, d in drops.items() if n.endswith(f"{attn}.{p}_proj")) for p in "qkvo")
        gate, up, down = (next(d for n, d in drops.items() if n.endswith(f"{mlp}.{p}_proj"))
                          for p in ("gate", "up", "down"))
        assert q is k is v and q.consumers == 3 and gate is up and gate.consumers == 2
        assert len({id(q), id(o), id(gate), id(down)}) == 4 and o.consumers == down.consumers == 1
        assert q.p == 0.2

    off = settings(tiny_model, fast_lora_dropout=False)
    plain = load_model(tiny_model, initial_plan(off), off)
    assert all(type(d) is nn.Dropout for d in lora_dropouts(plain).values())
    assert share_lora_dropout(nn.Linear(2, 2), {}) == {"replaced": 0, "inputs": 0}


def _lora_grads(tiny_model, checkpointing: bool) -> dict[str, torch.Tensor]:
    s = settings(tiny_model, gradient_checkpointing=checkpointing)
    torch.manual_seed(0)
    model = load_model(tiny_model, initial_plan(s), s).train()
    with torch.no_grad():  # B starts at zero: give it values, so every LoRA weight gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    ids = torch.randint(0, 1000, (2, 24))
    torch.manual_seed(1)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_checkpointing_recomputes_the_same_masks(tiny_model):
    """Gradient checkpointing reruns each layer's forward in backward; with other masks there the
    gradients would be silently wrong. Same seed: the same gradients with and without it."""
    with_ckpt, without = _lora_grads(tiny_model, True), _lora_grads(tiny_model, False)
    assert with_ckpt.keys() == without.keys() and len(with_ckpt) == 2 * 7 * 2
    for name in with_ckpt:
        assert with_ckpt[name].abs().sum() > 0, name
        torch.testing.assert_close(with_ckpt[name], without[name], rtol=1e-4, atol=1e-6, msg=name)
