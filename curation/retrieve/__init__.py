"""The partitioned form of the ``retrieve`` stage (its steps, cluster selection, summary)."""
