/* detect.c — score PPM/PGM frames with the edgecore C API.
 *
 *   detect [--threads N] [--bgr] [--pad BYTES] [--maps DIR] BUNDLE IMAGE.ppm|IMAGE.pgm...
 *
 * Prints "score normalized_score is_anomalous path" per image. Binary P6 (RGB)
 * files are passed as EC_PIXEL_RGB8 (or EC_PIXEL_BGR8 with --bgr, after swapping
 * the channels here), binary P5 files as EC_PIXEL_GRAY8. --pad adds unused bytes
 * at the end of every row (stride > width × channels, like a cropped camera
 * buffer). --threads N runs N threads over all images on ONE shared handle and
 * prints one block per thread ("# thread k" headers) — the results must agree.
 * --maps DIR writes thread 0's anomaly maps as raw float32 files DIR/map_<i>.f32.
 *
 * Build: gcc detect.c $(pkg-config --cflags --libs edgecore) -pthread -o detect
 * (define EC_DETECT_NO_MAIN to reuse the PNM loader from another program, as
 * benchmarks/bench_capi.py does).
 */
#include <edgecore.h>

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int width, height, channels, stride;
    uint8_t *pixels; /* stride × height bytes, owned */
} frame_t;

/* Next header number of a PNM file, skipping whitespace and # comments. */
static int pnm_number(FILE *file, long *value) {
    int c;
    long n = 0;
    int digits = 0;
    do {
        c = fgetc(file);
        if (c == '#')
            while (c != '\n' && c != EOF)
                c = fgetc(file);
    } while (c == ' ' || c == '\t' || c == '\n' || c == '\r');
    while (c >= '0' && c <= '9' && n < 1000000) {
        n = n * 10 + (c - '0');
        digits++;
        c = fgetc(file);
    }
    *value = n;
    /* exactly one whitespace byte separates the header from the pixels */
    return digits > 0 && (c == ' ' || c == '\t' || c == '\n' || c == '\r');
}

/* Load a binary PGM (P5) or PPM (P6) with maxval 255, rows padded by `pad` bytes. */
static int load_pnm(const char *path, int pad, frame_t *frame) {
    FILE *file = fopen(path, "rb");
    char magic[3] = {0};
    long width, height, maxval;
    int ok = 0;
    memset(frame, 0, sizeof *frame);
    if (file == NULL) {
        fprintf(stderr, "%s: %s\n", path, strerror(errno));
        return 0;
    }
    if (fread(magic, 1, 2, file) == 2 && magic[0] == 'P' && (magic[1] == '5' || magic[1] == '6') &&
        pnm_number(file, &width) && pnm_number(file, &height) && pnm_number(file, &maxval) &&
        width > 0 && height > 0 && width <= 65535 && height <= 65535 && maxval == 255) {
        frame->width = (int)width;
        frame->height = (int)height;
        frame->channels = magic[1] == '6' ? 3 : 1;
        frame->stride = frame->width * frame->channels + pad;
        frame->pixels = malloc((size_t)frame->stride * (size_t)frame->height);
        ok = frame->pixels != NULL;
        for (int y = 0; ok && y < frame->height; y++)
            ok = fread(frame->pixels + (size_t)y * frame->stride, 1, (size_t)frame->width * frame->channels,
                       file) == (size_t)frame->width * frame->channels;
    }
    fclose(file);
    if (!ok) {
        fprintf(stderr, "%s: not a binary 8-bit PGM (P5) or PPM (P6) file, or truncated\n", path);
        free(frame->pixels);
        frame->pixels = NULL;
    }
    return ok;
}

static void rgb_to_bgr(frame_t *frame) {
    for (int y = 0; y < frame->height; y++) {
        uint8_t *p = frame->pixels + (size_t)y * frame->stride;
        for (int x = 0; x < frame->width; x++, p += 3) {
            uint8_t r = p[0];
            p[0] = p[2];
            p[2] = r;
        }
    }
}

typedef struct {
    ec_detector_t *detector; /* shared by all threads */
    const frame_t *frames;
    int count;
    int bgr;
    ec_result_t *results; /* one per frame, owned by this job */
    float *maps;          /* count × map_floats, or NULL */
    size_t map_floats;
    ec_status_t status;
    char error[512];
} job_t;

static void *run_job(void *arg) {
    job_t *job = arg;
    job->status = EC_OK;
    for (int i = 0; i < job->count && job->status == EC_OK; i++) {
        const frame_t *f = &job->frames[i];
        ec_pixel_format_t format = f->channels == 1 ? EC_PIXEL_GRAY8 : job->bgr ? EC_PIXEL_BGR8 : EC_PIXEL_RGB8;
        float *map = job->maps ? job->maps + (size_t)i * job->map_floats : NULL;
        job->status = ec_detect(job->detector, f->pixels, f->width, f->height, f->stride, format,
                                &job->results[i], map, map ? job->map_floats : 0);
        if (job->status != EC_OK) /* ec_last_error() is per thread: copy it here */
            snprintf(job->error, sizeof job->error, "frame %d: %s: %s", i, ec_status_string(job->status),
                     ec_last_error());
    }
    return NULL;
}

