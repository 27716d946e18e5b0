// The memory rule's chunk loop on the CPU: the compiled form of torch_scan.py.
//
// Same math, stage for stage, as torch_scan.py (anchor_forward, _read_forward, _state_forward and _chunk_backward;
// derivation: docs/MEMORY_RULE.md). What differs is how the work is laid out. The torch loop runs ~100 tensor ops per
// chunk over every (sequence, head) row's state at once: PyTorch's per-op dispatch and its passes over 1-2 MiB of
// state were most of its time (docs/PERFORMANCE.md). Here a thread walks the chunks of a *group* of rows, one
// vector's lanes (16 float32 with AVX-512, 8 without): every quantity of the chunk (a token's key, a weight of the
// state, a gate) is held as one SIMD vector with one lane per row, so every product and every elementwise function
// is lane-wise (no horizontal sums, no layout transposes), and the group's state stays in the core's L2 while its
// chunks go by.
//
// Covered: any depth L <= 8, window 1, losses l2 and dot, activations gelu and silu, residual or not, normalize_step
// (the chunk-summed step bound's per-token scale) or not, a separate
// anchor for chunk 0 (a stream continued mid-chunk), float32 and float64. cpu_scan.py compiles this file with the
// system's C++ compiler on first use, calls it through ctypes, lays the tensors out in lanes, and runs the torch loop
// for anything else.
//
// Layouts (contiguous; lanes innermost: "x V" below is one vector of LANES rows): tokens [nc, groups, n, D] x V;
// per-token coefficients [nc, groups, n] x V (G [nc, groups, n, n] x V); per-chunk ones [nc, groups] x V; states
// [groups, 2 O, I] x V per layer ([W; S], W [O, I]); anchors and last anchors [groups, O, I] x V.
//
// Also here (its own section at the end): the per-token reads of Moneta and Memora for dense_scan.py.
//
// The backward keeps nothing from the forward but its inputs: it runs each group's forward again, a segment of
// chunks at a time, keeping that segment's states and activations (scan_backward).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int MAXL = 8;
enum { ACT_GELU = 0, ACT_SILU = 1 };
enum { LOSS_L2 = 0, LOSS_DOT = 1 };

struct Spec {
  int64_t L, n, nc, groups, threads;
  int64_t dims[MAXL + 1];  // widths K, hidden..., V: layer l maps dims[l] -> dims[l + 1]
  bool residual, has_A, normalize;
  int act, loss;
};

// one vector of lanes (rows), MNEMOS_VECTOR_BYTES wide: the machine's widest vector register where it has 512-bit
// ones (-march=native defines __AVX512F__), else 32 bytes (AVX2's; on a CPU without AVX-512 a 64-byte vector is two
// registers, and the kernel's loops of many live vectors spill: docs/PERFORMANCE.md, "The compiled loop's vector
// width"). Every
// tensor the kernel touches starts on a 64-byte boundary (cpu_scan.py checks) and every offset into it is a whole
// number of vectors. cpu_scan.py reads the lane counts back (mnemos_scan_lanes_*) to lay its tensors out.
#ifndef MNEMOS_VECTOR_BYTES
#if defined(__AVX512F__)
#define MNEMOS_VECTOR_BYTES 64
#else
#define MNEMOS_VECTOR_BYTES 32
#endif
#endif
constexpr int kVectorBytes = MNEMOS_VECTOR_BYTES;
static_assert(kVectorBytes == 16 || kVectorBytes == 32 || kVectorBytes == 64, "MNEMOS_VECTOR_BYTES: 16, 32 or 64");

template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  static constexpr int N = kVectorBytes / 4;
  typedef float V __attribute__((vector_size(kVectorBytes)));
  typedef int32_t I __attribute__((vector_size(kVectorBytes)));
};
template <>
struct Lanes<double> {
  static constexpr int N = kVectorBytes / 8;
  typedef double V __attribute__((vector_size(kVectorBytes)));
  typedef int64_t I __attribute__((vector_size(kVectorBytes)));
};

template <typename V>
using Scalar = typename std::decay<decltype(std::declval<V&>()[0])>::type;

template <typename V, typename S>
inline V splat(S s) {
  return V{} + static_cast<Scalar<V>>(s);
}

// ---------------------------------------------------------------------------------------------------------------------
// activations: value and derivatives, lane-wise. float32 uses its own exp and erf, branch-free so that they stay
// vector code (exp: Cephes' polynomial, relative error < 2e-7; erf: Abramowitz & Stegun 7.1.26, absolute error
// < 1.5e-7); float64 takes the C library's, lane by lane.

typedef Lanes<float>::V vf;
typedef Lanes<float>::I vi;
typedef Lanes<double>::V vd;

inline vf vexp(vf x) {
  x = x < -87.0f ? splat<vf>(-87.0f) : x;  // (a NaN stays NaN: the comparison is false)
#if defined(__AVX512F__) && MNEMOS_VECTOR_BYTES == 64
  {
    // exp(x) = 2^n e^r with n = round(x / ln 2), r = x - n ln 2 (ln 2 in two parts: r exact to float rounding);
    // vscalefps multiplies by 2^n (inf past the range) and vrndscaleps rounds: 15 vector operations, against 24
    // with the exponent built from integers below (Memora's kl read runs one exp per state entry and token)
    const __m512 n = _mm512_roundscale_ps((__m512)(x * 1.44269504088896341f), _MM_FROUND_TO_NEAREST_INT |
                                                                             _MM_FROUND_NO_EXC);
    const vf nv = (vf)n;
    const vf r = x - nv * 0.693359375f + nv * 2.12194440e-4f;
    const vf z = r * r;
    vf y = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
            1.6666665459e-1f) * r + 5.0000001201e-1f;
    y = y * z + r + 1.0f;
    return (vf)_mm512_scalef_ps((__m512)y, n);
  }
#endif
  x = x > 88.0f ? splat<vf>(88.0f) : x;
  vf t = x * 1.44269504088896341f + 0.5f;
  vf fx = __builtin_convertvector(__builtin_convertvector(t, vi), vf);  // truncation
  fx = fx > t ? fx - 1.0f : fx;                                         // floor
  vf r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  vf z = r * r;
  vf y = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
          1.6666665459e-1f) * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  vi e = (__builtin_convertvector(fx, vi) + 127) << 23;
  return y * (vf)e;
}

inline vd vexp(vd x) {
  for (int r = 0; r < Lanes<double>::N; ++r) x[r] = std::exp(x[r]);
  return x;
}

// phi(x) = exp(-x^2 / 2) / sqrt(2 pi), Phi(x) = (1 + erf(x / sqrt 2)) / 2
inline void normal(vf x, vf& phi, vf& Phi) {
  vf ax = (x < 0.0f ? -x : x) * 0.70710678118654752f;
  vf t = 1.0f / (1.0f + 0.3275911f * ax);
  vf g = vexp(-0.5f * x * x);
  vf poly = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f) * t;
  vf erf_abs = 1.0f - poly * g;
  Phi = 0.5f * (1.0f + (x < 0.0f ? -erf_abs : erf_abs));
  phi = g * 0.39894228040143268f;
}

inline void normal(vd x, vd& phi, vd& Phi) {
  for (int r = 0; r < Lanes<double>::N; ++r) {
    Phi[r] = 0.5 * (1.0 + std::erf(x[r] * 0.70710678118654752));
    phi[r] = std::exp(-0.5 * x[r] * x[r]) * 0.39894228040143268;
  }
}

template <typename V>
inline V sigmoid(V x) {
  return 1.0 / (1.0 + vexp(-x));
}
template <>
inline vf sigmoid(vf x) {
  return 1.0f / (1.0f + vexp(-x));
}

template <typename V>
inline void act_fwd(int act, V x, V& y, V& dy) {  // y = act(x), dy = act'(x)
  typedef Scalar<V> T;
  if (act == ACT_GELU) {  // gelu = x Phi, gelu' = Phi + x phi
    V phi, Phi;
    normal(x, phi, Phi);
    y = x * Phi;
    dy = Phi + x * phi;
  } else {  // silu = x s, silu' = s (1 + x (1 - s))
    V s = sigmoid(x);
    y = x * s;
    dy = s * (T(1) + x * (T(1) - s));
  }
}

template <typename V>
inline V act_value(int act, V x) {
  V y, dy;
  act_fwd(act, x, y, dy);
  return y;
}

template <typename V>
inline V act_grad(int act, V x) {
  V y, dy;
  act_fwd(act, x, y, dy);
  return dy;
}

template <typename V>
inline V act_grad2(int act, V x) {
  typedef Scalar<V> T;
  if (act == ACT_GELU) {  // gelu'' = phi (2 - x^2)
    V phi, Phi;
    normal(x, phi, Phi);
    return phi * (T(2) - x * x);
  }
  V s = sigmoid(x);  // silu'' = s (1 - s) (2 + x (1 - 2 s))
  return s * (T(1) - s) * (T(2) + x * (T(1) - T(2) * s));
}

// ---------------------------------------------------------------------------------------------------------------------
// the one product: C[i, j] = (acc ? C[i, j] : 0) + alpha * sum_p A(i, p) B(j, p), lane-wise, with strided operands
// A(i, p) = A[i sai + p sap], B(j, p) = B[j sbj + p sbp] (so A B^T, A B and A^T B are all this), in 4 x 4 blocks
// held in registers

template <typename V>
void gemm(V* C, int64_t ldc, const V* A, int64_t sai, int64_t sap, const V* B, int64_t sbj, int64_t sbp, int64_t m,
          int64_t n, int64_t k, bool acc, Scalar<V> alpha) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      V s[4][4] = {};
      for (int64_t p = 0; p < k; ++p) {
        V a[4], b[4];
        for (int u = 0; u < 4; ++u) a[u] = A[(i + u) * sai + p * sap];
        for (int u = 0; u < 4; ++u) b[u] = B[(j + u) * sbj + p * sbp];
        for (int u = 0; u < 4; ++u)
          for (int w = 0; w < 4; ++w) s[u][w] += a[u] * b[w];
      }
      for (int u = 0; u < 4; ++u)
        for (int w = 0; w < 4; ++w) {
          V& c = C[(i + u) * ldc + j + w];
          c = acc ? c + alpha * s[u][w] : alpha * s[u][w];
        }
    }
    for (; j < n; ++j) {
      V s[4] = {};
      for (int64_t p = 0; p < k; ++p) {
        V b = B[j * sbj + p * sbp];
        for (int u = 0; u < 4; ++u) s[u] += A[(i + u) * sai + p * sap] * b;
      }
      for (int u = 0; u < 4; ++u) {
        V& c = C[(i + u) * ldc + j];
        c = acc ? c + alpha * s[u] : alpha * s[u];
      }
    }
  }
  for (; i < m; ++i) {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      V s[4] = {};
      for (int64_t p = 0; p < k; ++p) {
        V a = A[i * sai + p * sap];
        for (int w = 0; w < 4; ++w) s[w] += a * B[(j + w) * sbj + p * sbp];
      }
      for (int w = 0; w < 4; ++w) {
        V& c = C[i * ldc + j + w];
        c = acc ? c + alpha * s[w] : alpha * s[w];
      }
    }
    for (; j < n; ++j) {
      V s = {};
      for (int64_t p = 0; p < k; ++p) s += A[i * sai + p * sap] * B[j * sbj + p * sbp];
      V& c = C[i * ldc + j];
      c = acc ? c + alpha * s : alpha * s;
    }
  }
}

// C[m, n] (+)= alpha A[m, k] B[n, k]^T
template <typename V>
inline void mm_abt(V* C, const V* A, const V* B, int64_t m, int64_t n, int64_t k, bool acc, Scalar<V> alpha) {
  gemm(C, n, A, k, 1, B, k, 1, m, n, k, acc, alpha);
}
// C[m, n] (+)= alpha A[m, k] B[k, n]
template <typename V>
inline void mm_ab(V* C, const V* A, const V* B, int64_t m, int64_t n, int64_t k, bool acc, Scalar<V> alpha) {
  gemm(C, n, A, k, 1, B, 1, n, m, n, k, acc, alpha);
}
// C[m, n] (+)= alpha A[k, m]^T B[k, n]
template <typename V>
inline void mm_atb(V* C, const V* A, const V* B, int64_t m, int64_t n, int64_t k, bool acc, Scalar<V> alpha) {
  gemm(C, n, A, 1, m, B, 1, n, m, n, k, acc, alpha);
}

