-- Messages stored while their receiver was offline. A receiver that
-- reconnects without naming its last message id is sent these, and the
-- flag is cleared once they are sent.
ALTER TABLE messages ADD COLUMN pending boolean NOT NULL DEFAULT false;

CREATE INDEX messages_pending_idx ON messages (receiver_id, id) WHERE pending;
