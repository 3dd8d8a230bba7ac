"""The adapter slot pool on the model's device and the hooks that add each token's adapter
delta to the base projections, for many adapters in one batch.

Per layer and projection group (qkv, o, gate_up, down) the pool holds A of every slot stacked
along the rank ([slots, g * R, in], g projections of the group) and one B per projection
([slots, out, R]); R is max_lora_rank, smaller ranks are zero-padded and projections an
adapter leaves alone stay zero. A fused q/k/v (or gate/up) output takes one shrink for the
group and one expand per column slice; the unfused projections take their own.

The step's grouping of tokens by slot (`order`, `seg_starts`, see kvflock.kernels.lora) lives
in static buffers that every step overwrites, so captured CUDA graphs read the current step's
grouping; nothing here reads a value back from the device.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kvflock.kernels import lora as lora_kernels
from kvflock.worker.lora.adapter import PROJECTIONS, LoRAWeights, projection_shapes
from kvflock.worker.model.llama import LlamaForCausalLM

_GROUPS: dict[str, tuple[str, ...]] = {}
for _name, (_group, _) in sorted(PROJECTIONS.items(), key=lambda item: item[1]):
    _GROUPS[_group] = (*_GROUPS.get(_group, ()), _name)


@dataclass
class _Group:
    a: torch.Tensor  # [slots, len(bs) * R, in]
    bs: list[torch.Tensor]  # [slots, out_i, R] each


class LoRALayers:
    """Slots for `max_loras` adapters of rank up to `max_rank`, hooked into `model`. `triton`:
    run the kernels (CUDA), else their torch references."""

    def __init__(self, model: LlamaForCausalLM, max_loras: int, max_rank: int, max_tokens: int, triton: bool) -> None:
        cfg = model.config
        weight = model.model.embed_tokens.weight
        device, dtype = weight.device, weight.dtype
        self.max_rank = max_rank
        self.order = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.seg_starts = torch.zeros(max_loras + 1, dtype=torch.int64, device=device)
        self._shrink = lora_kernels.lora_shrink if triton else lora_kernels.lora_shrink_ref
        self._expand = lora_kernels.lora_expand if triton else lora_kernels.lora_expand_ref
        shapes = projection_shapes(cfg)
        detach(model)  # engines may share a model load: only the newest engine's slots stay hooked
        model.lora_layers = self
        self._undo: list[Callable[[], None]] = []
        self.groups: list[dict[str, _Group]] = []
        for layer in model.model.layers:
            groups = {}
            for name, members in _GROUPS.items():
                fan_in = shapes[members[0]][0]
                a = torch.zeros(max_loras, len(members) * max_rank, fan_in, dtype=dtype, device=device)
                bs = [torch.zeros(max_loras, shapes[m][1], max_rank, dtype=dtype, device=device) for m in members]
                groups[name] = _Group(a, bs)
            self.groups.append(groups)
            self._hook(layer.self_attn, "_qkv", groups["qkv"], _GROUPS["qkv"])
            self._hook(layer.self_attn, None, groups["o"], _GROUPS["o"])
            self._hook(layer.mlp, "_gate_up", groups["gate_up"], _GROUPS["gate_up"])
            self._hook(layer.mlp, None, groups["down"], _GROUPS["down"])

    def set_batch(self, order: torch.Tensor, seg_starts: torch.Tensor) -> None:
        """The step's tokens grouped by slot (copied into the static buffers)."""
        self.order[: order.shape[0]].copy_(order, non_blocking=True)
        self.seg_starts.copy_(seg_starts, non_blocking=True)

    def load(self, slot: int, adapter: LoRAWeights) -> None:
        """Put `adapter` into `slot` (queued copies; the slot's previous adapter is gone)."""
        r = adapter.rank
        for layer, groups in enumerate(self.groups):
            for name, group in groups.items():
                group.a[slot].zero_()
                for i, member in enumerate(_GROUPS[name]):
                    group.bs[i][slot].zero_()
                    pair = adapter.weights.get((layer, member))
                    if pair is None:
                        continue
                    start = i * self.max_rank
                    group.a[slot, start:start + r].copy_(pair[0], non_blocking=True)
                    group.bs[i][slot, :, :r].copy_(pair[1], non_blocking=True)

    def _apply(self, group: _Group, x: torch.Tensor, outs: list[torch.Tensor], first: int = 0) -> None:
        """Add the deltas of projections first, first + 1, ... of `group` to `outs`."""
        r = self.max_rank
        a = group.a if len(outs) == len(group.bs) else group.a[:, first * r:(first + len(outs)) * r]
        y = self._shrink(x, a, self.order, self.seg_starts)
        for i, out in enumerate(outs):
            self._expand(y[:, i * r:(i + 1) * r], group.bs[first + i], self.order, self.seg_starts, out)

    def _hook(self, parent: nn.Module, fused_attr: str | None, group: _Group, members: tuple[str, ...]) -> None:
        """Deltas after each projection module, and after the fused matmul where the model has one."""
        for i, member in enumerate(members):
            def after(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor, i: int = i) -> torch.Tensor:
                self._apply(group, args[0], [out], first=i)
                return out
            self._undo.append(getattr(parent, member).register_forward_hook(after).remove)
        fused = getattr(parent, fused_attr) if fused_attr else None
        if fused is not None:
            sizes = [b.shape[1] for b in group.bs]
            setattr(parent, fused_attr, self._with_deltas(fused, group, sizes))
            self._undo.append(lambda: setattr(parent, fused_attr, fused))

    def _with_deltas(self, fused: Callable[[torch.Tensor], torch.Tensor], group: _Group,
                     sizes: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(x: torch.Tensor) -> torch.Tensor:
            out = fused(x)
            self._apply(group, x, list(out.split(sizes, dim=-1)))
            return out
        return run



def detach(model: LlamaForCausalLM) -> None:
    """Take the adapter hooks off `model`, if any engine put them there."""
    layers = getattr(model, "lora_layers", None)
    if layers is not None:
        for undo in reversed(layers._undo):
            undo()
        model.lora_layers = None
