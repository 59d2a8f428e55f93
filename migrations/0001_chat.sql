-- Chat sessions and messages: PostgreSQL is the truth, Redis only a cache.

CREATE TABLE chat_sessions (
    id              uuid PRIMARY KEY,
    user_id         text        NOT NULL,
    title           text,
    metadata        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    last_message_at timestamptz,
    -- the last sequence number handed out; a new message takes message_count + 1 under the row lock
    message_count   bigint      NOT NULL DEFAULT 0 CHECK (message_count >= 0),
    -- bumped by every write to the row; orders cache writes (an older one never wins)
    version         bigint      NOT NULL DEFAULT 1 CHECK (version >= 1)
);

-- list_sessions: the caller's sessions newest first, keyset-paginated on (created_at, id)
CREATE INDEX chat_sessions_user_created_idx ON chat_sessions (user_id, created_at DESC, id DESC);

CREATE TABLE chat_messages (
    id            uuid PRIMARY KEY,
    session_id    uuid        NOT NULL REFERENCES chat_sessions (id) ON DELETE CASCADE,
    seq           bigint      NOT NULL CHECK (seq >= 1),
    role          text        NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
    content       text,
    -- json, not jsonb: keeps the client's key order, so tool calls come back as they were sent
    tool_calls    json,
    tool_results  json,
    tool_call_id  text,
    metadata      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- gapless per session; also the index get_messages pages on (and the FK's index for the cascade)
    CONSTRAINT chat_messages_session_seq_key UNIQUE (session_id, seq)
);
