/* Single-pass CPU kernel of a memory-augmented Adam/AdamW step (hf_memopt), and of Critical Momenta
 * (SPEC 1b: the memory holds the momentum m, m~ = m + kappa S / n feeds v and p; cm_loop below).
 *
 * One call per optimizer step covers every tensor ("unit") that takes the fast path. Per element
 * it reads g, S, the evicted slot, p, m, v and writes S, the slot, p, m, v: the whole step in one
 * pass over memory, which is what keeps it close to torch's fused AdamW. Work is split into chunks
 * that a few pthreads take from an atomic counter (one thread creation per step, not per tensor).
 *
 * The arithmetic mirrors torch's single-tensor AdamW/Adam in fp32 with fp32 scalars; the memory
 * update mirrors the "torch" executor's admission: S = (S - evicted) + stored, stored = g rounded to the slot
 * dtype (bf16 with round-to-nearest-even, as c10::BFloat16).
 */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The column layout of every per-unit table, named once here; memopt_layout() hands the names to the
 * Python side (hf_memopt.engine.executors.cpu_kernel), which fills the tables by name and refuses a
 * library whose layout differs from the one it was written against. */
#define STEP_PTRS(X) X(P, PARAM) X(P, GRAD) X(P, EXP_AVG) X(P, EXP_AVG_SQ) X(P, MAX_EXP_AVG_SQ) X(P, SUM) X(P, SLOT)
#define STEP_INTS(X) X(I, MODE) X(I, SLOT_BF16) X(I, AMSGRAD) X(I, MAXIMIZE) X(I, DECOUPLED) X(I, MOMENTUM)
#define STEP_FLOATS(X) \
    X(F, COEF_G) X(F, COEF_S) X(F, LR) X(F, WD) X(F, BETA1) X(F, BETA2) X(F, EPS) X(F, STEP_SIZE) X(F, BC2_SQRT)
/* memopt_adam_fused: the whole step, decisions included */
#define FUSED_PTRS(X)                                                                                      \
    X(Q, PARAM) X(Q, GRAD) X(Q, EXP_AVG) X(Q, EXP_AVG_SQ) X(Q, MAX_EXP_AVG_SQ) X(Q, SUM) X(Q, STEP) X(Q, PRI) \
        X(Q, STORED_AT) X(Q, COUNT) X(Q, CLOCK) X(Q, M_BOUND)
#define FUSED_INTS(X)                                                                                   \
    X(J, TOPC) X(J, SLOTS) X(J, GROUP) X(J, AGG) X(J, SLOT_BF16) X(J, AMSGRAD) X(J, MAXIMIZE) X(J, DECOUPLED) \
        X(J, MOMENTUM)
#define FUSED_FLOATS(X) X(H, KAPPA) X(H, DECAY) X(H, LR) X(H, WD) X(H, BETA1) X(H, BETA2) X(H, EPS)

#define AS_ENUM(PREFIX, NAME) PREFIX##_##NAME,
#define AS_NAME(PREFIX, NAME) #NAME ","
enum { STEP_PTRS(AS_ENUM) N_PTRS };
enum { STEP_INTS(AS_ENUM) N_INTS };
enum { STEP_FLOATS(AS_ENUM) N_FLOATS };
enum { FUSED_PTRS(AS_ENUM) N_Q };
enum { FUSED_INTS(AS_ENUM) N_J };
enum { FUSED_FLOATS(AS_ENUM) N_H };
enum { MODE_NONE = 0, MODE_FILL = 1, MODE_EVICT = 2 };
enum { AGG_MEAN, AGG_SUM, AGG_MID };
/* I_MOMENTUM: 0 Adam(W) on the aggregate of g; 1 Critical Momenta, the loop advances m itself; 2 Critical
 * Momenta with step, decoupled decay and m already advanced by the caller (host decisions: the castability
 * test of SPEC 1.3 needs the max-abs of the m that is stored before anything is written). */
enum { MOMENTUM_NONE = 0, MOMENTUM_LOOP = 1, MOMENTUM_READY = 2 };

static const char LAYOUT[] = "step_ptrs:" STEP_PTRS(AS_NAME) ";step_ints:" STEP_INTS(AS_NAME) ";step_floats:" STEP_FLOATS(
    AS_NAME) ";fused_ptrs:" FUSED_PTRS(AS_NAME) ";fused_ints:" FUSED_INTS(AS_NAME) ";fused_floats:" FUSED_FLOATS(AS_NAME);

