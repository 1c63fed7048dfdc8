// Exact int8 x int8 -> int32 GEMM for AVX2 CPUs without VNNI (qanalyze.engine.avx2_gemm builds and loads it).
//
// Why vpmaddwd and not vpmaddubsw: vpmaddubsw (u8 x s8, what oneDNN and FBGEMM use without VNNI) sums pairs of
// products in saturating 16-bit lanes, so signed 8-bit codes on both sides are not exact (made exact with 4-bit
// digits, it is slower: avx2_int8_mm_u4 below). vpmaddwd multiplies
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
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
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

// The loop nest both kernels share: row blocks of mc rows spread over the threads, k blocks of kc (each packs its
// A block once for all B panels), B panels of nr columns, tiles of mr rows. pack(row0, rows, k0, kn, out) packs an
// A block into this thread's buffer; tile(apack, t, j, k0, kn, c, ldc, add) runs the micro-kernel on tile t of it
// and panel j. An edge tile goes through a full-size buffer, of which only the valid part is copied.
// finish(row0, rows) runs once a row block's every k block is done, while its rows are still in cache.
template <typename Elem, int64_t mr, int64_t nr, typename Pack, typename Tile, typename Finish>
void run_blocks(int64_t m, int64_t k, int64_t n, int64_t mc, int64_t kc, size_t pack_size, int32_t* cp,
                const Pack& pack, const Tile& tile, const Finish& finish) {
  const int64_t panels = (n + nr - 1) / nr;
  const int64_t blocks = (m + mc - 1) / mc;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<Elem> apack(pack_size);
    int32_t edge[mr * nr];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t row0 = blk * mc, rows = std::min(mc, m - row0);
      const int64_t tiles = (rows + mr - 1) / mr;
      for (int64_t k0 = 0; k0 < k; k0 += kc) {
        const int64_t kn = std::min(kc, k - k0);
        const bool add = k0 > 0;
        pack(row0, rows, k0, kn, apack.data());
        for (int64_t j = 0; j < panels; ++j) {
          const int64_t cols = std::min(nr, n - j * nr);
          for (int64_t t = 0; t < tiles; ++t) {
            const int64_t r0 = row0 + t * mr, trows = std::min(mr, m - r0);
            int32_t* ctile = cp + r0 * n + j * nr;
            if (trows == mr && cols == nr) {
              tile(apack.data(), t, j, k0, kn, ctile, n, add);
              continue;
            }
            for (int64_t r = 0; r < trows && add; ++r) std::memcpy(edge + r * nr, ctile + r * n, cols * 4);
            tile(apack.data(), t, j, k0, kn, edge, nr, add);
            for (int64_t r = 0; r < trows; ++r) std::memcpy(ctile + r * n, edge + r * nr, cols * 4);
          }
        }
      }
      finish(row0, rows);
    }
  });
}

// The epilogue of int8_mm_scaled: rows [row0, row0 + rows) of the int32 product c (ldc n) become, in place,
// float32 c * (rs[i] * cs[j]) + bias[j] (a null rs, cs or bias stands for 1, 1 or no bias). Written as the
// separate roundings of torch's acc.to(float32).mul_(rs * cs).add_(bias): the int32 -> float conversion rounds
// to nearest, the scale product rounds once, then the product, then the sum (no FMA: the library is built
// with -ffp-contract=off).
void scale_rows(int32_t* c, int64_t n, int64_t row0, int64_t rows, const float* rs, const float* cs,
                const float* bias) {
  for (int64_t i = row0; i < row0 + rows; ++i) {
    int32_t* line = c + i * n;
    float* out = reinterpret_cast<float*>(line);  // the same bytes, written after they are read
    const float r = rs ? rs[i] : 1.0f;
    const __m256 rv = _mm256_set1_ps(r);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 s = cs ? _mm256_mul_ps(rv, _mm256_loadu_ps(cs + j)) : rv;
      __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(line + j))), s);
      if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + j));
      _mm256_storeu_ps(out + j, v);
    }
    for (; j < n; ++j) {
      int32_t acc;
      std::memcpy(&acc, line + j, 4);
      float v = static_cast<float>(acc) * (cs ? r * cs[j] : r);
      if (bias) v = v + bias[j];
      std::memcpy(line + j, &v, 4);
    }
  }
}

