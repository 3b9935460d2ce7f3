// Bilinear sampling with zero padding as XLA FFI handlers for the CPU backend
// (used by stn_jax._native, which defines their JAX differentiation rules).
//
// Semantics are those of stn_jax.sampling.sample(method='bilinear',
// padding_mode='zeros'): images [N, H, W, C] and grid [N, Ho, Wo, 2] of
// normalised (x, y), channels last, float32. Every leading axis before the
// last three is a batch axis (N is their product). Points whose pixel
// coordinates are not finite or lie two pixels or more outside the image
// read 0 and have derivative 0.
//
// Three handlers (pixel-centre rule: within `centre_tolerance` pixels of an
// integer n along an axis, the derivative along it is the mean of the two
// one-sided ones, (v[n + 1] - v[n - 1]) / 2, taps outside reading 0; the
// tolerance is stn_jax.sampling.PIXEL_CENTRE_TOLERANCE, passed in by
// stn_jax._native as that attribute):
// * StnBilinearForward: the sampled values [N, Ho, Wo, C].
// * StnBilinearValueAndJacobian: the values and their derivative with respect
//   to the point's normalised (x, y), [N, Ho, Wo, C, 2] (forward-mode AD).
// * StnBilinearBackward: for a cotangent [N, Ho, Wo, C], the image gradient
//   [N, H, W, C] (the scatter of the weighted cotangent) and the grid gradient
//   [N, Ho, Wo, 2], in one pass (reverse-mode AD).
//
// Parallelism: over the batch, with ParallelFor (native/parallel.h).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using stn_jax_native::ParallelFor;

struct Dims {
  int64_t n, h, w, c, ho, wo;
};

// Pixel coordinate of a normalised one, and its derivative.
inline float ToPixel(float x, int64_t size, bool align_corners) {
  return align_corners ? (x + 1.f) * 0.5f * static_cast<float>(size - 1)
                       : ((x + 1.f) * static_cast<float>(size) - 1.f) * 0.5f;
}
inline float PixelScale(int64_t size, bool align_corners) {
  return align_corners ? 0.5f * static_cast<float>(size - 1) : 0.5f * static_cast<float>(size);
}

inline bool Inside(int64_t i, int64_t size) { return i >= 0 && i < size; }

// Whether a point at pixel coordinates (ux, uy) can read the image. NaN fails
// every comparison, so it lands outside too.
inline bool Reads(float ux, float uy, int64_t h, int64_t w) {
  return ux > -2.f && ux < static_cast<float>(w) + 1.f && uy > -2.f &&
         uy < static_cast<float>(h) + 1.f;
}

// floor(u) and the fraction, without a libm call (u is bounded where this runs).
inline int64_t Floor(float u, float* t) {
  int64_t i = static_cast<int64_t>(u);
  i -= static_cast<float>(i) > u;
  *t = u - static_cast<float>(i);
  return i;
}

// Whether a coordinate with fraction t (0 <= t < 1) is within tol of an
// integer. Branch-free: |u - round(u)| in floats, or a branch on t > 0.5
// (taken at random), makes the loops markedly slower. 1 - t is exact where
// it matters (t > 0.5).
inline bool AtCentre(float t, float tol) { return std::min(t, 1.f - t) <= tol; }

// The integer nearest to i + t.
inline int64_t Nearest(int64_t i, float t) { return i + static_cast<int64_t>(t > 0.5f); }

// One point that reads the image: its taps (x0, y0) .. (x0 + 1, y0 + 1) as
// element offsets (pixel (y, x) at (y * w + x) * c; -1 outside the image,
// which reads 0) and their weights; with kDerivative also, per axis, whether
// the coordinate is within centre_tolerance of an integer.
struct Point {
  int64_t x0, y0;
  int64_t q00, q01, q10, q11;  // (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)
  float wx0, wx1, wy0, wy1;
  bool centre_x, centre_y;
};

struct Image {
  const float* data;
  int64_t h, w, c;
  int64_t Offset(int64_t y, int64_t x) const {
    return Inside(y, h) && Inside(x, w) ? (y * w + x) * c : -1;
  }
  float Read(int64_t offset, int64_t ch) const { return offset >= 0 ? data[offset + ch] : 0.f; }
  float At(int64_t y, int64_t x, int64_t ch) const { return Read(Offset(y, x), ch); }
};