template <typename V>
inline V sum(const V* x, const V* y, int64_t k) {  // lane-wise sum_p x[p] y[p]
  V s0 = {}, s1 = {};
  int64_t p = 0;
  for (; p + 2 <= k; p += 2) {
    s0 += x[p] * y[p];
    s1 += x[p + 1] * y[p + 1];
  }
  if (p < k) s0 += x[p] * y[p];
  return s0 + s1;
}

// ---------------------------------------------------------------------------------------------------------------------
// one group's chunk: its inputs, its activations, the three stages

template <typename V>
struct Chunk {  // one (chunk, group)'s inputs
  const V *q, *k, *v, *b, *f, *G, *gl, *pl;
  V bl, el, fl;
};

template <typename V>
Chunk<V> chunk_at(const Spec& s, V* const* in, int64_t c, int64_t g) {
  const int64_t cg = c * s.groups + g, n = s.n, K = s.dims[0], Vd = s.dims[s.L];
  Chunk<V> x;
  x.q = in[0] + cg * n * K;
  x.k = in[1] + cg * n * K;
  x.v = in[2] + cg * n * Vd;
  x.b = in[3] + cg * n;
  x.f = in[4] + cg * n;
  x.G = in[5] + cg * n * n;
  x.bl = in[6][cg];
  x.el = in[7][cg];
  x.fl = in[8][cg];
  x.gl = in[9] + cg * n;
  x.pl = in[10] + cg * n;
  return x;
}

template <typename V>
struct Work {  // one group's activations of one chunk and the backward's scratch; allocated once per thread
  std::vector<V> buf;
  // per layer l (O = dims[l + 1], I = dims[l]): a [n, I] (a[0] = k), d [n, O], x [n, I] (x[0] = q), xw [n, 2 O]
  // (x W^T | x S^T), p [n, n], y [n, O] (the read's pre-activation); per hidden layer: z, dact, back [n, O];
  // backward: dd [n, O], da [n, I], dz [n, O]; shared: rW, rS, dy, dx, pred, cg, cp [n, max(n, widths)], dM [n, n]
  V *a[MAXL], *d[MAXL], *x[MAXL], *xw[MAXL], *p[MAXL], *y[MAXL], *z[MAXL], *dact[MAXL], *back[MAXL];
  V *dd[MAXL], *da[MAXL], *dz[MAXL], *rW, *rS, *dy, *dx, *pred, *cg, *cp, *dM;
  V *du[MAXL], *sc;  // the errors the update uses (d sc; d itself without normalize_step) and sc [n]

  static int64_t size(const Spec& s) {  // in vectors
    const int64_t n = s.n;
    int64_t maxw = n;  // the shared buffers also hold [n, n] products
    for (int l = 0; l <= s.L; ++l) maxw = std::max(maxw, s.dims[l]);
    int64_t total = 7 * n * maxw + n * n + n;
    for (int l = 0; l < s.L; ++l) total += n * (3 * s.dims[l] + 10 * s.dims[l + 1] + n);
    return total;
  }

  explicit Work(const Spec& s) {
    buf.assign(size(s), V{});
    lay_out(s, buf.data());
  }

  Work(const Spec& s, V* memory) { lay_out(s, memory); }  // on size(s) vectors the caller owns

  void lay_out(const Spec& s, V* at) {
    const int64_t n = s.n;
    int64_t maxw = n;
    for (int l = 0; l <= s.L; ++l) maxw = std::max(maxw, s.dims[l]);
    auto take = [&](int64_t count) {
      V* out = at;
      at += count;
      return out;
    };
    for (int l = 0; l < s.L; ++l) {
      const int64_t O = s.dims[l + 1], I = s.dims[l];
      a[l] = take(n * I);
      x[l] = take(n * I);
      da[l] = take(n * I);
      d[l] = take(n * O);
      xw[l] = take(n * 2 * O);
      p[l] = take(n * n);
      y[l] = take(n * O);
      z[l] = take(n * O);
      dact[l] = take(n * O);
      back[l] = take(n * O);
      dd[l] = take(n * O);
      dz[l] = take(n * O);
      du[l] = s.normalize ? take(n * O) : d[l];
    }
    sc = take(n);
    rW = take(n * maxw);
    rS = take(n * maxw);
    dy = take(n * maxw);
    dx = take(n * maxw);
    pred = take(n * maxw);
    cg = take(n * maxw);
    cp = take(n * maxw);
    dM = take(n * n);
  }
};

// normalize_step (torch_scan.step_scale): token j's update is du_l = sc_j d_l with sc_j = 1 / max(1, rho_j),
// rho_j = sum_l |a_l[j]|^2 |d_l[j]|^2 / |d_L[j]|^2, the curvature of its step at the anchor
template <typename V>
inline V squared_norm(const V* x, int64_t k) {
  return sum(x, x, k);
}

template <typename V>
void step_scale(const Spec& s, Work<V>& w) {
  typedef Scalar<V> T;
  const int64_t n = s.n, L = s.L;
  for (int64_t j = 0; j < n; ++j) {
    V num = {};
    for (int l = 0; l < L; ++l)
      num += squared_norm(w.a[l] + j * s.dims[l], s.dims[l]) * squared_norm(w.d[l] + j * s.dims[l + 1], s.dims[l + 1]);
    V q = squared_norm(w.d[L - 1] + j * s.dims[L], s.dims[L]);
    q = q < T(1e-30) ? splat<V>(1e-30) : q;
    V rho = num / q;
    w.sc[j] = T(1) / (rho < T(1) ? splat<V>(1) : rho);
  }
  for (int l = 0; l < L; ++l) {
    const int64_t O = s.dims[l + 1];
    for (int64_t j = 0; j < n; ++j)
      for (int64_t o = 0; o < O; ++o) w.du[l][j * O + o] = w.sc[j] * w.d[l][j * O + o];
  }
}

// its reverse (torch_scan._step_scale_backward): on entry dd[l] holds the gradient of du_l and da[l] that of a_l from
// the read and the state; on return dd[l] holds the gradient of d_l and da[l] has the scale's share added
template <typename V>
void step_scale_backward(const Spec& s, Work<V>& w) {
  typedef Scalar<V> T;
  const int64_t n = s.n, L = s.L;
  for (int64_t j = 0; j < n; ++j) {
    V g_s = {};
    for (int l = 0; l < L; ++l) g_s += sum(w.dd[l] + j * s.dims[l + 1], w.d[l] + j * s.dims[l + 1], s.dims[l + 1]);
    const V sc = w.sc[j];
    V g_rho = sc < T(1) ? -g_s * sc * sc : V{};  // d sc / d rho = -1 / rho^2 = -sc^2 where rho > 1
    V q = squared_norm(w.d[L - 1] + j * s.dims[L], s.dims[L]);
    q = q < T(1e-30) ? splat<V>(1e-30) : q;
    V c = T(2) * g_rho / q;
    for (int l = 0; l < L; ++l) {
      const int64_t O = s.dims[l + 1], I = s.dims[l];
      V *ddj = w.dd[l] + j * O, *daj = w.da[l] + j * I;
      const V *dj = w.d[l] + j * O, *aj = w.a[l] + j * I;
      const V ca = c * squared_norm(aj, I), cd = c * squared_norm(dj, O);
      for (int64_t o = 0; o < O; ++o) ddj[o] = ddj[o] * sc + ca * dj[o];
      for (int64_t i = 0; i < I; ++i) daj[i] += cd * aj[i];
    }
    const int64_t VL = s.dims[L];  // rho's denominator |d_L|^2 (c is 0 wherever rho <= 1, and rho = 1 / sc elsewhere)
    V* ddL = w.dd[L - 1] + j * VL;
    const V* dL = w.d[L - 1] + j * VL;
    const V cs = c / sc;
    for (int64_t o = 0; o < VL; ++o) ddL[o] -= cs * dL[o];
  }
}

// 1. the keys through the anchor memory Aw and the associative loss backpropagated by hand (anchor_forward)
template <typename V>
void anchor_forward(const Spec& s, const Chunk<V>& ch, V* const* Aw, Work<V>& w) {
  const int64_t n = s.n, L = s.L;
  std::copy(ch.k, ch.k + n * s.dims[0], w.a[0]);
  for (int l = 0; l < L; ++l) {
    const int64_t O = s.dims[l + 1], I = s.dims[l];
    V* out = l < L - 1 ? w.z[l] : w.pred;
    mm_abt(out, w.a[l], Aw[l], n, O, I, false, 1);  // z = a Aw^T
    if (l < L - 1) {
      for (int64_t e = 0; e < n * O; ++e) act_fwd(s.act, out[e], w.a[l + 1][e], w.dact[l][e]);
    } else if (s.residual) {
      for (int64_t e = 0; e < n * O; ++e) out[e] += ch.k[e];
    }
  }
  const int64_t Vd = s.dims[L];
  V* dl = w.d[L - 1];
  if (s.loss == LOSS_L2) {
    for (int64_t e = 0; e < n * Vd; ++e) dl[e] = Scalar<V>(2) * (w.pred[e] - ch.v[e]);
  } else {
    for (int64_t e = 0; e < n * Vd; ++e) dl[e] = -ch.v[e];
  }
  for (int64_t l = L - 2; l >= 0; --l) {  // back = d[l + 1] Aw[l + 1], d[l] = back act'(z[l])
    const int64_t O = s.dims[l + 1], O2 = s.dims[l + 2];
    mm_ab(w.back[l], w.d[l + 1], Aw[l + 1], n, O, O2, false, 1);
    for (int64_t e = 0; e < n * O; ++e) w.d[l][e] = w.back[l][e] * w.dact[l][e];
  }
  if (s.normalize) step_scale(s, w);
}

// 2. the queries through W_1 .. W_n without forming them (_read_forward): y_i = b_i W x_i + f_i S x_i
//    - sum_j G[i, j] (a_j . x_i) d_j, layer by layer
template <typename V>
void read_forward(const Spec& s, const Chunk<V>& ch, V* const* WS, Work<V>& w, V* o) {
  const int64_t n = s.n, L = s.L;
  std::copy(ch.q, ch.q + n * s.dims[0], w.x[0]);
  for (int l = 0; l < L; ++l) {
    const int64_t O = s.dims[l + 1], I = s.dims[l];
    mm_abt(w.xw[l], w.x[l], WS[l], n, 2 * O, I, false, 1);  // x W^T | x S^T
    mm_abt(w.p[l], w.x[l], w.a[l], n, n, I, false, 1);       // x a^T
    V* gp = w.dM;                                            // G p, [n, n]
    for (int64_t e = 0; e < n * n; ++e) gp[e] = ch.G[e] * w.p[l][e];
    V* y = w.y[l];
    for (int64_t i = 0; i < n; ++i) {
      const V* xw = w.xw[l] + i * 2 * O;
      for (int64_t o = 0; o < O; ++o) y[i * O + o] = ch.b[i] * xw[o] + ch.f[i] * xw[O + o];
    }
    mm_ab(y, gp, w.du[l], n, O, n, true, -1);  // - (G p) du
    if (l < L - 1) {
      for (int64_t e = 0; e < n * O; ++e) w.x[l + 1][e] = act_value(s.act, y[e]);
    } else {
      for (int64_t e = 0; e < n * O; ++e) o[e] = s.residual ? y[e] + ch.q[e] : y[e];
    }
  }
}

