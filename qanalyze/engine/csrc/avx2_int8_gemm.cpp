// Exact int8 x int8 -> int32 GEMM for AVX2 CPUs without VNNI (qanalyze.engine.avx2_gemm builds and loads it).
//
// Why vpmaddwd and not vpmaddubsw: vpmaddubsw (u8 x s8, what oneDNN and FBGEMM use without VNNI) sums pairs of
// products in saturating 16-bit lanes, so signed 8-bit codes on both sides are not exact. vpmaddwd multiplies
// 16-bit lanes and sums pairs in 32 bits: 2 * 127 * 127 never saturates, and it does 16 multiply-adds per
// instruction against 8 for a float32 FMA. The operands are widened to int16 while they are packed.
//
// Layout: B is packed once into panels of NR = 16 columns, k in pairs: panel[kp][col][2]. A is packed per
// block of MC rows into tiles of MR = 4 rows: tile[kp][row][2], so one 32-bit broadcast gives a row's k pair.
// The 4 x 16 tile keeps 8 int32 accumulators, 2 B vectors and the broadcasts in the 16 ymm registers; GCC 12
// spills a 6 x 16 tile's accumulators (measured: no faster than 4 x 16). On an AMD EPYC (Zen 4, capped to
// AVX2 code) a vpmaddwd plus its vpaddd cost 0.51 ns and a float32 FMA 0.32 ns per ymm, so per multiply-add
// this kernel's ceiling is 0.8 times a float32 GEMM's: it reaches it (20 ms against 25 for 2048 x 384 x 1536
// on one thread, MKL capped to AVX2).
// Accumulation is int32: the caller keeps K * max|a| * max|b| < 2**31.
#include <immintrin.h>
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t MR = 4;
constexpr int64_t NR = 16;
constexpr int64_t MC = 64;     // rows per parallel work item: 16 tiles share each B panel while it is in L1
constexpr int64_t KC = 512;    // k per block: a 16 KiB B panel in L1, a 64 KiB A block in L2

// Twelve named accumulators, not an array: GCC keeps an array of __m256i on the stack (measured: a store and
// a reload per multiply-add, 4x slower).
inline void kernel_4x16(const int16_t* a, const int16_t* b, int64_t kpairs, int32_t* c, int64_t ldc, bool add) {
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256i c30 = c00, c31 = c00;
  const int32_t* ap = reinterpret_cast<const int32_t*>(a);
  const __m256i* bp = reinterpret_cast<const __m256i*>(b);
  for (int64_t p = 0; p < kpairs; ++p, ap += MR, bp += 2) {
    const __m256i b0 = _mm256_loadu_si256(bp);
    const __m256i b1 = _mm256_loadu_si256(bp + 1);
    __m256i x;
#define QA_ROW(r)                                              \
    x = _mm256_set1_epi32(ap[r]);                              \
    c##r##0 = _mm256_add_epi32(c##r##0, _mm256_madd_epi16(x, b0)); \
    c##r##1 = _mm256_add_epi32(c##r##1, _mm256_madd_epi16(x, b1));
    QA_ROW(0) QA_ROW(1) QA_ROW(2) QA_ROW(3)
#undef QA_ROW
  }
  const __m256i rows[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
  for (int r = 0; r < MR; ++r) {
    __m256i* out0 = reinterpret_cast<__m256i*>(c + r * ldc);
    __m256i* out1 = reinterpret_cast<__m256i*>(c + r * ldc + 8);
    __m256i v0 = rows[r][0], v1 = rows[r][1];
    if (add) {
      v0 = _mm256_add_epi32(v0, _mm256_loadu_si256(out0));
      v1 = _mm256_add_epi32(v1, _mm256_loadu_si256(out1));
    }
    _mm256_storeu_si256(out0, v0);
    _mm256_storeu_si256(out1, v1);
  }
}

// B (K x N, int8, any strides) -> int16 panels, zero-padded to an even K and a multiple of NR columns. Full
// panels and full k pairs take a loop without bounds checks (GCC vectorizes it for row-major B); only the last
// panel and an odd K's last row check.
void pack_b(const int8_t* b, int64_t k, int64_t n, int64_t sk, int64_t sn, int16_t* out, int64_t kpairs) {
  const int64_t panels = (n + NR - 1) / NR;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      int16_t* dst = out + j * kpairs * 2 * NR;
      const int64_t col0 = j * NR;
      const bool full = col0 + NR <= n;
      for (int64_t p = 0; p < kpairs; ++p) {
        int16_t* row = dst + p * 2 * NR;
        const int8_t* k0 = b + 2 * p * sk + col0 * sn;
        if (full && 2 * p + 1 < k) {
          const int8_t* k1 = k0 + sk;
          for (int64_t col = 0; col < NR; ++col) {
            row[2 * col] = k0[col * sn];
            row[2 * col + 1] = k1[col * sn];
          }
          continue;
        }
        for (int64_t col = 0; col < NR; ++col) {
          const bool in = col0 + col < n;
          row[2 * col] = in ? k0[col * sn] : 0;
          row[2 * col + 1] = (in && 2 * p + 1 < k) ? k0[sk + col * sn] : 0;
        }
      }
    }
  });
}

