/* Fused brute-force top-k over int8 rows, for the camera runtime's coreset search (issue #11).
 *
 * key[q, m] = bias[m] - cq[q] * dot(query_q, row_m), the k smallest per query, ascending by (key, row).
 * dot is the EXACT int32 product of the int8 query codes and the int8 row codes on every ISA path, and
 * the key is then formed with the same two float32 operations (multiply, subtract; the file is compiled
 * with -ffp-contract=off so no path fuses them), so every path returns bit-identical candidates.
 *
 * Layout. Rows stay row-major as stored (no second copy of the coreset): width 4*g bytes, zero-padded by
 * the caller. Queries are packed here into blocks of 16 queries x 4 bytes per dword column, stored as
 * u8 = code + 128 (x86 VNNI multiplies u8 x s8), so the SIMD lanes are queries and each row dword is
 * broadcast: dot_u8 = dot + 128 * rowsum(row), corrected by the caller's corr[m] = 128 * rowsum(row_m).
 *
 * Paths, chosen at run time (the file itself is compiled for the baseline ISA, no -march):
 *   amx         AMX-INT8 tdpbssd: 32 rows x 32 queries per step, K in 64-byte tiles (Sapphire Rapids+);
 *               for k <= 32 the hits go into run_job_512's SIMD lists
 *   avx512vnni  vpdpbusd zmm with a row-dword broadcast; for k <= 32 run_job_512 (SIMD list insertion)
 *   avxvnni     vpdpbusd ymm (VEX)
 *   avx2        u8/s8 widened to int16 + vpmaddwd (never the saturating vpmaddubsw)
 *   neon        sdot (vdotq_s32) on aarch64 with the dot-product extension (HWCAP_ASIMDDP)
 *   scalar      plain C
 * The keys are never materialised as a Q x M matrix: a vector compare against each query's current
 * k-th key, and an insertion on the hits (scalar, or SIMD in run_job_512). Ties: (key, row) order.
 * ecs_topk_pruned (coarse mode's candidates): the rows in clusters, whole clusters skipped where a distance bound
 * shows none of their rows can enter a query's list (run_job_512_pruned on the AVX-512 list path, run_job_pruned
 * on the tile paths); the results are ecs_topk's, bit for bit.
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__)
#define ECS_X86 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__aarch64__)
#define ECS_ARM 1
#include <arm_neon.h>
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVXVNNI = 2, ISA_AVX512VNNI = 3, ISA_NEON = 4, ISA_AMX = 5, ISA_COUNT = 6 };
static const char *ISA_NAMES[ISA_COUNT] = {"scalar", "avx2", "avxvnni", "avx512vnni", "neon", "amx"};

#define QB 16        /* queries per packed block (the lane count of one zmm of dwords) */
#define ROW_TILE 4   /* rows sharing one pass over a query block's dwords */
#define LIST_MAX 32  /* the AVX-512 top-k driver's list length (run_job_512; longer k: run_job) */
#define CHUNK_BYTES (192 * 1024) /* rows scanned by every query block before moving on (stays in L2) */
#define CL_MAX_DIMS 64 /* dims of the pruned drivers' cluster centres, at most */
#define CL_GROUP 4     /* clusters per pass over a block's queries (the bounds' independent FMA chains) */

typedef struct {
    const uint8_t *qpack; /* nqb x g x QB x 4 */
    int64_t nq, g;
    const int8_t *rows;
    int64_t stride, m;
    const float *bias;
    const int32_t *corr;
    const float *cq;      /* nq, padded to nqb*QB */
    int64_t k;
    int32_t *out_idx;     /* nq x k (top-k mode) */
    float *out_key;       /* nq x k (top-k mode) or nq x m (all-keys mode) */
    int all_keys;
    const int8_t *zero_row;
    int64_t row_start;    /* rows before it are done (the AMX driver's AVX-512 tail) */
    struct List32 *lists; /* the AVX-512 top-k driver's lists (k <= LIST_MAX), else NULL */
    const uint8_t *tpack; /* the AMX driver's B tiles (nqb x tiles x AMX_TILE), else NULL */
    int64_t tiles;        /* 64-byte K steps of a row (AMX) */
    const struct Clusters *cl; /* the pruned list driver's row clusters (run_job_512_pruned), else NULL */
} Ctx;

/* One tile: ROW_TILE rows x one block of QB queries. A path's tile function computes the exact int32
 * dots, the keys (key = b - cq * (float)dot: float multiply, then subtract) into keys[r * QB + lane],
 * and returns the bit mask (bit r * QB + lane) of keys at or below the lane's current k-th key. */
typedef struct {
    const int8_t *rp[ROW_TILE]; /* row pointers (a zero row past the end) */
    float bias[ROW_TILE];       /* +inf past the end: never a hit */
    int32_t corr[ROW_TILE];     /* 128 * rowsum, for the u8-query paths */
} Tile;

typedef uint64_t (*TileFn)(const Ctx *, int64_t, const Tile *, const float *, const float *, float *);

/* Coarse mode's rows in clusters, for ecs_topk_pruned (see run_job_pruned / run_job_512_pruned). */
typedef struct Clusters {
    int64_t n, p;          /* clusters; dims of the centres and of xt */
    const int64_t *start;  /* n + 1: cluster j is member[start[j] .. start[j + 1]), a multiple of PAIR_ROWS */
    const int32_t *member; /* row ids, -1 padding */
    const float *center;   /* n x p */
    const float *radius;   /* n, rounded up */
    const float *xt;       /* nq x p: the queries as the keys see them */
    const float *shift;    /* nq: N_q + the key's rounding, rounded up */
    const float *margin;   /* nq: the float32 rounding of ||c - x~|| (absolute) */
    const float *lift;     /* nq: N_q less the key's rounding, rounded down (the upper bounds) */
    const float *center_sq; /* n: ||c_j||^2 (computed per call) */
    const float *cap_radius; /* n: R_j where cluster j has at least k rows, else +inf (computed per call) */
    _Atomic int64_t *next; /* the next pair of query blocks to take (the threads share them out as they go) */
} Clusters;

/* (key, row) before the list's k-th entry, in (key, row) order: equal keys keep the smaller row. */
static inline int beats(float key, int32_t row, float kkey, int32_t krow) {
    return key < kkey || (key == kkey && (krow < 0 || row < krow));
}

/* Insert (key, row) into one query's list, ascending by (key, row); the last entry drops out. */
static void insert(float *keys, int32_t *idx, int64_t k, float key, int32_t row) {
    int64_t pos = k - 1;
    while (pos > 0 && beats(key, row, keys[pos - 1], idx[pos - 1])) {
        keys[pos] = keys[pos - 1];
        idx[pos] = idx[pos - 1];
        pos--;
    }
    keys[pos] = key;
    idx[pos] = row;
}

/* Hits of one tile (bit r * QB + lane: key <= the lane's k-th): insert those that beat the k-th entry.
 * Chunks are scanned last first (a farthest-first coreset puts its outliers first), so ties are
 * settled by row here, not by scan order. The tile's rows are m0 + r, or ids[r] where ids is given. */
static void take_hits_of(const Ctx *c, int64_t q0, int lanes, int64_t m0, const int32_t *ids, int valid, uint64_t hits,
                         const float *keys, float *kth) {
    while (hits) {
        int bit = __builtin_ctzll(hits);
        hits &= hits - 1;
        int r = bit / QB, l = bit % QB;
        float key = keys[bit];
        if (l >= lanes || r >= valid) continue;
        int32_t row = ids ? ids[r] : (int32_t)(m0 + r);
        float *qkeys = c->out_key + (q0 + l) * c->k;
        int32_t *qidx = c->out_idx + (q0 + l) * c->k;
        if (!beats(key, row, qkeys[c->k - 1], qidx[c->k - 1])) continue; /* the k-th moved */
        insert(qkeys, qidx, c->k, key, row);
        kth[l] = qkeys[c->k - 1];
    }
}

static void take_hits(const Ctx *c, int64_t q0, int lanes, int64_t m0, int valid, uint64_t hits, const float *keys,
                      float *kth) {
    take_hits_of(c, q0, lanes, m0, NULL, valid, hits, keys, kth);
}

static void store_keys(const Ctx *c, int64_t q0, int lanes, int64_t m0, int valid, const float *keys) {
    for (int r = 0; r < valid; r++)
        for (int l = 0; l < lanes; l++) c->out_key[(q0 + l) * c->m + m0 + r] = keys[r * QB + l];
}

/* ---- scalar ---------------------------------------------------------------------------------- */

static uint64_t tile_scalar(const Ctx *c, int64_t qb, const Tile *t, const float *cq, const float *kth, float *keys) {
    const uint8_t *qp = c->qpack + qb * c->g * QB * 4;
    uint64_t mask = 0;
    for (int r = 0; r < ROW_TILE; r++) {
        for (int l = 0; l < QB; l++) {
            int32_t acc = 0;
            for (int64_t j = 0; j < c->g; j++) {
                const uint8_t *qd = qp + (j * QB + l) * 4;
                const int8_t *rd = t->rp[r] + j * 4;
                for (int b = 0; b < 4; b++) acc += ((int32_t)qd[b] - 128) * (int32_t)rd[b];
            }
            float prod = cq[l] * (float)acc;
            float key = t->bias[r] - prod;
            keys[r * QB + l] = key;
            if (key <= kth[l]) mask |= (uint64_t)1 << (r * QB + l);
        }
    }
    return mask;
}

/* ---- x86 ------------------------------------------------------------------------------------- */
#ifdef ECS_X86
static inline int32_t load_dword(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* acc += dot(u8 a, s8 w) per dword, zmm. Inline asm on GCC/clang: GCC 12 compiles the intrinsic with a
 * register copy of every accumulator per step (as many moves as multiplies). */
#if defined(__GNUC__)
#define DPBUSD512(acc, a, w) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(w))
#else
#define DPBUSD512(acc, a, w) ((acc) = _mm512_dpbusd_epi32((acc), (a), (w)))
#endif

/* The same keys from exact dots (the AMX path's s8 x s8 tiles: nothing to correct). */
__attribute__((target("avx512f"), always_inline))
static inline __m512 keys512_exact(__m512i dot, float bias, __m512 cq) {
    return _mm512_sub_ps(_mm512_set1_ps(bias), _mm512_mul_ps(cq, _mm512_cvtepi32_ps(dot)));
}

/* The keys of 16 query lanes from u8-biased dots: key = bias - cq * (float)(acc - corr) (every zmm path). */
__attribute__((target("avx512f"), always_inline))
static inline __m512 keys512(__m512i acc, int32_t corr, float bias, __m512 cq) {
    return keys512_exact(_mm512_sub_epi32(acc, _mm512_set1_epi32(corr)), bias, cq);
}

__attribute__((target("avx512f,avx512bw,avx512vnni")))
static uint64_t tile_avx512vnni(const Ctx *c, int64_t qb, const Tile *t, const float *cq, const float *kth,
                                float *keys) {
    const uint8_t *qp = c->qpack + qb * c->g * QB * 4;
    __m512i acc[ROW_TILE];
    for (int r = 0; r < ROW_TILE; r++) acc[r] = _mm512_setzero_si512();
    const int8_t *r0 = t->rp[0], *r1 = t->rp[1], *r2 = t->rp[2], *r3 = t->rp[3];
    for (int64_t j = 0; j < c->g; j++) {
        __m512i q = _mm512_loadu_si512((const void *)(qp + j * QB * 4));
        DPBUSD512(acc[0], q, _mm512_set1_epi32(load_dword(r0 + 4 * j)));
        DPBUSD512(acc[1], q, _mm512_set1_epi32(load_dword(r1 + 4 * j)));
        DPBUSD512(acc[2], q, _mm512_set1_epi32(load_dword(r2 + 4 * j)));
        DPBUSD512(acc[3], q, _mm512_set1_epi32(load_dword(r3 + 4 * j)));
    }
    __m512 vcq = _mm512_loadu_ps(cq), vkth = _mm512_loadu_ps(kth);
    uint64_t mask = 0;
    for (int r = 0; r < ROW_TILE; r++) {
        __m512 key = keys512(acc[r], t->corr[r], t->bias[r], vcq);
        _mm512_storeu_ps(keys + r * QB, key);
        mask |= (uint64_t)_mm512_cmp_ps_mask(key, vkth, _CMP_LE_OQ) << (r * QB);
    }
    return mask;
}

/* keys + hit mask of 8 query lanes (AVX2 float ops, shared by the two ymm paths) */
__attribute__((target("avx2")))
static inline uint64_t keys_avx2(__m256i acc, int32_t corr, float bias, const float *cq, const float *kth,
                                 float *keys) {
    __m256i dot = _mm256_sub_epi32(acc, _mm256_set1_epi32(corr));
    __m256 key = _mm256_sub_ps(_mm256_set1_ps(bias), _mm256_mul_ps(_mm256_loadu_ps(cq), _mm256_cvtepi32_ps(dot)));
    _mm256_storeu_ps(keys, key);
    return (uint64_t)_mm256_movemask_ps(_mm256_cmp_ps(key, _mm256_loadu_ps(kth), _CMP_LE_OQ));
}

__attribute__((target("avxvnni,avx2")))
static uint64_t tile_avxvnni(const Ctx *c, int64_t qb, const Tile *t, const float *cq, const float *kth,
                             float *keys) {
    const uint8_t *qp = c->qpack + qb * c->g * QB * 4;
    __m256i acc[ROW_TILE][2];
    for (int r = 0; r < ROW_TILE; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (int64_t j = 0; j < c->g; j++) {
        __m256i lo = _mm256_loadu_si256((const __m256i *)(qp + j * QB * 4));
        __m256i hi = _mm256_loadu_si256((const __m256i *)(qp + j * QB * 4 + 32));
        for (int r = 0; r < ROW_TILE; r++) {
            __m256i w = _mm256_set1_epi32(load_dword(t->rp[r] + 4 * j));
            acc[r][0] = _mm256_dpbusd_avx_epi32(acc[r][0], lo, w);
            acc[r][1] = _mm256_dpbusd_avx_epi32(acc[r][1], hi, w);
        }
    }
    uint64_t mask = 0;
    for (int r = 0; r < ROW_TILE; r++)
        for (int h = 0; h < 2; h++)
            mask |= keys_avx2(acc[r][h], t->corr[r], t->bias[r], cq + 8 * h, kth + 8 * h, keys + r * QB + 8 * h)
                    << (r * QB + 8 * h);
    return mask;
}

/* 4 query dwords (u8) x one row dword (s8) per ymm: both widened to int16, vpmaddwd gives two exact
 * int32 partial sums per query (|u8 x s8 pair| <= 65280, no saturation); folded into one at the end. */
__attribute__((target("avx2,fma")))
static uint64_t tile_avx2(const Ctx *c, int64_t qb, const Tile *t, const float *cq, const float *kth, float *keys) {
    const uint8_t *qp = c->qpack + qb * c->g * QB * 4;
    __m256i acc[ROW_TILE][4]; /* per row: queries 0-3, 4-7, 8-11, 12-15, two partials each */
    for (int r = 0; r < ROW_TILE; r++)
        for (int h = 0; h < 4; h++) acc[r][h] = _mm256_setzero_si256();
    for (int64_t j = 0; j < c->g; j++) {
        const uint8_t *qd = qp + j * QB * 4;
        __m256i q[4];
        for (int h = 0; h < 4; h++) q[h] = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(qd + 16 * h)));
        for (int r = 0; r < ROW_TILE; r++) {
            __m256i w = _mm256_cvtepi8_epi16(_mm_set1_epi32(load_dword(t->rp[r] + 4 * j)));
            for (int h = 0; h < 4; h++) acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(q[h], w));
        }
    }
    uint64_t mask = 0;
    for (int r = 0; r < ROW_TILE; r++) {
        for (int h = 0; h < 4; h += 2) { /* hadd pairs: [q0 q1 q4 q5 | q2 q3 q6 q7] -> q0..q7 */
            __m256i s = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[r][h], acc[r][h + 1]), 0xD8);
            mask |= keys_avx2(s, t->corr[r], t->bias[r], cq + 4 * h, kth + 4 * h, keys + r * QB + 4 * h)
                    << (r * QB + 4 * h);
        }
    }
    return mask;
}

/* ---- AMX-INT8 ----
 * C[16 rows x 16 queries] += A[16 rows x 64 code bytes] . B[16 dwords x 16 queries x 4 bytes]: A is the
 * row-major table itself (stride = row stride), B one 64-byte K step of a query block in the VNNI layout
 * as s8 codes (Ctx.tpack), so tdpbssd (s8 x s8) gives the exact dots, with no u8 bias to correct. Every
 * tile is 16 x 64 bytes: the last K step starts at width - 64 (never past a row) and its B rows that an
 * earlier step covered are 0, so each byte counts once and no tail tiles exist. One step is 32 rows x two
 * query blocks: tiles 0-3 C, 4,5 A, 6,7 B, so each tile load feeds two tdpbssd (the former 16-row step,
 * one A and two B loads per two products, waited on its B loads). Rows past the last multiple of 16 go
 * through AVX-512. */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define AMX_ROWS 16
#define AMX_TILE 1024 /* bytes of one B tile */

typedef struct __attribute__((packed)) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

static int amx_cpu(void) {
    unsigned a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    return (d >> 24 & 1) && (d >> 25 & 1); /* AMX-TILE, AMX-INT8 */
}

static int amx_permitted(void) { /* the kernel must grant this process the tile state (Linux >= 5.16) */
    static int state = -1;
    if (state < 0) {
        state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    }
    return state;
}

__attribute__((target("amx-tile,amx-int8")))
static void amx_configure(void) {
    TileConfig cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    /* not _tile_loadconfig: GCC 12 declares it reads only the first 8 bytes, and drops the other stores */
    __asm__ volatile("ldtilecfg %0" ::"m"(cfg));
}

__attribute__((target("amx-tile")))
static void amx_release(void) { _tile_release(); }

/* The first row dword of K step t (of `tiles`): 16 t, the last step right-aligned at g - 16. */
static inline int64_t amx_first(int64_t t, int64_t tiles, int64_t g) { return t + 1 < tiles ? 16 * t : g - 16; }

/* B tiles (nqb x tiles x 16 dwords x QB x 4) of the s8 query codes, from the packed u8 blocks; the last
 * step's rows that an earlier step covered are 0. */
static void amx_pack(const uint8_t *qpack, int64_t nqb, int64_t g, int64_t tiles, uint8_t *tpack) {
    for (int64_t b = 0; b < nqb; b++)
        for (int64_t t = 0; t < tiles; t++)
            for (int64_t d = 0; d < 16; d++) {
                int64_t j = amx_first(t, tiles, g) + d;
                uint8_t *dst = tpack + ((b * tiles + t) * 16 + d) * QB * 4;
                const uint8_t *src = qpack + (b * g + j) * QB * 4;
                for (int e = 0; e < QB * 4; e++) dst[e] = j < 16 * t ? 0 : (uint8_t)(src[e] ^ 0x80); /* s8 codes */
            }
}

