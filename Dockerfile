# Multi-stage build: compile with the full toolchain, run on a slim image
# as a non-root user.
#
#   docker build -t gatehouse .
#   docker run --rm -p 8080:8080 -v $PWD/my.yaml:/etc/gatehouse/gatehouse.yaml:ro gatehouse
#
# The configuration must listen on 0.0.0.0 inside a container. To publish
# the admin port (9901) too, its listener must be 0.0.0.0 as well, and then
# admin.token is required (e.g. `token: ${ADMIN_TOKEN}` and
# `docker run -e ADMIN_TOKEN=$(openssl rand -hex 32) -p 9901:9901 ...`);
# gatehouse refuses an open admin listener off loopback. Containers
# upgrade by rolling restart (SIGTERM drains within server.grace_period),
# not by socket handoff.

FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake pkg-config libssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY examples ./examples
RUN cargo build --release --locked --bin gatehouse

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 gatehouse \
 && useradd --system --uid 10001 --gid gatehouse --no-create-home --shell /usr/sbin/nologin gatehouse \
 && install -d -o gatehouse -g gatehouse /run/gatehouse
COPY --from=build /src/target/release/gatehouse /usr/local/bin/gatehouse
COPY conf/gatehouse.yaml /etc/gatehouse/gatehouse.yaml
USER 10001:10001
EXPOSE 8080 9901
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/gatehouse"]
CMD ["-c", "/etc/gatehouse/gatehouse.yaml"]
