// SPDX-License-Identifier: Apache-2.0
// Selective scan (Mamba-1 recurrence, Gu & Dao 2023, arXiv 2312.00752) in the M1 layout (arXiv 2504.10449):
// time-parallel CUDA forward and backward. Written for m1-suite; the maths (recurrence, gradients) is in
// ../README.md (sections "Gradients" and "CUDA kernels"), the Python side in ../cuda_scan.py.
//
// One block per (sequence, 16 consecutive channels of one C group; 16 / 8 in the forward, FWD_WIDTH); one warp per
// channel. A warp takes a chunk of
// TOK = 32 * ITEMS tokens, each lane ITEMS consecutive ones, and runs the linear recurrence
//     h_t = a_t h_{t-1} + b_t,   a_t = exp(delta_t A[d, n]),   b_t = delta_t x_t B_t[n]
// for one state n at a time: the lane composes its ITEMS maps (h -> P h + S), a warp scan (5 shuffle steps)
// composes the lanes', and a second pass over the items gives every h_t. The state loop is outermost, so the
// registers hold ITEMS values per quantity, not ITEMS * N. Chunks follow each other, carrying the state.
//
// The inputs are token-major (b, L, d) with any 16-byte aligned token stride: a block loads its chunk's
// (TOK, channels) tiles of x, dt, z (and dout) and the (TOK, N) tiles of its B and C group in 16-byte vectors
// (coalesced) into shared memory, transposed so that a lane reads its ITEMS tokens with one 16-byte load. B and C
// keep their G_B / G_C groups: the block reads its own group's rows, nothing is repeated.
//
// Backward, chunks last to first: recompute h from the state the forward saved at the chunk's start, then the
// adjoint dh_t = g_t C_t + a_{t+1} dh_{t+1} (g = dout * silu(z)) with a reverse warp scan, and per token
//     dx_t += dh_t B_t delta_t,  ddelta_t += dh_t (x_t B_t + h_{t-1} a_t A),  dA += dh_t h_{t-1} a_t delta_t,
//     dB_t[n] = sum over channels of dh_t delta_t x_t,  dC_t[n] = sum over channels of g_t h_t.
// The channel sums of dB/dC are taken in shared memory across the block's warps (each thread sums state n's shares
// while it computes state n + 1, synchronised by arrival barriers, not a block barrier), then added to global fp32
// buffers once per chunk (coalesced atomics: several blocks share a B group).
//
// For batches of many documents a third kernel runs the forward with one thread per (document, channel) and no time
// parallelism (scan_fwd_serial_kernel, below the chunked forward); it saves the same checkpoints.
//
// At 16 states, with enough (sequence, 16 channels) blocks to fill the GPU, the "lane-serial" kernels (scan_ls_kernel,
// at the end) replace the chunked backward and forward: each lane steps 4 (channel, state) recurrences through the
// tokens and the backward keeps recomputed states in registers instead of scanning.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace m1_scan {

#ifndef M1_SCAN_ITEMS
#define M1_SCAN_ITEMS 8
#endif
#ifndef M1_SCAN_BWD_MIN_BLOCKS  // blocks per SM the backward's register allocation must allow (0: no bound)
#define M1_SCAN_BWD_MIN_BLOCKS 0
#endif
#ifndef M1_SCAN_FWD_UNROLL  // states the forward works on side by side (independent chains hide latency)
#define M1_SCAN_FWD_UNROLL 4
#endif
#ifndef M1_SCAN_FWD_WIDTH  // channels (warps) per forward block; the backward's is W below
#define M1_SCAN_FWD_WIDTH 16
#endif
#ifndef M1_SCAN_BWD_UNROLL  // states per backward loop body: ptxas interleaves one state's latencies with the next's
#define M1_SCAN_BWD_UNROLL 2
#endif
#ifndef M1_SCAN_BWD_PREFETCH  // 1: the backward loads chunk c-1's tiles while it computes chunk c (as the forward)
#define M1_SCAN_BWD_PREFETCH 0
#endif
constexpr int ITEMS = M1_SCAN_ITEMS;  // consecutive tokens per lane
constexpr int FWD_UNROLL = M1_SCAN_FWD_UNROLL;
constexpr int BWD_UNROLL = M1_SCAN_BWD_UNROLL;
constexpr int TOK = 32 * ITEMS;    // tokens per chunk
constexpr int TP = TOK + 8;        // shared row length: +8 elements spreads the transposed writes over banks
constexpr int W = 16;  // channels (warps) per backward block: one C group of M1-3B, whose dC sum is then final
constexpr int WF = M1_SCAN_FWD_WIDTH;
static_assert(W % WF == 0, "a forward block must stay inside the backward's channel block (one C group)");
constexpr unsigned FULL = 0xffffffffu;
constexpr float LOG2E = 1.4426950408889634f;

// Mirrored field by field by cuda_scan.ScanParams (ctypes). Strides are in elements; the channel and state
// strides of the inputs are 1. Outputs and gradients of x, dt, z are contiguous (b, L, d_inner); dB_acc / dC_acc
// are contiguous fp32 (b, L, G, N); states are contiguous fp32 (seqs or slots, d_inner, N).
struct ScanParams {
    const void* x;
    const void* dt;
    const void* z;
    const void* B;
    const void* C;
    const float* A;
    const float* D;
    const float* dt_bias;
    const float* h0;
    const int* cu;
    const int* order;
    void* out;
    float* final_state;
    float* ckpt;
    const void* dout;
    const float* dfinal;
    void* dx;
    void* ddt;
    void* dz;
    void* dC_direct;
    float* dB_acc;
    float* dC_acc;
    float* dA;
    float* dD;
    float* dbias;
    float* dh0;
    int64_t x_b, x_l, dt_b, dt_l, z_b, z_l, B_b, B_l, B_g, C_b, C_l, C_g, do_b, do_l;
    int L, d_inner, N, G_B, G_C, cpc, cpb, n_chunks_row;
    int has_z, softplus, save_ckpt;
};

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

// One 16-byte vector of T to 16 / sizeof(T) fp32 values. A bf16 pair unpacks with two bit operations (the compiler's
// conversion spends a permute and a shift per element).
template <typename T> __device__ __forceinline__ void unpack_vector(const uint4& u, float* out) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            out[2 * j] = __uint_as_float(w[j] << 16);
            out[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
        }
    } else {
        const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int j = 0; j < 16 / int(sizeof(T)); ++j) out[j] = to_f(e[j]);
    }
}

// ITEMS consecutive elements of a shared row (16-byte aligned) to / from fp32 registers, 16 bytes at a time.
template <typename T> __device__ __forceinline__ void load_items(const T* s, float (&v)[ITEMS]) {
    constexpr int PER = 16 / sizeof(T);
    static_assert(ITEMS % PER == 0, "a lane's items must fill whole 16-byte loads");
#pragma unroll
    for (int k = 0; k < ITEMS / PER; ++k) unpack_vector<T>(reinterpret_cast<const uint4*>(s)[k], v + k * PER);
}
template <typename T> __device__ __forceinline__ void store_items(T* s, const float (&v)[ITEMS]) {
    constexpr int PER = 16 / sizeof(T);
#pragma unroll
    for (int k = 0; k < ITEMS / PER; ++k) {
        uint4 u;
        T* e = reinterpret_cast<T*>(&u);
#pragma unroll
        for (int j = 0; j < PER; ++j) e[j] = from_f<T>(v[k * PER + j]);
        reinterpret_cast<uint4*>(s)[k] = u;
    }
}

// A (TOK, COLS) tile of a token-major tensor, moved in 16-byte vectors: `fetch` issues every load of the tile into
// registers (a thread's share is NV vectors), `commit` writes them to shared memory transposed, [COLS][TP], so that
// a lane later reads its ITEMS tokens of one column with one 16-byte load. Fetching the next chunk's tiles before
// computing the current one keeps the loads in flight during the arithmetic. Tokens past `valid` read as 0 (delta = 0
// and x = 0 there make a = 1, b = 0: the padding leaves the state unchanged). Rows must be 16-byte aligned
// (cuda_scan.py copies inputs that are not).
template <typename T, int COLS, int NT> struct Tile {
    static constexpr int PER = 16 / int(sizeof(T));  // elements per vector
    static constexpr int VPR = COLS / PER;           // vectors per token row
    static constexpr int NV = (TOK * VPR + NT - 1) / NT;
    static_assert(COLS % PER == 0, "a row must be whole 16-byte vectors");
    uint4 v[NV];

    __device__ __forceinline__ void fetch(const T* g, int64_t tok_stride, int valid) {
#pragma unroll
        for (int k = 0; k < NV; ++k) {
            const int e = int(threadIdx.x) + k * NT, t = e / VPR, j = e % VPR;
            v[k] = e < TOK * VPR && t < valid ? *reinterpret_cast<const uint4*>(g + t * tok_stride + j * PER)
                                              : make_uint4(0, 0, 0, 0);
        }
    }
    __device__ __forceinline__ void commit(T* s) const {
#pragma unroll
        for (int k = 0; k < NV; ++k) {
            const int e = int(threadIdx.x) + k * NT, t = e / VPR, j = e % VPR;
            const T* x = reinterpret_cast<const T*>(&v[k]);
            if (e < TOK * VPR)
#pragma unroll
                for (int i = 0; i < PER; ++i) s[(j * PER + i) * TP + t] = x[i];
        }
    }
};

