// The demo page: wires the connection, the audio worklets, the camera and the UI.
// Start opens the audio graph, the mic and the session, over WebRTC where the browser has
// it (the model's voice plays from the call's track, inside the echo canceller) and over
// the WebSocket otherwise or when the call fails (model audio goes to the playback
// worklet; the page says to wear headphones); the transcript has one line per response (marked when cut off) and
// one per user utterance (typed, or what the model heard); task.* events fill the task
// panel, each card titled by its question. The status row speaks to a visitor (state,
// microphone, whether the model is speaking, delay); developer figures (server tick from
// /metrics, playback buffer, underruns, turns) sit behind a toggle. Live figures are
// mirrored in `window.microturnDemo` for tests and curious users. Query parameters
// prefill the settings: url, key, cushion.
import { defaultUrl, RealtimeConnection } from "./realtime.js";
import { AudioEngine, Camera, deviceMessage, WIRE_RATE } from "./media.js";

const RTT_PROBE_MS = 2000; // how often an empty session.update measures the round trip
const METRICS_POLL_MS = 2000; // how often /metrics is read for the server's tick time
const RTC_STATS_MS = 500; // how often a WebRTC call's receive figures are read
const TRANSPORT_WORDS = { webrtc: "on (WebRTC)", websocket: "off: use headphones (WebSocket)" };
const FELL_BACK = "WebRTC could not connect, so this session runs over the WebSocket: wear headphones, or the " +
  "model may hear its own voice.";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
$("url").value = params.get("url") || defaultUrl(location);
$("key").value = params.get("key") || "";
$("cushion").value = params.get("cushion") || $("cushion").value;

const stats = {
  state: "idle",
  micPackets: 0,
  micLevel: 0,
  imagesSent: 0,
  turns: 0,
  lastSeq: -1,
  missedSeq: 0,
  textChars: 0,
  rttMs: null,
  tickMs: null,
  transport: null,
  rtc: null,
  player: null,
  errors: [],
};
window.microturnDemo = { stats };

let conn = null;
let audio = null;
let camera = null;
let cameraTimer = null;
let timers = [];
let rttSentAt = null;
let lastTickSample = null;
let busy = false;
let stopping = false;
// One transcript line per response (its assistant item), so a reply stays whole when a "you (heard)" line
// or a typed line lands in the middle of it.
const modelLines = new Map();
let deviceNotice = ""; // a device problem that should stay on screen once connected
let muted = false;
const STATE_WORDS = { idle: "not connected", connecting: "connecting…", live: "live: talk or type", closed: "ended" };

function show(text, kind = "error") {
  const el = $("message");
  el.textContent = text;
  el.className = kind;
  el.hidden = !text;
}

function setState(state) {
  stats.state = state;
  $("hud-state").textContent = STATE_WORDS[state] || state;
  $("start").disabled = state === "connecting" || state === "live";
  $("stop").disabled = !($("start").disabled);
  $("mute").disabled = state !== "live";
  if (state !== "live") {
    $("hud-model").textContent = "–";
    $("hud-buffer").textContent = "–";
    $("hud-transport").textContent = "–";
  }
}

function setMic(text) {
  $("hud-mic").textContent = text;
}

function transcriptLine(cls, text) {
  const span = document.createElement("span");
  span.className = cls;
  span.textContent = text;
  $("transcript").append(span);
  $("transcript").scrollTop = $("transcript").scrollHeight;
  return span;
}

function modelLine(itemId) {
  let line = modelLines.get(itemId);
  if (!line) {
    line = transcriptLine("model", "");
    line.append(Object.assign(document.createElement("span"), { className: "who", textContent: "model: " }));
    line.append(Object.assign(document.createElement("span"), { className: "said" }));
    modelLines.set(itemId, line);
  }
  return line;
}

function appendModelText(itemId, delta) {
  modelLine(itemId).querySelector(".said").textContent += delta;
  stats.textChars += delta.length;
  $("transcript").scrollTop = $("transcript").scrollHeight;
}

