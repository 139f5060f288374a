// The page's side of the microturn protocol: one WebSocket, JSON events and binary frames.
// Binary frames are [kind u8][flags u8][seq u32 BE][pts_ms u32 BE][payload] (server/protocol.py,
// docs/architecture.md). A credential (API key or ek_ client secret) travels as the subprotocol
// `openai-insecure-api-key.<credential>`, the only way a browser can send one.
// It knows nothing about the page, audio devices or playback.

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

export class RealtimeConnection {
  // handlers: {onOpen(), onEvent(event), onAudio(frame), onClose({code, reason, opened})}
  constructor(url, credential, handlers) {
    this.handlers = handlers;
    this.seq = 0;
    this.eventCount = 0;
    this.sentAudioMs = 0;
    this.opened = false;
    const target = new URL(url);
    target.searchParams.set("audio", "binary");
    target.searchParams.set("task_events", "1");  // the task panel shows every background task
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

  get isOpen() {
    return this.ws.readyState === WebSocket.OPEN;
  }

  send(event) {
    if (!this.isOpen) return null;
    const eventId = event.event_id || `web_${++this.eventCount}`;
    this.ws.send(JSON.stringify({ ...event, event_id: eventId }));
    return eventId;
  }

  sendAudio(pcm16Buffer, rate) {
    if (!this.isOpen) return;
    this.ws.send(encodeFrame(KIND_INPUT_PCM16, this.seq++, this.sentAudioMs, pcm16Buffer));
    this.sentAudioMs += (pcm16Buffer.byteLength / 2 / rate) * 1000;
  }

  sendImage(jpegBuffer) {
    if (!this.isOpen) return;
    this.ws.send(encodeFrame(KIND_INPUT_JPEG, this.seq++, this.sentAudioMs, jpegBuffer));
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
    if (this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000, "client stopped");
  }
}
