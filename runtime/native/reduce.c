/* Whole-factor box reduction of 8-bit interleaved frames, byte for byte Pillow's Image.reduce (issue #11).
 *
 * Why: resample v2 (edgecore.runtime.preprocess) box-reduces the visible part of a frame before its bilinear
 * passes. Through Pillow that first costs Image.fromarray's copy of the whole frame into Pillow's 4-byte pixels
 * (0.44 ms at 900 x 900) and then the reduce itself (0.56 ms); here the reduce reads the numpy frame in place.
 *
 * The arithmetic is Pillow's (libImaging/Reduce.c, Pillow 10-13): each output value of a block of n pixels is
 * ((n / 2 + sum) * m) >> 24 in uint32 arithmetic, m = (uint32)(2^32 as float / (float)(256 n)); a block cut by
 * the box's right or bottom edge averages the pixels it has, with its own n. tests/test_preprocess_native.py
 * checks every output byte against Pillow on random frames, factors and boxes.
 *
 * Order: for each output row the fy source rows are summed into a uint16 row, then that row is summed over fx
 * pixels at every byte offset (shifted whole-row adds, which the compiler vectorises), and every block's sum is
 * picked from it. Plain C, no intrinsics: its own library (_resample, -O3), with an AVX2 clone chosen at run
 * time on GCC. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static uint32_t block_multiplier(int64_t count) { /* Pillow's division_UINT32(count, 8), in float as it does */
    float max_int = 4294967296.0f;
    return (uint32_t)(max_int / (float)(uint32_t)(256 * count));
}

/* Reduces the box (x0, y0, w, h) of src (rows `stride` bytes apart, `channels` interleaved bytes per pixel) by
 * fx x fy into out ((h + fy - 1) / fy rows of (w + fx - 1) / fx pixels, rows out_stride bytes apart). Returns 0,
 * or -1 (bad arguments: a factor outside 1..256, an empty box, channels outside 1..4), -2 (out of memory). */
/* One output row: the fy source rows summed (rows, uint16), then summed over fx pixels at every byte offset
 * (T: uint16 where fx * fy * 255 fits, else uint32), then every block's sum picked and scaled. */
#define REDUCE_ROW(T)                                                                                          \
    do {                                                                                                       \
        T *restrict t = (T *)sums;                                                                             \
        for (int64_t i = 0; i < width; i++) t[i] = r[i];                                                       \
        for (int64_t k = 1; k < fx; k++) {                                                                     \
            const uint16_t *restrict shifted = rows + k * channels; /* zero past the row: the last block's tail */ \
            for (int64_t i = 0; i < width; i++) t[i] = (T)(t[i] + shifted[i]);                                 \
        }                                                                                                      \
        for (int64_t ox = 0; ox < full_w; ox++)                                                                \
            for (int64_t c = 0; c < channels; c++)                                                             \
                o[ox * channels + c] = (uint8_t)(((amend + (uint32_t)t[ox * fx * channels + c]) * m) >> 24);   \
        if (full_w < ow) { /* the block cut by the box's right edge: its own pixel count */                    \
            int64_t edge = (w - full_w * fx) * rows_in;                                                        \
            uint32_t me = block_multiplier(edge), ae = (uint32_t)(edge / 2);                                   \
            for (int64_t c = 0; c < channels; c++)                                                             \
                o[full_w * channels + c] = (uint8_t)(((ae + (uint32_t)t[full_w * fx * channels + c]) * me) >> 24); \
        }                                                                                                      \
    } while (0)

/* AVX2 where the CPU has it (GCC/clang function multiversioning: a run-time choice, no -march). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
int ecp_reduce(const uint8_t *src, int64_t stride, int64_t channels, int64_t x0, int64_t y0, int64_t w, int64_t h,
               int64_t fx, int64_t fy, uint8_t *out, int64_t out_stride) {
    if (fx < 1 || fy < 1 || fx > 256 || fy > 256 || w < 1 || h < 1 || x0 < 0 || y0 < 0 || channels < 1 ||
        channels > 4 || stride < (x0 + w) * channels)
        return -1;
    int64_t ow = (w + fx - 1) / fx, oh = (h + fy - 1) / fy, width = w * channels;
    int64_t full_w = w / fx; /* whole blocks across; a last, narrower one after them when w % fx */
    int narrow = fx * fy * 255 <= 65535;
    uint16_t *rows = (uint16_t *)malloc((size_t)(width + fx * channels) * sizeof(uint16_t));
    void *sums = malloc((size_t)width * (narrow ? sizeof(uint16_t) : sizeof(uint32_t)));
    if (!rows || !sums) {
        free(rows);
        free(sums);
        return -2;
    }
    memset(rows + width, 0, (size_t)(fx * channels) * sizeof(uint16_t));
    const uint32_t full = block_multiplier(fx * fy);
    for (int64_t oy = 0; oy < oh; oy++) {
        int64_t ys = y0 + oy * fy, ye = ys + fy < y0 + h ? ys + fy : y0 + h;
        const uint8_t *restrict first = src + ys * stride + x0 * channels;
        uint16_t *restrict r = rows;
        for (int64_t i = 0; i < width; i++) r[i] = first[i];
        for (int64_t y = ys + 1; y < ye; y++) {
            const uint8_t *restrict line = src + y * stride + x0 * channels;
            for (int64_t i = 0; i < width; i++) r[i] = (uint16_t)(r[i] + line[i]);
        }
        uint8_t *o = out + oy * out_stride;
        int64_t rows_in = ye - ys, count = fx * rows_in;
        uint32_t m = rows_in == fy ? full : block_multiplier(count), amend = (uint32_t)(count / 2);
        if (narrow)
            REDUCE_ROW(uint16_t);
        else
            REDUCE_ROW(uint32_t);
    }
    free(rows);
    free(sums);
    return 0;
}

