// A depthwise 3x3x3 convolution of an edge-replicated input, reading the unpadded input in place, optionally summed
// over the channels (issue 14). The network's two depthwise convolutions, the SAN's high-pass and the 16 -> 1 output
// convolution (run as a depthwise one and a channel sum), took ~3 ms each on eight 16-channel 32^3 windows
// through a padded copy and oneDNN's depthwise kernel; here ~2.7 ms for both the high-pass and the summed output.
//
// The same function as PyTorch's conv3d(replicate_pad(x, 1), weight, groups=C) up to float rounding (each output
// voxel sums its 27 taps in the convolution's order, but the AVX-512 and FMA clones fuse each product and sum into
// one multiply-add, the baseline one does not); the summed form adds the channels in order. Tested against PyTorch.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && defined(__GLIBC__)
// AVX-512 and AVX + FMA clones beside the baseline one, chosen by the CPU's features when the library loads (an ifunc):
// the loop is bound by its multiply-adds (27 per voxel and channel), which the baseline's 4-wide vectors run at a
// quarter of AVX-512's rate; -march=native would tie a shared build cache to one CPU. GCC on glibc only: clang does
// not clone templates and other C libraries may lack ifuncs, and a failed build would take the padding kernel
// (the same library) with it; elsewhere the baseline loop, still correct.
#define UNIPET_CLONES __attribute__((target_clones("avx512f", "fma", "default")))
#else
#define UNIPET_CLONES
#endif

namespace {

inline int64_t clamp_index(int64_t i, int64_t n) { return std::min(std::max(i, int64_t{0}), n - 1); }

// Output voxels along a row computed together: four independent accumulator chains hide the multiply-add latency
// (one voxel at a time ran at a fifth of the speed, waiting on its own sums).
constexpr int kVoxels = 4;

// The rows [lo, hi) of (B, D, H): taps is (27, C), tap t = (kz * 3 + ky) * 3 + kx.
template <int C>
UNIPET_CLONES void depthwise_rows(const float* __restrict x, const float* __restrict taps, float* __restrict out,
                                  int64_t lo, int64_t hi, int64_t D, int64_t H, int64_t W, bool channel_sum) {
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t b = r / (D * H), z = (r / H) % D, y = r % H;
    const float* rows[9];  // the nine clamped input rows of this output row's 3x3 (z, y) neighbourhood
    for (int kz = 0; kz < 3; ++kz)
      for (int ky = 0; ky < 3; ++ky)
        rows[kz * 3 + ky] = x + ((b * D + clamp_index(z + kz - 1, D)) * H + clamp_index(y + ky - 1, H)) * W * C;
    int64_t xo = 0;
    alignas(64) float acc[kVoxels][C];
    while (xo < W) {
      const int n = static_cast<int>(std::min<int64_t>(kVoxels, W - xo));
      for (int v = 0; v < kVoxels; ++v)
        for (int c = 0; c < C; ++c) acc[v][c] = 0.f;
      for (int rz = 0; rz < 9; ++rz) {
        for (int kx = 0; kx < 3; ++kx) {
          const float* __restrict w = taps + (rz * 3 + kx) * C;
          for (int v = 0; v < kVoxels; ++v) {
            // the last group of a row may be short: its spare lanes read a clamped (valid) voxel, never stored
            const float* __restrict in = rows[rz] + clamp_index(xo + v + kx - 1, W) * C;
#pragma omp simd
            for (int c = 0; c < C; ++c) acc[v][c] += w[c] * in[c];
          }
        }
      }
      for (int v = 0; v < n; ++v) {
        if (channel_sum) {
          float s = 0.f;
          for (int c = 0; c < C; ++c) s += acc[v][c];
          out[r * W + xo + v] = s;
        } else {
          float* __restrict o = out + (r * W + xo + v) * C;
#pragma omp simd
          for (int c = 0; c < C; ++c) o[c] = acc[v][c];
        }
      }
      xo += n;
    }
  }
}

template <int C>
void run_rows(const float* x, const float* taps, float* out, int64_t rows, int64_t D, int64_t H, int64_t W,
              bool channel_sum) {
  at::parallel_for(0, rows, 1, [&](int64_t lo, int64_t hi) {
    depthwise_rows<C>(x, taps, out, lo, hi, D, H, W, channel_sum);
  });
}

}  // namespace

// x: (B, C, D, H, W) float32, channels-last-3d, C one of 8, 16, 32, 64; weight: (C, 1, 3, 3, 3) float32.
// Returns (B, C, D, H, W) channels-last-3d, or (B, 1, D, H, W) with channel_sum.
torch::Tensor depthwise3_replicate(const torch::Tensor& x, const torch::Tensor& weight, bool channel_sum) {
  TORCH_CHECK(x.dim() == 5 && x.scalar_type() == torch::kFloat && x.device().is_cpu(),
              "depthwise3_replicate: x must be a 5-D float32 CPU tensor");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast3d), "depthwise3_replicate: x must be channels-last-3d");
  const int64_t B = x.size(0), C = x.size(1), D = x.size(2), H = x.size(3), W = x.size(4);
  TORCH_CHECK(C == 8 || C == 16 || C == 32 || C == 64, "depthwise3_replicate: C must be 8, 16, 32 or 64, got ", C);
  TORCH_CHECK(weight.scalar_type() == torch::kFloat && weight.device().is_cpu() && weight.numel() == C * 27,
              "depthwise3_replicate: weight must be (C, 1, 3, 3, 3) float32 on the CPU");
  // an empty axis has no edge voxel to replicate
  TORCH_CHECK(B == 0 || (D > 0 && H > 0 && W > 0), "depthwise3_replicate: cannot replicate-pad an empty axis");
  auto taps = weight.reshape({C, 27}).t().contiguous();  // (27, C): one tap's C weights side by side
  auto out = torch::empty({B, channel_sum ? 1 : C, D, H, W},
                          x.options().memory_format(at::MemoryFormat::ChannelsLast3d));
  if (out.numel() == 0) return out;
  const float* xp = x.data_ptr<float>();
  const float* tp = taps.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t rows = B * D * H;
  switch (C) {
    case 8: run_rows<8>(xp, tp, op, rows, D, H, W, channel_sum); break;
    case 16: run_rows<16>(xp, tp, op, rows, D, H, W, channel_sum); break;
    case 32: run_rows<32>(xp, tp, op, rows, D, H, W, channel_sum); break;
    default: run_rows<64>(xp, tp, op, rows, D, H, W, channel_sum); break;
  }
  return out;
}