/* dots[4][16 rows][16 queries] (exact): rows m0.. and m0+16.. x query blocks qb, qb+1, in that order */
__attribute__((target("amx-tile,amx-int8")))
static void amx_step32(const Ctx *c, int64_t qb, int64_t m0, int32_t *dots) {
    const int8_t *a0 = c->rows + m0 * c->stride, *a1 = a0 + AMX_ROWS * c->stride;
    const uint8_t *b0 = c->tpack + qb * c->tiles * AMX_TILE, *b1 = b0 + c->tiles * AMX_TILE;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t t = 0; t < c->tiles; t++) {
        int64_t off = 4 * amx_first(t, c->tiles, c->g);
        _tile_loadd(4, a0 + off, c->stride);
        _tile_loadd(6, b0 + t * AMX_TILE, 64);
        _tile_dpbssd(0, 4, 6);
        _tile_loadd(7, b1 + t * AMX_TILE, 64);
        _tile_dpbssd(1, 4, 7);
        _tile_loadd(5, a1 + off, c->stride);
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
    }
    _tile_stored(0, dots, 64);
    _tile_stored(1, dots + AMX_ROWS * QB, 64);
    _tile_stored(2, dots + 2 * AMX_ROWS * QB, 64);
    _tile_stored(3, dots + 3 * AMX_ROWS * QB, 64);
}

/* dots[2][16 rows][16 queries]: the 16 rows m0.. x query blocks qb, qb+1 (a chunk's last odd 16 rows) */
__attribute__((target("amx-tile,amx-int8")))
static void amx_step16(const Ctx *c, int64_t qb, int64_t m0, int32_t *dots) {
    const int8_t *a0 = c->rows + m0 * c->stride;
    const uint8_t *b0 = c->tpack + qb * c->tiles * AMX_TILE, *b1 = b0 + c->tiles * AMX_TILE;
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t t = 0; t < c->tiles; t++) {
        _tile_loadd(4, a0 + 4 * amx_first(t, c->tiles, c->g), c->stride);
        _tile_loadd(6, b0 + t * AMX_TILE, 64);
        _tile_dpbssd(0, 4, 6);
        _tile_loadd(7, b1 + t * AMX_TILE, 64);
        _tile_dpbssd(1, 4, 7);
    }
    _tile_stored(0, dots, 64);
    _tile_stored(1, dots + AMX_ROWS * QB, 64);
}

static void take_hits(const Ctx *c, int64_t q0, int lanes, int64_t m0, int valid, uint64_t hits, const float *keys,
                      float *kth);
static void store_keys(const Ctx *c, int64_t q0, int lanes, int64_t m0, int valid, const float *keys);

/* Keys of 16 rows x one block's 16 query lanes from their AMX dots; keys are stored only for rows
 * with a hit (the common case after warm-up is a compare and nothing else). */
__attribute__((target("avx512f")))
static void amx_consume(const Ctx *c, int64_t q0, int lanes, int64_t m0, const int32_t *dots, float *kth, float *keys) {
    __m512 vcq = _mm512_loadu_ps(c->cq + q0), vkth = _mm512_loadu_ps(kth);
    for (int r = 0; r < AMX_ROWS; r++) {
        __m512 key = keys512_exact(_mm512_loadu_si512((const void *)(dots + r * QB)), c->bias[m0 + r], vcq);
        if (c->all_keys) {
            _mm512_storeu_ps(keys, key);
            store_keys(c, q0, lanes, m0 + r, 1, keys);
            continue;
        }
        __mmask16 hit = _mm512_cmp_ps_mask(key, vkth, _CMP_LE_OQ);
        if (hit) {
            _mm512_storeu_ps(keys, key);
            take_hits(c, q0, lanes, m0 + r, 1, hit, keys, kth);
            vkth = _mm512_loadu_ps(kth);
        }
    }
}
#endif

/* ---- aarch64 --------------------------------------------------------------------------------- */
#ifdef ECS_ARM
__attribute__((target("arch=armv8.2-a+dotprod")))
static uint64_t tile_neon(const Ctx *c, int64_t qb, const Tile *t, const float *cq, const float *kth, float *keys) {
    const uint8_t *qp = c->qpack + qb * c->g * QB * 4;
    int32x4_t acc[ROW_TILE][4];
    const uint8x16_t flip = vdupq_n_u8(0x80);
    for (int r = 0; r < ROW_TILE; r++)
        for (int h = 0; h < 4; h++) acc[r][h] = vdupq_n_s32(0);
    for (int64_t j = 0; j < c->g; j++) {
        const uint8_t *qd = qp + j * QB * 4;
        int8x16_t q[4];
        for (int h = 0; h < 4; h++) q[h] = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(qd + 16 * h), flip)); /* u8 -> s8 */
        for (int r = 0; r < ROW_TILE; r++) {
            int32_t dw;
            memcpy(&dw, t->rp[r] + 4 * j, 4);
            int8x16_t w = vreinterpretq_s8_s32(vdupq_n_s32(dw));
            for (int h = 0; h < 4; h++) acc[r][h] = vdotq_s32(acc[r][h], q[h], w);
        }
    }
    uint64_t mask = 0; /* sdot of the signed codes is the true dot: no 128 * rowsum correction */
    for (int r = 0; r < ROW_TILE; r++) {
        for (int h = 0; h < 4; h++) {
            float32x4_t key = vsubq_f32(vdupq_n_f32(t->bias[r]), vmulq_f32(vld1q_f32(cq + 4 * h), vcvtq_f32_s32(acc[r][h])));
            vst1q_f32(keys + r * QB + 4 * h, key);
            uint32x4_t lt = vcleq_f32(key, vld1q_f32(kth + 4 * h));
            uint32_t bits[4];
            vst1q_u32(bits, lt);
            for (int e = 0; e < 4; e++)
                if (bits[e]) mask |= (uint64_t)1 << (r * QB + 4 * h + e);
        }
    }
    return mask;
}
#endif

static int isa_supported(int isa) {
    switch (isa) {
    case ISA_SCALAR: return 1;
#ifdef ECS_X86
    case ISA_AVX2: __builtin_cpu_init(); return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case ISA_AVXVNNI: __builtin_cpu_init(); return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avxvnni");
    case ISA_AVX512VNNI:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vnni");
    case ISA_AMX: return isa_supported(ISA_AVX512VNNI) && amx_cpu() && amx_permitted();
#endif
#ifdef ECS_ARM
    case ISA_NEON: return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#endif
    default: return 0;
    }
}

static TileFn tile_fn(int isa) {
    switch (isa) {
#ifdef ECS_X86
    case ISA_AVX2: return tile_avx2;
    case ISA_AVXVNNI: return tile_avxvnni;
    case ISA_AVX512VNNI: return tile_avx512vnni;
#endif
#ifdef ECS_ARM
    case ISA_NEON: return tile_neon;
#endif
    default: return tile_scalar;
    }
}

/* ---- driver: query blocks split over threads, rows in L2-sized chunks -------------------------- */

typedef struct {
    const Ctx *c;
    int isa;
    int64_t qb0, qb1;
} Job;

/* Each lane's current k-th key (from the lists so far: the SIMD lists start empty); padded lanes and the
 * all-keys mode never hit. */
static void init_kth(const Ctx *c, int64_t qb0, int64_t nblocks, float *kth) {
    for (int64_t i = 0; i < nblocks * QB; i++) {
        int64_t q = qb0 * QB + i;
        kth[i] = c->all_keys || q >= c->nq ? -INFINITY : c->lists ? INFINITY : c->out_key[q * c->k + c->k - 1];
    }
}

static void *run_job(void *arg) {
    const Job *job = (const Job *)arg;
    const Ctx *c = job->c;
    TileFn tile = tile_fn(job->isa);
    int64_t nblocks = job->qb1 - job->qb0;
    float *kth = (float *)malloc(sizeof(float) * (size_t)(nblocks > 0 ? nblocks : 1) * QB);
    if (!kth) return (void *)1;
    init_kth(c, job->qb0, nblocks, kth);
    int64_t chunk = CHUNK_BYTES / (c->g * 4);
    chunk = chunk < ROW_TILE ? ROW_TILE : chunk - chunk % ROW_TILE;
    float keys[ROW_TILE * QB];
    Tile t;
    for (int64_t c0 = c->row_start + (c->m - 1 - c->row_start) / chunk * chunk; c0 >= c->row_start; c0 -= chunk) {
        int64_t c1 = c0 + chunk < c->m ? c0 + chunk : c->m; /* chunks last first (see take_hits) */
        for (int64_t qb = job->qb0; qb < job->qb1; qb++) {
            int64_t q0 = qb * QB;
            int lanes = (int)(c->nq - q0 < QB ? c->nq - q0 : QB);
            float *bkth = kth + (qb - job->qb0) * QB;
            for (int64_t m0 = c0; m0 < c1; m0 += ROW_TILE) {
                int valid = (int)(c1 - m0 < ROW_TILE ? c1 - m0 : ROW_TILE);
                for (int r = 0; r < ROW_TILE; r++) {
                    int ok = r < valid;
                    t.rp[r] = ok ? c->rows + (m0 + r) * c->stride : c->zero_row;
                    t.bias[r] = ok ? c->bias[m0 + r] : INFINITY;
                    t.corr[r] = ok ? c->corr[m0 + r] : 0;
                }
                uint64_t hits = tile(c, qb, &t, c->cq + q0, bkth, keys);
                if (c->all_keys)
                    store_keys(c, q0, lanes, m0, valid, keys);
                else
                    take_hits(c, q0, lanes, m0, valid, hits, keys, bkth);
            }
        }
    }
    free(kth);
    return NULL;
}

/* ---- pruned driver for the tile paths (AVX-VNNI, AVX2, NEON, scalar; AVX-512 with k > LIST_MAX) ----
 * run_job_512_pruned's bounds and order (see there) on one query block at a time: each query's nearest cluster
 * first, then every other cluster unless all 16 lanes' bounds exceed their k-th keys, the tiles comparing against
 * the k-th key capped by the nearest cluster's reach. The lists are run_job's, bit for bit. */
typedef void (*BoundsFn)(const Ctx *, int64_t, float *, int32_t *, float *);

/* One block's bounds in plain C (any order of the sums: the allowance below holds for every order):
 * low[j * 16 + h] <= ||c_j - x~_q||^2, first[h] the nearest cluster, top[h] >= lane h's final k-th key. */
static void cluster_bounds_c(const Ctx *c, int64_t qb, float *low, int32_t *first, float *top) {
    const Clusters *cl = c->cl;
    const int64_t p = cl->p, q0 = qb * QB;
    float xsq[QB], best[QB];
    for (int h = 0; h < QB; h++) {
        xsq[h] = 0.0f;
        best[h] = INFINITY;
        first[h] = -1;
        for (int64_t d = 0; q0 + h < c->nq && d < p; d++) xsq[h] += cl->xt[(q0 + h) * p + d] * cl->xt[(q0 + h) * p + d];
    }
    for (int64_t j = 0; j < cl->n; j++) {
        const float *cj = cl->center + j * p;
        for (int h = 0; h < QB; h++) {
            if (q0 + h >= c->nq) {
                low[j * QB + h] = INFINITY;
                continue;
            }
            const float *x = cl->xt + (q0 + h) * p;
            float dot = 0.0f;
            for (int64_t d = 0; d < p; d++) dot += cj[d] * x[d];
            float norms = cl->center_sq[j] + xsq[h], sq = norms - 2.0f * dot;
            if (sq < best[h]) {
                best[h] = sq;
                first[h] = (int32_t)j;
            }
            float lo = sq - 1e-5f * norms;
            low[j * QB + h] = (lo > 0.0f ? lo : 0.0f) * ((1.0f - 1e-5f) * (1.0f - 1e-5f));
        }
    }
    for (int h = 0; h < QB; h++) {
        if (first[h] < 0) {
            top[h] = INFINITY;
            continue;
        }
        int32_t j = first[h];
        float eps = 1e-5f * (cl->center_sq[j] + xsq[h]);
        float far = sqrtf((best[h] > 0.0f ? best[h] : 0.0f) + eps) * (1.0f + 1e-5f) + cl->cap_radius[j] + cl->margin[q0 + h];
        float sq = far * far * (1.0f + 1e-5f), lift = cl->lift[q0 + h];
        top[h] = sq - lift + 1e-5f * (sq + fabsf(lift));
    }
}

#ifdef ECS_X86
/* The same bounds with AVX2 + FMA: two 8-lane halves, four clusters per pass. */
__attribute__((target("avx2,fma")))
static void cluster_bounds_avx2(const Ctx *c, int64_t qb, float *low, int32_t *first, float *top) {
    const Clusters *cl = c->cl;
    const int64_t p = cl->p, q0 = qb * QB;
    __m256 xt[2][CL_MAX_DIMS], xsq[2], best[2];
    __m256i arg[2];
    float buf[QB];
    for (int64_t d = 0; d < p; d++) {
        for (int h = 0; h < QB; h++) buf[h] = q0 + h < c->nq ? cl->xt[(q0 + h) * p + d] : 0.0f;
        xt[0][d] = _mm256_loadu_ps(buf);
        xt[1][d] = _mm256_loadu_ps(buf + 8);
    }
    for (int h = 0; h < 2; h++) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t d = 0; d < p; d++) acc = _mm256_fmadd_ps(xt[h][d], xt[h][d], acc);
        xsq[h] = acc;
        best[h] = _mm256_set1_ps(INFINITY);
        arg[h] = _mm256_set1_epi32(-1);
    }
    const __m256 rel = _mm256_set1_ps(1e-5f), zero = _mm256_setzero_ps(), minus2 = _mm256_set1_ps(-2.0f);
    const __m256 shrink = _mm256_set1_ps((1.0f - 1e-5f) * (1.0f - 1e-5f));
    for (int64_t j0 = 0; j0 < cl->n; j0 += CL_GROUP) {
        const int count = cl->n - j0 < CL_GROUP ? (int)(cl->n - j0) : CL_GROUP;
        const float *cj[CL_GROUP];
        for (int u = 0; u < CL_GROUP; u++) cj[u] = cl->center + (j0 + (u < count ? u : 0)) * p;
        __m256 dot[CL_GROUP][2];
        for (int u = 0; u < CL_GROUP; u++) dot[u][0] = dot[u][1] = _mm256_setzero_ps();
        for (int64_t d = 0; d < p; d++)
            for (int u = 0; u < CL_GROUP; u++) {
                __m256 v = _mm256_broadcast_ss(cj[u] + d);
                dot[u][0] = _mm256_fmadd_ps(v, xt[0][d], dot[u][0]);
                dot[u][1] = _mm256_fmadd_ps(v, xt[1][d], dot[u][1]);
            }
        for (int u = 0; u < count; u++) {
            const int64_t j = j0 + u;
            const __m256 csq = _mm256_set1_ps(cl->center_sq[j]);
            for (int h = 0; h < 2; h++) {
                __m256 norms = _mm256_add_ps(csq, xsq[h]);
                __m256 sq = _mm256_fmadd_ps(minus2, dot[u][h], norms);
                __m256 nearer = _mm256_cmp_ps(sq, best[h], _CMP_LT_OQ);
                best[h] = _mm256_blendv_ps(best[h], sq, nearer);
                arg[h] = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(arg[h]),
                                                              _mm256_castsi256_ps(_mm256_set1_epi32((int32_t)j)), nearer));
                __m256 lo = _mm256_mul_ps(_mm256_max_ps(_mm256_fnmadd_ps(rel, norms, sq), zero), shrink);
                _mm256_storeu_ps(low + j * QB + 8 * h, lo);
            }
        }
    }
    int32_t nearest[QB];
    _mm256_storeu_si256((__m256i *)nearest, arg[0]);
    _mm256_storeu_si256((__m256i *)(nearest + 8), arg[1]);
    float nearest_sq[QB];
    _mm256_storeu_ps(nearest_sq, best[0]);
    _mm256_storeu_ps(nearest_sq + 8, best[1]);
    for (int h = 0; h < QB; h++) {
        int valid = q0 + h < c->nq;
        first[h] = valid ? nearest[h] : -1;
        if (!valid) {
            for (int64_t j = 0; j < cl->n; j++) low[j * QB + h] = INFINITY;
            top[h] = INFINITY;
            continue;
        }
        int32_t j = nearest[h];
        float x2 = 0.0f; /* the lane's ||x~||^2 as the vector sum gave it */
        float xs[8];
        _mm256_storeu_ps(xs, xsq[h / 8]);
        x2 = xs[h % 8];
        float eps = 1e-5f * (cl->center_sq[j] + x2);
        float b = nearest_sq[h] > 0.0f ? nearest_sq[h] : 0.0f;
        float far = sqrtf(b + eps) * (1.0f + 1e-5f) + cl->cap_radius[j] + cl->margin[q0 + h];
        float sq = far * far * (1.0f + 1e-5f), lift = cl->lift[q0 + h];
        top[h] = sq - lift + 1e-5f * (sq + fabsf(lift));
    }
}
#endif

static BoundsFn bounds_fn(int isa) {
#ifdef ECS_X86
    if (isa == ISA_AVX2 || isa == ISA_AVXVNNI || isa == ISA_AVX512VNNI || isa == ISA_AMX) return cluster_bounds_avx2;
#endif
    (void)isa;
    return cluster_bounds_c;
}

/* The rows ids[0 .. n) of one cluster (n a multiple of ROW_TILE; -1: no row) for query block qb. */
static void scan_ids(const Ctx *c, TileFn tile, int64_t qb, const int32_t *ids, int64_t n, float *kth, const float *top) {
    const int64_t q0 = qb * QB;
    const int lanes = (int)(c->nq - q0 < QB ? c->nq - q0 : QB);
    float keys[ROW_TILE * QB], cap[QB];
    Tile t;
    for (int l = 0; l < QB; l++) cap[l] = kth[l] < top[l] ? kth[l] : top[l];
    for (int64_t i = 0; i < n; i += ROW_TILE) {
        for (int r = 0; r < ROW_TILE; r++) {
            int32_t id = ids[i + r];
            t.rp[r] = id >= 0 ? c->rows + (int64_t)id * c->stride : c->zero_row;
            t.bias[r] = id >= 0 ? c->bias[id] : NAN; /* a NaN key is never a hit */
            t.corr[r] = id >= 0 ? c->corr[id] : 0;
        }
        uint64_t hits = tile(c, qb, &t, c->cq + q0, cap, keys);
        if (hits) {
            take_hits_of(c, q0, lanes, 0, ids + i, ROW_TILE, hits, keys, kth);
            for (int l = 0; l < QB; l++) cap[l] = kth[l] < top[l] ? kth[l] : top[l];
        }
    }
}

/* The squared distance from a cluster's centre beyond which none of its rows beats lane l's k-th key, less R_j:
 * need[l] = margin + sqrt(kth + shift, rounded up) (0 for padded lanes, whose k-th is -inf). */
static void lane_need(const Ctx *c, int64_t q0, const float *kth, const float *top, float *need) {
    const Clusters *cl = c->cl;
    for (int l = 0; l < QB; l++) {
        if (q0 + l >= c->nq) {
            need[l] = 0.0f;
            continue;
        }
        float k = kth[l] < top[l] ? kth[l] : top[l], shift = cl->shift[q0 + l];
        float t = k + shift;
        t = t + 1e-5f * (fabsf(k) + fabsf(shift));
        need[l] = sqrtf(t > 0.0f ? t : 0.0f) * (1.0f + 1e-6f) + cl->margin[q0 + l];
    }
}