// Shared [WD][TP] -> the first `valid` token rows of a contiguous (tokens, d_inner) output, 16 bytes per store.
template <typename T, int WD>
__device__ __forceinline__ void store_tile(T* g, const T* s, int64_t tok_stride, int valid) {
    using Rows = Tile<T, WD, 32 * WD>;
#pragma unroll
    for (int k = 0; k < Rows::NV; ++k) {
        const int e = int(threadIdx.x) + k * 32 * WD, t = e / Rows::VPR, j = e % Rows::VPR;
        if (e < TOK * Rows::VPR && t < valid) {
            uint4 u;
            T* x = reinterpret_cast<T*>(&u);
#pragma unroll
            for (int i = 0; i < Rows::PER; ++i) x[i] = s[(j * Rows::PER + i) * TP + t];
            *reinterpret_cast<uint4*>(g + t * tok_stride + j * Rows::PER) = u;
        }
    }
}

// The sequence a block works on: batch row, first token, length, first checkpoint slot.
struct Seq {
    int64_t batch, start;
    int len, slot0;
};

// A block's inputs for one chunk: x, dt, z (and dout in the backward) of its WD channels, and its B and C group
// rows. `fetch(c)` issues chunk c's loads into registers, `commit` writes them to the shared tiles.
template <typename T, int WD, int N, bool DOUT> struct ChunkInputs {
    const ScanParams& p;
    const T *x, *dt, *z, *dout, *B, *C;  // at the sequence's first token
    int len;
    Tile<T, WD, 32 * WD> tx, tdt, tz, tdo;
    Tile<T, N, 32 * WD> tB, tC;

    __device__ ChunkInputs(const ScanParams& p_, const Seq& q, int d0, int gB, int gC) : p(p_), len(q.len) {
        x = static_cast<const T*>(p.x) + q.batch * p.x_b + q.start * p.x_l + d0;
        dt = static_cast<const T*>(p.dt) + q.batch * p.dt_b + q.start * p.dt_l + d0;
        z = p.has_z ? static_cast<const T*>(p.z) + q.batch * p.z_b + q.start * p.z_l + d0 : nullptr;
        dout = DOUT ? static_cast<const T*>(p.dout) + q.batch * p.do_b + q.start * p.do_l + d0 : nullptr;
        B = static_cast<const T*>(p.B) + q.batch * p.B_b + q.start * p.B_l + gB * p.B_g;
        C = static_cast<const T*>(p.C) + q.batch * p.C_b + q.start * p.C_l + gC * p.C_g;
    }
    __device__ __forceinline__ void fetch(int c) {
        const int t0 = c * TOK, valid = min(TOK, len - t0);
        tx.fetch(x + t0 * p.x_l, p.x_l, valid);
        tdt.fetch(dt + t0 * p.dt_l, p.dt_l, valid);
        if (z) tz.fetch(z + t0 * p.z_l, p.z_l, valid);
        if constexpr (DOUT) tdo.fetch(dout + t0 * p.do_l, p.do_l, valid);
        tB.fetch(B + t0 * p.B_l, p.B_l, valid);
        tC.fetch(C + t0 * p.C_l, p.C_l, valid);
    }
    __device__ __forceinline__ void commit(T* s_x, T* s_dt, T* s_z, T* s_do, T* s_B, T* s_C) const {
        tx.commit(s_x);
        tdt.commit(s_dt);
        if (z) tz.commit(s_z);
        if constexpr (DOUT) tdo.commit(s_do);
        tB.commit(s_B);
        tC.commit(s_C);
    }
};

// The clamp keeps __expf finite, so both sides are computed and selected without a branch around the MUFU ops.
__device__ __forceinline__ float softplus_f(float v) { return v <= 20.f ? __logf(1.f + __expf(fminf(v, 20.f))) : v; }
// Fast reciprocal: 1 / inf = 0 is the right limit for v -> -inf (the IEEE-rounded one adds a slow path per call).
__device__ __forceinline__ float sigmoid_f(float v) { return __fdividef(1.f, 1.f + __expf(-v)); }

// Inclusive scan of the maps h -> P h + S over the lanes, lane 0 first: lane l ends with lanes 0..l composed.
__device__ __forceinline__ void compose_up(float& P, float& S, int lane) {
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const float Pu = __shfl_up_sync(FULL, P, off), Su = __shfl_up_sync(FULL, S, off);
        if (lane >= off) {
            S = fmaf(P, Su, S);
            P *= Pu;
        }
    }
}
// The same from lane 31 down: lane l ends with f_l o f_{l+1} o ... o f_31 (the adjoint runs backwards in time).
__device__ __forceinline__ void compose_down(float& P, float& S, int lane) {
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const float Pd = __shfl_down_sync(FULL, P, off), Sd = __shfl_down_sync(FULL, S, off);
        if (lane + off < 32) {
            S = fmaf(P, Sd, S);
            P *= Pd;
        }
    }
}

// A lane's ITEMS affine maps x -> m[i] x + c[i] composed into x -> P x + S, as a balanced tree: the same multiplies
// and FMAs as a left-to-right chain, but log2(ITEMS) dependent steps instead of ITEMS. Item 0 is applied first, or the
// last item when REVERSE (the adjoint runs backwards in time): pairs of blocks combine as (P_L P_R, P_R S_L + S_R),
// or (P_L P_R, P_L S_R + S_L).
template <bool REVERSE>
__device__ __forceinline__ void compose_items(const float (&m)[ITEMS], const float (&c)[ITEMS], float& P, float& S) {
    static_assert((ITEMS & (ITEMS - 1)) == 0, "the tree pairs items: ITEMS must be a power of two");
    float pm[ITEMS], sc[ITEMS];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        pm[i] = m[i];
        sc[i] = c[i];
    }
#pragma unroll
    for (int stride = 1; stride < ITEMS; stride *= 2)
#pragma unroll
        for (int i = 0; i < ITEMS; i += 2 * stride) {
            sc[i] = REVERSE ? fmaf(pm[i], sc[i + stride], sc[i]) : fmaf(pm[i + stride], sc[i], sc[i + stride]);
            pm[i] *= pm[i + stride];
        }
    P = pm[0];
    S = sc[0];
}

// State n's recurrence over a lane's items: a_t = exp2(delta_t A2) and b_t = dx_t B_t (dx = delta x; `b` holds B_t
// on entry), the lane's maps composed into h -> P h + S, and the warp scan of those. Returns the state entering the
// lane's first item, given h_chunk entering the chunk; `h_end` gets the state after the chunk's last token.
__device__ __forceinline__ float lane_entry_state(const float (&delta)[ITEMS], const float (&dx)[ITEMS], float A2,
                                                  float h_chunk, int lane, float (&a)[ITEMS], float (&b)[ITEMS],
                                                  float& h_end) {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        a[i] = exp2f(delta[i] * A2);
        b[i] *= dx[i];
    }
    float P, S;
    compose_items<false>(a, b, P, S);
    compose_up(P, S, lane);
    const float Pe = __shfl_up_sync(FULL, P, 1), Se = __shfl_up_sync(FULL, S, 1);
    const float Pl = __shfl_sync(FULL, P, 31), Sl = __shfl_sync(FULL, S, 31);
    h_end = fmaf(Pl, h_chunk, Sl);
    return lane ? fmaf(Pe, h_chunk, Se) : h_chunk;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(FULL, v, off);
    return v;
}

__device__ __forceinline__ Seq sequence_of(const ScanParams& p, int s) {
    if (p.cu) {
        const int a = p.cu[s], b = p.cu[s + 1];
        // Slots cu[s] / TOK + s + c never overlap between documents (see ../README.md, "varlen").
        return {0, a, b - a, a / TOK + s};
    }
    return {s, 0, p.L, s * p.n_chunks_row};
}

// Block -> (sequence, channel block): a sequence's channel blocks are consecutive, sequences in `order`
// (longest first) when given. The thread's warp works on channel d, which reads C group gC and B group gB.
struct Place {
    int seq, d0, warp, lane, d, gC, gB;
};
template <int WD> __device__ __forceinline__ Place place_of(const ScanParams& p) {
    const int n_dblk = p.d_inner / WD;
    const int k = int(blockIdx.x) / n_dblk;
    const int d0 = (int(blockIdx.x) - k * n_dblk) * WD, warp = int(threadIdx.x) / 32;
    return {p.order ? p.order[k] : k, d0, warp, int(threadIdx.x) % 32, d0 + warp, d0 / p.cpc, d0 / p.cpc / p.cpb};
}

