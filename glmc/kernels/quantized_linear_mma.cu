// glmc::QuantizedLinear decode GEMV on tensor cores (the `mma` variant of glmc/kernels/quantized_linear.py).
//
// Y[m, n] = sum_k X[m, k] * dequant(W)[n, k] for M <= 16 rows of fp16 activations, int4 / int8 / fp16 weights,
// written as float32 split-K partials out[split, M, N] (bias not added), exactly the contract of the Triton
// variants. Compiled at run time by NVRTC (torch.cuda._compile_kernel); no headers, every half operation is PTX.
//
// One warp owns R blocks of 8 weight rows and walks its split's K range in "spans": each lane loads 16 bytes of one
// weight row per span (lane = 4 * g + t: row 8 * block + g, the t-th quarter of the span), so a span is 128 (int4),
// 64 (int8) or 32 (fp16) columns of 8 rows, read as 8 contiguous 64-byte runs. Those 16 bytes are exactly the
// lane's B fragments of 8 / 4 / 2 mma.m16n8k16 steps once the columns are renumbered inside the span: step s takes
// the lane's physical columns 4s..4s+3 as the fragment's logical k = (2t, 2t+1, 2t+8, 2t+9). The activations are
// renumbered the same way (lane t loads X[g, span + t * KS/4 ...] contiguous), so the sum is unchanged. The A
// fragment's rows are X's rows g and g + 8 (zero past M); the C fragment holds Y[g | g+8, 8 * block + 2t | 2t+1].
//
// Decoding (no int->float instruction): int4 words are glmc's interleaved words (interleave_int4: nibbles k0 k2 k4
// k6 k1 k3 k5 k7, code + 8), so lop3(w, 0x000F000F, 0x64006400) is the fp16 pair (1024 + u0, 1024 + u1) minus 1032
// = (q0, q1); int8 bytes (two's complement, xor 0x80 = code + 128) are permuted into 0x64XX = 1152 + q. Grouped
// scales (a group a whole number of spans) multiply each span's float32 partial; per-channel scales the final sum.
//
// Layouts: the op's rows (TILED 0: a warp's span is 8 runs of 64 bytes, one per row, K bytes apart) or tiles made
// once at load time (TILED 1, quantized_linear.tile_layer): [N / 8, spans, 8 rows, 64 bytes], so a warp's span is one
// contiguous 512-byte block in its lanes' order and a warp streams its 8 rows as one run; group scales alike
// [N / 8, groups, 8].
//
// Pipelining: a warp loads the weights (and group scales) of its next U spans before computing the current U, so two
// rounds of loads are in flight; with L2HINT the loads ask L2 for 256-byte lines (the next spans of the same rows).
// PDL (sm90+, launched with programmatic stream serialization): the first round of weights is loaded before
// `griddepcontrol.wait`, i.e. while the kernel that writes X is still finishing; X is read only after it.

typedef unsigned int u32;
struct __align__(16) u32x4 { u32 x, y, z, w; };

