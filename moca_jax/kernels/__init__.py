"""Hand-written accelerator kernels (Pallas), each with a portable jnp reference elsewhere.

moc_flash: fused routed (Mixture-of-Components) attention, `moc.moc_attention(gather='fused')`.
"""
