/* trm-diag's exact-tier kernel in C, built by trm_diag/kernels/native.py with the system compiler.

   The same mathematics as kernels/eager.py fused_rows (read its docstring first): for each row, pass 1
   takes m = max a; pass 2 computes w = exp(a - m) in float32 and E = expm1(dd) in float64 with
   dd = (b - a) - (b_y - a_y), keeping both in a per-thread row buffer, and sums z - 1, sum w E and
   sum w g; pass 3 sums the non-negative divergence terms with e = (E - S) / (1 + S) and
   x = dd - log1p(S). A row stays in cache between passes, which is why this beats inductor's
   fused kernel (it keeps [rows, V] intermediates in memory). Non-finite inputs give non-finite
   outputs, which the caller recomputes on its support-aware path. Token ids must lie in [0, V).
   Every row loop must vectorise on AVX2, AVX-512 and aarch64: no int64 <-> double conversions, and
   -fno-trapping-math so the clamps if-convert (tests/kernels/test_native.py reads gcc's report).
*/
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The rows of `out`, in order: trm_diag/kernels/__init__.py OUTPUTS (native.py checks they agree). */
static const char OUTPUT_NAMES[] = "kl,kl_rev,tv,ent_roll,ent_train,lp_roll,lp_train";
const char *trm_output_names(void) { return OUTPUT_NAMES; }

#define MAGIC 6755399441055744.0 /* 1.5 * 2^52: adding it rounds a double to an integer */

static inline double exp_d(double x) {
    /* exp in double, vectorisable: 2^k * P(r), r = x - k ln2 (Cody-Waite), |r| <= ln2/2, Taylor to r^13. */
    double xc = x < -708.0 ? -708.0 : (x > 709.0 ? 709.0 : x);
    double t = xc * 1.4426950408889634 + MAGIC;
    double k = t - MAGIC;
    double r = (xc - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10;
    double p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    /* 2^k from t's bits (t = 1.5 * 2^52 + k exactly, k in [-1022, 1023]): its low bits hold k, so the
       exponent field is (bits(t) + 1023) << 52, integer ops only: AVX2 and NEON have no double -> int64. */
    uint64_t tb;
    memcpy(&tb, &t, sizeof tb);
    uint64_t bits = (tb + 1023) << 52;
    double scale;
    memcpy(&scale, &bits, sizeof scale);
    double res = p * scale;
    res = x > 709.0 ? INFINITY : res;
    res = x < -708.0 ? 0.0 : res;
    return x != x ? x : res;
}

static inline float exp_f(float x) {
    /* exp in float for x <= 0 (arguments a - max a): 2^k * P(r), Taylor to r^7. */
    float xc = x < -87.0f ? -87.0f : x;
    float t = xc * 1.44269504f + 12582912.0f; /* 1.5 * 2^23: rounds to an integer */
    float k = t - 12582912.0f;
    float r = (xc - k * 0.693145752f) - k * 1.42860677e-6f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t ki = (int32_t)k;
    uint32_t bits = (uint32_t)(ki + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    float res = p * scale;
    res = x < -87.0f ? 0.0f : res;
    return x != x ? x : res;
}

/* A, B: [n, V] float32 logits (rollout, training) of rows 0..n-1; Y: [n] token ids; out: [7, n] float64 =
   kl, kl_rev, tv, ent_roll, ent_train, lp_roll[y], lp_train[y]. */
void trm_rows(const float *A, const float *B, const int64_t *Y, int64_t n, int64_t V, double *out) {
#pragma omp parallel
    {
        double *E = (double *)malloc(sizeof(double) * (size_t)V);
        float *W = (float *)malloc(sizeof(float) * (size_t)V);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; i++) {
            const float *a = A + i * V, *b = B + i * V;
            float m = -INFINITY;
#pragma omp simd reduction(max : m)
            for (int64_t j = 0; j < V; j++) m = a[j] > m ? a[j] : m;
            double ay = a[Y[i]], by = b[Y[i]], md = m, off = by - ay;
            double z1 = 0.0, sacc = 0.0, hacc = 0.0, cnt = 0.0;
#pragma omp simd reduction(+ : z1, sacc, hacc, cnt)
            for (int64_t j = 0; j < V; j++) {
                float w32 = exp_f(a[j] - m);
                double w = w32, ad = a[j];
                int below = a[j] < m;
                z1 += below ? w : 0.0;
                cnt += below ? 0.0 : 1.0;
                double dd = ((double)b[j] - ad) - off;
                double e1 = exp_d(dd) - 1.0;
                E[j] = e1;
                W[j] = w32;
                sacc += w * e1;
                hacc += w * (md - ad);
            }
            z1 += cnt - 1.0;
            double z = 1.0 + z1, s = sacc / z, c = log1p(s), inv = 1.0 / (1.0 + s);
            double kl = 0.0, ex = 0.0, tv = 0.0, eg = 0.0;
#pragma omp simd reduction(+ : kl, ex, tv, eg)
            for (int64_t j = 0; j < V; j++) {
                double w = W[j], ad = a[j];
                double x = (((double)b[j] - ad) - off) - c;
                double e = (E[j] - s) * inv;
                kl += w * (e - x);
                ex += w * (e * x);
                tv += w * fabs(e);
                eg += w * (e * (md - ad));
            }
            double log_z = log1p(z1);
            kl /= z;
            double kl_rev = ex / z - kl, hp = hacc / z;
            out[0 * n + i] = kl;
            out[1 * n + i] = kl_rev;
            out[2 * n + i] = 0.5 * tv / z;
            out[3 * n + i] = hp + log_z;
            out[4 * n + i] = hp + eg / z - kl_rev + log_z;
            out[5 * n + i] = ay - md - log_z;
            out[6 * n + i] = ay - md - log_z - c;
        }
        free(E);
        free(W);
    }
}