// 3. [W; S] after the chunk's last token, in place (_state_forward): W' = bl W + fl S - sum_j gl_j d_j a_j^T,
//    S' = el S - sum_j pl_j d_j a_j^T
template <typename V>
void state_forward(const Spec& s, const Chunk<V>& ch, V* const* WS, Work<V>& w) {
  const int64_t n = s.n;
  for (int l = 0; l < s.L; ++l) {
    const int64_t O = s.dims[l + 1], I = s.dims[l], OI = O * I;
    V *W = WS[l], *S = WS[l] + OI;
    for (int64_t j = 0; j < n; ++j)
      for (int64_t o = 0; o < O; ++o) {
        w.cg[j * O + o] = ch.gl[j] * w.du[l][j * O + o];
        w.cp[j * O + o] = ch.pl[j] * w.du[l][j * O + o];
      }
    for (int64_t e = 0; e < OI; ++e) {
      W[e] = ch.bl * W[e] + ch.fl * S[e];
      S[e] = ch.el * S[e];
    }
    mm_atb(W, w.cg, w.a[l], O, I, n, true, -1);  // - (gl d)^T a
    mm_atb(S, w.cp, w.a[l], O, I, n, true, -1);  // - (pl d)^T a
  }
}

// The same update in one sweep over [W; S] for chunks of at most 8 tokens, from src to dst (in place when they are
// the same): row by row, each row's retention and then its rank-n update while the row sits in L1, with the two-pass
// form's arithmetic in its order (bl W + fl S stored, then the sum over the chunk's tokens from the first subtracted),
// so the results are equal bit for bit (one loop doing both was 1-2 ulp off: the compiler contracts the sums into
// FMAs differently). At few tokens the two-pass form's three sweeps of the state (and the backward's copy of each
// chunk's starting state) were bound by memory traffic (docs/PERFORMANCE.md).
template <typename V, int N>  // N: the chunk's tokens, fixed so that the token loop unrolls with its factors in registers
void state_forward_fused(const Spec& s, const Chunk<V>& ch, V* const* src, V* const* dst, Work<V>& w) {
  typedef Scalar<V> T;
  for (int l = 0; l < s.L; ++l) {
    const int64_t O = s.dims[l + 1], I = s.dims[l], OI = O * I;
    const V* a = w.a[l];
    const V* du = w.du[l];
    for (int64_t o = 0; o < O; ++o) {
      V cg[N], cp[N];
      for (int j = 0; j < N; ++j) {
        cg[j] = ch.gl[j] * du[j * O + o];
        cp[j] = ch.pl[j] * du[j * O + o];
      }
      const V *Wr = src[l] + o * I, *Sr = src[l] + OI + o * I;
      V *Wd = dst[l] + o * I, *Sd = dst[l] + OI + o * I;
      for (int64_t i = 0; i < I; ++i) {  // the row's retention, then its update: the row stays in L1 between them
        const V Wv = Wr[i], Sv = Sr[i];
        Wd[i] = ch.bl * Wv + ch.fl * Sv;
        Sd[i] = ch.el * Sv;
      }
      for (int64_t i = 0; i < I; ++i) {
        V sw = {}, ss = {};
        for (int j = 0; j < N; ++j) {
          const V x = a[j * I + i];
          sw += cg[j] * x;
          ss += cp[j] * x;
        }
        Wd[i] = Wd[i] + T(-1) * sw;
        Sd[i] = Sd[i] + T(-1) * ss;
      }
    }
  }
}

// [W; S] after the chunk from src (each layer's) into dst (in place when the same)
template <typename V>
void state_update(const Spec& s, const Chunk<V>& ch, V* const* src, V* const* dst, Work<V>& w) {
  switch (s.n) {
    case 1: return state_forward_fused<V, 1>(s, ch, src, dst, w);
    case 2: return state_forward_fused<V, 2>(s, ch, src, dst, w);
    case 3: return state_forward_fused<V, 3>(s, ch, src, dst, w);
    case 4: return state_forward_fused<V, 4>(s, ch, src, dst, w);
    case 5: return state_forward_fused<V, 5>(s, ch, src, dst, w);
    case 6: return state_forward_fused<V, 6>(s, ch, src, dst, w);
    case 7: return state_forward_fused<V, 7>(s, ch, src, dst, w);
    case 8: return state_forward_fused<V, 8>(s, ch, src, dst, w);
    default: break;
  }
  if (src != dst)
    for (int l = 0; l < s.L; ++l) std::copy(src[l], src[l] + 2 * s.dims[l + 1] * s.dims[l], dst[l]);
  state_forward(s, ch, dst, w);
}

// the gradients of one (chunk, group)
template <typename V>
struct ChunkGrads {
  V *dq, *dk, *dv, *db, *df, *dG, *dbl, *del, *dfl, *dgl, *dpl;
};

template <typename V>
ChunkGrads<V> grads_at(const Spec& s, V* const* out, int64_t c, int64_t g) {
  const int64_t cg = c * s.groups + g, n = s.n, K = s.dims[0], Vd = s.dims[s.L];
  return ChunkGrads<V>{out[0] + cg * n * K, out[1] + cg * n * K, out[2] + cg * n * Vd, out[3] + cg * n,
                       out[4] + cg * n,     out[5] + cg * n * n, out[6] + cg,          out[7] + cg,
                       out[8] + cg,         out[9] + cg * n,     out[10] + cg * n};
}

// In the backward of one layer, the retention's share of the state's backward and the read's rank-n additions to the
// same gradient [dW'; dS'] ([O, I] each, in place):
//     sums = (<dW', W>, <dW', S>, <dS', S>), each added as sum() adds (even and odd flat entries apart);
//     dW = bl dW' + (b dy)^T x,   dS = el dS' + fl dW' + (f dy)^T x   (bdy = b dy, fdy = f dy: [n, O]; x: [n, I]).
// For chunks of 1 or 2 tokens in one sweep, row by row: the row's retention stored, then its additions while it sits
// in L1, each in the order and form of the separate passes (retention, then mm_atb's sum over tokens from the first),
// so equal to them bit for bit; else the retention's sweep (N = 0) and two products (at 4 tokens and more the
// products' register blocks were as fast or faster: docs/PERFORMANCE.md).
template <typename V, int N>
void retain_and_add_rows(int64_t O, int64_t I, V* gW, V* gS, const V* W, const V* S, const V* bdy, const V* fdy,
                         const V* x, V bl, V el, V fl, V* sums) {
  V b0 = {}, b1 = {}, f0 = {}, f1 = {}, e0 = {}, e1 = {};
  for (int64_t o = 0; o < O; ++o) {
    V *gWr = gW + o * I, *gSr = gS + o * I;
    const V *Wr = W + o * I, *Sr = S + o * I;
    auto entry = [&](int64_t i, V& bk, V& fk, V& ek) {
      const V w = gWr[i], s = gSr[i];
      bk += w * Wr[i];
      fk += w * Sr[i];
      ek += s * Sr[i];
      gSr[i] = el * s + fl * w;
      gWr[i] = bl * w;
    };
    if (I % 2 == 0) {  // every row starts at an even flat entry
      for (int64_t i = 0; i < I; i += 2) {
        entry(i, b0, f0, e0);
        entry(i + 1, b1, f1, e1);
      }
    } else {
      for (int64_t i = 0; i < I; ++i) {
        if ((o * I + i) % 2 == 0) {
          entry(i, b0, f0, e0);
        } else {
          entry(i, b1, f1, e1);
        }
      }
    }
    if constexpr (N > 0) {
      V cb[N], cf[N];
      for (int j = 0; j < N; ++j) {
        cb[j] = bdy[j * O + o];
        cf[j] = fdy[j * O + o];
      }
      for (int64_t i = 0; i < I; ++i) {
        V sb = {}, sf = {};
        for (int j = 0; j < N; ++j) {
          sb += cb[j] * x[j * I + i];
          sf += cf[j] * x[j * I + i];
        }
        gWr[i] = gWr[i] + sb;
        gSr[i] = gSr[i] + sf;
      }
    }
  }
  sums[0] = b0 + b1;
  sums[1] = f0 + f1;
  sums[2] = e0 + e1;
}

template <typename V>
void retain_and_add(const Spec& s, const Chunk<V>& ch, int64_t O, int64_t I, V* gW, V* gS, const V* W, const V* S,
                    const V* bdy, const V* fdy, const V* x, V* sums) {
  switch (s.n) {
    case 1: return retain_and_add_rows<V, 1>(O, I, gW, gS, W, S, bdy, fdy, x, ch.bl, ch.el, ch.fl, sums);
    case 2: return retain_and_add_rows<V, 2>(O, I, gW, gS, W, S, bdy, fdy, x, ch.bl, ch.el, ch.fl, sums);
    default: break;
  }
  retain_and_add_rows<V, 0>(O, I, gW, gS, W, S, bdy, fdy, x, ch.bl, ch.el, ch.fl, sums);  // the retention alone
  mm_atb(gW, bdy, x, O, I, s.n, true, 1);  // dW += (b dy)^T x
  mm_atb(gS, fdy, x, O, I, s.n, true, 1);  // dS += (f dy)^T x
}

