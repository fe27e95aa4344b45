"""tokenrelay over a real Valkey Cluster (3 masters + 3 replicas on loopback, from the
embedded package's binaries): every command of the data model, the core protocols
(ask, SSE with resume, Socket.IO, cancel, history), the relay's reading connections,
and a master killed mid-answer with 3 gateways and 2 workers."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ResponseError

from tests.conftest import running_gateway
from tests.support.failover import lose_last_entries
from tests.support.procs import Cluster as Processes
from tests.support.sockets import connected, wait_for
from tests.support.sse import Event, events
from tests.support.valkey_cluster import ValkeyCluster
from tokenrelay.connection import cluster_client
from tokenrelay.keys import WORKER_GROUP, Keys
from tokenrelay.services import make_store
from tokenrelay.settings import Settings
from tokenrelay.store import Store
from tokenrelay.wire import Entry, EntryType, Status

pytestmark = pytest.mark.cluster

WORDS = " ".join(f"w{n}" for n in range(60))


@pytest.fixture(scope="module")
def valkey_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyCluster]:
    cluster = ValkeyCluster(tmp_path_factory.mktemp("valkey-cluster")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster_settings(
    make_settings: Callable[..., Settings], valkey_cluster: ValkeyCluster
) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        return make_settings(redis_url=valkey_cluster.url, redis_cluster=True, **overrides)

    return make


@pytest.fixture
async def store(cluster_settings: Callable[..., Settings]) -> AsyncIterator[Store]:
    settings = cluster_settings()
    assert settings.redis_url is not None
    client = cluster_client(settings.redis_url, size=8, name="tokenrelay-test")
    try:
        yield make_store(settings, client)
    finally:
        await client.aclose()


async def test_request_shards_on_one_node(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    """TOKENRELAY_REQUEST_SHARDS on a single node: asks spread over the streams, one
    XREADGROUP covers them all, every answer arrives, and nothing is left queued."""
    settings = make_settings(request_shards=4)
    async with (
        running_gateway(settings) as url,
        httpx.AsyncClient(base_url=url, timeout=60) as client,
    ):
        answers = [
            (await client.post("/api/questions", json={"question": f"s{n}", "stream": False}))
            for n in range(12)
        ]
        assert all(r.status_code in (200, 201) for r in answers), answers[0].text
        records = [
            (await client.get(f"/api/questions/{r.json()['id']}")).json()["question"]
            for r in answers
        ]
    assert all(r["status"] == "done" for r in records)
    keys = Keys(settings.key_prefix, 4)
    assert len(set(keys.request_shards)) == 4
    assert [await redis.xlen(stream) for stream in keys.request_shards] == [0, 0, 0, 0]
    used = {keys.shard_of(r.json()["id"]) for r in answers}
    assert len(used) > 1


async def test_one_read_cannot_span_two_slots_even_on_one_node(
    valkey_cluster: ValkeyCluster,
) -> None:
    """Why the relay reads per shard: a cluster refuses a multi-key XREAD across slots."""
    cluster = RedisCluster.from_url(valkey_cluster.url, decode_responses=True)
    try:
        await cluster.initialize()
        first = "crossslot-a"
        node = cluster.get_node_from_key(first)
        assert node is not None
        other = next(
            key
            for key in (f"crossslot-{n}" for n in range(10_000))
            if cluster.keyslot(key) != cluster.keyslot(first)
            and cluster.get_node_from_key(key) == node
        )
        direct = Redis(host=node.host, port=int(node.port), decode_responses=True)
        try:
            with pytest.raises(ResponseError, match="same slot"):
                await direct.xread({first: "0", other: "0"})
        finally:
            await direct.aclose()
    finally:
        await cluster.aclose()


async def test_every_command_of_the_data_model(store: Store) -> None:
    shards = store.keys.shards
    assert shards == 16
    await store.ensure_group()
    records = [await store.ask("Redis", f"q{n}", owner="me") for n in range(40)]
    # Asks spread over the shards, and each question's keys share its shard's slot.
    used = {store.keys.shard_of(r.id) for r in records}
    assert len(used) > shards // 2
    for record in records[:5]:
        shard = store.keys.shard_of(record.id)
        slots = {
            store.keys.answer(record.id),
            store.keys.question(record.id),
            store.keys.request_shard(shard),
        }
        assert len({_slot(key) for key in slots}) == 1
        assert record.request_id.startswith(f"{shard}/")
    assert (await store.record(records[0].id)).status is Status.QUEUED
    history = await store.history(50, owner="me")
    assert {r.id for r in history} == {r.id for r in records}
    depth = await store.group.depth()
    assert (depth.pending, depth.waiting) == (0, 40)

    # Workers take them from every shard, one read per shard.
    reader = cluster_client(_url(store), size=16, name="tokenrelay-test-read")
    try:
        taken = []
        for shards_read in store.group.read_sets():
            assert len(shards_read) == 1
            taken += await store.group.read_new(reader, "w1", 100, 10, shards_read)
    finally:
        await reader.aclose()
    assert sorted(rid for rid, _ in taken) == sorted(r.request_id for r in records)
    await store.group.heartbeat("w1", [rid for rid, _ in taken])
    assert await store.group.deliveries(taken[0][0]) == 1
    assert len(await store.group.pending_of("w1")) == 40
    assert not await store.group.forget("w1")  # work pending: kept
    assert await store.group.release("w1") == 40
    reclaimed = await store.group.reclaim("w2", 1000, 100)
    assert len(reclaimed) == 40
    assert await store.group.deliveries(taken[0][0]) == 2
    assert await store.group.forget("w1")

    # One answer written, read, finished and acknowledged.
    record = records[0]
    epoch = await store.begin(record.id)
    request = next(fields for rid, fields in taken if rid == record.request_id)
    assert request["id"] == record.id
    await store.append(record.id, Entry(EntryType.START), epoch)
    ids = [await store.append(record.id, Entry(EntryType.CHUNK, f"c{n} "), epoch) for n in range(5)]
    await store.request_cancel(records[1].id)
    assert (await store.record(records[1].id)).cancel_requested
    await store.finish(record.id, Entry(EntryType.END), {}, record.request_id, "me", epoch)
    entries = await store.read_all(record.id)
    assert [e.entry_id for e in entries[1:6]] == ids
    assert entries[-1].type is EntryType.END
    assert (await store.record(record.id)).status is Status.DONE
    depth = await store.group.depth()
    assert (depth.pending, depth.waiting) == (39, 0)
    assert await store.lost(0, 1000) == []


async def test_ask_sse_resume_history_and_cancel(
    cluster_settings: Callable[..., Settings],
) -> None:
    settings = cluster_settings(scripted_text=WORDS, scripted_rate=100.0)
    async with (
        running_gateway(settings) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        qid = (await client.post("/api/questions", json={"question": "resume"})).json()["id"]
        path = f"/api/questions/{qid}/events"
        seen = await _read_until(client, path, 7)
        while seen[-1].event != "end":
            await asyncio.sleep(0.05)
            seen += await _read_until(client, path, 9, {"Last-Event-ID": seen[-1].id})
        ids = [e.id for e in seen]
        assert len(ids) == len(set(ids)), "an entry was delivered twice"
        assert "".join(e.data["text"] for e in seen if e.event == "chunk") == WORDS

        r = await client.post("/api/questions", json={"question": "whole", "stream": False})
        assert r.status_code in (200, 201), r.text
        history = (await client.get("/api/questions", params={"limit": 5})).json()
        assert qid in [q["id"] for q in history["questions"]]

        slow = (await client.post("/api/questions", json={"question": "long?"})).json()["id"]
        got: list[Event] = []
        async for e in events(client, f"/api/questions/{slow}/events"):
            got.append(e)
            if sum(1 for s in got if s.event == "chunk") == 3:
                assert (await client.post(f"/api/questions/{slow}/cancel")).status_code == 202
        assert got[-1].event == "cancelled"
        record = (await client.get(f"/api/questions/{slow}")).json()["question"]
        assert record["status"] == "cancelled"


async def test_socketio_seed_protocol(cluster_settings: Callable[..., Settings]) -> None:
    text = "Answers come through a Valkey Cluster."
    async with (
        running_gateway(cluster_settings(scripted_text=text)) as url,
        connected(url) as (asker, got),
    ):
        await asker.emit("askQuestion", {"topic": "Redis", "topicQuestion": "Cluster?"})
        await wait_for(lambda: any(str(d).startswith("<br/>;END:") for _, d in got), 30)
        chunks = [d for e, d in got if e == "chunk"]
        assert chunks[0].startswith("START:") and "".join(chunks[1:-1]) == text


async def test_gateway_reading_connections_do_not_grow_with_viewers(
    cluster_settings: Callable[..., Settings], valkey_cluster: ValkeyCluster
) -> None:
    # 10 tokens/s: every answer still streams (its readers open) when they are counted.
    settings = cluster_settings(scripted_rate=10.0, worker_concurrency=64)
    async with (
        running_gateway(settings) as url,
        httpx.AsyncClient(base_url=url, timeout=60) as client,
    ):
        qids = [
            (await client.post("/api/questions", json={"question": f"v{n}"})).json()["id"]
            for n in range(40)
        ]
        viewers = [
            asyncio.create_task(_whole(client, f"/api/questions/{qid}/events"))
            for qid in qids
            for _ in range(3)
        ]
        await asyncio.sleep(0.5)
        readers = await _gateway_readers(valkey_cluster)
        texts = await asyncio.gather(*viewers)
    assert 1 <= readers <= settings.request_shard_count  # 120 viewers, 40 answers
    assert all(t == Settings.model_fields["scripted_text"].default for t in texts)


async def test_a_slot_moved_mid_answer(
    cluster_settings: Callable[..., Settings], valkey_cluster: ValkeyCluster
) -> None:
    """Resharding while an answer streams: the slot of its shard moves to another master.
    The relay's reader and the worker's blocked read are told MOVED and reconnect to the
    new node; the writes follow MOVED/ASK. The viewer gets the whole answer, once, and
    questions asked after the move are answered too."""
    # Questions are asked below until two land in the moved slot (1 in 16 each): past the
    # default per-caller cap of 100 unfinished ones, that took more than 100 asks (~1%).
    settings = cluster_settings(
        scripted_text=WORDS,
        scripted_rate=20.0,
        worker_concurrency=128,
        max_queued_per_caller=1000,
    )
    async with (
        running_gateway(settings) as url,
        httpx.AsyncClient(base_url=url, timeout=60) as client,
    ):
        qid = (await client.post("/api/questions", json={"question": "moving"})).json()["id"]
        viewer = asyncio.create_task(_whole_events(client, f"/api/questions/{qid}/events"))
        await asyncio.sleep(0.4)
        keys = Keys(settings.key_prefix, settings.request_shard_count, cluster=True)
        slot = _slot(keys.answer(qid))
        here = _master_of(valkey_cluster, keys.answer(qid))
        there = next(n for n in valkey_cluster.primaries() if n.port != here.port)
        await asyncio.to_thread(valkey_cluster.move_slot, slot, there.port)
        assert _master_of(valkey_cluster, keys.answer(qid)).port == there.port
        async with asyncio.timeout(60):
            seen = await viewer
            ids = [e.id for e in seen]
            assert seen[-1].event == "end" and len(ids) == len(set(ids))
            assert _text(seen) == WORDS
            later: list[str] = []
            while sum(1 for q in later if _slot(keys.answer(q)) == slot) < 2:
                r = await client.post("/api/questions", json={"question": f"after{len(later)}"})
                later.append(r.json()["id"])
            texts = await asyncio.gather(
                *(_whole(client, f"/api/questions/{q}/events") for q in later)
            )
    assert all(t == WORDS for t in texts)  # two of them queued and answered in the moved slot


async def test_entries_a_failover_lost_are_written_again(
    cluster_settings: Callable[..., Settings], valkey_cluster: ValkeyCluster
) -> None:
    """Mid-answer, the stream on its master loses its last entries and the record goes back
    with them, as a promoted replica that never received them would look. The worker's
    next write finds out and writes them again with their ids: two SSE viewers, and one
    reading afterwards, get the text exactly once."""
    settings = cluster_settings(scripted_text=WORDS, scripted_rate=20.0)
    keys = Keys(settings.key_prefix, settings.request_shard_count, cluster=True)
    cluster = RedisCluster.from_url(valkey_cluster.url, decode_responses=True)
    try:
        async with (
            running_gateway(settings) as url,
            httpx.AsyncClient(base_url=url, timeout=60) as client,
        ):
            qid = (await client.post("/api/questions", json={"question": "lost"})).json()["id"]
            path = f"/api/questions/{qid}/events"
            viewers = [asyncio.create_task(_whole_events(client, path)) for _ in range(2)]
            async with asyncio.timeout(30):
                while await cluster.xlen(keys.answer(qid)) < 12:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.02)  # the viewers have had them
            dropped = await lose_last_entries(
                cast(Redis, cluster), keys.answer(qid), keys.question(qid), 3
            )
            async with asyncio.timeout(30):
                seen = await asyncio.gather(*viewers)
            seen.append(await _whole_events(client, path))
        raw: Any = await cluster.xrange(keys.answer(qid))
    finally:
        await cluster.aclose()
    assert set(dropped) <= {str(entry_id) for entry_id, _ in raw}
    for viewer in seen:
        ids = [e.id for e in viewer]
        assert viewer[-1].event == "end" and len(ids) == len(set(ids))
        assert _text(viewer) == WORDS


async def test_master_killed_mid_answer(
    valkey_cluster: ValkeyCluster, tmp_path: Path, redis_url: str
) -> None:
    """3 gateway processes, 2 worker processes; viewers on every gateway, one answer watched
    through all three; the master holding that answer is killed mid-answer. Every answer
    ends (never a hang), whole, each entry once, for every viewer."""
    del redis_url  # the single-node fixture is not used here
    prefix = f"t{secrets.token_hex(4)}:"
    env = {
        "TOKENRELAY_REDIS_CLUSTER": "true",
        "TOKENRELAY_PROVIDER": "scripted",
        "TOKENRELAY_SCRIPTED_TEXT": WORDS,
        "TOKENRELAY_SCRIPTED_RATE": "10",
        "TOKENRELAY_RECLAIM_IDLE_MS": "3000",
    }
    keys = Keys(prefix, 16, cluster=True)
    default = valkey_cluster.url  # every process's REDIS_URL: where its client sends PING
    async with Processes(tmp_path, default, prefix, env) as procs:
        gateways = [await procs.gateway(f"gateway{n}") for n in range(3)]
        for n in range(2):
            await procs.worker(f"worker{n}")
        async with httpx.AsyncClient(timeout=120) as client:
            # The watched answer lives on the node REDIS_URL names (more asks until one
            # does): killing it also takes the node /healthz pings away.
            qids: list[str] = []
            while len(qids) < 6 or (
                len(qids) < 40 and default not in await _masters(valkey_cluster, keys, qids)
            ):
                r = await client.post(
                    f"{gateways[len(qids) % 3].url}/api/questions", json={"question": "k"}
                )
                qids.append(r.json()["id"])
            masters = await _masters(valkey_cluster, keys, qids)
            watched = next(q for q, url in zip(qids, masters, strict=True) if url == default)
            others = [q for q in qids if q != watched][:5]
            viewers = [
                asyncio.create_task(
                    _whole_events(client, f"{g.url}/api/questions/{watched}/events")
                )
                for g in gateways
            ] + [
                asyncio.create_task(
                    _whole_events(client, f"{gateways[(n + 1) % 3].url}/api/questions/{qid}/events")
                )
                for n, qid in enumerate(others)
            ]
            await asyncio.sleep(1.0)  # about 10 of 22 chunks in
            victim = _master_of(valkey_cluster, keys.answer(watched))
            victim.kill()
            health = await _health_during(client, gateways[0].url, 5.0)
            async with asyncio.timeout(90):
                results = await asyncio.gather(*viewers)
    # /healthz answers within its 1 s ping timeout all through the failover (503 while the
    # node it pings is down), instead of waiting out the cluster client's retries.
    print("healthz during the failover:", _shown(health))
    assert max(s for _, s in health) < 1.8, health
    # Every viewer: the model's text exactly once, then `end`. A write whose reply was lost
    # with the master is applied once; one the master acknowledged but never passed on is
    # written again (numbered appends, docs/scaling.md).
    ends = [seen[-1].event for seen in results]
    assert ends == ["end"] * len(results), [_errors(seen) for seen in results]
    for seen in results:
        ids = [e.id for e in seen]
        assert len(ids) == len(set(ids)), "an entry was delivered twice"
        assert _text(seen) == WORDS, "the answer did not end whole"
    await asyncio.to_thread(valkey_cluster.wait_ok)


async def test_healthz_answers_while_the_masters_do_not(
    cluster_settings: Callable[..., Settings], valkey_cluster: ValkeyCluster
) -> None:
    """Masters that stop answering without closing their connections (SIGSTOP: a host gone,
    a partition; all of them, so whichever node the gateway's client pings is one, and no
    replica can be elected meanwhile): /healthz still answers within its 1 s ping timeout
    (503), and 200 again once they are back."""
    settings = cluster_settings()
    masters = valkey_cluster.primaries()
    async with (
        running_gateway(settings) as url,
        httpx.AsyncClient(base_url=url, timeout=60) as client,
    ):
        assert (await client.get("/healthz")).status_code == 200
        for node in masters:
            node.popen.send_signal(signal.SIGSTOP)
        try:
            health = await _health_during(client, url, 3.0)
        finally:
            for node in masters:
                node.popen.send_signal(signal.SIGCONT)
        print("healthz while the masters are stopped:", _shown(health))
        async with asyncio.timeout(30):
            while (await client.get("/healthz")).status_code != 200:
                await asyncio.sleep(0.2)
    await asyncio.to_thread(valkey_cluster.wait_ok)
    assert max(seconds for _, seconds in health) < 1.8, _shown(health)
    assert {status for status, _ in health} == {503}, _shown(health)


async def test_serve_in_cluster_mode(
    valkey_cluster: ValkeyCluster, tmp_path: Path, redis_url: str
) -> None:
    """`tokenrelay serve` with TOKENRELAY_REDIS_CLUSTER and REDIS_URL at one node: /healthz,
    an answer over SSE and over Socket.IO, and a worker process SIGKILLed mid-answer, whose
    requests the supervisor releases shard by shard so the other worker takes them at once
    (the reclaim idle time is a minute: only the release can make that quick)."""
    del redis_url  # the single-node fixture is not used here
    env = {
        "TOKENRELAY_REDIS_CLUSTER": "true",
        "TOKENRELAY_PROVIDER": "scripted",
        "TOKENRELAY_SCRIPTED_TEXT": WORDS,
        "TOKENRELAY_SCRIPTED_RATE": "20",
        "TOKENRELAY_RECLAIM_IDLE_MS": "60000",
    }
    prefix = f"t{secrets.token_hex(4)}:"
    async with Processes(tmp_path, valkey_cluster.url, prefix, env) as procs:
        serve = await procs.serve("serve", workers=2)
        async with httpx.AsyncClient(base_url=serve.url, timeout=60) as client:
            health = (await client.get("/healthz")).json()
            assert health["status"] == "ok" and health["worker_processes"] == 2, health

            qid = (await client.post("/api/questions", json={"question": "sse"})).json()["id"]
            assert await _whole(client, f"/api/questions/{qid}/events") == WORDS

            async with connected(serve.url) as (asker, got):
                await asker.emit("askQuestion", {"topic": "Redis", "topicQuestion": "sio?"})
                await wait_for(lambda: any(str(d).startswith("<br/>;END:") for _, d in got), 30)
            chunks = [d for e, d in got if e == "chunk"]
            assert chunks[0].startswith("START:") and "".join(chunks[1:-1]) == WORDS

            qids = [
                (await client.post("/api/questions", json={"question": f"k{n}"})).json()["id"]
                for n in range(6)
            ]
            viewers = [
                asyncio.create_task(_whole_events(client, f"/api/questions/{q}/events"))
                for q in qids
            ]
            await asyncio.sleep(1.0)  # every answer under way
            busy = await asyncio.to_thread(_busy_worker, valkey_cluster, prefix)
            victim = next(
                p
                for p in (await client.get("/healthz")).json()["processes"]
                if p["name"] == f"worker-{busy}"
            )
            os.kill(int(victim["pid"]), signal.SIGKILL)
            async with asyncio.timeout(30):
                results = await asyncio.gather(*viewers)
            assert "released" in serve.text(), serve.log_tail()
    for seen in results:
        assert seen[-1].event == "end" and _text(seen) == WORDS
        ids = [e.id for e in seen]
        assert len(ids) == len(set(ids)), "an entry was delivered twice"


# -- helpers ---------------------------------------------------------------------------


def _slot(key: str) -> int:
    from redis.crc import key_slot

    return key_slot(key.encode())


async def _masters(cluster: ValkeyCluster, keys: Keys, qids: list[str]) -> list[str]:
    """The URL of the master serving each question's answer."""

    def find() -> list[str]:
        from redis import RedisCluster as SyncCluster

        with SyncCluster.from_url(cluster.url) as client:
            nodes = [client.get_node_from_key(keys.answer(q)) for q in qids]
        return [f"redis://127.0.0.1:{node.port}" if node else "" for node in nodes]

    return await asyncio.to_thread(find)


