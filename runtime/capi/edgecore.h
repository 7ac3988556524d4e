/**
 * @file edgecore.h
 * @brief C API of the edgecore runtime: PatchCore anomaly detection inside a C vision pipeline.
 *
 * The library (libedgecore.so) embeds CPython through cffi's embedding mode and
 * runs the same `edgecore.runtime.Detector` as the Python API, so a C program
 * gets exactly the scores the workstation validated. Python starts lazily on
 * the first call into the library (that call takes a few hundred ms longer).
 *
 * @par Errors
 * Every function that can fail returns an ::ec_status_t. On failure,
 * ec_last_error() describes what went wrong. No C++/Python exception and no
 * Python traceback ever crosses this interface.
 *
 * @par Thread safety
 * All functions may be called from any thread. One ::ec_detector_t may be used
 * by several threads concurrently (ec_detect() and ec_map_size()); only
 * ec_close() must not race with other calls on the same handle.
 * The Python-level parts of a call (frame conversion, preprocessing, scoring)
 * hold Python's GIL, so concurrent callers serialise there; OpenVINO inference
 * releases the GIL, so one thread's inference overlaps another's Python work.
 * A handle runs one inference at a time: open one handle per thread for
 * parallel inference.
 *
 * @par Memory
 * The library never keeps a pointer passed in by the caller after the call
 * returns, and never asks the caller to free anything except handles
 * (with ec_close()).
 */
#ifndef EDGECORE_H
#define EDGECORE_H

#include <stddef.h>
#include <stdint.h>

/** Version of this C interface (not of the runtime; see ec_version()). */
#define EC_API_VERSION_MAJOR 1
#define EC_API_VERSION_MINOR 1
#define EC_API_VERSION_PATCH 0

