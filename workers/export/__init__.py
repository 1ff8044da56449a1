"""CSV exports of closed days: the kinds and their columns, the writer, and the parallel formatter."""
