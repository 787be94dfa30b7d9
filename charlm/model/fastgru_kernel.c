/* The time loops of charlm.fastgru in C: one GRU layer, float32, batch-major, reset after.

   Built on first use by charlm/ckernel.py (cc -O3 -march=native -ffast-math -fopenmp) and loaded
   with ctypes. The matrix products call the BLAS that torch itself uses (MKL's packed GEMM, found
   in libtorch_cpu), so W_hh is packed once per call instead of once per time step. The batch's rows
   are independent recurrences: each of torch's OpenMP threads runs the whole time loop for its own
   block of rows (one single-threaded GEMM into a small cache-resident buffer, then one pass over
   the block's numbers per step), with no synchronisation until the end.

   Layouts (B rows, T steps, H units; all contiguous, batch first like the model's tensors):
     XP  (B, T, 3H)  x W_ih^T + b_ih, gate blocks r, z, n as in torch.nn.GRU
     Y   (B, T, H)   outputs h_1 .. h_T
     M   (B, T, 5, H) what the backward needs, one factor per slot (see fastgru.py), or NULL
     D   (B, T, 5, H) slot gradients: D[k] = M[k] * s, s = dL/dh_t (slot 4 left unset)
   Per step, with P = h W_hh^T + b_hh:
     r = sigmoid(XP_r + P_r), z = sigmoid(XP_z + P_z), n = tanh(XP_n + r P_n), h' = n + z (h - n) */

#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef size_t (*pack_size_fn)(int identifier, int m, int n, int k);
typedef void (*pack_fn)(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                        const float *src, int ld, float *dest);
typedef void (*compute_fn)(int layout, int transa, int transb, int m, int n, int k, const float *a,
                           int lda, const float *b, int ldb, float beta, float *c, int ldc);
typedef int (*threads_fn)(int n);

/* CBLAS constants (MKL's values). */
enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112, PACKED = 151, B_MATRIX = 162 };
enum { MIN_UNITS = 32 }; /* fewest hidden units worth a thread of their own */

static pack_size_fn pack_size;
static pack_fn pack;
static compute_fn compute;
static threads_fn set_local_threads; /* MKL_Set_Num_Threads_Local, or NULL */

int charlm_gru_abi(void) { return 6; }

void charlm_gru_init(void *size_fn, void *pack_fn_, void *compute_fn_, void *threads_fn_) {
    pack_size = (pack_size_fn)size_fn;
    pack = (pack_fn)pack_fn_;
    compute = (compute_fn)compute_fn_;
    set_local_threads = (threads_fn)threads_fn_;
}

/* e^x for |x| <= 87 (clamped), 2.3e-7 relative error: x = k ln2 + f with ln2 in two parts
   (Cody-Waite), e^f from its degree-6 Taylor polynomial (|f| <= ln2/2), 2^k from the exponent
   bits. Inline, so the compiler vectorises it with the rest of the step (about 2x libm's
   vector expf here), and it cannot overflow, which -ffast-math lets the compiler assume. */
static inline float exp_clamped(float x) {
    x = x < -87.0f ? -87.0f : (x > 87.0f ? 87.0f : x);
    float k = __builtin_rintf(x * 1.44269504088896341f);
    float f = __builtin_fmaf(k, -0.693145752f, x);
    f = __builtin_fmaf(k, -1.42860677e-06f, f);
    float p = 1.0f + f * (1.0f + f * (0.5f + f * (1.6666667e-1f + f * (4.1666668e-2f +
              f * (8.3333338e-3f + f * 1.3888889e-3f)))));
    union { int32_t i; float f; } two_k = {.i = ((int32_t)k + 127) << 23};
    return p * two_k.f;
}

static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_clamped(-x)); }

