-- Long-term memory, v9: the salience of a memory (services/ltm/salience): how likely its turn is to be needed
-- later, 0-1, set at ingest on a turn's episodic memory and the knowledge read from it (LTM_SALIENCE). NULL for
-- rows written before this migration or with LTM_SALIENCE=false: neutral in ranking and cleanup. Idempotent.
ALTER TABLE ltm_memories ADD COLUMN IF NOT EXISTS salience real;
