// AudioWorklet: microphone capture. Runs at the context's native rate (whatever the
// browser picked), mixes to mono, resamples to `targetRate` in this thread and posts
// PCM16 packets of `packetMs` to the main thread (transferred ArrayBuffers), with
// the packet's RMS level. It knows nothing about sockets or the protocol.
import { Resampler } from "./resampler.js";

class MicCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { targetRate = 16000, packetMs = 40 } = options.processorOptions || {};
    this.resampler = new Resampler(sampleRate, targetRate);
    this.packetSamples = (targetRate * packetMs) / 1000;
    this.packet = new Int16Array(this.packetSamples);
    this.fill = 0;
    this.energy = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true;
    const mono = new Float32Array(channels[0].length);
    for (const ch of channels) for (let i = 0; i < mono.length; i++) mono[i] += ch[i] / channels.length;
    for (const s of this.resampler.process(mono)) {
      const v = Math.max(-1, Math.min(1, s));
      this.packet[this.fill++] = v < 0 ? v * 0x8000 : v * 0x7fff;
      this.energy += v * v;
      if (this.fill === this.packetSamples) {
        const level = Math.sqrt(this.energy / this.fill);
        this.port.postMessage({ pcm: this.packet.buffer, level }, [this.packet.buffer]);
        this.packet = new Int16Array(this.packetSamples); // the old buffer was transferred
        this.fill = 0;
        this.energy = 0;
      }
    }
    return true;
  }
}

registerProcessor("mic-capture", MicCapture);
