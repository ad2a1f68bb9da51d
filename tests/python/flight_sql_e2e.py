"""End-to-end test of Quiver's Flight SQL front door from Python, with clients used unmodified:
the ADBC Flight SQL driver through its DBAPI, and pyarrow.flight speaking raw Flight.

Usage: flight_sql_e2e.py <grpc://host:port> <tpch dir with queries/ and answers/>
Run by tests/python.rs against a `quiver local --serve --tpch 0.01` it starts itself.
"""

import math
import sys
import time
from pathlib import Path

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import pyarrow as pa
import pyarrow.flight as flight

URI, TPCH = sys.argv[1], Path(sys.argv[2])


def check(name, fn):
    fn()
    print(f"ok - {name}", flush=True)


def read_answer(query):
    lines = (TPCH / "answers" / "sf0.01" / f"{query}.csv").read_text().strip().splitlines()
    return lines[0].split("|"), [line.split("|") for line in lines[1:]]


def same_cell(actual, expected):
    if actual is None:
        return expected in ("", "NULL", "null")
    if isinstance(actual, (int, float)) or hasattr(actual, "as_integer_ratio"):
        a, e = float(actual), float(expected)
        return math.isclose(a, e, rel_tol=1e-6, abs_tol=1e-2)
    return str(actual).strip() == expected.strip()


def tpch_q01_matches_the_official_answer():
    sql = (TPCH / "queries" / "q01.sql").read_text()
    with flightsql.connect(URI) as conn, conn.cursor() as cur:
        cur.execute(sql)
        table = cur.fetch_arrow_table()
    header, rows = read_answer("q01")
    assert table.column_names == header, (table.column_names, header)
    assert table.num_rows == len(rows), (table.num_rows, len(rows))
    for actual, expected in zip(table.to_pylist(), rows):
        for column, want in zip(header, expected):
            assert same_cell(actual[column], want), (column, actual[column], want)


def select_from_a_tpch_table_arrives_as_arrow():
    with flightsql.connect(URI) as conn, conn.cursor() as cur:
        cur.execute("SELECT n_nationkey, n_name FROM nation ORDER BY n_nationkey")
        table = cur.fetch_arrow_table()
        assert isinstance(table, pa.Table)
        assert table.num_rows == 25
        assert table.column("n_name")[0].as_py() == "ALGERIA"
        cur.execute("SELECT count(*) AS n FROM lineitem")
        assert cur.fetchone()[0] == 60175


def get_objects_lists_the_tables_and_their_columns():
    with flightsql.connect(URI) as conn:
        objects = conn.adbc_get_objects(depth="all").read_all().to_pylist()
        tables = {}
        for catalog in objects:
            for schema in catalog["catalog_db_schemas"] or []:
                for table in schema["db_schema_tables"] or []:
                    columns = [c["column_name"] for c in table["table_columns"] or []]
                    tables[(schema["db_schema_name"], table["table_name"])] = columns
        tpch = ["customer", "lineitem", "nation", "orders", "part", "partsupp", "region", "supplier"]
        for name in tpch:
            assert ("public", name) in tables, sorted(tables)
        assert tables[("public", "nation")] == ["n_nationkey", "n_name", "n_regionkey", "n_comment"]
        assert ("quiver", "tasks") in tables, sorted(tables)
        info = conn.adbc_get_info()
        assert info["vendor_name"] == "Quiver", info
        schema = conn.adbc_get_table_schema("region")
        assert schema.names == ["r_regionkey", "r_name", "r_comment"], schema.names


def bad_sql_is_a_flight_error_with_the_engine_message():
    with flightsql.connect(URI) as conn, conn.cursor() as cur:
        try:
            cur.execute("SELEC 1")
        except adbc_driver_manager.Error as e:
            assert "SELEC" in str(e) and "sql parser error" in str(e).lower(), str(e)
        else:
            raise AssertionError("bad SQL must fail")
        try:
            cur.execute("SELECT * FROM no_such_table")
        except adbc_driver_manager.Error as e:
            assert "no_such_table" in str(e), str(e)
        else:
            raise AssertionError("an unknown table must fail")
        # The connection and the server keep serving.
        cur.execute("SELECT 41 + 1 AS answer")
        assert cur.fetchone() == (42,)


def prepared_statements_bind_parameters():
    with flightsql.connect(URI) as conn, conn.cursor() as cur:
        sql = "SELECT count(*) AS n FROM lineitem WHERE l_quantity > $1 AND l_returnflag = $2"
        counts = []
        for quantity, flag in [(45, "R"), (10, "A")]:
            cur.execute(sql, parameters=(quantity, flag))
            counts.append(cur.fetchone()[0])
            cur.execute(f"SELECT count(*) FROM lineitem WHERE l_quantity > {quantity} AND l_returnflag = '{flag}'")
            assert counts[-1] == cur.fetchone()[0], counts
        assert counts[0] != counts[1] and all(c > 0 for c in counts), counts


def pb_bytes(field, payload):
    """One length-delimited protobuf field: enough to build Flight SQL commands by hand."""
    key, length, out = (field << 3) | 2, len(payload), bytearray()
    out.append(key)
    while True:
        byte, length = length & 0x7F, length >> 7
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out) + payload


def statement_command(sql):
    query = pb_bytes(1, sql.encode())
    return pb_bytes(1, b"type.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery") + pb_bytes(2, query)


def pyarrow_flight_runs_a_statement_and_cancels_one():
    client = flight.FlightClient(URI)
    descriptor = flight.FlightDescriptor.for_command(statement_command("SELECT r_name FROM region ORDER BY r_name"))
    info = client.get_flight_info(descriptor)
    assert info.schema.names == ["r_name"]
    table = client.do_get(info.endpoints[0].ticket).read_all()
    assert table.column("r_name").to_pylist() == ["AFRICA", "AMERICA", "ASIA", "EUROPE", "MIDDLE EAST"]

    with flightsql.connect(URI) as conn, conn.cursor() as cur:
        slow = "SELECT count(*) FROM lineitem a JOIN lineitem b ON a.l_suppkey = b.l_suppkey"
        info = client.get_flight_info(flight.FlightDescriptor.for_command(statement_command(slow)))
        results = list(client.do_action(flight.Action("CancelFlightInfo", pb_bytes(1, info.serialize()))))
        # CancelFlightInfoResult { status = CANCEL_STATUS_CANCELLED (1) }
        assert [r.body.to_pybytes() for r in results] == [b"\x08\x01"], results
        try:
            client.do_get(info.endpoints[0].ticket).read_all()
        except pa.ArrowException as e:  # INVALID_ARGUMENT arrives as ArrowInvalid
            assert "no result waits" in str(e), str(e)
        else:
            raise AssertionError("a cancelled statement has no result to fetch")
        cur.execute(f"SELECT state FROM quiver.queries WHERE sql = '{slow}'")
        assert cur.fetchall() == [("cancelled",)]
    client.close()


if __name__ == "__main__":
    started = time.time()
    check("TPC-H q01 over ADBC matches the official answer", tpch_q01_matches_the_official_answer)
    check("SELECT from a TPC-H table arrives as Arrow", select_from_a_tpch_table_arrives_as_arrow)
    check("adbc_get_objects lists the tables and their columns", get_objects_lists_the_tables_and_their_columns)
    check("bad SQL is a Flight error with the engine's message", bad_sql_is_a_flight_error_with_the_engine_message)
    check("prepared statements bind parameters", prepared_statements_bind_parameters)
    check("pyarrow.flight runs a statement and cancels one", pyarrow_flight_runs_a_statement_and_cancels_one)
    print(f"all passed in {time.time() - started:.1f} s")