static void *run_job_pruned(void *arg) {
    const Job *job = (const Job *)arg;
    const Ctx *c = job->c;
    const Clusters *cl = c->cl;
    TileFn tile = tile_fn(job->isa);
    BoundsFn bounds = bounds_fn(job->isa);
    const int64_t blocks = (c->nq + QB - 1) / QB;
    float *low = (float *)malloc(sizeof(float) * (size_t)cl->n * QB);
    uint8_t *seen = (uint8_t *)malloc((size_t)cl->n);
    if (!low || !seen) {
        free(low); free(seen);
        return (void *)1;
    }
    for (int64_t qb; (qb = atomic_fetch_add(cl->next, 1)) < blocks;) {
        const int64_t q0 = qb * QB;
        float kth[QB], top[QB], need[QB];
        int32_t first[QB];
        init_kth(c, qb, 1, kth);
        bounds(c, qb, low, first, top);
        memset(seen, 0, (size_t)cl->n);
        for (int h = 0; h < QB; h++) {
            int32_t j = first[h];
            if (j < 0 || seen[j]) continue;
            seen[j] = 1;
            scan_ids(c, tile, qb, cl->member + cl->start[j], cl->start[j + 1] - cl->start[j], kth, top);
        }
        lane_need(c, q0, kth, top, need);
        for (int64_t j = 0; j < cl->n; j++) {
            if (seen[j]) continue;
            const float *lo = low + j * QB;
            int l = 0;
            for (; l < QB; l++) {
                float t = cl->radius[j] + need[l];
                if (!(lo[l] > t * t * (1.0f + 1e-6f))) break;
            }
            if (l == QB) continue; /* no row of it can beat any lane's k-th */
            scan_ids(c, tile, qb, cl->member + cl->start[j], cl->start[j + 1] - cl->start[j], kth, top);
            lane_need(c, q0, kth, top, need);
        }
    }
    free(low); free(seen);
    return NULL;
}

#ifdef ECS_X86
__attribute__((target("avx512f")))
static void amx_consume_listed(const Ctx *c, int64_t q0, int lanes, int64_t m0, const int32_t *dots, float *kth);
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void pair_row_tail_512(const Ctx *c, int64_t qb, int64_t m, float *kth);

/* The AMX driver: whole 16-row blocks by tiles, two query blocks at a time (the caller pads the block
 * count to even); the rows past the last multiple of 16 by AVX-512. With the AVX-512 lists (k <= LIST_MAX)
 * the hits go into them as in run_job_512 (Lite0 bottle: the scalar insertion cost as much as the tiles). */
static void *run_job_amx(void *arg) {
    const Job *job = (const Job *)arg;
    const Ctx *c = job->c;
    int64_t nblocks = job->qb1 - job->qb0;
    float *kth = (float *)malloc(sizeof(float) * (size_t)(nblocks > 0 ? nblocks : 1) * QB);
    int32_t *dots = (int32_t *)aligned_alloc(64, sizeof(int32_t) * 2 * 4 * AMX_ROWS * QB); /* two steps' */
    if (!kth || !dots) {
        free(kth); free(dots);
        return (void *)1;
    }
    int listed = c->lists != NULL;
    init_kth(c, job->qb0, nblocks, kth);
    amx_configure();
    const int64_t step = 2 * AMX_ROWS;
    int64_t chunk = CHUNK_BYTES / (c->g * 4);
    chunk = chunk < step ? step : chunk - chunk % step;
    int64_t whole = c->m - c->m % AMX_ROWS;
    float keys[AMX_ROWS * QB];
    for (int64_t c0 = whole > 0 ? (whole - 1) / chunk * chunk : -1; c0 >= 0; c0 -= chunk) {
        int64_t c1 = c0 + chunk < whole ? c0 + chunk : whole; /* chunks last first (see take_hits) */
        for (int64_t qb = job->qb0; qb < job->qb1; qb += 2) {
            /* one step behind: the tiles of step m0 are issued before the AVX-512 work on step m0 - 32's dots,
             * so the two overlap (the tile unit and the vector ports are separate) */
            int64_t pending = -1;
            for (int64_t m0 = c0;; m0 += step) {
                int32_t *cur = dots + (m0 - c0) / step % 2 * 4 * AMX_ROWS * QB;
                int more = m0 < c1;
                if (more) {
                    if (c1 - m0 >= step)
                        amx_step32(c, qb, m0, cur);
                    else
                        amx_step16(c, qb, m0, cur);
                }
                if (pending >= 0) {
                    const int32_t *done = dots + (pending - c0) / step % 2 * 4 * AMX_ROWS * QB;
                    int blocks = c1 - pending >= step ? 2 : 1;
                    for (int rb = 0; rb < blocks; rb++)
                        for (int h = 0; h < 2; h++) {
                            int64_t q0 = (qb + h) * QB;
                            if (q0 >= c->nq) continue;
                            int lanes = (int)(c->nq - q0 < QB ? c->nq - q0 : QB);
                            const int32_t *d = done + (rb * 2 + h) * AMX_ROWS * QB;
                            float *bkth = kth + (qb + h - job->qb0) * QB;
                            if (listed)
                                amx_consume_listed(c, q0, lanes, pending + rb * AMX_ROWS, d, bkth);
                            else
                                amx_consume(c, q0, lanes, pending + rb * AMX_ROWS, d, bkth, keys);
                        }
                }
                if (!more) break;
                pending = m0;
            }
        }
    }
    amx_release();
    for (int64_t m = whole; listed && m < c->m; m++) /* the last m % 16 rows */
        for (int64_t qb = job->qb0; qb < job->qb1; qb += 2) pair_row_tail_512(c, qb, m, kth + (qb - job->qb0) * QB);
    free(dots);
    free(kth);
    if (!listed && whole < c->m) { /* the last m % 16 rows */
        Ctx rest = *c;
        Job tail = *job;
        tail.isa = ISA_AVX512VNNI;
        tail.c = &rest;
        rest.row_start = whole;
        return run_job(&tail);
    }
    return NULL;
}

/* ---- AVX-512 VNNI top-k driver (k <= LIST_MAX) ----
 * A top-k over unordered rows takes ~k (1 + ln(M / k)) insertions per query (228 per bottle WRN50 patch at
 * k = 32), and the scalar sorted insertion (~k/2 moves, a call that makes the compiler spill every live
 * zmm) cost as much as the dot products. Here each query's list is 32 (key, row) pairs in two zmm-sized
 * rows of memory, an insertion is one compare, one two-source permute and two blends, and it is inlined
 * into the scan (no call, the k-th keys stay in registers). Two query blocks x PAIR_ROWS rows per step:
 * each row dword broadcast feeds both blocks, 16 accumulators in flight. The dots, the keys and the
 * (key, row) order are those of the other paths: the results are bit-identical. */
#define PAIR_ROWS 8

typedef struct List32 {
    float key[LIST_MAX];   /* ascending by (key, row); empty slots +inf */
    int32_t row[LIST_MAX]; /* empty slots INT32_MAX, so any real (key, row) comes first */
} List32;

/* Inserts (key, row) into the first 16 entries of a sorted list it belongs in (k <= 16: the rest are never read). */
__attribute__((target("avx512f"), always_inline))
static inline void list_insert16(List32 *list, float key, int32_t row) {
    static const int32_t shift_lo[16] = {0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14};
    __m512 k0 = _mm512_loadu_ps(list->key);
    __m512i r0 = _mm512_loadu_si512((const void *)list->row);
    __m512 vk = _mm512_set1_ps(key);
    __m512i vr = _mm512_set1_epi32(row);
    __mmask16 b0 = _mm512_cmp_ps_mask(k0, vk, _CMP_LT_OQ) |
                   (_mm512_cmp_ps_mask(k0, vk, _CMP_EQ_OQ) & _mm512_cmplt_epi32_mask(r0, vr));
    __mmask16 at0 = (__mmask16)((b0 + 1u) & ~(unsigned)b0);
    __m512i lo = _mm512_loadu_si512((const void *)shift_lo);
    __m512 s0 = _mm512_permutexvar_ps(lo, k0);
    __m512i t0 = _mm512_permutexvar_epi32(lo, r0);
    _mm512_storeu_ps(list->key, _mm512_mask_mov_ps(_mm512_mask_blend_ps(b0, s0, k0), at0, vk));
    _mm512_storeu_si512((void *)list->row, _mm512_mask_mov_epi32(_mm512_mask_blend_epi32(b0, t0, r0), at0, vr));
}

/* Inserts (key, row) into a sorted list it belongs in (it beats the last entry kept). */
__attribute__((target("avx512f"), always_inline))
static inline void list_insert(List32 *list, float key, int32_t row) {
    static const int32_t shift_lo[16] = {0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14};
    static const int32_t shift_hi[16] = {15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30};
    __m512 k0 = _mm512_loadu_ps(list->key), k1 = _mm512_loadu_ps(list->key + 16);
    __m512i r0 = _mm512_loadu_si512((const void *)list->row), r1 = _mm512_loadu_si512((const void *)(list->row + 16));
    __m512 vk = _mm512_set1_ps(key);
    __m512i vr = _mm512_set1_epi32(row);
    /* entries before (key, row): a prefix of the list */
    __mmask16 b0 = _mm512_cmp_ps_mask(k0, vk, _CMP_LT_OQ) |
                   (_mm512_cmp_ps_mask(k0, vk, _CMP_EQ_OQ) & _mm512_cmplt_epi32_mask(r0, vr));
    __mmask16 b1 = _mm512_cmp_ps_mask(k1, vk, _CMP_LT_OQ) |
                   (_mm512_cmp_ps_mask(k1, vk, _CMP_EQ_OQ) & _mm512_cmplt_epi32_mask(r1, vr));
    __mmask16 at0 = (__mmask16)((b0 + 1u) & ~(unsigned)b0);                  /* the new entry's lane, if in 0..15 */
    __mmask16 at1 = b0 == 0xFFFF ? (__mmask16)((b1 + 1u) & ~(unsigned)b1) : 0; /* or in 16..31 */
    __m512i lo = _mm512_loadu_si512((const void *)shift_lo), hi = _mm512_loadu_si512((const void *)shift_hi);
    __m512 s0 = _mm512_permutex2var_ps(k0, lo, k1), s1 = _mm512_permutex2var_ps(k0, hi, k1);
    __m512i t0 = _mm512_permutex2var_epi32(r0, lo, r1), t1 = _mm512_permutex2var_epi32(r0, hi, r1);
    _mm512_storeu_ps(list->key, _mm512_mask_mov_ps(_mm512_mask_blend_ps(b0, s0, k0), at0, vk));
    _mm512_storeu_ps(list->key + 16, _mm512_mask_mov_ps(_mm512_mask_blend_ps(b1, s1, k1), at1, vk));
    _mm512_storeu_si512((void *)list->row, _mm512_mask_mov_epi32(_mm512_mask_blend_epi32(b0, t0, r0), at0, vr));
    _mm512_storeu_si512((void *)(list->row + 16), _mm512_mask_mov_epi32(_mm512_mask_blend_epi32(b1, t1, r1), at1, vr));
}

/* The hits of one row for one query block: returns the block's k-th keys, updated. */
__attribute__((target("avx512f"), always_inline))
static inline __m512 list_hits(const Ctx *c, int64_t q0, int lanes, int32_t row, __mmask16 hits, __m512 key,
                               __m512 kth) {
    float keys[QB];
    _mm512_storeu_ps(keys, key);
    while (hits) {
        int l = __builtin_ctz(hits);
        hits &= hits - 1;
        if (l >= lanes) break; /* padded lanes (their k-th is -inf: never here) */
        List32 *list = c->lists + q0 + l;
        int64_t last = c->k - 1;
        float kk = list->key[last];
        if (!(keys[l] < kk || (keys[l] == kk && row < list->row[last]))) continue; /* an earlier hit moved it */
        if (last < 16) /* half the work: bottle WRN50's k = 8 */
            list_insert16(list, keys[l], row);
        else
            list_insert(list, keys[l], row);
        kth = _mm512_mask_mov_ps(kth, (__mmask16)(1u << l), _mm512_set1_ps(list->key[last]));
    }
    return kth;
}