static int write_map(const char *dir, int index, const float *map, size_t floats) {
    char path[4096];
    FILE *file;
    snprintf(path, sizeof path, "%s/map_%d.f32", dir, index);
    file = fopen(path, "wb");
    if (file == NULL || fwrite(map, sizeof *map, floats, file) != floats) {
        fprintf(stderr, "%s: cannot write\n", path);
        if (file)
            fclose(file);
        return 0;
    }
    return fclose(file) == 0;
}

#ifndef EC_DETECT_NO_MAIN
int main(int argc, char **argv) {
    int threads = 1, bgr = 0, pad = 0, arg = 1, status = 0;
    const char *maps_dir = NULL;
    for (; arg < argc && strncmp(argv[arg], "--", 2) == 0; arg++) {
        if (strcmp(argv[arg], "--threads") == 0 && arg + 1 < argc)
            threads = atoi(argv[++arg]);
        else if (strcmp(argv[arg], "--pad") == 0 && arg + 1 < argc)
            pad = atoi(argv[++arg]);
        else if (strcmp(argv[arg], "--maps") == 0 && arg + 1 < argc)
            maps_dir = argv[++arg];
        else if (strcmp(argv[arg], "--bgr") == 0)
            bgr = 1;
        else
            break;
    }
    if (argc - arg < 2 || threads < 1 || threads > 64 || pad < 0) {
        fprintf(stderr, "usage: %s [--threads N] [--bgr] [--pad BYTES] [--maps DIR] BUNDLE IMAGE.ppm...\n", argv[0]);
        return 2;
    }
    const char *bundle = argv[arg++];
    int count = argc - arg;

    frame_t *frames = calloc((size_t)count, sizeof *frames);
    for (int i = 0; i < count; i++) {
        if (!load_pnm(argv[arg + i], pad, &frames[i]))
            return 1;
        if (bgr && frames[i].channels == 3)
            rgb_to_bgr(&frames[i]);
    }

    ec_detector_t *detector = NULL;
    ec_status_t opened = ec_open(bundle, NULL, NULL, NULL, &detector);
    if (opened != EC_OK) {
        fprintf(stderr, "ec_open: %s: %s\n", ec_status_string(opened), ec_last_error());
        return 1;
    }
    int map_w = 0, map_h = 0;
    ec_map_size(detector, &map_w, &map_h);

    job_t *jobs = calloc((size_t)threads, sizeof *jobs);
    pthread_t *ids = calloc((size_t)threads, sizeof *ids);
    for (int t = 0; t < threads; t++) {
        jobs[t] = (job_t){.detector = detector, .frames = frames, .count = count, .bgr = bgr,
                          .map_floats = (size_t)map_w * (size_t)map_h};
        jobs[t].results = calloc((size_t)count, sizeof(ec_result_t));
        jobs[t].maps = (maps_dir && t == 0) ? calloc((size_t)count * jobs[t].map_floats, sizeof(float)) : NULL;
    }
    if (threads == 1) {
        run_job(&jobs[0]);
    } else {
        for (int t = 0; t < threads; t++)
            pthread_create(&ids[t], NULL, run_job, &jobs[t]);
        for (int t = 0; t < threads; t++)
            pthread_join(ids[t], NULL);
    }

    for (int t = 0; t < threads; t++) {
        if (jobs[t].status != EC_OK) {
            fprintf(stderr, "thread %d: %s\n", t, jobs[t].error);
            status = 1;
            continue;
        }
        if (threads > 1)
            printf("# thread %d\n", t);
        for (int i = 0; i < count; i++)
            printf("%.17g %.17g %d %s\n", jobs[t].results[i].score, jobs[t].results[i].normalized_score,
                   jobs[t].results[i].is_anomalous, argv[arg + i]);
    }
    for (int i = 0; maps_dir && status == 0 && i < count; i++)
        if (!write_map(maps_dir, i, jobs[0].maps + (size_t)i * jobs[0].map_floats, jobs[0].map_floats))
            status = 1;

    ec_close(detector);
    for (int t = 0; t < threads; t++) {
        free(jobs[t].results);
        free(jobs[t].maps);
    }
    for (int i = 0; i < count; i++)
        free(frames[i].pixels);
    free(frames);
    free(jobs);
    free(ids);
    return status;
}
#endif /* EC_DETECT_NO_MAIN */
