"""GPTQ (Frantar et al., 2022): quantize a linear layer's weights one input feature at a time,
spreading each feature's rounding error over the features not yet quantized so that the
layer's output on real inputs moves as little as possible. What it needs of the inputs is
their second moment H = E[x x^T] (the Hessian of the layer's squared output error), which
`calibrate` gathers by running the model on calibration tokens.

`calibrate` works layer by layer: decoder layer l is measured on the outputs of layers 0..l-1
already quantized, so each layer also corrects what the earlier ones' rounding changed (the
sequential scheme of the paper). It quantizes the model in place (the projections then hold
the dequantized weights) and returns each projection's codes for a checkpoint.
"""

from collections.abc import Callable

import torch
from torch import nn

from kvflock.kernels.quant_matmul import group_of
from kvflock.worker.attention import AttentionMetadata
from kvflock.worker.model.quant import QUANTIZED_PROJECTIONS, QuantSpec, group_parameters
from kvflock.worker.model.quant_formats import Codes
from kvflock.worker.runner import allocate_kv_cache

DAMP = 0.01  # added to H's diagonal, as a fraction of its mean: keeps H invertible when inputs are collinear
BLOCK = 128  # features quantized between two updates of the rest of the matrix (a speed choice only)
# Which projection's input each Hessian is measured at; the others share it.
SHARED_INPUTS = {"self_attn.q_proj": ("self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj": (),
                 "mlp.gate_proj": ("mlp.up_proj",), "mlp.down_proj": ()}


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec) -> Codes:
    """Codes of `weight` [n, k] (out, in) given its inputs' second moment `hessian` [k, k]."""
    n, k = weight.shape
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = h.diagonal() == 0  # inputs that were always zero: their weights do not matter
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(DAMP * h.diagonal().mean())
    # The upper Cholesky factor of H^-1: row i holds how feature i's error moves the later ones.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    group = group_of(spec.group_size, k)
    block = min(BLOCK, group)  # so that every group starts a block, with its features up to date
    maxq = 2**spec.bits - 1
    codes = torch.empty(k, n, dtype=torch.int32, device=w.device)
    scales = torch.empty(k // group, n, dtype=torch.float16, device=w.device)
    zeros = torch.empty(k // group, n, dtype=torch.int32, device=w.device)
    for start in range(0, k, block):
        stop = start + block
        if start % group == 0:
            g = start // group
            scales[g], zeros[g] = (t[0] for t in group_parameters(w[:, start : start + group].t().unsqueeze(0), spec))
        scale, zero = scales[start // group].float(), zeros[start // group]
        part, errors = w[:, start:stop].clone(), torch.empty(n, block, device=w.device)
        for i in range(block):
            q = torch.clamp(torch.round(part[:, i] / scale) + zero, 0, maxq)
            codes[start + i] = q.to(torch.int32)
            errors[:, i] = (part[:, i] - (q - zero) * scale) / u[start + i, start + i]
            part[:, i:] -= errors[:, i : i + 1] * u[start + i, start + i : stop].unsqueeze(0)
        w[:, stop:] -= errors @ u[start:stop, stop:]
    return Codes(codes, zeros, scales, spec.bits, spec.group_size)


class _Stop(Exception):
    """Raised once the layer being measured has seen its inputs: the rest of the model need not run."""


def calibrate(
    model: nn.Module, calibration: list[list[int]], spec: QuantSpec,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Codes]:
    """Quantize the decoder's projections with GPTQ, layer by layer, measured on `calibration`
    (token id sequences). Returns `model.layers.<i>.<projection>` -> codes (on the CPU)."""
    if not calibration:
        raise ValueError("calibration: no token sequences; GPTQ needs inputs to measure")
    out: dict[str, Codes] = {}
    layers = model.model.layers
    for index, layer in enumerate(layers):
        hessians: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def measure(name: str, last: bool):
            def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                hessians[name] = hessians.get(name, 0) + x.t() @ x
                counts[name] = counts.get(name, 0) + x.shape[0]
                if last:
                    raise _Stop
            return hook

        handles = [_module(layer, name).register_forward_pre_hook(measure(name, name == "mlp.down_proj"))
                   for name in SHARED_INPUTS]
        try:
            for ids in calibration:
                try:
                    _prefill(model, ids)
                except _Stop:
                    pass
        finally:
            for handle in handles:
                handle.remove()
        for name, shared in SHARED_INPUTS.items():
            hessian = hessians[name] / counts[name]
            for path in (name, *shared):
                module = _module(layer, path)
                codes = gptq_quantize(module.weight, hessian, spec)
                with torch.no_grad():
                    module.weight.copy_(codes.dequantize().t())
                out[f"model.layers.{index}.{path}"] = Codes(codes.q.cpu(), codes.zeros.cpu(), codes.scales.cpu(),
                                                            spec.bits, spec.group_size)
        progress(f"layer {index + 1}/{len(layers)}: GPTQ on {sum(counts.values()) // len(counts)} tokens")
    assert len(out) == len(layers) * len(QUANTIZED_PROJECTIONS)
    return out


def _module(layer: nn.Module, path: str) -> nn.Module:
    parent, name = path.split(".")
    return getattr(getattr(layer, parent), name)


@torch.inference_mode()
def _prefill(model: nn.Module, ids: list[int]) -> None:
    """Run one sequence through the model from an empty KV cache of its own."""
    weight = model.lm_head.weight
    n, block = len(ids), 16
    blocks = -(-n // block)
    kv = allocate_kv_cache(model.config, blocks + 1, block, weight.dtype, weight.device)
    table = torch.arange(1, blocks + 1, dtype=torch.int32, device=weight.device).view(1, -1)  # block 0: null
    positions = torch.arange(n, device=weight.device)
    slots = table[0].long().repeat_interleave(block)[:n] * block + positions % block
    meta = AttentionMetadata(slots, table, torch.tensor([n], dtype=torch.int32, device=weight.device),
                             torch.tensor([0, n], dtype=torch.int32, device=weight.device), False)
    model(torch.tensor(ids, device=weight.device), positions, kv, meta)