/* n rows (a multiple of PAIR_ROWS) for a pair of query blocks: rows m0 .. m0 + n where ids is NULL, else the rows
 * ids[0 .. n) (id -1: no row, its key NaN: never a hit). Where top is given, each lane's compare threshold is its
 * list's k-th key or top, whichever is lower (run_job_512_pruned's cap: a key above the lane's final k-th never
 * reaches its list, and the list itself is unchanged). Inlined with ids / top constant, so each caller's loop
 * has no test for the other's case. */
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline))
static inline void pair_group_512(const Ctx *c, int64_t qb, const int32_t *ids, int64_t m0, int64_t n, float *kth,
                                  const float *top, const int64_t g) {
    const uint8_t *qp0 = c->qpack + qb * c->g * QB * 4, *qp1 = qp0 + c->g * QB * 4;
    const int64_t q0 = qb * QB, q1 = q0 + QB;
    const int lanes0 = (int)(c->nq - q0 < QB ? c->nq - q0 : QB);
    const int lanes1 = (int)(c->nq <= q1 ? 0 : c->nq - q1 < QB ? c->nq - q1 : QB);
    const __m512 vcq0 = _mm512_loadu_ps(c->cq + q0), vcq1 = _mm512_loadu_ps(c->cq + q1);
    const __m512 top0 = top ? _mm512_loadu_ps(top) : _mm512_set1_ps(INFINITY);
    const __m512 top1 = top ? _mm512_loadu_ps(top + QB) : _mm512_set1_ps(INFINITY);
    __m512 vk0 = _mm512_loadu_ps(kth), vk1 = _mm512_loadu_ps(kth + QB);
    if (top) {
        vk0 = _mm512_min_ps(vk0, top0);
        vk1 = _mm512_min_ps(vk1, top1);
    }
    for (int64_t i = 0; i < n; i += PAIR_ROWS) {
        const int8_t *rp[PAIR_ROWS];
        float listed_bias[PAIR_ROWS];
        int32_t listed_corr[PAIR_ROWS];
        const float *bias = c->bias + m0 + i; /* contiguous rows: the tables themselves */
        const int32_t *corr = c->corr + m0 + i;
        if (ids) {
            for (int r = 0; r < PAIR_ROWS; r++) {
                int32_t id = ids[i + r];
                rp[r] = id >= 0 ? c->rows + (int64_t)id * c->stride : c->zero_row;
                listed_bias[r] = id >= 0 ? c->bias[id] : NAN;
                listed_corr[r] = id >= 0 ? c->corr[id] : 0;
            }
            bias = listed_bias;
            corr = listed_corr;
        } else {
            for (int r = 0; r < PAIR_ROWS; r++) rp[r] = c->rows + (m0 + i + r) * c->stride;
        }
        const int8_t *r0 = rp[0], *r1 = rp[1], *r2 = rp[2], *r3 = rp[3], *r4 = rp[4], *r5 = rp[5], *r6 = rp[6], *r7 = rp[7];
        /* named accumulators, not an array: GCC keeps an asm operand array in memory when the loop stays rolled.
         * 16 chains: vpdpbusd zmm has a 4-5 cycle latency and issues on two ports (8 rows: Lite0 4.9 ms vs 6.0 at 4) */
        /* each row's accumulators start at -corr (128 * its row sum), so they end as the exact dots: the u8 bias is
         * undone once per row instead of once per row and block */
        __m512i a00 = _mm512_set1_epi32(-corr[0]), a01 = a00, a10 = _mm512_set1_epi32(-corr[1]), a11 = a10;
        __m512i a20 = _mm512_set1_epi32(-corr[2]), a21 = a20, a30 = _mm512_set1_epi32(-corr[3]), a31 = a30;
        __m512i a40 = _mm512_set1_epi32(-corr[4]), a41 = a40, a50 = _mm512_set1_epi32(-corr[5]), a51 = a50;
        __m512i a60 = _mm512_set1_epi32(-corr[6]), a61 = a60, a70 = _mm512_set1_epi32(-corr[7]), a71 = a70;
        for (int64_t j = 0; j < g; j++) {
            const __m512i a = _mm512_loadu_si512((const void *)(qp0 + j * QB * 4));
            const __m512i b = _mm512_loadu_si512((const void *)(qp1 + j * QB * 4));
#define ROW_STEP(n)                                                \
    do {                                                           \
        __m512i w = _mm512_set1_epi32(load_dword(r##n + 4 * j));   \
        DPBUSD512(a##n##0, a, w);                                  \
        DPBUSD512(a##n##1, b, w);                                  \
    } while (0)
            ROW_STEP(0); ROW_STEP(1); ROW_STEP(2); ROW_STEP(3); ROW_STEP(4); ROW_STEP(5); ROW_STEP(6); ROW_STEP(7);
#undef ROW_STEP
        }
        const __m512i acc[PAIR_ROWS][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31},
                                           {a40, a41}, {a50, a51}, {a60, a61}, {a70, a71}};
        for (int r = 0; r < PAIR_ROWS; r++) {
            __m512 key0 = keys512_exact(acc[r][0], bias[r], vcq0);
            __m512 key1 = keys512_exact(acc[r][1], bias[r], vcq1);
            __mmask16 hit0 = _mm512_cmp_ps_mask(key0, vk0, _CMP_LE_OQ), hit1 = _mm512_cmp_ps_mask(key1, vk1, _CMP_LE_OQ);
            const int32_t row = ids ? ids[i + r] : (int32_t)(m0 + i + r);
            if (__builtin_expect(hit0 != 0, 0)) {
                vk0 = list_hits(c, q0, lanes0, row, hit0, key0, vk0);
                if (top) vk0 = _mm512_min_ps(vk0, top0);
            }
            if (__builtin_expect(hit1 != 0, 0)) {
                vk1 = list_hits(c, q1, lanes1, row, hit1, key1, vk1);
                if (top) vk1 = _mm512_min_ps(vk1, top1);
            }
        }
    }
    _mm512_storeu_ps(kth, vk0);
    _mm512_storeu_ps(kth + QB, vk1);
}

__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void pair_rows_512_any(const Ctx *c, int64_t qb, int64_t m0, int64_t m1, float *kth) {
    switch (c->g) { /* constant trip counts: WRN50's 32-d projections, Lite0's 152 codes + 8 coordinates */
    case 8: pair_group_512(c, qb, NULL, m0, m1 - m0, kth, NULL, 8); break;
    case 40: pair_group_512(c, qb, NULL, m0, m1 - m0, kth, NULL, 40); break;
    default: pair_group_512(c, qb, NULL, m0, m1 - m0, kth, NULL, c->g);
    }
}

/* The AMX driver's hits of 16 rows x one block's 16 query lanes, into the lists. */
__attribute__((target("avx512f")))
static void amx_consume_listed(const Ctx *c, int64_t q0, int lanes, int64_t m0, const int32_t *dots, float *kth) {
    const __m512 vcq = _mm512_loadu_ps(c->cq + q0);
    __m512 vk = _mm512_loadu_ps(kth);
    for (int r = 0; r < AMX_ROWS; r++) {
        __m512 key = keys512_exact(_mm512_loadu_si512((const void *)(dots + r * QB)), c->bias[m0 + r], vcq);
        __mmask16 hit = _mm512_cmp_ps_mask(key, vk, _CMP_LE_OQ);
        if (__builtin_expect(hit != 0, 0)) vk = list_hits(c, q0, lanes, (int32_t)(m0 + r), hit, key, vk);
    }
    _mm512_storeu_ps(kth, vk);
}

/* One row past the last whole PAIR_ROWS group, for both blocks of a pair. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void pair_row_tail_512(const Ctx *c, int64_t qb, int64_t m, float *kth) {
    const int8_t *rp = c->rows + m * c->stride;
    for (int h = 0; h < 2; h++) {
        const uint8_t *qp = c->qpack + (qb + h) * c->g * QB * 4;
        int64_t q0 = (qb + h) * QB;
        int lanes = (int)(c->nq <= q0 ? 0 : c->nq - q0 < QB ? c->nq - q0 : QB);
        __m512i acc = _mm512_setzero_si512();
        for (int64_t j = 0; j < c->g; j++)
            DPBUSD512(acc, _mm512_loadu_si512((const void *)(qp + j * QB * 4)), _mm512_set1_epi32(load_dword(rp + 4 * j)));
        __m512 key = keys512(acc, c->corr[m], c->bias[m], _mm512_loadu_ps(c->cq + q0));
        __m512 vk = _mm512_loadu_ps(kth + h * QB);
        __mmask16 hit = _mm512_cmp_ps_mask(key, vk, _CMP_LE_OQ);
        if (hit) _mm512_storeu_ps(kth + h * QB, list_hits(c, q0, lanes, (int32_t)m, hit, key, vk));
    }
}

/* The driver (the caller pads the block count to even and fills the lists with empty slots): rows in
 * L2-sized chunks, last first, as run_job. */
__attribute__((target("avx512f")))
static void *run_job_512(void *arg) {
    const Job *job = (const Job *)arg;
    const Ctx *c = job->c;
    int64_t nblocks = job->qb1 - job->qb0;
    float *kth = (float *)malloc(sizeof(float) * (size_t)(nblocks > 0 ? nblocks : 1) * QB);
    if (!kth) return (void *)1;
    init_kth(c, job->qb0, nblocks, kth);
    int64_t chunk = CHUNK_BYTES / (c->g * 4);
    chunk = chunk < PAIR_ROWS ? PAIR_ROWS : chunk - chunk % PAIR_ROWS;
    for (int64_t c0 = (c->m - 1) / chunk * chunk; c0 >= 0; c0 -= chunk) {
        int64_t c1 = c0 + chunk < c->m ? c0 + chunk : c->m;
        int64_t body = c0 + (c1 - c0) / PAIR_ROWS * PAIR_ROWS;
        for (int64_t qb = job->qb0; qb < job->qb1; qb += 2) {
            float *bkth = kth + (qb - job->qb0) * QB;
            pair_rows_512_any(c, qb, c0, body, bkth);
            for (int64_t m = body; m < c1; m++) pair_row_tail_512(c, qb, m, bkth);
        }
    }
    free(kth);
    return NULL;
}
/* ---- pruned AVX-512 driver (k <= LIST_MAX): rows in clusters, whole clusters skipped by a bound ----
 * Why: coarse mode's candidate stage compares every query with every row (bottle WRN50: 784 x 14 739 x 32
 * multiply-adds, 1.4-1.8 of the search's 3.6-4.6 ms), yet a query's k nearest lie in a few clusters of the rows.
 * The keys are those of the other paths, key = ||y - x~||^2 - N_q in exact arithmetic (x~: the query as its
 * int8 codes and scale represent it; N_q: a per-query constant), so for a cluster of centre c and radius R every
 * row's float key is at least (||c - x~|| - R)^2 - shift_q, where shift_q = N_q plus the float32 rounding of the
 * key (the caller's, rounded up). A pair of query blocks first scans each query's nearest cluster, then every
 * other cluster unless all 32 lanes' bounds exceed their k-th key; a skipped row cannot enter a list (its key is
 * above the k-th, which only falls), so the lists are the full scan's, bit for bit. */


__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void pair_ids_512_any(const Ctx *c, int64_t qb, const int32_t *ids, int64_t n, float *kth, const float *top) {
    if (c->g == 8)
        pair_group_512(c, qb, ids, 0, n, kth, top, 8); /* WRN50's 32-d projections */
    else
        pair_group_512(c, qb, ids, 0, n, kth, top, c->g);
}

/* Lane masks of the pair's real queries (padded lanes: 0). */
static inline __mmask16 lanes_mask(int64_t nq, int64_t q0) {
    int64_t n = nq - q0;
    return n >= QB ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

/* low[j * 32 + h] = a lower bound of ||c_j - x~_q||^2 for the pair's lane h (q = qb * 16 + h; +inf for a padded
 * lane), first[h] the cluster nearest to lane h (-1: padded), and top[h] an upper bound of lane h's k-th smallest
 * key: every key of the nearest cluster, when it has at least k rows, is at most (||c_j - x~_q|| + R_j)^2 - lift_q.
 * ||c - x~||^2 is ||c||^2 + ||x~||^2 - 2 c . x~: one fused multiply-add per dimension and lane; its float32 error is
 * below (p + 3) 2^-24 (||c||^2 + ||x~||^2 + 2 |c . x~|) <= 1e-5 (||c||^2 + ||x~||^2) for p <= 64, taken off the
 * lower bound and added to the upper. No square root per cluster (the stage was bound by them): the caller
 * compares squares. */
__attribute__((target("avx512f")))
static void cluster_bounds(const Ctx *c, int64_t qb, float *low, int32_t *first, float *top) {
    const Clusters *cl = c->cl;
    const int64_t p = cl->p;
    __m512 xt[2][CL_MAX_DIMS];
    __mmask16 in[2];
    __m512 xsq[2], best[2];
    __m512i arg[2];
    for (int h = 0; h < 2; h++) {
        int64_t q0 = (qb + h) * QB;
        in[h] = lanes_mask(c->nq, q0);
        const __m512i lane_q = _mm512_add_epi32(_mm512_set1_epi32((int32_t)q0),
                                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
        const __m512i at = _mm512_mullo_epi32(lane_q, _mm512_set1_epi32((int32_t)p));
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d = 0; d < p; d++) {
            xt[h][d] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), in[h], at, cl->xt + d, 4);
            acc = _mm512_fmadd_ps(xt[h][d], xt[h][d], acc);
        }
        xsq[h] = acc;
        best[h] = _mm512_set1_ps(INFINITY);
        arg[h] = _mm512_setzero_si512();
    }
    const __m512 inf = _mm512_set1_ps(INFINITY), rel = _mm512_set1_ps(1e-5f), zero = _mm512_setzero_ps();
    const __m512 minus2 = _mm512_set1_ps(-2.0f), shrink = _mm512_set1_ps((1.0f - 1e-5f) * (1.0f - 1e-5f));
    /* four clusters at a time: eight independent multiply-add chains (one chain per cluster waited on its latency) */
    for (int64_t j0 = 0; j0 < cl->n; j0 += CL_GROUP) {
        const int count = cl->n - j0 < CL_GROUP ? (int)(cl->n - j0) : CL_GROUP;
        const float *cj[CL_GROUP];
        for (int u = 0; u < CL_GROUP; u++) cj[u] = cl->center + (j0 + (u < count ? u : 0)) * p;
        __m512 dot[CL_GROUP][2];
        for (int u = 0; u < CL_GROUP; u++) dot[u][0] = dot[u][1] = _mm512_setzero_ps();
        for (int64_t d = 0; d < p; d++) {
            const __m512 x0 = xt[0][d], x1 = xt[1][d];
            for (int u = 0; u < CL_GROUP; u++) {
                __m512 v = _mm512_set1_ps(cj[u][d]);
                dot[u][0] = _mm512_fmadd_ps(v, x0, dot[u][0]);
                dot[u][1] = _mm512_fmadd_ps(v, x1, dot[u][1]);
            }
        }
        for (int u = 0; u < count; u++) {
            const int64_t j = j0 + u;
            const __m512 csq = _mm512_set1_ps(cl->center_sq[j]);
            for (int h = 0; h < 2; h++) {
                __m512 norms = _mm512_add_ps(csq, xsq[h]);
                __m512 sq = _mm512_fmadd_ps(minus2, dot[u][h], norms);
                __mmask16 nearer = _mm512_mask_cmp_ps_mask(in[h], sq, best[h], _CMP_LT_OQ);
                best[h] = _mm512_mask_mov_ps(best[h], nearer, sq);
                arg[h] = _mm512_mask_mov_epi32(arg[h], nearer, _mm512_set1_epi32((int32_t)j));
                __m512 lo = _mm512_mul_ps(_mm512_max_ps(_mm512_fnmadd_ps(rel, norms, sq), zero), shrink);
                _mm512_storeu_ps(low + j * 2 * QB + h * QB, _mm512_mask_mov_ps(inf, in[h], lo));
            }
        }
    }
    const __m512 grow = _mm512_set1_ps(1.0f + 1e-5f);
    for (int h = 0; h < 2; h++) {
        int64_t q0 = (qb + h) * QB;
        _mm512_storeu_si512((void *)(first + h * QB), _mm512_mask_mov_epi32(_mm512_set1_epi32(-1), in[h], arg[h]));
        /* the nearest cluster's reach (+inf where it has fewer than k rows), rounded up, less lift */
        __m512 csq = _mm512_mask_i32gather_ps(zero, in[h], arg[h], cl->center_sq, 4);
        __m512 cap = _mm512_mask_i32gather_ps(zero, in[h], arg[h], cl->cap_radius, 4);
        __m512 eps = _mm512_mul_ps(rel, _mm512_add_ps(csq, xsq[h]));
        __m512 far = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(_mm512_add_ps(_mm512_max_ps(best[h], zero), eps)), grow), cap),
                                   _mm512_maskz_loadu_ps(in[h], cl->margin + q0));
        __m512 sq = _mm512_mul_ps(_mm512_mul_ps(far, far), grow);
        __m512 lift = _mm512_maskz_loadu_ps(in[h], cl->lift + q0);
        __m512 t = _mm512_add_ps(_mm512_sub_ps(sq, lift), _mm512_mul_ps(rel, _mm512_add_ps(sq, _mm512_abs_ps(lift))));
        _mm512_storeu_ps(top + h * QB, _mm512_mask_mov_ps(inf, in[h], t));
    }
}

/* The smallest distance to x~ a row can have and still beat lane h's k-th key, rounded up (kth + shift: the
 * squared distance bound; padded lanes, whose k-th is -inf: 0). */
__attribute__((target("avx512f")))
static inline __m512 reach512(__m512 kth, __m512 shift) {
    __m512 t = _mm512_add_ps(kth, shift);
    __m512 slack = _mm512_mul_ps(_mm512_set1_ps(1e-5f), _mm512_add_ps(_mm512_abs_ps(kth), _mm512_abs_ps(shift)));
    t = _mm512_max_ps(_mm512_add_ps(t, slack), _mm512_setzero_ps()); /* a padded lane's -inf + inf (NaN): 0 */
    return _mm512_mul_ps(_mm512_sqrt_ps(t), _mm512_set1_ps(1.0f + 1e-6f));
}

/* Pairs of query blocks are taken one at a time from a shared counter (how many clusters a pair skips depends on
 * its part of the image, so fixed halves left one thread waiting). */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void *run_job_512_pruned(void *arg) {
    const Job *job = (const Job *)arg;
    const Ctx *c = job->c;
    const Clusters *cl = c->cl;
    const int64_t pairs = (c->nq + 2 * QB - 1) / (2 * QB);
    float *low = (float *)malloc(sizeof(float) * (size_t)cl->n * 2 * QB);
    uint8_t *seen = (uint8_t *)malloc((size_t)cl->n);
    if (!low || !seen) {
        free(low); free(seen);
        return (void *)1;
    }
    for (int64_t pair; (pair = atomic_fetch_add(cl->next, 1)) < pairs;) {
        const int64_t qb = 2 * pair;
        float kth[2 * QB], top[2 * QB];
        int32_t first[2 * QB];
        init_kth(c, qb, 2, kth);
        cluster_bounds(c, qb, low, first, top);
        memset(seen, 0, (size_t)cl->n);
        for (int h = 0; h < 2 * QB; h++) { /* each query's nearest cluster first: the k-th keys fall at once */
            int32_t j = first[h];
            if (j < 0 || seen[j]) continue;
            seen[j] = 1;
            pair_ids_512_any(c, qb, cl->member + cl->start[j], cl->start[j + 1] - cl->start[j], kth, top);
        }
        __mmask16 in0 = lanes_mask(c->nq, qb * QB), in1 = lanes_mask(c->nq, (qb + 1) * QB);
        __m512 shift0 = _mm512_maskz_loadu_ps(in0, cl->shift + qb * QB), shift1 = _mm512_maskz_loadu_ps(in1, cl->shift + (qb + 1) * QB);
        const __m512 margin0 = _mm512_maskz_loadu_ps(in0, cl->margin + qb * QB);
        const __m512 margin1 = _mm512_maskz_loadu_ps(in1, cl->margin + (qb + 1) * QB);
        /* a row of cluster j can beat lane h's k-th key only if ||c_j - x~||^2 <= (R_j + margin + reach)^2 */
        __m512 need0 = _mm512_add_ps(reach512(_mm512_loadu_ps(kth), shift0), margin0);
        __m512 need1 = _mm512_add_ps(reach512(_mm512_loadu_ps(kth + QB), shift1), margin1);
        const __m512 grow = _mm512_set1_ps(1.0f + 1e-6f);
        for (int64_t j = 0; j < cl->n; j++) {
            if (seen[j]) continue;
            __m512 rj = _mm512_set1_ps(cl->radius[j]);
            __m512 t0 = _mm512_add_ps(rj, need0), t1 = _mm512_add_ps(rj, need1);
            __mmask16 out0 = _mm512_cmp_ps_mask(_mm512_loadu_ps(low + j * 2 * QB), _mm512_mul_ps(_mm512_mul_ps(t0, t0), grow), _CMP_GT_OQ);
            __mmask16 out1 = _mm512_cmp_ps_mask(_mm512_loadu_ps(low + j * 2 * QB + QB), _mm512_mul_ps(_mm512_mul_ps(t1, t1), grow), _CMP_GT_OQ);
            if ((__mmask16)(out0 & out1) == (__mmask16)0xFFFF) continue; /* no row of it can beat any lane's k-th */
            pair_ids_512_any(c, qb, cl->member + cl->start[j], cl->start[j + 1] - cl->start[j], kth, top);
            need0 = _mm512_add_ps(reach512(_mm512_loadu_ps(kth), shift0), margin0);
            need1 = _mm512_add_ps(reach512(_mm512_loadu_ps(kth + QB), shift1), margin1);
        }
    }
    free(low); free(seen);
    return NULL;
}
#endif


/* ---- public entry points --------------------------------------------------------------------- */

/* The path that runs `isa` on rows of `width` bytes: AMX only from 64-byte rows (a tile step is 64 bytes of K;
 * on coarse mode's 32-byte projections a 32-byte step timed even with AVX-512 VNNI, 4.3 vs 4.5 ms: the list
 * insertions decide there, not the dots). */
int ecs_effective_isa(int isa, int64_t width) { return isa == ISA_AMX && width < 64 ? ISA_AVX512VNNI : isa; }

/* Name of an ISA id ("scalar", "avx2", ...), or NULL when out of range. */
const char *ecs_isa_name(int isa) { return isa >= 0 && isa < ISA_COUNT ? ISA_NAMES[isa] : NULL; }

/* 1 when this build has the path and the CPU runs it. */
/* Cached per ISA (0 unknown, 1 no, 2 yes): every entry point checks its path, and the AMX check runs cpuid, which
 * a VM traps (~20 us a call on the Xeon VM: 8 % of the certification's exact search). */
int ecs_isa_supported(int isa) {
    static _Atomic int known[ISA_COUNT];
    if (isa < 0 || isa >= ISA_COUNT) return 0;
    int state = atomic_load_explicit(&known[isa], memory_order_relaxed);
    if (!state) {
        state = isa_supported(isa) ? 2 : 1;
        atomic_store_explicit(&known[isa], state, memory_order_relaxed);
    }
    return state == 2;
}

/* The fastest supported path. */
int ecs_best_isa(void) {
    static const int order[] = {ISA_AMX, ISA_AVX512VNNI, ISA_AVXVNNI, ISA_AVX2, ISA_NEON};
    for (size_t i = 0; i < sizeof(order) / sizeof(order[0]); i++)
        if (isa_supported(order[i])) return order[i];
    return ISA_SCALAR;
}

/* ---- threads: a persistent pool -------------------------------------------------------------
 *
 * Why: a search makes four or five threaded calls per image (projection, top-k, ranking, measure), and a
 * pthread_create + join costs ~40 us here, with the new thread starting its half that much late; bottle
 * WRN50's whole search is ~5 ms. Workers are started on first use and kept: each has its own mailbox (state,
 * fn, arg), spins on it for POOL_SPIN_NS after its last job (the calls of one search come tens of us apart),
 * then sleeps on a condition variable, so an idle camera burns nothing. One dispatch at a time: a second
 * caller meanwhile (another Python thread; ctypes releases the GIL) starts threads of its own, as before.
 * A forked child starts its own workers (pool_after_fork). */
#define POOL_MAX 63
#define POOL_SPIN_NS 200000 /* a worker's spin for its next job, and the caller's for the workers to finish */
enum { SLOT_IDLE = 0, SLOT_READY = 1, SLOT_DONE = 2 };

typedef struct {
    _Atomic int state;
    _Atomic int sleeping;
    void *(*fn)(void *);
    void *arg;
    void *result;
    pthread_cond_t wake;
    pthread_t tid;
} Slot;

