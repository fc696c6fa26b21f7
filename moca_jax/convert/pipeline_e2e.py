"""PartCrafter pipeline end to end (latents): imported DiT + rectified-flow schedule + CFG loop.

Reproduces `PartCrafterPipeline.__call__` (wgsxm/PartCrafter 269bd41) from the image tokens on:
N parts of one object are this project's component axis ([1, N, L, C]); every step runs the
doubled CFG batch [uncond (zero tokens); cond] through the DiT (whose part ids number the
batch rows, so the conditional half gets ids N..2N-1 as upstream), guides with the scale and
takes the Euler step of `moca_jax.flow.sample_ode` on `flow.time_grid` (the scheduler of the
fixture, one jitted lax.scan).
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from moca_jax import dit as dit_lib
from moca_jax import flow
from moca_jax import image_encoder
from moca_jax import io as io_lib
from moca_jax import preprocess
from moca_jax.convert import dinov2, triposg_dit
from moca_jax.convert.scheduler import settings_from_config


def sample_latents(model: dit_lib.CompositionalDiT, variables: dict, noise: np.ndarray,
                   cond: np.ndarray, *, steps: int, cfg_scale: float, time_shift: float
                   ) -> tuple[np.ndarray, np.ndarray]:
  """The pipeline's denoising loop in this project's sampler.

  Args:
    noise: [B, N, L, C] initial latents (sigma = 1).
    cond: [B, N, Tc, Dc] or [B, Tc, Dc] image tokens.
  Returns:
    (final latents [B, N, L, C], state after every step [steps, B, N, L, C]).
  """
  def velocity(x, t, c):
    return model.apply(variables, x, t, c, None, train=False)

  run = jax.jit(lambda x, c: flow.sample_ode(velocity, x, c, steps=steps, cfg_scale=cfg_scale,
                                             time_shift=time_shift, return_trajectory=True))
  final, trajectory = run(jnp.asarray(noise), jnp.asarray(cond))
  return np.asarray(final), np.asarray(trajectory)


def parity(fixture_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """This project's PartCrafter sampling vs tests/golden/partcrafter_pipeline_e2e.

  Reads the DiT from the sibling `partcrafter_dit/` folder, the image encoder from `dinov2/`,
  the prepared image and processor settings from `image_preproc/`, and the call (steps,
  guidance scale, parts) and scheduler settings from the fixture's config.json. The loop
  starts from the stored `image_embeds_cond` and `initial_noise`.

  Returns:
    {array name: (ours, reference)} for every stored array but `initial_noise`:
    `pixel_values_row0` (our processor on image_preproc/prepared_rgb.png), `image_embeds_cond`
    (our DINOv2 on those pixels, one row per part), `timesteps`, `encoder_hidden_states_cfg`,
    `step_transformer_timestep`, and from the full loop `step_transformer_input`,
    `step_latents_after`, `final_latents`; the per-step model arrays `step_transformer_output`
    and `step_guided` come from our DiT on the stored step inputs (so that a model error and
    loop drift are told apart).
  """
  with open(os.path.join(fixture_dir, "config.json"), encoding="utf-8") as f:
    call = json.load(f)
  io = np.load(os.path.join(fixture_dir, "io.npz"))
  steps = int(call["call"]["num_inference_steps"])
  scale = float(call["call"]["guidance_scale"])
  n = int(call["call"]["attention_kwargs"]["num_parts"])
  shift = settings_from_config(call["scheduler"], "partcrafter_pipeline_e2e/config.json")[
      "time_shift"]
  dit_dir = os.path.join(os.path.dirname(os.path.abspath(fixture_dir)), "partcrafter_dit")
  config, variables = triposg_dit.load(dit_dir, expected_classes=triposg_dit.PARTCRAFTER_CLASSES)
  model = dit_lib.CompositionalDiT(config)
  cond = io["image_embeds_cond"][None]          # [1, N, Tc, Dc]: each part's own copy
  noise = io["initial_noise"][None]             # [1, N, L, C]
  final, trajectory = sample_latents(model, variables, noise, cond, steps=steps,
                                     cfg_scale=scale, time_shift=shift)

  out = {}
  golden = os.path.dirname(os.path.abspath(fixture_dir))
  processor = preprocess.ProcessorConfig.from_file(
      os.path.join(golden, "image_preproc", "preprocessor_config.json"))
  image = io_lib.load_image(os.path.join(golden, "image_preproc", "prepared_rgb.png"))
  pixels = preprocess.bit_image_processor(image, processor)[None]  # [1, 224, 224, 3]
  out["pixel_values_row0"] = (pixels.transpose(0, 3, 1, 2), io["pixel_values_row0"])
  enc_config, enc_params = dinov2.load(os.path.join(golden, "dinov2"),
                                       image_size=pixels.shape[1])
  tokens = image_encoder.ImageEncoder(enc_config).apply(enc_params, jnp.asarray(pixels))
  out["image_embeds_cond"] = (np.repeat(np.asarray(tokens), n, axis=0), io["image_embeds_cond"])
  sigmas = np.asarray(flow.time_grid(steps, shift))
  timesteps = flow.timesteps_from_sigmas(sigmas[:-1])
  out["timesteps"] = (timesteps, io["timesteps"])
  _, _, cond_cfg = flow.cfg_batch(jnp.asarray(noise), jnp.zeros((1,)), jnp.asarray(cond))
  out["encoder_hidden_states_cfg"] = (np.asarray(cond_cfg).reshape(2 * n, *cond.shape[2:]),
                                      io["encoder_hidden_states_cfg"])
  out["step_transformer_timestep"] = (np.repeat(timesteps[:, None], 2 * n, axis=1),
                                      io["step_transformer_timestep"])
  inputs = np.concatenate([noise[None], trajectory[:-1]], axis=0)  # [steps, 1, N, L, C]
  out["step_transformer_input"] = (np.concatenate([inputs, inputs], axis=1).reshape(
      steps, 2 * n, *noise.shape[2:]), io["step_transformer_input"])
  outputs, guided = [], []
  run = triposg_dit.UpstreamRunner(model, variables)
  cond_cfg = io["encoder_hidden_states_cfg"].reshape(2, n, *cond.shape[2:])
  for i in range(steps):
    x = io["step_transformer_input"][i].reshape(2, n, *noise.shape[2:])
    v, _ = run(x, io["step_transformer_timestep"][i][::n], cond_cfg)
    outputs.append(v.reshape(2 * n, *v.shape[2:]))
    guided.append(np.asarray(flow.guided(jnp.asarray(v[1]), jnp.asarray(v[0]), scale)))
  out["step_transformer_output"] = (np.stack(outputs), io["step_transformer_output"])
  out["step_guided"] = (np.stack(guided), io["step_guided"])
  out["step_latents_after"] = (trajectory[:, 0], io["step_latents_after"])
  out["final_latents"] = (final[0], io["final_latents"])
  return out
