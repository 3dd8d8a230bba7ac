"""Kernels of the engine's hot path. Each kernel sits beside a plain-torch reference with the
same signature (the `*_ref` functions); the references are also the CPU path of the engine.

KV layout (shared/DESIGN.md): one tensor `[num_blocks, num_layers, 2, block_size, num_kv_heads,
head_dim]`; a layer works on the strided view `kv_cache[:, layer]`.
"""
