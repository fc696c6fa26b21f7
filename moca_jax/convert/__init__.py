"""Importers of published upstream weights (TripoSG, PartCrafter, DINOv2) into moca-jax params.

common        component reader, tensor-consumption map, full-size manifests
triposg_dit   TripoSG / PartCrafter DiT -> dit.CompositionalDiT (+ fixture parity)
triposg_vae   TripoSG VAE -> vae.VecSetVAE
dinov2        DINOv2 -> image_encoder.ImageEncoder
scheduler     RectifiedFlowScheduler config -> sampler settings (+ fixture parity)
pipeline_e2e  PartCrafter sampling loop parity
snapshot      a whole published snapshot folder -> this project's checkpoint
"""