/* The table layout, for the loader's check: "table:COL,COL,...;table:..." */
const char *memopt_layout(void) { return LAYOUT; }

#define CHUNK 16384 /* hf_memopt.engine.rule.CHUNK */
/* Chunks a thread takes per atomic fetch (fewer when that would leave under four runs per thread).
 * When two cores take alternate 64 KB chunks, each core's streams restart every chunk and a read-only
 * pass such as the norms falls well short of the machine's bandwidth; runs of 4 MB for the norm pass and
 * 1 MB for the update made the two-thread step 2-15% faster on a 2-core EPYC (docs/benchmarks.md, "How
 * the kernel splits work between threads"). Much longer update runs lose again: each core then streams
 * eleven arrays of its own. */
#define NORM_GRAB 64
#define UPDATE_GRAB 16

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    /* only finite values come here (stored gradients, the max-abs of a finite-norm gradient), so no NaN
     * special case is needed; a finite value past bf16's range rounds to the infinity 0x7F80 */
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

typedef struct job job_t;
typedef void (*chunk_fn)(const job_t *, int64_t);

struct job {
    chunk_fn fn;
    int64_t n_units;
    const int64_t *ptrs;   /* [n_units, N_PTRS] data pointers (0 when absent) */
    const int64_t *ints;   /* [n_units, N_INTS] */
    const double *floats;  /* [n_units, N_FLOATS] */
    const int64_t *chunk_unit, *chunk_start, *chunk_end;
    int64_t n_chunks;
    int64_t next;     /* atomic work counter, in grabs */
    int64_t grab;     /* consecutive chunks a thread takes at a time */
    double *partials; /* [n_chunks] per-chunk results of the norm pass */
};

/* Admission of one element: x (g, or m under Critical Momenta) written to the slot in its dtype, S
 * updated as (S - evicted) + stored. Returns the new S. */
static inline __attribute__((always_inline)) float admit(void *restrict slot_ptr, int64_t i, float x, float s,
                                                         int mode, int bf16) {
    float stored, old = 0.0f;
    if (bf16) {
        uint16_t *restrict slot_b = (uint16_t *)slot_ptr;
        const uint16_t b = f32_to_bf16(x);
        if (mode == MODE_EVICT) old = bf16_to_f32(slot_b[i]);
        slot_b[i] = b;
        stored = bf16_to_f32(b);
    } else {
        float *restrict slot_f = (float *)slot_ptr;
        if (mode == MODE_EVICT) old = slot_f[i];
        slot_f[i] = x;
        stored = x;
    }
    return (s - old) + stored;
}

/* Adam's denominator sqrt(v) / sqrt(1 - beta2^t) + eps, with amsgrad's running max (written back). */
static inline __attribute__((always_inline)) float denominator(float *restrict vmax, int64_t i, float vi, float bc2s,
                                                               float eps, int amsgrad) {
    if (amsgrad) {
        const float mx = vmax[i] > vi ? vmax[i] : vi;
        vmax[i] = mx;
        return sqrtf(mx) / bc2s + eps;
    }
    return sqrtf(vi) / bc2s + eps;
}

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
    for (int64_t i = lo; i < hi; ++i) {
        const float gi = g[i];
        const float s = S[i];
        float a = cg * gi + cs * s;
        if (mode != MODE_NONE) S[i] = admit(slot_ptr, i, gi, s, mode, bf16);
        a = a * sign;
        const float pi = p[i] * keep;
        a = a + wd_coupled * pi;
        float mi = m[i];
        mi = small_w1 ? mi + w1 * (a - mi) : a - (a - mi) * (1.0f - w1);
        const float vi = v[i] * beta2 + w2 * (a * a);
        m[i] = mi;
        v[i] = vi;
        const float d = denominator(vmax, i, vi, bc2s, eps, amsgrad);
        p[i] = pi + neg_step * (mi / d);
    }
}

/* torch's CPU lerp(self, end, w), as its vectorized kernel computes it (at::native lerp_vec): one fused
 * multiply-add, fma(w, end - self, self) for w < 0.5, else fma(w - 1, end - self, end). Critical Momenta
 * stores m, so its m must be torch's to the bit: then the "torch" and "cpu" executors store the same
 * momenta, and the kernel's max-abs pass sees exactly the m that is stored. */
static inline __attribute__((always_inline)) float cm_lerp(float self, float end, float w, int small_w) {
    return small_w ? fmaf(w, end - self, self) : fmaf(w - 1.0f, end - self, end);
}