template <typename T, int N>
__global__ void __launch_bounds__(32 * WF, 16 / WF) scan_fwd_kernel(const ScanParams p) {
    extern __shared__ __align__(16) unsigned char smem[];
    T* s_x = reinterpret_cast<T*>(smem);  // [WF][TP]; reused for the output tile
    T* s_dt = s_x + WF * TP;
    T* s_z = s_dt + WF * TP;
    T* s_B = s_z + WF * TP;                                 // [N][TP]
    T* s_C = s_B + N * TP;                                 // [N][TP]
    float* s_h = reinterpret_cast<float*>(s_C + N * TP);  // [WF][N] state carried between chunks
    float* s_A = s_h + WF * N;                              // [WF][N] A * log2(e)

    const Place w = place_of<WF>(p);
    const Seq q = sequence_of(p, w.seq);
    const int d = w.d;
    for (int n = w.lane; n < N; n += 32) {
        s_h[w.warp * N + n] = p.h0 ? p.h0[(int64_t(w.seq) * p.d_inner + d) * N + n] : 0.f;
        s_A[w.warp * N + n] = p.A[int64_t(d) * N + n] * LOG2E;
    }
    const float Dd = p.D ? p.D[d] : 0.f, bias = p.dt_bias ? p.dt_bias[d] : 0.f;
    T* out = static_cast<T*>(p.out) + (q.batch * p.L + q.start) * p.d_inner + w.d0;
    const int n_chunks = (q.len + TOK - 1) / TOK;
    ChunkInputs<T, WF, N, false> in(p, q, w.d0, w.gB, w.gC);
    const bool z = p.has_z;
    if (n_chunks > 0) in.fetch(0);

    for (int c = 0; c < n_chunks; ++c) {
        const int t0 = c * TOK, valid = min(TOK, q.len - t0);
        __syncthreads();  // the previous chunk's output tile has been stored
        in.commit(s_x, s_dt, s_z, nullptr, s_B, s_C);
        if (c + 1 < n_chunks) in.fetch(c + 1);  // in flight while this chunk is computed
        if (p.save_ckpt)  // the state entering the chunk, from which the backward recomputes it
            for (int n = w.lane; n < N; n += 32)
                p.ckpt[(int64_t(q.slot0 + c) * p.d_inner + d) * N + n] = s_h[w.warp * N + n];
        __syncthreads();

        const int row = w.warp * TP + w.lane * ITEMS;
        float xv[ITEMS], delta[ITEMS], y[ITEMS];
        load_items(s_x + row, xv);
        load_items(s_dt + row, delta);
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            const float v = delta[i] + bias;
            delta[i] = w.lane * ITEMS + i < valid ? (p.softplus ? softplus_f(v) : v) : 0.f;
            y[i] = Dd * xv[i];
            xv[i] *= delta[i];  // delta x from here on
        }
#pragma unroll FWD_UNROLL
        for (int n = 0; n < N; ++n) {
            const float A2 = s_A[w.warp * N + n], hc = s_h[w.warp * N + n];
            float b[ITEMS], Cv[ITEMS], a[ITEMS], h_end;
            load_items(s_B + n * TP + w.lane * ITEMS, b);
            load_items(s_C + n * TP + w.lane * ITEMS, Cv);
            float h = lane_entry_state(delta, xv, A2, hc, w.lane, a, b, h_end);
#pragma unroll
            for (int i = 0; i < ITEMS; ++i) {
                h = fmaf(a[i], h, b[i]);
                y[i] = fmaf(Cv[i], h, y[i]);
            }
            if (w.lane == 0) s_h[w.warp * N + n] = h_end;  // every lane has read hc (the scan's shuffles follow)
        }
        if (z) {
            float zv[ITEMS];
            load_items(s_z + row, zv);
#pragma unroll
            for (int i = 0; i < ITEMS; ++i) y[i] *= zv[i] * sigmoid_f(zv[i]);
        }
        store_items(s_x + row, y);  // this warp's own row: no other warp reads it before the barrier
        __syncthreads();
        store_tile<T, WF>(out + int64_t(t0) * p.d_inner, s_x, p.d_inner, valid);
    }
    __syncwarp();
    for (int n = w.lane; n < N; n += 32)
        p.final_state[(int64_t(w.seq) * p.d_inner + d) * N + n] = s_h[w.warp * N + n];
}

// Forward with one thread per channel and no time parallelism ("serial"): the thread keeps its N states in registers
// and steps through its document token by token, so y_t = sum_n C_t[n] h_t[n] is in-thread adds and there is no scan
// to pay for: per (token, channel, state) one exp2, two multiplies and two FMAs. It needs many threads to fill the GPU
// (documents x d_inner), so cuda_scan.py takes it for batches of many documents and the chunked kernel above
// otherwise. Each thread loads its own token inputs: x, dt, z of its channel (a warp reads 32 consecutive channels)
// and the B and C rows of its groups (the channels of a group read the same bytes: one L1 request). The loads run
// PF tokens ahead (in the kernel), in registers, so that their latency overlaps the arithmetic of the tokens before.
// States are saved at the same chunk starts as the chunked kernel's, so the backward is shared.
constexpr int SERIAL_THREADS = 64;  // channels per block (threads do not cooperate: any size works)

template <typename T, int N> struct TokenInputs {
    static constexpr int VEC = N * int(sizeof(T)) / 16;  // 16-byte vectors per B or C row
    T x, dt, z;
    uint4 B[VEC], C[VEC];
};

// A B or C row (its VEC vectors) to fp32.
template <typename T, int N> __device__ __forceinline__ void unpack_row(const uint4 (&v)[TokenInputs<T, N>::VEC],
                                                                          float (&out)[N]) {
#pragma unroll
    for (int k = 0; k < TokenInputs<T, N>::VEC; ++k) unpack_vector<T>(v[k], out + k * (16 / int(sizeof(T))));
}

template <typename T, int N>
__global__ void __launch_bounds__(SERIAL_THREADS) scan_fwd_serial_kernel(const ScanParams p) {
    using In = TokenInputs<T, N>;
    // Tokens in flight. Two, not more: the kernel runs when there are many threads, and registers are what bounds
    // the warps per SM (H100, M1-3B, 32k tokens in 16 documents: 2 tokens 1.01 ms with 128 registers, 4 tokens 1.19
    // ms with 244, 8 tokens 1.89 ms with spills). Rows of 64 bytes or more (fp32 at N 32) keep one.
    constexpr int PF = In::VEC <= 4 ? 2 : 1;
    const int n_dblk = (p.d_inner + SERIAL_THREADS - 1) / SERIAL_THREADS;
    const int k = int(blockIdx.x) / n_dblk;
    const int d = (int(blockIdx.x) - k * n_dblk) * SERIAL_THREADS + int(threadIdx.x);
    if (d >= p.d_inner) return;  // no cooperation between threads: an idle one can leave
    const int seq = p.order ? p.order[k] : k;
    const Seq q = sequence_of(p, seq);
    const int gC = d / p.cpc, gB = gC / p.cpb;
    float A2[N], h[N];
#pragma unroll
    for (int n = 0; n < N; ++n) {
        A2[n] = p.A[int64_t(d) * N + n] * LOG2E;
        h[n] = p.h0 ? p.h0[(int64_t(seq) * p.d_inner + d) * N + n] : 0.f;
    }
    const float Dd = p.D ? p.D[d] : 0.f, bias = p.dt_bias ? p.dt_bias[d] : 0.f;
    // Next token to load. Its pointers advance one token per load and stop at the document's last token, so that the
    // loop body needs no branch (loads past the end read that token again, unused): ptxas then interleaves the
    // independent parts of consecutive tokens (softplus, exp2, the products) around the recurrence's FMAs.
    const bool has_z = p.has_z;
    const T* x = static_cast<const T*>(p.x) + q.batch * p.x_b + q.start * p.x_l + d;
    const T* dt = static_cast<const T*>(p.dt) + q.batch * p.dt_b + q.start * p.dt_l + d;
    const T* z = has_z ? static_cast<const T*>(p.z) + q.batch * p.z_b + q.start * p.z_l + d : x;  // x: any valid row
    const int64_t z_l = has_z ? p.z_l : p.x_l;
    const T* B = static_cast<const T*>(p.B) + q.batch * p.B_b + q.start * p.B_l + gB * p.B_g;
    const T* C = static_cast<const T*>(p.C) + q.batch * p.C_b + q.start * p.C_l + gC * p.C_g;
    T* out = static_cast<T*>(p.out) + (q.batch * p.L + q.start) * p.d_inner + d;
    float* ckpt = p.ckpt + (int64_t(q.slot0) * p.d_inner + d) * N;
    int next = 0;

    auto load = [&](In& v) {
        v.x = *x;
        v.dt = *dt;
        v.z = *z;
#pragma unroll
        for (int j = 0; j < In::VEC; ++j) {
            v.B[j] = reinterpret_cast<const uint4*>(B)[j];
            v.C[j] = reinterpret_cast<const uint4*>(C)[j];
        }
        const int step = next + 1 < q.len;
        next += step;
        x += step * p.x_l;
        dt += step * p.dt_l;
        z += step * z_l;
        B += step * p.B_l;
        C += step * p.C_l;
    };
    auto save_state = [&]() {  // the state entering a chunk, as the chunked kernel saves it
#pragma unroll
        for (int n = 0; n < N; n += 4)
            *reinterpret_cast<float4*>(ckpt + n) = make_float4(h[n], h[n + 1], h[n + 2], h[n + 3]);
        ckpt += int64_t(p.d_inner) * N;
    };
    // One token from its ring slot, which then takes the token PF later (in flight during the next PF - 1 tokens).
    auto token = [&](In& v) {
        const float u = to_f(v.dt) + bias, xv = to_f(v.x), zv = to_f(v.z);
        float Bv[N], Cv[N];
        unpack_row<T, N>(v.B, Bv);
        unpack_row<T, N>(v.C, Cv);
        load(v);
        const float delta = p.softplus ? softplus_f(u) : u, dx = delta * xv;
        float y0 = Dd * xv, y1 = 0.f;  // two sums: the adds over states are two chains, not one
#pragma unroll
        for (int n = 0; n < N; ++n) {
            h[n] = fmaf(exp2f(delta * A2[n]), h[n], dx * Bv[n]);
            if (n % 2) y1 = fmaf(Cv[n], h[n], y1);
            else y0 = fmaf(Cv[n], h[n], y0);
        }
        *out = from_f<T>((y0 + y1) * (has_z ? zv * sigmoid_f(zv) : 1.f));
        out += p.d_inner;
    };

    static_assert(TOK % PF == 0, "chunk starts must be group starts");
    if (q.len > 0) {
        In ring[PF];
#pragma unroll
        for (int j = 0; j < PF; ++j) load(ring[j]);
        const int full = q.len - q.len % PF;
        for (int t0 = 0; t0 < full; t0 += PF) {
            if (p.save_ckpt && t0 % TOK == 0) save_state();
#pragma unroll
            for (int j = 0; j < PF; ++j) token(ring[j]);
        }
        if (p.save_ckpt && full % TOK == 0 && full < q.len) save_state();
#pragma unroll
        for (int j = 0; j < PF - 1; ++j)
            if (full + j < q.len) token(ring[j]);
    }
    float* fin = p.final_state + (int64_t(seq) * p.d_inner + d) * N;
#pragma unroll
    for (int n = 0; n < N; n += 4)
        *reinterpret_cast<float4*>(fin + n) = make_float4(h[n], h[n + 1], h[n + 2], h[n + 3]);
}