// A response that ended cancelled (you talked over it, or it was stopped) or incomplete is marked.
function endResponse(response) {
  $("hud-model").textContent = "listening";
  if (response.status === "completed") return;
  for (const item of response.output || []) {
    const line = modelLines.get(item.id);
    if (line && !line.classList.contains("cut")) {
      line.classList.add("cut");
      line.append(Object.assign(document.createElement("span"), { className: "note", textContent: " (cut off)" }));
    }
  }
}

// What the model heard you say (its own reading of its audio-in), one line per speech item; a stretch of
// noise the model read nothing from leaves no line.
const heardLines = new Map();
function appendHeardText(itemId, delta, final) {
  let line = heardLines.get(itemId);
  if (!line) {
    if (!(final || delta).trim()) return;
    line = transcriptLine("heard", "you (heard): ");
    heardLines.set(itemId, line);
  }
  if (final !== undefined && !final.trim()) {
    line.remove();
    heardLines.delete(itemId);
    return;
  }
  line.textContent = final === undefined ? line.textContent + delta : `you (heard): ${final}`;
  $("transcript").scrollTop = $("transcript").scrollHeight;
}

// A task card: its question as the title, its status, the streamed steps folded away, the answer once.
function taskCard(taskId, input) {
  let card = document.querySelector(`.task[data-task-id="${CSS.escape(taskId)}"]`);
  if (card) return card;
  card = document.createElement("div");
  card.className = "task running";
  card.dataset.taskId = taskId;
  card.innerHTML =
    '<div class="head"><span class="input"></span><span class="status">working…</span>' +
    '<button type="button">cancel</button></div><div class="result"></div>' +
    '<details><summary>steps</summary><div class="partial"></div></details>';
  card.querySelector(".input").textContent = input || "background task";
  card.title = taskId;
  card.querySelector("button").onclick = () => conn && conn.cancelTask(taskId);
  $("tasks-empty").hidden = true;
  $("tasks").prepend(card);
  return card;
}

const TASK_STATUS_WORDS = { done: "answered", error: "failed", cancelled: "cancelled" };
function finishTask(card, status, text) {
  card.className = `task ${status}`;
  card.querySelector(".status").textContent = TASK_STATUS_WORDS[status] || status;
  card.querySelector(".result").textContent = text;
  card.querySelector("button").remove();
}

function onTaskEvent(ev) {
  const card = taskCard(ev.task_id, ev.task && ev.task.input);
  if (ev.type === "task.delta") {
    card.querySelector(".partial").textContent += (ev.delta && ev.delta.text) || "";
  } else if (ev.type === "task.done") {
    finishTask(card, "done", (ev.result && ev.result.text) || "");
  } else if (ev.type === "task.error") {
    finishTask(card, "error", `${ev.error.code}: ${ev.error.message}`);
  } else if (ev.type === "task.cancelled") {
    finishTask(card, "cancelled", ev.reason || "cancelled");
  }
}

function onEvent(ev) {
  switch (ev.type) {
    case "session.created":
      setState("live");
      stats.transport = conn.transport;
      $("hud-transport").textContent = TRANSPORT_WORDS[conn.transport];
      $("hud-model").textContent = "listening";
      if (conn.fallbackReason) deviceNotice = [deviceNotice, FELL_BACK].filter(Boolean).join(" ");
      show(deviceNotice, "info");
      startProbes();
      break;
    case "session.updated":
      if (rttSentAt !== null) {
        stats.rttMs = performance.now() - rttSentAt;
        $("hud-rtt").textContent = `${stats.rttMs.toFixed(0)} ms`;
        rttSentAt = null;
      }
      break;
    case "response.created":
      $("hud-model").textContent = "speaking";
      break;
    case "response.done":
      endResponse(ev.response);
      break;
    case "response.output_text.delta":
    case "response.output_audio_transcript.delta":
      appendModelText(ev.item_id, ev.delta);
      break;
    case "conversation.item.input_audio_transcription.delta":
      appendHeardText(ev.item_id, ev.delta);
      break;
    case "conversation.item.input_audio_transcription.completed":
      appendHeardText(ev.item_id, "", ev.transcript);
      break;
    case "output_audio_buffer.cleared":
      audio.flush();
      break;
    case "session.go_away":
      show(`The server is shutting down; this session ends within ${Math.ceil(ev.time_left_ms / 1000)} s.`, "info");
      break;
    case "error":
      stats.errors.push(ev.error);
      if (ev.error.code === "server_busy") {
        busy = true;
        show("The server is busy: every session slot is taken. Try again in a moment.");
      } else {
        show(`Server error ${ev.error.code}: ${ev.error.message}`);
      }
      break;
    default:
      if (ev.type.startsWith("task.") && ev.task_id) onTaskEvent(ev);
  }
}