// The operands' checks, shared by both kernels; the int32 (M, N) result, zero where K == 0 (an empty sum).
at::Tensor checked_output(const at::Tensor& a, const at::Tensor& b, const char* name) {
  TORCH_CHECK(a.dtype() == at::kChar && b.dtype() == at::kChar, name, " needs int8 operands");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), name, " needs (M, K) @ (K, N)");
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), name, " runs on the CPU");
  at::Tensor c = at::empty({a.size(0), b.size(1)}, a.options().dtype(at::kInt));
  return a.size(1) == 0 ? c.zero_() : c;
}

// c = a @ b (int32), then finish(row0, rows) on each block of rows (the whole of c when it is empty or K == 0)
template <typename Finish>
void int8_mm_into(const at::Tensor& a, const at::Tensor& b, at::Tensor& c, const Finish& finish) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  if (m == 0 || n == 0 || k == 0) {
    finish(0, m);
    return;
  }
  const int64_t kpairs = (k + 1) / 2;
  const int64_t panels = (n + NR - 1) / NR;
  std::vector<int16_t> bp(static_cast<size_t>(panels * kpairs * 2 * NR));
  pack_b(b.data_ptr<int8_t>(), k, n, b.stride(0), b.stride(1), bp.data(), kpairs);
  const int8_t* ap = a.data_ptr<int8_t>();
  const int64_t sm = a.stride(0), sk = a.stride(1);
  run_blocks<int16_t, MR, NR>(
      m, k, n, MC, KC, static_cast<size_t>(MC * KC), c.data_ptr<int32_t>(),
      [&](int64_t row0, int64_t rows, int64_t k0, int64_t kn, int16_t* out) {
        pack_a(ap, m, k, sm, sk, row0, rows, k0, (kn + 1) / 2, out);
      },
      [&](const int16_t* apack, int64_t t, int64_t j, int64_t k0, int64_t kn, int32_t* ct, int64_t ldc, bool add) {
        const int64_t kps = (kn + 1) / 2;
        kernel_4x16(apack + t * kps * 2 * MR, bp.data() + (j * kpairs + k0 / 2) * 2 * NR, kps, ct, ldc, add);
      },
      finish);
}

at::Tensor avx2_int8_mm(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor c = checked_output(a, b, "avx2_int8_mm");
  int8_mm_into(a, b, c, [](int64_t, int64_t) {});
  return c;
}

const float* float_vector(const std::optional<at::Tensor>& v, int64_t size, const char* name) {
  if (!v.has_value()) return nullptr;
  TORCH_CHECK(v->dtype() == at::kFloat && v->dim() == 1 && v->size(0) == size && v->is_contiguous(),
              "int8_mm_scaled: ", name, " must be a contiguous float32 vector of ", size, " values");
  return v->data_ptr<float>();
}

// float32(a @ b) * (row_scale[i] * col_scale[j]) + bias[j], each optional: int8_mm with the rescale fused into
// its epilogue, in the int32 result's own memory. The caller keeps the product within int32, as for int8_mm.
at::Tensor avx2_int8_mm_scaled(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& row_scale,
                               const std::optional<at::Tensor>& col_scale, const std::optional<at::Tensor>& bias) {
  at::Tensor c = checked_output(a, b, "avx2_int8_mm_scaled");
  const int64_t m = a.size(0), n = b.size(1);
  const float* rs = float_vector(row_scale, m, "row_scale");
  const float* cs = float_vector(col_scale, n, "col_scale");
  const float* bs = float_vector(bias, n, "bias");
  int32_t* cp = c.data_ptr<int32_t>();
  int8_mm_into(a, b, c, [&](int64_t row0, int64_t rows) { scale_rows(cp, n, row0, rows, rs, cs, bs); });
  return c.view(at::kFloat);
}