// Shared-memory arrival barriers (mbarrier, sm_80 and later): a thread arrives without waiting (release: its earlier
// shared writes become visible to whoever waits), and waits, when it needs to, for a phase to complete (acquire).
// Phase k of a barrier completes when its `count` threads have arrived for the k-th time; waits name the phase by its
// parity.
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}
#if __CUDA_ARCH__ >= 900
#define M1_MBAR_WAIT "mbarrier.try_wait.parity"  // may suspend the thread for a while instead of spinning
#else
#define M1_MBAR_WAIT "mbarrier.test_wait.parity"  // sm_80: the non-blocking test only
#endif
__device__ __forceinline__ void mbar_wait(uint64_t* bar, int parity) {
    uint32_t done;
    do {
        asm volatile("{ .reg .pred p; " M1_MBAR_WAIT ".shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                     : "=r"(done)
                     : "r"(smem_addr(bar)), "r"(parity)
                     : "memory");
    } while (!done);
}

template <typename T, int N>
__global__ void __launch_bounds__(32 * W, M1_SCAN_BWD_MIN_BLOCKS) scan_bwd_kernel(const ScanParams p) {
    extern __shared__ __align__(16) unsigned char smem[];
    T* s_x = reinterpret_cast<T*>(smem);  // [W][TP] each; x, dt, z reused for dx, ddt, dz
    T* s_dt = s_x + W * TP;
    T* s_z = s_dt + W * TP;
    T* s_do = s_z + W * TP;
    T* s_B = s_do + W * TP;                                  // [N][TP]
    T* s_C = s_B + N * TP;                                   // [N][TP]
    float* s_red = reinterpret_cast<float*>(s_C + N * TP);  // [2 buffers][dB, dC][W][TOK]
    float* s_dB = s_red + 4 * W * TOK;                       // [TOK][N + 1] channel sums of the chunk
    float* s_dC = s_dB + TOK * (N + 1);
    float* s_dh = s_dC + TOK * (N + 1);  // [W][N] adjoint entering from the next chunk (a_next dh_next)
    float* s_dA = s_dh + W * N;          // [W][N]
    float* s_hs = s_dA + W * N;          // [W][N] state entering the chunk (checkpoint)
    float* s_A = s_hs + W * N;           // [W][N]
    // full[b]: every thread has written its shares of the state using red buffer b; empty[b]: every thread has taken
    // its channel sum out of buffer b, which may then be written again.
    uint64_t* s_full = reinterpret_cast<uint64_t*>(s_A + W * N);  // [2]; every region above is a multiple of 8 bytes
    uint64_t* s_empty = s_full + 2;                                // [2]
    if (threadIdx.x == 0)
        for (int b = 0; b < 2; ++b) {
            mbar_init(&s_full[b], 32 * W);
            mbar_init(&s_empty[b], 32 * W);
        }

    const Place w = place_of<W>(p);
    const Seq q = sequence_of(p, w.seq);
    const int d = w.d, gC = w.gC, gB = w.gB;
    for (int n = w.lane; n < N; n += 32) {
        s_dh[w.warp * N + n] = p.dfinal ? p.dfinal[(int64_t(w.seq) * p.d_inner + d) * N + n] : 0.f;
        s_dA[w.warp * N + n] = 0.f;
        s_A[w.warp * N + n] = p.A[int64_t(d) * N + n];
    }
    const float Dd = p.D ? p.D[d] : 0.f, bias = p.dt_bias ? p.dt_bias[d] : 0.f;
    const int64_t tok0 = q.batch * p.L + q.start;  // row of the sequence's first token in (b, L, ...) outputs
    T* dx = static_cast<T*>(p.dx) + tok0 * p.d_inner + w.d0;
    T* ddt = static_cast<T*>(p.ddt) + tok0 * p.d_inner + w.d0;
    T* dz = p.has_z ? static_cast<T*>(p.dz) + tok0 * p.d_inner + w.d0 : nullptr;
    float dD_acc = 0.f, dbias_acc = 0.f;
    const int n_chunks = (q.len + TOK - 1) / TOK;
    ChunkInputs<T, W, N, true> in(p, q, w.d0, gB, gC);
    const bool z = p.has_z;
    if (M1_SCAN_BWD_PREFETCH && n_chunks > 0) in.fetch(n_chunks - 1);
    // The channel sums of state k (counted over the whole sequence) go through red buffer k % 2: it is the
    // (k / 2)-th use of that buffer's barriers. A thread takes its sum of state k while it computes state k + 1 and
    // waits only for what it reads or overwrites, so the warps need not move in lockstep and the state loop can be
    // unrolled (a block barrier per state forbade both).
    int k = 0;
    auto channel_sum = [&](int kk, int n) {  // this thread's element of state kk's dB / dC sums, into column n
        const int b = kk & 1;
        mbar_wait(&s_full[b], (kk >> 1) & 1);
        const float* red = s_red + b * 2 * W * TOK;
        for (int e = threadIdx.x; e < 2 * TOK; e += 32 * W) {
            const int kind = e / TOK, t = e - kind * TOK;
            float acc = 0.f;
#pragma unroll
            for (int v = 0; v < W; ++v) acc += red[(kind * W + v) * TOK + t];
            (kind ? s_dC : s_dB)[t * (N + 1) + n] = acc;
        }
        mbar_arrive(&s_empty[b]);
    };

    for (int c = n_chunks - 1; c >= 0; --c) {
        const int t0 = c * TOK, valid = min(TOK, q.len - t0);
        if (!M1_SCAN_BWD_PREFETCH) in.fetch(c);
        __syncthreads();  // the previous chunk's gradient tiles and channel sums have been stored
        in.commit(s_x, s_dt, s_z, s_do, s_B, s_C);
        if (M1_SCAN_BWD_PREFETCH && c > 0) in.fetch(c - 1);
        for (int n = w.lane; n < N; n += 32)
            s_hs[w.warp * N + n] = p.ckpt[(int64_t(q.slot0 + c) * p.d_inner + d) * N + n];
        __syncthreads();

        const int row = w.warp * TP + w.lane * ITEMS;
        // dxv = delta x is what the state loop needs; x itself is read again from its tile after the loop.
        float dxv[ITEMS], delta[ITEMS], g[ITEMS], y[ITEMS], S1[ITEMS], S2[ITEMS];
        load_items(s_x + row, dxv);
        load_items(s_dt + row, delta);
        load_items(s_do + row, g);
        if (z) {
            float zv[ITEMS];
            load_items(s_z + row, zv);
#pragma unroll
            for (int i = 0; i < ITEMS; ++i) g[i] *= zv[i] * sigmoid_f(zv[i]);  // g = dout * silu(z)
        }
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            const float v = delta[i] + bias;
            delta[i] = w.lane * ITEMS + i < valid ? (p.softplus ? softplus_f(v) : v) : 0.f;
            y[i] = Dd * dxv[i];
            dxv[i] *= delta[i];
            S1[i] = 0.f;  // sum_n dh B
            S2[i] = 0.f;  // sum_n dh h_{t-1} a A
        }
        // The warp sum of a state's dA share is taken during the next state, where its shuffles overlap that state's
        // arithmetic instead of lengthening this state's chain (at n = 0 it adds the zero pending share).
        float dA_pending = 0.f;
        // Unrolled: no block barrier between states any more (arrival barriers order the channel sums), so ptxas
        // overlaps one state's shuffle and exp2 latencies with the next state's.
#pragma unroll BWD_UNROLL
        for (int n = 0; n < N; ++n, ++k) {
            float* red = s_red + (k & 1) * 2 * W * TOK;
            const float dA_prev = warp_sum(dA_pending);
            if (w.lane == 0) s_dA[w.warp * N + (n + N - 1) % N] += dA_prev;
            const float An = s_A[w.warp * N + n], A2 = An * LOG2E;
            float Bv[ITEMS], Cv[ITEMS], a[ITEMS], hp[ITEMS], o[ITEMS], h_end;
            load_items(s_B + n * TP + w.lane * ITEMS, Bv);
            load_items(s_C + n * TP + w.lane * ITEMS, Cv);
#pragma unroll
            for (int i = 0; i < ITEMS; ++i) o[i] = Bv[i];
            // Forward within the chunk, from the saved state (o becomes b_t).
            float h = lane_entry_state(delta, dxv, A2, s_hs[w.warp * N + n], w.lane, a, o, h_end);
#pragma unroll
            for (int i = 0; i < ITEMS; ++i) {
                hp[i] = h;
                h = fmaf(a[i], h, o[i]);
                y[i] = fmaf(Cv[i], h, y[i]);
                o[i] = g[i] * h;          // this channel's share of dC_t[n]
                Cv[i] *= g[i];            // g_t C_t: the adjoint's input
            }
            // Buffer k % 2 last held state k - 2, whose sums every thread has taken before the chunk's closing
            // barrier when that state was in an earlier chunk.
            if (n >= 2) mbar_wait(&s_empty[k & 1], ((k - 2) >> 1) & 1);
            store_items(red + (W + w.warp) * TOK + w.lane * ITEMS, o);
            // Adjoint, backwards: dh_t = g_t C_t + a_{t+1} dh_{t+1}; past the chunk's last token the carry
            // R = a dh of the next chunk's first token (or d final_state) enters with factor 1.
            const float R = s_dh[w.warp * N + n];
            const float a_up = __shfl_down_sync(FULL, a[0], 1);  // every lane takes part in a shuffle
            const float a_next = w.lane < 31 ? a_up : 1.f;
            float m[ITEMS], Pr, Sr;  // item i's adjoint map: dh -> a_{i+1} dh + g_i C_i
#pragma unroll
            for (int i = 0; i < ITEMS; ++i) m[i] = i + 1 < ITEMS ? a[i + 1] : a_next;
            compose_items<true>(m, Cv, Pr, Sr);
            compose_down(Pr, Sr, w.lane);
            const float Pn = __shfl_down_sync(FULL, Pr, 1), Sn = __shfl_down_sync(FULL, Sr, 1);
            float dh = w.lane < 31 ? fmaf(Pn, R, Sn) : R;  // dh of the first token after this lane's items
            float dA_lane = 0.f;
#pragma unroll
            for (int i = ITEMS - 1; i >= 0; --i) {
                dh = fmaf(i == ITEMS - 1 ? a_next : a[i + 1], dh, Cv[i]);
                S1[i] = fmaf(dh, Bv[i], S1[i]);
                const float wv = dh * hp[i] * a[i];
                S2[i] = fmaf(wv, An, S2[i]);
                dA_lane = fmaf(wv, delta[i], dA_lane);
                o[i] = dh * dxv[i];  // this channel's share of dB_t[n]
            }
            store_items(red + w.warp * TOK + w.lane * ITEMS, o);
            const float carry = __shfl_sync(FULL, a[0] * dh, 0);  // a dh of the chunk's first token
            if (w.lane == 0) s_dh[w.warp * N + n] = carry;
            dA_pending = dA_lane;
            mbar_arrive(&s_full[k & 1]);
            if (n >= 1) channel_sum(k - 1, n - 1);  // the previous state's: its shares are most likely all written
        }
        channel_sum(k - 1, N - 1);
        dA_pending = warp_sum(dA_pending);
        if (w.lane == 0) s_dA[w.warp * N + N - 1] += dA_pending;
        // Per-token gradients of the chunk.
        {
            float xv[ITEMS], v[ITEMS], zv[ITEMS], dov[ITEMS];
            load_items(s_x + row, xv);
            load_items(s_dt + row, v);
            load_items(s_do + row, dov);
            if (z) load_items(s_z + row, zv);
            float gx[ITEMS], gdt[ITEMS], gz[ITEMS];
#pragma unroll
            for (int i = 0; i < ITEMS; ++i) {
                const bool in = w.lane * ITEMS + i < valid;
                const float u = v[i] + bias;
                const float ddelta = fmaf(xv[i], S1[i], S2[i]);
                gx[i] = fmaf(delta[i], S1[i], Dd * g[i]);
                gdt[i] = in ? (p.softplus && u <= 20.f ? ddelta * sigmoid_f(u) : ddelta) : 0.f;
                dD_acc = fmaf(g[i], xv[i], dD_acc);
                dbias_acc += gdt[i];
                if (z) {
                    const float sg = sigmoid_f(zv[i]);
                    gz[i] = dov[i] * y[i] * sg * (1.f + zv[i] * (1.f - sg));
                }
            }
            store_items(s_x + row, gx);
            store_items(s_dt + row, gdt);
            if (z) store_items(s_z + row, gz);
        }
        __syncthreads();
        store_tile<T, W>(dx + int64_t(t0) * p.d_inner, s_x, p.d_inner, valid);
        store_tile<T, W>(ddt + int64_t(t0) * p.d_inner, s_dt, p.d_inner, valid);
        if (z) store_tile<T, W>(dz + int64_t(t0) * p.d_inner, s_z, p.d_inner, valid);
        for (int e = threadIdx.x; e < valid * N; e += 32 * W) {
            const int t = e / N, n = e - t * N;
            const int64_t r = tok0 + t0 + t;
            atomicAdd(p.dB_acc + (r * p.G_B + gB) * N + n, s_dB[t * (N + 1) + n]);
            if (p.dC_direct)  // the block holds the whole C group: its sum is final
                static_cast<T*>(p.dC_direct)[(r * p.G_C + gC) * N + n] = from_f<T>(s_dC[t * (N + 1) + n]);
            else
                atomicAdd(p.dC_acc + (r * p.G_C + gC) * N + n, s_dC[t * (N + 1) + n]);
        }
    }
    __syncwarp();
    for (int n = w.lane; n < N; n += 32) {
        p.dh0[(int64_t(w.seq) * p.d_inner + d) * N + n] = s_dh[w.warp * N + n];  // a_0 dh_0 = d initial_state
        atomicAdd(p.dA + int64_t(d) * N + n, s_dA[w.warp * N + n]);
    }
    dD_acc = warp_sum(dD_acc);
    dbias_acc = warp_sum(dbias_acc);
    if (w.lane == 0) {
        if (p.dD) atomicAdd(p.dD + d, dD_acc);
        if (p.dbias) atomicAdd(p.dbias + d, dbias_acc);
    }
}