function onAudio(frame) {
  if (frame.kind !== 0x81) return;
  if (stats.lastSeq >= 0 && frame.seq > stats.lastSeq + 1) stats.missedSeq += frame.seq - stats.lastSeq - 1;
  stats.lastSeq = frame.seq;
  stats.turns += 1;
  $("hud-turns").textContent = `${stats.turns} micro-turns`;
  audio.play(frame.payload);
}

// The playback worklet plays only what the WebSocket brings; over WebRTC the call's figures fill the HUD.
function onPlayerStats(s) {
  stats.player = s;
  if (stats.transport === "webrtc") return;
  $("hud-buffer").textContent = `${s.bufferedMs.toFixed(0)} ms (${s.state})`;
  $("hud-underruns").textContent = s.underruns;
}

function onClose({ code, reason, opened }) {
  const wasLive = stats.state === "live";
  teardown();
  setState("closed");
  if (stopping || busy) return;
  if (!opened && stats.errors.length) return; // refused with a reason, already on screen
  if (!opened) show(`Cannot reach the server at ${$("url").value}.`);
  else if (code === 1013) show("The server is busy: every session slot is taken. Try again in a moment.");
  else if (wasLive || code !== 1000) show(`The connection to the server was lost (code ${code}${reason ? `: ${reason}` : ""}).`);
}

function startProbes() {
  timers.push(
    setInterval(() => {
      if (conn && rttSentAt === null) {
        rttSentAt = performance.now();
        conn.send({ type: "session.update", session: {} });
      }
    }, RTT_PROBE_MS),
  );
  pollMetrics();
  timers.push(setInterval(pollMetrics, METRICS_POLL_MS));
  if (conn.transport === "webrtc") timers.push(setInterval(pollCall, RTC_STATS_MS));
}

async function pollCall() {
  const s = conn && (await conn.mediaStats().catch(() => null));
  if (!s || stats.state !== "live") return;
  stats.rtc = s;
  $("hud-buffer").textContent = `${s.jitterBufferMs.toFixed(0)} ms (jitter buffer)`;
  $("hud-underruns").textContent = s.concealmentEvents;
  $("hud-turns").textContent = `${s.receivedS.toFixed(1)} s`;
}

async function pollMetrics() {
  const httpUrl = new URL($("url").value);
  httpUrl.protocol = httpUrl.protocol === "wss:" ? "https:" : "http:";
  httpUrl.pathname = "/metrics";
  httpUrl.search = "";
  try {
    const text = await (await fetch(httpUrl)).text();
    const read = (name) => Number((text.match(new RegExp(`^${name} (\\S+)$`, "m")) || [])[1]);
    const sample = { sum: read("microturn_tick_seconds_sum"), count: read("microturn_tick_seconds_count") };
    if (lastTickSample && sample.count > lastTickSample.count) {
      stats.tickMs = ((sample.sum - lastTickSample.sum) / (sample.count - lastTickSample.count)) * 1000;
      $("hud-tick").textContent = `${stats.tickMs.toFixed(1)} ms`;
    }
    lastTickSample = sample;
  } catch {
    $("hud-tick").textContent = "n/a";
  }
}

function showCamera(on) {
  $("preview").hidden = !on;
  $("camera-note").innerHTML = on
    ? "The model sees this view (a frame or two a second)."
    : "Camera off. Tick <strong>Camera</strong> to let the model see.";
}

async function toggleCamera() {
  if (!$("camera").checked) {
    clearInterval(cameraTimer);
    if (camera) camera.stop();
    showCamera(false);
    return;
  }
  camera = camera || new Camera($("preview"));
  try {
    await camera.start();
  } catch (err) {
    $("camera").checked = false;
    showCamera(false);
    show(deviceMessage("Camera", err));
    return;
  }
  showCamera(true);
  clearInterval(cameraTimer);
  cameraTimer = setInterval(async () => {
    const jpeg = await camera.grab();
    if (jpeg && conn && conn.isOpen && stats.state === "live") {
      conn.sendImage(jpeg);
      stats.imagesSent += 1;
      $("hud-frames").textContent = stats.imagesSent;
    }
  }, 1000 / Number($("fps").value));
}

