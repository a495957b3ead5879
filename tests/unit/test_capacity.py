"""The capacity model's expectations are exact: checked against brute-force enumeration
of every way a small room's members can sit on the sockets."""

from __future__ import annotations

import itertools
import math

import pytest

from tools.capacity import model

SOCKETS = 8


def _placements(size: int) -> list[tuple[int, ...]]:
    return list(itertools.combinations(range(SOCKETS), size))


@pytest.mark.parametrize(("pool", "marked", "draws"), [(8, 2, 3), (7, 4, 3), (10, 3, 7),
                                                       (5, 5, 1), (6, 0, 2), (20, 5, 0)])
def test_p_none_is_the_hypergeometric_probability(pool: int, marked: int, draws: int) -> None:
    exact = math.comb(pool - marked, draws) / math.comb(pool, draws)
    assert model.p_none(pool, marked, draws) == pytest.approx(exact)


@pytest.mark.parametrize("gateways", [2, 4])
@pytest.mark.parametrize("size", [2, 3, 5])
def test_gateway_receptions_match_every_placement(gateways: int, size: int) -> None:
    """Sockets i on gateway i % G; a room's members any ``size`` sockets, the sender any
    member: the model's per-gateway receptions are the mean over all of them."""
    nats = redis = stock = wasted = subscribed = 0.0
    cases = 0
    for members in _placements(size):
        on = {m % gateways for m in members}
        subscribed += len(on)
        for sender in members:
            cases += 1
            origin = sender % gateways
            others = {m % gateways for m in members if m != sender} - {origin}
            nats += len(others)
            redis += len(others) + 1
            stock += gateways
            wasted += gateways - 1 - len(others)
    w = model.Workload((model.RoomClass(size, 1, 1.0),), sockets=SOCKETS, gateways=gateways)
    p = model.predict(w)
    assert p.gateway["nats"].room_msgs * gateways == pytest.approx(nats / cases)
    assert p.gateway["redis-sharded"].room_msgs * gateways == pytest.approx(redis / cases)
    assert p.gateway["stock-redis"].room_msgs * gateways == pytest.approx(stock / cases)
    assert p.gateway["stock-redis"].wasted_msgs * gateways == pytest.approx(wasted / cases)
    assert p.gateway["nats"].wasted_msgs == 0
    rooms_per_gateway = subscribed / len(_placements(size)) / gateways
    assert p.gateway["nats"].subscriptions == pytest.approx(
        rooms_per_gateway + model.FIXED_SUBSCRIPTIONS)


def test_nats_routes_and_interest_match_every_placement() -> None:
    """Four gateways on three servers (gateways 0 and 3 share server 0): route copies
    per message and interest entries per server, as the mean over all placements."""
    gateways, servers, size = 4, 3, 3
    server_of = [g % servers for g in range(gateways)]
    routes = 0.0
    entries = 0.0
    cases = 0
    placements = _placements(size)
    for members in placements:
        subs = {(m % gateways) for m in members}  # gateways holding the room
        on_server = {server_of[g] for g in subs}
        # local subscriptions on each server, plus the other servers' distinct subjects
        for j in range(servers):
            local = sum(1 for g in subs if server_of[g] == j)
            entries += local + sum(1 for i in on_server if i != j)
        for sender in members:
            cases += 1
            home = server_of[sender % gateways]
            routes += len({server_of[m % gateways] for m in members if m != sender} - {home})
    w = model.Workload((model.RoomClass(size, 1, 1.0),), sockets=SOCKETS, gateways=gateways,
                       nats_nodes=servers, heartbeat_interval=1e12)
    nats = model.predict(w).nats
    assert nats.route_msgs_out * servers == pytest.approx(routes / cases)
    # node and cluster subjects, gateways per server (2, 1, 1): each server holds its
    # gateways' two subscriptions each, and the others' node subjects plus their cluster
    # subject once per server: 4 + (2 + 2), 2 + (3 + 2), 2 + (3 + 2)
    fixed = 8 + 7 + 7
    assert nats.interest_entries * servers == pytest.approx(entries / len(placements) + fixed)


