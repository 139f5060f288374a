"""The Python SDK and `microturn talk` against a real server (uvicorn on loopback, tiny engine)."""

from __future__ import annotations

import asyncio
import json
import math

import cv2
import numpy as np
import pytest
import soundfile as sf
from helpers.realserver import ServerThread, warm_engine

from microturn.cli import main as cli_main
from microturn.clients.python import AudioChunk, ConnectError, ServerBusy, connect, connect_with_retry
from microturn.clients.python.cli import stream_audio
from microturn.model.engine import Engine
from microturn.model.resample import resample
from microturn.model.slots import TURN_SAMPLES
from microturn.server import server_events as ev
from microturn.server.settings import ServerSettings

SLOTS = 2


@pytest.fixture(scope="module")
def engine() -> Engine:
    return warm_engine(SLOTS)


@pytest.fixture
def server(engine):
    with ServerThread(ServerSettings(max_sessions=SLOTS), engine) as srv:
        yield srv


async def test_sdk_streams_audio_image_text_and_gets_typed_events(server, speech_16k):
    client = await connect(server.ws_url)
    assert client.session_info["audio"]["output"]["transport"] == "binary"
    ok, jpeg = cv2.imencode(".jpg", np.full((48, 64, 3), 90, np.uint8))
    assert ok
    await client.send_image(jpeg.tobytes())
    await client.send_text("hello there")
    sender = asyncio.create_task(stream_audio(client, speech_16k[: 2 * 16_000]))
    chunks: list[AudioChunk] = []
    kinds: set[type] = set()
    async for event in client:
        kinds.add(type(event))
        assert not isinstance(event, ev.ErrorEvent), event
        if isinstance(event, AudioChunk):
            chunks.append(event)
        if len(chunks) >= 12 and ev.OutputAudioTranscriptDelta in kinds:
            break
    await sender
    await client.close()
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert all(c.samples.shape == (TURN_SAMPLES,) and c.rate == 16_000 for c in chunks)
    assert {ev.ResponseCreated, ev.ConversationItemAdded, ev.InputAudioBufferSpeechStarted} <= kinds
    assert client.close_code == 1000


async def test_sdk_reads_like_the_openai_realtime_connection(server):
    """`async with connect(url) as conn` without an extra await; namespaced client events with OpenAI's names
    and fields, answered by typed events; microturn's tasks beside them."""
    async with connect(server.ws_url, binary_audio=False) as conn:
        await conn.session.update(session={"instructions": "Be brief.", "output_modalities": ["text"]})
        item = await conn.conversation.item.create(
            item={"id": "item_mine", "type": "message", "role": "user",
                  "content": [{"type": "input_text", "text": "hello"}]})
        await conn.response.create(response={"metadata": {"tag": "t1"}})
        await conn.conversation.item.retrieve(item_id="item_mine")
        await conn.task.create("what is 6 * 7?", scheduling="silent")
        seen: dict[str, ev.ServerEvent] = {}
        async for event in conn:
            assert not isinstance(event, ev.ErrorEvent), (item, event)
            seen.setdefault(event.type, event)
            if {"session.updated", "conversation.item.retrieved", "task.done"} <= seen.keys():
                break
    assert isinstance(seen["session.updated"], ev.SessionUpdated)
    assert seen["session.updated"].session["output_modalities"] == ["text"]
    assert isinstance(seen["conversation.item.retrieved"], ev.ConversationItemRetrieved)
    assert seen["conversation.item.retrieved"].item["id"] == "item_mine"
    assert "42" in seen["task.done"].result["text"]
    assert conn.close_code == 1000


async def test_sdk_connection_errors_are_its_own():
    with pytest.raises(ConnectError) as refused:
        await connect("ws://127.0.0.1:9/v1/realtime", open_timeout=2)
    assert refused.value.code == "unreachable"
    with pytest.raises(ConnectError) as wrong:
        await connect("http://127.0.0.1:9/v1/realtime")
    assert wrong.value.code == "invalid_url"


async def test_busy_server_raises_and_retry_gets_in_once_a_slot_frees(engine):
    with ServerThread(ServerSettings(max_sessions=1), engine) as srv:
        first = await connect(srv.ws_url)
        with pytest.raises(ServerBusy) as busy:
            await connect(srv.ws_url)
        assert busy.value.code == "server_busy"
        asyncio.get_running_loop().call_later(0.3, lambda: asyncio.ensure_future(first.close()))
        second = await connect_with_retry(srv.ws_url, attempts=8, backoff_s=0.1)
        assert second.session_info["id"].startswith("sess_")
        await second.close()


def test_talk_writes_the_reply_at_16k_for_input_plus_tail_and_prints_task_events(
    server, speech_16k, tmp_path, capsys
):
    stereo_22k = resample(speech_16k[: int(1.5 * 16_000)], 16_000, 22_050)
    wav_in, wav_out = tmp_path / "in.wav", tmp_path / "out.wav"
    sf.write(wav_in, np.stack([stereo_22k, 0.5 * stereo_22k], axis=1), 22_050)
    tail = 1.0
    code = cli_main(
        [
            "talk",
            "--url",
            server.ws_url,
            "--wav",
            str(wav_in),
            "--out",
            str(wav_out),
            "--text",
            "hi",
            "--tail",
            str(tail),
            "--task",
            "what is 17 times 23?",
        ]
    )
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    info = sf.info(wav_out)
    input_s = len(stereo_22k) / 22_050
    turns = math.ceil((input_s + tail) / 0.2)
    assert info.samplerate == 16_000 and info.channels == 1
    assert summary["turns"] == turns and info.frames == turns * TURN_SAMPLES
    assert summary["errors"] == 0 and abs(summary["input_s"] - input_s) < 0.01
    assert any(" text " in line for line in lines[:-1]) == bool(summary["text"])
    assert summary["tasks_ended"] == 1
    assert any("task.done" in line and "391" in line for line in lines[:-1])
