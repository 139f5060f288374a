// The page's side of the microturn protocol over one of two transports. WebSocket: JSON events and binary
// frames on one socket. WebRTC (POST /v1/realtime/calls, server/webrtc.py): the microphone and the
// model's voice as Opus tracks of an RTCPeerConnection, so the browser's echo cancellation covers the
// model's voice, and the same JSON events on the "oai-events" data channel; a call that cannot be set
// up falls back to the WebSocket. Binary frames are [kind u8][flags u8][seq u32 BE][pts_ms u32 BE]
// [payload] (server/protocol.py, docs/architecture.md). A credential (API key or ek_ client secret)
// travels as the subprotocol `openai-insecure-api-key.<credential>` on the WebSocket (the only way a
// browser can send one there) and as `Authorization: Bearer` on the WebRTC offer.
// It knows nothing about the page; over WebRTC it opens its own microphone track and plays the remote
// track in an <audio> element (WebAudio playback would escape the echo canceller).

export const KIND_INPUT_PCM16 = 0x01;
export const KIND_INPUT_JPEG = 0x02;
export const KIND_OUTPUT_PCM16 = 0x81;
const HEADER_BYTES = 10;
const U32 = 2 ** 32;

export function encodeFrame(kind, seq, ptsMs, payload, flags = 0) {
  const body = new Uint8Array(payload);
  const frame = new Uint8Array(HEADER_BYTES + body.length);
  const view = new DataView(frame.buffer);
  view.setUint8(0, kind);
  view.setUint8(1, flags);
  view.setUint32(2, seq % U32);
  view.setUint32(6, Math.floor(ptsMs) % U32);
  frame.set(body, HEADER_BYTES);
  return frame.buffer;
}

export function decodeFrame(buffer) {
  const view = new DataView(buffer);
  return {
    kind: view.getUint8(0),
    flags: view.getUint8(1),
    seq: view.getUint32(2),
    ptsMs: view.getUint32(6),
    payload: buffer.slice(HEADER_BYTES),
  };
}

