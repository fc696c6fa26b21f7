"""Importers of published upstream weights (TripoSG, PartCrafter, DINOv2) into moca-jax params."""
