/* CPU kernels for the networks' pooling stages, loaded by mnist_cnn/pool.py through ctypes
 * (pool.py says why each exists):
 *   pool2x2_*: 2x2 max pooling, stride 2, on channels-last (NHWC) tensors;
 *   stage1_*:  a first stage of one input channel, 3x3 convolution (padding 1, bias), 2x2
 *              max pooling and ReLU in one pass, which never writes the full-size maps;
 *   bnpool_*:  BatchNorm, 2x2 max pooling and ReLU in one pass, which never writes the
 *              normalised full-size maps.
 *
 * 2x2 max pooling: forward writes each window's maximum and a one-byte code for where it
 * was (0: top left, 1: top right, 2: bottom left, 3: bottom right). Backward writes every
 * element of the input gradient exactly once: the output gradient where the code points,
 * zero elsewhere (a last odd row or column, which no window covers, gets zeros). With
 * `relu` set, forward applies ReLU to each maximum as well and codes 4 where ReLU passes
 * no gradient (a maximum of zero or less), so backward writes zeros for that window.
 *
 * The result equals PyTorch's max_pool2d (then relu), values and gradients alike: a later
 * element wins only when strictly greater (so ties go to the first in row-major window
 * order), NaN wins, as in PyTorch's CPU kernel, and ReLU keeps NaN and -0.0 as
 * torch.relu does.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

static inline float bf16_to_float(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return value;
}

static inline float f32_to_float(float value) { return value; }

/* Round to nearest even, as PyTorch converts float to bfloat16 (NaN stays a quiet NaN). */
static inline uint16_t float_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return (uint16_t)(value != value ? (bits >> 16) | 0x40u : rounded);
}

static inline float round_to_bf16(float value) { return bf16_to_float(float_to_bf16(value)); }
static inline float as_is(float value) { return value; }

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
                                  int64_t w, int64_t c, int relu, int threads) {           \
        const int64_t h2 = h / 2, w2 = w / 2;                                              \
        const T zero = 0;                                                                  \
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
                    best = take3 ? f3 : best;                                              \
                    value = take3 ? v3 : value;                                            \
                    at = take3 ? 3 : at;                                                   \
                    out[j * c + k] = relu & (best < 0.0f) ? zero : value;                  \
                    where[j * c + k] = relu & (best <= 0.0f) ? 4 : at;                     \
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

/* The first stage, y = ReLU(MaxPool2x2(Conv3x3(x) + bias)), for x of one channel [N,1,H,W]
 * (float32), weight [C,1,3,3], bias [C], y channels-last [N,C,H/2,W/2], C a multiple of 8.
 *
 * Forward computes the four convolution outputs of each window in registers and writes
 * only the window's result and a one-byte code: 0-3, which of the four was the maximum
 * (the first of equals; NaN wins, as in PyTorch's pooling), or 4 where ReLU made the
 * result zero (no gradient passes there, as in PyTorch's ReLU backward).
 * Backward needs no gradient for x (the network's input): it sums the weight and bias
 * gradients, grad_w[t][k] = sum of grad[k] * x[tap t of the window's maximum], per thread
 * into `partial` [parts][10][C] (taps 0-8, then the bias), which the caller adds up in a
 * fixed order, so the result does not depend on timing. With AVX2, each channel's taps
 * are picked out of its window by one permutation (0.52-0.59x the time of four masked
 * passes, the same bits; benchmarks/RESULTS.md).
 * In bfloat16 (under autocast) x, weight and bias are rounded to bfloat16 first and each
 * convolution output is rounded before pooling: PyTorch's bf16 convolution, with the
 * products summed in float32.
 * Eight channels at a time in GCC/Clang vector types, which compile to one AVX2 register
 * (or two SSE ones) each: written this way because the compiler did not vectorise the
 * plain loops well (8 times slower). */
#define STAGE1_MAX_V 8  /* channels / 8 */
#define STAGE1_MAX_W 64

typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
typedef uint32_t u8 __attribute__((vector_size(32)));
typedef uint8_t byte8 __attribute__((vector_size(8)));
typedef uint16_t half8 __attribute__((vector_size(16)));
typedef uint8_t byte32 __attribute__((vector_size(32)));

/* The low byte of each lane (one shuffle where the compiler has it, else lane by lane). */
static inline byte8 i8_low_bytes(i8 v) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
    return __builtin_shufflevector((byte32)v, (byte32)v, 0, 4, 8, 12, 16, 20, 24, 28);
#else
    return __builtin_convertvector(v, byte8);
#endif
}

