/* Single-pass CPU kernel of a memory-augmented Adam/AdamW step (hf_memopt).
 *
 * One call per optimizer step covers every tensor ("unit") that takes the fast path. Per element
 * it reads g, S, the evicted slot, p, m, v and writes S, the slot, p, m, v: the whole step in one
 * pass over memory, which is what keeps it close to torch's fused AdamW. Work is split into chunks
 * that a few pthreads take from an atomic counter (one thread creation per step, not per tensor).
 *
 * The arithmetic mirrors torch's single-tensor AdamW/Adam in fp32 with fp32 scalars; the memory
 * update mirrors hf_memopt.memory.admit: S = (S - evicted) + stored, stored = g rounded to the slot
 * dtype (bf16 with round-to-nearest-even, as c10::BFloat16).
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { P_PARAM, P_GRAD, P_EXP_AVG, P_EXP_AVG_SQ, P_MAX_EXP_AVG_SQ, P_SUM, P_SLOT, N_PTRS };
enum { I_MODE, I_SLOT_BF16, I_AMSGRAD, I_MAXIMIZE, I_DECOUPLED, N_INTS };
enum { F_COEF_G, F_COEF_S, F_LR, F_WD, F_BETA1, F_BETA2, F_EPS, F_STEP_SIZE, F_BC2_SQRT, N_FLOATS };
enum { MODE_NONE = 0, MODE_FILL = 1, MODE_EVICT = 2 };

#define CHUNK 16384

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    /* only finite gradients are ever stored, so no NaN special case is needed */
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

typedef struct {
    int64_t n_units;
    const int64_t *ptrs;   /* [n_units, N_PTRS] data pointers (0 when absent) */
    const int64_t *ints;   /* [n_units, N_INTS] */
    const double *floats;  /* [n_units, N_FLOATS] */
    const int64_t *chunk_unit, *chunk_start, *chunk_end;
    int64_t n_chunks;
    int64_t next; /* atomic work counter */
} job_t;

/* The loop body, instantiated below for every combination of the compile-time flags so that each
 * instance is a straight, vectorizable loop. Flags that are cheap as arithmetic stay run-time values:
 * maximize is a sign (x * -1 is exact), decoupled decay a factor (x * 1 is exact), coupled decay a
 * coefficient (a + 0 * p is exact), a = g when the memory is empty is coef_g = 1, coef_s = 0. */
static inline __attribute__((always_inline)) void adam_loop(
    int64_t lo, int64_t hi, float *restrict p, const float *restrict g, float *restrict m, float *restrict v,
    float *restrict vmax, float *restrict S, void *restrict slot_ptr, const float cg, const float cs,
    const float sign, const float keep, const float wd_coupled, const float w1, const float beta2, const float w2,
    const float eps, const float bc2s, const float neg_step, const int mode, const int bf16, const int amsgrad,
    const int small_w1) {
    float *restrict slot_f = (float *)slot_ptr;
    uint16_t *restrict slot_b = (uint16_t *)slot_ptr;
    for (int64_t i = lo; i < hi; ++i) {
        const float gi = g[i];
        const float s = S[i];
        float a = cg * gi + cs * s;
        if (mode != MODE_NONE) {
            float stored, old = 0.0f;
            if (bf16) {
                const uint16_t b = f32_to_bf16(gi);
                if (mode == MODE_EVICT) old = bf16_to_f32(slot_b[i]);
                slot_b[i] = b;
                stored = bf16_to_f32(b);
            } else {
                if (mode == MODE_EVICT) old = slot_f[i];
                slot_f[i] = gi;
                stored = gi;
            }
            S[i] = (s - old) + stored;
        }
        a = a * sign;
        const float pi = p[i] * keep;
        a = a + wd_coupled * pi;
        float mi = m[i];
        mi = small_w1 ? mi + w1 * (a - mi) : a - (a - mi) * (1.0f - w1);
        const float vi = v[i] * beta2 + w2 * (a * a);
        m[i] = mi;
        v[i] = vi;
        float d;
        if (amsgrad) {
            const float mx = vmax[i] > vi ? vmax[i] : vi;
            vmax[i] = mx;
            d = sqrtf(mx) / bc2s + eps;
        } else {
            d = sqrtf(vi) / bc2s + eps;
        }
        p[i] = pi + neg_step * (mi / d);
    }
}