async def _health_during(
    client: httpx.AsyncClient, url: str, seconds: float
) -> list[tuple[int, float]]:
    """/healthz every 0.2 s for `seconds`: (status, seconds it took) each time."""
    loop = asyncio.get_running_loop()
    out: list[tuple[int, float]] = []
    end = loop.time() + seconds
    while loop.time() < end:
        started = loop.time()
        status = (await client.get(f"{url}/healthz")).status_code
        out.append((status, loop.time() - started))
        await asyncio.sleep(0.2)
    return out


def _shown(health: list[tuple[int, float]]) -> str:
    return " ".join(f"{status}/{seconds:.2f}s" for status, seconds in health)


def _busy_worker(cluster: ValkeyCluster, prefix: str) -> int:
    """The index of a `serve` worker with requests pending (its consumer is named
    `...-w<index>-<random>`)."""
    from redis import RedisCluster as SyncCluster

    with SyncCluster.from_url(cluster.url, decode_responses=True) as client:
        for stream in Keys(prefix, 16, cluster=True).request_shards:
            summary: Any = client.xpending(stream, WORKER_GROUP)
            for row in summary.get("consumers") or []:
                if int(row["pending"]) > 0:
                    return int(str(row["name"]).rsplit("-w", 1)[1].split("-")[0])
    raise AssertionError("no worker has a request pending")