// ---------------------------------------------------------------------------------------------------------------
// Second way (issue 26): vpmaddubsw on 4-bit digits. vpmaddubsw multiplies 32 unsigned by 32 signed bytes and sums
// pairs into saturating int16 lanes. A is offset to unsigned, u = a + 128 in 0..255 (a = u - 128, so
// A @ B = U @ B - 128 * colsum(B)), and u is cut into digits u = 16 * h + l, h and l in 0..15. A pair sum of a
// digit times B is at most 2 * 15 * 128 = 3840 in magnitude: never saturates, and 8 of them (30720) still fit
// int16, so 8 steps accumulate in int16 before one vpmaddwd (by 1 for l, by 16 for h) widens them to int32.
// The int32 sums wrap modulo 2**32 (U @ B alone can exceed int32 where A @ B does not), which the offset undoes
// exactly: only the final A @ B has to fit int32, the same contract as the vpmaddwd kernel.
// Layout: B in panels of NRU = 16 columns, k in quads: panel[q][col][4] (two ymm per quad); A in tiles of MRU = 3
// rows: tile[q][row][digit][4], one 32-bit broadcast per row and digit. 3 rows x 2 digits x 2 column halves =
// 12 int16 accumulators + 2 B vectors + 1 broadcast: the 16 ymm registers.
// Measured slower than the vpmaddwd kernel above, so the avx2 path does not use it (benchmarks/kernels_matmul.py,
// variant avx2u_8x8): a vpmaddubsw plus its vpaddw costs what a vpmaddwd plus its vpaddd does (0.277 ns per ymm
// each on the AMD EPYC, 12 independent chains), and both give 16 multiply-adds of 8-bit codes (two digit products
// per product here), so the digits' widening (one vpmaddwd per 8 vpmaddubsw) and the extra broadcasts are pure
// overhead: 0.84x float32 against 0.70x on the six training products, 2 threads.

constexpr int64_t MRU = 3;
constexpr int64_t NRU = 16;
constexpr int64_t MCU = 48;    // rows per parallel work item, a multiple of MRU (384 rows: 8 items, even on 2 threads)
constexpr int64_t KCU = 512;   // k per block, a multiple of 4 * STEPS16
constexpr int64_t STEPS16 = 8; // quads summed in int16 per lane: 8 * 3840 = 30720 < 32768 (9 saturate: tested)

inline __m256i bcast32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);  // why: a 32-bit load of a byte buffer without breaking strict aliasing
  return _mm256_set1_epi32(v);
}