// Forward and backward without time parallelism ("lane-serial", scan_ls_kernel), for N = 16. A block of two warps takes
// (sequence, 16 channels), each warp 8 of them; lane (cp, sq) = (lane / 8, lane % 8) owns the warp's channels 2 cp,
// 2 cp + 1 and states 2 sq, 2 sq + 1: 4 (channel, state) elements whose recurrences it steps through token by token,
// so no scan is paid (no map composition, no shuffle steps per state, as in the chunked backward above). The adjoint
// runs backwards in time and needs h_{t-1}: per chunk of TOK tokens, from the state the forward saved at its start,
//   R1 walks the chunk forward and keeps the state entering each LS_PIECE-token piece in shared memory;
//   then, pieces last to first, R2 walks the piece forward keeping its states in registers, and the adjoint walks
//   it backwards (recomputing a_t: three exp2 per element in all).
// The forward is the second walk alone, over the whole document, saving the chunk-start states.
// What crosses lanes per token (y and the sums over states sum_n dh B, sum_n dh h_{t-1} a A; dB and dC over
// channels) is summed by reduce-scatters of shuffles, each over a group of tokens (LS_Y_TOKENS, LS_S_TOKENS; see
// halve); the two warps' dB and dC are added in shared memory. A piece's inputs are staged in shared memory as fp32
// (softplus and silu(z) computed once there).
#ifndef M1_SCAN_LS_MIN_BLOCKS
#define M1_SCAN_LS_MIN_BLOCKS 6
#endif
#ifndef M1_SCAN_LS_Y_TOKENS  // tokens whose y sums are taken together
#define M1_SCAN_LS_Y_TOKENS 8
#endif
#ifndef M1_SCAN_LS_S_TOKENS  // tokens whose sums over states (S1, S2) and over channels (dB, dC) are taken together
#define M1_SCAN_LS_S_TOKENS 4
#endif
constexpr int LS_PIECE = 16;                // tokens whose states a lane keeps in registers
constexpr int LS_YT = M1_SCAN_LS_Y_TOKENS, LS_ST = M1_SCAN_LS_S_TOKENS;
static_assert((LS_YT == 4 || LS_YT == 8 || LS_YT == 16) && (LS_ST == 2 || LS_ST == 4 || LS_ST == 8),
              "whole halving steps");
constexpr int LS_PIECES = TOK / LS_PIECE;   // piece starts per chunk (R1)
constexpr int LS_WC = 8;                    // channels per warp
constexpr int LS_C = 2 * LS_WC;             // channels per block
constexpr float LN2 = 0.6931471805599453f;
static_assert(TOK % LS_PIECE == 0 && LS_PIECE * 2 == 32, "staging gives each lane half a token row of the piece");

struct LsWarpShared {
    // The piece's inputs per (token, channel of the warp). g: dout * silu(z) in the backward, silu(z) (or 1) in the
    // forward; su: d softplus (0 past the document's end); gz: dout * d silu(z) / dz with y left out (dz = gz * y).
    float x[LS_PIECE][LS_WC], g[LS_PIECE][LS_WC], su[LS_PIECE][LS_WC], gz[LS_PIECE][LS_WC];
    float4 dd[LS_PIECE][LS_WC / 2];  // per channel pair: the pair's delta, then its delta x (one load per token)
    float y[LS_PIECE][LS_WC], S1[LS_PIECE][LS_WC], S2[LS_PIECE][LS_WC];  // sums over states, per token
};
struct LsShared {
    LsWarpShared w[2];
    float4 BC[LS_PIECE][8];         // per state pair of the block's B and C group rows: B, B, C, C
    float dBC[2][2][LS_PIECE][16];  // [warp][dB, dC][token][state]: each warp's sum over its channels
    float bias[LS_C], D[LS_C];
};
enum LsPass { LS_R1, LS_FWD, LS_BWD };  // what a piece's staging loads: x, dt, B; and C, z; and dout

// Four consecutive elements of T: 8 bytes for 2-byte types, 16 for fp32.
template <typename T> using Vec4 = std::conditional_t<sizeof(T) == 4, uint4, uint2>;
template <typename T> __device__ __forceinline__ Vec4<T> load4(const T* g, bool in) {
    if constexpr (sizeof(T) == 4) return in ? *reinterpret_cast<const uint4*>(g) : make_uint4(0, 0, 0, 0);
    else return in ? *reinterpret_cast<const uint2*>(g) : make_uint2(0, 0);
}
template <typename T> __device__ __forceinline__ void unpack4(const Vec4<T>& v, float (&o)[4]) {
    if constexpr (sizeof(T) == 4) {
        o[0] = __uint_as_float(v.x), o[1] = __uint_as_float(v.y);
        o[2] = __uint_as_float(v.z), o[3] = __uint_as_float(v.w);
    } else {
        const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
        for (int k = 0; k < 4; ++k) o[k] = to_f(e[k]);
    }
}
template <typename T> __device__ __forceinline__ void store4(T* g, const float (&v)[4]) {
    Vec4<T> u;
    T* e = reinterpret_cast<T*>(&u);
#pragma unroll
    for (int k = 0; k < 4; ++k) e[k] = from_f<T>(v[k]);
    *reinterpret_cast<Vec4<T>*>(g) = u;
}