// rows [row0, row0 + rows) of A, k in [k0, k0 + 2 * kpairs) -> int16 tiles of MR rows, zero-padded.
void pack_a(const int8_t* a, int64_t m, int64_t k, int64_t sm, int64_t sk, int64_t row0, int64_t rows, int64_t k0,
            int64_t kpairs, int16_t* out) {
  const int64_t tiles = (rows + MR - 1) / MR;
  const bool full_k = k0 + 2 * kpairs <= k;
  for (int64_t t = 0; t < tiles; ++t) {
    int16_t* dst = out + t * kpairs * 2 * MR;
    for (int64_t r = 0; r < MR; ++r) {
      const int64_t row = row0 + t * MR + r;
      int16_t* d = dst + 2 * r;
      if (row >= m) {
        for (int64_t p = 0; p < kpairs; ++p) d[p * 2 * MR] = d[p * 2 * MR + 1] = 0;
        continue;
      }
      const int8_t* src = a + row * sm + k0 * sk;
      const int64_t pairs = full_k ? kpairs : (k - k0) / 2;
      for (int64_t p = 0; p < pairs; ++p) {
        d[p * 2 * MR] = src[2 * p * sk];
        d[p * 2 * MR + 1] = src[(2 * p + 1) * sk];
      }
      for (int64_t p = pairs; p < kpairs; ++p) {  // the odd last k, and the zero padding after it
        const int64_t kk = k0 + 2 * p;
        d[p * 2 * MR] = kk < k ? src[2 * p * sk] : 0;
        d[p * 2 * MR + 1] = kk + 1 < k ? src[(2 * p + 1) * sk] : 0;
      }
    }
  }
}

at::Tensor avx2_int8_mm(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dtype() == at::kChar && b.dtype() == at::kChar, "avx2_int8_mm needs int8 operands");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "avx2_int8_mm needs (M, K) @ (K, N)");
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "avx2_int8_mm runs on the CPU");
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  at::Tensor c = at::empty({m, n}, a.options().dtype(at::kInt));
  if (m == 0 || n == 0) return c;
  if (k == 0) return c.zero_();
  const int64_t kpairs = (k + 1) / 2;
  const int64_t panels = (n + NR - 1) / NR;
  std::vector<int16_t> bp(static_cast<size_t>(panels * kpairs * 2 * NR));
  pack_b(b.data_ptr<int8_t>(), k, n, b.stride(0), b.stride(1), bp.data(), kpairs);
  const int8_t* ap = a.data_ptr<int8_t>();
  const int64_t sm = a.stride(0), sk = a.stride(1);
  int32_t* cp = c.data_ptr<int32_t>();
  const int64_t blocks = (m + MC - 1) / MC;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int16_t> apack(static_cast<size_t>(MC * KC));
    int32_t edge[MR * NR];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t row0 = blk * MC, rows = std::min(MC, m - row0);
      const int64_t tiles = (rows + MR - 1) / MR;
      for (int64_t k0 = 0; k0 < k; k0 += KC) {
        const int64_t kp0 = k0 / 2, kps = (std::min(KC, k - k0) + 1) / 2;
        const bool add = k0 > 0;
        pack_a(ap, m, k, sm, sk, row0, rows, k0, kps, apack.data());
        for (int64_t j = 0; j < panels; ++j) {
          const int16_t* bpanel = bp.data() + (j * kpairs + kp0) * 2 * NR;
          const int64_t cols = std::min(NR, n - j * NR);
          for (int64_t t = 0; t < tiles; ++t) {
            const int64_t r0 = row0 + t * MR, trows = std::min(MR, m - r0);
            const int16_t* atile = apack.data() + t * kps * 2 * MR;
            int32_t* ctile = cp + r0 * n + j * NR;
            if (trows == MR && cols == NR) {
              kernel_4x16(atile, bpanel, kps, ctile, n, add);
              continue;
            }
            // an edge tile goes through a full-size buffer, of which only the valid part is copied
            for (int64_t r = 0; r < trows && add; ++r) std::memcpy(edge + r * NR, ctile + r * n, cols * 4);
            kernel_4x16(atile, bpanel, kps, edge, NR, add);
            for (int64_t r = 0; r < trows; ++r) std::memcpy(ctile + r * n, edge + r * NR, cols * 4);
          }
        }
      }
    }
  });
  return c;
}

}  // namespace

TORCH_LIBRARY(qanalyze_avx2, m) { m.def("int8_mm(Tensor a, Tensor b) -> Tensor"); }
TORCH_LIBRARY_IMPL(qanalyze_avx2, CPU, m) { m.impl("int8_mm", &avx2_int8_mm); }
