-- Long-term memory, v3: hybrid retrieval (services/ltm/retrieval.py). Idempotent.

-- Full text of each memory (english stemming, stop words removed): BM25 in the query path.
ALTER TABLE ltm_memories ADD COLUMN IF NOT EXISTS search_tsv tsvector
    GENERATED ALWAYS AS (to_tsvector('english', content)) STORED;
CREATE INDEX IF NOT EXISTS ltm_memories_search_tsv_idx ON ltm_memories USING gin (search_tsv);

-- Neighbouring turns of a result: the turns before and after it in its session, by timestamp.
CREATE INDEX IF NOT EXISTS ltm_memories_session_turn_idx
    ON ltm_memories (user_id, source_session_id, source_timestamp) WHERE type = 'episodic';
