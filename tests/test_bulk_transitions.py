"""pay, cancel, deliver and refund of many orders at once: `OrderClient.change_many`
and the commands with several ids or `-` (one id a line on stdin), as a user
runs them: a result per line, refusals with their line numbers, the exit codes
of `create -`, and nothing at all written when a line is malformed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from redis.asyncio import Redis

from listener import BadInput, Change, OrderClient, Refused, UnknownOrder
from listener.config import Settings
from listener.keys import KeyLayout
from tests.conftest import CliResult
from tests.life import outbox_appends

Cli = Callable[..., Awaitable[CliResult]]


async def statuses(client: OrderClient, *order_ids: str) -> list[str]:
    return [str((await client.get(order_id)).status) for order_id in order_ids]


async def test_change_many_reports_each_order_in_order(settings: Settings, redis: Redis) -> None:
    async with OrderClient(settings) as client:
        await client.create_many([("m-1", 60), ("m-2", 60), ("m-gone", 60)])
        await client.cancel("m-gone")
        results = await client.change_many("pay", ["m-1", "nobody", "m-gone", "m-2", "m-1"])
        assert [type(result) for result in results] == [Change, UnknownOrder, Refused, Change, Change]
        first, unknown, refused, second, again = results
        assert isinstance(first, Change) and isinstance(second, Change) and isinstance(again, Change)
        assert (first.order_id, first.status, first.version, first.changed) == ("m-1", "paid", 2, True)
        assert (second.order_id, second.changed) == ("m-2", True)
        assert (again.order_id, again.status, again.changed) == ("m-1", "paid", False)
        assert isinstance(unknown, UnknownOrder) and unknown.order_id == "nobody"
        assert isinstance(refused, Refused) and (refused.order_id, refused.status) == ("m-gone", "cancelled")
        assert await statuses(client, "m-1", "m-2", "m-gone") == ["paid", "paid", "cancelled"]


async def test_change_many_checks_everything_before_writing(settings: Settings, redis: Redis) -> None:
    layout = KeyLayout(settings.key_prefix)
    async with OrderClient(settings) as client:
        await client.create_many([("v-1", 60), ("v-2", 60)])
        appended = await outbox_appends(redis, layout)
        with pytest.raises(BadInput, match="not allowed"):
            await client.change_many("pay", ["v-1", "bad id", "v-2"])
        with pytest.raises(BadInput, match="'expire' is not one of pay, cancel, deliver, refund"):
            await client.change_many("expire", ["v-1"])
        assert await statuses(client, "v-1", "v-2") == ["created", "created"]
        assert await outbox_appends(redis, layout) == appended
        assert await client.change_many("cancel", []) == []


async def test_pay_from_stdin_a_result_per_line(cli: Cli, settings: Settings) -> None:
    assert (await cli("create", "p-1", "p-2", "c-1", "--timeout", "60")).code == 0
    assert (await cli("cancel", "c-1")).code == 0
    lines = "p-1\n# paid at the till\n\np-2\nnobody\np-1\nc-1\n"
    result = await cli("pay", "-", stdin=lines)
    assert result.code == 1, result.err
    assert result.out.splitlines() == [
        "p-1: paid (version 2, reason paid)",
        "p-2: paid (version 2, reason paid)",
        "p-1: already paid (version 2); nothing changed",
    ]
    assert result.err.splitlines() == [
        "order-listener: line 5: order 'nobody' does not exist; nothing changed for it",
        "order-listener: line 7: order 'c-1' is cancelled (customer): pay is not allowed; "
        "nothing changed for it",
        "order-listener: 2 line(s) refused; the other 3 went through",
    ]
    async with OrderClient(settings) as client:
        assert await statuses(client, "p-1", "p-2", "c-1") == ["paid", "paid", "cancelled"]


async def test_a_malformed_line_changes_nothing(cli: Cli, settings: Settings, redis: Redis) -> None:
    assert (await cli("create", "k-1", "k-2", "--timeout", "60")).code == 0
    layout = KeyLayout(settings.key_prefix)
    appended = await outbox_appends(redis, layout)
    result = await cli("cancel", "-", stdin="k-1\nbad/id\nk-2 now\n" + "x" * 129 + "\n")
    assert result.code == 2
    assert result.out == ""
    assert "line 2: order id 'bad/id' has characters that are not allowed" in result.err
    assert "line 3: expected one ORDER_ID, got 2 fields" in result.err
    assert "line 4: order id" in result.err and "at most 128" in result.err
    assert "line 1:" not in result.err
    assert "3 bad line(s): nothing was changed" in result.err
    assert "Traceback" not in result.err
    assert await outbox_appends(redis, layout) == appended
    async with OrderClient(settings) as client:
        assert await statuses(client, "k-1", "k-2") == ["created", "created"]


async def test_every_transition_reads_stdin(cli: Cli, settings: Settings) -> None:
    ids = [f"s-{n}" for n in range(6)]
    assert (await cli("create", *ids, "--timeout", "60")).code == 0
    paid = await cli("pay", "-", stdin="\n".join(ids[:4]))
    assert paid.code == 0 and len(paid.out.splitlines()) == 4, paid.err
    delivered = await cli("deliver", "-", stdin="s-0\ns-1\n")
    assert delivered.code == 0 and "s-1: delivered (version 3, reason delivered)" in delivered.out
    refunded = await cli("refund", "-", stdin="s-1\ns-2\n")
    assert refunded.code == 0, refunded.err
    assert refunded.out.splitlines() == [
        "s-1: cancelled (version 5, reason refund)",
        "s-2: cancelled (version 4, reason refund)",
    ]
    cancelled = await cli("cancel", "-", stdin="s-4\ns-5\n")
    assert cancelled.code == 0 and "s-5: cancelled (version 2, reason customer)" in cancelled.out
    async with OrderClient(settings) as client:
        assert await statuses(client, *ids) == [
            "delivered",
            "cancelled",
            "cancelled",
            "paid",
            "cancelled",
            "cancelled",
        ]


async def test_several_ids_on_the_command_line(cli: Cli) -> None:
    assert (await cli("create", "a-1", "a-2", "--timeout", "60")).code == 0
    result = await cli("pay", "a-1", "nobody", "a-2")
    assert result.code == 1
    assert result.out.splitlines() == [
        "a-1: paid (version 2, reason paid)",
        "a-2: paid (version 2, reason paid)",
    ]
    assert result.err.splitlines() == [
        "order-listener: order 'nobody' does not exist",
        "order-listener: 1 order(s) refused; the other 2 went through",
    ]
    assert (await cli("pay", "-", "a-1")).code == 2
    empty = await cli("refund", "-", stdin="# nothing today\n")
    assert (empty.code, empty.out, empty.err) == (0, "", "")


async def test_thousands_of_ids_in_one_call(cli: Cli, settings: Settings, redis: Redis) -> None:
    ids = [f"bulk-pay-{n:05d}" for n in range(3000)]
    made = await cli("create", "-", stdin="\n".join(f"{oid} 600" for oid in ids))
    assert made.code == 0, made.err
    result = await cli("pay", "-", stdin="\n".join(ids) + "\n")
    assert result.code == 0, result.err
    assert result.out.splitlines() == [f"{oid}: paid (version 2, reason paid)" for oid in ids]
    layout = KeyLayout(settings.key_prefix)
    async with redis.pipeline(transaction=False) as pipe:
        for oid in ids:
            pipe.hget(layout.order(oid), "s")
        assert set(await pipe.execute()) == {b"paid"}