/* Critical Momenta (SPEC 1b), per element: m <- lerp(m, g, 1 - beta1) (torch's lerp formula, the branch
 * on the weight as torch takes it); m~ = m + cs * S from S as it stood; m (not m~) is admitted; v and p
 * take AdamW's update from m~; m stays m. Reads p g m v S slot and writes p m v S slot: the same words
 * per element as adam_loop. READY: the caller advanced m and decayed p already (g is not read). */
static inline __attribute__((always_inline)) void cm_loop(
    int64_t lo, int64_t hi, float *restrict p, const float *restrict g, float *restrict m, float *restrict v,
    float *restrict vmax, float *restrict S, void *restrict slot_ptr, const float cs, const float sign,
    const float keep, const float w1, const float beta2, const float w2, const float eps, const float bc2s,
    const float neg_step, const int mode, const int bf16, const int amsgrad, const int small_w1, const int ready) {
    for (int64_t i = lo; i < hi; ++i) {
        float mi, pi;
        if (ready) {
            mi = m[i];
            pi = p[i];
        } else {
            const float gi = g[i] * sign;
            const float m0 = m[i];
            mi = cm_lerp(m0, gi, w1, small_w1);
            m[i] = mi;
            pi = p[i] * keep;
        }
        const float s = S[i];
        const float mt = mi + cs * s;
        if (mode != MODE_NONE) S[i] = admit(slot_ptr, i, mi, s, mode, bf16);
        const float vi = v[i] * beta2 + w2 * (mt * mt);
        v[i] = vi;
        const float d = denominator(vmax, i, vi, bc2s, eps, amsgrad);
        p[i] = pi + neg_step * (mt / d);
    }
}

#define CM_CASE(MODE, BF16, AMS, SMALL, READY)                                                                    \
    if (mode == MODE && bf16 == BF16 && amsgrad == AMS && small_w1 == SMALL && ready == READY) {                  \
        cm_loop(lo, hi, p, g, m, v, vmax, S, slot, cs, sign, keep, w1, beta2, w2, eps, bc2s, neg_step, MODE, BF16, \
                AMS, SMALL, READY);                                                                                \
        return;                                                                                                    \
    }
#define CM_CASES_READY(MODE, BF16, AMS, SMALL) CM_CASE(MODE, BF16, AMS, SMALL, 0) CM_CASE(MODE, BF16, AMS, SMALL, 1)
#define CM_CASES_AMS(MODE, BF16, AMS) CM_CASES_READY(MODE, BF16, AMS, 1) CM_CASES_READY(MODE, BF16, AMS, 0)
#define CM_CASES(MODE, BF16) CM_CASES_AMS(MODE, BF16, 0) CM_CASES_AMS(MODE, BF16, 1)

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
    if (I[I_MOMENTUM] != MOMENTUM_NONE) {
        const int ready = I[I_MOMENTUM] == MOMENTUM_READY;
        CM_CASES(MODE_NONE, 0)
        CM_CASES(MODE_FILL, 0)
        CM_CASES(MODE_FILL, 1)
        CM_CASES(MODE_EVICT, 0)
        CM_CASES(MODE_EVICT, 1)
        return;
    }
    ADAM_CASES(MODE_NONE, 0)
    ADAM_CASES(MODE_FILL, 0)
    ADAM_CASES(MODE_FILL, 1)
    ADAM_CASES(MODE_EVICT, 0)
    ADAM_CASES(MODE_EVICT, 1)
}

/* Sum of squares of one chunk of an fp32 tensor, accumulated in fp64, and (with_max) its largest |x|.
 * Sixteen independent lanes (summed in a fixed order at the end) let the compiler vectorize without
 * reassociating anything, so the result depends only on the data, never on the thread count or on
 * which thread ran it. The max-abs tells whether g is finite in a narrower buffer dtype (SPEC 1.3);
 * it rides along in the same read of g. */