#if defined(__GNUC__)
#define EC_API __attribute__((visibility("default")))
#else
#define EC_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* cffi-begin: from here to cffi-end the text is also parsed by cffi when the
   library is built, so it must stay plain declarations (and integer #defines). */

/** Largest frame accepted by ec_detect(), in pixels (width × height). */
#define EC_MAX_PIXELS 80000000
/** Largest span of caller memory ec_detect() will read: stride × (height − 1) + row bytes. */
#define EC_MAX_FRAME_BYTES 1073741824

/** Opaque detector handle: created by ec_open(), destroyed by ec_close(). */
typedef struct ec_detector ec_detector_t;

/** Result codes. EC_OK is 0; everything else is an error (see ec_last_error()). */
typedef enum {
    EC_OK = 0,
    EC_ERR_NULL_ARGUMENT = 1,    /**< a required pointer argument is NULL */
    EC_ERR_INVALID_ARGUMENT = 2, /**< bad width/height/stride/pixel format, unknown backend/precision */
    EC_ERR_BUFFER_TOO_SMALL = 3, /**< the map buffer holds fewer floats than ec_map_size() requires */
    EC_ERR_BUNDLE = 4,           /**< the bundle cannot be opened, verified or compiled */
    EC_ERR_IMAGE = 5,            /**< the frame cannot be used as an image */
    EC_ERR_RUNTIME = 6,          /**< anything else (including an embedded Python that fails to start) */
    EC_ERR_INVALID_HANDLE = 7,   /**< the handle is not open (never opened, or already closed) */
    EC_ERR_NONFINITE = 8         /**< the engine output or the score is NaN/infinite: no verdict, treat the
                                      frame as NOT inspected (never as good); the bundle or engine is broken */
} ec_status_t;

/** Layout of the frame passed to ec_detect(): 8 bits per channel, interleaved. */
typedef enum {
    EC_PIXEL_RGB8 = 0,  /**< 3 bytes per pixel: R, G, B */
    EC_PIXEL_BGR8 = 1,  /**< 3 bytes per pixel: B, G, R (OpenCV's default) */
    EC_PIXEL_GRAY8 = 2  /**< 1 byte per pixel; scored as the RGB image with R = G = B */
} ec_pixel_format_t;

/** Image-level outcome of ec_detect(). */
typedef struct {
    double score;            /**< raw anomaly score (distance units of the bundle) */
    double normalized_score; /**< score mapped to [0, 1]; 0.5 is the decision threshold */
    int is_anomalous;        /**< 1 if score >= the bundle's threshold, else 0 */
} ec_result_t;

/* cffi-end */

/**
 * @brief Version of the edgecore runtime inside the library, e.g. "0.1.0".
 * @return A static string owned by the library (never NULL, never free it).
 *         "unknown" if the embedded Python could not start.
 */
EC_API const char *ec_version(void);

/**
 * @brief Open and verify a bundle (directory or packed .edgecore archive) and compile its engine.
 *
 * @param bundle_path Path of the bundle (required).
 * @param backend     Inference backend, e.g. "openvino"; NULL = "openvino".
 * @param device      Backend device, e.g. "CPU"; NULL = the backend's default.
 * @param precision   "fp32", "bf16", "fp16", "int8"; NULL = the best engine compiled into
 *                    the bundle (else its ONNX graph at the backend's default precision).
 * @param[out] out    Receives the new handle (set to NULL on failure). The caller owns it
 *                    and must release it with ec_close().
 * @return EC_OK, EC_ERR_NULL_ARGUMENT, EC_ERR_BUNDLE, EC_ERR_INVALID_ARGUMENT (unknown
 *         backend or precision) or EC_ERR_RUNTIME.
 *
 * The strings are only read during the call. Opening takes seconds (verification
 * hashes every file; the engine is compiled): do it once, not per frame.
 */
EC_API ec_status_t ec_open(const char *bundle_path, const char *backend, const char *device,
                           const char *precision, ec_detector_t **out);

/**
 * @brief Size of the anomaly map written by ec_detect(): the graph input the model sees
 * (crop × crop, or the bundle's non-square input_size for an aspect-preserving pad/crop bundle).
 *
 * A map buffer must hold at least (*width) × (*height) floats.
 * @return EC_OK, EC_ERR_NULL_ARGUMENT or EC_ERR_INVALID_HANDLE.
 */
EC_API ec_status_t ec_map_size(const ec_detector_t *detector, int *width, int *height);

/**
 * @brief Score one frame.
 *
 * @param detector     An open handle (may be shared by several threads).
 * @param pixels       First byte of the top row; only read during the call.
 * @param width        Pixels per row, > 0.
 * @param height       Rows, > 0; width × height <= EC_MAX_PIXELS.
 * @param stride_bytes Bytes from the start of one row to the next, >= width × channels
 *                     (padded rows are fine; bottom-up/negative strides are not).
 *                     The library reads stride × (height − 1) + width × channels bytes.
 * @param format       EC_PIXEL_RGB8, EC_PIXEL_BGR8 or EC_PIXEL_GRAY8.
 * @param[out] out     Receives score, normalized score and decision (required).
 * @param[out] map     Optional anomaly map, row-major, at the graph input's size (see ec_map_size(): the
 *                     region the model sees, not the original frame size), each value
 *                     normalised to [0, 1] like normalized_score (0.5 = threshold).
 *                     Pass NULL with map_capacity 0 to skip it.
 * @param map_capacity Number of floats @p map can hold.
 * @return EC_OK, EC_ERR_NULL_ARGUMENT, EC_ERR_INVALID_ARGUMENT, EC_ERR_BUFFER_TOO_SMALL,
 *         EC_ERR_INVALID_HANDLE, EC_ERR_IMAGE, EC_ERR_NONFINITE or EC_ERR_RUNTIME. @p out and
 *         @p map are written only on EC_OK; on error they are left untouched. A frame that
 *         returns anything but EC_OK has no verdict: a pipeline must treat it as rejected.
 */
EC_API ec_status_t ec_detect(ec_detector_t *detector, const uint8_t *pixels, int width, int height,
                             int stride_bytes, ec_pixel_format_t format, ec_result_t *out,
                             float *map, size_t map_capacity);

/**
 * @brief Release a handle (engine, index, unpacked archive). NULL is ignored.
 *
 * Must not run while another thread uses the same handle; the handle is invalid afterwards
 * (calls with it return EC_ERR_INVALID_HANDLE instead of crashing). Closing a handle that
 * is not open does nothing but set ec_last_error().
 */
EC_API void ec_close(ec_detector_t *detector);

/**
 * @brief Message describing the last failed call made by THIS thread.
 *
 * @return A thread-local, NUL-terminated UTF-8 string owned by the library (never NULL).
 *         It is "" when the last call on this thread succeeded, and stays valid until
 *         the next ec_* call on the same thread (ec_version(), ec_status_string() and
 *         ec_last_error() itself leave it unchanged). Copy it if you need it longer.
 */
EC_API const char *ec_last_error(void);

/** @brief Symbolic name of a status code, e.g. "EC_ERR_BUNDLE" (static string, never NULL). */
EC_API const char *ec_status_string(ec_status_t status);

#ifdef __cplusplus
}
#endif

#endif /* EDGECORE_H */