// One halving step of a reduce-scatter across lanes: the lane and its partner (lane ^ mask) swap halves of v[0 .. K),
// the lane with `upper` set keeping the upper half; v[0 .. K / 2) then holds the kept half summed over both lanes.
// A reduce-scatter of several tokens' sums at once shares its steps between them: fewer shuffles than one token at a
// time, and each step's shuffles are independent, so their latencies overlap.
template <int K> __device__ __forceinline__ void halve(float* v, bool upper, int mask) {
#pragma unroll
    for (int j = 0; j < K / 2; ++j) {
        const float keep = upper ? v[j + K / 2] : v[j], send = upper ? v[j] : v[j + K / 2];
        v[j] = keep + __shfl_xor_sync(FULL, send, mask);
    }
}

template <typename T, int N, bool BACKWARD>
__global__ void __launch_bounds__(64, BACKWARD ? M1_SCAN_LS_MIN_BLOCKS : 8) scan_ls_kernel(const ScanParams p) {
    static_assert(N == 16, "the lane-serial kernels cover 16 states (2 per lane)");
    __shared__ __align__(16) LsShared s;
    // R1: the lane's 4 states entering pieces 1, 2, ... of the chunk (piece 0's is the checkpoint); backward only.
    __shared__ __align__(16) float4 s_h[BACKWARD ? 2 * (LS_PIECES - 1) * 32 : 1];
    const Place pl = place_of<LS_C>(p);
    const Seq q = sequence_of(p, pl.seq);
    const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31, tid = int(threadIdx.x);
    LsWarpShared& sw = s.w[warp];
    float4* const sh = s_h + (BACKWARD ? warp * (LS_PIECES - 1) * 32 + lane : 0);  // [piece - 1][lane], stride 32
    const int cp = lane >> 3, sq = lane & 7;   // compute: channels 2 cp + ci of the warp, states 2 sq + j
    const int ti = lane >> 1, hf = lane & 1;   // staging and output: token ti, warp channels 4 hf .. 4 hf + 3
    const int bt = tid >> 2, bq = tid & 3;     // block staging of B, C and the dB, dC output: token bt, states 4 bq ..
    const int dw = pl.d0 + LS_WC * warp;       // the warp's first channel
    if (tid < LS_C) {
        s.bias[tid] = p.dt_bias ? p.dt_bias[pl.d0 + tid] : 0.f;
        s.D[tid] = p.D ? p.D[pl.d0 + tid] : 0.f;
    }
    // Element e = 2 ci + j of the lane: row (channel dw + 2 cp + ci) and column 2 sq + j of a (d_inner, N) array.
    auto load_pair = [&](const float* a, float (&v)[4]) {  // the lane's 4 elements of a (d_inner, N) fp32 array
#pragma unroll
        for (int ci = 0; ci < 2; ++ci) {
            const float2 f = *reinterpret_cast<const float2*>(a + int64_t(dw + 2 * cp + ci) * N + 2 * sq);
            v[2 * ci] = f.x, v[2 * ci + 1] = f.y;
        }
    };
    auto store_pair = [&](float* a, const float (&v)[4]) {
#pragma unroll
        for (int ci = 0; ci < 2; ++ci)
            *reinterpret_cast<float2*>(a + int64_t(dw + 2 * cp + ci) * N + 2 * sq) =
                make_float2(v[2 * ci], v[2 * ci + 1]);
    };
    const int64_t seq_state = int64_t(pl.seq) * p.d_inner * N;  // the sequence's (d_inner, N) initial / final state
    float A2[4], dA[4] = {0.f, 0.f, 0.f, 0.f}, u[4] = {0.f, 0.f, 0.f, 0.f};
    load_pair(p.A, A2);
#pragma unroll
    for (int e = 0; e < 4; ++e) A2[e] *= LOG2E;
    // Backward: a_{t+1} dh_{t+1} entering after the last token is d final_state. Forward: u is the state.
    if (BACKWARD ? p.dfinal != nullptr : p.h0 != nullptr) load_pair((BACKWARD ? p.dfinal : p.h0) + seq_state, u);
    float dD[4] = {0.f, 0.f, 0.f, 0.f}, dbias[4] = {0.f, 0.f, 0.f, 0.f};  // of the output lane's 4 channels
    const bool has_z = p.has_z;
    const T* xg = static_cast<const T*>(p.x) + q.batch * p.x_b + q.start * p.x_l + dw + 4 * hf;
    const T* dtg = static_cast<const T*>(p.dt) + q.batch * p.dt_b + q.start * p.dt_l + dw + 4 * hf;
    const T* zg = has_z ? static_cast<const T*>(p.z) + q.batch * p.z_b + q.start * p.z_l + dw + 4 * hf : nullptr;
    const T* dog = static_cast<const T*>(p.dout) + q.batch * p.do_b + q.start * p.do_l + dw + 4 * hf;
    const T* Bg = static_cast<const T*>(p.B) + q.batch * p.B_b + q.start * p.B_l + pl.gB * p.B_g + 4 * bq;
    const T* Cg = static_cast<const T*>(p.C) + q.batch * p.C_b + q.start * p.C_l + pl.gC * p.C_g + 4 * bq;
    const int64_t tok0 = q.batch * p.L + q.start;
    Vec4<T> rx, rdt, rz, rdo, rB, rC;  // the next piece's inputs, in flight
    auto fetch = [&](int ts, LsPass pass) {
        const int t = ts + ti, tb = ts + bt;
        const bool in = t < q.len, inb = tb < q.len;
        rx = load4<T>(xg + int64_t(t) * p.x_l, in);
        rdt = load4<T>(dtg + int64_t(t) * p.dt_l, in);
        rB = load4<T>(Bg + int64_t(tb) * p.B_l, inb);
        if (pass != LS_R1) {
            rC = load4<T>(Cg + int64_t(tb) * p.C_l, inb);
            if (has_z) rz = load4<T>(zg + int64_t(t) * p.z_l, in);
        }
        if (pass == LS_BWD) rdo = load4<T>(dog + int64_t(t) * p.do_l, in);
    };
    auto commit = [&](int ts, LsPass pass) {
        const bool in = ts + ti < q.len;
        float xv[4], v[4], Bv[4];
        unpack4<T>(rx, xv);
        unpack4<T>(rdt, v);
        unpack4<T>(rB, Bv);
        float Cv[4], dov[4], zv[4];
        if (pass != LS_R1) {
            unpack4<T>(rC, Cv);
            if (pass == LS_BWD) unpack4<T>(rdo, dov);
            if (has_z) unpack4<T>(rz, zv);
            s.BC[bt][2 * bq] = make_float4(Bv[0], Bv[1], Cv[0], Cv[1]);
            s.BC[bt][2 * bq + 1] = make_float4(Bv[2], Bv[3], Cv[2], Cv[3]);
        } else {  // the forward walk reads B only
            *reinterpret_cast<float2*>(&s.BC[bt][2 * bq]) = make_float2(Bv[0], Bv[1]);
            *reinterpret_cast<float2*>(&s.BC[bt][2 * bq + 1]) = make_float2(Bv[2], Bv[3]);
        }
        float dl[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int ch = 4 * hf + k;
            const float uu = v[k] + s.bias[LS_WC * warp + ch];
            dl[k] = in ? (p.softplus ? softplus_f(uu) : uu) : 0.f;
            sw.x[ti][ch] = xv[k];
            if (pass == LS_FWD) sw.g[ti][ch] = has_z ? zv[k] * sigmoid_f(zv[k]) : 1.f;  // the output gate
            if (pass == LS_BWD) {
                sw.su[ti][ch] = in ? (p.softplus && uu <= 20.f ? sigmoid_f(uu) : 1.f) : 0.f;
                if (has_z) {
                    const float sg = sigmoid_f(zv[k]);
                    sw.g[ti][ch] = dov[k] * zv[k] * sg;
                    sw.gz[ti][ch] = dov[k] * sg * (1.f + zv[k] * (1.f - sg));
                } else {
                    sw.g[ti][ch] = dov[k];
                    sw.gz[ti][ch] = 0.f;
                }
            }
        }
        sw.dd[ti][2 * hf] = make_float4(dl[0], dl[1], dl[0] * xv[0], dl[1] * xv[1]);
        sw.dd[ti][2 * hf + 1] = make_float4(dl[2], dl[3], dl[2] * xv[2], dl[3] * xv[3]);
    };
    // The lane's per-token inputs from the staged piece: delta and delta x of its channels, B (and C) of its states.
    auto token_in = [&](int i, float (&dl)[2], float (&dx)[2]) {
        const float4 d4 = sw.dd[i][cp];
        dl[0] = d4.x, dl[1] = d4.y, dx[0] = d4.z, dx[1] = d4.w;
    };

    const bool b16 = lane & 16, b8 = lane & 8, b4 = lane & 4, b2 = lane & 2, b1 = lane & 1;
    // One token of the forward walk over the staged piece: next = a prev + delta x B, and the lane's shares of y (its
    // two channels' sums over the lane's two states) in yv[ci * LS_YT + i % LS_YT] for sum_y.
    auto forward_token = [&](int i, const float* prev, float* next, float (&yv)[2 * LS_YT]) {
        float dl[2], dx[2];
        token_in(i, dl, dx);
        const float4 bc = s.BC[i][sq];
        const float Bv[2] = {bc.x, bc.y}, Cv[2] = {bc.z, bc.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) next[e] = fmaf(exp2f(dl[e >> 1] * A2[e]), prev[e], dx[e >> 1] * Bv[e & 1]);
#pragma unroll
        for (int ci = 0; ci < 2; ++ci)
            yv[ci * LS_YT + i % LS_YT] = fmaf(Cv[1], next[2 * ci + 1], Cv[0] * next[2 * ci]);
    };
    // y of tokens i0 .. i0 + LS_YT - 1: the shares summed over the 8 lanes of the channel pair by a reduce-scatter
    // (channel on lane bit 4, then the token's high bits on 2 and 1). Lane (b4, b2, b1) ends with warp channel
    // 2 cp + b4 of tokens i0 + (2 b2 + b1) LS_YT / 4 + k, k < LS_YT / 4.
    auto sum_y = [&](float (&yv)[2 * LS_YT], int i0) {
        halve<2 * LS_YT>(yv, b4, 4);
        halve<LS_YT>(yv, b2, 2);
        halve<LS_YT / 2>(yv, b1, 1);
#pragma unroll
        for (int k = 0; k < LS_YT / 4; ++k) sw.y[i0 + (2 * b2 + b1) * (LS_YT / 4) + k][2 * cp + b4] = yv[k];
    };
    const int n_chunks = (q.len + TOK - 1) / TOK;
    if constexpr (!BACKWARD) {
        fetch(0, LS_FWD);
        for (int c = 0; c < n_chunks; ++c) {
            const int t0 = c * TOK, np = (min(TOK, q.len - t0) + LS_PIECE - 1) / LS_PIECE;
            if (p.save_ckpt) store_pair(p.ckpt + int64_t(q.slot0 + c) * p.d_inner * N, u);  // the backward's start
            for (int j = 0; j < np; ++j) {
                const int ts = t0 + j * LS_PIECE;
                __syncthreads();  // both warps are done with the previous piece's staged inputs
                commit(ts, LS_FWD);
                fetch(ts + LS_PIECE, LS_FWD);  // past the end: masked loads
                __syncthreads();
                float yv[2 * LS_YT];
#pragma unroll
                for (int i = 0; i < LS_PIECE; ++i) {
                    float h[4];
                    forward_token(i, u, h, yv);
#pragma unroll
                    for (int e = 0; e < 4; ++e) u[e] = h[e];
                    if (i % LS_YT == LS_YT - 1) sum_y(yv, i - (LS_YT - 1));
                }
                __syncwarp();
                const int t = ts + ti;  // lane (ti, hf) writes 4 channels of token ts + ti
                if (t < q.len) {
                    float o[4];
#pragma unroll
                    for (int k = 0; k < 4; ++k) {
                        const int ch = 4 * hf + k;
                        o[k] = fmaf(s.D[LS_WC * warp + ch], sw.x[ti][ch], sw.y[ti][ch]) * sw.g[ti][ch];
                    }
                    store4<T>(static_cast<T*>(p.out) + (tok0 + t) * p.d_inner + dw + 4 * hf, o);
                }
            }
        }
        store_pair(p.final_state + seq_state, u);
    } else {
        for (int c = n_chunks - 1; c >= 0; --c) {
            const int t0 = c * TOK, np = (min(TOK, q.len - t0) + LS_PIECE - 1) / LS_PIECE;
            const float* ckpt = p.ckpt + int64_t(q.slot0 + c) * p.d_inner * N;
            float h[4];
            load_pair(ckpt, h);
            // R1: the chunk forward, keeping the state entering every piece.
            fetch(t0, LS_R1);
            for (int j = 0; j < np; ++j) {
                __syncthreads();  // both warps are done with the previous piece's staged inputs
                commit(t0 + j * LS_PIECE, LS_R1);
                if (j + 1 < np) fetch(t0 + (j + 1) * LS_PIECE, LS_R1);
                else fetch(t0 + (np - 1) * LS_PIECE, LS_BWD);  // the adjoint's first piece
                if (j) sh[(j - 1) * 32] = make_float4(h[0], h[1], h[2], h[3]);
                __syncthreads();
#pragma unroll
                for (int i = 0; i < LS_PIECE; ++i) {
                    float dl[2], dx[2];
                    token_in(i, dl, dx);
                    const float2 b2v = *reinterpret_cast<const float2*>(&s.BC[i][sq]);
                    const float Bv[2] = {b2v.x, b2v.y};
#pragma unroll
                    for (int e = 0; e < 4; ++e) h[e] = fmaf(exp2f(dl[e >> 1] * A2[e]), h[e], dx[e >> 1] * Bv[e & 1]);
                }
            }
            // Pieces last to first: R2 forward into registers, then the adjoint backwards.
            for (int j = np - 1; j >= 0; --j) {
                const int ts = t0 + j * LS_PIECE;
                __syncthreads();  // the previous piece's outputs have been read out of shared memory
                commit(ts, LS_BWD);
                if (j > 0) fetch(ts - LS_PIECE, LS_BWD);
                __syncthreads();
                float hs[4], hh[LS_PIECE][4];
                if (j) {
                    const float4 h4 = sh[(j - 1) * 32];
                    hs[0] = h4.x, hs[1] = h4.y, hs[2] = h4.z, hs[3] = h4.w;
                } else {
                    load_pair(ckpt, hs);
                }
                float yv[2 * LS_YT];
#pragma unroll
                for (int i = 0; i < LS_PIECE; ++i) {
                    forward_token(i, i ? hh[i - 1] : hs, hh[i], yv);
                    if (i % LS_YT == LS_YT - 1) sum_y(yv, i - (LS_YT - 1));
                }
                // The lane's shares of the cross-lane sums of a group of LS_ST tokens, token i at r = i % LS_ST:
                // S[(q * 2 + ci) * LS_ST + r] (q = 0: sum_n dh B, q = 1: sum_n dh h_{t-1} a A2; channel ci) and
                // BC[(q * 2 + j) * LS_ST + r] (q = 0: dB, q = 1: dC; state j).
                float S[4 * LS_ST], BC[4 * LS_ST];
#pragma unroll
                for (int i = LS_PIECE - 1; i >= 0; --i) {
                    float dl[2], dx[2];
                    token_in(i, dl, dx);
                    const float4 bc = s.BC[i][sq];
                    const float2 g2 = *reinterpret_cast<const float2*>(&sw.g[i][2 * cp]);
                    const float Bv[2] = {bc.x, bc.y}, Cv[2] = {bc.z, bc.w}, gv[2] = {g2.x, g2.y};
                    const int r = i % LS_ST;
#pragma unroll
                    for (int k = 0; k < 4; ++k) S[k * LS_ST + r] = BC[k * LS_ST + r] = 0.f;
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int ci = e >> 1, jj = e & 1;
                        const float prev = i ? hh[i - 1][e] : hs[e];
                        const float dh = fmaf(gv[ci], Cv[jj], u[e]);  // dh_t = g_t C_t + a_{t+1} dh_{t+1}
                        u[e] = exp2f(dl[ci] * A2[e]) * dh;           // a_t dh_t, for token t - 1
                        const float qv = u[e] * prev;                // dh_t a_t h_{t-1}
                        S[ci * LS_ST + r] = fmaf(dh, Bv[jj], S[ci * LS_ST + r]);
                        S[(2 + ci) * LS_ST + r] = fmaf(qv, A2[e], S[(2 + ci) * LS_ST + r]);
                        dA[e] = fmaf(qv, dl[ci], dA[e]);
                        BC[jj * LS_ST + r] = fmaf(dh, dx[ci], BC[jj * LS_ST + r]);
                        BC[(2 + jj) * LS_ST + r] = fmaf(gv[ci], hh[i][e], BC[(2 + jj) * LS_ST + r]);
                    }
                    if (r) continue;  // tokens i .. i + LS_ST - 1 are in: their sums, like sum_y
                    // S over the 8 lanes of the channel pair: lane (b4, b2, b1) ends with S1 (b4 clear) or S2 of warp
                    // channel 2 cp + b2, tokens i + b1 LS_ST / 2 + k, k < LS_ST / 2.
                    halve<4 * LS_ST>(S, b4, 4);
                    halve<2 * LS_ST>(S, b2, 2);
                    halve<LS_ST>(S, b1, 1);
#pragma unroll
                    for (int k = 0; k < LS_ST / 2; ++k)
                        (b4 ? sw.S2 : sw.S1)[i + b1 * (LS_ST / 2) + k][2 * cp + b2] = S[k];
                    // dB (b16 clear) or dC of state 2 sq + b8 of the tokens, over the warp's 4 channel pairs.
                    halve<4 * LS_ST>(BC, b16, 16);
                    halve<2 * LS_ST>(BC, b8, 8);
#pragma unroll
                    for (int k = 0; k < LS_ST; ++k) s.dBC[warp][b16][i + k][2 * sq + b8] = BC[k];
                }
                __syncthreads();  // both warps' dB and dC shares are written
                // Per-token gradients of the piece: lane (ti, hf) takes 4 channels of token ts + ti.
                const int t = ts + ti;
                if (t < q.len) {
                    auto row = [&](const float* a) { return *reinterpret_cast<const float4*>(a + 4 * hf); };
                    const float4 S1 = row(sw.S1[ti]), S2 = row(sw.S2[ti]), xv = row(sw.x[ti]), gv = row(sw.g[ti]);
                    const float4 su = row(sw.su[ti]), gz = row(sw.gz[ti]), yv = row(sw.y[ti]);
                    const float4 Dd = row(s.D + LS_WC * warp);
                    const float4 d0 = sw.dd[ti][2 * hf], d1 = sw.dd[ti][2 * hf + 1];
                    const float s1[4] = {S1.x, S1.y, S1.z, S1.w}, s2[4] = {S2.x, S2.y, S2.z, S2.w};
                    const float x4[4] = {xv.x, xv.y, xv.z, xv.w}, g4[4] = {gv.x, gv.y, gv.z, gv.w};
                    const float su4[4] = {su.x, su.y, su.z, su.w}, gz4[4] = {gz.x, gz.y, gz.z, gz.w};
                    const float y4[4] = {yv.x, yv.y, yv.z, yv.w}, D4[4] = {Dd.x, Dd.y, Dd.z, Dd.w};
                    const float dl4[4] = {d0.x, d0.y, d1.x, d1.y};
                    float gx[4], gdt[4], gzv[4];
#pragma unroll
                    for (int k = 0; k < 4; ++k) {
                        gx[k] = fmaf(dl4[k], s1[k], D4[k] * g4[k]);
                        gdt[k] = fmaf(x4[k], s1[k], s2[k] * LN2) * su4[k];  // d delta times d softplus
                        gzv[k] = gz4[k] * fmaf(D4[k], x4[k], y4[k]);
                        dD[k] = fmaf(g4[k], x4[k], dD[k]);
                        dbias[k] += gdt[k];
                    }
                    const int64_t r = (tok0 + t) * p.d_inner + dw + 4 * hf;
                    store4<T>(static_cast<T*>(p.dx) + r, gx);
                    store4<T>(static_cast<T*>(p.ddt) + r, gdt);
                    if (has_z) store4<T>(static_cast<T*>(p.dz) + r, gzv);
                }
                // dB and dC of token ts + bt, states 4 bq .. 4 bq + 3: the two warps' sums added.
                const int tb = ts + bt;
                if (tb < q.len) {
                    float dBv[4], dCv[4];
#pragma unroll
                    for (int k = 0; k < 4; ++k) {
                        dBv[k] = s.dBC[0][0][bt][4 * bq + k] + s.dBC[1][0][bt][4 * bq + k];
                        dCv[k] = s.dBC[0][1][bt][4 * bq + k] + s.dBC[1][1][bt][4 * bq + k];
                    }
                    const int64_t r = tok0 + tb;
#pragma unroll
                    for (int k = 0; k < 4; ++k) atomicAdd(p.dB_acc + (r * p.G_B + pl.gB) * N + 4 * bq + k, dBv[k]);
                    if (p.dC_direct)
                        store4<T>(static_cast<T*>(p.dC_direct) + (r * p.G_C + pl.gC) * N + 4 * bq, dCv);
                    else
#pragma unroll
                        for (int k = 0; k < 4; ++k) atomicAdd(p.dC_acc + (r * p.G_C + pl.gC) * N + 4 * bq + k, dCv[k]);
                }
            }
        }
        // d initial_state = a_0 dh_0; dA summed over the sequences.
        store_pair(p.dh0 + seq_state, u);
#pragma unroll
        for (int ci = 0; ci < 2; ++ci) {
            const int64_t row = int64_t(dw + 2 * cp + ci) * N + 2 * sq;
            atomicAdd(p.dA + row, dA[2 * ci]);
            atomicAdd(p.dA + row + 1, dA[2 * ci + 1]);
        }
        // dD and d dt_bias: summed over the 16 lanes (tokens) that share the lane's half row of channels.
#pragma unroll
        for (int k = 0; k < 4; ++k)
#pragma unroll
            for (int off = 2; off < 32; off <<= 1) {
                dD[k] += __shfl_xor_sync(FULL, dD[k], off);
                dbias[k] += __shfl_xor_sync(FULL, dbias[k], off);
            }
        if (lane < 2) {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                if (p.dD) atomicAdd(p.dD + dw + 4 * hf + k, dD[k]);
                if (p.dbias) atomicAdd(p.dbias + dw + 4 * hf + k, dbias[k]);
            }
        }
    }
}