// c (MRU x NRU, int32) = (add ? c : init) + a_tile @ b_panel over `quads` quads of k
inline void kernel_u4_3x16(const uint8_t* a, const int8_t* b, int64_t quads, int32_t* c, int64_t ldc, bool add,
                           const int32_t* init) {
  __m256i s[MRU][2];
  for (int r = 0; r < MRU; ++r)
    for (int g = 0; g < 2; ++g)
      s[r][g] = add ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + r * ldc + 8 * g))
                    : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(init + 8 * g));
  const __m256i ones = _mm256_set1_epi16(1), sixteens = _mm256_set1_epi16(16);
  for (int64_t q0 = 0; q0 < quads; q0 += STEPS16) {
    const int64_t q1 = std::min(quads, q0 + STEPS16);
    __m256i l00 = _mm256_setzero_si256(), l01 = l00, h00 = l00, h01 = l00, l10 = l00, l11 = l00, h10 = l00;
    __m256i h11 = l00, l20 = l00, l21 = l00, h20 = l00, h21 = l00;
    for (int64_t q = q0; q < q1; ++q) {
      const __m256i* bp = reinterpret_cast<const __m256i*>(b + q * 4 * NRU);
      const __m256i b0 = _mm256_loadu_si256(bp), b1 = _mm256_loadu_si256(bp + 1);
      const uint8_t* ap = a + q * MRU * 8;
      __m256i x;
#define QA_ROW(r)                                                              \
      x = bcast32(ap + 8 * r);                                                 \
      l##r##0 = _mm256_add_epi16(l##r##0, _mm256_maddubs_epi16(x, b0));       \
      l##r##1 = _mm256_add_epi16(l##r##1, _mm256_maddubs_epi16(x, b1));       \
      x = bcast32(ap + 8 * r + 4);                                             \
      h##r##0 = _mm256_add_epi16(h##r##0, _mm256_maddubs_epi16(x, b0));       \
      h##r##1 = _mm256_add_epi16(h##r##1, _mm256_maddubs_epi16(x, b1));
      QA_ROW(0) QA_ROW(1) QA_ROW(2)
#undef QA_ROW
    }
#define QA_WIDEN(r, g) \
    s[r][g] = _mm256_add_epi32(s[r][g], _mm256_add_epi32(_mm256_madd_epi16(l##r##g, ones), _mm256_madd_epi16(h##r##g, sixteens)));
    QA_WIDEN(0, 0) QA_WIDEN(0, 1) QA_WIDEN(1, 0) QA_WIDEN(1, 1) QA_WIDEN(2, 0) QA_WIDEN(2, 1)
#undef QA_WIDEN
  }
  for (int r = 0; r < MRU; ++r)
    for (int g = 0; g < 2; ++g) _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * ldc + 8 * g), s[r][g]);
}

// B (K x N, int8, any strides) -> panels[j][q][col][4], zero-padded; init[col] = -128 * colsum(B), mod 2**32.
// k outer, columns inner: a row-major B is read along its rows (column by column over all of K re-read each cache
// line 16 times from L2: measured 1.4x slower on the weight gradient's product), a column-major B touches only
// the panel's 16 columns' lines.
void pack_b_u4(const int8_t* b, int64_t k, int64_t n, int64_t sk, int64_t sn, int8_t* out, int64_t quads,
               int32_t* init) {
  const int64_t panels = (n + NRU - 1) / NRU;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      int8_t* dst = out + j * quads * 4 * NRU;
      const int64_t col0 = j * NRU, cols = std::min(NRU, n - col0);
      uint32_t sums[NRU] = {};  // unsigned: the wrap modulo 2**32 is defined
      for (int64_t q = 0; q < quads; ++q) {
        for (int64_t i = 0; i < 4; ++i) {
          const int64_t kk = 4 * q + i;
          const int8_t* src = b + kk * sk + col0 * sn;
          for (int64_t col = 0; col < NRU; ++col) {
            const int8_t v = (col < cols && kk < k) ? src[col * sn] : 0;
            dst[(q * NRU + col) * 4 + i] = v;
            sums[col] += static_cast<uint32_t>(static_cast<int32_t>(v));
          }
        }
      }
      for (int64_t col = 0; col < cols; ++col) init[col0 + col] = static_cast<int32_t>(sums[col] * 0xFFFFFF80u);
    }
  });
}

// rows [row0, row0 + rows) of A, k in [k0, k0 + 4 * quads) -> digit tiles [t][q][row][l, h][4], zero-padded
void pack_a_u4(const int8_t* a, int64_t m, int64_t k, int64_t sm, int64_t sk, int64_t row0, int64_t rows, int64_t k0,
               int64_t quads, uint8_t* out) {
  const int64_t tiles = (rows + MRU - 1) / MRU;
  const int64_t kend = std::min(k, k0 + 4 * quads);
  for (int64_t t = 0; t < tiles; ++t) {
    uint8_t* dst = out + t * quads * MRU * 8;
    for (int64_t r = 0; r < MRU; ++r) {
      const int64_t row = row0 + t * MRU + r;
      uint8_t* d = dst + 8 * r;
      const int8_t* src = a + row * sm;
      for (int64_t q = 0; q < quads; ++q) {
        for (int64_t i = 0; i < 4; ++i) {
          const int64_t kk = k0 + 4 * q + i;
          // padding: u = 0 (B is zero there too, and rows past m are never stored)
          const uint8_t u = (row < m && kk < kend) ? static_cast<uint8_t>(src[kk * sk] + 128) : 0;
          d[q * MRU * 8 + i] = u & 15;
          d[q * MRU * 8 + 4 + i] = u >> 4;
        }
      }
    }
  }
}

