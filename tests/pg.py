"""The temporary Postgres 15 cluster of the tests marked ``postgres`` (conftest's `postgres` fixture): it lives in
chatapp/storage/tempcluster.py, which the benchmarks use too. Each test gets its own database in it."""
from chatapp.storage.tempcluster import PostgresCluster, postgres_bin, temporary_postgres

__all__ = ["PostgresCluster", "postgres_bin", "temporary_postgres"]