static struct {
    pthread_mutex_t use;  /* held for one dispatch */
    pthread_mutex_t lock; /* the condition variables' */
    pthread_cond_t done;
    _Atomic int waiting;  /* the dispatcher sleeps on done */
    int started;
    Slot slot[POOL_MAX];
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static pthread_once_t pool_once = PTHREAD_ONCE_INIT;

static inline void cpu_relax(void) {
#if defined(ECS_X86)
    _mm_pause();
#elif defined(ECS_ARM)
    __asm__ __volatile__("yield");
#endif
}

static inline int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Spins until *state == want or POOL_SPIN_NS pass; returns whether it got there. */
static int spin_for(_Atomic int *state, int want) {
    int64_t until = 0;
    for (unsigned i = 0;; i++) {
        if (atomic_load_explicit(state, memory_order_acquire) == want) return 1;
        cpu_relax();
        if ((i & 63) == 63) {
            int64_t t = now_ns();
            if (!until) until = t + POOL_SPIN_NS;
            else if (t > until) return 0;
        }
    }
}

static void *pool_worker(void *arg) {
    Slot *slot = (Slot *)arg;
    for (;;) {
        if (!spin_for(&slot->state, SLOT_READY)) {
            pthread_mutex_lock(&pool.lock);
            atomic_store(&slot->sleeping, 1); /* seq_cst with the dispatcher's store of READY: one sees the other */
            while (atomic_load(&slot->state) != SLOT_READY) pthread_cond_wait(&slot->wake, &pool.lock);
            atomic_store(&slot->sleeping, 0);
            pthread_mutex_unlock(&pool.lock);
        }
        slot->result = slot->fn(slot->arg);
        atomic_store(&slot->state, SLOT_DONE);
        if (atomic_load(&pool.waiting)) {
            pthread_mutex_lock(&pool.lock);
            pthread_cond_broadcast(&pool.done);
            pthread_mutex_unlock(&pool.lock);
        }
    }
    return NULL;
}

static void pool_after_fork(void) { /* the child has none of the workers: start afresh (the old slots leak) */
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
    pool.use = fresh;
    pool.lock = fresh;
    pool.done = cond;
    atomic_store(&pool.waiting, 0);
    pool.started = 0;
}

static void pool_init(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

/* Workers 0 .. n-1 exist (as many as could start); returns how many there are. Holds pool.use. */
static int pool_grow(int n) {
    while (pool.started < n) {
        Slot *slot = &pool.slot[pool.started];
        pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
        slot->wake = cond;
        atomic_store(&slot->state, SLOT_IDLE);
        atomic_store(&slot->sleeping, 0);
        pthread_attr_t attr;
        pthread_t tid;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&tid, &attr, pool_worker, slot);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        slot->tid = tid;
        pool.started++;
    }
    return pool.started < n ? pool.started : n;
}

/* Lets a sleeping worker run anywhere the process may but on the caller's CPU. Why: woken from a long sleep,
 * Linux places the worker on its waker's CPU (wake-affine, the other CPU having gone idle), and the two then
 * share one CPU for milliseconds: a search after an idle gap (a camera between frames) ran no faster on two
 * threads than on one. */
static void away_from_caller(pthread_t worker) {
#if defined(__linux__)
    cpu_set_t allowed;
    int here = sched_getcpu();
    if (here < 0 || sched_getaffinity(0, sizeof allowed, &allowed) != 0 || CPU_COUNT(&allowed) < 2) return;
    CPU_CLR(here, &allowed);
    pthread_setaffinity_np(worker, sizeof allowed, &allowed);
#else
    (void)worker;
#endif
}

/* A call's thread count: what the caller asked for, at most 64 (the job arrays), `most` (work per thread above the
 * call's minimum) and `units` (the pieces the work splits into), at least 1. */
static int job_threads(int threads, int64_t most, int64_t units) {
    if (threads > 64) threads = 64;
    if (threads > most) threads = (int)most;
    if (threads > units) threads = (int)units;
    return threads < 1 ? 1 : threads;
}

/* Runs fn over `threads` jobs (job t at jobs + t * size): jobs 1.. on the pool's workers (or, while another
 * caller holds the pool, on new threads), job 0 on this one, and any job no thread took here afterwards.
 * Returns 1 when a job returned non-NULL (its failure). */
static int run_jobs(void *(*fn)(void *), void *jobs, size_t size, int threads) {
    int failed = 0;
    if (threads > POOL_MAX + 1) threads = POOL_MAX + 1;
    if (threads <= 1) return fn(jobs) != NULL;
    pthread_once(&pool_once, pool_init);
    if (pthread_mutex_trylock(&pool.use) == 0) {
        int helpers = pool_grow(threads - 1);
        for (int t = 0; t < helpers; t++) {
            Slot *slot = &pool.slot[t];
            slot->fn = fn;
            slot->arg = (char *)jobs + (size_t)(t + 1) * size;
            atomic_store(&slot->state, SLOT_READY);
            if (atomic_load(&slot->sleeping)) {
                away_from_caller(slot->tid);
                pthread_mutex_lock(&pool.lock);
                pthread_cond_signal(&slot->wake);
                pthread_mutex_unlock(&pool.lock);
            }
        }
        if (fn(jobs) != NULL) failed = 1;
        for (int t = helpers + 1; t < threads; t++)
            if (fn((char *)jobs + (size_t)t * size) != NULL) failed = 1;
        for (int t = 0; t < helpers; t++) {
            Slot *slot = &pool.slot[t];
            if (!spin_for(&slot->state, SLOT_DONE)) {
                pthread_mutex_lock(&pool.lock);
                atomic_store(&pool.waiting, 1);
                while (atomic_load(&slot->state) != SLOT_DONE) pthread_cond_wait(&pool.done, &pool.lock);
                atomic_store(&pool.waiting, 0);
                pthread_mutex_unlock(&pool.lock);
            }
            if (slot->result != NULL) failed = 1;
            atomic_store(&slot->state, SLOT_IDLE);
        }
        pthread_mutex_unlock(&pool.use);
        return failed;
    }
    pthread_t tids[POOL_MAX + 1];
    int started = 0;
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&tids[t], NULL, fn, (char *)jobs + (size_t)t * size) != 0) break;
        started = t;
    }
    if (fn(jobs) != NULL) failed = 1;
    for (int t = 1; t <= started; t++) {
        void *res = NULL;
        pthread_join(tids[t], &res);
        if (res != NULL) failed = 1;
    }
    for (int t = started + 1; t < threads; t++)
        if (fn((char *)jobs + (size_t)t * size) != NULL) failed = 1;
    return failed;
}

/* Top-k (all_keys == 0: out_idx/out_key are nq x k, ascending) or every key (all_keys == 1: out_key is
 * nq x m). queries: nq x 4g int8 codes; rows: m rows of 4g int8 codes, `stride` bytes apart; corr[m] =
 * 128 * sum of row m's codes. Returns 0, or -1 (bad arguments / unsupported isa), -2 (out of memory),
 * -3 (a thread failed). */
static int run(const int8_t *queries, int64_t nq, int64_t g, const int8_t *rows, int64_t stride, int64_t m,
               const float *bias, const int32_t *corr, const float *cq, int64_t k, int32_t *out_idx,
               float *out_key, int all_keys, int isa, int threads, const struct Clusters *cl) {
    if (nq < 0 || g < 1 || m < 1 || stride < 4 * g || !ecs_isa_supported(isa)) return -1;
    if (!all_keys && (k < 1 || k > m)) return -1;
    if (nq == 0) return 0;
    isa = ecs_effective_isa(isa, 4 * g);
    int listed = (isa == ISA_AVX512VNNI || isa == ISA_AMX) && !all_keys && k <= LIST_MAX; /* SIMD lists */
    int unit = isa == ISA_AMX || listed ? 2 : 1; /* query blocks per step (the AMX and list drivers pair them) */
    int64_t nqb = (nq + QB - 1) / QB;
    nqb = (nqb + unit - 1) / unit * unit;
    uint8_t *qpack = (uint8_t *)calloc((size_t)(nqb * g * QB * 4), 1);
    float *cqp = (float *)calloc((size_t)(nqb * QB), sizeof(float));
    int8_t *zero = (int8_t *)calloc((size_t)(g * 4), 1);
    struct List32 *lists = NULL;
#ifdef ECS_X86
    if (listed && (lists = (List32 *)malloc(sizeof(List32) * (size_t)nq)) != NULL) {
        for (int64_t q = 0; q < nq; q++)
            for (int j = 0; j < LIST_MAX; j++) {
                lists[q].key[j] = INFINITY;
                lists[q].row[j] = INT32_MAX;
            }
    }
#endif
    if (!qpack || !cqp || !zero || (listed && !lists)) {
        free(qpack); free(cqp); free(zero); free(lists);
        return -2;
    }
    for (int64_t q = 0; q < nq; q++) {
        int64_t b = q / QB, l = q % QB;
        for (int64_t j = 0; j < g; j++)
            for (int e = 0; e < 4; e++)
                qpack[((b * g + j) * QB + l) * 4 + e] = (uint8_t)(queries[q * 4 * g + 4 * j + e] ^ 0x80);
        cqp[q] = cq[q];
    }
    for (int64_t q = nq; q < nqb * QB; q++) /* padded lanes: u8 128 = code 0 */
        for (int64_t j = 0; j < g; j++) memset(qpack + ((q / QB * g + j) * QB + q % QB) * 4, 0x80, 4);
    if (!all_keys && !listed) { /* run_job's lists (the list driver keeps its own) */
        for (int64_t i = 0; i < nq * k; i++) {
            out_key[i] = INFINITY;
            out_idx[i] = -1;
        }
    }
    int64_t tiles = isa == ISA_AMX ? (g + 15) / 16 : 0;
    uint8_t *tpack = NULL;
#ifdef ECS_X86
    if (tiles) {
        if ((tpack = (uint8_t *)aligned_alloc(64, (size_t)(nqb * tiles * AMX_TILE))) == NULL) {
            free(qpack); free(cqp); free(zero); free(lists);
            return -2;
        }
        amx_pack(qpack, nqb, g, tiles, tpack);
    }
#endif
    Ctx c = {qpack, nq, g, rows, stride, m, bias, corr, cqp, k, out_idx, out_key, all_keys, zero, 0, lists, tpack, tiles, cl};
    int64_t units = nqb / unit;
    if (threads < 1) threads = 1;
    if (threads > units) threads = (int)units;
    Job jobs[64];
    if (threads > 64) threads = 64;
    int rc = 0;
    for (int t = 0; t < threads; t++) {
        jobs[t].c = &c;
        jobs[t].isa = isa;
        jobs[t].qb0 = units * t / threads * unit;
        jobs[t].qb1 = units * (t + 1) / threads * unit;
    }
    void *(*job_fn)(void *) = cl && isa != ISA_AMX ? run_job_pruned : run_job;
#ifdef ECS_X86
    if (isa == ISA_AVX512VNNI && listed) job_fn = cl ? run_job_512_pruned : run_job_512;
    if (isa == ISA_AMX) job_fn = run_job_amx;
#endif
    if (run_jobs(job_fn, jobs, sizeof(Job), threads)) rc = -3;
#ifdef ECS_X86
    for (int64_t q = 0; listed && q < nq; q++) {
        memcpy(out_key + q * k, lists[q].key, sizeof(float) * (size_t)k);
        memcpy(out_idx + q * k, lists[q].row, sizeof(int32_t) * (size_t)k);
    }
#endif
    free(qpack); free(cqp); free(zero); free(lists); free(tpack);
    return rc;
}

int ecs_topk(const int8_t *queries, int64_t nq, int64_t g, const int8_t *rows, int64_t stride, int64_t m,
             const float *bias, const int32_t *corr, const float *cq, int64_t k, int32_t *out_idx,
             float *out_key, int isa, int threads) {
    if (!out_idx || !out_key) return -1;
    return run(queries, nq, g, rows, stride, m, bias, corr, cq, k, out_idx, out_key, 0, isa, threads, NULL);
}

/* Coarse mode's query codes and their QueryBounds in one pass (numpy took 0.25 ms for bottle WRN50's 784 x 32):
 * z = x * scale (float32), step = max|z| / 127 (1 where 0), code = clip(rint(z / step), +-127) in width bytes,
 * zero-padded: runtime.native.quantize_queries, bit for bit (float32 operations in its order, rint half to even).
 * Then, in float64, xt = code * step / scale, N = ||xt||^2 - 2 xt . mid and its rounding allowance r =
 * 1e-6 (bias_max + 2 ||xt|| reach + |N|) + 1.01 bias_error: shift = N + r rounded up, lift = N - r rounded down,
 * margin = 1e-6 ||xt|| (see runtime.native.search.ProjectedCandidates). Returns 0, or -1 (bad arguments). */
int ecs_quantize_bounds(const float *x, int64_t nq, int64_t n, const float *scale, int64_t width, int8_t *codes,
                        float *step, const float *mid, double bias_max, double reach, double bias_error, float *xt,
                        float *shift, float *margin, float *lift) {
    if (nq < 0 || n < 1 || width < n) return -1;
    for (int64_t q = 0; q < nq; q++) {
        const float *xq = x + q * n;
        float peak = 0.0f;
        for (int64_t d = 0; d < n; d++) {
            float z = xq[d] * scale[d];
            float a = fabsf(z);
            peak = a > peak || a != a ? a : peak; /* numpy's max propagates NaN (the caller refuses it before) */
        }
        float st = peak > 0.0f ? peak / 127.0f : 1.0f;
        step[q] = st;
        int8_t *cq = codes + q * width;
        double sq = 0.0, dot_mid = 0.0;
        for (int64_t d = 0; d < n; d++) {
            float v = nearbyintf((xq[d] * scale[d]) / st);
            v = v < -127.0f ? -127.0f : v > 127.0f ? 127.0f : v;
            cq[d] = (int8_t)v;
            double t = (double)v * ((double)st / (double)scale[d]);
            xt[q * n + d] = (float)t;
            sq += t * t;
            dot_mid += t * (double)mid[d];
        }
        memset(cq + n, 0, (size_t)(width - n));
        double norm = sqrt(sq), big = sq - 2.0 * dot_mid;
        double r = 1e-6 * (bias_max + 2.0 * norm * reach + fabs(big)) + 1.01 * bias_error;
        shift[q] = nextafterf((float)(big + r), INFINITY);
        lift[q] = nextafterf((float)(big - r), -INFINITY);
        margin[q] = (float)(1e-6 * norm + 1e-30);
    }
    return 0;
}

/* ecs_topk with the rows in clusters (see run_job_512_pruned): the same results, whole clusters skipped on every
 * path but AMX tiles (rows of 64 bytes or more). ncl clusters of the p-dimensional centres: start (ncl + 1,
 * multiples of 8 from 0 to the member count), member (row ids in [0, m) or -1), center (ncl x p), radius (ncl);
 * per query: xt (nq x p), shift, margin, lift. Returns as ecs_topk. */
int ecs_topk_pruned(const int8_t *queries, int64_t nq, int64_t g, const int8_t *rows, int64_t stride, int64_t m,
                    const float *bias, const int32_t *corr, const float *cq, int64_t k, int32_t *out_idx,
                    float *out_key, int isa, int threads, int64_t ncl, int64_t p, const int64_t *start,
                    const int32_t *member, const float *center, const float *radius, const float *xt,
                    const float *shift, const float *margin, const float *lift) {
    if (!out_idx || !out_key || k < 1 || ncl < 1 || p < 1 || p > CL_MAX_DIMS || !start || !member || !center || !radius || !xt ||
        !shift || !margin || !lift || start[0] != 0)
        return -1;
    for (int64_t j = 0; j < ncl; j++)
        if (start[j + 1] < start[j] || (start[j + 1] - start[j]) % 8) return -1;
    for (int64_t i = 0; i < start[ncl]; i++)
        if (member[i] < -1 || member[i] >= m) return -1;
    _Atomic int64_t next = 0;
    float *center_sq = (float *)malloc(sizeof(float) * (size_t)ncl * 2), *cap_radius = center_sq + ncl;
    if (!center_sq) return -2;
    for (int64_t j = 0; j < ncl; j++) {
        double sq = 0.0;
        for (int64_t d = 0; d < p; d++) sq += (double)center[j * p + d] * (double)center[j * p + d];
        center_sq[j] = (float)sq;
        cap_radius[j] = start[j + 1] - start[j] >= k && member[start[j] + k - 1] >= 0 ? radius[j] : INFINITY;
    }
    Clusters cl = {ncl, p, start, member, center, radius, xt, shift, margin, lift, center_sq, cap_radius, &next};
    int rc = run(queries, nq, g, rows, stride, m, bias, corr, cq, k, out_idx, out_key, 0, isa, threads, &cl);
    free(center_sq);
    return rc;
}

#ifdef ECS_X86
/* Every key of ONE query (the certification's exact search): each row is the vector, 64 bytes per vpdpbusd
 * (a padded 16-query block would do 16x the work); the same exact int32 dot and the same two float32
 * operations as the tiles (keys512). */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void keys_one_avx512(const int8_t *query, int64_t g, const int8_t *rows, int64_t stride, int64_t m,
                            const float *bias, const int32_t *corr, float cq, float *out_key) {
    int64_t width = 4 * g, chunks = (width + 63) / 64;
    __m512i q[64]; /* rows of up to 4 096 bytes (ecs_keys sends wider ones to run()) */
    __mmask64 tail = width % 64 ? ((__mmask64)1 << (width % 64)) - 1 : ~(__mmask64)0;
    for (int64_t c = 0; c < chunks; c++) {
        __mmask64 in = c == chunks - 1 ? tail : ~(__mmask64)0;
        q[c] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(in, query + 64 * c), _mm512_maskz_set1_epi8(in, (char)0x80));
    }
    for (int64_t r = 0; r < m; r++) {
        const int8_t *row = rows + r * stride;
        __m512i acc = _mm512_setzero_si512();
        for (int64_t c = 0; c < chunks; c++) {
            __m512i v = _mm512_maskz_loadu_epi8(c == chunks - 1 ? tail : ~(__mmask64)0, row + 64 * c);
            DPBUSD512(acc, q[c], v);
        }
        int32_t dot = _mm512_reduce_add_epi32(acc) - corr[r];
        out_key[r] = bias[r] - cq * (float)dot;
    }
}
#endif

int ecs_keys(const int8_t *queries, int64_t nq, int64_t g, const int8_t *rows, int64_t stride, int64_t m,
             const float *bias, const int32_t *corr, const float *cq, float *out_key, int isa, int threads) {
    if (!out_key) return -1;
#ifdef ECS_X86
    int eff = isa >= 0 && isa < ISA_COUNT ? ecs_effective_isa(isa, 4 * g) : -1;
    if (nq == 1 && g >= 1 && g <= 1024 && m >= 1 && stride >= 4 * g && (eff == ISA_AVX512VNNI || eff == ISA_AMX) &&
        ecs_isa_supported(isa)) {
        keys_one_avx512(queries, g, rows, stride, m, bias, corr, cq[0], out_key);
        return 0;
    }
#endif
    return run(queries, nq, g, rows, stride, m, bias, corr, cq, 0, NULL, out_key, 1, isa, threads, NULL);
}

/* ---- exact re-rank: true L2 distances to decoded rows ------------------------------------------
 *
 * Row m decodes as CodeRows.__getitem__ does, in float32: y = (code * scale + offset) + v with
 * v = sum_j c_j * basis_j, c_j = coord_code_j * coord_scale_j + coord_offset_j, summed j ascending
 * with a fused multiply-add (correctly rounded, so every path rounds the same: rr_fma). The distance
 * is sqrt(sum_d (double)(y_d - x_d)^2), accumulated in float64 like direct_l2, in RR_LANES partial
 * sums (lane = d % RR_LANES, each fed in increasing d) added in lane order at the end. Every other
 * operation is one float32 multiply or add per element (-ffp-contract=off), so the plain C loop and
 * the AVX2 / AVX-512 blocks below return bit-identical distances. Only v's summation order differs
 * from numpy's BLAS product (a few float32 ulps of each element; tests bound the distance to 1e-5). */

#define RR_ROWS 8   /* candidate rows sharing one pass over the basis */
#define RR_LANES 16 /* float64 partial sums per row */
#define RR_MAX_COORDS 256 /* PCA coordinates per row the kernel takes (the exporter stores far fewer) */
#define RR_MIN_WORK (12 * 1024 * 1024) /* multiply-adds per thread of ecs_l2, at least */

typedef struct {
    const float *queries; /* nq x dim */
    int64_t nq, dim;
    const int8_t *codes;
    int64_t code_stride; /* bytes */
    const float *scale, *offset;
    const float *basis; /* ncoord x dim */
    int64_t ncoord;
    const uint16_t *coords;
    int64_t coord_stride; /* elements */
    const float *coord_scale, *coord_offset;
    const int64_t *cand; /* nq x ncand */
    int64_t ncand;
    float *dist; /* nq x ncand */
} Rerank;

