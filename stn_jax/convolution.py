"""A drop-in for ``lax.conv_general_dilated`` with faster CPU convolutions for the paper's networks.

XLA 0.10's CPU backend runs every convolution of these models in YNNPACK on
one thread, and computes the weight gradient of a convolution whose input
has one channel (the first layer of every MNIST network) 2-7x slower than a
matrix product over explicit patches. :func:`conv_general_dilated` takes, on
CPU (chosen at lowering time with ``lax.platform_dependent``, so GPU and TPU
run plain ``lax.conv_general_dilated``), for stride-1, undilated, ungrouped
``NHWC``/``HWIO`` convolutions with padding 'VALID', 'SAME' or explicit pairs
(each at most the kernel size less one):

1. float32: the compiled kernels of :mod:`stn_jax._native`
   (``native/convolution.cc``: multi-threaded direct convolution and kernel
   gradient; input gradients of inputs with few channels as products over
   patches), unless they are not built or ``STN_JAX_NATIVE_CONV=0``;
2. otherwise, inputs with at most :data:`MAX_PATCH_CHANNELS` channels: XLA's
   convolution forward and both gradients as products over patches (a
   custom JVP);
3. everything else: ``lax.conv_general_dilated`` unchanged.

Values are those of ``lax.conv_general_dilated`` (path 1: to float32 rounding,
the sums run in another order; path 2: exactly); gradients agree to float
rounding (tested), to every order.

Use it as ``nnx.Conv(..., conv_general_dilated=conv_general_dilated)``. The
one switch: :func:`stn_jax.modules.conv_layer`, which makes every convolution
of :mod:`stn_jax.modules` and :mod:`stn_jax.models`, takes
``cpu_convolution`` (default :func:`cpu_convolution_default`: on, unless
``STN_JAX_CPU_CONVOLUTION=0``); off, a layer is a plain ``nnx.Conv``.
"""

from __future__ import annotations

from typing import Sequence

import os

import jax
import jax.numpy as jnp
from jax import lax

from stn_jax import _native

# Inputs with more channels than this keep XLA's convolution gradients (faster there).
MAX_PATCH_CHANNELS = 4
_NHWC = ("NHWC", "HWIO", "NHWC")


def native_convolution_default() -> bool:
  """Whether float32 convolutions on CPU run the compiled kernels where built (``STN_JAX_NATIVE_CONV``, default on)."""
  return os.environ.get("STN_JAX_NATIVE_CONV", "1") != "0"


def cpu_convolution_default() -> bool:
  """Whether layers use :func:`conv_general_dilated` unless told otherwise (``STN_JAX_CPU_CONVOLUTION``)."""
  return os.environ.get("STN_JAX_CPU_CONVOLUTION", "1") != "0"


def patches(x: jax.Array, kernel_hw: tuple[int, int]) -> jax.Array:
  """VALID stride-1 patches of ``[B, H, W, C]`` as ``[B, Ho, Wo, kh*kw*C]``, ordered (row, column, channel).

  The order matches an ``HWIO`` kernel reshaped to ``[kh*kw*C, O]``.
  """
  kh, kw = kernel_hw
  _, h, w, _ = x.shape
  ho, wo = h - kh + 1, w - kw + 1
  columns = jnp.concatenate([x[:, :, j:j + wo] for j in range(kw)], axis=-1)
  return jnp.concatenate([columns[:, i:i + ho] for i in range(kh)], axis=-1)


def _lax_valid_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=_NHWC)


@jax.custom_jvp
def _valid_conv_patch_gradients(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return _lax_valid_conv(x, kernel)


@_valid_conv_patch_gradients.defjvp
def _patch_tangents(primals, tangents):
  """Primal output from XLA's convolution; tangents as products over patches.

  The tangent is linear in ``(dx, d_kernel)``; reverse mode transposes it
  into ``patches(x)^T @ g`` for the kernel and "product with the kernel
  matrix, then the patches' transpose (shifted sums)" for the input.
  """
  x, kernel = primals
  dx, d_kernel = tangents
  kh, kw, c, o = kernel.shape
  out = _lax_valid_conv(x, kernel)
  d_out = (jnp.einsum("bhwk,ko->bhwo", patches(dx, (kh, kw)), kernel.reshape(kh * kw * c, o))
           + jnp.einsum("bhwk,ko->bhwo", patches(x, (kh, kw)),
                        d_kernel.reshape(kh * kw * c, o)))
  return out, d_out


def _explicit_padding(padding, kernel_hw: tuple[int, int]):
  """``[(top, bottom), (left, right)]`` for 'VALID', 'SAME' or explicit pairs; None otherwise."""
  if isinstance(padding, str):
    if padding.upper() == "VALID":
      return [(0, 0), (0, 0)]
    if padding.upper() == "SAME":  # stride 1: total k - 1, the extra one at the end
      return [((k - 1) // 2, k // 2) for k in kernel_hw]
    return None
  pairs = [tuple(p) for p in padding]
  return pairs if len(pairs) == 2 and all(len(p) == 2 for p in pairs) else None


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision=None,
                         preferred_element_type=None, **kwargs) -> jax.Array:
  """``lax.conv_general_dilated`` with the library's CPU convolutions where they apply.

  Same arguments and values as ``lax.conv_general_dilated``. The CPU paths
  (module docstring: compiled kernels for float32, else patch gradients for
  ``C <= MAX_PATCH_CHANNELS``) apply to ``lhs`` ``[B, H, W, C]`` and ``rhs``
  ``[kh, kw, C, O]`` of one dtype, stride 1, no dilation, no grouping, padding
  'VALID', 'SAME' or explicit non-negative pairs, default precision.
  Differentiable with respect to both arguments, in forward and reverse mode,
  to any order.
  """
  def through_lax(lhs, rhs):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type, **kwargs)

  if lhs.ndim != 4 or rhs.ndim != 4:
    return through_lax(lhs, rhs)
  kernel_hw = tuple(rhs.shape[:2])
  pads = _explicit_padding(padding, kernel_hw)
  eligible = (
      dimension_numbers is not None
      and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
      and tuple(window_strides) == (1, 1)
      and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
      and feature_group_count == 1 and batch_group_count == 1
      and precision is None and preferred_element_type is None and not kwargs.get("out_sharding")
      and pads is not None and all(p >= 0 for pair in pads for p in pair)
      and lhs.shape[-1] == rhs.shape[2]
      and lhs.dtype == rhs.dtype)
  if not eligible:
    return through_lax(lhs, rhs)

  # The kernels are built only in a CPU process (as the sampler's: stn_jax.sampling), so a
  # GPU or TPU process needs no C++ compiler.
  if (lhs.dtype == jnp.float32 and native_convolution_default()
      and _native.conv_padding_fits(pads, kernel_hw)
      and jax.default_backend() == "cpu" and _native.available()):
    def on_cpu(lhs, rhs):
      return _native.conv(lhs, rhs, pads)
  elif lhs.shape[-1] <= MAX_PATCH_CHANNELS:
    def on_cpu(lhs, rhs):
      padded = jnp.pad(lhs, [(0, 0), *pads, (0, 0)])
      return _valid_conv_patch_gradients(padded, rhs)
  else:
    return through_lax(lhs, rhs)
  return lax.platform_dependent(lhs, rhs, cpu=on_cpu, default=through_lax)
