/*
 * gradsparse/_kernels.c -- optional compiled kernels for exact top-k by magnitude and fused
 * error-feedback steps on contiguous float32 CPU arrays.
 *
 * Loaded with ctypes by gradsparse/kernels/library.py (no Python C API is used; PyInit is a stub so
 * that setuptools can build this file as an ordinary extension). All entry points are prefixed gs_.
 *
 * Ordering key. For a float32 x with bit pattern b, key(x) = min(b & 0x7fffffff, NANKEY) with
 * NANKEY = 0x7f800001. For non-negative IEEE floats the unsigned bit pattern orders like the
 * value, so key orders entries by |x|, puts +0 and -0 together, +inf (0x7f800000) above every
 * finite value, and every NaN (whatever its payload or sign) at one key above +inf. Exact top-k
 * = the k entries of largest key; among equal keys the lower index wins.
 *
 * Algorithm (sample, filter, select):
 *  1. draw m positions with a fixed-seed splitmix64 generator, read their keys, and take the
 *     sample's r-th largest key as threshold thr, r = mu + 4 sqrt(mu) + 2, mu = k m / n, so that
 *     with high probability at least k entries have key >= thr and not many more;
 *  2. one pass over x (split among threads in contiguous chunks) collects, per chunk in index
 *     order, every entry with key > thr (index and raw bits) and the first k entries with
 *     key == thr (count of all of them kept);
 *  3. if #(> thr) >= k the k-th largest key T is found among the collected keys by a two-level
 *     radix select (histograms of the high 15 and low 16 key bits), and each thread emits its
 *     chunk's entries with key > T plus its share of the lowest-index entries with key == T
 *     (shares are assigned in chunk order, so ties go to the lowest indices overall); if
 *     #(> thr) < k <= #(>= thr), T = thr and the output merges the > thr entries with the
 *     first k - #(> thr) entries equal to thr; otherwise (rare) the sample rank is raised and
 *     step 2 is repeated (rank >= m means thr = 0, which always succeeds).
 * Segments shorter than SMALL_N skip the sampling: their keys are copied and quickselected.
 * The sample is stratified (one position drawn in each of m equal strata).
 * The result does not depend on the sample: only the running time does.
 *
 * Many segments (gs_topk_segments): each thread takes whole segments and selects each in one
 * pass with a threshold that rises as the pass goes (see the segments section); only a segment
 * much larger than the others is split among the threads with the algorithm above.
 *
 * The EF variants fuse a = fma(alpha, g, e) into the pass (e is overwritten with a), which
 * matches torch's e.add_(g, alpha=alpha) on CPU (a vectorised fmadd); gs_set_fma(0) switches to
 * a separate multiply and add for builds of torch that do not contract. With g = NULL they skip
 * the update (x already holds the accumulated vector) and only select and zero.
 *
 * The hot loops are compiled twice (this file includes itself at the bottom): for the baseline
 * ISA and with AVX2+FMA (intrinsics); the variant is chosen at run time from the CPU's features.
 * Threads: plain pthreads, one contiguous chunk per thread (nthreads comes from the caller,
 * torch.get_num_threads()); inputs shorter than PAR_MIN use the calling thread only.
 */
#ifndef GS_HOT_SUFFIX
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <pthread.h>
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif

#define EXPORT __attribute__((visibility("default")))
#define NANKEY ((int32_t)0x7f800001)
#define MAXT 64
#define BLK 32
#define SMALL_N 32768      /* below this a segment is selected directly, without sampling */
#define SAMPLE_M 32768     /* sample size for large inputs */
#define PAR_MIN 262144     /* below this a single thread does the pass */

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define GS_X86 1
#else
#define GS_X86 0
#endif

/* A stub so that the file also loads as a CPython extension module name; never called by us. */
void *PyInit__kernels_c(void) { return 0; }

static int g_use_fma = 1;
EXPORT void gs_set_fma(int on) { g_use_fma = on ? 1 : 0; }
EXPORT int gs_get_fma(void) { return g_use_fma; }
EXPORT int gs_abi_version(void) { return 3; }   /* 3: gs_topk_ef / gs_ht_pass take g = NULL */
/* Testing hook: scales the sample rank that sets the first threshold (0 forces the retry path). */
static double g_rank_scale = 1.0;
EXPORT void gs_set_rank_scale(double v) { g_rank_scale = v; }

static inline int32_t canon(int32_t b) {
    b &= 0x7fffffff;
    return b > NANKEY ? NANKEY : b;
}
static inline int32_t fbits(float f) { int32_t b; memcpy(&b, &f, 4); return b; }

/* ------------------------------------------------------------------ workspace */

typedef struct {
    int64_t *gidx; int32_t *gbits; int64_t ng, gcap;   /* entries with key > thr */
    int64_t *eidx; int64_t ne_stored, ne_count, ecap;   /* entries with key == thr (first ecap) */
    int32_t *tmp; int64_t tcap;                         /* quickselect scratch */
    int64_t *tmp64; int64_t t64cap;                     /* merge scratch */
    int32_t *samp; int64_t scap;                        /* sample keys */
    uint32_t *hist; int64_t hcap;                       /* radix-select histogram */
    int64_t sel_gt, sel_eq, sel_take_eq, sel_out;       /* per-part emit plan */
    int64_t nallocs, bytes;
    int oom;
    char pad[64];
} slot_t;

typedef struct {
    slot_t s[MAXT];
    int last_nparts;
} ws_t;

static int cpu_avx2(void);
EXPORT void *gs_ws_new(void) {
    (void)cpu_avx2();   /* resolve the CPU features here, before any worker thread runs */
    return calloc(1, sizeof(ws_t));
}

EXPORT void gs_ws_free(void *p) {
    ws_t *ws = (ws_t *)p;
    if (!ws) return;
    for (int t = 0; t < MAXT; t++) {
        slot_t *s = &ws->s[t];
        free(s->gidx); free(s->gbits); free(s->eidx); free(s->tmp); free(s->tmp64); free(s->samp); free(s->hist);
    }
    free(ws);
}

/* out[0] = number of (re)allocations so far, out[1] = bytes held */
EXPORT void gs_ws_stats(void *p, int64_t *out) {
    ws_t *ws = (ws_t *)p;
    out[0] = 0; out[1] = 0;
    for (int t = 0; t < MAXT; t++) { out[0] += ws->s[t].nallocs; out[1] += ws->s[t].bytes; }
}

static int grow(slot_t *s, void **p, int64_t *cap, int64_t need, size_t el) {
    if (need <= *cap) return 1;
    int64_t nc = *cap * 2;
    if (nc < need) nc = need;
    if (nc < 1024) nc = 1024;
    void *q = realloc(*p, (size_t)nc * el);
    if (!q) { s->oom = 1; return 0; }
    *p = q;
    s->bytes += (nc - *cap) * (int64_t)el;
    s->nallocs += 1;
    *cap = nc;
    return 1;
}

static int grow_g(slot_t *s, int64_t need) {
    if (need <= s->gcap) return 1;
    int64_t c1 = s->gcap, c2 = s->gcap;
    if (!grow(s, (void **)&s->gidx, &c1, need, sizeof(int64_t))) return 0;
    if (!grow(s, (void **)&s->gbits, &c2, need, sizeof(int32_t))) return 0;
    s->gcap = c1 < c2 ? c1 : c2;
    return 1;
}

static inline void push_e(slot_t *s, int64_t i, int64_t ecap_limit) {
    if (s->ne_stored < ecap_limit) {
        if (s->ne_stored == s->ecap && !grow(s, (void **)&s->eidx, &s->ecap, s->ne_stored + 1, sizeof(int64_t))) {
            s->ne_count++;
            return;
        }
        s->eidx[s->ne_stored++] = i;
    }
    s->ne_count++;
}

