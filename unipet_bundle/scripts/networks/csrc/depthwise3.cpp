// Two 3x3x3 convolutions of an edge-replicated input that read the unpadded input in place (issue 14):
//
// - depthwise, optionally summed over the channels: the network's SAN high-pass and its C -> 1 output convolution
//   (run as a depthwise one and a channel sum) took ~3 ms each on eight 16-channel 32^3 windows through a padded copy
//   and oneDNN's depthwise kernel; here ~2.7 ms for both;
// - single channel in, C out, plus a bias: the network's 1 -> C input convolution, ~7 ms through a padded copy and
//   oneDNN (which has no fast kernel for one input channel), here ~2.5 ms: every tap is one input value times C weights;
// - depthwise, then a 1x1 projection to M channels, a PReLU and the M channels' means: the SAN's high-pass and its
//   first stage's reduction, activation and gate mean, four passes over full-size features in one.
//
// The same functions as PyTorch's conv3d(replicate_pad(x, 1), weight, bias, groups) up to float rounding (each output
// voxel sums its 27 taps in the convolution's order, but the AVX-512 and FMA clones fuse each product and sum into
// one multiply-add, the baseline one does not; the bias is added last); the summed form adds the channels in order.
// Tested against PyTorch.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

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

// What a group of output voxels becomes once its 27 taps are summed (acc, C values per voxel).
struct Epilogue {
  const float* bias = nullptr;  // C values added last, or null
  bool channel_sum = false;     // store the sum over the channels (one value per voxel)
  // M > 0 (the template's): a 1x1 projection to M channels, proj (C, M), then PReLU with one slope; each row's sums of
  // the M outputs go to row_sums (rows, M), in double, so a caller reduces them in a fixed order (deterministic means)
  const float* proj = nullptr;
  float slope = 0.f;
  double* row_sums = nullptr;
};

// The rows [lo, hi) of (B, D, H): taps is (27, C), tap t = (kz * 3 + ky) * 3 + kx. Single: the input has one channel,
// each tap multiplying its one value into all C outputs (else C channels, each with its own tap).
template <int C, bool Single, int M>
UNIPET_CLONES void depthwise_rows(const float* __restrict x, const float* __restrict taps, const Epilogue& e,
                                  float* __restrict out, int64_t lo, int64_t hi, int64_t D, int64_t H, int64_t W) {
  constexpr int64_t kIn = Single ? 1 : C;  // input floats per voxel
  // M > 0: one row of the depthwise result, projected once the row is done
  // (rounded up to whole groups of kVoxels, the spare voxels zero: the projection reads whole groups)
  std::vector<float> row_buffer(M > 0 ? (W + kVoxels - 1) / kVoxels * kVoxels * C : 0);
  float* __restrict row_out = row_buffer.data();
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t b = r / (D * H), z = (r / H) % D, y = r % H;
    const float* rows[9];  // the nine clamped input rows of this output row's 3x3 (z, y) neighbourhood
    for (int kz = 0; kz < 3; ++kz)
      for (int ky = 0; ky < 3; ++ky)
        rows[kz * 3 + ky] = x + ((b * D + clamp_index(z + kz - 1, D)) * H + clamp_index(y + ky - 1, H)) * W * kIn;
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
            const float* __restrict in = rows[rz] + clamp_index(xo + v + kx - 1, W) * kIn;
            if constexpr (Single) {
              const float value = in[0];
#pragma omp simd
              for (int c = 0; c < C; ++c) acc[v][c] += w[c] * value;
            } else {
#pragma omp simd
              for (int c = 0; c < C; ++c) acc[v][c] += w[c] * in[c];
            }
          }
        }
      }
      for (int v = 0; v < n; ++v) {
        if (e.channel_sum) {
          float s = 0.f;
          for (int c = 0; c < C; ++c) s += acc[v][c];
          out[r * W + xo + v] = s;
        } else {
          float* __restrict o = (M > 0 ? row_out : out + r * W * C) + (xo + v) * C;
          if (e.bias != nullptr) {
#pragma omp simd
            for (int c = 0; c < C; ++c) o[c] = acc[v][c] + e.bias[c];
          } else {
#pragma omp simd
            for (int c = 0; c < C; ++c) o[c] = acc[v][c];
          }
        }
      }
      xo += n;
    }
    if constexpr (M > 0) {
      // the projection of the row (still in L1), kVoxels voxels together: independent multiply-add chains. Done here,
      // not on the accumulators above: reading those one by one kept them in memory through the taps (3x slower).
      // VecM, GCC's vector of M floats, holds a voxel's M outputs in one register (or two): with plain arrays the
      // chains went through memory on every multiply-add (the projection cost 2x the depthwise convolution)
      typedef float VecM __attribute__((vector_size(sizeof(float) * M)));
      VecM row_sum = {};  // a row's sums in float (tens to hundreds of voxels), then in double across rows
      for (int64_t v0 = 0; v0 < W; v0 += kVoxels) {
        const int n = static_cast<int>(std::min<int64_t>(kVoxels, W - v0));
        VecM q[kVoxels] = {};
        for (int c = 0; c < C; ++c) {
          VecM pr;
          std::memcpy(&pr, e.proj + c * M, sizeof(VecM));
          for (int v = 0; v < kVoxels; ++v) q[v] += row_out[(v0 + v) * C + c] * pr;  // spare voxels: zeros
        }
        for (int v = 0; v < n; ++v) {
          const VecM h = q[v] > 0.f ? q[v] : e.slope * q[v];
          std::memcpy(out + (r * W + v0 + v) * M, &h, sizeof(VecM));
          row_sum += h;
        }
      }
      alignas(64) float sums[M];
      std::memcpy(sums, &row_sum, sizeof(VecM));
      for (int m = 0; m < M; ++m) e.row_sums[r * M + m] = sums[m];
    }
  }
}