async function start() {
  show("");
  deviceNotice = "";
  busy = stopping = false;
  stats.turns = stats.micPackets = stats.imagesSent = stats.missedSeq = 0;
  stats.lastSeq = -1;
  stats.transport = stats.rtc = null;
  stats.errors = [];
  lastTickSample = null;
  modelLines.clear();
  setState("connecting");
  audio = new AudioEngine(Number($("cushion").value), onMicPacket, onPlayerStats);
  try {
    await audio.start();
  } catch (err) {
    show(`Audio output could not start: ${err.message || err.name || err}`);
    setState("idle");
    return;
  }
  try {
    await audio.startMic();
    setMic(muted ? "muted" : "on");
  } catch (err) {
    deviceNotice = `${deviceMessage("Microphone", err)} You can still type.`;
    show(deviceNotice, "info");
    setMic("not available");
  }
  conn = new RealtimeConnection($("url").value, $("key").value.trim(), {
    onOpen: () => {},
    onEvent,
    onAudio,
    onClose,
  });
  if ($("camera").checked) toggleCamera();
}

// Muted, the mic sends silence: the session's clock keeps running and the model hears a quiet room.
function onMicPacket(pcm, level) {
  stats.micLevel = level;
  if (!conn || stats.state !== "live") return;
  conn.sendAudio(muted ? new ArrayBuffer(pcm.byteLength) : pcm, WIRE_RATE);
  stats.micPackets += 1;
  if (stats.micPackets % 5 === 0) $("hud-level").textContent = `${(20 * Math.log10(level + 1e-9)).toFixed(0)} dBFS`;
}

function toggleMute() {
  muted = !muted;
  $("mute").textContent = muted ? "Unmute mic" : "Mute mic";
  $("mute").setAttribute("aria-pressed", String(muted));
  if (audio && stats.state === "live") setMic(muted ? "muted" : "on");
}

function teardown() {
  timers.forEach(clearInterval);
  timers = [];
  clearInterval(cameraTimer);
  if (camera) camera.stop();
  $("camera").checked = false;
  showCamera(false);
  if (audio) audio.stop();
  rttSentAt = null;
  setMic("off");
  $("hud-level").textContent = "–";
  $("hud-rtt").textContent = "–";
}

function stop() {
  stopping = true;
  if (conn) conn.close();
  teardown();
  setState("closed");
}

function submitText(asTask) {
  const text = $("text").value.trim();
  if (!text) return;
  if (!conn || stats.state !== "live") {
    show("Start a session first.", "info");
    return;
  }
  if (asTask) {
    conn.createTask(text);
    transcriptLine("you", `you (task): ${text}`);
  } else {
    conn.sendText(text);
    transcriptLine("you", `you: ${text}`);
  }
  $("text").value = "";
}

// An example prompt: typed and sent (started first when needed); a camera one ticks the camera.
async function tryExample(button) {
  if (button.dataset.camera && !$("camera").checked) {
    $("camera").checked = true;
    if (stats.state === "live") toggleCamera();
  }
  if (stats.state !== "live") {
    if (stats.state !== "connecting") await start();
    await new Promise((resolve) => {
      const wait = setInterval(() => {
        if (stats.state !== "connecting") {
          clearInterval(wait);
          resolve();
        }
      }, 100);
    });
  }
  $("text").value = button.textContent;
  submitText(Boolean(button.dataset.task));
}

$("start").onclick = start;
$("stop").onclick = stop;
$("camera").onchange = toggleCamera;
$("fps").onchange = () => $("camera").checked && toggleCamera();
$("compose").onsubmit = (e) => {
  e.preventDefault();
  submitText(false);
};
$("ask").onclick = () => submitText(true);
$("mute").onclick = toggleMute;
for (const button of document.querySelectorAll("#examples .example")) button.onclick = () => tryExample(button);
setState("idle");
