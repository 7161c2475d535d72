// One pass over a residual block's features on the CPU (issue 14): the edge-replicate padding of
// PReLU(x) * scale (or of x * scale), written straight into the padded tensor. PyTorch needs three passes
// for it (PReLU, the product into the padded interior, the faces); at 16 channels these memory-bound passes
// cost a third of a block's time, next to two convolutions.
//
// Bit for bit PyTorch's values, signed zeros, NaN and infinities included: PReLU(v) is v where v > 0 and
// slope * v elsewhere, chosen with a bit mask (a branch or a float select does not vectorise with the baseline
// SSE2 instructions; max(v, 0) + slope * min(v, 0) does, but loses -0.0 and gives NaN for an infinite slope),
// then one product with scale, as replicate_pad_product does.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

inline int64_t clamp_index(int64_t i, int64_t n) { return std::min(std::max(i, int64_t{0}), n - 1); }

}  // namespace

// x: (B, C, D, H, W) float32, channels-last-3d; scale: (B, C) float32; slope: (C,) float32 (ones: no PReLU).
// Returns (B, C, D + 2p, H + 2p, W + 2p), channels-last-3d.
torch::Tensor scale_pad(const torch::Tensor& x, const torch::Tensor& scale, const torch::Tensor& slope, int64_t p) {
  TORCH_CHECK(x.dim() == 5 && x.scalar_type() == torch::kFloat && x.device().is_cpu(),
              "scale_pad: x must be a 5-D float32 CPU tensor");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast3d), "scale_pad: x must be channels-last-3d");
  const int64_t B = x.size(0), C = x.size(1), D = x.size(2), H = x.size(3), W = x.size(4);
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous() && scale.numel() == B * C,
              "scale_pad: scale must be (B, C) float32");
  TORCH_CHECK(slope.scalar_type() == torch::kFloat && slope.is_contiguous() && slope.numel() == C,
              "scale_pad: slope must be (C,) float32");
  TORCH_CHECK(scale.device().is_cpu() && slope.device().is_cpu(), "scale_pad: scale and slope must be on the CPU");
  TORCH_CHECK(p >= 0, "scale_pad: p must be >= 0");
  // an empty axis has no edge voxel to replicate (the clamped index would read before the buffer)
  TORCH_CHECK(p == 0 || B * C == 0 || (D > 0 && H > 0 && W > 0), "scale_pad: cannot replicate-pad an empty axis");
  const int64_t Dp = D + 2 * p, Hp = H + 2 * p, Wp = W + 2 * p;
  auto out = torch::empty({B, C, Dp, Hp, Wp}, x.options().memory_format(at::MemoryFormat::ChannelsLast3d));
  if (out.numel() == 0) return out;
  const float* xp = x.data_ptr<float>();
  const float* sc = scale.data_ptr<float>();
  const float* sl = slope.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // one row (b, z', y') of the padded output per work item: each reads one clamped input row
  at::parallel_for(0, B * Dp * Hp, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = r / (Dp * Hp), zp = (r / Hp) % Dp, yp = r % Hp;
      const int64_t z = clamp_index(zp - p, D), y = clamp_index(yp - p, H);
      const float* __restrict src = xp + ((b * D + z) * H + y) * W * C;
      float* __restrict dst = op + ((b * Dp + zp) * Hp + yp) * Wp * C;
      const float* __restrict s = sc + b * C;
      const float* __restrict k = sl;
      for (int64_t xo = 0; xo < Wp; ++xo) {
        const float* __restrict in = src + clamp_index(xo - p, W) * C;
        float* __restrict o = dst + xo * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const float v = in[c];
          const float nv = k[c] * v;
          uint32_t vb, nb;
          std::memcpy(&vb, &v, sizeof(float));
          std::memcpy(&nb, &nv, sizeof(float));
          const uint32_t keep = 0u - static_cast<uint32_t>(v > 0.f);  // all ones where v > 0
          const uint32_t hb = (vb & keep) | (nb & ~keep);
          float h;
          std::memcpy(&h, &hb, sizeof(float));
          o[c] = h * s[c];
        }
      }
    }
  });
  return out;
}
