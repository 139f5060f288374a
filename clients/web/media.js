// Devices and audio graph: the AudioContext at the browser's native rate, the mic
// capture worklet, the playback worklet, and the camera (canvas -> JPEG).
// Errors from getUserMedia are turned into plain-language messages for the page.
// It knows nothing about sockets or the protocol.

export const WIRE_RATE = 16000; // mic audio sent and model audio received, Hz
const PACKET_MS = 40; // mic packet size
const JPEG_QUALITY = 0.7;
const CAMERA_WIDTH = 320;
const CAMERA_HEIGHT = 240;
// How long AudioContext.resume() may take. Firefox never settles it when no output device can be
// opened (no sound card or sound server), and a browser that blocks autoplay may hold it too.
const RESUME_TIMEOUT_MS = 5000;

// `promise`, or a TimeoutError DOMException carrying `message` after `ms`.
function withTimeout(promise, ms, message) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new DOMException(message, "TimeoutError")), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

export function deviceMessage(what, error) {
  const name = error && error.name;
  if (name === "NotAllowedError" || name === "SecurityError")
    return `${what} access was denied. Allow it in the browser's site settings and start again.`;
  if (name === "NotFoundError" || name === "OverconstrainedError") return `No ${what.toLowerCase()} was found.`;
  if (name === "NotReadableError") return `The ${what.toLowerCase()} is in use by another application.`;
  if (!navigator.mediaDevices) return `${what} needs a secure page (https or localhost).`;
  return `${what} could not be opened (${name || error}).`;
}

export class AudioEngine {
  // onMicPacket(pcm16 ArrayBuffer, level), onPlayerStats(stats)
  constructor(cushionMs, onMicPacket, onPlayerStats) {
    this.cushionMs = cushionMs;
    this.onMicPacket = onMicPacket;
    this.onPlayerStats = onPlayerStats;
    this.ctx = null;
    this.player = null;
    this.mic = null;
    this.stream = null;
  }

  // Rejects (and closes the context) when the audio graph cannot start; a TimeoutError when the browser
  // does not start audio output in time, its message saying so in plain language.
  async start() {
    this.ctx = new AudioContext({ latencyHint: "interactive" });
    try {
      await this.buildGraph();
      await withTimeout(
        this.ctx.resume(),
        RESUME_TIMEOUT_MS,
        `The browser did not start audio output within ${RESUME_TIMEOUT_MS / 1000} s ` +
          "(no sound output device, or autoplay is blocked for this site).",
      );
    } catch (err) {
      const ctx = this.ctx;
      this.ctx = this.player = null;
      ctx.close().catch(() => {});
      throw err;
    }
  }

  async buildGraph() {
    const base = new URL(".", import.meta.url);
    await this.ctx.audioWorklet.addModule(new URL("player-worklet.js", base));
    await this.ctx.audioWorklet.addModule(new URL("mic-worklet.js", base));
    this.player = new AudioWorkletNode(this.ctx, "player", {
      numberOfInputs: 0,
      outputChannelCount: [1],
      processorOptions: { inputRate: WIRE_RATE, cushionMs: this.cushionMs },
    });
    this.player.port.onmessage = (e) => this.onPlayerStats(e.data);
    this.player.connect(this.ctx.destination);
  }

  async startMic() {
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    });
    const source = this.ctx.createMediaStreamSource(this.stream);
    this.mic = new AudioWorkletNode(this.ctx, "mic-capture", {
      numberOfOutputs: 0,
      processorOptions: { targetRate: WIRE_RATE, packetMs: PACKET_MS },
    });
    this.mic.port.onmessage = (e) => this.onMicPacket(e.data.pcm, e.data.level);
    source.connect(this.mic);
  }

  play(pcm16Buffer) {
    if (!this.player) return; // stopped: a frame still in flight is dropped
    const pcm = new Int16Array(pcm16Buffer);
    const samples = new Float32Array(pcm.length);
    for (let i = 0; i < pcm.length; i++) samples[i] = pcm[i] / 32768;
    this.player.port.postMessage({ type: "audio", samples }, [samples.buffer]);
  }

  flush() {
    if (this.player) this.player.port.postMessage({ type: "flush" });
  }

  get sampleRate() {
    return this.ctx ? this.ctx.sampleRate : null;
  }

  // Safe to call again while a stop is under way (Stop, then the socket's close, both tear down): the
  // fields are cleared first, so the context is closed once (Firefox rejects a second close()).
  async stop() {
    const { ctx, mic, stream } = this;
    this.ctx = this.player = this.mic = this.stream = null;
    if (stream) stream.getTracks().forEach((t) => t.stop());
    if (mic) mic.port.onmessage = null;
    if (ctx && ctx.state !== "closed") await ctx.close();
  }
}

export class Camera {
  constructor(video) {
    this.video = video;
    this.canvas = document.createElement("canvas");
    this.canvas.width = CAMERA_WIDTH;
    this.canvas.height = CAMERA_HEIGHT;
    this.stream = null;
  }

  async start() {
    if (this.running) return;
    this.stream = await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: CAMERA_WIDTH }, height: { ideal: CAMERA_HEIGHT } },
    });
    this.video.srcObject = this.stream;
    await this.video.play();
  }

  get running() {
    return this.stream !== null;
  }

  // The current frame as JPEG bytes, or null before the first frame is decoded.
  async grab() {
    if (!this.running || this.video.readyState < HTMLMediaElement.HAVE_CURRENT_DATA) return null;
    this.canvas.getContext("2d").drawImage(this.video, 0, 0, CAMERA_WIDTH, CAMERA_HEIGHT);
    const blob = await new Promise((resolve) => this.canvas.toBlob(resolve, "image/jpeg", JPEG_QUALITY));
    return blob ? blob.arrayBuffer() : null;
  }

  stop() {
    if (this.stream) this.stream.getTracks().forEach((t) => t.stop());
    this.video.srcObject = null;
    this.stream = null;
  }
}
