"""The chat HTTP surface: round trips, ownership, validation, idempotency, errors."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from chat_helpers import Client, headers, pool

from intelligence.api import MAX_DEPTH, MAX_TITLE, MESSAGES_LIMIT, SESSIONS_LIMIT

# Key order that jsonb would reorder, unicode, nesting, numbers, empties and nulls.
TOOL_CALLS: list[dict[str, Any]] = [
    {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_pods", "arguments": '{"namespace": "kube-system", "limit": 10}'},
        "zeta": {"b": 2, "a": 1, "": [], "nested": {"deep": [1, 2.5, -3e-7, 12345678901234567890]}},
        "ünïcødé": '✓ 日本語 "quoted" \\ backslash \n newline',
        "empty": {},
        "nothing": None,
        "flag": False,
    },
    {"id": "call_2", "type": "function", "function": {"name": "noop", "arguments": "{}"}},
]
TOOL_RESULTS: list[Any] = [{"tool_call_id": "call_1", "output": {"pods": ["a", "b"], "z": 0, "a": 1.0}}]


async def new_session(client: Client, user: str, **body: Any) -> dict[str, Any]:
    resp = await client.post("/api/v1/chat/sessions", json=body, headers=headers(user))
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def post_message(client: Client, user: str, session_id: str, **body: Any) -> tuple[int, Any]:
    resp = await client.post(f"/api/v1/chat/sessions/{session_id}/messages", json=body, headers=headers(user))
    return resp.status, await resp.json()


def canonical_order(value: Any) -> str:
    """The JSON text as sent: key order kept, so equality means byte-equivalent JSON."""
    return json.dumps(value, ensure_ascii=False)


async def test_tool_calls_round_trip_as_byte_equivalent_json(
    client: Client, make_client: Any, user: str
) -> None:
    session = await new_session(client, user, title="pods", metadata={"cluster": "eu-1", "tags": ["x"]})
    status, assistant = await post_message(
        client, user, session["id"], role="assistant", content=None, tool_calls=TOOL_CALLS
    )
    assert status == 201
    status, tool = await post_message(
        client, user, session["id"], role="tool", content="done", tool_call_id="call_1",
        tool_results=TOOL_RESULTS,
    )  # fmt: skip
    assert status == 201
    assert (assistant["seq"], tool["seq"]) == (1, 2)

    def check(messages: list[dict[str, Any]]) -> None:
        assert canonical_order(messages[0]["tool_calls"]) == canonical_order(TOOL_CALLS)
        assert canonical_order(messages[1]["tool_results"]) == canonical_order(TOOL_RESULTS)
        assert messages[1]["tool_call_id"] == "call_1"
        assert messages[0]["content"] is None

    url = f"/api/v1/chat/sessions/{session['id']}/messages"
    resp = await client.get(url, headers=headers(user))  # from the write-through cache
    check((await resp.json())["data"])
    # And from PostgreSQL alone.
    async with pool(client).acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT tool_calls::text FROM chat_messages WHERE id = %(id)s", {"id": assistant["id"]}
        )
        (stored_text,) = await cur.fetchone()
    assert json.loads(stored_text) == TOOL_CALLS
    assert list(json.loads(stored_text)[0]["zeta"]) == ["b", "a", "", "nested"]  # json, not jsonb
    postgres_only = await make_client(redis_url=None)  # a second replica without a cache
    resp = await postgres_only.get(url, headers=headers(user))
    check((await resp.json())["data"])

    resp = await client.get(f"/api/v1/chat/sessions/{session['id']}", headers=headers(user))
    body = await resp.json()
    assert body["message_count"] == 2 and body["metadata"] == {"cluster": "eu-1", "tags": ["x"]}
    assert body["last_message_at"] is not None


async def test_other_users_session_is_404_everywhere(client: Client, user: str) -> None:
    session = await new_session(client, user, title="mine")
    await post_message(client, user, session["id"], role="user", content="secret")
    intruder = headers(user + "-other")
    base = f"/api/v1/chat/sessions/{session['id']}"
    for method, url, body in [
        ("GET", base, None),
        ("PATCH", base, {"title": "stolen"}),
        ("PATCH", base, {}),  # changes nothing, so answers with the session as it is: not theirs
        ("DELETE", base, None),
        ("GET", base + "/messages", None),
        ("POST", base + "/messages", {"role": "user", "content": "hi"}),
    ]:
        resp = await client.request(method, url, json=body, headers=intruder)
        assert resp.status == 404, (method, url)
        assert (await resp.json())["detail"] == "Session not found"
    resp = await client.get("/api/v1/chat/sessions", headers=intruder)
    assert (await resp.json())["data"] == []
    resp = await client.get(base + "/messages", headers=headers(user))
    assert [m["content"] for m in (await resp.json())["data"]] == ["secret"]
    resp = await client.get(base, headers=headers(user))
    assert (await resp.json())["title"] == "mine"


ANY_ID = "b669dce2-7a9d-4383-be5b-d75fb21c8392"


def _cursor(**fields: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(fields).encode()).decode().rstrip("=")


async def test_missing_subject_is_401_in_the_error_format(client: Client) -> None:
    resp = await client.get("/api/v1/chat/sessions")
    assert resp.status == 401
    assert resp.content_type == "application/json"
    assert (await resp.json())["detail"].startswith("Not authenticated")


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "field"),
    [
        ("GET", "/sessions/not-a-uuid", None, 404, None),
        ("GET", "/sessions/not-a-uuid/messages", None, 404, None),
        ("GET", "/sessions?limit=0", None, 422, "limit"),
        ("GET", "/sessions?limit=abc", None, 422, "limit"),
        ("GET", "/sessions?limit=100000", None, 422, "limit"),
        ("GET", f"/sessions?limit={SESSIONS_LIMIT[1] + 1}", None, 422, "limit"),
        ("GET", f"/sessions/{ANY_ID}/messages?limit={MESSAGES_LIMIT[1] + 1}", None, 422, "limit"),
        # Only ASCII digits: int() alone would read these as 5.
        ("GET", "/sessions?limit=%D9%A5", None, 422, "limit"),
        ("GET", "/sessions?limit=%205", None, 422, "limit"),
        ("GET", "/sessions?limit=5%20", None, 422, "limit"),
        ("GET", "/sessions?limit=+5", None, 422, "limit"),
        ("GET", f"/sessions/{ANY_ID}/messages?limit=%EF%BC%95", None, 422, "limit"),
        ("GET", "/sessions?after=garbage!", None, 422, "after"),
        # Cursors that decode but name no instant: no offset, a time that leaves the calendar in
        # UTC, a time that is not text.
        ("GET", "/sessions?after=" + _cursor(t="2026-11-27T03:59:15", id=ANY_ID), None, 422, "after"),
        ("GET", "/sessions?after=" + _cursor(t="0001-01-01T00:00:00+01:00", id=ANY_ID), None, 422, "after"),
        ("GET", "/sessions?after=" + _cursor(t=1764215955, id=ANY_ID), None, 422, "after"),
        # A message cursor is a seq: not below 0, and not a boolean (JSON's true is not 1).
        ("GET", f"/sessions/{ANY_ID}/messages?after=" + _cursor(seq=-1), None, 422, "after"),
        ("GET", f"/sessions/{ANY_ID}/messages?after=" + _cursor(seq=True), None, 422, "after"),
        ("POST", "/sessions", b"{not json", 422, "body"),
        ("POST", "/sessions", b"[1, 2]", 422, "body"),
        ("POST", "/sessions", b'{"title": NaN}', 422, "body"),
        ("POST", "/sessions", {"title": 5}, 422, "title"),
        ("POST", "/sessions", {"metadata": [1]}, 422, "metadata"),
        ("POST", "/sessions", {"id": "nope"}, 422, "id"),
        # A number whose digits would spell a UUID is still not one.
        ("POST", "/sessions", {"id": 12345678901234567890123456789012}, 422, "id"),
        ("POST", "/sessions", {"title": "x" * (MAX_TITLE + 1)}, 422, "title"),
        # null would have replaced the metadata with {}: a PATCH replaces it only with an object.
        ("PATCH", f"/sessions/{ANY_ID}", {"metadata": None}, 422, "metadata"),
        ("POST", "/sessions", {"titel": "typo"}, 422, "titel"),
        ("POST", "/sessions", {"title": "nul \u0000"}, 422, "body"),
        # What PostgreSQL or UTF-8 cannot hold, sent straight to the chat API (the gateway would
        # refuse it first): a 422, never a 500 after the row was written.
        ("POST", "/sessions", b'{"title": "a\\ud800b"}', 422, "body"),
        ("POST", "/sessions", b'{"metadata": {"k\\udfff": 1}}', 422, "body"),
        ("POST", "/sessions", b'{"metadata": {"x": 1e400}}', 422, "body"),
    ],
)
async def test_bad_input_is_rejected_in_the_error_format(
    client: Client, user: str, method: str, path: str, body: Any, status: int, field: str | None
) -> None:
    kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
    resp = await client.request(method, "/api/v1/chat" + path, headers=headers(user), **kwargs)
    assert resp.status == status
    payload = await resp.json()
    assert "detail" in payload
    if field is not None:
        assert field in [e["field"] for e in payload["errors"]]


async def test_the_largest_limits_title_and_nesting_allowed_are_accepted(client: Client, user: str) -> None:
    """The other side of the refusals above: each bound itself is allowed."""
    h = headers(user)

    def nested(containers: int) -> dict[str, Any]:
        # The body itself is one container, its metadata another: ``containers`` in all.
        value: dict[str, Any] = {}
        for _ in range(containers - 2):
            value = {"a": value}
        return {"metadata": value}

    resp = await client.post("/api/v1/chat/sessions", json=nested(MAX_DEPTH), headers=h)
    assert resp.status == 201, await resp.text()
    resp = await client.post("/api/v1/chat/sessions", json=nested(MAX_DEPTH + 1), headers=h)
    assert resp.status == 422
    session = await new_session(client, user, title="x" * MAX_TITLE)
    assert len(session["title"]) == MAX_TITLE
    base = "/api/v1/chat/sessions"
    for url in (
        f"{base}?limit={SESSIONS_LIMIT[1]}",
        f"{base}/{session['id']}/messages?limit={MESSAGES_LIMIT[1]}",
    ):
        resp = await client.get(url, headers=h)
        assert resp.status == 200, (url, await resp.text())


async def test_an_empty_cursor_is_the_first_page(client: Client, user: str) -> None:
    """``after=`` with nothing after it (a client that sends back a ``next`` of null as empty)
    starts from the beginning rather than refusing."""
    session = await new_session(client, user, title="only")
    await post_message(client, user, session["id"], role="user", content="first")
    resp = await client.get("/api/v1/chat/sessions?after=", headers=headers(user))
    assert [s["id"] for s in (await resp.json())["data"]] == [session["id"]]
    resp = await client.get(f"/api/v1/chat/sessions/{session['id']}/messages?after=", headers=headers(user))
    assert [m["content"] for m in (await resp.json())["data"]] == ["first"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"role": "robot", "content": "x"}, "role"),
        ({"role": "user"}, "content"),
        ({"role": "user", "content": 3}, "content"),
        ({"role": "user", "content": "x", "tool_calls": [{"id": "c"}]}, "tool_calls"),
        ({"role": "assistant", "tool_calls": {"id": "c"}}, "tool_calls"),
        ({"role": "user", "content": "x", "tool_results": [1]}, "tool_results"),
        ({"role": "tool", "content": "x", "tool_call_id": 7}, "tool_call_id"),
        ({"role": "user", "content": "x", "id": "not-a-uuid"}, "id"),
        ({"role": "user", "content": "x", "metadata": "m"}, "metadata"),
    ],
)
async def test_bad_message_is_422_naming_the_field(
    client: Client, user: str, body: dict[str, Any], field: str
) -> None:
    session = await new_session(client, user)
    status, payload = await post_message(client, user, session["id"], **body)
    assert status == 422
    assert field in [e["field"] for e in payload["errors"]]
    resp = await client.get(f"/api/v1/chat/sessions/{session['id']}", headers=headers(user))
    assert (await resp.json())["message_count"] == 0


async def test_same_message_sent_ten_times_concurrently_is_stored_once(client: Client, user: str) -> None:
    session = await new_session(client, user)
    message_id = str(uuid.uuid4())
    body = {"id": message_id, "role": "assistant", "content": "once", "tool_calls": TOOL_CALLS}
    results = await asyncio.gather(*(post_message(client, user, session["id"], **body) for _ in range(10)))
    statuses = sorted(status for status, _ in results)
    assert statuses == [200] * 9 + [201]
    assert {payload["id"] for _, payload in results} == {message_id}
    assert {payload["seq"] for _, payload in results} == {1}
    async with pool(client).acquire() as conn, conn.cursor() as cur:
        await cur.execute(
            "SELECT count(*), max(seq) FROM chat_messages WHERE session_id = %(s)s", {"s": session["id"]}
        )
        assert await cur.fetchone() == (1, 1)
        await cur.execute("SELECT message_count FROM chat_sessions WHERE id = %(s)s", {"s": session["id"]})
        assert await cur.fetchone() == (1,)  # the losers' seqs were rolled back: still gapless

    status, payload = await post_message(client, user, session["id"], **{**body, "content": "changed"})
    assert status == 409
    assert payload["errors"][0]["field"] == "id"
    status, payload = await post_message(client, user, session["id"], role="user", content="next")
    assert (status, payload["seq"]) == (201, 2)


@pytest.mark.parametrize(
    ("first", "change"),
    [
        ({"role": "assistant", "content": "c", "metadata": {"m": 1}}, {"metadata": {"m": 2}}),
        ({"role": "assistant", "content": "c", "metadata": {"m": 1}}, {"metadata": {}}),
        ({"role": "assistant", "content": "c", "tool_calls": TOOL_CALLS}, {"tool_calls": TOOL_CALLS[:1]}),
        (
            {"role": "assistant", "content": "c", "tool_calls": TOOL_CALLS},
            {"role": "user", "tool_calls": None},
        ),
        (
            {"role": "tool", "tool_call_id": "call_1", "tool_results": TOOL_RESULTS},
            {"tool_call_id": "call_2"},
        ),
        ({"role": "tool", "tool_call_id": "call_1", "tool_results": TOOL_RESULTS}, {"tool_results": []}),
    ],
    ids=["metadata", "metadata-dropped", "tool_calls", "role", "tool_call_id", "tool_results"],
)
async def test_a_message_id_sent_again_with_another_body_is_a_409_and_the_first_is_kept(
    client: Client, user: str, first: dict[str, Any], change: dict[str, Any]
) -> None:
    """Only the same body under the same id is a retry (200); any other field that differs is
    another message, refused, not taken for the stored one."""
    session = await new_session(client, user)
    message_id = str(uuid.uuid4())
    status, stored = await post_message(client, user, session["id"], id=message_id, **first)
    assert status == 201, stored
    status, payload = await post_message(client, user, session["id"], id=message_id, **first)
    assert (status, payload) == (200, stored)
    status, payload = await post_message(client, user, session["id"], id=message_id, **{**first, **change})
    assert status == 409, payload
    assert [e["field"] for e in payload["errors"]] == ["id"]
    resp = await client.get(f"/api/v1/chat/sessions/{session['id']}/messages", headers=headers(user))
    assert (await resp.json())["data"] == [stored]


async def test_session_create_with_own_id_is_idempotent(client: Client, user: str) -> None:
    session_id = str(uuid.uuid4())
    first = await client.post(
        "/api/v1/chat/sessions", json={"id": session_id, "title": "a"}, headers=headers(user)
    )
    again = await client.post(
        "/api/v1/chat/sessions", json={"id": session_id, "title": "a"}, headers=headers(user)
    )
    other = await client.post(
        "/api/v1/chat/sessions", json={"id": session_id, "title": "b"}, headers=headers(user)
    )
    other_metadata = await client.post(
        "/api/v1/chat/sessions",
        json={"id": session_id, "title": "a", "metadata": {"k": 1}},
        headers=headers(user),
    )
    assert (first.status, again.status, other.status, other_metadata.status) == (201, 200, 409, 409)
    stored = await (await client.get(f"/api/v1/chat/sessions/{session_id}", headers=headers(user))).json()
    assert (stored["title"], stored["metadata"]) == ("a", {})


async def test_patch_then_delete_session(client: Client, user: str) -> None:
    session = await new_session(client, user, title="old", metadata={"a": 1})
    await post_message(client, user, session["id"], role="user", content="hello")
    url = f"/api/v1/chat/sessions/{session['id']}"
    resp = await client.patch(url, json={"title": "new"}, headers=headers(user))
    assert resp.status == 200
    assert (await resp.json())["title"] == "new"
    resp = await client.patch(url, json={"metadata": {"b": 2}}, headers=headers(user))
    patched = await resp.json()
    assert (patched["title"], patched["metadata"]) == ("new", {"b": 2})
    resp = await client.get(url, headers=headers(user))
    assert (await resp.json())["title"] == "new"

    resp = await client.delete(url, headers=headers(user))
    assert resp.status == 204
    for path in (url, url + "/messages"):
        resp = await client.get(path, headers=headers(user))
        assert resp.status == 404
    resp = await client.delete(url, headers=headers(user))
    assert resp.status == 404
    async with pool(client).acquire() as conn, conn.cursor() as cur:
        await cur.execute("SELECT count(*) FROM chat_messages WHERE session_id = %(s)s", {"s": session["id"]})
        assert await cur.fetchone() == (0,)  # ON DELETE CASCADE


async def test_sessions_list_newest_first_with_cursor(client: Client, user: str) -> None:
    created = [(await new_session(client, user, title=f"s{i}"))["id"] for i in range(5)]
    seen: list[str] = []
    url = "/api/v1/chat/sessions?limit=2"
    while True:
        resp = await client.get(url, headers=headers(user))
        page = await resp.json()
        seen += [s["id"] for s in page["data"]]
        if not page["has_more"]:
            assert page["next"] is None
            break
        url = f"/api/v1/chat/sessions?limit=2&after={page['next']}"
    assert seen == created[::-1]

    # A cursor names an instant: the same one written with another offset continues the same way,
    # also with one that Python reads and PostgreSQL would refuse (16 h and more).
    resp = await client.get("/api/v1/chat/sessions?limit=2", headers=headers(user))
    cursor = json.loads(base64.urlsafe_b64decode((await resp.json())["next"] + "=="))
    instant = datetime.fromisoformat(cursor["t"]).astimezone(timezone(timedelta(hours=23, minutes=59)))
    resp = await client.get(
        "/api/v1/chat/sessions?after=" + _cursor(t=instant.isoformat(), id=cursor["id"]),
        headers=headers(user),
    )
    assert [s["id"] for s in (await resp.json())["data"]] == created[::-1][2:]


async def test_health_endpoints(client: Client) -> None:
    resp = await client.get("/health")
    assert resp.status == 200
    assert (await resp.json())["status"] == "healthy"
    resp = await client.get("/health/db")
    body = await resp.json()
    assert resp.status == 200
    assert body["status"] == "healthy" and isinstance(body["latency_ms"], float)


async def test_a_message_json_columns_cannot_hold_is_refused_and_not_stored(
    client: Client, user: str
) -> None:
    """The tool columns are `json`, which takes "\\ud800"; UTF-8 and the cache do not: it was
    stored, answered 500, and then hid the chat's history."""
    session = await new_session(client, user)
    base = f"/api/v1/chat/sessions/{session['id']}/messages"
    for body in (
        b'{"role": "tool", "tool_results": {"x": "\\ud800"}}',
        b'{"role": "tool", "tool_results": -1e400}',
        b'{"role": "tool", "tool_results": ' + b"[" * 900 + b"]" * 900 + b"}",
        b'{"role": "user", "content": "a\\ud800b"}',
    ):
        resp = await client.post(
            base, data=body, headers={**headers(user), "Content-Type": "application/json"}
        )
        assert resp.status == 422, (body[:60], await resp.text())
    resp = await client.get(base, headers=headers(user))
    assert resp.status == 200 and (await resp.json())["data"] == []


@pytest.mark.parametrize(
    "metadata", [b"[" * 900 + b"]" * 900, b'{"a":' * 5000 + b"1" + b"}" * 5000], ids=["lists", "objects"]
)
async def test_metadata_nested_too_deeply_is_a_422(client: Client, user: str, metadata: bytes) -> None:
    resp = await client.post(
        "/api/v1/chat/sessions",
        data=b'{"metadata": ' + metadata + b"}",
        headers={**headers(user), "Content-Type": "application/json"},
    )
    assert resp.status == 422
    assert [e["field"] for e in (await resp.json())["errors"]] == ["body"]


async def test_a_subject_that_is_not_utf8_is_a_401(client: Client) -> None:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        b"GET /api/v1/chat/sessions HTTP/1.1\r\nHost: x\r\nx-auth-subject: \xe9\xff\r\nConnection: close\r\n\r\n"
    )
    async with asyncio.timeout(5):
        answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:80]