// The reverse of the three stages for one (chunk, group) (_chunk_backward). On entry g[l] is the gradient of the
// chunk's final [W; S], WS[l] its starting state and Aw[l] its anchor, w holds the chunk's activations; on return g[l]
// is the gradient of the starting state and, where the anchor is separate (dA not null), dA[l] that of the anchor.
template <typename V>
void chunk_backward(const Spec& s, const Chunk<V>& ch, const V* dout, V* const* WS, V* const* Aw, V* const* g,
                    V* const* dA, Work<V>& w, const ChunkGrads<V>& out) {
  const int64_t n = s.n, L = s.L, K = s.dims[0], Vd = s.dims[L];
  std::fill(out.db, out.db + n, V{});
  std::fill(out.df, out.df + n, V{});
  std::fill(out.dG, out.dG + n * n, V{});
  std::fill(out.dgl, out.dgl + n, V{});
  std::fill(out.dpl, out.dpl + n, V{});

  // 4. state: W' = bl W + fl S - d^T diag(gl) a, S' = el S - d^T diag(pl) a
  for (int l = 0; l < L; ++l) {
    const int64_t O = s.dims[l + 1], I = s.dims[l], OI = O * I;
    V *gW = g[l], *gS = g[l] + OI;
    const V *W = WS[l], *S = WS[l] + OI, *d = w.du[l];
    mm_abt(w.rW, w.a[l], gW, n, O, I, false, 1);  // a dW'^T
    mm_abt(w.rS, w.a[l], gS, n, O, I, false, 1);  // a dS'^T
    for (int64_t j = 0; j < n; ++j) {
      const V *rWj = w.rW + j * O, *rSj = w.rS + j * O, *dj = d + j * O;
      V* ddj = w.dd[l] + j * O;
      for (int64_t o = 0; o < O; ++o) {
        ddj[o] = -(ch.gl[j] * rWj[o] + ch.pl[j] * rSj[o]);
        w.cg[j * O + o] = ch.gl[j] * dj[o];
        w.cp[j * O + o] = ch.pl[j] * dj[o];
      }
      out.dgl[j] -= sum(dj, rWj, O);
      out.dpl[j] -= sum(dj, rSj, O);
    }
    mm_ab(w.da[l], w.cg, gW, n, I, O, false, -1);  // da = -((gl d) dW' + (pl d) dS')
    mm_ab(w.da[l], w.cp, gS, n, I, O, true, -1);
  }
  // the retention's part of 4 ([dW; dS] = [bl dW'; el dS' + fl dW'] and the gates' gradients <dW', W>, <dW', S>,
  // <dS', S>) runs below, each layer's in one sweep with the read's rank-n additions to the same gradient; the gates'
  // sums are kept per layer and added in layer order, as here before
  V gate_sums[MAXL][3];

  // 3. read, last layer first
  V* dy = w.dy;
  std::copy(dout, dout + n * Vd, dy);
  if (s.residual) {
    std::copy(dout, dout + n * K, out.dq);
  } else {
    std::fill(out.dq, out.dq + n * K, V{});
  }
  for (int64_t l = L - 1; l >= 0; --l) {
    const int64_t O = s.dims[l + 1], I = s.dims[l], OI = O * I;
    V *gW = g[l], *gS = g[l] + OI;
    const V *W = WS[l], *S = WS[l] + OI, *x = w.x[l], *a = w.a[l], *d = w.du[l], *p = w.p[l];
    V *bdy = w.cg, *fdy = w.cp, *dM = w.dM;
    for (int64_t i = 0; i < n; ++i) {
      const V* dyi = dy + i * O;
      for (int64_t o = 0; o < O; ++o) {
        bdy[i * O + o] = ch.b[i] * dyi[o];
        fdy[i * O + o] = ch.f[i] * dyi[o];
      }
      out.db[i] += sum(dyi, w.xw[l] + i * 2 * O, O);
      out.df[i] += sum(dyi, w.xw[l] + i * 2 * O + O, O);
    }
    retain_and_add(s, ch, O, I, gW, gS, W, S, bdy, fdy, x, gate_sums[l]);  // 4's retention; dW += (b dy)^T x, ...
    mm_abt(dM, dy, d, n, n, O, false, -1);  // dM = -dy d^T
    for (int64_t e = 0; e < n * n; ++e) {
      out.dG[e] += dM[e] * p[e];
      dM[e] *= ch.G[e];  // dP = dM G
    }
    V* gp = w.rW;  // G p, [n, n]
    for (int64_t e = 0; e < n * n; ++e) gp[e] = ch.G[e] * p[e];
    mm_atb(w.dd[l], gp, dy, n, O, n, true, -1);  // dd -= (G p)^T dy
    V* dx = w.dx;                                 // dx = (b dy) W + (f dy) S + dP a
    mm_ab(dx, bdy, W, n, I, O, false, 1);
    mm_ab(dx, fdy, S, n, I, O, true, 1);
    mm_ab(dx, dM, a, n, I, n, true, 1);
    mm_atb(w.da[l], dM, x, n, I, n, true, 1);  // da += dP^T x
    if (l > 0) {
      const V* yprev = w.y[l - 1];
      for (int64_t e = 0; e < n * I; ++e) dy[e] = act_grad(s.act, yprev[e]) * dx[e];
    } else {
      for (int64_t e = 0; e < n * K; ++e) out.dq[e] += dx[e];
    }
  }

  V dbl = {}, dfl = {}, del = {};
  for (int l = 0; l < L; ++l) {
    dbl += gate_sums[l][0];
    dfl += gate_sums[l][1];
    del += gate_sums[l][2];
  }
  *out.dbl = dbl;
  *out.del = del;
  *out.dfl = dfl;

  if (s.normalize) step_scale_backward(s, w);  // dd: from the gradient of du to that of d

  // 2. anchor: the errors first (d[l] = (d[l + 1] Aw[l + 1]) act'(z[l])), then the keys' forward
  auto dA_into = [&](int64_t l) -> V* {  // where the anchor's gradient for layer l goes
    return dA != nullptr ? dA[l] : g[l];
  };
  for (int64_t l = 0; l < L - 1; ++l) {
    const int64_t O = s.dims[l + 1], O2 = s.dims[l + 2];
    V* dback = w.dx;  // [n, O]
    for (int64_t e = 0; e < n * O; ++e) {
      dback[e] = w.dd[l][e] * w.dact[l][e];
      w.dz[l][e] = w.dd[l][e] * w.back[l][e] * act_grad2(s.act, w.z[l][e]);
    }
    mm_abt(w.dd[l + 1], dback, Aw[l + 1], n, O2, O, true, 1);  // dd[l + 1] += dback Aw[l + 1]^T
    mm_atb(dA_into(l + 1), w.d[l + 1], dback, O2, O, n, true, 1);  // dA[l + 1] += d[l + 1]^T dback
  }
  const bool l2 = s.loss == LOSS_L2;
  V* ddL = w.dd[L - 1];
  for (int64_t e = 0; e < n * Vd; ++e) out.dv[e] = Scalar<V>(l2 ? -2 : -1) * ddL[e];
  V* dzi = w.dy;  // [n, O], the gradient of layer l's pre-activation
  for (int64_t l = L - 1; l >= 0; --l) {
    const int64_t O = s.dims[l + 1], I = s.dims[l];
    if (l == L - 1) {
      if (!l2) continue;  // dot: the error does not depend on the memory
      for (int64_t e = 0; e < n * O; ++e) dzi[e] = Scalar<V>(2) * ddL[e];
    } else {
      for (int64_t e = 0; e < n * O; ++e) dzi[e] = w.dz[l][e] + w.da[l + 1][e] * w.dact[l][e];
    }
    mm_atb(dA_into(l), dzi, w.a[l], O, I, n, true, 1);  // dA += dz^T a
    mm_ab(w.da[l], dzi, Aw[l], n, I, O, true, 1);        // da += dz Aw
  }
  for (int64_t e = 0; e < n * K; ++e) out.dk[e] = w.da[0][e] + (s.residual && l2 ? Scalar<V>(2) * ddL[e] : V{});
}

// ---------------------------------------------------------------------------------------------------------------------
// the loops over groups (split between threads) and chunks

// Subnormal floats read and written as zero while a kernel runs on this thread (x86: MXCSR's flush-to-zero and
// denormals-are-zero bits; aarch64: FPCR.FZ), the thread's own mode restored after. A memory whose writes stop (gate
// floors: theta = 0 exactly) decays its momentum geometrically through the subnormal range, and on x86 each operation
// on a subnormal costs ~100 normal ones: a passkey model trained with floors ran this loop 4-6x slower without it
// (docs/PERFORMANCE.md, "Subnormal floats"). A value below 1.2e-38 (float32; 2.2e-308 float64) lies ~31 orders of
// magnitude under float32's rounding of an O(1) state, so no output changes beyond that rounding.
struct FlushSubnormals {
#if defined(__SSE__) || defined(__x86_64__)
  unsigned int saved = _mm_getcsr();
  FlushSubnormals() { _mm_setcsr(saved | 0x8040u); }  // FTZ (bit 15) | DAZ (bit 6)
  ~FlushSubnormals() { _mm_setcsr(saved); }
#elif defined(__aarch64__)
  uint64_t saved;
  FlushSubnormals() {
    asm volatile("mrs %0, fpcr" : "=r"(saved));
    asm volatile("msr fpcr, %0" : : "r"(saved | (uint64_t(1) << 24)));  // FZ
  }
  ~FlushSubnormals() { asm volatile("msr fpcr, %0" : : "r"(saved)); }
#endif
};

// Runs body(lo, hi) over ranges of [0, count) on up to `threads` threads, subnormals flushed (FlushSubnormals); false
// when any range failed (out of memory: the caller reports it instead of the process aborting in a thread)
template <typename F>
bool over_range(int64_t count, int64_t threads, F&& body) {
  threads = std::max<int64_t>(1, std::min(threads, count));
  std::atomic<bool> ok{true};
  auto guarded = [&](int64_t lo, int64_t hi) {
    FlushSubnormals flush;
    try {
      body(lo, hi);
    } catch (...) {
      ok = false;
    }
  };
  if (threads == 1) {
    guarded(0, count);
    return ok;
  }
  std::vector<std::thread> pool;
  const int64_t per = (count + threads - 1) / threads;
  for (int64_t t = 1; t < threads; ++t) {
    const int64_t lo = t * per, hi = std::min(count, lo + per);
    if (lo < hi) pool.emplace_back([&, lo, hi] { guarded(lo, hi); });
  }
  guarded(0, std::min(count, per));
  for (auto& th : pool) th.join();
  return ok;
}

// over_range over the groups of rows, on s.threads threads
template <typename F>
bool over_groups(const Spec& s, F&& body) {
  return over_range(s.groups, s.threads, std::forward<F>(body));
}

// The backward of one group walks its chunks in segments of at most kSegment, last segment first: it re-runs the
// forward of a segment from the state at the segment's start, keeping every chunk's starting state and activations,
// then runs the chunks' backward in reverse. The states at the segment starts (but the first, the starting state)
// are kept by the forward when the caller gives it room for them (``bounds``: what the autograd node keeps, when it
// fits its byte budget, cpu_scan.py); without them the backward finds them in a first forward pass of its own
// (anchor and state update only; none when there is one segment). So the node saves its inputs, the starting
// states and at most those few states, nothing per chunk, and the memory this needs is per thread: one segment of
// one group, kept under kSegmentBytes by shortening the segment for large chunks or memories.
constexpr int64_t kSegment = 32;
constexpr int64_t kSegmentBytes = int64_t(64) << 20;

// one group's [W; S] of every layer, packed: its size in vectors, and each layer's offset in it
inline int64_t packed_state(const Spec& s, int64_t* offset) {
  int64_t size = 0;
  for (int l = 0; l < s.L; ++l) {
    offset[l] = size;
    size += 2 * s.dims[l + 1] * s.dims[l];
  }
  return size;
}

// the backward's segment length in chunks
template <typename V>
int64_t segment_length(const Spec& s) {
  int64_t offset[MAXL];
  const int64_t per_chunk = static_cast<int64_t>(sizeof(V)) * (Work<V>::size(s) + packed_state(s, offset));
  return std::max<int64_t>(1, std::min({kSegment, s.nc, kSegmentBytes / per_chunk}));
}

// the vectors one group's saved segment-start states take (0: one segment, nothing to save)
template <typename T>
int64_t bounds_size(const Spec& s) {
  typedef typename Lanes<T>::V V;
  int64_t offset[MAXL];
  const int64_t seg = segment_length<V>(s);
  return ((s.nc + seg - 1) / seg - 1) * packed_state(s, offset);
}

// ptrs: q k v b f G bl el fl gl pl (11), o, then per layer WS[l] (in: start, out: final), A[l] (or null),
// last_anchor[l] (out), then bounds (out, or null: [groups, bounds_size], the states at chunks seg, 2 seg, ...)
template <typename T>
bool scan_forward(const Spec& s, void** ptrs) {
  typedef typename Lanes<T>::V V;
  V* const* in = reinterpret_cast<V* const*>(ptrs);
  V* o = in[11];
  V* const* WS = in + 12;
  V* const* A = in + 12 + s.L;
  V* const* last = in + 12 + 2 * s.L;
  V* const bounds = in[12 + 3 * s.L];
  const int64_t Vd = s.dims[s.L], seg = segment_length<V>(s), kept = bounds_size<T>(s);
  int64_t offset[MAXL];
  const int64_t state_size = packed_state(s, offset);
  return over_groups(s, [&](int64_t lo, int64_t hi) {
    Work<V> w(s);
    V *ws[MAXL], *aw[MAXL];
    for (int64_t g = lo; g < hi; ++g) {
      for (int l = 0; l < s.L; ++l) ws[l] = WS[l] + g * 2 * s.dims[l + 1] * s.dims[l];
      for (int64_t c = 0; c < s.nc; ++c) {
        const Chunk<V> ch = chunk_at(s, in, c, g);
        if (bounds != nullptr && c > 0 && c % seg == 0) {  // a segment's start: the backward starts there
          V* at = bounds + g * kept + (c / seg - 1) * state_size;
          for (int l = 0; l < s.L; ++l) std::copy(ws[l], ws[l] + 2 * s.dims[l + 1] * s.dims[l], at + offset[l]);
        }
        for (int l = 0; l < s.L; ++l) {
          const int64_t OI = s.dims[l + 1] * s.dims[l];
          aw[l] = (c == 0 && s.has_A) ? A[l] + g * OI : ws[l];
          if (c == s.nc - 1) std::copy(ws[l], ws[l] + OI, last[l] + g * OI);
        }
        anchor_forward(s, ch, aw, w);
        read_forward(s, ch, ws, w, o + (c * s.groups + g) * s.n * Vd);
        state_update(s, ch, ws, ws, w);
      }
    }
  });
}

// A segment's buffers (its chunks' starting states and activations: up to kSegmentBytes) are the thread's, kept from
// one call to the next and grown when a call needs more: allocating them per call cost every backward a fresh mapping
// of tens of MiB, zeroed and page-faulted in (~10% of a [16 x 256, chunk 4] backward's time with glibc's default
// malloc, which maps blocks over 32 MiB anew each time; docs/PERFORMANCE.md). Zeroed when first allocated; after that
// they hold the previous call's values, as a segment's buffers already do for the next segment. A worker thread's
// buffers go with the thread at the call's end; the calling thread keeps its own (kSegmentBytes, or one chunk's
// when a single chunk needs more, plus one state) until it exits.
template <typename V>
V* segment_scratch(int64_t count) {
  static thread_local std::vector<V> buf;
  if (static_cast<int64_t>(buf.size()) < count) {
    std::vector<V>().swap(buf);  // the old block freed before the new one is taken
    buf.resize(count);
  }
  return buf.data();
}