/* ------------------------------------------------------------------ threads */

typedef void (*task_fn)(void *arg, int t);
typedef struct { task_fn fn; void *arg; int t; } thr_arg;
static void *thr_main(void *p) { thr_arg *a = (thr_arg *)p; a->fn(a->arg, a->t); return NULL; }

static void run_par(int nt, task_fn fn, void *arg) {
    if (nt <= 1) { fn(arg, 0); return; }
    pthread_t th[MAXT]; thr_arg ta[MAXT]; int ok[MAXT];
    for (int t = 1; t < nt; t++) {
        ta[t].fn = fn; ta[t].arg = arg; ta[t].t = t;
        ok[t] = pthread_create(&th[t], NULL, thr_main, &ta[t]) == 0;
    }
    fn(arg, 0);
    for (int t = 1; t < nt; t++) {
        if (ok[t]) pthread_join(th[t], NULL);
        else fn(arg, t);
    }
}

/* ------------------------------------------------------------------ the pass */

enum { MODE_FILTER = 0, MODE_EF = 1, MODE_HT = 2 };

typedef struct {
    ws_t *ws; int s0;            /* slots s0 .. s0+nparts-1 */
    float *x; const float *g; float alpha;
    int mode; int64_t n; int nparts;
    int32_t thr; float lam; int64_t ecap_limit;
    int avx2;
} pass_t;

static inline int64_t part_lo(int64_t n, int t, int np) {
    if (t == 0) return 0;
    if (t == np) return n;
    int64_t lo = (int64_t)((__int128)n * t / np);
    return lo & ~(int64_t)15;   /* 64-byte aligned chunk starts */
}

/* Room for BLK more candidates, so that a block can be scanned without capacity checks. */
static inline int reserve_g(slot_t *s) {
    return s->gcap - s->ng >= BLK || grow_g(s, s->ng + BLK);
}

/* The hot loops are compiled twice from the bottom of this file: once for the baseline ISA
 * (suffix _gen) and once with AVX2+FMA enabled (suffix _avx2); run_pass picks by CPU features. */
#define GS_DECLARE(SUF)                                                                         \
    static void pass_filter##SUF(slot_t *, const int32_t *, int64_t, int64_t, int32_t, int64_t); \
    static void pass_ef_fma##SUF(slot_t *, float *, const float *, float, int64_t, int64_t, int32_t, int64_t); \
    static void pass_ef_mul##SUF(slot_t *, float *, const float *, float, int64_t, int64_t, int32_t, int64_t); \
    static void pass_ht_fma##SUF(slot_t *, float *, const float *, float, int64_t, int64_t, float); \
    static void pass_ht_mul##SUF(slot_t *, float *, const float *, float, int64_t, int64_t, float); \
    static void pass_ht_only##SUF(slot_t *, float *, int64_t, int64_t, float);
GS_DECLARE(_gen)
#if GS_X86
GS_DECLARE(_avx2)
#endif
#define GS_DECLARE_SEG(SUF) \
    static int seg_stream##SUF(ws_t *, int, const int32_t *, int64_t, int64_t, int64_t, int32_t); \
    static void seg_topsmall##SUF(const int32_t *, int64_t, int64_t, int64_t *, int64_t);

