"""Latent normalisation for the DiT: each part's token mean and its tokens' deviations from
that mean, each scaled to unit variance per channel.

Why. Latent diffusion models diffuse latents scaled to about unit variance (Rombach et al.
2022, "High-Resolution Image Synthesis with Latent Diffusion Models", sec. 4.3.2: the
`scale_factor` of Stable Diffusion; Esser et al. 2024 (SD3) add a shift). One scale per
channel is not enough for vecset latents of separately encoded parts. Measured on the VAE
of assets/moca-small (2026-12-01, 391 parts of 40 procedural `test` objects, posterior
means):
  - the mean over a part's L tokens carries 99% of the variance (channel std 0.2 - 3.6);
  - the tokens' deviations from that mean carry the rest (channel std 0.05 - 0.3), and they
    hold the shape: on 75 held-out parts (experiments/results/dit_diagnostics.md, 32^3
    grid) decoding the token mean alone keeps part IoU 0.25, deviations halved 0.56.
A rectified flow on raw latents spends its loss on the part means, and at t ~ 0.5 the
deviations lie 10x under the unit noise (the bundle's round-2 DiT, trained so, generated
primitive-like blobs; experiments/results/dit_diagnostics.md compares it with round 3).

The transform ('part_mean_residual'), per part, z [..., L, C], m = mean over L of z [C]:
  u = (m - mu) / s_between + (z - m) / s_within
  z = mu + s_between * m' + s_within * (u - m'),   m' = mean over L of u
mu, s_between [C]: mean and std over parts of m; s_within [C]: std of z - m over parts and
tokens. The map is linear and exactly invertible (the mean over L of z - m is 0), so the
DiT trains and samples in u and the VAE decodes z. 'none' is the identity (PartCrafter and
imported TripoSG-space models diffuse raw latents).

The statistics are computed once from the training latents (`stats_from_records`, the
first `max_parts` parts in shard order, deterministic) and stored, rounded to 6
significant digits, in the DiT config (model.latent_norm), so checkpoints and bundles
carry them and a resumed run recomputes the same values.

Option posterior_noise (off by default, not yet measured on a trained model): the VAE's
posterior std per channel s_post (its own statement of the variation it does not decode)
is added in quadrature to both scales, s = sqrt(s_data^2 + s_post^2). On the bundled VAE
about half of the channels have s_post 0.35 - 3.0 against token deviations of 0.06 (the
decoder ignores them); plain normalisation gives them half of the DiT's loss, this option
shrinks them to variance ~0.001 - 0.01 and leaves the informative channels (s_post ~0.07)
nearly as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Optional

import jax.numpy as jnp
import ml_collections
import numpy as np

KINDS = ("none", "part_mean_residual")
# Smallest std kept (a channel constant in the data would otherwise divide by zero).
MIN_STD = 1e-6


def latent_norm_config(kind: str = "none") -> ml_collections.ConfigDict:
  """model.latent_norm: kind (see KINDS) and the statistics (empty until computed)."""
  if kind not in KINDS:
    raise ValueError(f"latent_norm kind {kind!r}: expected one of {KINDS}")
  return ml_collections.ConfigDict(
      dict(
          kind=kind,
          mean=(),
          between_std=(),
          within_std=(),
          parts=0,
          max_parts=8192,
          posterior_noise=False,
          posterior_std=(),
      )
  )


@dataclasses.dataclass(frozen=True)
class LatentStats:
  """Per-channel statistics [C] float32 of the 'part_mean_residual' transform."""

  mean: np.ndarray
  between_std: np.ndarray
  within_std: np.ndarray
  parts: int = 0


# ----------------------------------------------------------------------------------------
# The transform
# ----------------------------------------------------------------------------------------


def normalize(z, stats: Optional[LatentStats]):
  """VAE latents z [..., L, C] -> DiT latents u (same shape, float32); identity for None."""
  if stats is None:
    return z
  z = jnp.asarray(z, jnp.float32)
  m = jnp.mean(z, axis=-2, keepdims=True)
  return (m - stats.mean) / stats.between_std + (z - m) / stats.within_std


def denormalize(u, stats: Optional[LatentStats]):
  """DiT latents u [..., L, C] -> VAE latents z (the exact inverse of `normalize`)."""
  if stats is None:
    return u
  u = jnp.asarray(u, jnp.float32)
  m = jnp.mean(u, axis=-2, keepdims=True)
  return stats.mean + stats.between_std * m + stats.within_std * (u - m)


# ----------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------


def stats_from_latents(parts: Iterable[np.ndarray]) -> LatentStats:
  """Statistics of part latents, each [L, C] or a stack [P, L, C] (float64 accumulation).

  Raises ValueError when there are no parts or the channel counts differ.
  """
  means, sq_within, n_tokens, channels = [], None, 0, None
  for a in parts:
    a = np.asarray(a, np.float64)
    a = a[None] if a.ndim == 2 else a
    if a.ndim != 3:
      raise ValueError(f"part latents must be [L, C] or [P, L, C], got shape {a.shape}")
    if channels is not None and a.shape[-1] != channels:
      raise ValueError(f"part latents with {a.shape[-1]} channels after {channels}")
    channels = a.shape[-1]
    m = a.mean(axis=1)
    means.append(m)
    dev = np.square(a - m[:, None]).sum(axis=(0, 1))
    sq_within = dev if sq_within is None else sq_within + dev
    n_tokens += a.shape[0] * a.shape[1]
  if not means:
    raise ValueError("latent statistics need at least one part")
  m = np.concatenate(means)
  return LatentStats(
      mean=m.mean(axis=0).astype(np.float32),
      between_std=np.maximum(m.std(axis=0), MIN_STD).astype(np.float32),
      within_std=np.maximum(np.sqrt(sq_within / n_tokens), MIN_STD).astype(np.float32),
      parts=int(m.shape[0]),
  )


def stats_from_records(data_dir: str, max_parts: int = 8192) -> LatentStats:
  """Statistics of the first `max_parts` part latents of an `encode_latents` folder (or of
  several, comma-separated: `records.dataset_dirs`), read in shard order (the same values on
  every machine and every resume). ValueError when the folder holds no latents."""
  from data_pipeline import records  # pylint: disable=g-import-not-at-top

  def parts():
    left = max_parts
    for path in records.dataset_shard_paths(data_dir):
      for raw in records.read_shard(path):
        lat = records.decode_record(raw).get("latents")
        if lat is None:
          raise ValueError(f"{path}: records without 'latents' (not an encode_latents " "output)")
        yield lat[:left]
        left -= len(lat[:left])
        if left <= 0:
          return

  return stats_from_latents(parts())


def _rounded(x: np.ndarray) -> tuple:
  return tuple(float(f"{v:.6g}") for v in np.asarray(x, np.float64))


def stats_from_config(model_config: Any) -> Optional[LatentStats]:
  """The LatentStats of model.latent_norm, or None for kind 'none' or a config without it.

  Raises ValueError for an unknown kind or a 'part_mean_residual' config whose statistics
  are missing (`with_stats` fills them) or of unequal lengths.
  """
  ln = model_config.get("latent_norm") if hasattr(model_config, "get") else None
  if ln is None or ln.get("kind", "none") == "none":
    return None
  if ln.kind not in KINDS:
    raise ValueError(f"model.latent_norm.kind {ln.kind!r}: expected one of {KINDS}")
  arrays = [np.asarray(ln.get(k) or (), np.float32) for k in ("mean", "between_std", "within_std")]
  if not len(arrays[0]) or len({len(a) for a in arrays}) != 1:
    raise ValueError(
        "model.latent_norm: kind 'part_mean_residual' needs mean, between_std "
        "and within_std of one length (computed by latent_norm.with_stats "
        f"when training starts), got lengths {[len(a) for a in arrays]}"
    )
  mean, between, within = arrays
  if ln.get("posterior_noise", False):
    post = np.asarray(ln.get("posterior_std") or (), np.float32)
    if post.shape != mean.shape:
      raise ValueError(
          "model.latent_norm.posterior_noise needs posterior_std of "
          f"{len(mean)} channels, got {len(post)}"
      )
    between, within = np.hypot(between, post), np.hypot(within, post)
  return LatentStats(mean, between, within, parts=int(ln.get("parts", 0)))


def needs_stats(config: ml_collections.ConfigDict) -> bool:
  """True when model.latent_norm asks for statistics that the config does not hold yet."""
  ln = config.model.get("latent_norm")
  if ln is None or ln.kind == "none":
    return False
  missing_post = ln.get("posterior_noise", False) and not len(ln.get("posterior_std") or ())
  return not len(ln.get("mean") or ()) or bool(missing_post)


def with_stats(
    config: ml_collections.ConfigDict, synthetic_parts=None, posterior_std_fn=None
) -> ml_collections.ConfigDict:
  """The DiT training config with model.latent_norm's statistics filled in (unchanged when
  `needs_stats` is False).

  Records data (config.data.source 'records'): `stats_from_records(config.data.dir)`;
  synthetic data: the latents of `synthetic_parts` (an iterable of [L, C] or [P, L, C]).
  With posterior_noise, posterior_std_fn() gives the VAE's posterior std per channel.
  The values are rounded to 6 significant digits (stored as JSON in checkpoints).
  """
  if not needs_stats(config):
    return config
  ln = config.model.latent_norm
  out = ml_collections.ConfigDict(config.to_dict())
  if ln.get("posterior_noise", False) and not len(ln.get("posterior_std") or ()):
    if posterior_std_fn is None:
      raise ValueError("latent_norm.with_stats: posterior_noise needs posterior_std_fn")
    with out.unlocked():
      out.model.latent_norm.posterior_std = _rounded(posterior_std_fn())
  if len(ln.get("mean") or ()):
    return out
  if config.data.source == "records":
    stats = stats_from_records(config.data.dir, int(ln.get("max_parts", 8192)))
  else:
    if synthetic_parts is None:
      raise ValueError("latent_norm.with_stats: synthetic data needs synthetic_parts")
    stats = stats_from_latents(synthetic_parts)
  with out.unlocked():
    out.model.latent_norm.mean = _rounded(stats.mean)
    out.model.latent_norm.between_std = _rounded(stats.between_std)
    out.model.latent_norm.within_std = _rounded(stats.within_std)
    out.model.latent_norm.parts = stats.parts
  return out