static inline __attribute__((always_inline)) void sq_max_chunk(const job_t *job, int64_t c, const int with_max) {
    const int64_t u = job->chunk_unit[c], lo = job->chunk_start[c], hi = job->chunk_end[c];
    const float *restrict x = (const float *)job->ptrs[u];
    double acc[16] = {0};
    int64_t i = lo;
    for (; i + 16 <= hi; i += 16)
        for (int j = 0; j < 16; ++j) {
            const double xi = (double)x[i + j];
            acc[j] += xi * xi;
        }
    for (int j = 0; i < hi; ++i, ++j) {
        const double xi = (double)x[i];
        acc[j] += xi * xi;
    }
    for (int w = 8; w >= 1; w /= 2)
        for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
    job->partials[c] = acc[0];
    if (!with_max) return;
    /* a loop of its own over the same 64 KB, now in cache: folded into the loop above, the float
     * compares kept the fp64 sums from vectorizing and the pass took 2.5 times as long */
    float mx[16] = {0};
    for (i = lo; i + 16 <= hi; i += 16)
        for (int j = 0; j < 16; ++j) {
            const float a = fabsf(x[i + j]);
            mx[j] = a > mx[j] ? a : mx[j];
        }
    for (int j = 0; i < hi; ++i, ++j) {
        const float a = fabsf(x[i]);
        mx[j] = a > mx[j] ? a : mx[j];
    }
    for (int w = 8; w >= 1; w /= 2)
        for (int j = 0; j < w; ++j) mx[j] = mx[j + w] > mx[j] ? mx[j + w] : mx[j];
    job->partials[job->n_chunks + c] = (double)mx[0];
}

static void sq_chunk(const job_t *job, int64_t c) { sq_max_chunk(job, c, 0); }

/* Critical Momenta: the largest |m'| of one chunk, m' = lerp(m, sign * g, w1) computed exactly as cm_loop
 * computes it (nothing is written): whether the m about to be stored is finite in bf16 (SPEC 1.3 applied to
 * the stored value, SPEC 1b.4), known before the update pass writes any slot. ptrs: [unit] = (g, m);
 * floats: [unit] = (w1, sign). */
static void cm_max_chunk(const job_t *job, int64_t c) {
    const int64_t u = job->chunk_unit[c], lo = job->chunk_start[c], hi = job->chunk_end[c];
    const float *restrict g = (const float *)job->ptrs[2 * u];
    const float *restrict m = (const float *)job->ptrs[2 * u + 1];
    const float w1 = (float)job->floats[2 * u], sign = (float)job->floats[2 * u + 1];
    const int small_w1 = w1 < 0.5f;
    float mx = 0.0f;
    int finite = 1;
    for (int64_t i = lo; i < hi; ++i) {
        const float gi = g[i] * sign, m0 = m[i];
        const float mi = cm_lerp(m0, gi, w1, small_w1);
        const float a = fabsf(mi);
        mx = a > mx ? a : mx;
        finite &= a <= FLT_MAX; /* false for inf and NaN: an m poisoned by an earlier non-finite g */
    }
    job->partials[c] = finite ? (double)mx : INFINITY;
}
static void sq_max_chunk_fn(const job_t *job, int64_t c) { sq_max_chunk(job, c, 1); }

static void *worker(void *arg) {
    job_t *job = (job_t *)arg;
    for (;;) {
        const int64_t c0 = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED) * job->grab;
        if (c0 >= job->n_chunks) break;
        const int64_t c1 = c0 + job->grab < job->n_chunks ? c0 + job->grab : job->n_chunks;
        for (int64_t c = c0; c < c1; ++c) job->fn(job, c);
    }
    return NULL;
}

/* Splits every unit into chunks of CHUNK elements and runs fn over them on n_threads threads (the
 * caller's included) that take runs of up to max_grab consecutive chunks from an atomic counter: a busy
 * core delays its own runs, not a fixed share of the work. With partials, fills it with one value per
 * chunk; which thread ran a chunk never changes its value. */
static int run_parallel(job_t *job, const int64_t *numels, int n_threads, double **partials, int64_t max_grab) {
    int64_t n_chunks = 0;
    for (int64_t u = 0; u < job->n_units; ++u) n_chunks += (numels[u] + CHUNK - 1) / CHUNK;
    if (n_chunks == 0) return 0;
    int64_t *table = (int64_t *)malloc(sizeof(int64_t) * 3 * (size_t)n_chunks);
    if (!table) return -1;
    job->chunk_unit = table;
    job->chunk_start = table + n_chunks;
    job->chunk_end = table + 2 * n_chunks;
    job->n_chunks = n_chunks;
    job->next = 0;
    if (partials) { /* one value per chunk, two (sum of squares, then max-abs) for the max-abs pass */
        *partials = (double *)malloc(sizeof(double) * (size_t)n_chunks * (job->fn == sq_max_chunk_fn ? 2 : 1));
        if (!*partials) {
            free(table);
            return -1;
        }
        job->partials = *partials;
    }
    int64_t c = 0;
    for (int64_t u = 0; u < job->n_units; ++u)
        for (int64_t s = 0; s < numels[u]; s += CHUNK) {
            table[c] = u;
            table[n_chunks + c] = s;
            table[2 * n_chunks + c] = s + CHUNK < numels[u] ? s + CHUNK : numels[u];
            ++c;
        }
    if (n_threads > 64) n_threads = 64;
    if (n_threads < 1) n_threads = 1;
    /* long runs, but at least four per thread so that the cores still even out */
    job->grab = n_chunks / (4 * (int64_t)n_threads);
    if (job->grab > max_grab) job->grab = max_grab;
    if (job->grab < 1) job->grab = 1;
    const int64_t n_grabs = (n_chunks + job->grab - 1) / job->grab;
    if ((int64_t)n_threads > n_grabs) n_threads = (int)n_grabs;
    pthread_t threads[64];
    int started = 0;
    for (int t = 1; t < n_threads; ++t)
        if (pthread_create(&threads[started], NULL, worker, job) == 0) ++started;
    worker(job);
    for (int t = 0; t < started; ++t) pthread_join(threads[t], NULL);
    free(table);
    return 0;
}