at::Tensor avx2_int8_mm_u4(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor c = checked_output(a, b, "avx2_int8_mm_u4");
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  if (m == 0 || n == 0 || k == 0) return c;
  const int64_t quads = (k + 3) / 4;
  const int64_t panels = (n + NRU - 1) / NRU;
  std::vector<int8_t> bp(static_cast<size_t>(panels * quads * 4 * NRU));
  std::vector<int32_t> init(static_cast<size_t>(panels * NRU));
  pack_b_u4(b.data_ptr<int8_t>(), k, n, b.stride(0), b.stride(1), bp.data(), quads, init.data());
  const int8_t* ap = a.data_ptr<int8_t>();
  const int64_t sm = a.stride(0), sk = a.stride(1);
  run_blocks<uint8_t, MRU, NRU>(
      m, k, n, MCU, KCU, static_cast<size_t>(MCU * KCU * 2), c.data_ptr<int32_t>(),
      [&](int64_t row0, int64_t rows, int64_t k0, int64_t kn, uint8_t* out) {
        pack_a_u4(ap, m, k, sm, sk, row0, rows, k0, (kn + 3) / 4, out);
      },
      [&](const uint8_t* apack, int64_t t, int64_t j, int64_t k0, int64_t kn, int32_t* ct, int64_t ldc, bool add) {
        const int64_t qs = (kn + 3) / 4;
        kernel_u4_3x16(apack + t * qs * MRU * 8, bp.data() + (j * quads + k0 / 4) * 4 * NRU, qs, ct, ldc, add,
                       init.data() + j * NRU);
      },
      [](int64_t, int64_t) {});
  return c;
}

// ---------------------------------------------------------------------------------------------------------------
// Issue 26's third way: the quantization around the products in one pass. quantize_codes gives the codes of
// qanalyze.engine.functions.integer_codes, clamp(round(x / s), -qmax, qmax) (round: to nearest, ties to even) or,
// with levels (the int16 draws of qanalyze.quant.primitives.uniform_noise), stochastic rounding
// floor(v) + [u < v - floor(v)] with u = (level + 32768.5) / 65536, as int8 (qmax <= 127) or int16: the same
// IEEE operations in the same order as the torch ops it replaces (a true division, not a reciprocal; exact u),
// so the codes are identical, in one read of x (and of the levels) and one write instead of four to seven passes.

// 8 int32 codes (within int16) -> 8 int8 / int16 in memory order; the saturating packs never saturate here
inline void store_codes(int16_t* out, __m256i v) {
  const __m256i words = _mm256_permute4x64_epi64(_mm256_packs_epi32(v, v), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(words));
}

inline void store_codes(int8_t* out, __m256i v) {
  const __m128i words = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packs_epi32(v, v), 0x08));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packs_epi16(words, words));
}