// ptrs: q k v b f G bl el fl gl pl (11), do, dq dk dv db df dG dbl del dfl dgl dpl (11), then per layer g[l] (in: the
// gradient of the final state, out: of the starting one), dlast[l] (or null), WS0[l] (the starting state), A[l] (or
// null), dA[l] (out, or null), then bounds (the forward's, or null)
template <typename T>
bool scan_backward(const Spec& s, void** ptrs) {
  typedef typename Lanes<T>::V V;
  V* const* in = reinterpret_cast<V* const*>(ptrs);
  const V* dout = in[11];
  V* const* gout = in + 12;
  V* const* G = in + 23;
  V* const* dlast = in + 23 + s.L;
  V* const* WS0 = in + 23 + 2 * s.L;
  V* const* A = in + 23 + 3 * s.L;
  V* const* dA = in + 23 + 4 * s.L;
  const V* const kept = in[23 + 5 * s.L];
  int64_t offset[MAXL];
  const int64_t state_size = packed_state(s, offset);  // one group's [W; S] of every layer, packed
  const int64_t seg = segment_length<V>(s);
  const int64_t Vd = s.dims[s.L], nseg = (s.nc + seg - 1) / seg;
  return over_groups(s, [&](int64_t lo, int64_t hi) {
    const int64_t work_size = Work<V>::size(s);
    V* scratch = segment_scratch<V>(seg * (work_size + state_size) + state_size);
    std::vector<Work<V>> works;
    works.reserve(seg);
    for (int64_t c = 0; c < seg; ++c) works.emplace_back(s, scratch + c * work_size);
    V* const starts = scratch + seg * work_size;
    V* const cur = starts + seg * state_size;
    // the states at segments 1 .. nseg - 1's starts, laid out as the forward keeps them: found here when not kept
    std::vector<V> found(nseg > 1 && kept == nullptr ? (nseg - 1) * state_size : 0);
    std::vector<V> o_scratch(s.n * Vd);
    V *ws[MAXL], *aw[MAXL], *g[MAXL], *da_group[MAXL];
    auto anchors = [&](int64_t c, int64_t gr, V* state) {  // chunk c's anchor: its starting W, or the carried A
      for (int l = 0; l < s.L; ++l) {
        ws[l] = state + offset[l];
        aw[l] = (c == 0 && s.has_A) ? A[l] + gr * s.dims[l + 1] * s.dims[l] : ws[l];
      }
    };
    for (int64_t gr = lo; gr < hi; ++gr) {
      auto load_start = [&](V* dst) {  // the group's starting state
        for (int l = 0; l < s.L; ++l) {
          const int64_t n2 = 2 * s.dims[l + 1] * s.dims[l];
          std::copy(WS0[l] + gr * n2, WS0[l] + (gr + 1) * n2, dst + offset[l]);
        }
      };
      for (int l = 0; l < s.L; ++l) g[l] = G[l] + gr * 2 * s.dims[l + 1] * s.dims[l];
      const V* const seg_starts = kept == nullptr ? found.data() : kept + gr * (nseg - 1) * state_size;
      if (nseg > 1 && kept == nullptr) {  // find them: the forward's anchor and state update
        load_start(cur);
        for (int64_t c = 0; c < s.nc; ++c) {
          if (c > 0 && c % seg == 0) std::copy(cur, cur + state_size, found.begin() + (c / seg - 1) * state_size);
          const Chunk<V> ch = chunk_at(s, in, c, gr);
          anchors(c, gr, cur);
          anchor_forward(s, ch, aw, works[0]);
          state_update(s, ch, ws, ws, works[0]);
        }
      }
      for (int64_t sg = nseg - 1; sg >= 0; --sg) {
        const int64_t c0 = sg * seg, c1 = std::min(s.nc, c0 + seg);
        if (sg == 0) {
          load_start(starts);
        } else {
          std::copy(seg_starts + (sg - 1) * state_size, seg_starts + sg * state_size, starts);
        }
        for (int64_t c = c0; c < c1; ++c) {  // the segment's forward again, keeping what its backward reads
          const Chunk<V> ch = chunk_at(s, in, c, gr);
          V* start = starts + (c - c0) * state_size;
          anchors(c, gr, start);
          anchor_forward(s, ch, aw, works[c - c0]);
          read_forward(s, ch, ws, works[c - c0], o_scratch.data());
          if (c + 1 == c1) break;  // the state after the segment: not read
          V* next[MAXL];
          for (int l = 0; l < s.L; ++l) next[l] = start + state_size + offset[l];
          state_update(s, ch, ws, next, works[c - c0]);
        }
        for (int64_t c = c1 - 1; c >= c0; --c) {
          const Chunk<V> ch = chunk_at(s, in, c, gr);
          const bool separate = c == 0 && s.has_A;
          anchors(c, gr, starts + (c - c0) * state_size);
          if (separate) {
            for (int l = 0; l < s.L; ++l) {
              const int64_t OI = s.dims[l + 1] * s.dims[l];
              da_group[l] = dA[l] + gr * OI;
              std::fill(da_group[l], da_group[l] + OI, V{});
            }
          }
          chunk_backward(s, ch, dout + (c * s.groups + gr) * s.n * Vd, ws, aw, g, separate ? da_group : nullptr,
                         works[c - c0], grads_at(s, gout, c, gr));
          if (c == s.nc - 1) {  // the last chunk's starting memory is also an output
            for (int l = 0; l < s.L; ++l) {
              if (dlast[l] == nullptr) continue;
              const int64_t OI = s.dims[l + 1] * s.dims[l];
              const V* dl = dlast[l] + gr * OI;
              for (int64_t e = 0; e < OI; ++e) g[l][e] += dl[e];
            }
          }
        }
      }
    }
  });
}

// the lane layout: src [outer, rows, inner] <-> dst [outer, groups, inner, width] (rows padded with zeros to whole
// groups); a transpose of [width, inner] blocks, done here because PyTorch's copy of that permutation is ~8x slower
// than a plain copy
template <typename T>
void pack(const T* src, T* dst, int64_t outer, int64_t rows, int64_t inner, int64_t width) {
  const int64_t groups = (rows + width - 1) / width;
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t g = 0; g < groups; ++g) {
      T* out = dst + (o * groups + g) * inner * width;
      for (int64_t r = 0; r < width; ++r) {
        const int64_t row = g * width + r;
        if (row < rows) {
          const T* in = src + (o * rows + row) * inner;
          for (int64_t m = 0; m < inner; ++m) out[m * width + r] = in[m];
        } else {
          for (int64_t m = 0; m < inner; ++m) out[m * width + r] = T(0);
        }
      }
    }
}

template <typename T>
void unpack(const T* src, T* dst, int64_t outer, int64_t rows, int64_t inner, int64_t width) {
  const int64_t groups = (rows + width - 1) / width;
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t g = 0; g < groups; ++g) {
      const T* in = src + (o * groups + g) * inner * width;
      for (int64_t r = 0; r < width && g * width + r < rows; ++r) {
        T* out = dst + (o * rows + g * width + r) * inner;
        for (int64_t m = 0; m < inner; ++m) out[m] = in[m * width + r];
      }
    }
}

bool parse(const int64_t* raw, Spec& s) {
  s.L = raw[0];
  s.n = raw[1];
  s.nc = raw[2];
  s.groups = raw[3];
  s.residual = raw[4] != 0;
  s.act = static_cast<int>(raw[5]);
  s.loss = static_cast<int>(raw[6]);
  s.has_A = raw[7] != 0;
  s.threads = raw[8];
  s.normalize = raw[9] != 0;
  if (s.L < 1 || s.L > MAXL || s.n < 1 || s.nc < 1 || s.groups < 1) return false;
  if (s.act != ACT_GELU && s.act != ACT_SILU) return false;
  if (s.loss != LOSS_L2 && s.loss != LOSS_DOT) return false;
  for (int l = 0; l <= s.L; ++l) {
    s.dims[l] = raw[10 + l];
    if (s.dims[l] < 1) return false;
  }
  return !(s.residual && s.dims[0] != s.dims[s.L]);
}


// ---------------------------------------------------------------------------------------------------------------------
// Every token's state of a chunk, read without being formed (dense_scan.py: the retentions lq and kl with the
// momentum optimiser).
//
// Inside a chunk the accumulator of token t is the recurrence of the decay path,
//     S_t = eta_t S_{t-1} - sum_k Wb[t, k] d_{t+k} a_{t+k}^T,      A_t = beta_t A_{t-1} + S_t,
// (k over the Omega window's w key-side tokens ending at t; Wb = theta_t gamma_{t+k}), and a read needs a function of
// every A_t that has no low-rank form:
//   - Moneta (lq = 4): N_t = sum A_t^4 (its read is the dual-form read scaled by N_t^-1/2);
//   - Memora (kl, rows): y_t = softmax(A_t) h_t, the softmax over each matrix row, h_t the layer's input at token t.
// The torch path forms every A_t ([n, P, Q] per row and layer) for it, which makes it bound by memory traffic. Here
// the state is walked a block of vectors at a time through all of the chunk's n tokens, the block's A_t and S_t in
// registers: O(n P Q) arithmetic and nothing per token written (Moneta: lq4_forward / lq4_backward, a block of one
// matrix row's entries; Memora: kl_row_forward / kl_row_backward, the lanes across matrix rows). The backward runs
// the block's forward again, keeping its n + 1 states, and walks the tokens in reverse with E_t, the read's gradient
// with respect to A_t (lq: 4 gN_t A_t^3; kl: gy_t[p] s[p, q] (h_t[q] - y_t[p]) with s = softmax(A_t) by rows):
//     dA_t = beta_{t+1} dA_{t+1} + E_t,   dS_t = eta_{t+1} dS_{t+1} + dA_t,
//     dbeta_t = <dA_t, A_{t-1}>,   deta_t = <dS_t, S_{t-1}>,   dWb[t, k] = -d_e^T dS_t a_e,
//     dd_e -= Wb[t, k] dS_t a_e,   da_e -= Wb[t, k] dS_t^T d_e   (e = t + k),   and the starts' dA_{-1}, dS_{-1}.
//
// spec: R (rows: sequence x head), n, w, P, Q, threads, rs, acc (RecurSpec). Row r's tensors: A0, S0 [P, Q] (each
// matrix contiguous, rs elements from one row's to the next; kl: rs = P Q); the rest contiguous: d [n + w - 1, P];
// a [n + w - 1, Q]; beta, eta [n]; Wb [n, w]; then the read's own (each kernel's comment lists its pointers).

// rs: the elements from one row's A0 (and S0) to the next (P Q when contiguous; 2 P Q for the halves of [A; S]);
// acc (lq4's backward): dA0 and dS0 are added into tensors laid out like A0 and S0 (rs) instead of written contiguous
struct RecurSpec {
  int64_t R, n, w, P, Q, threads, rs, acc;
};

bool parse_recur(const int64_t* raw, RecurSpec& s) {
  s = RecurSpec{raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7]};
  return s.R > 0 && s.n > 0 && s.w > 0 && s.P > 0 && s.Q > 0 && s.threads > 0 && s.rs >= s.P * s.Q &&
         (s.acc == 0 || s.acc == 1);
}

// Row r's recurrence inputs (ptrs[0 .. 6]: A0 S0 d a beta eta Wb)
template <typename T>
struct RecurRow {
  const T *A0, *S0, *d, *a, *beta, *eta, *Wb;
  RecurRow(const RecurSpec& s, void** ptrs, int64_t r) {
    const int64_t m = s.n + s.w - 1;
    const int64_t offsets[7] = {r * s.rs, r * s.rs, r * m * s.P, r * m * s.Q, r * s.n, r * s.n, r * s.n * s.w};
    const T** fields[7] = {&A0, &S0, &d, &a, &beta, &eta, &Wb};
    for (int i = 0; i < 7; ++i) *fields[i] = static_cast<const T*>(ptrs[i]) + offsets[i];
  }
};

