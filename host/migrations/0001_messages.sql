-- Messages of 1:1 conversations. The identity column gives ids in creation
-- order; clients see them as 20-digit zero-padded strings.
CREATE TABLE messages (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sender_id text NOT NULL,
    receiver_id text NOT NULL,
    content text NOT NULL,
    client_message_id text,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- NULLs are distinct, so messages without a clientMessageId never clash.
    CONSTRAINT messages_sender_client_message_id_key UNIQUE (sender_id, client_message_id)
);

-- Catch-up: everything for a receiver after a given id.
CREATE INDEX messages_receiver_id_idx ON messages (receiver_id, id);

-- History of one conversation, in either direction.
CREATE INDEX messages_conversation_idx
    ON messages (LEAST(sender_id, receiver_id), GREATEST(sender_id, receiver_id), id);
