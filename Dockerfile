# Quiver's container image: one binary that runs as coordinator, worker, local cluster or client.
#   docker build -t quiver .
#   docker run --rm quiver local --workers 2 --tpch 0.01 --tpch-query 1
# The build stage compiles a release binary; the runtime image holds it, CA certificates (for
# object stores over HTTPS) and nothing else.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin quiver && strip target/release/quiver

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/quiver --create-home quiver
COPY --from=build /src/target/release/quiver /usr/local/bin/quiver
USER quiver
WORKDIR /var/lib/quiver
# 7050: the coordinator's Flight SQL port; 7051: a worker's; 8080: the web UI, API, /metrics,
# /healthz and /readyz.
EXPOSE 7050 7051 8080
ENTRYPOINT ["quiver"]
CMD ["--help"]
