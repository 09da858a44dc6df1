-- The salience model's score of each message (services/ltm/salience; 0-1, how likely a later turn needs it),
-- computed by memory's background embedding when STM_SALIENCE_WEIGHT > 0 and read when the STM summary folds the
-- turn. NULL: not scored (the setting off, another embedding model, or not embedded yet).
ALTER TABLE conversation_messages ADD COLUMN IF NOT EXISTS salience real;