static int cpu_avx2(void) {
#if GS_X86
    static int r = -1;
    if (r < 0) {
        __builtin_cpu_init();
        r = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
    return r;
#else
    return 0;
#endif
}
static int g_force_generic = 0;
EXPORT void gs_force_generic(int on) { g_force_generic = on ? 1 : 0; }
static int uses_avx2(void) { return !g_force_generic && cpu_avx2(); }

#if GS_X86
#define DISPATCH(P, name, ...) do { if ((P)->avx2) name##_avx2(__VA_ARGS__); else name##_gen(__VA_ARGS__); } while (0)
#else
#define DISPATCH(P, name, ...) name##_gen(__VA_ARGS__)
#endif

static void pass_task(void *arg, int t) {
    pass_t *P = (pass_t *)arg;
    slot_t *s = &P->ws->s[P->s0 + t];
    int64_t lo = part_lo(P->n, t, P->nparts), hi = part_lo(P->n, t + 1, P->nparts);
    s->ng = 0; s->ne_stored = 0; s->ne_count = 0;
    switch (P->mode) {
    case MODE_FILTER:
        DISPATCH(P, pass_filter, s, (const int32_t *)P->x, lo, hi, P->thr, P->ecap_limit);
        break;
    case MODE_EF:
        if (g_use_fma) DISPATCH(P, pass_ef_fma, s, P->x, P->g, P->alpha, lo, hi, P->thr, P->ecap_limit);
        else DISPATCH(P, pass_ef_mul, s, P->x, P->g, P->alpha, lo, hi, P->thr, P->ecap_limit);
        break;
    case MODE_HT:
        if (!P->g) DISPATCH(P, pass_ht_only, s, P->x, lo, hi, P->lam);
        else if (g_use_fma) DISPATCH(P, pass_ht_fma, s, P->x, P->g, P->alpha, lo, hi, P->lam);
        else DISPATCH(P, pass_ht_mul, s, P->x, P->g, P->alpha, lo, hi, P->lam);
        break;
    }
}

static int run_pass(pass_t *P) {
    P->avx2 = uses_avx2();
    run_par(P->nparts, pass_task, P);
    int oom = 0;
    for (int t = 0; t < P->nparts; t++) oom |= P->ws->s[P->s0 + t].oom;
    return oom ? -1 : 0;
}

/* ------------------------------------------------------------------ selection */

static uint64_t splitmix(uint64_t *st) {
    uint64_t z = (*st += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* k-th largest (1 <= k <= n) of a[0..n); *cnt_gt = number of entries > result. a is clobbered
 * and sc (room for n entries) is scratch. Quickselect with branch-free partitions that do not
 * read what they just wrote: entries > pivot are compacted to the front of the current array
 * (writes trail reads), entries < pivot are appended to the other one, and the two swap roles
 * when the answer lies below the pivot. From KTH_SAMPLE_MIN entries on, the pivot is taken from
 * a sorted sample of KTH_S entries at the target's expected rank, moved by about one standard
 * deviation towards the nearer end, so that the part kept (the one holding the target, most
 * of the time the smaller one) shrinks fast; below, the pivot is a random entry. */
#define KTH_SAMPLE_MIN 256
#define KTH_S 32
static int32_t kth_largest(int32_t *a, int32_t *sc, int64_t n, int64_t k, int64_t *cnt_gt) {
    uint64_t st = 0x5eed5eedULL ^ (uint64_t)n;
    int64_t above = 0;
    for (;;) {
        int32_t p;
        if (n >= KTH_SAMPLE_MIN) {
            int32_t smp[KTH_S];   /* sorted descending */
            for (int j = 0; j < KTH_S; j++) {
                int32_t v = a[(int64_t)(((unsigned __int128)splitmix(&st) * (uint64_t)n) >> 64)];
                int q = j;
                while (q > 0 && smp[q - 1] < v) { smp[q] = smp[q - 1]; q--; }
                smp[q] = v;
            }
            double q = (double)k * KTH_S / (double)n;   /* the target's expected place in smp */
            double mg = sqrt(q * (1.0 - q / KTH_S)) + 1.0;
            int64_t j = 2 * k <= n ? (int64_t)(q + mg)      /* pivot below the target: keep the > part */
                                   : (int64_t)(q - mg) - 1; /* pivot above it: keep the < part */
            j = j < 0 ? 0 : (j > KTH_S - 1 ? KTH_S - 1 : j);
            p = smp[j];
        } else {
            p = a[(int64_t)(((unsigned __int128)splitmix(&st) * (uint64_t)n) >> 64)];
        }
        int64_t ng = 0, nl = 0;
        for (int64_t i = 0; i < n; i++) {
            int32_t v = a[i];
            a[ng] = v; ng += v > p;
            sc[nl] = v; nl += v < p;
        }
        int64_t neq = n - ng - nl;
        if (k <= ng) { n = ng; continue; }
        if (k <= ng + neq) { *cnt_gt = above + ng; return p; }
        above += ng + neq; k -= ng + neq; n = nl;
        int32_t *t = a; a = sc; sc = t;
    }
}

typedef struct {
    int64_t *out_idx; float *out_val; float *zero_x; int64_t pos; int64_t base;
} emit_t;

static inline void emit(emit_t *E, const float *x, int64_t i) {
    E->out_idx[E->pos] = E->base + i;
    if (E->out_val) E->out_val[E->pos] = x[i];
    if (E->zero_x) E->zero_x[i] = 0.0f;
    E->pos++;
}

/* Direct exact selection for a small range: two passes, scratch = n keys. */
static int select_small(slot_t *s, const float *x, int64_t n, int64_t k, emit_t *E) {
    const int32_t *b = (const int32_t *)x;
    if (!grow(s, (void **)&s->tmp, &s->tcap, 2 * n, sizeof(int32_t))) return -1;
    for (int64_t i = 0; i < n; i++) s->tmp[i] = canon(b[i]);
    int64_t cgt;
    int32_t T = kth_largest(s->tmp, s->tmp + n, n, k, &cgt);
    int64_t need = k - cgt;
    if (!E->out_val && !E->zero_x && 8 * k >= n) {   /* dense, indices only: branch-free */
        int64_t *oi = E->out_idx + E->pos, base = E->base, p = 0;
        for (int64_t i = 0; i < n && p < k; i++) {   /* p < k: the store stays within the k slots */
            int32_t key = canon(b[i]);
            int64_t eq = key == T;
            int64_t take = (key > T) | (eq & (need > 0));
            oi[p] = base + i;
            p += take;
            need -= eq & take;
        }
        E->pos += p;
        return 0;
    }
    for (int64_t i = 0; i < n; i++) {
        int32_t key = canon(b[i]);
        if (key > T) emit(E, x, i);
        else if (key == T && need > 0) { emit(E, x, i); need--; }
    }
    return 0;
}

/* After a pass with threshold thr: 1 = done, 0 = too few candidates, -1 = out of memory. */
#define RADIX_BINS 65536

/* k-th largest key among the candidates (key > thr) of parts s0..s0+np-1, by a two-level radix
 * select on the 31-bit keys (high 15 bits, then low 16 bits); *cnt_gt = #candidates above it. */
static int radix_kth(ws_t *ws, int s0, int np, int64_t k, int32_t *T, int64_t *cnt_gt) {
    slot_t *s = &ws->s[s0];
    if (!grow(s, (void **)&s->hist, &s->hcap, RADIX_BINS, sizeof(uint32_t))) return -1;
    uint32_t *h = s->hist;
    memset(h, 0, RADIX_BINS * sizeof(uint32_t));
    for (int t = 0; t < np; t++) {
        slot_t *q = &ws->s[s0 + t];
        for (int64_t j = 0; j < q->ng; j++) h[(uint32_t)canon(q->gbits[j]) >> 16]++;
    }
    int64_t acc = 0;
    int32_t hb = RADIX_BINS - 1;
    for (; hb > 0; hb--) {
        if (acc + h[hb] >= k) break;
        acc += h[hb];
    }
    memset(h, 0, RADIX_BINS * sizeof(uint32_t));
    for (int t = 0; t < np; t++) {
        slot_t *q = &ws->s[s0 + t];
        for (int64_t j = 0; j < q->ng; j++) {
            uint32_t key = (uint32_t)canon(q->gbits[j]);
            h[key & 0xffff] += (key >> 16) == (uint32_t)hb;
        }
    }
    int32_t lb = 0xffff;
    for (; lb > 0; lb--) {
        if (acc + h[lb] >= k) break;
        acc += h[lb];
    }
    *T = (hb << 16) | lb;
    *cnt_gt = acc;
    return 0;
}

typedef struct { ws_t *ws; int s0; int32_t T; emit_t *E; float *zero_x; } emit_plan_t;

/* Emit part t's share: its candidates with key > T, and its first sel_take_eq with key == T. */
static void emit_task(void *arg, int t) {
    emit_plan_t *A = (emit_plan_t *)arg;
    slot_t *q = &A->ws->s[A->s0 + t];
    int64_t *oi = A->E->out_idx + A->E->pos + q->sel_out;
    float *ov = A->E->out_val ? A->E->out_val + A->E->pos + q->sel_out : NULL;
    float *zx = A->zero_x;
    int64_t base = A->E->base, take = q->sel_take_eq, p = 0;
    int32_t T = A->T;
    for (int64_t j = 0; j < q->ng; j++) {
        int32_t bb = q->gbits[j];
        int32_t key = canon(bb);
        if (key > T || (key == T && take > 0)) {
            if (key == T) take--;
            int64_t i = q->gidx[j];
            oi[p] = base + i;
            if (ov) memcpy(&ov[p], &bb, 4);
            if (zx) zx[i] = 0.0f;
            p++;
        }
    }
}

/* After a pass with threshold thr: 1 = done, 0 = too few candidates, -1 = out of memory. */
static int select_candidates(ws_t *ws, int s0, int np, const float *x, int64_t k, emit_t *E) {
    int64_t tg = 0, te = 0;
    for (int t = 0; t < np; t++) { tg += ws->s[s0 + t].ng; te += ws->s[s0 + t].ne_count; }
    slot_t *s = &ws->s[s0];
    if (tg >= k) {
        int32_t T;
        int64_t cgt;
        if (radix_kth(ws, s0, np, k, &T, &cgt)) return -1;
        int64_t need = k - cgt, out = 0;
        for (int t = 0; t < np; t++) {
            slot_t *q = &ws->s[s0 + t];
            int64_t ngt = 0, neq = 0;
            for (int64_t j = 0; j < q->ng; j++) {
                int32_t key = canon(q->gbits[j]);
                ngt += key > T;
                neq += key == T;
            }
            q->sel_take_eq = neq < need ? neq : need;
            need -= q->sel_take_eq;
            q->sel_out = out;
            out += ngt + q->sel_take_eq;
        }
        emit_plan_t A = {ws, s0, T, E, E->zero_x};
        if (tg >= 65536) run_par(np, emit_task, &A);
        else for (int t = 0; t < np; t++) emit_task(&A, t);
        E->pos += out;
        return 1;
    }
    if (tg + te < k) return 0;
    /* T = thr: all > thr, plus the first need entries equal to thr (in index order). */
    int64_t need = k - tg;
    if (!grow(s, (void **)&s->tmp64, &s->t64cap, need + 1, sizeof(int64_t))) return -1;
    int64_t p = 0;
    for (int t = 0; t < np && p < need; t++) {
        slot_t *q = &ws->s[s0 + t];
        for (int64_t j = 0; j < q->ne_stored && p < need; j++) s->tmp64[p++] = q->eidx[j];
    }
    int64_t ie = 0;
    for (int t = 0; t < np; t++) {
        slot_t *q = &ws->s[s0 + t];
        for (int64_t j = 0; j < q->ng; j++) {
            int64_t gi = q->gidx[j];
            while (ie < need && s->tmp64[ie] < gi) emit(E, x, s->tmp64[ie++]);
            emit(E, x, gi);
        }
    }
    while (ie < need) emit(E, x, s->tmp64[ie++]);
    return 1;
}

#ifdef GS_PROFILE
#include <stdio.h>
#include <time.h>
#define PROF_T(v) struct timespec v; clock_gettime(CLOCK_MONOTONIC, &v)
#define MS(a, b) ((b.tv_sec - a.tv_sec) * 1e3 + (b.tv_nsec - a.tv_nsec) * 1e-6)
#define PROF_PRINT(n, k, t0, t1, t2, t3, t4) do { int64_t c_ = 0; for (int t = 0; t < np; t++) c_ += ws->s[s0 + t].ng; \
    fprintf(stderr, "n=%ld k=%ld cand=%ld sample %.2f thr %.2f pass %.2f select %.2f ms\n", (long)n, (long)k, (long)c_, MS(t0, t1), MS(t1, t2), MS(t2, t3), MS(t3, t4)); } while (0)
#else
#define PROF_T(v)
#define PROF_PRINT(...)
#endif

/* Exact top-k of x[0..n) (mode FILTER) or of a = fma(alpha, g, x) written into x (mode EF). */
static int topk_range(ws_t *ws, int s0, int np, float *x, const float *g, float alpha, int mode,
                      int64_t n, int64_t k, emit_t *E) {
    if (n < PAR_MIN) np = 1;
    pass_t P;
    memset(&P, 0, sizeof P);
    P.ws = ws; P.s0 = s0; P.x = x; P.g = g; P.alpha = alpha; P.n = n; P.nparts = np;
    P.ecap_limit = k;
    if (mode == MODE_EF && (k <= 0 || k >= n || n <= SMALL_N)) {
        P.mode = MODE_EF; P.thr = INT32_MAX; P.ecap_limit = 0;
        if (run_pass(&P)) return -1;
        mode = MODE_FILTER;
    }
    if (k <= 0) return 0;
    if (k >= n) {
        for (int64_t i = 0; i < n; i++) emit(E, x, i);
        return 0;
    }
    if (n <= SMALL_N) return select_small(&ws->s[s0], x, n, k, E);

    PROF_T(t0);
    slot_t *s = &ws->s[s0];
    int64_t m = n / 8 < SAMPLE_M ? n / 8 : SAMPLE_M;
    if (!grow(s, (void **)&s->samp, &s->scap, 3 * m + 2, sizeof(int32_t))) return -1;
    int32_t *samp = s->samp, *work = s->samp + m;
    uint64_t st = 0x9a3dcb1e5f0aULL;
    int64_t stride = n / m;   /* stratified: one position drawn in each of m equal strata */
    int64_t half = (m + 1) / 2;
    int64_t *pos = (int64_t *)(work + (((uintptr_t)work & 7) ? 1 : 0));   /* room for half int64 */
    for (int64_t j0 = 0; j0 < m; j0 += half) {
        int64_t j1 = j0 + half < m ? j0 + half : m;
        for (int64_t j = j0; j < j1; j++)
            pos[j - j0] = j * stride + (int64_t)(((unsigned __int128)splitmix(&st) * (uint64_t)stride) >> 64);
        for (int64_t j = j0; j < j1; j++) {
            if (j + 16 < j1) {
                __builtin_prefetch(x + pos[j + 16 - j0]);
                if (mode == MODE_EF) __builtin_prefetch(g + pos[j + 16 - j0]);
            }
            int64_t p = pos[j - j0];
            float v = x[p];
            if (mode == MODE_EF) {
                if (g_use_fma) v = fmaf(alpha, g[p], v);
                else { volatile float pr = alpha * g[p]; v = v + pr; }
            }
            samp[j] = canon(fbits(v));
        }
    }
    PROF_T(t1);
    double mu = (double)k * (double)m / (double)n;
    int64_t r = (int64_t)(g_rank_scale * (mu + 4.0 * sqrt(mu) + 2.0));
    for (;;) {
        int32_t thr = 0;
        if (r < m) {
            memcpy(work, samp, (size_t)m * sizeof(int32_t));
            int64_t cg;
            thr = kth_largest(work, work + m, m, r + 1, &cg);
        }
        PROF_T(t2);
        P.mode = mode; P.thr = thr; P.ecap_limit = k;
        if (run_pass(&P)) return -1;
        PROF_T(t3);
        mode = MODE_FILTER;
        int rc = select_candidates(ws, s0, np, x, k, E);
        PROF_T(t4);
        PROF_PRINT(n, k, t0, t1, t2, t3, t4);
        if (rc < 0) return -1;
        if (rc == 1) return 0;
        r = 4 * r + 16;
    }
}


static int clamp_threads(int nt) { return nt < 1 ? 1 : (nt > MAXT ? MAXT : nt); }

/* Exact top-k indices (ascending) of |x|. Returns 0, or -1 when out of memory. */
EXPORT int gs_topk(void *wsp, const float *x, int64_t n, int64_t k, int64_t *out_idx, int nthreads) {
    ws_t *ws = (ws_t *)wsp;
    emit_t E = {out_idx, NULL, NULL, 0, 0};
    return topk_range(ws, 0, clamp_threads(nthreads), (float *)x, NULL, 0.0f, MODE_FILTER, n, k, &E);
}

/* e <- a = fma(alpha, g, e) (a = e when g is NULL); (idx, val) <- exact top-k of a; e[idx] <- 0. */
EXPORT int gs_topk_ef(void *wsp, float *e, const float *g, float alpha, int64_t n, int64_t k,
                      int64_t *out_idx, float *out_val, int nthreads) {
    ws_t *ws = (ws_t *)wsp;
    emit_t E = {out_idx, out_val, e, 0, 0};
    return topk_range(ws, 0, clamp_threads(nthreads), e, g, alpha, g ? MODE_EF : MODE_FILTER, n, k, &E);
}

/* e <- a = fma(alpha, g, e) (a = e when g is NULL); entries with |a| >= lam (never a NaN) are
 * kept in the workspace and zeroed in e. Returns their number (fetch them with gs_ht_gather),
 * or -1 when out of memory. */
EXPORT int64_t gs_ht_pass(void *wsp, float *e, const float *g, float alpha, float lam, int64_t n, int nthreads) {
    ws_t *ws = (ws_t *)wsp;
    int np = clamp_threads(nthreads);
    if (n < PAR_MIN) np = 1;
    pass_t P;
    memset(&P, 0, sizeof P);
    P.ws = ws; P.s0 = 0; P.x = e; P.g = g; P.alpha = alpha; P.mode = MODE_HT; P.n = n;
    P.nparts = np; P.lam = lam;
    if (run_pass(&P)) return -1;
    ws->last_nparts = np;
    int64_t tot = 0;
    for (int t = 0; t < np; t++) tot += ws->s[t].ng;
    return tot;
}

EXPORT void gs_ht_gather(void *wsp, int64_t *out_idx, float *out_val) {
    ws_t *ws = (ws_t *)wsp;
    int64_t p = 0;
    for (int t = 0; t < ws->last_nparts; t++) {
        slot_t *q = &ws->s[t];
        memcpy(out_idx + p, q->gidx, (size_t)q->ng * sizeof(int64_t));
        memcpy(out_val + p, q->gbits, (size_t)q->ng * sizeof(float));
        p += q->ng;
    }
}

/* ------------------------------------------------------------------ segments */

/* Per-segment selection (one thread per segment; segments spread over threads).
 *
 * Dense segments (4k >= n, n <= SMALL_N) are quickselected directly (select_small). For
 * k <= SEG_SMALL_K one pass keeps a running exact top-k list (small_insert): its k-th key is
 * the threshold, so only entries that enter the list leave the vectorised scan.
 * Otherwise a segment is filtered in one pass with a rising threshold. The slot's candidate
 * list (gidx, gbits) holds, in index order, entries whose key is > thr. When it exceeds its
 * capacity it is compacted to the exact top-k of the prefix seen so far (the k-th largest key T
 * among the candidates; all > T and the first k - #(> T) equal to T), and thr becomes T: later
 * entries equal to T lose the tie to the k kept ones, which have lower indices. So the list
 * always holds the top-k of the prefix restricted to key > thr0 (the first threshold) plus the
 * later entries above the current thr; at the end a last compaction writes exactly k.
 * thr0 comes from a small stratified sample (the r-th largest sampled key, r as in topk_range,
 * minus one so that keys equal to it pass); if fewer than k entries have key > thr0 (possible
 * only when no compaction happened) the pass is repeated with a lower sample rank, and rank >= m
 * means thr0 = -1 (every entry passes), which always succeeds. Short segments start at
 * thr0 = -1 without a sample. The result never depends on the sample or on the capacity.
 * Scratch is the thread's slot, reused across segments (no allocation once warm). */
#define SEG_NOSAMPLE_N 2048   /* below this no sample is drawn (thr0 = -1) */
#define SEG_SAMPLE_DIV 400    /* sample size: max(n / SEG_SAMPLE_DIV, SEG_SAMPLE_MIN, cbrt(k n)), <= n / 8 */
#define SEG_SAMPLE_MIN 128
#define SEG_CAP_ADD 32        /* candidate capacity 2k + SEG_CAP_ADD */
#define SEG_SMALL_K 16        /* k up to this: running top-k list */


GS_DECLARE_SEG(_gen)
#if GS_X86
GS_DECLARE_SEG(_avx2)
#endif

/* The exact top-k of the candidate list (ng > k), written to out as base + index when out is
 * given (in list order), else kept as the new list; *thr <- the k-th largest key. */
static int seg_compact_to(ws_t *ws, int t, int64_t k, int32_t *thr, int64_t *out, int64_t base);
static int seg_compact(ws_t *ws, int t, int64_t k, int32_t *thr) { return seg_compact_to(ws, t, k, thr, NULL, 0); }
static int seg_compact_to(ws_t *ws, int t, int64_t k, int32_t *thr, int64_t *out, int64_t base) {
    slot_t *s = &ws->s[t];
    int64_t c = s->ng, cgt;
    int32_t T;
    if (c >= 65536) {
        if (radix_kth(ws, t, 1, k, &T, &cgt)) return -1;
    } else {
        if (!grow(s, (void **)&s->tmp, &s->tcap, 2 * c, sizeof(int32_t))) return -1;
        for (int64_t j = 0; j < c; j++) s->tmp[j] = canon(s->gbits[j]);
        T = kth_largest(s->tmp, s->tmp + c, c, k, &cgt);
    }
    int64_t need = k - cgt, w = 0;
    int64_t *gi = s->gidx; int32_t *gb = s->gbits;
    *thr = T;
    if (out) {   /* w < k bounds the stores to the k output slots */
        for (int64_t j = 0; j < c && w < k; j++) {
            int32_t key = canon(gb[j]);
            int64_t eq = key == T, keep = (key > T) | (eq & (need > 0));
            need -= keep & eq;
            out[w] = base + gi[j];
            w += keep;
        }
        return 0;
    }
    for (int64_t j = 0; j < c; j++) {   /* w <= j: in place */
        int32_t key = canon(gb[j]);
        int64_t eq = key == T, keep = (key > T) | (eq & (need > 0));
        need -= keep & eq;
        gi[w] = gi[j]; gb[w] = gb[j];
        w += keep;
    }
    s->ng = w;
    return 0;
}

/* Running exact top-k (k <= SEG_SMALL_K): keys/idxs hold the best entries seen so far ordered
 * by rank (key descending, then index ascending); a new entry (highest index so far) enters when
 * its key is above the current k-th (or the list is not full) and goes after every entry with a
 * key >= its own. Returns the new threshold (-1 while the list is not full). */
static inline int32_t small_insert(int32_t *keys, int64_t *idxs, int64_t *cnt, int64_t k, int32_t key, int64_t idx) {
    int64_t p = *cnt < k ? (*cnt)++ : k - 1;
    while (p > 0 && keys[p - 1] < key) { keys[p] = keys[p - 1]; idxs[p] = idxs[p - 1]; p--; }
    keys[p] = key; idxs[p] = idx;
    return *cnt < k ? -1 : keys[k - 1];
}

/* out[0..k) <- base + idxs sorted ascending. */
static void small_output(int64_t *idxs, int64_t k, int64_t *out, int64_t base) {
    for (int64_t a = 1; a < k; a++) {
        int64_t v = idxs[a], b = a;
        while (b > 0 && idxs[b - 1] > v) { idxs[b] = idxs[b - 1]; b--; }
        idxs[b] = v;
    }
    for (int64_t a = 0; a < k; a++) out[a] = base + idxs[a];
}

/* Stratified sample of m keys of x[0..n) into samp (m <= n). */
static void sample_keys(const float *x, int64_t n, int64_t m, int32_t *samp) {
    uint64_t st = 0x9a3dcb1e5f0aULL ^ (uint64_t)n;
    int64_t stride = n / m;
    enum { PF = 16 };
    int64_t pos[PF];
    for (int64_t j = 0; j < m && j < PF; j++)
        pos[j] = j * stride + (int64_t)(((unsigned __int128)splitmix(&st) * (uint64_t)stride) >> 64);
    for (int64_t j = 0; j < m; j++) {
        int64_t p = pos[j % PF];
        if (j + PF < m) {
            int64_t q = (j + PF) * stride + (int64_t)(((unsigned __int128)splitmix(&st) * (uint64_t)stride) >> 64);
            __builtin_prefetch(x + q);
            pos[j % PF] = q;
        }
        samp[j] = canon(fbits(x[p]));
    }
}

/* Exact top-k of x[0..n) (0 < k < n) with slot t's scratch; emits ascending indices. */
static int seg_select(ws_t *ws, int t, const float *x, int64_t n, int64_t k, emit_t *E, int avx2) {
    slot_t *s = &ws->s[t];
    if (n <= SMALL_N && 4 * k >= n) return select_small(s, x, n, k, E);
    if (k <= SEG_SMALL_K) {
#if GS_X86
        if (avx2) seg_topsmall_avx2((const int32_t *)x, n, k, E->out_idx + E->pos, E->base);
        else
#endif
        seg_topsmall_gen((const int32_t *)x, n, k, E->out_idx + E->pos, E->base);
        E->pos += k;
        return 0;
    }
    int64_t cap = 2 * k + SEG_CAP_ADD;
    if (!grow_g(s, cap + BLK)) return -1;
    int64_t m = 0, r = 0;
    int32_t *samp = NULL;
    if (n >= SEG_NOSAMPLE_N) {
        m = n / SEG_SAMPLE_DIV;
        if (m < SEG_SAMPLE_MIN) m = SEG_SAMPLE_MIN;
        int64_t mk = (int64_t)cbrt((double)k * (double)n);
        if (m < mk) m = mk;
        if (m > n / 8) m = n / 8;
        if (m > SAMPLE_M) m = SAMPLE_M;
        if (!grow(s, (void **)&s->samp, &s->scap, 3 * m, sizeof(int32_t))) return -1;
        samp = s->samp;
        sample_keys(x, n, m, samp);
        double mu = (double)k * (double)m / (double)n;
        r = (int64_t)(g_rank_scale * (mu + 4.0 * sqrt(mu) + 2.0));
    }
    for (;;) {
        int32_t thr = -1;
        if (r < m) {
            int32_t *work = samp + m;
            memcpy(work, samp, (size_t)m * sizeof(int32_t));
            int64_t cg;
            thr = kth_largest(work, work + m, m, r + 1, &cg) - 1;   /* keys >= the sampled key pass */
        }
        s->ng = 0;
        int rc;
#if GS_X86
        if (avx2) rc = seg_stream_avx2(ws, t, (const int32_t *)x, n, k, cap, thr);
        else
#endif
        rc = seg_stream_gen(ws, t, (const int32_t *)x, n, k, cap, thr);
        if (rc) return -1;
        if (s->ng >= k) break;
        r = 4 * r + 16;
    }
    int64_t *oi = E->out_idx + E->pos;
    if (s->ng > k) {
        int32_t T;
        if (seg_compact_to(ws, t, k, &T, oi, E->base)) return -1;
    } else {
        for (int64_t j = 0; j < k; j++) oi[j] = E->base + s->gidx[j];
    }
    E->pos += k;
    return 0;
}

typedef struct {
    ws_t *ws; const float *x; const int64_t *off; const int64_t *ks; const int64_t *opos;
    int64_t *out; const int64_t *chunk; const int64_t *cpos; int64_t nchunks; int64_t next;
    int64_t big_min; int avx2; int err;
} seg_t;

static void seg_task(void *arg, int t) {
    seg_t *S = (seg_t *)arg;
    for (;;) {
        int64_t c = __atomic_fetch_add(&S->next, 1, __ATOMIC_RELAXED);
        if (c >= S->nchunks) break;
        int64_t pos = S->cpos[c];
        for (int64_t l = S->chunk[c]; l < S->chunk[c + 1]; l++) {
            int64_t lo = S->off[l], n = S->off[l + 1] - lo, k = S->ks[l];
            int64_t o = S->opos ? S->opos[l] : pos;
            pos += k;
            if (n >= S->big_min || k <= 0) continue;    /* big ones: done by the caller */
            emit_t E = {S->out + o, NULL, NULL, 0, lo};
            int rc = 0;
            if (k >= n) for (int64_t i = 0; i < n; i++) E.out_idx[i] = lo + i;
            else rc = seg_select(S->ws, t, S->x + lo, n, k, &E, S->avx2);
            if (rc) __atomic_store_n(&S->err, 1, __ATOMIC_RELAXED);
        }
    }
}

#define SEG_CHUNKS_PER_THREAD 16
#define SEG_COST 512   /* fixed cost of a segment, in entries scanned (for sharing the work) */

/* Exact top-ks[l] of every segment [off[l], off[l+1]) of x; out (length sum ks) receives global
 * indices, ascending within each segment and segments in order (so ascending overall when the
 * offsets are non-decreasing). opos = exclusive prefix sums of ks, or NULL (computed here).
 * Segments much larger than an even share of the rest are done one at a time with all threads
 * (topk_range); the others are grouped into consecutive chunks of similar work that the threads
 * claim in turn, each selecting its segments alone with its own slot. */
EXPORT int gs_topk_segments(void *wsp, const float *x, const int64_t *off, const int64_t *ks,
                            const int64_t *opos, int64_t L, int64_t *out, int nthreads) {
    ws_t *ws = (ws_t *)wsp;
    int nt = clamp_threads(nthreads);
    /* All threads on one segment (topk_range) when it is more than 1.5 times an even share of
     * the work left: big_min is lowered to such a size until none is left. Otherwise a single
     * thread per segment is faster, even with some imbalance (no hand-off, a smaller sample). */
    int64_t big_min = INT64_MAX;
    for (int it = 0; nt > 1 && it < 64; it++) {
        int64_t rem = 0, cand = 0;
        for (int64_t l = 0; l < L; l++) {
            int64_t n = off[l + 1] - off[l];
            if (n < big_min) { rem += n; if (n > cand) cand = n; }
        }
        if (cand < PAR_MIN || 2 * cand * nt <= 3 * rem) break;
        big_min = cand;
    }
    int64_t work = 0, pos = 0;
    for (int64_t l = 0; l < L; l++) {
        int64_t n = off[l + 1] - off[l];
        if (n >= big_min) {
            emit_t E = {out + (opos ? opos[l] : pos), NULL, NULL, 0, off[l]};
            if (topk_range(ws, 0, nt, (float *)(x + off[l]), NULL, 0.0f, MODE_FILTER, n, ks[l], &E)) return -1;
        } else if (ks[l] > 0) {
            work += n + SEG_COST;
        }
        pos += ks[l];
    }
    if (work == 0) return 0;
    int np = work >= PAR_MIN ? nt : 1;
    enum { MAXCH = MAXT * SEG_CHUNKS_PER_THREAD };
    int64_t chunk[MAXCH + 1], cpos[MAXCH + 1];
    int64_t nch = 0, acc = 0;
    int64_t per = work / ((int64_t)np * SEG_CHUNKS_PER_THREAD) + 1;
    chunk[0] = 0; cpos[0] = 0; pos = 0;
    for (int64_t l = 0; l < L; l++) {
        int64_t n = off[l + 1] - off[l];
        if (n < big_min && ks[l] > 0) acc += n + SEG_COST;
        pos += ks[l];
        if (acc >= per && nch + 1 < MAXCH) { nch++; chunk[nch] = l + 1; cpos[nch] = pos; acc = 0; }
    }
    if (chunk[nch] < L) chunk[++nch] = L;
    seg_t S = {ws, x, off, ks, opos, out, chunk, cpos, nch, 0, big_min, uses_avx2(), 0};
    run_par(np, seg_task, &S);
    return S.err ? -1 : 0;
}

/* ------------------------------------------------------------------ hot loops (compiled twice) */

#define GS_HOT_SUFFIX _gen
#include "_kernels.c"
#undef GS_HOT_SUFFIX
#if GS_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#endif
#define GS_HOT_SUFFIX _avx2
#define GS_HOT_AVX2 1
#include "_kernels.c"
#undef GS_HOT_AVX2
#undef GS_HOT_SUFFIX
#if defined(__clang__)
#pragma clang attribute pop
#endif
#pragma GCC pop_options
#endif

#else /* GS_HOT_SUFFIX: this part is included twice by the part above */

#define GS_CAT2(a, b) a##b
#define GS_CAT(a, b) GS_CAT2(a, b)
#define HOTNAME(f) GS_CAT(f, GS_HOT_SUFFIX)

/* Candidates of one block: every key > thr is appended without a branch (room was reserved);
 * keys == thr go to the (rare) eq list. */
static inline void HOTNAME(scan_keys)(slot_t *s, const int32_t *b, int64_t lo, int64_t hi, int32_t thr, int64_t ecap) {
    int64_t ng = s->ng;
    int64_t *gi = s->gidx; int32_t *gb = s->gbits;
    for (int64_t i = lo; i < hi; i++) {
        int32_t bb = b[i];
        int32_t key = canon(bb);
        gi[ng] = i; gb[ng] = bb;
        ng += key > thr;
        if (__builtin_expect(key == thr, 0)) push_e(s, i, ecap);
    }
    s->ng = ng;
}

#if defined(GS_HOT_AVX2)
/* Bits of the lanes of a 32-entry block whose key (|x| bits) is >= thr. */
static inline uint32_t HOTNAME(block_mask)(__m256i v0, __m256i v1, __m256i v2, __m256i v3, __m256i thr1) {
    const __m256i am = _mm256_set1_epi32(0x7fffffff);
    uint32_t m0 = (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_and_si256(v0, am), thr1)));
    uint32_t m1 = (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_and_si256(v1, am), thr1)));
    uint32_t m2 = (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_and_si256(v2, am), thr1)));
    uint32_t m3 = (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_and_si256(v3, am), thr1)));
    return m0 | (m1 << 8) | (m2 << 16) | (m3 << 24);
}