def test_stock_gateways_receive_everything_whatever_their_count() -> None:
    classes = model.uniform_sizes(2, 20, 1000, 500.0)
    for g in (3, 30, 300):
        p = model.predict(model.Workload(classes, sockets=100_000, gateways=g))
        assert p.gateway["stock-redis"].room_msgs == pytest.approx(500.0)
        assert p.gateway["nats"].room_msgs < p.gateway["nats"].deliveries


def test_a_mega_room_reaches_every_gateway() -> None:
    for g in (3, 30, 300):
        size = model.mega_room_size(g, 1_000_000)
        assert model.span_of(size, g, 1_000_000) >= 0.95 * g
        assert model.span_of(size - 1, g, 1_000_000) < 0.95 * g
    # a mega room costs every gateway one copy per message, whatever the broker
    mega = (model.RoomClass(200_000, 1, 10.0),)
    p = model.predict(model.Workload(mega, sockets=1_000_000, gateways=100))
    assert p.gateway["nats"].room_msgs == pytest.approx(10.0 * 99 / 100, rel=1e-6)
    assert p.gateway["stock-redis"].room_msgs == pytest.approx(10.0)


def test_framing_is_what_the_protocols_put_on_the_wire() -> None:
    wire = model.Wire()
    payload = b"x" * 168
    channel = "sio.room._2F.scale-12"
    nats = f"MSG {channel} 12 {len(payload)}\r\n".encode() + payload + b"\r\n"
    assert wire.frame("nats", len(payload), len(channel)) == len(nats)
    for backend, kind in (("redis-sharded", b"smessage"), ("stock-redis", b"message")):
        resp = (b"*3\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
                % (len(kind), kind, len(channel), channel.encode(), len(payload), payload))
        assert wire.frame(backend, len(payload), len(channel)) == len(resp)


def test_link_messages_cross_once_per_other_site_with_a_member() -> None:
    """Two sites of four sockets each: every placement of a 3-member room, every sender."""
    sites, size = 2, 3
    crossings = 0
    cases = 0
    for members in _placements(size):
        for sender in members:
            cases += 1
            home = sender // 4
            crossings += len({m // 4 for m in members if m != sender} - {home})
    w = model.Workload((model.RoomClass(size, 1, 1.0),), sockets=SOCKETS, gateways=2)
    assert model.link_msgs(w, sites) == pytest.approx(crossings / cases)
    assert model.link_msgs(w, sites, site_local_share=0.75) == pytest.approx(
        crossings / cases / 4)
    assert model.link_msgs(w, 1) == 0


def test_topology_interest_agrees_with_the_mesh_model_and_dedupes_across_clusters() -> None:
    classes = model.uniform_sizes(2, 20, 10_000, 100.0)
    w = model.Workload(classes, sockets=50_000, gateways=12, nats_nodes=3)
    mesh, supercluster, leaf, hub = model.topology_interest(w, sites=2)
    assert mesh.entries == pytest.approx(model.predict(w).nats.interest_entries)
    # the same 12 gateways on 2 clusters of 3: half the gateways per server, and the
    # other cluster's interest once, not once per server there
    assert supercluster.servers == 6 and supercluster.entries < mesh.entries
    assert leaf.servers == 2 and hub.servers == 3
    assert mesh.memory_bytes > mesh.entries * model.NatsConstants().remote_entry_bytes


def test_the_command_line_predicts_and_names_bad_input(
        capsys: pytest.CaptureFixture[str]) -> None:
    from tools.capacity.__main__ import main

    assert main(["--rooms", "1000", "--sockets", "5000", "--gateways", "3,30",
                 "--mega", "2:4000", "--nats-nodes", "3"]) == 0
    out = capsys.readouterr().out
    assert "| 3 | 3 |" in out and "| 30 | 3 |" in out and "2 rooms of 4,000" in out
    assert "- 30 gateways: " in out, "the mega-room line"
    for bad, named in ((["--sizes", "20-2"], "--sizes"), (["--gateways", "0"], "--gateways"),
                       (["--mega", "ten"], "--mega")):
        with pytest.raises(SystemExit) as exc:
            main(bad)
        assert exc.value.code == 2
        assert named in capsys.readouterr().err
