"""Workers: scheduled jobs, reconciliation, reports and exports (built on metering and pricing)."""
