/* 2x2 max pooling, stride 2, on channels-last (NHWC) tensors: forward and backward.
 *
 * Forward writes each window's maximum and a one-byte code for where it was (0: top
 * left, 1: top right, 2: bottom left, 3: bottom right). Backward writes every element of
 * the input gradient exactly once: the output gradient where the code points, zero
 * elsewhere (a last odd row or column, which no window covers, gets zeros).
 *
 * The result equals PyTorch's max_pool2d, values and gradients alike: a later element
 * wins only when strictly greater (so ties go to the first in row-major window order),
 * and NaN wins, as in PyTorch's CPU kernel.
 *
 * Loaded by mnist_cnn/pool.py through ctypes; pool.py says why it exists.
 */
#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return value;
}

static inline float f32_to_float(float value) { return value; }

/* `ivdep`: the four window elements of one channel never alias each other or the output,
 * which the compiler cannot prove for a run-time channel count; without it the inner
 * loops are not vectorised and run about 20 times slower.
 * `omp parallel for`: rows of windows are shared among the threads of the OpenMP runtime
 * PyTorch has already loaded, as many as the caller passes (torch.get_num_threads()), or
 * one for small work, where starting threads would cost more than it saves (as PyTorch's
 * grain size does); built without OpenMP, the loops run on one thread. */
#define POOL2X2_GRAIN 32768
#define POOL2X2_THREADS(n, h2, w2, c, threads) \
    ((n) * (h2) * (w2) * (c) < POOL2X2_GRAIN ? 1 : (threads))
#define POOL2X2_KERNELS(SUFFIX, T, TO_FLOAT)                                                \
    void pool2x2_forward_##SUFFIX(const T *x, T *y, uint8_t *code, int64_t n, int64_t h,   \
                                  int64_t w, int64_t c, int threads) {                     \
        const int64_t h2 = h / 2, w2 = w / 2;                                              \
        const int team = POOL2X2_THREADS(n, h2, w2, c, threads);                           \
        (void)team;                                                                        \
        _Pragma("omp parallel for schedule(static) num_threads(team)")                     \
        for (int64_t row = 0; row < n * h2; row++) {                                       \
            const int64_t b = row / h2, i = row % h2;                                      \
            const T *restrict top = x + (b * h + 2 * i) * w * c;                           \
            const T *restrict bottom = top + w * c;                                        \
            T *restrict out = y + row * w2 * c;                                            \
            uint8_t *restrict where = code + row * w2 * c;                                 \
            for (int64_t j = 0; j < w2; j++) {                                             \
                _Pragma("GCC ivdep") for (int64_t k = 0; k < c; k++) {                     \
                    T v0 = top[2 * j * c + k], v1 = top[(2 * j + 1) * c + k];              \
                    T v2 = bottom[2 * j * c + k], v3 = bottom[(2 * j + 1) * c + k];        \
                    float f0 = TO_FLOAT(v0), f1 = TO_FLOAT(v1);                            \
                    float f2 = TO_FLOAT(v2), f3 = TO_FLOAT(v3);                            \
                    int take1 = (f1 > f0) | (f1 != f1);                                    \
                    float best = take1 ? f1 : f0;                                          \
                    T value = take1 ? v1 : v0;                                             \
                    uint8_t at = (uint8_t)take1;                                           \
                    int take2 = (f2 > best) | (f2 != f2);                                  \
                    best = take2 ? f2 : best;                                              \
                    value = take2 ? v2 : value;                                            \
                    at = take2 ? 2 : at;                                                   \
                    int take3 = (f3 > best) | (f3 != f3);                                  \
                    out[j * c + k] = take3 ? v3 : value;                                   \
                    where[j * c + k] = take3 ? 3 : at;                                     \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
    }                                                                                      \
                                                                                           \
    void pool2x2_backward_##SUFFIX(const T *grad, const uint8_t *code, T *grad_x,          \
                                   int64_t n, int64_t h, int64_t w, int64_t c,             \
                                   int threads) {                                          \
        const int64_t h2 = h / 2, w2 = w / 2;                                              \
        const int team = POOL2X2_THREADS(n, h2, w2, c, threads);                           \
        (void)team;                                                                        \
        const T zero = 0;                                                                  \
        _Pragma("omp parallel for schedule(static) num_threads(team)")                     \
        for (int64_t row = 0; row < n * h2; row++) {                                       \
            const int64_t b = row / h2, i = row % h2;                                      \
            const T *restrict g = grad + row * w2 * c;                                     \
            const uint8_t *restrict where = code + row * w2 * c;                           \
            T *restrict top = grad_x + (b * h + 2 * i) * w * c;                            \
            T *restrict bottom = top + w * c;                                              \
            for (int64_t j = 0; j < w2; j++) {                                             \
                _Pragma("GCC ivdep") for (int64_t k = 0; k < c; k++) {                     \
                    T v = g[j * c + k];                                                    \
                    uint8_t at = where[j * c + k];                                         \
                    top[2 * j * c + k] = at == 0 ? v : zero;                               \
                    top[(2 * j + 1) * c + k] = at == 1 ? v : zero;                         \
                    bottom[2 * j * c + k] = at == 2 ? v : zero;                            \
                    bottom[(2 * j + 1) * c + k] = at == 3 ? v : zero;                      \
                }                                                                          \
            }                                                                              \
            if (w % 2) {                                                                   \
                memset(top + (w - 1) * c, 0, c * sizeof(T));                               \
                memset(bottom + (w - 1) * c, 0, c * sizeof(T));                            \
            }                                                                              \
        }                                                                                  \
        if (h % 2)                                                                         \
            for (int64_t b = 0; b < n; b++)                                                \
                memset(grad_x + (b * h + h - 1) * w * c, 0, w * c * sizeof(T));            \
    }

/* bfloat16 travels as its raw 16 bits; zero bits are +0.0. */
POOL2X2_KERNELS(bf16, uint16_t, bf16_to_float)
POOL2X2_KERNELS(f32, float, f32_to_float)