template <bool kDerivative>
inline Point MakePoint(const Image& im, float ux, float uy, float centre_tolerance) {
  Point p;
  float tx, ty;
  p.x0 = Floor(ux, &tx);
  p.y0 = Floor(uy, &ty);
  p.q00 = im.Offset(p.y0, p.x0);
  p.q01 = im.Offset(p.y0, p.x0 + 1);
  p.q10 = im.Offset(p.y0 + 1, p.x0);
  p.q11 = im.Offset(p.y0 + 1, p.x0 + 1);
  p.wx0 = 1.f - tx;
  p.wx1 = tx;
  p.wy0 = 1.f - ty;
  p.wy1 = ty;
  if (kDerivative) {
    p.centre_x = AtCentre(tx, centre_tolerance);
    p.centre_y = AtCentre(ty, centre_tolerance);
  }
  return p;
}

// The derivatives (per pixel) of channel ch at p along x and y, given the
// values v00 .. v11 of its taps: the slope between the taps, or, at a pixel
// centre n, the mean of the two one-sided slopes, (v[n + 1] - v[n - 1]) / 2.
inline void Derivative(const Image& im, const Point& p, int64_t ch, float v00, float v01,
                       float v10, float v11, float* gx, float* gy) {
  if (__builtin_expect(p.centre_x, 0)) {
    const int64_t n = Nearest(p.x0, p.wx1);
    *gx = 0.5f * (p.wy0 * (im.At(p.y0, n + 1, ch) - im.At(p.y0, n - 1, ch)) +
                  p.wy1 * (im.At(p.y0 + 1, n + 1, ch) - im.At(p.y0 + 1, n - 1, ch)));
  } else {
    *gx = p.wy0 * (v01 - v00) + p.wy1 * (v11 - v10);
  }
  if (__builtin_expect(p.centre_y, 0)) {
    const int64_t n = Nearest(p.y0, p.wy1);
    *gy = 0.5f * (p.wx0 * (im.At(n + 1, p.x0, ch) - im.At(n - 1, p.x0, ch)) +
                  p.wx1 * (im.At(n + 1, p.x0 + 1, ch) - im.At(n - 1, p.x0 + 1, ch)));
  } else {
    *gy = p.wx0 * (v10 - v00) + p.wx1 * (v11 - v01);
  }
}

int64_t BatchSize(ffi::AnyBuffer::Dimensions dims) {
  int64_t n = 1;
  for (size_t i = 0; i + 3 < dims.size(); ++i) n *= dims[i];
  return n;
}

// images_or_grads: [..., H, W, C]; grid: [..., Ho, Wo, 2].
ffi::Error GetDims(ffi::AnyBuffer::Dimensions image_dims, ffi::AnyBuffer::Dimensions grid_dims,
                   Dims* d) {
  if (image_dims.size() < 4 || grid_dims.size() != image_dims.size() ||
      grid_dims[grid_dims.size() - 1] != 2) {
    return ffi::Error::InvalidArgument(
        "stn_bilinear: images [..., H, W, C] and grid [..., Ho, Wo, 2]");
  }
  for (size_t i = 0; i + 3 < image_dims.size(); ++i) {
    if (image_dims[i] != grid_dims[i])
      return ffi::Error::InvalidArgument("stn_bilinear: batch axes of images and grid differ");
  }
  const size_t r = image_dims.size(), g = grid_dims.size();
  *d = Dims{BatchSize(image_dims), image_dims[r - 3], image_dims[r - 2], image_dims[r - 1],
            grid_dims[g - 3], grid_dims[g - 2]};
  return ffi::Error::Success();
}

