"""Logging in to a closed Quiver cluster over TLS from Python, with clients used unmodified: the
ADBC Flight SQL driver (Go; it sends Basic credentials without base64 padding) with a user and
password or with a token, and pyarrow.flight's Basic handshake. Wrong or missing credentials,
and an untrusted certificate, must fail.

Usage: adbc_auth.py <grpc+tls://host:port> <ca.pem> <user> <password> <token>
Run by tests/security_processes.rs against coordinator and worker processes it starts.
"""

import sys

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import pyarrow.flight as flight

URI, CA, USER, PASSWORD, TOKEN = sys.argv[1:6]
ROOTS = open(CA).read()
TLS = "adbc.flight.sql.client_option.tls_root_certs"
USERNAME = adbc_driver_manager.DatabaseOptions.USERNAME.value
PASSWORD_KEY = adbc_driver_manager.DatabaseOptions.PASSWORD.value


def total(**db_kwargs):
    with flightsql.connect(URI, db_kwargs={TLS: ROOTS, **db_kwargs}) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT sum(v) AS s FROM t")
            return cur.fetchall()[0][0]


def fails(what, **db_kwargs):
    try:
        total(**db_kwargs)
    except Exception as e:  # the driver's own error types vary by version
        print(f"ok - {what} is refused: {type(e).__name__}", flush=True)
        return
    raise AssertionError(f"{what} was accepted")


assert total(**{USERNAME: USER, PASSWORD_KEY: PASSWORD}) == 500500
print("ok - ADBC logs in with a user and password over TLS", flush=True)
assert total(**{"adbc.flight.sql.authorization_header": f"Bearer {TOKEN}"}) == 500500
print("ok - ADBC presents a token", flush=True)
fails("a wrong password", **{USERNAME: USER, PASSWORD_KEY: "not the password"})
fails("no credentials")

client = flight.FlightClient(URI, tls_root_certs=ROOTS.encode())
header = client.authenticate_basic_token(USER, PASSWORD)
options = flight.FlightCallOptions(headers=[header])
assert header[1].startswith(b"Bearer "), header
client.list_actions(options)
print("ok - pyarrow.flight's Basic handshake returns a bearer token", flush=True)
try:
    flight.FlightClient(URI).list_actions()
    raise AssertionError("a client that does not trust the certificate connected")
except flight.FlightUnavailableError:
    print("ok - a client without the CA cannot connect", flush=True)
print("all passed")
