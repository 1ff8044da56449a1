"""The daily report: frames read from the ledger, rendered as a table, CSV or HTML with charts."""
