"""TripoSG VAE (`TripoSGVAEModel`, VAST-AI-Research/TripoSG fc5c409) -> `moca_jax.vae.VecSetVAE`.

Upstream layout (autoencoder_kl_triposg.py; DiTBlock, TripoSGAttnProcessor2_0):
  encoder.proj_in            Linear(51 + 3 normals, We), shared by queries and keys/values
  encoder.blocks.0           cross-attention block: norm2 (queries), attn2 with norm_cross
                             (LayerNorm on keys/values), norm3 + ff
  encoder.blocks.1..n        self-attention blocks: norm1, attn1, norm3 + ff
  encoder.norm_out, quant    LayerNorm, Linear(We, 2C) -> DiagonalGaussian (logvar clamp)
  post_quant                 Linear(C, Wd)
  decoder.blocks.0..m-1      self-attention blocks (no norm after the stack)
  decoder.blocks.m           cross-attention block over the queries' proj_query(embed(q))
  decoder.norm_out, proj_out LayerNorm, Linear(Wd, 1); the output is negated
All LayerNorms eps 1e-5, GELU exact, no q/k norm, no q/k/v bias.

The attention processor concatenates the projections and splits heads first: self-attention
views cat(q, k, v) as [heads, 3, head_dim], cross-attention views cat(k, v) as [heads, 2,
head_dim]. `_split_heads` undoes that interleave so our plain per-projection kernels compute
the same thing.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moca_jax import layers
from moca_jax.convert.common import (ConversionError, TensorMap, nest, read_component,
                                     read_fixture_io)
from moca_jax.vae import VecSetVAE, vae_config_from_triposg

CLASS_NAMES = ("TripoSGVAEModel",)


def _is_constant_view(a: np.ndarray) -> bool:
  """True for a zero-stride view (np.broadcast_to of a scalar), used for shape-only runs."""
  return a.size > 0 and all(s == 0 for s in a.strides)


def _split_heads(weights: list[np.ndarray], heads: int) -> list[np.ndarray]:
  """Undoes TripoSG's head-first q/k/v split.

  Args:
    weights: k torch Linear weights [D, Din] (q, k, v or k, v) whose outputs upstream
      concatenates and views as [heads, k, head_dim].
    heads: number of heads.
  Returns:
    k effective weights [D, Din]: rows [h * head_dim:(h + 1) * head_dim] of the j-th one are
    what upstream uses as head h of projection j.
  """
  d, din = weights[0].shape
  k = len(weights)
  if d % heads:
    raise ConversionError(f"attention width {d} is not divisible by {heads} heads")
  if all(_is_constant_view(w) for w in weights) and len({float(w.flat[0]) for w in weights}) == 1:
    return [weights[0]] * k  # a constant matrix is unchanged by any row permutation
  cat = np.concatenate(weights, axis=0).reshape(heads, k, d // heads, din)
  return [np.ascontiguousarray(cat[:, j].reshape(d, din)) for j in range(k)]


def _linear(tm: TensorMap, src: str, dst: str, out: dict, shape: tuple[int, int],
            bias: bool = True) -> None:
  out[f"{dst}/kernel"] = tm.take(f"{src}.weight", shape).T
  if bias:
    out[f"{dst}/bias"] = tm.take(f"{src}.bias", shape[:1])


def _norm(tm: TensorMap, src: str, dst: str, out: dict, width: int) -> None:
  out[f"{dst}/scale"] = tm.take(f"{src}.weight", (width,))
  out[f"{dst}/bias"] = tm.take(f"{src}.bias", (width,))


def _attention(tm: TensorMap, src: str, dst: str, out: dict, width: int, ctx_width: int,
               heads: int, cross: bool) -> None:
  if cross:
    out[f"{dst}/query/kernel"] = tm.take(f"{src}.to_q.weight", (width, width)).T
    k, v = _split_heads([tm.take(f"{src}.to_k.weight", (width, ctx_width)),
                         tm.take(f"{src}.to_v.weight", (width, ctx_width))], heads)
  else:
    q, k, v = _split_heads([tm.take(f"{src}.to_{n}.weight", (width, width))
                            for n in ("q", "k", "v")], heads)
    out[f"{dst}/query/kernel"] = q.T
  out[f"{dst}/key/kernel"] = k.T
  out[f"{dst}/value/kernel"] = v.T
  _linear(tm, f"{src}.to_out.0", f"{dst}/out", out, (width, width))


def _block(tm: TensorMap, src: str, dst: str, out: dict, width: int, heads: int,
           mlp_width: int, cross: bool) -> None:
  """One DiTBlock -> SelfAttentionBlock (norm1, self_attn, norm3, mlp) or CrossAttentionBlock
  (norm_context, norm1, cross_attn, norm2, mlp)."""
  if cross:
    _norm(tm, f"{src}.norm2", f"{dst}/norm1", out, width)
    _norm(tm, f"{src}.attn2.norm_cross", f"{dst}/norm_context", out, width)
    _attention(tm, f"{src}.attn2", f"{dst}/cross_attn", out, width, width, heads, True)
    _norm(tm, f"{src}.norm3", f"{dst}/norm2", out, width)
  else:
    _norm(tm, f"{src}.norm1", f"{dst}/norm1", out, width)
    _attention(tm, f"{src}.attn1", f"{dst}/self_attn", out, width, width, heads, False)
    _norm(tm, f"{src}.norm3", f"{dst}/norm3", out, width)
  _linear(tm, f"{src}.ff.net.0.proj", f"{dst}/mlp/fc1", out, (mlp_width, width))
  _linear(tm, f"{src}.ff.net.2", f"{dst}/mlp/fc2", out, (width, mlp_width))


def convert(tensors: dict[str, np.ndarray], config: ml_collections.ConfigDict,
            source: str = "TripoSG VAE") -> dict:
  """Upstream state dict -> VecSetVAE params tree ({'params': ...} not included).

  Args:
    tensors: TripoSGVAEModel state dict (upstream names, float32 numpy arrays).
    config: `vae_config_from_triposg(upstream config)`.
    source: name used in error messages (the folder).
  Raises:
    ConversionError: a missing tensor, an unmapped tensor, or a shape mismatch (all named).
  """
  c = config
  tm = TensorMap(tensors, source)
  out: dict[str, np.ndarray] = {}
  we, wd, heads = c.enc_width, c.dec_width, c.enc_heads
  embed = layers.fourier_dim(3, c.num_freqs)
  _linear(tm, "encoder.proj_in", "point_embed/proj", out, (we, embed + 3))
  _block(tm, "encoder.blocks.0", "enc_cross_0", out, we, heads, int(we * c.mlp_ratio), True)
  for i in range(c.enc_self_layers):
    _block(tm, f"encoder.blocks.{i + 1}", f"enc_self_{i}", out, we, heads,
           int(we * c.mlp_ratio), False)
  _norm(tm, "encoder.norm_out", "enc_norm", out, we)
  _linear(tm, "quant", "enc_moments", out, (2 * c.latent_channels, we))
  _linear(tm, "post_quant", "dec_in", out, (wd, c.latent_channels))
  for i in range(c.dec_layers):
    _block(tm, f"decoder.blocks.{i}", f"dec_self_{i}", out, wd, c.dec_heads,
           int(wd * c.mlp_ratio), False)
  _block(tm, f"decoder.blocks.{c.dec_layers}", "query_cross", out, wd, c.dec_heads,
         int(wd * c.mlp_ratio), True)
  _linear(tm, "decoder.proj_query", "query_embed/proj", out, (wd, embed))
  _norm(tm, "decoder.norm_out", "out_norm", out, wd)
  _linear(tm, "decoder.proj_out", "out_proj", out, (1, wd))
  tm.finish()
  return nest(out)


def load(folder: str, num_latents: int | None = None
         ) -> tuple[ml_collections.ConfigDict, dict]:
  """A TripoSG `vae/` folder -> (VecSetVAE config, {'params': jnp arrays}).

  Raises:
    ConversionError: unreadable folder, wrong class, or a tensor problem (named).
  """
  upstream, tensors = read_component(folder, CLASS_NAMES)
  try:
    config = vae_config_from_triposg(upstream, num_latents)
  except ValueError as e:
    raise ConversionError(f"{os.path.join(folder, 'config.json')}: {e}") from e
  params = convert(tensors, config, source=folder)
  return config, {"params": jax.tree_util.tree_map(jnp.asarray, params)}


def parity(fixture_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Runs the converted fixture model on the stored inputs of `triposg_vae/io.npz`.

  Returns:
    {array name: (ours, reference)} for every stored output array (debug arrays included).
  """
  config, variables = load(fixture_dir)
  config.attention_implementation = "xla"
  model = VecSetVAE(config)
  io = read_fixture_io(fixture_dir)
  surface = jnp.asarray(io["surface"])
  pts, nrm = surface[..., :3], surface[..., 3:]
  index = jnp.asarray(io["sample_indices"].astype(np.int32))
  queries = jnp.asarray(io["queries"])

  @jax.jit
  def encode(v):
    return model.apply(v, pts, nrm, query_index=index, method=VecSetVAE.encode,
                       capture_intermediates=True, mutable=["intermediates"])

  (mean, logvar), state = encode(variables)
  inter = state["intermediates"]
  got: dict[str, np.ndarray] = {}
  sampled = np.take_along_axis(io["surface"], io["sample_indices"][..., None], axis=1)
  got["sampled_points"] = sampled
  embed = lambda x: layers.fourier_embed(jnp.asarray(x), config.num_freqs, config.include_pi)
  got["enc_x_q"] = jnp.concatenate([embed(sampled[..., :3]), sampled[..., 3:]], axis=-1)
  got["enc_x_kv"] = jnp.concatenate([embed(io["surface"][..., :3]), io["surface"][..., 3:]],
                                    axis=-1)
  got["enc_block0_out"] = inter["enc_cross_0"]["__call__"][0]
  for i in range(config.enc_self_layers):
    got[f"enc_block{i + 1}_out"] = inter[f"enc_self_{i}"]["__call__"][0]
  got["enc_out"] = inter["enc_norm"]["__call__"][0]
  got["posterior_params"] = inter["moments"][0]
  got["posterior_mean"] = mean
  got["posterior_logvar"] = logvar
  got["posterior_std"] = jnp.exp(0.5 * logvar)

  def features_then_query(mdl, z):
    return mdl.query_sdf(mdl.decode_features(z), queries)

  decode_debug = jax.jit(lambda v, z: model.apply(
      v, z, method=features_then_query, capture_intermediates=True, mutable=["intermediates"]))
  _, dstate = decode_debug(variables, jnp.asarray(io["z_rand"]))
  dinter = dstate["intermediates"]
  for i in range(config.dec_layers):
    got[f"dec_z_rand_block{i}_out"] = dinter[f"dec_self_{i}"]["__call__"][0]
  got["dec_z_rand_query_embed"] = embed(io["queries"])
  got["dec_z_rand_cross_out"] = dinter["query_cross"]["__call__"][0]
  decode = jax.jit(lambda v, z: model.apply(v, z, queries, chunk_size=queries.shape[1],
                                            method=VecSetVAE.decode))
  got["logits_from_z_rand"] = decode(variables, jnp.asarray(io["z_rand"]))[..., None]
  got["logits_from_posterior_mean"] = decode(variables, jnp.asarray(io["posterior_mean"]))[
      ..., None]
  got["embedder_queries"] = embed(io["queries"])

  inputs = {"surface", "sample_indices", "queries", "z_rand"}
  missing = sorted(set(io) - inputs - set(got))
  if missing:
    raise ConversionError(f"{fixture_dir}: no comparison for stored arrays {missing}")
  return {name: (np.asarray(got[name], np.float32), io[name]) for name in got if name in io}