/* Returns 0 on success, -1 when memory for the chunk table cannot be had. */
int memopt_adam_step(int64_t n_units, const int64_t *ptrs, const int64_t *ints, const double *floats,
                     const int64_t *numels, int n_threads) {
    job_t job = {run_chunk, n_units, ptrs, ints, floats, NULL, NULL, NULL, 0, 0, 0, NULL};
    return run_parallel(&job, numels, n_threads, NULL, UPDATE_GRAB);
}

/* out[u] = sum of squares (fp64) of the numels[u] fp32 values at ptrs[u]; chunks summed in order.
 * out_max (may be NULL): out_max[u] = the largest |value| of unit u (a NaN is passed over: its sum of
 * squares is NaN already). Returns 0 on success, -1 when memory for the work tables cannot be had. */
int memopt_sq_norms(int64_t n_units, const int64_t *ptrs, const int64_t *numels, double *out, float *out_max,
                    int n_threads) {
    job_t job = {out_max ? sq_max_chunk_fn : sq_chunk, n_units, ptrs, NULL, NULL, NULL, NULL, NULL, 0, 0, 0, NULL};
    double *partials = NULL;
    for (int64_t u = 0; u < n_units; ++u) {
        out[u] = 0.0;
        if (out_max) out_max[u] = 0.0f;
    }
    if (run_parallel(&job, numels, n_threads, &partials, NORM_GRAB) != 0) return -1;
    if (!partials) return 0;
    const int64_t n_chunks = job.n_chunks;
    int64_t c = 0;
    for (int64_t u = 0; u < n_units; ++u)
        for (int64_t s = 0; s < numels[u]; s += CHUNK, ++c) {
            out[u] += partials[c];
            if (out_max && (float)partials[n_chunks + c] > out_max[u]) out_max[u] = (float)partials[n_chunks + c];
        }
    free(partials);
    return 0;
}

/* out_max[u] = the largest |lerp(m, sign * g, w1)| of unit u, +inf when one is not finite (Critical Momenta's
 * castability test). */
static int cm_max(int64_t n_units, const int64_t *ptrs, const double *floats, const int64_t *numels, float *out_max,
                  int n_threads) {
    job_t job = {cm_max_chunk, n_units, ptrs, NULL, floats, NULL, NULL, NULL, 0, 0, 0, NULL};
    double *partials = NULL;
    for (int64_t u = 0; u < n_units; ++u) out_max[u] = 0.0f;
    if (run_parallel(&job, numels, n_threads, &partials, NORM_GRAB) != 0) return -1;
    if (!partials) return 0;
    int64_t c = 0;
    for (int64_t u = 0; u < n_units; ++u)
        for (int64_t s = 0; s < numels[u]; s += CHUNK, ++c)
            if ((float)partials[c] > out_max[u]) out_max[u] = (float)partials[c];
    free(partials);
    return 0;
}

/* ---- The whole step in one call: norms, decisions, update, bookkeeping --------------------------
 *
 * For units that need no collective (one process, whole tensors), memopt_adam_fused runs what
 * the host-decision mode does around memopt_adam_step, with the same arithmetic as the Python engine
 * (hf_memopt.engine.rule: priorities, coefficients, decide, commit; torch's Adam for the step counter and
 * bias corrections), transcribed here:
 *   1. the fp64 squared norm of every gradient (parallel, as memopt_sq_norms);
 *   2. priorities (own norm, or the sum of the group's norms in unit order), then each unit's
 *      aggregation coefficients and admission decision from its ledger row as it stands;
 *   3. the single-pass update of memopt_adam_step;
 *   4. the ledger commit: clock, the admitted priority and time, count, and the decay of priorities.
 * Columns of the per-unit tables: */