static void *aligned(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

typedef struct {
    int64_t B, T, H, u0, u1; /* this thread's hidden units: u0 .. u1 */
    const float *XP, *h0, *dY, *M_in, *w_hh, *b_hh;
    float *Y, *M, *D, *g;
    int rc;
} job_t;

/* Forward, this thread's units, all rows, all steps; one barrier per step (every thread's next
   GEMM reads every unit of the state just written). */
static void forward_units(job_t *j, int *failed) {
    const int64_t B = j->B, T = j->T, H = j->H, u0 = j->u0, nu = j->u1 - j->u0;
    const int rows = (int)B, k1 = (int)H, n3 = (int)(3 * nu);
    float *w = NULL, *rows_w = aligned((size_t)3 * nu * H * sizeof(float));
    float *P = aligned((size_t)B * 3 * nu * sizeof(float));
    if (rows_w && P) w = aligned(pack_size(B_MATRIX, rows, n3, k1));
    if (w) {
        /* this thread's rows of W_hh (gates r, z, n of units u0..u1), packed as B of P = h W^T */
        for (int gate = 0; gate < 3; gate++)
            memcpy(rows_w + gate * nu * H, j->w_hh + (gate * H + u0) * H, (size_t)nu * H * sizeof(float));
        pack(ROW_MAJOR, B_MATRIX, TRANS, rows, n3, k1, 1.0f, rows_w, k1, w);
    }
#pragma omp atomic
    *failed |= !w;
#pragma omp barrier
    if (*failed) { free(w); free(rows_w); free(P); j->rc = 1; return; }
    const float *br = j->b_hh + u0, *bz = br + H, *bn = bz + H;
    for (int64_t t = 0; t < T; t++) {
        /* the previous state of every row: h0, or Y[:, t-1] (rows T*H apart) */
        const float *hp = t ? j->Y + (t - 1) * H : j->h0;
        const int64_t ldh = t ? T * H : H;
        compute(ROW_MAJOR, NO_TRANS, PACKED, rows, n3, k1, hp, (int)ldh, w, k1, 0.0f, P, n3);
        for (int64_t b = 0; b < B; b++) {
            const int64_t row = b * T + t;
            const float *xr = j->XP + row * 3 * H + u0, *xz = xr + H, *xn = xz + H;
            const float *pr = P + b * 3 * nu, *pz = pr + nu, *pn = pz + nu;
            const float *hb = hp + b * ldh + u0;
            float *y = j->Y + row * H + u0;
            if (j->M) {
                float *m0 = j->M + row * 5 * H + u0, *m1 = m0 + H, *m2 = m1 + H, *m3 = m2 + H, *m4 = m3 + H;
#pragma omp simd
                for (int64_t k = 0; k < nu; k++) {
                    float r = sigmoid(xr[k] + pr[k] + br[k]);
                    float z = sigmoid(xz[k] + pz[k] + bz[k]);
                    float ghn = pn[k] + bn[k];
                    float c = 2.0f * sigmoid(2.0f * (xn[k] + r * ghn)) - 1.0f; /* tanh */
                    float h = c + z * (hb[k] - c);
                    y[k] = h;
                    float nin = (1.0f - c * c) * (1.0f - z); /* dh'/d(W_in x + b_in) */
                    float nh = nin * r;                       /* dh'/d(W_hn h + b_hn) */
                    m0[k] = nin;
                    m1[k] = nh * ghn * (1.0f - r); /* dh'/d(r pre-activation) */
                    m2[k] = (h - c) * (1.0f - z);  /* dh'/d(z pre-activation) */
                    m3[k] = nh;
                    m4[k] = z; /* dh'/dh, the direct path */
                }
            } else {
#pragma omp simd
                for (int64_t k = 0; k < nu; k++) {
                    float r = sigmoid(xr[k] + pr[k] + br[k]);
                    float z = sigmoid(xz[k] + pz[k] + bz[k]);
                    float c = 2.0f * sigmoid(2.0f * (xn[k] + r * (pn[k] + bn[k]))) - 1.0f;
                    y[k] = c + z * (hb[k] - c);
                }
            }
        }
#pragma omp barrier
    }
    free(P);
    free(rows_w);
    free(w);
}

/* Backward, this thread's units: g (B, H) holds dL/dh_T in and dL/dh_0 out. One barrier per
   step (every thread's GEMM reads every unit's slot gradients of that step). */
static void backward_units(job_t *j, int *failed) {
    const int64_t B = j->B, T = j->T, H = j->H, u0 = j->u0, nu = j->u1 - j->u0;
    const int rows = (int)B, k3 = (int)(3 * H), n1 = (int)nu;
    float *w = aligned(pack_size(B_MATRIX, rows, n1, k3));
    if (w) pack(ROW_MAJOR, B_MATRIX, NO_TRANS, rows, n1, k3, 1.0f, j->w_hh + u0, (int)H, w); /* W_hh[:, u0:u1] */
#pragma omp atomic
    *failed |= !w;
#pragma omp barrier
    if (*failed) { free(w); j->rc = 1; return; }
    for (int64_t t = T - 1; t >= 0; t--) {
        for (int64_t b = 0; b < B; b++) {
            const int64_t row = b * T + t;
            const float *dy = j->dY + row * H + u0, *m = j->M_in + row * 5 * H + u0;
            float *d = j->D + row * 5 * H + u0, *gb = j->g + b * H + u0;
#pragma omp simd
            for (int64_t k = 0; k < nu; k++) {
                float s = dy[k] + gb[k];
                d[k] = m[k] * s;
                d[H + k] = m[H + k] * s;
                d[2 * H + k] = m[2 * H + k] * s;
                d[3 * H + k] = m[3 * H + k] * s;
                gb[k] = m[4 * H + k] * s; /* slot 4 goes straight to g */
            }
        }
#pragma omp barrier
        /* g[:, units] += D[:, t, slots 1..3] W_hh[:, units]: through W_hh h to the previous state */
        compute(ROW_MAJOR, NO_TRANS, PACKED, rows, n1, k3, j->D + t * 5 * H + H, (int)(T * 5 * H), w, n1,
                1.0f, j->g + u0, (int)H);
    }
    free(w);
}

/* Split the hidden units into blocks (multiples of 8, at least MIN_UNITS each), one per thread
   of torch's own OpenMP pool (this library links the libgomp that torch loaded; a second pool
   of threads would fight torch's spinning workers for the cores). Each thread's slice of W_hh
   stays in its core's cache for the whole loop. Returns 0, or 1 when memory ran out. */
static int run_blocks(job_t proto, int threads, int backward) {
    const int64_t H = proto.H;
    int n = threads < 1 ? 1 : threads;
    if (H / n < MIN_UNITS) n = H / MIN_UNITS > 0 ? (int)(H / MIN_UNITS) : 1;
    int rc = 0, failed = 0;
#pragma omp parallel num_threads(n) reduction(| : rc)
    {
        const int i = omp_get_thread_num(), m = omp_get_num_threads();
        job_t j = proto;
        j.u0 = H * i / m / 8 * 8;
        j.u1 = i == m - 1 ? H : H * (i + 1) / m / 8 * 8;
        j.rc = 0;
        if (m > 1 && set_local_threads) set_local_threads(1); /* this block's GEMMs stay here */
        if (backward) backward_units(&j, &failed); else forward_units(&j, &failed);
        if (m > 1 && set_local_threads) set_local_threads(0); /* back to the global setting */
        rc |= j.rc;
    }
    return rc;
}

int charlm_gru_forward(int64_t B, int64_t T, int64_t H, const float *XP, const float *h0,
                       const float *w_hh, const float *b_hh, float *Y, float *M, int threads) {
    job_t j = {.B = B, .T = T, .H = H, .XP = XP, .h0 = h0, .w_hh = w_hh, .b_hh = b_hh, .Y = Y, .M = M};
    return run_blocks(j, threads, 0);
}

int charlm_gru_backward(int64_t B, int64_t T, int64_t H, const float *dY, const float *M,
                        const float *w_hh, float *D, float *g, int threads) {
    job_t j = {.B = B, .T = T, .H = H, .dY = dY, .M_in = M, .w_hh = w_hh, .D = D, .g = g};
    return run_blocks(j, threads, 1);
}