/* ---- Pillow's bilinear (antialiased) resampling, one axis at a time -------------------------------------
 * Why: after the box reduction, resample v2 resizes bilinear antialiased, the horizontal pass, then the vertical
 * one (two Image.resize calls). Through Pillow each costs a copy into its 4-byte pixels and one back out, and its
 * loops read 4 bytes per pixel for 3; here both passes read and write the numpy rows in place.
 *
 * The arithmetic is Pillow's (libImaging/Resample.c, Pillow 10-13), step for step: precompute_coeffs in double
 * from the float box (in1 - in0 in float, as Pillow's float box[4] gives it), normalize_coeffs_8bpc to int32 with
 * 22 fractional bits, sums in int from 1 << 21, clip8. Compiled with -ffp-contract=off (setup.py) so no FMA changes
 * a coefficient. tests/test_preprocess_native.py checks every byte against Pillow on random sizes and boxes. */
#define RS_PRECISION_BITS (32 - 8 - 2)

static double bilinear(double x) {
    if (x < 0.0) x = -x;
    return x < 1.0 ? 1.0 - x : 0.0;
}

/* Pillow's precompute_coeffs + normalize_coeffs_8bpc: per output index, its first input index (bounds[2i]), its
 * tap count (bounds[2i + 1]) and ksize int32 coefficients. Returns ksize, or 0 (out of memory). */
