// Bilinear sampling with zero padding, forward and backward, as XLA FFI
// handlers for the CPU backend (used by stn_jax.sampling when available).
//
// Semantics are those of stn_jax.sampling.sample(method='bilinear',
// padding_mode='zeros') and PyTorch's grid_sample: images [N, H, W, C] and
// grid [N, Ho, Wo, 2] of normalised (x, y), channels last, float32. Every
// leading axis before the last three is a batch axis (N is their product), so
// the handlers also serve vmap with broadcast dimensions. Points whose pixel
// coordinates are not finite or lie beyond two pixels outside the image read
// 0 and receive no gradient.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <condition_variable>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Dims {
  int64_t n, h, w, c, ho, wo;
};

// Runs body(i) for i in [0, count) on XLA's intra-op thread pool (and the
// calling thread), in contiguous chunks; small jobs run inline.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t count, int64_t work_per_item, F&& body) {
  const int64_t max_chunks = std::max<int64_t>(1, pool.num_threads() + 1);
  const int64_t by_work = std::max<int64_t>(1, count * work_per_item / (1 << 15));
  const int64_t chunks = std::min({count, max_chunks, by_work});
  if (chunks <= 1) {
    for (int64_t i = 0; i < count; ++i) body(i);
    return;
  }
  std::mutex mutex;
  std::condition_variable done;
  int64_t remaining = chunks - 1;
  auto run_chunk = [&](int64_t k) {
    for (int64_t i = k * count / chunks; i < (k + 1) * count / chunks; ++i) body(i);
  };
  for (int64_t k = 1; k < chunks; ++k) {
    pool.Schedule([&, k] {
      run_chunk(k);
      std::lock_guard<std::mutex> lock(mutex);
      if (--remaining == 0) done.notify_one();
    });
  }
  run_chunk(0);
  std::unique_lock<std::mutex> lock(mutex);
  done.wait(lock, [&] { return remaining == 0; });
}

// Pixel coordinate of a normalised one, and its derivative.
inline float ToPixel(float x, int64_t size, bool align_corners) {
  return align_corners ? (x + 1.f) * 0.5f * static_cast<float>(size - 1)
                       : ((x + 1.f) * static_cast<float>(size) - 1.f) * 0.5f;
}
inline float PixelScale(int64_t size, bool align_corners) {
  return align_corners ? 0.5f * static_cast<float>(size - 1) : 0.5f * static_cast<float>(size);
}

// The four taps of a point: whether it reads anything, corner indices, weights.
struct Taps {
  bool any;
  int64_t x0, y0;
  float fx, fy;  // fractional parts: weight of the right / lower taps.
  bool in_x0, in_x1, in_y0, in_y1;
};

inline Taps MakeTaps(float ix, float iy, int64_t h, int64_t w) {
  Taps t{};
  // NaN fails every comparison, so it lands here too.
  if (!(ix > -2.f && ix < static_cast<float>(w) + 1.f && iy > -2.f &&
        iy < static_cast<float>(h) + 1.f)) {
    t.any = false;
    return t;
  }
  // floor() without a libm call: the coordinates are bounded here.
  int64_t x0 = static_cast<int64_t>(ix), y0 = static_cast<int64_t>(iy);
  x0 -= static_cast<float>(x0) > ix;
  y0 -= static_cast<float>(y0) > iy;
  t.any = true;
  t.x0 = x0;
  t.y0 = y0;
  t.fx = ix - static_cast<float>(x0);
  t.fy = iy - static_cast<float>(y0);
  t.in_x0 = t.x0 >= 0 && t.x0 < w;
  t.in_x1 = t.x0 + 1 >= 0 && t.x0 + 1 < w;
  t.in_y0 = t.y0 >= 0 && t.y0 < h;
  t.in_y1 = t.y0 + 1 >= 0 && t.y0 + 1 < h;
  return t;
}

Dims GetDims(ffi::AnyBuffer::Dimensions image_dims, ffi::AnyBuffer::Dimensions grid_dims) {
  Dims d{};
  size_t r = image_dims.size();
  d.n = 1;
  for (size_t i = 0; i + 3 < r; ++i) d.n *= image_dims[i];
  d.h = image_dims[r - 3];
  d.w = image_dims[r - 2];
  d.c = image_dims[r - 1];
  size_t g = grid_dims.size();
  d.ho = grid_dims[g - 3];
  d.wo = grid_dims[g - 2];
  return d;
}

ffi::Error CheckShapes(ffi::AnyBuffer::Dimensions image_dims,
                       ffi::AnyBuffer::Dimensions grid_dims) {
  if (image_dims.size() < 4 || grid_dims.size() != image_dims.size() ||
      grid_dims[grid_dims.size() - 1] != 2) {
    return ffi::Error::InvalidArgument("stn_bilinear: images [..., H, W, C] and grid [..., Ho, Wo, 2]");
  }
  for (size_t i = 0; i + 3 < image_dims.size(); ++i) {
    if (image_dims[i] != grid_dims[i])
      return ffi::Error::InvalidArgument("stn_bilinear: batch axes of images and grid differ");
  }
  return ffi::Error::Success();
}

