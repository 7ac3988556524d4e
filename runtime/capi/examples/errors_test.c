/* errors_test.c — every misuse of the C API returns its status code and a message, never a crash.
 *
 *   errors_test BUNDLE [NONFINITE_BUNDLE]
 *
 * NONFINITE_BUNDLE (optional): a bundle whose engine outputs NaN; ec_detect must return
 * EC_ERR_NONFINITE and leave the result untouched (no verdict).
 * Prints one line per check, "ok|FAIL <name> <status> <message>", and exits 1 if any check failed.
 * Build: gcc errors_test.c $(pkg-config --cflags --libs edgecore) -pthread -o errors_test
 */
#include <edgecore.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;

/* The call must return `expected`; errors must leave a non-empty ec_last_error(), success an empty one. */
static void check(const char *name, ec_status_t got, ec_status_t expected) {
    const char *message = ec_last_error();
    int ok = got == expected && message != NULL && (expected == EC_OK ? message[0] == '\0' : message[0] != '\0');
    if (!ok)
        failures++;
    printf("%s %s %s %s\n", ok ? "ok" : "FAIL", name, ec_status_string(got), message ? message : "(NULL)");
}

static void *other_thread(void *arg) {
    *(int *)arg = ec_last_error()[0] == '\0'; /* the main thread's error must not leak here */
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 2 && argc != 3) {
        fprintf(stderr, "usage: %s BUNDLE [NONFINITE_BUNDLE]\n", argv[0]);
        return 2;
    }
    const char *bundle = argv[1];
    ec_detector_t *detector = (ec_detector_t *)&failures; /* must be reset to NULL on failure */
    ec_result_t result;
    static uint8_t pixels[64 * 48 * 3];
    float tiny_map[4];

    check("last_error_initially_empty", EC_OK, EC_OK);
    printf("%s version %s api %d.%d.%d\n", ec_version()[0] ? "ok" : "FAIL", ec_version(), EC_API_VERSION_MAJOR,
           EC_API_VERSION_MINOR, EC_API_VERSION_PATCH);

    check("open_null_path", ec_open(NULL, NULL, NULL, NULL, &detector), EC_ERR_NULL_ARGUMENT);
    check("open_null_out", ec_open(bundle, NULL, NULL, NULL, NULL), EC_ERR_NULL_ARGUMENT);
    check("open_missing_bundle", ec_open("/nonexistent/part.edgecore", NULL, NULL, NULL, &detector), EC_ERR_BUNDLE);
    if (detector != NULL) {
        failures++;
        printf("FAIL open_failure_resets_out\n");
    }
    check("open_unknown_backend", ec_open(bundle, "no-such-backend", NULL, NULL, &detector), EC_ERR_INVALID_ARGUMENT);
    check("open_unknown_precision", ec_open(bundle, NULL, NULL, "fp7", &detector), EC_ERR_INVALID_ARGUMENT);

    int thread_sees_empty = 0;
    pthread_t thread;
    pthread_create(&thread, NULL, other_thread, &thread_sees_empty);
    pthread_join(thread, NULL);
    printf("%s last_error_is_thread_local\n", thread_sees_empty ? "ok" : "FAIL");
    failures += !thread_sees_empty;

    check("open", ec_open(bundle, "openvino", NULL, NULL, &detector), EC_OK);
    if (detector == NULL)
        return 1;

    int map_w = 0, map_h = 0;
    check("map_size_null_detector", ec_map_size(NULL, &map_w, &map_h), EC_ERR_NULL_ARGUMENT);
    check("map_size_null_width", ec_map_size(detector, NULL, &map_h), EC_ERR_NULL_ARGUMENT);
    check("map_size", ec_map_size(detector, &map_w, &map_h), EC_OK);
    printf("map_size %d %d\n", map_w, map_h);
    size_t map_floats = (size_t)map_w * (size_t)map_h;
    float *map = malloc(map_floats * sizeof *map);

    const int w = 64, h = 48, stride = 64 * 3;
    for (size_t i = 0; i < sizeof pixels; i++)
        pixels[i] = (uint8_t)(i * 7);

    check("detect_null_detector", ec_detect(NULL, pixels, w, h, stride, EC_PIXEL_RGB8, &result, NULL, 0), EC_ERR_NULL_ARGUMENT);
    check("detect_null_pixels", ec_detect(detector, NULL, w, h, stride, EC_PIXEL_RGB8, &result, NULL, 0), EC_ERR_NULL_ARGUMENT);
    check("detect_null_out", ec_detect(detector, pixels, w, h, stride, EC_PIXEL_RGB8, NULL, NULL, 0), EC_ERR_NULL_ARGUMENT);
    check("detect_null_map_with_capacity",
          ec_detect(detector, pixels, w, h, stride, EC_PIXEL_RGB8, &result, NULL, map_floats), EC_ERR_NULL_ARGUMENT);
    check("detect_map_too_small",
          ec_detect(detector, pixels, w, h, stride, EC_PIXEL_RGB8, &result, tiny_map, 4), EC_ERR_BUFFER_TOO_SMALL);
    check("detect_map_one_float_short",
          ec_detect(detector, pixels, w, h, stride, EC_PIXEL_RGB8, &result, map, map_floats - 1), EC_ERR_BUFFER_TOO_SMALL);
    check("detect_stride_too_small",
          ec_detect(detector, pixels, w, h, w * 3 - 1, EC_PIXEL_RGB8, &result, NULL, 0), EC_ERR_INVALID_ARGUMENT);
    check("detect_negative_stride",
          ec_detect(detector, pixels, w, h, -stride, EC_PIXEL_RGB8, &result, NULL, 0), EC_ERR_INVALID_ARGUMENT);
    check("detect_zero_width", ec_detect(detector, pixels, 0, h, stride, EC_PIXEL_RGB8, &result, NULL, 0), EC_ERR_INVALID_ARGUMENT);
    check("detect_negative_height",
          ec_detect(detector, pixels, w, -1, stride, EC_PIXEL_RGB8, &result, NULL, 0), EC_ERR_INVALID_ARGUMENT);
    /* Absurd sizes must be refused before a single byte is read (the buffer is tiny). */
    check("detect_absurd_size",
          ec_detect(detector, pixels, 1 << 20, 1 << 20, 3 << 20, EC_PIXEL_RGB8, &result, NULL, 0), EC_ERR_INVALID_ARGUMENT);
    check("detect_absurd_stride",
          ec_detect(detector, pixels, w, h, 1 << 30, EC_PIXEL_RGB8, &result, NULL, 0), EC_ERR_INVALID_ARGUMENT);
    check("detect_unknown_format",
          ec_detect(detector, pixels, w, h, stride, (ec_pixel_format_t)42, &result, NULL, 0), EC_ERR_INVALID_ARGUMENT);
    check("detect_gray_stride_ok",
          ec_detect(detector, pixels, w, h, w, EC_PIXEL_GRAY8, &result, NULL, 0), EC_OK);
    check("detect_without_map", ec_detect(detector, pixels, w, h, stride, EC_PIXEL_RGB8, &result, NULL, 0), EC_OK);
    check("detect_with_map", ec_detect(detector, pixels, w, h, stride, EC_PIXEL_RGB8, &result, map, map_floats), EC_OK);
    int in_range = 1;
    for (size_t i = 0; i < map_floats; i++)
        in_range &= map[i] >= 0.0f && map[i] <= 1.0f;
    printf("%s map_in_unit_range\n", in_range ? "ok" : "FAIL");
    failures += !in_range;

    ec_close(detector);
    check("detect_after_close",
          ec_detect(detector, pixels, w, h, stride, EC_PIXEL_RGB8, &result, NULL, 0), EC_ERR_INVALID_HANDLE);
    check("map_size_bogus_handle", ec_map_size((ec_detector_t *)(uintptr_t)0xdead, &map_w, &map_h), EC_ERR_INVALID_HANDLE);
    ec_close(NULL);
    printf("ok close_null\n");
    free(map);

    if (argc == 3) {
        ec_detector_t *broken = NULL;
        ec_result_t untouched = {-1.0, -1.0, 7};
        check("open_nonfinite_bundle", ec_open(argv[2], NULL, NULL, NULL, &broken), EC_OK);
        if (broken != NULL) {
            check("detect_nonfinite_score",
                  ec_detect(broken, pixels, w, h, stride, EC_PIXEL_RGB8, &untouched, NULL, 0), EC_ERR_NONFINITE);
            int kept = untouched.score == -1.0 && untouched.is_anomalous == 7;
            printf("%s nonfinite_leaves_result_untouched\n", kept ? "ok" : "FAIL");
            failures += !kept;
            ec_close(broken);
        }
        printf("%s status_string_nonfinite\n", strcmp(ec_status_string(EC_ERR_NONFINITE), "EC_ERR_NONFINITE") ? "FAIL" : "ok");
        failures += strcmp(ec_status_string(EC_ERR_NONFINITE), "EC_ERR_NONFINITE") != 0;
    }

    printf("%s %d failure(s)\n", failures ? "FAIL" : "ok", failures);
    return failures ? 1 : 0;
}