/* Push the set lanes of mask (block starting at i). */
static inline void HOTNAME(push_mask)(slot_t *s, const int32_t *b, int64_t i, uint32_t m, int32_t thr, int64_t ecap) {
    int64_t ng = s->ng;
    while (m) {
        int j = __builtin_ctz(m);
        m &= m - 1;
        int32_t bb = b[i + j], key = canon(bb);
        if (__builtin_expect(key > thr, 1)) { s->gidx[ng] = i + j; s->gbits[ng] = bb; ng++; }
        else if (key == thr) push_e(s, i + j, ecap);
    }
    s->ng = ng;
}

static void HOTNAME(pass_filter)(slot_t *s, const int32_t *b, int64_t lo, int64_t hi, int32_t thr, int64_t ecap) {
    const __m256i thr1 = _mm256_set1_epi32(thr - 1);   /* key >= thr  <=>  key > thr - 1 */
    int64_t i = lo;
    for (; i + BLK <= hi; i += BLK) {
        const __m256i *p = (const __m256i *)(b + i);
        uint32_t m = HOTNAME(block_mask)(_mm256_loadu_si256(p), _mm256_loadu_si256(p + 1),
                                         _mm256_loadu_si256(p + 2), _mm256_loadu_si256(p + 3), thr1);
        if (m) {
            if (!reserve_g(s)) return;
            HOTNAME(push_mask)(s, b, i, m, thr, ecap);
        }
    }
    if (i < hi && reserve_g(s)) HOTNAME(scan_keys)(s, b, i, hi, thr, ecap);
}

