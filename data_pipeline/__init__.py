"""moca-jax data pipeline (numpy / trimesh / embree / ArrayRecord / grain; no jax at import).

  primitives      analytic primitives with exact SDFs (negative inside), Part = union
  procedural      13 object categories (2..32 parts), scenes (4..32 instances), named splits
  sampling        per-part surface points + normals (sharp-edge share), SDF points; mesh SDF
  render          CPU ray casting (embree): shaded per-part colours on white, id masks, PNG
  ingest          user GLB / glTF / OBJ / PLY / per-part folders / per-face labels: clean,
                  normalise, filter, make parts watertight (MeshFix)
  records         record schema (numpy savez bytes), ArrayRecord shards, manifest
  make / build    shard building library / CLI (`python -m data_pipeline.build`)
  beam_build      the same build as an Apache Beam pipeline (`build --runner=...`)
  loader          grain MapDataset views for the VAE (samples) and the DiT (latents)
  encode_latents  CLI: samples shards -> latent shards with the frozen VAE
  benchmark       build / load throughput -> experiments/results/data_pipeline.{md,json}
"""
