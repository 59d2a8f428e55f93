"""The chat API behind the real gateway: what the engine accepts, the gateway's schemas accept too."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from gateway.devauth import mint_token
from gateway.settings import load_settings
from intelligence.app import create_app as create_chat_app
from intelligence.settings import IntelligenceSettings, PostgresSettings

SECRET = "through-gateway-secret-" + "x" * 32

MESSAGES = [
    {"role": "system", "content": "You watch Kubernetes clusters."},
    {"role": "user", "content": "Which pods are failing in kube-system? \u00e9\u4e2d\U0001f680"},
    {
        "id": str(uuid.uuid4()),
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_pods", "arguments": '{"ns": "kube-system"}'},
            }
        ],
    },
    {
        "role": "tool",
        "tool_call_id": "call_1",
        "tool_results": {"pods": [{"name": "coredns-1", "restarts": 12}]},
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "1 pod restarting"},
    {"role": "assistant", "content": "coredns-1 restarted 12 times.", "metadata": {"model": "m-1"}},
]


@pytest.fixture
async def chat_gateway(aiohttp_server: Any, make_gateway: Any, database: str) -> tuple[Any, dict[str, str]]:
    chat = await aiohttp_server(
        create_chat_app(IntelligenceSettings(postgres=PostgresSettings(dsn=database)))
    )
    gateway = await make_gateway(
        {
            "services": {"intelligence-engine": {"url": f"http://127.0.0.1:{chat.port}"}},
            "routes": [{"prefix": "/api/v1/chat", "service": "intelligence-engine"}],
        },
        env={"AUTH_JWT_SECRET": SECRET},
    )
    subject = f"u-{uuid.uuid4().hex[:8]}"
    token = mint_token(load_settings({"AUTH_JWT_SECRET": SECRET}), subject=subject, scopes=[], ttl=300)
    return gateway, {"Authorization": f"Bearer {token}", "x-test-subject": subject}


async def test_a_conversation_with_tool_calls_round_trips_through_the_gateway(chat_gateway: Any) -> None:
    gateway, auth = chat_gateway
    session_id = str(uuid.uuid4())
    response = await gateway.post(
        "/api/v1/chat/sessions", json={"id": session_id, "title": "failing pods"}, headers=auth
    )
    assert response.status == 201, await response.text()
    # Neither the engine nor the gateway names its software and versions.
    assert "Server" not in response.headers
    for message in MESSAGES:
        response = await gateway.post(
            f"/api/v1/chat/sessions/{session_id}/messages", json=message, headers=auth
        )
        assert response.status == 201, (message, await response.text())

    response = await gateway.get(f"/api/v1/chat/sessions/{session_id}/messages", headers=auth)
    assert response.status == 200
    stored = (await response.json())["data"]
    assert [m["seq"] for m in stored] == list(range(1, len(MESSAGES) + 1))
    for sent, got in zip(MESSAGES, stored, strict=True):
        for field, value in sent.items():
            assert got[field] == value, field


async def test_the_gateway_refuses_a_bad_message_before_the_engine_sees_it(chat_gateway: Any) -> None:
    gateway, auth = chat_gateway
    response = await gateway.post("/api/v1/chat/sessions", json={}, headers=auth)
    session_id = (await response.json())["id"]
    bad = {"role": "robot", "content": "x", "tool_calls": "nope"}
    response = await gateway.post(
        f"/api/v1/chat/sessions/{session_id}/messages",
        data=json.dumps(bad),
        headers={**auth, "Content-Type": "application/json"},
    )
    assert response.status == 422
    fields = {e["field"] for e in (await response.json())["errors"]}
    assert {"role", "tool_calls"} <= fields
    response = await gateway.get(f"/api/v1/chat/sessions/{session_id}", headers=auth)
    assert (await response.json())["message_count"] == 0


async def test_another_users_session_is_a_404_through_the_gateway(chat_gateway: Any) -> None:
    gateway, auth = chat_gateway
    response = await gateway.post("/api/v1/chat/sessions", json={"title": "mine"}, headers=auth)
    session_id = (await response.json())["id"]
    other = mint_token(load_settings({"AUTH_JWT_SECRET": SECRET}), subject="someone-else", scopes=[], ttl=300)
    response = await gateway.get(
        f"/api/v1/chat/sessions/{session_id}", headers={"Authorization": f"Bearer {other}"}
    )
    assert response.status == 404
    # A client cannot claim to be the owner by sending the identity header itself.
    response = await gateway.get(
        f"/api/v1/chat/sessions/{session_id}",
        headers={"Authorization": f"Bearer {other}", "x-auth-subject": auth["x-test-subject"]},
    )
    assert response.status == 404