/* Exact top-k (0 < k <= SEG_SMALL_K, k < n) of a segment with a running list (small_insert). */
static void HOTNAME(seg_topsmall)(const int32_t *b, int64_t n, int64_t k, int64_t *out, int64_t base) {
    int32_t keys[SEG_SMALL_K]; int64_t idxs[SEG_SMALL_K], cnt = 0;
    int32_t thr = -1;
    __m256i vt = _mm256_set1_epi32(thr);
    int64_t i = 0;
    for (; i + BLK <= n; i += BLK) {
        const __m256i *p = (const __m256i *)(b + i);
        uint32_t m = HOTNAME(block_mask)(_mm256_loadu_si256(p), _mm256_loadu_si256(p + 1),
                                         _mm256_loadu_si256(p + 2), _mm256_loadu_si256(p + 3), vt);
        if (m) {
            while (m) {
                int j = __builtin_ctz(m);
                m &= m - 1;
                int32_t key = canon(b[i + j]);
                if (key > thr) thr = small_insert(keys, idxs, &cnt, k, key, i + j);
            }
            vt = _mm256_set1_epi32(thr);
        }
    }
    for (; i < n; i++) {
        int32_t key = canon(b[i]);
        if (key > thr) thr = small_insert(keys, idxs, &cnt, k, key, i);
    }
    small_output(idxs, k, out, base);
}