// the sum of a vector's lanes: its halves added while wider than 16 bytes (one vector add each), then lane by lane
template <typename S, int Bytes>
struct VecOf {
  typedef S type __attribute__((vector_size(Bytes)));
};
template <typename S, int Bytes>
inline S hsum_bytes(typename VecOf<S, Bytes>::type v) {
  if constexpr (Bytes > 16) {
    typedef typename VecOf<S, Bytes / 2>::type H;
    H lo, hi;
    std::memcpy(&lo, &v, Bytes / 2);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + Bytes / 2, Bytes / 2);
    return hsum_bytes<S, Bytes / 2>(lo + hi);
  } else {
    S s = 0;
    for (int i = 0; i < Bytes / static_cast<int>(sizeof(S)); ++i) s += v[i];
    return s;
  }
}
template <typename V>
inline double hsum(V v) {
  return hsum_bytes<Scalar<V>, sizeof(V)>(v);
}
// Moneta: N_t = sum A_t^4 ([n] per row). Each matrix row's entries are walked a block of NV vectors at a time through
// all of the chunk's tokens, the block's A and S in registers (in the backward its n + 1 states in L1 and its adjoints
// in registers), every sum over entries kept as one vector of partial sums per token until the row (or, for dbeta and
// deta, the (sequence, head) row) is done: no pass over a stored tile per token and no horizontal sum per block. The
// entries of a matrix row past its last whole vector go through the same steps one at a time (Lq4Tail). The backward
// recomputes the block's states, then runs the adjoint recurrence in reverse with E_t = 4 gN_t A_t^3 formed inline.

