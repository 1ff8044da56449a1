"""one-api / new-api interop: reading a deployment's database and importing its books into the ledger."""