/* Segment pass with a rising threshold (see seg_select): appends entries with key > thr, and
 * compacts the list (raising thr) whenever it holds more than cap (room: cap + BLK). */
static int HOTNAME(seg_stream)(ws_t *ws, int t, const int32_t *b, int64_t n, int64_t k, int64_t cap, int32_t thr) {
    slot_t *s = &ws->s[t];
    __m256i vt = _mm256_set1_epi32(thr);
    int64_t i = 0;
    for (; i + BLK <= n; i += BLK) {
        const __m256i *p = (const __m256i *)(b + i);
        uint32_t m = HOTNAME(block_mask)(_mm256_loadu_si256(p), _mm256_loadu_si256(p + 1),
                                         _mm256_loadu_si256(p + 2), _mm256_loadu_si256(p + 3), vt);
        if (m) {
            if (s->ng > cap) {
                if (seg_compact(ws, t, k, &thr)) return -1;
                vt = _mm256_set1_epi32(thr);
            }
            int64_t ng = s->ng;
            int64_t *gi = s->gidx; int32_t *gb = s->gbits;
            while (m) {
                int j = __builtin_ctz(m);
                m &= m - 1;
                int32_t bb = b[i + j];
                gi[ng] = i + j; gb[ng] = bb;
                ng += canon(bb) > thr;
            }
            s->ng = ng;
        }
    }
    if (i < n) {
        if (s->ng > cap) {
            if (seg_compact(ws, t, k, &thr)) return -1;
        }
        HOTNAME(scan_keys)(s, b, i, n, thr, 0);
    }
    return 0;
}

