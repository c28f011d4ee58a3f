"""Triton kernels, one file per kernel family, each beside its plain-torch reference (`ref_*`).

- `paged_attention`: causal attention over the paged KV cache (decode with split-K, ragged prefill).
"""