template <typename V>
inline V vload(const Scalar<V>* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
inline void vstore(Scalar<V>* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// one block: NV vectors of matrix row p from entry q0, forward; Nv[t] += the block's A_t^4, lane-wise
template <typename T, int NV>
void lq4_block_forward(const RecurRow<T>& x, const RecurSpec& s, int64_t p, int64_t q0,
                       typename Lanes<T>::V* Nv) {
  using V = typename Lanes<T>::V;
  constexpr int L = Lanes<T>::N;
  const int64_t w = s.w, P = s.P, Q = s.Q;
  V A[NV], S[NV];
  for (int v = 0; v < NV; ++v) {
    A[v] = vload<V>(x.A0 + p * Q + q0 + v * L);
    S[v] = vload<V>(x.S0 + p * Q + q0 + v * L);
  }
  for (int64_t t = 0; t < s.n; ++t) {
    const V bt = splat<V>(x.beta[t]), et = splat<V>(x.eta[t]);
    const V c0 = splat<V>(x.Wb[t * w] * x.d[t * P + p]);
    const T* a0 = x.a + t * Q + q0;
    V U[NV];
    for (int v = 0; v < NV; ++v) U[v] = et * S[v] - c0 * vload<V>(a0 + v * L);
    for (int64_t k = 1; k < w; ++k) {
      const V c = splat<V>(x.Wb[t * w + k] * x.d[(t + k) * P + p]);
      const T* ak = x.a + (t + k) * Q + q0;
      for (int v = 0; v < NV; ++v) U[v] -= c * vload<V>(ak + v * L);
    }
    V acc = splat<V>(0);
    for (int v = 0; v < NV; ++v) {
      S[v] = U[v];
      A[v] = bt * A[v] + U[v];
      const V y = A[v] * A[v];
      acc += y * y;
    }
    Nv[t] += acc;
  }
}

// one block backward. As, Ss: (n + 1) NV L scratch; dbv, dev [n], dotv [n w]: lane-wise partial sums of dbeta_t,
// deta_t and dS_t . a_{t+k}; da: the row's [m, Q]; oA, oS: where the block's dA0, dS0 go (added with s.acc)
template <typename T, int NV>
void lq4_block_backward(const RecurRow<T>& x, const RecurSpec& s, const T* gN, int64_t p, int64_t q0, T* As, T* Ss,
                        typename Lanes<T>::V* dbv, typename Lanes<T>::V* dev, typename Lanes<T>::V* dotv, T* da,
                        T* oA, T* oS) {
  using V = typename Lanes<T>::V;
  constexpr int L = Lanes<T>::N;
  constexpr int B = NV * L;
  const int64_t n = s.n, w = s.w, P = s.P, Q = s.Q;
  {  // the block's states: slot 0 the chunk's start, slot t + 1 after token t
    V A[NV], S[NV];
    for (int v = 0; v < NV; ++v) {
      A[v] = vload<V>(x.A0 + p * Q + q0 + v * L);
      S[v] = vload<V>(x.S0 + p * Q + q0 + v * L);
      vstore(As + v * L, A[v]);
      vstore(Ss + v * L, S[v]);
    }
    for (int64_t t = 0; t < n; ++t) {
      const V bt = splat<V>(x.beta[t]), et = splat<V>(x.eta[t]);
      const V c0 = splat<V>(x.Wb[t * w] * x.d[t * P + p]);
      const T* a0 = x.a + t * Q + q0;
      for (int v = 0; v < NV; ++v) S[v] = et * S[v] - c0 * vload<V>(a0 + v * L);
      for (int64_t k = 1; k < w; ++k) {
        const V c = splat<V>(x.Wb[t * w + k] * x.d[(t + k) * P + p]);
        const T* ak = x.a + (t + k) * Q + q0;
        for (int v = 0; v < NV; ++v) S[v] -= c * vload<V>(ak + v * L);
      }
      for (int v = 0; v < NV; ++v) {
        A[v] = bt * A[v] + S[v];
        vstore(As + (t + 1) * B + v * L, A[v]);
        vstore(Ss + (t + 1) * B + v * L, S[v]);
      }
    }
  }
  // dAt, dSt: the adjoints of A_t and S_t (token t's, before the step back through beta_t, eta_t, which the next
  // token down folds into its fused multiply-adds: dA_{t-1} = beta_t dA_t + E_{t-1}, dS_{t-1} = eta_t dS_t + dA_{t-1})
  V dAt[NV], dSt[NV];
  for (int v = 0; v < NV; ++v) dAt[v] = dSt[v] = splat<V>(0);
  V bn = splat<V>(0), en = splat<V>(0);  // beta_{t+1}, eta_{t+1}: 0 past the chunk's last token
  for (int64_t t = n - 1; t >= 0; --t) {
    const T* At = As + (t + 1) * B;
    const T* Ap = As + t * B;
    const T* Sp = Ss + t * B;
    const V g4 = splat<V>(4 * gN[t]);
    V db = splat<V>(0), de = splat<V>(0);
    for (int v = 0; v < NV; ++v) {
      const V y = vload<V>(At + v * L);
      dAt[v] = bn * dAt[v] + (g4 * y) * (y * y);
      db += dAt[v] * vload<V>(Ap + v * L);
      dSt[v] = en * dSt[v] + dAt[v];
      de += dSt[v] * vload<V>(Sp + v * L);
    }
    bn = splat<V>(x.beta[t]);
    en = splat<V>(x.eta[t]);
    dbv[t] += db;
    dev[t] += de;
    for (int64_t k = 0; k < w; ++k) {  // dd_e -= Wb[t, k] dS_t a_e, da_e -= Wb[t, k] d_e dS_t (e = t + k)
      const int64_t e = t + k;
      const V cd = splat<V>(x.Wb[t * w + k] * x.d[e * P + p]);
      const T* ae = x.a + e * Q + q0;
      T* dae = da + e * Q + q0;
      V acc = splat<V>(0);
      for (int v = 0; v < NV; ++v) {
        acc += dSt[v] * vload<V>(ae + v * L);
        vstore(dae + v * L, vload<V>(dae + v * L) - cd * dSt[v]);
      }
      dotv[t * w + k] += acc;
    }
  }
  for (int v = 0; v < NV; ++v) {  // the chunk's starting A and S: one step back through beta_0, eta_0
    const V dA = bn * dAt[v], dS = en * dSt[v];
    if (s.acc) {
      vstore(oA + v * L, vload<V>(oA + v * L) + dA);
      vstore(oS + v * L, vload<V>(oS + v * L) + dS);
    } else {
      vstore(oA + v * L, dA);
      vstore(oS + v * L, dS);
    }
  }
}

// the entries of matrix row p from q0 to its end (fewer than a vector), one at a time: forward into N (double), or
// backward into dbeta, deta, dot (double) and da, oA, oS
template <typename T>
struct Lq4Tail {
  const RecurRow<T>& x;
  const RecurSpec& s;
  std::vector<T> As, Ss;
  explicit Lq4Tail(const RecurRow<T>& row, const RecurSpec& spec)
      : x(row), s(spec), As((spec.n + 1) * Lanes<T>::N), Ss((spec.n + 1) * Lanes<T>::N) {}
  // the states of entries q0 .. Q - 1 of row p: slot t holds (Q - q0) entries
  void states(int64_t p, int64_t q0) {
    const int64_t Q = s.Q, qb = Q - q0, w = s.w, P = s.P;
    std::copy(x.A0 + p * Q + q0, x.A0 + p * Q + Q, As.data());
    std::copy(x.S0 + p * Q + q0, x.S0 + p * Q + Q, Ss.data());
    for (int64_t t = 0; t < s.n; ++t)
      for (int64_t j = 0; j < qb; ++j) {
        T sj = x.eta[t] * Ss[t * qb + j];
        for (int64_t k = 0; k < w; ++k) sj -= x.Wb[t * w + k] * x.d[(t + k) * P + p] * x.a[(t + k) * Q + q0 + j];
        Ss[(t + 1) * qb + j] = sj;
        As[(t + 1) * qb + j] = x.beta[t] * As[t * qb + j] + sj;
      }
  }
  void forward(int64_t p, int64_t q0, double* N) {
    const int64_t qb = s.Q - q0;
    states(p, q0);
    for (int64_t t = 0; t < s.n; ++t)
      for (int64_t j = 0; j < qb; ++j) {
        const double y = static_cast<double>(As[(t + 1) * qb + j]);
        N[t] += y * y * y * y;
      }
  }
  void backward(const T* gN, int64_t p, int64_t q0, double* dbeta, double* deta, double* dot, T* da, T* oA, T* oS) {
    const int64_t Q = s.Q, qb = Q - q0, w = s.w, P = s.P;
    states(p, q0);
    for (int64_t j = 0; j < qb; ++j) {
      T dA = 0, dS = 0;
      for (int64_t t = s.n - 1; t >= 0; --t) {
        const T y = As[(t + 1) * qb + j];
        const T dAt = dA + 4 * gN[t] * y * y * y;
        dbeta[t] += static_cast<double>(dAt) * As[t * qb + j];
        const T dSt = dS + dAt;
        deta[t] += static_cast<double>(dSt) * Ss[t * qb + j];
        dA = x.beta[t] * dAt;
        dS = x.eta[t] * dSt;
        for (int64_t k = 0; k < w; ++k) {
          const int64_t e = t + k;
          dot[t * w + k] += static_cast<double>(dSt) * x.a[e * Q + q0 + j];
          da[e * Q + q0 + j] -= x.Wb[t * w + k] * x.d[e * P + p] * dSt;
        }
      }
      oA[j] = s.acc ? oA[j] + dA : dA;
      oS[j] = s.acc ? oS[j] + dS : dS;
    }
  }
};

// the blocks of one matrix row: 8 vectors while they fit, then 4, then 1; returns where the tail starts
template <typename F8, typename F4, typename F1>
int64_t over_blocks(int64_t Q, int L, F8&& f8, F4&& f4, F1&& f1) {
  int64_t q0 = 0;
  for (; q0 + 8 * L <= Q; q0 += 8 * L) f8(q0);
  for (; q0 + 4 * L <= Q; q0 += 4 * L) f4(q0);
  for (; q0 + L <= Q; q0 += L) f1(q0);
  return q0;
}

// ptrs: A0 S0 d a beta eta Wb, then out N [n] (7)
template <typename T>
bool lq4_forward(const RecurSpec& s, void** ptrs) {
  using V = typename Lanes<T>::V;
  constexpr int L = Lanes<T>::N;
  const int64_t n = s.n;
  return over_range(s.R, s.threads, [&](int64_t lo, int64_t hi) {
    std::vector<double> N(n);
    std::vector<V> Nv(n);
    for (int64_t r = lo; r < hi; ++r) {
      const RecurRow<T> x(s, ptrs, r);
      Lq4Tail<T> tail(x, s);
      T* out = static_cast<T*>(ptrs[7]) + r * n;
      std::fill(N.begin(), N.end(), 0.0);
      std::fill(Nv.begin(), Nv.end(), splat<V>(0));
      for (int64_t p = 0; p < s.P; ++p) {
        const int64_t q0 = over_blocks(
            s.Q, L, [&](int64_t q) { lq4_block_forward<T, 8>(x, s, p, q, Nv.data()); },
            [&](int64_t q) { lq4_block_forward<T, 4>(x, s, p, q, Nv.data()); },
            [&](int64_t q) { lq4_block_forward<T, 1>(x, s, p, q, Nv.data()); });
        if (q0 < s.Q) tail.forward(p, q0, N.data());
      }
      for (int64_t t = 0; t < n; ++t) out[t] = static_cast<T>(N[t] + hsum(Nv[t]));
    }
  });
}

// ptrs: A0 S0 d a beta eta Wb, gN [n] (7), then out dA0 dS0 dd da dbeta deta dWb (8 .. 14); dA0 / dS0 contiguous
// [R, P, Q], or with s.acc added into tensors laid out like A0 / S0
template <typename T>
bool lq4_backward(const RecurSpec& s, void** ptrs) {
  using V = typename Lanes<T>::V;
  constexpr int L = Lanes<T>::N;
  const int64_t n = s.n, w = s.w, P = s.P, Q = s.Q, m = n + w - 1;
  return over_range(s.R, s.threads, [&](int64_t lo, int64_t hi) {
    std::vector<T> As((n + 1) * 8 * L), Ss((n + 1) * 8 * L);
    std::vector<double> dbeta(n), deta(n), dWb(n * w), dot(n * w);
    std::vector<V> dbv(n), dev(n), dotv(n * w);
    for (int64_t r = lo; r < hi; ++r) {
      const RecurRow<T> x(s, ptrs, r);
      Lq4Tail<T> tail(x, s);
      const T* gN = static_cast<const T*>(ptrs[7]) + r * n;
      const int64_t so = s.acc ? r * s.rs : r * P * Q;
      T* dA0 = static_cast<T*>(ptrs[8]) + so;
      T* dS0 = static_cast<T*>(ptrs[9]) + so;
      T* dd = static_cast<T*>(ptrs[10]) + r * m * P;
      T* da = static_cast<T*>(ptrs[11]) + r * m * Q;
      std::fill(dd, dd + m * P, T(0));
      std::fill(da, da + m * Q, T(0));
      std::fill(dbeta.begin(), dbeta.end(), 0.0);
      std::fill(deta.begin(), deta.end(), 0.0);
      std::fill(dWb.begin(), dWb.end(), 0.0);
      std::fill(dbv.begin(), dbv.end(), splat<V>(0));
      std::fill(dev.begin(), dev.end(), splat<V>(0));
      for (int64_t p = 0; p < P; ++p) {
        std::fill(dot.begin(), dot.end(), 0.0);
        std::fill(dotv.begin(), dotv.end(), splat<V>(0));
        T* oA = dA0 + p * Q;
        T* oS = dS0 + p * Q;
        const int64_t q0 = over_blocks(
            Q, L,
            [&](int64_t q) {
              lq4_block_backward<T, 8>(x, s, gN, p, q, As.data(), Ss.data(), dbv.data(), dev.data(), dotv.data(), da,
                                       oA + q, oS + q);
            },
            [&](int64_t q) {
              lq4_block_backward<T, 4>(x, s, gN, p, q, As.data(), Ss.data(), dbv.data(), dev.data(), dotv.data(), da,
                                       oA + q, oS + q);
            },
            [&](int64_t q) {
              lq4_block_backward<T, 1>(x, s, gN, p, q, As.data(), Ss.data(), dbv.data(), dev.data(), dotv.data(), da,
                                       oA + q, oS + q);
            });
        if (q0 < Q) tail.backward(gN, p, q0, dbeta.data(), deta.data(), dot.data(), da, oA + q0, oS + q0);
        for (int64_t t = 0; t < n; ++t)  // dd_e -= Wb[t, k] dS_t . a_e, dWb[t, k] = -d_e^T dS_t a_e (e = t + k)
          for (int64_t k = 0; k < w; ++k) {
            const int64_t e = t + k;
            const double acc = dot[t * w + k] + hsum(dotv[t * w + k]);
            dd[e * P + p] -= static_cast<T>(x.Wb[t * w + k] * acc);
            dWb[t * w + k] -= static_cast<double>(x.d[e * P + p]) * acc;
          }
      }
      T* db_out = static_cast<T*>(ptrs[12]) + r * n;
      T* de_out = static_cast<T*>(ptrs[13]) + r * n;
      T* dw_out = static_cast<T*>(ptrs[14]) + r * n * w;
      for (int64_t t = 0; t < n; ++t) {
        db_out[t] = static_cast<T>(dbeta[t] + hsum(dbv[t]));
        de_out[t] = static_cast<T>(deta[t] + hsum(dev[t]));
      }
      for (int64_t i = 0; i < n * w; ++i) dw_out[i] = static_cast<T>(dWb[i]);
    }
  });
}

// Memora (kl, rows): y_t[p] = sum_q softmax(A_t[p, :])[q] h_t[q]. The lanes hold L = Lanes<T>::N matrix rows (one
// group of rows p0 .. p0 + L), so that a row's max, its sum of exps and its dot with h_t are lane-wise (vertical)
// operations: no horizontal reduction per row and token. A group's A0 and S0 are transposed once into [Q] vectors
// (lanes past P padded with zeros: their softmax is uniform and their gradient zero), then walked a block of NV
// entries q (NV vectors) at a time through all of the chunk's tokens, the block's A and S in registers. The row's
// softmax spans every block, so the forward keeps per token a running max M, sum Z and dot Y (online softmax: a block
// whose max exceeds M rescales Z and Y by exp(M_old - M_new), one exp per block and token) and writes y = Y / Z, and
// the row's M and 1 / Z for the backward (stats [2, n, P]). The backward, given y and those stats, needs no pass over
// a whole row: per block it recomputes the n + 1 states (in L1), then runs the adjoint recurrence in reverse, the
// block's dA, dS in registers, E_t = (gy_t / Z_t) e (h_t - y_t) with e = exp(A_t - M_t) formed inline. Sums over the
// lanes (dh, da over rows; dbeta, deta over everything) are kept as vectors per token and entry and reduced once per
// (sequence, head) row.
//
// The forward also writes the accumulator and momentum after the chunk's last token (A_n, S_n [P, Q]: the next
// chunk's start, from the registers the walk ends with), and the backward starts its adjoints from their gradients.
// ptrs forward: A0 S0 d a beta eta Wb h, out y [n, P], out stats [2, n, P], out A_n S_n. Backward: A0 S0 d a beta eta
// Wb h, y, stats, gy [n, P], gA_n, gS_n, then out dA0 dS0 (contiguous [P, Q]) dd da dbeta deta dWb dh.

template <typename T>
struct KlGroup {  // one group of L matrix rows of one (sequence, head) row: its recurrence inputs in lanes
  using V = typename Lanes<T>::V;
  static constexpr int L = Lanes<T>::N;
  const RecurSpec& s;
  std::vector<V> A, S, c;  // A0, S0 transposed [Q]; c[t w + k] = Wb[t, k] d_{t+k}[rows]
  int64_t p0 = 0, np = 0;
  explicit KlGroup(const RecurSpec& spec) : s(spec), A(spec.Q), S(spec.Q), c(spec.n * spec.w) {}
  static V lanes(const T* x, int64_t np) {  // x[0 .. np) in the first lanes, zeros after
    V v = splat<V>(0);
    for (int64_t l = 0; l < np; ++l) v[l] = x[l];
    return v;
  }
  // matrix rows p0 .. p0 + np of x [P, Q] (row-major) into the lanes of dst [Q] (zeros past np)
  void gather(const T* x, V* dst) const {
    std::fill(dst, dst + s.Q, splat<V>(0));
    for (int64_t l = 0; l < np; ++l)
      for (int64_t q = 0; q < s.Q; ++q) dst[q][l] = x[(p0 + l) * s.Q + q];
  }
  void scatter(const V* src, T* x) const {  // the reverse of gather
    for (int64_t l = 0; l < np; ++l)
      for (int64_t q = 0; q < s.Q; ++q) x[(p0 + l) * s.Q + q] = src[q][l];
  }
  void load(const RecurRow<T>& x, int64_t first) {
    const int64_t P = s.P;
    p0 = first;
    np = std::min<int64_t>(L, P - p0);
    gather(x.A0, A.data());
    gather(x.S0, S.data());
    for (int64_t t = 0; t < s.n; ++t)
      for (int64_t k = 0; k < s.w; ++k) c[t * s.w + k] = x.Wb[t * s.w + k] * lanes(x.d + (t + k) * P + p0, np);
  }
  // the block's A and S (entries q0 .. q0 + NV) through token t, in place
  template <int NV>
  inline void step(const RecurRow<T>& x, int64_t t, int64_t q0, V* Ab, V* Sb) const {
    const V et = splat<V>(x.eta[t]), bt = splat<V>(x.beta[t]);
    for (int v = 0; v < NV; ++v) Sb[v] = et * Sb[v];
    for (int64_t k = 0; k < s.w; ++k) {
      const V ck = c[t * s.w + k];
      const T* ak = x.a + (t + k) * s.Q + q0;
      for (int v = 0; v < NV; ++v) Sb[v] -= ck * ak[v];
    }
    for (int v = 0; v < NV; ++v) Ab[v] = bt * Ab[v] + Sb[v];
  }
};

template <typename V>
inline V vmax(V a, V b) {
  return a > b ? a : b;
}

template <typename T, int NV>
void kl_block_forward(const RecurRow<T>& x, const KlGroup<T>& g, const T* h, int64_t q0, bool first,
                      typename Lanes<T>::V* M, typename Lanes<T>::V* Z, typename Lanes<T>::V* Y,
                      typename Lanes<T>::V* oA, typename Lanes<T>::V* oS) {
  using V = typename Lanes<T>::V;
  const int64_t Q = g.s.Q;
  V A[NV], S[NV];
  for (int v = 0; v < NV; ++v) {
    A[v] = g.A[q0 + v];
    S[v] = g.S[q0 + v];
  }
  for (int64_t t = 0; t < g.s.n; ++t) {
    g.template step<NV>(x, t, q0, A, S);
    V mx = A[0];
    for (int v = 1; v < NV; ++v) mx = vmax(mx, A[v]);
    V scale = splat<V>(0);
    if (!first) {
      const V m_new = vmax(M[t], mx);
      scale = vexp(M[t] - m_new);
      mx = m_new;
    }
    const T* ht = h + t * Q + q0;
    V z = splat<V>(0), y = splat<V>(0);
    for (int v = 0; v < NV; ++v) {
      const V e = vexp(A[v] - mx);
      z += e;
      y += e * ht[v];
    }
    M[t] = mx;
    Z[t] = first ? z : Z[t] * scale + z;
    Y[t] = first ? y : Y[t] * scale + y;
  }
  for (int v = 0; v < NV; ++v) {  // the states after the chunk's last token
    oA[q0 + v] = A[v];
    oS[q0 + v] = S[v];
  }
}

template <typename T, int NV>
void kl_block_backward(const RecurRow<T>& x, const KlGroup<T>& g, const T* h, int64_t q0, const typename Lanes<T>::V* M,
                       const typename Lanes<T>::V* G, const typename Lanes<T>::V* Yv, typename Lanes<T>::V* As,
                       typename Lanes<T>::V* Ss, typename Lanes<T>::V* dbv, typename Lanes<T>::V* dev,
                       typename Lanes<T>::V* dotv, typename Lanes<T>::V* dh, typename Lanes<T>::V* da,
                       typename Lanes<T>::V* oA, typename Lanes<T>::V* oS) {
  using V = typename Lanes<T>::V;
  const int64_t n = g.s.n, w = g.s.w, Q = g.s.Q;
  {  // the block's states: slot 0 the chunk's start, slot t + 1 after token t
    V A[NV], S[NV];
    for (int v = 0; v < NV; ++v) {
      As[v] = A[v] = g.A[q0 + v];
      Ss[v] = S[v] = g.S[q0 + v];
    }
    for (int64_t t = 0; t < n; ++t) {
      g.template step<NV>(x, t, q0, A, S);
      for (int v = 0; v < NV; ++v) {
        As[(t + 1) * NV + v] = A[v];
        Ss[(t + 1) * NV + v] = S[v];
      }
    }
  }
  V dA[NV], dS[NV], dSt[NV];
  for (int v = 0; v < NV; ++v) {  // on entry oA, oS hold the gradients of the chunk's final A and S
    dA[v] = oA[q0 + v];
    dS[v] = oS[q0 + v];
  }
  for (int64_t t = n - 1; t >= 0; --t) {
    const V* At = As + (t + 1) * NV;
    const V* Ap = As + t * NV;
    const V* Sp = Ss + t * NV;
    const V bt = splat<V>(x.beta[t]), et = splat<V>(x.eta[t]), mt = M[t], gt = G[t], yt = Yv[t];
    const T* ht = h + t * Q + q0;
    V* dht = dh + t * Q + q0;
    V db = splat<V>(0), de = splat<V>(0);
    for (int v = 0; v < NV; ++v) {
      const V gs = gt * vexp(At[v] - mt);  // gy_t / Z_t * e: the read's gradient through the softmax's numerator
      dht[v] += gs;
      const V dAt = dA[v] + gs * (ht[v] - yt);
      db += dAt * Ap[v];
      const V dSv = dS[v] + dAt;
      de += dSv * Sp[v];
      dA[v] = bt * dAt;
      dS[v] = et * dSv;
      dSt[v] = dSv;
    }
    dbv[t] += db;
    dev[t] += de;
    for (int64_t k = 0; k < w; ++k) {  // the window's writes into token t: their factors' gradients
      const int64_t e = t + k;
      const V ck = g.c[t * w + k];
      const T* ae = x.a + e * Q + q0;
      V* dae = da + e * Q + q0;
      V acc = splat<V>(0);
      for (int v = 0; v < NV; ++v) {
        acc += dSt[v] * ae[v];
        dae[v] -= ck * dSt[v];
      }
      dotv[t * w + k] += acc;
    }
  }
  for (int v = 0; v < NV; ++v) {
    oA[q0 + v] = dA[v];
    oS[q0 + v] = dS[v];
  }
}

template <typename T>
bool kl_row_forward(const RecurSpec& s, void** ptrs) {
  using V = typename Lanes<T>::V;
  constexpr int L = Lanes<T>::N;
  const int64_t n = s.n, P = s.P, Q = s.Q;
  return over_range(s.R, s.threads, [&](int64_t lo, int64_t hi) {
    KlGroup<T> g(s);
    std::vector<V> M(n), Z(n), Y(n), oA(Q), oS(Q);
    for (int64_t r = lo; r < hi; ++r) {
      const RecurRow<T> x(s, ptrs, r);
      const T* h = static_cast<const T*>(ptrs[7]) + r * n * Q;
      T* y = static_cast<T*>(ptrs[8]) + r * n * P;
      T* stats = static_cast<T*>(ptrs[9]) + r * 2 * n * P;
      T* A_n = static_cast<T*>(ptrs[10]) + r * P * Q;
      T* S_n = static_cast<T*>(ptrs[11]) + r * P * Q;
      for (int64_t p0 = 0; p0 < P; p0 += L) {
        g.load(x, p0);
        bool first = true;
        auto block = [&](auto nv, int64_t q) {
          kl_block_forward<T, decltype(nv)::value>(x, g, h, q, first, M.data(), Z.data(), Y.data(), oA.data(),
                                                   oS.data());
          first = false;
        };
        over_blocks(
            Q, 1, [&](int64_t q) { block(std::integral_constant<int, 8>{}, q); },
            [&](int64_t q) { block(std::integral_constant<int, 4>{}, q); },
            [&](int64_t q) { block(std::integral_constant<int, 1>{}, q); });
        for (int64_t t = 0; t < n; ++t) {
          const V iz = T(1) / Z[t], yt = Y[t] * iz;
          for (int64_t l = 0; l < g.np; ++l) {
            y[t * P + p0 + l] = yt[l];
            stats[t * P + p0 + l] = M[t][l];
            stats[(n + t) * P + p0 + l] = iz[l];
          }
        }
        g.scatter(oA.data(), A_n);
        g.scatter(oS.data(), S_n);
      }
    }
  });
}

template <typename T>
bool kl_row_backward(const RecurSpec& s, void** ptrs) {
  using V = typename Lanes<T>::V;
  constexpr int L = Lanes<T>::N;
  const int64_t n = s.n, w = s.w, P = s.P, Q = s.Q, m = n + w - 1;
  return over_range(s.R, s.threads, [&](int64_t lo, int64_t hi) {
    KlGroup<T> g(s);
    std::vector<V> As((n + 1) * 8), Ss((n + 1) * 8), M(n), G(n), Yv(n), dbv(n), dev(n), dotv(n * w), dh(n * Q),
        da(m * Q), oA(Q), oS(Q);
    std::vector<double> dWb(n * w);
    for (int64_t r = lo; r < hi; ++r) {
      const RecurRow<T> x(s, ptrs, r);
      const T* h = static_cast<const T*>(ptrs[7]) + r * n * Q;
      const T* y = static_cast<const T*>(ptrs[8]) + r * n * P;
      const T* stats = static_cast<const T*>(ptrs[9]) + r * 2 * n * P;
      const T* gy = static_cast<const T*>(ptrs[10]) + r * n * P;
      const T* gA = static_cast<const T*>(ptrs[11]) + r * P * Q;
      const T* gS = static_cast<const T*>(ptrs[12]) + r * P * Q;
      T* dA0 = static_cast<T*>(ptrs[13]) + r * P * Q;
      T* dS0 = static_cast<T*>(ptrs[14]) + r * P * Q;
      T* dd = static_cast<T*>(ptrs[15]) + r * m * P;
      T* da_out = static_cast<T*>(ptrs[16]) + r * m * Q;
      std::fill(dd, dd + m * P, T(0));
      std::fill(dbv.begin(), dbv.end(), splat<V>(0));
      std::fill(dev.begin(), dev.end(), splat<V>(0));
      std::fill(dh.begin(), dh.end(), splat<V>(0));
      std::fill(da.begin(), da.end(), splat<V>(0));
      std::fill(dWb.begin(), dWb.end(), 0.0);
      for (int64_t p0 = 0; p0 < P; p0 += L) {
        g.load(x, p0);
        for (int64_t t = 0; t < n; ++t) {
          M[t] = g.lanes(stats + t * P + p0, g.np);
          G[t] = g.lanes(gy + t * P + p0, g.np) * g.lanes(stats + (n + t) * P + p0, g.np);
          Yv[t] = g.lanes(y + t * P + p0, g.np);
        }
        std::fill(dotv.begin(), dotv.end(), splat<V>(0));
        g.gather(gA, oA.data());
        g.gather(gS, oS.data());
        auto block = [&](auto nv, int64_t q) {
          kl_block_backward<T, decltype(nv)::value>(x, g, h, q, M.data(), G.data(), Yv.data(), As.data(), Ss.data(),
                                                    dbv.data(), dev.data(), dotv.data(), dh.data(), da.data(),
                                                    oA.data(), oS.data());
        };
        over_blocks(
            Q, 1, [&](int64_t q) { block(std::integral_constant<int, 8>{}, q); },
            [&](int64_t q) { block(std::integral_constant<int, 4>{}, q); },
            [&](int64_t q) { block(std::integral_constant<int, 1>{}, q); });
        g.scatter(oA.data(), dA0);
        g.scatter(oS.data(), dS0);
        for (int64_t t = 0; t < n; ++t)  // dd_e -= Wb[t, k] dS_t a_e, dWb[t, k] = -d_e^T dS_t a_e (e = t + k)
          for (int64_t k = 0; k < w; ++k) {
            const int64_t e = t + k;
            const V acc = dotv[t * w + k];
            double dw = 0;
            for (int64_t l = 0; l < g.np; ++l) {
              dd[e * P + p0 + l] -= x.Wb[t * w + k] * acc[l];
              dw += static_cast<double>(x.d[e * P + p0 + l]) * acc[l];
            }
            dWb[t * w + k] -= dw;
          }
      }
      T* db_out = static_cast<T*>(ptrs[17]) + r * n;
      T* de_out = static_cast<T*>(ptrs[18]) + r * n;
      T* dw_out = static_cast<T*>(ptrs[19]) + r * n * w;
      T* dh_out = static_cast<T*>(ptrs[20]) + r * n * Q;
      for (int64_t t = 0; t < n; ++t) {
        db_out[t] = static_cast<T>(hsum(dbv[t]));
        de_out[t] = static_cast<T>(hsum(dev[t]));
      }
      for (int64_t i = 0; i < n * w; ++i) dw_out[i] = static_cast<T>(dWb[i]);
      for (int64_t i = 0; i < n * Q; ++i) dh_out[i] = static_cast<T>(hsum(dh[i]));
      for (int64_t i = 0; i < m * Q; ++i) da_out[i] = static_cast<T>(hsum(da[i]));
    }
  });
}

}  // namespace

// spec: L, n, nc, groups (of LANES rows), residual, activation (0 gelu, 1 silu), loss (0 l2, 1 dot), has_A, threads,
// normalize_step, dims[0 .. L]. Returns 0, 1 for a spec out of range (nothing written), or 2 when a thread could not
// allocate its scratch (outputs incomplete).
extern "C" {
// dims: outer, rows, inner, width; to_lanes != 0: src [outer, rows, inner] -> dst in lanes, else the reverse
void mnemos_lanes_f32(const int64_t* dims, const float* src, float* dst, int to_lanes) {
  (to_lanes ? pack<float> : unpack<float>)(src, dst, dims[0], dims[1], dims[2], dims[3]);
}
void mnemos_lanes_f64(const int64_t* dims, const double* src, double* dst, int to_lanes) {
  (to_lanes ? pack<double> : unpack<double>)(src, dst, dims[0], dims[1], dims[2], dims[3]);
}
int mnemos_scan_lanes_f32() { return Lanes<float>::N; }
int mnemos_scan_lanes_f64() { return Lanes<double>::N; }
// name_f32 / name_f64: parse the spec into SpecT with parser, run fn<T, ...>: 0, 1 (spec out of range), 2 (no memory)
#define MNEMOS_EXPORT(name, SpecT, parser, fn, ...)             \
  int name##_f32(const int64_t* spec, void** ptrs) {            \
    SpecT s;                                                    \
    if (!parser(spec, s)) return 1;                             \
    return fn<float, ##__VA_ARGS__>(s, ptrs) ? 0 : 2;           \
  }                                                             \
  int name##_f64(const int64_t* spec, void** ptrs) {            \
    SpecT s;                                                    \
    if (!parser(spec, s)) return 1;                             \
    return fn<double, ##__VA_ARGS__>(s, ptrs) ? 0 : 2;          \
  }
// the vectors of one group's segment-start states (scan_forward's bounds), or -1 for a spec out of range
int64_t mnemos_scan_bounds_f32(const int64_t* spec) {
  Spec s;
  return parse(spec, s) ? bounds_size<float>(s) : -1;
}
int64_t mnemos_scan_bounds_f64(const int64_t* spec) {
  Spec s;
  return parse(spec, s) ? bounds_size<double>(s) : -1;
}
MNEMOS_EXPORT(mnemos_scan_forward, Spec, parse, scan_forward)
MNEMOS_EXPORT(mnemos_scan_backward, Spec, parse, scan_backward)
MNEMOS_EXPORT(mnemos_lq4_forward, RecurSpec, parse_recur, lq4_forward)
MNEMOS_EXPORT(mnemos_lq4_backward, RecurSpec, parse_recur, lq4_backward)
MNEMOS_EXPORT(mnemos_kl_row_forward, RecurSpec, parse_recur, kl_row_forward)
MNEMOS_EXPORT(mnemos_kl_row_backward, RecurSpec, parse_recur, kl_row_backward)
}