static void HOTNAME(pass_ef_fma)(slot_t *s, float *x, const float *g, float al, int64_t lo, int64_t hi, int32_t thr, int64_t ecap) {
    const int32_t *b = (const int32_t *)x;
    const __m256i thr1 = _mm256_set1_epi32(thr - 1);
    const __m256 va = _mm256_set1_ps(al);
    int64_t i = lo;
    for (; i + BLK <= hi; i += BLK) {
        __m256 a0 = _mm256_fmadd_ps(va, _mm256_loadu_ps(g + i), _mm256_loadu_ps(x + i));
        __m256 a1 = _mm256_fmadd_ps(va, _mm256_loadu_ps(g + i + 8), _mm256_loadu_ps(x + i + 8));
        __m256 a2 = _mm256_fmadd_ps(va, _mm256_loadu_ps(g + i + 16), _mm256_loadu_ps(x + i + 16));
        __m256 a3 = _mm256_fmadd_ps(va, _mm256_loadu_ps(g + i + 24), _mm256_loadu_ps(x + i + 24));
        _mm256_storeu_ps(x + i, a0);
        _mm256_storeu_ps(x + i + 8, a1);
        _mm256_storeu_ps(x + i + 16, a2);
        _mm256_storeu_ps(x + i + 24, a3);
        uint32_t m = HOTNAME(block_mask)(_mm256_castps_si256(a0), _mm256_castps_si256(a1),
                                         _mm256_castps_si256(a2), _mm256_castps_si256(a3), thr1);
        if (m) {
            if (!reserve_g(s)) { thr = INT32_MAX; continue; }
            HOTNAME(push_mask)(s, b, i, m, thr, ecap);
        }
    }
    for (int64_t j = i; j < hi; j++) x[j] = fmaf(al, g[j], x[j]);
    if (i < hi && reserve_g(s)) HOTNAME(scan_keys)(s, b, i, hi, thr, ecap);
}
#else
static void HOTNAME(seg_topsmall)(const int32_t *b, int64_t n, int64_t k, int64_t *out, int64_t base) {
    int32_t keys[SEG_SMALL_K]; int64_t idxs[SEG_SMALL_K], cnt = 0;
    int32_t thr = -1;
    int64_t i = 0;
    for (; i + BLK <= n; i += BLK) {
        int any = 0;
        for (int j = 0; j < BLK; j++) any |= ((b[i + j] & 0x7fffffff) > thr);
        if (__builtin_expect(any, 0)) {
            for (int j = 0; j < BLK; j++) {
                int32_t key = canon(b[i + j]);
                if (key > thr) thr = small_insert(keys, idxs, &cnt, k, key, i + j);
            }
        }
    }
    for (; i < n; i++) {
        int32_t key = canon(b[i]);
        if (key > thr) thr = small_insert(keys, idxs, &cnt, k, key, i);
    }
    small_output(idxs, k, out, base);
}

