"""The paper's models as configurable Flax NNX modules.

Sources. The paper's text (section 4 and appendix A) fixes: three weight
layers in every MNIST classifier, CNNs with two max-pooling layers, ReLU and
softmax, localisation nets initialised to the identity, a 16-point (4x4) TPS;
the ST-FCN localisation net is a 3-layer FCN and the ST-CNN's a small CNN; for
RTS (42x42) the transformer output is average-pooled by 2. SVHN: an 11-hidden-
layer CNN (Goodfellow et al.'s 8 conv layers of 48-64-128-160-192-192-192-192
5x5 filters and two 3072-unit FC layers) with five digit heads; "ST-CNN Single"
has a 4-layer CNN localisation net on the input; "ST-CNN Multi" a transformer
with a 2-layer, 32-unit FCN localisation net before each of the first four
conv layers. CUB: parallel attention (scale + translation) transformers, each
cropping the 448px input to 224px for its own backbone, features concatenated
before one classifier. MNIST addition: two transformers, each reading both
channels, outputs concatenated to 4 channels for an FCN.

Where the stored copies of the paper are silent we chose (and say so in each
class): MNIST CNN 32 filters of 9x9 then 7x7 (SAME padding, so the 21x21
pooled RTS output fits), FCN 256-256 hidden units, ST-CNN localisation
conv(20, 5x5)-maxpool-conv(20, 5x5)-FC(20) as in public reimplementations,
Goodfellow's max-pool strides alternating 2 and 1, dropout 0.5 in the SVHN
FC layers.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from stn_jax import _validation as v
from stn_jax import transforms
from stn_jax.modules import (LocalisationNet, ParallelTransformers, SpatialTransformer,
                             check_feature_map, conv_layer, max_pool_2x2)

BACKBONES = ("fcn", "cnn")
# The localisation nets of Table 1 (see the module docstring).
FCN_LOCALISATION = dict(conv=(), hidden=(32, 32, 32))
CNN_LOCALISATION = dict(conv=((20, 5, True), (20, 5, False)), hidden=(20,))


class DenseStack(nnx.Module):
  """Fully-connected ReLU layers ``hidden`` then a linear layer to ``num_out``."""

  def __init__(self, in_features: int, hidden: Sequence[int], num_out: int, *,
               dropout: float = 0.0, rngs: nnx.Rngs):
    layers = []
    for units in hidden:
      layers.append(nnx.Linear(in_features, units, rngs=rngs))
      in_features = units
    self.layers = nnx.List(layers)
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else None
    self.out = nnx.Linear(in_features, num_out, rngs=rngs)

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for layer in self.layers:
      x = nnx.relu(layer(x))
      if self.dropout is not None:
        x = self.dropout(x)
    return self.out(x)


class MnistCNN(nnx.Module):
  """Table 1's CNN: conv(32, 9x9)-maxpool-conv(32, 7x7)-maxpool-linear, ReLU, SAME padding."""

  def __init__(self, in_hw: Sequence[int], in_channels: int, num_classes: int, *,
               features: Sequence[int] = (32, 32), kernels: Sequence[int] = (9, 7),
               rngs: nnx.Rngs):
    h, w = in_hw
    self.conv1 = conv_layer(in_channels, features[0], kernels[0], rngs=rngs)
    self.conv2 = conv_layer(features[0], features[1], kernels[1], rngs=rngs)
    self.out = nnx.Linear((h // 4) * (w // 4) * features[1], num_classes, rngs=rngs)

  def __call__(self, x):
    x = max_pool_2x2(nnx.relu(self.conv1(x)))
    x = max_pool_2x2(nnx.relu(self.conv2(x)))
    return self.out(x.reshape(x.shape[0], -1))


class DistortedMnistModel(nnx.Module):
  """FCN, CNN, ST-FCN and ST-CNN of the paper's Table 1.

  Args:
    in_hw: input size, ``(28, 28)`` for R, P, E and ``(42, 42)`` for RTS.
    backbone: ``'fcn'`` (256-256 hidden units, then softmax) or ``'cnn'``
      (:class:`MnistCNN`).
    transform: ``None`` for the plain FCN/CNN, else the transformer's kind:
      ``'affine'``, ``'projective'`` or ``'tps'`` (4x4 control points).
    post_pool: average-pool the transformer output by this factor (the paper
      uses 2 for RTS, so the classifier sees 21x21).
    localisation: keyword arguments of the :class:`LocalisationNet`; default
      :data:`FCN_LOCALISATION` for ST-FCN and :data:`CNN_LOCALISATION` for
      ST-CNN.

  ``__call__(x) -> logits [B, num_classes]``; :meth:`transform` returns the
  transformer's ``(warped, params)`` for figures.
  """

  def __init__(self, in_hw: Sequence[int] = (28, 28), *, in_channels: int = 1,
               num_classes: int = 10, backbone: str = "cnn", transform: Optional[str] = None,
               post_pool: int = 1, fcn_hidden: Sequence[int] = (256, 256),
               localisation: Optional[dict] = None, rngs: nnx.Rngs):
    v.check_choice("backbone", backbone, BACKBONES)
    self.in_hw = v.check_hw("in_hw", in_hw)
    self.in_channels = in_channels
    self.post_pool = post_pool
    if transform is None:
      self.st = None
    else:
      loc_kwargs = dict(FCN_LOCALISATION if backbone == "fcn" else CNN_LOCALISATION)
      loc_kwargs.update(localisation or {})
      loc = LocalisationNet(self.in_hw, in_channels, transform=transform, rngs=rngs, **loc_kwargs)
      self.st = SpatialTransformer(loc)
    hw = (self.in_hw[0] // post_pool, self.in_hw[1] // post_pool)
    if backbone == "fcn":
      self.classifier = DenseStack(hw[0] * hw[1] * in_channels, fcn_hidden, num_classes, rngs=rngs)
    else:
      self.classifier = MnistCNN(hw, in_channels, num_classes, rngs=rngs)

  def transform(self, x):
    """``(warped [B, H, W, C], params [B, P])``; the identity for plain models."""
    check_feature_map("x", x, self.in_hw, self.in_channels)
    if self.st is None:
      return x, jnp.zeros((x.shape[0], 0), x.dtype)
    return self.st(x)

  def __call__(self, x):
    x, _ = self.transform(x)
    if self.post_pool > 1:
      x = nnx.avg_pool(x, (self.post_pool,) * 2, (self.post_pool,) * 2)
    return self.classifier(x)


class MultiDigitCNN(nnx.Module):
  """The SVHN multi-digit models: CNN, ST-CNN Single and ST-CNN Multi (Table 2).

  Backbone (Goodfellow et al. 2014, as the paper's baseline): eight 5x5 SAME
  conv layers of ``features`` with ReLU, each followed by a 2x2 max-pool of
  stride 2 on even layers and 1 on odd ones, then two FC layers of ``hidden``
  units with dropout, then heads: sequence length (``max_digits + 2`` classes:
  0..max_digits and "more") and one 11-way head per digit position (10 digits
  + "none").

  ``st='single'``: one affine transformer on the input with a 4-layer CNN
  localisation net (conv(32, 5x5)-maxpool-conv(32, 5x5)-FC(32)-regression).
  ``st='multi'``: an affine transformer before each of the first four conv
  layers, each with a 2-layer FCN (32, 32) localisation net reading that
  layer's input.

  ``__call__(x) -> (length_logits [B, max_digits + 2], digit_logits [B, max_digits, 11])``.
  """

  def __init__(self, in_hw: Sequence[int] = (64, 64), *, in_channels: int = 3,
               st: Optional[str] = None, max_digits: int = 5,
               features: Sequence[int] = (48, 64, 128, 160, 192, 192, 192, 192),
               hidden: Sequence[int] = (3072, 3072), dropout: float = 0.5, rngs: nnx.Rngs):
    if st is not None:
      v.check_choice("st", st, ("single", "multi"))
    self.in_hw = v.check_hw("in_hw", in_hw)
    self.in_channels = in_channels
    self.max_digits = max_digits
    self.strides = tuple(2 if i % 2 == 0 else 1 for i in range(len(features)))
    convs, sts = [], []
    hw, channels = self.in_hw, in_channels
    for i, feat in enumerate(features):
      if (st == "multi" and i < 4) or (st == "single" and i == 0):
        loc = (dict(conv=((32, 5, True), (32, 5, False)), hidden=(32,)) if st == "single"
               else dict(conv=(), hidden=(32, 32)))
        sts.append(SpatialTransformer(LocalisationNet(hw, channels, transform="affine",
                                                      rngs=rngs, **loc)))
      else:
        sts.append(None)
      convs.append(conv_layer(channels, feat, 5, rngs=rngs))
      channels = feat
      s = self.strides[i]
      hw = (-(-hw[0] // s), -(-hw[1] // s))
    self.convs = nnx.List(convs)
    self.sts = nnx.List(sts)
    self.fc = DenseStack(hw[0] * hw[1] * channels, hidden[:-1], hidden[-1], dropout=dropout,
                         rngs=rngs)
    self.fc_dropout = nnx.Dropout(dropout, rngs=rngs)
    self.length_head = nnx.Linear(hidden[-1], max_digits + 2, rngs=rngs)
    self.digit_heads = nnx.Linear(hidden[-1], max_digits * 11, rngs=rngs)

  def __call__(self, x):
    check_feature_map("x", x, self.in_hw, self.in_channels)
    for conv, st, s in zip(self.convs, self.sts, self.strides):
      if st is not None:
        x, _ = st(x)
      x = nnx.max_pool(nnx.relu(conv(x)), (2, 2), (s, s), padding="SAME")
    h = self.fc_dropout(nnx.relu(self.fc(x)))
    return self.length_head(h), self.digit_heads(h).reshape(-1, self.max_digits, 11)


class ParallelSTClassifier(nnx.Module):
  """Fine-grained classifier with N parallel attention transformers (CUB, Table 3).

  A localisation net reads the ``in_hw`` image and each of ``num_transformers``
  attention transformers (scale + translation) crops it to ``crop_hw``; each
  crop goes through its own backbone (``backbone_factory(rngs)`` returns a
  module mapping ``[B, *crop_hw, C]`` to features ``[B, F]``, e.g. an
  ImageNet-pretrained Inception), and the concatenated features feed one
  linear classifier (with dropout). ``localisation`` holds the
  :class:`LocalisationNet` keyword arguments (default: a small CNN; the paper
  uses an Inception).

  ``__call__(x) -> logits``; :meth:`crops` returns the crops and parameters.
  """

  def __init__(self, backbone_factory: Callable[[nnx.Rngs], nnx.Module], feature_dim: int, *,
               num_classes: int = 200, num_transformers: int = 2,
               in_hw: Sequence[int] = (448, 448), crop_hw: Sequence[int] = (224, 224),
               in_channels: int = 3, localisation: Optional[dict] = None,
               dropout: float = 0.7, rngs: nnx.Rngs):
    loc = dict(conv=((32, 5, True), (32, 5, True)), hidden=(128,), downsample=4)
    loc.update(localisation or {})
    self.parallel = ParallelTransformers(
        [SpatialTransformer(LocalisationNet(in_hw, in_channels, transform="attention",
                                            rngs=rngs, **loc), out_hw=crop_hw)
         for _ in range(num_transformers)], combine="list")
    self.backbones = nnx.List([backbone_factory(rngs) for _ in range(num_transformers)])
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.out = nnx.Linear(feature_dim * num_transformers, num_classes, rngs=rngs)

  def crops(self, x):
    return self.parallel(x)

  def __call__(self, x):
    crops, _ = self.parallel(x)
    feats = jnp.concatenate([bb(c) for bb, c in zip(self.backbones, crops)], axis=-1)
    return self.out(self.dropout(feats))


class AdditionModel(nnx.Module):
  """MNIST addition (appendix): ``num_transformers`` parallel transformers then an FCN, 19 classes.

  The input holds two independently distorted digits as two channels
  ``[B, 42, 42, 2]``. Each transformer's localisation net (a 3-layer FCN of 32
  units) reads both channels and warps both; the 2-channel outputs are
  concatenated (4 channels for the paper's two transformers) for an FCN
  classifier (256-256 hidden) over the sums 0..18. ``transform`` defaults to ``'affine'`` (the paper's figure shows TPS).
  """

  def __init__(self, in_hw: Sequence[int] = (42, 42), *, transform: str = "affine",
               num_transformers: int = 2, hidden: Sequence[int] = (256, 256),
               rngs: nnx.Rngs):
    self.parallel = ParallelTransformers(
        [SpatialTransformer(LocalisationNet(in_hw, 2, transform=transform, rngs=rngs,
                                            **FCN_LOCALISATION))
         for _ in range(num_transformers)])
    h, w = v.check_hw("in_hw", in_hw)
    self.classifier = DenseStack(h * w * 2 * num_transformers, hidden, 19, rngs=rngs)

  def __call__(self, x):
    warped, _ = self.parallel(x)
    return self.classifier(warped)


class ConvFeatures(nnx.Module):
  """A small CNN backbone ``[B, H, W, C] -> [B, features[-1]]``.

  3x3 SAME conv + ReLU + 2x2 max-pool per entry of ``features``, then a global
  average pool. Our stand-in for the paper's ImageNet-pretrained Inception in
  the CUB models (no pretrained weights are available offline).
  """

  def __init__(self, in_channels: int, features: Sequence[int] = (32, 64, 128, 256), *,
               rngs: nnx.Rngs):
    convs = []
    for feat in features:
      convs.append(conv_layer(in_channels, feat, 3, rngs=rngs))
      in_channels = feat
    self.convs = nnx.List(convs)

  def __call__(self, x):
    for conv in self.convs:
      x = max_pool_2x2(nnx.relu(conv(x)))
    return x.mean(axis=(1, 2))


class FeatureClassifier(nnx.Module):
  """A backbone's features, dropout and a linear classifier (the no-transformer baseline)."""

  def __init__(self, backbone: nnx.Module, feature_dim: int, num_classes: int, *,
               dropout: float = 0.0, rngs: nnx.Rngs):
    self.backbone = backbone
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else None
    self.out = nnx.Linear(feature_dim, num_classes, rngs=rngs)

  def __call__(self, x):
    h = self.backbone(x)
    return self.out(self.dropout(h) if self.dropout is not None else h)


def count_params(model: nnx.Module) -> int:
  """Number of trainable scalars (``nnx.Param``) in ``model``."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