// One image of the forward pass. kC > 0 fixes the channel count at compile
// time (the common 1 and 3), 0 reads it from d. With kJacobian it also writes
// the derivative with respect to the normalised point (x, y) to jac.
template <int kC, bool kJacobian>
void ForwardImage(const float* img, const float* pts, float* out, float* jac, const Dims d,
                  const bool align_corners, const float centre_tolerance) {
  const int64_t c = kC > 0 ? kC : d.c, h = d.h, w = d.w, points = d.ho * d.wo;
  const float sx = PixelScale(w, align_corners), sy = PixelScale(h, align_corners);
  const Image im{img, h, w, c};
  for (int64_t i = 0; i < points; ++i) {
    float* dst = out + c * i;
    float* dj = jac + 2 * c * i;
    const float ux = ToPixel(pts[2 * i], w, align_corners);
    const float uy = ToPixel(pts[2 * i + 1], h, align_corners);
    if (!Reads(ux, uy, h, w)) {
      std::fill(dst, dst + c, 0.f);
      if (kJacobian) std::fill(dj, dj + 2 * c, 0.f);
      continue;
    }
    const Point p = MakePoint<kJacobian>(im, ux, uy, centre_tolerance);
    for (int64_t ch = 0; ch < c; ++ch) {
      const float v00 = im.Read(p.q00, ch), v01 = im.Read(p.q01, ch),
                  v10 = im.Read(p.q10, ch), v11 = im.Read(p.q11, ch);
      dst[ch] = p.wy0 * (p.wx0 * v00 + p.wx1 * v01) + p.wy1 * (p.wx0 * v10 + p.wx1 * v11);
      if (!kJacobian) continue;
      float gx, gy;
      Derivative(im, p, ch, v00, v01, v10, v11, &gx, &gy);
      dj[2 * ch] = gx * sx;
      dj[2 * ch + 1] = gy * sy;
    }
  }
}

// One image of the forward pass, values only: the hot loop of inference and of
// every training step, written without branches so that the compiler can
// vectorise it over points (gathers where the target has them; kC > 0 fixes
// the channel count, 0 reads it from d). Out-of-image taps are read at a
// clamped, valid address and then replaced by 0 (a select, not a product with
// a zero weight, so non-finite pixels outside a point's footprint never leak
// in); an axis whose coordinate cannot read the image (or is NaN) is moved to
// pixel -3, whose taps are all outside. The arithmetic is that of
// ForwardImage (same operations in the same order). Index is the type of
// element offsets within one image: int32_t where they fit (faster gathers),
// else int64_t.
template <int kC, bool kAlignCorners, typename Index>
void SampleImage(const float* __restrict img, const float* __restrict pts, float* __restrict out,
                 const Dims d) {
  constexpr bool align_corners = kAlignCorners;
  const Index c = kC > 0 ? kC : static_cast<Index>(d.c);
  const Index h = static_cast<Index>(d.h), w = static_cast<Index>(d.w);
  const int64_t points = d.ho * d.wo;
  const float fh = static_cast<float>(h), fw = static_cast<float>(w);
  for (int64_t i = 0; i < points; ++i) {
    float ux = ToPixel(pts[2 * i], w, align_corners);
    float uy = ToPixel(pts[2 * i + 1], h, align_corners);
    // Per axis is enough: an axis at -3 puts all four taps outside. (NaN fails both tests.)
    ux = (ux > -2.f) & (ux < fw + 1.f) ? ux : -3.f;
    uy = (uy > -2.f) & (uy < fh + 1.f) ? uy : -3.f;
    Index x0 = static_cast<Index>(ux);
    x0 -= static_cast<float>(x0) > ux;
    Index y0 = static_cast<Index>(uy);
    y0 -= static_cast<float>(y0) > uy;
    const float tx = ux - static_cast<float>(x0), ty = uy - static_cast<float>(y0);
    const Index x1 = x0 + 1, y1 = y0 + 1;
    using Unsigned = std::make_unsigned_t<Index>;  // one comparison for 0 <= i < n
    const bool in_x0 = static_cast<Unsigned>(x0) < static_cast<Unsigned>(w);
    const bool in_x1 = static_cast<Unsigned>(x1) < static_cast<Unsigned>(w);
    const bool in_y0 = static_cast<Unsigned>(y0) < static_cast<Unsigned>(h);
    const bool in_y1 = static_cast<Unsigned>(y1) < static_cast<Unsigned>(h);
    const Index zero = 0;
    const Index cx0 = std::min(std::max(x0, zero), w - 1), cx1 = std::min(std::max(x1, zero), w - 1);
    const Index cy0 = std::min(std::max(y0, zero), h - 1), cy1 = std::min(std::max(y1, zero), h - 1);
    const Index q00 = (cy0 * w + cx0) * c, q01 = (cy0 * w + cx1) * c;
    const Index q10 = (cy1 * w + cx0) * c, q11 = (cy1 * w + cx1) * c;
    const float wx0 = 1.f - tx, wx1 = tx, wy0 = 1.f - ty, wy1 = ty;
    const bool m00 = in_y0 & in_x0, m01 = in_y0 & in_x1, m10 = in_y1 & in_x0, m11 = in_y1 & in_x1;
    // Unrolled for a fixed channel count, so that the point loop vectorises.
#pragma GCC unroll 4
    for (Index ch = 0; ch < c; ++ch) {
      float v00 = img[q00 + ch], v01 = img[q01 + ch], v10 = img[q10 + ch], v11 = img[q11 + ch];
      v00 = m00 ? v00 : 0.f;
      v01 = m01 ? v01 : 0.f;
      v10 = m10 ? v10 : 0.f;
      v11 = m11 ? v11 : 0.f;
      out[c * i + ch] = wy0 * (wx0 * v00 + wx1 * v01) + wy1 * (wx0 * v10 + wx1 * v11);
    }
  }
}

