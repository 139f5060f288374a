// AudioWorklet: gapless playback of the model's audio through a ring buffer.
// Main thread posts {type: "audio", samples: Float32Array at `inputRate`} per micro-turn;
// they are resampled to the context's native rate here. Playback starts `cushionMs`
// after audio first arrives (the cushion absorbs arrival jitter), fades out when the
// ring runs dry (an underrun; the cushion is waited again), and {type: "flush"} drops
// everything buffered (barge-in). Posts {type: "stats"} about every `statsMs`.
// It knows nothing about sockets or the protocol.
import { Resampler } from "./resampler.js";

const FADE_SAMPLES = 64; // ramp length at starts, underruns and flushes (no clicks)

class Player extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { inputRate = 16000, cushionMs = 150, capacityS = 4, statsMs = 100 } = options.processorOptions || {};
    this.resampler = new Resampler(inputRate, sampleRate);
    this.inputRate = inputRate;
    this.ring = new Float32Array(Math.ceil(capacityS * sampleRate));
    this.read = 0;
    this.avail = 0;
    this.cushion = Math.round((cushionMs / 1000) * sampleRate);
    this.state = "idle"; // idle -> cushion -> playing -> (underrun) idle
    this.startAt = 0;
    this.statsEvery = Math.round((statsMs / 1000) * sampleRate);
    this.sinceStats = 0;
    this.stats = { played: 0, underruns: 0, chunks: 0, dropped: 0, flushes: 0 };
    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  onMessage(msg) {
    if (msg.type === "audio") {
      this.stats.chunks += 1;
      this.write(this.resampler.process(msg.samples));
    } else if (msg.type === "flush") {
      this.avail = 0;
      this.state = "idle";
      this.stats.flushes += 1;
      this.resampler = new Resampler(this.inputRate, sampleRate);
    }
  }

  write(samples) {
    const cap = this.ring.length;
    if (samples.length > cap - this.avail) {
      // far behind: drop the oldest audio rather than grow latency without bound
      const drop = samples.length - (cap - this.avail);
      this.read = (this.read + drop) % cap;
      this.avail -= drop;
      this.stats.dropped += drop;
    }
    let w = (this.read + this.avail) % cap;
    for (let i = 0; i < samples.length; i++) {
      this.ring[w] = samples[i];
      w = w + 1 === cap ? 0 : w + 1;
    }
    this.avail += samples.length;
    if (this.state === "idle" && this.avail > 0) {
      this.state = "cushion";
      this.startAt = currentFrame + this.cushion;
    }
  }

  take(out, n, fadeIn, fadeOut) {
    const cap = this.ring.length;
    for (let i = 0; i < n; i++) {
      let g = 1;
      if (fadeIn && i < FADE_SAMPLES) g = i / FADE_SAMPLES;
      if (fadeOut && n - i <= FADE_SAMPLES) g = Math.min(g, (n - i) / FADE_SAMPLES);
      out[i] = this.ring[this.read] * g;
      this.read = this.read + 1 === cap ? 0 : this.read + 1;
    }
    this.avail -= n;
    this.stats.played += n;
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    out.fill(0);
    if (this.state === "cushion" && currentFrame >= this.startAt) {
      this.state = "playing";
      this.take(out, Math.min(out.length, this.avail), true, this.avail < out.length);
    } else if (this.state === "playing") {
      if (this.avail >= out.length) {
        this.take(out, out.length, false, false);
      } else {
        this.take(out, this.avail, false, true);
        this.stats.underruns += 1;
        this.state = "idle";
      }
    }
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    this.sinceStats += out.length;
    if (this.sinceStats >= this.statsEvery) {
      this.sinceStats = 0;
      const bufferedMs = (this.avail / sampleRate) * 1000;
      this.port.postMessage({ type: "stats", state: this.state, bufferedMs, sampleRate, ...this.stats });
    }
    return true;
  }
}

registerProcessor("player", Player);
