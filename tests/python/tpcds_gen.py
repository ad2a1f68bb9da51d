"""Makes TPC-DS data and queries for the differential suite (tests/tpcds.rs).

Uses DuckDB's tpcds extension as shipped on PyPI (duckdb-extension-tpcds): dsdgen writes
the 24 tables at the given scale factor, each saved as one Parquet file, and the 99 queries
are written as qNN.sql. Nothing is fetched from the network.

Usage: python3 tpcds_gen.py SCALE_FACTOR OUT_DIR
"""

import glob
import os
import sys

import duckdb
import duckdb_extension_tpcds


def main() -> None:
    sf, out = float(sys.argv[1]), sys.argv[2]
    os.makedirs(os.path.join(out, "queries"), exist_ok=True)
    package = os.path.dirname(duckdb_extension_tpcds.__file__)
    extension = glob.glob(os.path.join(package, "extensions", "**", "tpcds.duckdb_extension"), recursive=True)[0]
    con = duckdb.connect()
    con.execute(f"LOAD '{extension}'")
    con.execute(f"CALL dsdgen(sf={sf})")
    for (table,) in con.execute("SELECT table_name FROM information_schema.tables ORDER BY 1").fetchall():
        os.makedirs(os.path.join(out, table), exist_ok=True)
        path = os.path.join(out, table, "part-1.parquet")
        con.execute(f"COPY {table} TO '{path}' (FORMAT parquet, ROW_GROUP_SIZE 2000)")
    for number, query in con.execute("SELECT query_nr, query FROM tpcds_queries()").fetchall():
        with open(os.path.join(out, "queries", f"q{number:02}.sql"), "w") as f:
            f.write(query)
    open(os.path.join(out, "_SUCCESS"), "w").close()


if __name__ == "__main__":
    main()