/* One group of RR_ROWS rows (padded by repeating row 0, results dropped by the caller). */
typedef struct {
    const int8_t *code[RR_ROWS];
    const float *x[RR_ROWS];
    float cval[RR_ROWS][RR_MAX_COORDS];
    double acc[RR_ROWS][RR_LANES];
} Group;

/* fmaf and sqrt without libm (the library links libc only). fma: the exact float product in double,
 * the sum rounded to odd (TwoSum, then the last bit set where inexact), then one rounding to float —
 * correctly rounded, so equal to the hardware FMA of the SIMD blocks. */
static inline float rr_fma(float a, float b, float c) {
#if defined(__FP_FAST_FMAF)
    return __builtin_fmaf(a, b, c);
#else
    double p = (double)a * (double)b, s = p + (double)c, bb = s - p;
    double err = (p - (s - bb)) + ((double)c - bb);
    uint64_t bits;
    memcpy(&bits, &s, 8);
    if (err != 0.0 && !(bits & 1)) {
        bits += (err > 0) == (s > 0) ? 1 : (uint64_t)-1; /* toward the exact value: an odd last bit */
        memcpy(&s, &bits, 8);
    }
    return (float)s;
#endif
}

static inline double rr_sqrt(double x) {
#if defined(ECS_X86)
    return _mm_cvtsd_f64(_mm_sqrt_sd(_mm_setzero_pd(), _mm_set_sd(x)));
#elif defined(ECS_ARM)
    return vget_lane_f64(vsqrt_f64(vdup_n_f64(x)), 0);
#else
    return sqrt(x);
#endif
}

/* Dims [d0, d1) of every row of the group, one element at a time (the reference every block equals). */
static void rr_dims_c(const Rerank *c, Group *g, int64_t d0, int64_t d1) {
    for (int r = 0; r < RR_ROWS; r++) {
        for (int64_t d = d0; d < d1; d++) {
            float v = 0.0f;
            for (int64_t j = 0; j < c->ncoord; j++) v = rr_fma(g->cval[r][j], c->basis[j * c->dim + d], v);
            float y = (float)g->code[r][d] * c->scale[d] + c->offset[d];
            float diff = (y + v) - g->x[r][d];
            g->acc[r][d % RR_LANES] += (double)diff * (double)diff;
        }
    }
}

#ifdef ECS_X86
/* The float64 squares of 16 float32 differences into lanes 0..15 (dims d with d % 16 = lane). */
__attribute__((target("avx512f")))
static inline void rr_square16(double *acc, __m512 diff) {
    __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(diff));
    __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(diff), 1)));
    _mm512_storeu_pd(acc, _mm512_add_pd(_mm512_loadu_pd(acc), _mm512_mul_pd(lo, lo)));
    _mm512_storeu_pd(acc + 8, _mm512_add_pd(_mm512_loadu_pd(acc + 8), _mm512_mul_pd(hi, hi)));
}

/* y - x for 16 dims of one row, given its v. */
__attribute__((target("avx512f,avx512bw")))
static inline __m512 rr_diff16(const Rerank *c, const Group *g, int r, int64_t d0, __m512 v) {
    __m512 code = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(g->code[r] + d0))));
    __m512 y = _mm512_add_ps(_mm512_mul_ps(code, _mm512_loadu_ps(c->scale + d0)), _mm512_loadu_ps(c->offset + d0));
    return _mm512_sub_ps(_mm512_add_ps(y, v), _mm512_loadu_ps(g->x[r] + d0));
}

/* 32 dims x 8 rows per pass over the basis (v in 16 zmm), then one 16-dim block; returns the dims done. */
__attribute__((target("avx512f,avx512bw,avx512vl,fma")))
static int64_t rr_dims_avx512(const Rerank *c, Group *g) {
    int64_t d0 = 0;
    for (; d0 + 32 <= c->dim; d0 += 32) {
        __m512 v[RR_ROWS][2];
        for (int r = 0; r < RR_ROWS; r++) v[r][0] = v[r][1] = _mm512_setzero_ps();
        for (int64_t j = 0; j < c->ncoord; j++) {
            __m512 b0 = _mm512_loadu_ps(c->basis + j * c->dim + d0), b1 = _mm512_loadu_ps(c->basis + j * c->dim + d0 + 16);
            for (int r = 0; r < RR_ROWS; r++) {
                __m512 cj = _mm512_set1_ps(g->cval[r][j]);
                v[r][0] = _mm512_fmadd_ps(cj, b0, v[r][0]);
                v[r][1] = _mm512_fmadd_ps(cj, b1, v[r][1]);
            }
        }
        for (int r = 0; r < RR_ROWS; r++) {
            rr_square16(g->acc[r], rr_diff16(c, g, r, d0, v[r][0])); /* dims d0..d0+15, then d0+16..: lane order kept */
            rr_square16(g->acc[r], rr_diff16(c, g, r, d0 + 16, v[r][1]));
        }
    }
    if (d0 + 16 <= c->dim) {
        __m512 v[RR_ROWS];
        for (int r = 0; r < RR_ROWS; r++) v[r] = _mm512_setzero_ps();
        for (int64_t j = 0; j < c->ncoord; j++) {
            __m512 b = _mm512_loadu_ps(c->basis + j * c->dim + d0);
            for (int r = 0; r < RR_ROWS; r++) v[r] = _mm512_fmadd_ps(_mm512_set1_ps(g->cval[r][j]), b, v[r]);
        }
        for (int r = 0; r < RR_ROWS; r++) rr_square16(g->acc[r], rr_diff16(c, g, r, d0, v[r]));
        d0 += 16;
    }
    return d0;
}

/* 8 dims x 8 rows per pass (v in 8 ymm) from dim d0 (a multiple of 8), lanes d % 16 as above. */
__attribute__((target("avx2,fma")))
static int64_t rr_dims_avx2(const Rerank *c, Group *g, int64_t d0) {
    for (; d0 + 8 <= c->dim; d0 += 8) {
        __m256 v[RR_ROWS];
        for (int r = 0; r < RR_ROWS; r++) v[r] = _mm256_setzero_ps();
        for (int64_t j = 0; j < c->ncoord; j++) {
            __m256 b = _mm256_loadu_ps(c->basis + j * c->dim + d0);
            for (int r = 0; r < RR_ROWS; r++) v[r] = _mm256_fmadd_ps(_mm256_set1_ps(g->cval[r][j]), b, v[r]);
        }
        __m256 sc = _mm256_loadu_ps(c->scale + d0), of = _mm256_loadu_ps(c->offset + d0);
        int lane = (int)(d0 % RR_LANES);
        for (int r = 0; r < RR_ROWS; r++) {
            __m256 code = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(g->code[r] + d0))));
            __m256 y = _mm256_add_ps(_mm256_mul_ps(code, sc), of);
            __m256 diff = _mm256_sub_ps(_mm256_add_ps(y, v[r]), _mm256_loadu_ps(g->x[r] + d0));
            __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(diff));
            __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(diff, 1));
            double *a = g->acc[r] + lane;
            _mm256_storeu_pd(a, _mm256_add_pd(_mm256_loadu_pd(a), _mm256_mul_pd(lo, lo)));
            _mm256_storeu_pd(a + 4, _mm256_add_pd(_mm256_loadu_pd(a + 4), _mm256_mul_pd(hi, hi)));
        }
    }
    return d0;
}
#endif

typedef struct {
    const Rerank *r;
    int64_t p0, p1; /* flat (query, candidate) pairs */
    int isa;
} RrJob;

/* The group's distances (rows of them, dist[r]) on the isa's path; the group's acc must start at 0. */
static void rr_measure(const Rerank *c, Group *g, int rows, int isa, float *dist) {
    int64_t done = 0;
#ifdef ECS_X86
    if (isa == ISA_AMX || isa == ISA_AVX512VNNI)
        done = rr_dims_avx2(c, g, rr_dims_avx512(c, g)); /* AVX2 takes 8 of the last < 16 dims */
    else if (isa == ISA_AVX2 || isa == ISA_AVXVNNI)
        done = rr_dims_avx2(c, g, 0);
#endif
    (void)isa;
    rr_dims_c(c, g, done, c->dim);
    for (int r = 0; r < rows; r++) {
        double s = 0.0;
        for (int l = 0; l < RR_LANES; l++) s += g->acc[r][l];
        dist[r] = (float)rr_sqrt(s);
    }
}

/* Fills group slot r with row m of query x (its decoded coordinates; acc cleared). */
static void rr_slot(const Rerank *c, Group *g, int r, int64_t m, const float *x) {
    g->code[r] = c->codes + m * c->code_stride;
    g->x[r] = x;
    for (int64_t j = 0; j < c->ncoord; j++)
        g->cval[r][j] = (float)c->coords[m * c->coord_stride + j] * c->coord_scale[j] + c->coord_offset[j];
    for (int l = 0; l < RR_LANES; l++) g->acc[r][l] = 0.0;
}

static void *rr_run(void *arg) {
    const RrJob *job = (const RrJob *)arg;
    const Rerank *c = job->r;
    Group *g = (Group *)malloc(sizeof(Group));
    if (!g) return (void *)1;
    for (int64_t p0 = job->p0; p0 < job->p1; p0 += RR_ROWS) {
        int rows = (int)(job->p1 - p0 < RR_ROWS ? job->p1 - p0 : RR_ROWS);
        for (int r = 0; r < RR_ROWS; r++) {
            int64_t p = p0 + (r < rows ? r : 0);
            rr_slot(c, g, r, c->cand[p], c->queries + p / c->ncand * c->dim);
        }
        rr_measure(c, g, rows, job->isa, c->dist + p0);
    }
    free(g);
    return NULL;
}

/* True L2 distances (float32 of a float64 sum) from each query to each of its ncand candidate rows,
 * dist[q * ncand + i], candidate order. Rows decode as CodeRows does (see above); coords/basis may be
 * empty (ncoord 0). Returns 0, or -1 (bad arguments / unsupported isa), -2 (out of memory). */
int ecs_l2(const float *queries, int64_t nq, int64_t dim, const int8_t *codes, int64_t code_stride,
           const float *scale, const float *offset, const float *basis, int64_t ncoord, const uint16_t *coords,
           int64_t coord_stride, const float *coord_scale, const float *coord_offset, const int64_t *cand,
           int64_t ncand, float *dist, int isa, int threads) {
    if (nq < 0 || dim < 1 || ncand < 0 || ncoord < 0 || ncoord > RR_MAX_COORDS || code_stride < dim ||
        (ncoord && coord_stride < ncoord) || !ecs_isa_supported(isa))
        return -1;
    Rerank r = {queries, nq, dim, codes, code_stride, scale, offset, basis, ncoord, coords, coord_stride,
                coord_scale, coord_offset, cand, ncand, dist};
    int64_t pairs = nq * ncand;
    if (pairs == 0) return 0;
    int64_t groups = (pairs + RR_ROWS - 1) / RR_ROWS;
    /* A thread only for RR_MIN_WORK multiply-adds or more: a second thread on a few hundred pairs (the
     * certification's batches) costs more than it saves, and far more on a busy CPU, where the join waits
     * for a time slice (RESULTS.md #11: 256 pairs at 1024-d, 2-3 ms on 2 threads vs 0.3 ms on one); one
     * image's 784 winners at 1024-d (27 M) take two. */
    int64_t work = pairs * dim * (ncoord + 2), most = work / RR_MIN_WORK > 0 ? work / RR_MIN_WORK : 1;
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    if (threads > groups) threads = (int)groups;
    if (threads > most) threads = (int)most;
    RrJob jobs[64];
    for (int t = 0; t < threads; t++) {
        jobs[t].r = &r;
        jobs[t].isa = isa;
        jobs[t].p0 = groups * t / threads * RR_ROWS;
        int64_t end = groups * (t + 1) / threads * RR_ROWS;
        jobs[t].p1 = end < pairs ? end : pairs;
    }
    return run_jobs(rr_run, jobs, sizeof(RrJob), threads) ? -2 : 0;
}

/* Insert (d, i) into the ascending list best/pos of *filled <= k entries, keeping the k smallest; an
 * equal value does not displace an earlier entry (ties by position, as the callers feed positions in order). */
static inline void keep_smallest(float *best, int64_t *pos, int64_t *filled, int64_t k, float d, int64_t i) {
    if (*filled == k && !(d < best[k - 1])) return;
    int64_t at = *filled < k ? (*filled)++ : k - 1;
    while (at > 0 && d < best[at - 1]) {
        best[at] = best[at - 1];
        pos[at] = pos[at - 1];
        at--;
    }
    best[at] = d;
    pos[at] = i;
}

/* The k nearest of each query's ncand candidates by true L2 (ecs_l2), ascending by (distance, candidate
 * position): out_dist / out_idx are nq x k (out_idx holds the candidates' row ids). `scratch` is
 * nq x ncand floats. Returns 0 or -1. */
int ecs_rerank(const float *queries, int64_t nq, int64_t dim, const int8_t *codes, int64_t code_stride,
               const float *scale, const float *offset, const float *basis, int64_t ncoord, const uint16_t *coords,
               int64_t coord_stride, const float *coord_scale, const float *coord_offset, const int64_t *cand,
               int64_t ncand, int64_t k, float *scratch, float *out_dist, int64_t *out_idx, int isa, int threads) {
    if (k < 1 || k > ncand) return -1;
    int rc = ecs_l2(queries, nq, dim, codes, code_stride, scale, offset, basis, ncoord, coords, coord_stride,
                    coord_scale, coord_offset, cand, ncand, scratch, isa, threads);
    if (rc) return rc;
    for (int64_t q = 0; q < nq; q++) {
        const float *d = scratch + q * ncand;
        float *od = out_dist + q * k;
        int64_t *oi = out_idx + q * k;
        int64_t *pos = oi; /* candidate positions first, row ids at the end */
        int64_t filled = 0;
        for (int64_t i = 0; i < ncand; i++) keep_smallest(od, pos, &filled, k, d[i], i);
        for (int64_t j = 0; j < k; j++) oi[j] = cand[q * ncand + pos[j]];
    }
    return 0;
}

/* ---- rank keys: order each query's candidates by L2 without decoding them ----------------------
 *
 * key[q, i] = norm[m] - 2 * (w_q . code_m + cw_q . coord_m) for candidate m = cand[q, i], where
 * w_q = (x_q - mu) * scale (D float32) and cw_q[j] = ((x_q - mu) . basis_j) * coord_scale[j]: the squared
 * distance to the decoded row less a per-query constant (CodeRows.rank_keys), so re-rank measures only the
 * best few (search_coarse) instead of decoding every candidate (ncoord + 2 operations per element).
 *
 * The code part is an integer dot product: w_q is rounded once per query to int16 wq = round(w_q * s) with
 * s = RK_WQ_LIMIT(dim) / max |w_q| (the largest s whose D products of |code| <= 128 fit an int32), and
 * w_q . code_m = dot(wq, code_m) / s. The int32 dot is exact, so every SIMD path (vpmaddwd: one instruction
 * per 16 or 32 elements instead of float's four) returns the same bits in any order; wq, s, the coordinate
 * part (float32, 16 lanes j % 16 then a halving tree) and the key (float32, a multiply then an add,
 * -ffp-contract=off) are formed by the one shared scalar code. Rounding w to 16 bits moves a key by at most
 * D * 64 * max|w| / RK_WQ_LIMIT, far below float32's own rounding of the sum at 1024-d in practice (bottle
 * WRN50: recall@1 unchanged, RESULTS.md #11 "Integer ranking"); the winners are measured exactly anyway. */

#define RK_AHEAD 4 /* candidates between a row's prefetch and its use (rows are read at random) */

/* The largest |wq| for which dim products with |code| <= 128 sum within an int32. */
static inline int32_t rk_wq_limit(int64_t dim) {
    int64_t most = INT32_MAX / (128 * dim);
    return most > 32767 ? 32767 : (int32_t)(most > 1 ? most : 1);
}

static inline void rk_prefetch(const int8_t *row, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b, 0, 3);
}

/* The reference every SIMD path equals (an exact integer sum). */
static int32_t rk_dot_c(const int16_t *wq, const int8_t *code, int64_t dim) {
    int32_t acc = 0;
    for (int64_t d = 0; d < dim; d++) acc += (int32_t)wq[d] * (int32_t)code[d];
    return acc;
}

#ifdef ECS_X86
__attribute__((target("avx512f,avx512bw,avx512vl")))
static int32_t rk_dot_avx512(const int16_t *wq, const int8_t *code, int64_t dim) {
    __m512i acc0 = _mm512_setzero_si512(), acc1 = acc0;
    int64_t d = 0;
    for (; d + 64 <= dim; d += 64) {
        __m512i c0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(code + d)));
        __m512i c1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(code + d + 32)));
        acc0 = _mm512_add_epi32(acc0, _mm512_madd_epi16(c0, _mm512_loadu_si512((const void *)(wq + d))));
        acc1 = _mm512_add_epi32(acc1, _mm512_madd_epi16(c1, _mm512_loadu_si512((const void *)(wq + d + 32))));
    }
    for (; d < dim; d += 32) { /* the last < 64 dims, zero-masked past dim */
        __mmask32 in = dim - d >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (dim - d)) - 1);
        __m512i c = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(in, code + d));
        acc0 = _mm512_add_epi32(acc0, _mm512_madd_epi16(c, _mm512_maskz_loadu_epi16(in, wq + d)));
    }
    return _mm512_reduce_add_epi32(_mm512_add_epi32(acc0, acc1));
}

__attribute__((target("avx2")))
static int32_t rk_dot_avx2(const int16_t *wq, const int8_t *code, int64_t dim) {
    __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0;
    int64_t d = 0;
    for (; d + 32 <= dim; d += 32) {
        __m256i c0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(code + d)));
        __m256i c1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(code + d + 16)));
        acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(c0, _mm256_loadu_si256((const __m256i *)(wq + d))));
        acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(c1, _mm256_loadu_si256((const __m256i *)(wq + d + 16))));
    }
    __m256i acc = _mm256_add_epi32(acc0, acc1);
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s) + rk_dot_c(wq + d, code + d, dim - d);
}
#endif

typedef int32_t (*RankDotFn)(const int16_t *, const int8_t *, int64_t);

static RankDotFn rank_dot_fn(int isa) {
#ifdef ECS_X86
    if (isa == ISA_AMX || isa == ISA_AVX512VNNI) return rk_dot_avx512;
    if (isa == ISA_AVX2 || isa == ISA_AVXVNNI) return rk_dot_avx2;
#endif
    (void)isa;
    return rk_dot_c;
}

/* cw . coord in 16 float32 lanes (j % 16), then a halving tree (i + i+8, i + i+4, i + i+2, 0 + 1). */
static inline float rk_coord_sum(const float *cw, const uint16_t *coord, int64_t ncoord) {
    float c[16] = {0};
    int64_t j = 0;
    for (; j + 16 <= ncoord; j += 16)
        for (int l = 0; l < 16; l++) c[l] = c[l] + cw[j + l] * (float)coord[j + l];
    for (int l = 0; j + l < ncoord; l++) c[l] = c[l] + cw[j + l] * (float)coord[j + l];
    for (int half = 8; half >= 1; half /= 2)
        for (int l = 0; l < half; l++) c[l] = c[l] + c[l + half];
    return c[0];
}

