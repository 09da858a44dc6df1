-- Long-term memory, v11: a change of salience gives the row a new txid, as a change of any other column the search
-- index holds does (services/ltm/search_index.py ROW_COLUMNS). Migration 004's trigger (recreated by 006) predates
-- the column (009): a statement stated again raises its memory's salience in place (GREATEST, graph.py
-- TYPED_INSERT) without changing any column the trigger compared, so an ltm process that held the user never read
-- the new value again and ranked with the old one, unlike a search in SQL. The trigger is recreated with salience
-- in its list (the function is unchanged). Idempotent.
DROP TRIGGER IF EXISTS ltm_memories_touched ON ltm_memories;
CREATE TRIGGER ltm_memories_touched BEFORE UPDATE ON ltm_memories FOR EACH ROW
    WHEN ((OLD.confidence, OLD.access_count, OLD.last_accessed, OLD.valid_to, OLD.superseded_by, OLD.entities,
           OLD.meta, OLD.source_message_id, OLD.source_timestamp, OLD.speaker, OLD.created_at, OLD.salience)
          IS DISTINCT FROM
          (NEW.confidence, NEW.access_count, NEW.last_accessed, NEW.valid_to, NEW.superseded_by, NEW.entities,
           NEW.meta, NEW.source_message_id, NEW.source_timestamp, NEW.speaker, NEW.created_at, NEW.salience))
    EXECUTE FUNCTION ltm_memories_touched();
