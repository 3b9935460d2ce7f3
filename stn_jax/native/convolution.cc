// Direct 2-D convolution (VALID, stride 1, channels last) as XLA FFI handlers
// for the CPU backend (used by stn_jax._native, which defines their JAX
// differentiation rules; stn_jax.convolution routes the layers to them).
//
// Why: XLA 0.10's CPU backend runs these convolutions in YNNPACK on one thread
// (docs/benchmarks/profile_step.md); these kernels split the work over XLA's
// intra-op pool and the calling thread (native/parallel.h).
//
// Layouts, float32: input x [N, H, W, C], kernel [KH, KW, C, Op] with its
// output channels zero-padded to Op, a multiple of 8 (stn_jax._native pads
// it), output [N, Ho, Wo, O] with Ho = H - KH + 1, Wo = W - KW + 1, O <= Op:
//   out[n, y, x, o] = sum over (ky, kx, c) of x[n, y + ky, x + kx, c] * k[ky, kx, c, o].
// Two handlers:
// * StnConvForward(x, kernel) -> out. The input gradient of a convolution is
//   this same operation on the zero-padded cotangent with the kernel flipped
//   and transposed (stn_jax._native builds it).
// * StnConvKernelGradient(x, g) -> [KH, KW, C, O], attribute padded_width =
//   Op: sum over (n, y, x) of x[n, y + ky, x + kx, c] * g[n, y, x, o].
// Sums run in a fixed order for a given shape and thread count (each chunk of
// the batch has its own partial kernel gradient, added in chunk order).
//
// The inner loops hold a block of output pixels by up to 32 output channels
// in vector registers (GCC/Clang vector extensions, 8 floats per vector; the
// compiler picks the instructions for the target) and multiply-add a
// broadcast input value into them; fused multiply-adds are allowed here
// (unlike native/bilinear.cc, whose results must equal the pure-JAX sampler's
// roundings): convolutions are compared to XLA's within float tolerance.

#if defined(__clang__)
#pragma clang fp contract(fast)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=fast")
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using stn_jax_native::ChunkCount;
using stn_jax_native::ParallelChunks;

typedef float Vec __attribute__((vector_size(32)));
typedef float UnalignedVec __attribute__((vector_size(32), aligned(4)));
constexpr int64_t kLanes = 8;
constexpr int kMaxVectors = 4;  // output channels per block: up to 32
// Vector registers of the target (the x86-64 baseline and AVX2 have 16).
#if defined(__AVX512F__)
constexpr int kRegisters = 32;
#else
constexpr int kRegisters = 16;
#endif
// How many rows of NV accumulator vectors fit beside NV operands and a broadcast (1 to 8).
constexpr int BlockRows(int nv) {
  return std::max(1, std::min(8, (kRegisters - nv - 1) / nv));
}

inline Vec Load(const float* p) { return *reinterpret_cast<const UnalignedVec*>(p); }
inline void Store(float* p, Vec v) { *reinterpret_cast<UnalignedVec*>(p) = v; }

struct Shape {
  int64_t n, h, w, c;   // input
  int64_t kh, kw;       // kernel
  int64_t o, op;        // output channels, and their padded count (a multiple of kLanes)
  int64_t ho, wo;       // output
};

// Writes the first `count` lanes of v to p.
inline void StorePartial(float* p, const Vec& v, int64_t count) {
  if (count >= kLanes) {
    Store(p, v);
  } else if (count > 0) {
    float lanes[kLanes];
    Store(lanes, v);
    std::memcpy(p, lanes, count * sizeof(float));
  }
}

// out[n, y, x0 : x0 + PX, o0 : o0 + 8 NV] (columns beyond O are not written).
template <int NV, int PX>
inline void ForwardBlock(const Shape& s, const float* x, const float* kernel, float* out,
                         int64_t n, int64_t y, int64_t x0, int64_t o0) {
  Vec acc[PX][NV];
  for (int p = 0; p < PX; ++p)
    for (int v = 0; v < NV; ++v) acc[p][v] = Vec{};
  for (int64_t ky = 0; ky < s.kh; ++ky) {
    const float* x_row = x + ((n * s.h + y + ky) * s.w + x0) * s.c;
    const float* k_row = kernel + ky * s.kw * s.c * s.op + o0;
    for (int64_t kx = 0; kx < s.kw; ++kx) {
      const float* xp = x_row + kx * s.c;
      const float* kp = k_row + kx * s.c * s.op;
      for (int64_t c = 0; c < s.c; ++c) {
        Vec k[NV];
        for (int v = 0; v < NV; ++v) k[v] = Load(kp + c * s.op + kLanes * v);
        for (int p = 0; p < PX; ++p) {
          const float value = xp[p * s.c + c];
          for (int v = 0; v < NV; ++v) acc[p][v] += value * k[v];
        }
      }
    }
  }
  for (int p = 0; p < PX; ++p) {
    float* o = out + ((n * s.ho + y) * s.wo + x0 + p) * s.o;
    for (int v = 0; v < NV; ++v) {
      const int64_t column = o0 + kLanes * v;
      StorePartial(o + column, acc[p][v], s.o - column);
    }
  }
}

