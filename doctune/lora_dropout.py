"""LoRA input dropout that costs little on a CPU.

peft gives every LoRA module its own `nn.Dropout`. In a decoder layer q/k/v read the same tensor,
and so do gate/up, so a layer draws 7 masks where 4 inputs exist; with gradient checkpointing the
recomputed forward draws them all again. On a CPU those Bernoulli draws were 23% of a training
step (bench/README.md). `share_lora_dropout` replaces them with `SharedDropout`:

- one mask per input tensor, shared by the modules that read it. That is what peft itself does
  for models whose q/k/v is one fused projection (Phi-3: one `qkv_proj`, one dropout);
- on a CPU the mask is cut from 64-bit random words, 16 bits per element (p is rounded to
  1/65536), and applied with `torch.where`: about 4x cheaper than `nn.Dropout`'s `bernoulli_` +
  multiply. On CUDA torch's fused dropout is already cheap and is used as it is.

The draws come from torch's generator in a fixed order, so checkpointing's recomputation (which
restores the RNG state) draws the same masks as the first forward.
"""

from __future__ import annotations

import weakref
from collections import defaultdict

import torch
from torch import nn

_LEVELS = 1 << 16


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A bool mask, each element True with probability 1 - round(p * 65536) / 65536."""
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), 2**63 - 1)
    # int16 halves of uniform 64-bit words are uniform on [-32768, 32767].
    return words.view(torch.int16)[:n].view(shape) >= round(p * _LEVELS) - _LEVELS // 2


class SharedDropout(nn.Module):
    """Dropout whose mask is drawn once per input tensor for `consumers` modules that read it.

    The output for the latest input is kept until every consumer has asked for it; an input that
    is not the kept one (another tensor, or the same tensor changed in place) gets a fresh mask, so
    sharing can only save draws, never hand a module the wrong tensor."""

    def __init__(self, p: float, consumers: int = 1):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability {p} must be in [0, 1)")
        self.p, self.consumers = p, consumers
        self._last: tuple[weakref.ref, int, torch.Tensor] | None = None
        self._served = 0
        self.draws = 0  # masks drawn, for tests and benchmarks

    def extra_repr(self) -> str:
        return f"p={self.p}, consumers={self.consumers}"

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        self.draws += 1
        if x.device.type != "cpu":
            return nn.functional.dropout(x, self.p, training=True)
        kept = round(self.p * _LEVELS) / _LEVELS
        return torch.where(keep_mask(x.shape, self.p, x.device), x * (1 / (1 - kept)), 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        last = self._last
        if last is not None and last[0]() is x and last[1] == x._version:
            out = last[2]
        else:
            out = self._drop(x)
            self._served = 0
        self._served += 1
        # Held until the last consumer has it: a full layer's worth of activations must not linger.
        self._last = None if self._served >= self.consumers else (weakref.ref(x), x._version, out)
        return out


def share_lora_dropout(model: nn.Module, sample: dict[str, torch.Tensor]) -> dict[str, int]:
    """Swap every LoRA module's `nn.Dropout` for a `SharedDropout`, one per group of modules that
    read the same tensor in a forward pass of `sample` (a few tokens suffice).

    Returns counts for the log: LoRA dropouts replaced and distinct inputs (masks per forward)."""
    slots = []  # (ModuleDict, adapter name, p)
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict):
            slots += [(dropouts, name, d.p) for name, d in dropouts.items() if isinstance(d, nn.Dropout)]
    if not slots:
        return {"replaced": 0, "inputs": 0}

    seen: dict[int, list[int]] = defaultdict(list)
    alive = []  # keeps the probe's inputs alive so their ids stay unique

    class _Record(nn.Module):
        def __init__(self, slot: int):
            super().__init__()
            self.slot = slot

        def forward(self, x):
            alive.append(x)
            seen[id(x)].append(self.slot)
            return x

    for i, (dropouts, name, _) in enumerate(slots):
        dropouts[name] = _Record(i)
    # The probe runs in training mode: in eval mode without grad, bitsandbytes' 4-bit layers repack
    # their weights for CPU inference, a change the training steps after it would inherit.
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        with torch.no_grad():
            model(**sample, use_cache=False)
    finally:
        for m, training in modes:
            m.training = training
        groups = list(seen.values())
        grouped = {i for g in groups for i in g}
        groups += [[i] for i in range(len(slots)) if i not in grouped]  # not reached by the sample: alone
        for group in groups:
            p = slots[group[0]][2]
            if any(slots[i][2] != p for i in group):  # adapters with different p never share
                shared = {i: SharedDropout(slots[i][2]) for i in group}
            else:
                one = SharedDropout(p, consumers=len(group))
                shared = dict.fromkeys(group, one)
            for i, d in shared.items():
                dropouts, name, _ = slots[i]
                dropouts[name] = d
        alive.clear()
    return {"replaced": len(slots), "inputs": len(groups)}
