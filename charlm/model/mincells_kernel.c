/* The time loops of the min cells' `fast` implementation (charlm/model/mincells.py) in C: one
   layer, float32, batch first, the gate nonlinearities fused into the recurrence.

   Built on first use by charlm/model/minkernel.py (with ckernel.py's flags and cache) and loaded
   with ctypes. A layer's rows are independent recurrences: each OpenMP thread runs the whole time
   loop for its own rows, one vectorised pass over the H units per step, reading the gates once
   and writing h once; the backward recomputes the gates' nonlinearities instead of storing them.

   Layouts (B rows, T steps, H units, G = 2 for minGRU [k | cand], 3 for minLSTM [kf | ki | cand]):
     gates (B, T, G*H)  the layer's input products x W^T + b      h0, dh0 (B, H)
     h, dh (B, T, H)    outputs h_1 .. h_T and dL/dh_t             dgates (B, T, G*H)
   Per step: h = a h_prev + (1 - a) g(cand), g(x) = x + 1/2 for x >= 0, else sigmoid(x);
     minGRU a = sigmoid(-k);  minLSTM a = f / (f + i), f = sigmoid(kf), i = sigmoid(ki).
   Backward, with c = dL/dh_t + a_{t+1} c_{t+1} and D = c (h_prev - g):
     minGRU dk = -D a (1 - a);  minLSTM dkf = D a (1 - a) (1 - f), dki = -D a (1 - a) (1 - i);
     dcand = c (1 - a) g'(cand);  dh0 = a_1 c_1. */

#include <stdint.h>
#if defined(__SSE__)
#include <xmmintrin.h>
/* Flush denormals to zero in this thread while a loop runs: a gradient carried back through many
   steps of a < 1 sinks below float's normal range, where every operation on it is ~100x slower.
   The numbers lost are under 1e-38. */
#define FLUSH_BEGIN unsigned csr_ = _mm_getcsr(); _mm_setcsr(csr_ | 0x8040);
#define FLUSH_END _mm_setcsr(csr_);
#else
#define FLUSH_BEGIN
#define FLUSH_END
#endif

int charlm_min_abi(void) { return 1; }

/* e^x for |x| <= 87 (clamped), 2.3e-7 relative error, as in fastgru_kernel.c: inline, so the
   compiler vectorises it with the rest of the step. */
static inline float exp_clamped(float x) {
    x = x < -87.0f ? -87.0f : (x > 87.0f ? 87.0f : x);
    float k = __builtin_rintf(x * 1.44269504088896341f);
    float f = __builtin_fmaf(k, -0.693145752f, x);
    f = __builtin_fmaf(k, -1.42860677e-06f, f);
    float p = 1.0f + f * (1.0f + f * (0.5f + f * (1.6666667e-1f + f * (4.1666668e-2f +
              f * (8.3333338e-3f + f * 1.3888889e-3f)))));
    union { float f; int32_t i; } scale = {.i = ((int32_t)k + 127) << 23};
    return p * scale.f;
}

static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_clamped(-x)); }

static inline float g(float x) { return x >= 0.0f ? x + 0.5f : sigmoid(x); }

/* a, and for minLSTM f and i, of one unit from its gate pre-activations. */
static inline float coefficient(int lstm, const float *gt, int64_t H, int64_t j, float *f,
                                float *i) {
    if (!lstm)
        return 1.0f / (1.0f + exp_clamped(gt[j]));
    *f = sigmoid(gt[j]);
    *i = sigmoid(gt[H + j]);
    return *f / (*f + *i);
}

void charlm_min_forward(int64_t B, int64_t T, int64_t H, int lstm, const float *gates,
                        const float *h0, float *h, int threads) {
    const int64_t G = lstm ? 3 : 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < B; b++) {
        FLUSH_BEGIN
        const float *prev = h0 + b * H;
        for (int64_t t = 0; t < T; t++) {
            const float *gt = gates + (b * T + t) * G * H, *cand = gt + (G - 1) * H;
            float *ht = h + (b * T + t) * H;
#pragma omp simd
            for (int64_t j = 0; j < H; j++) {
                float f = 0.0f, i = 0.0f;
                float a = coefficient(lstm, gt, H, j, &f, &i);
                ht[j] = a * prev[j] + (1.0f - a) * g(cand[j]);
            }
            prev = ht;
        }
        FLUSH_END
    }
}

/* One step back for units 0..H-1 (inlined twice, lstm a constant, so each loop is branch-free). */
static inline void backward_step(const int lstm, int64_t H, const float *restrict gt,
                                 const float *restrict prev, const float *restrict dht,
                                 float *restrict dg, float *restrict carry) {
    const float *cand = gt + (lstm ? 2 : 1) * H;
    float *dcand = dg + (lstm ? 2 : 1) * H;
#pragma omp simd
    for (int64_t j = 0; j < H; j++) {
        float f = 0.0f, i = 0.0f;
        float a = coefficient(lstm, gt, H, j, &f, &i);
        float x = cand[j], gx = g(x), slope = x >= 0.0f ? 1.0f : gx * (1.0f - gx);
        float c = dht[j] + carry[j];
        float daa = c * (prev[j] - gx) * a * (1.0f - a);
        if (lstm) {
            dg[j] = daa * (1.0f - f);
            dg[H + j] = -daa * (1.0f - i);
        } else {
            dg[j] = -daa;
        }
        dcand[j] = c * (1.0f - a) * slope;
        carry[j] = a * c;
    }
}

/* dh0 holds the carried gradient a_{t+1} c_{t+1} on the way (zero at the start). */
void charlm_min_backward(int64_t B, int64_t T, int64_t H, int lstm, const float *gates,
                         const float *h0, const float *h, const float *dh, float *dgates,
                         float *dh0, int threads) {
    const int64_t G = lstm ? 3 : 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < B; b++) {
        FLUSH_BEGIN
        float *carry = dh0 + b * H;
        for (int64_t j = 0; j < H; j++)
            carry[j] = 0.0f;
        for (int64_t t = T - 1; t >= 0; t--) {
            const float *gt = gates + (b * T + t) * G * H;
            const float *prev = t ? h + (b * T + t - 1) * H : h0 + b * H;
            const float *dht = dh + (b * T + t) * H;
            float *dg = dgates + (b * T + t) * G * H;
            if (lstm)
                backward_step(1, H, gt, prev, dht, dg, carry);
            else
                backward_step(0, H, gt, prev, dht, dg, carry);
        }
        FLUSH_END
    }
}
