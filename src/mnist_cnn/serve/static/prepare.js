// A picture -> the 28x28 uint8 image the model expects: mnist_cnn/images.py, step for step.
//
// The browser answers only as `predict` does if it sees the same 28x28, so each step is
// Python's computed the same way: Pillow's Lanczos resampling (separable, 22-bit fixed-point
// weights, an 8-bit image between the two passes), its 3x3 median filter (edges repeated),
// numpy's float32 arithmetic (Math.fround) and its pairwise sums, Python's round() (half to
// even). The numbers that tune it (20x20 box, ink floor, ...) come from the run's
// preparation contract (model.json), not from here.
// Works as a plain browser script (window.MnistPrepare) and as a Node module.
"use strict";

((root, factory) => {
  const api = factory();
  if (typeof module === "object" && module.exports) module.exports = api;
  else root.MnistPrepare = api;
})(typeof self !== "undefined" ? self : globalThis, () => {
  const f32 = Math.fround;

  // mnist_cnn.images' constants; model.json's "preparation" overrides them.
  const DEFAULTS = {
    size: 28,
    digit_box: 20,
    max_pixels: 40000000,
    ink_floor: 0.2,
    min_contrast: 32,
    working_size: 280,
    // Pillow 13 changed the order of Lanczos' two passes (see resizeLanczos).
    pillow_major: 13,
  };

  class PrepareError extends Error {}

  /** An image: width, height and a row-major array of pixels. */
  const image = (w, h, data) => ({ w, h, data });

  /** Python's round(): halves go to the even neighbour. */
  function roundHalfEven(x) {
    const r = Math.round(x);
    return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
  }

  /** Pillow's RGB -> L: ITU-R 601-2 luma in 16-bit fixed point. */
  function grayFromRGBA(rgba, w, h) {
    const out = new Float32Array(w * h);
    for (let i = 0, j = 0; i < out.length; i++, j += 4) {
      out[i] = (rgba[j] * 19595 + rgba[j + 1] * 38470 + rgba[j + 2] * 7471 + 0x8000) >>> 16;
    }
    return image(w, h, out);
  }

  // --- statistics, as numpy computes them --------------------------------------------------

  function border(a) {
    const { w, h, data } = a;
    const out = [];
    for (let x = 0; x < w; x++) out.push(data[x]);
    for (let x = 0; x < w; x++) out.push(data[(h - 1) * w + x]);
    for (let y = 0; y < h; y++) out.push(data[y * w]);
    for (let y = 0; y < h; y++) out.push(data[y * w + w - 1]);
    return out;
  }

  function median(values) {
    const s = Float64Array.from(values).sort();
    const n = s.length;
    return n % 2 ? s[(n - 1) / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
  }

  /** numpy's pairwise summation (blocks of 8 accumulators up to 128 values, then halves);
   * `round` is Math.fround for float32 arrays, the identity for float64. */
  function pairwiseSum(v, lo, n, round) {
    if (n < 8) {
      let res = 0;
      for (let i = 0; i < n; i++) res = round(res + v[lo + i]);
      return res;
    }
    if (n <= 128) {
      const r = [];
      for (let j = 0; j < 8; j++) r.push(v[lo + j]);
      let i = 8;
      for (; i < n - (n % 8); i += 8) {
        for (let j = 0; j < 8; j++) r[j] = round(r[j] + v[lo + i + j]);
      }
      let res = round(
        round(round(r[0] + r[1]) + round(r[2] + r[3])) +
          round(round(r[4] + r[5]) + round(r[6] + r[7])),
      );
      for (; i < n; i++) res = round(res + v[lo + i]);
      return res;
    }
    let n2 = Math.floor(n / 2);
    n2 -= n2 % 8;
    return round(pairwiseSum(v, lo, n2, round) + pairwiseSum(v, lo + n2, n - n2, round));
  }

  const identity = (x) => x;

  // --- Pillow's resampling and median filter ----------------------------------------------

  const PRECISION_BITS = 22; // 32 - 8 - 2, as Pillow's 8-bit resampling
  const ONE = 2 ** PRECISION_BITS;

  function sinc(x) {
    if (x === 0) return 1;
    const px = x * Math.PI;
    return Math.sin(px) / px;
  }

  function lanczos(x) {
    return -3 <= x && x < 3 ? sinc(x) * sinc(x / 3) : 0;
  }

  /** Pillow's precompute_coeffs + normalize_coeffs_8bpc for one axis. */
  function coefficients(inSize, outSize) {
    const scale = inSize / outSize;
    const filterscale = Math.max(scale, 1);
    const support = 3 * filterscale;
    const rows = [];
    for (let xx = 0; xx < outSize; xx++) {
      const center = (xx + 0.5) * scale;
      const ss = 1 / filterscale;
      const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
      const xmax = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
      const k = [];
      let ww = 0;
      for (let x = 0; x < xmax; x++) {
        const w = lanczos((x + xmin - center + 0.5) * ss);
        k.push(w);
        ww += w;
      }
      const fixed = Int32Array.from(k, (w) => {
        const v = ww !== 0 ? w / ww : w;
        return v < 0 ? Math.trunc(-0.5 + v * ONE) : Math.trunc(0.5 + v * ONE);
      });
      rows.push({ xmin, weights: fixed });
    }
    return rows;
  }

  function clip8(ss) {
    const v = Math.floor(ss / ONE);
    return v < 0 ? 0 : v > 255 ? 255 : v;
  }

  function horizontalPass(src, w, cols, first, rows) {
    const out = new Uint8Array(w * rows);
    const data = src.data;
    for (let y = 0; y < rows; y++) {
      const row = (y + first) * src.w;
      for (let xx = 0; xx < w; xx++) {
        const weights = cols[xx].weights;
        const start = row + cols[xx].xmin;
        let ss = ONE / 2;
        for (let x = 0; x < weights.length; x++) ss += data[start + x] * weights[x];
        out[y * w + xx] = clip8(ss);
      }
    }
    return image(w, rows, out);
  }

  function verticalPass(src, h, rows, shift) {
    const w = src.w;
    const out = new Uint8Array(w * h);
    const sums = new Float64Array(w); // integers: exact in any order
    for (let yy = 0; yy < h; yy++) {
      const { weights } = rows[yy];
      const ymin = rows[yy].xmin - shift;
      sums.fill(ONE / 2);
      for (let y = 0; y < weights.length; y++) {
        const k = weights[y];
        const row = (y + ymin) * w;
        for (let xx = 0; xx < w; xx++) sums[xx] += src.data[row + xx] * k;
      }
      for (let xx = 0; xx < w; xx++) out[yy * w + xx] = clip8(sums[xx]);
    }
    return image(w, h, out);
  }

  /**
   * Image.resize(size, LANCZOS) of an 8-bit image: two passes, each rounded to 8 bits.
   * Pillow before 13 always resamples rows first (only the rows the vertical pass reads);
   * Pillow 13 resamples columns first when the height shrinks by more than twice as many
   * pixels as the width. `verticalFirstRule` says which Pillow to follow.
   */
  function resizeLanczos(src, w, h, verticalFirstRule = true) {
    const needH = w !== src.w;
    const needV = h !== src.h;
    if (!needH && !needV) return image(src.w, src.h, Uint8Array.from(src.data));
    const shrinkV = src.h - h;
    const horizontalFirst = !(verticalFirstRule && shrinkV > 0 && shrinkV > (src.w - w) * 2);
    const cols = needH ? coefficients(src.w, w) : null;
    const rows = needV ? coefficients(src.h, h) : null;
    if (horizontalFirst) {
      const first = rows ? rows[0].xmin : 0;
      const last = rows ? rows[h - 1].xmin + rows[h - 1].weights.length : src.h;
      const mid = needH ? horizontalPass(src, w, cols, first, last - first) : src;
      return needV ? verticalPass(mid, h, rows, needH ? first : 0) : mid;
    }
    const mid = needV ? verticalPass(src, h, rows, 0) : src;
    return needH ? horizontalPass(mid, w, cols, 0, h) : mid;
  }

  /** ImageFilter.MedianFilter(3): the median of each 3x3 window, edge pixels repeated.
   * The 5th of 9 values, by a 19-comparison exchange network (Paeth's). */
  function median3(src) {
    const { w, h, data } = src;
    const out = new Uint8Array(w * h);
    const p = new Int32Array(9);
    const order = [1, 2, 4, 5, 7, 8, 0, 1, 3, 4, 6, 7, 1, 2, 4, 5, 7, 8, 0, 3, 5, 8, 4, 7,
                   3, 6, 1, 4, 2, 5, 4, 7, 4, 2, 6, 4, 4, 2]; // prettier-ignore
    for (let y = 0; y < h; y++) {
      const up = Math.max(y - 1, 0) * w;
      const mid = y * w;
      const down = Math.min(y + 1, h - 1) * w;
      for (let x = 0; x < w; x++) {
        const left = Math.max(x - 1, 0);
        const right = Math.min(x + 1, w - 1);
        p[0] = data[up + left];
        p[1] = data[up + x];
        p[2] = data[up + right];
        p[3] = data[mid + left];
        p[4] = data[mid + x];
        p[5] = data[mid + right];
        p[6] = data[down + left];
        p[7] = data[down + x];
        p[8] = data[down + right];
        for (let i = 0; i < order.length; i += 2) {
          const a = p[order[i]];
          const b = p[order[i + 1]];
          if (a > b) {
            p[order[i]] = b;
            p[order[i + 1]] = a;
          }
        }
        out[y * w + x] = p[4];
      }
    }
    return image(w, h, out);
  }

  // --- the steps of mnist_cnn.images.prepare_array ------------------------------------------

  function denoised(a, c) {
    const bytes = new Uint8Array(a.data.length); // plain loops: this is the large picture
    for (let i = 0; i < bytes.length; i++) bytes[i] = Math.min(Math.max(a.data[i], 0), 255);
    let img = image(a.w, a.h, bytes);
    const longest = Math.max(img.w, img.h);
    if (longest > c.working_size) {
      const scale = c.working_size / longest;
      const w = Math.max(1, roundHalfEven(img.w * scale));
      const h = Math.max(1, roundHalfEven(img.h * scale));
      img = resizeLanczos(img, w, h, c.pillow_major >= 13);
    }
    if (Math.min(img.w, img.h) >= 3) img = median3(img);
    return img;
  }

  function noInk(name) {
    return new PrepareError(`${name}: no ink found (the image is blank or has no contrast)`);
  }

  /** Light ink on a dark background, background 0, strongest ink 1, faint noise 0. */
  function normalise(gray, name, c) {
    let a = gray;
    if (median(border(a)) > 127) {
      const inverted = new Float32Array(a.data.length);
      for (let i = 0; i < inverted.length; i++) inverted[i] = 255 - a.data[i];
      a = image(a.w, a.h, inverted);
    }
    const d = denoised(a, c);
    const background = median(border(d));
    let ink = 0;
    for (const v of d.data) ink = Math.max(ink, v);
    if (ink - background < c.min_contrast) throw noInk(name);
    const bg = f32(background);
    const range = f32(ink - background);
    const floor = f32(c.ink_floor);
    const out = new Float32Array(d.data.length);
    for (let i = 0; i < out.length; i++) {
      const v = Math.min(Math.max(f32(f32(d.data[i] - bg) / range), 0), 1);
      out[i] = v < floor ? 0 : v;
    }
    return image(d.w, d.h, out);
  }

  function cropToInk(a, name) {
    let top = a.h;
    let bottom = -1;
    let left = a.w;
    let right = -1;
    for (let y = 0; y < a.h; y++) {
      for (let x = 0; x < a.w; x++) {
        if (a.data[y * a.w + x] > 0) {
          top = Math.min(top, y);
          bottom = Math.max(bottom, y);
          left = Math.min(left, x);
          right = Math.max(right, x);
        }
      }
    }
    if (bottom < 0) throw noInk(name);
    const w = right - left + 1;
    const h = bottom - top + 1;
    const out = new Float32Array(w * h);
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) out[y * w + x] = a.data[(y + top) * a.w + x + left];
    }
    return image(w, h, out);
  }

  /** Scale so the longer side is `box` pixels, keeping the aspect ratio, anti-aliased. */
  function fit(a, box, c) {
    const scale = box / Math.max(a.w, a.h);
    const w = Math.max(1, roundHalfEven(a.w * scale));
    const h = Math.max(1, roundHalfEven(a.h * scale));
    const bytes = Uint8Array.from(a.data, (v) => Math.trunc(f32(v * 255)));
    return resizeLanczos(image(a.w, a.h, bytes), w, h, c.pillow_major >= 13);
  }

  function paste(frame, size, a, top, left) {
    for (let y = 0; y < a.h; y++) {
      for (let x = 0; x < a.w; x++) frame[(y + top) * size + x + left] = a.data[y * a.w + x];
    }
    return frame;
  }

  function placeByCentreOfMass(a, size) {
    // numpy: a = uint8 / 255 in float32; cy = sum(y * a) (float64) / a.sum() (float32).
    const v = Float64Array.from(a.data, (k) => f32(k / 255));
    const ys = v.map((x, i) => Math.floor(i / a.w) * x);
    const xs = v.map((x, i) => (i % a.w) * x);
    const total = pairwiseSum(v, 0, v.length, f32);
    const cy = total > 0 ? pairwiseSum(ys, 0, ys.length, identity) / total : a.h / 2;
    const cx = total > 0 ? pairwiseSum(xs, 0, xs.length, identity) / total : a.w / 2;
    const top = Math.min(Math.max(roundHalfEven(size / 2 - cy), 0), size - a.h);
    const left = Math.min(Math.max(roundHalfEven(size / 2 - cx), 0), size - a.w);
    return paste(new Uint8Array(size * size), size, a, top, left);
  }

  function placeCentred(a, size) {
    const top = Math.floor((size - a.h) / 2);
    const left = Math.floor((size - a.w) / 2);
    return paste(new Uint8Array(size * size), size, a, top, left);
  }

  /** 28x28 with a dark background: already what the model expects. */
  function isMnistLike(gray, c) {
    return gray.w === c.size && gray.h === c.size && median(border(gray)) <= 127;
  }

  /**
   * Grayscale image {w, h, data: values in [0,255]} -> Uint8Array(size*size), MNIST-style:
   * the digit fit in 20x20 and placed by its centre of mass, or for style "fashion" the
   * item filling the frame. Throws PrepareError (with the message `predict` gives) when
   * there is no ink.
   */
  function prepare(gray, style = "digit", name = "image", contract = {}) {
    const c = { ...DEFAULTS, ...contract };
    if (isMnistLike(gray, c)) {
      return Uint8Array.from(gray.data, (v) => Math.min(Math.max(roundHalfEven(v), 0), 255));
    }
    const ink = cropToInk(normalise(gray, name, c), name);
    if (style === "fashion") return placeCentred(fit(ink, c.size, c), c.size);
    return placeByCentreOfMass(fit(ink, c.digit_box, c), c.size);
  }

  return { DEFAULTS, PrepareError, grayFromRGBA, prepare, resizeLanczos, median3 };
});
