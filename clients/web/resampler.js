// Streaming band-limited resampler (Hann-windowed sinc), shared by the audio worklets.
// Contract: `process(Float32Array)` takes any number of input samples at `inRate` and
// returns the output samples at `outRate` that are ready; state carries across calls,
// so chunk edges are seamless. It knows nothing about Web Audio, sockets or the server.

const HALF_TAPS = 16; // kernel half-width in output-rate periods (quality vs. cost)
const PASSBAND = 0.95; // cutoff as a share of the lower Nyquist rate (leaves room for the transition band)

export class Resampler {
  constructor(inRate, outRate) {
    this.step = inRate / outRate; // input samples advanced per output sample
    this.cutoff = Math.min(1, outRate / inRate) * PASSBAND; // in cycles per input sample x2
    this.half = Math.ceil(HALF_TAPS / Math.min(1, outRate / inRate)); // kernel half-width, input samples
    this.passthrough = inRate === outRate;
    this.buf = new Float32Array(this.half); // history: starts as silence
    this.t = this.half; // position of the next output sample in `buf`
  }

  process(input) {
    if (this.passthrough) return Float32Array.from(input);
    const buf = new Float32Array(this.buf.length + input.length);
    buf.set(this.buf);
    buf.set(input, this.buf.length);
    const { half, cutoff, step } = this;
    const count = Math.max(0, Math.ceil((buf.length - half - this.t) / step));
    const out = new Float32Array(count);
    let t = this.t;
    for (let n = 0; n < count; n++, t += step) {
      const center = Math.floor(t);
      let acc = 0;
      for (let k = center - half + 1; k <= center + half; k++) {
        const x = t - k;
        const arg = Math.PI * cutoff * x;
        const sinc = arg === 0 ? 1 : Math.sin(arg) / arg;
        const win = 0.5 + 0.5 * Math.cos((Math.PI * x) / half);
        acc += (k >= 0 && k < buf.length ? buf[k] : 0) * sinc * win;
      }
      out[n] = acc * cutoff;
    }
    const keepFrom = Math.max(0, Math.floor(t) - half);
    this.buf = buf.slice(keepFrom);
    this.t = t - keepFrom;
    return out;
  }
}