template <int C, bool Single, int M>
void run_rows(const float* x, const float* taps, const Epilogue& e, float* out, int64_t rows, int64_t D, int64_t H,
              int64_t W) {
  at::parallel_for(0, rows, 1, [&](int64_t lo, int64_t hi) {
    depthwise_rows<C, Single, M>(x, taps, e, out, lo, hi, D, H, W);
  });
}

template <bool Single, int M>
void dispatch_rows(int64_t C, const float* x, const float* taps, const Epilogue& e, float* out, int64_t rows, int64_t D,
                   int64_t H, int64_t W) {
  switch (C) {
    case 8: run_rows<8, Single, M>(x, taps, e, out, rows, D, H, W); break;
    case 16: run_rows<16, Single, M>(x, taps, e, out, rows, D, H, W); break;
    case 32: run_rows<32, Single, M>(x, taps, e, out, rows, D, H, W); break;
    default: run_rows<64, Single, M>(x, taps, e, out, rows, D, H, W); break;
  }
}

bool supported_width(int64_t c) { return c == 8 || c == 16 || c == 32 || c == 64; }

}  // namespace

// x: (B, C, D, H, W) float32, channels-last-3d, C one of 8, 16, 32, 64; weight: (C, 1, 3, 3, 3) float32.
// Returns (B, C, D, H, W) channels-last-3d, or (B, 1, D, H, W) with channel_sum.
torch::Tensor depthwise3_replicate(const torch::Tensor& x, const torch::Tensor& weight, bool channel_sum) {
  TORCH_CHECK(x.dim() == 5 && x.scalar_type() == torch::kFloat && x.device().is_cpu(),
              "depthwise3_replicate: x must be a 5-D float32 CPU tensor");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast3d), "depthwise3_replicate: x must be channels-last-3d");
  const int64_t B = x.size(0), C = x.size(1), D = x.size(2), H = x.size(3), W = x.size(4);
  TORCH_CHECK(supported_width(C), "depthwise3_replicate: C must be 8, 16, 32 or 64, got ", C);
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
  Epilogue e;
  e.channel_sum = channel_sum;
  dispatch_rows<false, 0>(C, xp, tp, e, op, B * D * H, D, H, W);
  return out;
}