// Dynamic shared memory of a block: the tiles above in the inputs' element size, the rest fp32.
int smem_bytes(int esize, int N, bool backward) {
    if (!backward) return (3 * WF + 2 * N) * TP * esize + 2 * WF * N * 4;
    return (4 * W + 2 * N) * TP * esize + (4 * W * TOK + 2 * TOK * (N + 1) + 4 * W * N) * 4 + 4 * 8;  // + barriers
}

enum Kernel { FWD = 0, BWD = 1, FWD_SERIAL = 2, BWD_LS = 3, FWD_LS = 4 };

// Which (dtype, state size, forward / backward) kernels have been given their shared memory, per device. A file-scope
// array, not a static inside the launch template: those are merged across every loaded library (GNU unique symbols),
// and a process may load several builds of this file (benchmarks and tests vary the compile-time knobs).
constexpr int MAX_DEVICES = 64;
static bool opted_in[3][2][2][MAX_DEVICES] = {};  // internal linkage: one per loaded library
template <typename T> constexpr int dtype_index() {
    return std::is_same<T, float>::value ? 0 : std::is_same<T, __half>::value ? 1 : 2;
}

// Chunked kernels: one block per (sequence, channel block), `n_seqs * d_inner / width` blocks of 32 * width threads.
// Serial forward: one thread per (sequence, channel), in blocks of SERIAL_THREADS. Lane-serial kernels: one two-warp
// block per (sequence, 16 channels).
template <typename T, int N> int launch(const ScanParams& p, int n_seqs, Kernel kind, cudaStream_t stream) {
    if (kind == FWD_SERIAL) {
        const int blocks = n_seqs * ((p.d_inner + SERIAL_THREADS - 1) / SERIAL_THREADS);
        scan_fwd_serial_kernel<T, N><<<blocks, SERIAL_THREADS, 0, stream>>>(p);
        return int(cudaGetLastError());
    }
    if (kind == BWD_LS || kind == FWD_LS) {  // static shared memory (under the 48 KB that needs no opt-in)
        if constexpr (N != 16) return int(cudaErrorInvalidValue);
        else if (kind == BWD_LS) scan_ls_kernel<T, N, true><<<n_seqs * (p.d_inner / LS_C), 64, 0, stream>>>(p);
        else scan_ls_kernel<T, N, false><<<n_seqs * (p.d_inner / LS_C), 64, 0, stream>>>(p);
        return int(cudaGetLastError());
    }
    const bool backward = kind == BWD;
    const int bytes = smem_bytes(int(sizeof(T)), N, backward), width = backward ? W : WF;
    auto kernel = backward ? scan_bwd_kernel<T, N> : scan_fwd_kernel<T, N>;
    // The shared-memory opt-in is a per-device attribute of the kernel: set once per device (a call costs ~5 us of
    // host time, which shows when the kernels are short). Setting it twice from racing threads is harmless.
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return int(err);
    bool* done = device < MAX_DEVICES ? &opted_in[dtype_index<T>()][N == 32][backward][device] : nullptr;
    if (!done || !*done) {
        err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
        if (err != cudaSuccess) return int(err);
        if (done) *done = true;
    }
    kernel<<<n_seqs * (p.d_inner / width), 32 * width, bytes, stream>>>(p);
    return int(cudaGetLastError());
}

