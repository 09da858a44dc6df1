-- How many times the background embedding of a message failed for the message's own sake (an embedding server that
-- refuses the text; not an outage): after MAX_EMBED_FAILURES (services/memory/store.py) the message is no longer
-- picked up, so one text a model never takes cannot hold up every message stored after it, and is never retried
-- forever (it stays stored and readable, without a vector: search_messages does not find it). Idempotent; adding
-- a column with a constant default rewrites nothing.
ALTER TABLE conversation_messages ADD COLUMN IF NOT EXISTS embed_failures smallint NOT NULL DEFAULT 0;