// The grid gradient (per pixel) of a point at a pixel centre along x and/or y:
// sum over channels of up[ch] times the derivative. Rare, so out of line.
__attribute__((noinline, cold)) void CentreGradient(const Image& im, const Point& p,
                                                    const float* up, float* gx, float* gy) {
  float sx = 0.f, sy = 0.f;
  for (int64_t ch = 0; ch < im.c; ++ch) {
    float dx, dy;
    Derivative(im, p, ch, im.Read(p.q00, ch), im.Read(p.q01, ch), im.Read(p.q10, ch),
               im.Read(p.q11, ch), &dx, &dy);
    sx += dx * up[ch];
    sy += dy * up[ch];
  }
  *gx = sx;
  *gy = sy;
}

// One image of the backward pass: scatters the weighted cotangent of every
// point onto its four taps (grad_img, zeroed here) and writes the grid
// gradient, the cotangent times the derivative.
template <int kC>
void BackwardImage(const float* img, const float* pts, const float* cot, float* grad_img,
                   float* grad_pts, const Dims d, const bool align_corners,
                   const float centre_tolerance) {
  const int64_t c = kC > 0 ? kC : d.c, h = d.h, w = d.w, points = d.ho * d.wo;
  const float sx = PixelScale(w, align_corners), sy = PixelScale(h, align_corners);
  const Image im{img, h, w, c};
  std::fill(grad_img, grad_img + h * w * c, 0.f);
  for (int64_t i = 0; i < points; ++i) {
    const float* up = cot + c * i;
    float* gpt = grad_pts + 2 * i;
    const float ux = ToPixel(pts[2 * i], w, align_corners);
    const float uy = ToPixel(pts[2 * i + 1], h, align_corners);
    if (!Reads(ux, uy, h, w)) {
      gpt[0] = gpt[1] = 0.f;
      continue;
    }
    const Point p = MakePoint<true>(im, ux, uy, centre_tolerance);
    // Per tap: scatter weight * up, and dot[k] = sum over channels of value * up.
    const int64_t taps[4] = {p.q00, p.q01, p.q10, p.q11};
    const float weights[4] = {p.wy0 * p.wx0, p.wy0 * p.wx1, p.wy1 * p.wx0, p.wy1 * p.wx1};
    float dot[4] = {0.f, 0.f, 0.f, 0.f};
    for (int k = 0; k < 4; ++k) {
      if (taps[k] < 0) continue;
      const float* src = img + taps[k];
      float* g = grad_img + taps[k];
      for (int64_t ch = 0; ch < c; ++ch) {
        g[ch] += weights[k] * up[ch];
        dot[k] += src[ch] * up[ch];
      }
    }
    float gx, gy;
    if (__builtin_expect(p.centre_x || p.centre_y, 0)) {
      CentreGradient(im, p, up, &gx, &gy);
    } else {
      gx = p.wy0 * (dot[1] - dot[0]) + p.wy1 * (dot[3] - dot[2]);
      gy = p.wx0 * (dot[2] - dot[0]) + p.wx1 * (dot[3] - dot[1]);
    }
    gpt[0] = gx * sx;
    gpt[1] = gy * sy;
  }
}

