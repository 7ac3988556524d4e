/* PNG row reconstruction ("unfiltering") for edgecore.runtime.png, loaded with ctypes.
 *
 * Why native: a 900×900 RGB PNG spends ~40 % of Pillow's decode in its scalar, branchy Paeth filter
 * (perf, bottle frames); the same arithmetic written branch-free takes a third of that time, and runs of Paeth
 * rows reconstructed side by side (below) a quarter of that. Compiled for the baseline ISA (no -march): the same
 * code on an AVX2-only x86-64 and on aarch64, with AVX2 intrinsics in functions chosen at run time.
 *
 * ecp_unfilter(src, src_len, dst, height, rowbytes, bpp):
 *   src: height rows of (1 filter-type byte + rowbytes bytes), exactly src_len = height · (rowbytes + 1);
 *   dst: height · rowbytes bytes; bpp: bytes per complete pixel (1..8), the filters' left distance.
 *   Returns 0, -1 for a filter type outside 0..4 (a corrupt file), -2 for sizes that disagree, -3 out of memory.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ECP_BAD_FILTER (-1)
#define ECP_BAD_SIZE (-2)
#define ECP_NO_MEMORY (-3)

/* The predictor of PNG's filter 4 without branches: pa = |b − c|, pb = |a − c|, pc = |a + b − 2c|;
 * a if pa is smallest, else b if pb ≤ pc, else c (the specification's tie order). */
static inline int paeth(int a, int b, int c) {
    int pa = abs(b - c), pb = abs(a - c), pc = abs(a + b - 2 * c);
    int bc = pb <= pc ? b : c;
    return (pa <= pb && pa <= pc) ? a : bc;
}

static void row_sub(const uint8_t *in, uint8_t *out, int64_t n, int bpp) {
    memcpy(out, in, (size_t)(n < bpp ? n : bpp));
    for (int64_t i = bpp; i < n; i++) out[i] = (uint8_t)(in[i] + out[i - bpp]);
}

static void row_up(const uint8_t *in, const uint8_t *up, uint8_t *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = (uint8_t)(in[i] + up[i]);
}

static void row_avg(const uint8_t *in, const uint8_t *up, uint8_t *out, int64_t n, int bpp) {
    int64_t i = 0;
    for (; i < n && i < bpp; i++) out[i] = (uint8_t)(in[i] + (up[i] >> 1));
    for (; i < n; i++) out[i] = (uint8_t)(in[i] + ((out[i - bpp] + up[i]) >> 1));
}

static void row_paeth(const uint8_t *in, const uint8_t *up, uint8_t *out, int64_t n, int bpp) {
    int64_t i = 0;
    for (; i < n && i < bpp; i++) out[i] = (uint8_t)(in[i] + up[i]);  /* a = c = 0: the predictor is b */
    if (bpp == 3) {  /* RGB: three independent channels per step keep the dependency chains side by side */
        for (; i + 3 <= n; i += 3) {
            out[i] = (uint8_t)(in[i] + paeth(out[i - 3], up[i], up[i - 3]));
            out[i + 1] = (uint8_t)(in[i + 1] + paeth(out[i - 2], up[i + 1], up[i - 2]));
            out[i + 2] = (uint8_t)(in[i + 2] + paeth(out[i - 1], up[i + 2], up[i - 1]));
        }
    }
    for (; i < n; i++) out[i] = (uint8_t)(in[i] + paeth(out[i - bpp], up[i], up[i - bpp]));
}

/* ---- Paeth rows eight at a time (3- and 4-byte pixels) --------------------------------------------------
 * A Paeth row is one long dependency chain: each pixel needs the one to its left. The rows below it need only
 * what is above them, so eight consecutive Paeth rows are reconstructed side by side, each one pixel behind the
 * one above (a wavefront): slot k holds row k's pixel t − k at step t, its 3 or 4 bytes in 16-bit lanes (AVX2:
 * slots 0–3 and 4–7 in two 256-bit vectors; portable: pairs of slots in four 128-bit vectors). A slot's pixel above is then the slot above's result
 * of the step before, moved over in registers (a load of what was just stored would wait for the store to reach
 * the cache); only the top row reads its row above from memory. One step is one chain for all eight rows, in
 * GCC's portable vector types (SSE2 on x86-64, NEON on aarch64) or AVX2 intrinsics where the CPU has them.
 * Pixels are read and written as 4 bytes: for RGB the 4th lane is the next pixel's first byte, computed as
 * garbage, written, and overwritten by the next step. The first and last pixels of each row, where the slots
 * start and end, take the scalar code. The same bytes as row_paeth, tested. */
#define WAVE_ROWS 8