// One output row, output channels o0 .. o0 + 8 NV: pixel blocks sized so that
// the accumulators (PX x NV vectors) fit the registers (BlockRows).
template <int NV>
void ForwardRow(const Shape& s, const float* x, const float* kernel, float* out, int64_t n,
                int64_t y, int64_t o0) {
  constexpr int PX = BlockRows(NV);
  int64_t x0 = 0;
  for (; x0 + PX <= s.wo; x0 += PX) ForwardBlock<NV, PX>(s, x, kernel, out, n, y, x0, o0);
  // The rest of the row (fewer than PX <= 8 pixels) in blocks of 4, 2 and 1.
  int64_t rest = s.wo - x0;
  if (rest >= 4) {
    ForwardBlock<NV, 4>(s, x, kernel, out, n, y, x0, o0);
    x0 += 4, rest -= 4;
  }
  if (rest >= 2) {
    ForwardBlock<NV, 2>(s, x, kernel, out, n, y, x0, o0);
    x0 += 2, rest -= 2;
  }
  if (rest >= 1) ForwardBlock<NV, 1>(s, x, kernel, out, n, y, x0, o0);
}

// Every output channel block of one row.
void ForwardRowAll(const Shape& s, const float* x, const float* kernel, float* out, int64_t n,
                   int64_t y) {
  for (int64_t o0 = 0; o0 < s.op; o0 += kLanes * kMaxVectors) {
    switch (std::min<int64_t>(kMaxVectors, (s.op - o0) / kLanes)) {
      case 1: ForwardRow<1>(s, x, kernel, out, n, y, o0); break;
      case 2: ForwardRow<2>(s, x, kernel, out, n, y, o0); break;
      case 3: ForwardRow<3>(s, x, kernel, out, n, y, o0); break;
      default: ForwardRow<4>(s, x, kernel, out, n, y, o0); break;
    }
  }
}

// partial[ky, kx, c, o0 : o0 + 8 NV] += the sums over image n's pixels.
// For a given ky, the taps (kx, c) are one axis q = kx * C + c of length KW * C
// (the kernel's HWIO layout), and the input value tap q reads at output pixel
// xx is x_row[xx * C + q]: so q is blocked (CB taps held in registers), which
// works as well for one input channel as for many. g_padded is image n's
// cotangent with its channels padded to Op ([Ho * Wo, Op]).
template <int NV, int CB>
void KernelGradientBlock(const Shape& s, const float* x, const float* g_padded, float* partial,
                         int64_t n, int64_t o0) {
  const int64_t taps = s.kw * s.c;
  for (int64_t ky = 0; ky < s.kh; ++ky) {
    for (int64_t q0 = 0; q0 < taps; q0 += CB) {
      const int64_t count = std::min<int64_t>(CB, taps - q0);
      float* d = partial + (ky * taps + q0) * s.op + o0;
      Vec acc[CB][NV];
      for (int j = 0; j < CB; ++j)
        for (int v = 0; v < NV; ++v)
          acc[j][v] = j < count ? Load(d + j * s.op + kLanes * v) : Vec{};
      for (int64_t y = 0; y < s.ho; ++y) {
        const float* x_row = x + (n * s.h + y + ky) * s.w * s.c + q0;
        const float* g_row = g_padded + y * s.wo * s.op + o0;
        for (int64_t xx = 0; xx < s.wo; ++xx) {
          Vec g[NV];
          for (int v = 0; v < NV; ++v) g[v] = Load(g_row + xx * s.op + kLanes * v);
          for (int j = 0; j < CB; ++j) {
            const float value = j < count ? x_row[xx * s.c + j] : 0.f;
            for (int v = 0; v < NV; ++v) acc[j][v] += value * g[v];
          }
        }
      }
      for (int j = 0; j < count; ++j)
        for (int v = 0; v < NV; ++v) Store(d + j * s.op + kLanes * v, acc[j][v]);
    }
  }
}

