-- Long-term memory, v2: extraction, the knowledge graph, and the lifecycle (services/ltm/graph.py, lifecycle.py).
-- Idempotent: every statement can run again.

-- ---------------------------------------------------------------- ltm_memories: lifecycle columns
-- subject        who a typed memory is about: the speaker's name ("Caroline") or "user" when anonymous.
-- slot           a single-valued attribute the memory sets ("location", "employer", "occupation", "name",
--                "favourite colour", "my sister"...); NULL for everything that can hold many values.
-- slot_value     the value it sets ("Berlin"), compared case-insensitively.
-- valid_from     epoch seconds: when the statement was first made (the message's timestamp).
-- asserted_at    epoch seconds: the latest time it was stated (a repeat moves it; supersession orders by it).
-- valid_to       epoch seconds: when a newer statement of another value for the same (subject, slot) replaced it.
--                NULL = current. A superseded memory is never deleted: it stays searchable as history, and
--                retrieval ranks it lower (penalty on valid_to IS NOT NULL).
-- superseded_by  the memory_id of the statement that replaced it (NULL while current).
-- mentions       how many ingested messages stated it (repeats and consolidated near-duplicates add up).
-- sources        provenance of every mention: [{"message_id", "session_id", "timestamp", "speaker"}, ...];
--                source_* columns keep the first one.
-- decay          0..1 retention strength from age, disuse, use and confidence; recomputed by optimize
--                (services/ltm/lifecycle.py). Budgeted cleanup archives the lowest first.
ALTER TABLE ltm_memories ADD COLUMN IF NOT EXISTS subject text;
ALTER TABLE ltm_memories ADD COLUMN IF NOT EXISTS slot text;
ALTER TABLE ltm_memories ADD COLUMN IF NOT EXISTS slot_value text;
ALTER TABLE ltm_memories ADD COLUMN IF NOT EXISTS valid_from double precision;
ALTER TABLE ltm_memories ADD COLUMN IF NOT EXISTS asserted_at double precision;
ALTER TABLE ltm_memories ADD COLUMN IF NOT EXISTS valid_to double precision;
ALTER TABLE ltm_memories ADD COLUMN IF NOT EXISTS superseded_by uuid;
ALTER TABLE ltm_memories ADD COLUMN IF NOT EXISTS mentions integer NOT NULL DEFAULT 1;
ALTER TABLE ltm_memories ADD COLUMN IF NOT EXISTS sources jsonb NOT NULL DEFAULT '[]'::jsonb;
ALTER TABLE ltm_memories ADD COLUMN IF NOT EXISTS decay real NOT NULL DEFAULT 1.0;

-- Supersession looks up the other statements of one (user, subject, slot).
CREATE INDEX IF NOT EXISTS ltm_memories_slot_idx ON ltm_memories (user_id, subject, slot) WHERE slot IS NOT NULL;

-- ---------------------------------------------------------------- the knowledge graph (the medium-term tier)
-- Entities: one row per (user, normalised name); the speaker is an entity too (type person).
CREATE TABLE IF NOT EXISTS ltm_entities (
    entity_id   uuid PRIMARY KEY,
    user_id     text NOT NULL,
    name        text NOT NULL,
    name_norm   text NOT NULL,
    type        text NOT NULL,
    embedding   vector(384) NOT NULL,
    mentions    integer NOT NULL DEFAULT 1,
    first_seen  double precision,
    last_seen   double precision,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, name_norm)
);

-- Relations: subject --predicate--> object, e.g. (Caroline, lives_in, Berlin). strength grows with each mention;
-- valid_to mirrors the supersession of the memory that states it (memory_id: the latest such memory).
CREATE TABLE IF NOT EXISTS ltm_relations (
    relation_id uuid PRIMARY KEY,
    user_id     text NOT NULL,
    subject_id  uuid NOT NULL REFERENCES ltm_entities (entity_id) ON DELETE CASCADE,
    predicate   text NOT NULL,
    object_id   uuid NOT NULL REFERENCES ltm_entities (entity_id) ON DELETE CASCADE,
    strength    real NOT NULL DEFAULT 1.0,
    confidence  real NOT NULL DEFAULT 1.0,
    valid_from  double precision,
    valid_to    double precision,
    memory_id   uuid,
    UNIQUE (user_id, subject_id, predicate, object_id)
);
CREATE INDEX IF NOT EXISTS ltm_relations_object_idx ON ltm_relations (user_id, object_id);

-- Which memories mention which entities (role: subject | object | mention).
CREATE TABLE IF NOT EXISTS ltm_memory_entities (
    memory_id   uuid NOT NULL REFERENCES ltm_memories (memory_id) ON DELETE CASCADE,
    entity_id   uuid NOT NULL REFERENCES ltm_entities (entity_id) ON DELETE CASCADE,
    user_id     text NOT NULL,
    role        text NOT NULL DEFAULT 'mention',
    PRIMARY KEY (memory_id, entity_id)
);
CREATE INDEX IF NOT EXISTS ltm_memory_entities_entity_idx ON ltm_memory_entities (user_id, entity_id);

-- ---------------------------------------------------------------- lifecycle bookkeeping
-- Memories taken out by consolidation (merged into another, reason 'merged') or by budgeted cleanup
-- (reason 'budget'): the whole row as JSON (without its embedding), so nothing disappears without a trace.
CREATE TABLE IF NOT EXISTS ltm_archive (
    user_id      text NOT NULL,
    memory_id    uuid NOT NULL,
    reason       text NOT NULL,
    merged_into  uuid,
    row          jsonb NOT NULL,
    archived_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, memory_id)
);

-- Who ingested recently and when each user was last optimised: the periodic job's work list.
CREATE TABLE IF NOT EXISTS ltm_user_state (
    user_id            text PRIMARY KEY,
    last_active_at     timestamptz NOT NULL DEFAULT now(),
    last_optimized_at  timestamptz
);
CREATE INDEX IF NOT EXISTS ltm_user_state_active_idx ON ltm_user_state (last_active_at);