static inline uint32_t load32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline void store32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

static inline void paeth_pixel(const uint8_t *in, const uint8_t *up, uint8_t *out, int64_t x, int bpp) {
    for (int64_t i = x * bpp; i < (x + 1) * bpp; i++)
        out[i] = (uint8_t)(in[i] + (x ? paeth(out[i - bpp], up[i], up[i - bpp]) : up[i]));
}

/* The wavefront's start: the upper rows' first pixels, up to the step where every slot is in its row; then each
 * slot's left (a) and upper-left (c) pixels as 4-byte words (zeros for the last slot, which starts at pixel 0). */
static void wave_start(const uint8_t *const in[WAVE_ROWS], const uint8_t *const up[WAVE_ROWS],
                       uint8_t *const out[WAVE_ROWS], int bpp, uint32_t a[WAVE_ROWS], uint32_t c[WAVE_ROWS]) {
    for (int64_t t = 0; t < WAVE_ROWS - 1; t++)
        for (int k = 0; k <= t; k++) paeth_pixel(in[k], up[k], out[k], t - k, bpp);
    for (int k = 0; k < WAVE_ROWS; k++) {
        int64_t x = WAVE_ROWS - 1 - k;
        a[k] = x ? load32(out[k] + (x - 1) * bpp) : 0;
        c[k] = x ? load32(up[k] + (x - 1) * bpp) : 0;
    }
}

/* The wavefront's end: each row's pixels from step `from` on (the lower rows' last pixels). */
static void wave_end(const uint8_t *const in[WAVE_ROWS], const uint8_t *const up[WAVE_ROWS],
                     uint8_t *const out[WAVE_ROWS], int64_t width, int bpp, int64_t from) {
    for (int64_t t = from; t < width + WAVE_ROWS - 1; t++)
        for (int k = 0; k < WAVE_ROWS; k++)
            if (t - k < width) paeth_pixel(in[k], up[k], out[k], t - k, bpp);
}

/* Portable: slots in pairs, four 128-bit vectors of 16-bit lanes (SSE2 on x86-64, NEON on aarch64). */
typedef int16_t v8i16 __attribute__((vector_size(16)));

typedef uint8_t v8u8 __attribute__((vector_size(8)));
typedef uint32_t v2u32 __attribute__((vector_size(8)));

static inline v8i16 widen2(uint32_t first, uint32_t second) {  /* two 4-byte pixels → their bytes in 16-bit lanes */
    return __builtin_convertvector((v8u8)(v2u32){first, second}, v8i16);
}

static inline v2u32 narrow2(v8i16 lanes) {  /* the inverse (lanes hold 0..255) */
    return (v2u32)__builtin_convertvector(lanes, v8u8);
}

static inline v8i16 up_one_slot(v8i16 lower, v8i16 upper) {  /* [lower's second slot, upper's first] */
    return __builtin_shufflevector(lower, upper, 4, 5, 6, 7, 8, 9, 10, 11);
}

static inline v8i16 vabs16(v8i16 v) {
    v8i16 sign = v >> 15;
    return (v ^ sign) - sign;
}

/* The reconstructed bytes (in + Paeth(a, b, c)) mod 256, lane by lane, with row_paeth's tie order. */
static inline v8i16 paeth_lanes(v8i16 a, v8i16 b, v8i16 c, v8i16 in) {
    v8i16 p = b - c, d = a - c;
    v8i16 pa = vabs16(p), pb = vabs16(d), pc = vabs16(d + p);
    v8i16 take_a = (pa <= pb) & (pa <= pc), take_b = pb <= pc;
    v8i16 bc = (take_b & b) | (~take_b & c);
    return (in + ((take_a & a) | (~take_a & bc))) & 0xFF;
}

/* Rows in[k] (filter bytes stripped) → out[k], k < WAVE_ROWS, all Paeth; up[0]: the row over out[0], up[k] = out[k − 1].
 * width ≥ 2 · WAVE_ROWS pixels (the caller checks). */