static inline f8 f8_select(i8 mask, f8 yes, f8 no) {
    return (f8)(((i8)yes & mask) | ((i8)no & ~mask));
}

static inline f8 f8_round_bf16(f8 v) {
    u8 bits = (u8)v;
    u8 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
    u8 quiet = (bits | 0x00400000u) & 0xFFFF0000u;
    return f8_select(v != v, (f8)quiet, (f8)rounded);
}

static inline f8 f8_load(const void *p, int bf16) {
    if (bf16) {
        half8 h;
        memcpy(&h, p, sizeof h);
        return (f8)(__builtin_convertvector(h, u8) << 16);
    }
    f8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* `v` must already be a bfloat16 value when bf16 is set (the low 16 bits are dropped). */
static inline void f8_store(void *p, f8 v, int bf16) {
    if (bf16) {
        half8 h = __builtin_convertvector((u8)v >> 16, half8);
        memcpy(p, &h, sizeof h);
    } else {
        memcpy(p, &v, sizeof v);
    }
}

/* Rows 2i-1 .. 2i+2 of an image (those a row of windows reads), rounded as the
 * convolution reads them, with a zero column each side and zero rows outside the image.
 * Returns whether every value read is finite. */
static inline int stage1_padded_rows(float rows[4][STAGE1_MAX_W + 2], const float *img,
                                     int64_t i, int64_t h, int64_t w, int bf16) {
    uint32_t special = 0; /* whether some value's exponent bits are all set: inf or NaN */
    for (int q = 0; q < 4; q++) {
        const int64_t r = 2 * i - 1 + q;
        float *out = rows[q] + 1;
        rows[q][0] = rows[q][w + 1] = 0.0f;
        if (r < 0 || r >= h) {
            memset(out, 0, w * sizeof(float));
            continue;
        }
        const float *in = img + r * w;
        for (int64_t s = 0; s < w; s++) {
            out[s] = bf16 ? round_to_bf16(in[s]) : in[s];
            uint32_t bits; /* as read: a float near its maximum rounds to a bf16 infinity */
            memcpy(&bits, &out[s], sizeof bits);
            special |= (bits & 0x7F800000u) == 0x7F800000u;
        }
    }
    return !special;
}

/* The window at (i, j) through tap t of position p (0-3, row-major in the window). */
#define STAGE1_TAP(ROWS, J, P, T) ((ROWS)[(P) / 2 + (T) / 3][2 * (J) + (P) % 2 + (T) % 3])

static inline __attribute__((always_inline)) void stage1_forward_rows(
    const float *x, const f8 *wt, const f8 *bias, void *y, uint8_t *code, int64_t first,
    int64_t last, int64_t h, int64_t w, int64_t c, const int64_t vectors, const int bf16) {
    const int64_t h2 = h / 2, w2 = w / 2, size = bf16 ? 2 : 4;
    float rows[4][STAGE1_MAX_W + 2];
    for (int64_t row = first; row < last; row++) {
        stage1_padded_rows(rows, x + (row / h2) * h * w, row % h2, h, w, bf16);
        for (int64_t j = 0; j < w2; j++) {
            const int64_t at = (row * w2 + j) * c;
            for (int64_t v = 0; v < vectors; v++) {
                /* The window's four sums side by side: four independent chains of
                 * multiply-adds keep the vector units busy, one chain would wait on each. */
                f8 acc[4] = {{0}};
                for (int t = 0; t < 9; t++)
                    for (int p = 0; p < 4; p++)
                        acc[p] += STAGE1_TAP(rows, j, p, t) * wt[t * vectors + v];
                f8 best = {0};
                i8 where = {0};
                for (int p = 0; p < 4; p++) {
                    f8 sum = acc[p] + bias[v];
                    if (bf16) sum = f8_round_bf16(sum);
                    i8 take = p == 0 ? ~(i8){0} : (sum > best) | (sum != sum);
                    best = f8_select(take, sum, best);
                    where = (take & p) | (~take & where);
                }
                const f8 zero = {0};
                f8_store((char *)y + (at + 8 * v) * size, f8_select(best < zero, zero, best), bf16);
                where = ((best <= zero) & 4) | (~(best <= zero) & where);
                byte8 bytes = i8_low_bytes(where);
                memcpy(code + at + 8 * v, &bytes, sizeof bytes);
            }
        }
    }
}

static inline __attribute__((always_inline)) void stage1_backward_rows(
    const float *x, const void *grad, const uint8_t *code, f8 sums[10][STAGE1_MAX_V],
    int64_t first, int64_t last, int64_t h, int64_t w, int64_t c, const int64_t vectors,
    const int bf16) {
    const int64_t h2 = h / 2, w2 = w / 2, size = bf16 ? 2 : 4;
    float rows[4][STAGE1_MAX_W + 2];
    for (int64_t row = first; row < last; row++) {
        const int finite = stage1_padded_rows(rows, x + (row / h2) * h * w, row % h2, h, w, bf16);
        (void)finite; /* read only where AVX2 is compiled in */
        for (int64_t j = 0; j < w2; j++) {
            const int64_t at = (row * w2 + j) * c;
#ifdef __AVX2__
            /* Where every tap is finite, one pass: tap t of each channel's maximum picked out
             * of the window's four (lanes 0-3; code 4, no gradient, picks lane 4, a zero) by
             * one permutation, times the gradient. The products the masked passes add for
             * the other positions are zeros, so the sums are the same, bit for bit. */
            if (finite) {
                f8 taps[9];
                for (int t = 0; t < 9; t++)
                    taps[t] = (f8){STAGE1_TAP(rows, j, 0, t), STAGE1_TAP(rows, j, 1, t),
                                   STAGE1_TAP(rows, j, 2, t), STAGE1_TAP(rows, j, 3, t), 0, 0, 0, 0};
                for (int64_t v = 0; v < vectors; v++) {
                    const f8 g = f8_load((const char *)grad + (at + 8 * v) * size, bf16);
                    byte8 bytes;
                    memcpy(&bytes, code + at + 8 * v, sizeof bytes);
                    const i8 where = __builtin_convertvector(bytes, i8);
                    const f8 gp = f8_select(where < 4, g, (f8){0});
                    for (int t = 0; t < 9; t++)
                        sums[t][v] += gp * (f8)_mm256_permutevar8x32_ps((__m256)taps[t],
                                                                         (__m256i)where);
                    sums[9][v] += gp;
                }
                continue;
            }
#endif
            /* Four masked passes: each of the window's positions adds its taps times the
             * gradient where it holds the maximum, zero times them elsewhere (so an infinite
             * or NaN tap anywhere in the window makes the sums NaN, as the plain layers'). */
            for (int64_t v = 0; v < vectors; v++) {
                const f8 g = f8_load((const char *)grad + (at + 8 * v) * size, bf16);
                byte8 bytes;
                memcpy(&bytes, code + at + 8 * v, sizeof bytes);
                const i8 where = __builtin_convertvector(bytes, i8);
                for (int p = 0; p < 4; p++) {
                    const f8 gp = f8_select(where == p, g, (f8){0});
                    for (int t = 0; t < 9; t++) sums[t][v] += gp * STAGE1_TAP(rows, j, p, t);
                    sums[9][v] += gp;
                }
            }
        }
    }
}

/* The entry points pass the vector count as a constant for 16 channels (the networks'
 * first stage), so the compiler unrolls the channel loop there. */
#define STAGE1_BY_WIDTH(CALL, VECTORS)                                                    \
    do {                                                                                  \
        if ((VECTORS) == 2) CALL(2);                                                      \
        else CALL(VECTORS);                                                               \
    } while (0)

#define STAGE1_KERNELS(SUFFIX, BF16)                                                      \
    void stage1_forward_##SUFFIX(const float *x, const float *weight, const float *bias,  \
                                 void *y, uint8_t *code, int64_t n, int64_t h, int64_t w, \
                                 int64_t c, int threads) {                                \
        const int64_t rows = n * (h / 2), vectors = c / 8;                                \
        const int team = POOL2X2_THREADS(n, h / 2, w / 2, c, threads);                    \
        f8 wt[9 * STAGE1_MAX_V], b[STAGE1_MAX_V];                                         \
        for (int64_t k = 0; k < c; k++) {                                                 \
            float value = BF16 ? round_to_bf16(bias[k]) : bias[k];                        \
            b[k / 8][k % 8] = value;                                                      \
            for (int t = 0; t < 9; t++) {                                                 \
                value = BF16 ? round_to_bf16(weight[k * 9 + t]) : weight[k * 9 + t];      \
                wt[t * vectors + k / 8][k % 8] = value;                                   \
            }                                                                             \
        }                                                                                 \
        _Pragma("omp parallel for schedule(static) num_threads(team)")                    \
        for (int part = 0; part < team; part++) {                                         \
            const int64_t first = rows * part / team, last = rows * (part + 1) / team;   \
            STAGE1_BY_WIDTH(STAGE1_FORWARD_##SUFFIX, vectors);                            \
        }                                                                                 \
    }                                                                                     \
                                                                                          \
    void stage1_backward_##SUFFIX(const float *x, const void *grad, const uint8_t *code,  \
                                  float *partial, int64_t n, int64_t h, int64_t w,        \
                                  int64_t c, int parts) {                                 \
        const int64_t rows = n * (h / 2), vectors = c / 8;                                \
        _Pragma("omp parallel for schedule(static) num_threads(parts)")                   \
        for (int part = 0; part < parts; part++) {                                        \
            const int64_t first = rows * part / parts, last = rows * (part + 1) / parts;  \
            f8 sums[10][STAGE1_MAX_V];                                                    \
            memset(sums, 0, sizeof sums);                                                 \
            STAGE1_BY_WIDTH(STAGE1_BACKWARD_##SUFFIX, vectors);                           \
            for (int t = 0; t < 10; t++)                                                  \
                for (int64_t k = 0; k < c; k++)                                           \
                    partial[(part * 10 + t) * c + k] = sums[t][k / 8][k % 8];            \
        }                                                                                 \
    }

#define STAGE1_FORWARD_f32(V) \
    stage1_forward_rows(x, wt, b, y, code, first, last, h, w, c, V, 0)
#define STAGE1_FORWARD_bf16(V) \
    stage1_forward_rows(x, wt, b, y, code, first, last, h, w, c, V, 1)
#define STAGE1_BACKWARD_f32(V) \
    stage1_backward_rows(x, grad, code, sums, first, last, h, w, c, V, 0)
#define STAGE1_BACKWARD_bf16(V) \
    stage1_backward_rows(x, grad, code, sums, first, last, h, w, c, V, 1)

STAGE1_KERNELS(f32, 0)
STAGE1_KERNELS(bf16, 1)

/* BatchNorm, 2x2 max pooling and ReLU in one pass, y = ReLU(MaxPool2x2(BN(x))), for x
 * channels-last [N,C,H,W] (float32, or bfloat16 under autocast), BatchNorm's weight, bias
 * and running statistics float32 [C].
 *
 * Forward, in training, first takes each channel's mean and variance over the batch: each
 * image's mean and sum of squared deviations (two passes over an image, which stays in
 * cache), then those of the batch from the images' in image order (so the result does not
 * depend on the thread count), in double precision. It updates the running statistics as
 * PyTorch does (the unbiased variance). In evaluation it uses the running statistics.
 * Then one pass normalises each window's four values (x * scale + shift, rounded to
 * bfloat16 in bf16 as PyTorch's bf16 BatchNorm returns them), pools them with ReLU as
 * pool2x2 does (codes 0-4), and writes only the pooled result.
 * Backward, from the output gradient and the codes: per image then per batch, the sums of
 * the gradient reaching BatchNorm's output (the bias gradient) and of it times the
 * normalised input (the weight gradient), then every input element's gradient once:
 * scale * (g - mean(g) - xhat * mean(g * xhat)) after batch statistics, scale * g after
 * running ones, where g is zero off each window's maximum (and in a last odd row or
 * column, which no window covers). */
#define BN_MAX_V 128 /* channels / 8 */

static inline __attribute__((always_inline)) f8 bn_load(const void *base, int64_t at, int bf16) {
    return f8_load((const char *)base + at * (bf16 ? 2 : 4), bf16);
}

/* Stores `v`, rounded to bfloat16 first in bf16. */
static inline __attribute__((always_inline)) void bn_store(void *base, int64_t at, f8 v,
                                                           int bf16) {
    f8_store((char *)base + at * (bf16 ? 2 : 4), bf16 ? f8_round_bf16(v) : v, bf16);
}

static inline __attribute__((always_inline)) i8 bn_codes(const uint8_t *at) {
    byte8 bytes;
    memcpy(&bytes, at, sizeof bytes);
    return __builtin_convertvector(bytes, i8);
}

/* The mean and sum of squared deviations of each channel of one image [H*W, C]. */
static inline __attribute__((always_inline)) void bn_image_stats(
    const void *img, float *mean, float *m2, int64_t hw, int64_t c, int bf16) {
    /* Four sums of every fourth pixel, added at the end: four independent chains of
     * additions keep the vector units busy, one chain would wait on each. */
    for (int64_t v = 0; v < c / 8; v++) {
        f8 sums[4] = {{0}}, squares[4] = {{0}};
        int64_t p = 0;
        for (; p + 4 <= hw; p += 4)
            for (int u = 0; u < 4; u++) sums[u] += bn_load(img, (p + u) * c + 8 * v, bf16);
        for (; p < hw; p++) sums[0] += bn_load(img, p * c + 8 * v, bf16);
        const f8 m = ((sums[0] + sums[1]) + (sums[2] + sums[3])) / (float)hw;
        for (p = 0; p + 4 <= hw; p += 4)
            for (int u = 0; u < 4; u++) {
                const f8 d = bn_load(img, (p + u) * c + 8 * v, bf16) - m;
                squares[u] += d * d;
            }
        for (; p < hw; p++) {
            const f8 d = bn_load(img, p * c + 8 * v, bf16) - m;
            squares[0] += d * d;
        }
        const f8 m2v = (squares[0] + squares[1]) + (squares[2] + squares[3]);
        memcpy(mean + 8 * v, &m, sizeof m);
        memcpy(m2 + 8 * v, &m2v, sizeof m2v);
    }
}

/* The batch's mean and 1/std per channel from each image's, added in image order (so the
 * result does not depend on the thread count) in double precision; the running statistics
 * updated as PyTorch does (with the unbiased variance) where they are given. */
static void bn_batch_stats(const float *part, int64_t n, int64_t hw, int64_t c,
                           float *running_mean, float *running_var, double momentum, double eps,
                           float *mean, float *rstd) {
    for (int64_t k = 0; k < c; k++) {
        double m = 0.0, sq = 0.0;
        for (int64_t b = 0; b < n; b++) m += part[2 * b * c + k];
        m /= (double)n;
        for (int64_t b = 0; b < n; b++) {
            const double d = part[2 * b * c + k] - m;
            sq += part[(2 * b + 1) * c + k] + (double)hw * d * d;
        }
        const double count = (double)n * (double)hw, var = sq / count;
        mean[k] = (float)m;
        rstd[k] = (float)(1.0 / sqrt(var + eps));
        if (running_mean) {
            running_mean[k] = (float)((1.0 - momentum) * running_mean[k] + momentum * m);
            running_var[k] = (float)((1.0 - momentum) * running_var[k]
                                     + momentum * var * count / (count - 1.0));
        }
    }
}

static void bn_running_stats(const float *running_mean, const float *running_var, double eps,
                             int64_t c, float *mean, float *rstd) {
    for (int64_t k = 0; k < c; k++) {
        mean[k] = running_mean[k];
        rstd[k] = (float)(1.0 / sqrt((double)running_var[k] + eps));
    }
}

/* Where the four elements of window j start, given where its two rows start. */
#define BN_WINDOW(TOP, BOTTOM, J, C) \
    {(TOP) + 2 * (J) * (C), (TOP) + (2 * (J) + 1) * (C), (BOTTOM) + 2 * (J) * (C), \
     (BOTTOM) + (2 * (J) + 1) * (C)}

/* Normalises, pools and applies ReLU to one row of windows (as pool2x2 codes them). */
static inline __attribute__((always_inline)) void bn_pool_row(
    const void *x, const f8 *scale, const f8 *shift, void *y, uint8_t *code, int64_t row,
    int64_t h, int64_t w, int64_t c, int bf16) {
    const int64_t h2 = h / 2, w2 = w / 2;
    const int64_t top = (row / h2 * h + 2 * (row % h2)) * w * c, bottom = top + w * c;
    for (int64_t j = 0; j < w2; j++) {
        const int64_t at = (row * w2 + j) * c;
        const int64_t offsets[4] = BN_WINDOW(top, bottom, j, c);
        for (int64_t v = 0; v < c / 8; v++) {
            f8 best = {0};
            i8 where = {0};
            for (int p = 0; p < 4; p++) {
                f8 z = bn_load(x, offsets[p] + 8 * v, bf16) * scale[v] + shift[v];
                if (bf16) z = f8_round_bf16(z);
                const i8 take = p == 0 ? ~(i8){0} : (z > best) | (z != z);
                best = f8_select(take, z, best);
                where = (take & p) | (~take & where);
            }
            const f8 zero = {0};
            f8_store((char *)y + (at + 8 * v) * (bf16 ? 2 : 4), f8_select(best < zero, zero, best),
                     bf16);
            where = ((best <= zero) & 4) | (~(best <= zero) & where);
            const byte8 bytes = i8_low_bytes(where);
            memcpy(code + at + 8 * v, &bytes, sizeof bytes);
        }
    }
}

/* One image's sums of the gradient reaching BatchNorm's output, and of it times x - mean. */
static inline __attribute__((always_inline)) void bn_image_grad_sums(
    const void *x, const void *grad, const uint8_t *code, const f8 *mean, float *part,
    int64_t b, int64_t h, int64_t w, int64_t c, int bf16) {
    const int64_t h2 = h / 2, w2 = w / 2, vectors = c / 8;
    f8 sum_g[BN_MAX_V], sum_gx[BN_MAX_V];
    memset(sum_g, 0, vectors * sizeof(f8));
    memset(sum_gx, 0, vectors * sizeof(f8));
    for (int64_t i = 0; i < h2; i++) {
        const int64_t top = (b * h + 2 * i) * w * c, bottom = top + w * c;
        for (int64_t j = 0; j < w2; j++) {
            const int64_t at = ((b * h2 + i) * w2 + j) * c;
            for (int64_t v = 0; v < vectors; v++) {
                const i8 where = bn_codes(code + at + 8 * v);
                const f8 g = f8_select(where < 4, bn_load(grad, at + 8 * v, bf16), (f8){0});
                f8 value = bn_load(x, bottom + (2 * j + 1) * c + 8 * v, bf16);
                value = f8_select(where == 2, bn_load(x, bottom + 2 * j * c + 8 * v, bf16), value);
                value = f8_select(where == 1, bn_load(x, top + (2 * j + 1) * c + 8 * v, bf16), value);
                value = f8_select(where == 0, bn_load(x, top + 2 * j * c + 8 * v, bf16), value);
                sum_g[v] += g;
                sum_gx[v] += g * (value - mean[v]);
            }
        }
    }
    memcpy(part + 2 * b * c, sum_g, c * sizeof(float));
    memcpy(part + (2 * b + 1) * c, sum_gx, c * sizeof(float));
}

/* From the images' sums, in image order: the weight and bias gradients, and each channel's
 * input gradient a * g + slope * (x - mean) + offset (slope and offset zero after running
 * statistics, where BatchNorm is a fixed affine map). */
static void bn_grad_coefficients(const float *part, int64_t n, int64_t hw, int64_t c,
                                 const float *weight, const float *rstd, int train,
                                 float *grad_weight, float *grad_bias, f8 *a, f8 *slope,
                                 f8 *offset) {
    const double count = (double)n * (double)hw;
    for (int64_t k = 0; k < c; k++) {
        double sg = 0.0, sgx = 0.0;
        for (int64_t b = 0; b < n; b++) {
            sg += part[2 * b * c + k];
            sgx += part[(2 * b + 1) * c + k];
        }
        const double r = rstd[k], scale = (double)weight[k] * r;
        grad_bias[k] = (float)sg;
        grad_weight[k] = (float)(sgx * r);
        a[k / 8][k % 8] = (float)scale;
        slope[k / 8][k % 8] = train ? (float)(-scale * r * r * sgx / count) : 0.0f;
        offset[k / 8][k % 8] = train ? (float)(-scale * sg / count) : 0.0f;
    }
}

/* The gradient of `count` pixels no window covers: slope * (x - mean) + offset after batch
 * statistics, zero after running ones (where x must not enter: inf * 0 would be NaN). */
static inline __attribute__((always_inline)) void bn_uncovered(
    const void *x, void *grad_x, int64_t from, int64_t count, const f8 *mean, const f8 *slope,
    const f8 *offset, int train, int64_t c, int bf16) {
    for (int64_t e = 0; e < count; e++)
        for (int64_t v = 0; v < c / 8; v++) {
            const int64_t at = from + e * c + 8 * v;
            const f8 d = bn_load(x, at, bf16) - mean[v], zero = {0};
            bn_store(grad_x, at, train ? slope[v] * d + offset[v] : zero, bf16);
        }
}

/* The input gradient of the two image rows under one row of windows: a * g, plus
 * slope * (x - mean) + offset after batch statistics. */
static inline __attribute__((always_inline)) void bn_grad_row(
    const void *x, const void *grad, const uint8_t *code, const f8 *mean, const f8 *a,
    const f8 *slope, const f8 *offset, int train, void *grad_x, int64_t row, int64_t h,
    int64_t w, int64_t c, int bf16) {
    const int64_t h2 = h / 2, w2 = w / 2;
    const int64_t top = (row / h2 * h + 2 * (row % h2)) * w * c, bottom = top + w * c;
    for (int64_t j = 0; j < w2; j++) {
        const int64_t at = (row * w2 + j) * c;
        const int64_t offsets[4] = BN_WINDOW(top, bottom, j, c);
        for (int64_t v = 0; v < c / 8; v++) {
            const i8 where = bn_codes(code + at + 8 * v);
            const f8 ag = a[v] * bn_load(grad, at + 8 * v, bf16), zero = {0};
            for (int p = 0; p < 4; p++) {
                const int64_t e = offsets[p] + 8 * v;
                const f8 d = bn_load(x, e, bf16) - mean[v];
                const f8 own = f8_select(where == p, ag, zero);
                bn_store(grad_x, e, train ? own + slope[v] * d + offset[v] : own, bf16);
            }
        }
    }
    if (w % 2) { /* a last odd column */
        bn_uncovered(x, grad_x, top + 2 * w2 * c, 1, mean, slope, offset, train, c, bf16);
        bn_uncovered(x, grad_x, bottom + 2 * w2 * c, 1, mean, slope, offset, train, c, bf16);
    }
}

/* The OpenMP loops live in these per-type functions, so each loop body is compiled with its
 * type known (an outlined loop of a shared function would test it at every element). */
#define BNPOOL_KERNELS(SUFFIX, BF16)                                                         \
    void bnpool_forward_##SUFFIX(const void *x, const float *weight, const float *bias,     \
                                 float *running_mean, float *running_var, double momentum,  \
                                 double eps, int train, float *part, float *mean,           \
                                 float *rstd, void *y, uint8_t *code, int64_t n, int64_t h, \
                                 int64_t w, int64_t c, int threads) {                       \
        const int64_t hw = h * w, size = BF16 ? 2 : 4;                                      \
        const int team = POOL2X2_THREADS(n, h, w, c, threads);                              \
        (void)team;                                                                         \
        if (train) {                                                                        \
            _Pragma("omp parallel for schedule(static) num_threads(team)")                  \
            for (int64_t b = 0; b < n; b++)                                                 \
                bn_image_stats((const char *)x + b * hw * c * size, part + 2 * b * c,       \
                               part + (2 * b + 1) * c, hw, c, BF16);                        \
            bn_batch_stats(part, n, hw, c, running_mean, running_var, momentum, eps, mean,  \
                           rstd);                                                           \
        } else {                                                                            \
            bn_running_stats(running_mean, running_var, eps, c, mean, rstd);                \
        }                                                                                   \
        f8 scale[BN_MAX_V], shift[BN_MAX_V];                                                \
        for (int64_t k = 0; k < c; k++) {                                                   \
            const float s = weight[k] * rstd[k];                                            \
            scale[k / 8][k % 8] = s;                                                        \
            shift[k / 8][k % 8] = bias[k] - mean[k] * s;                                    \
        }                                                                                   \
        _Pragma("omp parallel for schedule(static) num_threads(team)")                      \
        for (int64_t row = 0; row < n * (h / 2); row++)                                     \
            bn_pool_row(x, scale, shift, y, code, row, h, w, c, BF16);                      \
    }                                                                                       \
                                                                                            \
    void bnpool_backward_##SUFFIX(const void *x, const void *grad, const uint8_t *code,     \
                                  const float *weight, const float *mean_in,                \
                                  const float *rstd, int train, float *part,                \
                                  float *grad_weight, float *grad_bias, void *grad_x,       \
                                  int64_t n, int64_t h, int64_t w, int64_t c, int threads) { \
        const int team = POOL2X2_THREADS(n, h, w, c, threads);                              \
        (void)team;                                                                         \
        f8 mean[BN_MAX_V], a[BN_MAX_V], slope[BN_MAX_V], offset[BN_MAX_V];                  \
        memcpy(mean, mean_in, c * sizeof(float));                                           \
        _Pragma("omp parallel for schedule(static) num_threads(team)")                      \
        for (int64_t b = 0; b < n; b++)                                                     \
            bn_image_grad_sums(x, grad, code, mean, part, b, h, w, c, BF16);                \
        bn_grad_coefficients(part, n, h * w, c, weight, rstd, train, grad_weight, grad_bias, \
                             a, slope, offset);                                             \
        _Pragma("omp parallel for schedule(static) num_threads(team)")                      \
        for (int64_t row = 0; row < n * (h / 2); row++)                                     \
            bn_grad_row(x, grad, code, mean, a, slope, offset, train, grad_x, row, h, w, c, \
                        BF16);                                                              \
        if (h % 2) /* a last odd row */                                                     \
            for (int64_t b = 0; b < n; b++)                                                 \
                bn_uncovered(x, grad_x, (b * h + h - 1) * w * c, w, mean, slope, offset,    \
                             train, c, BF16);                                               \
    }

BNPOOL_KERNELS(f32, 0)
BNPOOL_KERNELS(bf16, 1)
