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