/* Per query: w = (x - center) * scale (a float32 subtract, then multiply: numpy's order), then wq = round(w * s)
 * (half away from zero: v + (v < 0 ? -0.5 : 0.5), truncated) with the s above; returns 1 / s (1 where w is all
 * zero or not finite: the caller's keys are then undefined). Every operation is exact or one IEEE rounding, so the
 * SIMD forms below equal this one bit for bit (max |w| in any order; their max(a, b) keeps b when a is NaN). */
static float rk_scale_of(float most, int64_t dim) {
    return most > 0.0f && most <= 3.0e38f ? (float)rk_wq_limit(dim) / most : 0.0f;
}

static float rk_prepare_c(const float *x, const float *center, const float *scale, int64_t dim, float *w,
                          int16_t *wq) {
    float most = 0.0f;
    for (int64_t d = 0; d < dim; d++) {
        w[d] = (x[d] - center[d]) * scale[d];
        float a = w[d] < 0.0f ? -w[d] : w[d];
        most = a > most ? a : most;
    }
    float s = rk_scale_of(most, dim);
    for (int64_t d = 0; d < dim; d++) {
        float v = w[d] * s;
        wq[d] = (int16_t)(int32_t)(v + (v < 0.0f ? -0.5f : 0.5f));
    }
    return s > 0.0f ? 1.0f / s : 1.0f;
}

#ifdef ECS_X86
__attribute__((target("avx512f,avx512bw,avx512vl")))
static float rk_prepare_avx512(const float *x, const float *center, const float *scale, int64_t dim, float *w,
                               int16_t *wq) {
    __m512 most = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d += 16) {
        __mmask16 in = dim - d >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (dim - d)) - 1);
        __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(in, x + d), _mm512_maskz_loadu_ps(in, center + d)),
                                 _mm512_maskz_loadu_ps(in, scale + d));
        _mm512_mask_storeu_ps(w + d, in, v);
        most = _mm512_max_ps(_mm512_abs_ps(v), most);
    }
    float s = rk_scale_of(_mm512_reduce_max_ps(most), dim);
    const __m512 vs = _mm512_set1_ps(s), half = _mm512_set1_ps(0.5f), minus = _mm512_set1_ps(-0.5f);
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d += 16) {
        __mmask16 in = dim - d >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (dim - d)) - 1);
        __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(in, w + d), vs);
        __m512 h = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ), half, minus);
        _mm256_mask_storeu_epi16(wq + d, in, _mm512_cvtepi32_epi16(_mm512_cvttps_epi32(_mm512_add_ps(v, h))));
    }
    return s > 0.0f ? 1.0f / s : 1.0f;
}

__attribute__((target("avx2")))
static float rk_prepare_avx2(const float *x, const float *center, const float *scale, int64_t dim, float *w,
                             int16_t *wq) {
    __m256 most = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.0f);
    int64_t d = 0;
    for (; d + 8 <= dim; d += 8) {
        __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + d), _mm256_loadu_ps(center + d)),
                                 _mm256_loadu_ps(scale + d));
        _mm256_storeu_ps(w + d, v);
        most = _mm256_max_ps(_mm256_andnot_ps(sign, v), most);
    }
    float lanes[8], top = 0.0f;
    _mm256_storeu_ps(lanes, most);
    for (int l = 0; l < 8; l++) top = lanes[l] > top ? lanes[l] : top;
    for (; d < dim; d++) {
        w[d] = (x[d] - center[d]) * scale[d];
        float a = w[d] < 0.0f ? -w[d] : w[d];
        top = a > top ? a : top;
    }
    float s = rk_scale_of(top, dim);
    const __m256 vs = _mm256_set1_ps(s), half = _mm256_set1_ps(0.5f), zero = _mm256_setzero_ps();
    for (d = 0; d + 8 <= dim; d += 8) {
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps(w + d), vs);
        __m256 h = _mm256_blendv_ps(half, _mm256_xor_ps(half, sign), _mm256_cmp_ps(v, zero, _CMP_LT_OQ));
        __m256i i32 = _mm256_cvttps_epi32(_mm256_add_ps(v, h));
        __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
        _mm_storeu_si128((__m128i *)(wq + d), i16);
    }
    for (; d < dim; d++) {
        float v = w[d] * s;
        wq[d] = (int16_t)(int32_t)(v + (v < 0.0f ? -0.5f : 0.5f));
    }
    return s > 0.0f ? 1.0f / s : 1.0f;
}
#endif

typedef float (*RankPrepareFn)(const float *, const float *, const float *, int64_t, float *, int16_t *);

static RankPrepareFn rank_prepare_fn(int isa) {
#ifdef ECS_X86
    if (isa == ISA_AMX || isa == ISA_AVX512VNNI) return rk_prepare_avx512;
    if (isa == ISA_AVX2 || isa == ISA_AVXVNNI) return rk_prepare_avx2;
#endif
    (void)isa;
    return rk_prepare_c;
}

/* Shared by ecs_rank_keys / ecs_rank_best: calls emit(ctx, q, i, key) for every candidate, queries split
 * between threads (each query's candidates in order, on one thread), with w_q = (x_q - center) * scale formed
 * here (a float32 subtract, then multiply: numpy's order). */
typedef void (*RankEmit)(void *, int64_t, int64_t, float);

#define RK_MIN_WORK (2 * 1024 * 1024) /* multiply-adds per thread of the ranking, at least */

typedef struct {
    const float *queries, *center, *scale, *cw, *norm;
    int64_t dim, ncoord, ncand, code_stride, coord_stride;
    const int8_t *codes;
    const uint16_t *coords;
    const int64_t *cand;
    RankPrepareFn prepare;
    RankDotFn dot;
    RankEmit emit;
    void *ctx;
    int64_t q0, q1;
} RankJob;

/* The key of query q's candidate i (wq, inv: from the job's prepare), prefetching the row RK_AHEAD candidates ahead
 * (end: the job's last candidate + 1). Shared by rank_run and rm_run, so both give the same bits. */
static inline float rank_key(const RankJob *j, int64_t q, int64_t i, int64_t end, const int16_t *wq, float inv) {
    int64_t p = q * j->ncand + i;
    if (p + RK_AHEAD < end) {
        int64_t ahead = j->cand[p + RK_AHEAD];
        rk_prefetch(j->codes + ahead * j->code_stride, j->dim);
        if (j->ncoord) __builtin_prefetch(j->coords + ahead * j->coord_stride, 0, 3);
    }
    int64_t row = j->cand[p];
    float part = (float)j->dot(wq, j->codes + row * j->code_stride, j->dim) * inv;
    float sum = part + rk_coord_sum(j->cw + q * j->ncoord, j->coords + row * j->coord_stride, j->ncoord);
    return j->norm[row] - 2.0f * sum;
}

static void *rank_run(void *arg) {
    const RankJob *j = (const RankJob *)arg;
    float *w = (float *)malloc((size_t)j->dim * sizeof(float));
    int16_t *wq = (int16_t *)malloc((size_t)j->dim * sizeof(int16_t));
    if (!w || !wq) {
        free(w);
        free(wq);
        return (void *)1;
    }
    int64_t end = j->q1 * j->ncand;
    for (int64_t q = j->q0; q < j->q1; q++) {
        float inv = j->prepare(j->queries + q * j->dim, j->center, j->scale, j->dim, w, wq);
        for (int64_t i = 0; i < j->ncand; i++) j->emit(j->ctx, q, i, rank_key(j, q, i, end, wq, inv));
    }
    free(w);
    free(wq);
    return NULL;
}

static int rank_candidates(const float *queries, const float *center, const float *scale, const float *cw, int64_t nq,
                           int64_t dim, const int8_t *codes, int64_t code_stride, int64_t ncoord, const uint16_t *coords,
                           int64_t coord_stride, const float *norm, int64_t m, const int64_t *cand, int64_t ncand,
                           int isa, int threads, RankEmit emit, void *ctx) {
    if (nq < 0 || dim < 1 || ncand < 0 || ncoord < 0 || code_stride < dim || (ncoord && coord_stride < ncoord) ||
        !ecs_isa_supported(isa))
        return -1;
    int64_t pairs = nq * ncand;
    for (int64_t p = 0; p < pairs; p++)
        if (cand[p] < 0 || cand[p] >= m) return -1;
    int64_t most = pairs * dim / RK_MIN_WORK;
    threads = job_threads(threads, most, nq);
    RankJob jobs[64];
    for (int t = 0; t < threads; t++) {
        RankJob job = {queries, center, scale, cw, norm, dim, ncoord, ncand, code_stride, coord_stride, codes, coords,
                       cand, rank_prepare_fn(isa), rank_dot_fn(isa), emit, ctx, nq * t / threads, nq * (t + 1) / threads};
        jobs[t] = job;
    }
    return run_jobs(rank_run, jobs, sizeof(RankJob), threads) ? -2 : 0;
}

typedef struct {
    float *out;
    int64_t ncand;
} KeysOut;

static void emit_key(void *ctx, int64_t q, int64_t i, float key) {
    KeysOut *o = (KeysOut *)ctx;
    o->out[q * o->ncand + i] = key;
}

/* Rank keys of each query's ncand candidates, out[q * ncand + i] (see above), on up to `threads` threads
 * (one per RK_MIN_WORK multiply-adds). queries: nq x dim; center, scale: dim; cw: nq x ncoord; norm: m. Returns 0, or -1 (bad arguments, a candidate outside [0, m),
 * unsupported isa), -2 (out of memory). */
int ecs_rank_keys(const float *queries, const float *center, const float *scale, const float *cw, int64_t nq,
                  int64_t dim, const int8_t *codes, int64_t code_stride, int64_t ncoord, const uint16_t *coords,
                  int64_t coord_stride, const float *norm, int64_t m, const int64_t *cand, int64_t ncand, float *out,
                  int isa, int threads) {
    KeysOut o = {out, ncand};
    return rank_candidates(queries, center, scale, cw, nq, dim, codes, code_stride, ncoord, coords, coord_stride, norm,
                           m, cand, ncand, isa, threads, emit_key, &o);
}

typedef struct {
    float *best; /* nq x keep */
    int64_t *pos, *filled;
    int64_t keep;
} BestOut;

static void emit_best(void *ctx, int64_t q, int64_t i, float key) {
    BestOut *o = (BestOut *)ctx;
    keep_smallest(o->best + q * o->keep, o->pos + q * o->keep, o->filled + q, o->keep, key, i);
}

/* The keep candidates of each query with the smallest rank keys, ascending by (key, candidate position):
 * out_idx is nq x keep row ids (ecs_rerank then measures them). Returns as ecs_rank_keys. */
int ecs_rank_best(const float *queries, const float *center, const float *scale, const float *cw, int64_t nq,
                  int64_t dim, const int8_t *codes, int64_t code_stride, int64_t ncoord, const uint16_t *coords,
                  int64_t coord_stride, const float *norm, int64_t m, const int64_t *cand, int64_t ncand, int64_t keep,
                  int64_t *out_idx, int isa, int threads) {
    if (keep < 1 || keep > ncand) return -1;
    float *best = (float *)malloc((size_t)(nq * keep) * sizeof(float));
    int64_t *filled = (int64_t *)calloc((size_t)(nq > 0 ? nq : 1), sizeof(int64_t));
    if (!best || !filled) {
        free(best);
        free(filled);
        return -2;
    }
    BestOut o = {best, out_idx, filled, keep}; /* positions first, row ids at the end */
    int rc = rank_candidates(queries, center, scale, cw, nq, dim, codes, code_stride, ncoord, coords, coord_stride, norm,
                             m, cand, ncand, isa, threads, emit_best, &o);
    if (rc == 0)
        for (int64_t p = 0; p < nq * keep; p++) out_idx[p] = cand[p / keep * ncand + out_idx[p]];
    free(best);
    free(filled);
    return rc;
}

/* ---- rank, then measure: ecs_rank_best + ecs_rerank in one pass over the queries ----------------
 *
 * Each thread ranks its queries' candidates (the keys of ecs_rank_keys), keeps each query's `keep` best, and
 * measures them (ecs_l2) RR_ROWS at a time while the queries and the winners' rows are still in its cache;
 * then orders each query's measured rows by (distance, rank). The results are ecs_rank_best's followed by
 * ecs_rerank's, bit for bit. Why: the two calls read the Q x D queries twice (bottle WRN50: 3.2 MB, written
 * by the engine just before) and the winners' rows twice. */
typedef struct {
    RankJob rank;
    const Rerank *rr;
    int isa;
    int64_t keep;
    float *scratch;   /* nq x keep: the kept candidates' distances */
    int64_t *kept;    /* nq x keep: their row ids, in rank order */
    float *out_dist;  /* nq x keep */
    int64_t *out_idx; /* nq x keep */
} RmJob;

static void *rm_run(void *arg) {
    const RmJob *job = (const RmJob *)arg;
    const RankJob *j = &job->rank;
    const Rerank *c = job->rr;
    const int64_t keep = job->keep;
    float *w = (float *)malloc((size_t)j->dim * sizeof(float));
    int16_t *wq = (int16_t *)malloc((size_t)j->dim * sizeof(int16_t));
    float *bk = (float *)malloc((size_t)keep * sizeof(float));
    int64_t *bp = (int64_t *)malloc((size_t)keep * sizeof(int64_t));
    Group *g = (Group *)malloc(sizeof(Group));
    if (!w || !wq || !bk || !bp || !g) {
        free(w); free(wq); free(bk); free(bp); free(g);
        return (void *)1;
    }
    int64_t end = j->q1 * j->ncand;
    int pending = 0;
    int64_t slot_at[RR_ROWS];
    for (int64_t q = j->q0; q < j->q1; q++) {
        float inv = j->prepare(j->queries + q * j->dim, j->center, j->scale, j->dim, w, wq);
        int64_t filled = 0;
        for (int64_t i = 0; i < j->ncand; i++) keep_smallest(bk, bp, &filled, keep, rank_key(j, q, i, end, wq, inv), i);
        for (int64_t t = 0; t < keep; t++) {
            int64_t row = j->cand[q * j->ncand + bp[t]];
            job->kept[q * keep + t] = row;
            slot_at[pending] = q * keep + t;
            rr_slot(c, g, pending, row, j->queries + q * j->dim);
            if (++pending == RR_ROWS) {
                float d[RR_ROWS];
                rr_measure(c, g, RR_ROWS, job->isa, d);
                for (int r = 0; r < RR_ROWS; r++) job->scratch[slot_at[r]] = d[r];
                pending = 0;
            }
        }
    }
    if (pending) { /* the last group, padded by repeating its first pair (results dropped) */
        for (int r = pending; r < RR_ROWS; r++) {
            g->code[r] = g->code[0];
            g->x[r] = g->x[0];
            memcpy(g->cval[r], g->cval[0], sizeof g->cval[0]);
            for (int l = 0; l < RR_LANES; l++) g->acc[r][l] = 0.0;
        }
        float d[RR_ROWS];
        rr_measure(c, g, pending, job->isa, d);
        for (int r = 0; r < pending; r++) job->scratch[slot_at[r]] = d[r];
    }
    for (int64_t q = j->q0; q < j->q1; q++) { /* ecs_rerank's order: (distance, rank) */
        int64_t filled = 0;
        float *od = job->out_dist + q * keep;
        int64_t *oi = job->out_idx + q * keep;
        for (int64_t t = 0; t < keep; t++) keep_smallest(od, oi, &filled, keep, job->scratch[q * keep + t], t);
        for (int64_t t = 0; t < keep; t++) oi[t] = job->kept[q * keep + oi[t]];
    }
    free(w); free(wq); free(bk); free(bp); free(g);
    return NULL;
}

/* ecs_rank_best (keep of each query's ncand candidates, by rank key) then ecs_rerank (their true L2, ascending
 * by (distance, rank)) in one call: out_dist / out_idx are nq x keep. Takes ecs_rank_keys' arguments, then the
 * decoding tables of ecs_l2 (basis, coord_scale, coord_offset). Returns as ecs_rank_keys. */
int ecs_rank_measure(const float *queries, const float *center, const float *scale, const float *cw, int64_t nq,
                     int64_t dim, const int8_t *codes, int64_t code_stride, int64_t ncoord, const uint16_t *coords,
                     int64_t coord_stride, const float *norm, int64_t m, const int64_t *cand, int64_t ncand,
                     int64_t keep, const float *dec_scale, const float *dec_offset, const float *basis,
                     const float *coord_scale, const float *coord_offset, float *out_dist, int64_t *out_idx, int isa,
                     int threads) {
    if (nq < 0 || dim < 1 || ncand < 1 || keep < 1 || keep > ncand || ncoord < 0 || ncoord > RR_MAX_COORDS ||
        code_stride < dim || (ncoord && coord_stride < ncoord) || !ecs_isa_supported(isa))
        return -1;
    for (int64_t p = 0; p < nq * ncand; p++)
        if (cand[p] < 0 || cand[p] >= m) return -1;
    if (nq == 0) return 0;
    float *scratch = (float *)malloc((size_t)(nq * keep) * sizeof(float));
    int64_t *kept = (int64_t *)malloc((size_t)(nq * keep) * sizeof(int64_t));
    if (!scratch || !kept) {
        free(scratch); free(kept);
        return -2;
    }
    Rerank rr = {queries, nq, dim, codes, code_stride, dec_scale, dec_offset, basis, ncoord, coords, coord_stride,
                 coord_scale, coord_offset, NULL, keep, NULL};
    /* threads as the ranking's (RK_MIN_WORK), the measure's work (RR_MIN_WORK) added */
    int64_t work = nq * ncand * dim + nq * keep * dim * (ncoord + 2) / 6, most = work / RK_MIN_WORK;
    threads = job_threads(threads, most, nq);
    RmJob jobs[64];
    for (int t = 0; t < threads; t++) {
        RankJob rank = {queries, center, scale, cw, norm, dim, ncoord, ncand, code_stride, coord_stride, codes, coords,
                        cand, rank_prepare_fn(isa), rank_dot_fn(isa), NULL, NULL, nq * t / threads,
                        nq * (t + 1) / threads};
        RmJob job = {rank, &rr, isa, keep, scratch, kept, out_dist, out_idx};
        jobs[t] = job;
    }
    int rc = run_jobs(rm_run, jobs, sizeof(RmJob), threads) ? -2 : 0;
    free(scratch); free(kept);
    return rc;
}

/* ---- projection: coarse mode's PCA coordinates of the queries (and of the rows, at load) ----
 *
 * out[q * p + j] = sum over d = 0 .. dim-1, in that order, of (x[q * dim + d] - center[d]) * bt[d * p + j]:
 * a float32 subtract, then one fused multiply-add per term (correctly rounded: the hardware FMA of the AVX2,
 * AVX-512 and NEON paths, rr_fma on the baseline), accumulated from +0, so every path and thread count returns
 * the same bits. Why native: numpy's (x - center) @ B on the one BLAS thread the detector allows took 1.0 of the
 * 6.4 ms bottle WRN50 search (784 x 1024 x 32); here it is split between the kernel's threads and no 784 x 1024
 * centred copy is made. Why fused: the multiply-adds are the whole cost, and one instruction instead of two took
 * the 784 queries from 0.45 to 0.38 ms in the detector (RESULTS.md #11, "Integer ranking"). The lanes run over j
 * (the p outputs). */