export function defaultUrl(location) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/v1/realtime`;
}

export const EVENTS_CHANNEL = "oai-events";
const ICE_GATHER_MS = 2000; // the server takes no trickled candidates: the offer carries them all
const RTC_OPEN_MS = 8000; // offer posted -> data channel open, or the call falls back to the WebSocket
const MIC_CONSTRAINTS = {
  echoCancellation: true,
  noiseSuppression: true,
  autoGainControl: true,
  channelCount: 1,
};

// "webrtc" or "websocket": the page's ?transport= when it names one, else WebRTC where the browser has
// it (its echo canceller covers the model's voice only on a peer connection's track).
export function transportPreference(location) {
  const asked = location ? new URLSearchParams(location.search).get("transport") : null;
  if (asked === "webrtc" || asked === "websocket") return asked;
  return typeof RTCPeerConnection === "function" ? "webrtc" : "websocket";
}

// ws(s)://host/v1/realtime -> http(s)://host/v1/realtime/calls
export function callsUrl(wsUrl) {
  const url = new URL(wsUrl);
  url.protocol = url.protocol === "wss:" ? "https:" : "http:";
  url.pathname = `${url.pathname.replace(/\/$/, "")}/calls`;
  url.search = "";
  url.searchParams.set("task_events", "1");
  return url;
}

// The server's own "no" to a call (busy, bad credential, draining): the WebSocket would be refused the
// same way, so it is reported, not retried there. A 400 is about the offer, a WebRTC problem: that falls
// back. closeCode is what the WebSocket would have closed with.
const REFUSAL_CLOSE_CODES = { 401: 1008, 403: 1008, 503: 1013 };
class CallRefused extends Error {
  constructor(status, error) {
    super(error.message || `the server answered the offer with ${status}`);
    this.error = error;
    this.closeCode = REFUSAL_CLOSE_CODES[status] || 1011;
  }
}

async function refusal(reply) {
  if (reply.status === 400) return null;
  try {
    const body = await reply.json();
    return body && body.error && body.error.code ? new CallRefused(reply.status, body.error) : null;
  } catch {
    return null;
  }
}

function allZero(buffer) {
  const samples = new Int16Array(buffer);
  for (let i = 0; i < samples.length; i++) if (samples[i] !== 0) return false;
  return true;
}

function iceGathered(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState === "complete") resolve();
    };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, timeoutMs);
  });
}

export class RealtimeConnection {
  // handlers: {onOpen(), onEvent(event), onAudio(frame), onClose({code, reason, opened})}
  // options.transport: "webrtc" or "websocket" (default: transportPreference(location))
  constructor(url, credential, handlers, options = {}) {
    this.handlers = handlers;
    this.url = url;
    this.credential = credential;
    this.seq = 0;
    this.eventCount = 0;
    this.sentAudioMs = 0;
    this.opened = false;
    this.stopped = false;
    this.ws = this.pc = this.channel = this.micStream = this.player = null;
    const wanted = options.transport || transportPreference(globalThis.location);
    this.transport = wanted === "webrtc" && typeof RTCPeerConnection === "function" ? "webrtc" : "websocket";
    globalThis.microturnRealtime = this; // for tests and the console: which transport carries the session
    if (this.transport === "webrtc") {
      this.startWebRTC().catch((err) => {
        if (this.stopped || this.opened) return;
        if (err instanceof CallRefused) {
          this.teardownWebRTC();
          this.handlers.onEvent({ type: "error", error: err.error });
          this.handlers.onClose({ code: err.closeCode, reason: err.error.code, opened: false });
          return;
        }
        console.warn(`WebRTC call failed (${err.message || err}); using the WebSocket`);
        this.fallbackReason = String(err.message || err);
        this.teardownWebRTC();
        this.transport = "websocket";
        this.startWebSocket();
      });
    } else {
      this.startWebSocket();
    }
  }

  startWebSocket() {
    const handlers = this.handlers;
    const target = new URL(this.url);
    target.searchParams.set("audio", "binary");
    target.searchParams.set("task_events", "1"); // the task panel shows every background task
    const credential = this.credential;
    const protocols = credential ? ["realtime", `openai-insecure-api-key.${credential}`] : ["realtime"];
    this.ws = new WebSocket(target, protocols);
    this.ws.binaryType = "arraybuffer";
    this.ws.onopen = () => {
      this.opened = true;
      handlers.onOpen();
    };
    this.ws.onmessage = (e) => {
      if (typeof e.data === "string") handlers.onEvent(JSON.parse(e.data));
      else handlers.onAudio(decodeFrame(e.data));
    };
    this.ws.onclose = (e) => handlers.onClose({ code: e.code, reason: e.reason, opened: this.opened });
  }

  async startWebRTC() {
    const pc = (this.pc = new RTCPeerConnection());
    const channel = (this.channel = pc.createDataChannel(EVENTS_CHANNEL));
    channel.binaryType = "arraybuffer";
    const transceiver = pc.addTransceiver("audio", { direction: "sendrecv" });
    pc.ontrack = (e) => {
      const player = (this.player = new Audio());
      player.autoplay = true;
      player.srcObject = e.streams[0] || new MediaStream([e.track]);
      player.play().catch(() => {}); // autoplay: the page starts on a click
    };
    try {
      this.micStream = await navigator.mediaDevices.getUserMedia({ audio: MIC_CONSTRAINTS });
      await transceiver.sender.replaceTrack(this.micStream.getAudioTracks()[0]);
    } catch (err) {
      // no microphone: the call goes on and the model hears nothing, as over the WebSocket
    }
    const open = new Promise((resolve, reject) => {
      channel.onopen = resolve;
      const late = () => reject(new Error(`the data channel did not open within ${RTC_OPEN_MS / 1000} s`));
      setTimeout(late, RTC_OPEN_MS);
    });
    await pc.setLocalDescription(await pc.createOffer());
    await iceGathered(pc, ICE_GATHER_MS);
    const headers = { "Content-Type": "application/sdp" };
    if (this.credential) headers.Authorization = `Bearer ${this.credential}`;
    const reply = await fetch(callsUrl(this.url), { method: "POST", body: pc.localDescription.sdp, headers });
    if (reply.status !== 201) {
      throw (await refusal(reply)) || new Error(`the server answered the offer with ${reply.status}`);
    }
    await pc.setRemoteDescription({ type: "answer", sdp: await reply.text() });
    this.callUrl = reply.headers.get("Location");
    channel.onmessage = (e) => {
      if (typeof e.data === "string") this.handlers.onEvent(JSON.parse(e.data));
    };
    channel.onclose = () => this.ended(1000, "");
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === "failed") this.ended(1006, "the WebRTC connection failed");
    };
    await open;
    if (this.stopped) return;
    this.opened = true;
    this.handlers.onOpen();
  }

  ended(code, reason) {
    if (this.closeReported) return;
    this.closeReported = true;
    this.teardownWebRTC();
    if (this.opened || this.stopped) this.handlers.onClose({ code, reason, opened: this.opened });
  }

  teardownWebRTC() {
    if (this.micStream) this.micStream.getTracks().forEach((t) => t.stop());
    if (this.player) this.player.srcObject = null;
    if (this.channel) this.channel.onclose = this.channel.onmessage = null;
    if (this.pc) {
      this.pc.onconnectionstatechange = null;
      this.pc.close();
    }
    this.pc = this.channel = this.micStream = this.player = null;
  }

  // The model's voice as the browser receives it over WebRTC (the remote track's inbound-rtp stats), or
  // null on the WebSocket, whose frames the page counts itself. jitterBufferMs is the mean delay the
  // browser's jitter buffer adds; concealmentEvents counts the times it ran dry and filled in sound.
  async mediaStats() {
    if (this.transport !== "webrtc" || !this.pc) return null;
    for (const s of (await this.pc.getStats()).values()) {
      if (s.type !== "inbound-rtp" || s.kind !== "audio") continue;
      const emitted = s.jitterBufferEmittedCount || 0;
      return {
        packetsReceived: s.packetsReceived || 0,
        packetsLost: s.packetsLost || 0,
        jitterBufferMs: emitted ? (1000 * (s.jitterBufferDelay || 0)) / emitted : 0,
        concealmentEvents: s.concealmentEvents || 0,
        receivedS: s.totalSamplesDuration || 0,
        energy: s.totalAudioEnergy || 0,
      };
    }
    return null;
  }

  get isOpen() {
    if (this.transport === "webrtc") return this.opened && this.channel?.readyState === "open";
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  // the socket or the data channel: both take strings and ArrayBuffers
  get wire() {
    return this.transport === "webrtc" ? this.channel : this.ws;
  }

  send(event) {
    if (!this.isOpen) return null;
    const eventId = event.event_id || `web_${++this.eventCount}`;
    this.wire.send(JSON.stringify({ ...event, event_id: eventId }));
    return eventId;
  }

  // Over WebRTC the microphone goes on its track; a muted page (all-zero packets) mutes the track.
  sendAudio(pcm16Buffer, rate) {
    if (!this.isOpen) return;
    if (this.transport === "webrtc") {
      const track = this.micStream && this.micStream.getAudioTracks()[0];
      if (track) track.enabled = !allZero(pcm16Buffer);
    } else {
      this.ws.send(encodeFrame(KIND_INPUT_PCM16, this.seq++, this.sentAudioMs, pcm16Buffer));
    }
    this.sentAudioMs += (pcm16Buffer.byteLength / 2 / rate) * 1000;
  }

  sendImage(jpegBuffer) {
    if (!this.isOpen) return;
    this.wire.send(encodeFrame(KIND_INPUT_JPEG, this.seq++, this.sentAudioMs, jpegBuffer));
  }

  sendText(text) {
    const item = { type: "message", role: "user", content: [{ type: "input_text", text }] };
    return this.send({ type: "conversation.item.create", item });
  }

  createTask(input, scheduling = "when_idle") {
    return this.send({ type: "task.create", task: { input, scheduling } });
  }

  cancelTask(taskId) {
    return this.send({ type: "task.cancel", task_id: taskId });
  }

  close() {
    this.stopped = true;
    if (this.transport === "webrtc") this.ended(1000, "client stopped");
    else if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000, "client stopped");
  }
}