void KernelGradientImage(const Shape& s, const float* x, const float* g_padded, float* partial,
                         int64_t n) {
  for (int64_t o0 = 0; o0 < s.op; o0 += kLanes * kMaxVectors) {
    switch (std::min<int64_t>(kMaxVectors, (s.op - o0) / kLanes)) {
      case 1: KernelGradientBlock<1, BlockRows(1)>(s, x, g_padded, partial, n, o0); break;
      case 2: KernelGradientBlock<2, BlockRows(2)>(s, x, g_padded, partial, n, o0); break;
      case 3: KernelGradientBlock<3, BlockRows(3)>(s, x, g_padded, partial, n, o0); break;
      default: KernelGradientBlock<4, BlockRows(4)>(s, x, g_padded, partial, n, o0); break;
    }
  }
}

ffi::Error CheckShape(const Shape& s) {
  if (s.n < 0 || s.h < s.kh || s.w < s.kw || s.kh < 1 || s.kw < 1 || s.c < 1 || s.o < 1 ||
      s.ho != s.h - s.kh + 1 || s.wo != s.w - s.kw + 1)
    return ffi::Error::InvalidArgument("stn_jax convolution: inconsistent shapes");
  if (s.op % kLanes != 0 || s.op < s.o || s.op >= s.o + kLanes)
    return ffi::Error::InvalidArgument(
        "stn_jax convolution: padded output channels must be O rounded up to a multiple of 8");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                   ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), kd = kernel.dimensions(), od = out->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || od.size() != 4 || kd[2] != xd[3] || od[0] != xd[0])
    return ffi::Error::InvalidArgument("stn_jax convolution: expected [N,H,W,C], [KH,KW,C,Op]");
  const Shape s{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], od[3], kd[3], od[1], od[2]};
  if (auto e = CheckShape(s); e.failure()) return e;
  const float* xp = x.typed_data();
  const float* kp = kernel.typed_data();
  float* o = out->typed_data();
  const int64_t rows = s.n * s.ho;
  const int64_t chunks = ChunkCount(pool, rows, s.wo * s.kh * s.kw * s.c * s.op / 64 + 1);
  ParallelChunks(pool, chunks, [&](int64_t k) {
    for (int64_t r = k * rows / chunks; r < (k + 1) * rows / chunks; ++r)
      ForwardRowAll(s, xp, kp, o, r / s.ho, r % s.ho);
  });
  return ffi::Error::Success();
}

ffi::Error KernelGradient(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> grad_kernel,
                          int64_t padded_width) {
  const auto xd = x.dimensions(), gd = g.dimensions(), kd = grad_kernel->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || kd.size() != 4 || kd[2] != xd[3] || gd[0] != xd[0] ||
      kd[3] != gd[3])
    return ffi::Error::InvalidArgument("stn_jax convolution: expected [N,H,W,C], [N,Ho,Wo,O]");
  const Shape s{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], gd[3], padded_width, gd[1], gd[2]};
  if (auto e = CheckShape(s); e.failure()) return e;
  const int64_t kernel_size = s.kh * s.kw * s.c * s.op;
  // One partial gradient per chunk of the batch; at most one chunk per thread
  // (each chunk's partial is a whole kernel to add up at the end).
  const int64_t chunks =
      std::min(ChunkCount(pool, s.n, s.ho * s.wo * s.kh * s.kw * s.c * s.op / 64 + 1),
               std::max<int64_t>(1, pool.num_threads() + 1));
  std::vector<float> partials(chunks * kernel_size, 0.f);
  const float* xp = x.typed_data();
  const float* gp = g.typed_data();
  ParallelChunks(pool, chunks, [&](int64_t k) {
    std::vector<float> g_padded(s.ho * s.wo * s.op, 0.f);
    float* partial = partials.data() + k * kernel_size;
    for (int64_t n = k * s.n / chunks; n < (k + 1) * s.n / chunks; ++n) {
      const float* g_image = gp + n * s.ho * s.wo * s.o;
      for (int64_t i = 0; i < s.ho * s.wo; ++i)
        std::memcpy(g_padded.data() + i * s.op, g_image + i * s.o, s.o * sizeof(float));
      KernelGradientImage(s, xp, g_padded.data(), partial, n);
    }
  });
  float* out = grad_kernel->typed_data();
  const int64_t rows = s.kh * s.kw * s.c;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t o = 0; o < s.o; ++o) {
      float sum = 0.f;
      for (int64_t k = 0; k < chunks; ++k) sum += partials[k * kernel_size + r * s.op + o];
      out[r * s.o + o] = sum;
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(StnConvForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(StnConvKernelGradient, KernelGradient,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("padded_width"));