static void rows_paeth_wave_generic(const uint8_t *const in[WAVE_ROWS], const uint8_t *const up[WAVE_ROWS],
                                    uint8_t *const out[WAVE_ROWS], int64_t width, int bpp) {
    uint32_t a[WAVE_ROWS], c[WAVE_ROWS];
    wave_start(in, up, out, bpp, a, c);
    v8i16 a0 = widen2(a[0], a[1]), a1 = widen2(a[2], a[3]), a2 = widen2(a[4], a[5]), a3 = widen2(a[6], a[7]);
    v8i16 c0 = widen2(c[0], c[1]), c1 = widen2(c[2], c[3]), c2 = widen2(c[4], c[5]), c3 = widen2(c[6], c[7]);
    const int64_t last = width - 2;  /* the last step every slot takes in the vectors */
    for (int64_t t = WAVE_ROWS - 1; t <= last; t++) {
        const int64_t x = t * bpp;  /* slot k's pixel starts at x − k·bpp */
        v8i16 b0 = up_one_slot(widen2(0, load32(up[0] + x)), a0), b1 = up_one_slot(a0, a1),
              b2 = up_one_slot(a1, a2), b3 = up_one_slot(a2, a3);
        a0 = paeth_lanes(a0, b0, c0, widen2(load32(in[0] + x), load32(in[1] + x - bpp)));
        a1 = paeth_lanes(a1, b1, c1, widen2(load32(in[2] + x - 2 * bpp), load32(in[3] + x - 3 * bpp)));
        a2 = paeth_lanes(a2, b2, c2, widen2(load32(in[4] + x - 4 * bpp), load32(in[5] + x - 5 * bpp)));
        a3 = paeth_lanes(a3, b3, c3, widen2(load32(in[6] + x - 6 * bpp), load32(in[7] + x - 7 * bpp)));
        c0 = b0, c1 = b1, c2 = b2, c3 = b3;
        const v2u32 done[4] = {narrow2(a0), narrow2(a1), narrow2(a2), narrow2(a3)};
        for (int k = 0; k < WAVE_ROWS; k++) store32(out[k] + x - k * bpp, done[k / 2][k % 2]);
    }
    wave_end(in, up, out, width, bpp, last + 1);
}

#if defined(__x86_64__)
#include <immintrin.h>
/* AVX2: slots 0–3 and 4–7 in two 256-bit vectors, with AVX2's absolute value, minimum and blend. */
#define AVX2_INLINE __attribute__((target("avx2"), always_inline)) static inline

AVX2_INLINE __m256i widen4_avx2(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3) {
    return _mm256_cvtepu8_epi16(_mm_setr_epi32((int)w0, (int)w1, (int)w2, (int)w3));
}

AVX2_INLINE __m256i paeth_lanes_avx2(__m256i a, __m256i b, __m256i c, __m256i in) {
    __m256i p = _mm256_sub_epi16(b, c), d = _mm256_sub_epi16(a, c);
    __m256i pa = _mm256_abs_epi16(p), pb = _mm256_abs_epi16(d), pc = _mm256_abs_epi16(_mm256_add_epi16(d, p));
    __m256i bc = _mm256_blendv_epi8(b, c, _mm256_cmpgt_epi16(pb, pc));
    __m256i pred = _mm256_blendv_epi8(a, bc, _mm256_cmpgt_epi16(pa, _mm256_min_epi16(pb, pc)));
    return _mm256_and_si256(_mm256_add_epi16(in, pred), _mm256_set1_epi16(0xFF));
}

__attribute__((target("avx2"))) static void rows_paeth_wave_avx2(const uint8_t *const in[WAVE_ROWS],
                                                                 const uint8_t *const up[WAVE_ROWS],
                                                                 uint8_t *const out[WAVE_ROWS], int64_t width, int bpp) {
    uint32_t a[WAVE_ROWS], c[WAVE_ROWS];
    wave_start(in, up, out, bpp, a, c);
    __m256i a_lo = widen4_avx2(a[0], a[1], a[2], a[3]), a_hi = widen4_avx2(a[4], a[5], a[6], a[7]);
    __m256i c_lo = widen4_avx2(c[0], c[1], c[2], c[3]), c_hi = widen4_avx2(c[4], c[5], c[6], c[7]);
    const int64_t last = width - 2;
    for (int64_t t = WAVE_ROWS - 1; t <= last; t++) {
        const int64_t x = t * bpp;
        /* slot k's pixel above is slot k − 1's last result: every slot moves up one 64-bit quarter */
        __m256i top = _mm256_cvtepu8_epi16(_mm_cvtsi32_si128((int)load32(up[0] + x)));
        __m256i b_lo = _mm256_blend_epi32(_mm256_permute4x64_epi64(a_lo, 0x90), top, 0x03);
        __m256i b_hi = _mm256_blend_epi32(_mm256_permute4x64_epi64(a_hi, 0x90), _mm256_permute4x64_epi64(a_lo, 0xFF),
                                          0x03);
        __m256i in_lo = widen4_avx2(load32(in[0] + x), load32(in[1] + x - bpp), load32(in[2] + x - 2 * bpp),
                                    load32(in[3] + x - 3 * bpp));
        __m256i in_hi = widen4_avx2(load32(in[4] + x - 4 * bpp), load32(in[5] + x - 5 * bpp),
                                    load32(in[6] + x - 6 * bpp), load32(in[7] + x - 7 * bpp));
        a_lo = paeth_lanes_avx2(a_lo, b_lo, c_lo, in_lo);
        a_hi = paeth_lanes_avx2(a_hi, b_hi, c_hi, in_hi);
        c_lo = b_lo;
        c_hi = b_hi;
        /* packus interleaves the halves: its 32-bit words are slots 0 1 4 5 2 3 6 7 */
        __m256i done = _mm256_packus_epi16(a_lo, a_hi);
        store32(out[0] + x, (uint32_t)_mm256_extract_epi32(done, 0));
        store32(out[1] + x - bpp, (uint32_t)_mm256_extract_epi32(done, 1));
        store32(out[4] + x - 4 * bpp, (uint32_t)_mm256_extract_epi32(done, 2));
        store32(out[5] + x - 5 * bpp, (uint32_t)_mm256_extract_epi32(done, 3));
        store32(out[2] + x - 2 * bpp, (uint32_t)_mm256_extract_epi32(done, 4));
        store32(out[3] + x - 3 * bpp, (uint32_t)_mm256_extract_epi32(done, 5));
        store32(out[6] + x - 6 * bpp, (uint32_t)_mm256_extract_epi32(done, 6));
        store32(out[7] + x - 7 * bpp, (uint32_t)_mm256_extract_epi32(done, 7));
    }
    wave_end(in, up, out, width, bpp, last + 1);
}
#endif

