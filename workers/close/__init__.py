"""The nightly close of a business day: roll-up, revenue, the ledger check and the lease that keeps one closer."""