// x: (B, 1, D, H, W) float32, contiguous; weight: (C, 1, 3, 3, 3) float32, C one of 8, 16, 32, 64; bias: (C,) float32
// or undefined. Returns (B, C, D, H, W) channels-last-3d.
torch::Tensor single_channel_conv3_replicate(const torch::Tensor& x, const torch::Tensor& weight,
                                             const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 5 && x.size(1) == 1 && x.scalar_type() == torch::kFloat && x.device().is_cpu(),
              "single_channel_conv3_replicate: x must be a (B, 1, D, H, W) float32 CPU tensor");
  TORCH_CHECK(x.is_contiguous(), "single_channel_conv3_replicate: x must be contiguous");
  const int64_t B = x.size(0), D = x.size(2), H = x.size(3), W = x.size(4), C = weight.size(0);
  TORCH_CHECK(supported_width(C), "single_channel_conv3_replicate: C must be 8, 16, 32 or 64, got ", C);
  TORCH_CHECK(weight.scalar_type() == torch::kFloat && weight.device().is_cpu() && weight.numel() == C * 27,
              "single_channel_conv3_replicate: weight must be (C, 1, 3, 3, 3) float32 on the CPU");
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || (bias->scalar_type() == torch::kFloat && bias->device().is_cpu() && bias->numel() == C),
              "single_channel_conv3_replicate: bias must be (C,) float32 on the CPU");
  TORCH_CHECK(B == 0 || (D > 0 && H > 0 && W > 0), "single_channel_conv3_replicate: cannot replicate-pad an empty axis");
  auto taps = weight.reshape({C, 27}).t().contiguous();
  auto b = has_bias ? bias->contiguous() : torch::Tensor();
  auto out = torch::empty({B, C, D, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast3d));
  if (out.numel() == 0) return out;
  Epilogue e;
  e.bias = has_bias ? b.data_ptr<float>() : nullptr;
  dispatch_rows<true, 0>(C, x.data_ptr<float>(), taps.data_ptr<float>(), e, out.data_ptr<float>(), B * D * H, D, H, W);
  return out;
}

// x: (B, C, D, H, W) float32, channels-last-3d, C one of 8, 16, 32, 64; weight: (C, 1, 3, 3, 3); proj: (M, C), M 8 or
// 16; slope: one value. Returns PReLU(proj . depthwise3(x)), (B, M, D, H, W) channels-last-3d, and its per-sample,
// per-channel means over the voxels, (B, M) float32.
std::vector<torch::Tensor> depthwise3_project_prelu(const torch::Tensor& x, const torch::Tensor& weight,
                                                    const torch::Tensor& proj, double slope) {
  TORCH_CHECK(x.dim() == 5 && x.scalar_type() == torch::kFloat && x.device().is_cpu(),
              "depthwise3_project_prelu: x must be a 5-D float32 CPU tensor");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast3d), "depthwise3_project_prelu: x must be channels-last-3d");
  const int64_t B = x.size(0), C = x.size(1), D = x.size(2), H = x.size(3), W = x.size(4);
  TORCH_CHECK(supported_width(C), "depthwise3_project_prelu: C must be 8, 16, 32 or 64, got ", C);
  TORCH_CHECK(weight.scalar_type() == torch::kFloat && weight.device().is_cpu() && weight.numel() == C * 27,
              "depthwise3_project_prelu: weight must be (C, 1, 3, 3, 3) float32 on the CPU");
  TORCH_CHECK(proj.dim() == 2 && proj.size(1) == C && (proj.size(0) == 8 || proj.size(0) == 16) &&
                  proj.scalar_type() == torch::kFloat && proj.device().is_cpu(),
              "depthwise3_project_prelu: proj must be (M, C) float32 on the CPU, M 8 or 16");
  TORCH_CHECK(B == 0 || (D > 0 && H > 0 && W > 0), "depthwise3_project_prelu: cannot replicate-pad an empty axis");
  const int64_t M = proj.size(0);
  auto taps = weight.reshape({C, 27}).t().contiguous();
  auto proj_t = proj.t().contiguous();  // (C, M): one input channel's M weights side by side
  auto out = torch::empty({B, M, D, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast3d));
  auto means = torch::zeros({B, M}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t rows = B * D * H;
  if (out.numel() == 0) return {out, means};
  auto row_sums = torch::empty({rows, M}, x.options().dtype(torch::kDouble).memory_format(at::MemoryFormat::Contiguous));
  Epilogue e;
  e.proj = proj_t.data_ptr<float>();
  e.slope = static_cast<float>(slope);
  e.row_sums = row_sums.data_ptr<double>();
  if (M == 8)
    dispatch_rows<false, 8>(C, x.data_ptr<float>(), taps.data_ptr<float>(), e, out.data_ptr<float>(), rows, D, H, W);
  else
    dispatch_rows<false, 16>(C, x.data_ptr<float>(), taps.data_ptr<float>(), e, out.data_ptr<float>(), rows, D, H, W);
  // the rows' sums added in row order, whatever the threads: the same means on any number of cores
  const double* rs = row_sums.data_ptr<double>();
  float* mp = means.data_ptr<float>();
  const int64_t per_sample = D * H;
  const double voxels = static_cast<double>(D * H * W);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t m = 0; m < M; ++m) {
      double s = 0.0;
      for (int64_t r = b * per_sample; r < (b + 1) * per_sample; ++r) s += rs[r * M + m];
      mp[b * M + m] = static_cast<float>(s / voxels);
    }
  }
  return {out, means};
}