def _url(store: Store) -> str:
    node = store.redis.get_default_node()  # type: ignore[attr-defined]
    return f"redis://{node.host}:{node.port}"


def _master_of(cluster: ValkeyCluster, key: str) -> Any:
    from redis import RedisCluster as SyncCluster

    with SyncCluster.from_url(cluster.url) as client:
        node = client.get_node_from_key(key)
        assert node is not None
        port = int(node.port)
    return next(n for n in cluster.nodes if n.port == port)


async def _gateway_readers(cluster: ValkeyCluster) -> int:
    count = 0
    for node in cluster.primaries():
        client = Redis(port=node.port, decode_responses=True)
        try:
            rows: Any = await client.client_list()
            count += sum(1 for c in rows if c.get("name") == "tokenrelay-gateway-read")
        finally:
            await client.aclose()
    return count


async def _read_until(
    client: httpx.AsyncClient, url: str, k: int, headers: dict[str, str] | None = None
) -> list[Event]:
    seen: list[Event] = []
    async for e in events(client, url, headers):
        seen.append(e)
        if sum(1 for s in seen if s.event == "chunk") == k:
            break
    return seen


async def _whole(client: httpx.AsyncClient, url: str) -> str:
    return _text([e async for e in events(client, url)])


async def _whole_events(client: httpx.AsyncClient, url: str) -> list[Event]:
    """Every event to the end, reconnecting with Last-Event-ID when the stream breaks."""
    seen: list[Event] = []
    while not seen or seen[-1].event not in ("end", "error", "cancelled"):
        headers = {"Last-Event-ID": seen[-1].id} if seen else None
        try:
            async for e in events(client, url, headers):
                seen.append(e)
        except httpx.HTTPError:
            await asyncio.sleep(0.2)
    return seen


def _errors(seen: list[Event]) -> str:
    return "; ".join(str(e.data.get("text", "")) for e in seen if e.event == "error") or "-"


def _text(seen: list[Event]) -> str:
    parts: list[str] = []
    for e in seen:
        if e.event == "chunk":
            parts.append(e.data["text"])
        elif e.event == "restart":
            parts.clear()
    return "".join(parts)