/* (FUSED_PTRS: the tensors, step being an fp32 scalar, then the ledger row: f32[C], i64[C], i64, i64.) */
#define REFRESH_INTERVAL 128
/* Critical Momenta stores m, and a finite k only says that g is finite. The new m = lerp(m, g, w) is a convex
 * combination: |m'| <= max(|m|, |g|) up to a rounding. So a unit whose bound on |m| (M_BOUND, one double per
 * unit kept by the caller between steps; +inf: unknown) and whose |g| (bounded by its L2 norm, known from the
 * norm pass: no max-abs needed) are both below CM_SAFE has an m' that is finite, in bf16 too (g - m cannot
 * overflow, and m' stays far below bf16's overflow at 3.3961e38): it needs no look at m, and its bound grows by
 * CM_GROWTH, far more than a rounding. Other units (the first step of a table, an m poisoned by a non-finite g,
 * values near fp32's range) take the exact pass over g and m. */
#define CM_SAFE 1e38
/* Below this, a float rounds to a finite bf16 (the smallest that rounds to inf is 0x7F7F8000, 3.3961e38). */
#define BF16_SAFE 3.39e38

/* The largest |x| of n floats (NaN passed over), for the rare unit whose norm does not bound it enough. */
static float max_abs(const float *x, int64_t n) {
    float mx = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
        const float a = fabsf(x[i]);
        mx = a > mx ? a : mx;
    }
    return mx;
}
#define CM_GROWTH (1.0 + 1.0 / 1048576.0)

/* slot_ptrs: for unit u, its topc slot addresses start at slot_ptrs[ints[u, J_SLOTS]].
 * ints[u, J_GROUP]: >= 0 puts the unit in that priority group (key="group"), -1 means key="tensor".
 * out[u] = (mode, slot, refresh) for the caller's statistics and the exact refresh of S.
 * Returns 0 on success, -1 when memory for the work tables cannot be had, and 1 + u, before anything is
 * written, when unit u's memory_count is outside [0, topc] (the state's scalars are the user's to edit in
 * place; slots are indexed by the count). */
/* The numeric codes Python, C and Triton share (named in hf_memopt.engine.rule and cpu_kernel), for the
 * loader's check: "NAME=value,..." */
const char *memopt_codes(void) {
    static char codes[320];
    snprintf(codes, sizeof codes,
             "MODE_NONE=%d,MODE_FILL=%d,MODE_EVICT=%d,AGG_MEAN=%d,AGG_SUM=%d,AGG_MID=%d,MOMENTUM_NONE=%d,"
             "MOMENTUM_LOOP=%d,MOMENTUM_READY=%d,CHUNK=%d,REFRESH_INTERVAL=%d",
             MODE_NONE, MODE_FILL, MODE_EVICT, AGG_MEAN, AGG_SUM, AGG_MID, MOMENTUM_NONE, MOMENTUM_LOOP,
             MOMENTUM_READY, CHUNK, REFRESH_INTERVAL);
    return codes;
}