#define ADAM_CASE(MODE, BF16, AMS, SMALL)                                                                       \
    if (mode == MODE && bf16 == BF16 && amsgrad == AMS && small_w1 == SMALL) {                                  \
        adam_loop(lo, hi, p, g, m, v, vmax, S, slot, cg, cs, sign, keep, wdc, w1, beta2, w2, eps, bc2s, neg_step, \
                  MODE, BF16, AMS, SMALL);                                                                      \
        return;                                                                                                 \
    }
#define ADAM_CASES_AMS(MODE, BF16, AMS) ADAM_CASE(MODE, BF16, AMS, 1) ADAM_CASE(MODE, BF16, AMS, 0)
#define ADAM_CASES(MODE, BF16) ADAM_CASES_AMS(MODE, BF16, 0) ADAM_CASES_AMS(MODE, BF16, 1)

static void run_chunk(const job_t *job, int64_t c) {
    const int64_t u = job->chunk_unit[c], lo = job->chunk_start[c], hi = job->chunk_end[c];
    const int64_t *P = job->ptrs + u * N_PTRS;
    const int64_t *I = job->ints + u * N_INTS;
    const double *F = job->floats + u * N_FLOATS;
    float *p = (float *)P[P_PARAM];
    const float *g = (const float *)P[P_GRAD];
    float *m = (float *)P[P_EXP_AVG];
    float *v = (float *)P[P_EXP_AVG_SQ];
    float *vmax = (float *)P[P_MAX_EXP_AVG_SQ];
    float *S = (float *)P[P_SUM];
    void *slot = (void *)P[P_SLOT];
    const int mode = (int)I[I_MODE], bf16 = mode != MODE_NONE && (int)I[I_SLOT_BF16];
    const int amsgrad = (int)I[I_AMSGRAD] != 0;
    const int decoupled = (int)I[I_DECOUPLED] != 0;
    const float cg = (float)F[F_COEF_G], cs = (float)F[F_COEF_S];
    const float sign = I[I_MAXIMIZE] ? -1.0f : 1.0f;
    const float wd = (float)F[F_WD];
    const float keep = decoupled && wd != 0.0f ? (float)(1.0 - F[F_LR] * F[F_WD]) : 1.0f;
    const float wdc = decoupled ? 0.0f : wd;
    const float w1 = (float)(1.0 - F[F_BETA1]);
    const int small_w1 = w1 < 0.5f;
    const float beta2 = (float)F[F_BETA2], w2 = (float)(1.0 - F[F_BETA2]);
    const float eps = (float)F[F_EPS], bc2s = (float)F[F_BC2_SQRT];
    const float neg_step = -(float)F[F_STEP_SIZE];
    ADAM_CASES(MODE_NONE, 0)
    ADAM_CASES(MODE_FILL, 0)
    ADAM_CASES(MODE_FILL, 1)
    ADAM_CASES(MODE_EVICT, 0)
    ADAM_CASES(MODE_EVICT, 1)
}

static void *worker(void *arg) {
    job_t *job = (job_t *)arg;
    for (;;) {
        int64_t c = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        if (c >= job->n_chunks) break;
        run_chunk(job, c);
    }
    return NULL;
}

/* Returns 0 on success, -1 when memory for the chunk table cannot be had. */
int memopt_adam_step(int64_t n_units, const int64_t *ptrs, const int64_t *ints, const double *floats,
                     const int64_t *numels, int n_threads) {
    int64_t n_chunks = 0;
    for (int64_t u = 0; u < n_units; ++u) n_chunks += (numels[u] + CHUNK - 1) / CHUNK;
    if (n_chunks == 0) return 0;
    int64_t *table = (int64_t *)malloc(sizeof(int64_t) * 3 * (size_t)n_chunks);
    if (!table) return -1;
    job_t job = {n_units, ptrs, ints, floats, table, table + n_chunks, table + 2 * n_chunks, n_chunks, 0};
    int64_t c = 0;
    for (int64_t u = 0; u < n_units; ++u)
        for (int64_t s = 0; s < numels[u]; s += CHUNK) {
            table[c] = u;
            table[n_chunks + c] = s;
            table[2 * n_chunks + c] = s + CHUNK < numels[u] ? s + CHUNK : numels[u];
            ++c;
        }
    if (n_threads > 64) n_threads = 64;
    if ((int64_t)n_threads > n_chunks) n_threads = (int)n_chunks;
    pthread_t threads[64];
    int started = 0;
    for (int t = 1; t < n_threads; ++t)
        if (pthread_create(&threads[started], NULL, worker, &job) == 0) ++started;
    worker(&job);
    for (int t = 0; t < started; ++t) pthread_join(threads[t], NULL);
    free(table);
    return 0;
}