// len values of x with one scale s (levels: null for nearest rounding)
template <typename Out>
void quantize_span(const float* x, float s, float q, const int16_t* levels, Out* out, int64_t len) {
  constexpr float offset = 32768.5f, step = 1.0f / 65536.0f;
  const __m256 sv = _mm256_set1_ps(s), hi = _mm256_set1_ps(q), lo = _mm256_set1_ps(-q);
  const __m256 off = _mm256_set1_ps(offset), stp = _mm256_set1_ps(step), one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    __m256 v = _mm256_div_ps(_mm256_loadu_ps(x + i), sv);
    if (levels) {
      const __m256 low = _mm256_floor_ps(v);
      const __m256 frac = _mm256_sub_ps(v, low);
      const __m256i l32 = _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(levels + i)));
      const __m256 u = _mm256_mul_ps(_mm256_add_ps(_mm256_cvtepi32_ps(l32), off), stp);
      v = _mm256_add_ps(low, _mm256_and_ps(_mm256_cmp_ps(u, frac, _CMP_LT_OQ), one));
    } else {
      v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    store_codes(out + i, _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi)));
  }
  for (; i < len; ++i) {
    float v = x[i] / s;
    if (levels) {
      const float low = std::floor(v);
      const float u = (static_cast<float>(levels[i]) + offset) * step;
      v = low + (u < v - low ? 1.0f : 0.0f);
    } else {
      v = std::nearbyint(v);
    }
    out[i] = static_cast<Out>(static_cast<int32_t>(std::min(std::max(v, -q), q)));
  }
}

constexpr int64_t QUANTIZE_GRAIN = 1 << 15;  // values per parallel work item

template <typename Out>
void quantize_all(const at::Tensor& x, const at::Tensor& scale, float q, const int16_t* levels, at::Tensor& out) {
  const float* xp = x.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  Out* op = out.data_ptr<Out>();
  if (scale.numel() == 1) {
    at::parallel_for(0, x.numel(), QUANTIZE_GRAIN, [&](int64_t begin, int64_t end) {
      quantize_span(xp + begin, sp[0], q, levels ? levels + begin : nullptr, op + begin, end - begin);
    });
    return;
  }
  const int64_t cols = x.size(1);
  at::parallel_for(0, x.size(0), std::max<int64_t>(1, QUANTIZE_GRAIN / std::max<int64_t>(cols, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      quantize_span(xp + r * cols, sp[r], q, levels ? levels + r * cols : nullptr, op + r * cols, cols);
  });
}

// x: contiguous float32; scale: float32, one value, or one per row of a 2-D x; levels: contiguous int16 of x's
// size, or none for nearest rounding.
at::Tensor quantize_codes(const at::Tensor& x, const at::Tensor& scale, int64_t qmax,
                          const std::optional<at::Tensor>& levels) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "quantize_codes needs a contiguous float32 CPU tensor");
  TORCH_CHECK(qmax >= 1 && qmax <= 32767, "quantize_codes: qmax must be in 1..32767, not ", qmax);
  TORCH_CHECK(scale.dtype() == at::kFloat && scale.is_contiguous() &&
                  (scale.numel() == 1 || (x.dim() == 2 && scale.numel() == x.size(0))),
              "quantize_codes: scale must be float32 with one value, or one per row of a matrix");
  const int16_t* lp = nullptr;
  if (levels.has_value()) {
    TORCH_CHECK(levels->dtype() == at::kShort && levels->is_contiguous() && levels->numel() == x.numel(),
                "quantize_codes: levels must be contiguous int16 with x's number of values");
    lp = levels->data_ptr<int16_t>();
  }
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(qmax <= 127 ? at::kChar : at::kShort));
  if (x.numel() == 0) return out;
  const float q = static_cast<float>(qmax);
  if (qmax <= 127) {
    quantize_all<int8_t>(x, scale, q, lp, out);
  } else {
    quantize_all<int16_t>(x, scale, q, lp, out);
  }
  return out;
}