int memopt_adam_fused(int64_t n_units, const int64_t *q, const int64_t *ints, const double *floats,
                      const int64_t *numels, const int64_t *slot_ptrs, int64_t *out, int n_threads) {
    if (n_units == 0) return 0;
    for (int64_t u = 0; u < n_units; ++u) {
        const int64_t n = *(const int64_t *)q[u * N_Q + Q_COUNT];
        if (n < 0 || n > ints[u * N_J + J_TOPC]) return (int)(1 + u);
    }
    int64_t *gptr = (int64_t *)calloc((size_t)n_units, sizeof(int64_t));
    double *sq = (double *)malloc(sizeof(double) * (size_t)n_units);
    double *k = (double *)malloc(sizeof(double) * (size_t)n_units);
    double *gsum = (double *)calloc((size_t)n_units, sizeof(double));
    int64_t *ptrs = (int64_t *)calloc((size_t)n_units * N_PTRS, sizeof(int64_t));
    int64_t *iv = (int64_t *)calloc((size_t)n_units * N_INTS, sizeof(int64_t));
    double *fv = (double *)calloc((size_t)n_units * N_FLOATS, sizeof(double));
    float *gmax = (float *)calloc((size_t)n_units, sizeof(float));
    int64_t *cm_ptrs = (int64_t *)calloc((size_t)n_units * 2, sizeof(int64_t));
    double *cm_floats = (double *)calloc((size_t)n_units * 2, sizeof(double));
    int64_t *cm_numels = (int64_t *)calloc((size_t)n_units, sizeof(int64_t));
    int rc = -1;
    if (!gptr || !sq || !k || !gsum || !ptrs || !iv || !fv || !gmax || !cm_ptrs || !cm_floats || !cm_numels) goto done;

    int any_cm_exact = 0;
    for (int64_t u = 0; u < n_units; ++u) gptr[u] = q[u * N_Q + Q_GRAD];
    if (memopt_sq_norms(n_units, gptr, numels, sq, NULL, n_threads) != 0) goto done;
    for (int64_t u = 0; u < n_units; ++u) {
        const int64_t *J = ints + u * N_J;
        if (!J[J_MOMENTUM]) {
            /* g is stored: in bf16 slots a finite g can overflow, but only if its norm (>= max |g|) reaches
             * BF16_SAFE; below it, as always in practice, no max-abs pass is needed (folded into the norm
             * pass it cost a fifth of the step), above it this unit's g is scanned */
            if (J[J_SLOT_BF16] && isfinite(sq[u]) && !(sqrt(sq[u]) < BF16_SAFE))
                gmax[u] = max_abs((const float *)gptr[u], numels[u]);
            continue;
        }
        double *bound = (double *)q[u * N_Q + Q_M_BOUND];
        const double gnorm = sqrt(sq[u]); /* >= max |g|, and known already: no max-abs pass */
        const double b = *bound > gnorm ? *bound : gnorm;
        if (isfinite(sq[u]) && b < CM_SAFE) {
            *bound = b * CM_GROWTH; /* the new m is below it, finite and castable: no pass over m */
            gmax[u] = 0.0f;
        } else { /* the exact max-abs of the new m, below */
            any_cm_exact = 1;
            cm_ptrs[2 * u] = q[u * N_Q + Q_GRAD];
            cm_ptrs[2 * u + 1] = q[u * N_Q + Q_EXP_AVG];
            cm_floats[2 * u] = (double)(float)(1.0 - floats[u * N_H + H_BETA1]);
            cm_floats[2 * u + 1] = J[J_MAXIMIZE] ? -1.0 : 1.0;
            cm_numels[u] = numels[u];
        }
    }
    if (any_cm_exact) {
        float *cmax = (float *)calloc((size_t)n_units, sizeof(float));
        if (!cmax) goto done;
        const int cm_rc = cm_max(n_units, cm_ptrs, cm_floats, cm_numels, cmax, n_threads);
        for (int64_t u = 0; u < n_units; ++u)
            if (cm_numels[u]) {
                gmax[u] = cmax[u]; /* +inf when the new m is not finite: then it is never stored */
                *(double *)q[u * N_Q + Q_M_BOUND] = (double)cmax[u];
            }
        free(cmax);
        if (cm_rc != 0) goto done;
    }

    /* priorities: np.add.at over units in order, starting from 0.0 */
    for (int64_t u = 0; u < n_units; ++u) {
        const int64_t grp = ints[u * N_J + J_GROUP];
        if (grp >= 0) gsum[grp] += sqrt(sq[u]);
    }
    for (int64_t u = 0; u < n_units; ++u) {
        const int64_t grp = ints[u * N_J + J_GROUP];
        k[u] = grp >= 0 ? gsum[grp] : sqrt(sq[u]);
    }

    for (int64_t u = 0; u < n_units; ++u) {
        const int64_t *Q = q + u * N_Q, *J = ints + u * N_J;
        const double *H = floats + u * N_H;
        const int64_t topc = J[J_TOPC], n = *(const int64_t *)Q[Q_COUNT];
        const float *pri = (const float *)Q[Q_PRI];
        const double kappa = H[H_KAPPA];
        double cg, cs;
        if (n == 0) {
            cg = 1.0;
            cs = 0.0;
        } else if (J[J_AGG] == AGG_MEAN) {
            cg = 1.0 / (1.0 + kappa * (double)n);
            cs = kappa * cg;
        } else if (J[J_AGG] == AGG_SUM) {
            cg = 1.0;
            cs = kappa / (double)n;
        } else {
            cg = 1.0 / (1.0 + kappa);
            cs = kappa / ((double)n * (1.0 + kappa));
        }
        const float k32 = (float)k[u]; /* reduced in fp64, rounded to fp32 before the finiteness test */
        /* a g (Critical Momenta: an m) that is not finite once cast to the slot dtype is never stored (SPEC 1.3) */
        const int castable = isfinite(gmax[u]) && (!J[J_SLOT_BF16] || (f32_to_bf16(gmax[u]) & 0x7FFFu) != 0x7F80u);
        int64_t mode = MODE_NONE, slot = -1;
        if (isfinite(k32) && castable) {
            if (n < topc) {
                mode = MODE_FILL;
                slot = n;
            } else {
                int64_t j = 0; /* first index on ties: the lowest slot */
                for (int64_t i = 1; i < topc; ++i)
                    if (pri[i] < pri[j]) j = i;
                if (k32 > pri[j]) { /* strictly greater than the true minimum */
                    mode = MODE_EVICT;
                    slot = j;
                }
            }
        }
        const int64_t count_after = n + (mode == MODE_FILL);
        const int64_t clock_after = *(const int64_t *)Q[Q_CLOCK] + 1;
        out[u * 3 + 0] = mode;
        out[u * 3 + 1] = slot;
        out[u * 3 + 2] = count_after > 0 && clock_after % REFRESH_INTERVAL == 0;

        /* torch's Adam: step_t += 1, then Python-float bias corrections from step_t.item() */
        float *step_t = (float *)Q[Q_STEP];
        *step_t += 1.0f;
        const double step = (double)*step_t;
        const double beta1 = H[H_BETA1], beta2 = H[H_BETA2], lr = H[H_LR];
        const double bc1 = 1.0 - pow(beta1, step), bc2 = 1.0 - pow(beta2, step);

        int64_t *P = ptrs + u * N_PTRS, *I = iv + u * N_INTS;
        double *F = fv + u * N_FLOATS;
        P[P_PARAM] = Q[Q_PARAM];
        P[P_GRAD] = Q[Q_GRAD];
        P[P_EXP_AVG] = Q[Q_EXP_AVG];
        P[P_EXP_AVG_SQ] = Q[Q_EXP_AVG_SQ];
        P[P_MAX_EXP_AVG_SQ] = Q[Q_MAX_EXP_AVG_SQ];
        P[P_SUM] = Q[Q_SUM];
        P[P_SLOT] = mode != MODE_NONE ? slot_ptrs[J[J_SLOTS] + slot] : 0;
        I[I_MODE] = mode;
        I[I_SLOT_BF16] = J[J_SLOT_BF16];
        I[I_AMSGRAD] = J[J_AMSGRAD];
        I[I_MAXIMIZE] = J[J_MAXIMIZE];
        I[I_DECOUPLED] = J[J_DECOUPLED];
        I[I_MOMENTUM] = J[J_MOMENTUM] ? MOMENTUM_LOOP : MOMENTUM_NONE;
        F[F_COEF_G] = cg;
        F[F_COEF_S] = cs;
        F[F_LR] = lr;
        F[F_WD] = H[H_WD];
        F[F_BETA1] = beta1;
        F[F_BETA2] = beta2;
        F[F_EPS] = H[H_EPS];
        F[F_STEP_SIZE] = lr / bc1;
        F[F_BC2_SQRT] = pow(bc2, 0.5);
    }

    if (memopt_adam_step(n_units, ptrs, iv, fv, numels, n_threads) != 0) goto done;

    for (int64_t u = 0; u < n_units; ++u) {
        const int64_t *Q = q + u * N_Q;
        const int64_t mode = out[u * 3], slot = out[u * 3 + 1];
        float *pri = (float *)Q[Q_PRI];
        int64_t *at = (int64_t *)Q[Q_STORED_AT], *count = (int64_t *)Q[Q_COUNT], *clock = (int64_t *)Q[Q_CLOCK];
        *clock += 1;
        if (mode != MODE_NONE) {
            pri[slot] = (float)k[u];
            at[slot] = *clock;
            if (mode == MODE_FILL) *count += 1;
        }
        const float decay = (float)floats[u * N_H + H_DECAY];
        for (int64_t i = 0; i < *count; ++i) pri[i] = pri[i] * decay;
    }
    rc = 0;
done:
    free(gptr);
    free(sq);
    free(k);
    free(gsum);
    free(ptrs);
    free(iv);
    free(fv);
    free(gmax);
    free(cm_ptrs);
    free(cm_floats);
    free(cm_numels);
    return rc;
}