template <typename T> int dispatch_states(const ScanParams& p, int n_seqs, Kernel kind, cudaStream_t s) {
    switch (p.N) {
        case 16: return launch<T, 16>(p, n_seqs, kind, s);
        case 32: return launch<T, 32>(p, n_seqs, kind, s);
        default: return int(cudaErrorInvalidValue);
    }
}

int run(const ScanParams* p, int dtype, int n_seqs, Kernel kind, void* stream) {
    if (n_seqs == 0) return 0;
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    switch (dtype) {
        case 0: return dispatch_states<float>(*p, n_seqs, kind, s);
        case 1: return dispatch_states<__half>(*p, n_seqs, kind, s);
        case 2: return dispatch_states<__nv_bfloat16>(*p, n_seqs, kind, s);
        default: return int(cudaErrorInvalidValue);
    }
}

}  // namespace m1_scan

// C entry points for ctypes (cuda_scan.py). dtype: 0 fp32, 1 fp16, 2 bf16. Return a cudaError_t code (0: launched).
extern "C" int m1_scan_fwd(const m1_scan::ScanParams* p, int dtype, int n_seqs, void* stream) {
    return m1_scan::run(p, dtype, n_seqs, m1_scan::FWD, stream);
}
extern "C" int m1_scan_fwd_serial(const m1_scan::ScanParams* p, int dtype, int n_seqs, void* stream) {
    return m1_scan::run(p, dtype, n_seqs, m1_scan::FWD_SERIAL, stream);
}
extern "C" int m1_scan_bwd(const m1_scan::ScanParams* p, int dtype, int n_seqs, void* stream) {
    return m1_scan::run(p, dtype, n_seqs, m1_scan::BWD, stream);
}
extern "C" int m1_scan_fwd_ls(const m1_scan::ScanParams* p, int dtype, int n_seqs, void* stream) {
    return m1_scan::run(p, dtype, n_seqs, m1_scan::FWD_LS, stream);
}
extern "C" int m1_scan_bwd_ls(const m1_scan::ScanParams* p, int dtype, int n_seqs, void* stream) {
    return m1_scan::run(p, dtype, n_seqs, m1_scan::BWD_LS, stream);
}
extern "C" int m1_scan_smem_bytes(int dtype, int N, int backward) {
    return m1_scan::smem_bytes(dtype == 0 ? 4 : 2, N, backward != 0);
}
extern "C" int m1_scan_tokens_per_chunk() { return m1_scan::TOK; }
extern "C" int m1_scan_channels_per_block() { return m1_scan::W; }  // the larger width: cpc must be its multiple
extern "C" int m1_scan_params_bytes() { return int(sizeof(m1_scan::ScanParams)); }
extern "C" const char* m1_scan_error_string(int code) { return cudaGetErrorString(cudaError_t(code)); }