static int rs_coeffs(int in_size, float in0, float in1, int out_size, int **bounds_out, int32_t **kk_out) {
    double scale = (double)(in1 - in0) / out_size, filterscale = scale < 1.0 ? 1.0 : scale;
    double support = 1.0 * filterscale;
    int ksize = (int)ceil(support) * 2 + 1;
    double *pre = malloc((size_t)out_size * (size_t)ksize * sizeof(double));
    int *bounds = malloc((size_t)out_size * 2 * sizeof(int));
    int32_t *kk = malloc((size_t)out_size * (size_t)ksize * sizeof(int32_t));
    if (!pre || !bounds || !kk) {
        free(pre), free(bounds), free(kk);
        return 0;
    }
    for (int xx = 0; xx < out_size; xx++) {
        double center = in0 + (xx + 0.5) * scale, ww = 0.0, ss = 1.0 / filterscale;
        int xmin = (int)(center - support + 0.5), xmax;
        if (xmin < 0) xmin = 0;
        xmax = (int)(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        double *k = &pre[(size_t)xx * ksize];
        int x;
        for (x = 0; x < xmax; x++) {
            double w = bilinear((x + xmin - center + 0.5) * ss);
            k[x] = w;
            ww += w;
        }
        for (x = 0; x < xmax; x++)
            if (ww != 0.0) k[x] /= ww;
        for (; x < ksize; x++) k[x] = 0;
        bounds[xx * 2] = xmin;
        bounds[xx * 2 + 1] = xmax;
    }
    for (size_t i = 0; i < (size_t)out_size * (size_t)ksize; i++)
        kk[i] = pre[i] < 0 ? (int32_t)(-0.5 + pre[i] * (1 << RS_PRECISION_BITS))
                           : (int32_t)(0.5 + pre[i] * (1 << RS_PRECISION_BITS));
    free(pre);
    *bounds_out = bounds;
    *kk_out = kk;
    return ksize;
}

static inline uint8_t rs_clip8(int32_t sum) {  /* Pillow's clip8 lookup over its range */
    int32_t v = sum >> RS_PRECISION_BITS;
    return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
}

/* out_size rows, each the rows of src (rowbytes bytes used, `stride` apart) weighted by kk: the vertical pass, and
 * the horizontal one on the transposed image. Sums in int32 a whole row at a time (the compiler vectorises). */
static inline __attribute__((always_inline)) int rs_rows(const uint8_t *src, int64_t stride, int64_t rowbytes, const int *bounds, const int32_t *kk,
                   int ksize, int64_t out_size, uint8_t *out, int64_t out_stride) {
    int32_t *sums = malloc((size_t)rowbytes * sizeof(int32_t));
    if (!sums) return -2;
    for (int64_t yy = 0; yy < out_size; yy++) {
        const int32_t *k = &kk[yy * ksize];
        const uint8_t *first = src + (int64_t)bounds[yy * 2] * stride;
        for (int64_t i = 0; i < rowbytes; i++) sums[i] = 1 << (RS_PRECISION_BITS - 1);
        for (int y = 0; y < bounds[yy * 2 + 1]; y++) {
            const uint8_t *row = first + y * stride;
            const int32_t weight = k[y];
            for (int64_t i = 0; i < rowbytes; i++) sums[i] += row[i] * weight;
        }
        uint8_t *o = out + yy * out_stride;
        for (int64_t i = 0; i < rowbytes; i++) o[i] = rs_clip8(sums[i]);
    }
    free(sums);
    return 0;
}

/* The horizontal pass: each output pixel sums ksize taps of a zero-padded copy of its row (the taps past a
 * pixel's own count have weight 0, Pillow's coefficient buffer is zero there too), a fixed trip count the
 * compiler unrolls where ksize is a constant (the callers below). */
static inline __attribute__((always_inline)) int rs_columns(const uint8_t *src, int64_t stride, int64_t channels,
                                                            int64_t w, int64_t h, const int *bounds,
                                                            const int32_t *kk, int ksize, int64_t out_size,
                                                            uint8_t *out, int64_t out_stride) {
    uint8_t *padded = calloc((size_t)((w + ksize) * channels), 1);
    if (!padded) return -2;
    for (int64_t y = 0; y < h; y++) {
        memcpy(padded, src + y * stride, (size_t)(w * channels));
        uint8_t *o = out + y * out_stride;
        for (int64_t xx = 0; xx < out_size; xx++) {
            const uint8_t *p = padded + (int64_t)bounds[xx * 2] * channels;
            const int32_t *k = &kk[xx * ksize];
            int32_t sum[4] = {1 << (RS_PRECISION_BITS - 1), 1 << (RS_PRECISION_BITS - 1),
                              1 << (RS_PRECISION_BITS - 1), 1 << (RS_PRECISION_BITS - 1)};
            for (int t = 0; t < ksize; t++)
                for (int64_t c = 0; c < channels; c++) sum[c] += p[t * channels + c] * k[t];
            for (int64_t c = 0; c < channels; c++) o[xx * channels + c] = rs_clip8(sum[c]);
        }
    }
    free(padded);
    return 0;
}

/* Resamples h rows of w pixels (channels interleaved bytes each, rows `stride` bytes apart) to out_size pixels
 * along the rows (axis 0: the box is [in0, in1) of the row) or to out_size rows (axis 1: the box is [in0, in1)
 * of the rows), into out (rows out_stride bytes apart). Returns 0, -1 (bad arguments), -2 (out of memory). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
int ecp_bilinear(const uint8_t *src, int64_t stride, int64_t channels, int64_t w, int64_t h, int axis, float in0,
                 float in1, int64_t out_size, uint8_t *out, int64_t out_stride) {
    if (!src || !out || channels < 1 || channels > 4 || w < 1 || h < 1 || out_size < 1 || out_size > (1 << 20)
        || (axis != 0 && axis != 1) || !(in0 >= 0) || !(in1 > in0) || in1 > (axis ? h : w) || w > (1 << 24)
        || h > (1 << 24))
        return -1;
    int *bounds;
    int32_t *kk;
    int ksize = rs_coeffs((int)(axis ? h : w), in0, in1, (int)out_size, &bounds, &kk);
    if (!ksize) return -2;
    int rc;
    if (axis == 1)
        rc = rs_rows(src, stride, w * channels, bounds, kk, ksize, out_size, out, out_stride);
    else if (channels == 3 && ksize == 3)  /* constant trip counts for the common cases: scale ≤ 1, ≤ 2, ≤ 3 */
        rc = rs_columns(src, stride, 3, w, h, bounds, kk, 3, out_size, out, out_stride);
    else if (channels == 3 && ksize == 5)
        rc = rs_columns(src, stride, 3, w, h, bounds, kk, 5, out_size, out, out_stride);
    else if (channels == 3 && ksize == 7)
        rc = rs_columns(src, stride, 3, w, h, bounds, kk, 7, out_size, out, out_stride);
    else
        rc = rs_columns(src, stride, channels, w, h, bounds, kk, ksize, out_size, out, out_stride);
    free(bounds);
    free(kk);
    return rc;
}