static int HOTNAME(seg_stream)(ws_t *ws, int t, const int32_t *b, int64_t n, int64_t k, int64_t cap, int32_t thr) {
    slot_t *s = &ws->s[t];
    int64_t i = 0;
    for (; i + BLK <= n; i += BLK) {
        int any = 0;
        for (int j = 0; j < BLK; j++) any |= ((b[i + j] & 0x7fffffff) > thr);
        if (__builtin_expect(any, 0)) {
            if (s->ng > cap) {
                if (seg_compact(ws, t, k, &thr)) return -1;
            }
            HOTNAME(scan_keys)(s, b, i, i + BLK, thr, 0);
        }
    }
    if (i < n) {
        if (s->ng > cap) {
            if (seg_compact(ws, t, k, &thr)) return -1;
        }
        HOTNAME(scan_keys)(s, b, i, n, thr, 0);
    }
    return 0;
}

static void HOTNAME(pass_filter)(slot_t *s, const int32_t *b, int64_t lo, int64_t hi, int32_t thr, int64_t ecap) {
    int64_t i = lo;
    for (; i + BLK <= hi; i += BLK) {
        int any = 0;
        for (int j = 0; j < BLK; j++) any |= ((b[i + j] & 0x7fffffff) >= thr);
        if (__builtin_expect(any, 0)) {
            if (!reserve_g(s)) return;
            HOTNAME(scan_keys)(s, b, i, i + BLK, thr, ecap);
        }
    }
    if (i < hi && reserve_g(s)) HOTNAME(scan_keys)(s, b, i, hi, thr, ecap);
}

static void HOTNAME(pass_ef_fma)(slot_t *s, float *x, const float *g, float al, int64_t lo, int64_t hi, int32_t thr, int64_t ecap) {
    const int32_t *b = (const int32_t *)x;
    int64_t i = lo;
    for (; i + BLK <= hi; i += BLK) {
        int any = 0;
        for (int j = 0; j < BLK; j++) {
            float a = fmaf(al, g[i + j], x[i + j]);
            x[i + j] = a;
            any |= ((fbits(a) & 0x7fffffff) >= thr);
        }
        if (__builtin_expect(any, 0) && reserve_g(s)) HOTNAME(scan_keys)(s, b, i, i + BLK, thr, ecap);
    }
    for (int64_t j = i; j < hi; j++) x[j] = fmaf(al, g[j], x[j]);
    if (i < hi && reserve_g(s)) HOTNAME(scan_keys)(s, b, i, hi, thr, ecap);
}

#endif

static inline void HOTNAME(scan_ht)(slot_t *s, float *x, int64_t lo, int64_t hi, float lam) {
    int64_t ng = s->ng;
    int64_t *gi = s->gidx; int32_t *gb = s->gbits;
    for (int64_t i = lo; i < hi; i++) {
        float a = x[i];
        int take = fabsf(a) >= lam;
        gi[ng] = i; gb[ng] = fbits(a);
        ng += take;
        x[i] = take ? 0.0f : a;
    }
    s->ng = ng;
}

#if defined(GS_HOT_AVX2)
static void HOTNAME(pass_ht_fma)(slot_t *s, float *x, const float *g, float al, int64_t lo, int64_t hi, float lam) {
    const __m256 va = _mm256_set1_ps(al), vl = _mm256_set1_ps(lam);
    const __m256 am = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    int64_t i = lo;
    for (; i + BLK <= hi; i += BLK) {
        uint32_t m = 0;
        for (int q = 0; q < BLK; q += 8) {
            __m256 a = _mm256_fmadd_ps(va, _mm256_loadu_ps(g + i + q), _mm256_loadu_ps(x + i + q));
            _mm256_storeu_ps(x + i + q, a);
            m |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_and_ps(a, am), vl, _CMP_GE_OQ)) << q;
        }
        if (m) {
            if (!reserve_g(s)) continue;
            int64_t ng = s->ng;
            while (m) {
                int j = __builtin_ctz(m);
                m &= m - 1;
                s->gidx[ng] = i + j; s->gbits[ng] = fbits(x[i + j]); ng++;
                x[i + j] = 0.0f;
            }
            s->ng = ng;
        }
    }
    for (int64_t j = i; j < hi; j++) x[j] = fmaf(al, g[j], x[j]);
    if (i < hi && reserve_g(s)) HOTNAME(scan_ht)(s, x, i, hi, lam);
}
#else
static void HOTNAME(pass_ht_fma)(slot_t *s, float *x, const float *g, float al, int64_t lo, int64_t hi, float lam) {
    int64_t i = lo;
    for (; i + BLK <= hi; i += BLK) {
        int any = 0;
        for (int j = 0; j < BLK; j++) {
            float a = fmaf(al, g[i + j], x[i + j]);
            x[i + j] = a;
            any |= (fabsf(a) >= lam);
        }
        if (__builtin_expect(any, 0) && reserve_g(s)) HOTNAME(scan_ht)(s, x, i, i + BLK, lam);
    }
    for (int64_t j = i; j < hi; j++) x[j] = fmaf(al, g[j], x[j]);
    if (i < hi && reserve_g(s)) HOTNAME(scan_ht)(s, x, i, hi, lam);
}

#endif

/* No update (g = NULL): only the selection |x| >= lam and the zeroing. */
static void HOTNAME(pass_ht_only)(slot_t *s, float *x, int64_t lo, int64_t hi, float lam) {
    int64_t i = lo;
    for (; i + BLK <= hi; i += BLK) {
        int any = 0;
        for (int j = 0; j < BLK; j++) any |= (fabsf(x[i + j]) >= lam);
        if (__builtin_expect(any, 0) && reserve_g(s)) HOTNAME(scan_ht)(s, x, i, i + BLK, lam);
    }
    if (i < hi && reserve_g(s)) HOTNAME(scan_ht)(s, x, i, hi, lam);
}

/* Separate multiply and add (two roundings), for a torch whose add_ does not fuse. */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
static void HOTNAME(pass_ef_mul)(slot_t *s, float *x, const float *g, float al, int64_t lo, int64_t hi, int32_t thr, int64_t ecap) {
    const int32_t *b = (const int32_t *)x;
    int64_t i = lo;
    for (; i + BLK <= hi; i += BLK) {
        int any = 0;
        for (int j = 0; j < BLK; j++) {
            float p = al * g[i + j];
            float a = x[i + j] + p;
            x[i + j] = a;
            any |= ((fbits(a) & 0x7fffffff) >= thr);
        }
        if (__builtin_expect(any, 0) && reserve_g(s)) HOTNAME(scan_keys)(s, b, i, i + BLK, thr, ecap);
    }
    for (int64_t j = i; j < hi; j++) { float p = al * g[j]; x[j] = x[j] + p; }
    if (i < hi && reserve_g(s)) HOTNAME(scan_keys)(s, b, i, hi, thr, ecap);
}

static void HOTNAME(pass_ht_mul)(slot_t *s, float *x, const float *g, float al, int64_t lo, int64_t hi, float lam) {
    int64_t i = lo;
    for (; i + BLK <= hi; i += BLK) {
        int any = 0;
        for (int j = 0; j < BLK; j++) {
            float p = al * g[i + j];
            float a = x[i + j] + p;
            x[i + j] = a;
            any |= (fabsf(a) >= lam);
        }
        if (__builtin_expect(any, 0) && reserve_g(s)) HOTNAME(scan_ht)(s, x, i, i + BLK, lam);
    }
    for (int64_t j = i; j < hi; j++) { float p = al * g[j]; x[j] = x[j] + p; }
    if (i < hi && reserve_g(s)) HOTNAME(scan_ht)(s, x, i, hi, lam);
}
#pragma GCC pop_options

#undef HOTNAME
#undef GS_CAT
#undef GS_CAT2
#endif /* GS_HOT_SUFFIX */