// One image of the forward pass. kC > 0 fixes the channel count at compile
// time (the common 1 and 3), 0 reads it from d.
template <int kC>
void ForwardImage(const float* img, const float* pts, float* out, const Dims d,
                  const bool align_corners) {
  const int64_t c = kC > 0 ? kC : d.c, h = d.h, w = d.w, points = d.ho * d.wo;
  for (int64_t p = 0; p < points; ++p) {
    const float* pt = pts + 2 * p;
    float* dst = out + c * p;
    const Taps t = MakeTaps(ToPixel(pt[0], w, align_corners), ToPixel(pt[1], h, align_corners),
                            h, w);
    for (int64_t ch = 0; ch < c; ++ch) dst[ch] = 0.f;
    if (!t.any) continue;
    const float wx[2] = {1.f - t.fx, t.fx}, wy[2] = {1.f - t.fy, t.fy};
    const bool inx[2] = {t.in_x0, t.in_x1}, iny[2] = {t.in_y0, t.in_y1};
    for (int dy = 0; dy < 2; ++dy) {
      if (!iny[dy]) continue;
      for (int dx = 0; dx < 2; ++dx) {
        if (!inx[dx]) continue;
        const float weight = wy[dy] * wx[dx];
        const float* src = img + ((t.y0 + dy) * w + (t.x0 + dx)) * c;
        for (int64_t ch = 0; ch < c; ++ch) dst[ch] += weight * src[ch];
      }
    }
  }
}

// One image of the backward pass: accumulates the image gradient (zeroed
// here) and writes the grid gradient.
template <int kC>
void BackwardImage(const float* img, const float* pts, const float* cot, float* grad_img,
                   float* grad_pts, const Dims d, const bool align_corners) {
  const int64_t c = kC > 0 ? kC : d.c, h = d.h, w = d.w, points = d.ho * d.wo;
  const float sx = PixelScale(w, align_corners), sy = PixelScale(h, align_corners);
  std::fill(grad_img, grad_img + h * w * c, 0.f);
  for (int64_t p = 0; p < points; ++p) {
    const float* pt = pts + 2 * p;
    const float* up = cot + c * p;
    float* gpt = grad_pts + 2 * p;
    const Taps t = MakeTaps(ToPixel(pt[0], w, align_corners), ToPixel(pt[1], h, align_corners),
                            h, w);
    gpt[0] = 0.f;
    gpt[1] = 0.f;
    if (!t.any) continue;
    const float wx[2] = {1.f - t.fx, t.fx}, wy[2] = {1.f - t.fy, t.fy};
    const bool inx[2] = {t.in_x0, t.in_x1}, iny[2] = {t.in_y0, t.in_y1};
    float dix = 0.f, diy = 0.f;
    for (int dy = 0; dy < 2; ++dy) {
      if (!iny[dy]) continue;
      for (int dx = 0; dx < 2; ++dx) {
        if (!inx[dx]) continue;
        const int64_t offset = ((t.y0 + dy) * w + (t.x0 + dx)) * c;
        const float* src = img + offset;
        float* gsrc = grad_img + offset;
        const float weight = wy[dy] * wx[dx];
        float dot = 0.f;
        for (int64_t ch = 0; ch < c; ++ch) {
          gsrc[ch] += weight * up[ch];
          dot += src[ch] * up[ch];
        }
        // d(weight)/d(ix) = wy * (dx ? 1 : -1); d(weight)/d(iy) = wx * (dy ? 1 : -1).
        dix += (dx ? 1.f : -1.f) * wy[dy] * dot;
        diy += (dy ? 1.f : -1.f) * wx[dx] * dot;
      }
    }
    gpt[0] = dix * sx;
    gpt[1] = diy * sy;
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> images,
                   ffi::Buffer<ffi::F32> grid, ffi::ResultBuffer<ffi::F32> out,
                   bool align_corners) {
  if (auto e = CheckShapes(images.dimensions(), grid.dimensions()); e.failure()) return e;
  const Dims d = GetDims(images.dimensions(), grid.dimensions());
  const float* im = images.typed_data();
  const float* g = grid.typed_data();
  float* o = out->typed_data();
  auto run = d.c == 1 ? ForwardImage<1> : d.c == 3 ? ForwardImage<3> : ForwardImage<0>;
  ParallelFor(pool, d.n, d.ho * d.wo * d.c, [&](int64_t b) {
    run(im + b * d.h * d.w * d.c, g + b * d.ho * d.wo * 2, o + b * d.ho * d.wo * d.c, d,
        align_corners);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> images,
                    ffi::Buffer<ffi::F32> grid, ffi::Buffer<ffi::F32> cotangent,
                    ffi::ResultBuffer<ffi::F32> grad_images,
                    ffi::ResultBuffer<ffi::F32> grad_grid, bool align_corners) {
  if (auto e = CheckShapes(images.dimensions(), grid.dimensions()); e.failure()) return e;
  const Dims d = GetDims(images.dimensions(), grid.dimensions());
  const float* im = images.typed_data();
  const float* g = grid.typed_data();
  const float* ct = cotangent.typed_data();
  float* gi = grad_images->typed_data();
  float* gg = grad_grid->typed_data();
  auto run = d.c == 1 ? BackwardImage<1> : d.c == 3 ? BackwardImage<3> : BackwardImage<0>;
  ParallelFor(pool, d.n, d.ho * d.wo * d.c + d.h * d.w * d.c, [&](int64_t b) {
    const int64_t image = b * d.h * d.w * d.c, points = b * d.ho * d.wo;
    run(im + image, g + 2 * points, ct + d.c * points, gi + image, gg + 2 * points, d,
        align_corners);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(StnBilinearBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("align_corners"));