template <int L2HINT>
__device__ __forceinline__ u32x4 ld_stream(const u32x4* p) {  // weights: read once, kept out of L1
  u32x4 v;
  if (L2HINT)
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  else
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// X: free to be scheduled early (its address is laundered after griddepcontrol.wait, so never above it); a coherent
// load, not the read-only path: the kernel before this one may still be writing X when this one starts (PDL)
__device__ __forceinline__ u32x4 ld_x(const u32x4* p) {
  u32x4 v;
  asm("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ float ld_half(const unsigned short* p) {
  unsigned short h;
  float f;
  asm("ld.global.nc.u16 %0, [%1];" : "=h"(h) : "l"(p));
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ u32 lop3_and_or(u32 a, u32 b, u32 c) {  // (a & b) | c
  u32 d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

__device__ __forceinline__ u32 hsub2(u32 a, u32 b) {
  u32 d;
  asm("sub.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
  u32 d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
  u32 d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

__device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned short to_half(float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

__device__ __forceinline__ float from_half(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ unsigned short swiglu(float gate, float up) {
  const float g = from_half(to_half(gate)), u = from_half(to_half(up));
  return to_half(from_half(to_half(g / (1.f + __expf(-g)))) * u);
}

// The lane's 16 weight bytes of one span -> B fragments (b0, b1) of each of the span's mma steps.
template <int BITS>
__device__ __forceinline__ void decode(const u32x4& v, u32* b) {
  const u32 w[4] = {v.x, v.y, v.z, v.w};
  if (BITS == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // word i: steps 2i (k 0..3 of the word) and 2i + 1 (k 4..7)
      const u32 w8 = w[i] >> 8;
      b[4 * i + 0] = hsub2(lop3_and_or(w[i], 0x000F000Fu, 0x64006400u), 0x64086408u);               // k0 k1
      b[4 * i + 1] = hfma2(lop3_and_or(w[i], 0x00F000F0u, 0x64006400u), 0x2C002C00u, 0xD480D480u);  // k2 k3
      b[4 * i + 2] = hsub2(lop3_and_or(w8, 0x000F000Fu, 0x64006400u), 0x64086408u);                 // k4 k5
      b[4 * i + 3] = hfma2(lop3_and_or(w8, 0x00F000F0u, 0x64006400u), 0x2C002C00u, 0xD480D480u);    // k6 k7
    }
  } else if (BITS == 8) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // word i: step i
      const u32 u = w[i] ^ 0x80808080u;
      b[2 * i + 0] = hsub2(prmt(u, 0x64646464u, 0x5140u), 0x64806480u);  // k0 k1
      b[2 * i + 1] = hsub2(prmt(u, 0x64646464u, 0x7362u), 0x64806480u);  // k2 k3
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) b[i] = w[i];
  }
}

// BITS: 4 | 8 | 16. GROUP: 0 (per channel; none for fp16) or a multiple of the span. TILED: the layout above.
// R: 8-row blocks per warp.
// U: spans per round of loads. MT: 8 (M <= 8: the A fragment's rows 8..15 are zero) or 16. L2HINT: 256-byte L2
// lines. PDL: griddepcontrol (sm90+). SWIGLU: the rows are dense_h_to_4h's interleaved (gate j, up j) and the split
// is 1, so a lane's C pair is (gate, up) of one column: out is then fp16 silu(gate) * up [M, N / 2], rounded as
// glmc.kernels.norm.swiglu rounds (gate and up to fp16, silu(gate) to fp16, the product to fp16).
template <int BITS, int GROUP, int TILED, int R, int U, int MT, int L2HINT, int PDL, int SWIGLU>
__global__ void gemv_mma(const u32x4* __restrict__ w, const unsigned short* __restrict__ x,
                         const unsigned short* __restrict__ scale, void* __restrict__ out, int M, int N, int K,
                         int stride_xm, int stride_sn, int spans_per_split) {
  constexpr int KS = BITS == 4 ? 128 : (BITS == 8 ? 64 : 32);  // columns per span
  constexpr int STEPS = KS / 16;                               // mma steps per span
  constexpr int XV = KS / 32;                                  // 16-byte X loads per lane and row per span
  constexpr int NS = GROUP > 0 ? 2 : 1;                        // group scales per (span, block) and lane
  if (PDL) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int warp = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int blocks = N >> 3;
  const int spans = K / KS;
  const int sp0 = blockIdx.y * spans_per_split;
  const int sp1 = min(sp0 + spans_per_split, spans);
  const int row_vecs = K * BITS / 128;  // 16-byte vectors per weight row
  const bool live = warp * R < blocks;  // a warp past N only waits (PDL) and leaves
  constexpr int SPAN_VECS = TILED ? 32 : 4;  // 16-byte vectors from one span of a lane's row to the next
  const int groups = GROUP > 0 ? (K + GROUP - 1) / GROUP : 1;  // the last group may be short
  const int s_row = TILED ? 1 : stride_sn, s_group = TILED ? 8 : 1;  // scale steps: next row, next group
  const u32x4* wl[R];
  const unsigned short* sl[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int blk = min(warp * R + r, blocks - 1);  // a warp's blocks past N re-read the last one, never stored
    wl[r] = TILED ? w + (size_t)blk * spans * 32 + lane : w + (size_t)(blk * 8 + g) * row_vecs + t;
    sl[r] = TILED ? scale + (size_t)blk * groups * 8 + 2 * t : scale + (size_t)(blk * 8 + 2 * t) * stride_sn;
  }
  const bool x0ok = g < M, x1ok = MT == 16 && g + 8 < M;
  const u32x4* xl0 = reinterpret_cast<const u32x4*>(x + (size_t)(x0ok ? g : 0) * stride_xm) + t * XV;
  const u32x4* xl1 = reinterpret_cast<const u32x4*>(x + (size_t)(x1ok ? g + 8 : 0) * stride_xm) + t * XV;
  auto launder = [](const u32x4*& p0, const u32x4*& p1) {  // X's loads depend on this, placed after the wait
    asm volatile("" : "+l"(p0), "+l"(p1) :: "memory");
  };
  float acc[R][2][4];  // two independent mma chains per block (even and odd steps), summed at the end
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[r][i / 4][i % 4] = 0.f;

  // one span: X's fragments once, then each 8-row block's 16 weight bytes v[r] and its scales for the span
  auto span = [&](int sp, const u32x4 (&v)[R], const float (&s0)[R], const float (&s1)[R]) {
    u32x4 xv0[XV], xv1[XV];
#pragma unroll
    for (int i = 0; i < XV; ++i) {
      xv0[i] = x0ok ? ld_x(xl0 + sp * 4 * XV + i) : u32x4{0, 0, 0, 0};
      xv1[i] = x1ok ? ld_x(xl1 + sp * 4 * XV + i) : u32x4{0, 0, 0, 0};
    }
    const u32* a0 = reinterpret_cast<const u32*>(xv0);
    const u32* a1 = reinterpret_cast<const u32*>(xv1);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      u32 b[2 * STEPS];
      decode<BITS>(v[r], b);
      float part[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
      for (int s = 0; s < STEPS; ++s)
        mma(GROUP > 0 ? part[s & 1] : acc[r][s & 1], a0[2 * s], MT == 16 ? a1[2 * s] : 0u, a0[2 * s + 1],
            MT == 16 ? a1[2 * s + 1] : 0u, b[2 * s], b[2 * s + 1]);
      if (GROUP > 0) {
        acc[r][0][0] += (part[0][0] + part[1][0]) * s0[r];
        acc[r][0][1] += (part[0][1] + part[1][1]) * s1[r];
        acc[r][0][2] += (part[0][2] + part[1][2]) * s0[r];
        acc[r][0][3] += (part[0][3] + part[1][3]) * s1[r];
      }
    }
  };
  auto scale_at = [&](int sp, int r, int i) {
    return GROUP > 0 ? ld_half(sl[r] + (size_t)i * s_row + (size_t)(sp * KS / (GROUP > 0 ? GROUP : 1)) * s_group)
                     : 1.f;
  };

  u32x4 wv[U][R], wn[U][R];
  float sv[U][R][NS], sn[U][R][NS];
  auto load = [&](int at, u32x4 (&wd)[U][R], float (&sd)[U][R][NS]) {
    const int uc = min(U, sp1 - at);
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (u < uc) {
          wd[u][r] = ld_stream<L2HINT>(wl[r] + (size_t)(at + u) * SPAN_VECS);
          if (GROUP > 0) {
            sd[u][r][0] = scale_at(at + u, r, 0);
            sd[u][r][NS - 1] = scale_at(at + u, r, 1);
          }
        }
  };
  if (live && sp0 < sp1) load(sp0, wv, sv);
  if (PDL) asm volatile("griddepcontrol.wait;" ::: "memory");
  if (!live) return;
  launder(xl0, xl1);
  for (int sp = sp0; sp < sp1; sp += U) {
    const int uc = min(U, sp1 - sp);
    if (sp + U < sp1) load(sp + U, wn, sn);  // the next round is in flight while this one is computed
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (u >= uc) break;
      float s0[R], s1[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        s0[r] = sv[u][r][0];
        s1[r] = sv[u][r][NS - 1];
      }
      span(sp + u, wv[u], s0, s1);
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < R; ++r) {
        wv[u][r] = wn[u][r];
#pragma unroll
        for (int i = 0; i < NS; ++i) sv[u][r][i] = sn[u][r][i];
      }
  }

#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int blk = warp * R + r;
    if (blk >= blocks) break;
    const int n = blk * 8 + 2 * t;
    float s0 = 1.f, s1 = 1.f;
    if (GROUP == 0 && BITS != 16) {
      s0 = ld_half(scale + n);
      s1 = ld_half(scale + n + 1);
    }
    float y[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) y[i] = (acc[r][0][i] + acc[r][1][i]) * (i % 2 ? s1 : s0);
    if (SWIGLU) {
      unsigned short* o = static_cast<unsigned short*>(out) + (size_t)g * (N / 2) + n / 2;
      if (g < M) o[0] = swiglu(y[0], y[1]);
      if (MT == 16 && g + 8 < M) o[(size_t)8 * (N / 2)] = swiglu(y[2], y[3]);
      continue;
    }
    float* o = static_cast<float*>(out) + ((size_t)blockIdx.y * M + g) * N + n;
    if (g < M) {
      o[0] = y[0];
      o[1] = y[1];
    }
    if (MT == 16 && g + 8 < M) {
      o[(size_t)8 * N] = y[2];
      o[(size_t)8 * N + 1] = y[3];
    }
  }
}