// The integer layer norm's forward after its quantization (qanalyze.engine.functions.IntLayerNormFunction), row by
// row: exact int64 sums of q and q^2, then in double, in torch's order of operations, mean = sum1 / w,
// var = (sum2 / w - mean * mean) * (s * s), rstd = 1 / sqrt(var + eps), xhat = float(((q - mean) * s) * rstd),
// y = xhat * gamma (+ bias) in float32. Returns (xhat, y, float32 rstd (rows, 1)).
template <typename Code>
void layer_norm_rows(const Code* q, const float* scale, const float* gamma, const float* bias, double eps,
                     int64_t width, int64_t begin, int64_t end, float* xhat, float* y, float* rstd_out) {
  for (int64_t r = begin; r < end; ++r) {
    const Code* row = q + r * width;
    int64_t sum1 = 0, sum2 = 0;
    for (int64_t j = 0; j < width; ++j) {
      const int64_t v = row[j];
      sum1 += v;
      sum2 += v * v;
    }
    const double w = static_cast<double>(width), s = static_cast<double>(scale[r]);
    const double mean = static_cast<double>(sum1) / w;
    const double var = (static_cast<double>(sum2) / w - mean * mean) * (s * s);
    const double rstd = 1.0 / std::sqrt(var + eps);
    rstd_out[r] = static_cast<float>(rstd);
    float* xr = xhat + r * width;
    float* yr = y + r * width;
    for (int64_t j = 0; j < width; ++j) {
      const float h = static_cast<float>(((static_cast<double>(row[j]) - mean) * s) * rstd);
      xr[j] = h;
      const float t = h * gamma[j];
      yr[j] = bias ? t + bias[j] : t;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_codes(const at::Tensor& q, const at::Tensor& scale,
                                                                const at::Tensor& gamma,
                                                                const std::optional<at::Tensor>& bias, double eps) {
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && (q.dtype() == at::kChar || q.dtype() == at::kShort),
              "layer_norm_codes needs contiguous int8 or int16 codes (rows, width)");
  const int64_t rows = q.size(0), width = q.size(1);
  auto vector = [](const at::Tensor& v, int64_t size) {
    return v.dtype() == at::kFloat && v.dim() == 1 && v.size(0) == size && v.is_contiguous();
  };
  TORCH_CHECK(vector(scale, rows) && vector(gamma, width) && (!bias.has_value() || vector(*bias, width)),
              "layer_norm_codes: scale (rows), gamma and bias (width) must be contiguous float32 vectors");
  at::Tensor xhat = at::empty({rows, width}, q.options().dtype(at::kFloat));
  at::Tensor y = at::empty({rows, width}, xhat.options());
  at::Tensor rstd = at::empty({rows, 1}, xhat.options());
  const float* sp = scale.data_ptr<float>();
  const float* gp = gamma.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float *hp = xhat.data_ptr<float>(), *yp = y.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, QUANTIZE_GRAIN / std::max<int64_t>(width, 1)),
                   [&](int64_t begin, int64_t end) {
    if (q.dtype() == at::kChar) {
      layer_norm_rows(q.data_ptr<int8_t>(), sp, gp, bp, eps, width, begin, end, hp, yp, rp);
    } else {
      layer_norm_rows(q.data_ptr<int16_t>(), sp, gp, bp, eps, width, begin, end, hp, yp, rp);
    }
  });
  return {xhat, y, rstd};
}

}  // namespace

TORCH_LIBRARY(qanalyze_avx2, m) {
  m.def("int8_mm(Tensor a, Tensor b) -> Tensor");
  m.def("int8_mm_u4(Tensor a, Tensor b) -> Tensor");
  m.def("int8_mm_scaled(Tensor a, Tensor b, Tensor? row_scale, Tensor? col_scale, Tensor? bias) -> Tensor");
  m.def("quantize_codes(Tensor x, Tensor scale, int qmax, Tensor? levels) -> Tensor");
  m.def("layer_norm_codes(Tensor q, Tensor scale, Tensor gamma, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(qanalyze_avx2, CPU, m) {
  m.impl("int8_mm", &avx2_int8_mm);
  m.impl("int8_mm_u4", &avx2_int8_mm_u4);
  m.impl("int8_mm_scaled", &avx2_int8_mm_scaled);
  m.impl("quantize_codes", &quantize_codes);
  m.impl("layer_norm_codes", &layer_norm_codes);
}