static void rows_paeth_wave(const uint8_t *const in[WAVE_ROWS], const uint8_t *above, uint8_t *const out[WAVE_ROWS],
                            int64_t width, int bpp) {
    const uint8_t *up[WAVE_ROWS] = {above};
    for (int k = 1; k < WAVE_ROWS; k++) up[k] = out[k - 1];
#if defined(__x86_64__)
    if (__builtin_cpu_supports("avx2")) {
        rows_paeth_wave_avx2(in, up, out, width, bpp);
        return;
    }
#endif
    rows_paeth_wave_generic(in, up, out, width, bpp);
}

/* Whether the WAVE_ROWS rows from this filter byte on are all Paeth. */
static inline int paeth_run(const uint8_t *filter, int64_t step) {
    for (int k = 0; k < WAVE_ROWS; k++)
        if (filter[k * step] != 4) return 0;
    return 1;
}

int ecp_unfilter(const uint8_t *src, int64_t src_len, uint8_t *dst, int64_t height, int64_t rowbytes, int bpp) {
    if (!src || !dst || height < 1 || rowbytes < 1 || bpp < 1 || bpp > 8 || rowbytes > INT64_MAX / height - 1
        || src_len != height * (rowbytes + 1))
        return ECP_BAD_SIZE;
    static const uint8_t zeros[4096];
    uint8_t *zero_row = NULL;  /* the row above the image's first: all zeros (only allocated for wide rows) */
    const uint8_t *above = zeros;
    if (rowbytes > (int64_t)sizeof zeros) {
        zero_row = calloc((size_t)rowbytes, 1);
        if (!zero_row) return ECP_NO_MEMORY;
        above = zero_row;
    }
    int rc = 0;
    const int wave = (bpp == 3 || bpp == 4) && rowbytes / bpp >= 2 * WAVE_ROWS;
    for (int64_t y = 0; y < height; y++) {
        const uint8_t *in = src + y * (rowbytes + 1) + 1;
        uint8_t *out = dst + y * rowbytes;
        if (wave && y + WAVE_ROWS <= height && paeth_run(in - 1, rowbytes + 1)) {
            const uint8_t *ins[WAVE_ROWS];
            uint8_t *outs[WAVE_ROWS];
            for (int k = 0; k < WAVE_ROWS; k++) {
                ins[k] = in + k * (rowbytes + 1);
                outs[k] = out + k * rowbytes;
            }
            rows_paeth_wave(ins, above, outs, rowbytes / bpp, bpp);
            y += WAVE_ROWS - 1;
            above = outs[WAVE_ROWS - 1];
            continue;
        }
        if (in[-1] > 4) {
            rc = ECP_BAD_FILTER;
            break;
        }
        switch (in[-1]) {
        case 0: memcpy(out, in, (size_t)rowbytes); break;
        case 1: row_sub(in, out, rowbytes, bpp); break;
        case 2: row_up(in, above, out, rowbytes); break;
        case 3: row_avg(in, above, out, rowbytes, bpp); break;
        default: row_paeth(in, above, out, rowbytes, bpp); break;
        }
        above = out;
    }
    free(zero_row);
    return rc;
}