using SampleFn = void (*)(const float*, const float*, float*, const Dims);

// The SampleImage instance for d: fixed channel counts 1 and 3, 32-bit offsets
// where one image's elements fit.
template <bool kAlignCorners>
SampleFn Sampler(const Dims& d) {
  if (d.h * d.w * d.c < (int64_t{1} << 31)) {
    return d.c == 1   ? SampleImage<1, kAlignCorners, int32_t>
           : d.c == 3 ? SampleImage<3, kAlignCorners, int32_t>
                      : SampleImage<0, kAlignCorners, int32_t>;
  }
  return d.c == 1   ? SampleImage<1, kAlignCorners, int64_t>
         : d.c == 3 ? SampleImage<3, kAlignCorners, int64_t>
                    : SampleImage<0, kAlignCorners, int64_t>;
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> images,
                   ffi::Buffer<ffi::F32> grid, ffi::ResultBuffer<ffi::F32> out,
                   bool align_corners) {
  Dims d;
  if (auto e = GetDims(images.dimensions(), grid.dimensions(), &d); e.failure()) return e;
  const float* im = images.typed_data();
  const float* g = grid.typed_data();
  float* o = out->typed_data();
  auto run = align_corners ? Sampler<true>(d) : Sampler<false>(d);
  ParallelFor(pool, d.n, d.ho * d.wo * d.c + 1, [&](int64_t b) {
    run(im + b * d.h * d.w * d.c, g + b * d.ho * d.wo * 2, o + b * d.ho * d.wo * d.c, d);
  });
  return ffi::Error::Success();
}

ffi::Error ValueAndJacobian(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> images,
                            ffi::Buffer<ffi::F32> grid, ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::F32> jacobian, bool align_corners,
                            float centre_tolerance) {
  Dims d;
  if (auto e = GetDims(images.dimensions(), grid.dimensions(), &d); e.failure()) return e;
  const float* im = images.typed_data();
  const float* g = grid.typed_data();
  float* o = out->typed_data();
  float* j = jacobian->typed_data();
  auto run = d.c == 1   ? ForwardImage<1, true>
             : d.c == 3 ? ForwardImage<3, true>
                        : ForwardImage<0, true>;
  ParallelFor(pool, d.n, 3 * d.ho * d.wo * d.c + 1, [&](int64_t b) {
    const int64_t points = b * d.ho * d.wo;
    run(im + b * d.h * d.w * d.c, g + 2 * points, o + d.c * points, j + 2 * d.c * points, d,
        align_corners, centre_tolerance);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> images,
                    ffi::Buffer<ffi::F32> grid, ffi::Buffer<ffi::F32> cotangent,
                    ffi::ResultBuffer<ffi::F32> grad_images,
                    ffi::ResultBuffer<ffi::F32> grad_grid, bool align_corners,
                    float centre_tolerance) {
  Dims d;
  if (auto e = GetDims(images.dimensions(), grid.dimensions(), &d); e.failure()) return e;
  const float* im = images.typed_data();
  const float* g = grid.typed_data();
  const float* ct = cotangent.typed_data();
  float* gi = grad_images->typed_data();
  float* gg = grad_grid->typed_data();
  auto run = d.c == 1 ? BackwardImage<1> : d.c == 3 ? BackwardImage<3> : BackwardImage<0>;
  ParallelFor(pool, d.n, 2 * d.ho * d.wo * d.c + d.h * d.w * d.c + 1, [&](int64_t b) {
    const int64_t image = b * d.h * d.w * d.c, points = b * d.ho * d.wo;
    run(im + image, g + 2 * points, ct + d.c * points, gi + image, gg + 2 * points, d,
        align_corners, centre_tolerance);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(StnBilinearForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("align_corners"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(StnBilinearValueAndJacobian, ValueAndJacobian,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("align_corners")
                                  .Attr<float>("centre_tolerance"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(StnBilinearBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("align_corners")
                                  .Attr<float>("centre_tolerance"));