#define PJ_QUERIES 4   /* queries sharing one pass over bt */
#define PJ_WIDTH 32    /* outputs per pass (accumulators of PJ_QUERIES x PJ_WIDTH floats) */
#define PJ_MIN_WORK (4 * 1024 * 1024) /* multiply-adds per thread, at least */

static inline __attribute__((always_inline)) void pj_block(const float *x, int64_t nq, int64_t dim,
                                                          const float *center, const float *bt, int64_t p,
                                                          float *out) {
    const float *xs[PJ_QUERIES];
    for (int i = 0; i < PJ_QUERIES; i++) xs[i] = x + (i < nq ? i : 0) * dim; /* a short block repeats row 0 */
    for (int64_t j0 = 0; j0 < p; j0 += PJ_WIDTH) {
        float acc[PJ_QUERIES][PJ_WIDTH];
        float b[PJ_WIDTH];
        memset(acc, 0, sizeof acc);
        int64_t w = p - j0 < PJ_WIDTH ? p - j0 : PJ_WIDTH;
        memset(b, 0, sizeof b);
        for (int64_t d = 0; d < dim; d++) {
            const float *bd = bt + d * p + j0;
            if (w < PJ_WIDTH) { /* the last outputs: lanes past w multiply 0 and are dropped */
                memcpy(b, bd, (size_t)w * sizeof(float));
                bd = b;
            }
            for (int i = 0; i < PJ_QUERIES; i++) {
                float v = xs[i][d] - center[d];
                for (int j = 0; j < PJ_WIDTH; j++) acc[i][j] = rr_fma(v, bd[j], acc[i][j]);
            }
        }
        for (int64_t i = 0; i < nq && i < PJ_QUERIES; i++) memcpy(out + i * p + j0, acc[i], (size_t)w * sizeof(float));
    }
}

static void pj_rows_c(const float *x, int64_t nq, int64_t dim, const float *center, const float *bt, int64_t p,
                      float *out) {
    for (int64_t q = 0; q < nq; q += PJ_QUERIES)
        pj_block(x + q * dim, nq - q, dim, center, bt, p, out + q * p);
}

#ifdef ECS_X86
/* pj_block with its accumulators in registers: PJ_QUERIES_512 queries x 2 zmm (32 outputs), masked past p;
 * the block's centred queries are formed first (the same float32 subtraction), then broadcast from memory. */
#define PJ_QUERIES_512 8
__attribute__((target("avx512f,fma")))
static void pj_rows_avx512(const float *x, int64_t nq, int64_t dim, const float *center, const float *bt, int64_t p,
                           float *out) {
    float *centred = (float *)malloc((size_t)(PJ_QUERIES_512 * dim) * sizeof(float));
    if (!centred) { /* out of memory: the baseline loop, same bits */
        pj_rows_c(x, nq, dim, center, bt, p, out);
        return;
    }
    for (int64_t q = 0; q < nq; q += PJ_QUERIES_512) {
        for (int i = 0; i < PJ_QUERIES_512; i++) {
            const float *xi = x + (q + i < nq ? q + i : q) * dim;
            for (int64_t d = 0; d < dim; d++) centred[i * dim + d] = xi[d] - center[d];
        }
        for (int64_t j0 = 0; j0 < p; j0 += 32) {
            int64_t w = p - j0 < 32 ? p - j0 : 32;
            __mmask16 m0 = w >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << w) - 1);
            __mmask16 m1 = w >= 32 ? (__mmask16)0xFFFF : w > 16 ? (__mmask16)((1u << (w - 16)) - 1) : 0;
            __m512 acc[PJ_QUERIES_512][2];
            for (int i = 0; i < PJ_QUERIES_512; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
            for (int64_t d = 0; d < dim; d++) {
                const float *bd = bt + d * p + j0;
                __m512 b0 = _mm512_maskz_loadu_ps(m0, bd), b1 = _mm512_maskz_loadu_ps(m1, bd + 16);
                for (int i = 0; i < PJ_QUERIES_512; i++) {
                    __m512 v = _mm512_set1_ps(centred[i * dim + d]);
                    acc[i][0] = _mm512_fmadd_ps(v, b0, acc[i][0]);
                    acc[i][1] = _mm512_fmadd_ps(v, b1, acc[i][1]);
                }
            }
            for (int64_t i = 0; i < PJ_QUERIES_512 && q + i < nq; i++) {
                _mm512_mask_storeu_ps(out + (q + i) * p + j0, m0, acc[i][0]);
                _mm512_mask_storeu_ps(out + (q + i) * p + j0 + 16, m1, acc[i][1]);
            }
        }
    }
    free(centred);
}

/* PJ_QUERIES queries x 16 outputs in 8 ymm, the last outputs through a zero-padded copy of bt's row. */
__attribute__((target("avx2,fma")))
static void pj_rows_avx2(const float *x, int64_t nq, int64_t dim, const float *center, const float *bt, int64_t p,
                         float *out) {
    float b[16], o[16];
    for (int64_t q = 0; q < nq; q += PJ_QUERIES) {
        const float *xs[PJ_QUERIES];
        for (int i = 0; i < PJ_QUERIES; i++) xs[i] = x + (q + i < nq ? q + i : q) * dim;
        for (int64_t j0 = 0; j0 < p; j0 += 16) {
            int64_t w = p - j0 < 16 ? p - j0 : 16;
            __m256 acc[PJ_QUERIES][2];
            for (int i = 0; i < PJ_QUERIES; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
            memset(b, 0, sizeof b);
            for (int64_t d = 0; d < dim; d++) {
                const float *bd = bt + d * p + j0;
                if (w < 16) {
                    memcpy(b, bd, (size_t)w * sizeof(float));
                    bd = b;
                }
                __m256 b0 = _mm256_loadu_ps(bd), b1 = _mm256_loadu_ps(bd + 8);
                for (int i = 0; i < PJ_QUERIES; i++) {
                    __m256 v = _mm256_set1_ps(xs[i][d] - center[d]);
                    acc[i][0] = _mm256_fmadd_ps(v, b0, acc[i][0]);
                    acc[i][1] = _mm256_fmadd_ps(v, b1, acc[i][1]);
                }
            }
            for (int64_t i = 0; i < PJ_QUERIES && q + i < nq; i++) {
                _mm256_storeu_ps(o, acc[i][0]);
                _mm256_storeu_ps(o + 8, acc[i][1]);
                memcpy(out + (q + i) * p + j0, o, (size_t)w * sizeof(float));
            }
        }
    }
}
#endif

typedef void (*ProjectFn)(const float *, int64_t, int64_t, const float *, const float *, int64_t, float *);

static ProjectFn project_fn(int isa) {
#ifdef ECS_X86
    if (isa == ISA_AMX || isa == ISA_AVX512VNNI) return pj_rows_avx512;
    if (isa == ISA_AVX2 || isa == ISA_AVXVNNI) return pj_rows_avx2;
#endif
    (void)isa;
    return pj_rows_c;
}

typedef struct {
    ProjectFn fn;
    const float *x, *center, *bt;
    int64_t dim, p, q0, q1;
    float *out;
} ProjectJob;

static void *project_run(void *arg) {
    const ProjectJob *j = (const ProjectJob *)arg;
    j->fn(j->x + j->q0 * j->dim, j->q1 - j->q0, j->dim, j->center, j->bt, j->p, j->out + j->q0 * j->p);
    return NULL;
}

/* The projections out (nq x p) of x (nq x dim, rows contiguous) centred on center (dim) onto bt (dim x p),
 * as above, on up to `threads` threads (one per PJ_MIN_WORK multiply-adds; blocks of PJ_QUERIES queries).
 * Returns 0, or -1 (bad arguments / unsupported isa), -2 (a thread failed). */
int ecs_project(const float *x, int64_t nq, int64_t dim, const float *center, const float *bt, int64_t p, float *out,
                int isa, int threads) {
    if (nq < 0 || dim < 1 || p < 1 || !ecs_isa_supported(isa)) return -1;
    if (nq == 0) return 0;
    int64_t blocks = (nq + PJ_QUERIES - 1) / PJ_QUERIES, most = nq * dim * p / PJ_MIN_WORK;
    threads = job_threads(threads, most, blocks);
    ProjectJob jobs[64];
    for (int t = 0; t < threads; t++) {
        int64_t q0 = blocks * t / threads * PJ_QUERIES, q1 = blocks * (t + 1) / threads * PJ_QUERIES;
        ProjectJob job = {project_fn(isa), x, center, bt, dim, p, q0, q1 < nq ? q1 : nq, out};
        jobs[t] = job;
    }
    return run_jobs(project_run, jobs, sizeof(ProjectJob), threads) ? -2 : 0;
}

/* ---- the certified maximum's exact search: one query, pruned by int8 bounds ------------------
 *
 * The exact k nearest rows of one query (true L2 by ecs_l2, ties by row), measuring only rows whose lower
 * bound can still beat the current k-th distance. The bounds come from int8 codes of the rows' PCA projections
 * (ptable: M rows of p codes, pstride bytes apart; y^_m = mid + step * code_m): lb_m = (|c + step * code_m| -
 * margin) * shrink with c = mid - x^ (x^ the query's projection), margin >= |y^ - y| (their rounding) plus
 * slack, so lb_m <= |x^ - y_m| <= |x - y_m| (an orthogonal projection never lengthens a vector). Why native:
 * in numpy the bounds, the partial sort and the steps' bookkeeping took 0.55 of the 0.8 ms bottle WRN50's
 * certified query cost per image in the detector, and the float32 projections they read (1.9 MB, 1/32 of the
 * fp32 coreset) were cold after the engine ran. Rows are measured in ascending (lb, row) order, 64 in the first
 * step, doubling (up to 4096), each step cut at the first bound above the k-th distance. The squared norm
 * runs over 16 float32 lanes (d % 16) and a halving tree, as the projection: the same bits on every path. */
#define EP_FIRST 64
#define EP_MAX_STEP 4096

typedef struct {
    float lb;
    int32_t row;
} Bound;

static int bound_order(const void *a, const void *b) {
    const Bound *x = (const Bound *)a, *y = (const Bound *)b;
    if (x->lb != y->lb) return x->lb < y->lb ? -1 : 1;
    return (x->row > y->row) - (x->row < y->row);
}

static inline __attribute__((always_inline)) float ep_sqnorm(const int8_t *code, const float *c, const float *step,
                                                            int64_t p16) {
    float lane[16] = {0};
    for (int64_t d0 = 0; d0 < p16; d0 += 16)
        for (int l = 0; l < 16; l++) {
            float v = (float)code[d0 + l] * step[d0 + l] + c[d0 + l];
            lane[l] = lane[l] + v * v;
        }
    for (int half = 8; half >= 1; half /= 2)
        for (int l = 0; l < half; l++) lane[l] = lane[l] + lane[l + half];
    return lane[0];
}

/* Rows whose squared norm is at most limit2 (all when limit2 is +inf), as (squared norm, row). c and step are
 * zero-padded to p16; a row narrower than p16 bytes is read through a zero-padded copy. */
static inline __attribute__((always_inline)) int64_t ep_scan(const int8_t *table, int64_t stride, int64_t m,
                                                             int64_t p16, const float *c, const float *step,
                                                             float limit2, Bound *out) {
    int64_t n = 0;
    int8_t row[RR_MAX_COORDS + 16];
    for (int64_t i = 0; i < m; i++) {
        const int8_t *code = table + i * stride;
        if (stride < p16) {
            memset(row, 0, (size_t)p16);
            memcpy(row, code, (size_t)stride);
            code = row;
        }
        float s = ep_sqnorm(code, c, step, p16);
        if (s <= limit2) {
            out[n].lb = s;
            out[n].row = (int32_t)i;
            n++;
        }
    }
    return n;
}

static int64_t ep_scan_c(const int8_t *t, int64_t s, int64_t m, int64_t p16, const float *c, const float *st, float l,
                         Bound *o) { return ep_scan(t, s, m, p16, c, st, l, o); }
#ifdef ECS_X86
/* 16 rows at a time, each row's 16 lanes in a zmm, then one transposing reduction of the 16 vectors whose adds are
 * the scalar halving tree's (i + i+8, i + i+4, i + i+2, 0 + 1): the same bits, without a horizontal sum per row
 * (bottle WRN50's 14 739 rows: 0.18 -> 0.09 ms per certified query). Lane L of the result holds row 4 (L % 4) + L / 4. */
__attribute__((target("avx512f,avx512bw,avx512vl")))
static int64_t ep_scan_avx512(const int8_t *t, int64_t s, int64_t m, int64_t p16, const float *c, const float *st,
                              float l, Bound *o) {
    if (s < p16) return ep_scan(t, s, m, p16, c, st, l, o); /* rows narrower than the padded width */
    const __m512 limit = _mm512_set1_ps(l);
    int64_t n = 0, i0 = 0;
    for (; i0 + 16 <= m; i0 += 16) {
        __m512 sq[16];
        for (int r = 0; r < 16; r++) {
            const int8_t *code = t + (i0 + r) * s;
            __m512 lane = _mm512_setzero_ps();
            for (int64_t d0 = 0; d0 < p16; d0 += 16) {
                __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(code + d0))));
                __m512 v = _mm512_add_ps(_mm512_mul_ps(x, _mm512_loadu_ps(st + d0)), _mm512_loadu_ps(c + d0));
                lane = _mm512_add_ps(lane, _mm512_mul_ps(v, v));
            }
            sq[r] = lane;
        }
        __m512 u[8], w[4], y[2];
        for (int k = 0; k < 8; k++) /* i + i+8: rows 2k, 2k+1 */
            u[k] = _mm512_add_ps(_mm512_shuffle_f32x4(sq[2 * k], sq[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_f32x4(sq[2 * k], sq[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
        for (int k = 0; k < 4; k++) /* i + i+4: rows 4k .. 4k+3, one per 128-bit chunk */
            w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * k], u[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_f32x4(u[2 * k], u[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
        for (int k = 0; k < 2; k++) /* i + i+2 */
            y[k] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * k], w[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(w[2 * k], w[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
        __m512 z = _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)), /* 0 + 1 */
                                 _mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
        __mmask16 hit = _mm512_cmp_ps_mask(z, limit, _CMP_LE_OQ);
        if (hit) {
            float sums[16];
            _mm512_storeu_ps(sums, z);
            while (hit) {
                int lane = __builtin_ctz(hit);
                hit &= hit - 1;
                o[n].lb = sums[lane];
                o[n].row = (int32_t)(i0 + 4 * (lane % 4) + lane / 4);
                n++;
            }
        }
    }
    int64_t tail = ep_scan(t + i0 * s, s, m - i0, p16, c, st, l, o + n); /* the last < 16 rows */
    for (int64_t i = n; i < n + tail; i++) o[i].row += (int32_t)i0;
    return n + tail;
}
__attribute__((target("avx2")))
static int64_t ep_scan_avx2(const int8_t *t, int64_t s, int64_t m, int64_t p16, const float *c, const float *st,
                            float l, Bound *o) { return ep_scan(t, s, m, p16, c, st, l, o); }
#endif

/* Returns 0, or -1 (bad arguments / unsupported isa), -2 (out of memory). out_dist / out_idx: k, nearest first;
 * measured: rows decoded. bound / holder: a distance already reached and its row (k == 1), else +inf / -1. */
int ecs_exact_pruned(const float *query, int64_t dim, const int8_t *codes, int64_t code_stride, const float *scale,
                     const float *offset, const float *basis, int64_t ncoord, const uint16_t *coords,
                     int64_t coord_stride, const float *coord_scale, const float *coord_offset, int64_t m,
                     const int8_t *ptable, int64_t pstride, int64_t p, const float *c, const float *step,
                     float margin, float shrink, float bound, int64_t holder, int64_t k, float *out_dist,
                     int64_t *out_idx, int64_t *measured, int isa) {
    if (dim < 1 || m < 1 || p < 1 || p > RR_MAX_COORDS || pstride < 1 || k < 1 || k > m || !(shrink > 0.0f) ||
        !ecs_isa_supported(isa) || (k == 1 && (holder < 0 || holder >= m)))
        return -1;
    int64_t p16 = (p + 15) / 16 * 16;
    float cpad[RR_MAX_COORDS + 16] = {0}, spad[RR_MAX_COORDS + 16] = {0};
    memcpy(cpad, c, (size_t)p * sizeof(float));
    memcpy(spad, step, (size_t)p * sizeof(float));
    Bound *order = (Bound *)malloc((size_t)m * sizeof(Bound));
    int64_t *ids = (int64_t *)malloc((size_t)EP_MAX_STEP * sizeof(int64_t));
    float *dist = (float *)malloc((size_t)EP_MAX_STEP * sizeof(float));
    if (!order || !ids || !dist) {
        free(order); free(ids); free(dist);
        return -2;
    }
    int64_t filled = 0;
    float kth = INFINITY;
    if (k == 1) {
        out_dist[0] = bound;
        out_idx[0] = holder;
        filled = 1;
        kth = bound;
    }
    /* loose on purpose: a row is dropped here only when its exact bound below is certainly above kth */
    float reach = kth / shrink + margin;
    float limit2 = reach < INFINITY ? reach * reach * 1.0001f + 1e-30f : INFINITY;
    int64_t (*scan)(const int8_t *, int64_t, int64_t, int64_t, const float *, const float *, float, Bound *) = ep_scan_c;
#ifdef ECS_X86
    if (isa == ISA_AMX || isa == ISA_AVX512VNNI) scan = ep_scan_avx512;
    else if (isa == ISA_AVX2 || isa == ISA_AVXVNNI) scan = ep_scan_avx2;
#endif
    int64_t n = scan(ptable, pstride, m, p16, cpad, spad, limit2, order);
    for (int64_t i = 0; i < n; i++) order[i].lb = ((float)rr_sqrt((double)order[i].lb) - margin) * shrink;
    qsort(order, (size_t)n, sizeof(Bound), bound_order);
    int rc = 0;
    int64_t done = 0, step_rows = EP_FIRST;
    *measured = 0;
    while (done < n) {
        int64_t take = 0;
        while (take < step_rows && done + take < n && order[done + take].lb <= kth) {
            ids[take] = order[done + take].row;
            take++;
        }
        if (take == 0) break;
        done += take;
        step_rows = step_rows * 2 < EP_MAX_STEP ? step_rows * 2 : EP_MAX_STEP;
        rc = ecs_l2(query, 1, dim, codes, code_stride, scale, offset, basis, ncoord, coords, coord_stride, coord_scale,
                    coord_offset, ids, take, dist, isa, 1);
        if (rc) break;
        *measured += take;
        for (int64_t i = 0; i < take; i++) { /* into the k best, ascending by (distance, row) */
            float d = dist[i];
            int64_t row = ids[i];
            if (filled == k && !(d < out_dist[k - 1] || (d == out_dist[k - 1] && row < out_idx[k - 1]))) continue;
            int64_t at = filled < k ? filled++ : k - 1;
            while (at > 0 && (d < out_dist[at - 1] || (d == out_dist[at - 1] && row < out_idx[at - 1]))) {
                out_dist[at] = out_dist[at - 1];
                out_idx[at] = out_idx[at - 1];
                at--;
            }
            out_dist[at] = d;
            out_idx[at] = row;
        }
        if (filled == k) kth = out_dist[k - 1];
    }
    free(order); free(ids); free(dist);
    return rc;
}
